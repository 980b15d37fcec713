"""Offline models: small models from plain options, portable checkpoints, pretrained loading.

Portable checkpoint format (one ``.safetensors`` file):

* tensors: the weights in HookedTransformer's key/shape convention
  (``blocks.0.attn.W_Q`` [n_heads, d_model, d_head], ...), converted on load for bridges;
* metadata ``lensprobe_format`` = "1", ``config`` = the TransformerLens config as JSON,
  ``lensprobe`` = JSON with lensprobe's own options (e.g. ``positional: "none"``, which
  re-freezes the zero W_pos), ``vocab`` = optional JSON list of token strings (a word
  tokenizer is attached on load), ``extra`` = optional user JSON.

Loading never unpickles: safetensors only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import _tl
from .errors import InputError, ModelError
from .inputs import DTYPE_NAMES, as_dtype, dtype_name

__all__ = [
    "tiny_model", "save_checkpoint", "load_checkpoint", "load_model", "word_tokenizer",
    "str_tokens", "vocab_of",
]

_NORMS = {"LN": "LN", "ln": "LN", "RMS": "RMS", "rms": "RMS", None: None, "none": None}
_POSITIONAL = ("standard", "rotary", "none")
#: Activations both backends implement identically (HookedTransformer and native bridges).
ACT_FNS = ("gelu", "gelu_new", "relu", "silu")


def tiny_model(
    *,
    n_layers: int = 2,
    n_heads: int = 4,
    d_model: int = 64,
    d_head: int | None = None,
    d_mlp: int | None = None,
    n_ctx: int = 128,
    d_vocab: int = 64,
    n_key_value_heads: int | None = None,
    attn_only: bool = False,
    normalization: str | None = "LN",
    positional: str = "standard",
    causal: bool = True,
    act_fn: str = "gelu",
    dtype: torch.dtype | str = torch.float32,
    seed: int = 0,
    device: str | torch.device | None = None,
    vocab: list[str] | None = None,
) -> Any:
    """A small randomly initialised model on the installed TransformerLens, offline.

    HookedTransformer on TL 2.x/3.x, TransformerBridge (``boot_native``) on TL 4.x.
    ``normalization``: 'LN', 'RMS' or None; ``positional``: 'standard' (learned),
    'rotary', or 'none' (NoPE: a zero W_pos with requires_grad=False); ``causal=False``
    gives bidirectional attention. ``d_head`` defaults to d_model // n_heads and
    ``d_mlp`` to 4 * d_model. ``n_key_value_heads`` (a divisor of n_heads) gives
    grouped-query attention: query head h reads K/V head h // (n_heads / n_kv).
    ``act_fn``: one of ``ACT_FNS``. ``seed`` seeds a local generator (the global RNG
    is left as it was). ``vocab`` (token strings, length d_vocab) attaches a word
    tokenizer so the model accepts text and shows string tokens. Returned in eval mode.
    """
    _check_choices(normalization, positional, act_fn)
    dtype = as_dtype(dtype)
    _check_sizes(n_layers=n_layers, n_heads=n_heads, d_model=d_model, n_ctx=n_ctx, d_vocab=d_vocab,
                 d_head=d_head, d_mlp=d_mlp, n_key_value_heads=n_key_value_heads)
    if d_head is None:
        if d_model % n_heads:
            raise InputError(
                f"d_model={d_model} is not divisible by n_heads={n_heads}; pass d_head."
            )
        d_head = d_model // n_heads
    _check_shapes(n_heads, n_key_value_heads, positional, d_head, vocab, d_vocab)
    cfg = {
        "n_layers": n_layers,
        "n_heads": n_heads,
        "d_model": d_model,
        "d_head": d_head,
        "n_ctx": n_ctx,
        "d_vocab": d_vocab,
        "attn_only": attn_only,
        "normalization_type": _NORMS[normalization],
        "positional_embedding_type": "rotary" if positional == "rotary" else "standard",
        "attention_dir": "causal" if causal else "bidirectional",
        "act_fn": act_fn,
        "seed": seed,
        "default_prepend_bos": False,
    }
    if not attn_only:
        cfg["d_mlp"] = d_mlp or 4 * d_model
    if n_key_value_heads is not None and n_key_value_heads != n_heads:
        cfg["n_key_value_heads"] = n_key_value_heads
    if positional == "rotary":
        # The adjacent-pair convention is the one native bridges implement; using it on
        # HookedTransformer too makes tiny models behave the same on both backends.
        cfg["rotary_adjacent_pairs"] = True
    model = _tl.build_model(cfg, dtype=dtype, device=device)
    meta = {"positional": positional}
    _apply_lensprobe_meta(model, meta)
    if vocab is not None:
        attach_tokenizer(model, vocab)
    return model


def _check_choices(normalization: Any, positional: Any, act_fn: Any) -> None:
    if normalization not in _NORMS:
        raise InputError(f"normalization must be 'LN', 'RMS' or None, got {normalization!r}.")
    if positional not in _POSITIONAL:
        raise InputError(f"positional must be one of {_POSITIONAL}, got {positional!r}.")
    if act_fn not in ACT_FNS:
        raise InputError(f"act_fn must be one of {ACT_FNS} (portable across backends), got {act_fn!r}.")


def _check_sizes(**sizes: Any) -> None:
    """Every given size (None: not given) is a positive integer."""
    for name, v in sizes.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise InputError(f"{name} must be a positive integer, got {v!r}.")


def _check_shapes(n_heads: int, n_kv: int | None, positional: str, d_head: int,
                  vocab: list[str] | None, d_vocab: int) -> None:
    if n_kv is not None and n_heads % n_kv:
        raise InputError(
            f"n_key_value_heads={n_kv} must divide n_heads={n_heads} (each K/V head"
            " serves an equal group of query heads)."
        )
    if positional == "rotary" and d_head % 2:
        raise InputError(f"rotary positions need an even d_head, got {d_head}.")
    if vocab is not None and len(vocab) != d_vocab:
        raise InputError(f"vocab has {len(vocab)} tokens but d_vocab={d_vocab}.")


def _apply_lensprobe_meta(model: Any, meta: dict[str, Any]) -> None:
    model._lensprobe_meta = dict(meta)
    if meta.get("positional") == "none":
        with torch.no_grad():
            model.W_pos.zero_()
        for name, p in model.named_parameters():
            if p is model.W_pos or (p.shape == model.W_pos.shape and "pos" in name):
                p.requires_grad_(False)


# --------------------------------------------------------------------------- tokenizers
def word_tokenizer(vocab: list[str]) -> Any:
    """A HuggingFace fast tokenizer that splits on whitespace and maps words to ids.

    Built locally (tokenizers.WordLevel), so it needs no hub. Unknown words map to
    '<unk>' if the vocabulary has it, else raise at encode time.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab_map = {tok: i for i, tok in enumerate(vocab)}
    if len(vocab_map) != len(vocab):
        raise InputError("vocab has duplicate token strings; each token needs a unique string.")
    unk = "<unk>" if "<unk>" in vocab_map else None
    tk = Tokenizer(models.WordLevel(vocab=vocab_map, unk_token=unk))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kw: dict[str, Any] = {"tokenizer_object": tk}
    if unk:
        kw["unk_token"] = unk
    for special, key in (("<bos>", "bos_token"), ("<eos>", "eos_token"), ("<pad>", "pad_token")):
        if special in vocab_map:
            kw[key] = special
    return PreTrainedTokenizerFast(**kw)


