"""The embedded default: small models the project trains with its own scripts.

Two kinds of entry, each with a JSON card beside it (``<name>.json``: the training
script, seed, config, data hash and the metrics the script measured):

* ``<name>.safetensors``: a portable lensprobe checkpoint (the synthetic-task models,
  ``retrieval`` and ``priority``); loads on both backends.
* ``<name>/``: a standard Hugging Face directory (``config.json``, ``model.safetensors``,
  ``tokenizer.json``), loaded through :func:`lensprobe.load_model` exactly like a user's
  model (the real-text model ``shakespeare``). Its training trajectory lies in
  ``<name>/trajectory/step_NNNNNN.safetensors`` (16-bit floats, upcast on load).

    >>> import lensprobe as lp
    >>> lp.zoo.names()
    ['priority', 'retrieval', 'shakespeare']
    >>> model = lp.zoo.load("shakespeare")            # the final weights
    >>> lp.zoo.steps("shakespeare")                   # [0, 50, ..., 5000]
    >>> init = lp.zoo.load("shakespeare", step=0)     # the initialisation
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import InputError, ModelError

__all__ = ["names", "load", "info", "path", "steps", "DEFAULT"]

_DIR = Path(__file__).resolve().parent
_STEP_FILE = re.compile(r"^step_(\d{6})\.safetensors$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
DEFAULT = "shakespeare"
"""The model ``lensprobe report`` analyses when no --model is given."""


def _is_hf_dir(p: Path) -> bool:
    return p.is_dir() and (p / "config.json").is_file() and (p / "model.safetensors").is_file()


def names() -> list[str]:
    """Names of the shipped models."""
    found = {p.stem for p in _DIR.glob("*.safetensors")}
    found |= {p.name for p in _DIR.iterdir() if _is_hf_dir(p)}
    return sorted(found)


def path(name: str) -> Path:
    """The checkpoint file or Hugging Face directory of zoo model ``name``."""
    for p in (_DIR / f"{name}.safetensors", _DIR / name):
        if (p.is_file() and p.suffix == ".safetensors") or _is_hf_dir(p):
            return p
    raise InputError(f"no zoo model {name!r}; the zoo has {names()}.")


def info(name: str) -> dict[str, Any]:
    """The recorded training facts and metrics of a zoo model (its JSON card)."""
    path(name)
    card = _DIR / f"{name}.json"
    return json.loads(card.read_text()) if card.is_file() else {}


def _trajectory(name: str) -> dict[int, Path]:
    folder = path(name) / "trajectory"
    if not folder.is_dir():
        return {}
    return {int(m.group(1)): p for p in sorted(folder.iterdir()) if (m := _STEP_FILE.match(p.name))}


def _final_step(name: str) -> int | None:
    final = info(name).get("final", {}).get("step")
    return final if isinstance(final, int) and final >= 0 else None


def steps(name: str) -> list[int]:
    """Training steps with shipped weights, from 0 (the initialisation) to the final model;
    ``[]`` for a model shipped without its trajectory."""
    found = set(_trajectory(name))
    if found and (final := _final_step(name)) is not None:
        found.add(final)
    return sorted(found)


def load(name: str, step: int | None = None, **kwargs: Any) -> Any:
    """Load a zoo model on the installed TransformerLens backend (eval mode).

    ``step`` selects a checkpoint of the training trajectory (:func:`steps`); ``None``
    is the final model. Keyword arguments go to :func:`lensprobe.load_model` (HF
    directories) or :func:`lensprobe.load_checkpoint` (portable checkpoints).
    """
    from ..models import load_checkpoint, load_model

    p = path(name)
    if p.suffix == ".safetensors":
        if step is not None:
            raise InputError(f"zoo model {name!r} ships no training trajectory; omit step=.")
        return load_checkpoint(p, **kwargs)
    if step is None or step == _final_step(name):
        return load_model(p, **kwargs)
    trajectory = _trajectory(name)
    if isinstance(step, bool) or not isinstance(step, int) or step not in trajectory:
        raise InputError(f"zoo model {name!r} has no checkpoint at step {step!r}; its steps are"
                         f" {steps(name)} (lp.zoo.steps({name!r})).")
    with tempfile.TemporaryDirectory(prefix=f"lensprobe-{name}-step{step}-") as tmp:
        _write_step_dir(p, trajectory[step], Path(tmp))
        return load_model(tmp, **kwargs)


def _write_step_dir(src: Path, weights: Path, dst: Path) -> None:
    """A Hugging Face directory for one trajectory checkpoint: the model's config and
    tokenizer, and the checkpoint's weights upcast to float32."""
    import torch
    from safetensors.torch import load_file, save_file

    for f in ("config.json", *_TOKENIZER_FILES):
        if (src / f).is_file():
            shutil.copy(src / f, dst / f)
    sd = load_file(str(weights))
    if not sd or any(not t.is_floating_point() for t in sd.values()):
        raise ModelError(f"{weights}: not a floating-point state dict.")
    save_file({k: v.to(torch.float32).contiguous() for k, v in sd.items()},
              str(dst / "model.safetensors"), metadata={"format": "pt"})
