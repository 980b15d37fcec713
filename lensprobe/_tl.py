"""The one place in lensprobe that knows TransformerLens versions.

TransformerLens 2.x has ``HookedTransformer``; 3.x has both ``HookedTransformer`` and
``TransformerBridge``; 4.x has only ``TransformerBridge`` (importing a removed name
raises ``ImportError``). Both families expose the legacy hook names
(``blocks.{l}.hook_resid_pre``, ``attn.hook_pattern`` ...), ``run_with_hooks``, the
``hooks()`` context manager and the stacked weights (``W_Q``, ``OV``, ``QK`` ...), so the
rest of lensprobe talks to a model through those and through the helpers below.

Differences handled here:

* construction of small models from plain options (``HookedTransformer(cfg)`` vs
  ``TransformerBridge.boot_native(cfg, dtype=...)``);
* state-dict conventions: HookedTransformer uses per-head property keys
  (``blocks.0.attn.W_Q`` of shape [n_heads, d_model, d_head]); native bridges use
  ``nn.Linear`` keys (``blocks.0.attn.q.weight`` of shape [n_heads*d_head, d_model]).
  lensprobe's portable checkpoint stores the HookedTransformer convention and converts
  on load/save (TransformerLens's own ``convert_tl_checkpoint`` one way, its inverse here);
* loading pretrained models offline from a local HuggingFace directory;
* whether layer norm has been folded into the weights (processed HookedTransformer,
  or a bridge in compatibility mode).
"""

from __future__ import annotations

import inspect
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version as _pkg_version
from pathlib import Path
from typing import Any

import einops
import torch

from .errors import InputError, LensprobeError, ModelError

TL_VERSION: str = _pkg_version("transformer-lens")
"""The installed TransformerLens version (for example ``"4.3.0"``)."""
TL_MAJOR: int = int(TL_VERSION.split(".")[0])

try:  # TL 2.x / 3.x
    from transformer_lens import HookedTransformer, HookedTransformerConfig  # type: ignore
except ImportError:  # TL 4.x removed them
    HookedTransformer = None  # type: ignore[assignment,misc]
    HookedTransformerConfig = None  # type: ignore[assignment,misc]

try:  # TL 3.x / 4.x
    from transformer_lens.config import TransformerBridgeConfig  # type: ignore
except ImportError:  # TL 2.x
    TransformerBridgeConfig = None  # type: ignore[assignment,misc]

# TransformerBridge itself loads on first use (_bridge_cls): transformer_lens.model_bridge
# pulls in transformers, scipy, sympy and torch.distributed, which doubled the cost of
# `import lensprobe` on TL 4.x.
_BRIDGE_MODULE = "transformer_lens.model_bridge"
HAS_BRIDGE: bool = TransformerBridgeConfig is not None

from transformer_lens.hook_points import HookPoint  # noqa: E402

try:  # TL 4.x moved HookedRootModule to the package root
    from transformer_lens import HookedRootModule
except ImportError:
    from transformer_lens.hook_points import HookedRootModule

#: Which model class ``tiny_model`` and ``load_checkpoint`` build on this install.
#: HookedTransformer where it exists (TL 2.x/3.x), else TransformerBridge (TL 4.x).
#: Set ``LENSPROBE_BACKEND=bridge`` to prefer bridges on TL 3.x.
BACKEND: str = (
    "hooked"
    if HookedTransformer is not None and os.environ.get("LENSPROBE_BACKEND") != "bridge"
    else "bridge"
)
"""``"hooked"`` (HookedTransformer) or ``"bridge"`` (TransformerBridge): what lensprobe builds here."""

__all__ = [
    "BACKEND",
    "TL_VERSION",
    "HookPoint",
    "build_model",
    "config_to_dict",
    "hook_points",
    "is_bridge",
    "is_folded",
    "load_portable_state_dict",
    "load_pretrained",
    "portable_state_dict",
    "require_model",
]


# --------------------------------------------------------------------------- kinds
def _bridge_cls() -> Any:
    """TransformerBridge, imported now (None on TL 2.x)."""
    if not HAS_BRIDGE:
        return None
    import importlib

    return importlib.import_module(_BRIDGE_MODULE).TransformerBridge


