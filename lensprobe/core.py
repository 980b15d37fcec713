"""The extraction core: guarded, hook-based, differentiable runs of a TransformerLens model.

Three pieces every extractor uses:

* :func:`guard` -- a context manager that puts the model in eval mode with frozen
  parameters and, on every exit path (exceptions included), restores it exactly: each
  module's training flag, each parameter's ``requires_grad``, and every hook the user
  had (torch-level hook dicts and TransformerLens HookPoint handles). Only hooks added
  while the guard was open are removed; ``reset_hooks`` is never called.
* :func:`run_hooked` / :func:`hooked_fn` -- run the model with tensors injected at hook
  points and activations captured at others. ``hooked_fn`` returns a pure function
  ``x -> captured`` so autograd and ``torch.func`` (vjp, jvp, vmap, jacrev) apply on both
  backends. The forward pass stops right after the last capture.
* :func:`vjp_rows`, :func:`jvp_cols`, :func:`jacobian` -- chunked vector-Jacobian and
  Jacobian-vector products with a memory bound.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from . import _tl
from .errors import InputError
from .inputs import check_finite, check_hook, to_tokens

__all__ = ["guard", "run_hooked", "hooked_fn", "vjp_rows", "jvp_cols", "jacobian"]

_TORCH_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


@contextmanager
def guard(model: Any) -> Iterator[Any]:
    """Freeze ``model`` for analysis and restore it exactly afterwards.

    Inside: ``model.eval()``, every parameter ``requires_grad=False``. On exit (normal or
    exception): every module's ``training`` flag, every parameter's ``requires_grad``,
    every torch hook dict and every HookPoint's TransformerLens handles are put back as
    they were, so hooks the user registered stay and hooks lensprobe added go. Weights
    are never written by lensprobe's extractors; the tests check the state-dict hash.
    """
    _tl.require_model(model)
    modules = list(model.modules())
    training = [m.training for m in modules]
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    torch_hooks = [
        (m, {a: OrderedDict(getattr(m, a)) for a in _TORCH_HOOK_DICTS if hasattr(m, a)})
        for m in modules
    ]
    hp_hooks = [
        (m, list(m.fwd_hooks), list(m.bwd_hooks))
        for m in modules
        if isinstance(m, _tl.HookPoint)
    ]
    context_level = getattr(model, "context_level", None)
    try:
        model.eval()
        for p in params:
            p.requires_grad_(False)
        yield model
    finally:
        for m, saved in torch_hooks:
            for attr, content in saved.items():
                d = getattr(m, attr)
                d.clear()
                d.update(content)
        for m, fwd, bwd in hp_hooks:
            m.fwd_hooks[:] = fwd
            m.bwd_hooks[:] = bwd
        if context_level is not None:
            model.context_level = context_level
        for m, t in zip(modules, training):
            m.training = t
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        _tl.release_cached_graphs(model)


def progress_bar(iterable: Any, enabled: bool, desc: str, total: int | None = None) -> Any:
    """``iterable`` wrapped in a tqdm bar (notebook-aware) when ``enabled``."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)


class _StopForward(Exception):
    """Raised from the last capture hook so the rest of the forward pass is skipped."""


def run_hooked(
    model: Any,
    tokens: torch.Tensor,
    capture: Sequence[str],
    inject: Mapping[str, torch.Tensor | Callable[[torch.Tensor], torch.Tensor]] | None = None,
    *,
    stop_early: bool = True,
    check: bool = False,
) -> dict[str, torch.Tensor]:
    """Run ``model`` on ``tokens``, replacing activations at ``inject`` and returning ``capture``.

    ``inject`` maps a hook name to a tensor (it replaces the activation there, broadcast
    rules of the hook's shape apply) or to a function of the activation. ``capture`` may
    include ``"logits"``, the model's output (then the whole forward pass runs). With
    ``stop_early`` the forward pass ends once every captured activation has been seen.
    Call this inside :func:`guard` (the extractors do) so gradients flow only to injected
    tensors. ``check=True`` raises NonFiniteError if a captured activation is NaN/inf.
    """
    inject = dict(inject or {})
    capture = list(capture)
    want_logits = "logits" in capture
    capture = [c for c in capture if c != "logits"]
    for name in list(inject) + capture:
        check_hook(model, name)
    out: dict[str, torch.Tensor] = {}
    wanted = set(capture)
    stop_early = stop_early and not want_logits

    def make_inject(value: Any) -> Callable:
        def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
            return value(act) if callable(value) else value

        return hook

    def make_capture(name: str) -> Callable:
        def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
            out[name] = act
            if stop_early and wanted <= out.keys():
                raise _StopForward
            return act

        return hook

    # Injection first so a hook both injected and captured returns the injected tensor.
    fwd = [(n, make_inject(v)) for n, v in inject.items()]
    fwd += [(n, make_capture(n)) for n in capture]
    try:
        with model.hooks(fwd_hooks=fwd):
            logits = model(tokens)
    except _StopForward:
        pass
    else:
        out.setdefault("logits", logits)
    if want_logits:
        capture.append("logits")
    missing = wanted - out.keys()
    if missing:
        raise InputError(
            f"hook points {sorted(missing)} never fired in the forward pass; they exist but"
            " this model does not use them (e.g. attn-only models have no MLP hooks)."
        )
    if check:
        for k in capture:
            check_finite(out[k], f"activation {k!r}")
    return out


