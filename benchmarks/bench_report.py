"""Benchmark the main job: `lensprobe report` wall time.

1. the embedded default (lp.zoo's Shakespeare model, each section also at step 0): target < 60 s on 2 CPU cores;
2. a GPT-2-small-shaped random model (12 layers, 12 heads, d_model 768, d_mlp 3072,
   d_vocab 50257, 64-token prompts): target < 5 minutes. The report picks estimators and
   position subsets for models this size and says so in its text.

Prints seconds per section and the ratio to the target; writes benchmarks/results/report.json.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

import lensprobe as lp
from lensprobe.report import run_report

RESULTS = Path(__file__).resolve().parent / "results" / "report.json"


def timed(model, target_s: float, label: str, prompts=None) -> dict:
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        res = run_report(model, out=out, progress=False, prompts=prompts)
        total = time.perf_counter() - t
    sections = {s.name: round(s.seconds, 2) for s in res.sections}
    print(f"{label}: {total:.1f} s (target {target_s:.0f} s, ratio {total / target_s:.2f})")
    for name, sec in sections.items():
        print(f"    {name:<12} {sec:7.2f} s")
    return {"seconds": round(total, 2), "target_seconds": target_s,
            "ratio_to_target": round(total / target_s, 3), "sections": sections}


def main() -> None:
    torch.set_num_threads(2)
    out = {"threads": torch.get_num_threads()}
    out["default"] = timed(None, 60.0, "default report (zoo shakespeare, vs its step 0)")
    gpt2 = lp.tiny_model(n_layers=12, n_heads=12, d_model=768, d_mlp=3072, d_vocab=50257,
                         n_ctx=1024, act_fn="gelu_new", seed=0)
    out["gpt2_small_shape"] = timed(gpt2, 300.0, "GPT-2-small-shaped random model")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
