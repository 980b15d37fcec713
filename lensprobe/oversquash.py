"""Over-squashing and representational collapse (Barbero et al., "Transformers need glasses!
Information over-squashing in language tasks", NeurIPS 2024, arXiv 2406.04267).

Three instruments:

* :func:`sensitivity` -- the norm of ``d y_n / d x_i`` (target representation at one
  position w.r.t. the source representation of every input position ``i``): exact
  Frobenius norm from ``d_out`` vector-Jacobian products (optionally the spectral norm),
  or a Hutchinson-style random-probe estimate with its standard error. The paper bounds
  this quantity (their Theorem 5.1) but never measures it; lensprobe does.
* :func:`path_bound` -- the Theorem 5.1 profile ``[prod_l (Abar^(l) + I)]_{n,i}`` from the
  model's own attention patterns (or an ``ActivationCache``), and its agreement with the
  measured sensitivity.
* :func:`collapse_curve` -- representational collapse (their Theorem 4.2 / B.3): the
  distance between the last-token representations of two sequences (a
  :class:`CollapsePair`) that differ by one repeated token, over a sweep of lengths, in
  float64 and in bf16/fp16, with the log-log slope and the lengths ``n*`` where it falls
  below machine epsilon.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal, Sequence

import torch
from jaxtyping import Float, Int

from ._tl import final_hook
from .core import activations, capture_acts, cast, extractor, hooked_fn, progress_bar, renamed, run_hooked, vjp_rows
from .errors import InputError
from .inputs import check_finite, check_hook, index_list, insert_separators, to_tokens
from .models import str_tokens
from .results import Result, Table

__all__ = [
    "sensitivity",
    "path_bound",
    "collapse_curve",
    "pair_sequences",
    "final_hook",
    "CollapsePair",
    "Sensitivity",
    "PathBound",
    "PrecisionRun",
    "CollapseCurve",
    "PAIRS",
    "METRICS",
]

Method = Literal["exact", "hutchinson"]
ReduceHeads = Literal["mean", "sum", "none"]
PairKind = Literal["repeat_last", "ones", "ones_zero", "change_last"]
Metric = Literal["l1", "l2", "linf"]
DType = torch.dtype | str

METRICS = ("l1", "l2", "linf")
PAIRS = ("repeat_last", "ones", "ones_zero", "change_last")
_EPS = {
    "bfloat16": torch.finfo(torch.bfloat16).eps,  # 2^-7
    "float16": torch.finfo(torch.float16).eps,  # 2^-10
    "float32": torch.finfo(torch.float32).eps,  # 2^-23
}
_DTYPES = {"float64": torch.float64, **{k: getattr(torch, k) for k in _EPS}}
_TINY = 1e-300  # floor of log-scale plots and of divisions by a norm


# --------------------------------------------------------------------------- helpers
def _check_position(position: int, n: int) -> int:
    if not isinstance(position, int) or isinstance(position, bool) or not -n <= position < n:
        raise InputError(
            f"position {position!r} is out of range for sequences of length {n}; use an int"
            f" in [{-n}, {n - 1}] (default -1, the last token)."
        )
    return position % n


def _dtype_name(dtype: DType, what: str) -> str:
    """The one reading of a dtype argument: a ``torch.dtype`` or its name ("bfloat16",
    "torch.float16") -> its name, as results store it (``_DTYPES[name]`` is the dtype)."""
    name = str(dtype).replace("torch.", "")
    if name not in _DTYPES:
        raise InputError(f"unknown {what} {dtype!r}; choose from {tuple(_DTYPES)} (a torch.dtype or its name).")
    return name


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    if a.numel() < 2:
        return float("nan")
    rho = spearmanr(a.double().cpu().numpy(), b.double().cpu().numpy()).statistic
    return float(rho)


def _figure() -> tuple[Any, Any]:
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6.5, 3.6))


def _finish(fig: Any, ax: Any, xlabel: str, ylabel: str, title: str, *, logx: bool = False,
            logy: bool = True) -> Any:
    """Log y (and x), labels, legend: the common end of every plot here."""
    if logy:
        ax.set_yscale("log")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _share(v: torch.Tensor) -> torch.Tensor:
    """``v`` divided by its sum over the last axis (positions), in float64."""
    v = v.double()
    return v / v.sum(-1, keepdim=True).clamp_min(_TINY)


# --------------------------------------------------------------------------- sensitivity
@dataclass(frozen=True)
class Sensitivity(Result):
    """Jacobian norms ``|| d target[position] / d source_i ||`` for every input position i.

    norms:        [target, prompt, pos] exact Frobenius norms (``method='exact'``) or their
                  random-probe estimates (``method='hutchinson'``).
    stderr:       [target, prompt, pos] standard error of the estimate (hutchinson), else None.
    spectral:     [target, prompt, pos] spectral norms (``spectral=True``), else None.
    tokens:       [prompt, pos] the input ids; ``str_tokens`` their strings.
    target_hooks: hook names, one per row of ``norms`` (the last one is the main target).
    source_hook:  the hook whose activation is differentiated against.
    position:     the target position (non-negative).
    """

    AXES: ClassVar = {"norms": ("target", "prompt", "pos"), "stderr": ("target", "prompt", "pos"),
                      "spectral": ("target", "prompt", "pos"), "tokens": ("prompt", "pos")}
    TITLE: ClassVar = "sensitivity to each input position"

    norms: torch.Tensor
    stderr: torch.Tensor | None
    spectral: torch.Tensor | None
    tokens: torch.Tensor
    str_tokens: list[list[str]]
    target_hooks: tuple[str, ...]
    source_hook: str
    position: int
    method: str
    n_probes: int | None = None

    @property
    def profile(self) -> Float[torch.Tensor, "prompt pos"]:  # noqa: F722
        """[prompt, pos] norms for the main (last) target."""
        return self.norms[-1]

    @property
    def relative(self) -> Float[torch.Tensor, "prompt pos"]:  # noqa: F722
        """[prompt, pos] the main profile divided by its sum over positions."""
        p = self.profile
        return p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)

    def _coords(self) -> dict[str, Sequence[Any]]:
        return {"target": self.target_hooks}

    def _table(self) -> Table:
        """One row per (target, prompt, pos): token, norm, its share of the prompt's total
        and, when computed, the standard error and the spectral norm."""
        dims = self.AXES["norms"]
        cols: dict[str, Any] = {"token": (("prompt", "pos"), self.str_tokens), "norm": (dims, self.norms),
                                "relative": (dims, _share(self.norms))}
        cols.update({k: (dims, v) for k, v in (("stderr", self.stderr), ("spectral", self.spectral))
                     if v is not None})
        return Table(self._grid("norms"), cols)

    def summary(self) -> dict[str, Any]:
        rel = self.relative.double()
        return {"target_hook": self.target_hooks[-1], "source_hook": self.source_hook,
                "position": self.position, "method": self.method,
                "relative_first": float(rel[:, 0].mean()), "relative_last": float(rel[:, self.position].mean())}

    def plot(self, prompt: int | None = None) -> Any:
        """Norm per input position on a log scale (one line per prompt, or per target
        when there are several targets and ``prompt`` is given)."""
        fig, ax = _figure()
        T, B, N = self.norms.shape
        x = torch.arange(N)
        if T > 1 and prompt is not None:
            for t in range(T):
                ax.plot(x, self.norms[t, prompt].double().clamp_min(_TINY), label=self.target_hooks[t])
        else:
            for b in range(B) if prompt is None else [prompt]:
                y = self.profile[b].double()
                ax.plot(x, y.clamp_min(_TINY), marker=".", label=f"prompt {b}")
                if self.stderr is not None:
                    e = self.stderr[-1, b].double()
                    ax.fill_between(x, (y - 2 * e).clamp_min(_TINY), y + 2 * e, alpha=0.2)
        est = " (est.)" if self.method != "exact" else ""
        return _finish(fig, ax, "input position i", f"||d y_{self.position} / d x_i||{est}",
                       "sensitivity of the target to each input position")

    def show(self, prompt: int = 0) -> Any:
        """Relative influence of each input token as circuitsvis colored tokens."""
        from .views import colored_tokens

        return colored_tokens(self.str_tokens[prompt], self.relative[prompt], title="relative sensitivity")


def _select_at(position: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def select(y: torch.Tensor) -> torch.Tensor:
        return y[:, position].reshape(y.shape[0], -1)

    return select


def _check_method(method: str, spectral: bool, n_probes: int) -> None:
    if method not in ("exact", "hutchinson"):
        raise InputError(f"method must be 'exact' or 'hutchinson', got {method!r}.")
    if method == "hutchinson" and spectral:
        raise InputError("spectral norms need the full Jacobian: use method='exact'.")
    if method == "hutchinson" and (not isinstance(n_probes, int) or n_probes < 2):
        raise InputError(f"n_probes must be an int >= 2 (for a standard error), got {n_probes!r}.")


def _target_hooks(model: Any, target_hook: str | Sequence[str] | None, per_layer: bool) -> list[str]:
    """The target hooks in order: every ``resid_post`` first (``per_layer``), the main one last."""
    if target_hook is None:
        targets = [final_hook(model)]
    else:
        targets = [target_hook] if isinstance(target_hook, str) else list(target_hook)
    if per_layer:
        layer_targets = [f"blocks.{l}.hook_resid_post" for l in range(model.cfg.n_layers)]
        targets = layer_targets + [t for t in targets if t not in layer_targets]
    return [check_hook(model, t) for t in targets]


@renamed(target="target_hook", source="source_hook")
@extractor
def sensitivity(
    model: Any,
    tokens: Int[torch.Tensor, "batch pos"] | str | list[str],  # noqa: F722
    *,
    target_hook: str | Sequence[str] | None = None,
    per_layer: bool = False,
    position: int = -1,
    source_hook: str = "blocks.0.hook_resid_pre",
    method: Method = "exact",
    spectral: bool = False,
    n_probes: int = 32,
    seed: int = 0,
    chunk_size: int | None = None,
    max_memory_mb: float | None = None,
    progress: bool = True,
) -> Sensitivity:
    """Sensitivity of a target representation to each input position (Barbero et al. 2024).

    For each prompt and input position i, the Jacobian ``J_i = d y / d x_i`` of the target
    ``y = target_hook[:, position]`` (default: the final normalised representation of the
    last token, see :func:`final_hook`) w.r.t. the activation ``x_i`` at ``source_hook``
    (default ``blocks.0.hook_resid_pre``, i.e. the input v_i^(0) of the paper;
    ``hook_embed`` works too). ``target_hook`` may be a list of hooks; ``per_layer=True``
    adds every ``blocks.{l}.hook_resid_post`` as a target.

    ``method='exact'``: ``||J_i||_F^2 = sum_r ||e_r^T J||^2`` from one vector-Jacobian
    product per output coordinate r, batched over cotangents and over prompts (prompts
    are independent, so one cotangent serves the whole batch). ``spectral=True`` also
    keeps the full ``J_i`` and returns ``||J_i||_2``.

    ``method='hutchinson'``: ``||J_i||_F^2 = E_v ||v^T J_i||^2`` for Rademacher probes v
    (``E[v v^T] = I``); ``n_probes`` VJPs give the mean and its standard error
    ``std / sqrt(n_probes)``; the norm's error is propagated by the delta method
    (``se / (2 ||J_i||_F)``).

    Memory: both methods run one forward pass and then backward passes over chunks of
    cotangents (unit rows or probes), keeping only per-row squared norms. The chunk is
    ``chunk_size`` if given, else as many rows as fit ``max_memory_mb`` (counting the
    bytes the forward saved per row); with neither, one row per backward pass on CPU
    and the core's default bound (:data:`lensprobe.core.DEFAULT_CHUNK_MB`) on
    accelerators. The chunking never changes the result.

    Old keyword names (one release, with a DeprecationWarning): ``target`` ->
    ``target_hook``, ``source`` -> ``source_hook``.
    """
    _check_method(method, spectral, n_probes)
    toks = to_tokens(model, tokens)
    pos = _check_position(position, toks.shape[1])
    check_hook(model, source_hook)
    targets = _target_hooks(model, target_hook, per_layer)
    x0 = capture_acts(model, toks, [source_hook])[source_hook]
    check_finite(x0, f"source activation {source_hook!r}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    cs = _default_chunk(x0, chunk_size, max_memory_mb)
    norms, errs, specs = [], [], []
    for t in progress_bar(targets, progress and len(targets) > 1, "targets"):
        fn = hooked_fn(model, toks, source_hook, t, select=_select_at(pos))
        if method == "exact":
            sq, spec = _exact_rows(fn, x0, spectral, cs, max_memory_mb)
            norms.append(sq.sqrt())
            specs.append(spec)
        else:
            est, err = _hutchinson(fn, x0, n_probes, gen, cs, max_memory_mb)
            norms.append(est)
            errs.append(err)
    return Sensitivity(
        norms=check_finite(torch.stack(norms).detach().cpu(), "sensitivity norms"),
        stderr=torch.stack(errs).cpu() if errs else None,
        spectral=torch.stack(specs).cpu() if spectral else None,
        tokens=toks.cpu(),
        str_tokens=str_tokens(model, toks),
        target_hooks=tuple(targets),
        source_hook=source_hook,
        position=pos,
        method=method,
        n_probes=n_probes if method == "hutchinson" else None,
    )


def _default_chunk(x0: torch.Tensor, chunk_size: int | None, max_memory_mb: float | None) -> int | None:
    """Cotangents per backward pass, the same for both methods: ``chunk_size`` if given;
    else the core's memory bound (``max_memory_mb``, or its default on accelerators);
    on CPU with neither, 1: plain backward passes, measured as fast as batched ones
    there and with the smallest memory (one cotangent's backward on top of the forward)."""
    if chunk_size is not None or max_memory_mb is not None:
        return chunk_size
    return 1 if x0.device.type == "cpu" else None


def _out_dim(fn: Callable, x0: torch.Tensor) -> int:
    with torch.no_grad():
        return fn(x0).shape[-1]


def _exact_rows(
    fn: Callable, x0: torch.Tensor, spectral: bool, chunk_size: int | None, max_memory_mb: float | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sum over output rows of ``||e_r^T J_i||^2`` -> [B, N]; spectral norms if asked.

    One forward pass, then the d unit cotangents through the core's ``vjp_rows`` in
    chunks (see :func:`_default_chunk`), keeping only the running sum of squared norms,
    so the memory is the forward graph plus one chunk's backward. ``spectral`` keeps
    every row (the full Jacobian).
    """
    B, D = x0.shape[0], _out_dim(fn, x0)
    cot = torch.zeros(D, B, D, dtype=x0.dtype, device=x0.device)
    cot[torch.arange(D), :, torch.arange(D)] = 1
    kw = {"chunk_size": chunk_size, "max_memory_mb": max_memory_mb}
    if not spectral:
        sq = vjp_rows(fn, x0, cot, reduce=lambda g: g.pow(2).sum(-1).sum(0).double(), **kw)
        return sq.cpu(), None
    J = vjp_rows(fn, x0, cot, **kw)  # [D, B, N, d]
    sq = J.pow(2).sum(-1).sum(0).double()
    spec = torch.linalg.matrix_norm(J.permute(1, 2, 0, 3).double(), ord=2).cpu()
    return sq.cpu(), spec


def _hutchinson(
    fn: Callable, x0: torch.Tensor, n_probes: int, gen: torch.Generator, chunk_size: int | None,
    max_memory_mb: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random-probe estimate of ``||J_i||_F`` [B, N] and its standard error (delta method).

    All probes are drawn up front (k x B x d numbers), so the chunking changes the
    memory, never the probes or the estimate."""
    B, D = x0.shape[0], _out_dim(fn, x0)
    v = torch.randint(0, 2, (n_probes, B, D), generator=gen).to(x0.dtype) * 2 - 1
    per_probe = vjp_rows(fn, x0, v.to(x0.device), chunk_size=chunk_size, max_memory_mb=max_memory_mb,
                         per_row=lambda g: g.pow(2).sum(-1).double())  # [k, B, N]
    se_sq = per_probe.std(0, unbiased=True) / math.sqrt(n_probes)
    est = per_probe.mean(0).sqrt()
    return est, se_sq / (2 * est.clamp_min(_TINY))


# --------------------------------------------------------------------------- path bound
@dataclass(frozen=True)
class PathBound(Result):
    """The over-squashing bound of Barbero et al. (2024), Theorem 5.1, per input position.

    bound:    [prompt, pos] ``[prod_l M^(l)]_{n,i}`` with ``M^(l) = Abar^(l) + I`` (or
              ``(Abar^(l) + I) / 2`` with ``normalise=True``), heads averaged or summed;
              [head, prompt, pos] with ``reduce_heads='none'``.
    measured: [prompt, pos] the measured sensitivity profile (exact Frobenius norms), or None.
    spearman: [prompt] rank correlation of measured vs bound over positions 0..n (or None).
    ratio:    [prompt, pos] measured / bound (or None); NaN where the bound is 0 (no path,
              e.g. positions after n in a causal model).
    tokens:   [prompt, pos] the input ids (None when computed from a cache alone);
              ``str_tokens`` their strings.
    """

    AXES: ClassVar = {"bound": ("prompt", "pos"), "measured": ("prompt", "pos"),
                      "spearman": ("prompt",), "ratio": ("prompt", "pos"), "tokens": ("prompt", "pos")}
    TITLE: ClassVar = "Theorem 5.1 path bound"

    bound: torch.Tensor
    measured: torch.Tensor | None
    spearman: torch.Tensor | None
    ratio: torch.Tensor | None
    tokens: torch.Tensor | None
    str_tokens: list[list[str]] | None
    position: int
    reduce_heads: str
    normalise: bool
    beta: float

    @property
    def axes(self) -> dict[str, tuple[str, ...]]:
        if self.reduce_heads == "none":
            return dict(self.AXES, bound=("head", "prompt", "pos"))
        return dict(self.AXES)

    @property
    def per_head(self) -> Float[torch.Tensor, "head prompt pos"]:  # noqa: F722
        """[head, prompt, pos] the bound with a head axis (of size 1 unless ``reduce_heads='none'``)."""
        return self.bound if self.reduce_heads == "none" else self.bound.unsqueeze(0)

    def _table(self) -> Table:
        """One row per (head, prompt, position): token, bound and, for averaged or summed
        heads, the measured sensitivity and their ratio (``head`` is the mode then)."""
        each = self.reduce_heads == "none"
        bound = self.per_head
        cols: dict[str, Any] = {"bound": (("head", "prompt", "pos"), bound)}
        if self.str_tokens is not None:
            cols = {"token": (("prompt", "pos"), self.str_tokens), **cols}
        if self.measured is not None and not each:
            cols.update(measured=(("prompt", "pos"), self.measured), ratio=(("prompt", "pos"), self.ratio))
        heads = range(bound.shape[0]) if each else [self.reduce_heads]
        return Table({"head": heads, "prompt": range(bound.shape[1]), "pos": range(bound.shape[2])}, cols)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"position": self.position, "reduce_heads": self.reduce_heads}
        if self.spearman is not None:
            out["mean_spearman"] = float(self.spearman.mean())
        return out

    def plot(self, prompt: int = 0) -> Any:
        """Bound and measured sensitivity, each divided by its sum, on a log scale."""
        fig, ax = _figure()
        n = self.position + 1
        x = torch.arange(n)
        each = self.reduce_heads == "none"
        for h, bnd in enumerate(self.per_head[:, prompt]):
            ax.plot(x, _share(bnd[:n]).clamp_min(_TINY), label=f"bound, head {h}" if each else "path bound")
        if self.measured is not None:
            rho = float(self.spearman[prompt])
            ax.plot(x, _share(self.measured[prompt, :n]).clamp_min(_TINY), "k.-",
                    label=f"measured (Spearman {rho:.2f})")
        return _finish(fig, ax, "input position i", "share of total (log)",
                       "Theorem 5.1 path bound vs measured sensitivity")

    def show(self, prompt: int = 0) -> Any:
        from .views import colored_tokens

        bnd = self.per_head[:, prompt].mean(0)
        labels = self.str_tokens[prompt] if self.str_tokens is not None else [str(i) for i in range(len(bnd))]
        return colored_tokens(labels, bnd / bnd.sum(), title="path bound")


def _path_profile(mats: list[torch.Tensor], position: int) -> torch.Tensor:
    """Row ``position`` of ``M^(L-1) ... M^(0)`` for batched [..., n, n] matrices."""
    row = mats[-1][..., position, :]
    for M in reversed(mats[:-1]):
        row = torch.einsum("...k,...ki->...i", row, M)
    return row


def _reduce_heads(reduce_heads: str) -> str:
    """The reduction over heads, checked; the old value ``'each'`` reads as ``'none'``."""
    if reduce_heads == "each":
        warnings.warn("path_bound(reduce_heads='each') is now reduce_heads='none'; the old value will be"
                      " removed in lensprobe 0.3.", DeprecationWarning, stacklevel=5)
        return "none"
    if reduce_heads not in ("mean", "sum", "none"):
        raise InputError(f"reduce_heads must be 'mean', 'sum' or 'none', got {reduce_heads!r}.")
    return reduce_heads


def _layer_matrix(A: torch.Tensor, reduce_heads: str, beta: float, normalise: bool) -> torch.Tensor:
    """``M = A / beta + I`` (halved with ``normalise``) from a pattern [B, H, n, n]:
    [B, n, n] for the mean or sum over heads, [H, B, n, n] for each head."""
    A = A.double().cpu()
    A = {"mean": lambda: A.mean(1), "sum": lambda: A.sum(1), "none": lambda: A.transpose(0, 1)}[reduce_heads]()
    M = A / beta + torch.eye(A.shape[-1], dtype=A.dtype)
    return M / 2 if normalise else M


def _compare(
    model: Any, toks: torch.Tensor | None, bound: torch.Tensor, pos: int, reduce_heads: str,
    sens: Sensitivity | None, progress: bool, sensitivity_kwargs: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(measured, spearman, ratio) of the bound against the exact sensitivity at ``pos``."""
    if sens is None:
        if toks is None:
            raise InputError("compare=True measures the sensitivity, which needs tokens: pass tokens="
                             " with cache=, or sensitivity_result=, or compare=False.")
        sens = sensitivity(model, toks, position=pos, progress=progress, **sensitivity_kwargs)
    if sens.position != pos or sens.profile.shape != bound.shape[-2:]:
        raise InputError(
            "sensitivity_result was computed for another position or input; pass the"
            " same tokens and position, or leave it None to measure here."
        )
    measured = sens.profile.double()
    ref = bound.mean(0) if reduce_heads == "none" else bound
    nan = torch.full_like(ref, float("nan"))
    ratio = torch.where(ref > 0, measured / ref.where(ref > 0, torch.ones_like(ref)), nan)
    spearman = torch.tensor(
        [_spearman(measured[b, : pos + 1], ref[b, : pos + 1]) for b in range(ref.shape[0])], dtype=torch.float64
    )
    return measured, spearman, ratio


@renamed(heads="reduce_heads")
@extractor
def path_bound(
    model: Any,
    tokens: Int[torch.Tensor, "batch pos"] | str | list[str] | None = None,  # noqa: F722
    *,
    cache: Any = None,
    position: int = -1,
    reduce_heads: ReduceHeads = "mean",
    normalise: bool = False,
    beta: float = 1.0,
    compare: bool = True,
    sensitivity_result: Sensitivity | None = None,
    progress: bool = True,
    **sensitivity_kwargs: Any,
) -> PathBound:
    """The Theorem 5.1 bound profile from the model's own attention (Barbero et al. 2024).

    ``||d y_n / d v_i^(0)|| <= C [prod_l (Abar^(l) + I)]_{n,i}`` with ``Abar^(l) = A^(l) /
    beta``: the product runs from the last layer (left) to the first (right), so the
    entry counts causal paths from input i to position n, weighted by attention.
    ``A^(l)`` is the layer's pattern ``blocks.{l}.attn.hook_pattern`` averaged over heads
    (``reduce_heads='mean'``), summed (``'sum'``: each head is a separate path), or taken
    one head index at a time (``'none'``: ``A^(l,h)`` in every layer, a per-head
    diagnostic). ``normalise=True`` uses the paper's ``(Abar + I) / 2`` (their Prop.
    B.8). ``beta`` summarises the normalisation layers (the paper leaves it
    model-specific; a scale only changes the ratio, never the rank correlation when
    ``normalise=False`` and all layers share it).

    The patterns come from a forward pass on ``tokens``, or from ``cache`` (a
    TransformerLens ``ActivationCache`` holding every layer's ``attn.hook_pattern``, e.g.
    from ``model.run_with_cache(tokens)``); ``tokens``, when given with a cache, still
    give the token strings and the measured sensitivity.

    With ``compare=True`` the exact sensitivity of the final representation at the same
    position is measured (or ``sensitivity_result`` reused) and the result holds the
    Spearman correlation over positions 0..n and the ratio measured/bound.

    Old names (one release, with a DeprecationWarning): ``heads=`` -> ``reduce_heads=``,
    the value ``'each'`` -> ``'none'``.
    """
    reduce_heads = _reduce_heads(reduce_heads)
    if not beta > 0:
        raise InputError(f"beta must be positive, got {beta!r}.")
    toks = None if tokens is None else to_tokens(model, tokens)
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(model.cfg.n_layers)]
    acts = activations(model, toks, names, cache=cache)
    first = acts[names[0]]
    if toks is not None and (first.shape[0], first.shape[-1]) != tuple(toks.shape):
        raise InputError(f"the cache holds patterns of {first.shape[0]} prompts x {first.shape[-1]} positions,"
                         f" the tokens are {tuple(toks.shape)}: pass the tokens the cache was computed on.")
    pos = _check_position(position, first.shape[-1])
    mats = [_layer_matrix(check_finite(acts[n], f"attention pattern {n!r}"), reduce_heads, beta, normalise)
            for n in names]
    bound = _path_profile(mats, pos)
    measured = spearman = ratio = None
    if compare:
        measured, spearman, ratio = _compare(model, toks, bound, pos, reduce_heads, sensitivity_result,
                                             progress, sensitivity_kwargs)
    return PathBound(
        bound=bound,
        measured=measured,
        spearman=spearman,
        ratio=ratio,
        tokens=None if toks is None else toks.cpu(),
        str_tokens=None if toks is None else str_tokens(model, toks),
        position=pos,
        reduce_heads=reduce_heads,
        normalise=normalise,
        beta=float(beta),
    )


# --------------------------------------------------------------------------- collapse pairs
def _pair_items(kind: str, n: int, one: int, zero: int, prefix: Sequence[int] | None,
                final: int | None) -> tuple[list[int], list[int]]:
    """The two item sequences of a pair of kind ``kind`` with ``n`` items."""
    if kind == "repeat_last":
        if prefix is None or len(prefix) < n - 1:
            raise InputError("pair 'repeat_last' needs a prefix of at least n - 1 tokens.")
        p, f = list(prefix[: n - 1]), one if final is None else final
        return p + [f], p + [f, f]
    builders = {
        "ones": lambda: ([one] * n, [one] * (n + 1)),
        "ones_zero": lambda: ([one] * n + [zero], [one] * (n + 1) + [zero]),
        "change_last": lambda: ([one] * n, [one] * (n - 1) + [zero]),
    }
    if kind not in builders:
        raise InputError(f"unknown pair {kind!r}; choose one of {PAIRS} or pass a callable.")
    return builders[kind]()


def _check_separator(separator: int | None, every: int | None) -> None:
    if separator is not None and (not isinstance(every, int) or every < 1):
        raise InputError(f"separator needs every=<positive int>, got every={every!r}.")


def pair_sequences(
    pair: PairKind,
    n: int,
    *,
    one: int = 1,
    zero: int = 0,
    bos: int | None = None,
    separator: int | None = None,
    every: int | None = None,
    prefix: Sequence[int] | None = None,
    final: int | None = None,
) -> tuple[list[int], list[int]]:
    """The two token sequences of a collapse pair with ``n`` items (Barbero et al. 2024).

    * ``'repeat_last'``: ``prefix[:n-1] + [a]`` vs ``prefix[:n-1] + [a, a]`` (the final
      token ``a = final``, default ``one``, repeated; ``prefix`` is any token sequence);
    * ``'ones'``: ``1^n`` vs ``1^(n+1)``;
    * ``'ones_zero'``: ``1^n 0`` vs ``1^(n+1) 0``;
    * ``'change_last'`` (negative control): ``1^n`` vs ``1^(n-1) 0``.

    ``separator`` is inserted after every ``every`` items (never at the end), then ``bos``
    (if given) is prepended to both; so ``pair='ones', bos=B`` is BOS + 1^n vs BOS + 1^(n+1).
    """
    if not isinstance(n, int) or n < 1:
        raise InputError(f"pair length n must be a positive int, got {n!r}.")
    a, b = _pair_items(pair, n, one, zero, prefix, final)
    if separator is not None:
        _check_separator(separator, every)
        a, b = insert_separators(a, separator, every), insert_separators(b, separator, every)
    head = [] if bos is None else [bos]
    return head + a, head + b


@dataclass(frozen=True)
class CollapsePair:
    """A collapse pair: how :func:`pair_sequences` builds the two sequences for each n.

    kind:      'repeat_last', 'ones', 'ones_zero' or 'change_last' (see :func:`pair_sequences`).
    one, zero: the item tokens; ``final`` the repeated last token of 'repeat_last'
               (default ``one``).
    bos:       a token prepended to both sequences, or None.
    separator, every: a separator token after every ``every`` items, or None.
    prefix:    the prefix of 'repeat_last': 'random' (uniform tokens drawn with ``seed``),
               'ones' (``one`` repeated) or a token list.
    """

    kind: PairKind = "repeat_last"
    one: int = 1
    zero: int = 0
    bos: int | None = None
    separator: int | None = None
    every: int | None = None
    prefix: str | Sequence[int] = "random"
    final: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in PAIRS:
            raise InputError(f"unknown pair {self.kind!r}; choose one of {PAIRS} or pass a callable.")
        if isinstance(self.prefix, str) and self.prefix not in ("random", "ones"):
            raise InputError(f"prefix must be 'random', 'ones' or a token list, got {self.prefix!r}.")
        _check_separator(self.separator, self.every)

    def prefix_tokens(self, d_vocab: int, n_ctx: int) -> list[int]:
        """The prefix as ``n_ctx + 1`` token ids (a token list is used as given)."""
        if self.prefix == "random":
            gen = torch.Generator().manual_seed(self.seed)
            return torch.randint(0, d_vocab, (n_ctx + 1,), generator=gen).tolist()
        if self.prefix == "ones":
            return [self.one] * (n_ctx + 1)
        return list(self.prefix)

    def maker(self, d_vocab: int, n_ctx: int) -> Callable[[int], tuple[list[int], list[int]]]:
        """``n -> (v, v*)`` for a model with vocabulary ``d_vocab`` and context ``n_ctx``."""
        prefix = self.prefix_tokens(d_vocab, n_ctx)
        kw = {k: getattr(self, k) for k in ("one", "zero", "bos", "separator", "every", "final")}
        return lambda n: pair_sequences(self.kind, n, prefix=prefix, **kw)


_PAIR_FIELDS = tuple(f.name for f in dataclasses.fields(CollapsePair) if f.name != "kind")


def _pair_maker(model: Any, pair: Any, options: dict[str, Any]) -> tuple[str, Callable]:
    """(the pair's name, ``n -> (v, v*)``) from a kind, a :class:`CollapsePair` (updated by
    ``options``, its fields) or a callable."""
    unknown = sorted(set(options) - set(_PAIR_FIELDS))
    if unknown:
        raise InputError(f"collapse_curve got unknown keywords {unknown}; the pair's options are {_PAIR_FIELDS}.")
    if callable(pair) and not isinstance(pair, CollapsePair):
        if options:
            raise InputError(f"the options {sorted(options)} describe a CollapsePair; a callable pair takes none.")

        def make(n: int) -> tuple[list[int], list[int]]:
            a, b = pair(n)
            return list(a), list(b)

        return getattr(pair, "__name__", "custom"), make
    spec = dataclasses.replace(pair, **options) if isinstance(pair, CollapsePair) else CollapsePair(pair, **options)
    return spec.kind, spec.maker(model.cfg.d_vocab, model.cfg.n_ctx)


def _pairs(model: Any, make: Callable, lengths: Sequence[int] | None) -> tuple[list[int], list[tuple[list[int], list[int]]]]:
    """The swept lengths (default: the powers of two that fit n_ctx) and their checked pairs."""
    n_ctx, d_vocab = model.cfg.n_ctx, model.cfg.d_vocab

    def fits(n: int) -> bool:
        try:
            return max(map(len, make(n))) <= n_ctx
        except InputError:
            return False

    if lengths is None:
        lengths = [2**k for k in range(1, 20) if fits(2**k)]
        if not lengths:
            raise InputError(f"no pair length fits the model's n_ctx={n_ctx}.")
    lengths = sorted(set(index_list(lengths, "lengths", "lengths=[2, 4, 8, 16]")))
    if lengths[0] < 1:
        raise InputError(f"lengths must be positive item counts n >= 1, got {lengths[0]}.")
    pairs = [make(n) for n in lengths]
    for n, (a, b) in zip(lengths, pairs):
        if max(len(a), len(b)) > n_ctx:
            raise InputError(
                f"length n={n} gives sequences of {max(len(a), len(b))} tokens, more than"
                f" the model's n_ctx={n_ctx}; use lengths with n + extras <= n_ctx."
            )
        bad = [t for t in a + b if not 0 <= t < d_vocab]
        if bad:
            raise InputError(f"token id {bad[0]} is outside the vocabulary [0, {d_vocab}).")
    return lengths, pairs


def _distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[G, *] x [G, *] -> [G, 3] (L1, L2, Linf) computed in float64."""
    diff = (u.double() - v.double()).reshape(u.shape[0], -1).abs()
    return torch.stack([diff.sum(-1), diff.pow(2).sum(-1).sqrt(), diff.amax(-1)], -1)


def _groups(act: torch.Tensor) -> torch.Tensor:
    """A last-token activation as [groups, features]: per-head tensors [H, d_head] keep
    their heads, anything else is one group."""
    return act if act.ndim == 2 else act.reshape(1, -1)


# --------------------------------------------------------------------------- collapse results
def _by_group(per_hook: dict[str, torch.Tensor]) -> torch.Tensor:
    """hook -> [length, group, ...] as [groups of every hook in turn, length, ...]."""
    return torch.cat([t.transpose(0, 1) for t in per_hook.values()])


def _collapse_table(lengths: torch.Tensor, runs: dict[str, tuple[dict, dict | None]]) -> Table:
    """One row per (dtype, hook, head, n) of collapse runs ``dtype -> (distances,
    identical or None)``: the three distances and the fraction of bit-identical
    coordinates. ``group`` numbers the (hook, head) pairs; ``head`` is None for hooks
    without heads."""
    first = next(iter(runs.values()))[0]
    hooks = [h for h, d in first.items() for _ in range(d.shape[1])]
    heads = [g if d.shape[1] > 1 else None for d in first.values() for g in range(d.shape[1])]
    dims = ("dtype", "group", "n")
    dist = torch.stack([_by_group(d) for d, _ in runs.values()])  # [dtype, group, n, 3]
    cols: dict[str, Any] = {"hook": (("group",), hooks), "head": (("group",), heads),
                            **{m: (dims, dist[..., k]) for k, m in enumerate(METRICS)}}
    if any(ident is not None for _, ident in runs.values()):
        nan = torch.full(dist.shape[1:3], float("nan"), dtype=torch.float64)
        cols["identical_fraction"] = (dims, torch.stack([nan if i is None else _by_group(i) for _, i in runs.values()]))
    return Table({"dtype": list(runs), "group": range(len(hooks)), "n": lengths.tolist()}, cols)


@dataclass(frozen=True)
class PrecisionRun(Result):
    """One low-precision run of a collapse sweep (the model cast to ``dtype``).

    lengths:   [length] the item counts n of the sweep.
    distances: hook -> [length, group, metric] (L1, L2, Linf of the low-precision outputs;
               group = 1, or the heads of a per-head hook).
    identical: hook -> [length, group] fraction of coordinates that are bit-identical.
    top_same:  [length] bool, both sequences get the same top predicted token.
    top_matches_reference: [length, sequence] bool, each sequence's top token equals the
               reference-precision top token.
    """

    AXES: ClassVar = {"lengths": ("length",), "top_same": ("length",),
                      "top_matches_reference": ("length", "sequence")}
    TITLE: ClassVar = "low-precision collapse run"

    dtype: str
    lengths: torch.Tensor
    distances: dict[str, torch.Tensor]
    identical: dict[str, torch.Tensor]
    top_same: torch.Tensor
    top_matches_reference: torch.Tensor

    def _table(self) -> Table:
        return _collapse_table(self.lengths, {self.dtype: (self.distances, self.identical)})

    def summary(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "top_same_fraction": float(self.top_same.double().mean()),
                "top_matches_reference_fraction": float(self.top_matches_reference.double().mean()),
                "identical_fraction_at_longest": float(torch.stack(
                    [i[-1].mean() for i in self.identical.values()]).mean())}

    def plot(self) -> Any:
        """The fraction of bit-identical coordinates of the pair's last tokens vs n (head
        mean per hook) and whether the two top tokens agree: where the format collapses."""
        fig, ax = _figure()
        n = self.lengths.double()
        for hook, ident in self.identical.items():
            ax.plot(n, ident.mean(-1), "o-", label=hook)
        ax.plot(n, self.top_same.double(), "k^:", label="same top token (1 = yes)")
        ax.set_ylim(-0.05, 1.05)
        return _finish(fig, ax, "n (items)", "fraction of bit-identical coordinates",
                       f"{self.dtype} run: collapse of the pair's last tokens", logx=True, logy=False)


@dataclass(frozen=True)
class CollapseCurve(Result):
    """Representational collapse over lengths (Barbero et al. 2024, Theorem 4.2 / B.3).

    lengths:   [length] item counts n of the sweep.
    seq_lengths: [length, sequence] token lengths of the two sequences.
    distances: hook -> [length, group, metric] reference-precision distances between the
               last-token activations of the two sequences (group = 1, or the heads for
               per-head hooks such as ``attn.hook_z``); metric order ``METRICS`` = (l1, l2, linf).
    top_same:  [length] bool, the reference model predicts the same top token for both.
    low:       dtype name -> :class:`PrecisionRun`.
    slopes:    hook -> {metric: log-log slope of the (head-mean) distance vs n}.
    thresholds: dtype name -> n*, the smallest swept n from which on the reference curve
               (``threshold_hook``, ``threshold_metric``) stays below that dtype's machine
               epsilon; NaN if the sweep never gets there.
    thresholds_fit: dtype name -> n* extrapolated from the power-law fit
               ``d = C n^slope`` (NaN when the curve does not decay).
    """

    AXES: ClassVar = {"lengths": ("length",), "seq_lengths": ("length", "sequence"), "top_same": ("length",)}
    TITLE: ClassVar = "representational collapse"

    pair: str
    lengths: torch.Tensor
    seq_lengths: torch.Tensor
    hooks: tuple[str, ...]
    distances: dict[str, torch.Tensor]
    top_same: torch.Tensor
    low: dict[str, PrecisionRun]
    slopes: dict[str, dict[str, float]]
    thresholds: dict[str, float]
    thresholds_fit: dict[str, float]
    threshold_hook: str
    threshold_metric: str
    reference_dtype: str
    eps: dict[str, float] = field(default_factory=lambda: dict(_EPS))

    def distance(self, hook: str | None = None, metric: Metric = "linf",
                 stat: Literal["mean", "min", "max"] = "mean") -> Float[torch.Tensor, " length"]:  # noqa: F722
        """[length] distances at ``hook``; for per-head hooks ``stat`` is mean, min or max over heads."""
        d = self.distances[hook or self.threshold_hook][..., METRICS.index(metric)]
        return {"mean": d.mean(-1), "min": d.amin(-1), "max": d.amax(-1)}[stat]

    def slope(self, hook: str | None = None, metric: Metric = "linf") -> float:
        return self.slopes[hook or self.threshold_hook][metric]

    def _table(self) -> Table:
        """One row per (dtype, hook, head, n): the reference run, then each low-precision run."""
        runs = {self.reference_dtype: (self.distances, None),
                **{k: (r.distances, r.identical) for k, r in self.low.items()}}
        return _collapse_table(self.lengths, runs)

    def summary(self) -> dict[str, Any]:
        return {"pair": self.pair, "threshold_hook": self.threshold_hook, "metric": self.threshold_metric,
                "slope": self.slope(metric=self.threshold_metric),
                **{f"n* {k} (sweep)": v for k, v in self.thresholds.items()},
                **{f"n* {k} (fit)": v for k, v in self.thresholds_fit.items()}}

    def plot(self, hook: str | None = None, metric: Metric = "linf") -> Any:
        """Log-log distance vs n (head mean with min-max band for per-head hooks), the
        low-precision runs, and the bf16 / fp16 / fp32 machine-epsilon lines."""
        hook = hook or self.threshold_hook
        fig, ax = _figure()
        n = self.lengths.double()
        mean = self.distance(hook, metric, "mean").clamp_min(_TINY)
        ax.plot(n, mean, "o-", label=f"{self.reference_dtype} (slope {self.slope(hook, metric):.2f})")
        if self.distances[hook].shape[1] > 1:
            ax.fill_between(n, self.distance(hook, metric, "min").clamp_min(_TINY),
                            self.distance(hook, metric, "max"), alpha=0.2, label="min-max over heads")
        k = METRICS.index(metric)
        for name, run in self.low.items():
            ax.plot(n, run.distances[hook][..., k].mean(-1).clamp_min(_TINY), "x--", label=f"{name} run")
        for name, eps in self.eps.items():
            ax.axhline(eps, lw=0.8, ls=":", color="gray")
            ax.text(n[0], eps, f" {name} eps", va="bottom", fontsize=7, color="gray")
        return _finish(fig, ax, "n (items)", f"{metric} distance at {hook}",
                       f"representational collapse: pair '{self.pair}'", logx=True)

    def show(self, **kw: Any) -> Any:
        """The plot, the summary and the thresholds table (format, eps, n* from the sweep and the fit)."""
        import pandas as pd

        from .views import figure_view, table_html

        df = pd.DataFrame({"format": list(self.thresholds), "eps": [self.eps[k] for k in self.thresholds],
                           "n* (sweep)": list(self.thresholds.values()),
                           "n* (fit)": [self.thresholds_fit[k] for k in self.thresholds]})
        return figure_view(self.plot(**kw), f"collapse: {self.pair}", self.summary(), extra_html=table_html(df))


# --------------------------------------------------------------------------- collapse sweep
def _loglog_slope(n: torch.Tensor, d: torch.Tensor) -> tuple[float, float]:
    """Least-squares fit ``log d = a + s log n`` over the positive points -> (s, a)."""
    keep = d > 0
    if int(keep.sum()) < 2:
        return float("nan"), float("nan")
    x, y = n[keep].double().log(), d[keep].double().log()
    xm, ym = x.mean(), y.mean()
    s = ((x - xm) * (y - ym)).sum() / (x - xm).pow(2).sum()
    return float(s), float(ym - s * xm)


def _threshold(n: torch.Tensor, d: torch.Tensor, eps: float) -> float:
    above = (d >= eps).nonzero()
    if len(above) == 0:
        return float(n[0])
    j = int(above[-1])
    return float("nan") if j == len(n) - 1 else float(n[j + 1])


def _fit_threshold(slope: float, intercept: float, eps: float) -> float:
    """n solving ``intercept + slope * log n = log eps``; NaN unless the fit decays."""
    if not slope < 0:
        return float("nan")
    log_n = (math.log(eps) - intercept) / slope
    return math.exp(log_n) if log_n < 700 else float("inf")


def _fits(n: torch.Tensor, distances: dict[str, torch.Tensor], hook: str, metric: str, fit_min: int) -> tuple:
    """(slopes per hook and metric, n* from the sweep, n* from the fit) of the reference curves."""
    fit = n >= fit_min
    slopes = {h: {m: _loglog_slope(n[fit], d[fit][..., k].mean(-1))[0] for k, m in enumerate(METRICS)}
              for h, d in distances.items()}
    curve = distances[hook][..., METRICS.index(metric)].mean(-1)
    s, a = _loglog_slope(n[fit], curve[fit])
    return (slopes, {k: _threshold(n, curve, e) for k, e in _EPS.items()},
            {k: _fit_threshold(s, a, e) for k, e in _EPS.items()})


def _plan_runs(seqs: list[list[int]], causal: bool) -> tuple[list[list[int]], list[int]]:
    """Group sequences so each is the prefix of one run (causal models only).

    A causal model's activations at positions < m do not depend on tokens at >= m, so a
    sequence that is a prefix of a longer one is read off that one's forward pass.
    Returns the runs and, for each sequence, the index of its run.
    """
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    runs: list[list[int]] = []
    where = [0] * len(seqs)
    for i in order:
        s = seqs[i]
        for r, run in enumerate(runs):
            if causal and run[: len(s)] == s or run == s:
                where[i] = r
                break
        else:
            runs.append(s)
            where[i] = len(runs) - 1
    return runs, where


def _last_token_acts(
    model: Any, seqs: list[list[int]], hooks: list[str], causal: bool, progress: bool, desc: str,
) -> tuple[dict[str, list[torch.Tensor]], list[int]]:
    """For each sequence: the activation of its last token at each hook, and its top token."""
    runs, where = _plan_runs(seqs, causal)
    acts: dict[str, list[torch.Tensor]] = {h: [None] * len(seqs) for h in hooks}  # type: ignore
    top: list[int] = [0] * len(seqs)
    device = next(model.parameters()).device
    for r in progress_bar(range(len(runs)), progress, desc, total=len(runs)):
        toks = torch.tensor([runs[r]], dtype=torch.long, device=device)
        with torch.no_grad():
            out = run_hooked(model, toks, hooks, stop_early=False)
        logits = out["logits"]
        members = [i for i, w in enumerate(where) if w == r]
        for i in members:
            p = len(seqs[i]) - 1
            for h in hooks:
                acts[h][i] = out[h][0, p].detach().cpu().clone()
            top[i] = int(logits[0, p].argmax())
        del out, logits
    return acts, top


def _sweep(
    model: Any, seqs: list[list[int]], hooks: list[str], dtype: str, progress: bool,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """All pairs ``seqs = [v_0, v*_0, v_1, v*_1, ...]`` with the model cast to ``dtype``:
    per hook the distances [length, group, metric] and the bit-identical fractions
    [length, group] of the pairs' last-token activations, and the top tokens [length, 2].
    The one sweep of the reference and of every low-precision run."""
    causal = getattr(model.cfg, "attention_dir", "causal") == "causal"
    with cast(model, _DTYPES[dtype]):
        acts, top = _last_token_acts(model, seqs, hooks, causal, progress, f"collapse ({dtype})")
    dist, ident = {}, {}
    for h in hooks:
        pairs = [(_groups(u), _groups(v)) for u, v in zip(acts[h][0::2], acts[h][1::2])]
        dist[h] = torch.stack([_distances(u, v) for u, v in pairs])
        ident[h] = torch.stack([(u == v).double().mean(-1) for u, v in pairs])
    return dist, ident, torch.tensor(top).reshape(-1, 2)


def _collapse_hooks(model: Any, hooks: Sequence[str] | None, per_head: bool, threshold_hook: str | None) -> tuple:
    """(the checked hooks, the threshold hook): by default the last layer's resid_post, the
    final representation and (``per_head``) the last layer's ``attn.hook_z``."""
    fhook, L = final_hook(model), model.cfg.n_layers
    if hooks is None:
        hooks = [f"blocks.{L - 1}.hook_resid_post", fhook] + ([f"blocks.{L - 1}.attn.hook_z"] if per_head else [])
    hooks = [check_hook(model, h) for h in dict.fromkeys(hooks)]
    threshold_hook = threshold_hook or fhook
    if threshold_hook not in hooks:
        raise InputError(f"threshold_hook {threshold_hook!r} must be one of hooks {hooks}.")
    return hooks, threshold_hook


@extractor
def collapse_curve(
    model: Any,
    pair: PairKind | CollapsePair | Callable[[int], tuple[Sequence[int], Sequence[int]]] = "repeat_last",
    lengths: Sequence[int] | None = None,
    *,
    hooks: Sequence[str] | None = None,
    per_head: bool = True,
    precisions: Sequence[DType] = ("bfloat16", "float16"),
    reference_dtype: DType = torch.float64,
    threshold_hook: str | None = None,
    threshold_metric: Metric = "linf",
    fit_min: int = 1,
    progress: bool = True,
    **pair_options: Any,
) -> CollapseCurve:
    """Representational collapse curves (Barbero et al. 2024, Theorem 4.2 / B.3).

    For every n in ``lengths`` the pair ``(v, v*)`` is run: ``pair`` is a kind
    ('repeat_last', 'ones', 'ones_zero', 'change_last') with the :class:`CollapsePair`
    fields as keywords (``one``, ``zero``, ``bos``, ``separator``, ``every``,
    ``prefix``, ``final``, ``seed``: ``collapse_curve(model, "ones", bos=2)``), a
    :class:`CollapsePair`, or a callable ``n -> (v, v*)``. The distance between the LAST-token
    activations ``||h(v)_last - h(v*)_last||_p`` (p = 1, 2, inf) is taken at each hook:
    by default the final layer's ``hook_resid_post`` and the final normalised
    representation, plus (``per_head``) the last layer's per-head ``attn.hook_z`` whose
    per-head distances are summarised by mean, min and max over heads.

    The reference runs in ``reference_dtype`` (float64); each dtype in ``precisions`` (a
    ``torch.dtype`` or its name) runs the model cast to it (cast in place for the run and
    restored bit for bit afterwards, see :func:`lensprobe.core.cast`) and records the
    fraction of bit-identical coordinates of the two last-token activations and whether
    the top predicted token agrees. ``thresholds[dtype]`` is the length n* where the
    reference curve (``threshold_hook``, ``threshold_metric``, head mean) falls below that
    dtype's machine epsilon (bf16 2^-7, fp16 2^-10, fp32 2^-23), as the paper reads it
    off; ``slopes`` are least-squares log-log slopes over lengths >= ``fit_min``.

    For ``'repeat_last'`` the prefix is ``'random'`` (uniform tokens drawn with ``seed``),
    ``'ones'`` (``one`` repeated: pair with ``final=zero``) or a token list. With rotary
    positions and a random prefix the repeated token shifts every prefix token's relative
    distance by one; random rotary weights give a positional signal that does not decay
    (the paper's Theorem B.3 assumes it does), and the curve falls like ``n^-1/2`` or not
    at all depending on the seed; a constant prefix gives the clean ``n^-1``.

    One sequence is run at a time under ``torch.no_grad``; on a causal model a sequence
    that is a prefix of another (``1^n`` of ``1^(n+1)``) is read from the longer one's
    forward pass, so the whole ``'ones'`` sweep costs a single forward per precision.
    """
    if threshold_metric not in METRICS:
        raise InputError(f"threshold_metric must be one of {METRICS}, got {threshold_metric!r}.")
    low_dtypes = [_dtype_name(p, "precision") for p in precisions]
    ref_dtype = _dtype_name(reference_dtype, "reference_dtype")
    hooks, threshold_hook = _collapse_hooks(model, hooks, per_head, threshold_hook)
    pair_name, make = _pair_maker(model, pair, pair_options)
    lengths, pairs = _pairs(model, make, lengths)
    seqs = [s for ab in pairs for s in ab]
    distances, _, top = _sweep(model, seqs, hooks, ref_dtype, progress)
    for h, d in distances.items():
        check_finite(d, f"collapse distances at {h!r}")
    n_t = torch.tensor(lengths)
    low = {}
    for name in low_dtypes:
        ldist, ident, ltop = _sweep(model, seqs, hooks, name, progress)
        # a copy of the lengths: a result file stores each tensor once (no shared storage)
        low[name] = PrecisionRun(dtype=name, lengths=n_t.clone(), distances=ldist, identical=ident,
                                 top_same=ltop[:, 0] == ltop[:, 1], top_matches_reference=ltop == top)
    slopes, thresholds, thresholds_fit = _fits(n_t, distances, threshold_hook, threshold_metric, fit_min)
    return CollapseCurve(
        pair=pair_name,
        lengths=n_t,
        seq_lengths=torch.tensor([[len(a), len(b)] for a, b in pairs]),
        hooks=tuple(hooks),
        distances=distances,
        top_same=top[:, 0] == top[:, 1],
        low=low,
        slopes=slopes,
        thresholds=thresholds,
        thresholds_fit=thresholds_fit,
        threshold_hook=threshold_hook,
        threshold_metric=threshold_metric,
        reference_dtype=ref_dtype,
    )
