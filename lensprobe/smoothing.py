"""Smoothing and sharpening from the OV eigenspectrum.

Dovonon, Bronstein, Kusner, "Setting the Record Straight on Transformer Oversmoothing",
TMLR 2025 (arXiv 2401.04301).

The simplified attention update ``X_{l+1} = X_l + A X_l H`` (X: [n, d] tokens, A the
row-stochastic attention matrix, H = W_V W_O) is linear in X; vectorised it is
``I + H^T (x) A`` with eigenvalues ``mu_ij = 1 + lambda^A_i lambda^H_j``. Because
``A 1 = 1``, ``lambda^A_1 = 1`` and the *DC* modes (every token the same vector) have
eigenvalues ``1 + lambda^H_j``; all other modes are high-frequency (HC). The mode with
the largest ``|mu|`` wins with depth:

* ``mu_DC = max_j |1 + lambda^H_j|`` larger -> smoothing (tokens converge to one vector);
* ``mu_HF = max_{i>=2, j} |1 + lambda^A_i lambda^H_j|`` larger -> sharpening.

This module reads that competition off a TransformerLens model:

* :func:`ov_spectrum` -- per-head non-zero spectra of H (d_head values each, from the
  factored d_head x d_head matrix ``W_O W_V``) and per-layer spectra of the head sum,
  with layer norm's gamma (and centring) folded in or not, and the reading each
  spectrum allows on its own (:func:`classify_spectrum`);
* :func:`dominance` -- per layer, head and input, the attention eigenvalues and which of
  mu_DC and mu_HF is larger (the paper's table of dominating eigenvalues);
* :func:`smoothing_profile` -- ||HC||/||DC||, mean pairwise cosine similarity,
  normalised Dirichlet energy and sigma_2/sigma_1 of every residual stream;
* :func:`sign_controlled` and :func:`flip_ln_gamma` -- copies of a model whose OV
  circuits have a chosen spectrum sign (the paper's parameterisation ``H = V Lambda V^T``,
  V orthogonal from a QR, ``Lambda = +/- diag(psi)^2``) or whose ln1 gamma is negated.
"""

# ruff: noqa: F722  (jaxtyping shape strings such as "batch pos" are not Python expressions)
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal, Sequence

import torch
from jaxtyping import Complex, Float, Int
from tqdm.auto import tqdm

from . import _tl
from .core import activations, copy_model, extractor
from .errors import InputError, ModelError
from .inputs import check_finite, check_layers, check_pattern, hook_names
from .results import Result, Table

Tokens = Int[torch.Tensor, "batch pos"] | Int[torch.Tensor, " pos"] | str | list[str]

__all__ = [
    "READINGS",
    "OVSpectrum",
    "Dominance",
    "SmoothingProfile",
    "ov_spectrum",
    "ov_factors",
    "classify_spectrum",
    "update_eigenvalues",
    "attention_eigenvalues",
    "dominance",
    "smoothing_profile",
    "sequence_measures",
    "sign_controlled",
    "flip_ln_gamma",
]

SMOOTHING = "smoothing"
SHARPENING = "sharpening"
DEPENDS = "depends on attention"
DC_FLIPPING = "DC-flipping"
INERT = "inert"
#: The readings :func:`classify_spectrum` returns.
READINGS = (SMOOTHING, SHARPENING, DEPENDS, DC_FLIPPING, INERT)

_EIG_DTYPE = torch.float64


# --------------------------------------------------------------------------- model facts
def _is_causal(model: Any) -> bool:
    return getattr(model.cfg, "attention_dir", "causal") == "causal"


def _norm_type(model: Any) -> str | None:
    return getattr(model.cfg, "normalization_type", None)


def _centres(model: Any) -> bool:
    """LayerNorm (folded or not) subtracts the feature mean; RMSNorm does not."""
    return _norm_type(model) in ("LN", "LNPre")


def _check_mha(model: Any) -> None:
    n_kv = getattr(model.cfg, "n_key_value_heads", None)
    if n_kv not in (None, model.cfg.n_heads):
        raise ModelError(
            f"the model uses grouped-query attention ({n_kv} key/value heads for"
            f" {model.cfg.n_heads} query heads); sign-controlled OV circuits need one value"
            " head per query head."
        )


# --------------------------------------------------------------------------- spectra
def ov_factors(
    model: Any,
    *,
    fold_ln: bool = True,
    layers: Sequence[int] | int | None = None,
    dtype: torch.dtype = _EIG_DTYPE,
) -> tuple[Float[torch.Tensor, "layer head d_model d_head"], Float[torch.Tensor, "layer head d_head d_model"], str]:
    """The factors of each head's OV matrix: ``(W_V_eff, W_O, description)``.

    ``W_V_eff`` [layers, heads, d_model, d_head], ``W_O`` [layers, heads, d_head, d_model]
    with ``H = W_V_eff @ W_O``. With ``fold_ln`` the pre-attention layer norm is part of
    the map, as in the paper's pre-LN reading: ``H_eff = P_c diag(gamma) W_V W_O`` (P_c =
    I - 11^T/d centres features; LayerNorm only, RMSNorm has no P_c). On a model whose
    ln1 TransformerLens already folded into W_V (processed HookedTransformer, bridge in
    compatibility mode) the stored W_V is that product already; applying P_c again
    changes nothing (P_c is idempotent and the folded W_V is centred). Without
    ``fold_ln`` the stored W_V is used as is, which on a folded model would silently
    include gamma, so that combination raises. The per-token 1/sigma(x) of the norm is
    a positive scalar and is left out, as in the paper.
    """
    _tl.require_model(model)
    layer_ids = check_layers(model, layers)
    ov = model.OV
    W_V = ov.A[layer_ids].detach().to(dtype)
    W_O = ov.B[layer_ids].detach().to(dtype)
    norm = _norm_type(model)
    folded = _tl.is_folded(model)
    if norm is None:
        return W_V, W_O, "W_V W_O (the model has no layer norm)"
    if not fold_ln:
        if folded:
            raise InputError(
                "fold_ln=False asks for W_V W_O without ln1's gamma, but TransformerLens has"
                " already folded gamma into this model's W_V (a processed HookedTransformer or"
                " a bridge in compatibility mode) and the raw weights are gone. Load the model"
                " raw (lp.load_model(..., processed=False), or a bridge before"
                " enable_compatibility_mode()) to see the unfolded spectrum."
            )
        return W_V, W_O, "W_V W_O as stored (raw weights; ln1 gamma and centring not applied)"
    d = W_V.shape[-2]
    scales = []
    for l in layer_ids:
        g = _tl.norm_scale(model, l)
        scales.append(torch.ones(d, dtype=dtype) if g is None else g.detach().to("cpu", dtype))
    gamma = torch.stack(scales).to(W_V.device)  # [layers, d]
    W_eff = gamma[:, None, :, None] * W_V
    if _centres(model):
        W_eff = W_eff - W_eff.mean(dim=-2, keepdim=True)
    centring = "P_c diag(gamma) " if _centres(model) else "diag(gamma) "
    if folded:
        desc = (
            "W_V W_O as stored: TransformerLens folded ln1's gamma"
            + (" and centring" if _centres(model) else "")
            + " into W_V (effective matrix)"
        )
    else:
        desc = centring + "W_V W_O: lensprobe applied ln1's gamma" + (
            " and centring P_c" if _centres(model) else ""
        ) + " to the raw weights (effective matrix)"
    return W_eff, W_O, desc


