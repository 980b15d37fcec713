"""Benchmark: exact sensitivity profiles and long collapse curves (Barbero et al. 2024).

Sensitivity task: ``||d y_n / d x_i||_F`` for every input position i of a random
GPT-style model (d 256, 6 layers, 8 heads, d_mlp 1024, n 128, float32), y_n the final
normalised last-token representation, x_i = blocks.0.hook_resid_pre.

* (a) the papers' public-code way: one forward, then a loop of ``torch.autograd.grad``
  over the d output rows with ``retain_graph=True``;
* (b) ``torch.func.jacrev`` of the whole map (the full Jacobian at once);
* lensprobe exact: ``lp.sensitivity(..., method='exact')`` -- batched cotangents
  (``is_grads_batched``, or plain backward passes at chunk 1) in chunks of
  ``chunk_size`` rows after ONE forward, only the squared norms kept; timed at chunk
  sizes 1 (the CPU default), 4, 8, 32;
* lensprobe estimator: ``method='hutchinson'`` with 32 Rademacher probes, with the
  Spearman rank correlation of its profile against the exact one;
* floor: one batched backward pass of 16 cotangents, timed alone; ``d/16`` of them is
  what batched exact mode cannot beat without cutting work (printed as exact_default_over_floor).

Collapse task: ``lp.collapse_curve`` on a small NoPE model (2 layers, 2 heads, d 32) up
to n = 8192 tokens: float64 reference plus bf16 and fp16 runs, pairs 'ones' with BOS
(a single forward per precision, prefix sharing) and 'repeat_last' (one forward per
length), with time and peak memory.

Probe memory (issue 11): peak memory of ``method='hutchinson'`` with 8 and 32 probes at
their defaults against the exact method's default on a long prompt (2 layers, 4 heads,
d 64, n 1024, float32), where the attention backward dominates; and, for contrast, 8
probes in one batched backward (``chunk_size=8``, the old default: every probe at once).
The default must stay within 1.5x of the exact method's peak.

Every measurement runs in its own subprocess; peak memory is the growth of ru_maxrss
over the RSS after building the model and one warm-up forward. Times are the best of
``REPS`` runs in that subprocess. One torch thread (``LP_BENCH_THREADS``): on this shared
2-core machine two OpenMP threads under load made timings meaningless.

Run from the repository root: ``python benchmarks/bench_oversquash.py`` (``make bench``).
Writes benchmarks/results/oversquash.json; ``--probe-memory`` runs only the probe-memory
part and updates its entry there.
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
from lensprobe.core import capture_acts, guard, hooked_fn, vjp_rows

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "oversquash.json"
THREADS = int(os.environ.get("LP_BENCH_THREADS", 1))
torch.set_num_threads(THREADS)
REPS = int(os.environ.get("LP_BENCH_REPS", 2))
CFG = dict(n_layers=6, n_heads=8, d_model=256, d_mlp=1024, n=128)
SRC, TGT = "blocks.0.hook_resid_pre", "ln_final.hook_normalized"


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _model():
    model = lp.tiny_model(n_layers=CFG["n_layers"], n_heads=CFG["n_heads"], d_model=CFG["d_model"],
                          d_mlp=CFG["d_mlp"], n_ctx=CFG["n"], d_vocab=512, seed=0)
    toks = torch.randint(0, 512, (1, CFG["n"]), generator=torch.Generator().manual_seed(1))
    return model, toks


# --------------------------------------------------------------------------- one method
def _loop(model, toks):
    with guard(model):
        x0 = capture_acts(model, toks, [SRC])[SRC]
        fn = hooked_fn(model, toks, SRC, TGT, select=lambda y: y[:, -1])
        x = x0.clone().requires_grad_(True)
        sq = torch.zeros(toks.shape, dtype=torch.float64)
        with torch.enable_grad():
            y = fn(x)
            for r in range(y.shape[-1]):
                (g,) = torch.autograd.grad(y[0, r], x, retain_graph=True)
                sq += g.pow(2).sum(-1).double()
    return sq.sqrt()[0]


def _jacrev(model, toks):
    with guard(model):
        x0 = capture_acts(model, toks, [SRC])[SRC]
        fn = hooked_fn(model, toks, SRC, TGT, select=lambda y: y[:, -1])
        J = torch.func.jacrev(fn)(x0)  # [1, d, 1, n, d]
    return J.pow(2).sum((0, 1, 2, 4)).double().sqrt()


def _floor(model, toks, k=16):
    """One batched backward pass of k cotangents (after its forward), timed alone."""
    with guard(model):
        x0 = capture_acts(model, toks, [SRC])[SRC]
        fn = hooked_fn(model, toks, SRC, TGT, select=lambda y: y[:, -1])
        x = x0.clone().requires_grad_(True)
        with torch.enable_grad():
            y = fn(x)
            cot = torch.eye(y.shape[-1])[:k].reshape(k, 1, -1)
            t = time.perf_counter()
            torch.autograd.grad(y, x, grad_outputs=cot, is_grads_batched=True)
            return time.perf_counter() - t


def one(method: str) -> dict:
    model, toks = _model()
    with torch.no_grad():
        model(toks)
    base = _rss_mb()
    best, prof = float("inf"), None
    extra = {}
    for _ in range(REPS):
        t = time.perf_counter()
        if method == "loop":
            prof = _loop(model, toks)
        elif method == "jacrev":
            prof = _jacrev(model, toks)
        elif method.startswith("exact"):
            prof = lp.sensitivity(model, toks, chunk_size=int(method[5:]), progress=False).profile[0]
        elif method == "hutch32":
            prof = lp.sensitivity(model, toks, method="hutchinson", n_probes=32, progress=False).profile[0]
        elif method == "floor16":
            dt = min(_floor(model, toks) for _ in range(3))
            extra["one_batched_backward_s"] = dt
        dt = time.perf_counter() - t
        best = min(best, dt)
    out = {"method": method, "time_s": best, "peak_mb": _peak_mb() - base, **extra}
    if prof is not None:
        out["profile"] = [float(v) for v in prof]
    return out


def collapse_one(pair: str) -> dict:
    model = lp.tiny_model(n_layers=2, n_heads=2, d_model=32, n_ctx=8200, d_vocab=16,
                          positional="none", seed=0)
    with torch.no_grad():
        model(torch.zeros(1, 8, dtype=torch.long))
    base = _rss_mb()
    lengths = [64, 256, 1024, 2048, 4096, 8192]
    kw = dict(bos=2) if pair == "ones" else {}
    t = time.perf_counter()
    c = lp.collapse_curve(model, pair, lengths, progress=False, **kw)
    dt = time.perf_counter() - t
    return {
        "pair": pair,
        "time_s": dt,
        "peak_mb": _peak_mb() - base,
        "max_tokens": int(c.seq_lengths.max()),
        "slope_linf": c.slope(),
        "thresholds": c.thresholds,
        "thresholds_fit": c.thresholds_fit,
        "distance_linf": c.distance().tolist(),
        "bf16_identical_resid": c.low["bfloat16"].identical["blocks.1.hook_resid_post"][:, 0].tolist(),
    }


MEM_CFG = {"n_layers": 2, "n_heads": 4, "d_model": 64, "d_mlp": 256, "n": 1024}
MEM_METHODS = {  # name -> sensitivity keyword arguments
    "exact": {},
    "hutch8": {"method": "hutchinson", "n_probes": 8},
    "hutch32": {"method": "hutchinson", "n_probes": 32},
    "hutch8_one_batch": {"method": "hutchinson", "n_probes": 8, "chunk_size": 8},
}


def probe_memory_one(name: str) -> dict:
    c = MEM_CFG
    model = lp.tiny_model(n_layers=c["n_layers"], n_heads=c["n_heads"], d_model=c["d_model"],
                          d_mlp=c["d_mlp"], n_ctx=c["n"], d_vocab=512, seed=0)
    toks = torch.randint(0, 512, (1, c["n"]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(toks)
    base = _rss_mb()
    t = time.perf_counter()
    lp.sensitivity(model, toks, progress=False, **MEM_METHODS[name])
    return {"method": name, "time_s": time.perf_counter() - t, "peak_mb": _peak_mb() - base}


def probe_memory() -> dict:
    c = MEM_CFG
    print(f"probe memory: d {c['d_model']}, {c['n_layers']} layers, {c['n_heads']} heads,"
          f" n {c['n']}, float32 (peak RSS growth, one subprocess each)")
    r = {m: _spawn("--probe-memory-one", m) for m in MEM_METHODS}
    exact = r["exact"]["peak_mb"]
    for m, v in r.items():
        v["peak_over_exact"] = v["peak_mb"] / max(exact, 1e-9)
        print(f"  {m:17s} {v['time_s']:7.2f} s  peak +{v['peak_mb']:7.1f} MB"
              f"  {v['peak_over_exact']:.2f}x exact")
    ok = all(r[m]["peak_over_exact"] <= 1.5 for m in ("hutch8", "hutch32"))
    print(f"  defaults within 1.5x of exact: {ok}")
    return {"config": c, "methods": r, "defaults_within_1_5x_exact": ok}


# --------------------------------------------------------------------------- driver
def _spawn(*args: str) -> dict:
    env = dict(os.environ, LP_BENCH_THREADS=str(THREADS))
    res = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"benchmark subprocess {args} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def main() -> None:
    d = CFG["d_model"]
    print(f"sensitivity: d {d}, {CFG['n_layers']} layers, {CFG['n_heads']} heads, "
          f"d_mlp {CFG['d_mlp']}, n {CFG['n']}, float32, {THREADS} thread(s), best of {REPS}")
    r = {m: _spawn("--one", m) for m in ["loop", "exact1", "exact4", "exact8", "exact32", "hutch32",
                                          "floor16", "jacrev"]}
    exact = r["exact1"]  # lp.sensitivity's default on CPU: plain backward passes
    ref = torch.tensor(r["loop"]["profile"])
    for m in ["exact1", "exact4", "exact8", "exact32", "jacrev"]:
        rel = float(((torch.tensor(r[m]["profile"]) - ref).abs() / ref).max())
        r[m]["max_rel_diff_vs_loop"] = rel
    best_exact = min(("exact1", "exact4", "exact8", "exact32"), key=lambda m: r[m]["time_s"])
    floor = r["floor16"]["one_batched_backward_s"] * d / 16  # d / 16 batched backwards
    summary = {
        "speedup_exact_default_vs_loop": r["loop"]["time_s"] / exact["time_s"],
        "speedup_best_exact_vs_loop": r["loop"]["time_s"] / r[best_exact]["time_s"],
        "best_exact_chunk": int(best_exact[5:]),
        "speedup_exact_default_vs_jacrev": r["jacrev"]["time_s"] / exact["time_s"],
        "memory_exact_default_over_loop": exact["peak_mb"] / max(r["loop"]["peak_mb"], 1e-9),
        "memory_best_exact_over_loop": r[best_exact]["peak_mb"] / max(r["loop"]["peak_mb"], 1e-9),
        "memory_jacrev_over_loop": r["jacrev"]["peak_mb"] / max(r["loop"]["peak_mb"], 1e-9),
        "speedup_hutch32_vs_exact": exact["time_s"] / r["hutch32"]["time_s"],
        "spearman_hutch32_vs_exact": _spearman(r["hutch32"]["profile"], exact["profile"]),
        "exact_default_over_floor": exact["time_s"] / floor,
        "floor_d_batched_backwards_s": floor,
    }
    for m, v in r.items():
        mem = f"{v['peak_mb']:7.1f} MB" if "peak_mb" in v else ""
        print(f"  {m:8s} {v['time_s']:7.2f} s  peak +{mem}"
              + (f"  max rel diff vs loop {v['max_rel_diff_vs_loop']:.1e}" if "max_rel_diff_vs_loop" in v else ""))
    for k, v in summary.items():
        print(f"  {k:32s} {v:.3f}")
    print("collapse curves up to 8192 tokens (NoPE, 2 layers, 2 heads, d 32; float64 + bf16 + fp16):")
    coll = {p: _spawn("--collapse", p) for p in ["ones", "repeat_last"]}
    for p, v in coll.items():
        print(f"  {p:12s} {v['time_s']:6.1f} s  peak +{v['peak_mb']:.0f} MB  max tokens {v['max_tokens']}"
              f"  slope {v['slope_linf']:.2f}  n*: " + ", ".join(
                  f"{k} {v['thresholds'][k]:.4g} (fit {v['thresholds_fit'][k]:.4g})" for k in v["thresholds"]))
    mem = probe_memory()
    for v in r.values():
        v.pop("profile", None)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"config": CFG, "threads": THREADS, "reps": REPS, "methods": r,
                               "summary": summary, "collapse": coll, "probe_memory": mem},
                              indent=2))
    print(f"wrote {OUT.relative_to(HERE.parent)}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(json.dumps(one(sys.argv[2])))
    elif len(sys.argv) == 3 and sys.argv[1] == "--collapse":
        print(json.dumps(collapse_one(sys.argv[2])))
    elif len(sys.argv) == 3 and sys.argv[1] == "--probe-memory-one":
        print(json.dumps(probe_memory_one(sys.argv[2])))
    elif len(sys.argv) == 2 and sys.argv[1] == "--probe-memory":
        results = json.loads(OUT.read_text()) if OUT.exists() else {}
        results["probe_memory"] = probe_memory()
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(results, indent=2))
        print(f"wrote {OUT.relative_to(HERE.parent)}")
    else:
        main()
