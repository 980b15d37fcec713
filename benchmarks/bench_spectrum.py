"""Benchmark: OV eigenspectra of a GPT-2-small-shaped model (Dovonon et al., TMLR 2025).

Model: a random ``lp.tiny_model`` with GPT-2 small's shape (12 layers, 12 heads,
d_model 768, d_head 64, d_mlp 3072, float32), raw weights, layer norm.

* lensprobe: ``lp.ov_spectrum(model, per_layer=False)`` -- each head's non-zero
  spectrum from the 64 x 64 matrix ``W_O W_V_eff`` (FactoredMatrix.eigenvalues), all 144
  heads, plus the readings.
* baseline (written plainly here): a dense 768 x 768 eigensolve of each head's
  ``W_V_eff W_O`` (what ``torch.linalg.eigvals(model.OV[l, h].AB)`` does), in the same
  float64. One dense solve costs seconds on a small CPU, so it is timed on a sample of
  heads (``--dense-heads``, default 4) and extrapolated linearly to 144 (each solve has
  the same size, so its cost does not depend on the head); ``--dense-heads 144`` runs
  them all (the median sample time is used: robust to other load on the machine). The sampled heads are also checked for agreement with the factored spectra.
* per-layer head sums: sum_h H_h is a full-rank 768 x 768 matrix (12 x 64 = 768), so its
  spectrum is d x d by nature; all 12 are measured (``ov_spectrum(per_layer=True)``
  minus the per-head time).

Times are the minimum over ``--repeat`` runs (default 3) for the fast path and one run
per dense solve. Run from the repository root: ``python benchmarks/bench_spectrum.py``
(``make bench``). Writes benchmarks/results/spectrum.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

import lensprobe as lp
from lensprobe import smoothing as S

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "spectrum.json"
SHAPE = dict(n_layers=12, n_heads=12, d_model=768, d_mlp=3072, n_ctx=1024, d_vocab=50257)


def timed(fn, repeat=1):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def max_matched_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Greedy nearest matching of two complex multisets; the largest distance."""
    rest = list(b)
    worst = 0.0
    for z in sorted(a, key=lambda z: -abs(z)):
        j = int(np.argmin([abs(z - w) for w in rest]))
        worst = max(worst, abs(z - rest.pop(j)))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dense-heads", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    t0 = time.perf_counter()
    model = lp.tiny_model(**SHAPE, dtype=torch.float32, seed=0)
    build_s = time.perf_counter() - t0
    L, H = SHAPE["n_layers"], SHAPE["n_heads"]
    print(f"model: {type(model).__name__} (transformer-lens {lp.TL_VERSION}), built in {build_s:.1f}s;"
          f" torch threads {torch.get_num_threads()}")

    fast_s, spec = timed(lambda: lp.ov_spectrum(model, per_layer=False, progress=False), args.repeat)
    print(f"lensprobe per-head spectra (144 heads, factored 64x64): {fast_s:.3f}s")

    W_V, W_O, desc = S.ov_factors(model)
    rng = np.random.default_rng(0)
    n_dense = min(max(args.dense_heads, 1), L * H)
    sample = [divmod(int(i), H) for i in rng.choice(L * H, size=n_dense, replace=False)]
    dense_times, worst, rel = [], 0.0, 0.0
    for l, h in sample:
        M = W_V[l, h] @ W_O[l, h]  # d x d, float64
        s, eig = timed(lambda: torch.linalg.eigvals(M))
        dense_times.append(s)
        eig = eig.numpy()
        nz = eig[np.abs(eig) > 1e-6 * np.abs(eig).max()]
        fac = spec.head(l, h).numpy()
        worst = max(worst, max_matched_distance(fac, nz[: len(fac)]) if len(nz) >= len(fac) else float("inf"))
        rel = max(rel, worst / np.abs(fac).max())
        print(f"  dense 768x768 eigensolve, layer {l} head {h}: {s:.2f}s")
    per_head_dense = float(np.median(dense_times))  # robust to a busy shared machine
    dense_total = per_head_dense * L * H
    ratio = dense_total / fast_s
    print(f"baseline dense per-head eigensolves: median {per_head_dense:.2f}s/head ->"
          f" {dense_total:.1f}s for 144 heads ({'measured' if n_dense == L * H else f'extrapolated from {n_dense}'})")
    print(f"RATIO dense / factored per-head spectra: {ratio:.0f}x")
    print(f"agreement on the sampled heads: max |lambda_factored - lambda_dense| = {worst:.2e}"
          f" (relative {rel:.2e})")

    full_s, full = timed(lambda: lp.ov_spectrum(model, per_layer=True, progress=False))
    layer_s = max(full_s - fast_s, 0.0)
    print(f"per-layer head-sum spectra (12 x 768x768, d x d by nature): {layer_s:.1f}s"
          f" ({layer_s / L:.2f}s/layer); full ov_spectrum: {full_s:.1f}s")
    readings = {r: sum(rs.count(r) for rs in full.head_reading) for r in S.READINGS}
    print(f"head readings of the random model: {readings}; layer readings: {list(full.layer_reading)}")

    result = {
        "model": {**SHAPE, "class": type(model).__name__, "transformer_lens": lp.TL_VERSION,
                  "dtype": "float32 weights, float64 eigensolves", "weights": desc},
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "load_average": list(os.getloadavg())},
        "per_head_factored_s": fast_s,
        "per_head_dense_s_per_head": per_head_dense,
        "per_head_dense_samples_s": dense_times,
        "per_head_dense_total_s": dense_total,
        "per_head_dense_heads_measured": n_dense,
        "per_head_dense_extrapolated": n_dense < L * H,
        "ratio_dense_over_factored": ratio,
        "max_abs_eig_difference_sampled": worst,
        "max_rel_eig_difference_sampled": rel,
        "per_layer_head_sum_s": layer_s,
        "per_layer_head_sum_s_per_layer": layer_s / L,
        "ov_spectrum_full_s": full_s,
        "head_readings": readings,
        "layer_readings": list(full.layer_reading),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {OUT.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