def is_bridge(model: Any) -> bool:
    # No bridge can exist before its module was imported, so this never imports it.
    mod = sys.modules.get(_BRIDGE_MODULE)
    return mod is not None and isinstance(model, mod.TransformerBridge)


def is_hooked_transformer(model: Any) -> bool:
    return HookedTransformer is not None and isinstance(model, HookedTransformer)


def require_model(model: Any) -> None:
    """Raise a clear error unless ``model`` is a TransformerLens transformer."""
    if is_bridge(model) or is_hooked_transformer(model):
        return
    kind = type(model).__name__
    hint = ""
    if isinstance(model, torch.nn.Module) and hasattr(model, "config"):
        hint = (
            " It looks like a HuggingFace model: wrap it with lp.load_model(<local dir or"
            " hub name>) or TransformerBridge.boot_transformers(...)."
        )
    raise ModelError(
        f"expected a TransformerLens model (HookedTransformer or TransformerBridge), got {kind}."
        + hint
        + " Build one with lp.tiny_model(...), lp.load_model(...) or lp.load_checkpoint(...)."
    )


def hook_points(model: HookedRootModule) -> dict[str, HookPoint]:
    """Legacy hook names (and, on bridges, canonical aliases) -> HookPoint."""
    return dict(model.hook_dict)


def is_folded(model: Any) -> bool:
    """True when layer-norm scales have been folded into the following weights.

    HookedTransformer marks this with normalization_type 'LNPre'/'RMSPre'; a bridge
    after ``enable_compatibility_mode()`` (fold_ln=True by default) has
    ``compatibility_mode`` set and its ln weights folded.
    """
    norm = getattr(model.cfg, "normalization_type", None)
    if norm in ("LNPre", "RMSPre"):
        return True
    if is_bridge(model):
        # TL 4.3 leaves cfg.normalization_type at 'LN' and cfg.layer_norm_folding False
        # after enable_compatibility_mode(); the adapter records what was requested.
        return bool(getattr(model, "_weights_processed", False)) and bool(
            getattr(model.adapter, "_fold_ln_requested", False)
        )
    return False


