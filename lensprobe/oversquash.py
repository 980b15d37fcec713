"""Over-squashing and representational collapse (Barbero et al., "Transformers need glasses!
Information over-squashing in language tasks", NeurIPS 2024, arXiv 2406.04267).

Three instruments:

* :func:`sensitivity` -- the norm of ``d y_n / d x_i`` (target representation at one
  position w.r.t. the source representation of every input position ``i``): exact
  Frobenius norm from ``d_out`` vector-Jacobian products (optionally the spectral norm),
  or a Hutchinson-style random-probe estimate with its standard error. The paper bounds
  this quantity (their Theorem 5.1) but never measures it; lensprobe does.
* :func:`path_bound` -- the Theorem 5.1 profile ``[prod_l (Abar^(l) + I)]_{n,i}`` from the
  model's own attention patterns, and its agreement with the measured sensitivity.
* :func:`collapse_curve` -- representational collapse (their Theorem 4.2 / B.3): the
  distance between the last-token representations of two sequences that differ by one
  repeated token, over a sweep of lengths, in float64 and in bf16/fp16, with the
  log-log slope and the lengths ``n*`` where it falls below machine epsilon.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import torch

from ._tl import final_hook
from .core import (
    capture_acts,
    cast,
    guard,
    hooked_fn,
    progress_bar,
    run_hooked,
    vjp_rows,
)
from .errors import InputError
from .inputs import check_finite, check_hook, index_list, to_tokens
from .models import str_tokens
from .results import Result, Table
from .tasks.counting import insert_separators

__all__ = [
    "sensitivity",
    "path_bound",
    "collapse_curve",
    "pair_sequences",
    "final_hook",
    "Sensitivity",
    "PathBound",
    "CollapseCurve",
    "PAIRS",
    "METRICS",
]

METRICS = ("l1", "l2", "linf")
PAIRS = ("repeat_last", "ones", "ones_zero", "change_last")
_EPS = {
    "bfloat16": torch.finfo(torch.bfloat16).eps,  # 2^-7
    "float16": torch.finfo(torch.float16).eps,  # 2^-10
    "float32": torch.finfo(torch.float32).eps,  # 2^-23
}
_LOW = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# --------------------------------------------------------------------------- helpers
def _check_position(position: int, n: int) -> int:
    if not isinstance(position, int) or isinstance(position, bool) or not -n <= position < n:
        raise InputError(
            f"position {position!r} is out of range for sequences of length {n}; use an int"
            f" in [{-n}, {n - 1}] (default -1, the last token)."
        )
    return position % n


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    if a.numel() < 2:
        return float("nan")
    rho = spearmanr(a.double().cpu().numpy(), b.double().cpu().numpy()).statistic
    return float(rho)


def _figure(ax_count: int = 1, width: float = 6.5, height: float = 3.6) -> tuple[Any, Any]:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ax_count, figsize=(width * ax_count, height), squeeze=False)
    return fig, axes[0]


# --------------------------------------------------------------------------- sensitivity
@dataclass(frozen=True)
class Sensitivity:
    """Jacobian norms ``|| d target[position] / d source_i ||`` for every input position i.

    norms:    [n_targets, batch, pos] exact Frobenius norms (``method='exact'``) or their
              random-probe estimates (``method='hutchinson'``).
    stderr:   [n_targets, batch, pos] standard error of the estimate (hutchinson), else None.
    spectral: [n_targets, batch, pos] spectral norms (``spectral=True``), else None.
    tokens:   [batch, pos] the input ids; ``str_tokens`` their strings.
    targets:  hook names, one per row of ``norms`` (the last one is the main target).
    """

    norms: torch.Tensor
    stderr: torch.Tensor | None
    spectral: torch.Tensor | None
    tokens: torch.Tensor
    str_tokens: list[list[str]]
    targets: tuple[str, ...]
    source: str
    position: int
    method: str
    n_probes: int | None = None

    @property
    def profile(self) -> torch.Tensor:
        """[batch, pos] norms for the main (last) target."""
        return self.norms[-1]

    @property
    def relative(self) -> torch.Tensor:
        """[batch, pos] the main profile divided by its sum over positions."""
        p = self.profile
        return p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)

    def to_dataframe(self) -> Any:
        import pandas as pd

        rows = []
        T, B, N = self.norms.shape
        rel_all = self.norms / self.norms.sum(-1, keepdim=True).clamp_min(1e-300)
        for t in range(T):
            for b in range(B):
                for i in range(N):
                    row = {
                        "target": self.targets[t],
                        "prompt": b,
                        "pos": i,
                        "token": self.str_tokens[b][i],
                        "norm": float(self.norms[t, b, i]),
                        "relative": float(rel_all[t, b, i]),
                    }
                    if self.stderr is not None:
                        row["stderr"] = float(self.stderr[t, b, i])
                    if self.spectral is not None:
                        row["spectral"] = float(self.spectral[t, b, i])
                    rows.append(row)
        return pd.DataFrame(rows)

    def plot(self, prompt: int | None = None) -> Any:
        """Norm per input position on a log scale (one line per prompt, or per target
        when there are several targets and ``prompt`` is given)."""
        fig, (ax,) = _figure()
        T, B, N = self.norms.shape
        x = torch.arange(N)
        if T > 1 and prompt is not None:
            for t in range(T):
                ax.plot(x, self.norms[t, prompt].double().clamp_min(1e-300), label=self.targets[t])
        else:
            for b in range(B) if prompt is None else [prompt]:
                y = self.profile[b].double()
                ax.plot(x, y.clamp_min(1e-300), marker=".", label=f"prompt {b}")
                if self.stderr is not None:
                    e = self.stderr[-1, b].double()
                    ax.fill_between(x, (y - 2 * e).clamp_min(1e-300), y + 2 * e, alpha=0.2)
        ax.set_yscale("log")
        ax.set_xlabel("input position i")
        ax.set_ylabel(f"||d y_{self.position} / d x_i||" + (" (est.)" if self.method != "exact" else ""))
        ax.set_title("sensitivity of the target to each input position")
        ax.legend(fontsize=7)
        fig.tight_layout()
        return fig

    def show(self, prompt: int = 0) -> Any:
        """Relative influence of each input token as circuitsvis colored tokens."""
        from .views import colored_tokens

        return colored_tokens(
            self.str_tokens[prompt], self.relative[prompt], title="relative sensitivity"
        )


def _select_at(position: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def select(y: torch.Tensor) -> torch.Tensor:
        return y[:, position].reshape(y.shape[0], -1)

    return select


def sensitivity(
    model: Any,
    tokens: Any,
    *,
    target: str | Sequence[str] | None = None,
    per_layer: bool = False,
    position: int = -1,
    source: str = "blocks.0.hook_resid_pre",
    method: str = "exact",
    spectral: bool = False,
    n_probes: int = 32,
    seed: int = 0,
    chunk_size: int | None = None,
    max_memory_mb: float | None = None,
    progress: bool = True,
) -> Sensitivity:
    """Sensitivity of a target representation to each input position (Barbero et al. 2024).

    For each prompt and input position i, the Jacobian ``J_i = d y / d x_i`` of the target
    ``y = target[:, position]`` (default: the final normalised representation of the last
    token, see :func:`final_hook`) w.r.t. the source activation ``x_i`` (default
    ``blocks.0.hook_resid_pre``, i.e. the input v_i^(0) of the paper; ``hook_embed``
    works too). ``per_layer=True`` adds every ``blocks.{l}.hook_resid_post`` as a target.

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
    """
    if method not in ("exact", "hutchinson"):
        raise InputError(f"method must be 'exact' or 'hutchinson', got {method!r}.")
    if method == "hutchinson" and spectral:
        raise InputError("spectral norms need the full Jacobian: use method='exact'.")
    if method == "hutchinson" and (not isinstance(n_probes, int) or n_probes < 2):
        raise InputError(f"n_probes must be an int >= 2 (for a standard error), got {n_probes!r}.")
    with guard(model):
        toks = to_tokens(model, tokens)
        pos = _check_position(position, toks.shape[1])
        check_hook(model, source)
        if target is None:
            targets = [final_hook(model)]
        elif isinstance(target, str):
            targets = [target]
        else:
            targets = list(target)
        if per_layer:
            layer_targets = [f"blocks.{l}.hook_resid_post" for l in range(model.cfg.n_layers)]
            targets = layer_targets + [t for t in targets if t not in layer_targets]
        for t in targets:
            check_hook(model, t)
        x0 = capture_acts(model, toks, [source])[source]
        check_finite(x0, f"source activation {source!r}")
        gen = torch.Generator(device="cpu").manual_seed(seed)
        cs = _default_chunk(x0, chunk_size, max_memory_mb)
        B, N = toks.shape
        norms, errs, specs = [], [], []
        for t in progress_bar(targets, progress and len(targets) > 1, "targets"):
            fn = hooked_fn(model, toks, source, t, select=_select_at(pos))
            with torch.no_grad():
                D = fn(x0).shape[-1]
            if method == "exact":
                sq, spec = _exact_rows(fn, x0, D, spectral, cs, max_memory_mb)
                norms.append(sq.sqrt())
                specs.append(spec)
            else:
                # All probes are drawn up front (k x B x d numbers), so the chunking
                # changes the memory, never the probes or the estimate.
                v = torch.randint(0, 2, (n_probes, B, D), generator=gen).to(x0.dtype) * 2 - 1
                per_probe = vjp_rows(fn, x0, v.to(x0.device), chunk_size=cs,
                                     max_memory_mb=max_memory_mb,
                                     per_row=lambda g: g.pow(2).sum(-1).double())  # [k, B, N]
                mean = per_probe.mean(0)
                se_sq = per_probe.std(0, unbiased=True) / math.sqrt(n_probes)
                est = mean.sqrt()
                norms.append(est)
                errs.append(se_sq / (2 * est.clamp_min(1e-300)))
        out = Sensitivity(
            norms=check_finite(torch.stack(norms).detach().cpu(), "sensitivity norms"),
            stderr=torch.stack(errs).cpu() if errs else None,
            spectral=torch.stack(specs).cpu() if spectral else None,
            tokens=toks.cpu(),
            str_tokens=str_tokens(model, toks),
            targets=tuple(targets),
            source=source,
            position=pos,
            method=method,
            n_probes=n_probes if method == "hutchinson" else None,
        )
    return out


def _default_chunk(x0: torch.Tensor, chunk_size: int | None, max_memory_mb: float | None) -> int | None:
    """Cotangents per backward pass, the same for both methods: ``chunk_size`` if given;
    else the core's memory bound (``max_memory_mb``, or its default on accelerators);
    on CPU with neither, 1: plain backward passes, measured as fast as batched ones
    there and with the smallest memory (one cotangent's backward on top of the forward)."""
    if chunk_size is not None or max_memory_mb is not None:
        return chunk_size
    return 1 if x0.device.type == "cpu" else None


def _exact_rows(
    fn: Callable, x0: torch.Tensor, D: int, spectral: bool, chunk_size: int | None,
    max_memory_mb: float | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sum over output rows of ``||e_r^T J_i||^2`` -> [B, N]; spectral norms if asked.

    One forward pass, then the d unit cotangents through the core's ``vjp_rows`` in
    chunks (see :func:`_default_chunk`), keeping only the running sum of squared norms,
    so the memory is the forward graph plus one chunk's backward. ``spectral`` keeps
    every row (the full Jacobian).
    """
    B = x0.shape[0]
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


# --------------------------------------------------------------------------- path bound
@dataclass(frozen=True)
class PathBound(Result):
    """The over-squashing bound of Barbero et al. (2024), Theorem 5.1, per input position.

    bound:    [prompt, pos] ``[prod_l M^(l)]_{n,i}`` with ``M^(l) = Abar^(l) + I`` (or
              ``(Abar^(l) + I) / 2`` with ``normalise=True``), heads averaged or summed;
              [head, prompt, pos] with ``heads='each'``.
    measured: [prompt, pos] the measured sensitivity profile (exact Frobenius norms), or None.
    spearman: [prompt] rank correlation of measured vs bound over positions 0..n (or None).
    ratio:    [prompt, pos] measured / bound (or None); NaN where the bound is 0 (no path,
              e.g. positions after n in a causal model).
    tokens:   [prompt, pos] the input ids; ``str_tokens`` their strings.
    """

    AXES: ClassVar = {"bound": ("prompt", "pos"), "measured": ("prompt", "pos"),
                      "spearman": ("prompt",), "ratio": ("prompt", "pos"), "tokens": ("prompt", "pos")}
    TITLE: ClassVar = "Theorem 5.1 path bound"

    bound: torch.Tensor
    measured: torch.Tensor | None
    spearman: torch.Tensor | None
    ratio: torch.Tensor | None
    tokens: torch.Tensor
    str_tokens: list[list[str]]
    position: int
    heads: str
    normalise: bool
    beta: float

    @property
    def axes(self) -> dict[str, tuple[str, ...]]:
        if self.heads == "each":
            return dict(self.AXES, bound=("head", "prompt", "pos"))
        return dict(self.AXES)

    def _table(self) -> Table:
        """One row per (head, prompt, position): token, bound and, for averaged or summed
        heads, the measured sensitivity and their ratio (``head`` is the mode then)."""
        each = self.heads == "each"
        bound = self.bound if each else self.bound.unsqueeze(0)
        cols: dict[str, Any] = {"token": (("prompt", "pos"), self.str_tokens),
                                "bound": (("head", "prompt", "pos"), bound)}
        if self.measured is not None and not each:
            cols.update(measured=(("prompt", "pos"), self.measured), ratio=(("prompt", "pos"), self.ratio))
        heads = range(bound.shape[0]) if each else [self.heads]
        return Table({"head": heads, "prompt": range(bound.shape[1]), "pos": range(bound.shape[2])}, cols)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"position": self.position, "heads": self.heads}
        if self.spearman is not None:
            out["mean_spearman"] = float(self.spearman.mean())
        return out

    def plot(self, prompt: int = 0) -> Any:
        """Bound and measured sensitivity, each divided by its sum, on a log scale."""
        fig, (ax,) = _figure()
        n = self.position + 1
        x = torch.arange(n)
        bounds = self.bound[:, prompt] if self.heads == "each" else self.bound[prompt][None]
        for h, bnd in enumerate(bounds):
            bnd = bnd[:n].double()
            label = f"bound, head {h}" if self.heads == "each" else "path bound"
            ax.plot(x, (bnd / bnd.sum()).clamp_min(1e-300), label=label)
        if self.measured is not None:
            m = self.measured[prompt, :n].double()
            rho = float(self.spearman[prompt])
            ax.plot(x, (m / m.sum()).clamp_min(1e-300), "k.-", label=f"measured (Spearman {rho:.2f})")
        ax.set_yscale("log")
        ax.set_xlabel("input position i")
        ax.set_ylabel("share of total (log)")
        ax.set_title("Theorem 5.1 path bound vs measured sensitivity")
        ax.legend(fontsize=7)
        fig.tight_layout()
        return fig

    def show(self, prompt: int = 0) -> Any:
        from .views import colored_tokens

        bnd = self.bound[:, prompt].mean(0) if self.heads == "each" else self.bound[prompt]
        return colored_tokens(self.str_tokens[prompt], bnd / bnd.sum(), title="path bound")


def _path_profile(mats: list[torch.Tensor], position: int) -> torch.Tensor:
    """Row ``position`` of ``M^(L-1) ... M^(0)`` for batched [..., n, n] matrices."""
    row = mats[-1][..., position, :]
    for M in reversed(mats[:-1]):
        row = torch.einsum("...k,...ki->...i", row, M)
    return row


def path_bound(
    model: Any,
    tokens: Any,
    *,
    position: int = -1,
    heads: str = "mean",
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
    (``heads='mean'``), summed (``'sum'``: each head is a separate path), or taken one
    head index at a time (``'each'``: ``A^(l,h)`` in every layer, a per-head diagnostic).
    ``normalise=True`` uses the paper's ``(Abar + I) / 2`` (their Prop. B.8). ``beta``
    summarises the normalisation layers (the paper leaves it model-specific; a scale only
    changes the ratio, never the rank correlation when ``normalise=False`` and all
    layers share it).

    With ``compare=True`` the exact sensitivity of the final representation at the same
    position is measured (or ``sensitivity_result`` reused) and the result holds the
    Spearman correlation over positions 0..n and the ratio measured/bound.
    """
    if heads not in ("mean", "sum", "each"):
        raise InputError(f"heads must be 'mean', 'sum' or 'each', got {heads!r}.")
    if not beta > 0:
        raise InputError(f"beta must be positive, got {beta!r}.")
    with guard(model):
        toks = to_tokens(model, tokens)
        pos = _check_position(position, toks.shape[1])
        names = [f"blocks.{l}.attn.hook_pattern" for l in range(model.cfg.n_layers)]
        acts = capture_acts(model, toks, names)
        mats = []
        for name in names:
            A = check_finite(acts[name], f"attention pattern {name!r}").double().cpu()
            if heads == "mean":
                A = A.mean(1)
            elif heads == "sum":
                A = A.sum(1)
            else:
                A = A.transpose(0, 1)  # [H, B, n, n]
            M = A / beta + torch.eye(A.shape[-1], dtype=A.dtype)
            mats.append(M / 2 if normalise else M)
        bound = _path_profile(mats, pos)
        measured = spearman = ratio = None
        if compare:
            sens = sensitivity_result
            if sens is None:
                sens = sensitivity(model, toks, position=pos, progress=progress, **sensitivity_kwargs)
            if sens.position != pos or sens.profile.shape != bound.shape[-2:]:
                raise InputError(
                    "sensitivity_result was computed for another position or input; pass the"
                    " same tokens and position, or leave it None to measure here."
                )
            measured = sens.profile.double()
            ref = bound.mean(0) if heads == "each" else bound
            nan = torch.full_like(ref, float("nan"))
            ratio = torch.where(ref > 0, measured / ref.where(ref > 0, torch.ones_like(ref)), nan)
            spearman = torch.tensor(
                [_spearman(measured[b, : pos + 1], ref[b, : pos + 1]) for b in range(ref.shape[0])],
                dtype=torch.float64,
            )
        return PathBound(
            bound=bound,
            measured=measured,
            spearman=spearman,
            ratio=ratio,
            tokens=toks.cpu(),
            str_tokens=str_tokens(model, toks),
            position=pos,
            heads=heads,
            normalise=normalise,
            beta=float(beta),
        )


# --------------------------------------------------------------------------- collapse
def pair_sequences(
    pair: str,
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
    if pair == "repeat_last":
        if prefix is None or len(prefix) < n - 1:
            raise InputError("pair 'repeat_last' needs a prefix of at least n - 1 tokens.")
        p = list(prefix[: n - 1])
        f = one if final is None else final
        a, b = p + [f], p + [f, f]
    elif pair == "ones":
        a, b = [one] * n, [one] * (n + 1)
    elif pair == "ones_zero":
        a, b = [one] * n + [zero], [one] * (n + 1) + [zero]
    elif pair == "change_last":
        a, b = [one] * n, [one] * (n - 1) + [zero]
    else:
        raise InputError(f"unknown pair {pair!r}; choose one of {PAIRS} or pass a callable.")
    if separator is not None:
        if not isinstance(every, int) or every < 1:
            raise InputError(f"separator needs every=<positive int>, got every={every!r}.")
        a, b = insert_separators(a, separator, every), insert_separators(b, separator, every)
    if bos is not None:
        a, b = [bos] + a, [bos] + b
    return a, b


def _distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[G, *] x [G, *] -> [G, 3] (L1, L2, Linf) computed in float64."""
    diff = (u.double() - v.double()).reshape(u.shape[0], -1).abs()
    return torch.stack([diff.sum(-1), diff.pow(2).sum(-1).sqrt(), diff.amax(-1)], -1)


@dataclass(frozen=True)
class PrecisionRun:
    """One low-precision run of a collapse sweep (the model cast to ``dtype``).

    distances: hook -> [lengths, groups, 3] (L1, L2, Linf of the low-precision outputs).
    identical: hook -> [lengths, groups] fraction of coordinates that are bit-identical.
    top_same:  [lengths] bool, both sequences get the same top predicted token.
    top_matches_reference: [lengths, 2] bool, each sequence's top token equals the
               reference-precision top token.
    """

    dtype: str
    distances: dict[str, torch.Tensor]
    identical: dict[str, torch.Tensor]
    top_same: torch.Tensor
    top_matches_reference: torch.Tensor


@dataclass(frozen=True)
class CollapseCurve:
    """Representational collapse over lengths (Barbero et al. 2024, Theorem 4.2 / B.3).

    lengths:   [L] item counts n of the sweep; ``seq_lengths`` [L, 2] token lengths.
    distances: hook -> [L, G, 3] reference-precision distances between the last-token
               activations of the two sequences (G = 1, or the heads for per-head hooks
               such as ``attn.hook_z``); metric order ``METRICS`` = (l1, l2, linf).
    top_same:  [L] bool, the reference model predicts the same top token for both.
    low:       dtype name -> :class:`PrecisionRun`.
    slopes:    hook -> {metric: log-log slope of the (head-mean) distance vs n}.
    thresholds: dtype name -> n*, the smallest swept n from which on the reference curve
               (``threshold_hook``, ``threshold_metric``) stays below that dtype's machine
               epsilon; NaN if the sweep never gets there.
    thresholds_fit: dtype name -> n* extrapolated from the power-law fit
               ``d = C n^slope`` (NaN when the curve does not decay).
    """

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

    def distance(self, hook: str | None = None, metric: str = "linf", stat: str = "mean") -> torch.Tensor:
        """[L] distances at ``hook``; for per-head hooks ``stat`` is mean, min or max over heads."""
        d = self.distances[hook or self.threshold_hook][..., METRICS.index(metric)]
        return {"mean": d.mean(-1), "min": d.amin(-1), "max": d.amax(-1)}[stat]

    def slope(self, hook: str | None = None, metric: str = "linf") -> float:
        return self.slopes[hook or self.threshold_hook][metric]

    def to_dataframe(self) -> Any:
        import pandas as pd

        rows = []
        runs = [(self.reference_dtype, self.distances, None)] + [
            (k, r.distances, r.identical) for k, r in self.low.items()
        ]
        for dtype, dists, ident in runs:
            for hook, d in dists.items():
                for li, n in enumerate(self.lengths.tolist()):
                    for g in range(d.shape[1]):
                        row = {
                            "dtype": dtype,
                            "hook": hook,
                            "n": n,
                            "head": g if d.shape[1] > 1 else None,
                            **{m: float(d[li, g, k]) for k, m in enumerate(METRICS)},
                        }
                        if ident is not None:
                            row["identical_fraction"] = float(ident[hook][li, g])
                        rows.append(row)
        return pd.DataFrame(rows)

    def plot(self, hook: str | None = None, metric: str = "linf") -> Any:
        """Log-log distance vs n (head mean with min-max band for per-head hooks), the
        low-precision runs, and the bf16 / fp16 / fp32 machine-epsilon lines."""
        hook = hook or self.threshold_hook
        fig, (ax,) = _figure()
        n = self.lengths.double()
        mean = self.distance(hook, metric, "mean").clamp_min(1e-300)
        ax.plot(n, mean, "o-", label=f"{self.reference_dtype} (slope {self.slope(hook, metric):.2f})")
        if self.distances[hook].shape[1] > 1:
            ax.fill_between(n, self.distance(hook, metric, "min").clamp_min(1e-300),
                            self.distance(hook, metric, "max"), alpha=0.2, label="min-max over heads")
        k = METRICS.index(metric)
        for name, run in self.low.items():
            d = run.distances[hook][..., k].mean(-1)
            ax.plot(n, d.clamp_min(1e-300), "x--", label=f"{name} run")
        for name, eps in self.eps.items():
            ax.axhline(eps, lw=0.8, ls=":", color="gray")
            ax.text(n[0], eps, f" {name} eps", va="bottom", fontsize=7, color="gray")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("n (items)")
        ax.set_ylabel(f"{metric} distance at {hook}")
        ax.set_title(f"representational collapse: pair '{self.pair}'")
        ax.legend(fontsize=7)
        fig.tight_layout()
        return fig

    def show(self) -> Any:
        """A small page: the plot and the thresholds table."""
        import matplotlib.pyplot as plt

        from .views import View, escape, figure_html

        fig = self.plot()
        img = figure_html(fig, alt="collapse curve")
        plt.close(fig)
        rows = "".join(
            f"<tr><td>{escape(k)}</td><td>{self.eps[k]:.3g}</td><td>{self.thresholds[k]:.4g}</td>"
            f"<td>{self.thresholds_fit[k]:.4g}</td></tr>"
            for k in self.thresholds
        )
        table = (
            "<table><tr><th>format</th><th>eps</th><th>n* (sweep)</th><th>n* (fit)</th></tr>"
            f"{rows}</table>"
        )
        return View(img + table, title=f"collapse: {self.pair}")


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
    model: Any,
    seqs: list[list[int]],
    hooks: list[str],
    causal: bool,
    progress: bool,
    desc: str,
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


def collapse_curve(
    model: Any,
    pair: str | Callable[[int], tuple[Sequence[int], Sequence[int]]] = "repeat_last",
    lengths: Sequence[int] | None = None,
    *,
    one: int = 1,
    zero: int = 0,
    bos: int | None = None,
    separator: int | None = None,
    every: int | None = None,
    prefix: str | Sequence[int] = "random",
    final: int | None = None,
    hooks: Sequence[str] | None = None,
    per_head: bool = True,
    precisions: Sequence[str] = ("bfloat16", "float16"),
    reference_dtype: torch.dtype = torch.float64,
    threshold_hook: str | None = None,
    threshold_metric: str = "linf",
    fit_min: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> CollapseCurve:
    """Representational collapse curves (Barbero et al. 2024, Theorem 4.2 / B.3).

    For every n in ``lengths`` the pair ``(v, v*) = pair_sequences(pair, n, ...)`` (or
    ``pair(n)`` for a callable) is run, and the distance between the LAST-token
    activations ``||h(v)_last - h(v*)_last||_p`` (p = 1, 2, inf) is taken at each hook:
    by default the final layer's ``hook_resid_post`` and the final normalised
    representation, plus (``per_head``) the last layer's per-head ``attn.hook_z`` whose
    per-head distances are summarised by mean, min and max over heads.

    The reference runs in ``reference_dtype`` (float64); each name in ``precisions`` runs
    the model cast to bf16/fp16/fp32 (cast in place for the run and restored bit for bit
    afterwards, see :func:`lensprobe.core.cast`) and records the fraction of
    bit-identical coordinates of the two last-token activations and whether the top
    predicted token agrees. ``thresholds[dtype]`` is the length n* where the reference
    curve (``threshold_hook``, ``threshold_metric``, head mean) falls below that dtype's
    machine epsilon (bf16 2^-7, fp16 2^-10, fp32 2^-23), as the paper reads it off;
    ``slopes`` are least-squares log-log slopes over lengths >= ``fit_min``.

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
    for p in precisions:
        if p not in _LOW:
            raise InputError(f"unknown precision {p!r}; choose from {tuple(_LOW)}.")
    with guard(model):
        L = model.cfg.n_layers
        n_ctx = model.cfg.n_ctx
        causal = getattr(model.cfg, "attention_dir", "causal") == "causal"
        fhook = final_hook(model)
        if hooks is None:
            hooks = [f"blocks.{L - 1}.hook_resid_post"]
            if fhook not in hooks:
                hooks.append(fhook)
            if per_head:
                hooks.append(f"blocks.{L - 1}.attn.hook_z")
        hooks = list(dict.fromkeys(hooks))
        for h in hooks:
            check_hook(model, h)
        threshold_hook = threshold_hook or fhook
        if threshold_hook not in hooks:
            raise InputError(f"threshold_hook {threshold_hook!r} must be one of hooks {hooks}.")

        if not callable(pair) and pair not in PAIRS:
            raise InputError(f"unknown pair {pair!r}; choose one of {PAIRS} or pass a callable.")
        if isinstance(prefix, str):
            if prefix == "random":
                gen = torch.Generator().manual_seed(seed)
                prefix = torch.randint(0, model.cfg.d_vocab, (n_ctx + 1,), generator=gen).tolist()
            elif prefix == "ones":
                prefix = [one] * (n_ctx + 1)
            else:
                raise InputError(f"prefix must be 'random', 'ones' or a token list, got {prefix!r}.")
        prefix = list(prefix)

        def make(n: int) -> tuple[list[int], list[int]]:
            if callable(pair):
                a, b = pair(n)
                return list(a), list(b)
            return pair_sequences(pair, n, one=one, zero=zero, bos=bos, separator=separator,
                                  every=every, prefix=prefix, final=final)

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
            for t in a + b:
                if not 0 <= t < model.cfg.d_vocab:
                    raise InputError(f"token id {t} is outside the vocabulary [0, {model.cfg.d_vocab}).")
        seqs = [s for ab in pairs for s in ab]

        ref_name = str(reference_dtype).replace("torch.", "")
        with cast(model, reference_dtype):
            acts, top = _last_token_acts(model, seqs, hooks, causal, progress, f"collapse ({ref_name})")
        nL = len(lengths)
        distances = {}
        for h in hooks:
            distances[h] = torch.stack([
                _distances(_groups(acts[h][2 * i]), _groups(acts[h][2 * i + 1])) for i in range(nL)
            ])
            check_finite(distances[h], f"collapse distances at {h!r}")
        top_same = torch.tensor([top[2 * i] == top[2 * i + 1] for i in range(nL)])

        low = {}
        for pname in precisions:
            with cast(model, _LOW[pname]):
                lacts, ltop = _last_token_acts(model, seqs, hooks, causal, progress,
                                               f"collapse ({pname})")
            ldist, ident = {}, {}
            for h in hooks:
                pairs_h = [(_groups(lacts[h][2 * i]), _groups(lacts[h][2 * i + 1])) for i in range(nL)]
                ldist[h] = torch.stack([_distances(u, v) for u, v in pairs_h])
                ident[h] = torch.stack([(u == v).double().mean(-1) for u, v in pairs_h])
            low[pname] = PrecisionRun(
                dtype=pname,
                distances=ldist,
                identical=ident,
                top_same=torch.tensor([ltop[2 * i] == ltop[2 * i + 1] for i in range(nL)]),
                top_matches_reference=torch.tensor(
                    [[ltop[2 * i] == top[2 * i], ltop[2 * i + 1] == top[2 * i + 1]] for i in range(nL)]
                ),
            )

        n_t = torch.tensor(lengths)
        fit = n_t >= fit_min
        slopes = {
            h: {m: _loglog_slope(n_t[fit], d[fit][..., k].mean(-1))[0] for k, m in enumerate(METRICS)}
            for h, d in distances.items()
        }
        curve = distances[threshold_hook][..., METRICS.index(threshold_metric)].mean(-1)
        s, a = _loglog_slope(n_t[fit], curve[fit])
        thresholds = {k: _threshold(n_t, curve, e) for k, e in _EPS.items()}
        thresholds_fit = {k: _fit_threshold(s, a, e) for k, e in _EPS.items()}
        return CollapseCurve(
            pair=pair if isinstance(pair, str) else getattr(pair, "__name__", "custom"),
            lengths=n_t,
            seq_lengths=torch.tensor([[len(a_), len(b_)] for a_, b_ in pairs]),
            hooks=tuple(hooks),
            distances=distances,
            top_same=top_same,
            low=low,
            slopes=slopes,
            thresholds=thresholds,
            thresholds_fit=thresholds_fit,
            threshold_hook=threshold_hook,
            threshold_metric=threshold_metric,
            reference_dtype=ref_name,
        )


def _groups(act: torch.Tensor) -> torch.Tensor:
    """A last-token activation as [groups, features]: per-head tensors [H, d_head] keep
    their heads, anything else is one group."""
    return act if act.ndim == 2 else act.reshape(1, -1)
