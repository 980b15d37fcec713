"""Induction heads: the real-text case of stacked attention heads.

Musat ("Mechanism and Emergence of Stacked Attention Heads in Multi-Layer Transformers",
ICLR 2025) studies heads that compose across layers: an early head resolves one hop and a
later head reads the position it prepared. On natural text the simplest such stack is the
induction circuit of Elhage et al. ("A Mathematical Framework for Transformer Circuits",
2021) and Olsson et al. ("In-context Learning and Induction Heads", 2022): a
previous-token head in layer l1 writes "the token before me was a" into position t; an
induction head in layer l2 > l1 matches its query token a against those keys
(K-composition) and attends to t, whose token it copies.

* :func:`induction_heads` -- on repeated random tokens ``[bos] r_1..r_h r_1..r_h``: per
  head the previous-token and induction scores read from the attention pattern, the
  heads above a threshold, the K-composition of every earlier head into every later one
  against the baseline of all head pairs, the loss on the first and the repeated half,
  and a per-head mean ablation (which heads the repeated half's low loss rests on);
* :func:`induction_emergence` -- the same scores and losses along training checkpoints:
  the step at which an induction head appears, and the step at which the repeated half
  becomes easier to predict than the first (the in-context loss drop).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from jaxtyping import Float, Int

from . import _tl
from .core import extractor, guard, progress_bar, run_hooked
from .errors import InputError
from .inputs import check_finite, checkpoint_list, head_name, materialise, model_device
from .models import str_tokens
from .results import Result, Table

# ruff: noqa: F722  (jaxtyping shape strings such as "batch pos" are not Python expressions)

__all__ = ["InductionEmergence", "InductionHeads", "composition_scores", "induction_emergence",
           "induction_heads", "k_composition_scores", "repeated_tokens"]

Kind = Literal["K", "Q", "V"]


def _bos_of(model: Any) -> int | None:
    tok = getattr(model, "tokenizer", None)
    bos = getattr(tok, "bos_token_id", None) if tok is not None else None
    return int(bos) if isinstance(bos, int) and 0 <= bos < model.cfg.d_vocab else None


def repeated_tokens(model: Any, half: int = 100, batch: int = 16, *, seed: int = 0,
                    bos: int | str | None = "auto") -> Int[torch.Tensor, "batch pos"]:
    """[batch, o + 2 half] sequences ``[bos] r_1..r_half r_1..r_half`` of uniform random
    tokens (``torch.Generator`` seeded with ``seed``; the BOS id is never drawn). ``bos``:
    a token id, None (no prefix) or 'auto' (the tokenizer's BOS, if it has one); o = 1
    with a prefix, else 0."""
    if bos == "auto":
        bos = _bos_of(model)
    V = model.cfg.d_vocab
    if not isinstance(half, int) or half < 2:
        raise InputError(f"half must be an int >= 2, got {half!r}.")
    if not isinstance(batch, int) or batch < 1:
        raise InputError(f"batch must be a positive int, got {batch!r}.")
    o = 0 if bos is None else 1
    if o + 2 * half > model.cfg.n_ctx:
        raise InputError(f"sequences of {o + 2 * half} tokens exceed the model's n_ctx ="
                         f" {model.cfg.n_ctx}; use half <= {(model.cfg.n_ctx - o) // 2}.")
    g = torch.Generator().manual_seed(int(seed))
    if bos is None:
        r = torch.randint(0, V, (batch, half), generator=g)
    else:
        if not 0 <= int(bos) < V:
            raise InputError(f"bos token {bos} is outside the vocabulary [0, {V}).")
        r = torch.randint(0, V - 1, (batch, half), generator=g)
        r = r + (r >= int(bos)).long()  # skip the BOS id
    parts = [r, r] if bos is None else [torch.full((batch, 1), int(bos)), r, r]
    return torch.cat(parts, dim=1)


# --------------------------------------------------------------------------- composition
def _tl_composition_scores() -> Any:
    """TransformerLens's factored ``composition_scores`` (``utilities`` on TL 4, ``utils`` on TL 2)."""
    try:
        from transformer_lens.utilities import composition_scores
    except ImportError:  # TransformerLens 2.x
        from transformer_lens.utils import composition_scores
    return composition_scores


def _ln1_gains(model: Any) -> torch.Tensor | None:
    """[L, d] the gain of every layer's ln1 (None when a layer has none, or it is folded)."""
    gains = [_tl.norm_scale(model, l, "ln1") for l in range(model.cfg.n_layers)]
    if any(g is None for g in gains):
        return None
    return torch.stack([g.detach().double().cpu() for g in gains])


def _circuits(model: Any, kind: str, ln_gain: bool) -> tuple[Any, Any]:
    """(left, right) factored [L, H, d, d] circuits whose product is the composed matrix:
    left = OV of the source heads; right = QK^T (K), QK (Q) or OV (V) of the destination
    heads, as they read the residual stream (with ``ln_gain`` the destination ln1's gain g:
    QK' = diag(g) QK diag(g), OV' = diag(g) OV). TransformerLens's ``model.OV`` /
    ``model.QK`` expand grouped K/V heads to every query head."""
    from transformer_lens import FactoredMatrix

    if kind not in ("K", "Q", "V"):
        raise InputError(f"kind must be 'K', 'Q' or 'V', got {kind!r}.")
    with torch.no_grad():
        ov, qk = model.OV, model.QK
        left = FactoredMatrix(ov.A.detach().double().cpu(), ov.B.detach().double().cpu())
        m = ov if kind == "V" else qk
        A, B = m.A.detach().double().cpu(), m.B.detach().double().cpu()
    g = _ln1_gains(model) if ln_gain else None
    if g is not None:
        A = g[:, None, :, None] * A
        if kind != "V":
            B = B * g[:, None, None, :]
    right = FactoredMatrix(A, B)
    return left, (right.T if kind == "K" else right)


def composition_scores(model: Any, kind: Kind = "K", *, ln_gain: bool = False
                       ) -> Float[torch.Tensor, "layer head layer head"]:
    """[L, H, L, H] composition score of head (l1, h1) into head (l2, h2), NaN for l1 >= l2.

    Elhage et al. (2021), in TransformerLens's row convention (the residual gains
    ``x OV``, a head scores ``r_q QK r_k^T``): with C the composed matrix,
    score = ||C||_F / (||OV_src||_F ||M_dst||_F), where
    ``K``: C = OV_src QK_dst^T (the source's output feeds the keys), ``Q``: C = OV_src QK_dst
    (the queries), ``V``: C = OV_src OV_dst (the values). Computed as
    ``HookedTransformer.all_composition_scores`` does, with TransformerLens's
    ``FactoredMatrix`` and ``composition_scores`` (d_head x d_head products only);
    grouped-query attention is handled by ``model.OV``/``model.QK``. ``ln_gain`` puts the
    destination layer's ln1 gain into its circuit (folded models already hold it in the
    weights); otherwise the weights are used as stored. The positional part of the
    attention scores (rotary) is not in the weights and not in the score.
    """
    left, right = _circuits(model, kind, ln_gain)
    scores = _tl_composition_scores()(left, right, broadcast_dims=True).double()
    L = model.cfg.n_layers
    later = (torch.arange(L)[:, None] < torch.arange(L)[None, :])[:, None, :, None]
    return torch.where(later, scores, torch.full_like(scores, math.nan))


def pair_composition(model: Any, src: tuple[int, int], dst: tuple[int, int], kind: Kind = "K",
                     *, ln_gain: bool = False) -> float:
    """The :func:`composition_scores` of one head pair ``src = (l1, h1)``, ``dst = (l2, h2)``
    (any layers, the same factored computation)."""
    left, right = _circuits(model, kind, ln_gain)
    (l1, h1), (l2, h2) = src, dst
    return float(_tl_composition_scores()(left[l1, h1], right[l2, h2], broadcast_dims=False))


def k_composition_scores(model: Any) -> Float[torch.Tensor, "layer head layer head"]:
    """[L, H, L, H] K-composition of head (l1, h1) into the keys of head (l2, h2):
    :func:`composition_scores` with ``kind='K'`` and the destination's ln1 gain,

        K(src, dst) = ||OV_src QK'_dst^T||_F / (||OV_src||_F ||QK'_dst||_F),

    ``QK'_dst = diag(g) W_Q W_K^T diag(g)`` the query-key circuit as it acts on the
    residual stream (RMSNorm/LayerNorm weight g; folded models have g = 1). NaN where
    l1 >= l2."""
    return composition_scores(model, "K", ln_gain=True)


# --------------------------------------------------------------------------- scores and losses
def _half_losses(logits: torch.Tensor, toks: torch.Tensor, o: int, half: int) -> tuple[float, float]:
    """Mean next-token cross-entropy predicting r_2..r_h in the first copy and in the
    repeated copy (r_1 of the repeat is predictable by neither induction nor bigrams)."""
    lp = torch.log_softmax(logits.double(), -1)
    nll = -lp[:, :-1].gather(-1, toks[:, 1:, None].to(lp.device)).squeeze(-1)  # [b, n-1]
    first = nll[:, o: o + half - 1]          # predicts positions o+1 .. o+half-1
    second = nll[:, o + half: o + 2 * half - 1]  # predicts o+half+1 .. o+2half-1
    return float(first.mean()), float(second.mean())


def _scores_and_losses(model: Any, toks: torch.Tensor, o: int, half: int
                       ) -> tuple[torch.Tensor, torch.Tensor, float, float, torch.Tensor]:
    L = model.cfg.n_layers
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(L)]
    with torch.no_grad():
        acts = run_hooked(model, toks, names + ["logits"], stop_early=False)
    q = torch.arange(o + half, o + 2 * half)
    pats = [check_finite(acts[n], f"attention pattern {n!r}").double() for n in names]
    prev = torch.stack([p[:, :, q, q - 1].mean(dim=(0, 2)) for p in pats]).cpu()
    ind = torch.stack([p[:, :, q, q - half + 1].mean(dim=(0, 2)) for p in pats]).cpu()
    first, second = _half_losses(check_finite(acts["logits"], "logits"), toks, o, half)
    example = torch.stack([p[0] for p in pats]).float().cpu()  # [L, H, n, n]
    return prev, ind, first, second, example