def attach_tokenizer(model: Any, vocab: list[str]) -> None:
    """Give ``model`` a word tokenizer over ``vocab`` (id i <-> vocab[i])."""
    tok = word_tokenizer(vocab)
    model.tokenizer = tok
    model._lensprobe_vocab = list(vocab)
    if getattr(tok, "bos_token_id", None) is None:
        model.cfg.default_prepend_bos = False


def vocab_of(model: Any) -> list[str] | None:
    """Token strings by id, if the model has a tokenizer."""
    v = getattr(model, "_lensprobe_vocab", None)
    if v is not None:
        return list(v)
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return None
    return tok.convert_ids_to_tokens(list(range(model.cfg.d_vocab)))


def str_tokens(model: Any, tokens: torch.Tensor) -> list[list[str]]:
    """Token strings of each row of ``tokens`` ([batch, pos], or [pos] as one row).

    A lensprobe word vocabulary if the model has one, else the tokenizer's decoding of
    each id (TransformerLens ``to_str_tokens``), else the ids themselves as strings.
    """
    toks = tokens if tokens.ndim == 2 else tokens.reshape(1, -1)
    vocab = getattr(model, "_lensprobe_vocab", None)
    if vocab is not None:
        return [[vocab[i] for i in row] for row in toks.tolist()]
    if getattr(model, "tokenizer", None) is not None:
        try:
            return [[str(s) for s in model.to_str_tokens(row)] for row in toks.cpu()]
        except Exception:  # a tokenizer that cannot decode these ids: fall back to ids
            pass
    return [[str(i) for i in row] for row in toks.tolist()]


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(
    model: Any, path: str | Path, *, extra: dict[str, Any] | None = None, vocab: list[str] | None = None
) -> Path:
    """Write ``model`` as one portable ``.safetensors`` file (see module docstring)."""
    _tl.require_model(model)
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(path.suffix + ".safetensors") if path.suffix else path.with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in _tl.portable_state_dict(model).items()}
    cfg = _tl.config_to_dict(model.cfg)
    dtype = dtype_name(next(model.parameters()).dtype)
    meta = {
        "lensprobe_format": "1",
        "config": json.dumps(cfg),
        "dtype": dtype,
        "lensprobe": json.dumps(getattr(model, "_lensprobe_meta", {})),
        "saved_with": f"transformer-lens {_tl.TL_VERSION}",
    }
    vocab = vocab if vocab is not None else getattr(model, "_lensprobe_vocab", None)
    if vocab is not None:
        meta["vocab"] = json.dumps(list(vocab))
    if extra is not None:
        meta["extra"] = json.dumps(extra)
    save_file(sd, str(path), metadata=meta)
    return path


