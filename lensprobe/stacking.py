"""Stacked attention heads on the retrieval problem.

Musat, "Mechanism and Emergence of Stacked Attention Heads in Multi-Layer Transformers"
(ICLR 2025): small transformers trained on variable-assignment chains
(:class:`lensprobe.tasks.retrieval.RetrievalTask`) resolve one hop in an early layer and
longer segments in later layers ("stacked" retrieval heads), need at least
``log_3(2D)`` layers for D hops, and acquire the heads one at a time during training.

* :func:`stacked_heads` -- per head, the attention mass on the ground-truth k-hop
  referent (M_k), baselines, the detected stack, K-composition between consecutive
  specialists and an ablation check;
* :func:`emergence` -- when each head's role appears across training checkpoints,
  against the loss per hop count;
* :func:`depth_study` -- accuracy per (layers, hops) over seeds, against the depth bound
  and the doubling construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch

from . import _tl
from .core import guard, run_hooked
from .errors import InputError
from .inputs import check_finite, check_pattern, model_device, to_tokens
from .models import str_tokens
from .tasks.base import IGNORE, Batch
from .tasks.retrieval import RetrievalTask, depth_bound, doubling_hops
from .training import _per_difficulty
from .views import View, attention_heads, escape, figure_html, html_page

__all__ = [
    "StackedHeads",
    "stacked_heads",
    "hop_scores",
    "Emergence",
    "emergence",
    "DepthStudy",
    "depth_study",
    "load_depth_study",
    "query_accuracy",
    "k_composition",
    "composition",
    "query_reads",
]

BASELINES = ("previous", "same_token", "bos", "self")
_TARGETS = ("statement", "rhs", "lhs")


def head_name(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


# --------------------------------------------------------------------------- scoring
def _require_retrieval_batch(batch: Any) -> Batch:
    if not isinstance(batch, Batch) or "ref_pos" not in batch.info:
        raise InputError(
            "expected a retrieval Batch with ground truth (info['ref_pos']); sample one with"
            " lp.tasks.RetrievalTask(...).sample(n, generator)."
        )
    return batch


def target_masks(batch: Batch, target: str = "statement") -> torch.Tensor:
    """M_k as a boolean tensor [batch, pos(query), pos(key), K]: M_k[b, i, j] = 1 when key j
    belongs to the k-hop referent of position i (``target``: its whole ``'statement'``,
    its right-hand side ``'rhs'`` or its left-hand side ``'lhs'``)."""
    if target not in _TARGETS:
        raise InputError(f"target must be one of {_TARGETS}, got {target!r}.")
    info = batch.info
    ref_rhs, ref_lhs = info["ref_pos"], info["ref_lhs"]  # [B, T, K]
    B, T, K = ref_rhs.shape
    j = torch.arange(T).view(1, 1, T, 1)
    if target == "rhs":
        start, stop = ref_rhs, ref_rhs + 1
    elif target == "lhs":
        start, stop = ref_lhs, ref_lhs + 1
    else:
        start, stop = ref_lhs, ref_lhs + int(info["stmt_len"])
    valid = (ref_rhs >= 0).unsqueeze(2)
    return valid & (j >= start.unsqueeze(2)) & (j < stop.unsqueeze(2))


def _patterns(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """Attention patterns of every layer, [L, batch, head, query, key] (inside a guard)."""
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(model.cfg.n_layers)]
    with torch.no_grad():
        acts = run_hooked(model, tokens, names)
    return torch.stack([acts[n].detach() for n in names])


@dataclass(frozen=True)
class HopScores:
    """Attention mass per head on each k-hop referent, against baselines a head could
    score without following the chain.

    scores:    [L, H, K] s_k = mean over positions i with >= k hops of
               sum_j A[i, j] M_k[i, j] (the mass on the k-hop referent's ``target``).
    baselines: name -> [L, H], over positions with >= 1 hop: the mass on the previous
               token, earlier copies of the same token, position 0 (BOS), itself, and
               ``any_literal`` (every literal statement's ``target``, a head that reads
               literals in general; not in the units of s_k, see ``hop_baselines``).
    hop_baselines: name -> [L, H, K], over the positions entering s_k:
               * ``previous``, ``same_token``, ``bos``, ``self`` as above;
               * chance levels in the units of s_k, the mass an average member of a
                 category of statements gets, (1/|C|) sum_{c in C} mass(i, c), for C
                 containing the referent: ``any_statement`` (every statement visible
                 from i), ``same_kind`` (``any literal`` where the k-hop referent is the
                 chain's literal, i.e. k = hops(i); any statement with a variable
                 right-hand side otherwise) and ``same_variable`` for k >= 2 (the
                 statements that mention the referent's variable: it and the (k-1)-hop
                 referent, which points to it; 0 for k = 1, where the statements that
                 mention the variable are the referent and the position's own).
               Where a category holds the referent alone, its level equals s_k there.
               A head that spreads its mass over every literal scores s_D equal to the
               ``same_kind`` level at every position, whatever its total literal mass.
    over_baseline: [L, H, K] s_k - max over hop_baselines (the best baseline).
    counts:    [K] how many positions entered each hop's mean.
    """

    scores: torch.Tensor
    baselines: dict[str, torch.Tensor]
    counts: torch.Tensor
    hop_baselines: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def best_baseline(self) -> torch.Tensor:
        """[L, H, K] the largest hop baseline."""
        return torch.stack(list(self.hop_baselines.values())).max(dim=0).values

    @property
    def best_baseline_name(self) -> list[list[list[str]]]:
        names = list(self.hop_baselines)
        idx = torch.stack(list(self.hop_baselines.values())).argmax(dim=0)
        return [[[names[int(v)] for v in row] for row in m] for m in idx]

    @property
    def over_baseline(self) -> torch.Tensor:
        return self.scores - self.best_baseline


def _statement_masks(batch: Batch, target: str, T: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per statement: region [B, S, T] (its ``target`` tokens), literal [B, S] (rhs is a
    literal value), lhs/rhs token ids [B, S], from the batch's ground truth."""
    info = batch.info
    if "stmt_lhs" not in info or "literals" not in info:
        raise InputError("the batch lacks info['stmt_lhs'] / info['literals']; sample it with"
                         " lp.tasks.RetrievalTask(...).sample(n, generator).")
    lhs = info["stmt_lhs"].cpu().long()  # [S]
    rhs = lhs + int(info["rhs_offset"])
    toks = batch.tokens.cpu()
    lo, hi = info["literals"]
    lhs_tok, rhs_tok = toks[:, lhs], toks[:, rhs]
    literal = (rhs_tok >= lo) & (rhs_tok < hi)
    j = torch.arange(T).view(1, T)
    if target == "rhs":
        start, stop = rhs, rhs + 1
    elif target == "lhs":
        start, stop = lhs, lhs + 1
    else:
        start, stop = lhs, lhs + int(info["stmt_len"])
    region = (j >= start.view(-1, 1)) & (j < stop.view(-1, 1))  # [S, T]
    return region.unsqueeze(0).expand(toks.shape[0], -1, -1), literal, lhs_tok, rhs_tok


def _hop_scores_from_patterns(patterns: torch.Tensor, batch: Batch, target: str) -> HopScores:
    L, B, H, T, _ = patterns.shape
    M = target_masks(batch, target).cpu()  # [B, T, T, K]
    K = M.shape[-1]
    hops = batch.info["hops"].cpu()  # [B, T]
    A = patterns.double().cpu()
    # mass[l, b, h, i, k] = sum_j A[l, b, h, i, j] M[b, i, j, k]
    mass = torch.einsum("lbhij,bijk->lbhik", A, M.double())
    scores = torch.zeros(L, H, K, dtype=torch.float64)
    counts = torch.zeros(K, dtype=torch.long)
    toks = batch.tokens.cpu()
    idx = torch.arange(T)
    generic = {
        "previous": (idx.view(T, 1) - 1 == idx.view(1, T)).double().expand(B, T, T),
        "same_token": ((toks.unsqueeze(2) == toks.unsqueeze(1)) & (idx.view(T, 1) > idx.view(1, T))).double(),
        "bos": torch.zeros(B, T, T, dtype=torch.float64).index_fill_(2, torch.tensor([0]), 1.0),
        "self": torch.eye(T, dtype=torch.float64).expand(B, T, T),
    }
    gen_mass = {n: torch.einsum("lbhij,bij->lbhi", A, m) for n, m in generic.items()}  # [L, B, H, T]
    # chance levels over categories of statements
    region, literal, lhs_tok, rhs_tok = _statement_masks(batch, target, T)
    S = region.shape[1]
    stmt_mass = torch.einsum("lbhij,bsj->lbhis", A, region.double())  # [L, B, H, T, S]
    last = (region * idx.view(1, 1, T)).amax(-1)  # [B, S] last token of each region
    visible = last.unsqueeze(1) <= idx.view(1, T, 1)  # [B, T(i), S]
    ref_lhs = batch.info["ref_lhs"].cpu()  # [B, T, K]
    stmt_of = (ref_lhs - int(batch.info["stmt_lhs"][0])) // int(batch.info["stmt_len"])
    lit_mass = (stmt_mass * literal.view(1, B, 1, 1, S)).sum(-1)  # [L, B, H, T]

    names = list(generic) + ["any_statement", "same_kind", "same_variable"]
    hop_base = {n: torch.zeros(L, H, K, dtype=torch.float64) for n in names}
    for k in range(1, K + 1):
        sel = hops >= k  # [B, T]
        counts[k - 1] = int(sel.sum())
        if counts[k - 1] == 0:
            continue
        pick = lambda x: x.permute(0, 2, 1, 3)[:, :, sel]  # noqa: E731  [L, H, n]
        scores[:, :, k - 1] = pick(mass[..., k - 1]).mean(-1)
        for n in generic:
            hop_base[n][:, :, k - 1] = pick(gen_mass[n]).mean(-1)
        r = stmt_of[..., k - 1].clamp(min=0)  # [B, T] referent statement index
        ref_literal = torch.gather(literal, 1, r.view(B, -1)).view(B, T)
        var = torch.gather(lhs_tok, 1, r.view(B, -1)).view(B, T)
        cats = {
            "any_statement": visible,
            "same_kind": visible & (literal.unsqueeze(1) == ref_literal.unsqueeze(2)),
            "same_variable": visible & ((lhs_tok.unsqueeze(1) == var.unsqueeze(2))
                                        | (rhs_tok.unsqueeze(1) == var.unsqueeze(2))),
        }
        if k == 1:
            # the statements that mention the 1-hop referent's variable are the referent
            # and the position's own statement: reading the definition of one's own
            # variable is what a 1-hop head does, so no baseline there
            del cats["same_variable"]
        for n, C in cats.items():  # C [B, T, S], holds the referent wherever sel
            Cd = C.double()
            avg = (stmt_mass * Cd.view(1, B, 1, T, S)).sum(-1) / Cd.sum(-1).clamp(min=1).view(1, B, 1, T)
            hop_base[n][:, :, k - 1] = pick(avg).mean(-1)
    sel = hops >= 1
    pick1 = lambda x: (x.permute(0, 2, 1, 3)[:, :, sel].mean(-1) if bool(sel.any())  # noqa: E731
                       else torch.zeros(L, H, dtype=torch.float64))
    base = {n: pick1(m) for n, m in gen_mass.items()}
    base["any_literal"] = pick1(lit_mass)
    return HopScores(scores, base, counts, hop_base)


def hop_scores(model: Any, batch: Batch, *, target: str = "rhs") -> HopScores:
    """Per head, the attention mass on the ground-truth k-hop referents (see HopScores)."""
    _tl.require_model(model)
    batch = _require_retrieval_batch(batch)
    tokens = to_tokens(model, batch.tokens)
    with guard(model):
        pats = _patterns(model, tokens)
        check_pattern(pats, "attention patterns")
    return _hop_scores_from_patterns(pats, batch, target)


# --------------------------------------------------------------------------- composition
def composition(model: Any, src: tuple[int, int], dst: tuple[int, int], kind: str = "K") -> float:
    """Composition score of head ``src`` into later head ``dst`` (Elhage et al., 2021).

    TransformerLens's row convention: the residual gains x OV_src (OV = W_V W_O) and the
    later head scores r_q QK r_k^T (QK = W_Q W_K^T). With C the composed matrix,
    score = ||C||_F / (||OV_src||_F ||M_dst||_F), where
      K: C = QK_dst OV_src^T (src output feeds the keys),
      Q: C = OV_src QK_dst   (... the queries),
      V: C = OV_src OV_dst   (... the values).
    Uses the weights as stored (layer-norm scales not folded in unless processed).
    """
    (l1, h1), (l2, h2) = src, dst
    ov1 = (model.W_V[l1, h1] @ model.W_O[l1, h1]).detach().double()
    if kind in ("K", "Q"):
        m2 = (model.W_Q[l2, h2] @ model.W_K[l2, h2].T).detach().double()
        comp = m2 @ ov1.T if kind == "K" else ov1 @ m2
    elif kind == "V":
        m2 = (model.W_V[l2, h2] @ model.W_O[l2, h2]).detach().double()
        comp = ov1 @ m2
    else:
        raise InputError(f"kind must be 'K', 'Q' or 'V', got {kind!r}.")
    return float(torch.linalg.norm(comp) / (torch.linalg.norm(m2) * torch.linalg.norm(ov1)))


def k_composition(model: Any, src: tuple[int, int], dst: tuple[int, int]) -> float:
    """K-composition score: :func:`composition` with ``kind='K'``."""
    return composition(model, src, dst, "K")


# --------------------------------------------------------------------------- ablation
def _ablated_logits(model: Any, tokens: torch.Tensor, layer: int, head: int, mode: str) -> torch.Tensor:
    def fn(z: torch.Tensor) -> torch.Tensor:
        z = z.clone()
        if mode == "zero":
            z[:, :, head] = 0.0
        else:  # mean over batch and positions
            z[:, :, head] = z[:, :, head].mean(dim=(0, 1), keepdim=False)
        return z

    with torch.no_grad():
        return run_hooked(model, tokens, [], {f"blocks.{layer}.attn.hook_z": fn})["logits"]


def _accuracy_by_difficulty(logits: torch.Tensor, batch: Batch) -> dict[int, float]:
    return _per_difficulty(logits, batch).accuracy


# --------------------------------------------------------------------------- result
@dataclass(frozen=True)
class StackedHeads:
    """Stacked retrieval heads of a model on a retrieval batch (Musat, ICLR 2025).

    scores:       [L, H, K] attention mass on the k-hop referent M_k (k = 1..K), see
                  :class:`HopScores`; baselines: name -> [L, H]; hop_baselines: name ->
                  [L, H, K]; over_baseline: [L, H, K] score minus its best hop baseline.
    best_hop:     [L, H] argmax_k over_baseline (1-based); best_score: [L, H] s_k there;
                  best_over: [L, H] over_baseline there.
    specialist:   [L, H] bool: best_score >= threshold and best_over >= min_over (the
                  head's mass on the referent beats every baseline by min_over).
    stack:        every specialist, ordered by (layer, head): dicts with layer, head,
                  name, hop, score, baseline (the best baseline's value), baseline_name,
                  over_baseline (score - baseline), and ``resolves`` when ablated.
    increasing:   True when the largest attention hop of each stack layer rises strictly
                  with layer (>= 2 layers), the picture of the paper's doubling/tripling
                  construction (:attr:`hop_profile`, :attr:`doubling`). A model that
                  chains 1-hop heads (each later head reads a position that already
                  holds a longer resolved segment) has hops 1, 1, 1: see ``resolves`` in
                  each entry and :attr:`functional_order`.
    k_composition: K-composition score for each pair of stack heads in consecutive stack
                  layers, and k_composition_baseline the mean over all head pairs of the
                  same layers; compositions: K, Q and V scores with their baselines per
                  pair (:func:`composition`).
    clean_accuracy: accuracy per difficulty; ablation: head name -> {difficulty:
                  accuracy drop} when that head's output (hook_z) is zero/mean-ablated.
    example:      one sequence for the views: tokens (strings), patterns of the stack's
                  heads [n_stack, T, T], the query's referent positions, hops per position.
    """

    scores: torch.Tensor
    baselines: dict[str, torch.Tensor]
    best_hop: torch.Tensor
    best_score: torch.Tensor
    specialist: torch.Tensor
    stack: list[dict[str, Any]]
    increasing: bool
    k_composition: list[float]
    k_composition_baseline: list[float]
    compositions: list[dict[str, Any]]
    clean_accuracy: dict[int, float]
    ablation: dict[str, dict[int, float]]
    ablation_mode: str
    threshold: float
    target: str
    example: dict[str, Any] = field(repr=False)
    hop_baselines: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    over_baseline: torch.Tensor | None = field(default=None, repr=False)
    best_over: torch.Tensor | None = field(default=None, repr=False)
    min_over: float = 0.0

    @property
    def layer_hops(self) -> dict[int, list[int]]:
        """Stack layer -> the sorted attention hops of its specialists."""
        out: dict[int, list[int]] = {}
        for s in self.stack:
            out.setdefault(s["layer"], []).append(s["hop"])
        return {l: sorted(v) for l, v in sorted(out.items())}

    @property
    def hop_profile(self) -> list[int]:
        """The largest attention hop of each stack layer, in layer order."""
        return [max(v) for v in self.layer_hops.values()]

    @property
    def doubling(self) -> bool:
        """True when the hop profile is 1, 2, 4, ... (>= 2 layers): each stack layer reads
        twice as far as the one before, the learned solutions Musat reports."""
        p = self.hop_profile
        return len(p) >= 2 and p == [2**n for n in range(len(p))]

    @property
    def n_layers(self) -> int:
        return self.scores.shape[0]

    @property
    def n_heads(self) -> int:
        return self.scores.shape[1]

    @property
    def functional_order(self) -> bool:
        """True when the functional hops (``resolves``; per stack layer the smallest of
        its heads') never fall with layer and rise from the first stack layer to the
        last: later heads are needed only for longer chains."""
        per: dict[int, list[int]] = {}
        for s in self.stack:
            if s.get("resolves") is not None:
                per.setdefault(s["layer"], []).append(s["resolves"])
        layers = sorted({s["layer"] for s in self.stack})
        if len(layers) < 2 or set(per) != set(layers):
            return False
        r = [min(per[l]) for l in layers]
        return all(a <= b for a, b in zip(r, r[1:])) and r[0] < r[-1]

    def ablation_check(self) -> dict[str, dict[str, float]]:
        """Per stack head: mean accuracy drop on difficulties >= its (attention) hop vs below."""
        out = {}
        for s in self.stack:
            drops = self.ablation.get(s["name"])
            if drops is None:
                continue
            hi = [v for d, v in drops.items() if d >= s["hop"]]
            lo = [v for d, v in drops.items() if d < s["hop"]]
            out[s["name"]] = {
                "drop_at_or_above": sum(hi) / len(hi) if hi else math.nan,
                "drop_below": sum(lo) / len(lo) if lo else math.nan,
            }
        return out

    def to_dataframe(self) -> Any:
        import pandas as pd

        in_stack = {s["name"] for s in self.stack}
        rows = []
        for l in range(self.n_layers):
            for h in range(self.n_heads):
                name = head_name(l, h)
                row: dict[str, Any] = dict(layer=l, head=h, name=name,
                                           best_hop=int(self.best_hop[l, h]),
                                           best_score=float(self.best_score[l, h]),
                                           specialist=bool(self.specialist[l, h]),
                                           in_stack=name in in_stack)
                for k in range(self.scores.shape[2]):
                    row[f"hop_{k + 1}"] = float(self.scores[l, h, k])
                    if self.over_baseline is not None:
                        row[f"over_{k + 1}"] = float(self.over_baseline[l, h, k])
                if self.best_over is not None:
                    row["best_over"] = float(self.best_over[l, h])
                for b, v in self.baselines.items():
                    row[b] = float(v[l, h])
                for d, v in self.ablation.get(name, {}).items():
                    row[f"ablation_drop_{d}"] = v
                rows.append(row)
        return pd.DataFrame(rows)

    def plot(self) -> Any:
        """Heatmaps, heads (rows): left, the hop scores M_k and the [L, H] baselines;
        right, each score over its best baseline (over_k); the stack outlined in red."""
        import matplotlib.pyplot as plt

        L, H, K = self.scores.shape
        cols = [f"M{k + 1}" for k in range(K)] + list(self.baselines)
        data = torch.cat(
            [self.scores.reshape(L * H, K)] + [self.baselines[b].reshape(L * H, 1) for b in self.baselines],
            dim=1,
        ).numpy()
        panels = 2 if self.over_baseline is not None else 1
        fig, axes = plt.subplots(1, panels, figsize=(1.6 + 0.6 * (len(cols) + panels * K), 1.0 + 0.32 * L * H),
                                 squeeze=False)
        ax = axes[0, 0]
        im = ax.imshow(data, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(cols)), cols, rotation=45)
        ax.set_yticks(range(L * H), [head_name(l, h) for l in range(L) for h in range(H)])
        ax.axvline(K - 0.5, color="white", lw=1)
        ax.set_title(f"mass on k-hop referents ({self.target})", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.05)
        if panels == 2:
            ax2 = axes[0, 1]
            im2 = ax2.imshow(self.over_baseline.reshape(L * H, K).numpy(), vmin=-1, vmax=1,
                             cmap="RdBu_r", aspect="auto")
            ax2.set_xticks(range(K), [f"over{k + 1}" for k in range(K)], rotation=45)
            ax2.set_yticks(range(L * H), [head_name(l, h) for l in range(L) for h in range(H)])
            ax2.set_title("score - best baseline", fontsize=9)
            fig.colorbar(im2, ax=ax2, fraction=0.05)
        for s in self.stack:
            r = s["layer"] * H + s["head"]
            for a in axes[0]:
                a.add_patch(plt.Rectangle((s["hop"] - 1.5, r - 0.5), 1, 1, fill=False, ec="red", lw=2))
        fig.tight_layout()
        return fig

    def attention_view(self) -> View:
        """circuitsvis attention_heads for the stack's heads on the example sequence."""
        ex = self.example
        if not self.stack:
            pats = ex["all_patterns"]
            names = ex["all_names"]
        else:
            pats = ex["patterns"]
            names = [s["name"] for s in self.stack]
        return attention_heads(pats, ex["tokens"], names, title="stacked heads")

    def chain_view(self, *, top: int = 1, min_weight: float = 0.2) -> View:
        """Self-contained SVG: positions as nodes (one row per layer boundary), each
        stack head's strongest edges (``top`` per destination, weight >= ``min_weight``)
        from the row below to the row above its layer; the query's referent chain in red."""
        return View(_chain_svg(self, top=top, min_weight=min_weight), title="retrieval chain")

    def show(self) -> View:
        parts: list[Any] = [
            f"<h3>Stacked heads: {escape(', '.join(s['name'] + ' (hop ' + str(s['hop']) + ', needed from ' + str(s.get('resolves')) + ' hops)' for s in self.stack) or 'none detected')}</h3>",
            self.chain_view(),
            self.attention_view(),
        ]
        body_views = [p for p in parts if isinstance(p, View)]
        needs = any(v.needs_bundle for v in body_views)
        body = "\n".join(p.fragment(include_bundle=False) if isinstance(p, View) else p for p in parts)
        return View(body, title="stacked heads", needs_bundle=needs)

    def save_html(self, path: Any) -> Any:
        import matplotlib.pyplot as plt

        fig = self.plot()
        page = html_page("stacked heads", [self.show(), figure_html(fig, alt="hop scores")])
        plt.close(fig)
        from .views import save_html

        return save_html(page, path)


def query_reads(res: StackedHeads) -> list[dict[str, Any]]:
    """For the example's query, what each stack head reads: the key position it attends
    most from the query (``pos``, weight), which k-hop referent of the query that is (None
    if off the chain), and the *resolved segment* that position stands for: itself and
    the positions its own chain still needs (``segment``: right-hand sides, nearest first),
    i.e. what the head brings to the query if earlier layers resolved that position."""
    ex = res.example
    q = ex["query_pos"]
    refs = [p for p in ex["query_refs"] if p >= 0]
    out = []
    for n, s in enumerate(res.stack):
        w, j = ex["patterns"][n][q].max(dim=-1)
        j = int(j)
        more = int(ex["hops"][j]) if "hops" in ex else -1
        seg = [j] + ([int(p) for p in ex["ref_pos"][j, :more]] if more > 0 else [])
        out.append(dict(name=s["name"], layer=s["layer"], hop=s["hop"], pos=j, weight=float(w),
                        token=ex["tokens"][j], referent=refs.index(j) + 1 if j in refs else None,
                        segment=seg if more >= 0 else [j]))
    return out


def _chain_svg(res: StackedHeads, *, top: int, min_weight: float) -> str:
    ex = res.example
    toks: list[str] = ex["tokens"]
    T = len(toks)
    L = res.n_layers
    dx, dy, pad = 34, 90, 40
    width, height = pad * 2 + dx * (T - 1), pad * 2 + dy * L + 20
    chain = set(int(p) for p in ex["query_refs"] if p >= 0)
    q = ex["query_pos"]
    x = lambda i: pad + dx * i  # noqa: E731
    y = lambda r: height - pad - dy * r  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" style="font-family:monospace;font-size:11px">']
    colors = ["#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2"]
    reads = query_reads(res)
    # the resolved segment each stack head brings to the query: a band over the
    # positions it stands for, on the row the head writes to
    for n, r in enumerate(reads):
        col = colors[n % len(colors)]
        for k, p in enumerate(r["segment"]):
            off = 8 + 4 * (n % 4)
            out.append(f'<rect x="{x(p) - 9}" y="{y(r["layer"] + 1) - off - 3}" width="18" height="4" '
                       f'fill="{col}" fill-opacity="{0.9 if k == 0 else 0.45}"><title>'
                       f'{escape(r["name"])} reads {escape(toks[r["pos"]])} @ {r["pos"]}: segment of '
                       f'{len(r["segment"])} statement(s)</title></rect>')
    for n, s in enumerate(res.stack):
        A = ex["patterns"][n]
        l = s["layer"]
        col = colors[n % len(colors)]
        for i in range(T):
            w, j = torch.topk(A[i], k=min(top, i + 1))
            for wt, jj in zip(w.tolist(), j.tolist()):
                if wt < min_weight:
                    continue
                on_chain = i in chain | {q} and jj in chain
                stroke = "#d62728" if on_chain else col
                out.append(
                    f'<line x1="{x(jj)}" y1="{y(l)}" x2="{x(i)}" y2="{y(l + 1)}" stroke="{stroke}" '
                    f'stroke-width="{1 + 3 * wt:.2f}" stroke-opacity="{0.25 + 0.75 * wt:.2f}">'
                    f'<title>{escape(s["name"])}: {i} attends {jj} ({wt:.2f})</title></line>'
                )
    for r in range(L + 1):
        out.append(f'<text x="4" y="{y(r) + 4}" fill="#555">{"in" if r == 0 else "L" + str(r - 1)}</text>')
        for i in range(T):
            hl = i in chain or i == q
            fill = "#d62728" if hl else "#ccc"
            out.append(f'<circle cx="{x(i)}" cy="{y(r)}" r="5" fill="{fill}"><title>{escape(toks[i])} @ {i}</title></circle>')
    for i in range(T):
        weight = "bold" if (i in chain or i == q) else "normal"
        out.append(f'<text x="{x(i)}" y="{height - 12}" text-anchor="middle" font-weight="{weight}">{escape(toks[i])}</text>')
    legend = " ".join(f'<tspan fill="{colors[n % len(colors)]}">{escape(s["name"])} (hop {s["hop"]})</tspan>'
                      for n, s in enumerate(res.stack))
    out.append(f'<text x="{pad}" y="16">{legend} <tspan fill="#d62728">chain of the query</tspan></text>')
    out.append("</svg>")
    rows = "".join(
        f'<tr><td style="color:{colors[n % len(colors)]}">{escape(r["name"])}</td><td>{r["hop"]}</td>'
        f'<td>{escape(toks[r["pos"]])} @ {r["pos"]} ({r["weight"]:.2f})</td>'
        f'<td>{escape("-" if r["referent"] is None else r["referent"])}</td>'
        f'<td>{len(r["segment"])}: {escape(" ".join(toks[p] for p in r["segment"]))}</td></tr>'
        for n, r in enumerate(reads))
    table = ("<table><tr><th>head</th><th>hop</th><th>query reads</th><th>k-hop referent</th>"
             f"<th>resolved segment it stands for</th></tr>{rows}</table>") if reads else ""
    return "<div>" + "".join(out) + table + "</div>"


# --------------------------------------------------------------------------- detection
def _stack_from_scores(hs: HopScores, threshold: float, min_over: float) -> tuple[Any, ...]:
    """Specialists from hop scores: hop = argmax_k over_k; a specialist has s_hop >=
    threshold and over_hop >= min_over. Returns (stack entries, specialist [L, H],
    best_hop, best_score, best_over)."""
    L, H, _ = hs.scores.shape
    over = hs.over_baseline
    best_over, best_idx = over.max(dim=-1)
    best_score = torch.gather(hs.scores, 2, best_idx.unsqueeze(-1)).squeeze(-1)
    base_val = torch.gather(hs.best_baseline, 2, best_idx.unsqueeze(-1)).squeeze(-1)
    base_name = hs.best_baseline_name
    specialist = (best_score >= threshold) & (best_over >= min_over)
    stack = []
    for l in range(L):
        for h in range(H):
            if specialist[l, h]:
                k = int(best_idx[l, h])
                stack.append(dict(layer=l, head=h, name=head_name(l, h), hop=k + 1,
                                  score=float(best_score[l, h]), baseline=float(base_val[l, h]),
                                  baseline_name=base_name[l][h][k],
                                  over_baseline=float(best_over[l, h])))
    return stack, specialist, best_idx + 1, best_score, best_over


def stacked_heads(
    model: Any,
    batch: Batch,
    *,
    target: str = "rhs",
    threshold: float = 0.3,
    min_over: float = 0.1,
    ablation: str | None = "mean",
    ablate: str = "stack",
    min_drop: float = 0.05,
    example: int = 0,
) -> StackedHeads:
    """Detect stacked retrieval heads (Musat, ICLR 2025) on a retrieval batch.

    Hop score of head (l, h) for hop k (``target`` picks the referent's tokens):
        s_k(l, h) = mean_{(b, i): hops(b, i) >= k} sum_j A^{l,h}[b, i, j] M_k[b, i, j].
    Each s_k is set against the baselines of :class:`HopScores` on the same positions
    (mass on the previous token, earlier copies of the same token, BOS, itself, and the
    chance levels of an average visible statement, an average statement of the
    referent's kind -- any literal for the chain's last hop -- and an average statement
    that mentions the referent's variable): over_k = s_k - max(baselines). A head's hop
    is argmax_k over_k; it is a *specialist* if its s_k >= ``threshold`` and over_k >=
    ``min_over``, so a head that reads literals in general is no D-hop head. The
    *stack* holds every specialist, and is *increasing* when the largest hop per
    layer rises with layer. Between heads of consecutive stack layers the K-composition score
    (:func:`k_composition`) is reported with the mean over all head pairs of those layers
    as a baseline (Q and V composition in ``compositions``). ``ablation`` ('mean', 'zero' or None) ablates the output (hook_z) of
    each stack head (``ablate='stack'``) or every head (``'all'``) and records the
    accuracy drop per difficulty; each stack entry then also gets ``resolves``, the
    smallest difficulty whose accuracy falls by >= ``min_drop`` without the head (its
    *functional* hop: the depth from which the model needs it), or None.

    ``target='rhs'`` (default) scores mass on the referent statement's right-hand side,
    where its resolved value is computed; ``'statement'`` counts the whole statement,
    whose left-hand side is an earlier copy of the same token, so first-layer
    same-token heads then look like 1-hop heads. The model is left as found.
    """
    _tl.require_model(model)
    batch = _require_retrieval_batch(batch)
    if ablation not in ("mean", "zero", None):
        raise InputError(f"ablation must be 'mean', 'zero' or None, got {ablation!r}.")
    if ablate not in ("stack", "all"):
        raise InputError(f"ablate must be 'stack' or 'all', got {ablate!r}.")
    if not 0 <= example < len(batch):
        raise InputError(f"example must index the batch (0..{len(batch) - 1}), got {example}.")
    tokens = to_tokens(model, batch.tokens)
    with guard(model):
        pats = _patterns(model, tokens)
        check_pattern(pats, "attention patterns")
        hs = _hop_scores_from_patterns(pats, batch, target)
        L, H, K = hs.scores.shape
        stack, specialist, best_hop, best_score, best_over = _stack_from_scores(hs, threshold, min_over)
        over = hs.over_baseline
        profile = [max(s["hop"] for s in stack if s["layer"] == l)
                   for l in sorted({s["layer"] for s in stack})]
        increasing = len(profile) >= 2 and all(a < b for a, b in zip(profile, profile[1:]))
        stack_layers = sorted({s["layer"] for s in stack})
        pairs = [(a, b) for la, lb in zip(stack_layers, stack_layers[1:])
                 for a in stack if a["layer"] == la for b in stack if b["layer"] == lb]
        kc, kc_base, comps = [], [], []
        layer_base: dict[tuple[int, int, str], float] = {}  # the same for every pair of two layers
        for a, b in pairs:
            src, dst = (a["layer"], a["head"]), (b["layer"], b["head"])
            row = {}
            for kind in ("K", "Q", "V"):
                row[kind] = composition(model, src, dst, kind)
                key = (a["layer"], b["layer"], kind)
                if key not in layer_base:
                    layer_base[key] = sum(
                        composition(model, (a["layer"], h1), (b["layer"], h2), kind)
                        for h1 in range(H) for h2 in range(H)) / (H * H)
                row[f"{kind}_baseline"] = layer_base[key]
            comps.append(dict(src=a["name"], dst=b["name"], **row))
            kc.append(row["K"])
            kc_base.append(row["K_baseline"])
        clean: dict[int, float] = {}
        drops: dict[str, dict[int, float]] = {}
        if ablation is not None:
            with torch.no_grad():
                clean = _accuracy_by_difficulty(check_finite(model(tokens), "logits"), batch)
            heads = ([(s["layer"], s["head"]) for s in stack] if ablate == "stack"
                     else [(l, h) for l in range(L) for h in range(H)])
            for l, h in heads:
                acc = _accuracy_by_difficulty(_ablated_logits(model, tokens, l, h, ablation), batch)
                drops[head_name(l, h)] = {d: clean[d] - acc[d] for d in clean}
            for s in stack:
                hurt = [d for d, v in sorted(drops[s["name"]].items()) if v >= min_drop]
                s["resolves"] = hurt[0] if hurt else None
    ex_refs = batch.info["ref_pos"][example, batch.info["query_pos"]]
    ex = dict(
        tokens=str_tokens(model, batch.tokens[example])[0],
        patterns=torch.stack([pats[s["layer"], example, s["head"]] for s in stack]).cpu()
        if stack else torch.zeros(0, tokens.shape[1], tokens.shape[1]),
        all_patterns=pats[:, example].reshape(L * H, *pats.shape[-2:]).cpu(),
        all_names=[head_name(l, h) for l in range(L) for h in range(H)],
        query_pos=int(batch.info["query_pos"]),
        query_refs=[int(p) for p in ex_refs],
        ref_pos=batch.info["ref_pos"][example].cpu(),
        hops=batch.info["hops"][example].cpu(),
    )
    return StackedHeads(hs.scores, hs.baselines, best_hop, best_score, specialist, stack,
                        increasing, kc, kc_base, comps, clean, drops, ablation or "none",
                        threshold, target, ex, hs.hop_baselines, over, best_over, min_over)



def query_accuracy(model: Any, batch: Batch) -> dict[int, float]:
    """Accuracy of the answer at the query position, per main-chain hop count D."""
    _tl.require_model(model)
    batch = _require_retrieval_batch(batch)
    tokens = to_tokens(model, batch.tokens)
    q = int(batch.info["query_pos"])
    with guard(model), torch.no_grad():
        logits = check_finite(model(tokens)[:, q], "logits")
    hit = logits.argmax(-1).cpu() == batch.info["resolved"][:, q]
    D = batch.info["main_hops"]
    return {int(d): float(hit[D == d].float().mean()) for d in torch.unique(D)}


# --------------------------------------------------------------------------- emergence
@dataclass(frozen=True)
class Emergence:
    """When each head's retrieval role appears during training (Musat, ICLR 2025).

    steps:        [C] checkpoint steps.
    scores:       [C, L, H] each head's score on its final best hop at every checkpoint.
    best_hop:     [L, H] best hop at the last checkpoint.
    emerged_at:   head name -> first step from which its score stays >= threshold
                  (heads that never do are absent).
    order:        heads sorted by emergence step (ties broken by layer).
    loss:         [C, n_difficulties] eval loss per difficulty; difficulties their labels.
    loss_drop_at: difficulty -> first step from which its loss stays <= drop_fraction x
                  its plateau (its largest loss after the first checkpoint).
    """

    steps: list[int]
    scores: torch.Tensor
    best_hop: torch.Tensor
    emerged_at: dict[str, int]
    order: list[str]
    loss: torch.Tensor
    difficulties: list[int]
    loss_drop_at: dict[int, int]
    threshold: float

    def to_dataframe(self) -> Any:
        import pandas as pd

        rows = []
        C, L, H = self.scores.shape
        for l in range(L):
            for h in range(H):
                n = head_name(l, h)
                k = int(self.best_hop[l, h])
                rows.append(dict(name=n, layer=l, head=h, best_hop=k, emerged_at=self.emerged_at.get(n),
                                 loss_drop_at_hop=self.loss_drop_at.get(k),
                                 final_score=float(self.scores[-1, l, h])))
        return pd.DataFrame(rows)

    def plot(self) -> Any:
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
        for n, d in enumerate(self.difficulties):
            ax1.plot(self.steps, self.loss[:, n].numpy(), label=f"{d} hops")
            if d in self.loss_drop_at:
                ax1.axvline(self.loss_drop_at[d], color=f"C{n}", ls=":", lw=1)
        ax1.set_ylabel("eval loss")
        ax1.set_yscale("log")
        ax1.legend(fontsize=8, ncol=2)
        C, L, H = self.scores.shape
        for l in range(L):
            for h in range(H):
                name = head_name(l, h)
                if name not in self.emerged_at:
                    continue
                line, = ax2.plot(self.steps, self.scores[:, l, h].numpy(),
                                 label=f"{name} (hop {int(self.best_hop[l, h])})")
                ax2.axvline(self.emerged_at[name], color=line.get_color(), ls="--", lw=1)
        ax2.axhline(self.threshold, color="gray", lw=0.8)
        ax2.set_ylabel("score on best hop")
        ax2.set_xlabel("training step")
        if self.emerged_at:
            ax2.legend(fontsize=8)
        fig.tight_layout()
        return fig


def _stays_from(values: Sequence[float], steps: Sequence[int], ok: Any) -> int | None:
    at = None
    for s, v in zip(steps, values):
        if ok(v):
            if at is None:
                at = s
        else:
            at = None
    return at


def _loss_drops(loss: torch.Tensor, steps: Sequence[int], diffs: Sequence[int],
                drop_fraction: float) -> dict[int, int]:
    """Difficulty -> first step from which loss[:, n] stays <= drop_fraction x plateau."""
    drop = {}
    for n, d in enumerate(diffs):
        # the plateau: an untrained model's first loss (~log vocab) falls within a few
        # steps to guessing among the values in context; the drop that matters is below that
        ref = float(loss[1:, n].max()) if len(steps) > 1 else float(loss[0, n])
        at = _stays_from(loss[:, n].tolist(), steps, lambda v: v <= drop_fraction * ref)
        if at is not None:
            drop[d] = at
    return drop


def _checkpoint_models(checkpoints: Any) -> list[tuple[int, Any]]:
    from .training import TrainResult

    if isinstance(checkpoints, TrainResult):
        return [(s, checkpoints.model_at(s)) for s in sorted(checkpoints.checkpoints)]
    if isinstance(checkpoints, Mapping):
        items = list(checkpoints.items())
    else:
        items = list(checkpoints)
    out = []
    for s, m in items:
        if not hasattr(m, "cfg"):
            from .models import load_checkpoint

            m = load_checkpoint(m)
        out.append((int(s), m))
    if len(out) < 2:
        raise InputError("emergence needs at least two checkpoints (steps) to compare.")
    return sorted(out, key=lambda x: x[0])


def emergence(
    checkpoints: Any,
    batch: Batch,
    *,
    threshold: float = 0.3,
    drop_fraction: float = 0.5,
    target: str = "rhs",
    progress: bool = True,
) -> Emergence:
    """When each head's role appears (Musat, ICLR 2025: heads emerge one at a time, each
    with a drop in the loss of the next hop count).

    ``checkpoints``: a :class:`lensprobe.training.TrainResult` with checkpoints, a mapping
    step -> model (or checkpoint path), or a list of (step, model). For each checkpoint the
    hop scores s_k(l, h) (:func:`hop_scores`) and the eval loss per difficulty on
    ``batch`` are computed. A head's role is its best hop at the last checkpoint; it
    *emerges* at the first checkpoint from which its score on that hop stays >=
    ``threshold``. Difficulty d's loss *drops* at the first checkpoint from which it
    stays <= ``drop_fraction`` x its plateau, the largest loss after the first
    checkpoint (the first one, often an untrained model, sits at ~log(d_vocab) and is
    left far behind within a few steps by guessing among the values in context).
    """
    batch = _require_retrieval_batch(batch)
    models = _checkpoint_models(checkpoints)
    it: Iterable = models
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(models, desc="emergence", leave=False)
    all_scores, losses = [], []
    diffs = sorted(int(d) for d in torch.unique(batch.difficulty[batch.targets != IGNORE]))
    for _, m in it:
        all_scores.append(hop_scores(m, batch, target=target).scores)
        tokens = to_tokens(m, batch.tokens)
        with guard(m), torch.no_grad():
            logits = m(tokens).double()
        per = _per_difficulty(logits, batch).loss
        losses.append([per[d] for d in diffs])
    S = torch.stack(all_scores)  # [C, L, H, K]
    best_idx = S[-1].argmax(-1)  # [L, H]
    C, L, H, K = S.shape
    role = torch.gather(S, 3, best_idx.view(1, L, H, 1).expand(C, L, H, 1)).squeeze(-1)
    steps = [s for s, _ in models]
    emerged = {}
    for l in range(L):
        for h in range(H):
            at = _stays_from(role[:, l, h].tolist(), steps, lambda v: v >= threshold)
            if at is not None:
                emerged[head_name(l, h)] = at
    order = sorted(emerged, key=lambda n: (emerged[n], n))
    loss = torch.tensor(losses, dtype=torch.float64)
    drop = _loss_drops(loss, steps, diffs, drop_fraction)
    return Emergence(steps, role, best_idx + 1, emerged, order, loss, diffs, drop, threshold)


# --------------------------------------------------------------------------- depth study
DEPTH_STUDY_JSON = "depth_study.json"
"""The shipped depth-study result: ``lensprobe/zoo/results/depth_study.json``
(written by ``scripts/depth_study.py``, read by :func:`load_depth_study`)."""


@dataclass(frozen=True)
class DepthStudy:
    """Query accuracy per (layers, hops) over seeds, against the depth bounds.

    accuracy: [n_layer_values, n_seeds, n_hops] query accuracy; layers, seeds, hops the
    axes. chance: [n_layer_values, n_seeds, n_hops] the literal-guess level on the same
    evaluation batch (answering with a random literal present in the sequence,
    :meth:`RetrievalTask.literal_guess`). steps_done, seconds: [n_layer_values, n_seeds]
    what each run took. bound(D) = min t with t >= log_3(2D) (Musat's lower bound: t
    layers resolve at most (3^t)/2 hops); doubling: a segment that doubles per layer
    reaches 2^t hops with t layers (the learned solutions Musat reports).
    """

    accuracy: torch.Tensor
    layers: list[int]
    seeds: list[int]
    hops: list[int]
    config: dict[str, Any]
    chance: torch.Tensor | None = None
    steps_done: torch.Tensor | None = None
    seconds: torch.Tensor | None = None

    def mean(self) -> torch.Tensor:
        """[n_layer_values, n_hops] mean over the seeds measured (NaN cells: not measured)."""
        return self.accuracy.nanmean(dim=1)

    @property
    def complete(self) -> bool:
        """True when every (layers, seed, hops) cell was measured."""
        return not bool(torch.isnan(self.accuracy).any())

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly data (rounded to 4 digits); :meth:`from_dict` reads it back."""
        def r(t: torch.Tensor | None, digits: int = 4) -> Any:
            return None if t is None else _rounded(t.tolist(), digits)

        return dict(layers=self.layers, seeds=self.seeds, hops=self.hops, config=self.config,
                    complete=self.complete, accuracy=r(self.accuracy), chance=r(self.chance),
                    steps_done=r(self.steps_done, 0), seconds=r(self.seconds, 1),
                    mean=r(self.mean()))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DepthStudy":
        try:
            layers = [int(v) for v in data["layers"]]
            seeds = [int(v) for v in data["seeds"]]
            hops = [int(v) for v in data["hops"]]
            acc = torch.tensor(_unrounded(data["accuracy"]), dtype=torch.float64)
            opt = {k: torch.tensor(_unrounded(data[k]), dtype=torch.float64)
                   if data.get(k) is not None else None for k in ("chance", "steps_done", "seconds")}
            config = dict(data.get("config", {}))
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"not a depth-study record ({e}); write one with DepthStudy.to_dict().") from e
        shape = (len(layers), len(seeds), len(hops))
        for name, t in [("accuracy", acc)] + [(k, v) for k, v in opt.items() if v is not None]:
            want = shape if name in ("accuracy", "chance") else shape[:2]
            if tuple(t.shape) != want:
                raise InputError(f"depth-study {name} has shape {tuple(t.shape)}, expected {want}.")
        return cls(acc, layers, seeds, hops, config, **opt)

    def to_dataframe(self) -> Any:
        import pandas as pd

        rows = []
        for a, L in enumerate(self.layers):
            for b, s in enumerate(self.seeds):
                for c, D in enumerate(self.hops):
                    row = dict(layers=L, seed=s, hops=D, accuracy=float(self.accuracy[a, b, c]),
                               bound_layers=depth_bound(D), doubling_max_hops=2**L)
                    if self.chance is not None:
                        row["chance"] = float(self.chance[a, b, c])
                    rows.append(row)
        return pd.DataFrame(rows)

    def plot(self) -> Any:
        """Mean accuracy per (layers, hops), with the log_3(2D) bound (the last D that t
        layers can resolve, (3^t)/2) and the doubling line 2^t drawn between cells."""
        import matplotlib.pyplot as plt

        m = self.mean().numpy()
        fig, ax = plt.subplots(figsize=(max(4.5, 2.5 + 0.7 * len(self.hops)),
                                        1.8 + 0.6 * len(self.layers)))
        im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
        ax.set_xticks(range(len(self.hops)), [str(h) for h in self.hops])
        ax.set_yticks(range(len(self.layers)), [str(l) for l in self.layers])
        ax.set_xlabel("hops D (query)")
        ax.set_ylabel("layers t")
        ch = None if self.chance is None else self.chance.nanmean(dim=1).numpy()
        for a in range(len(self.layers)):
            for c in range(len(self.hops)):
                label = f"{m[a, c]:.2f}" + ("" if ch is None else f"\n({ch[a, c]:.2f})")
                ax.text(c, a, label, ha="center", va="center",
                        color="white" if m[a, c] < 0.6 else "black", fontsize=7)
        for fn, style, label in ((lambda L: (3**L) // 2, "r-", "bound: D <= 3^t/2"),
                                 (lambda L: 2**L, "w--", "doubling: D <= 2^t")):
            xs, ys = [], []
            for a, L in enumerate(self.layers):
                last = max([c for c, D in enumerate(self.hops) if D <= fn(L)], default=-1)
                xs += [last + 0.5, last + 0.5]
                ys += [a - 0.5, a + 0.5]
            ax.plot(xs, ys, style, lw=2, label=label)
        title = "query accuracy" + ("" if ch is None else " (literal-guess chance)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2)
        fig.colorbar(im, ax=ax, fraction=0.05)
        fig.tight_layout()
        return fig


def _rounded(x: Any, digits: int) -> Any:
    """Nested lists rounded; NaN (a cell not measured) becomes None (JSON null)."""
    if isinstance(x, list):
        return [_rounded(v, digits) for v in x]
    return None if math.isnan(float(x)) else round(float(x), digits)


def _unrounded(x: Any) -> Any:
    return [_unrounded(v) for v in x] if isinstance(x, list) else (math.nan if x is None else float(x))


def load_depth_study(path: Any = None) -> DepthStudy:
    """The depth study shipped with lensprobe (``zoo/results/depth_study.json``), or the
    record at ``path`` written by ``scripts/depth_study.py``."""
    import json
    from pathlib import Path

    p = Path(path) if path is not None else Path(__file__).parent / "zoo" / "results" / DEPTH_STUDY_JSON
    if not p.is_file():
        raise InputError(f"no depth-study record at {str(p)!r}; run scripts/depth_study.py.")
    try:
        data = json.loads(p.read_text())
    except ValueError as e:
        raise InputError(f"{str(p)!r} is not JSON: {e}.") from e
    if not isinstance(data, dict):
        raise InputError(f"{str(p)!r} does not hold a depth-study record (a JSON object).")
    return DepthStudy.from_dict(data)


def depth_study(
    task: RetrievalTask,
    *,
    layers: Sequence[int] = (1, 2, 3),
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = 1000,
    model_kwargs: Mapping[str, Any] | None = None,
    train_kwargs: Mapping[str, Any] | None = None,
    eval_batch_size: int = 512,
    progress: bool = True,
) -> DepthStudy:
    """Train one model per (layers, seed) on ``task`` with the same budget and return the
    query accuracy per main-chain hop count D (Musat, ICLR 2025: t >= log_3(2D) layers are
    needed; learned solutions often double per layer).

    ``model_kwargs`` go to :func:`lensprobe.tiny_model` (defaults: attention-only,
    4 heads, d_model 64, d_vocab/n_ctx from the task); ``train_kwargs`` to
    :func:`lensprobe.train` (callbacks may stop a run early: ``steps_done`` records it).
    Evaluation uses a fresh batch (seed 10_000 + seed), with its literal-guess chance.
    """
    from .models import tiny_model
    from .training import train

    mk = dict(n_heads=4, d_model=64, attn_only=True, d_vocab=len(task.vocab), n_ctx=task.seq_len,
              vocab=task.vocab)
    mk.update(model_kwargs or {})
    tk = dict(progress=False)
    tk.update(train_kwargs or {})
    hops = sorted(set(task._hop_values))
    acc = torch.zeros(len(layers), len(seeds), len(hops), dtype=torch.float64)
    chance = torch.zeros_like(acc)
    done = torch.zeros(len(layers), len(seeds), dtype=torch.float64)
    secs = torch.zeros_like(done)
    grid = [(a, b) for a in range(len(layers)) for b in range(len(seeds))]
    it: Iterable = grid
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(grid, desc="depth study")
    for a, b in it:
        model = tiny_model(n_layers=int(layers[a]), seed=int(seeds[b]), **mk)
        res = train(model, task, steps=steps, seed=int(seeds[b]), **tk)
        done[a, b], secs[a, b] = res.steps_done, res.seconds
        batch = task.sample(eval_batch_size, torch.Generator().manual_seed(10_000 + int(seeds[b])))
        qa = query_accuracy(model, batch)
        guess = task.literal_guess(batch)
        for c, D in enumerate(hops):
            acc[a, b, c] = qa.get(D, math.nan)
            chance[a, b, c] = guess.get(D, math.nan)
    config = dict(steps=steps, task=task.config(), eval_batch_size=eval_batch_size,
                  model_kwargs={k: v for k, v in mk.items() if k != "vocab"},
                  train_kwargs={k: v for k, v in tk.items() if k != "callbacks"})
    return DepthStudy(acc, [int(l) for l in layers], [int(s) for s in seeds], hops, config,
                      chance, done, secs)
