"""Transformer block coupling: block Jacobians, coupling matrices, token trajectories.

Aubry, Meng, Sugolov, Papyan, "Transformer Block Coupling and its Correlation with
Generalization in LLMs", ICLR 2025 (arXiv 2407.07810).

Block ``l`` updates the residual stream as ``x^(l+1) = x^(l) + f^l(x^(l))``. Its residual
Jacobians, taken at the prompt's own forward pass and without the skip connection's
identity, are

    J^l_{t1 t2} = d f^l(X)_{t2} / d x^(l)_{t1}          (d x d; rows: output coords)

with every other token's input held fixed and every path through the block kept
(queries, keys and values of t1, the MLP, the norms). lensprobe injects ``x^(l)`` at
``blocks.{l}.hook_resid_pre``, captures ``blocks.{l}.hook_resid_post`` and subtracts the
injected tensor.

* :func:`block_jacobians` -- same-token ``J^l_tt`` for all (or chosen) positions, or the
  cross-token Jacobians of a fixed input token (all outputs, forward mode) or a fixed
  output token (all inputs, reverse mode). Exact, batched over prompts, chunked to a
  memory bound with :func:`lensprobe.core.vjp_rows` / :func:`~lensprobe.core.jvp_cols`.
* :func:`block_coupling` -- the coupling metric m_K, its trace and U/V-swapped variants and
  coupling = 1 - m^2, depth-wise, token-wise and context-wise, for several K at once.
* :func:`trajectory_metrics` -- line-shape score, exponential norm growth, step-ratio
  regularity of each token's path through depth.
* :func:`coupling_through_training` / :class:`CouplingTracker` -- the same along a
  training run.

How the same-token Jacobians of every position are obtained at once
--------------------------------------------------------------------
One backward pass with its cotangent at output ``t`` gives ``J_{t1 t}`` for every
``t1``; putting cotangents at every output at once would mix in the cross-token blocks
``J_{t1 t}`` (t1 < t) that reach ``x_{t1}`` through its key and value. Tokens interact
in a block only through attention, and there only through the keys and values of other
positions. The separable forward used here (``method='separable'``) stops the gradient
of every key and value (``hook_k``, ``hook_v`` return detached tensors) and adds back,
as terms that are numerically zero, exactly the own-position paths:

    A'_{ts} = A_ts + A_ts (1[s = t] - A_tt) * delta_t,
    delta_t = q_t . (k_t - stopgrad(k_t)) / scale      (the S_tt path through k_t)
    z'_t    = z_t + A_tt (v_t - stopgrad(v_t))          (the A_tt v_t path)

(rotary embeddings are orthogonal rotations by the same angle for q_t and k_t, so the
diagonal score q_t . k_t needs no rotation). The values of the forward pass are
unchanged and output ``t`` now depends on input ``t`` only through exactly the paths of
``J_tt``, so ``d`` batched backward passes give ``J_tt`` for every ``t`` (and every
prompt) instead of ``d`` per position. Every separable result is checked against an
ordinary backward pass through the unmodified block (a random cotangent at two positions
per layer); on a mismatch (an architecture whose attention the surgery does not describe,
e.g. soft-capped scores or normalised q/k) ``method='auto'`` falls back to the
per-position method with a warning, and ``method='separable'`` raises.
"""

# ruff: noqa: F722  (jaxtyping shape strings such as "batch pos" are not Python expressions)
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal, Sequence

import torch
from jaxtyping import Float, Int

from . import _tl
from .core import activations, capture_acts, extractor, jvp_cols, progress_bar, renamed, run_hooked, vjp_rows
from .errors import InputError, LensprobeError
from .inputs import check_finite, check_layers, checkpoint_list, hook_names, materialise, model_dtype, to_tokens
from .models import str_tokens
from .results import Result, Table

Tokens = Int[torch.Tensor, "batch pos"] | Int[torch.Tensor, " pos"] | str | list[str]
Variant = Literal["frob", "trace", "swap"]

__all__ = [
    "BlockJacobians",
    "block_jacobians",
    "coupling_metric",
    "Coupling",
    "block_coupling",
    "TrajectoryMetrics",
    "trajectory_metrics",
    "TrainingCoupling",
    "CouplingTracker",
    "coupling_through_training",
]

VARIANTS = ("frob", "trace", "swap")
"""'frob': m_K as in the paper (normalised by ||s1_K||_2); 'trace': normalised by
sum(s1_K) (the p = 1 norm); 'swap': U and V exchanged (|V2_K^T J1 U2_K|), normalised by
||s1_K||_2."""


def _positions(n: int, positions: Sequence[int] | int | None, what: str = "positions") -> list[int]:
    if positions is None:
        return list(range(n))
    if isinstance(positions, int):
        positions = [positions]
    out = []
    for p in positions:
        if isinstance(p, bool) or not isinstance(p, int):
            raise InputError(f"{what} must be ints, got {p!r}.")
        if not -n <= p < n:
            raise InputError(
                f"position {p} is out of range for a sequence of {n} tokens; valid are"
                f" 0..{n - 1} (or negative from the end)."
            )
        out.append(p % n)
    if not out:
        raise InputError(f"{what} is empty; pass at least one position (or None for all).")
    return out