def _attention_figure_view(fig: Any, title: str, summary: dict[str, Any], attention: Any) -> Any:
    """figure + summary (:func:`views.figure_view`) followed by a circuitsvis view."""
    from .views import View, figure_view

    view = figure_view(fig, title, summary)
    return View(view.body + attention.fragment(include_bundle=False), title=title, needs_bundle=True)


@dataclass(frozen=True)
class InductionHeads(Result):
    """Previous-token and induction heads of a model (the induction circuit as a stack).

    previous_token: [layer, head] mean attention A[q, q-1] over the repeated half's queries q.
    induction:      [layer, head] mean attention A[q, q-half+1] (the token after the
                    earlier occurrence of q's token).
    uniform:        the mean of 1/(q+1) over those queries: what a head attending
                    uniformly to the causal past would score on either.
    threshold:      score from which a head counts; ``induction_heads`` and
                    ``previous_token_heads`` list them (strongest first).
    composition:    [src_layer, src_head, dst_layer, dst_head] K-composition
                    (:func:`k_composition_scores`), NaN for src_layer >= dst_layer.
    pairs:          for each (previous-token head, later induction head): its
                    K-composition, and its percentile and z-score among all head pairs
                    (l1 < l2) of the model.
    loss_first / loss_second: mean next-token loss on the first half and on the repeat.
    ablation:       [layer, head, half] loss on (first half, repeat) with head (l, h)
                    mean-ablated (its ``hook_z`` replaced by its mean over batch and
                    positions); None when not computed.
    ablation_all:   (first, repeat) loss with all detected induction heads ablated at once.
    tokens:         [prompt, pos] the inputs; ``str_tokens`` their strings.
    example_pattern: [layer, head, query, key] the first sequence's attention, for views.
    """

    AXES: ClassVar = {"previous_token": ("layer", "head"), "induction": ("layer", "head"),
                      "composition": ("src_layer", "src_head", "dst_layer", "dst_head"),
                      "ablation": ("layer", "head", "half"), "tokens": ("prompt", "pos"),
                      "example_pattern": ("layer", "head", "query", "key")}
    TITLE: ClassVar = "Induction heads"

    previous_token: torch.Tensor
    induction: torch.Tensor
    uniform: float
    threshold: float
    induction_heads: tuple[str, ...]
    previous_token_heads: tuple[str, ...]
    composition: torch.Tensor
    pairs: tuple[dict, ...]
    loss_first: float
    loss_second: float
    ablation: torch.Tensor | None
    ablation_all: tuple[float, float] | None
    half: int
    offset: int
    tokens: torch.Tensor
    str_tokens: list[list[str]]
    example_pattern: torch.Tensor

    @property
    def best(self) -> tuple[str, float]:
        """The strongest induction head and its score."""
        i = int(self.induction.argmax())
        return head_name(*divmod(i, self.induction.shape[1])), float(self.induction.max())

    @property
    def strongest_pair(self) -> dict | None:
        """The detected (previous-token, induction) pair with the largest K-composition."""
        return max(self.pairs, key=lambda p: p["k_composition"], default=None)

    @property
    def in_context_gain(self) -> float:
        """loss_first - loss_second (nats): how much the repeat is easier to predict."""
        return self.loss_first - self.loss_second

    def composition_baseline(self) -> dict[str, float]:
        """Mean, std and median K-composition over all head pairs with l1 < l2."""
        v = self.composition[torch.isfinite(self.composition)]
        return {"mean": float(v.mean()), "std": float(v.std()), "median": float(v.median()),
                "n_pairs": int(v.numel())}

    def summary(self) -> dict[str, Any]:
        name, score = self.best
        out: dict[str, Any] = {
            "best_induction_head": name, "best_induction_score": score,
            "best_previous_token_score": float(self.previous_token.max()),
            "uniform_score": self.uniform, "induction_heads": list(self.induction_heads),
            "previous_token_heads": list(self.previous_token_heads),
            "loss_first": self.loss_first, "loss_second": self.loss_second,
            "in_context_gain": self.in_context_gain,
            "composition_baseline": self.composition_baseline(),
            "pairs": [dict(p) for p in self.pairs],
        }
        if self.ablation_all is not None:
            out["ablate_induction_heads"] = {"loss_first": self.ablation_all[0],
                                             "loss_second": self.ablation_all[1]}
        return out

    def _table(self) -> Table:
        """One row per head: scores, role, and the ablation losses."""
        L, H = self.induction.shape
        names = [[head_name(l, h) for h in range(H)] for l in range(L)]
        role = [["induction" if n in self.induction_heads else
                 "previous-token" if n in self.previous_token_heads else "" for n in row] for row in names]
        lh = ("layer", "head")
        cols: dict[str, Any] = {"name": (lh, names), "previous_token": (lh, self.previous_token),
                                "induction": (lh, self.induction), "role": (lh, role)}
        if self.ablation is not None:
            cols.update(ablated_loss_first=(lh, self.ablation[..., 0]),
                        ablated_loss_second=(lh, self.ablation[..., 1]))
        return Table(self._grid("induction"), cols)

    def plot(self) -> Any:
        """Score heatmaps, the K-composition of every pair (detected pairs marked), and the
        repeat's loss with each head ablated."""
        import matplotlib.pyplot as plt

        has_abl = self.ablation is not None
        fig, axes = plt.subplots(1, 4 if has_abl else 3, figsize=(15 if has_abl else 11.5, 3.3))
        for ax, (title, val) in zip(axes, (("previous-token score", self.previous_token),
                                           ("induction score", self.induction))):
            im = ax.imshow(val.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            fig.colorbar(im, ax=ax, fraction=0.05)
        comp = self.composition[torch.isfinite(self.composition)].numpy()
        axes[2].hist(comp, bins=30, color="#999")
        for p in self.pairs:
            axes[2].axvline(p["k_composition"], color="C3", lw=1.2)
        axes[2].set_title("K-composition: all pairs (grey), detected (red)", fontsize=9)
        axes[2].set_xlabel("K-composition")
        if has_abl:
            self._plot_ablation(axes[3])
        fig.tight_layout()
        return fig

    def _plot_ablation(self, ax: Any) -> None:
        L, H = self.induction.shape
        x = torch.arange(L * H).numpy()
        ax.bar(x, (self.ablation[..., 1] - self.loss_second).flatten().numpy(), label="repeat")
        ax.bar(x, (self.ablation[..., 0] - self.loss_first).flatten().numpy(), alpha=0.6,
               label="first half")
        ax.set_xticks(x, [head_name(l, h) for l in range(L) for h in range(H)], rotation=90, fontsize=6)
        ax.set_ylabel("loss increase (nats)")
        ax.set_title("mean-ablating one head", fontsize=9)
        ax.legend(fontsize=7)

    def attention_view(self, max_tokens: int = 64) -> Any:
        """circuitsvis view of the strongest induction and previous-token heads on the
        first sequence (cut to ``max_tokens`` around the copy boundary)."""
        from .views import attention_heads

        H = self.induction.shape[1]
        li, hi = divmod(int(self.induction.argmax()), H)
        lp_, hp = divmod(int(self.previous_token.argmax()), H)
        n = self.example_pattern.shape[-1]
        end = min(n, self.offset + self.half + max_tokens // 2)
        start = max(0, end - max_tokens)
        sub = self.example_pattern[:, :, start:end, start:end]
        att = torch.stack([sub[li, hi], sub[lp_, hp]])
        att = att / att.sum(-1, keepdim=True).clamp_min(1e-12)  # rows cut at `start` renormalised
        return attention_heads(att, self.str_tokens[0][start:end],
                               [f"{head_name(li, hi)} (induction)", f"{head_name(lp_, hp)} (previous token)"],
                               title="induction circuit")

    def show(self) -> Any:
        """The figure, the summary and the circuitsvis view of the circuit."""
        return _attention_figure_view(self.plot(), self.TITLE, self.summary(), self.attention_view())


def ablation_hook(heads: Sequence[int], mode: Literal["mean", "zero"] = "mean") -> Any:
    """A ``hook_z`` function that replaces ``heads``' outputs by zero or their mean over
    batch and positions."""
    def fn(z: torch.Tensor, hook: Any = None) -> torch.Tensor:
        z = z.clone()
        for h in heads:
            z[:, :, h] = 0.0 if mode == "zero" else z[:, :, h].mean(dim=(0, 1))
        return z
    return fn


def _ablated_losses(model: Any, toks: torch.Tensor, heads: dict[int, list[int]], o: int,
                    half: int) -> tuple[float, float]:
    inject = {f"blocks.{l}.attn.hook_z": ablation_hook(hs) for l, hs in heads.items()}
    with torch.no_grad():
        logits = run_hooked(model, toks, ["logits"], inject, stop_early=False)["logits"]
    return _half_losses(logits, toks, o, half)


def _repeated_input(model: Any, tokens: Any, half: int, batch: int, seed: int,
                    bos: int | str | None) -> tuple[torch.Tensor, int]:
    """(sequences on the model's device, offset o of the first copy): ``tokens`` checked,
    or :func:`repeated_tokens`."""
    if tokens is None:
        toks = repeated_tokens(model, half, batch, seed=seed, bos=bos)
    else:
        toks = torch.as_tensor(tokens).long()
        if toks.ndim != 2 or (toks.shape[1] - 2 * half) not in (0, 1):
            raise InputError(f"tokens must be [batch, 2*half] or [batch, 1 + 2*half] with half ="
                             f" {half}, got {tuple(toks.shape)}.")
    o = toks.shape[1] - 2 * half
    if not torch.equal(toks[:, o: o + half], toks[:, o + half:]):
        raise InputError("tokens must repeat their first half exactly (r_1..r_h r_1..r_h).")
    return toks.to(model_device(model)), o


def _heads_above(score: torch.Tensor, threshold: float) -> list[tuple[int, int]]:
    """(layer, head) with ``score >= threshold``, strongest first."""
    L, H = score.shape
    return sorted(((l, h) for l in range(L) for h in range(H) if score[l, h] >= threshold),
                  key=lambda lh: -float(score[lh]))


def _circuit_pairs(prev_heads: list, ind_heads: list, comp: torch.Tensor) -> tuple[dict, ...]:
    """Each previous-token head before each induction head: K-composition, percentile, z."""
    finite = comp[torch.isfinite(comp)]
    pairs = []
    for (l1, h1) in prev_heads:
        for (l2, h2) in ind_heads:
            if l1 < l2:
                c = float(comp[l1, h1, l2, h2])
                pairs.append({"previous_token_head": head_name(l1, h1), "induction_head": head_name(l2, h2),
                              "k_composition": c, "percentile": float((finite <= c).double().mean()),
                              "z": float((c - finite.mean()) / finite.std()) if finite.numel() > 1 else math.nan})
    return tuple(pairs)


def _ablation_losses(model: Any, toks: torch.Tensor, ind_heads: list, o: int, half: int,
                     progress: bool) -> tuple[torch.Tensor, tuple[float, float] | None]:
    """[L, H, 2] losses with each head mean-ablated, and with every induction head at once."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    abl = torch.zeros(L, H, 2, dtype=torch.float64)
    cells = [(l, h) for l in range(L) for h in range(H)]
    for l, h in progress_bar(cells, progress, "ablating heads"):
        abl[l, h] = torch.tensor(_ablated_losses(model, toks, {l: [h]}, o, half), dtype=torch.float64)
    if not ind_heads:
        return abl, None
    by_layer: dict[int, list[int]] = {}
    for l, h in ind_heads:
        by_layer.setdefault(l, []).append(h)
    return abl, _ablated_losses(model, toks, by_layer, o, half)


@extractor
def induction_heads(
    model: Any,
    *,
    half: int = 100,
    batch: int = 16,
    seed: int = 0,
    bos: int | str | None = "auto",
    tokens: Int[torch.Tensor, "batch pos"] | None = None,
    threshold: float = 0.2,
    ablate: bool = True,
    progress: bool = True,
) -> InductionHeads:
    """Find the induction circuit: previous-token heads K-composing into induction heads.

    On sequences ``[bos] r_1..r_h r_1..r_h`` of uniform random tokens
    (:func:`repeated_tokens`; or ``tokens`` of that shape), for each query q of the repeat
    (token r_j at q = o + h + j - 1):

        previous-token score(l, h) = mean_{b, q} A^(l,h)[q, q - 1]
        induction score(l, h)      = mean_{b, q} A^(l,h)[q, q - h + 1]

    (Olsson et al. 2022; ``blocks.{l}.attn.hook_pattern``). Heads scoring at least
    ``threshold`` are reported (random tokens give no other reason to attend there:
    uniform causal attention scores ``result.uniform``, ~1/(1.5 h)). The K-composition
    of every previous-token head into every later induction head is compared with all
    head pairs (Elhage et al. 2021; :func:`k_composition_scores`). ``ablate`` mean-ablates
    each head in turn (``hook_z`` replaced by its batch-and-position mean) and all
    induction heads together, and reports the loss on the first half and on the repeat:
    an induction circuit makes the repeat cheap, and ablating it makes it dear again.
    This is the natural-text instance of Musat's (ICLR 2025) stacked heads.
    """
    if not 0.0 < float(threshold) < 1.0:
        raise InputError(f"threshold must lie in (0, 1), got {threshold!r}.")
    toks, o = _repeated_input(model, tokens, half, batch, seed, bos)
    prev, ind, first, second, example = _scores_and_losses(model, toks, o, half)
    comp = k_composition_scores(model)
    ind_heads, prev_heads = _heads_above(ind, threshold), _heads_above(prev, threshold)
    abl, abl_all = _ablation_losses(model, toks, ind_heads, o, half, progress) if ablate else (None, None)
    q = torch.arange(o + half, o + 2 * half, dtype=torch.float64)
    return InductionHeads(
        previous_token=prev, induction=ind, uniform=float((1.0 / (q + 1)).mean()),
        threshold=float(threshold),
        induction_heads=tuple(head_name(*lh) for lh in ind_heads),
        previous_token_heads=tuple(head_name(*lh) for lh in prev_heads),
        composition=comp, pairs=_circuit_pairs(prev_heads, ind_heads, comp),
        loss_first=first, loss_second=second, ablation=abl, ablation_all=abl_all, half=half,
        offset=o, tokens=toks.cpu(), str_tokens=str_tokens(model, toks[:1]), example_pattern=example,
    )


# --------------------------------------------------------------------------- emergence
@dataclass(frozen=True)
class InductionEmergence(Result):
    """The induction circuit along training checkpoints.

    steps:           the checkpoint steps (the ``step`` axis).
    induction:       [step, layer, head] induction scores; ``previous_token`` likewise.
    loss_first / loss_second: [step] loss on the first half and on the repeat.
    emerged_at:      first step from which the best induction score stays >= threshold
                     (None if it never does).
    loss_drop_at:    first step from which the repeat's loss stays at least ``min_gain``
                     nats below the first half's (the in-context loss drop; None if never).
    """

    AXES: ClassVar = {"induction": ("step", "layer", "head"), "previous_token": ("step", "layer", "head"),
                      "loss_first": ("step",), "loss_second": ("step",)}
    TITLE: ClassVar = "Induction heads during training"

    steps: tuple[int, ...]
    induction: torch.Tensor
    previous_token: torch.Tensor
    loss_first: torch.Tensor
    loss_second: torch.Tensor
    threshold: float
    min_gain: float
    emerged_at: int | None
    loss_drop_at: int | None

    @property
    def best_induction(self) -> torch.Tensor:
        """[step] the best head's induction score at each checkpoint."""
        return self.induction.flatten(1).amax(1)

    @property
    def in_context_gain(self) -> torch.Tensor:
        """[step] loss_first - loss_second."""
        return self.loss_first - self.loss_second

    def _coords(self) -> dict[str, Sequence[Any]]:
        return {"step": list(self.steps)}

    def _table(self) -> Table:
        """One row per checkpoint: the best heads' scores and the two halves' losses."""
        H = self.induction.shape[2]
        best = [head_name(*divmod(int(i), H)) for i in self.induction.flatten(1).argmax(1)]
        s = ("step",)
        return Table(self._grid("loss_first"), {
            "best_induction_head": (s, best), "best_induction": (s, self.best_induction),
            "best_previous_token": (s, self.previous_token.flatten(1).amax(1)),
            "loss_first": (s, self.loss_first), "loss_second": (s, self.loss_second),
            "in_context_gain": (s, self.in_context_gain)})

    def summary(self) -> dict[str, Any]:
        return {"emerged_at": self.emerged_at, "loss_drop_at": self.loss_drop_at,
                "final_best_induction": float(self.best_induction[-1]),
                "final_in_context_gain": float(self.in_context_gain[-1]),
                "threshold": self.threshold, "min_gain": self.min_gain}

    def plot(self, heldout_loss: Sequence[float] | None = None) -> Any:
        """Best induction and previous-token scores, and the two halves' losses (plus an
        optional held-out loss per checkpoint) against step, with the emergence marks."""
        import matplotlib.pyplot as plt

        x = [max(s, 1) for s in self.steps]  # log axis: step 0 drawn at 1
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.4))
        a1.plot(x, self.best_induction.numpy(), "o-", label="best induction score")
        a1.plot(x, self.previous_token.flatten(1).amax(1).numpy(), "s--", label="best previous-token")
        a1.axhline(self.threshold, color="gray", lw=0.8)
        a2.plot(x, self.loss_first.numpy(), "o-", label="first half")
        a2.plot(x, self.loss_second.numpy(), "o-", label="repeat")
        if heldout_loss is not None:
            a2.plot(x, list(heldout_loss), "k.:", label="held-out text")
        for ax, at, lab in ((a1, self.emerged_at, "induction head"), (a2, self.loss_drop_at, "loss drop")):
            if at is not None:
                ax.axvline(max(at, 1), color="C3", ls="--", lw=1, label=f"{lab} at {at}")
            ax.set_xscale("log")
            ax.set_xlabel("training step (0 drawn at 1)")
            ax.legend(fontsize=7)
        a1.set_ylabel("attention score")
        a2.set_ylabel("loss (nats)")
        fig.tight_layout()
        return fig


