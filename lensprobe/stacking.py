"""Stacked attention heads on the retrieval problem.

Musat, "Mechanism and Emergence of Stacked Attention Heads in Multi-Layer Transformers"
(ICLR 2025): small transformers trained on variable-assignment chains
(:class:`lensprobe.tasks.retrieval.RetrievalTask`) resolve one hop in an early layer and
longer segments in later layers ("stacked" retrieval heads), need at least
``log_3(2D)`` layers for D hops, and acquire the heads one at a time during training.

* :func:`hop_scores` -- per head, the attention mass on the ground-truth hop-k
  referent (M_k) against baselines a head scores without following the chain;
* :func:`stacked_heads` -- those scores, the detected stack (:class:`StackEntry`),
  composition between consecutive specialists and an ablation check;
* :func:`emergence` -- when each head's role appears across training checkpoints,
  against the loss per hop count;
* :func:`depth_study` -- accuracy per (layers, hops) over seeds, against the depth bound
  and the doubling construction.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Mapping, Sequence

import torch
from jaxtyping import Bool, Float

from .core import activations, extractor, progress_bar
from .errors import InputError
from .induction import ablation_hook, composition_scores, pair_composition, stays_from
from .inputs import check_finite, check_pattern, checkpoint_list, head_name, materialise, to_tokens
from .models import str_tokens
from .results import Result, Table
from .tasks.base import IGNORE, Batch
from .tasks.retrieval import RetrievalTask, depth_bound
from .training import evaluate
from .views import View, attention_heads, escape, figure_view

# ruff: noqa: F722  (jaxtyping shape strings such as "layer head hop" are not Python expressions)

__all__ = ["HopScores", "hop_scores", "StackEntry", "StackedHeads", "stacked_heads", "Emergence", "emergence",
           "DepthStudy", "depth_study", "load_depth_study", "query_accuracy", "k_composition", "composition",
           "query_reads"]

BASELINES = ("previous", "same_token", "bos", "self")
Target = Literal["statement", "rhs", "lhs"]
_TARGETS = ("statement", "rhs", "lhs")
_LH = ("layer", "head")
_LHK = ("layer", "head", "hop")


# --------------------------------------------------------------------------- scoring
def _require_retrieval_batch(batch: Any) -> Batch:
    if not isinstance(batch, Batch) or "ref_pos" not in batch.info:
        raise InputError(
            "expected a retrieval Batch with ground truth (info['ref_pos']); sample one with"
            " lp.tasks.RetrievalTask(...).sample(n, generator)."
        )
    return batch


def _span(target: str, lhs: torch.Tensor, rhs: torch.Tensor, stmt_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, stop) of the ``target`` tokens of statements whose sides sit at lhs / rhs."""
    if target not in _TARGETS:
        raise InputError(f"target must be one of {_TARGETS}, got {target!r}.")
    if target == "rhs":
        return rhs, rhs + 1
    if target == "lhs":
        return lhs, lhs + 1
    return lhs, lhs + stmt_len


def target_masks(batch: Batch, target: Target = "statement") -> Bool[torch.Tensor, "batch query key hop"]:
    """M_k as a boolean tensor [batch, pos(query), pos(key), hop]: M_k[b, i, j] = 1 when key
    j belongs to the hop-k referent of position i (``target``: its whole ``'statement'``,
    its right-hand side ``'rhs'`` or its left-hand side ``'lhs'``)."""
    info = batch.info
    ref_rhs, ref_lhs = info["ref_pos"], info["ref_lhs"]  # [B, T, K]
    T = ref_rhs.shape[1]
    start, stop = _span(target, ref_lhs, ref_rhs, int(info["stmt_len"]))
    j = torch.arange(T).view(1, 1, T, 1)
    valid = (ref_rhs >= 0).unsqueeze(2)
    return valid & (j >= start.unsqueeze(2)) & (j < stop.unsqueeze(2))


def _patterns(model: Any, tokens: torch.Tensor, cache: Any = None) -> torch.Tensor:
    """Attention patterns of every layer, [L, batch, head, query, key] (inside a guard),
    captured or read from ``cache``."""
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(model.cfg.n_layers)]
    acts = activations(model, tokens, names, cache)
    pats = torch.stack([acts[n].detach().to(tokens.device) for n in names])
    if pats.shape[1] != tokens.shape[0] or pats.shape[-1] != tokens.shape[1]:
        raise InputError(f"the cache's attention patterns {tuple(pats.shape[1:])} do not belong to the batch's"
                         f" tokens {tuple(tokens.shape)}; cache a run on batch.tokens.")
    return check_pattern(pats, "attention patterns")