def _drop_zeros(eigs: torch.Tensor, tol: float) -> torch.Tensor:
    """Mask [..., k]: True where |lambda| is above ``tol`` times the largest |lambda|."""
    mag = eigs.abs()
    scale = mag.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(mag.dtype).tiny)
    return mag > tol * scale


def _sort_eigs(eigs: torch.Tensor) -> torch.Tensor:
    """Descending real part, then imaginary part (stable for conjugate pairs)."""
    idx = torch.argsort(eigs.imag, dim=-1, descending=True, stable=True)
    eigs = torch.gather(eigs, -1, idx)
    idx = torch.argsort(eigs.real, dim=-1, descending=True, stable=True)
    return torch.gather(eigs, -1, idx)


def classify_spectrum(
    eigenvalues: Complex[torch.Tensor, " eig"] | Float[torch.Tensor, " eig"], *, causal: bool = True,
    tol: float = 1e-6,
) -> tuple[str, float]:
    """The reading a (non-zero) OV spectrum allows on its own, and mu_DC.

    Dovonon et al.: DC modes grow like ``mu_DC = max_j |1 + lambda_j|``, a high-frequency
    mode with attention eigenvalue ``a`` like ``f(a) = max_j |1 + a lambda_j|``.
    For causal attention the HF eigenvalues are the self-attention weights, real in
    [0, 1); f is convex, so the bound HF can reach is ``max(f(0), f(1)) = max(1, mu_DC)``:

    * ``mu_DC > 1``: DC wins for every attention -> 'smoothing', or 'DC-flipping' when the
      largest DC mode has Re(1 + lambda) < 0 (it changes sign every layer and grows;
      the real-spectrum case lambda < -2);
    * ``mu_DC < 1`` and some largest DC mode has ``Re lambda + |lambda|^2 < 0`` (the open
      disk ``|lambda + 1/2| < 1/2``, which holds all of (-1, 0)), or ``mu_DC = 0``: f
      decreases into a = 1, so every HF mode beats DC -> 'sharpening';
    * otherwise -> 'depends on attention' (e.g. real eigenvalues in (-2, -1): sharpening
      when A has small eigenvalues).

    For bidirectional attention (HF eigenvalues anywhere in the unit disk) the reading is
    the paper's theorems only: 'smoothing' when the largest ``1 + |lambda_j|`` belongs to
    positive real eigenvalues only, 'sharpening' when all eigenvalues are real in
    [-1, 0), else 'depends on attention'. All positive real spectra are 'smoothing' and
    spectra in [-1, 0) 'sharpening' in both cases. Eigenvalues with |lambda| below
    ``tol`` times the largest are zeros (they leave their subspace untouched) and are
    ignored; an all-zero spectrum is 'inert' with mu_DC = 1.
    """
    lam = torch.as_tensor(eigenvalues).detach().to(torch.complex128).flatten()
    if lam.numel() == 0:
        return INERT, 1.0
    lam = lam[_drop_zeros(lam, tol)]
    if lam.numel() == 0:
        return INERT, 1.0
    scale = max(1.0, float(lam.abs().max()))
    eps = tol * scale
    dc = (1 + lam).abs()
    mu_dc = float(dc.max())
    active = dc >= mu_dc - eps
    real = lam.imag.abs() <= eps
    if causal:
        if mu_dc > 1 + eps:
            flips = bool(((1 + lam.real) < 0)[active].all())
            return (DC_FLIPPING if flips else SMOOTHING), mu_dc
        if mu_dc < 1 - eps:
            slope = lam.real + lam.abs() ** 2  # sign of d|1 + a lambda|/da at a = 1
            if mu_dc <= eps or bool((slope[active] < -eps).any()):
                return SHARPENING, mu_dc
        return DEPENDS, mu_dc
    reach = 1 + lam.abs()
    top = reach >= float(reach.max()) - eps
    if bool((real & (lam.real > 0))[top].all()) and float(reach.max()) <= mu_dc + eps:
        return SMOOTHING, mu_dc
    if bool(real.all()) and bool(((lam.real < 0) & (lam.real >= -1 - eps)).all()):
        return SHARPENING, mu_dc
    return DEPENDS, mu_dc


def _layer_eigenvalues(W_V: torch.Tensor, W_O: torch.Tensor) -> torch.Tensor:
    """Spectrum of sum_h W_V^h W_O^h per layer, on the smaller side of the factorisation.

    The head sum is ``A B`` with A = [W_V^1 ... W_V^H] (d x H d_head) and B the W_O
    stacked; its non-zero eigenvalues are those of ``B A`` (H d_head square). Whichever is
    smaller is solved: d values when H d_head >= d, else the H d_head values that can be
    non-zero (the other d - H d_head eigenvalues are exactly zero).
    """
    L, H, d, dh = W_V.shape
    A = W_V.permute(0, 2, 1, 3).reshape(L, d, H * dh)
    B = W_O.reshape(L, H * dh, d)
    M = A @ B if H * dh >= d else B @ A
    return torch.linalg.eigvals(M)


class _HeadsAndSum:
    """Shared by the two results with one row per head and one per layer's head sum:
    complex tensors are saved as (real, imag) pairs, and the table's ``head`` column is
    a nullable int (<NA> on the head-sum rows)."""

    def _state(self) -> dict[str, Any]:
        state = super()._state()  # type: ignore[misc]
        cx = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_complex()]
        return {**state, **{k: torch.view_as_real(state[k]) for k in cx}, "complex_fields": cx}

    @classmethod
    def _from_state(cls, state: dict[str, Any]) -> Any:
        state = dict(state)
        for k in state.pop("complex_fields", []):
            state[k] = torch.view_as_complex(state[k].contiguous())
        return super()._from_state(state)  # type: ignore[misc]

    def to_dataframe(self) -> Any:
        df = super().to_dataframe()  # type: ignore[misc]
        df["head"] = df["head"].astype("Int64")
        return df