# =========================================================================== Jacobians
@dataclass(frozen=True)
class BlockJacobians(Result):
    """Residual block Jacobians J^l_{t1 t2} = d f^l(X)_{t2} / d x^(l)_{t1} (identity removed).

    jacobians: [prompt, layer, pos, d_out, d_in] (d_out = d_in = d_model; layer runs over
               ``layers``, pos over ``positions``):
        kind 'diagonal':     entry [b, i, p] is J^{layers[i]}_{t t} with t = positions[p];
        kind 'fixed_input':  J^{layers[i]}_{token, t2} with t2 = positions[p] (all outputs
                             of one input token; zero for t2 < token under a causal mask);
        kind 'fixed_output': J^{layers[i]}_{t1, token} with t1 = positions[p].
    tokens:    [prompt, seq] the prompts; ``str_tokens`` their strings when known.
    method:    how they were computed ('separable', 'per_token', 'jvp', 'vjp'; joined with
               '+' when layers differ, e.g. 'separable+per_token' after a fallback).
    """

    AXES: ClassVar = {"jacobians": ("prompt", "layer", "pos", "d_out", "d_in"), "tokens": ("prompt", "seq")}
    TITLE: ClassVar = "block Jacobians"

    jacobians: torch.Tensor
    kind: Literal["diagonal", "fixed_input", "fixed_output"]
    layers: tuple[int, ...]
    positions: tuple[int, ...]
    token: int | None
    tokens: torch.Tensor
    method: str
    str_tokens: tuple[tuple[str, ...], ...] | None = None

    @property
    def d_model(self) -> int:
        return self.jacobians.shape[-1]

    def __getitem__(self, key: tuple[int, int]) -> Float[torch.Tensor, "prompt d_out d_in"]:
        """``jac[layer, position]`` -> [batch, d, d] for a model layer and a sequence position."""
        layer, pos = key
        if layer not in self.layers:
            raise InputError(f"layer {layer} was not computed; have {list(self.layers)}.")
        n = self.tokens.shape[1]
        pos = pos % n
        if pos not in self.positions:
            raise InputError(f"position {pos} was not computed; have {list(self.positions)}.")
        return self.jacobians[:, self.layers.index(layer), self.positions.index(pos)]

    def _label(self, p: int) -> str:
        if self.kind == "diagonal":
            return f"J_{{{p},{p}}}"
        if self.kind == "fixed_input":
            return f"J_{{{self.token},{p}}}"
        return f"J_{{{p},{self.token}}}"

    def norms(self, ord: Literal["fro", 2] = "fro") -> Float[torch.Tensor, "prompt layer pos"]:
        """[prompt, layer, pos] Frobenius ('fro') or spectral (2) norms."""
        if ord == "fro":
            return torch.linalg.matrix_norm(self.jacobians, "fro")
        return torch.linalg.matrix_norm(self.jacobians, 2)

    def _table(self) -> Table:
        """One row per (prompt, layer, pos): Frobenius and spectral norm, top singular value share."""
        s = torch.linalg.svdvals(self.jacobians.double())
        fro2 = s.square().sum(-1)
        dims = ("prompt", "layer", "pos")
        return Table({"prompt": range(s.shape[0]), "layer": self.layers, "pos": self.positions},
                     {"frobenius": (dims, fro2.sqrt()), "spectral": (dims, s[..., 0]),
                      "top1_share": (dims, s[..., 0] ** 2 / fro2.clamp_min(1e-300))},
                     {"kind": self.kind, "token": self.token})

    def summary(self) -> dict[str, Any]:
        fro = self.norms().double()
        return {"kind": self.kind, "method": self.method, "mean_frobenius": float(fro.mean()),
                "max_frobenius": float(fro.max())}

    def plot(self, prompt: int = 0, n_singular: int = 20) -> Any:
        """Frobenius norm per (layer, position) and the leading singular values per layer."""
        import matplotlib.pyplot as plt

        fro = self.norms()[prompt].double().cpu()
        s = torch.linalg.svdvals(self.jacobians[prompt].double()).cpu()
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        im = axes[0].imshow(fro.numpy(), aspect="auto", cmap="viridis")
        axes[0].set_yticks(range(len(self.layers)), [str(l) for l in self.layers])
        axes[0].set_xticks(range(len(self.positions)), [str(p) for p in self.positions],
                           fontsize=7 if len(self.positions) > 16 else 9)
        axes[0].set_xlabel("input token t1" if self.kind == "fixed_output" else
                           "output token t2" if self.kind == "fixed_input" else "token t")
        axes[0].set_ylabel("layer")
        axes[0].set_title(f"||J||_F ({self.kind})")
        fig.colorbar(im, ax=axes[0])
        n = min(n_singular, s.shape[-1])
        for i, l in enumerate(self.layers):
            axes[1].semilogy(range(1, n + 1), s[i, -1, :n].clamp_min(1e-30).numpy(), marker=".",
                             label=f"layer {l}")
        axes[1].set_xlabel("index")
        axes[1].set_title(f"singular values of {self._label(self.positions[-1])}")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        return fig