@dataclass(frozen=True)
class HopScores(Result):
    """Attention mass per head on each hop-k referent, against baselines a head could
    score without following the chain.

    scores:    [layer, head, hop] s_k = mean over positions i with >= k hops of
               sum_j A[i, j] M_k[i, j] (the mass on the hop-k referent's ``target``).
    baselines: name -> [layer, head], over positions with >= 1 hop: the mass on the
               previous token, earlier copies of the same token, position 0 (BOS),
               itself, and ``any_literal`` (every literal statement's ``target``, a head
               that reads literals in general; not in the units of s_k, see
               ``hop_baselines``).
    counts:    [hop] how many positions entered each hop's mean.
    hop_baselines: name -> [layer, head, hop], over the positions entering s_k:
               * ``previous``, ``same_token``, ``bos``, ``self`` as above;
               * chance levels in the units of s_k, the mass an average member of a
                 category of statements gets, (1/|C|) sum_{c in C} mass(i, c), for C
                 containing the referent: ``any_statement`` (every statement visible
                 from i), ``same_kind`` (``any literal`` where the hop-k referent is the
                 chain's literal, i.e. k = hops(i); any statement with a variable
                 right-hand side otherwise) and ``same_variable`` for k >= 2 (the
                 statements that mention the referent's variable: it and the hop-(k-1)
                 referent, which points to it; 0 for k = 1, where the statements that
                 mention the variable are the referent and the position's own).
               Where a category holds the referent alone, its level equals s_k there.
               A head that spreads its mass over every literal scores s_D equal to the
               ``same_kind`` level at every position, whatever its total literal mass.
    target:    which tokens of a referent count (``'rhs'``, ``'statement'`` or ``'lhs'``).

    ``over_baseline`` [layer, head, hop] is s_k - max over hop_baselines (the best baseline).
    """

    AXES: ClassVar = {"scores": _LHK, "counts": ("hop",)}
    TITLE: ClassVar = "Hop scores"

    scores: torch.Tensor
    baselines: dict[str, torch.Tensor]
    counts: torch.Tensor
    hop_baselines: dict[str, torch.Tensor]
    target: str = "rhs"

    @property
    def best_baseline(self) -> Float[torch.Tensor, "layer head hop"]:
        """[layer, head, hop] the largest hop baseline."""
        return torch.stack(list(self.hop_baselines.values())).max(dim=0).values

    @property
    def best_baseline_name(self) -> list[list[list[str]]]:
        """Per layer, head and hop: the name of the largest hop baseline (nested lists)."""
        names = list(self.hop_baselines)
        idx = torch.stack(list(self.hop_baselines.values())).argmax(dim=0)
        return [[[names[int(v)] for v in row] for row in m] for m in idx]

    @property
    def over_baseline(self) -> Float[torch.Tensor, "layer head hop"]:
        """[layer, head, hop] score minus the best hop baseline."""
        return self.scores - self.best_baseline

    def _coords(self) -> dict[str, Sequence[Any]]:
        return {"hop": range(1, self.scores.shape[2] + 1)}

    def _table(self) -> Table:
        """One row per (layer, head, hop): score, over_baseline, the best baseline's name,
        every hop baseline, the [layer, head] baselines not among them (``any_literal``)
        and the number of positions."""
        L, H, _ = self.scores.shape
        cols: dict[str, Any] = {"name": (_LH, _head_names(L, H)), "score": (_LHK, self.scores),
                                "over_baseline": (_LHK, self.over_baseline),
                                "best_baseline": (_LHK, self.best_baseline_name),
                                "count": (("hop",), self.counts)}
        cols.update({n: (_LHK, v) for n, v in self.hop_baselines.items()})
        cols.update({n: (_LH, v) for n, v in self.baselines.items() if n not in cols})
        return Table(self._grid("scores"), cols)

    def summary(self) -> dict[str, Any]:
        over = self.over_baseline
        L, H, K = over.shape
        i = int(over.argmax())
        l, h, k = i // (H * K), (i // K) % H, i % K
        return {"target": self.target, "best_head": head_name(l, h), "best_hop": k + 1,
                "best_score": float(self.scores[l, h, k]), "best_over_baseline": float(over[l, h, k]),
                "positions_per_hop": [int(c) for c in self.counts]}

    def plot(self, marks: Sequence[tuple[int, int, int]] = ()) -> Any:
        """Heatmaps, heads (rows): left, the hop scores M_k and the [layer, head] baselines;
        right, each score over its best baseline (over_k). ``marks``: (layer, head, hop)
        cells outlined in red (:meth:`StackedHeads.plot` marks the stack)."""
        import matplotlib.pyplot as plt

        L, H, K = self.scores.shape
        cols = [f"M{k + 1}" for k in range(K)] + list(self.baselines)
        data = torch.cat([self.scores.reshape(L * H, K)]
                         + [v.reshape(L * H, 1) for v in self.baselines.values()], dim=1).numpy()
        fig, axes = plt.subplots(1, 2, figsize=(1.6 + 0.6 * (len(cols) + 2 * K), 1.0 + 0.32 * L * H))
        rows = [head_name(l, h) for l in range(L) for h in range(H)]
        panels = ((data, cols, 0, "viridis", f"mass on hop-k referents ({self.target})"),
                  (self.over_baseline.reshape(L * H, K).numpy(), [f"over{k + 1}" for k in range(K)], -1,
                   "RdBu_r", "score - best baseline"))
        for ax, (values, labels, vmin, cmap, title) in zip(axes, panels):
            im = ax.imshow(values, vmin=vmin, vmax=1, cmap=cmap, aspect="auto")
            ax.set_xticks(range(len(labels)), labels, rotation=45)
            ax.set_yticks(range(L * H), rows)
            ax.set_title(title, fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.05)
            for l, h, hop in marks:
                ax.add_patch(plt.Rectangle((hop - 1.5, l * H + h - 0.5), 1, 1, fill=False, ec="red", lw=2))
        axes[0].axvline(K - 0.5, color="white", lw=1)
        fig.tight_layout()
        return fig