def _heads_and_sum(layers: Sequence[int], n_heads: int, has_sum: bool, cells: list[list[dict]]) -> Table:
    """A (layer, head) table whose last "head" is the layer's head sum (head <NA>, kind
    'layer') when ``has_sum``; ``cells[i][u]`` holds the columns of layer i, unit u."""
    import numpy as np
    import pandas as pd

    units = list(range(n_heads)) + ([pd.NA] if has_sum else [])
    cols: dict[str, Any] = {"kind": (("head",), ["head"] * n_heads + ["layer"] * has_sum)}
    cols.update({c: (("layer", "head"), np.asarray([[cell[c] for cell in row] for row in cells]))
                 for c in cells[0][0]})
    return Table({"layer": list(layers), "head": units}, cols)


def _spectrum_stats(eigs: torch.Tensor, reading: str, mu_dc: float, causal: bool) -> dict[str, Any]:
    """One table row of a spectrum: its reading, mu_DC, the HF bound and eigenvalue counts."""
    n = eigs.numel()
    real = eigs.imag.abs() <= 1e-9 * max(1.0, float(eigs.abs().max()) if n else 1.0)
    bound = 1.0 if n == 0 else max(1.0, mu_dc) if causal else 1.0 + float(eigs.abs().max())
    return dict(
        reading=reading, mu_dc=mu_dc, mu_hf_bound=bound, n_nonzero=n,
        n_positive=int((real & (eigs.real > 0)).sum()), n_negative=int((real & (eigs.real < 0)).sum()),
        n_complex=int((~real).sum()),
        min_real=float(eigs.real.min()) if n else math.nan,
        max_real=float(eigs.real.max()) if n else math.nan,
        max_abs_imag=float(eigs.imag.abs().max()) if n else math.nan,
    )