def stays_from(flags: Sequence[bool], steps: Sequence[int]) -> int | None:
    """The first step from which every later flag is true (None when the last is false)."""
    at = None
    for s, ok in zip(steps, flags):
        at = (s if at is None else at) if ok else None
    return at


def induction_emergence(
    checkpoints: Any,
    *,
    steps: Sequence[int] | None = None,
    half: int = 100,
    batch: int = 16,
    seed: int = 0,
    bos: int | str | None = "auto",
    threshold: float = 0.2,
    min_gain: float = 0.5,
    progress: bool = True,
) -> InductionEmergence:
    """When the induction circuit appears during training.

    ``checkpoints``: models, a mapping step -> model (or a zero-argument loader, e.g.
    ``lambda: lp.zoo.load('shakespeare', step=s)``, loaded one at a time), a list with
    ``steps``, or a :class:`lensprobe.training.TrainResult`. Each checkpoint gets the
    scores and half losses of :func:`induction_heads` on the same sequences (no ablation).
    Olsson et al. (2022) find the induction head and the in-context loss drop at the same
    point of training; ``emerged_at`` and ``loss_drop_at`` say where each happens here.
    """
    pairs = checkpoint_list(checkpoints, steps)
    rows, done = [], []
    toks = None
    for step, ck in progress_bar(pairs, progress, "checkpoints", len(pairs)):
        m = materialise(ck)
        with guard(m):
            if toks is None:
                toks = repeated_tokens(m, half, batch, seed=seed, bos=bos)
            rows.append(_scores_and_losses(m, toks.to(model_device(m)), toks.shape[1] - 2 * half, half)[:4])
        done.append(step)
    prev, ind, lf, ls = zip(*rows)
    lf_t, ls_t = torch.tensor(lf, dtype=torch.float64), torch.tensor(ls, dtype=torch.float64)
    ind_t = torch.stack(ind)
    return InductionEmergence(
        steps=tuple(done), induction=ind_t, previous_token=torch.stack(prev), loss_first=lf_t,
        loss_second=ls_t, threshold=float(threshold), min_gain=float(min_gain),
        emerged_at=stays_from((ind_t.flatten(1).amax(1) >= threshold).tolist(), done),
        loss_drop_at=stays_from(((lf_t - ls_t) >= min_gain).tolist(), done),
    )