def _head_names(L: int, H: int) -> list[list[str]]:
    return [[head_name(l, h) for h in range(H)] for l in range(L)]


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
    start, stop = _span(target, lhs, rhs, int(info["stmt_len"]))
    j = torch.arange(T).view(1, T)
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

    def pick(x: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:  # [L, B, H, T] -> [L, H, n]
        return x.permute(0, 2, 1, 3)[:, :, sel]

    names = list(generic) + ["any_statement", "same_kind", "same_variable"]
    hop_base = {n: torch.zeros(L, H, K, dtype=torch.float64) for n in names}
    for hop in range(1, K + 1):
        sel = hops >= hop  # [B, T]
        counts[hop - 1] = int(sel.sum())
        if counts[hop - 1] == 0:
            continue
        scores[:, :, hop - 1] = pick(mass[..., hop - 1], sel).mean(-1)
        for n in generic:
            hop_base[n][:, :, hop - 1] = pick(gen_mass[n], sel).mean(-1)
        r = stmt_of[..., hop - 1].clamp(min=0)  # [B, T] referent statement index
        ref_literal = torch.gather(literal, 1, r.view(B, -1)).view(B, T)
        var = torch.gather(lhs_tok, 1, r.view(B, -1)).view(B, T)
        cats = {
            "any_statement": visible,
            "same_kind": visible & (literal.unsqueeze(1) == ref_literal.unsqueeze(2)),
            "same_variable": visible & ((lhs_tok.unsqueeze(1) == var.unsqueeze(2))
                                        | (rhs_tok.unsqueeze(1) == var.unsqueeze(2))),
        }
        if hop == 1:
            # the statements that mention the 1-hop referent's variable are the referent
            # and the position's own statement: reading the definition of one's own
            # variable is what a 1-hop head does, so no baseline there
            del cats["same_variable"]
        for n, C in cats.items():  # C [B, T, S], holds the referent wherever sel
            Cd = C.double()
            avg = (stmt_mass * Cd.view(1, B, 1, T, S)).sum(-1) / Cd.sum(-1).clamp(min=1).view(1, B, 1, T)
            hop_base[n][:, :, hop - 1] = pick(avg, sel).mean(-1)
    sel = hops >= 1
    pick1 = lambda x: pick(x, sel).mean(-1) if bool(sel.any()) else torch.zeros(L, H, dtype=torch.float64)  # noqa: E731
    base = {n: pick1(m) for n, m in gen_mass.items()}
    base["any_literal"] = pick1(lit_mass)
    return HopScores(scores, base, counts, hop_base, target)


@extractor
def hop_scores(model: Any, batch: Batch, *, target: Target = "rhs", cache: Any = None) -> HopScores:
    """Per head, the attention mass on the ground-truth hop-k referents (see
    :class:`HopScores`). The patterns ``blocks.{l}.attn.hook_pattern`` are captured on
    ``batch.tokens``, or read from ``cache`` (an ``ActivationCache`` of a run on them,
    e.g. ``model.run_with_cache(batch.tokens)[1]``). The model is left as found."""
    batch = _require_retrieval_batch(batch)
    return _hop_scores_from_patterns(_patterns(model, to_tokens(model, batch.tokens), cache), batch, target)


# --------------------------------------------------------------------------- composition
def composition(model: Any, src: tuple[int, int], dst: tuple[int, int],
                kind: Literal["K", "Q", "V"] = "K") -> float:
    """Composition score of head ``src = (layer, head)`` into a later head ``dst``
    (Elhage et al., 2021): ||C||_F / (||OV_src||_F ||M_dst||_F) with C = OV_src QK_dst^T
    (``K``: src output feeds the keys), OV_src QK_dst (``Q``) or OV_src OV_dst (``V``);
    :func:`lensprobe.induction.composition_scores` for one pair (TransformerLens's
    factored matrices; grouped K/V heads shared by their query heads). Uses the weights
    as stored (layer-norm scales not folded in unless processed)."""
    return pair_composition(model, src, dst, kind)


def k_composition(model: Any, src: tuple[int, int], dst: tuple[int, int]) -> float:
    """K-composition score: :func:`composition` with ``kind='K'``."""
    return composition(model, src, dst, "K")


# --------------------------------------------------------------------------- result
@dataclass(frozen=True)
class StackEntry:
    """One head of the stack: a specialist of hop ``hop``.

    score: its s_hop; baseline / baseline_name: the best hop baseline there and its name;
    over_baseline: score - baseline; resolves: the smallest difficulty whose accuracy
    falls by >= ``min_drop`` when the head is ablated (its functional hop), None when
    none does or no ablation ran. ``entry["hop"]`` and ``dict(entry)`` still read it as
    the dict it used to be.
    """

    layer: int
    head: int
    name: str
    hop: int
    score: float
    baseline: float
    baseline_name: str
    over_baseline: float
    resolves: int | None = None

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self)]

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)


