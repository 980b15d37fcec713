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
from importlib.metadata import version as _pkg_version
from pathlib import Path
from typing import Any

import einops
import torch

from .errors import InputError, ModelError

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
    from transformer_lens import HookedRootModule  # noqa: E402
except ImportError:
    from transformer_lens.hook_points import HookedRootModule  # noqa: E402

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
    "TL_VERSION",
    "BACKEND",
    "HookPoint",
    "is_bridge",
    "require_model",
    "hook_points",
    "is_folded",
    "build_model",
    "portable_state_dict",
    "load_portable_state_dict",
    "config_to_dict",
    "load_pretrained",
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
    """Build an untrained model from a config dict on the installed backend."""
    cfg = _make_config(cfg_dict, dtype)
    if BACKEND == "hooked":
        model = HookedTransformer(cfg)
        if device is not None:
            model = model.to(device, print_details=False)  # TL would print "Moving model"
    else:
        model = _bridge_cls().boot_native(cfg, dtype=dtype, device=device)
    model.eval()
    return model


# --------------------------------------------------------------------------- state dicts
_HT_BUFFERS = (".mask", ".IGNORE", ".rotary_sin", ".rotary_cos")


def _heads(t: torch.Tensor, d_head: int, pattern: str) -> torch.Tensor:
    return einops.rearrange(t, pattern, d_head=d_head).contiguous()


def _bridge_to_tl(sd: dict[str, torch.Tensor], cfg: Any) -> dict[str, torch.Tensor]:
    """Inverse of transformer_lens.utilities.tl_checkpoint_conversion.convert_tl_checkpoint."""
    dh = cfg.d_head
    table: list[tuple[str, str, Any]] = [
        (".attn.q.weight", ".attn.W_Q", lambda t: _heads(t, dh, "(h d_head) m -> h m d_head")),
        (".attn.k.weight", ".attn.W_K", lambda t: _heads(t, dh, "(h d_head) m -> h m d_head")),
        (".attn.v.weight", ".attn.W_V", lambda t: _heads(t, dh, "(h d_head) m -> h m d_head")),
        (".attn.o.weight", ".attn.W_O", lambda t: _heads(t, dh, "m (h d_head) -> h d_head m")),
        (".attn.q.bias", ".attn.b_Q", lambda t: _heads(t, dh, "(h d_head) -> h d_head")),
        (".attn.k.bias", ".attn.b_K", lambda t: _heads(t, dh, "(h d_head) -> h d_head")),
        (".attn.v.bias", ".attn.b_V", lambda t: _heads(t, dh, "(h d_head) -> h d_head")),
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
        if key.endswith((".W_Q", ".W_K", "._W_K")):
            out[key] = t[..., perm].contiguous()
        elif key.endswith((".b_Q", ".b_K", "._b_K")):
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
        from transformer_lens.utilities.tl_checkpoint_conversion import convert_tl_checkpoint

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
    try:
        if BACKEND == "bridge":
            if local:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
            model = _bridge_cls().boot_transformers(
                str(path) if local else name_or_path, device=device, dtype=dtype, **kwargs
            )
            if processed:
                model.enable_compatibility_mode(disable_warnings=True)
        else:
            for k in ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases"):
                kwargs.setdefault(k, processed)
            model = _load_pretrained_hooked(name_or_path, local, device, dtype, **kwargs)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError) as e:
        # transformers and TransformerLens raise any of these for unreadable directories,
        # unknown architectures, missing tokenizer files and missing network.
        where = "local directory" if local else "hub name"
        raise ModelError(
            f"could not load {name_or_path!r} ({where}): {e}. Hub names need network access"
            " or a warm HuggingFace cache; offline, pass a local HuggingFace directory or a"
            " lensprobe checkpoint (lp.load_checkpoint)."
        ) from e
    model.eval()
    return model


def _load_pretrained_hooked(
    name_or_path: str, local: bool, device: str | None, dtype: torch.dtype, **kwargs: Any
) -> HookedRootModule:
    if not local:
        return HookedTransformer.from_pretrained(name_or_path, device=device, dtype=dtype, **kwargs)
    # HookedTransformer.from_pretrained insists on an official model name, but the loading
    # functions it calls accept a local directory (they read its config.json); this is the
    # middle of from_pretrained with the name check left out.
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(name_or_path, torch_dtype=dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError):
        tokenizer = None
    cfg = loading.get_pretrained_model_config(
        name_or_path,
        hf_cfg=hf_model.config.to_dict(),
        fold_ln=kwargs["fold_ln"],
        device=device,
        dtype=dtype,
    )
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
