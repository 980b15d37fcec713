"""Input handling shared by every extractor: tokens, hook names, layers, heads, dtypes.

Every check raises :class:`lensprobe.errors.InputError` (a ``ValueError``) or
:class:`~lensprobe.errors.ModelError` with a message that names the problem and the fix.
"""

from __future__ import annotations

import difflib
import operator
from typing import Any, Sequence

import torch
from jaxtyping import Int

from . import _tl
from .errors import InputError, NonFiniteError

__all__ = [
    "to_tokens",
    "check_hook",
    "check_layer",
    "check_layers",
    "check_head",
    "check_finite",
    "check_pattern",
    "check_float_dtype",
    "as_dtype",
    "dtype_name",
    "insert_separators",
    "int_ids",
    "model_device",
    "move_model",
    "resolve_device",
]


def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> cpu; a CUDA device that is not available raises a clear error."""
    if device is None:
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(
            f"device {str(device)!r} was asked for but CUDA is not available on this machine;"
            " use device='cpu'."
        )
    return dev


def move_model(model: Any, device: str | torch.device | None) -> Any:
    """``model`` on ``device`` (checked by :func:`resolve_device`), moved without the
    "Moving model to device" line TransformerLens's ``to`` prints; unchanged if there."""
    dev = resolve_device(device)
    here = model_device(model)
    if here.type == dev.type and (dev.index is None or here.index == dev.index):
        return model
    return model.to(dev, print_details=False)


def _has_tokenizer(model: Any) -> bool:
    return getattr(model, "tokenizer", None) is not None


def to_tokens(
    model: Any,
    tokens: Int[torch.Tensor, "batch pos"] | Int[torch.Tensor, " pos"] | str | list[str] | Sequence[Any],
    *,
    prepend_bos: bool | None = None,
) -> Int[torch.Tensor, "batch pos"]:
    """Normalise model input to a LongTensor of shape [batch, pos] on the model's device.

    Accepts a tensor or nested list of token ids ([pos] or [batch, pos]), a string, or a
    list of strings (tokenised with the model's tokenizer; ``prepend_bos`` as in
    TransformerLens). Checks: not empty, integer ids inside [0, d_vocab), length <= n_ctx.
    """
    _tl.require_model(model)
    is_text = isinstance(tokens, str) or (
        isinstance(tokens, (list, tuple)) and tokens and all(isinstance(t, str) for t in tokens)
    )
    toks = _text_ids(model, tokens, prepend_bos) if is_text else _id_tensor(tokens)
    if toks.numel() == 0:
        raise InputError(
            f"empty input: tokens have shape {tuple(toks.shape)}; pass at least one token."
        )
    n_ctx = model.cfg.n_ctx
    if toks.shape[1] > n_ctx:
        raise InputError(
            f"sequence length {toks.shape[1]} is longer than the model's n_ctx={n_ctx};"
            f" truncate to tokens[:, -{n_ctx}:] or use a model with a longer context."
        )
    d_vocab = model.cfg.d_vocab
    lo, hi = int(toks.min()), int(toks.max())
    if lo < 0 or hi >= d_vocab:
        raise InputError(
            f"token ids must lie in [0, {d_vocab}) (d_vocab), found ids in [{lo}, {hi}];"
            " check the tokenizer or the task vocabulary matches the model."
        )
    return toks.long().to(model_device(model))


def _text_ids(model: Any, text: str | Sequence[str], prepend_bos: bool | None) -> torch.Tensor:
    """Token ids of a text or a list of texts, with the model's tokenizer."""
    if not _has_tokenizer(model):
        raise InputError(
            "got text but the model has no tokenizer (models built with lp.tiny_model"
            " have none); pass token ids as a tensor [batch, pos], or attach a tokenizer."
        )
    texts = [text] if isinstance(text, str) else list(text)
    if any(t == "" for t in texts):
        raise InputError("empty input: got an empty string; pass at least one token.")
    vocab = getattr(model, "_lensprobe_vocab", None)
    if vocab is not None:
        return _word_tokens(vocab, texts)
    kw = {} if prepend_bos is None else {"prepend_bos": prepend_bos}
    return model.to_tokens(text, **kw)


