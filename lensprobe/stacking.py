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
    "query_accuracy",
    "k_composition",
    "composition",
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
    """Attention mass per head on each k-hop referent and on the baselines.

    scores:    [L, H, K] mean over positions i with >= k hops of sum_j A[i, j] M_k[i, j].
    baselines: name -> [L, H] mean mass (over positions with >= 1 hop) on the previous
               token, earlier copies of the same token, position 0 (BOS) and itself.
    counts:    [K] how many positions entered each hop's mean.
    """

    scores: torch.Tensor
    baselines: dict[str, torch.Tensor]
    counts: torch.Tensor


def _hop_scores_from_patterns(patterns: torch.Tensor, batch: Batch, target: str) -> HopScores:
    L, B, H, T, _ = patterns.shape
    M = target_masks(batch, target).to(patterns.device)  # [B, T, T, K]
    K = M.shape[-1]
    hops = batch.info["hops"].to(patterns.device)  # [B, T]
    A = patterns.double()
    # mass[l, b, h, i, k] = sum_j A[l, b, h, i, j] M[b, i, j, k]
    mass = torch.einsum("lbhij,bijk->lbhik", A, M.double())
    scores = torch.zeros(L, H, K, dtype=torch.float64)
    counts = torch.zeros(K, dtype=torch.long)
    for k in range(1, K + 1):
        sel = hops >= k  # [B, T]
        counts[k - 1] = int(sel.sum())
        if counts[k - 1] > 0:
            m = mass[..., k - 1].permute(0, 2, 1, 3)[:, :, sel]  # [L, H, n]
            scores[:, :, k - 1] = m.mean(-1).cpu()
    sel = hops >= 1
    toks = batch.tokens.to(patterns.device)
    idx = torch.arange(T, device=patterns.device)
    prev = (idx.view(T, 1) - 1 == idx.view(1, T)).double()
    self_ = torch.eye(T, dtype=torch.float64, device=patterns.device)
    bos = torch.zeros(T, T, dtype=torch.float64, device=patterns.device)
    bos[:, 0] = 1.0
    same = ((toks.unsqueeze(2) == toks.unsqueeze(1)) & (idx.view(T, 1) > idx.view(1, T))).double()
    base = {}
    for name, mask in (("previous", prev), ("same_token", same), ("bos", bos), ("self", self_)):
        eq = "lbhij,ij->lbhi" if mask.ndim == 2 else "lbhij,bij->lbhi"
        m = torch.einsum(eq, A, mask).permute(0, 2, 1, 3)[:, :, sel]
        base[name] = (m.mean(-1) if m.shape[-1] else torch.zeros(L, H)).cpu()
    return HopScores(scores, base, counts)


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
                  :class:`HopScores`; baselines: name -> [L, H].
    best_hop:     [L, H] argmax_k scores (1-based); best_score: [L, H] its score.
    specialist:   [L, H] bool: best_score >= threshold and above every baseline.
    stack:        the detected stack, one entry per layer that has a specialist (the
                  layer's highest-scoring one): dicts with layer, head, name, hop, score.
    increasing:   True when the stack's attention hops rise strictly with layer (>= 2
                  entries), the picture of the paper's doubling/tripling construction. A
                  model that chains 1-hop heads (each later head reads a position that
                  already holds a longer resolved segment) has hops 1, 1, 1: see
                  ``resolves`` in each entry and :attr:`functional_order`.
    k_composition: K-composition score between consecutive stack entries, and
                  k_composition_baseline the mean over all head pairs of the same layers;
                  compositions: K, Q and V scores with their baselines per consecutive
                  pair (:func:`composition`).
    clean_accuracy: accuracy per difficulty; ablation: head name -> {difficulty:
                  accuracy drop} when that head's output (hook_z) is zero/mean-ablated.
    example:      one sequence for the views: tokens (strings), patterns of the stack's
                  heads [n_stack, T, T], the query's referent positions.
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

    @property
    def n_layers(self) -> int:
        return self.scores.shape[0]

    @property
    def n_heads(self) -> int:
        return self.scores.shape[1]

    @property
    def functional_order(self) -> bool:
        """True when the stack's functional hops (``resolves``) never fall with layer and
        rise from the first head to the last: later heads are needed only for longer chains."""
        r = [s.get("resolves") for s in self.stack]
        if len(r) < 2 or any(v is None for v in r):
            return False
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
                for b, v in self.baselines.items():
                    row[b] = float(v[l, h])
                for d, v in self.ablation.get(name, {}).items():
                    row[f"ablation_drop_{d}"] = v
                rows.append(row)
        return pd.DataFrame(rows)

    def plot(self) -> Any:
        """Heatmap: heads (rows) x hop targets and baselines (columns); stack outlined."""
        import matplotlib.pyplot as plt

        L, H, K = self.scores.shape
        cols = [f"M{k + 1}" for k in range(K)] + list(self.baselines)
        data = torch.cat(
            [self.scores.reshape(L * H, K)] + [self.baselines[b].reshape(L * H, 1) for b in self.baselines],
            dim=1,
        ).numpy()
        fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(cols), 1.0 + 0.32 * L * H))
        im = ax.imshow(data, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(cols)), cols, rotation=45)
        ax.set_yticks(range(L * H), [head_name(l, h) for l in range(L) for h in range(H)])
        ax.axvline(K - 0.5, color="white", lw=1)
        for s in self.stack:
            r = s["layer"] * H + s["head"]
            ax.add_patch(plt.Rectangle((s["hop"] - 1.5, r - 0.5), 1, 1, fill=False, ec="red", lw=2))
        ax.set_title(f"attention mass on k-hop referents ({self.target}); red: stack")
        fig.colorbar(im, ax=ax, fraction=0.05)
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
    return "<div>" + "".join(out) + "</div>"