@dataclass(frozen=True)
class OVSpectrum(_HeadsAndSum, Result):
    """OV eigenspectra of a model and the reading each allows (Dovonon et al.).

    head_eigenvalues:  complex [layer, head, eig] (eig = d_head), the non-zero spectrum of
                       each head's H = W_V W_O (eigenvalues of the d_head x d_head
                       W_O W_V), sorted by descending real part. Zeros (rank deficiency)
                       are kept in the tensor and marked False in ``head_nonzero``.
    head_nonzero:      bool [layer, head, eig].
    layer_eigenvalues: complex [layer, layer_eig], spectrum of the head sum sum_h H_h,
                       layer_eig = min(d_model, heads * d_head) (the rest are exactly zero).
    layer_nonzero:     bool [layer, layer_eig].
    head_mu_dc:        [layer, head] mu_DC = max_j |1 + lambda_j| over non-zero lambda.
    layer_mu_dc:       [layer].
    head_reading:      per layer a tuple of per-head readings (see :data:`READINGS`).
    layer_reading:     per layer, the reading of the head sum.
    (The four ``layer_*`` fields are None when computed with ``per_layer=False``.)
    layers:            the layer indices analysed.
    fold_ln:           whether ln1's gamma (and centring) is in the matrix.
    weights:           which weights were used, in words.
    causal:            whether the readings assume causal attention.
    """

    AXES: ClassVar = {
        "head_eigenvalues": ("layer", "head", "eig"), "head_nonzero": ("layer", "head", "eig"),
        "layer_eigenvalues": ("layer", "layer_eig"), "layer_nonzero": ("layer", "layer_eig"),
        "head_mu_dc": ("layer", "head"), "layer_mu_dc": ("layer",),
    }
    TITLE: ClassVar = "OV eigenspectra"

    head_eigenvalues: torch.Tensor
    head_nonzero: torch.Tensor
    layer_eigenvalues: torch.Tensor | None
    layer_nonzero: torch.Tensor | None
    head_mu_dc: torch.Tensor
    layer_mu_dc: torch.Tensor | None
    head_reading: tuple[tuple[str, ...], ...]
    layer_reading: tuple[str, ...] | None
    layers: tuple[int, ...]
    fold_ln: bool
    weights: str
    causal: bool

    def head(self, layer: int, head: int) -> Complex[torch.Tensor, " eig"]:
        """The non-zero eigenvalues of one head (``layer`` is a model layer index)."""
        i = self._row(layer)
        return self.head_eigenvalues[i, head][self.head_nonzero[i, head]]

    def layer(self, layer: int) -> Complex[torch.Tensor, " eig"]:
        """The non-zero eigenvalues of one layer's head sum."""
        i = self._row(layer)
        if self.layer_eigenvalues is None:
            raise InputError("layer spectra were not computed; call ov_spectrum(..., per_layer=True).")
        return self.layer_eigenvalues[i][self.layer_nonzero[i]]

    def _row(self, layer: int) -> int:
        if layer not in self.layers:
            raise InputError(f"layer {layer} was not analysed; layers are {list(self.layers)}.")
        return self.layers.index(layer)

    def _table(self) -> Table:
        """One row per head and one per layer sum (head = <NA>, kind 'layer').

        Columns: reading, mu_dc, ``mu_hf_bound`` (the largest |1 + a lambda_j| any
        high-frequency mode can reach: max(1, mu_DC) for causal attention, whose HF
        eigenvalues a lie in [0, 1), and 1 + max_j |lambda_j| for bidirectional attention,
        a in the unit disk), and counts/ranges of the non-zero eigenvalues.
        """
        H, has_sum = self.head_eigenvalues.shape[1], self.layer_reading is not None
        cells = []
        for i, l in enumerate(self.layers):
            row = [_spectrum_stats(self.head(l, h), self.head_reading[i][h], float(self.head_mu_dc[i, h]),
                                   self.causal) for h in range(H)]
            if has_sum:
                row.append(_spectrum_stats(self.layer(l), self.layer_reading[i], float(self.layer_mu_dc[i]),
                                           self.causal))
            cells.append(row)
        return _heads_and_sum(self.layers, H, has_sum, cells)

    def summary(self) -> dict[str, Any]:
        """How many heads (and head sums) got each reading, and which weights were used."""
        out: dict[str, Any] = {f"heads {r}": n for r, n in Counter(sum(self.head_reading, ())).items()}
        out.update({f"layers {r}": n for r, n in Counter(self.layer_reading or ()).items()})
        return {**out, "max head mu_dc": float(self.head_mu_dc.max()), "weights": self.weights}

    def eigen_dataframe(self) -> Any:
        """Long format: one row per non-zero eigenvalue (layer, head or <NA>, real, imag)."""
        import pandas as pd

        rows = []
        for l in self.layers:
            for h in range(self.head_eigenvalues.shape[1]):
                for z in self.head(l, h).tolist():
                    rows.append(dict(layer=l, head=h, kind="head", real=z.real, imag=z.imag))
            for z in (self.layer(l).tolist() if self.layer_eigenvalues is not None else []):
                rows.append(dict(layer=l, head=pd.NA, kind="layer", real=z.real, imag=z.imag))
        df = pd.DataFrame(rows, columns=["layer", "head", "kind", "real", "imag"])
        df["head"] = df["head"].astype("Int64")
        return df

    def plot(self, layers: Sequence[int] | None = None, *, ncols: int = 4, regions: bool = True) -> Any:
        """Eigenvalues in the complex plane, one panel per layer, region boundaries drawn.

        Dots: per-head non-zero eigenvalues (one colour per head); open circles: the
        layer's head sum. Boundaries (causal reading of a single eigenvalue): the circle
        |1 + lambda| = 1 (outside: DC grows, smoothing; left of Re = -1 outside it:
        DC-flipping) and the circle |lambda + 1/2| = 1/2 (inside: sharpening guaranteed);
        in between the outcome depends on the attention spectrum.
        """
        import matplotlib.pyplot as plt

        layers = list(self.layers if layers is None else layers)
        n = len(layers)
        ncols = max(1, min(ncols, n))
        nrows = math.ceil(n / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 3.2 * nrows), squeeze=False)
        cmap = plt.get_cmap("tab10")
        for k, l in enumerate(layers):
            ax = axes[k // ncols][k % ncols]
            if regions:
                _draw_regions(ax)
            for h in range(self.head_eigenvalues.shape[1]):
                z = self.head(l, h)
                ax.scatter(z.real, z.imag, s=14, color=cmap(h % 10), label=f"head {h}", zorder=3)
            title = f"layer {l}"
            if self.layer_eigenvalues is not None:
                z = self.layer(l)
                ax.scatter(z.real, z.imag, s=34, facecolors="none", edgecolors="k",
                           linewidths=0.8, label="head sum", zorder=2)
                title += f": {self.layer_reading[self._row(l)]}"
            ax.set_title(title, fontsize=9)
            ax.axhline(0, color="0.8", lw=0.5, zorder=0)
            ax.axvline(0, color="0.8", lw=0.5, zorder=0)
            ax.set_xlabel("Re $\\lambda^H$", fontsize=8)
            ax.set_ylabel("Im $\\lambda^H$", fontsize=8)
            ax.tick_params(labelsize=7)
        for k in range(n, nrows * ncols):
            axes[k // ncols][k % ncols].axis("off")
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper right", fontsize=7)
        fig.suptitle(f"OV eigenvalues ({self.weights})", fontsize=9)
        fig.tight_layout(rect=(0, 0, 0.9, 0.95))
        return fig

    def show(self) -> Any:
        """The complex-plane plot, the readings and the per-layer/per-head table."""
        from .views import escape, figure_view, table_html

        df = self.to_dataframe()[["layer", "head", "kind", "reading", "mu_dc", "n_nonzero",
                                  "n_positive", "n_negative", "n_complex"]]
        note = f"<p class='note'>{escape(self.weights)}</p>"
        return figure_view(self.plot(), self.TITLE, self.summary(), extra_html=note + table_html(df, na_rep=""))


def _draw_regions(ax: Any) -> None:
    import matplotlib.patches as mpatches

    ax.add_patch(mpatches.Circle((-1, 0), 1, fill=False, ls="--", lw=0.8, color="tab:blue"))
    ax.add_patch(mpatches.Circle((-0.5, 0), 0.5, fill=True, alpha=0.12, color="tab:red", lw=0))
    ax.axvline(-1, ls=":", lw=0.7, color="tab:purple")
    ax.text(0.02, 0.97, "outside dashed: smoothing", transform=ax.transAxes, fontsize=6,
            va="top", color="tab:blue")
    ax.text(0.02, 0.90, "red disk: sharpening", transform=ax.transAxes, fontsize=6,
            va="top", color="tab:red")
    ax.set_aspect("equal", adjustable="datalim")
    ax.update_datalim([(-2.1, -1.1), (0.4, 1.1)])


@extractor
def ov_spectrum(
    model: Any,
    *,
    fold_ln: bool = True,
    layers: Sequence[int] | int | None = None,
    per_layer: bool = True,
    tol: float = 1e-6,
    progress: bool = True,
) -> OVSpectrum:
    """OV eigenspectra per head and per layer with the smoothing/sharpening reading.

    Dovonon et al. (TMLR 2025): each head's ``H = W_V W_O`` (TransformerLens's
    ``model.OV[l, h]``) has rank <= d_head; its non-zero spectrum is that of the
    d_head x d_head matrix ``W_O W_V`` (``FactoredMatrix.eigenvalues``), never a d x d
    eigensolve. A layer's H is the head sum (:func:`_layer_eigenvalues`). ``fold_ln``
    selects the effective pre-LN matrix ``P_c diag(gamma) W_V W_O`` (default) or the
    stored ``W_V W_O``; see :func:`ov_factors` for how raw and TransformerLens-folded
    models are handled; ``result.weights`` says which was used. Readings follow
    :func:`classify_spectrum` for the model's attention direction. Computed in float64.
    ``per_layer=False`` skips the head-sum spectra (a d_model x d_model eigensolve per
    layer when heads * d_head >= d_model, the expensive part on large models).
    """
    from transformer_lens import FactoredMatrix

    with torch.no_grad():
        W_V, W_O, desc = ov_factors(model, fold_ln=fold_ln, layers=layers)
        check_finite(W_V, "W_V")
        check_finite(W_O, "W_O")
        head_eigs = _sort_eigs(FactoredMatrix(W_V, W_O).eigenvalues.to(torch.complex128))
        steps = range(W_V.shape[0]) if per_layer else range(0)
        layer_list = [_layer_eigenvalues(W_V[i : i + 1], W_O[i : i + 1])[0]
                      for i in tqdm(steps, desc="layer spectra", disable=not progress)]
    layer_eigs = _sort_eigs(torch.stack(layer_list).to(torch.complex128)) if per_layer else None
    causal = _is_causal(model)
    head_rs = [_readings(e, causal, tol) for e in head_eigs]
    layer_rs = _readings(layer_eigs, causal, tol) if per_layer else None
    return OVSpectrum(
        head_eigenvalues=head_eigs,
        head_nonzero=_drop_zeros(head_eigs, tol),
        layer_eigenvalues=layer_eigs,
        layer_nonzero=_drop_zeros(layer_eigs, tol) if per_layer else None,
        head_mu_dc=torch.stack([mu for _, mu in head_rs]),
        layer_mu_dc=layer_rs[1] if per_layer else None,
        head_reading=tuple(r for r, _ in head_rs),
        layer_reading=layer_rs[0] if per_layer else None,
        layers=tuple(check_layers(model, layers)),
        fold_ln=bool(fold_ln) and _norm_type(model) is not None,
        weights=desc,
        causal=causal,
    )


def _readings(spectra: torch.Tensor, causal: bool, tol: float) -> tuple[tuple[str, ...], torch.Tensor]:
    """:func:`classify_spectrum` of each row of ``spectra`` [n, k]: (readings, mu_DC [n])."""
    rs = [classify_spectrum(e, causal=causal, tol=tol) for e in spectra]
    return tuple(r for r, _ in rs), torch.tensor([m for _, m in rs], dtype=torch.float64)


# --------------------------------------------------------------------------- dominance
def attention_eigenvalues(
    pattern: Float[torch.Tensor, "*batch query key"], *, causal: bool | None = None
) -> Float[torch.Tensor, "*batch pos"] | Complex[torch.Tensor, "*batch pos"]:
    """Eigenvalues of attention matrices ``pattern`` [..., n, n] (rows sum to 1).

    Causal (lower-triangular) attention: the diagonal, exactly (real; index 0 is the
    DC eigenvalue 1, the first token attending to itself). Otherwise a dense eigensolve
    (complex), reordered so that the eigenvalue closest to 1 (the DC one, A 1 = 1) comes
    first. ``causal=None`` detects lower-triangularity.
    """
    p = pattern.detach()
    if causal is None:
        upper = torch.triu(p, diagonal=1)
        causal = bool((upper.abs() <= 1e-12 * p.abs().amax().clamp_min(1e-30)).all())
    if causal:
        return torch.diagonal(p, dim1=-2, dim2=-1).to(torch.float64)
    eig = torch.linalg.eigvals(p.to(torch.float64))
    first = (eig - 1).abs().argmin(dim=-1, keepdim=True)
    n = eig.shape[-1]
    idx = torch.arange(n, device=eig.device).expand_as(eig)
    # Move the DC eigenvalue to the front, keep the others in order.
    order = torch.where(idx == 0, first, torch.where(idx <= first, idx - 1, idx))
    return torch.gather(eig, -1, order)


def update_eigenvalues(
    attn_eigs: Float[torch.Tensor, "*batch pos"] | Complex[torch.Tensor, "*batch pos"],
    ov_eigs: Complex[torch.Tensor, "*batch eig"] | Float[torch.Tensor, "*batch eig"],
) -> Complex[torch.Tensor, "*batch pos eig"]:
    """``mu_ij = 1 + lambda^A_i lambda^H_j``: the eigenvalues of ``I + H^T (x) A``.

    ``attn_eigs`` [..., n], ``ov_eigs`` [..., k] (broadcast leading dims); result
    [..., n, k] complex. Row 0 (the DC attention eigenvalue 1) holds the DC modes.
    """
    a = torch.as_tensor(attn_eigs).to(torch.complex128)
    h = torch.as_tensor(ov_eigs).to(torch.complex128)
    return 1 + a[..., :, None] * h[..., None, :]


def _mu(attn_eigs: torch.Tensor, ov_eigs: torch.Tensor, ov_mask: torch.Tensor) -> tuple:
    """(mu_DC [...], mu_HF [...]) over non-zero OV eigenvalues; attn index 0 is DC.

    A zero OV eigenvalue leaves its subspace untouched (|mu| = 1 for every attention
    eigenvalue), so like :func:`classify_spectrum` it takes no part in either maximum:
    counting it would put a floor of 1 under mu_HF and mu_DC alike.
    """
    mu = update_eigenvalues(attn_eigs, ov_eigs).abs()  # [..., n, k]
    mask = ov_mask[..., None, :].expand_as(mu)
    # |mu| >= 0, so 0 never wins a maximum that has at least one non-zero OV eigenvalue.
    mu = torch.where(mask, mu, torch.zeros_like(mu))
    has_any = ov_mask.any(dim=-1)
    mu_dc = torch.where(has_any, mu[..., 0, :].amax(dim=-1), torch.ones_like(mu[..., 0, 0]))
    mu_hf = torch.where(has_any, mu[..., 1:, :].amax(dim=(-2, -1)), torch.ones_like(mu_dc))
    return mu_dc, mu_hf


def _verdict(mu_dc: torch.Tensor, mu_hf: torch.Tensor, tol: float) -> torch.Tensor:
    """+1 where DC dominates, -1 where HF does, 0 for a tie (within ``tol`` relative)."""
    eps = tol * torch.maximum(mu_dc, mu_hf).clamp_min(1.0)
    out = torch.zeros_like(mu_dc, dtype=torch.int8)
    out[mu_dc > mu_hf + eps] = 1
    out[mu_hf > mu_dc + eps] = -1
    return out


@dataclass(frozen=True)
class Dominance(_HeadsAndSum, Result):
    """Which eigenmode dominates, per layer, head and input (Dovonon et al.'s table).

    attn_eigenvalues: [prompt, layer, head, pos] attention eigenvalues (real, the
                      diagonal, for causal models; complex otherwise); index 0 is DC.
    mu_hf:            [prompt, layer, head] max_{i>=2, j} |1 + lambda^A_i lambda^H_j|.
    dominant:         int8 [prompt, layer, head]: +1 DC, -1 HF, 0 tie.
    layer_mu_hf:      [prompt, layer] for the head sum H = sum_h H_h, with the head-averaged attention (exact when the
                      heads share one pattern; the per-head columns are always exact).
    layer_dominant:   int8 [prompt, layer].
    (The two ``layer_*`` fields are None with ``per_layer=False``.)
    spectrum:         the :class:`OVSpectrum` the OV eigenvalues came from; ``mu_dc``
                      [layer, head] and ``layer_mu_dc`` [layer] are its input-independent
                      max_j |1 + lambda^H_j|.
    layers:           the layer indices analysed.
    """

    AXES: ClassVar = {
        "mu_hf": ("prompt", "layer", "head"), "dominant": ("prompt", "layer", "head"),
        "attn_eigenvalues": ("prompt", "layer", "head", "pos"),
        "layer_mu_hf": ("prompt", "layer"), "layer_dominant": ("prompt", "layer"),
    }
    TITLE: ClassVar = "Dominant eigenmodes"

    attn_eigenvalues: torch.Tensor
    mu_hf: torch.Tensor
    dominant: torch.Tensor
    layer_mu_hf: torch.Tensor | None
    layer_dominant: torch.Tensor | None
    spectrum: OVSpectrum
    layers: tuple[int, ...]

    @property
    def mu_dc(self) -> Float[torch.Tensor, "layer head"]:
        """[layer, head] max_j |1 + lambda^H_j| of each head (input-independent)."""
        return self.spectrum.head_mu_dc

    @property
    def layer_mu_dc(self) -> Float[torch.Tensor, " layer"] | None:
        """[layer] the same for the head sum (None with ``per_layer=False``)."""
        return self.spectrum.layer_mu_dc

    @property
    def frac_dc(self) -> Float[torch.Tensor, "layer head"]:
        """[layer, head] fraction of inputs where DC dominates."""
        return (self.dominant == 1).double().mean(dim=0)

    @property
    def frac_hf(self) -> Float[torch.Tensor, "layer head"]:
        """[layer, head] fraction of inputs where an HF mode dominates."""
        return (self.dominant == -1).double().mean(dim=0)

    @property
    def layer_frac_dc(self) -> Float[torch.Tensor, " layer"] | None:
        """[layer] fraction of inputs where DC dominates the head-sum update."""
        return None if self.layer_dominant is None else (self.layer_dominant == 1).double().mean(0)

    @property
    def layer_frac_hf(self) -> Float[torch.Tensor, " layer"] | None:
        return None if self.layer_dominant is None else (self.layer_dominant == -1).double().mean(0)

    def _table(self) -> Table:
        """One row per head and per layer (head <NA>): fractions DC / HF / tie, mu values."""
        has_sum = self.layer_dominant is not None

        def units(head: torch.Tensor, layer: torch.Tensor | None) -> torch.Tensor:  # [..., layer, unit]
            return torch.cat([head, layer[..., None]], -1) if has_sum else head

        d = units(self.dominant, self.layer_dominant)
        cols = dict(frac_dc=(d == 1).double().mean(0), frac_hf=(d == -1).double().mean(0),
                    frac_tie=(d == 0).double().mean(0), mu_dc=units(self.mu_dc, self.layer_mu_dc),
                    mu_hf_mean=units(self.mu_hf, self.layer_mu_hf).mean(0))
        spec = self.spectrum
        readings = [spec.head_reading[i] + ((spec.layer_reading[i],) if has_sum else ())
                    for i in range(len(self.layers))]
        cells = [[{k: float(v[i, u]) for k, v in cols.items()} | {"reading": readings[i][u]}
                  for u in range(d.shape[-1])] for i in range(len(self.layers))]
        return _heads_and_sum(self.layers, self.mu_dc.shape[1], has_sum, cells)

    def summary(self) -> dict[str, Any]:
        """Fractions of (input, layer, head) cases won by DC and by HF, and the same for head sums."""
        out = {"frac_dc": float(self.frac_dc.mean()), "frac_hf": float(self.frac_hf.mean())}
        if self.layer_dominant is not None:
            out.update(layer_frac_dc=float(self.layer_frac_dc.mean()), layer_frac_hf=float(self.layer_frac_hf.mean()))
        return out

    def plot(self) -> Any:
        """Heatmap of the fraction of inputs where DC dominates, layers x (heads + sum)."""
        import matplotlib.pyplot as plt

        H = self.mu_dc.shape[1]
        cols = [self.frac_dc] + ([] if self.layer_dominant is None else [self.layer_frac_dc[:, None]])
        grid = torch.cat(cols, dim=1).numpy()
        fig, ax = plt.subplots(figsize=(1.0 + 0.55 * (H + 1), 1.0 + 0.35 * len(self.layers)))
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="coolwarm", aspect="auto")
        ax.set_xticks(range(grid.shape[1]), ([str(h) for h in range(H)] + ["sum"])[: grid.shape[1]],
                      fontsize=7)
        ax.set_yticks(range(len(self.layers)), [str(l) for l in self.layers], fontsize=7)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title("fraction of inputs where DC dominates", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.05)
        fig.tight_layout()
        return fig


@extractor
def dominance(
    model: Any,
    tokens: Tokens | None = None,
    *,
    cache: Any = None,
    fold_ln: bool = True,
    layers: Sequence[int] | int | None = None,
    per_layer: bool = True,
    tol: float = 1e-6,
    progress: bool = True,
) -> Dominance:
    """Per layer, head and input: does the DC or a high-frequency mode dominate?

    Dovonon et al.: with the head's attention eigenvalues lambda^A (the diagonal for
    causal attention) and OV eigenvalues lambda^H (non-zero spectrum, :func:`ov_spectrum`
    with the same ``fold_ln``), ``mu_DC = max_j |1 + lambda^H_j|`` and ``mu_HF =
    max_{i>=2, j} |1 + lambda^A_i lambda^H_j|``; the larger one dominates with depth.
    Per layer the head sum's spectrum is paired with the head-averaged attention. Needs
    at least two positions (one token has no high-frequency mode). ``per_layer=False``
    skips the head-sum analysis (see :func:`ov_spectrum`). The attention patterns
    (``blocks.{l}.attn.hook_pattern``) come from a forward pass on ``tokens`` or from
    ``cache`` (an ``ActivationCache`` of ``model``, e.g. ``model.run_with_cache(tokens)[1]``).
    """
    spec = ov_spectrum(model, fold_ln=fold_ln, layers=layers, per_layer=per_layer, tol=tol,
                       progress=False)
    names = [f"blocks.{l}.attn.hook_pattern" for l in spec.layers]
    acts = activations(model, tokens, names, cache)
    if acts[names[0]].shape[-1] < 2:
        raise InputError(
            "dominance needs sequences of at least 2 tokens: with one token there is no"
            " high-frequency mode to compare with DC."
        )
    attn, mu_hf, lmu_hf = [], [], []
    for i, name in enumerate(tqdm(names, desc="dominance", disable=not progress)):
        pat = check_pattern(acts[name].detach().to(torch.float64), f"attention pattern {name!r}")
        attn.append(attention_eigenvalues(pat, causal=spec.causal))  # [batch, heads, pos]
        mu_hf.append(_mu(attn[-1], spec.head_eigenvalues[i][None], spec.head_nonzero[i][None])[1])
        if per_layer:
            la = attention_eigenvalues(pat.mean(dim=1), causal=spec.causal)  # [batch, pos]
            lmu_hf.append(_mu(la, spec.layer_eigenvalues[i][None], spec.layer_nonzero[i][None])[1])
    mu_hf_t = torch.stack(mu_hf, dim=1)  # [batch, layers, heads]
    lmu_hf_t = torch.stack(lmu_hf, dim=1) if per_layer else None  # [batch, layers]
    return Dominance(
        attn_eigenvalues=torch.stack(attn, dim=1),
        mu_hf=mu_hf_t,
        dominant=_verdict(spec.head_mu_dc[None].expand_as(mu_hf_t), mu_hf_t, tol),
        layer_mu_hf=lmu_hf_t,
        layer_dominant=_verdict(spec.layer_mu_dc[None].expand_as(lmu_hf_t), lmu_hf_t, tol) if per_layer else None,
        spectrum=spec,
        layers=spec.layers,
    )


# --------------------------------------------------------------------------- profiles
def sequence_measures(X: Float[torch.Tensor, "*batch pos d"]) -> dict[str, Float[torch.Tensor, "*batch"]]:
    """Smoothing measures of token matrices ``X`` [..., n, d] (Dovonon et al.).

    * ``hc_dc``: ||HC[X]||_F / ||DC[X]||_F with DC[X] = 1 mean(X)^T (token mean broadcast
      to every row) and HC[X] = X - DC[X];
    * ``cosine``: mean cosine similarity over the n(n-1)/2 pairs of distinct tokens;
    * ``dirichlet``: normalised Dirichlet energy on the complete token graph,
      sum_{i<j} ||x_i - x_j||^2 / (n ||X||_F^2) = tr(X^T (I - 11^T/n) X) / ||X||_F^2, in
      [0, 1] (0: all tokens equal). The graph is a choice (the paper does not fix one):
      the complete graph makes it input-only, and then it equals r^2 / (1 + r^2) with
      r = hc_dc, a bounded form of the same filter ratio;
    * ``sigma_ratio``: sigma_2 / sigma_1 of X (rank collapse -> 0).
    Computed in float64; ``n >= 2`` required.
    """
    X = X.detach().to(torch.float64)
    n = X.shape[-2]
    if n < 2:
        raise InputError("smoothing measures need at least 2 tokens per sequence.")
    mean = X.mean(dim=-2, keepdim=True)
    hc = X - mean
    hc_norm = hc.flatten(-2).norm(dim=-1)
    dc_norm = mean.squeeze(-2).norm(dim=-1) * math.sqrt(n)
    unit = X / X.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    gram = unit @ unit.transpose(-1, -2)
    cos = (gram.sum(dim=(-2, -1)) - torch.diagonal(gram, dim1=-2, dim2=-1).sum(-1)) / (n * (n - 1))
    total = X.flatten(-2).norm(dim=-1) ** 2
    dirichlet = hc_norm**2 / total.clamp_min(1e-300)
    sv = torch.linalg.svdvals(X)
    return {
        "hc_dc": hc_norm / dc_norm,
        "cosine": cos,
        "dirichlet": dirichlet,
        "sigma_ratio": sv[..., 1] / sv[..., 0],
    }


_MEASURES = ("hc_dc", "cosine", "dirichlet", "sigma_ratio")
_MEASURE_LABELS = {
    "hc_dc": "||HC|| / ||DC||",
    "cosine": "mean pairwise cosine",
    "dirichlet": "normalised Dirichlet energy",
    "sigma_ratio": "sigma_2 / sigma_1",
}


@dataclass(frozen=True)
class SmoothingProfile(Result):
    """Smoothing measures of every residual stream (Dovonon et al.).

    hc_dc, cosine, dirichlet, sigma_ratio: [prompt, depth], one column per hook of
    ``hooks`` (by default depth 0..n_layers: depth l is ``blocks.{l}.hook_resid_pre``,
    the input to block l, and the last one ``blocks.{L-1}.hook_resid_post``). See
    :func:`sequence_measures`.
    hooks: the hook read at each depth; label: the legend entry of :meth:`plot`.
    """

    AXES: ClassVar = {m: ("prompt", "depth") for m in ("hc_dc", "cosine", "dirichlet", "sigma_ratio")}
    TITLE: ClassVar = "Smoothing profile"

    hc_dc: torch.Tensor
    cosine: torch.Tensor
    dirichlet: torch.Tensor
    sigma_ratio: torch.Tensor
    hooks: tuple[str, ...]
    label: str = ""

    def measure(self, name: Literal["hc_dc", "cosine", "dirichlet", "sigma_ratio"]) -> Float[torch.Tensor, "prompt depth"]:
        if name not in _MEASURES:
            raise InputError(f"unknown measure {name!r}; choose one of {_MEASURES}.")
        return getattr(self, name)

    def mean(self, name: str) -> Float[torch.Tensor, " depth"]:
        """[depth] batch mean of a measure."""
        return self.measure(name).mean(dim=0)

    def std(self, name: str) -> Float[torch.Tensor, " depth"]:
        """[depth] batch standard deviation (0 for a batch of one)."""
        m = self.measure(name)
        return m.std(dim=0) if m.shape[0] > 1 else torch.zeros(m.shape[1], dtype=m.dtype)

    def _table(self) -> Table:
        """Long format: measure, depth, hook, and mean, std, min, max over the prompts."""
        stats = {"mean": self.mean, "std": self.std, "min": lambda n: self.measure(n).amin(0),
                 "max": lambda n: self.measure(n).amax(0)}
        cols: dict[str, Any] = {"hook": (("depth",), self.hooks)}
        cols.update({k: (("measure", "depth"), torch.stack([f(n) for n in _MEASURES])) for k, f in stats.items()})
        return Table({"measure": _MEASURES, "depth": range(len(self.hooks))}, cols)

    def summary(self) -> dict[str, Any]:
        """Each measure's batch mean at the first and the last depth."""
        return {f"{n}_{end}": float(self.mean(n)[i]) for n in _MEASURES for end, i in (("first", 0), ("last", -1))}

    def plot(
        self, axes: Any = None, *, label: str | None = None, log_hc_dc: bool = True, **line_kw: Any
    ) -> Any:
        """The four measures against depth (batch mean, band: +/- one std).

        Pass ``axes`` (4 Axes, e.g. from an earlier call's ``fig.axes``) to overlay
        several profiles; ``label`` names this one in the legend; ``line_kw`` go to
        ``Axes.plot`` (e.g. ``linestyle='--'``).
        """
        import matplotlib.pyplot as plt

        if axes is None:
            fig, axs = plt.subplots(1, 4, figsize=(14, 3.2))
            axs = list(axs)
        else:
            axs = list(axes)[:4]
            fig = axs[0].figure
        label = label if label is not None else (self.label or None)
        depth = torch.arange(len(self.hooks)).numpy()
        for ax, name in zip(axs, _MEASURES):
            mean, std = self.mean(name).numpy(), self.std(name).numpy()
            (line,) = ax.plot(depth, mean, **{"marker": ".", **line_kw}, label=label)
            lo = mean - std
            if name == "hc_dc" and log_hc_dc:
                ax.set_yscale("log")
                lo = mean * (mean / (mean + std))  # keep the band positive on a log axis
            ax.fill_between(depth, lo, mean + std, alpha=0.2, color=line.get_color())
            ax.set_title(_MEASURE_LABELS[name], fontsize=9)
            ax.set_xlabel("depth (residual stream)")
        if label:
            axs[0].legend(fontsize=8)
        fig.tight_layout()
        return fig


@extractor
def smoothing_profile(
    model: Any,
    tokens: Tokens | None = None,
    *,
    hooks: str | Sequence[str] | Callable[[str], bool] | None = None,
    cache: Any = None,
    label: str = "",
) -> SmoothingProfile:
    """||HC||/||DC||, mean pairwise cosine, normalised Dirichlet energy and sigma_2/sigma_1
    of the residual stream entering every block and leaving the last one, per input.

    Dovonon et al.: smoothing shows as ||HC||/||DC|| -> 0 and cosine -> 1 with depth;
    sharpening as a ratio that rises or levels off and cosine staying low. One guarded,
    no-grad forward pass on ``tokens``, or none with ``cache`` (an ``ActivationCache`` of
    ``model``); measures from :func:`sequence_measures`. ``hooks`` picks other streams
    the TransformerLens way (``names_filter``: a name, a list, or a predicate
    ``name -> bool``), each of shape [batch, pos, d], in model order.
    """
    L = model.cfg.n_layers
    names = ([f"blocks.{l}.hook_resid_pre" for l in range(L)] + [f"blocks.{L - 1}.hook_resid_post"]
             if hooks is None else hook_names(model, hooks))
    X = _streams(activations(model, tokens, names, cache), names)
    if X.shape[-2] < 2:
        raise InputError("smoothing_profile needs sequences of at least 2 tokens.")
    return SmoothingProfile(hooks=tuple(names), label=label, **sequence_measures(X))  # each [batch, depth]


def _streams(acts: dict[str, torch.Tensor], names: Sequence[str]) -> Float[torch.Tensor, "batch depth pos d"]:
    """The activations at ``names`` stacked along a depth axis (all of one shape)."""
    shapes = {tuple(acts[n].shape) for n in names}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise InputError(f"hooks must all hold [batch, pos, d] activations of one shape; got shapes {sorted(shapes)}"
                         f" for {list(names)}. Pick residual-stream hooks such as 'blocks.0.hook_resid_pre'.")
    return torch.stack([check_finite(acts[n], f"residual stream {n!r}") for n in names], dim=1)


# --------------------------------------------------------------------------- sign control
def sign_controlled(
    model: Any,
    sign: Literal["+", "-", "plus", "minus", 1, -1],
    *,
    psi: Float[torch.Tensor, "..."] | float | None = None,
    psi_range: tuple[float, float] = (0.5, 1.0),
    seed: int = 0,
    layers: Sequence[int] | int | None = None,
    zero_bias: bool = True,
) -> Any:
    """A copy of ``model`` whose every head's OV circuit has a spectrum of one sign.

    Dovonon et al.'s reparameterisation ``H = V Lambda V^T``, V orthogonal (QR of a
    Gaussian matrix, one per layer), ``Lambda = sign * diag(psi)^2``, split across heads
    as ``W_V^h = V_h`` (d_model x d_head, head h's block of columns) and ``W_O^h =
    Lambda_h V_h^T``, so head h's non-zero spectrum is exactly ``sign * psi_h^2`` and the
    head sum is ``V Lambda V^T``. When heads * d_head > d_model the columns cannot all be
    orthogonal; each head then gets its own QR (the head sum is still sign-definite).
    ``sign``: '+'/'-' (or +1/-1). ``psi``: None (uniform in ``psi_range``, seeded), a
    float, or a tensor broadcastable to [layers, heads, d_head]; '-' with psi <= 1 puts
    the spectrum in [-1, 0). ``zero_bias`` sets b_V and b_O to 0 (the paper's update has
    no bias). With layer norm the effective matrix is P_c diag(gamma) H, whose non-zero
    spectrum keeps the sign as long as gamma > 0 (as initialised); check with
    :func:`ov_spectrum`.

    Scale matters under a pre-LN block: the update is ``A LN(X) H`` and LN divides each
    token by its feature std sigma(x), so the eigenvalues acting on the stream are
    ``lambda / sigma``. A '-' model contracts the residual stream, sigma shrinks, and
    ``lambda / sigma`` drifts below -1 (then below -2, where DC flips and dominates
    again): with TransformerLens's initial residual scale (sigma ~ 0.3) use a small
    ``psi_range`` such as (0.2, 0.35) to see sharpening hold for ~30 layers. Without
    layer norm the paper's linear update holds exactly and the default range is fine.
    The user's model is not touched: the result is a deep copy (hooks registered on the
    original are copied along with it).
    """
    s = {"+": 1.0, "-": -1.0, 1: 1.0, -1: -1.0, "plus": 1.0, "minus": -1.0}.get(sign)
    if s is None:
        raise InputError(f"sign must be '+' or '-' (or +1/-1), got {sign!r}.")
    _tl.require_model(model)
    _check_mha(model)
    layer_ids = check_layers(model, layers)
    H, d, dh = model.cfg.n_heads, model.cfg.d_model, model.cfg.d_head
    gen = torch.Generator().manual_seed(seed)
    shape = (len(layer_ids), H, dh)
    if psi is None:
        lo, hi = psi_range
        if not 0 < lo <= hi:
            raise InputError(f"psi_range must satisfy 0 < low <= high, got {psi_range}.")
        psi_t = lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=torch.float64)
    else:
        try:
            psi_t = torch.broadcast_to(torch.as_tensor(psi, dtype=torch.float64), shape)
        except RuntimeError as e:
            raise InputError(f"psi must broadcast to [layers, heads, d_head] = {shape}: {e}") from e
    lam = s * psi_t**2
    new = copy_model(model)
    dtype = next(new.parameters()).dtype
    with torch.no_grad():
        for i, l in enumerate(layer_ids):
            if H * dh <= d:
                q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
                V = q[:, : H * dh].reshape(d, H, dh).permute(1, 0, 2)  # [H, d, dh]
            else:
                V = torch.stack([
                    torch.linalg.qr(torch.randn(d, dh, generator=gen, dtype=torch.float64))[0]
                    for _ in range(H)
                ])
            W_O = lam[i][:, :, None] * V.transpose(1, 2)  # [H, dh, d] = Lambda_h V_h^T
            _tl.head_weight(new, l, "W_V").copy_(V.to(dtype))
            _tl.head_weight(new, l, "W_O").copy_(W_O.to(dtype))
            if zero_bias:
                for b in ("b_V", "b_O"):
                    t = getattr(new.blocks[l].attn, b, None)
                    if isinstance(t, torch.Tensor):
                        _tl.head_weight(new, l, b).zero_()
    return new