def _id_tensor(tokens: Any) -> torch.Tensor:
    """Token ids (a tensor or nested list, [pos] or [batch, pos]) as a 2-D integer tensor."""
    if isinstance(tokens, torch.Tensor):
        toks = tokens
    else:
        try:
            toks = torch.as_tensor(tokens)
        except (TypeError, ValueError, RuntimeError) as e:
            raise InputError(
                f"cannot read tokens of type {type(tokens).__name__}: {e}. Pass a tensor"
                " [batch, pos] of token ids, a list of ids, or text."
            ) from e
    if toks.numel() == 0:
        raise InputError(
            f"empty input: tokens have shape {tuple(toks.shape)}; pass at least one token."
        )
    if toks.is_floating_point() or toks.is_complex() or toks.dtype == torch.bool:
        raise InputError(
            f"token ids must be integers, got dtype {toks.dtype}; pass a LongTensor"
            " (tokens.long()) of ids, not embeddings or probabilities."
        )
    if toks.ndim == 1:
        toks = toks.unsqueeze(0)
    if toks.ndim != 2:
        raise InputError(
            f"tokens must have shape [pos] or [batch, pos], got {tuple(toks.shape)}."
        )
    return toks


def _word_tokens(vocab: list[str], texts: list[str]) -> torch.Tensor:
    """Whitespace-split words -> ids for models with a lensprobe word vocabulary."""
    index = {w: i for i, w in enumerate(vocab)}
    rows = []
    for text in texts:
        words = text.split()
        unknown = [w for w in words if w not in index]
        if unknown:
            raise InputError(
                f"words {unknown[:5]} are not in the model's vocabulary of {len(vocab)} tokens;"
                f" known tokens look like {vocab[:6]}."
            )
        rows.append([index[w] for w in words])
    if len({len(r) for r in rows}) > 1:
        raise InputError(
            "texts of different lengths cannot form one batch; pass them one at a time."
        )
    return torch.tensor(rows, dtype=torch.long)


