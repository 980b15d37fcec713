"""``lensprobe`` command line: ``lensprobe report`` runs every analysis and writes one HTML page.

Only argparse and lensprobe's error classes load at start-up, so ``lensprobe --help``
answers without importing torch; each subcommand imports what it runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from ._version import __version__
from .errors import LensprobeError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lensprobe",
        description="How information moves through a transformer (TransformerLens models).",
    )
    p.add_argument("--version", action="version", version=f"lensprobe {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser(
        "report",
        help="run every analysis on a model and write a self-contained HTML report + JSON",
        description=(
            "Run every lensprobe analysis on a model and write report.html (self-contained:"
            " plots, circuitsvis views and graphs inline, no network) and report.json (the"
            " headline figures). With no --model: the embedded default (lp.zoo). Exit"
            " status: 0 when every section ran, 1 when a section failed (the page and the"
            " JSON show which, with its error), 2 for bad arguments or a model that cannot"
            " be loaded."
        ),
    )
    r.add_argument(
        "--model",
        default=None,
        help="zoo name (see --list-models), lensprobe checkpoint (.safetensors), local"
        " HuggingFace directory, or hub name (needs network). Default: the zoo default.",
    )
    r.add_argument("--prompt", action="append", default=None,
                   help="a prompt to analyse (repeatable); default: prompts from the model's task")
    r.add_argument("--out", default="report", help="output directory (default: ./report)")
    r.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="default: cpu")
    r.add_argument("--only", default=None,
                   help="comma-separated sections to run (default: all); see --list-sections")
    r.add_argument("--list-models", action="store_true", help="list the zoo models and exit")
    r.add_argument("--list-sections", action="store_true", help="list the sections and exit")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    from .sweep import add_cli

    add_cli(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from . import report, zoo

    if args.command == "sweep":
        from .sweep import cli_main

        try:
            return cli_main(args)
        except LensprobeError as e:
            print(f"lensprobe: error: {e}", file=sys.stderr)
            return 2

    if args.list_models:
        for name in zoo.names():
            print(name)
        return 0
    if args.list_sections:
        for name in report.SECTION_NAMES:
            print(name)
        return 0
    only = None
    if args.only:
        only = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = sorted(set(only) - set(report.SECTION_NAMES))
        if unknown:
            print(
                f"lensprobe: error: unknown section(s) {unknown}; choose from"
                f" {', '.join(report.SECTION_NAMES)}",
                file=sys.stderr,
            )
            return 2
    try:
        result = report.run_report(
            model=args.model,
            prompts=args.prompt,
            out=Path(args.out),
            device=args.device,
            only=only,
            progress=not args.quiet,
        )
    except LensprobeError as e:
        print(f"lensprobe: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {result.html_path} and {result.json_path} in {result.seconds:.1f} s")
    for s in result.sections:
        status = "ok" if s.failed is None else "FAILED (see stderr)"
        print(f"  {s.name:<13} {status}")
    for s in result.failed:
        print(f"lensprobe: error: section {s.name!r} failed: {s.failed}\n{s.traceback}",
              file=sys.stderr)
    if result.failed:
        names = ", ".join(s.name for s in result.failed)
        print(f"lensprobe: {len(result.failed)} section(s) failed ({names}); the other"
              " sections were written.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
