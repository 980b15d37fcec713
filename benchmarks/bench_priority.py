"""Benchmark: Graph-SVM solve, NGD training, alignment readout (token-priority graphs).

Ratios are against baselines measured in the same run:
* lp.graph_svm (least-distance program through scipy.optimize.nnls, plus W_fin by
  L-BFGS-B) vs the same Graph-SVM as a dense QP over all d*d entries with scipy's SLSQP
  (the test suite's reference solver), on a small and a larger graph; the max difference
  between the two W_svm is reported too;
* lp.train_priority per step vs a bare PyTorch NGD loop on the same model and data
  (the same loss from the attention pattern, no evaluation), and with torch's default
  thread count vs one thread (train_priority's default);
* lp.priority_alignment vs one plain forward pass capturing the pattern;
* lp.graph_svm with BLAS bounded to one thread inside the solver (its default,
  ``blas_threads=1``) vs the BLAS library's own default (``blas_threads=None``: OpenBLAS
  starts one thread per core), on the same graphs: oversubscription on small solves.

    python benchmarks/bench_priority.py [--steps 300] [--blas-rounds 15]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

import lensprobe as lp
from lensprobe.tasks.priority import FixedData, PriorityTask, priority_dataset

HERE = Path(__file__).resolve().parent


def best_of(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def dense_svm(tpg, E):
    from scipy.linalg import orth
    from scipy.optimize import minimize

    d = E.shape[1]
    En = E.numpy()
    ineq, eq = [], []
    for k in tpg.last_tokens:
        sid = tpg.scc_index(k)
        for a, b in tpg.graph(k).edges:
            row = np.outer(En[a] - En[b], En[k]).ravel()
            (eq if sid[a] == sid[b] else ineq).append(row)
    A = np.array(ineq)
    cons = [{"type": "ineq", "fun": lambda w: A @ w - 1, "jac": lambda w: A}]
    if eq:
        B = orth(np.array(eq).T).T
        cons.append({"type": "eq", "fun": lambda w: B @ w, "jac": lambda w: B})
    res = minimize(lambda w: 0.5 * w @ w, np.zeros(d * d), jac=lambda w: w, constraints=cons,
                   method="SLSQP", options=dict(ftol=1e-14, maxiter=2000))
    return torch.from_numpy(res.x.reshape(d, d))


def blas_comparison(tpg, E, rounds: int) -> dict:
    """graph_svm with BLAS bounded to one thread (default) vs the library's default threads.

    The two settings alternate within each round, so both see the same machine load;
    min and median over the rounds, and their ratios (default / one thread).
    """
    one, free = [], []
    for _ in range(rounds):
        for setting, times in ((1, one), (None, free)):
            t0 = time.perf_counter()
            lp.graph_svm(tpg, E, blas_threads=setting)
            times.append(time.perf_counter() - t0)
    med = lambda v: float(np.median(v))  # noqa: E731
    return dict(blas_one_thread_min_s=min(one), blas_one_thread_median_s=med(one),
                blas_default_min_s=min(free), blas_default_median_s=med(free),
                blas_default_vs_one_min=min(free) / min(one),
                blas_default_vs_one_median=med(free) / med(one))


def bare_ngd(model, X, y, steps: int, lr: float) -> None:
    (p,) = [q for q in model.parameters() if q.requires_grad]
    batch = FixedData(X, y).sample(len(X), torch.Generator())
    for _ in range(steps):
        loss, _ = lp.priority_loss(model, batch)
        g, = torch.autograd.grad(loss, p)
        with torch.no_grad():
            p -= lr * g / g.norm()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--blas-rounds", type=int, default=15)
    args = ap.parse_args()
    out: dict = {"backend": f"{lp.BACKEND} (transformer-lens {lp.TL_VERSION})"}
    from threadpoolctl import threadpool_info

    import scipy.linalg  # noqa: F401  (load scipy's BLAS before reading the thread counts)

    blas_threads = sorted({i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"})
    out["cpus"] = os.cpu_count()
    out["load_average_1min"] = os.getloadavg()[0]  # the machine is shared: context for every ratio

    graphs = {"small": (6, 8, 6, 4, 3), "large": (16, 20, 60, 6, 2), "xl": (24, 32, 120, 6, 3)}
    for name, (K, d, n, T, tie) in graphs.items():
        task = PriorityTask.random(K, T, tie_size=tie, seed=0, last_tokens=range(4))
        X, y = priority_dataset(task, n, seed=0)
        tpg = lp.TokenPriorityGraph.from_data(X, y)
        g = torch.Generator().manual_seed(0)
        E = torch.nn.functional.normalize(torch.randn(K, d, generator=g, dtype=torch.float64), dim=1)
        t_lp = best_of(lambda: lp.graph_svm(tpg, E))
        row = dict(tokens=K, d=d, sequences=n, constraints=sum(
            g.number_of_edges() for g in tpg.graphs.values()), lensprobe_s=t_lp)
        if name != "xl":  # the dense QP takes minutes there
            t_dense = best_of(lambda: dense_svm(tpg, E), repeat=1)
            diff = float((lp.graph_svm(tpg, E).W_svm - dense_svm(tpg, E)).abs().max())
            row.update(slsqp_dense_s=t_dense, speedup_vs_slsqp=t_dense / t_lp, max_abs_diff=diff)
        row.update(blas_default_threads=blas_threads, **blas_comparison(tpg, E, args.blas_rounds))
        out[f"graph_svm_{name}"] = row

    task = PriorityTask.random(6, 4, tie_size=3, seed=0)
    X, y = priority_dataset(task, 6, seed=0, require_cycle=True)
    saved = torch.get_num_threads()

    def fresh():
        return lp.priority_model(6, 8, seed=1)

    t_train = best_of(lambda: lp.train_priority(fresh(), X, y, steps=args.steps, lr=0.5,
                                                progress=False, eval_every=args.steps))
    t_default = best_of(lambda: lp.train_priority(fresh(), X, y, steps=args.steps, lr=0.5,
                                                  progress=False, eval_every=args.steps,
                                                  threads=None), repeat=1)
    torch.set_num_threads(1)
    # train_priority's lr is the step on W = W_K / attn_scale: the same run on W_K
    t_bare = best_of(lambda: bare_ngd(fresh(), X, y, args.steps, 0.5 * lp._tl.attn_scale(fresh(), 0)))
    torch.set_num_threads(saved)
    out["training"] = dict(steps=args.steps, train_priority_ms_per_step=1e3 * t_train / args.steps,
                           bare_ngd_ms_per_step=1e3 * t_bare / args.steps,
                           overhead_vs_bare=t_train / t_bare,
                           default_threads=saved, default_threads_vs_one=t_default / t_train)

    model = fresh()
    lp.train_priority(model, X, y, steps=args.steps, lr=0.5, progress=False)
    tpg = lp.TokenPriorityGraph.from_data(X, y)
    svm = lp.graph_svm(tpg, model)
    t_al = best_of(lambda: lp.priority_alignment(model, tpg, svm=svm))

    def forward():
        with lp.guard(model):
            lp.run_hooked(model, X, ["blocks.0.attn.hook_pattern"])

    t_fwd = best_of(forward)
    out["alignment"] = dict(sequences=len(X), alignment_s=t_al, forward_s=t_fwd,
                            ratio_vs_forward=t_al / t_fwd)

    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "priority.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
