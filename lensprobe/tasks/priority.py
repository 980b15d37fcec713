"""Sequences generated from a known token-priority order (Li et al., AISTATS 2024).

The inverse of :class:`lensprobe.TokenPriorityGraph`: instead of reading the priority
graph off a dataset, fix one and sample data from it. For every possible last token
``k`` the task holds a priority ranking of the vocabulary as a list of *groups* (top
priority first). Tokens in one group are tied: when the highest-priority group present
in a context has several tokens, the label is drawn uniformly among them, so the data's
token-priority graph gets edges both ways between them (a cycle, i.e. a non-trivial
strongly connected component). With singleton groups the label is always the unique
highest-priority token present and the data's graph is acyclic.

A sample is ``X = (x_1, ..., x_{T-1}, k)`` with ``x_t`` drawn uniformly from the
vocabulary and ``k`` from ``last_tokens``; the label ``y`` is a token of the top group
present in ``X`` (the last token included). ``Batch.targets`` holds ``y`` at the last
position and ``IGNORE`` elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..core import renamed
from ..errors import InputError
from ..inputs import int_ids
from .base import IGNORE, Batch

__all__ = ["PriorityTask", "priority_dataset", "FixedData"]


def _check_groups(groups: Sequence[Sequence[int]], n_tokens: int, k: int) -> tuple[tuple[int, ...], ...]:
    flat = [int(t) for g in groups for t in g]
    if sorted(flat) != list(range(n_tokens)):
        raise InputError(
            f"the priority groups for last token {k} must partition the vocabulary"
            f" 0..{n_tokens - 1} (each token exactly once), got {groups!r}."
        )
    if any(len(g) == 0 for g in groups):
        raise InputError(f"the priority groups for last token {k} contain an empty group.")
    return tuple(tuple(int(t) for t in g) for g in groups)


@dataclass(frozen=True)
class PriorityTask:
    """A seeded generator of (sequence, next token) pairs from a known priority order.

    n_tokens:  vocabulary size K (token ids 0..K-1).
    seq_len:   sequence length T (the last position holds the last token k).
    priority:  {k: groups}, groups a list of token groups, highest priority first,
               partitioning 0..K-1; tokens in one group are tied.
    vocab:     token strings (default ``t0 .. t{K-1}``).
    """

    n_tokens: int
    seq_len: int
    priority: dict
    vocab: list

    def __init__(
        self,
        n_tokens: int,
        seq_len: int,
        priority: dict[int, Sequence[Sequence[int]]],
        vocab: Sequence[str] | None = None,
    ):
        if int(n_tokens) < 2:
            raise InputError(f"n_tokens must be >= 2, got {n_tokens}.")
        if int(seq_len) < 2:
            raise InputError(f"seq_len must be >= 2 (a context and a last token), got {seq_len}.")
        if not priority:
            raise InputError("priority needs at least one last token {k: groups}.")
        pr = {}
        for k, groups in priority.items():
            if not 0 <= int(k) < n_tokens:
                raise InputError(f"last token {k} is outside the vocabulary 0..{n_tokens - 1}.")
            pr[int(k)] = _check_groups(groups, n_tokens, int(k))
        vocab = [f"t{i}" for i in range(n_tokens)] if vocab is None else [str(v) for v in vocab]
        if len(vocab) != n_tokens:
            raise InputError(f"vocab has {len(vocab)} strings for n_tokens={n_tokens}.")
        object.__setattr__(self, "n_tokens", int(n_tokens))
        object.__setattr__(self, "seq_len", int(seq_len))
        object.__setattr__(self, "priority", pr)
        object.__setattr__(self, "vocab", vocab)

    # ------------------------------------------------------------------ builders
    @classmethod
    def random(
        cls,
        n_tokens: int,
        seq_len: int,
        *,
        tie_size: int = 1,
        last_tokens: Sequence[int] | None = None,
        seed: int = 0,
        vocab: Sequence[str] | None = None,
    ) -> "PriorityTask":
        """A random priority order per last token, with groups of ``tie_size`` tied tokens.

        ``tie_size=1`` gives a strict total order (acyclic data); ``tie_size >= 2`` ties
        consecutive tokens of a random order into groups (cyclic data once two tied
        tokens meet in contexts with different labels).
        """
        if int(tie_size) < 1:
            raise InputError(f"tie_size must be >= 1, got {tie_size}.")
        g = torch.Generator().manual_seed(int(seed))
        lasts = range(n_tokens) if last_tokens is None else [int(k) for k in last_tokens]
        priority = {}
        for k in lasts:
            order = torch.randperm(n_tokens, generator=g).tolist()
            priority[k] = [order[i : i + tie_size] for i in range(0, n_tokens, tie_size)]
        return cls(n_tokens, seq_len, priority, vocab)

    # ------------------------------------------------------------------ sampling
    @renamed(k="last_token")
    def rank(self, last_token: int) -> dict[int, int]:
        """Group index (0 = highest priority) of every token for ``last_token``."""
        return {t: i for i, grp in enumerate(self.priority[last_token]) for t in grp}

    def label_candidates(self, seq: Sequence[int]) -> list[int]:
        """The tokens of the highest-priority group present in ``seq`` (sorted)."""
        seq = [int(t) for t in seq]
        rank = self.rank(seq[-1])
        top = min(rank[t] for t in seq)
        return sorted({t for t in seq if rank[t] == top})

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        """``batch_size`` sequences [batch, seq_len] with the label at the last position."""
        lasts = torch.tensor(sorted(self.priority))
        ctx = torch.randint(0, self.n_tokens, (batch_size, self.seq_len - 1), generator=generator)
        last = lasts[torch.randint(0, len(lasts), (batch_size,), generator=generator)]
        tokens = torch.cat([ctx, last[:, None]], dim=1)
        labels = torch.empty(batch_size, dtype=torch.long)
        for b in range(batch_size):
            cands = self.label_candidates(tokens[b].tolist())
            labels[b] = cands[int(torch.randint(0, len(cands), (1,), generator=generator))]
        targets = torch.full_like(tokens, IGNORE)
        targets[:, -1] = labels
        difficulty = torch.full_like(tokens, -1)
        difficulty[:, -1] = 0
        return Batch(tokens, targets, difficulty, {"labels": labels, "last_tokens": last})

    def str_tokens(self, tokens: torch.Tensor) -> list[str]:
        return [self.vocab[int(t)] for t in tokens]


class FixedData:
    """A fixed dataset (X [n, T], y [n]) as a task: ``sample`` returns all of it.

    Full-batch training (the paper's setting) through :func:`lensprobe.train`: every
    "batch" is the whole dataset, whatever ``batch_size`` is asked for.
    """

    def __init__(self, tokens: torch.Tensor, labels: torch.Tensor, vocab: Sequence[str] | None = None):
        tokens = int_ids(tokens, "tokens", 2).long()
        labels = int_ids(labels, "labels", 1).long()
        if labels.shape != (tokens.shape[0],):
            raise InputError(
                f"expected tokens [n, T] and labels [n], got {tuple(tokens.shape)} and"
                f" {tuple(labels.shape)}."
            )
        self.tokens, self.labels = tokens, labels
        n_tokens = int(max(tokens.max(), labels.max())) + 1
        self.vocab = [f"t{i}" for i in range(n_tokens)] if vocab is None else list(vocab)
        self.seq_len = tokens.shape[1]

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        targets = torch.full_like(self.tokens, IGNORE)
        targets[:, -1] = self.labels
        difficulty = torch.full_like(self.tokens, -1)
        difficulty[:, -1] = 0
        return Batch(self.tokens.clone(), targets, difficulty, {"labels": self.labels.clone()})

    def str_tokens(self, tokens: torch.Tensor) -> list[str]:
        return [self.vocab[int(t)] for t in tokens]


def priority_dataset(
    task: PriorityTask, n: int, *, seed: int = 0, require_cycle: bool = False, max_tries: int = 1000
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed dataset ``(X [n, T], y [n])`` from ``task``, seeded.

    ``require_cycle=True`` redraws (seeds ``seed, seed+1, ...``) until the dataset's own
    token-priority graph has a strongly connected component with two or more tokens, i.e.
    two tied tokens met in contexts with different labels; it raises if ``max_tries``
    draws never produce one (e.g. the task has no ties).
    """
    for i in range(max_tries if require_cycle else 1):
        batch = task.sample(n, torch.Generator().manual_seed(int(seed) + i))
        X, y = batch.tokens, batch.info["labels"]
        if not require_cycle or _has_cycle(X, y):
            return X, y
    raise InputError(
        f"no draw of {n} sequences from this task produced a cyclic token-priority graph in"
        f" {max_tries} tries; use tie_size >= 2, more sequences, or fewer tokens."
    )


def _has_cycle(X: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether some last token's priority graph (edges label -> every other context token,
    as in :class:`lensprobe.TokenPriorityGraph`) has a directed cycle, i.e. an SCC of two
    or more tokens. Task samples always hold their label, so no sample is left out."""
    import networkx as nx

    graphs: dict[int, nx.DiGraph] = {}
    for seq, lab in zip(X.tolist(), y.tolist()):
        graphs.setdefault(seq[-1], nx.DiGraph()).add_edges_from((lab, t) for t in set(seq) - {lab})
    return not all(nx.is_directed_acyclic_graph(g) for g in graphs.values())