def flip_ln_gamma(model: Any, *, layers: Sequence[int] | int | None = None) -> Any:
    """A copy of ``model`` with the sign of ln1's gamma flipped in ``layers``.

    Dovonon et al.: in a pre-LN block the OV map is P_c diag(gamma) W_V W_O, so negating
    gamma negates every OV eigenvalue and can turn a smoothing model into a sharpening
    one. On a raw model the ln1 scale is negated. On a model whose ln1 TransformerLens
    folded into the next weights (LNPre, or a bridge in compatibility mode) gamma lives
    in W_Q, W_K and W_V, and negating those three is exactly the same model (the folded
    biases b + beta W do not involve gamma). Models without layer norm raise.
    """
    _tl.require_model(model)
    if _norm_type(model) is None:
        raise InputError(
            "the model has no layer norm (normalization_type=None), so there is no ln1 gamma"
            " to flip; build it with normalization='LN' or 'RMS'."
        )
    layer_ids = check_layers(model, layers)
    folded = _tl.is_folded(model)
    new = copy_model(model)
    with torch.no_grad():
        for l in layer_ids:
            g = _tl.norm_scale(new, l)
            if folded or g is None:
                _check_mha(new)
                for name in ("W_Q", "W_K", "W_V"):
                    _tl.head_weight(new, l, name).neg_()
            else:
                g.neg_()
    return new
