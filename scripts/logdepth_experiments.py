"""The log-depth experiments of issue 13: retrieval models with fewer layers than hops.

Musat (ICLR 2025) proves that t layers can resolve chains of up to ~3^t / 2 hops
(t >= log_3(2D)) and reports learned solutions that roughly double the resolved segment
per layer. This script trains attention-only models on chains longer than their depth
with the implicit curriculum (every statement's right-hand side supervised with its
resolved value, plus the query), batch 128, and records every configuration it tries:

    python scripts/logdepth_experiments.py --list
    python scripts/logdepth_experiments.py --run A1,B1 --out logs/search.jsonl
    python scripts/logdepth_experiments.py --run A1 --save logs/ckpt   # keep the weights

Each run stops at its step cap, at its wall-clock cap, or once every difficulty is
answered with >= 98% accuracy on the held-out batch (512 sequences). It then reports
the query accuracy per main-chain length D on a fresh batch of 2048 sequences (seed
123456), the literal-guess chance level per D (the accuracy of answering with a random
literal present in the sequence) and the stack found by ``lp.stacked_heads``. A run
with ``emergence`` keeps checkpoints and reports ``lp.emergence`` on them.

The step budgets here are far below the paper's ~24k steps: the runs shared two CPU
cores with other jobs (one thread each); every record carries its steps and seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch

import lensprobe as lp
from lensprobe.tasks.retrieval import RetrievalTask

# Compact statements "A B" (A := B; no '=' and no separator): shorter sequences, so
# more steps per CPU second. Measured: with rotary (relative) positions nothing marks
# which token of a pair is the left-hand side, and A4/B4 stayed at the literal-guess
# level for 11.9k/7.2k steps (A1-B4); the shipped 4-layer recipe's "A = B" statements
# (ASSIGN) mark it, and the A5/B5 runs use them.
COMPACT = dict(assign=None, separator=None)
ASSIGN = dict(assign="=", separator=None)
# chains of 1-4 hops among 6 statements; of 1-8 among 10 (so that an 8-hop chain has
# distractors: with 8 statements its literal is the only one in the sequence)
SHORT = dict(hops=[1, 2, 3, 4], n_statements=6, n_vars=12, n_values=10)
LONG = dict(hops=list(range(1, 9)), n_statements=10, n_vars=14, n_values=10)


def _cfg(task: dict, layers: int, lr: float, warmup: int, steps: int, seconds: float, heads: int = 4,
         d_model: int = 64, emergence: bool = True, **model) -> dict:
    return dict(task=task, model=dict(n_layers=layers, n_heads=heads, d_model=d_model, **model),
                train=dict(lr=lr, warmup=warmup), steps=steps, seconds=seconds, emergence=emergence)


CONFIGS: dict[str, dict] = {
    # 2 layers on 1-4 hops: the bound itself (log_3(2*4) = 1.89)
    "A1": _cfg(dict(**SHORT, **COMPACT), 2, 3e-3, 100, 2500, 260, emergence=False),
    "A2": _cfg(dict(**SHORT, **COMPACT), 2, 1e-3, 300, 2500, 260, heads=8, d_model=128, emergence=False),
    "A3": _cfg(dict(**SHORT, distractor_hops=1, **COMPACT), 2, 3e-3, 100, 2500, 260, emergence=False),
    # 3 layers on 1-8 hops (log_3(2*8) = 2.52)
    "B1": _cfg(dict(**LONG, **COMPACT), 3, 3e-3, 100, 5000, 620),
    "B2": _cfg(dict(**LONG, **COMPACT), 3, 1e-3, 500, 5000, 620, heads=8, d_model=128),
    "B3": _cfg(dict(**LONG, distractor_hops=2, **COMPACT), 3, 3e-3, 100, 5000, 620),
    # the budgets A1/B1 lacked: the shipped 4-layer model sat on a plateau for ~1500
    # steps before its 1-hop head formed, so these run up to 15k / 25k steps
    "A4": _cfg(dict(**SHORT, **COMPACT), 2, 3e-3, 100, 15000, 1800),
    "B4": _cfg(dict(**LONG, **COMPACT), 3, 3e-3, 100, 25000, 3000),
    "A5": _cfg(dict(**SHORT, **ASSIGN), 2, 3e-3, 100, 15000, 1800),
    "B5": _cfg(dict(**LONG, **ASSIGN), 3, 3e-3, 100, 25000, 3000),
    # GPT-2 style: learned absolute positions and MLPs. With rotary positions and no
    # MLP a position's value carries no position, so a layer can follow a chain only by
    # token identity; A5 (rotary) sat at 0.61 on 1 hop after 10k steps
    "A6": _cfg(dict(**SHORT, **ASSIGN), 2, 1e-3, 300, 15000, 1800, positional="standard", attn_only=False),
}
BASE_MODEL = dict(attn_only=True, positional="rotary")
BASE_TRAIN = dict(batch_size=128, weight_decay=0.01, eval_every=100, eval_batch_size=512)


def run(name: str, cfg: dict, seed: int = 0, save: str | None = None) -> dict:
    task = RetrievalTask(**cfg["task"])
    model = lp.tiny_model(d_vocab=len(task.vocab), n_ctx=task.seq_len, vocab=task.vocab,
                          seed=seed, **dict(BASE_MODEL, **cfg["model"]))
    cap = float(cfg["seconds"])
    log = []

    def stop(step, m, rec):
        accs = {int(k[4:]): v for k, v in rec.items() if k.startswith("acc_")}
        log.append(f"{step} {rec['seconds']:.0f}s " + " ".join(f"{d}:{a:.2f}" for d, a in accs.items()))
        print(name, log[-1], flush=True)
        return min(accs.values()) >= 0.98 or rec["seconds"] >= cap

    ckpts = tuple(range(0, cfg["steps"] + 1, 250)) if cfg.get("emergence") else ()
    res = lp.train(model, task, steps=cfg["steps"], seed=seed, callbacks=[stop],
                   checkpoint_steps=ckpts, progress=False, **BASE_TRAIN, **cfg["train"])
    fresh = task.sample(2048, torch.Generator().manual_seed(123_456))
    probe = task.sample(256, torch.Generator().manual_seed(99))
    qa = lp.query_accuracy(model, fresh)
    st = lp.stacked_heads(model, probe)
    out = dict(name=name, seed=seed, task=task.config(), seq_len=task.seq_len,
               model=dict(BASE_MODEL, **cfg["model"]), train=dict(BASE_TRAIN, **cfg["train"]),
               step_cap=cfg["steps"], seconds_cap=cap, steps=res.steps_done,
               seconds=round(res.seconds, 1), query_accuracy=qa,
               literal_guess=task.literal_guess(fresh),
               accuracy_per_difficulty=lp.evaluate(model, fresh).accuracy,
               stack=[_entry(s) for s in st.stack], increasing=st.increasing,
               clean_accuracy=st.clean_accuracy, ablation=st.ablation,
               history=[{k: round(v, 4) for k, v in r.items()
                         if k == "step" or k.startswith(("acc_", "loss_"))} for r in res.history])
    if ckpts and len(res.checkpoints) >= 2:
        em = lp.emergence(res, probe, progress=False)
        out["emergence"] = dict(order=em.order, emerged_at=em.emerged_at,
                                loss_drop_at=em.loss_drop_at)
    if save:
        Path(save).mkdir(parents=True, exist_ok=True)
        lp.save_checkpoint(model, Path(save) / f"{name}_s{seed}.safetensors", vocab=task.vocab,
                           extra={"task": task.config(), "config": name})
    return out


def finetune(name: str, cfg: dict, seed: int, save: str, steps: int, lr: float) -> dict:
    """Phase 2 of a saved run (as the shipped 4-layer model had): a fresh AdamW at ``lr``
    with cosine decay for at most ``steps`` steps (stopping at >= 98% on every difficulty),
    saved as ``<save>/<name>+ft_s<seed>.safetensors`` and recorded as ``<name>+ft``."""
    task = RetrievalTask(**cfg["task"])
    model = lp.load_checkpoint(Path(save) / f"{name}_s{seed}.safetensors")
    log = []

    def stop(step, m, rec):
        accs = {int(k[4:]): v for k, v in rec.items() if k.startswith("acc_")}
        log.append(f"{step} {rec['seconds']:.0f}s " + " ".join(f"{d}:{a:.2f}" for d, a in accs.items()))
        print(name + "+ft", log[-1], flush=True)
        return min(accs.values()) >= 0.98

    res = lp.train(model, task, steps=steps, seed=seed + 7919, callbacks=[stop], progress=False,
                   **dict(BASE_TRAIN, lr=lr, warmup=50, schedule="cosine"))
    fresh = task.sample(2048, torch.Generator().manual_seed(123_456))
    probe = task.sample(256, torch.Generator().manual_seed(99))
    st = lp.stacked_heads(model, probe)
    lp.save_checkpoint(model, Path(save) / f"{name}+ft_s{seed}.safetensors", vocab=task.vocab,
                       extra={"task": task.config(), "config": name + "+ft"})
    return dict(name=name + "+ft", seed=seed, phase2=dict(lr=lr, schedule="cosine", warmup=50, step_cap=steps),
                steps=res.steps_done, seconds=round(res.seconds, 1), query_accuracy=lp.query_accuracy(model, fresh),
                literal_guess=task.literal_guess(fresh), stack=[_entry(s) for s in st.stack],
                increasing=st.increasing, task=task.config(), seq_len=task.seq_len,
                model=dict(BASE_MODEL, **cfg["model"]), train=dict(BASE_TRAIN, **cfg["train"]),
                history=[{k: round(v, 4) for k, v in r.items()
                          if k == "step" or k.startswith(("acc_", "loss_"))} for r in res.history])


def _entry(s) -> dict:
    """A stack entry as a plain dict (entries are dataclasses or dicts)."""
    d = dataclasses.asdict(s) if dataclasses.is_dataclass(s) else dict(s)
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}


def ship(config: str, name: str, seeds: list[int], runs_path: str, workdir: str) -> dict:
    """Ship the ``seeds[0]`` run of ``config`` as ``lensprobe/zoo/<name>.safetensors`` with its
    card ``<name>.json``: the configuration, and per seed the record of its run (``--run
    CONFIG --seed S --save WORKDIR`` first: accuracy per hop count, emergence) with the
    stack and head ablations measured here on the saved model."""
    zoo = Path(lp.__file__).parent / "zoo"
    base = config.split("+")[0]  # "A6+ft": phase 2 of A6
    lines = [json.loads(line) for line in Path(runs_path).read_text().splitlines() if line.strip()]
    recs = {r["seed"]: r for r in lines if r.get("name") == config}
    phase1 = {r["seed"]: r for r in lines if r.get("name") == base}
    missing = [s for s in seeds if s not in recs or s not in phase1]
    if missing:
        raise SystemExit(f"no record of {config} (and {base}) for seeds {missing} in {runs_path}; run them first.")
    task = RetrievalTask(**CONFIGS[base]["task"])
    fresh = task.sample(2048, torch.Generator().manual_seed(123_456))
    probe = task.sample(256, torch.Generator().manual_seed(99))
    runs = []
    for seed in seeds:
        model = lp.load_checkpoint(Path(workdir) / f"{config}_s{seed}.safetensors")
        st = lp.stacked_heads(model, probe)
        p1, p2 = phase1[seed], recs[seed]
        rec = dict(seed=seed, phase1_steps=p1["steps"], phase1_seconds=p1["seconds"],
                   phase1_query_accuracy=p1["query_accuracy"], emergence=p1.get("emergence"),
                   phase1_history=p1.get("history"))
        if p2 is not p1:
            rec.update(phase2=p2.get("phase2"), phase2_steps=p2["steps"], phase2_seconds=p2["seconds"],
                       phase2_history=p2.get("history"))
        rec.update(literal_guess=p1["literal_guess"], query_accuracy=lp.query_accuracy(model, fresh),
                   stack=[_entry(s) for s in st.stack], increasing=st.increasing, hop_profile=st.hop_profile,
                   clean_accuracy=st.clean_accuracy, ablation=st.ablation)
        runs.append(rec)
    shutil.copy(Path(workdir) / f"{config}_s{seeds[0]}.safetensors", zoo / f"{name}.safetensors")
    cfg = CONFIGS[base]
    card = dict(
        name=name, script="scripts/logdepth_experiments.py", config_name=config,
        paper="Musat, Mechanism and Emergence of Stacked Attention Heads in Multi-Layer Transformers (ICLR 2025)",
        seed=seeds[0], task=task.config(), seq_len=task.seq_len,
        model=dict(BASE_MODEL, **cfg["model"]),
        train=dict(BASE_TRAIN, **cfg["train"], steps_max=cfg["steps"], seconds_max=cfg["seconds"],
                   stop_at_accuracy=0.98),
        backend=f"{lp.BACKEND} (transformer-lens {lp.TL_VERSION})", threads=1,
        eval="query accuracy per main-chain length D on a fresh batch of 2048 (generator seed 123456);"
             " stack and ablations (mean-ablated hook_z) on 256 sequences (seed 99)",
        search="lensprobe/zoo/results/logdepth_search.json", runs=runs,
    )
    (zoo / f"{name}.json").write_text(json.dumps(card, indent=1) + "\n")
    return card


def summarize(runs_path: str, out: str, notes: list[dict]) -> None:
    """The record of every configuration tried (lensprobe/zoo/results/logdepth_search.json):
    per run its configuration, steps, seconds, query accuracy and literal-guess chance per
    D and the stack; ``notes`` adds runs that ended without a record (stopped by hand)."""
    runs = [json.loads(line) for line in Path(runs_path).read_text().splitlines() if line.strip()]
    keep = ("name", "seed", "task", "seq_len", "model", "train", "step_cap", "seconds_cap", "steps",
            "seconds", "wall_seconds", "query_accuracy", "literal_guess", "stack", "increasing",
            "emergence", "clean_accuracy", "ablation", "phase2")
    rnd = lambda d: {k: round(v, 4) for k, v in d.items()}  # noqa: E731
    rows = []
    for r in runs:
        row = {k: r[k] for k in keep if k in r}
        row["query_accuracy"], row["literal_guess"] = rnd(r["query_accuracy"]), rnd(r["literal_guess"])
        row["stack"] = [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in s.items()}
                        for s in r["stack"]]
        row["status"] = "finished"
        rows.append(row)
    rows += notes
    Path(out).write_text(json.dumps({"script": "scripts/logdepth_experiments.py", "runs": rows},
                                    indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="", help="comma-separated config names (see --list)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="logs/search.jsonl")
    ap.add_argument("--save", default=None, help="directory for the trained checkpoints")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None, help="override every step cap (smoke tests)")
    ap.add_argument("--ship", default=None, metavar="NAME",
                    help="ship the saved --run CONFIG runs of --seeds (first one's model) as lp.zoo NAME")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--finetune", type=int, default=None, metavar="STEPS",
                    help="phase 2 of the saved --run CONFIG --seed run: cosine from --ft-lr for STEPS steps")
    ap.add_argument("--ft-lr", type=float, default=5e-4)
    args = ap.parse_args()
    if args.list:
        print(json.dumps(CONFIGS, indent=1))
        return
    torch.set_num_threads(args.threads)
    if args.finetune:
        rec = finetune(args.run, CONFIGS[args.run], args.seed, args.save or "logs/ckpt", args.finetune, args.ft_lr)
        with open(args.out, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps({k: rec[k] for k in ("name", "seed", "steps", "seconds", "query_accuracy")}), flush=True)
        return
    if args.ship:
        ship(args.run, args.ship, [int(v) for v in args.seeds.split(",")], args.out, args.save or "logs/ckpt")
        return
    for name in [n for n in args.run.split(",") if n]:
        t0 = time.perf_counter()
        cfg = dict(CONFIGS[name], **({"steps": args.steps} if args.steps else {}))
        rec = run(name, cfg, seed=args.seed, save=args.save)
        rec["wall_seconds"] = round(time.perf_counter() - t0, 1)
        with open(args.out, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps({k: rec[k] for k in ("name", "steps", "seconds", "query_accuracy",
                                              "literal_guess", "stack")}), flush=True)


if __name__ == "__main__":
    main()
