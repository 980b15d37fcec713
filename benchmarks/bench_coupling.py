"""Benchmark: block Jacobians + depth-wise coupling (Aubry et al., ICLR 2025).

Task: J^l_tt for every layer and every position of a random GPT-style model (d 256,
6 layers, 8 heads, d_mlp 1024, n 64, float32), plus the depth-wise coupling matrices of
every position at K = 10, 30, 50.

* lensprobe: ``lp.block_coupling(model, tokens, positions='all', top_k=(10, 30, 50))`` -- the
  separable same-token Jacobians (d batched backward passes per layer for all positions)
  and batched SVD / pairwise products.
* baseline (the reference method, written plainly here): per (layer, t) one forward and
  d scalar backward passes through the block on the whole sequence, keeping the t slice;
  a full SVD per Jacobian; a Python loop over positions, layer pairs and K.
  The baseline Jacobians are too slow to run for all 384 (layer, t) pairs in a few
  minutes, so they are timed on all layers at two positions and extrapolated linearly
  (the cost of one (layer, t) does not depend on t: every backward runs on the whole
  sequence); its SVD and pair loop run in full.

Peak memory: each side runs in its own subprocess and reports the growth of its peak RSS
(ru_maxrss) over the RSS after building the model. The baseline subprocess holds the
full-size Jacobian array and every full SVD, as a full baseline run would.

Also: fast-method cost against n and d, and the last-token cost of a GPT-2-small-sized
model (d 768, 12 layers, n 128), timed on a few layers and extrapolated (said so).

Run from the repository root: ``python benchmarks/bench_coupling.py`` (``make bench``).
Writes benchmarks/results/coupling.json.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import lensprobe as lp

HERE = Path(__file__).resolve().parent
# One torch thread on both sides: on this shared 2-core machine, 2 OpenMP threads under
# load made every small dense op (SVDs of 256 x 256 matrices, the reference's single
# backward passes) 10-50x slower and the timings meaningless. Override with LP_BENCH_THREADS.
THREADS = int(os.environ.get("LP_BENCH_THREADS", 1))
torch.set_num_threads(THREADS)
OUT = HERE / "results" / "coupling.json"
KS = (10, 30, 50)
BASE = dict(n_layers=6, n_heads=8, d_model=256, d_mlp=1024, n=64)
SUBSET_T = (17, 63)


def make(n_layers, n_heads, d_model, d_mlp, n, seed=0, **_):
    model = lp.tiny_model(n_layers=n_layers, n_heads=n_heads, d_model=d_model, d_mlp=d_mlp,
                          n_ctx=max(n, 8), d_vocab=512, seed=seed, dtype=torch.float32)
    toks = torch.randint(0, 512, (1, n), generator=torch.Generator().manual_seed(seed + 1))
    return model, toks


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ----------------------------------------------------------------- the reference method
def baseline_jacobian(model, toks, layer, t):
    """One (layer, t): forward with x^(l) injected, then d scalar backward passes."""
    pre, post = f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.hook_resid_post"
    with torch.no_grad():
        x0 = lp.run_hooked(model, toks, [pre])[pre]
    x = x0.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        y = lp.run_hooked(model, toks, [post], {pre: x})[post] - x
        d = x.shape[-1]
        rows = [torch.autograd.grad(y[0, t, i], x, retain_graph=True)[0][0, t] for i in range(d)]
    return torch.stack(rows)


def baseline_coupling(J, ks):
    """J: {(l, t): [d, d]}; full SVD per Jacobian, Python loop over pairs and K."""
    svd = {key: torch.linalg.svd(m) for key, m in J.items()}
    layers = sorted({l for l, _ in J})
    positions = sorted({t for _, t in J})
    m = torch.zeros(len(ks), len(positions), len(layers), len(layers))
    for pi, t in enumerate(positions):
        for i in layers:
            for j in layers:
                U2, _, Vh2 = svd[j, t]
                s1 = svd[i, t][1]
                for q, K in enumerate(ks):
                    M = U2[:, :K].T @ J[i, t] @ Vh2[:K].T
                    m[q, pi, i, j] = torch.linalg.norm(M.abs() - torch.diag(s1[:K])) / s1[:K].norm()
    return m, svd


# ----------------------------------------------------------------- workers (subprocesses)
def worker_fast(cfg):
    model, toks = make(**cfg)
    r0 = current_rss_mb()
    t0 = time.perf_counter()
    c = lp.block_coupling(model, toks, positions="all", top_k=KS, keep_products=False, progress=False,
                    max_memory_mb=cfg.get("max_memory_mb", 32))
    sec = time.perf_counter() - t0
    out = dict(seconds=sec, peak_growth_mb=rss_mb() - r0, method=c.jacobians.method)
    if cfg.get("save"):
        torch.save({"J": c.jacobians.jacobians[0, :, list(SUBSET_T)], "m": c.m[0, :, 0][:, list(SUBSET_T)],
                    "J_all": c.jacobians.jacobians[0]}, cfg["save"])
    return out


def worker_baseline(cfg):
    model, toks = make(**cfg)
    L, n, d = cfg["n_layers"], cfg["n"], cfg["d_model"]
    r0 = current_rss_mb()
    stand_in = torch.load(cfg["fast_file"])["J_all"]  # [L, n, d, d] values for the SVD/pair part
    J_all = {(l, t): stand_in[l, t].clone() for l in range(L) for t in range(n)}  # full-size storage
    del stand_in
    t0 = time.perf_counter()
    with lp.guard(model):
        for l in range(L):
            for t in SUBSET_T:
                J_all[l, t] = baseline_jacobian(model, toks, l, t)
    jac_sec_subset = time.perf_counter() - t0
    pairs = L * len(SUBSET_T)
    t1 = time.perf_counter()
    m, _svd = baseline_coupling(J_all, KS)
    coup_sec = time.perf_counter() - t1
    peak = rss_mb() - r0
    torch.save({"J": torch.stack([torch.stack([J_all[l, t] for t in SUBSET_T]) for l in range(L)]),
                "m": m[:, list(SUBSET_T)]}, cfg["save"])
    return dict(jac_seconds_subset=jac_sec_subset, subset_pairs=pairs,
                jac_seconds_extrapolated=jac_sec_subset / pairs * L * n,
                coupling_seconds=coup_sec, peak_growth_mb=peak)


def worker_cost(cfg):
    """Fast-method seconds, plus the reference's per-(layer, t) Jacobian seconds."""
    model, toks = make(**cfg)
    t0 = time.perf_counter()
    lp.block_coupling(model, toks, positions="all", top_k=cfg["k"], keep_products=False, progress=False,
                max_memory_mb=64)
    fast = time.perf_counter() - t0
    times = []
    with lp.guard(model):
        baseline_jacobian(model, toks, 0, cfg["n"] - 1)  # warm-up
        for l in (1, cfg["n_layers"] // 2, cfg["n_layers"] - 1):
            t1 = time.perf_counter()
            baseline_jacobian(model, toks, l, cfg["n"] - 1)
            times.append(time.perf_counter() - t1)
    per = sorted(times)[1]  # median of three (layer, t) pairs
    return dict(fast_seconds=fast, ref_per_pair_seconds=per,
                ref_jac_extrapolated=per * cfg["n_layers"] * cfg["n"])


def worker_gpt2(cfg):
    """Last-token J_tt of a GPT-2-small-sized model, timed on ``cfg['time_layers']`` layers."""
    model, toks = make(**cfg)
    layers = list(range(cfg["time_layers"]))
    t0 = time.perf_counter()
    jac = lp.block_jacobians(model, toks, layers=layers, positions=[-1], progress=False,
                             max_memory_mb=512)
    sec = time.perf_counter() - t0
    t1 = time.perf_counter()
    lp.block_coupling(jac, top_k=KS, keep_products=False)
    coup = time.perf_counter() - t1
    return dict(seconds_timed_layers=sec, timed_layers=len(layers),
                jac_seconds_extrapolated=sec / len(layers) * cfg["n_layers"],
                coupling_seconds_timed_layers=coup, method=jac.method,
                peak_rss_mb=rss_mb())


WORKERS = dict(fast=worker_fast, baseline=worker_baseline, cost=worker_cost, gpt2=worker_gpt2)


def run_worker(kind, cfg):
    res = subprocess.run([sys.executable, __file__, "--worker", kind, json.dumps(cfg)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"worker {kind} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    tmp = HERE / "results" / "_coupling_tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    results = {"config": dict(BASE, ks=KS, dtype="float32", threads=torch.get_num_threads(),
                              backend=lp.BACKEND, tl=lp.TL_VERSION)}
    print(f"backend {lp.BACKEND} (transformer-lens {lp.TL_VERSION}), torch threads {torch.get_num_threads()}")

    fast = run_worker("fast", dict(BASE, save=str(tmp / "fast.pt")))
    base = run_worker("baseline", dict(BASE, fast_file=str(tmp / "fast.pt"), save=str(tmp / "base.pt")))
    f, b = torch.load(tmp / "fast.pt"), torch.load(tmp / "base.pt")
    jac_err = float(((f["J"] - b["J"]).flatten(2).norm(dim=-1) / b["J"].flatten(2).norm(dim=-1)).max())
    m_fast, m_base = f["m"].double(), b["m"].double()  # [K, subset t, L, L]
    # off-diagonal m (pairs of different layers, m ~ 0.1-1): relative error; the diagonal
    # is m(J, J) = 0 in exact arithmetic, float32 rounding noise on both sides: absolute.
    off = ~torch.eye(m_base.shape[-1], dtype=torch.bool)
    m_rel = float(((m_fast - m_base).abs() / m_base.abs())[..., off].max())
    m_diag_abs = float((m_fast - m_base).abs()[..., ~off].max())
    base_total = base["jac_seconds_extrapolated"] + base["coupling_seconds"]
    results["main"] = dict(
        fast_seconds=fast["seconds"], fast_method=fast["method"],
        baseline_jacobian_seconds_subset=base["jac_seconds_subset"],
        baseline_subset_pairs=base["subset_pairs"],
        baseline_jacobian_seconds_extrapolated=base["jac_seconds_extrapolated"],
        baseline_coupling_seconds=base["coupling_seconds"],
        baseline_total_seconds_extrapolated=base_total,
        speedup=base_total / fast["seconds"],
        jacobian_max_rel_error=jac_err, m_max_rel_error_offdiag=m_rel,
        m_max_abs_error_diag=m_diag_abs,
        fast_peak_growth_mb=fast["peak_growth_mb"], baseline_peak_growth_mb=base["peak_growth_mb"],
    )
    r = results["main"]
    print(f"\n== J_tt all layers/positions + depth-wise coupling, d 256, L 6, n 64, K {KS}")
    print(f"lensprobe ({r['fast_method']}):     {r['fast_seconds']:8.1f} s")
    print(f"reference, Jacobians:     {r['baseline_jacobian_seconds_extrapolated']:8.1f} s  "
          f"(EXTRAPOLATED linearly from {r['baseline_subset_pairs']} of {6 * 64} (layer, t) pairs:"
          f" {r['baseline_jacobian_seconds_subset']:.1f} s)")
    print(f"reference, SVD + pair loop: {r['baseline_coupling_seconds']:6.1f} s  (full run)")
    print(f"speedup: {r['speedup']:.1f}x  (target >= 10x)")
    print(f"max relative error: Jacobians {jac_err:.2e}, m_K off-diagonal {m_rel:.2e}  (target <= 1e-4);"
          f" m_K(J, J) diagonal |diff| {m_diag_abs:.1e}")
    print(f"peak RSS growth: lensprobe {r['fast_peak_growth_mb']:.0f} MB, reference "
          f"{r['baseline_peak_growth_mb']:.0f} MB  (ratio {r['fast_peak_growth_mb'] / r['baseline_peak_growth_mb']:.2f})")

    table = []
    for n, d in ((16, 256), (32, 256), (64, 256), (64, 64), (64, 128)):
        cfg = dict(n_layers=6, n_heads=8, d_model=d, d_mlp=4 * d, n=n,
                   k=sorted({min(K, d // 4) for K in KS}))
        c = run_worker("cost", cfg)
        table.append(dict(n=n, d=d, **c, ratio=c["ref_jac_extrapolated"] / c["fast_seconds"]))
    results["cost_table"] = table
    print("\n== cost vs n and d (6 layers, all positions, K 10/30/50 clamped to d/4)")
    print(f"{'n':>4} {'d':>5} {'lensprobe s':>12} {'ref Jacobians only s (extrap.)':>31} {'ratio':>7}")
    for row in table:
        print(f"{row['n']:>4} {row['d']:>5} {row['fast_seconds']:>12.2f} "
              f"{row['ref_jac_extrapolated']:>31.1f} {row['ratio']:>7.1f}")

    g = run_worker("gpt2", dict(n_layers=12, n_heads=12, d_model=768, d_mlp=3072, n=128,
                                time_layers=int(os.environ.get("LP_BENCH_GPT2_LAYERS", 1))))
    results["gpt2_small_last_token"] = g
    print(f"\n== GPT-2-small-sized (d 768, 12 layers, n 128), last token J_tt ({g['method']})")
    print(f"timed {g['timed_layers']} layer(s): {g['seconds_timed_layers']:.1f} s -> all 12 layers "
          f"{g['jac_seconds_extrapolated']:.0f} s (EXTRAPOLATED linearly over layers); peak RSS "
          f"{g['peak_rss_mb']:.0f} MB")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2))
    for p in tmp.iterdir():
        p.unlink()
    tmp.rmdir()
    print(f"\nwrote {OUT.relative_to(HERE.parent)}")


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--worker":
        print(json.dumps(WORKERS[sys.argv[2]](json.loads(sys.argv[3]))))
    else:
        main()
