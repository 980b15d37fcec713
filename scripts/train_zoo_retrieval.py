"""Train the shipped retrieval model: lensprobe/zoo/retrieval.safetensors (+ .json card).

An attention-only 4-layer transformer (rotary positions, d_model 64, 4 heads) trained with
the implicit curriculum on assignment chains of 1-4 hops (RetrievalTask), AdamW, batch
128: phase 1 at a constant lr 3e-3 for ``--steps`` steps (or until every hop count, the
4-hop query included, is answered with >= 98% accuracy on the held-out batch), then
phase 2, a fresh AdamW at lr 5e-4 with cosine decay, until the same criterion holds on
2048 held-out sequences or ``--ft-steps`` steps. Reproducible from ``--seed`` (batches
are a function of seed and step; float summation order can still differ across
machines and TransformerLens backends).

    python scripts/train_zoo_retrieval.py            # writes lensprobe/zoo/retrieval.*
    python scripts/train_zoo_retrieval.py --out /tmp/r --seed 1
    python scripts/train_zoo_retrieval.py --experiments /tmp/exp.json   # the issue's checks
    python scripts/train_zoo_retrieval.py --depth-study /tmp/depth.json  # layers x seeds grid

``--experiments`` runs the checks of the paper on a smaller task (chains of 1-2 hops,
4 statements) with one budget for every run: 1 vs 3 layers (curriculum), final-answer
-only vs curriculum (3 layers), and the emergence order of the 3-layer curriculum runs,
each over seeds 0, 1, 2; it writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import lensprobe as lp
from lensprobe.tasks.retrieval import RetrievalTask

TASK = dict(hops=[1, 2, 3, 4], n_statements=8, n_vars=12, n_values=10, separator=None)
MODEL = dict(n_layers=4, n_heads=4, d_model=64, attn_only=True, positional="rotary")
TRAIN = dict(lr=3e-3, batch_size=128, warmup=100, weight_decay=0.01, eval_every=100,
             eval_batch_size=512)


EXP_TASK = dict(hops=[1, 2], n_statements=4, n_vars=8, n_values=10, separator=None)
EXP_MODEL = dict(n_heads=4, d_model=64, attn_only=True, positional="rotary")
EXP_TRAIN = dict(lr=3e-3, batch_size=128, warmup=50, eval_every=50, eval_batch_size=256)


def experiments(path: str, steps: int, seeds=(0, 1, 2), only: str | None = None) -> None:
    out: dict = {"task": EXP_TASK, "model": EXP_MODEL, "train": dict(EXP_TRAIN, steps=steps),
                 "runs": []}
    eval_task = RetrievalTask(**EXP_TASK)
    probe = eval_task.sample(256, torch.Generator().manual_seed(4242))
    fresh = eval_task.sample(2048, torch.Generator().manual_seed(777))
    for supervision, layers in (("curriculum", 1), ("curriculum", 3), ("final", 3)):
        if only is not None and f"{supervision}:{layers}" not in only.split(","):
            continue
        task = RetrievalTask(**dict(EXP_TASK, supervision=supervision))
        for seed in seeds:
            t0 = time.perf_counter()
            model = lp.tiny_model(n_layers=layers, d_vocab=len(task.vocab), n_ctx=task.seq_len,
                                  vocab=task.vocab, seed=seed, **EXP_MODEL)
            ckpts = tuple(range(0, steps + 1, 50)) if supervision == "curriculum" and layers == 3 else ()
            res = lp.train(model, task, steps=steps, seed=seed, checkpoint_steps=ckpts,
                           progress=False, **EXP_TRAIN)
            qa = lp.query_accuracy(model, fresh)
            literal_guess = eval_task.literal_guess(fresh)
            run = dict(supervision=supervision, layers=layers, seed=seed,
                       query_accuracy=qa, literal_guess_baseline=literal_guess,
                       seconds=round(time.perf_counter() - t0, 1))
            if ckpts:
                em = lp.emergence(res, probe, progress=False)
                run["emergence_order"] = em.order
                run["emerged_at"] = em.emerged_at
                df = em.to_dataframe().set_index("name")
                run["best_hop"] = {n: int(df.loc[n, "best_hop"]) for n in em.order}
                run["loss_drop_at"] = em.loss_drop_at
                run["accuracy_history"] = [{k: round(v, 3) for k, v in r.items()
                                            if k == "step" or k.startswith(("acc_", "loss_"))}
                                           for r in res.history]
                st = lp.stacked_heads(model, probe)
                run["stack"] = st.stack
            print(json.dumps(run), flush=True)
            out["runs"].append(run)
            Path(path).write_text(json.dumps(out, indent=1))


def run_depth_study(path: str, steps: int) -> None:
    """lp.depth_study on the experiment task: layers 1-3 x seeds 0-2, one budget."""
    task = RetrievalTask(**EXP_TASK)
    model_kwargs = {k: v for k, v in EXP_MODEL.items()}
    train_kwargs = {k: v for k, v in EXP_TRAIN.items() if k != "eval_every"}
    res = lp.depth_study(task, layers=(1, 2, 3), seeds=(0, 1, 2), steps=steps,
                         model_kwargs=model_kwargs, train_kwargs=train_kwargs, eval_batch_size=2048)
    out = dict(config=res.config, layers=res.layers, seeds=res.seeds, hops=res.hops,
               accuracy=res.accuracy.tolist(), mean=res.mean().tolist())
    Path(path).write_text(json.dumps(out, indent=1))
    res.plot().savefig(Path(path).with_suffix(".png"), dpi=90)
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=6000, help="phase 1 (constant lr) at most")
    ap.add_argument("--ft-steps", type=int, default=1500, help="phase 2 (low lr, cosine) at most")
    ap.add_argument("--target", type=float, default=0.98)
    ap.add_argument("--out", default=str(Path(lp.__file__).parent / "zoo" / "retrieval"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--from-phase1", default=None,
                    help="skip phase 1: load the model and card it wrote (path without suffix)")
    ap.add_argument("--experiments", default=None, help="run the checks, write JSON here")
    ap.add_argument("--exp-steps", type=int, default=1000)
    ap.add_argument("--exp-only", default=None, help="e.g. 'curriculum:3,final:3'")
    ap.add_argument("--depth-study", default=None, help="run lp.depth_study, write JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.experiments:
        experiments(args.experiments, args.exp_steps, only=args.exp_only)
        return
    if args.depth_study:
        run_depth_study(args.depth_study, args.exp_steps)
        return

    task = RetrievalTask(**TASK)
    hit: dict[str, float] = {}
    offset = {"steps": 0, "seconds": 0.0}

    def stop_when_solved(step, m, rec):
        accs = {int(k[4:]): v for k, v in rec.items() if k.startswith("acc_")}
        t = offset["seconds"] + rec["seconds"]
        print(offset["steps"] + step, f"{t:.0f}s", " ".join(f"{d}:{a:.3f}" for d, a in accs.items()), flush=True)
        if accs.get(4, 0.0) >= 0.95 and "seconds_to_95_on_4" not in hit:
            hit["seconds_to_95_on_4"] = round(t, 1)
            hit["step_to_95_on_4"] = offset["steps"] + step
        return min(accs.values()) >= args.target

    phases = []
    if args.from_phase1:
        model = lp.load_checkpoint(Path(args.from_phase1).with_suffix(".safetensors"))
        old = json.loads(Path(args.from_phase1).with_suffix(".json").read_text())
        phases.append(old["phases"][0])
        hit.update({k: old[k] for k in ("seconds_to_95_on_4", "step_to_95_on_4") if k in old})
    else:
        model = lp.tiny_model(d_vocab=len(task.vocab), n_ctx=task.seq_len, vocab=task.vocab,
                              seed=args.seed, **MODEL)
        res = lp.train(model, task, steps=args.steps, seed=args.seed, callbacks=[stop_when_solved],
                       progress=False, **TRAIN)
        phases.append(dict(name="constant lr", config=res.config, steps=res.steps_done,
                           seconds=round(res.seconds, 1), history=res.history))
    # Phase 2: the constant-lr run hovers around its target (the 4-hop accuracy on
    # 512 held-out sequences swings by a few points); a fresh AdamW with a small
    # cosine-decayed lr settles it (new batches: seed + 1), judged on 2048 sequences.
    offset.update(steps=phases[0]["steps"], seconds=phases[0]["seconds"])
    ft = dict(TRAIN, lr=5e-4, warmup=0, schedule="cosine", eval_batch_size=2048)
    res = lp.train(model, task, steps=args.ft_steps, seed=args.seed + 1,
                   callbacks=[stop_when_solved], progress=False, **ft)
    phases.append(dict(name="low lr, cosine", config=res.config, steps=res.steps_done,
                       seconds=round(res.seconds, 1), history=res.history))
    fresh = task.sample(2048, torch.Generator().manual_seed(123_456))
    ev = lp.evaluate(model, fresh)
    qa = lp.query_accuracy(model, fresh)
    stack = lp.stacked_heads(model, task.sample(256, torch.Generator().manual_seed(99)))
    out = Path(args.out)
    card = {
        "name": "retrieval",
        "script": "scripts/train_zoo_retrieval.py",
        "paper": "Musat, Mechanism and Emergence of Stacked Attention Heads in Multi-Layer Transformers (ICLR 2025)",
        "seed": args.seed,
        "task": task.config(),
        "model": MODEL,
        "train": dict(TRAIN, steps_max=args.steps, ft_steps_max=args.ft_steps, stop_at_accuracy=args.target),
        "steps": sum(p["steps"] for p in phases),
        "train_seconds": round(sum(p["seconds"] for p in phases), 1),
        "threads": args.threads,
        "backend": f"{lp.BACKEND} (transformer-lens {lp.TL_VERSION})",
        "accuracy_per_difficulty": ev.accuracy,
        "query_accuracy_per_hops": qa,
        "eval": "fresh batch of 2048, generator seed 123456",
        **hit,
        "stack": [dict(s) for s in stack.stack],
        "ablation_check": stack.ablation_check(),
        "phases": phases,
    }
    lp.save_checkpoint(model, out.with_suffix(".safetensors"), vocab=task.vocab,
                       extra={"task": task.config(), "card": f"{out.name}.json"})
    out.with_suffix(".json").write_text(json.dumps(card, indent=1))
    print(json.dumps({k: card[k] for k in ("steps", "train_seconds", "accuracy_per_difficulty",
                                          "query_accuracy_per_hops", "stack", "ablation_check")},
                     indent=1))


if __name__ == "__main__":
    main()