def _expand_heads(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[b, pos, n_kv_heads, e] -> [b, pos, n_heads, e] (grouped-query attention)."""
    if t.shape[2] == n_heads:
        return t
    return t.repeat_interleave(n_heads // t.shape[2], dim=2)


def _separable_hooks(model: Any, layer: int) -> dict[str, Callable]:
    """Hooks that make block ``layer``'s output at t depend on input t only through J_tt.

    See the module docstring: keys and values are detached, and the own-position score
    path (through k_t) and value path (through v_t) are added back as zero-valued terms.
    """
    scale = _tl.attn_scale(model, layer)
    n_heads = model.cfg.n_heads
    a = f"blocks.{layer}.attn."
    store: dict[str, torch.Tensor] = {}

    def q_hook(q: torch.Tensor) -> torch.Tensor:
        store["q"] = q
        return q

    def k_hook(k: torch.Tensor) -> torch.Tensor:
        store["k"] = k
        return k.detach()

    def v_hook(v: torch.Tensor) -> torch.Tensor:
        store["v"] = v
        return v.detach()

    def pattern_hook(pattern: torch.Tensor) -> torch.Tensor:  # [b, head, query, key]
        q = store["q"].detach()
        k = _expand_heads(store["k"], n_heads)
        delta = torch.einsum("bthe,bthe->bht", q, k - k.detach()) / scale
        p = pattern.detach()
        diag = p.diagonal(dim1=-2, dim2=-1)  # [b, head, t]
        eye = torch.eye(p.shape[-1], dtype=p.dtype, device=p.device)
        store["a_diag"] = diag
        return pattern + p * (eye - diag.unsqueeze(-1)) * delta.unsqueeze(-1)

    def z_hook(z: torch.Tensor) -> torch.Tensor:  # [b, pos, head, e]
        v = _expand_heads(store["v"], n_heads)
        a_tt = store["a_diag"].transpose(1, 2).unsqueeze(-1)  # [b, t, head, 1]
        return z + a_tt * (v - v.detach())

    return {
        a + "hook_q": q_hook,
        a + "hook_k": k_hook,
        a + "hook_v": v_hook,
        a + "hook_pattern": pattern_hook,
        a + "hook_z": z_hook,
    }


def _block_fn(model: Any, toks: torch.Tensor, layer: int, separable: bool = False) -> Callable:
    """x^(l) [b, pos, d] -> f^l(x^(l)) = resid_post - x^(l) (the block without its skip)."""
    pre, post = f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.hook_resid_post"

    def fn(x: torch.Tensor) -> torch.Tensor:
        inject: dict[str, Any] = {pre: x}
        if separable:
            inject.update(_separable_hooks(model, layer))
        return run_hooked(model, toks, [post], inject)[post] - x

    return fn


def _unit_cotangents(
    shape: tuple[int, ...], rows: range, positions: Sequence[int], dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """[len(rows), *shape]: e_i placed at every listed position of every prompt."""
    b, n, d = shape
    c = torch.zeros((len(rows), b, n, d), dtype=dtype, device=device)
    idx = torch.arange(len(rows), device=device)
    for p in positions:
        c[idx, :, p, torch.as_tensor(list(rows), device=device)] = 1.0
    return c


def _row_blocks(d: int, shape: tuple[int, ...], itemsize: int, max_memory_mb: float | None) -> int:
    """How many unit cotangents to build at once (each is a full [b, pos, d] tensor)."""
    per = math.prod(shape) * itemsize
    budget = (max_memory_mb or 1024) * 2**20 / 4
    return max(1, min(d, int(budget // max(per, 1))))


def _vjp_units(fn: Callable, x: torch.Tensor, positions: Sequence[int], chunk_size: int | None,
               max_memory_mb: float | None) -> torch.Tensor:
    """[d, b, pos, d]: entry [i, b, t1, j] = sum_{t in positions} d fn(x)[b, t, i] / d x[b, t1, j]."""
    d = x.shape[-1]
    step = _row_blocks(d, tuple(x.shape), x.element_size(), max_memory_mb)
    outs = []
    for i in range(0, d, step):
        rows = range(i, min(d, i + step))
        cot = _unit_cotangents(tuple(x.shape), rows, positions, x.dtype, x.device)
        outs.append(vjp_rows(fn, x, cot, chunk_size=chunk_size, max_memory_mb=max_memory_mb))
    return torch.cat(outs)


def _jvp_chunk(model: Any, x: torch.Tensor, chunk_size: int | None,
               max_memory_mb: float | None) -> int | None:
    """Tangents per forward-mode chunk: each carries about one block's activations
    (residual-sized tensors, the MLP hidden layer and the attention scores) as duals."""
    if chunk_size is not None or max_memory_mb is None:
        return chunk_size
    b, n, d = x.shape
    cfg = model.cfg
    d_mlp = getattr(cfg, "d_mlp", None) or 0
    per = x.element_size() * b * n * (12 * d + 3 * d_mlp + 3 * cfg.n_heads * n)
    return max(1, int(max_memory_mb * 2**20 // per))


def _check_separable(model: Any, toks: torch.Tensor, layer: int, x: torch.Tensor,
                     jac: torch.Tensor, positions: Sequence[int], gen: torch.Generator) -> float:
    """Relative error of the separable J_tt against one plain backward pass at two positions."""
    fn = _block_fn(model, toks, layer)
    probe = sorted({positions[-1], positions[int(torch.randint(len(positions), (1,), generator=gen))]})
    worst = 0.0
    for t in probe:
        c = torch.zeros((1, *x.shape), dtype=x.dtype, device=x.device)
        c[0, :, t] = torch.randn(x.shape[0], x.shape[-1], generator=gen, dtype=torch.float64).to(x)
        g = vjp_rows(fn, x, c)[0][:, t]  # [b, d]
        mine = torch.einsum("bi,bij->bj", c[0, :, t], jac[:, positions.index(t)])
        err = float((g - mine).norm() / g.norm().clamp_min(torch.finfo(x.dtype).tiny))
        worst = max(worst, err)
    return worst


def _tolerance(dtype: torch.dtype) -> float:
    # Floor 1e-6: some backends build rotary tables in float32 even for float64 models, so
    # R_t is orthogonal only to ~1e-7 and the diagonal score q_t.k_t is exact only to that.
    # A surgery that misses a path is off by O(1), far above this.
    return min(5e-2, max(1e-6, 2e3 * torch.finfo(dtype).eps))


@extractor
def block_jacobians(
    model: Any,
    tokens: Tokens,
    layers: Sequence[int] | int | None = None,
    positions: Sequence[int] | int | None = None,
    *,
    input_token: int | None = None,
    output_token: int | None = None,
    method: Literal["auto", "separable", "per_token"] = "auto",
    chunk_size: int | None = None,
    max_memory_mb: float | None = 1024,
    progress: bool = True,
) -> BlockJacobians:
    """Residual block Jacobians of ``model`` at the forward pass of ``tokens``.

    Aubry et al., "Transformer Block Coupling and its Correlation with Generalization in
    LLMs" (ICLR 2025): J^l_{t1 t2} = d f^l(X)_{t2} / d x^(l)_{t1} with
    f^l(X) = resid_post^l - resid_pre^l (the skip connection's identity removed).

    * default: same-token J^l_tt for ``positions`` (default all) and ``layers``
      (default all). ``method='separable'`` gets every position with d batched backward
      passes per layer (module docstring), verified against a plain backward pass;
      ``'per_token'`` uses d backward passes per position (exact for any architecture);
      ``'auto'`` (default) is separable with a fallback to per-token on a failed check.
    * ``input_token=t1``: J^l_{t1 t2} for output tokens t2 in ``positions`` (forward
      mode: d JVPs per layer give every output at once).
    * ``output_token=t2``: J^l_{t1 t2} for input tokens t1 in ``positions`` (reverse
      mode: d VJPs per layer give every input at once).

    ``tokens``: [batch, pos] ids (or [pos], or text); all prompts are processed together.
    Backward passes run in chunks so one chunk's autograd working set stays under
    ``max_memory_mb`` (or ``chunk_size`` cotangents at a time); forward-mode chunks are
    sized from an estimate of one block's activations per tangent. Returns a
    :class:`BlockJacobians` with ``jacobians`` of shape [batch, layers, positions, d, d]
    in the model's dtype.
    """
    if input_token is not None and output_token is not None:
        raise InputError("pass input_token or output_token, not both (a single block is"
                         " jacobians(..., input_token=t1).jacobians[:, :, positions.index(t2)]).")
    if method not in ("auto", "separable", "per_token"):
        raise InputError(f"method must be 'auto', 'separable' or 'per_token', got {method!r}.")
    toks = to_tokens(model, tokens)
    n = toks.shape[1]
    layer_list = check_layers(model, layers)
    pos_list = _positions(n, positions)
    kind, fixed = "diagonal", None
    if input_token is not None or output_token is not None:
        kind = "fixed_input" if input_token is not None else "fixed_output"
        fixed = _positions(n, input_token if input_token is not None else output_token,
                           "input_token/output_token")[0]
    if not model_dtype(model).is_floating_point:
        raise InputError("the model has no floating-point parameters.")
    pres = capture_acts(model, toks, [f"blocks.{l}.hook_resid_pre" for l in layer_list])
    jacs = None
    used: list[str] = []
    gen = torch.Generator().manual_seed(0)
    for li, l in progress_bar(enumerate(layer_list), progress, "block Jacobians", len(layer_list)):
        x = pres[f"blocks.{l}.hook_resid_pre"].detach()
        jac, how = _layer_jacobians(model, toks, l, x, pos_list, kind, fixed, method, chunk_size,
                                    max_memory_mb, gen)
        used.append(how)
        check_finite(jac, f"the block Jacobians of layer {l}")
        if jacs is None:  # filled layer by layer: the full array exists once
            jacs = jac.new_empty((jac.shape[0], len(layer_list), *jac.shape[1:]))
        jacs[:, li] = jac.detach()
        del jac
    return BlockJacobians(jacs, kind, tuple(layer_list), tuple(pos_list), fixed, toks.detach().cpu(),
                          "+".join(dict.fromkeys(used)), _str_tokens(model, toks))


def _layer_jacobians(model, toks, l, x, pos_list, kind, fixed, method, chunk_size, max_memory_mb, gen):
    """(the Jacobians [b, p, i, j] of layer ``l``, the method that computed them)."""
    fn = _block_fn(model, toks, l)
    if kind == "fixed_input":
        d = x.shape[-1]
        tangents = torch.zeros((d, *x.shape), dtype=x.dtype, device=x.device)
        tangents[torch.arange(d), :, fixed, torch.arange(d)] = 1.0
        cols = jvp_cols(fn, x, tangents, chunk_size=_jvp_chunk(model, x, chunk_size, max_memory_mb))
        return cols[:, :, pos_list].permute(1, 2, 3, 0), "jvp"  # [b, p, i, j]
    if kind == "fixed_output":
        g = _vjp_units(fn, x, [fixed], chunk_size, max_memory_mb)
        return g[:, :, pos_list].permute(1, 2, 0, 3), "vjp"  # [b, p(t1), i, j]
    if method != "per_token":
        jac = _diag_separable(model, toks, l, x, pos_list, chunk_size, max_memory_mb, gen, method)
        if jac is not None:  # None: the separable check failed (warned)
            return jac, "separable"
    return _diag_per_token(model, toks, l, x, pos_list, chunk_size, max_memory_mb), "per_token"


def _diag_separable(model, toks, l, x, pos_list, chunk_size, max_memory_mb, gen, method):
    names = _separable_hooks(model, l)
    missing = [h for h in names if h not in model.hook_dict]
    err = None
    if not missing:
        try:
            g = _vjp_units(_block_fn(model, toks, l, separable=True), x, pos_list, chunk_size,
                           max_memory_mb)
            jac = g[:, :, pos_list].permute(1, 2, 0, 3)  # [b, p, i, j]: row i of J_tt
            err = _check_separable(model, toks, l, x, jac, pos_list, gen)
            if err <= _tolerance(x.dtype):
                return jac
        except LensprobeError:
            raise
        except (RuntimeError, KeyError) as e:  # an attention the surgery does not fit
            err = repr(e)
    why = f"missing hooks {missing}" if missing else f"check error {err}"
    if method == "separable":
        raise LensprobeError(
            f"the separable same-token Jacobian does not match a plain backward pass at layer"
            f" {l} ({why}); this architecture's attention is not the standard softmax(q.k /"
            " scale) v. Use method='per_token' (exact for any block, d backward passes per"
            " position)."
        )
    warnings.warn(
        f"layer {l}: separable Jacobians unavailable ({why}); using the per-token method.",
        stacklevel=3,
    )
    return None


def _diag_per_token(model, toks, l, x, pos_list, chunk_size, max_memory_mb):
    fn = _block_fn(model, toks, l)
    outs = []
    for t in pos_list:
        g = _vjp_units(fn, x, [t], chunk_size, max_memory_mb)  # [d, b, pos, d]
        outs.append(g[:, :, t].transpose(0, 1))  # [b, i, j]
    return torch.stack(outs, dim=1)


def _str_tokens(model: Any, toks: torch.Tensor) -> tuple[tuple[str, ...], ...] | None:
    """Token strings when the model has a tokenizer or vocabulary, else None (ids only)."""
    if getattr(model, "_lensprobe_vocab", None) is None and getattr(model, "tokenizer", None) is None:
        return None
    return tuple(tuple(row) for row in str_tokens(model, toks))


# =========================================================================== coupling
def _svd_top(J: torch.Tensor, kmax: int, chunk: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-kmax singular triplets of a batch [..., d, d]: U_K [..., d, K], s_K [..., K], V_K [..., d, K].

    Full SVDs in chunks of ``chunk`` matrices gathered from ``J`` (any strides: a
    transposed view is never copied whole), keeping copies of the top-K parts only, so
    the full U and V of every matrix are never held at once."""
    lead, d = tuple(J.shape[:-2]), J.shape[-1]
    n = math.prod(lead)
    U = J.new_empty((n, d, kmax))
    S = J.new_empty((n, kmax))
    V = J.new_empty((n, d, kmax))
    for i in range(0, n, chunk):
        idx = torch.unravel_index(torch.arange(i, min(n, i + chunk)), lead)
        u, s, vh = torch.linalg.svd(J[idx], full_matrices=False)
        U[i : i + chunk] = u[..., :kmax]
        S[i : i + chunk] = s[..., :kmax]
        V[i : i + chunk] = vh[..., :kmax, :].mT
        del u, s, vh
    return U.reshape(*lead, d, kmax), S.reshape(*lead, kmax), V.reshape(*lead, d, kmax)


@renamed(k="top_k")
def coupling_metric(
    J1: Float[torch.Tensor, "*batch d d"], J2: Float[torch.Tensor, "*batch d d"],
    top_k: int | Sequence[int] = 10, variant: Variant = "frob",
) -> Float[torch.Tensor, "*batch"] | Float[torch.Tensor, " k *batch"]:
    """m_K(J1, J2) for two (batches of) d x d matrices (Aubry et al., ICLR 2025).

        m_K(J1, J2) = || |U2_K^T J1 V2_K| - diag(s1_K) ||_F / ||s1_K||_2

    with J_i = U_i S_i V_i^T, |.| elementwise (sign flips of singular-vector pairs do not
    matter). ``variant='trace'`` divides by sum(s1_K); ``'swap'`` uses |V2_K^T J1 U2_K|.
    m(J, J) = 0 and m ~ 1 for independent random matrices; coupling is 1 - m^2.
    ``top_k`` (K) an int -> [...]; a sequence -> [len(top_k), ...].
    """
    if variant not in VARIANTS:
        raise InputError(f"variant must be one of {VARIANTS}, got {variant!r}.")
    ks = [top_k] if isinstance(top_k, int) else list(top_k)
    d = J1.shape[-1]
    _check_ks(ks, d)
    kmax = max(ks)
    U1s = torch.linalg.svdvals(J1)[..., :kmax]
    U2, _, V2 = _svd_top(J2, kmax)
    left, right = (V2, U2) if variant == "swap" else (U2, V2)
    M = left.mT @ J1 @ right
    out = torch.stack([_m_from(M[..., :K, :K], U1s[..., :K], variant) for K in ks])
    return out[0] if isinstance(top_k, int) else out


def _check_ks(ks: Sequence[int], d: int) -> None:
    for K in ks:
        if isinstance(K, bool) or not isinstance(K, int) or not 1 <= K <= d:
            raise InputError(f"K must be an int in 1..d_model={d}, got {K!r}.")


def _m_from(M: torch.Tensor, s: torch.Tensor, variant: str) -> torch.Tensor:
    num = torch.linalg.matrix_norm(M.abs() - torch.diag_embed(s), "fro")
    den = s.sum(-1) if variant == "trace" else s.norm(dim=-1)
    return num / den.clamp_min(torch.finfo(s.dtype).tiny)


def _pairwise_m(J: torch.Tensor, ks: Sequence[int], max_memory_mb: float = 256,
                keep_product: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """All-pairs m_K within groups.

    J: [B, G, A, d, d] (any strides) -> m: [3 variants, len(ks), B, G, A, A] with
    m[v, k, b, g, i, j] = m_K(J[b, g, i], J[b, g, j]) (J1 = J[b, g, i] measured in the
    singular bases of J2 = J[b, g, j]). With ``keep_product`` also |U_j,K^T J_i V_j,K| for
    K = max(ks): [B, G, A, A, K, K]. One SVD per matrix, then batched products over
    chunks of (b, g, i) sized to ``max_memory_mb``.
    """
    B, G, A, d, _ = J.shape
    kmax = max(ks)
    U, S, V = _svd_top(J, kmax)  # [B, G, A, d, K], [B, G, A, K], [B, G, A, d, K]
    m = J.new_zeros((len(VARIANTS), len(ks), B, G, A, A))
    prods = J.new_zeros((B, G, A, A, kmax, kmax)) if keep_product else None
    # per (b, g, i): gathered U, V of the group and two [A, K, d] / [A, d, K] products each way
    per_row = (6 * A * d * kmax + d * d) * J.element_size()
    rows = max(1, int(max_memory_mb * 2**20 // per_row))
    flat = [(b, g, i) for b in range(B) for g in range(G) for i in range(A)]
    for c in range(0, len(flat), rows):
        idx = torch.tensor(flat[c : c + rows])
        bi, gi, ii = idx[:, 0], idx[:, 1], idx[:, 2]
        J1 = J[bi, gi, ii].unsqueeze(1)  # [r, 1, d, d]
        Ug, Vg = U[bi, gi], V[bi, gi]  # [r, A, d, K]
        sK_all = S[bi, gi, ii][:, None]  # [r, 1, K]
        M = Ug.mT @ (J1 @ Vg)  # [r, A(j), K, K]
        for q, K in enumerate(ks):
            m[0, q, bi, gi, ii] = _m_from(M[..., :K, :K], sK_all[..., :K], "frob")
            m[1, q, bi, gi, ii] = _m_from(M[..., :K, :K], sK_all[..., :K], "trace")
        if prods is not None:
            prods[bi, gi, ii] = M.abs()
        del M
        Msw = Vg.mT @ (J1 @ Ug)
        for q, K in enumerate(ks):
            m[2, q, bi, gi, ii] = _m_from(Msw[..., :K, :K], sK_all[..., :K], "swap")
        del Msw
    return m, prods


def _default_ks(d: int, top_k: int | Sequence[int] | None) -> tuple[int, ...]:
    if top_k is None:
        ks = sorted({max(1, min(K, d // 4)) for K in (10, 30, 50)})
        return tuple(ks)
    ks = [top_k] if isinstance(top_k, int) else list(top_k)
    _check_ks(ks, d)
    return tuple(ks)


@dataclass(frozen=True)
class Coupling(Result):
    """Coupling matrices of block Jacobians (Aubry et al., ICLR 2025).

    m:        [variant ('frob', 'trace', 'swap'), k (the values of ``ks``), prompt, group,
              item_i, item_j] with m[v, q, b, g, i, j] = m_K(J_i, J_j) for items i, j of
              group g in prompt b and K = ks[q]:
                mode 'depth':   groups = token positions, items = layers (L x L per token);
                mode 'token':   groups = layers, items = token positions (J^l_tt vs J^l_t't');
                mode 'context': groups = layers, items = the varying token of cross-token
                                Jacobians (fixed input token: outputs t2; fixed output
                                token: inputs t1).
              coupling = 1 - m^2 (1 = coupled, ~0 for unrelated matrices). The group and
              item axes are named after ``group_axis`` / ``item_axis`` ('pos' or 'layer').
    ks:       the K values (numbers of top singular vectors).
    groups, items: model layers / sequence positions labelling those axes.
    products: |U_j,K^T J_i V_j,K| for K = max(ks), [prompt, group, item_i, item_j, u, v]
              (u, v: the K left / right singular vectors of J_j; near-diagonal when
              coupled), kept when asked for.
    jacobians: the :class:`BlockJacobians` they came from (when computed from a model).
    """

    TITLE: ClassVar = "block coupling"

    m: torch.Tensor
    ks: tuple[int, ...]
    mode: Literal["depth", "token", "context"]
    groups: tuple[int, ...]
    items: tuple[int, ...]
    group_axis: str
    item_axis: str
    products: torch.Tensor | None = field(default=None, repr=False)
    jacobians: BlockJacobians | None = field(default=None, repr=False)

    @property
    def axes(self) -> dict[str, tuple[str, ...]]:
        g, i, j = self.group_axis, f"{self.item_axis}_i", f"{self.item_axis}_j"
        return {"m": ("variant", "k", "prompt", g, i, j), "products": ("prompt", g, i, j, "u", "v")}

    def _coords(self) -> dict[str, Sequence[Any]]:
        return {"variant": VARIANTS, "k": self.ks, self.group_axis: self.groups,
                f"{self.item_axis}_i": self.items, f"{self.item_axis}_j": self.items}

    def _table(self) -> Table:
        """Long format, one row per entry of ``m``: variant, k, prompt, group, i, j, m, coupling."""
        dims = self.axes["m"]
        return Table(self._grid("m"), {"m": (dims, self.m), "coupling": (dims, self.coupling)})

    # ------------------------------------------------------------------ accessors
    def _v(self, variant: str) -> int:
        if variant not in VARIANTS:
            raise InputError(f"variant must be one of {VARIANTS}, got {variant!r}.")
        return VARIANTS.index(variant)

    def _k(self, top_k: int | None) -> int:
        if top_k is None:
            return 0
        if top_k not in self.ks:
            raise InputError(f"K={top_k} was not computed; have {list(self.ks)}.")
        return self.ks.index(top_k)

    @property
    def coupling(self) -> torch.Tensor:
        """1 - m^2, same shape as ``m``."""
        return 1 - self.m.square()

    @renamed(k="top_k")
    def matrix(self, top_k: int | None = None, variant: Variant = "frob", *,
               metric: Literal["coupling", "m"] = "coupling",
               reduce: Literal["mean", "std", "none"] = "mean") -> Float[torch.Tensor, "group item_i item_j"]:
        """[group, item_i, item_j] coupling (or m) over prompts: ``reduce`` 'mean', 'std' or
        'none' ([prompt, group, item_i, item_j])."""
        t = (self.coupling if metric == "coupling" else self.m)[self._v(variant), self._k(top_k)]
        if reduce == "mean":
            return t.mean(0)
        if reduce == "std":
            return t.std(0, unbiased=False)
        if reduce == "none":
            return t
        raise InputError(f"reduce must be 'mean', 'std' or 'none', got {reduce!r}.")

    @renamed(k="top_k")
    def off_diagonal(self, top_k: int | None = None, variant: Variant = "frob") -> Float[torch.Tensor, " prompt"]:
        """[prompt] mean off-diagonal coupling per prompt (over groups and pairs i != j)."""
        c = self.coupling[self._v(variant), self._k(top_k)]  # [b, G, A, A]
        A = c.shape[-1]
        if A < 2:
            raise InputError("off-diagonal coupling needs at least two items (layers/positions).")
        mask = ~torch.eye(A, dtype=torch.bool, device=c.device)
        return c[..., mask].mean(dim=(-1, -2))

    @renamed(k="top_k")
    def scalar(self, top_k: int | None = None, variant: Variant = "frob") -> float:
        """The per-model scalar: mean off-diagonal coupling 1 - m_K^2, over prompts, groups
        and ordered pairs i != j (for mode 'depth': the paper's mean depth-wise coupling).
        K (``top_k``) defaults to the first of ``ks``."""
        return float(self.off_diagonal(top_k, variant).mean())

    def summary(self) -> dict[str, Any]:
        """The mode and, with two or more items, the scalar for every K (variant 'frob')."""
        out: dict[str, Any] = {"mode": self.mode}
        if len(self.items) >= 2:
            out.update({f"coupling_k{K}": self.scalar(K) for K in self.ks})
        return out

    @renamed(k="top_k")
    def plot(self, top_k: int | None = None, variant: Variant = "frob", group: int | None = None,
             pair: tuple[int, int] | None = None) -> Any:
        """Heatmaps: coupling over prompts (mean) for one group (default: the last), its
        spread over prompts, and |U_j^T J_i V_j| for one pair of items (default: the two
        last items) when products were kept."""
        import matplotlib.pyplot as plt

        g = len(self.groups) - 1 if group is None else self._group_index(group)
        has_prod = self.products is not None and len(self.items) >= 2
        fig, axes = plt.subplots(1, 3 if has_prod else 2, figsize=(15 if has_prod else 10, 4.2))
        what = f"{self.mode}, {self.group_axis} {self.groups[g]}, K={self.ks[self._k(top_k)]}, {variant}"
        for ax, reduce, title, cmap in ((axes[0], "mean", "coupling 1 - m^2 (mean)", "magma"),
                                        (axes[1], "std", "spread over prompts (std)", "viridis")):
            data = self.matrix(top_k, variant, reduce=reduce)[g].double().cpu()
            self._heatmap(fig, ax, data, cmap, f"{title}\n{what}")
        if has_prod:
            i, j = (len(self.items) - 1, len(self.items) - 2) if pair is None else (
                self.items.index(pair[0]), self.items.index(pair[1]))
            P = self.products[:, g, i, j].mean(0).double().cpu()
            im = axes[2].imshow(P.numpy(), cmap="Greys")
            axes[2].set_title(f"|U_j^T J_i V_j| (top {P.shape[0]}), i={self.items[i]}, "
                              f"j={self.items[j]}", fontsize=9)
            fig.colorbar(im, ax=axes[2])
        fig.tight_layout()
        return fig

    def _heatmap(self, fig: Any, ax: Any, data: torch.Tensor, cmap: str, title: str) -> None:
        labels = [str(i) for i in self.items]
        im = ax.imshow(data.numpy(), cmap=cmap, vmin=0 if cmap == "viridis" else None)
        fs = 7 if len(labels) > 16 else 9
        ax.set_xticks(range(len(labels)), labels, fontsize=fs)
        ax.set_yticks(range(len(labels)), labels, fontsize=fs)
        ax.set_xlabel(f"{self.item_axis} j (bases of J_j)")
        ax.set_ylabel(f"{self.item_axis} i (J_i)")
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax)

    def _group_index(self, group: int) -> int:
        if group not in self.groups:
            raise InputError(f"{self.group_axis} {group} not computed; have {list(self.groups)}.")
        return self.groups.index(group)

    @renamed(k="top_k")
    def show(self, top_k: int | None = None, variant: Variant = "frob") -> Any:
        """A View with the heatmaps and the per-model scalar."""
        from .views import figure_view

        try:
            scal = f"{self.scalar(top_k, variant):.4f}"
        except InputError:
            scal = "n/a"
        head = {f"mean off-diagonal coupling (K={self.ks[self._k(top_k)]}, {variant})": scal}
        return figure_view(self.plot(top_k, variant), f"{self.TITLE} ({self.mode})", head)


@renamed(k="top_k")
def block_coupling(
    source: BlockJacobians | Any,
    tokens: Tokens | None = None,
    *,
    mode: Literal["depth", "token", "context"] = "depth",
    top_k: int | Sequence[int] | None = None,
    layers: Sequence[int] | int | None = None,
    positions: Sequence[int] | int | Literal["all"] | None = None,
    input_token: int | None = None,
    output_token: int | None = None,
    keep_products: bool = True,
    method: Literal["auto", "separable", "per_token"] = "auto",
    max_memory_mb: float | None = 1024,
    progress: bool = True,
) -> Coupling:
    """Coupling of block Jacobians (Aubry et al., ICLR 2025).

    ``source`` is a :class:`BlockJacobians` or a model (then ``tokens`` are required and the
    Jacobians are computed with :func:`block_jacobians`). For Jacobians J1, J2 with SVDs
    J_i = U_i S_i V_i^T,

        m_K(J1, J2) = || |U2_K^T J1 V2_K| - diag(s1_K) ||_F / ||s1_K||_2,  coupling = 1 - m^2,

    plus the trace variant (/ sum(s1_K)) and the U/V-swapped one (|V2_K^T J1 U2_K|), for
    every K in ``top_k`` (default 10, 30, 50, each clamped to d_model // 4).

    ``mode``:
      * 'depth' (default): for each token t, the L x L matrix m_K(J^i_tt, J^j_tt);
        ``positions`` defaults to the last token, ``positions='all'`` takes every one.
      * 'token': for each layer l, positions x positions m_K(J^l_tt, J^l_t't')
        (``positions`` default: all).
      * 'context': cross-token Jacobians of a fixed ``output_token`` (default the last;
        items are input tokens t1 <= t2) or a fixed ``input_token`` (items are outputs
        t2 >= t1); for each layer, the matrix over those items.
    The per-model scalar (``result.scalar()``) is the mean off-diagonal coupling.
    """
    if mode not in ("depth", "token", "context"):
        raise InputError(f"mode must be 'depth', 'token' or 'context', got {mode!r}.")
    if isinstance(source, BlockJacobians):
        jac = _check_kind(source, mode)
    elif tokens is None:
        raise InputError("block_coupling(model, tokens, ...) needs tokens when given a model.")
    else:
        jac = _jacobians_for(source, tokens, mode, layers, positions, input_token, output_token,
                             method=method, max_memory_mb=max_memory_mb, progress=progress)
    ks = _default_ks(jac.d_model, top_k)
    J = jac.jacobians
    if J.dtype not in (torch.float32, torch.float64):
        J = J.float()
    if mode == "depth":  # groups: positions, items: layers
        grouped, groups, items, gax, iax = J.transpose(1, 2), jac.positions, jac.layers, "pos", "layer"
    else:
        grouped, groups, items, gax, iax = J, jac.layers, jac.positions, "layer", "pos"
    m, prods = _pairwise_m(grouped, ks, keep_product=keep_products,
                           max_memory_mb=min(max_memory_mb or 256, 256))
    return Coupling(m, ks, mode, tuple(groups), tuple(items), gax, iax, prods, jac)


def _check_kind(jac: BlockJacobians, mode: str) -> BlockJacobians:
    if (mode == "context") != (jac.kind != "diagonal"):
        raise InputError(
            f"mode {mode!r} needs {'cross-token' if mode == 'context' else 'same-token'}"
            f" Jacobians, got kind {jac.kind!r}; compute them with block_jacobians("
            + ("..., output_token=t2)" if mode == "context" else "...) (no input/output token)")
            + ")."
        )
    return jac


def _jacobians_for(model: Any, tokens: Any, mode: str, layers: Any, positions: Any, input_token: int | None,
                   output_token: int | None, **kw: Any) -> BlockJacobians:
    """The Jacobians :func:`block_coupling` needs for ``mode``, with its position defaults."""
    toks = to_tokens(model, tokens)
    n = toks.shape[1]
    if positions == "all":
        positions = None
    elif mode == "depth" and positions is None:
        positions = [n - 1]
    if mode != "context":
        return block_jacobians(model, toks, layers, positions, **kw)
    if input_token is None and output_token is None:
        output_token = n - 1
    fixed = _positions(n, input_token if input_token is not None else output_token)[0]
    if positions is None:
        positions = list(range(fixed + 1)) if input_token is None else list(range(fixed, n))
    kw.pop("method")
    return block_jacobians(model, toks, layers, positions, input_token=input_token,
                           output_token=output_token if input_token is None else None, **kw)


def coupling(*args: Any, **kwargs: Any) -> Coupling:
    """Deprecated: the old name of :func:`block_coupling` (as ``lp.coupling`` it hid this
    module); it will be removed in lensprobe 0.3."""
    warnings.warn("lensprobe.coupling.coupling() is now lp.block_coupling(); the old name will be"
                  " removed in lensprobe 0.3.", DeprecationWarning, stacklevel=2)
    return block_coupling(*args, **kwargs)


# =========================================================================== trajectories
_TRAJECTORY = ("lss", "norm_slope", "norm_r2", "step_slope", "step_r2", "step_ratio_cv")


@dataclass(frozen=True)
class TrajectoryMetrics(Result):
    """Token trajectories through depth (Aubry et al., ICLR 2025, section on trajectories).

    lss:        [prompt, pos] line-shape score L / ||xt^L - xt^0|| of the unit-step path
                xt^0 = x^0, xt^l = xt^(l-1) + (x^l - x^(l-1)) / ||x^l - x^(l-1)||
                (1 = a straight line, larger = more winding).
    norm_slope, norm_r2: [prompt, pos] least-squares slope and R^2 of log ||x^l|| against
                l = 0..L (exponential norm growth reads as a high R^2).
    step_slope, step_r2: [prompt, pos] the same for the log step size log ||x^(l+1) - x^l||,
                l = 0..L-1.
    step_ratio_cv: [prompt, pos] regularity of consecutive step-size ratios
                r_l = ||x^(l+2) - x^(l+1)|| / ||x^(l+1) - x^l||: std(r) / mean(r) (0 = the
                steps grow by the same factor at every layer, i.e. exactly exponential
                spacing). The paper's "expodistance" formula is not published; this
                coefficient of variation is lensprobe's documented reading of it (NaN
                with fewer than 3 layers).
    residuals:  [prompt, depth, pos, d_model] x^0 ... x^L, by default x^0 the resid_pre of
                block 0 and x^l the resid_post of block l - 1 (L + 1 depths; ``hooks``).
    tokens:     [prompt, pos] the input ids (None when computed from a cache alone);
                ``str_tokens`` their strings when known.
    hooks:      the hook read at each depth.
    """

    AXES: ClassVar = {**{m: ("prompt", "pos") for m in _TRAJECTORY}, "tokens": ("prompt", "pos"),
                      "residuals": ("prompt", "depth", "pos", "d_model")}
    TITLE: ClassVar = "token trajectories"

    residuals: torch.Tensor
    lss: torch.Tensor
    norm_slope: torch.Tensor
    norm_r2: torch.Tensor
    step_slope: torch.Tensor
    step_r2: torch.Tensor
    step_ratio_cv: torch.Tensor
    tokens: torch.Tensor | None
    str_tokens: tuple[tuple[str, ...], ...] | None = None
    hooks: tuple[str, ...] = ()

    def summary(self) -> dict[str, float]:
        """Means over prompts and tokens."""
        return {k: float(torch.nanmean(getattr(self, k).double())) for k in _TRAJECTORY}

    def _table(self) -> Table:
        """One row per (prompt, pos): the token (string, when known), its id and every metric."""
        t = super()._table()
        if self.str_tokens is None:
            return t
        return Table(t.axes, {"token": (("prompt", "pos"), self.str_tokens), **t.columns})


    def plot(self, prompt: int = 0, token: int = -1) -> Any:
        """log-norm vs layer for every token, LSS per token, and the PCA projection of the
        token paths (all tokens grey, ``token`` highlighted) of one prompt."""
        import matplotlib.pyplot as plt

        X = self.residuals[prompt].double().cpu()  # [L+1, P, d]
        Lp1, P, d = X.shape
        tok = token % P
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        lognorm = X.norm(dim=-1).clamp_min(1e-300).log()
        for t in range(P):
            axes[0].plot(range(Lp1), lognorm[:, t].numpy(), color="C1" if t == tok else "0.7",
                         lw=2 if t == tok else 0.8)
        axes[0].set_xlabel("layer l")
        axes[0].set_ylabel("log ||x^l||")
        axes[0].set_title("norm growth (highlight: token %d)" % tok)
        axes[1].bar(range(P), self.lss[prompt].double().cpu().numpy(), color="C0")
        axes[1].axhline(1.0, color="k", lw=0.8, ls="--")
        axes[1].set_xlabel("position")
        axes[1].set_ylabel("line-shape score (1 = straight)")
        axes[1].set_title("LSS per token")
        flat = X.reshape(-1, d)
        centred = flat - flat.mean(0)
        _, _, Vh = torch.linalg.svd(centred, full_matrices=False)
        proj = (centred @ Vh[:2].T).reshape(Lp1, P, 2)
        for t in range(P):
            axes[2].plot(proj[:, t, 0].numpy(), proj[:, t, 1].numpy(),
                         color="C3" if t == tok else "0.75", lw=2 if t == tok else 0.8,
                         marker="o" if t == tok else None, ms=3)
        axes[2].annotate("x^0", proj[0, tok].numpy())
        axes[2].annotate(f"x^{Lp1 - 1}", proj[-1, tok].numpy())
        axes[2].set_title("token paths, PCA of all residuals")
        axes[2].set_xlabel("PC 1")
        axes[2].set_ylabel("PC 2")
        fig.tight_layout()
        return fig

    def show(self, prompt: int = 0) -> Any:
        """LSS per token as colored tokens, with the figure."""
        from .views import colored_tokens, figure_view

        P = self.lss.shape[1]
        strs = (self.str_tokens[prompt] if self.str_tokens is not None
                else [str(int(t)) for t in self.tokens[prompt]] if self.tokens is not None
                else [str(t) for t in range(P)])
        ct = colored_tokens(list(strs), self.lss[prompt], title="line-shape score")
        view = figure_view(self.plot(prompt), self.TITLE, extra_html=ct.body)
        view.needs_bundle = True
        return view


def _linfit(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares slope and R^2 of y[..., l] against l = 0..n-1 (last dim)."""
    n = y.shape[-1]
    x = torch.arange(n, dtype=y.dtype, device=y.device)
    xc = x - x.mean()
    yc = y - y.mean(-1, keepdim=True)
    slope = (yc * xc).sum(-1) / xc.square().sum().clamp_min(1e-300)
    resid = yc - slope.unsqueeze(-1) * xc
    ss_tot = yc.square().sum(-1)
    r2 = 1 - resid.square().sum(-1) / ss_tot.clamp_min(1e-300)
    r2 = torch.where(ss_tot > 0, r2, torch.ones_like(r2))
    return slope, r2


@extractor
def trajectory_metrics(model: Any, tokens: Tokens | None = None, *, cache: Any = None,
                       hooks: str | Sequence[str] | Callable[[str], bool] | None = None) -> TrajectoryMetrics:
    """Line-shape score, norm growth and step-ratio regularity of every token's path.

    Aubry et al., "Transformer Block Coupling and its Correlation with Generalization in
    LLMs" (ICLR 2025). The path of token t is x_t^0 (``blocks.0.hook_resid_pre``), ...,
    x_t^L (``blocks.{L-1}.hook_resid_post``); see :class:`TrajectoryMetrics` for each
    formula. Computed in float64. The residual streams come from a no-grad forward pass
    on ``tokens`` or from ``cache`` (an ``ActivationCache`` of ``model``; ``tokens`` then
    only label the result). ``hooks`` picks other depths the TransformerLens way
    (``names_filter``: a list of names or a predicate ``name -> bool``), in model order.
    """
    toks = None if tokens is None else to_tokens(model, tokens)
    names = (["blocks.0.hook_resid_pre"] + [f"blocks.{l}.hook_resid_post" for l in range(model.cfg.n_layers)]
             if hooks is None else hook_names(model, hooks))
    if len(names) < 2:
        raise InputError(f"a trajectory needs at least 2 hooks (depths), got {names}.")
    acts = activations(model, toks, names, cache)
    X = torch.stack([acts[n].detach().double() for n in names], dim=1)  # [b, L+1, pos, d]
    check_finite(X, "the residual stream")
    L = len(names) - 1
    steps = X[:, 1:] - X[:, :-1]  # [b, L, pos, d]
    sn = steps.norm(dim=-1)  # [b, L, pos]
    tiny = torch.finfo(torch.float64).tiny
    unit = steps / sn.clamp_min(tiny).unsqueeze(-1)
    chord = unit.sum(1).norm(dim=-1)  # ||xt^L - xt^0||
    lss = L / chord.clamp_min(tiny)
    norm_slope, norm_r2 = _linfit(X.norm(dim=-1).clamp_min(tiny).log().transpose(1, 2))
    step_slope, step_r2 = _linfit(sn.clamp_min(tiny).log().transpose(1, 2))
    if L >= 3:
        ratios = (sn[:, 1:] / sn[:, :-1].clamp_min(tiny)).transpose(1, 2)  # [b, pos, L-1]
        cv = ratios.std(-1, unbiased=False) / ratios.mean(-1).clamp_min(tiny)
    else:
        cv = torch.full_like(lss, float("nan"))
    return TrajectoryMetrics(X, lss, norm_slope, norm_r2, step_slope, step_r2, cv,
                             None if toks is None else toks.detach().cpu(),
                             None if toks is None else _str_tokens(model, toks), tuple(names))


# =========================================================================== training
@dataclass(frozen=True)
class TrainingCoupling(Result):
    """Coupling and trajectories along training (Aubry et al., ICLR 2025, section 5).

    steps:     the training step (or index) of each checkpoint.
    ks:        the K values (numbers of top singular vectors).
    scalar:    [step, k] mean off-diagonal depth-wise coupling (variant 'frob').
    matrices:  [step, k, layer_i, layer_j] depth-wise coupling 1 - m^2 averaged over
               prompts and the analysed positions.
    trajectory: dict name -> [step] means over prompts and tokens of the
               :class:`TrajectoryMetrics` fields (lss, norm_slope, norm_r2, step_slope,
               step_r2, step_ratio_cv).
    """

    AXES: ClassVar = {"scalar": ("step", "k"), "matrices": ("step", "k", "layer_i", "layer_j")}
    TITLE: ClassVar = "coupling through training"

    steps: tuple[int, ...]
    ks: tuple[int, ...]
    scalar: torch.Tensor
    matrices: torch.Tensor
    trajectory: dict[str, torch.Tensor]

    def _table(self) -> Table:
        """One row per step: ``coupling_k{K}`` for every K and the trajectory means."""
        cols = {f"coupling_k{K}": (("step",), self.scalar[:, q]) for q, K in enumerate(self.ks)}
        cols.update({k: (("step",), v) for k, v in self.trajectory.items()})
        return Table({"step": self.steps}, cols)

    def summary(self) -> dict[str, Any]:
        """The coupling scalars at the first and the last step."""
        return {"steps": len(self.steps), **{f"coupling_k{K}_{end}": float(self.scalar[i, q])
                for q, K in enumerate(self.ks) for end, i in (("first", 0), ("last", -1))}}

    def plot(self) -> Any:
        """Coupling scalar and trajectory metrics against step, and the L x L matrices of
        the first and last checkpoint."""
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
        steps = list(self.steps)
        for q, K in enumerate(self.ks):
            axes[0].plot(steps, self.scalar[:, q].numpy(), marker="o", label=f"K={K}")
        axes[0].set_xlabel("step")
        axes[0].set_ylabel("mean off-diagonal coupling")
        axes[0].legend(fontsize=8)
        axes[0].set_title("depth-wise coupling")
        for name in ("lss", "norm_r2", "step_ratio_cv"):
            axes[1].plot(steps, self.trajectory[name].numpy(), marker=".", label=name)
        axes[1].set_xlabel("step")
        axes[1].legend(fontsize=8)
        axes[1].set_title("trajectory metrics")
        vmin = float(self.matrices[[0, -1], 0].min())
        for ax, s in ((axes[2], 0), (axes[3], len(steps) - 1)):
            im = ax.imshow(self.matrices[s, 0].numpy(), cmap="magma", vmin=vmin, vmax=1)
            ax.set_title(f"coupling, step {steps[s]} (K={self.ks[0]})", fontsize=9)
            ax.set_xlabel("layer j")
            ax.set_ylabel("layer i")
            fig.colorbar(im, ax=ax)
        fig.tight_layout()
        return fig


class CouplingTracker:
    """Records depth-wise coupling and trajectory metrics of a model during training.

    Use as a callback of :func:`lensprobe.train` (``callbacks=[tracker]``; it is called
    as ``tracker(step, model, record)``) or call ``tracker.record(model, step)`` yourself;
    ``tracker.result()`` returns a :class:`TrainingCoupling`. Each record runs inside
    :func:`guard`, so the training model's mode and grad flags come back unchanged.
    """

    @renamed(k="top_k")
    def __init__(self, tokens: Tokens, *, top_k: int | Sequence[int] | None = None,
                 positions: Sequence[int] | int | None = None, every: int = 1,
                 method: Literal["auto", "separable", "per_token"] = "auto",
                 max_memory_mb: float | None = 1024) -> None:
        self.tokens = tokens
        self.top_k = top_k
        self.positions = positions
        self.every = int(every)
        self.method = method
        self.max_memory_mb = max_memory_mb
        self._steps: list[int] = []
        self._scal: list[torch.Tensor] = []
        self._mats: list[torch.Tensor] = []
        self._traj: list[dict[str, float]] = []
        self._ks: tuple[int, ...] | None = None

    def __call__(self, step: int, model: Any, record: Any = None) -> bool:
        if self.every <= 1 or step % self.every == 0:
            self.record(model, step)
        return False

    def record(self, model: Any, step: int | None = None) -> None:
        step = len(self._steps) if step is None else int(step)
        toks = to_tokens(model, self.tokens)
        if model.cfg.n_layers < 2:
            raise InputError("depth-wise coupling needs a model with at least 2 layers.")
        positions = self.positions
        if positions is None:
            positions = [toks.shape[1] - 1]
        c = block_coupling(model, toks, mode="depth", top_k=self.top_k, positions=positions,
                     keep_products=False, method=self.method, max_memory_mb=self.max_memory_mb,
                     progress=False)
        self._ks = c.ks
        self._steps.append(step)
        self._scal.append(torch.tensor([c.scalar(K) for K in c.ks], dtype=torch.float64))
        mats = torch.stack([c.matrix(K).mean(0) for K in c.ks]).double().cpu()  # [nk, L, L]
        self._mats.append(mats)
        self._traj.append(trajectory_metrics(model, toks).summary())

    def result(self) -> TrainingCoupling:
        if not self._steps:
            raise InputError("nothing recorded yet: call the tracker on a model first.")
        traj = {k: torch.tensor([t[k] for t in self._traj], dtype=torch.float64)
                for k in self._traj[0]}
        return TrainingCoupling(tuple(self._steps), self._ks or (), torch.stack(self._scal),
                                torch.stack(self._mats), traj)


@renamed(k="top_k")
def coupling_through_training(
    checkpoints: Any,
    tokens: Tokens,
    *,
    steps: Sequence[int] | None = None,
    top_k: int | Sequence[int] | None = None,
    positions: Sequence[int] | int | None = None,
    method: Literal["auto", "separable", "per_token"] = "auto",
    max_memory_mb: float | None = 1024,
    progress: bool = True,
) -> TrainingCoupling:
    """Depth-wise coupling and trajectory metrics of each checkpoint of a training run.

    ``checkpoints``: a sequence of models or lensprobe checkpoint paths
    (:func:`lensprobe.save_checkpoint`), a mapping step -> model/path, or a
    :class:`lensprobe.training.TrainResult` (its kept checkpoints). ``steps`` labels a
    plain sequence (default 0, 1, ...). For every checkpoint: the mean off-diagonal
    depth-wise coupling of J^l_tt at ``positions`` (default the last token) for each K, the
    L x L matrices, and the means of :func:`trajectory_metrics` (Aubry et al., ICLR 2025:
    coupling rises early in training and then plateaus, strongest between nearby layers).
    """
    tracker = CouplingTracker(tokens, top_k=top_k, positions=positions, method=method,
                              max_memory_mb=max_memory_mb)
    pairs = checkpoint_list(checkpoints, steps)
    for step, ck in progress_bar(pairs, progress, "checkpoints", len(pairs)):
        tracker.record(materialise(ck), step)
    return tracker.result()