# --------------------------------------------------------------------------- configs
_DROP_CONFIG_KEYS = {
    "device",
    "dtype",
    "n_params",
    "tokenizer_name",  # would make HookedTransformer fetch a tokenizer from the hub
    "n_devices",
    "load_in_4bit",
}


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-serialisable dict of a HookedTransformerConfig / TransformerBridgeConfig."""
    raw = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))
    return {
        k: v
        for k, v in raw.items()
        if not k.startswith("_") and k not in _DROP_CONFIG_KEYS and _jsonable(v)
    }


def _config_class() -> type:
    return HookedTransformerConfig if BACKEND == "hooked" else TransformerBridgeConfig


def _config_fields(cls: type) -> set[str]:
    """Keyword arguments a config class accepts, along its MRO.

    TransformerBridgeConfig passes most fields (positional_embedding_type ...) through
    **kwargs to TransformerLensConfig, so its own signature alone is not enough.
    """
    fields: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None and klass is not object:
            fields |= set(inspect.signature(init).parameters) - {"self", "args", "kwargs"}
    return fields


def _make_config(d: dict[str, Any], dtype: torch.dtype) -> Any:
    cls = _config_class()
    accepted = _config_fields(cls)
    kwargs = {k: v for k, v in d.items() if k in accepted and k not in _DROP_CONFIG_KEYS}
    kwargs["dtype"] = dtype
    if BACKEND == "bridge":
        kwargs.pop("dtype")
    return cls(**kwargs)


def build_model(
    cfg_dict: dict[str, Any],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> HookedRootModule:
    """Build a model from a config dict on the installed backend, leaving the global RNG alone.

    ``cfg_dict["seed"]`` seeds a local ``torch.Generator``: HookedTransformerConfig would
    call ``set_seed_everywhere`` (torch, random, numpy), so the hooked path gets
    ``seed=None`` and draws TransformerLens's "gpt2" init (W_* ~ N(0, initializer_range^2),
    in parameter order) from the generator itself, the same numbers the global RNG
    seeded with ``seed`` gave. Native bridges already seed a scoped generator.
    Construction runs under ``fork_rng`` so unseeded module init (``nn.Linear``'s
    reset_parameters on bridges) does not advance the caller's stream either.
    """
    device = check_device(device)
    d = dict(cfg_dict)
    seed = d.get("seed")
    init = d.get("init_weights", True)
    with torch.random.fork_rng(devices=[]):
        if BACKEND == "hooked":
            if init and d.get("init_mode", "gpt2") != "gpt2":
                raise InputError(f"init_mode {d['init_mode']!r}: lensprobe builds 'gpt2' init only.")
            d.update(seed=None, init_weights=False)
            model = HookedTransformer(_make_config(d, dtype))
            model.cfg.seed, model.cfg.init_weights = seed, init
            if init:
                g = torch.Generator().manual_seed(seed) if seed is not None else None
                with torch.no_grad():
                    for name, param in model.named_parameters():
                        if "W_" in name:
                            param.normal_(0.0, model.cfg.initializer_range, generator=g)
            if device is not None:
                model = model.to(device, print_details=False)  # TL would print "Moving model"
        else:
            model = _bridge_cls().boot_native(_make_config(d, dtype), dtype=dtype, device=device)
    model.eval()
    return model


def check_device(device: str | torch.device | None) -> torch.device | None:
    """The one device check of every lensprobe entry point that takes ``device=``.

    None stays None (the backend's default); anything else must name a device torch
    knows and this machine has (``inputs.resolve_device``), else InputError.
    """
    if device is None:
        return None
    from .inputs import resolve_device

    try:
        return resolve_device(device)
    except RuntimeError as e:  # torch.device("gpu"): not a device string
        raise InputError(f"device {str(device)!r} is not a torch device: {e}. Use 'cpu' or 'cuda'.") from e


# --------------------------------------------------------------------------- state dicts
_HT_BUFFERS = (".mask", ".IGNORE", ".rotary_sin", ".rotary_cos")


def _heads(t: torch.Tensor, d_head: int, pattern: str) -> torch.Tensor:
    return einops.rearrange(t, pattern, d_head=d_head).contiguous()


def _bridge_to_tl(sd: dict[str, torch.Tensor], cfg: Any) -> dict[str, torch.Tensor]:
    """Inverse of transformer_lens.utilities.tl_checkpoint_conversion.convert_tl_checkpoint."""
    dh = cfg.d_head
    # Grouped-query models: HookedTransformer keeps the n_kv K/V heads as _W_K/_W_V/_b_K/_b_V.
    kv = "._" if getattr(cfg, "n_key_value_heads", None) not in (None, cfg.n_heads) else "."
    table: list[tuple[str, str, Any]] = [
        (".attn.q.weight", ".attn.W_Q", lambda t: _heads(t, dh, "(h d_head) m -> h m d_head")),
        (".attn.k.weight", f".attn{kv}W_K", lambda t: _heads(t, dh, "(h d_head) m -> h m d_head")),
        (".attn.v.weight", f".attn{kv}W_V", lambda t: _heads(t, dh, "(h d_head) m -> h m d_head")),
        (".attn.o.weight", ".attn.W_O", lambda t: _heads(t, dh, "m (h d_head) -> h d_head m")),
        (".attn.q.bias", ".attn.b_Q", lambda t: _heads(t, dh, "(h d_head) -> h d_head")),
        (".attn.k.bias", f".attn{kv}b_K", lambda t: _heads(t, dh, "(h d_head) -> h d_head")),
        (".attn.v.bias", f".attn{kv}b_V", lambda t: _heads(t, dh, "(h d_head) -> h d_head")),
        (".attn.o.bias", ".attn.b_O", lambda t: t),
        (".mlp.in.weight", ".mlp.W_in", lambda t: t.T.contiguous()),
        (".mlp.in.bias", ".mlp.b_in", lambda t: t),
        (".mlp.out.weight", ".mlp.W_out", lambda t: t.T.contiguous()),
        (".mlp.out.bias", ".mlp.b_out", lambda t: t),
        (".mlp.gate.weight", ".mlp.W_gate", lambda t: t.T.contiguous()),
        (".mlp.gate.bias", ".mlp.b_gate", lambda t: t),
    ]
    exact = {
        "embed.weight": ("embed.W_E", lambda t: t),
        "pos_embed.weight": ("pos_embed.W_pos", lambda t: t),
        "unembed.weight": ("unembed.W_U", lambda t: t.T.contiguous()),
        "unembed.bias": ("unembed.b_U", lambda t: t),
    }
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        if key in exact:
            new, fn = exact[key]
            out[new] = fn(t)
            continue
        for suffix, new_suffix, fn in table:
            if key.endswith(suffix):
                out[key[: -len(suffix)] + new_suffix] = fn(t)
                break
        else:
            is_norm = ".ln" in "." + key
            if is_norm and key.endswith(".weight"):
                out[key[: -len(".weight")] + ".w"] = t
            elif is_norm and key.endswith(".bias"):
                out[key[: -len(".bias")] + ".b"] = t
            else:
                raise ModelError(
                    f"cannot express bridge parameter {key!r} in the portable (HookedTransformer)"
                    " format; portable checkpoints cover GPT-style native models."
                )
    return out


def _to_adjacent_rotary(sd: dict[str, torch.Tensor], cfg: Any) -> dict[str, torch.Tensor]:
    """Re-order W_Q/W_K so GPT-NeoX ("halves") rotary becomes adjacent-pair rotary.

    HookedTransformer rotates pairs (i, i + r/2) unless ``rotary_adjacent_pairs``; native
    bridges always rotate (2i, 2i+1) with the same frequency for pair i. The same
    permutation of the first r query and key coordinates maps one onto the other and
    leaves every q.k score (and so the whole forward pass) unchanged.
    """
    if cfg.positional_embedding_type != "rotary" or getattr(cfg, "rotary_adjacent_pairs", False):
        return sd
    r = cfg.rotary_dim or cfg.d_head
    perm = torch.arange(cfg.d_head)
    perm[:r] = torch.stack([torch.arange(r // 2), torch.arange(r // 2) + r // 2], dim=-1).flatten()
    out = dict(sd)
    for key, t in sd.items():
        if key.endswith((".W_Q", ".W_K", "._W_K")) or key.endswith((".b_Q", ".b_K", "._b_K")):
            out[key] = t[..., perm].contiguous()
    cfg.rotary_adjacent_pairs = True
    return out


def portable_state_dict(model: HookedRootModule) -> dict[str, torch.Tensor]:
    """The model's weights in HookedTransformer's key/shape convention (no buffers)."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if is_bridge(model):
        if getattr(model, "compatibility_mode", False):
            raise ModelError(
                "cannot save a bridge in compatibility mode: its weights were processed in"
                " place. Save the raw bridge (before enable_compatibility_mode()) instead."
            )
        return _bridge_to_tl(sd, model.cfg)
    return {k: v for k, v in sd.items() if not k.endswith(_HT_BUFFERS)}


def load_portable_state_dict(model: HookedRootModule, sd: dict[str, torch.Tensor]) -> None:
    """Load a portable (HookedTransformer-convention) state dict, strictly."""
    if is_bridge(model):
        from transformer_lens.utilities.tl_checkpoint_conversion import (
            convert_tl_checkpoint,
        )

        sd = _to_adjacent_rotary(sd, model.cfg)
        model.load_state_dict(convert_tl_checkpoint(dict(sd), model.cfg), strict=True)
        return
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith(_HT_BUFFERS)]
    if missing or unexpected:
        raise ModelError(
            f"checkpoint does not match the model: missing {missing[:5]}, unexpected"
            f" {unexpected[:5]}"
        )


