"""Benchmark: training throughput, time to 95% on 4 hops, stacked_heads on 128 sequences.

Ratios are against baselines measured in the same run:
* lp.train vs a bare PyTorch loop (same model, task batches, AdamW, no evaluation);
* stacked_heads (with and without the ablation check) vs one plain forward pass
  collecting every attention pattern (``run_with_cache``) on the same batch.
Time to 95% on 4 hops for the shipped configuration comes from the zoo card (measured by
scripts/train_zoo_retrieval.py); ``--full`` re-trains it here instead (minutes).

    python benchmarks/bench_training.py [--steps 40] [--full]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import timeit
from pathlib import Path

import torch

import lensprobe as lp
from lensprobe.tasks.retrieval import RetrievalTask

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "scripts"))
import train_zoo_retrieval as zoo_script  # noqa: E402


def best_of(fn, repeat: int = 3) -> float:
    return min(timeit.repeat(fn, number=1, repeat=repeat))


def bare_loop(model, task, steps: int, batch_size: int, lr: float) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    for s in range(steps):
        b = task.sample(batch_size, torch.Generator().manual_seed(s))
        logits = model(b.tokens)
        mask = b.targets != lp.tasks.IGNORE
        loss = torch.nn.functional.cross_entropy(logits[mask], b.targets[mask])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    task = RetrievalTask(**zoo_script.TASK)
    bs = zoo_script.TRAIN["batch_size"]

    def fresh():
        return lp.tiny_model(d_vocab=len(task.vocab), n_ctx=task.seq_len, seed=0, **zoo_script.MODEL)

    m1, m2 = fresh(), fresh()
    t_lp = best_of(lambda: lp.train(m1, task, steps=args.steps, batch_size=bs, eval_every=args.steps,
                                    eval_batch_size=bs, progress=False), repeat=1)
    t_bare = best_of(lambda: bare_loop(m2, task, args.steps, bs, 1e-3), repeat=1)
    ex_lp = args.steps * bs / t_lp
    ex_bare = args.steps * bs / t_bare

    card = lp.zoo.info("retrieval") if "retrieval" in lp.zoo.names() else {}
    if args.full:
        t0 = time.perf_counter()
        model = fresh()
        reached = {}

        def cb(step, m, rec):
            if rec.get("acc_4", 0) >= 0.95:
                reached.update(step=step, seconds=time.perf_counter() - t0)
                return True

        lp.train(model, task, steps=6000, callbacks=[cb], progress=False,
                 **{k: v for k, v in zoo_script.TRAIN.items()})
        to95 = dict(source="measured here", **reached)
    else:
        to95 = dict(source="zoo card (scripts/train_zoo_retrieval.py)",
                    step=card.get("step_to_95_on_4"), seconds=card.get("seconds_to_95_on_4"),
                    threads=card.get("threads"))

    shipped = lp.zoo.load("retrieval") if card else fresh()
    batch = task.sample(128, torch.Generator().manual_seed(1))
    names = lambda n: n.endswith("hook_pattern")  # noqa: E731
    t_cache = best_of(lambda: shipped.run_with_cache(batch.tokens, names_filter=names))
    t_stack = best_of(lambda: lp.stacked_heads(shipped, batch))
    t_stack_noabl = best_of(lambda: lp.stacked_heads(shipped, batch, ablation=None))

    results = {
        "backend": f"{lp.BACKEND} (transformer-lens {lp.TL_VERSION})",
        "threads": args.threads,
        "train_examples_per_s": round(ex_lp, 1),
        "bare_loop_examples_per_s": round(ex_bare, 1),
        "train_vs_bare_throughput": round(ex_lp / ex_bare, 3),
        "time_to_95_on_4_hops": to95,
        "stacked_heads_128_s": round(t_stack, 4),
        "stacked_heads_128_no_ablation_s": round(t_stack_noabl, 4),
        "run_with_cache_128_s": round(t_cache, 4),
        "stacked_heads_vs_forward": round(t_stack / t_cache, 2),
        "stacked_heads_no_ablation_vs_forward": round(t_stack_noabl / t_cache, 2),
    }
    for k, v in results.items():
        print(f"{k:40s} {v}")
    out = HERE / "results" / "training.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