def hooked_fn(
    model: Any,
    tokens: Any,
    inject: str,
    capture: str | Sequence[str],
    *,
    select: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]]:
    """A pure function ``x -> activation(s)``: ``x`` replaces the activation at ``inject``.

    ``select`` post-processes each captured activation (e.g. ``lambda y: y[:, -1]`` for
    the last position). The result is differentiable in ``x`` and usable with
    ``torch.func`` transforms. Use inside :func:`guard`.
    """
    toks = to_tokens(model, tokens)
    names = [capture] if isinstance(capture, str) else list(capture)

    def fn(x: torch.Tensor) -> Any:
        acts = run_hooked(model, toks, names, {inject: x})
        ys = [acts[n] if select is None else select(acts[n]) for n in names]
        return ys[0] if isinstance(capture, str) else tuple(ys)

    return fn


def capture_acts(model: Any, tokens: Any, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Activations at ``names`` from a plain no-grad forward (inside a guard)."""
    with torch.no_grad():
        return run_hooked(model, to_tokens(model, tokens), names)


# --------------------------------------------------------------------------- Jacobians
def _saved_bytes(fn: Callable, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Forward ``fn(x)`` recording the bytes autograd saves for the backward pass."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    return y, total


def _chunk_size(chunk_size: int | None, max_memory_mb: float | None, per_row: int) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise InputError(f"chunk_size must be >= 1, got {chunk_size}.")
        return chunk_size
    if max_memory_mb is None:
        return 32
    return max(1, int(max_memory_mb * 2**20 // max(per_row, 1)))


def vjp_rows(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    cotangents: torch.Tensor,
    *,
    chunk_size: int | None = None,
    max_memory_mb: float | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Vector-Jacobian products ``v^T (d fn / d x)`` for each row ``v`` of ``cotangents``.

    One forward pass, then batched backward passes (``autograd.grad`` with
    ``is_grads_batched``) over chunks of cotangents. ``cotangents`` has shape
    [k, *fn(x).shape]; the result [k, *x.shape]. The chunk size is ``chunk_size`` if
    given, else chosen so that one chunk's backward working set (measured as the bytes
    autograd saved in the forward, per cotangent) stays under ``max_memory_mb``.
    ``reduce`` maps each chunk's products [c, *x.shape] to a summary that is summed over
    chunks and returned instead (e.g. squared norms), so only one chunk is ever held.
    A chunk size of 1 runs plain backward passes, which is fastest per row on CPU.
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        y, per_row = _saved_bytes(fn, x)
    if not y.requires_grad:
        raise InputError("the captured activation does not depend on the injected tensor.")
    if tuple(cotangents.shape[1:]) != tuple(y.shape):
        raise InputError(
            f"cotangents must have shape [k, *{tuple(y.shape)}], got {tuple(cotangents.shape)}."
        )
    cs = _chunk_size(chunk_size, max_memory_mb, per_row)
    k = cotangents.shape[0]
    outs = []
    total: torch.Tensor | None = None
    for i in range(0, k, cs):
        chunk = cotangents[i : i + cs].to(y.dtype)
        if cs == 1:  # a plain backward pass: no vmap overhead (fastest per row on CPU)
            (g,) = torch.autograd.grad(y, x, grad_outputs=chunk[0], retain_graph=i + 1 < k)
            g = g.unsqueeze(0)
        else:
            (g,) = torch.autograd.grad(
                y, x, grad_outputs=chunk, retain_graph=i + cs < k, is_grads_batched=True
            )
        if reduce is None:
            outs.append(g)
        else:
            r = reduce(g)
            total = r if total is None else total + r
    if reduce is not None:
        if total is None:
            raise InputError("no cotangents given: nothing to reduce.")
        return total
    return torch.cat(outs) if outs else x.new_zeros((0, *x.shape))


def jvp_cols(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tangents: torch.Tensor,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Jacobian-vector products ``(d fn / d x) v`` for each row ``v`` of ``tangents``.

    Forward-mode AD (``torch.func.jvp`` under ``vmap``), chunked; [k, *x.shape] in,
    [k, *fn(x).shape] out.
    """
    cs = _chunk_size(chunk_size, None, 0)
    x = x.detach()

    def one(v: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(fn, (x,), (v,))[1]

    batched = torch.func.vmap(one)
    outs = [batched(tangents[i : i + cs].to(x.dtype)) for i in range(0, tangents.shape[0], cs)]
    return torch.cat(outs)


def jacobian(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    mode: str = "rev",
    chunk_size: int | None = None,
    max_memory_mb: float | None = None,
) -> torch.Tensor:
    """The full Jacobian ``d fn(x) / d x`` with shape [*fn(x).shape, *x.shape].

    ``mode='rev'``: one VJP per output entry (cheap when the output is small);
    ``mode='fwd'``: one JVP per input entry (cheap when the input is small). Both chunked.
    """
    if mode == "rev":
        with torch.no_grad():
            y_shape = fn(x.detach()).shape
        n = math.prod(y_shape)
        basis = torch.eye(n, dtype=x.dtype, device=x.device).reshape(n, *y_shape)
        rows = vjp_rows(fn, x, basis, chunk_size=chunk_size, max_memory_mb=max_memory_mb)
        return rows.reshape(*y_shape, *x.shape)
    if mode == "fwd":
        n = x.numel()
        basis = torch.eye(n, dtype=x.dtype, device=x.device).reshape(n, *x.shape)
        cols = jvp_cols(fn, x, basis, chunk_size=chunk_size)  # [n, *y_shape]
        y_nd = cols.ndim - 1
        return cols.permute(*range(1, y_nd + 1), 0).reshape(*cols.shape[1:], *x.shape)
    raise InputError(f"mode must be 'rev' or 'fwd', got {mode!r}.")
