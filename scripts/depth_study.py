"""Re-run the shipped depth study: lensprobe/zoo/results/depth_study.json.

``lp.depth_study`` over layers 1-4 and chains of 1-8 hops (one task with D uniform in
1..8, 10 statements "A = B" without separators), seeds 0 and 1, the implicit
curriculum at batch 128, lr 1e-3 (300 warm-up steps), GPT-2 style models (learned
positions, MLPs, d_model 64, 4 heads), at most ``--steps`` steps per run
(a run stops early once every difficulty reaches 98% on its held-out batch). Query
accuracy per D on 2048 fresh sequences per seed, beside the literal-guess chance level.

    python scripts/depth_study.py                       # writes the shipped JSON
    python scripts/depth_study.py --steps 200 --out /tmp/ds.json --plot /tmp/ds.png
    python scripts/depth_study.py --seeds 1 --out /tmp/s1.json   # one process per seed, then
    python scripts/depth_study.py --merge /tmp/s0.json /tmp/s1.json   # writes the shipped JSON

The shipped record was trained on a shared 2-core CPU with one thread per run; its
step budget (``config.steps``) is a small fraction of the paper's ~24k steps, so read
it as "what this budget learns", not as the depth the architecture can reach.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import lensprobe as lp
from lensprobe.tasks.retrieval import RetrievalTask

# "A = B": with rotary positions the compact "A B" statements left every model at the
# literal-guess level (scripts/logdepth_experiments.py, configs A4/B4)
TASK = dict(hops=list(range(1, 9)), n_statements=10, n_vars=14, n_values=10,
            assign="=", separator=None)
# GPT-2 style (learned absolute positions, MLPs): the rotary attention-only models of the
# first study stayed at the literal-guess level (logdepth config A5; 1-2 layers at 4000
# steps), while this one learned 1-hop in under 1000 steps (config A6)
MODEL = dict(n_heads=4, d_model=64, attn_only=False, positional="standard")
TRAIN = dict(lr=1e-3, warmup=300, batch_size=128, weight_decay=0.01, eval_every=100,
             eval_batch_size=256)
OUT = Path(lp.__file__).parent / "zoo" / "results" / lp.stacking.DEPTH_STUDY_JSON


class SharedBatches:
    """The task, with each training batch sampled once and reused by every run of the
    same seed (lp.train draws batch s of seed r from a fresh generator seeded
    r * 1_000_003 + s, so the key is the generator's seed): the runs of one seed see
    exactly the batches they would see alone, and the sampler (about half of a step's
    CPU time for these small models) runs once instead of once per layer count."""

    def __init__(self, task: RetrievalTask, train_batch_size: int):
        self.task = task
        self.train_batch_size = train_batch_size
        self.cache: dict[tuple[int, int], lp.tasks.Batch] = {}

    def __getattr__(self, name):
        return getattr(self.task, name)

    def sample(self, batch_size, generator=None):
        if generator is None or batch_size != self.train_batch_size:
            return self.task.sample(batch_size, generator)
        key = (batch_size, generator.initial_seed())
        if key not in self.cache:
            b = self.task.sample(batch_size, generator)
            # training reads tokens, targets and difficulty only; keep memory small
            self.cache[key] = lp.tasks.Batch(b.tokens, b.targets, b.difficulty, {})
        return self.cache[key]


def solved(step, model, rec) -> bool:
    """Stop a run once every difficulty is answered with >= 98% accuracy."""
    accs = [v for k, v in rec.items() if k.startswith("acc_")]
    print(step, f"{rec['seconds']:.0f}s", " ".join(f"{v:.2f}" for v in accs), flush=True)
    return min(accs) >= 0.98


def merge(paths: list[str], out: str) -> None:
    """Join studies run per seed (one process per seed) into one record: from each file
    the seeds it measured (cells that are not all NaN), in seed order."""
    parts = [lp.DepthStudy.from_dict(json.loads(Path(p).read_text())) for p in paths]
    first = parts[0]
    if any(p.layers != first.layers or p.hops != first.hops or p.config != first.config for p in parts):
        raise SystemExit("the studies differ in layers, hops or configuration; they cannot be joined.")
    cols: dict[int, tuple] = {}
    for p in parts:
        for i, seed in enumerate(p.seeds):
            if not bool(p.accuracy[:, i].isnan().all()) and seed not in cols:
                cols[seed] = (p, i)
    seeds = sorted(cols)
    cat = lambda name: torch.stack([getattr(cols[s][0], name)[:, cols[s][1]] for s in seeds], dim=1)  # noqa: E731
    res = lp.DepthStudy(cat("accuracy"), first.layers, seeds, first.hops, first.config, cat("chance"),
                        cat("steps_done"), cat("seconds"))
    data = dict(res.to_dict(), **{k: v for k, v in json.loads(Path(paths[0]).read_text()).items()
                                  if k in ("script", "backend", "threads")})
    Path(out).write_text(json.dumps(data, separators=(",", ":")) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--layers", default="1,2,3,4")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--plot", default=None, help="also save the figure here (PNG)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--merge", nargs="+", default=None, help="join per-seed study files into --out")
    args = ap.parse_args()
    if args.merge:
        merge(args.merge, args.out)
        return
    torch.set_num_threads(args.threads)
    task = RetrievalTask(**TASK)
    layers = [int(v) for v in args.layers.split(",")]
    seeds = [int(v) for v in args.seeds.split(",")]
    # one lp.depth_study call per (seed, layers) cell, seed-major, the record rewritten
    # after each cell (missing cells NaN) so an interrupted study keeps what it measured
    nan = float("nan")
    acc = torch.full((len(layers), len(seeds), len(task.difficulties) - 1), nan, dtype=torch.float64)
    chance, done, secs = acc.clone(), acc[..., 0].clone(), acc[..., 0].clone()
    for b, seed in enumerate(seeds):
        shared = SharedBatches(task, TRAIN["batch_size"])
        for a, L in enumerate(layers):
            cell = lp.depth_study(shared, layers=[L], seeds=[seed], steps=args.steps,
                                  model_kwargs=MODEL, train_kwargs=dict(TRAIN, callbacks=[solved]),
                                  eval_batch_size=2048, progress=False)
            acc[a, b], chance[a, b] = cell.accuracy[0, 0], cell.chance[0, 0]
            done[a, b], secs[a, b] = cell.steps_done[0, 0], cell.seconds[0, 0]
            res = lp.DepthStudy(acc, layers, seeds, cell.hops, cell.config, chance, done, secs)
            data = res.to_dict()
            data["script"] = "scripts/depth_study.py"
            data["backend"] = f"{lp.BACKEND} (transformer-lens {lp.TL_VERSION})"
            data["threads"] = args.threads
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(data, separators=(",", ":")) + "\n")
            print("cell", L, seed, json.dumps(data["accuracy"][a][b]), flush=True)
    if args.plot:
        res.plot().savefig(args.plot, dpi=90)
    print(json.dumps(data["mean"]))


if __name__ == "__main__":
    main()
