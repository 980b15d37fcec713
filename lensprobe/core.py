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

import copy
import functools
import math
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from . import _tl
from .errors import InputError
from .inputs import check_finite, check_hook, to_tokens

__all__ = ["extractor", "renamed", "activations", "guard", "cast", "copy_model", "run_hooked", "hooked_fn", "vjp_rows", "jvp_cols", "jacobian"]

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
    they were, so hooks the user registered stay and hooks lensprobe added go; tensors
    that modules cached as attributes during the run and that carry an autograd graph
    are put back to their previous values (or deleted if new), so no graph outlives the
    call. Weights are never written by lensprobe's extractors; the tests
    check the state-dict hash.
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
    attrs = _snapshot_attrs(_reachable_modules(model))
    try:
        model.eval()
        for p in params:
            p.requires_grad_(False)
        yield model
    finally:
        # HF bridges cache the attention pattern as a plain attribute
        # (``blocks[l]._original_component.attn._pattern``): after a grad-mode forward it
        # holds the whole graph, keeps its memory and makes copy.deepcopy fail.
        _restore_attrs(model, attrs, _holds_graph)
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


def _holds_graph(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.grad_fn is not None


def _reachable_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every module reachable from ``model``: its submodules and modules kept as plain
    attributes (a TransformerBridge's ``original_model`` is not registered)."""
    seen: dict[int, torch.nn.Module] = {}
    stack = [model]
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen[id(m)] = m
        stack.extend(c for c in m._modules.values() if c is not None)
        stack.extend(v for v in vars(m).values() if isinstance(v, torch.nn.Module))
    return list(seen.values())


def _snapshot_attrs(modules: Sequence[torch.nn.Module]) -> dict[int, tuple[dict, set]]:
    """Each module's attributes (shallow) and the names of those that hold a graph."""
    return {
        id(m): (dict(vars(m)), {k for k, v in vars(m).items() if _holds_graph(v)})
        for m in modules
    }


def _restore_attrs(
    model: Any, snapshot: dict[int, tuple[dict, set]], which: Callable[[Any], bool]
) -> None:
    """Put back every module attribute selected by ``which`` that the run created or
    replaced: its value from the snapshot comes back (the same object), or it is deleted
    when it did not exist then. A tensor that gained a graph in place is detached; one
    that already held a graph then (the user's own) is left alone."""
    for m in _reachable_modules(model):
        before, had_graph = snapshot.get(id(m), ({}, set()))
        d = vars(m)
        for k, v in list(d.items()):
            if not which(v):
                continue
            if k not in before:
                del d[k]
            elif before[k] is not v:
                d[k] = before[k]
            elif _holds_graph(v) and k not in had_graph:
                d[k] = v.detach()


def _is_data(value: Any) -> bool:
    """Tensors and plain values: what a forward pass caches on a module (patterns, rotary
    tables and the lengths they were built for), as opposed to its structure."""
    return value is None or isinstance(value, (torch.Tensor, int, float, complex, str))


def copy_model(model: Any) -> Any:
    """``copy.deepcopy(model)`` that also works after a grad-mode forward.

    ``deepcopy`` refuses tensors that carry an autograd graph, and HF bridges keep one
    on their modules after any grad-mode forward (``_pattern``); the copy gets those
    cached tensors detached, the original keeps its own.
    """
    memo = {
        id(v): v.detach().clone()
        for m in _reachable_modules(model)
        for v in vars(m).values()
        if _holds_graph(v)
    }
    return copy.deepcopy(model, memo)


@contextmanager
def cast(model: Any, dtype: torch.dtype) -> Iterator[Any]:
    """``model`` itself cast to ``dtype`` for the block, then restored exactly.

    A copy is not an option: ``copy.deepcopy`` fails on any model whose modules cached a
    graph-holding tensor (HF bridges after a grad-mode forward), and it doubles memory.
    Inside, TransformerLens's own ``to`` (which keeps ``cfg.dtype`` in step, silently)
    casts every parameter and buffer; on exit the original storage objects come back, so
    weights are bit-identical (a bf16 round trip would lose them), ``cfg.dtype`` is reset,
    and the tensors and plain values that modules cached on themselves during the block
    (computed in ``dtype``) are put back. Use inside :func:`guard`.
    """
    modules = _reachable_modules(model)
    params = list({id(p): p for m in modules for p in m._parameters.values() if p is not None}.values())
    if all(p.dtype == dtype for p in params if p.is_floating_point()):
        yield model
        return
    data = [(p, p.data, p.grad, None if p.grad is None else p.grad.data) for p in params]
    buffers = [(m, k, b) for m in modules for k, b in m._buffers.items()]
    cfg = getattr(model, "cfg", None)
    cfg_dtype = getattr(cfg, "dtype", None)
    snapshot = _snapshot_attrs(modules)
    try:
        model.to(dtype, print_details=False)
        yield model
    finally:
        for p, d, g, gd in data:
            p.data = d
            if g is not None:
                g.data = gd
            p.grad = g
        for m, k, b in buffers:
            m._buffers[k] = b
        if cfg_dtype is not None:
            cfg.dtype = cfg_dtype
        # A forward pass in ``dtype`` may have cached tensors in ``dtype`` together with
        # the numbers they belong to (a RoPE table and its length): put both back.
        _restore_attrs(model, snapshot, _is_data)


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


def activations(
    model: Any, tokens: Any, names: Sequence[str], cache: Any = None
) -> dict[str, torch.Tensor]:
    """Activations at hook ``names``: read from a TransformerLens ``ActivationCache`` (or
    any mapping hook name -> tensor) when ``cache`` is given, else captured from a
    no-grad forward on ``tokens`` (inside a guard). The one way an analysis that only
    reads activations gets them."""
    names = list(names)
    if cache is None:
        if tokens is None:
            raise InputError("pass tokens (the model input) or cache= (an ActivationCache).")
        return capture_acts(model, tokens, names)
    have = set(cache.keys())
    missing = [n for n in names if n not in have]
    if missing:
        raise InputError(
            f"the cache lacks hook points {missing}; run model.run_with_cache(tokens,"
            f" names_filter={names!r}) or pass tokens= instead of cache=."
        )
    return {n: cache[n] for n in names}


def extractor(fn: Callable) -> Callable:
    """The skeleton every extractor shares: ``fn(model, ...)`` runs inside :func:`guard`
    (model restored exactly on every exit path) after the model is checked, so the body
    is the analysis itself. Keep input checks that need the model inside ``fn``."""

    @functools.wraps(fn)
    def run(model: Any, *args: Any, **kwargs: Any) -> Any:
        with guard(model):
            return fn(model, *args, **kwargs)

    return run


def renamed(**old_to_new: str) -> Callable[[Callable], Callable]:
    """Accept a keyword's old name for one release: ``@renamed(k="top_k")`` maps ``k=``
    to ``top_k=`` with a DeprecationWarning that names the new spelling."""

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            for old, new in old_to_new.items():
                if old in kwargs:
                    if new in kwargs:
                        raise InputError(f"{fn.__name__}: pass {new}= only ({old}= is its old name).")
                    warnings.warn(f"{fn.__qualname__}({old}=...) is now {new}=...; the old name will be"
                                  " removed in lensprobe 0.3.", DeprecationWarning, stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return call

    return deco


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


# Default bound on one chunk's backward working set when neither chunk_size nor
# max_memory_mb is given: batching helps small models, and a fixed chunk of 32 rows at
# n = 8192 needed 4.5x the memory of one row (issue 11).
DEFAULT_CHUNK_MB = 256.0
MAX_DEFAULT_CHUNK = 32


def _chunk_size(chunk_size: int | None, max_memory_mb: float | None, per_row: int) -> int:
    """Rows per batched backward: ``chunk_size`` if given, else as many as fit
    ``max_memory_mb`` (default :data:`DEFAULT_CHUNK_MB`, at most
    :data:`MAX_DEFAULT_CHUNK` rows), counting ``per_row`` bytes per row; at least 1."""
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise InputError(f"chunk_size must be an int >= 1, got {chunk_size!r}.")
        return chunk_size
    if max_memory_mb is not None:
        if not max_memory_mb > 0:
            raise InputError(f"max_memory_mb must be positive, got {max_memory_mb!r}.")
        return max(1, int(max_memory_mb * 2**20 // max(per_row, 1)))
    return max(1, min(MAX_DEFAULT_CHUNK, int(DEFAULT_CHUNK_MB * 2**20 // max(per_row, 1))))


def vjp_rows(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    cotangents: torch.Tensor,
    *,
    chunk_size: int | None = None,
    max_memory_mb: float | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    per_row: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Vector-Jacobian products ``v^T (d fn / d x)`` for each row ``v`` of ``cotangents``.

    One forward pass, then batched backward passes (``autograd.grad`` with
    ``is_grads_batched``) over chunks of cotangents. ``cotangents`` has shape
    [k, *fn(x).shape]; the result [k, *x.shape]. The chunk size is ``chunk_size`` if
    given, else chosen so that one chunk's backward working set (measured as the bytes
    autograd saved in the forward, per cotangent) stays under ``max_memory_mb``
    (default :data:`DEFAULT_CHUNK_MB`). Only one chunk's products are held at a time
    when ``reduce`` or ``per_row`` is given: ``reduce`` maps each chunk's products
    [c, *x.shape] to a summary that is summed over chunks (e.g. squared norms);
    ``per_row`` maps them to [c, ...] per-row values that are concatenated (e.g. each
    probe's squared norm). A chunk size of 1 runs plain backward passes, which is
    fastest per row on CPU. The result does not depend on the chunk size.
    """
    if reduce is not None and per_row is not None:
        raise InputError("pass reduce or per_row, not both.")
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        y, saved = _saved_bytes(fn, x)
    if not y.requires_grad:
        raise InputError("the captured activation does not depend on the injected tensor.")
    if tuple(cotangents.shape[1:]) != tuple(y.shape):
        raise InputError(
            f"cotangents must have shape [k, *{tuple(y.shape)}], got {tuple(cotangents.shape)}."
        )
    cs = _chunk_size(chunk_size, max_memory_mb, saved)
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
        if reduce is not None:
            r = reduce(g)
            total = r if total is None else total + r
        else:
            outs.append(g if per_row is None else per_row(g))
        del g
    if reduce is not None:
        if total is None:
            raise InputError("no cotangents given: nothing to reduce.")
        return total
    if not outs:
        if per_row is not None:
            raise InputError("no cotangents given: nothing to compute.")
        return x.new_zeros((0, *x.shape))
    return torch.cat(outs)


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
