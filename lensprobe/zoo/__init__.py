"""The embedded default: small checkpoints the project trains with its own scripts.

Each model is ``<name>.safetensors`` (a portable lensprobe checkpoint, loads on both
backends) beside ``<name>.json`` (the training script, seed, config and the metrics the
script measured).

    >>> import lensprobe as lp
    >>> lp.zoo.names()
    ['priority', 'retrieval']
    >>> model = lp.zoo.load("retrieval")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import InputError

__all__ = ["names", "load", "info", "path", "DEFAULT"]

_DIR = Path(__file__).resolve().parent
DEFAULT = "retrieval"
"""The model ``lensprobe report`` analyses when no --model is given."""


def names() -> list[str]:
    """Names of the shipped models."""
    return sorted(p.stem for p in _DIR.glob("*.safetensors"))


def path(name: str) -> Path:
    p = _DIR / f"{name}.safetensors"
    if not p.is_file():
        raise InputError(f"no zoo model {name!r}; the zoo has {names()}.")
    return p


def info(name: str) -> dict[str, Any]:
    """The recorded training facts and metrics of a zoo model (its JSON card)."""
    path(name)
    card = _DIR / f"{name}.json"
    return json.loads(card.read_text()) if card.is_file() else {}


def load(name: str, **kwargs: Any) -> Any:
    """Load a zoo model on the installed TransformerLens backend (eval mode)."""
    from ..models import load_checkpoint

    return load_checkpoint(path(name), **kwargs)
