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
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any

import torch

from . import _tl
from .core import guard, progress_bar, run_hooked
from .errors import InputError
from .inputs import check_finite, model_device
from .models import str_tokens

__all__ = ["InductionEmergence", "InductionHeads", "induction_emergence", "induction_heads",
           "k_composition_scores", "repeated_tokens"]


def _name(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def _bos_of(model: Any) -> int | None:
    tok = getattr(model, "tokenizer", None)
    bos = getattr(tok, "bos_token_id", None) if tok is not None else None
    return int(bos) if isinstance(bos, int) and 0 <= bos < model.cfg.d_vocab else None


def repeated_tokens(model: Any, half: int = 100, batch: int = 16, *, seed: int = 0,
                    bos: int | str | None = "auto") -> torch.Tensor:
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


def _ln1_gain(model: Any, layer: int) -> torch.Tensor | None:
    g = _tl.norm_scale(model, layer, "ln1")
    return None if g is None else g.detach()


def k_composition_scores(model: Any) -> torch.Tensor:
    """[L, H, L, H] K-composition of head (l1, h1) into the keys of head (l2, h2).

    Elhage et al. (2021), in TransformerLens's row convention (the residual gains
    ``x OV``, a head scores ``r_q QK r_k^T``):

        K(src, dst) = ||OV_src QK'_dst^T||_F / (||OV_src||_F ||QK'_dst||_F),

    with ``QK'_dst = diag(g) W_Q W_K^T diag(g)`` the query-key circuit as it acts on the
    residual stream, ``g`` the gain of the destination layer's ln1 (RMSNorm/LayerNorm
    weight; folded models already hold it in W_Q/W_K and have g = 1). The positional
    part of the scores (rotary) is not in the weights and not in the score. Computed
    with ``FactoredMatrix`` (d_head x d_head products only); NaN where l1 >= l2.
    Grouped-query attention is handled by ``model.OV``/``model.QK``, which expand the
    key/value heads to every query head.
    """
    from transformer_lens import FactoredMatrix

    L, H = model.cfg.n_layers, model.cfg.n_heads
    with torch.no_grad():
        ov = model.OV
        qk = model.QK
        W_Q = qk.A.detach().double()  # [L, H, d, d_head]
        W_Kt = qk.B.detach().double()  # [L, H, d_head, d]
        gains = [_ln1_gain(model, l) for l in range(L)]
        if all(g is not None for g in gains):
            g = torch.stack([gg.to(W_Q.device, torch.float64) for gg in gains])  # [L, d]
            W_Q = g[:, None, :, None] * W_Q
            W_Kt = W_Kt * g[:, None, None, :]
        # right = QK'^T = (diag(g) W_K)(diag(g) W_Q)^T as a factored d x d matrix
        right = FactoredMatrix(W_Kt.transpose(-1, -2), W_Q.transpose(-1, -2))
        left = FactoredMatrix(ov.A.detach().double(), ov.B.detach().double())
        left = left.unsqueeze(2).unsqueeze(3)  # [L, H, 1, 1, d, d]
        right = right.unsqueeze(0).unsqueeze(0)  # [1, 1, L, H, d, d]
        scores = (left @ right).norm() / (left.norm() * right.norm())
    mask = torch.arange(L)[:, None] < torch.arange(L)[None, :]  # l1 < l2
    out = torch.full((L, H, L, H), float("nan"), dtype=torch.float64)
    keep = mask[:, None, :, None].expand(L, H, L, H)
    out[keep] = scores.cpu().double()[keep]
    return out


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


@dataclass(frozen=True)
class InductionHeads:
    """Previous-token and induction heads of a model (the induction circuit as a stack).

    previous_token: [L, H] mean attention A[q, q-1] over the repeated half's queries q.
    induction:      [L, H] mean attention A[q, q-half+1] (the token after the earlier
                    occurrence of q's token).
    uniform:        the mean of 1/(q+1) over those queries: what a head attending
                    uniformly to the causal past would score on either.
    threshold:      score from which a head counts; ``induction_heads`` and
                    ``previous_token_heads`` list them (strongest first).
    composition:    [L, H, L, H] K-composition (:func:`k_composition_scores`), NaN for
                    l1 >= l2.
    pairs:          for each (previous-token head, later induction head): its
                    K-composition, and its percentile and z-score among all head pairs
                    (l1 < l2) of the model.
    loss_first / loss_second: mean next-token loss on the first half and on the repeat.
    ablation:       [L, H, 2] loss on (first half, repeat) with head (l, h) mean-ablated
                    (its ``hook_z`` replaced by its mean over batch and positions); None
                    when not computed.
    ablation_all:   (first, repeat) loss with all detected induction heads ablated at once.
    tokens, str_tokens, example_pattern [L, H, n, n]: the inputs and the first sequence's
                    attention, for views.
    """

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
        return _name(*divmod(i, self.induction.shape[1])), float(self.induction.max())

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

    def to_dataframe(self) -> Any:
        """One row per head: scores, roles, and the ablation losses."""
        import pandas as pd

        L, H = self.induction.shape
        rows = []
        for l in range(L):
            for h in range(H):
                n = _name(l, h)
                r = dict(name=n, layer=l, head=h, previous_token=float(self.previous_token[l, h]),
                         induction=float(self.induction[l, h]),
                         role=("induction" if n in self.induction_heads else
                               "previous-token" if n in self.previous_token_heads else ""))
                if self.ablation is not None:
                    r["ablated_loss_first"] = float(self.ablation[l, h, 0])
                    r["ablated_loss_second"] = float(self.ablation[l, h, 1])
                rows.append(r)
        return pd.DataFrame(rows)

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
            L, H = self.induction.shape
            x = torch.arange(L * H).numpy()
            axes[3].bar(x, (self.ablation[..., 1] - self.loss_second).flatten().numpy(), label="repeat")
            axes[3].bar(x, (self.ablation[..., 0] - self.loss_first).flatten().numpy(), alpha=0.6,
                        label="first half")
            axes[3].set_xticks(x, [_name(l, h) for l in range(L) for h in range(H)], rotation=90,
                               fontsize=6)
            axes[3].set_ylabel("loss increase (nats)")
            axes[3].set_title("mean-ablating one head", fontsize=9)
            axes[3].legend(fontsize=7)
        fig.tight_layout()
        return fig

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
                               [f"{_name(li, hi)} (induction)", f"{_name(lp_, hp)} (previous token)"],
                               title="induction circuit")

    def show(self) -> Any:
        import matplotlib.pyplot as plt

        from .views import View, figure_html

        fig = self.plot()
        img = figure_html(fig, alt="induction heads")
        plt.close(fig)
        view = self.attention_view()
        return View(img + view.fragment(include_bundle=False), title="induction heads",
                    needs_bundle=True)