def check_hook(model: Any, name: str) -> str:
    """Return ``name`` if the model has that hook point, else a clear error with suggestions."""
    hooks = model.hook_dict
    if name in hooks:
        return name
    close = difflib.get_close_matches(name, list(hooks), n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise InputError(
        f"the model has no hook point {name!r}.{hint} List them with"
        " list(model.hook_dict) (e.g. 'blocks.0.hook_resid_pre', 'ln_final.hook_normalized')."
    )


def _as_index(value: Any) -> int | None:
    """``value`` as a Python int if it is an integer (int, NumPy or 0-d torch integer), else None.

    Bools are not layer indices, and floats are never truncated: ``2.5`` must not
    silently become layer 2.
    """
    if isinstance(value, bool) or isinstance(value, torch.Tensor) and value.dtype == torch.bool:
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_layer(model: Any, layer: int, *, allow_end: bool = False) -> int:
    """Validate a layer index (negative counts from the end) and return it non-negative.

    ``allow_end`` admits ``n_layers`` itself (the position after the last block).
    """
    n = model.cfg.n_layers
    top = n + 1 if allow_end else n
    index = _as_index(layer)
    if index is None:
        raise InputError(
            f"layer must be an int, got {type(layer).__name__} {layer!r}; pass a layer index"
            " such as 0 or -1."
        )
    if not -top <= index < top:
        raise InputError(
            f"layer {index} is out of range: the model has {n} layers, valid layers are"
            f" 0..{top - 1} (or negative from the end)."
        )
    return index % top


def check_head(model: Any, head: int) -> int:
    n = model.cfg.n_heads
    if not isinstance(head, int) or isinstance(head, bool) or not -n <= head < n:
        raise InputError(
            f"head {head} is out of range: each layer has {n} heads, valid heads are 0..{n - 1}."
        )
    return head % n


def index_list(values: Any, what: str, example: str) -> list[int]:
    """An int or a sequence of ints (list, tuple, range, 1-D tensor or array) as a list.

    Anything else -- a float, a string, a nested list, an empty sequence -- raises an
    InputError naming ``what`` was passed; ``example`` shows a valid value in the message.
    """
    one = _as_index(values)
    if one is not None:
        return [one]
    if hasattr(values, "tolist") and getattr(values, "ndim", None) == 1:
        values = values.tolist()  # a 1-D torch tensor or NumPy array
    if not isinstance(values, (list, tuple, range)):
        raise InputError(
            f"{what} must be an int or a sequence of ints, got {type(values).__name__}"
            f" {values!r}; e.g. {example}."
        )
    values = list(values)
    if not values:
        raise InputError(f"{what} is empty: pass at least one value, e.g. {example}.")
    bad = [v for v in values if _as_index(v) is None]
    if bad:
        raise InputError(
            f"{what} must hold ints, got {type(bad[0]).__name__} {bad[0]!r} in {values!r};"
            f" e.g. {example}."
        )
    return [operator.index(v) for v in values]


def insert_separators(items: Sequence[int], sep: int, every: int | None) -> list[int]:
    """``sep`` after every ``every`` items, never at the end (``every=None``: unchanged).

    The one way a sequence of items gets separator tokens: the counting tasks' inputs and
    the collapse pairs of :func:`lensprobe.oversquash.pair_sequences`."""
    if not every:
        return list(items)
    out: list[int] = []
    for k, t in enumerate(items, 1):
        out.append(t)
        if k % every == 0 and k < len(items):
            out.append(sep)
    return out


def int_ids(values: Any, what: str, ndim: int) -> torch.Tensor:
    """``values`` as an integer tensor with ``ndim`` dimensions, or a clear InputError.

    Never truncates: float ids (0.5), text and nested lists of the wrong depth are errors.
    """
    if isinstance(values, (str, bytes)):
        raise InputError(
            f"{what} is text ({values!r:.60}); pass token ids (ints). Tokenise text first"
            " (model.to_tokens, or the task's vocabulary)."
        )
    try:
        t = values if isinstance(values, torch.Tensor) else torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError) as e:
        raise InputError(
            f"cannot read {what} as token ids ({type(values).__name__}: {e}); pass a tensor or"
            " (nested) lists of ints."
        ) from e
    if t.ndim != ndim:
        shape = "[n]" if ndim == 1 else "[n, T] (or a list of id lists)"
        raise InputError(f"{what} must have shape {shape}, got shape {tuple(t.shape)}.")
    if t.numel() and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise InputError(
            f"{what} must be integer token ids, got dtype {t.dtype}; float ids are not rounded"
            " or truncated. Pass ints (e.g. tensor.long() if the values are whole numbers)."
        )
    return t


def check_layers(model: Any, layers: Sequence[int] | int | None) -> list[int]:
    """The one check of every ``layers=`` argument: ``None`` -> all layers; an int or a
    sequence of ints -> a validated, non-negative list (negative indices count from the
    end); anything else is an InputError that names what was passed."""
    if layers is None:
        return list(range(model.cfg.n_layers))
    example = "layers=0, layers=[0, 2], or None for all layers"
    return [check_layer(model, l) for l in index_list(layers, "layers", example)]


def check_finite(t: torch.Tensor, what: str) -> torch.Tensor:
    """Raise NonFiniteError if ``t`` holds NaN or inf."""
    if t.is_floating_point() or t.is_complex():
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            n_bad = int(bad.sum())
            raise NonFiniteError(
                f"{what} contains {n_bad} NaN/inf values out of {t.numel()}. The model's"
                " weights or inputs produce non-finite activations; check the weights"
                " (torch.isfinite(p).all() for each parameter) or run in float32/float64."
            )
    return t