#: dtypes a checkpoint may declare (metadata is data: never ``getattr(torch, name)``).
CHECKPOINT_DTYPES = DTYPE_NAMES
_REQUIRED_INTS = ("n_layers", "d_model", "n_heads", "d_head", "n_ctx", "d_vocab")
_CHOICES = {
    "normalization_type": ("LN", "LNPre", "RMS", "RMSPre", None),
    "positional_embedding_type": ("standard", "rotary", "shortformer"),
    "attention_dir": ("causal", "bidirectional"),
}


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _validate_metadata(out: dict[str, Any], where: str) -> None:
    """Check decoded checkpoint metadata against lensprobe's schema; ModelError naming the field."""
    try:
        if out["dtype"] not in CHECKPOINT_DTYPES:
            raise _BadMeta(f"dtype {out['dtype']!r} is not one of {sorted(CHECKPOINT_DTYPES)}")
        cfg = out["config"]
        if not isinstance(cfg, dict):
            raise _BadMeta("'config' is missing or not a JSON object")
        _check_config_sizes(cfg)
        _check_config_choices(cfg)
        opts = out["lensprobe"]
        if opts is not None and not (isinstance(opts, dict) and opts.get("positional", "standard") in _POSITIONAL):
            raise _BadMeta(f"'lensprobe' options {opts!r} (positional must be one of {_POSITIONAL})")
        vocab = out["vocab"]
        if vocab is not None and not (
            isinstance(vocab, list) and len(vocab) == cfg["d_vocab"] and all(isinstance(t, str) for t in vocab)
        ):
            raise _BadMeta(f"'vocab' must be a list of {cfg['d_vocab']} strings")
    except _BadMeta as e:
        raise ModelError(f"{where}: invalid checkpoint metadata: {e}. Re-save it with lp.save_checkpoint.") from None


class _BadMeta(Exception):
    """One schema violation of checkpoint metadata (the message names the field)."""


