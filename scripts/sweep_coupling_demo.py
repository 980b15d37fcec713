"""The coupling paper's experiment on the zoo: coupling vs held-out loss through training.

Aubry et al. (ICLR 2025) find that depth-wise coupling of the residual block Jacobians
correlates with generalisation across LLMs and across training checkpoints. This sweep
runs :func:`lensprobe.sweep.coupling_and_loss` on every shipped checkpoint of the
Shakespeare zoo model (``zoo:shakespeare@all``), on passages of the two plays it never
saw (``heldout_passages()``), and computes the correlation from the sweep's DataFrame.
The held-out loss measured here (a few passages) is set beside the one the training
script recorded on the whole held-out plays (the model card).

    python scripts/sweep_coupling_demo.py                        # serial
    python scripts/sweep_coupling_demo.py --engine ray --shards 2 --out sweep-demo
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lensprobe as lp
from lensprobe.sweep import coupling_and_loss, heldout_passages


def correlate(df, card: dict) -> dict:
    """Per-checkpoint means over shards, then Pearson and Spearman correlations."""
    from scipy.stats import pearsonr, spearmanr

    ok = df[df["status"] == "ok"]
    per = ok.groupby("step")[["coupling", "heldout_loss"]].mean().sort_index()
    recorded = {c["step"]: c["heldout_loss"] for c in card.get("checkpoints", [])}
    per["card_heldout_loss"] = [recorded.get(int(s)) for s in per.index]
    out = {"checkpoints": int(len(per)), "table": per.reset_index().to_dict("records")}
    if len(per) >= 3:
        for name, col in (("heldout_loss", "heldout_loss"), ("card_heldout_loss", "card_heldout_loss")):
            sub = per.dropna(subset=[col])
            out[f"pearson_coupling_vs_{name}"] = float(pearsonr(sub["coupling"], sub[col])[0])
            out[f"spearman_coupling_vs_{name}"] = float(spearmanr(sub["coupling"], sub[col])[0])
        sub = per.dropna(subset=["card_heldout_loss"])
        out["pearson_measured_vs_card_loss"] = float(pearsonr(sub["heldout_loss"], sub["card_heldout_loss"])[0])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", default="serial", choices=["serial", "ray"])
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=8, help="held-out passages used")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--out", default=None, help="results directory (resumable)")
    args = ap.parse_args()
    df = lp.run_sweep(coupling_and_loss, ["zoo:shakespeare@all"], heldout_passages()[: args.prompts],
                  shards=args.shards, engine=args.engine, results=args.out, k=args.k,
                  max_tokens=args.max_tokens)
    print(json.dumps(correlate(df, lp.zoo.info("shakespeare")), indent=1))


if __name__ == "__main__":
    main()