@dataclass(frozen=True)
class StackedHeads(Result):
    """Stacked retrieval heads of a model on a retrieval batch (Musat, ICLR 2025).

    hop_scores:   the :class:`HopScores` (``scores`` [layer, head, hop], ``baselines``,
                  ``hop_baselines`` and ``over_baseline`` read through to it).
    best_hop:     [layer, head] argmax_k over_baseline (1-based); best_score: [layer, head]
                  s_k there; best_over: [layer, head] over_baseline there.
    specialist:   [layer, head] bool: best_score >= threshold and best_over >= min_over
                  (the head's mass on the referent beats every baseline by min_over).
    stack:        every specialist, ordered by (layer, head), as :class:`StackEntry`.
    compositions: per pair of stack heads in consecutive stack layers: src, dst, and the
                  K, Q and V composition scores (:func:`composition`) with their
                  baselines, the mean over all head pairs of the same two layers
                  (``k_composition`` / ``k_composition_baseline`` list the K ones).
    clean_accuracy: accuracy per difficulty; ablation: head name -> {difficulty:
                  accuracy drop} when that head's output (hook_z) is zero/mean-ablated
                  (``ablation_mode``, 'none' when not run).
    example:      one sequence for the views: tokens (strings), patterns of the stack's
                  heads [n_stack, T, T], the query's referent positions, hops per position.

    ``increasing`` is True when the largest attention hop of each stack layer rises
    strictly with layer (>= 2 layers), the picture of the paper's doubling/tripling
    construction (:attr:`hop_profile`, :attr:`doubling`). A model that chains 1-hop heads
    (each later head reads a position that already holds a longer resolved segment) has
    hops 1, 1, 1: see ``resolves`` in each entry and :attr:`functional_order`.
    """

    AXES: ClassVar = {"best_hop": _LH, "best_score": _LH, "best_over": _LH, "specialist": _LH}
    TITLE: ClassVar = "Stacked heads"

    hop_scores: HopScores
    best_hop: torch.Tensor
    best_score: torch.Tensor
    best_over: torch.Tensor
    specialist: torch.Tensor
    stack: tuple[StackEntry, ...]
    compositions: tuple[dict[str, Any], ...]
    clean_accuracy: dict[int, float]
    ablation: dict[str, dict[int, float]]
    ablation_mode: str
    threshold: float
    min_over: float
    example: dict[str, Any] = dataclasses.field(repr=False)

    # the hop scores, read through
    scores = property(lambda self: self.hop_scores.scores, doc="[layer, head, hop] hop scores s_k.")
    baselines = property(lambda self: self.hop_scores.baselines, doc="name -> [layer, head] baselines.")
    hop_baselines = property(lambda self: self.hop_scores.hop_baselines, doc="name -> [layer, head, hop].")
    over_baseline = property(lambda self: self.hop_scores.over_baseline, doc="[layer, head, hop] s_k - best baseline.")
    target = property(lambda self: self.hop_scores.target, doc="which tokens of a referent count.")

    @property
    def k_composition(self) -> list[float]:
        """K-composition of each consecutive-layer stack pair (``compositions`` order)."""
        return [c["K"] for c in self.compositions]

    @property
    def k_composition_baseline(self) -> list[float]:
        return [c["K_baseline"] for c in self.compositions]

    @property
    def layer_hops(self) -> dict[int, list[int]]:
        """Stack layer -> the sorted attention hops of its specialists."""
        out: dict[int, list[int]] = {}
        for s in self.stack:
            out.setdefault(s.layer, []).append(s.hop)
        return {l: sorted(v) for l, v in sorted(out.items())}

    @property
    def hop_profile(self) -> list[int]:
        """The largest attention hop of each stack layer, in layer order."""
        return [max(v) for v in self.layer_hops.values()]

    @property
    def increasing(self) -> bool:
        """True when the hop profile rises strictly with layer (>= 2 stack layers)."""
        p = self.hop_profile
        return len(p) >= 2 and all(a < b for a, b in zip(p, p[1:]))

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
            if s.resolves is not None:
                per.setdefault(s.layer, []).append(s.resolves)
        layers = sorted({s.layer for s in self.stack})
        if len(layers) < 2 or set(per) != set(layers):
            return False
        r = [min(per[l]) for l in layers]
        return all(a <= b for a, b in zip(r, r[1:])) and r[0] < r[-1]

    def ablation_check(self) -> dict[str, dict[str, float]]:
        """Per stack head: mean accuracy drop on difficulties >= its (attention) hop vs below."""
        out = {}
        for s in self.stack:
            drops = self.ablation.get(s.name)
            if drops is None:
                continue
            hi = [v for d, v in drops.items() if d >= s.hop]
            lo = [v for d, v in drops.items() if d < s.hop]
            out[s.name] = {
                "drop_at_or_above": sum(hi) / len(hi) if hi else math.nan,
                "drop_below": sum(lo) / len(lo) if lo else math.nan,
            }
        return out

    def _table(self) -> Table:
        """One row per head: best hop, score, specialist, in_stack, ``hop_k`` / ``over_k``
        per hop, the [layer, head] baselines and ``ablation_drop_d`` per difficulty."""
        L, H, K = self.scores.shape
        in_stack = {s.name for s in self.stack}
        names = _head_names(L, H)
        cols: dict[str, Any] = {"name": (_LH, names), "best_hop": (_LH, self.best_hop),
                                "best_score": (_LH, self.best_score), "specialist": (_LH, self.specialist),
                                "in_stack": (_LH, [[n in in_stack for n in row] for row in names])}
        for k in range(K):
            cols[f"hop_{k + 1}"] = (_LH, self.scores[..., k])
            cols[f"over_{k + 1}"] = (_LH, self.over_baseline[..., k])
        cols["best_over"] = (_LH, self.best_over)
        cols.update({b: (_LH, v) for b, v in self.baselines.items()})
        for d in sorted({d for v in self.ablation.values() for d in v}):
            cols[f"ablation_drop_{d}"] = (_LH, [[self.ablation.get(n, {}).get(d, math.nan) for n in row]
                                                for row in names])
        return Table(self._grid("best_hop"), cols)

    def summary(self) -> dict[str, Any]:
        stack = ", ".join(s.name + f" (hop {s.hop}" + ("" if s.resolves is None else f", needed from {s.resolves} hops")
                          + ")" for s in self.stack)
        return {"stack": stack or "none detected", "hop_profile": self.hop_profile, "increasing": self.increasing,
                "doubling": self.doubling, "functional_order": self.functional_order,
                "ablation": self.ablation_mode, "target": self.target}

    def plot(self) -> Any:
        """:meth:`HopScores.plot` with the stack outlined in red."""
        return self.hop_scores.plot(marks=[(s.layer, s.head, s.hop) for s in self.stack])

    def attention_view(self) -> View:
        """circuitsvis attention_heads for the stack's heads on the example sequence."""
        ex = self.example
        if not self.stack:
            return attention_heads(ex["all_patterns"], ex["tokens"], ex["all_names"], title="stacked heads")
        return attention_heads(ex["patterns"], ex["tokens"], [s.name for s in self.stack], title="stacked heads")

    def chain_view(self, *, top: int = 1, min_weight: float = 0.2) -> View:
        """Self-contained SVG: positions as nodes (one row per layer boundary), each
        stack head's strongest edges (``top`` per destination, weight >= ``min_weight``)
        from the row below to the row above its layer; the query's referent chain in red."""
        return View(_chain_svg(self, top=top, min_weight=min_weight), title="retrieval chain")

    def show(self) -> View:
        """The hop-score figure and summary, the retrieval chain and the stack's attention
        (save it as one offline page with ``show().save(path)``)."""
        body = figure_view(self.plot(), self.TITLE, self.summary()).body
        parts = [self.chain_view(), self.attention_view()]
        return View(body + "".join(p.fragment(include_bundle=False) for p in parts),
                    title="stacked heads", needs_bundle=True)

    # stack entries travel through save/load as plain dicts
    def _state(self) -> dict[str, Any]:
        return dict(super()._state(), stack=[dataclasses.asdict(s) for s in self.stack])

    @classmethod
    def _from_state(cls, state: dict[str, Any]) -> "StackedHeads":
        stack = tuple(StackEntry(**s) for s in state.get("stack", ()))
        return super()._from_state(dict(state, stack=stack))  # type: ignore[return-value]


