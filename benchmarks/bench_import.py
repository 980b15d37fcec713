"""Benchmark start-up: what a researcher pays before the first lensprobe call.

Each case runs in a fresh interpreter, ``--runs`` times (default 7); the median CPU time
(user + system of the child) and wall time are reported. Cases:

* ``transformer_lens``: ``import transformer_lens`` (the baseline);
* ``lensprobe``: ``import lensprobe`` (names load on first use);
* ``lensprobe_api``: ``import lensprobe`` and touch every name of ``lensprobe.__all__``,
  i.e. every submodule imported, but nothing run (the honest comparison: the
  target is this <= 1.2x the baseline);
* ``cli_help``: ``lensprobe --help`` (target < 1 s wall, without importing torch).

Prints the ratios; writes benchmarks/results/import.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "import.json"
CASES = {
    "transformer_lens": "import transformer_lens",
    "lensprobe": "import lensprobe",
    "lensprobe_api": "import lensprobe as lp\nfor n in lp.__all__: getattr(lp, n)",
    "cli_help": "import sys; sys.argv = ['lensprobe', '--help']\nfrom lensprobe.cli import main\n"
                "try: main()\nexcept SystemExit: pass\n"
                "assert 'torch' not in sys.modules, 'lensprobe --help imported torch'",
}


def run_once(code: str) -> tuple[float, float]:
    """(cpu seconds, wall seconds) of one fresh interpreter running ``code``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.DEVNULL,
                   env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, wall


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    runs = args.runs
    for code in CASES.values():  # warm the file cache once, untimed
        run_once(code)
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in CASES}
    for _ in range(runs):  # interleaved, so load on the machine hits every case alike
        for name, code in CASES.items():
            samples[name].append(run_once(code))
    out: dict = {"runs": runs, "python": sys.version.split()[0]}
    for name, s in samples.items():
        out[name] = {"cpu_s": round(statistics.median(c for c, _ in s), 3),
                     "wall_s": round(statistics.median(w for _, w in s), 3)}
    base = out["transformer_lens"]["cpu_s"]
    for name in ("lensprobe", "lensprobe_api"):
        out[name]["cpu_ratio_to_transformer_lens"] = round(out[name]["cpu_s"] / base, 3)
    out["targets"] = {"lensprobe_api_cpu_ratio_max": 1.2, "cli_help_wall_s_max": 1.0}
    for name, r in out.items():
        if isinstance(r, dict) and "cpu_s" in r:
            ratio = r.get("cpu_ratio_to_transformer_lens")
            print(f"{name:<18} cpu {r['cpu_s']:6.2f} s   wall {r['wall_s']:6.2f} s"
                  + (f"   {ratio:.2f}x import transformer_lens" if ratio else ""))
    print(f"target: lensprobe_api <= 1.2x ({'met' if out['lensprobe_api']['cpu_ratio_to_transformer_lens'] <= 1.2 else 'NOT met'}),"
          f" lensprobe --help < 1 s ({'met' if out['cli_help']['wall_s'] < 1.0 else 'NOT met'})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