# --------------------------------------------------------------------------- detection
def stacked_heads(
    model: Any,
    batch: Batch,
    *,
    target: str = "rhs",
    threshold: float = 0.3,
    ablation: str | None = "mean",
    ablate: str = "stack",
    min_drop: float = 0.05,
    example: int = 0,
) -> StackedHeads:
    """Detect stacked retrieval heads (Musat, ICLR 2025) on a retrieval batch.

    Hop score of head (l, h) for hop k (``target`` picks the referent's tokens):
        s_k(l, h) = mean_{(b, i): hops(b, i) >= k} sum_j A^{l,h}[b, i, j] M_k[b, i, j].
    Baselines (mass on previous token, earlier same token, BOS, self) use the positions
    with >= 1 hop. A head is a *specialist* if max_k s_k >= ``threshold`` and exceeds all
    baselines; the *stack* takes each layer's best specialist, and is *increasing* when
    its hops rise with layer. Between consecutive stack heads the K-composition score
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
        best_score, best_idx = hs.scores.max(dim=-1)
        best_hop = best_idx + 1
        base_max = torch.stack(list(hs.baselines.values())).max(dim=0).values
        specialist = (best_score >= threshold) & (best_score > base_max)
        stack = []
        for l in range(L):
            cand = [h for h in range(H) if specialist[l, h]]
            if cand:
                h = max(cand, key=lambda h: float(best_score[l, h]))
                stack.append(dict(layer=l, head=h, name=head_name(l, h),
                                  hop=int(best_hop[l, h]), score=float(best_score[l, h])))
        increasing = len(stack) >= 2 and all(a["hop"] < b["hop"] for a, b in zip(stack, stack[1:]))
        kc, kc_base, comps = [], [], []
        for a, b in zip(stack, stack[1:]):
            src, dst = (a["layer"], a["head"]), (b["layer"], b["head"])
            row = {}
            for kind in ("K", "Q", "V"):
                row[kind] = composition(model, src, dst, kind)
                row[f"{kind}_baseline"] = sum(
                    composition(model, (a["layer"], h1), (b["layer"], h2), kind)
                    for h1 in range(H) for h2 in range(H)) / (H * H)
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
    )
    return StackedHeads(hs.scores, hs.baselines, best_hop, best_score, specialist, stack,
                        increasing, kc, kc_base, comps, clean, drops, ablation or "none",
                        threshold, target, ex)



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
@dataclass(frozen=True)
class DepthStudy:
    """Query accuracy per (layers, hops) over seeds, against the depth bounds.

    accuracy: [n_layer_values, n_seeds, n_hops] query accuracy; layers, seeds, hops the
    axes. bound(D) = min t with t >= log_3(2D) (Musat's lower bound); doubling(L) =
    2^(L-1) hops (the doubling construction, see
    :func:`lensprobe.tasks.retrieval.doubling_hops`).
    """

    accuracy: torch.Tensor
    layers: list[int]
    seeds: list[int]
    hops: list[int]
    config: dict[str, Any]

    def mean(self) -> torch.Tensor:
        return self.accuracy.mean(dim=1)

    def to_dataframe(self) -> Any:
        import pandas as pd

        rows = []
        for a, L in enumerate(self.layers):
            for b, s in enumerate(self.seeds):
                for c, D in enumerate(self.hops):
                    rows.append(dict(layers=L, seed=s, hops=D, accuracy=float(self.accuracy[a, b, c]),
                                     bound_layers=depth_bound(D), doubling_max_hops=doubling_hops(L)))
        return pd.DataFrame(rows)

    def plot(self) -> Any:
        import matplotlib.pyplot as plt

        m = self.mean().numpy()
        fig, ax = plt.subplots(figsize=(max(4.5, 2.5 + 0.7 * len(self.hops)),
                                        1.8 + 0.6 * len(self.layers)))
        im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
        ax.set_xticks(range(len(self.hops)), [str(h) for h in self.hops])
        ax.set_yticks(range(len(self.layers)), [str(l) for l in self.layers])
        ax.set_xlabel("hops D (query)")
        ax.set_ylabel("layers")
        for a in range(len(self.layers)):
            for c in range(len(self.hops)):
                ax.text(c, a, f"{m[a, c]:.2f}", ha="center", va="center",
                        color="white" if m[a, c] < 0.6 else "black", fontsize=8)
        # the boundary: last solvable D per row, as a step line between cells
        for fn, style, label in ((lambda L: (3**L) // 2, "r-", "log_3(2D) bound"),
                                 (doubling_hops, "w--", "doubling 2^(L-1)")):
            xs, ys = [], []
            for a, L in enumerate(self.layers):
                last = max([c for c, D in enumerate(self.hops) if D <= fn(L)], default=-1)
                xs += [last + 0.5, last + 0.5]
                ys += [a - 0.5, a + 0.5]
            ax.plot(xs, ys, style, lw=2, label=label)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2)
        fig.colorbar(im, ax=ax, fraction=0.05)
        fig.tight_layout()
        return fig


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
    :func:`lensprobe.train`. Evaluation uses a fresh batch (seed 10_000 + seed).
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
    grid = [(a, b) for a in range(len(layers)) for b in range(len(seeds))]
    it: Iterable = grid
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(grid, desc="depth study")
    for a, b in it:
        model = tiny_model(n_layers=int(layers[a]), seed=int(seeds[b]), **mk)
        train(model, task, steps=steps, seed=int(seeds[b]), **tk)
        batch = task.sample(eval_batch_size, torch.Generator().manual_seed(10_000 + int(seeds[b])))
        qa = query_accuracy(model, batch)
        for c, D in enumerate(hops):
            acc[a, b, c] = qa.get(D, math.nan)
    return DepthStudy(acc, [int(l) for l in layers], [int(s) for s in seeds], hops,
                      dict(steps=steps, model_kwargs={k: v for k, v in mk.items() if k != "vocab"},
                           train_kwargs=dict(tk)))