def query_reads(res: StackedHeads) -> list[dict[str, Any]]:
    """For the example's query, what each stack head reads: the key position it attends
    most from the query (``pos``, weight), which hop-k referent of the query that is (None
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
        out.append(dict(name=s.name, layer=s.layer, hop=s.hop, pos=j, weight=float(w),
                        token=ex["tokens"][j], referent=refs.index(j) + 1 if j in refs else None,
                        segment=seg if more >= 0 else [j]))
    return out


# --------------------------------------------------------------------------- the chain view
_COLORS = ["#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2"]
_RED = "#d62728"


class _Canvas:
    """Geometry of the chain SVG: T positions, L + 1 rows (layer boundaries), row 0 at the bottom."""

    dx, dy, pad = 34, 90, 40

    def __init__(self, T: int, L: int) -> None:
        self.T, self.L = T, L
        self.width, self.height = self.pad * 2 + self.dx * (T - 1), self.pad * 2 + self.dy * L + 20

    def x(self, i: int) -> int:
        return self.pad + self.dx * i

    def y(self, row: int) -> int:
        return self.height - self.pad - self.dy * row


def _segment_bands(reads: list[dict[str, Any]], toks: list[str], c: _Canvas) -> list[str]:
    """The resolved segment each stack head brings to the query: a band over the
    positions it stands for, on the row the head writes to."""
    out = []
    for n, r in enumerate(reads):
        off = 8 + 4 * (n % 4)
        for k, p in enumerate(r["segment"]):
            out.append(f'<rect x="{c.x(p) - 9}" y="{c.y(r["layer"] + 1) - off - 3}" width="18" height="4" '
                       f'fill="{_COLORS[n % len(_COLORS)]}" fill-opacity="{0.9 if k == 0 else 0.45}"><title>'
                       f'{escape(r["name"])} reads {escape(toks[r["pos"]])} @ {r["pos"]}: segment of '
                       f'{len(r["segment"])} statement(s)</title></rect>')
    return out


def _head_edges(res: StackedHeads, c: _Canvas, chain: set[int], q: int, top: int, min_weight: float) -> list[str]:
    """Each stack head's ``top`` strongest edges per destination (weight >= min_weight)."""
    out = []
    for n, s in enumerate(res.stack):
        A = res.example["patterns"][n]
        for i in range(c.T):
            w, j = torch.topk(A[i], k=min(top, i + 1))
            for wt, jj in zip(w.tolist(), j.tolist()):
                if wt < min_weight:
                    continue
                stroke = _RED if (i in chain | {q} and jj in chain) else _COLORS[n % len(_COLORS)]
                out.append(
                    f'<line x1="{c.x(jj)}" y1="{c.y(s.layer)}" x2="{c.x(i)}" y2="{c.y(s.layer + 1)}" '
                    f'stroke="{stroke}" stroke-width="{1 + 3 * wt:.2f}" stroke-opacity="{0.25 + 0.75 * wt:.2f}">'
                    f'<title>{escape(s.name)}: {i} attends {jj} ({wt:.2f})</title></line>'
                )
    return out


def _nodes(toks: list[str], c: _Canvas, lit: set[int]) -> list[str]:
    """A node per position and row (``lit`` ones in red), row labels and the tokens."""
    out = []
    for r in range(c.L + 1):
        out.append(f'<text x="4" y="{c.y(r) + 4}" fill="#555">{"in" if r == 0 else "L" + str(r - 1)}</text>')
        out += [f'<circle cx="{c.x(i)}" cy="{c.y(r)}" r="5" fill="{_RED if i in lit else "#ccc"}">'
                f'<title>{escape(toks[i])} @ {i}</title></circle>' for i in range(c.T)]
    out += [f'<text x="{c.x(i)}" y="{c.height - 12}" text-anchor="middle" font-weight='
            f'"{"bold" if i in lit else "normal"}">{escape(toks[i])}</text>' for i in range(c.T)]
    return out


def _reads_table(reads: list[dict[str, Any]], toks: list[str]) -> str:
    if not reads:
        return ""
    rows = "".join(
        f'<tr><td style="color:{_COLORS[n % len(_COLORS)]}">{escape(r["name"])}</td><td>{r["hop"]}</td>'
        f'<td>{escape(toks[r["pos"]])} @ {r["pos"]} ({r["weight"]:.2f})</td>'
        f'<td>{escape("-" if r["referent"] is None else r["referent"])}</td>'
        f'<td>{len(r["segment"])}: {escape(" ".join(toks[p] for p in r["segment"]))}</td></tr>'
        for n, r in enumerate(reads))
    return ("<table><tr><th>head</th><th>hop</th><th>query reads</th><th>hop-k referent</th>"
            f"<th>resolved segment it stands for</th></tr>{rows}</table>")


def _chain_svg(res: StackedHeads, *, top: int, min_weight: float) -> str:
    ex = res.example
    toks: list[str] = ex["tokens"]
    c = _Canvas(len(toks), res.n_layers)
    chain = {int(p) for p in ex["query_refs"] if p >= 0}
    q = ex["query_pos"]
    reads = query_reads(res)
    legend = " ".join(f'<tspan fill="{_COLORS[n % len(_COLORS)]}">{escape(s.name)} (hop {s.hop})</tspan>'
                      for n, s in enumerate(res.stack))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{c.width}" height="{c.height}" '
           f'viewBox="0 0 {c.width} {c.height}" style="font-family:monospace;font-size:11px">',
           *_segment_bands(reads, toks, c), *_head_edges(res, c, chain, q, top, min_weight),
           *_nodes(toks, c, chain | {q}),
           f'<text x="{c.pad}" y="16">{legend} <tspan fill="{_RED}">chain of the query</tspan></text>', "</svg>"]
    return "<div>" + "".join(out) + _reads_table(reads, toks) + "</div>"


# --------------------------------------------------------------------------- detection
def _stack_from_scores(hs: HopScores, threshold: float, min_over: float) -> tuple[Any, ...]:
    """Specialists from hop scores: hop = argmax_k over_k; a specialist has s_hop >=
    threshold and over_hop >= min_over. Returns (stack entries, specialist [L, H],
    best_hop, best_score, best_over)."""
    L, H, _ = hs.scores.shape
    best_over, best_idx = hs.over_baseline.max(dim=-1)
    best_score = torch.gather(hs.scores, 2, best_idx.unsqueeze(-1)).squeeze(-1)
    base_val = torch.gather(hs.best_baseline, 2, best_idx.unsqueeze(-1)).squeeze(-1)
    base_name = hs.best_baseline_name
    specialist = (best_score >= threshold) & (best_over >= min_over)
    stack = tuple(
        StackEntry(layer=l, head=h, name=head_name(l, h), hop=int(best_idx[l, h]) + 1,
                   score=float(best_score[l, h]), baseline=float(base_val[l, h]),
                   baseline_name=base_name[l][h][int(best_idx[l, h])], over_baseline=float(best_over[l, h]))
        for l in range(L) for h in range(H) if specialist[l, h])
    return stack, specialist, best_idx + 1, best_score, best_over