def _ablate_hook(head_sets: Sequence[int]):
    def fn(z: torch.Tensor) -> torch.Tensor:
        z = z.clone()
        for h in head_sets:
            z[:, :, h] = z[:, :, h].mean(dim=(0, 1))
        return z
    return fn


def _ablated_losses(model: Any, toks: torch.Tensor, heads: dict[int, list[int]], o: int,
                    half: int) -> tuple[float, float]:
    inject = {f"blocks.{l}.attn.hook_z": _ablate_hook(hs) for l, hs in heads.items()}
    with torch.no_grad():
        logits = run_hooked(model, toks, ["logits"], inject, stop_early=False)["logits"]
    return _half_losses(logits, toks, o, half)


def induction_heads(
    model: Any,
    *,
    half: int = 100,
    batch: int = 16,
    seed: int = 0,
    bos: int | str | None = "auto",
    tokens: torch.Tensor | None = None,
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
    with guard(model):
        if tokens is None:
            toks = repeated_tokens(model, half, batch, seed=seed, bos=bos)
            o = 0 if (bos if bos != "auto" else _bos_of(model)) is None else 1
        else:
            toks = torch.as_tensor(tokens).long()
            if toks.ndim != 2 or (toks.shape[1] - 2 * half) not in (0, 1):
                raise InputError(f"tokens must be [batch, 2*half] or [batch, 1 + 2*half] with half ="
                                 f" {half}, got {tuple(toks.shape)}.")
            o = toks.shape[1] - 2 * half
            if not torch.equal(toks[:, o: o + half], toks[:, o + half:]):
                raise InputError("tokens must repeat their first half exactly (r_1..r_h r_1..r_h).")
        toks = toks.to(model_device(model))
        L, H = model.cfg.n_layers, model.cfg.n_heads
        prev, ind, first, second, example = _scores_and_losses(model, toks, o, half)
        comp = k_composition_scores(model)
        ind_heads = sorted(((l, h) for l in range(L) for h in range(H) if ind[l, h] >= threshold),
                           key=lambda lh: -float(ind[lh]))
        prev_heads = sorted(((l, h) for l in range(L) for h in range(H) if prev[l, h] >= threshold),
                            key=lambda lh: -float(prev[lh]))
        finite = comp[torch.isfinite(comp)]
        pairs = []
        for (l1, h1) in prev_heads:
            for (l2, h2) in ind_heads:
                if l1 < l2:
                    c = float(comp[l1, h1, l2, h2])
                    pairs.append({"previous_token_head": _name(l1, h1), "induction_head": _name(l2, h2),
                                  "k_composition": c,
                                  "percentile": float((finite <= c).double().mean()),
                                  "z": float((c - finite.mean()) / finite.std())
                                  if finite.numel() > 1 else math.nan})
        abl = abl_all = None
        if ablate:
            abl = torch.zeros(L, H, 2, dtype=torch.float64)
            cells = [(l, h) for l in range(L) for h in range(H)]
            for l, h in progress_bar(cells, progress, "ablating heads"):
                abl[l, h] = torch.tensor(_ablated_losses(model, toks, {l: [h]}, o, half), dtype=torch.float64)
            if ind_heads:
                by_layer: dict[int, list[int]] = {}
                for l, h in ind_heads:
                    by_layer.setdefault(l, []).append(h)
                abl_all = _ablated_losses(model, toks, by_layer, o, half)
        q = torch.arange(o + half, o + 2 * half, dtype=torch.float64)
        return InductionHeads(
            previous_token=prev, induction=ind, uniform=float((1.0 / (q + 1)).mean()),
            threshold=float(threshold),
            induction_heads=tuple(_name(*lh) for lh in ind_heads),
            previous_token_heads=tuple(_name(*lh) for lh in prev_heads),
            composition=comp, pairs=tuple(pairs), loss_first=first, loss_second=second,
            ablation=abl, ablation_all=abl_all, half=half, offset=o, tokens=toks.cpu(),
            str_tokens=str_tokens(model, toks[:1]), example_pattern=example,
        )


# --------------------------------------------------------------------------- emergence
@dataclass(frozen=True)
class InductionEmergence:
    """The induction circuit along training checkpoints.

    steps:           [C] checkpoint steps.
    induction:       [C, L, H] induction scores; ``previous_token`` likewise.
    loss_first / loss_second: [C] loss on the first half and on the repeat.
    emerged_at:      first step from which the best induction score stays >= threshold
                     (None if it never does).
    loss_drop_at:    first step from which the repeat's loss stays at least ``min_gain``
                     nats below the first half's (the in-context loss drop; None if never).
    """

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
        """[C] the best head's induction score at each checkpoint."""
        return self.induction.flatten(1).amax(1)

    @property
    def in_context_gain(self) -> torch.Tensor:
        """[C] loss_first - loss_second."""
        return self.loss_first - self.loss_second

    def to_dataframe(self) -> Any:
        import pandas as pd

        H = self.induction.shape[2]
        rows = []
        for c, s in enumerate(self.steps):
            i = int(self.induction[c].argmax())
            rows.append(dict(step=s, best_induction_head=_name(*divmod(i, H)),
                             best_induction=float(self.best_induction[c]),
                             best_previous_token=float(self.previous_token[c].max()),
                             loss_first=float(self.loss_first[c]),
                             loss_second=float(self.loss_second[c]),
                             in_context_gain=float(self.in_context_gain[c])))
        return pd.DataFrame(rows)

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


def _stays_from(values: Sequence[bool], steps: Sequence[int]) -> int | None:
    at = None
    for s, ok in zip(steps, values):
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
    from .inputs import checkpoint_list, materialise

    pairs = checkpoint_list(checkpoints, steps)
    ind, prev, lf, ls, done = [], [], [], [], []
    toks = None
    for step, ck in progress_bar(pairs, progress, "checkpoints", len(pairs)):
        m = materialise(ck)
        with guard(m):
            if toks is None:
                toks = repeated_tokens(m, half, batch, seed=seed, bos=bos)
                o = toks.shape[1] - 2 * half
            p, i, f, s, _ = _scores_and_losses(m, toks.to(model_device(m)), o, half)
        ind.append(i)
        prev.append(p)
        lf.append(f)
        ls.append(s)
        done.append(step)
    ind_t, prev_t = torch.stack(ind), torch.stack(prev)
    lf_t, ls_t = torch.tensor(lf, dtype=torch.float64), torch.tensor(ls, dtype=torch.float64)
    best = ind_t.flatten(1).amax(1)
    return InductionEmergence(
        steps=tuple(done), induction=ind_t, previous_token=prev_t, loss_first=lf_t, loss_second=ls_t,
        threshold=float(threshold), min_gain=float(min_gain),
        emerged_at=_stays_from((best >= threshold).tolist(), done),
        loss_drop_at=_stays_from(((lf_t - ls_t) >= min_gain).tolist(), done),
    )