def check_pattern(pattern: torch.Tensor, what: str) -> torch.Tensor:
    """Raise NonFiniteError unless every row of attention ``pattern`` [..., key] is finite
    and sums to 1.

    HookedTransformer (TL 2) replaces NaN attention weights by 0 before ``hook_pattern``
    (meant for fully masked rows), so NaN scores reach a hook as rows of zeros: a row
    whose sum is far from 1 is NaN that TransformerLens hid.
    """
    check_finite(pattern, what)
    sums = pattern.detach().sum(-1)
    bad = (sums - 1).abs() > 0.1
    if bool(bad.any()):
        raise NonFiniteError(
            f"{what}: {int(bad.sum())} of {sums.numel()} attention rows do not sum to 1 (e.g."
            f" {float(sums[bad][0]):.3g}); TransformerLens sets NaN attention weights to 0, so"
            " the attention scores were NaN. Check the weights (torch.isfinite(p).all() for"
            " each parameter) and the inputs."
        )
    return pattern


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: floating dtypes by name (names are data: never ``getattr(torch, name)``).
DTYPE_NAMES = {str(d).replace("torch.", ""): d for d in _FLOAT_DTYPES}


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """The one normalisation of a ``dtype=`` argument: a floating ``torch.dtype`` or its
    name ('float64', 'torch.float64') -> the ``torch.dtype``."""
    if isinstance(dtype, str):
        dtype = DTYPE_NAMES.get(dtype.replace("torch.", ""), dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputError(
            f"dtype must be a floating torch.dtype such as torch.float64 (or its name:"
            f" {', '.join(DTYPE_NAMES)}), got {dtype!r}."
        )
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """The name results store for a dtype: 'float64' for torch.float64."""
    return str(dtype).replace("torch.", "")


def check_float_dtype(
    dtype: torch.dtype, allowed: Sequence[torch.dtype] = _FLOAT_DTYPES, *, what: str = "analysis"
) -> torch.dtype:
    if dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise InputError(
            f"the {what} cannot run in {dtype}; use one of {names} (e.g. model.to(torch.float32)"
            " or dtype=torch.float64 for reference computations)."
        )
    return dtype


def head_name(layer: int, head: int) -> str:
    """The one spelling of a head everywhere in lensprobe: ``L{layer}H{head}``."""
    return f"L{layer}H{head}"


def checkpoint_list(checkpoints: Any, steps: Sequence[int] | None = None) -> list[tuple[int, Any]]:
    """The one normalisation of "a training trajectory": ``(step, model-or-loader)`` pairs
    in step order, from a TrainResult (``model_at``), a mapping ``step -> model/path/loader``
    or a sequence of them (``steps`` names their steps, default 0, 1, ...). Pass each second
    element through :func:`materialise` to get the model."""
    if hasattr(checkpoints, "checkpoints") and hasattr(checkpoints, "model_at"):
        run = checkpoints
        pairs = [(s, (lambda s=s: run.model_at(s))) for s in sorted(run.checkpoints)]
    elif isinstance(checkpoints, dict) or hasattr(checkpoints, "items"):
        pairs = sorted(checkpoints.items())
    else:
        items = list(checkpoints)
        if steps is not None and len(steps) != len(items):
            raise InputError(f"got {len(steps)} steps for {len(items)} checkpoints; pass one step per checkpoint.")
        pairs = list(zip(steps if steps is not None else range(len(items)), items))
    if not pairs:
        raise InputError("no checkpoints given; pass a TrainResult, a {step: model} mapping or a list of models.")
    return [(int(s), c) for s, c in pairs]


def materialise(ckpt: Any) -> Any:
    """A model from one entry of :func:`checkpoint_list`: a model, a checkpoint path, a
    zero-argument loader or a :class:`lensprobe.training.Checkpoint`."""
    from pathlib import Path

    if isinstance(ckpt, (str, Path)):
        from .models import load_checkpoint

        return load_checkpoint(ckpt)
    if isinstance(ckpt, torch.nn.Module):
        return ckpt
    if hasattr(ckpt, "model") and hasattr(ckpt, "step"):
        return ckpt.model()
    if callable(ckpt):
        return ckpt()
    return ckpt


def hook_names(model: Any, names_filter: Any = None) -> list[str]:
    """Hook names selected the TransformerLens way (``run_with_cache``'s ``names_filter``):
    None (all), one name, a list of names, or a predicate ``name -> bool``; in model order."""
    every = list(_tl.hook_points(model))
    if names_filter is None:
        return every
    if isinstance(names_filter, str):
        return [check_hook(model, names_filter)]
    if callable(names_filter):
        out = [n for n in every if names_filter(n)]
        if not out:
            raise InputError("names_filter selected no hook point of this model.")
        return out
    names = [check_hook(model, n) for n in names_filter]
    if not names:
        raise InputError("names_filter is an empty list; pass hook names or None for all.")
    return names