def _check_config_sizes(cfg: dict[str, Any]) -> None:
    for key in _REQUIRED_INTS:
        if not _positive_int(cfg.get(key)):
            raise _BadMeta(f"config[{key!r}] must be a positive integer, got {cfg.get(key)!r}")
    for key in ("d_mlp", "n_key_value_heads", "rotary_dim"):
        if cfg.get(key) is not None and not _positive_int(cfg[key]):
            raise _BadMeta(f"config[{key!r}] must be a positive integer or null, got {cfg[key]!r}")
    kv = cfg.get("n_key_value_heads")
    if kv is not None and cfg["n_heads"] % kv:
        raise _BadMeta(f"n_key_value_heads={kv} does not divide n_heads={cfg['n_heads']}")
    if not cfg.get("attn_only", False) and not _positive_int(cfg.get("d_mlp")):
        raise _BadMeta("a model with MLPs needs config['d_mlp'] (a positive integer)")


def _check_config_choices(cfg: dict[str, Any]) -> None:
    for key, choices in _CHOICES.items():
        if key in cfg and cfg[key] not in choices:
            raise _BadMeta(f"config[{key!r}] = {cfg[key]!r} is not one of {choices}")
    if "act_fn" in cfg and cfg["act_fn"] is not None and not isinstance(cfg["act_fn"], str):
        raise _BadMeta(f"config['act_fn'] must be a string, got {cfg['act_fn']!r}")


def read_checkpoint_metadata(path: str | Path) -> dict[str, Any]:
    """The decoded, validated metadata of a lensprobe checkpoint (config, options, vocab, extra)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {str(path)!r} does not exist.")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types
        raise ModelError(f"{str(path)!r} is not a safetensors file: {e}") from e
    if raw.get("lensprobe_format") != "1":
        raise ModelError(
            f"{str(path)!r} is a safetensors file but not a lensprobe checkpoint (no"
            " lensprobe_format metadata); write checkpoints with lp.save_checkpoint."
        )
    out: dict[str, Any] = {"dtype": raw.get("dtype", "float32"), "saved_with": raw.get("saved_with")}
    for key in ("config", "lensprobe", "vocab", "extra"):
        try:
            out[key] = json.loads(raw[key]) if key in raw else None
        except json.JSONDecodeError as e:
            raise ModelError(f"{str(path)!r}: checkpoint metadata {key!r} is not valid JSON: {e}") from e
    _validate_metadata(out, repr(str(path)))
    return out


def load_checkpoint(
    path: str | Path, *, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None
) -> Any:
    """Load a portable checkpoint onto the installed backend (eval mode)."""
    device = _tl.check_device(device)
    dtype = None if dtype is None else as_dtype(dtype)
    meta = read_checkpoint_metadata(path)
    model = _tl.build_model(
        dict(meta["config"], init_weights=False), dtype=CHECKPOINT_DTYPES[meta["dtype"]], device=device
    )
    sd = load_file(str(path))
    _tl.load_portable_state_dict(model, sd)
    _apply_lensprobe_meta(model, meta["lensprobe"] or {})
    if meta["vocab"] is not None:
        attach_tokenizer(model, meta["vocab"])
    if dtype is not None:
        model = model.to(dtype, print_details=False)  # no TransformerLens print
    if device is not None:
        model = model.to(device, print_details=False)
    model.eval()
    return model


def load_model(name_or_path: str | Path, *, processed: bool = False, **kwargs: Any) -> Any:
    """A model by lensprobe checkpoint path, local HuggingFace directory, or hub name.

    * ``*.safetensors`` written by :func:`save_checkpoint` -> :func:`load_checkpoint`;
    * a directory with ``config.json`` -> TransformerLens's loader, offline;
    * anything else -> a hub name through TransformerLens (needs network or a warm cache).

    ``processed`` selects TransformerLens's weight processing (fold_ln, centering); the
    default keeps raw weights on both backends. See :func:`lensprobe._tl.load_pretrained`.
    """
    p = Path(name_or_path)
    if p.suffix == ".safetensors":
        return load_checkpoint(p, **kwargs)
    return _tl.load_pretrained(str(name_or_path), processed=processed, **kwargs)
