"""One example of every lensprobe result class, for the shared result test.

Each module here (one per analysis module of the package) defines ``EXAMPLES``: the
result class name -> a zero-argument function that computes a small, real instance of
it (an extractor run on a tiny model, not a hand-filled dataclass).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable


def all_examples() -> dict[str, Callable]:
    out: dict[str, Callable] = {}
    for info in pkgutil.iter_modules(__path__):
        mod = importlib.import_module(f"{__name__}.{info.name}")
        for name, fn in getattr(mod, "EXAMPLES", {}).items():
            assert name not in out, f"two examples of {name}"
            out[name] = fn
    return out