def _stack_compositions(model: Any, stack: Sequence[StackEntry]) -> tuple[dict[str, Any], ...]:
    """K, Q, V composition of each pair of stack heads in consecutive stack layers, with
    the mean over every head pair of those two layers as the baseline."""
    layers = sorted({s.layer for s in stack})
    pairs = [(a, b) for la, lb in zip(layers, layers[1:])
             for a in stack if a.layer == la for b in stack if b.layer == lb]
    if not pairs:
        return ()
    scores = {kind: composition_scores(model, kind) for kind in ("K", "Q", "V")}
    out = []
    for a, b in pairs:
        row: dict[str, Any] = {"src": a.name, "dst": b.name}
        for kind, s in scores.items():
            row[kind] = float(s[a.layer, a.head, b.layer, b.head])
            row[f"{kind}_baseline"] = float(s[a.layer, :, b.layer, :].mean())
        out.append(row)
    return tuple(out)


def _ablated_accuracy(model: Any, batch: Batch, layer: int, head: int, mode: str) -> dict[int, float]:
    """Accuracy per difficulty with head (layer, head)'s ``hook_z`` zero- or mean-ablated."""
    with model.hooks(fwd_hooks=[(f"blocks.{layer}.attn.hook_z", ablation_hook([head], mode))]):
        return evaluate(model, batch).accuracy


def _ablation_drops(model: Any, batch: Batch, heads: list[tuple[int, int]], mode: str
                    ) -> tuple[dict[int, float], dict[str, dict[int, float]]]:
    """(clean accuracy per difficulty, head name -> accuracy drop per difficulty)."""
    clean = evaluate(model, batch).accuracy
    drops = {}
    for l, h in heads:
        acc = _ablated_accuracy(model, batch, l, h, mode)
        drops[head_name(l, h)] = {d: clean[d] - acc[d] for d in clean}
    return clean, drops


def _first_hurt(drops: Mapping[int, float], min_drop: float) -> int | None:
    """The smallest difficulty whose accuracy drops by >= min_drop (None if none does)."""
    return next((d for d, v in sorted(drops.items()) if v >= min_drop), None)


def _example(model: Any, batch: Batch, pats: torch.Tensor, stack: Sequence[StackEntry], b: int) -> dict[str, Any]:
    """Sequence ``b`` for the views: its strings, the stack's patterns and its ground truth."""
    L, _, H, T, _ = pats.shape
    q = int(batch.info["query_pos"])
    return dict(
        tokens=str_tokens(model, batch.tokens[b])[0],
        patterns=torch.stack([pats[s.layer, b, s.head] for s in stack]).cpu() if stack
        else torch.zeros(0, T, T, dtype=pats.dtype),
        all_patterns=pats[:, b].reshape(L * H, T, T).cpu(),
        all_names=[head_name(l, h) for l in range(L) for h in range(H)],
        query_pos=q,
        query_refs=[int(p) for p in batch.info["ref_pos"][b, q]],
        ref_pos=batch.info["ref_pos"][b].cpu(),
        hops=batch.info["hops"][b].cpu(),
    )


def _check_options(batch: Batch, ablation: Any, ablate: Any, example: int) -> Batch:
    batch = _require_retrieval_batch(batch)
    if ablation not in ("mean", "zero", None):
        raise InputError(f"ablation must be 'mean', 'zero' or None, got {ablation!r}.")
    if ablate not in ("stack", "all"):
        raise InputError(f"ablate must be 'stack' or 'all', got {ablate!r}.")
    if not 0 <= example < len(batch):
        raise InputError(f"example must index the batch (0..{len(batch) - 1}), got {example}.")
    return batch