# --------------------------------------------------------------------------- pretrained
def load_pretrained(
    name_or_path: str,
    *,
    processed: bool = False,
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
    **kwargs: Any,
) -> HookedRootModule:
    """A pretrained model through TransformerLens's own loaders.

    A local HuggingFace directory (with config.json) loads offline on both backends;
    any other string is a hub name and needs the network (or a warm HF cache).
    ``processed=False`` (default) keeps the raw HuggingFace weights on both backends
    (HookedTransformer without fold_ln/centering, a bridge without compatibility mode);
    ``processed=True`` applies TransformerLens's standard processing (fold_ln, centering:
    HookedTransformer's defaults, ``enable_compatibility_mode()`` on a bridge).
    """
    device = None if device is None else str(check_device(device))
    path = Path(name_or_path)
    local = path.is_dir()
    if local and not (path / "config.json").exists():
        raise InputError(
            f"{name_or_path!r} is a directory without config.json: not a HuggingFace model"
            " directory. Point at the folder written by model.save_pretrained(...)."
        )
    if not local and (os.sep in name_or_path and not path.exists()) and name_or_path.startswith(
        (".", "/", "~")
    ):
        raise InputError(f"model path {name_or_path!r} does not exist.")
    arch = hf_architecture(path) if local else None
    if local:
        _require_safetensors(path)
    try:
        with _hub_offline(local), _quiet_transformers():
            if BACKEND == "bridge":
                if local and "tokenizer" not in kwargs:
                    kwargs["tokenizer"] = local_tokenizer(path)
                model = _bridge_cls().boot_transformers(
                    str(path) if local else name_or_path, device=device, dtype=dtype, **kwargs
                )
                if processed:
                    model.enable_compatibility_mode(disable_warnings=True)
            else:
                for k in ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases"):
                    kwargs.setdefault(k, processed)
                model = _load_pretrained_hooked(name_or_path, arch, device, dtype, **kwargs)
    except LensprobeError:
        raise
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError,
            NotImplementedError, AssertionError) as e:
        # transformers and TransformerLens raise any of these for unreadable directories,
        # unknown architectures, missing tokenizer files and missing network.
        where = f"local {arch} directory" if local else "hub name"
        raise ModelError(
            f"could not load {name_or_path!r} ({where}): {type(e).__name__}: {e}. Hub names"
            " need network access or a warm HuggingFace cache; offline, pass a local"
            " HuggingFace directory or a lensprobe checkpoint (lp.load_checkpoint)."
        ) from e
    model.eval()
    return model


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' own output (the "Loading weights" progress bar, deprecation and
    init notices) silenced for the duration of a load, its settings restored after."""
    from transformers.utils import logging as hf_logging

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


@contextmanager
def _hub_offline(on: bool) -> Iterator[None]:
    """HF_HUB_OFFLINE=1 for the duration of a local load, restored afterwards.

    huggingface_hub reads the variable once, at import, into ``constants.HF_HUB_OFFLINE``
    (which ``is_offline_mode()`` returns), so the constant is set and restored too.
    """
    if not on:
        yield
        return
    import huggingface_hub.constants as hub_constants

    old_env, old_const = os.environ.get("HF_HUB_OFFLINE"), hub_constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = old_const
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


def _require_safetensors(path: Path) -> None:
    """Refuse a local directory whose weights exist only as pickles (``.bin``/``.pt``).

    Unpickling runs code from the file; lensprobe reads weights from safetensors only.
    """
    if any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    what = f"only pickle weights ({', '.join(pickles)})" if pickles else "no weights file"
    raise ModelError(
        f"{str(path)!r} has {what}; lensprobe loads HuggingFace weights from safetensors"
        " only, because unpickling a file can run arbitrary code. Convert it once in a"
        " trusted session: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir,"
        " safe_serialization=True)."
    )


def hf_architecture(path: str | Path) -> str:
    """The model class named in a HuggingFace directory's config.json (``architectures[0]``)."""
    cfg_path = Path(path) / "config.json"
    try:
        raw = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read {str(cfg_path)!r} as JSON: {e}") from e
    archs = raw.get("architectures") if isinstance(raw, dict) else None
    if not (isinstance(archs, list) and archs and isinstance(archs[0], str)):
        raise ModelError(
            f"{str(cfg_path)!r} names no model class ('architectures': [...]); save the"
            " model with model.save_pretrained(...), which writes it."
        )
    return archs[0]


