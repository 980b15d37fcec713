"""Benchmark: the same 8-checkpoint coupling sweep on the serial engine and on Ray.

Task: ``lp.run_sweep(coupling_and_loss, 8 checkpoints of zoo:shakespeare, passages, k=10)``:
each task loads one trajectory checkpoint (a Llama HF directory, 16-bit weights upcast)
in its worker and computes the depth-wise coupling of the last token's block Jacobians
and the next-token loss on the same held-out prompts (the first ``N_PROMPTS`` shipped
passages of The Tempest and Macbeth, cut to ``N_TOKENS`` tokens, one shard). The same
run gives the demo's numbers: coupling against held-out loss across the checkpoints
(scripts/sweep_coupling_demo.py, ``correlate``).

* serial: ``engine="serial"`` in this process (the reference);
* Ray: a local runtime with 2 CPUs (``ray.init(num_cpus=2)``), one CPU per task, so two
  tasks run at once. The runtime is started and its two workers warmed up (they import
  torch, TransformerLens and lensprobe) before the timed sweep; both costs are reported
  apart.

Reported: wall time of each, the speed-up, the mean in-task time split into model load
and analysis, and Ray's per-task overhead = (workers x Ray wall time - sum of in-task
times) / tasks: scheduling, argument and result transfer, and idle time at the tail.
Ray workers run at the driver's niceness (``RAY_worker_niceness=0``; Ray's default +15
starved them on this shared machine). Both engines use one torch thread per task (Ray sets OMP_NUM_THREADS=1 for a 1-CPU task;
the serial run is set to 1 here), so the comparison is about running tasks side by side.

Run from the repository root: ``python benchmarks/bench_sweep.py`` (``make bench``).
Writes benchmarks/results/sweep.json.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Ray starts its workers at niceness +15 over the raylet's; on this shared machine that
# starved them (3% CPU each while the serial run had its share). Same priority for both.
os.environ.setdefault("RAY_worker_niceness", "0")

import torch

import lensprobe as lp
from lensprobe.sweep import coupling_and_loss, heldout_passages, ray_runtime_env

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "sweep.json"
N_CKPT, N_PROMPTS, N_TOKENS, K, WORKERS = 8, 2, 32, 10, 2
torch.set_num_threads(1)


def _demo():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "sweep_coupling_demo", HERE.parent / "scripts" / "sweep_coupling_demo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run(engine: str, specs: list[str], texts: list[str]) -> tuple[float, object]:
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        df = lp.run_sweep(coupling_and_loss, specs, texts, engine=engine, results=out,
                      progress=False, k=K, max_tokens=N_TOKENS)
        wall = time.perf_counter() - t
    bad = df[df["status"] != "ok"]
    if len(bad):
        sys.exit(f"{engine}: {len(bad)} tasks failed: {bad['error'].tolist()}")
    return wall, df


def main() -> None:
    import ray

    steps = lp.zoo.steps("shakespeare")[:N_CKPT]
    if len(steps) < N_CKPT:
        print(f"zoo:shakespeare has {len(steps)} checkpoints so far; timing those.")
    specs = [f"zoo:shakespeare@{s}" for s in steps]
    toks = heldout_passages()[:N_PROMPTS]

    serial_wall, serial = run("serial", specs, toks)

    t = time.perf_counter()
    ray.init(num_cpus=WORKERS, include_dashboard=False, log_to_driver=False,
             runtime_env=ray_runtime_env())
    init_s = time.perf_counter() - t
    t = time.perf_counter()
    warm = ray.remote(lambda: __import__("lensprobe").__file__).options(num_cpus=1)
    ray.get([warm.remote() for _ in range(WORKERS)])
    warm_s = time.perf_counter() - t
    try:
        ray_wall, rdf = run("ray", specs, toks)
    finally:
        ray.shutdown()

    diff = float((serial["coupling"] - rdf["coupling"]).abs().max())
    in_task = float(rdf["task_s"].sum())
    res = {
        "task": f"coupling_and_loss(k={K}) of {len(steps)} zoo:shakespeare checkpoints {steps}, {N_PROMPTS}"
                f" held-out prompts x {N_TOKENS} tokens, one shard",
        "machine": f"{os.cpu_count()} cores, shared (other jobs running)",
        "torch_threads_per_task": 1,
        "serial_wall_s": round(serial_wall, 2),
        "ray_wall_s": round(ray_wall, 2),
        "ray_workers": WORKERS,
        "speedup": round(serial_wall / ray_wall, 3),
        "ray_init_s": round(init_s, 2),
        "ray_worker_warmup_s": round(warm_s, 2),
        "serial_mean_task_s": round(float(serial["task_s"].mean()), 3),
        "serial_mean_load_s": round(float(serial["load_s"].mean()), 3),
        "serial_mean_analysis_s": round(float(serial["analysis_s"].mean()), 3),
        "ray_mean_task_s": round(float(rdf["task_s"].mean()), 3),
        "ray_mean_load_s": round(float(rdf["load_s"].mean()), 3),
        "ray_mean_analysis_s": round(float(rdf["analysis_s"].mean()), 3),
        "ray_overhead_per_task_s": round((WORKERS * ray_wall - in_task) / len(rdf), 3),
        "ray_task_minus_analysis_s": round(float((rdf["task_s"] - rdf["analysis_s"]).mean()), 3),
        "max_abs_diff_serial_vs_ray": diff,
        "result_bytes_per_task": len(rdf[["coupling", "heldout_loss", "n_tokens", "data"]]
                                     .to_json(orient="records")) // len(rdf),
        "spec_bytes_per_task": int(sum(len(s) for s in specs) / len(specs)),
        "demo": _demo().correlate(serial, lp.zoo.info("shakespeare")),
    }
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