@extractor
def stacked_heads(
    model: Any,
    batch: Batch,
    *,
    target: Target = "rhs",
    threshold: float = 0.3,
    min_over: float = 0.1,
    ablation: Literal["mean", "zero"] | None = "mean",
    ablate: Literal["stack", "all"] = "stack",
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
    layer rises with layer. Between heads of consecutive stack layers the K-composition
    score (:func:`k_composition`) is reported with the mean over all head pairs of those
    layers as a baseline (Q and V composition in ``compositions``). ``ablation`` ('mean',
    'zero' or None) ablates the output (hook_z) of each stack head (``ablate='stack'``)
    or every head (``'all'``) and records the accuracy drop per difficulty; each stack
    entry then also gets ``resolves``, the smallest difficulty whose accuracy falls by
    >= ``min_drop`` without the head (its *functional* hop: the depth from which the
    model needs it), or None.

    ``target='rhs'`` (default) scores mass on the referent statement's right-hand side,
    where its resolved value is computed; ``'statement'`` counts the whole statement,
    whose left-hand side is an earlier copy of the same token, so first-layer
    same-token heads then look like 1-hop heads. The model is left as found.
    """
    batch = _check_options(batch, ablation, ablate, example)
    pats = _patterns(model, to_tokens(model, batch.tokens))
    hs = _hop_scores_from_patterns(pats, batch, target)
    stack, specialist, best_hop, best_score, best_over = _stack_from_scores(hs, threshold, min_over)
    clean: dict[int, float] = {}
    drops: dict[str, dict[int, float]] = {}
    if ablation is not None:
        L, H, _ = hs.scores.shape
        heads = ([(s.layer, s.head) for s in stack] if ablate == "stack"
                 else [(l, h) for l in range(L) for h in range(H)])
        clean, drops = _ablation_drops(model, batch, heads, ablation)
        stack = tuple(dataclasses.replace(s, resolves=_first_hurt(drops[s.name], min_drop)) for s in stack)
    return StackedHeads(hs, best_hop, best_score, best_over, specialist, stack, _stack_compositions(model, stack),
                        clean, drops, ablation or "none", threshold, min_over, _example(model, batch, pats, stack, example))


@extractor
def query_accuracy(model: Any, batch: Batch) -> dict[int, float]:
    """Accuracy of the answer at the query position, per main-chain hop count D."""
    batch = _require_retrieval_batch(batch)
    tokens = to_tokens(model, batch.tokens)
    q = int(batch.info["query_pos"])
    with torch.no_grad():
        logits = check_finite(model(tokens)[:, q], "logits")
    hit = logits.argmax(-1).cpu() == batch.info["resolved"][:, q]
    D = batch.info["main_hops"]
    return {int(d): float(hit[D == d].float().mean()) for d in torch.unique(D)}


# --------------------------------------------------------------------------- emergence
@dataclass(frozen=True)
class Emergence(Result):
    """When each head's retrieval role appears during training (Musat, ICLR 2025).

    steps:        the checkpoint steps (the ``step`` axis).
    scores:       [step, layer, head] each head's score on its final best hop.
    best_hop:     [layer, head] best hop at the last checkpoint.
    emerged_at:   head name -> first step from which its score stays >= threshold
                  (heads that never do are absent).
    order:        heads sorted by emergence step (ties broken by layer).
    loss:         [step, difficulty] eval loss per difficulty; ``difficulties`` their labels.
    loss_drop_at: difficulty -> first step from which its loss stays <= drop_fraction x
                  its plateau (its largest loss after the first checkpoint).
    """

    AXES: ClassVar = {"scores": ("step", "layer", "head"), "best_hop": _LH, "loss": ("step", "difficulty")}
    TITLE: ClassVar = "Emergence of stacked heads"

    steps: list[int]
    scores: torch.Tensor
    best_hop: torch.Tensor
    emerged_at: dict[str, int]
    order: list[str]
    loss: torch.Tensor
    difficulties: list[int]
    loss_drop_at: dict[int, int]
    threshold: float

    def _coords(self) -> dict[str, Sequence[Any]]:
        return {"step": self.steps, "difficulty": self.difficulties}

    def _table(self) -> Table:
        """One row per head: best hop, when it emerged, when the loss of its hop count
        dropped, and its final score."""
        L, H = self.best_hop.shape
        names = _head_names(L, H)
        return Table(self._grid("best_hop"), {
            "name": (_LH, names), "best_hop": (_LH, self.best_hop),
            "emerged_at": (_LH, [[self.emerged_at.get(n) for n in row] for row in names]),
            "loss_drop_at_hop": (_LH, [[self.loss_drop_at.get(int(k)) for k in row] for row in self.best_hop]),
            "final_score": (_LH, self.scores[-1])})

    def summary(self) -> dict[str, Any]:
        return {"order": ", ".join(self.order) or "none", "emerged_at": self.emerged_at,
                "loss_drop_at": self.loss_drop_at, "threshold": self.threshold, "steps": len(self.steps)}

    def plot(self) -> Any:
        """Loss per hop count (top) and each emerged head's score on its hop (bottom)
        against step, with the drop and emergence marks."""
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
        for n, d in enumerate(self.difficulties):
            ax1.plot(self.steps, self.loss[:, n].numpy(), label=f"{d} hops")
            if d in self.loss_drop_at:
                ax1.axvline(self.loss_drop_at[d], color=f"C{n}", ls=":", lw=1)
        ax1.set_ylabel("eval loss")
        ax1.set_yscale("log")
        ax1.legend(fontsize=8, ncol=2)
        _, L, H = self.scores.shape
        for l, h in ((l, h) for l in range(L) for h in range(H) if head_name(l, h) in self.emerged_at):
            line, = ax2.plot(self.steps, self.scores[:, l, h].numpy(),
                             label=f"{head_name(l, h)} (hop {int(self.best_hop[l, h])})")
            ax2.axvline(self.emerged_at[head_name(l, h)], color=line.get_color(), ls="--", lw=1)
        ax2.axhline(self.threshold, color="gray", lw=0.8)
        ax2.set_ylabel("score on best hop")
        ax2.set_xlabel("training step")
        if self.emerged_at:
            ax2.legend(fontsize=8)
        fig.tight_layout()
        return fig


def _loss_drops(loss: torch.Tensor, steps: Sequence[int], diffs: Sequence[int],
                drop_fraction: float) -> dict[int, int]:
    """Difficulty -> first step from which loss[:, n] stays <= drop_fraction x plateau."""
    drop = {}
    for n, d in enumerate(diffs):
        # the plateau: an untrained model's first loss (~log vocab) falls within a few
        # steps to guessing among the values in context; the drop that matters is below that
        ref = float(loss[1:, n].max()) if len(steps) > 1 else float(loss[0, n])
        at = stays_from([v <= drop_fraction * ref for v in loss[:, n].tolist()], steps)
        if at is not None:
            drop[d] = at
    return drop


def emergence(
    checkpoints: Any,
    batch: Batch,
    *,
    threshold: float = 0.3,
    drop_fraction: float = 0.5,
    target: Target = "rhs",
    progress: bool = True,
) -> Emergence:
    """When each head's role appears (Musat, ICLR 2025: heads emerge one at a time, each
    with a drop in the loss of the next hop count).

    ``checkpoints``: a :class:`lensprobe.training.TrainResult` with checkpoints, a mapping
    step -> model (or checkpoint path, or zero-argument loader), or a list of (step,
    model) pairs; models are loaded one at a time (:func:`lensprobe.inputs.checkpoint_list`).
    For each checkpoint the hop scores s_k(l, h) (:func:`hop_scores`) and the eval loss
    per difficulty on ``batch`` are computed. A head's role is its best hop at the last
    checkpoint; it *emerges* at the first checkpoint from which its score on that hop
    stays >= ``threshold``. Difficulty d's loss *drops* at the first checkpoint from which
    it stays <= ``drop_fraction`` x its plateau, the largest loss after the first
    checkpoint (the first one, often an untrained model, sits at ~log(d_vocab) and is
    left far behind within a few steps by guessing among the values in context).
    """
    batch = _require_retrieval_batch(batch)
    if not isinstance(checkpoints, Mapping) and not hasattr(checkpoints, "model_at"):
        checkpoints = dict(checkpoints)  # (step, model) pairs
    pairs = checkpoint_list(checkpoints)
    if len(pairs) < 2:
        raise InputError("emergence needs at least two checkpoints (steps) to compare.")
    diffs = sorted(int(d) for d in torch.unique(batch.difficulty[batch.targets != IGNORE]))
    all_scores, losses = [], []
    for _, ck in progress_bar(pairs, progress, "emergence", len(pairs)):
        m = materialise(ck)
        all_scores.append(hop_scores(m, batch, target=target).scores)
        per = evaluate(m, batch).loss
        losses.append([per[d] for d in diffs])
    S = torch.stack(all_scores)  # [C, L, H, K]
    best_idx = S[-1].argmax(-1)  # [L, H]
    C, L, H, _ = S.shape
    role = torch.gather(S, 3, best_idx.view(1, L, H, 1).expand(C, L, H, 1)).squeeze(-1)
    steps = [s for s, _ in pairs]
    emerged = {}
    for l, h in ((l, h) for l in range(L) for h in range(H)):
        at = stays_from((role[:, l, h] >= threshold).tolist(), steps)
        if at is not None:
            emerged[head_name(l, h)] = at
    order = sorted(emerged, key=lambda n: (emerged[n], n))
    loss = torch.tensor(losses, dtype=torch.float64)
    return Emergence(steps, role, best_idx + 1, emerged, order, loss, diffs,
                     _loss_drops(loss, steps, diffs, drop_fraction), threshold)


# --------------------------------------------------------------------------- depth study
DEPTH_STUDY_JSON = "depth_study.json"
"""The shipped depth-study result: ``lensprobe/zoo/results/depth_study.json``
(written by ``scripts/depth_study.py``, read by :func:`load_depth_study`)."""


@dataclass(frozen=True)
class DepthStudy(Result):
    """Query accuracy per (layers, hops) over seeds, against the depth bounds.

    accuracy:   [layers, seed, hops] query accuracy; ``layers``, ``seeds``, ``hops`` the
                coordinates of the axes.
    chance:     [layers, seed, hops] the literal-guess level on the same evaluation batch
                (answering with a random literal present in the sequence,
                :meth:`RetrievalTask.literal_guess`), or None.
    steps_done: [layers, seed] training steps each run took; seconds: [layers, seed] its
                wall time (either may be None).
    config:     the study's settings (steps, task, model and training options).

    bound(D) = min t with t >= log_3(2D) (Musat's lower bound: t layers resolve at most
    (3^t)/2 hops); doubling: a segment that doubles per layer reaches 2^t hops with t
    layers (the learned solutions Musat reports). The JSON record of
    ``scripts/depth_study.py`` is :meth:`to_dict` / :meth:`from_dict`
    (:func:`load_depth_study`); :meth:`save` / :meth:`load` are the safetensors files
    of every result.
    """

    AXES: ClassVar = {"accuracy": ("layers", "seed", "hops"), "chance": ("layers", "seed", "hops"),
                      "steps_done": ("layers", "seed"), "seconds": ("layers", "seed")}
    TITLE: ClassVar = "Depth study"

    accuracy: torch.Tensor
    layers: list[int]
    seeds: list[int]
    hops: list[int]
    config: dict[str, Any]
    chance: torch.Tensor | None = None
    steps_done: torch.Tensor | None = None
    seconds: torch.Tensor | None = None

    def mean(self) -> Float[torch.Tensor, "layers hops"]:
        """[layers, hops] mean over the seeds measured (NaN cells: not measured)."""
        return self.accuracy.nanmean(dim=1)

    @property
    def complete(self) -> bool:
        """True when every (layers, seed, hops) cell was measured."""
        return not bool(torch.isnan(self.accuracy).any())

    def _coords(self) -> dict[str, Sequence[Any]]:
        return {"layers": self.layers, "seed": self.seeds, "hops": self.hops}

    def _table(self) -> Table:
        """One row per (layers, seed, hops): accuracy, chance, the layers the bound needs
        for that D and the most hops doubling reaches with that many layers."""
        cols: dict[str, Any] = {"accuracy": (("layers", "seed", "hops"), self.accuracy),
                                "bound_layers": (("hops",), torch.tensor([depth_bound(D) for D in self.hops])),
                                "doubling_max_hops": (("layers",), torch.tensor([2**L for L in self.layers]))}
        if self.chance is not None:
            cols["chance"] = (("layers", "seed", "hops"), self.chance)
        return Table(self._grid("accuracy"), cols)

    def summary(self) -> dict[str, Any]:
        return {"complete": self.complete, "layers": self.layers, "hops": self.hops,
                "seeds": len(self.seeds), "steps": self.config.get("steps"),
                "mean_accuracy": float(self.accuracy.nanmean())}

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
        """The study from a :meth:`to_dict` record (shapes checked)."""
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
        for a, c in ((a, c) for a in range(len(self.layers)) for c in range(len(self.hops))):
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


def _main_hops(task: RetrievalTask) -> list[int]:
    """The main-chain hop counts D a task samples, from its public ``hops`` option (an
    int, a sequence or a mapping D -> probability)."""
    hops = task.hops
    return sorted({int(hops)} if isinstance(hops, int) else {int(D) for D in hops})


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
    hops = _main_hops(task)
    acc = torch.zeros(len(layers), len(seeds), len(hops), dtype=torch.float64)
    chance = torch.zeros_like(acc)
    done = torch.zeros(len(layers), len(seeds), dtype=torch.float64)
    secs = torch.zeros_like(done)
    grid = [(a, b) for a in range(len(layers)) for b in range(len(seeds))]
    for a, b in progress_bar(grid, progress, "depth study"):
        model = tiny_model(n_layers=int(layers[a]), seed=int(seeds[b]), **mk)
        res = train(model, task, steps=steps, seed=int(seeds[b]), **tk)
        done[a, b], secs[a, b] = res.steps_done, res.seconds
        batch = task.sample(eval_batch_size, torch.Generator().manual_seed(10_000 + int(seeds[b])))
        qa = query_accuracy(model, batch)
        guess = task.literal_guess(batch)
        acc[a, b] = torch.tensor([qa.get(D, math.nan) for D in hops], dtype=torch.float64)
        chance[a, b] = torch.tensor([guess.get(D, math.nan) for D in hops], dtype=torch.float64)
    config = dict(steps=steps, task=task.config(), eval_batch_size=eval_batch_size,
                  model_kwargs={k: v for k, v in mk.items() if k != "vocab"},
                  train_kwargs={k: v for k, v in tk.items() if k != "callbacks"})
    return DepthStudy(acc, [int(l) for l in layers], [int(s) for s in seeds], hops, config,
                      chance, done, secs)