def local_tokenizer(path: Path) -> Any:
    """The tokenizer of a local directory, as its tokenizer_config.json names it.

    ``AutoTokenizer`` in transformers 5 overrides a declared ``PreTrainedTokenizerFast``
    with the model type's own class for some types (Qwen2 among them), which re-reads a
    word-level tokenizer.json as byte-level BPE; a directory that says
    PreTrainedTokenizerFast (or TokenizersBackend) gets exactly that. None when the
    directory has no readable tokenizer.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        declared = json.loads((path / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        declared = None
    try:
        if declared in ("PreTrainedTokenizerFast", "TokenizersBackend") and (path / "tokenizer.json").exists():
            tok = PreTrainedTokenizerFast.from_pretrained(str(path))
            if tok.bos_token is not None and not getattr(tok, "add_bos_token", False):
                # TransformerLens re-creates a tokenizer without add_bos_token through
                # AutoTokenizer (the override above); one that has it is kept as given.
                tok = PreTrainedTokenizerFast.from_pretrained(str(path), add_bos_token=True)
            return tok
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError):
        return None


def _gemma_config(hf: Any) -> dict[str, Any]:
    """TL 2 config fields of a Gemma / Gemma-2 HuggingFace config.

    TL 2.18 knows Gemma only by official name (hard-coded sizes); these are the same
    fields, read from the directory's own config. Gemma-2's layer kinds come from
    ``layer_types`` (or HF's rule: even layers sliding) and its attention scale is
    sqrt(query_pre_attn_scalar).
    """
    cfg: dict[str, Any] = {
        "d_model": hf.hidden_size,
        "d_head": hf.head_dim,
        "n_heads": hf.num_attention_heads,
        "n_key_value_heads": hf.num_key_value_heads,
        "d_mlp": hf.intermediate_size,
        "n_layers": hf.num_hidden_layers,
        "n_ctx": hf.max_position_embeddings,
        "eps": hf.rms_norm_eps,
        "d_vocab": hf.vocab_size,
        "act_fn": getattr(hf, "hidden_activation", None) or hf.hidden_act,
        "initializer_range": hf.initializer_range,
        "normalization_type": "RMS",
        "rotary_base": getattr(hf, "rope_theta", None) or 10000.0,
        "rotary_dim": hf.head_dim,
        "positional_embedding_type": "rotary",
        "use_attn_scale": True,
        "gated_mlp": True,
        "final_rms": True,
    }
    if hf.model_type == "gemma2":
        kinds = getattr(hf, "layer_types", None) or [
            "sliding_attention" if l % 2 == 0 else "full_attention" for l in range(hf.num_hidden_layers)
        ]
        cfg.update(
            window_size=hf.sliding_window,
            use_local_attn=True,
            attn_types=["local" if k == "sliding_attention" else "global" for k in kinds],
            attn_scores_soft_cap=hf.attn_logit_softcapping or -1.0,
            output_logits_soft_cap=hf.final_logit_softcapping or -1.0,
            attn_scale=float(hf.query_pre_attn_scalar) ** 0.5,
            use_normalization_before_and_after=True,
        )
    return cfg


_NAME_KEYED = {"GemmaForCausalLM": _gemma_config, "Gemma2ForCausalLM": _gemma_config}


def _hooked_config(path: str, arch: str, hf_model: Any, fold_ln: bool, device: Any, dtype: Any) -> Any:
    """The HookedTransformerConfig of a local directory, from its config.json alone.

    TL 2's loaders guess the architecture from the *name* first ("llama" or "gemma"
    anywhere in it), so they get a copy of config.json in a neutral directory; the guess
    is then checked against ``arch``.
    """
    import tempfile

    from transformer_lens import loading_from_pretrained as loading

    hf_cfg = hf_model.config.to_dict()
    if arch in _NAME_KEYED:
        d = _NAME_KEYED[arch](hf_model.config)
        d.update(original_architecture=arch, init_weights=False, device=device, dtype=dtype,
                 default_prepend_bos=True, n_devices=1)
        if fold_ln:
            d["normalization_type"] = "RMSPre"
        cfg = HookedTransformerConfig.from_dict(d)
    else:
        with tempfile.TemporaryDirectory(prefix="lp") as tmp:
            neutral = Path(tmp) / "model"
            neutral.mkdir()
            (neutral / "config.json").write_text((Path(path) / "config.json").read_text())
            cfg = loading.get_pretrained_model_config(
                str(neutral), hf_cfg=hf_cfg, fold_ln=fold_ln, device=device, dtype=dtype
            )
    if cfg.original_architecture != arch:
        raise ModelError(
            f"TransformerLens read {path!r} as {cfg.original_architecture}, but its config.json"
            f" says {arch}; cannot load it reliably on TL {TL_VERSION}."
        )
    cfg.model_name = Path(path).name
    cfg.tokenizer_name = None
    return cfg


def _load_pretrained_hooked(
    name_or_path: str, arch: str | None, device: str | None, dtype: torch.dtype, **kwargs: Any
) -> HookedRootModule:
    if arch is None:
        return HookedTransformer.from_pretrained(name_or_path, device=device, dtype=dtype, **kwargs)
    # HookedTransformer.from_pretrained insists on an official model name, but the loading
    # functions it calls accept a local directory; this is the middle of from_pretrained
    # with the name check left out and the architecture taken from config.json.
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(name_or_path, torch_dtype=dtype)
    tokenizer = local_tokenizer(Path(name_or_path))
    cfg = _hooked_config(name_or_path, arch, hf_model, kwargs["fold_ln"], device, dtype)
    state_dict = loading.get_pretrained_state_dict(name_or_path, cfg, hf_model, dtype=dtype)
    model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(state_dict, **kwargs)
    return model.to(device, print_details=False) if device is not None else model


def attn_scale(model: Any, layer: int) -> float:
    """The divisor of q.k in layer ``layer``'s attention scores (scores = q.k / scale).

    HookedTransformer keeps it on the attention module (``attn_scale``, layer-index
    scaling included); native bridges on their ``NativeAttention`` (``scale``; TL 4.3
    uses sqrt(d_head) whenever cfg.attn_scale <= 0, whatever ``use_attn_scale`` says);
    HuggingFace attention modules inside bridges multiply by ``scaling``. Otherwise the
    config decides (sqrt(d_head) by default).
    """
    import math

    attn = model.blocks[layer].attn
    scale = getattr(attn, "attn_scale", None)
    if isinstance(scale, (int, float)) and scale > 0:
        return float(scale)
    orig = getattr(attn, "original_component", None)
    scale = getattr(orig, "scale", None)
    if isinstance(scale, (int, float)) and scale > 0:
        return float(scale)
    scaling = getattr(orig, "scaling", None)
    if isinstance(scaling, (int, float)) and scaling > 0:
        return 1.0 / float(scaling)
    cfg = model.cfg
    if getattr(cfg, "use_attn_scale", True):
        s = getattr(cfg, "attn_scale", -1.0)
        s = float(s) if s is not None and s > 0 else math.sqrt(cfg.d_head)
    else:
        s = 1.0
    if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
        s *= layer + 1
    return s


def final_hook(model: Any) -> str:
    """The hook holding the final normalised representation y = gamma * x_hat + beta.

    TL 2.x HookedTransformer's ``ln_final.hook_normalized`` is LayerNorm's output, but on
    TL 4.x bridges it is taken before gamma and beta (x_hat only); the bridge's
    ``ln_final.hook_out`` is the output. Exception: HookedTransformer's RMSNorm fires
    ``hook_normalized`` before its gain and has no hook after it, so there y = x_hat
    (the gain is a fixed diagonal scaling). Models without a final norm: the last
    resid_post.
    """
    if getattr(model.cfg, "normalization_type", None) is None:
        return f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    if is_bridge(model):
        return "ln_final.hook_out"
    return "ln_final.hook_normalized"


def norm_scale(model: Any, layer: int, norm: str = "ln1") -> torch.Tensor | None:
    """The gamma parameter of block ``layer``'s ``norm``, or None (no norm, or LNPre).

    HookedTransformer calls it ``w``, bridges ``weight``; a bridge in compatibility mode
    keeps a vector of ones there. The parameter itself, so no_grad writes reach the model.
    """
    module = getattr(model.blocks[layer], norm, None)
    for attr in ("w", "weight"):
        w = getattr(module, attr, None) if module is not None else None
        if isinstance(w, torch.Tensor):
            return w
    return None


def head_weight(model: Any, layer: int, name: str) -> torch.Tensor:
    """``blocks.{layer}.attn.{name}`` (W_Q/W_K/W_V/W_O/b_V/b_O) as a writable tensor.

    A parameter on HookedTransformer, a view of the linear weight on bridges; anything
    that does not share a parameter's storage cannot be written and raises ModelError.
    """
    attn = model.blocks[layer].attn
    t = getattr(attn, name, None)
    storages = {p.untyped_storage().data_ptr() for p in attn.parameters()}
    if not isinstance(t, torch.Tensor) or t.untyped_storage().data_ptr() not in storages:
        raise ModelError(
            f"blocks.{layer}.attn.{name} of this {type(model).__name__} is not a view of a"
            " parameter, so lensprobe cannot write it; use a model built by lp.tiny_model or"
            " loaded raw (lp.load_model(..., processed=False))."
        )
    return t
