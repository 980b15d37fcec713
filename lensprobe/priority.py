"""Hard retrieval and soft composition: the token-priority graph (TPG).

Li, Huang, Ildiz, Rawat, Oymak, "Mechanics of Next Token Prediction with Self-Attention",
AISTATS 2024 (arXiv 2403.08081).

Setting: one attention layer reads a sequence X (rows e_{x_t}, unit-norm token
embeddings) with last token x_T = k, attends with s = softmax(X W e_k) and predicts the
attention mass per token, p(v) = sum_t s_t 1[x_t = v]; the loss is -log p(y).

* :class:`TokenPriorityGraph` -- for every last token k the directed graph G^(k) with an
  edge y -> x_t for every training sample (X, y) ending in k and every other token x_t in
  X; its strongly connected components (equal priority) and their condensation order;
  the hard-retrieval set of any input.
* :func:`graph_svm` -- W_svm = argmin ||W||_F s.t. (e_y - e_j)^T W e_k >= 1 for every
  edge y -> j of G^(k) across SCCs and = 0 within an SCC; and W_fin, the minimiser of the
  loss on sequences reduced to their label's SCC over the within-SCC span
  S_fin = span{(e_i - e_j) e_k^T : i, j in one SCC of G^(k)}.
* :func:`priority_model` / :func:`train_priority` -- the paper's one-layer model as a
  TransformerLens model, trained by normalised gradient descent (``lp.train``).
* :func:`head_W` -- W of any head: W = (QK[l, h])^T / attn_scale, because the score of
  key position t at the query T is x_T W_Q W_K^T x_t / scale = x_t^T W x_T.
* :func:`priority_alignment` / :func:`alignment_curve` -- how a head matches the graph:
  cos(W, W_svm), ||P_fin W - W_fin||_F, cos(W - P_fin W, W_svm), attention mass on the
  retrieved SCC, within-SCC split against softmax of W_fin scores, and the head's own
  ("local") priority graph compared edge by edge with the data's.
* :func:`retrieval_graph_view` -- a self-contained HTML/SVG page of all of it (laid out
  here, drawn by :func:`lensprobe.views.graph_view`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Sequence

import numpy as np
import torch
from jaxtyping import Float, Int

from . import _tl
from .core import extractor, progress_bar, renamed, run_hooked
from .errors import InputError
from .inputs import (
    check_finite,
    check_head,
    check_layer,
    check_pattern,
    checkpoint_list,
    head_name,
    int_ids,
    materialise,
    to_tokens,
)
from .results import Result, Table, frame
from .tasks.base import IGNORE
from .tasks.priority import FixedData
from .views import GraphPanel, View, graph_view

if TYPE_CHECKING:  # networkx loads on first use (import lensprobe stays light)
    import networkx as nx

__all__ = [
    "TokenPriorityGraph",
    "Retrieval",
    "GraphSVM",
    "InfeasibleError",
    "graph_svm",
    "head_W",
    "priority_model",
    "priority_loss",
    "train_priority",
    "PriorityAlignment",
    "priority_alignment",
    "AlignmentCurve",
    "alignment_curve",
    "retrieval_graph_view",
]

#: how a head's edge compares with the data's graph (see :class:`PriorityAlignment`)
EdgeStatus = Literal["agree", "missed", "untested", "implied", "reversed", "unsupported"]
RetrievalStatus = Literal["unique", "tie", "incomparable", "no ranked token", "unknown last token"]


class InfeasibleError(InputError):
    """The Graph-SVM constraints admit no W (e.g. linearly dependent token embeddings)."""


# =========================================================================== the graph
@dataclass(frozen=True)
class Retrieval(Result):
    """The hard-retrieval prediction for one input sequence (no tensors: one record).

    last_token:   k = the sequence's last token.
    tokens:       the retrieved tokens: the tokens present in the context that belong to
                  the highest-priority SCC(s) of G^(k) present (sorted).
    sccs:         one tuple of present tokens per maximal present SCC (several when they
                  are incomparable: no path between them in G^(k)).
    tie:          a retrieved SCC has two or more present tokens (soft composition).
    incomparable: more than one maximal SCC is present.
    unranked:     present tokens that are not nodes of G^(k) (never seen with k).
    known:        G^(k) exists (k was the last token of some training sample).
    """

    TITLE: ClassVar = "hard retrieval"

    last_token: int
    tokens: tuple[int, ...]
    sccs: tuple[tuple[int, ...], ...]
    tie: bool
    incomparable: bool
    unranked: tuple[int, ...]
    known: bool

    @property
    def status(self) -> RetrievalStatus:
        if not self.known:
            return "unknown last token"
        if not self.tokens:
            return "no ranked token"
        if self.incomparable:
            return "incomparable"
        return "tie" if self.tie else "unique"

    def _table(self) -> Table:
        """One row: the record (token tuples stay tuples)."""
        return Table({}, constants=dict(last_token=self.last_token, tokens=self.tokens, sccs=self.sccs,
                                        status=self.status, unranked=self.unranked, known=self.known))

    def summary(self) -> dict[str, Any]:
        return dict(last_token=self.last_token, status=self.status, retrieved=len(self.tokens),
                    sccs=len(self.sccs), unranked=len(self.unranked))

    def plot(self) -> Any:
        """One bar per retrieved SCC (height = its present tokens, labelled by token id),
        and one grey bar for the unranked tokens."""
        import matplotlib.pyplot as plt

        groups = [*self.sccs, *([self.unranked] if self.unranked else [])]
        fig, ax = plt.subplots(figsize=(4, 2.6))
        ax.bar(range(len(groups)), [len(g) for g in groups],
               color=["#2a9d4b"] * len(self.sccs) + ["#aaaaaa"] * bool(self.unranked))
        ax.set_xticks(range(len(groups)), [" ".join(map(str, g)) for g in groups])
        ax.set_ylabel("present tokens")
        ax.set_title(f"last token {self.last_token}: {self.status}")
        fig.tight_layout()
        return fig


def _as_sequences(sequences: Any, labels: Any) -> tuple[list[tuple[int, ...]], list[int]]:
    if isinstance(sequences, (str, bytes)) or isinstance(sequences, torch.Tensor):
        seqs = [tuple(row) for row in int_ids(sequences, "sequences", 2).tolist()]
    else:
        seqs = [tuple(int_ids(s, f"sequence {i}", 1).tolist()) for i, s in enumerate(sequences)]
    labs = int_ids(labels, "labels", 1).tolist()
    if len(seqs) != len(labs):
        raise InputError(f"got {len(seqs)} sequences but {len(labs)} labels; pass one label each.")
    if not seqs:
        raise InputError("the dataset is empty: pass at least one (sequence, label) pair.")
    if any(len(s) == 0 for s in seqs):
        raise InputError("a sequence is empty; every sequence needs at least its last token.")
    if min(min(s) for s in seqs) < 0 or min(labs) < 0:
        raise InputError("token ids must be non-negative.")
    return seqs, labs


@dataclass(frozen=True, eq=False)
class TokenPriorityGraph(Result):
    """The token-priority graph of a dataset of (sequence, next token) pairs.

    For each last token k, G^(k) has the tokens of all sequences ending in k as nodes
    and an edge y -> x_t for every such sample (X, y) and every token x_t != y of X
    (the last token included): "the label outranks everything else in its context".
    Edge attribute ``count`` = the number of samples giving the edge.

    Convention for a sample whose label y does not occur in its own context X: it adds
    no node and no edge, with a warning, and ``excluded`` lists its index. The paper
    assumes y in X; otherwise p(y) = 0 for every W, the loss -log p(y) is infinite, and
    "y outranks X" is no statement about attention. (The sample stays in ``sequences``;
    :func:`graph_svm`'s reduced loss leaves it out, and :func:`train_priority` refuses it.)

    SCCs are the sets of equal priority; the condensation DAG orders them. ``levels(k)``
    lays them out by priority: level 0 holds the SCCs nothing outranks, level l the SCCs
    whose longest chain of outranking SCCs above them has length l.

    Fields (the whole saved state; the graphs are rebuilt from them):

    sequences: the samples' token ids, one tuple per sample (lengths may differ).
    labels:    the next token of each sample.
    n_tokens:  the vocabulary size (default: the largest id + 1, or ``len(vocab)``).
    vocab:     token strings (default the ids as strings).

    Build with :meth:`from_data` (tensors or lists) or :meth:`from_batch` (a task Batch,
    label = target at the last position). ``to_dataframe()``: one row per edge;
    :meth:`last_token_table`: one row per last token; ``show()``: the HTML graph view.
    """

    TITLE: ClassVar = "token-priority graph"

    sequences: tuple[tuple[int, ...], ...]
    labels: tuple[int, ...]
    n_tokens: int | None = field(default=None, kw_only=True)
    vocab: list[str] | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        put = functools.partial(object.__setattr__, self)
        sequences = tuple(tuple(int(t) for t in s) for s in self.sequences)
        labels = tuple(int(y) for y in self.labels)
        vocab = self.vocab
        top = max(max(max(s) for s in sequences), max(labels)) + 1
        n_tokens = int(self.n_tokens) if self.n_tokens is not None else (len(vocab) if vocab else top)
        if n_tokens < top:
            raise InputError(f"token id {top - 1} is outside n_tokens={n_tokens}.")
        vocab = list(vocab) if vocab is not None else [str(i) for i in range(n_tokens)]
        if len(vocab) != n_tokens:
            raise InputError(f"vocab has {len(vocab)} strings for {n_tokens} tokens.")
        for name, value in dict(sequences=sequences, labels=labels, n_tokens=n_tokens, vocab=vocab).items():
            put(name, value)
        put("excluded", tuple(i for i, (seq, y) in enumerate(zip(sequences, labels)) if y not in seq))
        if self.excluded:
            i = self.excluded[0]
            warnings.warn(
                f"{len(self.excluded)} of {len(sequences)} samples have a label that is not in"
                f" their own context (e.g. sample {i}: label {labels[i]} not in"
                f" {list(sequences[i])}); the paper's loss -log p(y) is infinite there, so they"
                " add no edges to the token-priority graph (see TokenPriorityGraph.excluded).",
                stacklevel=4,
            )
        put("graphs", _priority_graphs(sequences, labels))
        put("_order", {})

    @classmethod
    def from_data(
        cls,
        sequences: Int[torch.Tensor, "n pos"] | Sequence[Sequence[int]],
        labels: Int[torch.Tensor, " n"] | Sequence[int],
        *,
        n_tokens: int | None = None,
        vocab: Sequence[str] | None = None,
    ) -> "TokenPriorityGraph":
        """``sequences``: [n, pos] tensor or a list of token-id lists; ``labels``: [n]."""
        seqs, labs = _as_sequences(sequences, labels)
        return cls(seqs, labs, n_tokens=n_tokens, vocab=vocab)

    @classmethod
    def from_batch(cls, batch: Any, *, vocab: Sequence[str] | None = None) -> "TokenPriorityGraph":
        """A task :class:`~lensprobe.tasks.base.Batch`: label = target at the last position."""
        labels = batch.targets[:, -1]
        if bool((labels == IGNORE).any()):
            raise InputError("some sequences have no target at the last position (IGNORE).")
        return cls.from_data(batch.tokens, labels, vocab=vocab)

    # ------------------------------------------------------------------ structure
    @property
    def last_tokens(self) -> list[int]:
        return list(self.graphs)

    @renamed(k="last_token")
    def graph(self, last_token: int) -> nx.DiGraph:
        """G^(last_token)."""
        if last_token not in self.graphs:
            raise InputError(
                f"no sequence in the data ends in token {last_token}; last tokens with a graph:"
                f" {self.last_tokens[:20]}."
            )
        return self.graphs[last_token]

    def _structure(self, k: int) -> tuple:
        if k not in self._order:
            import networkx as nx

            g = self.graph(k)
            comps = list(nx.strongly_connected_components(g))
            cond = nx.condensation(g, scc=comps)
            level = {}
            for c in nx.topological_sort(cond):
                preds = list(cond.predecessors(c))
                level[c] = 1 + max(level[p] for p in preds) if preds else 0
            order = sorted(cond.nodes, key=lambda c: (level[c], min(cond.nodes[c]["members"])))
            new = {c: i for i, c in enumerate(order)}
            sccs = tuple(tuple(sorted(cond.nodes[c]["members"])) for c in order)
            levels = tuple(level[c] for c in order)
            scc_id = {t: new[cond.graph["mapping"][t]] for t in g.nodes}
            below = tuple(frozenset(new[d] for d in nx.descendants(cond, c)) for c in order)
            self._order[k] = (sccs, levels, scc_id, below)
        return self._order[k]

    @renamed(k="last_token")
    def sccs(self, last_token: int) -> tuple[tuple[int, ...], ...]:
        """SCCs of G^(last_token) (sorted token tuples), ordered by priority level, then token."""
        return self._structure(last_token)[0]

    @renamed(k="last_token")
    def levels(self, last_token: int) -> tuple[int, ...]:
        """The priority level of each SCC of :meth:`sccs` (0 = top)."""
        return self._structure(last_token)[1]

    @renamed(k="last_token")
    def scc_index(self, last_token: int) -> dict[int, int]:
        """token -> index into :meth:`sccs` for the nodes of G^(last_token)."""
        return dict(self._structure(last_token)[2])

    @renamed(k="last_token")
    def outranks(self, last_token: int, a: int, b: int) -> bool:
        """True when G^(last_token) has a path a ~> b (a has priority over b, or they are tied)."""
        import networkx as nx

        g = self.graph(last_token)
        return a in g and b in g and (a == b or nx.has_path(g, a, b))

    @property
    def is_acyclic(self) -> bool:
        return all(len(c) == 1 for k in self.graphs for c in self.sccs(k))

    @renamed(k="last_token")
    def within_pairs(self, last_token: int) -> list[tuple[int, int]]:
        """Edges of G^(last_token) inside one SCC (equality constraints of the Graph-SVM)."""
        sid = self._structure(last_token)[2]
        return [(a, b) for a, b in self.graph(last_token).edges if sid[a] == sid[b]]

    @renamed(k="last_token")
    def cross_pairs(self, last_token: int) -> list[tuple[int, int]]:
        """Edges of G^(last_token) between SCCs (margin constraints of the Graph-SVM)."""
        sid = self._structure(last_token)[2]
        return [(a, b) for a, b in self.graph(last_token).edges if sid[a] != sid[b]]

    # ------------------------------------------------------------------ retrieval
    def retrieve(self, sequence: Int[torch.Tensor, " pos"] | Sequence[int]) -> Retrieval:
        """The hard-retrieval set of one sequence (last token = its last element)."""
        seq = [int(t) for t in (sequence.tolist() if isinstance(sequence, torch.Tensor) else sequence)]
        if not seq:
            raise InputError("cannot retrieve from an empty sequence.")
        k = seq[-1]
        present = set(seq)
        if k not in self.graphs:
            return Retrieval(k, (), (), False, False, tuple(sorted(present)), False)
        sccs, _, sid, below = self._structure(k)
        ranked = {t for t in present if t in sid}
        ids = {sid[t] for t in ranked}
        top = sorted(c for c in ids if not any(c in below[o] for o in ids if o != c))
        groups = tuple(tuple(sorted(t for t in ranked if sid[t] == c)) for c in top)
        tokens = tuple(sorted(t for grp in groups for t in grp))
        return Retrieval(
            last_token=k,
            tokens=tokens,
            sccs=groups,
            tie=any(len(grp) > 1 for grp in groups),
            incomparable=len(groups) > 1,
            unranked=tuple(sorted(present - ranked)),
            known=True,
        )

    def retrieve_all(self, sequences: Any) -> list[Retrieval]:
        seqs = sequences.tolist() if isinstance(sequences, torch.Tensor) else sequences
        return [self.retrieve(s) for s in seqs]

    # ------------------------------------------------------------------ outputs
    def edges(self) -> list[tuple[int, int, int]]:
        """All edges as (k, src, dst)."""
        return [(k, a, b) for k, g in self.graphs.items() for a, b in g.edges]

    def _table(self) -> Table:
        """One row per edge: k, src, dst (ids and strings), count, same_scc, levels."""
        edges = self.edges()
        cols: dict[str, list] = {"count": [], "same_scc": [], "src_level": [], "dst_level": []}
        for k, a, b in edges:
            _, levels, sid, _ = self._structure(k)
            for col, value in zip(cols, (self.graphs[k][a][b]["count"], sid[a] == sid[b],
                                         levels[sid[a]], levels[sid[b]])):
                cols[col].append(value)
        columns = {c: (("edge",), np.asarray(v, dtype=bool if c == "same_scc" else np.int64))
                   for c, v in cols.items()}
        return Table({"edge": range(len(edges))}, {**_edge_columns(self.vocab, edges), **columns})

    def last_token_table(self) -> Any:
        """One row per last token k: nodes, edges, SCCs, the largest SCC, levels (a DataFrame)."""
        ks = self.last_tokens
        stats = np.array([(self.graphs[k].number_of_nodes(), self.graphs[k].number_of_edges(),
                           len(self.sccs(k)), max(map(len, self.sccs(k))), max(self.levels(k)) + 1)
                          for k in ks], dtype=np.int64).reshape(-1, 5)
        names = ("nodes", "edges", "sccs", "largest_scc", "levels")
        return frame(Table({"k": ks}, {"k_str": (("k",), [self.vocab[k] for k in ks]),
                                       **{n: (("k",), stats[:, i]) for i, n in enumerate(names)}}))

    def summary(self) -> dict[str, Any]:
        """Samples, last tokens, edges, SCCs, the largest SCC, acyclic, excluded samples."""
        sccs = [c for k in self.graphs for c in self.sccs(k)]
        return dict(samples=len(self.sequences), last_tokens=len(self.graphs),
                    edges=sum(g.number_of_edges() for g in self.graphs.values()), sccs=len(sccs),
                    largest_scc=max(map(len, sccs)) if sccs else 0, acyclic=self.is_acyclic,
                    excluded=len(self.excluded))

    def plot(self, last_tokens: Sequence[int] | None = None, *, max_panels: int = 12) -> Any:
        """The graphs G^(k) as matplotlib panels, SCCs stacked by priority (top = level 0)."""
        import matplotlib.pyplot as plt

        ks = list(last_tokens) if last_tokens is not None else self.last_tokens[:max_panels]
        cols = min(4, len(ks))
        rows = math.ceil(len(ks) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.2 * rows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, k in zip(axes.flat, ks):
            pos, boxes = _layout(self, k, extra=())
            for (x0, y0, w, h), _ in boxes:
                ax.add_patch(plt.Rectangle((x0, -y0 - h), w, h, fill=False, ec="#999", lw=0.8))
            for a, b in self.graph(k).edges:
                (xa, ya), (xb, yb) = pos[a], pos[b]
                ax.annotate("", xy=(xb, -yb), xytext=(xa, -ya), arrowprops=dict(
                    arrowstyle="->", color="#333", lw=0.8, shrinkA=9, shrinkB=9,
                    connectionstyle="arc3,rad=0.2"))
            for t, (x, y) in pos.items():
                ax.plot([x], [-y], "o", ms=16, mfc="white", mec="#1f77b4")
                ax.text(x, -y, self.vocab[t], ha="center", va="center", fontsize=8)
            xs = [p[0] for p in pos.values()]
            ys = [-p[1] for p in pos.values()]
            ax.set_xlim(min(xs) - 40, max(xs) + 40)
            ax.set_ylim(min(ys) - 40, max(ys) + 40)
            ax.set_title(f"last token {self.vocab[k]}", fontsize=9)
        fig.tight_layout()
        return fig

    def show(self, alignment: "PriorityAlignment | None" = None, svm: "GraphSVM | None" = None,
             **kw: Any) -> View:
        """The HTML/SVG view of :func:`retrieval_graph_view`."""
        return retrieval_graph_view(self, alignment=alignment, svm=svm, **kw)

    def __repr__(self) -> str:
        n_edges = sum(g.number_of_edges() for g in self.graphs.values())
        return (f"TokenPriorityGraph({len(self.sequences)} samples, {len(self.graphs)} last tokens,"
                f" {n_edges} edges, {'acyclic' if self.is_acyclic else 'cyclic'})")


def _priority_graphs(sequences: Sequence[tuple[int, ...]], labels: Sequence[int]) -> dict[int, nx.DiGraph]:
    """{k: G^(k)} in last-token order, with edge counts; samples whose label is not in
    their context add nothing."""
    import networkx as nx

    graphs: dict[int, nx.DiGraph] = {}
    for seq, y in zip(sequences, labels):
        if y not in seq:
            continue
        g = graphs.setdefault(seq[-1], nx.DiGraph())
        g.add_nodes_from(seq)
        for t in set(seq) - {y}:
            if g.has_edge(y, t):
                g[y][t]["count"] += 1
            else:
                g.add_edge(y, t, count=1)
    return dict(sorted(graphs.items()))


def _edge_columns(vocab: Sequence[str], edges: Sequence[tuple]) -> dict[str, tuple]:
    """Table columns k, src, dst and their strings for edges (k, src, dst, ...), axis 'edge'."""
    ids = np.asarray([e[:3] for e in edges], dtype=np.int64).reshape(-1, 3)
    cols: dict[str, tuple] = {n: (("edge",), ids[:, i]) for i, n in enumerate(("k", "src", "dst"))}
    cols.update({f"{n}_str": (("edge",), [vocab[t] for t in ids[:, i].tolist()])
                 for i, n in enumerate(("k", "src", "dst"))})
    return cols


# =========================================================================== Graph-SVM
def _embeddings(embeddings: Any) -> torch.Tensor:
    """[n_tokens, d] float64 CPU embeddings from a tensor, an array or a model (its W_E)."""
    if hasattr(embeddings, "W_E") and hasattr(embeddings, "cfg"):
        _tl.require_model(embeddings)
        embeddings = embeddings.W_E
    E = torch.as_tensor(embeddings).detach().to("cpu", torch.float64)
    if E.ndim != 2:
        raise InputError(f"embeddings must be [n_tokens, d], got shape {tuple(E.shape)}.")
    return check_finite(E, "embeddings")


def _reduced_batch(tpg: TokenPriorityGraph) -> tuple[np.ndarray, ...]:
    """The samples reduced to their label's SCC, padded: tokens, mask [n, T], labels, last [n].

    Position t of sample (X, y) with last token k is kept when x_t lies in y's SCC of
    G^(k) (the paper's reduced sequences). Samples whose label is not in the context
    are dropped.
    """
    rows, masks, labs, lasts = [], [], [], []
    for seq, y in zip(tpg.sequences, tpg.labels):
        if y not in seq:
            continue
        sid = tpg._structure(seq[-1])[2]
        rows.append(list(seq))
        masks.append([sid[t] == sid[y] for t in seq])
        labs.append(y)
        lasts.append(seq[-1])
    T = max((len(r) for r in rows), default=1)
    tok = np.array([r + [0] * (T - len(r)) for r in rows], dtype=np.int64).reshape(-1, T)
    mask = np.array([m + [False] * (T - len(m)) for m in masks], dtype=bool).reshape(-1, T)
    return tok, mask, np.array(labs, dtype=np.int64), np.array(lasts, dtype=np.int64)


def _retrieval_loss(W: np.ndarray, E: np.ndarray, tok: np.ndarray, mask: np.ndarray,
                    labels: np.ndarray, last: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean over samples of -log sum_{t: x_t = y} softmax_t(e_{x_t}^T W e_k) over the
    masked positions, and its gradient in W: mean of sum_t (p_t - q_t) e_{x_t} e_k^T with
    p = softmax over the positions, q = softmax over the label's positions."""
    if len(tok) == 0:
        return 0.0, np.zeros_like(W)
    s = np.einsum("ntd,de,ne->nt", E[tok], W, E[last])
    on = mask & (tok == labels[:, None])
    s = np.where(mask, s, -np.inf)
    m = s.max(axis=1, keepdims=True)
    ex = np.exp(s - m)
    z_all, z_on = ex.sum(1), np.where(on, ex, 0.0).sum(1)
    loss = float(np.mean(np.log(z_all) - np.log(z_on)))
    coef = ex / z_all[:, None] - np.where(on, ex, 0.0) / z_on[:, None]  # p - q, [n, T]
    grad = np.einsum("nt,ntd,ne->de", coef, E[tok], E[last]) / len(tok)
    return loss, grad


@dataclass(frozen=True)
class GraphSVM(Result):
    """The Graph-SVM direction and the finite component of a token-priority graph.

    W_svm:       [d_key, d_query] argmin ||W||_F s.t. (e_y - e_j)^T W e_k >= 1 for every edge
                 y -> j of G^(k) between SCCs and = 0 for every edge inside an SCC
                 (zeros when infeasible; see ``feasible``).
    W_fin:       [d_key, d_query] argmin over S_fin of the reduced loss (mean over samples of
                 -log sum_{t: x_t=y} softmax(e_{x_t}^T W e_k) over the positions t whose
                 token lies in y's SCC of G^(k)).
    fin_basis:   [basis, d_key, d_query] orthonormal basis of S_fin = span{(e_i - e_j) e_k^T:
                 i, j in one SCC of G^(k)} (no rows when every SCC is a single token).
    feasible:    whether the constraints admit a solution; ``message`` says why not.
    margin:      min over cross-SCC edges of (e_y - e_j)^T W_svm e_k (1 when feasible).
    within_residual: max over within-SCC edges of |(e_i - e_j)^T W_svm e_k|.
    n_cross, n_within: the numbers of margin and equality constraints.
    reduced_loss: the reduced loss at W_fin; fin_grad_norm: its gradient norm there.
    embeddings:  [token, d_model] the e_v used.
    constraints: [constraint, 3] (k, y, j) of every constraint edge: the ``n_cross``
                 margin constraints first, then the ``n_within`` equalities.
    """

    AXES: ClassVar = {"W_svm": ("d_key", "d_query"), "W_fin": ("d_key", "d_query"),
                      "fin_basis": ("basis", "d_key", "d_query"), "embeddings": ("token", "d_model"),
                      "constraints": ("constraint", "k_src_dst")}
    TITLE: ClassVar = "Graph-SVM"

    W_svm: torch.Tensor
    W_fin: torch.Tensor
    fin_basis: torch.Tensor
    feasible: bool
    message: str
    margin: float
    within_residual: float
    n_cross: int
    n_within: int
    reduced_loss: float
    fin_grad_norm: float
    embeddings: torch.Tensor = field(repr=False)
    constraints: torch.Tensor = field(repr=False)

    def project_fin(self, W: Float[torch.Tensor, "d_key d_query"]) -> Float[torch.Tensor, "d_key d_query"]:
        """Orthogonal projection of W onto S_fin."""
        W = torch.as_tensor(W, dtype=torch.float64)
        B = self.fin_basis.reshape(self.fin_basis.shape[0], W.numel())
        return (B.T @ (B @ W.reshape(-1))).reshape(W.shape)

    @renamed(k="last_token")
    def fin_scores(self, last_token: int, tokens: Sequence[int]) -> Float[torch.Tensor, " token"]:
        """e_v^T W_fin e_k (k = ``last_token``) for each token v of ``tokens``."""
        E = self.embeddings
        return E[list(tokens)] @ self.W_fin @ E[last_token]

    def _table(self) -> Table:
        """One row per constraint: k, src, dst, kind ('margin' or 'equal'), and
        (e_src - e_dst)^T W e_k under W_svm (svm_value) and W_fin (fin_value)."""
        k, a, b = self.constraints.T
        E = self.embeddings
        c = ("constraint",)
        return Table({"constraint": range(len(k))}, {
            "k": (c, k), "src": (c, a), "dst": (c, b),
            "kind": (c, ["margin"] * self.n_cross + ["equal"] * self.n_within),
            "svm_value": (c, torch.einsum("cd,de,ce->c", E[a] - E[b], self.W_svm, E[k])),
            "fin_value": (c, torch.einsum("cd,de,ce->c", E[a] - E[b], self.W_fin, E[k])),
        })

    def to_dataframe(self, tpg: Any = None) -> Any:
        """One row per constraint (see :meth:`_table`); ``tpg`` is no longer needed."""
        if tpg is not None:
            warnings.warn("GraphSVM.to_dataframe() takes no argument now (the constraints are stored);"
                          " the graph argument will be removed in lensprobe 0.3.", DeprecationWarning,
                          stacklevel=2)
        return super().to_dataframe()

    def summary(self) -> dict[str, Any]:
        return dict(feasible=self.feasible, margin=self.margin, within_residual=self.within_residual,
                    n_cross=self.n_cross, n_within=self.n_within, reduced_loss=self.reduced_loss,
                    fin_grad_norm=self.fin_grad_norm, W_svm_norm=float(self.W_svm.norm()),
                    W_fin_norm=float(self.W_fin.norm()), message=self.message)

    def plot(self) -> Any:
        """W_svm and W_fin in token coordinates (E W E^T: score of key v for query k)."""
        import matplotlib.pyplot as plt

        E = self.embeddings
        fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
        for ax, (name, W) in zip(axes, (("W_svm", self.W_svm), ("W_fin", self.W_fin))):
            M = (E @ W @ E.T).numpy()
            lim = max(float(np.abs(M).max()), 1e-12)
            im = ax.imshow(M, cmap="RdBu_r", vmin=-lim, vmax=lim)
            ax.set_title(f"{name}: e_v^T W e_k")
            ax.set_xlabel("last token k")
            ax.set_ylabel("key token v")
            fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        return fig


def _orth_rows(M: np.ndarray, rtol: float = 1e-10) -> np.ndarray:
    """Orthonormal basis (rows) of the row space of M."""
    if M.size == 0 or M.shape[0] == 0:
        return np.zeros((0, M.shape[1]))
    _, s, Vt = np.linalg.svd(M, full_matrices=False)
    r = int((s > rtol * max(s[0], 1.0)).sum())
    return Vt[:r]


@functools.lru_cache(maxsize=1)
def _blas_libraries() -> tuple:
    """threadpoolctl's controllers of the loaded BLAS libraries, found once: the scan costs
    ~10 ms and ``threadpool_limits`` repeats it on every call (the solve can take 0.4 ms)."""
    import scipy.linalg  # noqa: F401  (scipy's own BLAS must be loaded before the scan)
    from threadpoolctl import ThreadpoolController

    return tuple(ThreadpoolController().select(user_api="blas").lib_controllers)


@contextlib.contextmanager
def _blas_threads(n: int) -> Any:
    """BLAS libraries limited to ``n`` threads inside the block, restored after."""
    libs = _blas_libraries()
    saved = [lib.get_num_threads() for lib in libs]
    for lib in libs:
        lib.set_num_threads(n)
    try:
        yield
    finally:
        for lib, k in zip(libs, saved):
            lib.set_num_threads(k)


def graph_svm(
    tpg: TokenPriorityGraph,
    embeddings: Float[torch.Tensor, "token d_model"] | Any,
    *,
    require_feasible: bool = True,
    tol: float = 1e-7,
    blas_threads: int | None = 1,
) -> GraphSVM:
    """The Graph-SVM solution W_svm and the finite component W_fin (Li et al. 2024).

    W_svm = argmin ||W||_F  s.t. for every k and every edge (y -> j) of G^(k):
            (e_y - e_j)^T W e_k >= 1  if y and j lie in different SCCs,
            (e_y - e_j)^T W e_k  = 0  if they lie in the same SCC.

    Solved exactly as a least-distance program: the minimiser lies in span(e_v) (x)
    span(e_k), the equalities are eliminated with a null-space basis, and the remaining
    problem min ||u|| s.t. G u >= 1 goes to ``scipy.optimize.nnls`` (Lawson & Hanson's
    LDP reduction). The solution is then checked against every constraint; if they cannot
    hold (``tol``), :class:`InfeasibleError` is raised, or with ``require_feasible=False``
    the result has ``feasible=False``, zero W_svm and a message saying why.

    W_fin = argmin_{W in S_fin} mean_i -log sum_{t in X_i^red: x_t = y_i}
            softmax_t(e_{x_t}^T W e_{k_i}), X_i^red = the positions of X_i whose token lies
    in y_i's SCC of G^(k_i); minimised with ``scipy.optimize.minimize`` (L-BFGS-B) over
    an orthonormal basis of S_fin. W_svm is orthogonal to S_fin (its within-SCC
    equalities span it).

    ``embeddings``: [n_tokens, d] tensor (or a model: its W_E rows). ``blas_threads``:
    BLAS threads while solving (through threadpoolctl; restored after; None leaves the
    library's default, one thread per core for OpenBLAS). The solve is many small matrix
    products, SVDs and NNLS/L-BFGS iterations, where extra BLAS threads mostly wait for
    each other and compete with the caller's threads: see benchmarks/bench_priority.py.
    """
    if blas_threads is None:
        return _graph_svm(tpg, embeddings, require_feasible, tol)
    if int(blas_threads) < 1:
        raise InputError(f"blas_threads must be a positive int or None, got {blas_threads}.")
    with _blas_threads(int(blas_threads)):
        return _graph_svm(tpg, embeddings, require_feasible, tol)


def _graph_svm(tpg: TokenPriorityGraph, embeddings: Any, require_feasible: bool, tol: float) -> GraphSVM:
    E = _embeddings(embeddings)
    if E.shape[0] < tpg.n_tokens:
        raise InputError(
            f"embeddings have {E.shape[0]} rows but the graph uses {tpg.n_tokens} tokens."
        )
    En = E.numpy()
    cross = [(k, a, b) for k in tpg.last_tokens for a, b in tpg.cross_pairs(k)]
    within = [(k, a, b) for k in tpg.last_tokens for a, b in tpg.within_pairs(k)]
    W_svm, margin, within_res, message = _svm_direction(tpg, En, cross, within, tol)
    if message != "feasible" and require_feasible:
        raise InfeasibleError(message)
    basis, W_fin, red_loss, grad_norm = _fin_component(tpg, En, within)
    return GraphSVM(
        W_svm=W_svm, W_fin=W_fin, fin_basis=basis, feasible=message == "feasible", message=message,
        margin=margin, within_residual=within_res, n_cross=len(cross), n_within=len(within),
        reduced_loss=red_loss, fin_grad_norm=grad_norm, embeddings=E,
        constraints=torch.tensor(cross + within, dtype=torch.long).reshape(-1, 3),
    )


def _svm_direction(tpg: TokenPriorityGraph, En: np.ndarray, cross: list, within: list,
                   tol: float) -> tuple[torch.Tensor, float, float, str]:
    """W_svm (zeros when infeasible), its margin, within-SCC residual and "feasible" or why not.

    W = U M V^T with U, V orthonormal bases of the key / query token spans: the minimiser
    lies there, and the constraints become linear in the entries of M.
    """
    nodes = sorted({t for g in tpg.graphs.values() for t in g.nodes})
    U = _orth_rows(En[nodes]).T  # [d, r1]
    V = _orth_rows(En[tpg.last_tokens]).T  # [d, r2]

    def rows(cons: list) -> np.ndarray:
        if not cons:
            return np.zeros((0, U.shape[1] * V.shape[1]))
        return np.stack([np.outer(U.T @ (En[a] - En[b]), V.T @ En[k]).ravel() for k, a, b in cons])

    G, B = rows(cross), rows(within)
    m_vec = _least_distance(G, B, tol) if cross else np.zeros(G.shape[1])
    message = "feasible"
    if m_vec is None:
        rank = np.linalg.matrix_rank(En[nodes])
        message = (
            f"Graph-SVM is infeasible: no W satisfies (e_y - e_j)^T W e_k >= 1 on all"
            f" {len(cross)} cross-SCC edges and = 0 on all {len(within)} within-SCC edges."
            f" The {len(nodes)} tokens' embeddings span {rank} dimensions"
            + (" (linearly dependent), so some margin constraints contradict the others"
               if rank < len(nodes) else "")
            + ". Use linearly independent embeddings (d_model >= number of tokens), or"
            " build the graph from fewer tokens."
        )
        m_vec = np.zeros(G.shape[1])
    W_svm = torch.from_numpy(U @ m_vec.reshape(U.shape[1], V.shape[1]) @ V.T).to(torch.float64)
    margin = float((G @ m_vec).min()) if cross else math.inf
    within_res = float(np.abs(B @ m_vec).max()) if within else 0.0
    return W_svm, margin, within_res, message


def _least_distance(G: np.ndarray, B: np.ndarray, tol: float) -> np.ndarray | None:
    """argmin ||m|| s.t. G m >= 1, B m = 0, or None when infeasible.

    The equalities are eliminated with a null-space basis N (m = N u); the rest is the
    least-distance program min ||u|| s.t. GN u >= 1, solved as NNLS on
    [GN^T; 1^T] z ~ [0; 1] (Lawson & Hanson), then checked against every margin.
    """
    from scipy.linalg import null_space
    from scipy.optimize import nnls

    N = null_space(B) if len(B) else np.eye(G.shape[1])
    if N.shape[1] == 0:
        return None
    GN = G @ N
    Emat = np.vstack([GN.T, np.ones((1, GN.shape[0]))])
    f = np.zeros(Emat.shape[0])
    f[-1] = 1.0
    z, _ = nnls(Emat, f, maxiter=50 * Emat.shape[1] + 1000)
    r = Emat @ z - f
    if abs(r[-1]) < 1e-14:
        return None
    m_vec = N @ (-r[:-1] / r[-1])
    if (G @ m_vec).min() < 1 - tol * max(1.0, np.abs(m_vec).max()):
        return None
    return m_vec


def _fin_component(tpg: TokenPriorityGraph, En: np.ndarray,
                   within: list) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """The basis of S_fin [r, d, d], W_fin, the reduced loss there and its gradient norm:
    the reduced loss minimised (L-BFGS-B) over an orthonormal basis of S_fin."""
    from scipy.optimize import minimize

    d = En.shape[1]
    fin_dirs = [np.outer(En[a] - En[b], En[k]).ravel() for k, a, b in within]
    basis = _orth_rows(np.stack(fin_dirs)) if fin_dirs else np.zeros((0, d * d))
    red = _reduced_batch(tpg)

    def loss_of(c: np.ndarray) -> tuple[float, np.ndarray]:
        L, G = _retrieval_loss((c @ basis).reshape(d, d), En, *red)
        return L, basis @ G.ravel()

    c = np.zeros(basis.shape[0])
    if basis.shape[0]:
        c = minimize(loss_of, c, jac=True, method="L-BFGS-B",
                     options=dict(maxiter=20000, ftol=1e-16, gtol=1e-11)).x
    red_loss, g = loss_of(c)
    return (torch.from_numpy(basis).reshape(-1, d, d), torch.from_numpy((c @ basis).reshape(d, d)),
            red_loss, float(np.linalg.norm(g)) if len(g) else 0.0)


# =========================================================================== the model
def head_W(model: Any, layer: int = 0, head: int = 0) -> Float[torch.Tensor, "d_model d_model"]:
    """W [d_key, d_query] (both d_model) of one head: W = (QK[layer, head])^T / attn_scale.

    The head scores key position t for the query at T as
    (x_T W_Q + b_Q)(x_t W_K + b_K)^T / scale; without biases and rotary that is
    x_T^T QK x_t / scale = x_t^T W x_T with W = QK^T / scale, the paper's
    s = softmax(X W x_T). Biases, rotary and layer norm are not part of W.
    """
    _tl.require_model(model)
    layer, head = check_layer(model, layer), check_head(model, head)
    with torch.no_grad():
        QK = model.QK[layer, head].AB
    return (QK.T / _tl.attn_scale(model, layer)).detach().to("cpu", torch.float64)


def _leaf_parameters(t: torch.Tensor) -> list[torch.nn.Parameter]:
    """The leaf tensors (parameters) a computed tensor was built from, via its autograd graph."""
    out, seen, stack = [], set(), [t.grad_fn]
    while stack:
        f = stack.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        if hasattr(f, "variable"):
            out.append(f.variable)
        stack += [g for g, _ in f.next_functions]
    return out


def priority_model(
    n_tokens: int,
    d_model: int,
    *,
    embeddings: Float[torch.Tensor, "n_tokens d_model"] | None = None,
    seed: int = 0,
    n_ctx: int = 64,
    dtype: torch.dtype = torch.float64,
    vocab: Sequence[str] | None = None,
) -> Any:
    """The one-layer attention model of Li et al. (2024) as a TransformerLens model.

    One attention-only layer, one head with d_head = d_model, no layer norm, NoPE (zero,
    frozen W_pos), causal. Token embeddings are fixed unit-norm vectors (random normal
    rows normalised, seeded; or ``embeddings`` [n_tokens, d_model]). W_Q = I and
    b_Q = b_K = 0 are frozen and W_K starts at 0 and is the only trainable parameter, so
    W = QK^T / attn_scale = W_K / attn_scale and gradient steps on W_K are steps on W
    (NGD takes the same direction). W_V = W_O = I and W_U = E^T give logits
    e_v^T (x_T + sum_t s_t e_{x_t}), but the paper's prediction is the attention mass per
    token at the last position, read from ``blocks.0.attn.hook_pattern``
    (see :func:`priority_loss`).
    """
    from .models import tiny_model

    if embeddings is None:
        g = torch.Generator().manual_seed(int(seed))
        E = torch.randn(n_tokens, d_model, generator=g, dtype=torch.float64)
        E = E / E.norm(dim=1, keepdim=True)
    else:
        E = torch.as_tensor(embeddings, dtype=torch.float64)
        if tuple(E.shape) != (n_tokens, d_model):
            raise InputError(f"embeddings must be [{n_tokens}, {d_model}], got {tuple(E.shape)}.")
    model = tiny_model(
        n_layers=1, n_heads=1, d_model=d_model, d_head=d_model, attn_only=True,
        normalization=None, positional="none", d_vocab=n_tokens, n_ctx=n_ctx, dtype=dtype,
        seed=seed, vocab=list(vocab) if vocab is not None else None,
    )
    eye = torch.eye(d_model, dtype=torch.float64)
    sd = dict(_tl.portable_state_dict(model))
    new = {
        "embed.W_E": E, "pos_embed.W_pos": torch.zeros_like(sd["pos_embed.W_pos"]),
        "blocks.0.attn.W_Q": eye[None], "blocks.0.attn.W_K": torch.zeros(1, d_model, d_model),
        "blocks.0.attn.W_V": eye[None], "blocks.0.attn.W_O": eye[None],
        "blocks.0.attn.b_Q": torch.zeros(1, d_model), "blocks.0.attn.b_K": torch.zeros(1, d_model),
        "blocks.0.attn.b_V": torch.zeros(1, d_model), "blocks.0.attn.b_O": torch.zeros(d_model),
        "unembed.W_U": E.T.contiguous(), "unembed.b_U": torch.zeros(n_tokens),
    }
    _tl.load_portable_state_dict(model, {k: new[k].to(sd[k].dtype) for k in sd})
    for p in model.parameters():
        p.requires_grad_(True)
    wk = _leaf_parameters(model.W_K)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in wk:
        p.requires_grad_(True)
    model.eval()
    return model


def _pattern_rows(model: Any, tokens: torch.Tensor, layer: int, head: int) -> torch.Tensor:
    """Attention of the last position over all positions, [batch, pos], for one head."""
    name = f"blocks.{layer}.attn.hook_pattern"
    return run_hooked(model, tokens, [name])[name][:, head, -1, :]


def priority_loss(model: Any, batch: Any, *, layer: int = 0, head: int = 0) -> tuple[Float[torch.Tensor, ""], dict]:
    """The paper's loss -log p(y), p(y) = attention mass on the label at the last position.

    ``loss_fn`` for :func:`lensprobe.train`: the label is the target at the last position.
    Written as -log1p(-q) with q = the attention mass off the label while q < 1/2: late in
    training p(y) rounds to 1 in floating point and -log p(y) would lose the label's share
    of the gradient, while q keeps full relative precision. Metrics: ``label_mass``.
    """
    tokens = batch.tokens
    labels = batch.targets[:, -1]
    att = _pattern_rows(model, tokens, layer, head)
    on = (tokens == labels[:, None]).to(att.dtype)
    mass = (att * on).sum(-1)
    off = (att * (1 - on)).sum(-1)
    small = off < 0.5
    loss = torch.where(small, -torch.log1p(-off.clamp(max=0.5)), -torch.log(mass.clamp(max=0.5)))
    return loss.mean(), {"label_mass": float(mass.detach().mean())}


def _w_step_gain(model: Any, layer: int, head: int) -> float | None:
    """The factor on lr that makes an NGD step on the trained parameters a step of lr on W.

    W = W_K W_Q^T / scale for the head's [d_model, d_head] W_K and W_Q. When the trained
    parameters are exactly W_K's (one layer, one head, nothing else trained) and
    W_Q W_Q^T = c^2 I, a step dW_K = -eta g_K / ||g_K|| with g_K = g_W W_Q / scale gives
    dW = -(eta c / scale) g_W / ||g_W||: the factor is scale / c. Otherwise None.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable or model.cfg.n_layers != 1 or model.cfg.n_heads != 1:
        return None
    with torch.enable_grad():  # a throw-away graph, only to find the leaves W_K is built from
        leaves = _leaf_parameters(model.W_K)
    if {id(p) for p in trainable} != {id(p) for p in leaves}:
        return None
    with torch.no_grad():
        W_Q = model.W_Q[layer, head].detach().to("cpu", torch.float64)
    G = W_Q @ W_Q.T
    c2 = float(G.diagonal().mean())
    if c2 <= 0 or not torch.allclose(G, c2 * torch.eye(len(G), dtype=G.dtype), rtol=0, atol=1e-9 * c2):
        return None
    return _tl.attn_scale(model, layer) / math.sqrt(c2)


@renamed(sequences="tokens")
def train_priority(
    model: Any,
    tokens: Int[torch.Tensor, "n pos"] | Sequence[Sequence[int]],
    labels: Int[torch.Tensor, " n"] | Sequence[int],
    *,
    steps: int = 2000,
    lr: float = 0.1,
    schedule: Literal["cosine", "constant"] = "cosine",
    layer: int = 0,
    head: int = 0,
    checkpoint_steps: Sequence[int] = (),
    eval_every: int | None = None,
    progress: bool = True,
    threads: int | None = 1,
) -> Any:
    """Full-batch normalised gradient descent on :func:`priority_loss`, through ``lp.train``.

    W <- W - lr_t grad_W L / ||grad_W L||_F on the fixed dataset (tokens [n, pos],
    labels [n]), the paper's optimiser, with W = (QK[layer, head])^T / attn_scale as
    :func:`head_W` reads it: ``lr`` is the Frobenius length of each step on W, so the
    paper's learning rates carry over. ``schedule='cosine'`` decays lr_t to 0 (lets the
    within-SCC part settle at W_fin), ``'constant'`` keeps it. Trains the model in place
    (only parameters with requires_grad). Returns lp.train's TrainResult (``history``
    carries ``label_mass``; ``model_at(step)`` gives checkpoint copies). ``threads``: torch
    intra-op threads during training (restored after; 1 is fastest for these tiny models,
    and many times faster than the default on a busy machine; None leaves it alone).

    The step is taken on W_K, the only trained parameter of :func:`priority_model`:
    W = W_K W_Q^T / scale, so with W_Q W_Q^T = c^2 I (W_Q = I there) an NGD step of
    length lr * scale / c on W_K is exactly an NGD step of length lr on W (same
    direction, since grad_{W_K} L = grad_W L W_Q / scale). For a model where W is not such
    a map of the trained parameters (more heads or layers, W_Q trained or not a multiple
    of an orthogonal matrix) ``lr`` is the step on the trained parameters, with a warning.
    (lensprobe 0.1.0 took ``lr`` as the step on W_K, so W moved by lr / sqrt(d_model):
    divide an old run's lr by sqrt(d_model) to repeat it.)
    """
    from .training import train

    data = FixedData(tokens, labels)
    missing = [i for i, (seq, y) in enumerate(zip(data.tokens.tolist(), data.labels.tolist()))
               if y not in seq]
    if missing:
        raise InputError(
            f"{len(missing)} samples have a label that is not in their own sequence (e.g."
            f" sample {missing[0]}); the paper's loss -log p(y) is infinite there for every W."
            " Drop them (TokenPriorityGraph leaves them out: see its `excluded`)."
        )

    def loss_fn(m: Any, batch: Any) -> tuple[torch.Tensor, dict]:
        return priority_loss(m, batch, layer=layer, head=head)

    _tl.require_model(model)
    layer, head = check_layer(model, layer), check_head(model, head)
    gain = _w_step_gain(model, layer, head)
    if gain is None:
        warnings.warn(
            "train_priority: the model's head W is not a fixed linear image of its trained"
            " parameters (expected lp.priority_model: one head, only W_K trained, W_Q a"
            " multiple of an orthogonal matrix), so lr is the NGD step on the trained"
            " parameters, not on W.", stacklevel=2)
        gain = 1.0
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        return train(
            model, data, steps=steps, lr=lr * gain, batch_size=len(data.tokens), warmup=0,
            weight_decay=0.0, schedule=schedule, grad_clip=None, optimizer="ngd", loss_fn=loss_fn,
            eval_every=eval_every, eval_batch_size=len(data.tokens),
            checkpoint_steps=checkpoint_steps, progress=progress,
        )
    finally:
        torch.set_num_threads(saved_threads)


# =========================================================================== alignment
def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0:
        return math.nan
    return float((a * b).sum()) / (na * nb)


def _token_masses(model: Any, seqs: list[tuple[int, ...]], layer: int, head: int) -> list[dict[int, float]]:
    """Attention of the last position summed per token, for each sequence."""
    by_len: dict[int, list[int]] = {}
    for i, s in enumerate(seqs):
        by_len.setdefault(len(s), []).append(i)
    out: list[dict[int, float]] = [{} for _ in seqs]
    for idx in by_len.values():
        toks = to_tokens(model, torch.tensor([seqs[i] for i in idx]))
        with torch.no_grad():
            att = _pattern_rows(model, toks, layer, head).to("cpu", torch.float64)
        check_pattern(att, f"attention of {head_name(layer, head)} at the last position")
        for row, i in enumerate(idx):
            masses: dict[int, float] = {}
            for t, a in zip(seqs[i], att[row].tolist()):
                masses[t] = masses.get(t, 0.0) + a
            out[i] = masses
    return out


_MODEL_ONLY = ("implied", "reversed", "unsupported")


@dataclass(frozen=True)
class PriorityAlignment(Result):
    """How one attention head matches a token-priority graph (Li et al. 2024).

    W:               [d_key, d_query] the head's W = QK^T / attn_scale.
    cos_svm:         cos(W, W_svm) (NaN when W_svm is 0 or infeasible).
    fin_distance:    ||P_fin W - W_fin||_F (P_fin: projection onto the within-SCC span).
    cos_orth_svm:    cos(W - P_fin W, W_svm).
    sequences:       the analysed sequences (one per prompt); labels: their labels or None.
    retrievals:      the graph's hard-retrieval prediction per sequence (:class:`Retrieval`).
    retrieved_mass:  [prompt] attention of the last position on the retrieved tokens
                     (NaN when the last token has no graph).
    label_mass:      [prompt] attention on the label (NaN without labels).
    split_error:     [prompt] L1 distance sum_v |a_v - w_v| between the head's split of its
                     retrieved-SCC attention (a_v = mass(v) / mass(SCC)) and softmax of the
                     W_fin scores e_{x_t}^T W_fin e_k over the SCC's positions summed per
                     token (w_v); NaN unless the retrieval is one SCC with >= 2 tokens.
    model_retrieved: per sequence, the tokens holding more than ``threshold`` attention.
    edges:           (k, src, dst, status) of the head's local graph against the data's:
                     data edges 'agree' (the head has it too), 'missed' or 'untested' (no
                     analysed context ending in k holds both tokens); head-only edges
                     'implied' (the data graph has a path src ~> dst), 'reversed' (only
                     dst ~> src) or 'unsupported'. The head's graph, like the data's, has
                     r -> x_t for each retrieved token r and every other token x_t of the
                     context.
    """

    AXES: ClassVar = {"retrieved_mass": ("prompt",), "label_mass": ("prompt",), "split_error": ("prompt",),
                      "W": ("d_key", "d_query")}
    TITLE: ClassVar = "priority alignment"

    layer: int
    head: int
    threshold: float
    W: torch.Tensor
    cos_svm: float
    fin_distance: float
    cos_orth_svm: float
    feasible: bool
    sequences: tuple
    labels: tuple | None
    retrievals: tuple
    retrieved_mass: torch.Tensor
    label_mass: torch.Tensor
    split_error: torch.Tensor
    model_retrieved: tuple
    edges: tuple
    tpg: TokenPriorityGraph = field(repr=False, compare=False)
    svm: GraphSVM = field(repr=False, compare=False)

    @property
    def loss(self) -> float:
        """Mean -log(attention on the label) (the paper's loss, read from the head)."""
        return float(-torch.log(self.label_mass).mean())

    def _count(self, *statuses: str) -> int:
        return sum(1 for e in self.edges if e[3] in statuses)

    @property
    def edge_recall(self) -> float:
        """agree / (agree + missed): tested data edges the head reproduces."""
        n = self._count("agree", "missed")
        return self._count("agree") / n if n else math.nan

    @property
    def edge_precision(self) -> float:
        """(agree + implied) / all head edges: head edges consistent with the data's order."""
        n = self._count("agree", *_MODEL_ONLY)
        return self._count("agree", "implied") / n if n else math.nan

    def summary(self) -> dict[str, float]:
        return dict(
            cos_svm=self.cos_svm, fin_distance=self.fin_distance, cos_orth_svm=self.cos_orth_svm,
            W_norm=float(self.W.norm()), retrieved_mass=float(np.nanmean(self.retrieved_mass.numpy()))
            if bool(torch.isfinite(self.retrieved_mass).any()) else math.nan,
            label_mass=float(self.label_mass.mean()), loss=self.loss,
            split_error=float(np.nanmean(self.split_error.numpy()))
            if bool(torch.isfinite(self.split_error).any()) else math.nan,
            edge_recall=self.edge_recall, edge_precision=self.edge_precision,
        )

    def _table(self) -> Table:
        """One row per prompt: tokens, label, retrieval, attention masses, split error."""
        v = self.tpg.vocab
        p = ("prompt",)

        def words(toks: Sequence[int]) -> str:
            return " ".join(v[t] for t in toks)

        labels = [None] * len(self.sequences) if self.labels is None else [v[y] for y in self.labels]
        return Table({"prompt": range(len(self.sequences))}, {
            "sequence": (p, [words(s) for s in self.sequences]), "last": (p, [v[s[-1]] for s in self.sequences]),
            "label": (p, labels), "retrieved": (p, [words(r.tokens) for r in self.retrievals]),
            "status": (p, [r.status for r in self.retrievals]),
            "model_retrieved": (p, [words(m) for m in self.model_retrieved]),
            "retrieved_mass": (p, self.retrieved_mass), "label_mass": (p, self.label_mass),
            "split_error": (p, self.split_error),
        })

    def edges_dataframe(self) -> Any:
        """One row per edge of the comparison: k, src, dst (ids and strings), status."""
        cols = _edge_columns(self.tpg.vocab, self.edges)
        return frame(Table({"edge": range(len(self.edges))},
                           {**cols, "status": (("edge",), [e[3] for e in self.edges])}))

    def plot(self) -> Any:
        """Attention on the retrieved SCC per sequence, and the edge comparison counts."""
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
        n = len(self.sequences)
        ax1.bar(range(n), self.retrieved_mass.numpy(), color="#2a9d4b", label="retrieved SCC")
        ax1.plot(range(n), self.label_mass.numpy(), "k.", label="label")
        ax1.set_ylim(0, 1.05)
        ax1.set_xlabel("sequence")
        ax1.set_ylabel("attention at the last position")
        ax1.set_title(f"{head_name(self.layer, self.head)}: cos(W, W_svm) = {self.cos_svm:.3f}")
        ax1.legend(fontsize=8)
        statuses = ["agree", "missed", "untested", *_MODEL_ONLY]
        ax2.bar(statuses, [self._count(s) for s in statuses],
                color=[_EDGE_COLORS[s] for s in statuses])
        ax2.set_ylabel("edges")
        ax2.set_title("local graph vs data graph")
        ax2.tick_params(axis="x", rotation=30)
        fig.tight_layout()
        return fig

    def show(self, **kw: Any) -> View:
        """The HTML/SVG view of :func:`retrieval_graph_view` with this head's edges."""
        return retrieval_graph_view(self.tpg, alignment=self, svm=self.svm, **kw)


@renamed(sequences="tokens")
@extractor
def priority_alignment(
    model: Any,
    tpg: TokenPriorityGraph,
    tokens: Int[torch.Tensor, "n pos"] | Sequence[Sequence[int]] | None = None,
    labels: Int[torch.Tensor, " n"] | Sequence[int] | None = None,
    *,
    layer: int = 0,
    head: int = 0,
    svm: GraphSVM | None = None,
    embeddings: Float[torch.Tensor, "token d_model"] | None = None,
    threshold: float = 0.1,
) -> PriorityAlignment:
    """Compare one attention head with the token-priority graph (Li et al. 2024).

    Works on any TransformerLens model's head and any token data: the attention-based
    readouts (mass on the retrieved SCC, within-SCC split, the local graph) use the
    head's actual pattern at the last position (``blocks.{layer}.attn.hook_pattern``);
    the W-based ones use W = QK[layer, head]^T / attn_scale against the Graph-SVM built on
    ``embeddings`` (default: the model's W_E rows). W is exactly the paper's W for a
    one-layer attention-only model without layer norm, positional signal or biases; in
    deeper or normalised models the head sees the residual stream, not raw embeddings,
    so read the W-based numbers as an approximation there.

    ``tokens``/``labels`` default to the graph's own data (sequences and labels); other
    sequences are allowed (labels optional). ``svm``: a precomputed :func:`graph_svm` (else computed
    here with ``require_feasible=False``). ``threshold``: attention mass above which a
    token counts as retrieved by the head.
    """
    if not 0.0 < float(threshold) < 1.0:
        raise InputError(f"threshold must lie in (0, 1), got {threshold}.")
    seqs, labs = _alignment_data(tpg, tokens, labels)
    layer, head = check_layer(model, layer), check_head(model, head)
    W = check_finite(head_W(model, layer, head), f"W of {head_name(layer, head)} (QK^T / attn_scale)")
    if svm is None:
        svm = graph_svm(tpg, embeddings if embeddings is not None else model, require_feasible=False)
    if tuple(svm.W_svm.shape) != tuple(W.shape):
        raise InputError(
            f"the Graph-SVM lives in dimension {svm.W_svm.shape[0]} but the head's W is"
            f" {tuple(W.shape)}; build it from embeddings of width d_model={W.shape[0]}."
        )
    masses = _token_masses(model, seqs, layer, head)
    retrievals = tuple(tpg.retrieve(s) for s in seqs)
    model_ret = tuple(tuple(sorted(t for t, m in mass.items() if m > threshold)) for mass in masses)
    W_svm = svm.W_svm if svm.feasible else torch.zeros_like(svm.W_svm)
    Pf = svm.project_fin(W)
    nan = math.nan
    return PriorityAlignment(
        layer=layer, head=head, threshold=float(threshold), W=W,
        cos_svm=_cos(W, W_svm), fin_distance=float((Pf - svm.W_fin).norm()),
        cos_orth_svm=_cos(W - Pf, W_svm), feasible=svm.feasible,
        sequences=tuple(seqs), labels=tuple(labs) if labs is not None else None, retrievals=retrievals,
        retrieved_mass=_f64([sum(m[t] for t in r.tokens) if r.known else nan for r, m in zip(retrievals, masses)]),
        label_mass=_f64([nan] * len(seqs) if labs is None else [m.get(y, 0.0) for m, y in zip(masses, labs)]),
        split_error=_f64([_split_error(svm, s, r, m) for s, r, m in zip(seqs, retrievals, masses)]),
        model_retrieved=model_ret, edges=_edge_statuses(tpg, seqs, model_ret), tpg=tpg, svm=svm,
    )


def _f64(values: Sequence[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _alignment_data(tpg: TokenPriorityGraph, tokens: Any, labels: Any) -> tuple[list, list | None]:
    """The analysed sequences and labels: the graph's own data, or ``tokens`` (labels optional)."""
    if tokens is None:
        if labels is not None:
            raise InputError("labels were given without tokens; pass both or neither.")
        return list(tpg.sequences), list(tpg.labels)
    if labels is None:
        return _as_sequences(tokens, [0] * len(tokens))[0], None
    return _as_sequences(tokens, labels)


def _split_error(svm: GraphSVM, seq: Sequence[int], r: Retrieval, mass: dict[int, float]) -> float:
    """sum_v |a_v - w_v| over the retrieved SCC (see :class:`PriorityAlignment`), or NaN."""
    if not (r.known and len(r.sccs) == 1 and len(r.tokens) > 1):
        return math.nan
    tot = sum(mass[t] for t in r.tokens)
    if tot <= 0:
        return math.nan
    pos = [t for t in seq if t in r.tokens]
    pred = dict.fromkeys(r.tokens, 0.0)
    for t, wt in zip(pos, torch.softmax(svm.fin_scores(seq[-1], pos), 0).tolist()):
        pred[t] += wt
    return sum(abs(mass[t] / tot - pred[t]) for t in r.tokens)


def _edge_statuses(tpg: TokenPriorityGraph, seqs: Sequence[Sequence[int]],
                   model_ret: Sequence[tuple[int, ...]]) -> tuple[tuple[int, int, int, EdgeStatus], ...]:
    """The head's local graph (r -> x_t for each retrieved r) against the data's, edge by edge."""
    model_edges: set[tuple[int, int, int]] = set()
    tested: set[tuple[int, int, int]] = set()
    for seq, ret in zip(seqs, model_ret):
        k, present = seq[-1], set(seq)
        model_edges |= {(k, a, b) for a in ret for b in present if b != a}
        tested |= {(k, a, b) for a in present for b in present if a != b}
    edges: list[tuple[int, int, int, EdgeStatus]] = [
        (k, a, b, ("agree" if (k, a, b) in model_edges else "missed") if (k, a, b) in tested else "untested")
        for k, a, b in tpg.edges()
    ]
    for k, a, b in sorted(model_edges - set(tpg.edges())):
        known = k in tpg.graphs
        status: EdgeStatus = ("implied" if known and tpg.outranks(k, a, b) else
                              "reversed" if known and tpg.outranks(k, b, a) else "unsupported")
        edges.append((k, a, b, status))
    return tuple(edges)


_CURVE_KEYS = ("cos_svm", "fin_distance", "cos_orth_svm", "W_norm", "retrieved_mass",
               "label_mass", "loss", "split_error", "edge_recall", "edge_precision")


@dataclass(frozen=True)
class AlignmentCurve(Result):
    """:func:`priority_alignment` summaries across training checkpoints.

    steps:  [step] checkpoint steps.
    values: {name: [step] float64 tensor} for cos_svm, fin_distance, cos_orth_svm, W_norm,
            retrieved_mass, label_mass, loss, split_error, edge_recall, edge_precision
            (means over sequences where per-sequence); ``curve[name]`` reads one.
    """

    AXES: ClassVar = {"steps": ("step",)}
    TITLE: ClassVar = "priority alignment through training"

    steps: torch.Tensor
    values: dict

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.values[name]

    def _table(self) -> Table:
        """One row per checkpoint step, one column per quantity."""
        return Table({"step": self.steps.tolist()}, {k: (("step",), v) for k, v in self.values.items()})

    def summary(self) -> dict[str, Any]:
        """The number of checkpoints, the last step and every quantity there."""
        out: dict[str, Any] = {"checkpoints": len(self.steps), "last_step": int(self.steps[-1])}
        out.update({f"final_{k}": float(v[-1]) for k, v in self.values.items()})
        return out

    def plot(self) -> Any:
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
        s = self.steps.numpy()
        for name in ("cos_svm", "cos_orth_svm", "edge_recall"):
            axes[0].plot(s, self.values[name].numpy(), label=name)
        axes[0].set_ylim(-0.05, 1.05)
        axes[0].legend(fontsize=8)
        axes[0].set_title("alignment with the Graph-SVM")
        for name in ("retrieved_mass", "label_mass"):
            axes[1].plot(s, self.values[name].numpy(), label=name)
        axes[1].legend(fontsize=8)
        axes[1].set_title("attention at the last position")
        axes[2].plot(s, self.values["fin_distance"].numpy(), label="||P_fin W - W_fin||")
        axes[2].plot(s, self.values["W_norm"].numpy(), label="||W||")
        axes[2].set_yscale("symlog", linthresh=1e-3)
        axes[2].legend(fontsize=8)
        axes[2].set_title("finite part and growth")
        for ax in axes:
            ax.set_xlabel("step")
        fig.tight_layout()
        return fig


@renamed(sequences="tokens")
def alignment_curve(
    checkpoints: Any,
    tpg: TokenPriorityGraph,
    tokens: Int[torch.Tensor, "n pos"] | Sequence[Sequence[int]] | None = None,
    labels: Int[torch.Tensor, " n"] | Sequence[int] | None = None,
    *,
    steps: Sequence[int] | None = None,
    svm: GraphSVM | None = None,
    progress: bool = True,
    **kw: Any,
) -> AlignmentCurve:
    """:func:`priority_alignment` at every checkpoint, in step order.

    ``checkpoints``: the TrainResult of :func:`train_priority`/``lp.train`` (its in-memory
    or on-disk checkpoints), a mapping ``step -> model/path/loader``, or a list of them
    (``steps`` names their steps, default 0..n-1); see :func:`lensprobe.inputs.checkpoint_list`.
    The Graph-SVM is computed once, from the first checkpoint's embeddings (or ``embeddings=``).
    """
    pairs = checkpoint_list(checkpoints, steps)
    rows = []
    for _, ckpt in progress_bar(pairs, progress, "alignment"):
        model = materialise(ckpt)
        if svm is None:
            emb = kw.get("embeddings")
            svm = graph_svm(tpg, model if emb is None else emb, require_feasible=False)
        rows.append(priority_alignment(model, tpg, tokens, labels, svm=svm, **kw).summary())
    values = {k: torch.tensor([r[k] for r in rows], dtype=torch.float64) for k in _CURVE_KEYS}
    return AlignmentCurve(steps=torch.tensor([s for s, _ in pairs], dtype=torch.long), values=values)


# =========================================================================== the view
_EDGE_COLORS = {
    "data": "#555555", "agree": "#2a9d4b", "missed": "#d62728", "untested": "#aaaaaa",
    "implied": "#1f77b4", "reversed": "#ff7f0e", "unsupported": "#9467bd",
}
_DX, _DY, _PAD = 64, 96, 16


def _layout(tpg: TokenPriorityGraph, k: int, extra: Sequence[int]) -> tuple[dict, list]:
    """Node centres and SCC boxes for G^(k): one row per priority level, top first.

    ``extra`` tokens (head edges to tokens outside G^(k)) go into a last 'unranked' row.
    Returns ({token: (x, y)}, [((x0, y0, w, h), tokens)]).
    """
    sccs, levels = tpg.sccs(k), tpg.levels(k)
    rows: dict[int, list[tuple[int, ...]]] = {}
    for c, lv in zip(sccs, levels):
        rows.setdefault(lv, []).append(c)
    if extra:
        rows[max(rows) + 1 if rows else 0] = [tuple(sorted(extra))]
    pos, boxes = {}, []
    for r, lv in enumerate(sorted(rows)):
        x = _PAD
        y = _PAD + r * _DY
        for c in rows[lv]:
            w = len(c) * _DX
            boxes.append(((x, y, w, _DY - 2 * _PAD), c))
            for j, t in enumerate(c):
                pos[t] = (x + _DX / 2 + j * _DX, y + (_DY - 2 * _PAD) / 2)
            x += w + _PAD
    return pos, boxes


def retrieval_graph_view(
    tpg: TokenPriorityGraph,
    alignment: PriorityAlignment | None = None,
    svm: GraphSVM | None = None,
    *,
    last_tokens: Sequence[int] | None = None,
    max_panels: int = 24,
    title: str = "token-priority graph",
) -> View:
    """A self-contained HTML/SVG view of the token-priority graph (Li et al. 2024).

    One panel per last token k: the SCCs of G^(k) as boxes, one row per priority level
    (top = highest priority; tied tokens share an amber box), data edges y -> x_t as
    solid arrows; with an ``alignment``, the head's own edges as dashed arrows, coloured
    by agreement (green agree, red missed, grey untested; head-only blue implied, orange
    reversed, purple unsupported). With ``svm``, each token of a multi-token SCC is
    annotated with its soft-composition weight softmax_v(e_v^T W_fin e_k) within the SCC.
    Inline SVG, CSS and a few lines of JS (a toggle for the head's edges); no network;
    every token string escaped.
    """
    ks = list(last_tokens) if last_tokens is not None else tpg.last_tokens[:max_panels]
    for k in ks:
        tpg.graph(k)
    if svm is None and alignment is not None:
        svm = alignment.svm
    edges = alignment.edges if alignment is not None else ()
    panels = [_panel(tpg, k, [e[1:] for e in edges if e[0] == k], svm) for k in ks]
    skipped = len(tpg.last_tokens) - len(ks)
    return graph_view(
        panels, _EDGE_COLORS, title=title,
        intro=None if alignment is None else _alignment_line(alignment),
        toggle=None if alignment is None else "show head edges",
        note=f"{skipped} more last tokens not drawn (max_panels)." if skipped else None,
    )


def _panel(tpg: TokenPriorityGraph, k: int, edges: Sequence[tuple[int, int, str]],
           svm: GraphSVM | None) -> GraphPanel:
    """The drawing of G^(k): SCC boxes by priority level, data edges coloured by the
    head's agreement, the head's own edges, soft-composition weights inside tied SCCs."""
    g = tpg.graph(k)
    status = {(a, b): st for a, b, st in edges if st in ("agree", "missed", "untested")}
    head = [(a, b, st) for a, b, st in edges if st == "agree" or st in _MODEL_ONLY]
    extra = sorted({t for a, b, _ in head for t in (a, b)} - set(g.nodes))
    pos, boxes = _layout(tpg, k, extra)
    weights: dict[int, float] = {}
    for c in tpg.sccs(k) if svm is not None else ():
        if len(c) > 1:
            weights.update(zip(c, torch.softmax(svm.fin_scores(k, c), 0).tolist()))
    v = tpg.vocab
    return GraphPanel(
        key=k, heading=f"last token {v[k]}",
        note=f"{g.number_of_nodes()} tokens, {len(tpg.sccs(k))} SCCs, {g.number_of_edges()} edges",
        size=(max(x0 + w for (x0, _, w, _), _ in boxes) + _PAD, max(y0 + h for (_, y0, _, h), _ in boxes) + _PAD),
        boxes=tuple((box, len(c) > 1 and c[0] in g) for box, c in boxes),
        nodes=tuple((t, v[t], x, y, weights.get(t)) for t, (x, y) in pos.items()),
        edges=tuple((a, b, "data", status.get((a, b), "data")) for a, b in g.edges)
        + tuple((a, b, "model", st) for a, b, st in head),
    )


def _alignment_line(al: PriorityAlignment) -> str:
    sm = al.summary()
    return (
        f"head {head_name(al.layer, al.head)}: cos(W, W_svm) = {sm['cos_svm']:.4f},"
        f" ||P_fin W - W_fin|| = {sm['fin_distance']:.4g}, attention on the retrieved SCC"
        f" = {sm['retrieved_mass']:.4f}, edge recall = {sm['edge_recall']:.3f},"
        f" precision = {sm['edge_precision']:.3f}. Solid: data edges; dashed: the head's"
        " edges (attention above the threshold)."
    )
