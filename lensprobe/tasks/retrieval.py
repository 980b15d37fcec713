"""The retrieval problem of Musat, "Mechanism and Emergence of Stacked Attention Heads in
Multi-Layer Transformers" (ICLR 2025): variable-assignment chains among distractors.

A sequence (default format, ``assign='='``, ``separator=';'``)::

    <bos> C = B ; A = 7 ; H = 2 ; B = A ; G = H ; ? C

holds ``n_statements`` statements ``x = y`` (``y`` a literal value or a variable defined
earlier in its chain), then a query ``? x``. The main chain has ``D`` statements
(``A = 7, B = A, C = B``: ``D = 3``) and ends at the queried variable; the other
statements form distractor chains. Chains are interleaved at random keeping each chain's
order (``order='interleaved'``, every statement resolvable by a causal model), or fully
shuffled (``order='shuffled'``: a statement is supervised only if its whole chain
precedes it).

Hops. A statement whose variable sits at depth ``d`` of its chain (the literal statement
has ``d = 1``) needs ``d - 1`` retrievals from its right-hand-side position; the query of
a depth-``D`` variable needs ``D``. The *k-hop referent* of a position is the statement
reached after following ``k`` definitions: for the right-hand side ``y`` of ``x = y`` the
1-hop referent is the statement defining ``y``; for the query ``? x`` it is the statement
defining ``x``. ``info['ref_pos'][b, i, k-1]`` is the position of the k-hop referent's
right-hand side (``info['ref_lhs']`` its left-hand side), -1 where undefined; its last
axis has ``max(max D, distractor_hops - 1)`` entries (a distractor chain's last
right-hand side needs ``distractor_hops - 1`` hops). ``info['stmt_lhs']`` holds the
left-hand-side position of every statement, ``info['literals']`` the (lo, hi) range of
the literal-value token ids.

Supervision (targets read at each position's logits):
* ``'curriculum'`` (the paper's implicit curriculum): every statement's right-hand-side
  position with the resolved value of its variable (difficulty = hops needed, 0 .. D-1),
  and the query position (difficulty D); so every hop count appears in every example.
* ``'final'``: only the query position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..errors import InputError
from .base import IGNORE, Batch

__all__ = ["RetrievalTask", "depth_bound", "doubling_hops"]

_VAR_NAMES = [chr(c) for c in range(ord("A"), ord("Z") + 1)]


def depth_bound(hops: int) -> int:
    """Fewest layers ``t`` with ``t >= log_3(2D)`` (Musat's lower bound), at least 1."""
    if hops < 1:
        return 1
    t = 1
    while 3**t < 2 * hops:
        t += 1
    return t


def doubling_hops(n_layers: int) -> int:
    """Most query hops a doubling construction resolves with ``n_layers`` layers: 2^(L-1).

    Each statement's right-hand side starts out covering its own statement; a layer in
    which every position attends to the statement that ends its known segment doubles
    the segment (1, 2, 4, ... statements); the query reads the segment of its variable's
    statement in the last layer, so L layers reach 2^(L-1) statements. This assumes the
    within-statement read (lhs -> rhs) comes for free, as the paper's construction does.
    """
    return 2 ** max(n_layers - 1, 0)


@dataclass
class RetrievalTask:
    """Seeded generator of retrieval-chain batches with full ground truth.

    hops:           main-chain length D: an int, a sequence (uniform) or a mapping
                    {D: probability}.
    n_statements:   statements per sequence (main chain + distractors); >= max D.
    n_vars, n_values: variable and literal-value alphabet sizes (n_vars >= n_statements).
    distractor_hops: longest distractor chain (default: the largest D).
    assign, separator: tokens inside / after each statement (None drops them).
    query:          the query marker token; bos: start every sequence with '<bos>'.
    supervision:    'curriculum' or 'final'; order: 'interleaved' or 'shuffled'.

    Vocabulary: ['<bos>', assign, separator, query] (those present), values '0'..,
    variables 'A'.. (then 'V26', 'V27' ... beyond Z).

    After construction: ``hop_values`` (the main-chain lengths D that can be drawn, in
    the order given), ``max_hops``, ``seq_len`` and ``vocab``.
    """

    hops: int | Sequence[int] | Mapping[int, float] = 4
    n_statements: int = 8
    n_vars: int = 26
    n_values: int = 10
    distractor_hops: int | None = None
    assign: str | None = "="
    separator: str | None = ";"
    query: str = "?"
    bos: bool = True
    supervision: str = "curriculum"
    order: str = "interleaved"
    vocab: list[str] = field(init=False)
    seq_len: int = field(init=False)

    def __post_init__(self) -> None:
        self.hop_values, self._hop_probs = _hop_distribution(self.hops)
        self.max_hops = max(self.hop_values)
        if self.distractor_hops is None:
            self.distractor_hops = self.max_hops
        if self.distractor_hops < 1:
            raise InputError(f"distractor_hops must be >= 1, got {self.distractor_hops}.")
        if self.n_statements < self.max_hops:
            raise InputError(
                f"n_statements={self.n_statements} cannot hold a chain of {self.max_hops} hops;"
                f" use n_statements >= {self.max_hops}."
            )
        if self.n_vars < self.n_statements:
            raise InputError(
                f"n_vars={self.n_vars} < n_statements={self.n_statements}: every statement"
                " defines a distinct variable; raise n_vars."
            )
        if self.n_values < 1:
            raise InputError(f"n_values must be >= 1, got {self.n_values}.")
        if self.supervision not in ("curriculum", "final"):
            raise InputError(f"supervision must be 'curriculum' or 'final', got {self.supervision!r}.")
        if self.order not in ("interleaved", "shuffled"):
            raise InputError(f"order must be 'interleaved' or 'shuffled', got {self.order!r}.")
        specials = (["<bos>"] if self.bos else []) + [
            t for t in (self.assign, self.separator, self.query) if t is not None
        ]
        values = [str(i) for i in range(self.n_values)]
        names = [_VAR_NAMES[i] if i < 26 else f"V{i}" for i in range(self.n_vars)]
        self.vocab = specials + values + names
        if len(set(self.vocab)) != len(self.vocab):
            raise InputError(f"token strings collide in the vocabulary: {self.vocab}.")
        self._tok = {t: i for i, t in enumerate(self.vocab)}
        self.value_offset = len(specials)
        self.var_offset = len(specials) + self.n_values
        self.stmt_len = 2 + (self.assign is not None) + (self.separator is not None)
        self.rhs_offset = 1 + (self.assign is not None)
        self.first_stmt = 1 if self.bos else 0
        self.seq_len = self.first_stmt + self.n_statements * self.stmt_len + 2

    @property
    def _hop_values(self) -> list[int]:
        """The old private name of :attr:`hop_values` (kept while callers move)."""
        return self.hop_values

    def config(self) -> dict[str, Any]:
        """The constructor options as JSON-friendly data: ``RetrievalTask(**task.config())``."""
        hops = self.hops
        if isinstance(hops, Mapping):
            hops = {str(k): float(v) for k, v in hops.items()}
        elif not isinstance(hops, int):
            hops = [int(h) for h in hops]
        return dict(hops=hops, n_statements=self.n_statements, n_vars=self.n_vars,
                    n_values=self.n_values, distractor_hops=self.distractor_hops,
                    assign=self.assign, separator=self.separator, query=self.query, bos=self.bos,
                    supervision=self.supervision, order=self.order)

    # ------------------------------------------------------------------ sampling
    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> Batch:
        """``batch_size`` sequences; ground truth in ``batch.info`` (see the module doc)."""
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}.")
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=g)))
        B, T, S = batch_size, self.seq_len, self.n_statements
        # the deepest referent: the query's D hops, or a distractor's rhs (its depth - 1)
        K = max(self.max_hops, int(self.distractor_hops) - 1)
        row = _Row(
            tokens=np.zeros((B, T), dtype=np.int64),
            targets=np.full((B, T), IGNORE, dtype=np.int64),
            difficulty=np.full((B, T), -1, dtype=np.int64),
            resolved=np.full((B, T), -1, dtype=np.int64),
            ref_pos=np.full((B, T, K), -1, dtype=np.int64),
            ref_lhs=np.full((B, T, K), -1, dtype=np.int64),
            hops_needed=np.full((B, T), -1, dtype=np.int64),
            value_of=np.full((B, self.n_vars), -1, dtype=np.int64),
        )
        main_hops = rng.choice(self.hop_values, size=B, p=self._hop_probs)
        for b in range(B):
            self._one(rng, int(main_hops[b]), row[b])
        t = torch.from_numpy
        info: dict[str, Any] = {
            "ref_pos": t(row.ref_pos),
            "ref_lhs": t(row.ref_lhs),
            "hops": t(row.hops_needed),
            "resolved": t(row.resolved),
            "value_of": t(row.value_of),
            "main_hops": t(main_hops.astype(np.int64)),
            "query_pos": T - 1,
            "stmt_len": self.stmt_len,
            "rhs_offset": self.rhs_offset,
            "stmt_lhs": torch.arange(S) * self.stmt_len + self.first_stmt,
            "literals": (self.value_offset, self.value_offset + self.n_values),
        }
        return Batch(t(row.tokens), t(row.targets), t(row.difficulty), info)

    def _one(self, rng: np.random.Generator, D: int, row: "_Row") -> None:
        """Fill one sequence's row of every array (``row`` holds views of row ``b``)."""
        chains = self._chains(rng, D, row.value_of)
        stmts = self._order(rng, [len(c) for c in chains])
        where, q = self._write(chains, stmts, row.tokens)
        self._supervise(chains, where, q, row)

    def _chains(self, rng: np.random.Generator, D: int, value_of: np.ndarray) -> list[list[tuple]]:
        """The main chain (length D) then distractor chains filling ``n_statements``:
        ``chains[c]`` = list of (var, rhs) with rhs = ('val', v) or ('var', u)."""
        lengths = [D]
        left = self.n_statements - D
        while left > 0:
            n = min(int(rng.integers(1, self.distractor_hops + 1)), left)
            lengths.append(n)
            left -= n
        var_ids = rng.permutation(self.n_vars)[: self.n_statements]
        chains, k = [], 0
        for n in lengths:
            vs = var_ids[k : k + n]
            k += n
            lit = int(rng.integers(0, self.n_values))
            chain = [(int(vs[0]), ("val", lit))]
            chain += [(int(vs[j]), ("var", int(vs[j - 1]))) for j in range(1, n)]
            chains.append(chain)
            value_of[vs] = self.value_offset + lit
        return chains

    def _order(self, rng: np.random.Generator, lengths: list[int]) -> list[tuple[int, int]]:
        """The statements' order as (chain, index in chain): interleaved (each chain in
        order) or shuffled."""
        if self.order == "interleaved":
            slots = np.repeat(np.arange(len(lengths)), lengths)
            rng.shuffle(slots)
            cursor = [0] * len(lengths)
            stmts = []
            for c in slots:
                stmts.append((c, cursor[c]))
                cursor[c] += 1
            return stmts
        stmts = [(c, j) for c, n in enumerate(lengths) for j in range(n)]
        return [stmts[i] for i in rng.permutation(len(stmts))]

    def _write(self, chains: list[list[tuple]], stmts: list[tuple[int, int]],
               tokens: np.ndarray) -> tuple[dict[int, int], int]:
        """Write the statements and the query; returns variable -> lhs position of its
        statement, and the query variable's position."""
        pos = 0
        if self.bos:
            tokens[0] = self._tok["<bos>"]
            pos = 1
        where: dict[int, int] = {}
        for c, j in stmts:
            var, (kind, x) = chains[c][j]
            where[var] = pos
            tokens[pos] = self.var_offset + var
            if self.assign is not None:
                tokens[pos + 1] = self._tok[self.assign]
            tokens[pos + self.rhs_offset] = (self.value_offset if kind == "val" else self.var_offset) + x
            if self.separator is not None:
                tokens[pos + self.stmt_len - 1] = self._tok[self.separator]
            pos += self.stmt_len
        tokens[pos] = self._tok[self.query]
        tokens[pos + 1] = self.var_offset + chains[0][-1][0]
        return where, pos + 1

    def _supervise(self, chains: list[list[tuple]], where: dict[int, int], q: int, row: "_Row") -> None:
        """Referents, hop counts, resolved values and targets of every right-hand side and
        of the query at ``q``."""
        defn = {var: rhs for chain in chains for var, rhs in chain}
        depth = {chain[j][0]: j + 1 for chain in chains for j in range(len(chain))}

        def fill(i: int, first_var: int | None) -> int:
            """Walk the definitions from ``first_var``; returns how many were followed."""
            k, v = 0, first_var
            while v is not None:
                lhs = where[v]
                if lhs > i:  # defined later: a causal model cannot use it
                    return -1
                row.ref_lhs[i, k] = lhs
                row.ref_pos[i, k] = lhs + self.rhs_offset
                k += 1
                kind, x = defn[v]
                v = x if kind == "var" else None
            return k

        for var, lhs in where.items():
            i = lhs + self.rhs_offset
            kind, x = defn[var]
            n = fill(i, x if kind == "var" else None)
            row.resolved[i] = row.value_of[var]
            if n < 0:
                row.ref_pos[i] = -1
                row.ref_lhs[i] = -1
                continue
            row.hops_needed[i] = n
            assert n == depth[var] - 1
            if self.supervision == "curriculum":
                row.targets[i] = row.value_of[var]
                row.difficulty[i] = n
        query_var = chains[0][-1][0]
        n = fill(q, query_var)
        row.resolved[q] = row.value_of[query_var]
        row.hops_needed[q] = n
        row.targets[q] = row.value_of[query_var]
        row.difficulty[q] = n

    # ------------------------------------------------------------------ strings
    def str_tokens(self, tokens: torch.Tensor) -> list[str]:
        """Token strings of one sequence [pos]."""
        ids = torch.as_tensor(tokens).reshape(-1).tolist()
        return [self.vocab[i] for i in ids]

    def to_text(self, tokens: torch.Tensor) -> str:
        return " ".join(self.str_tokens(tokens))

    @property
    def difficulties(self) -> list[int]:
        """Difficulties that can appear (hop counts)."""
        if self.supervision == "final":
            return list(self.hop_values)
        return list(range(0, self.max_hops + 1))

    def literal_guess(self, batch: Batch) -> dict[int, float]:
        """Chance level per chain length D: the accuracy of answering the query with a value
        drawn uniformly from the literal values present in the sequence (a model that has
        learned "the answer is one of the literals" but no retrieval scores this)."""
        lo, hi = self.value_offset, self.value_offset + self.n_values
        lit = (batch.tokens >= lo) & (batch.tokens < hi)
        onehot = torch.zeros(len(batch), len(self.vocab), dtype=torch.bool)
        onehot.scatter_(1, torch.where(lit, batch.tokens, 0), lit)
        guess = 1.0 / onehot.sum(1).double()
        D = batch.info["main_hops"]
        return {int(d): float(guess[D == d].mean()) for d in torch.unique(D)}


@dataclass(frozen=True)
class _Row:
    """The arrays ``sample`` fills (each [batch, ...]); ``row[b]`` gives views of row b."""

    tokens: np.ndarray
    targets: np.ndarray
    difficulty: np.ndarray
    resolved: np.ndarray
    ref_pos: np.ndarray
    ref_lhs: np.ndarray
    hops_needed: np.ndarray
    value_of: np.ndarray

    def __getitem__(self, b: int) -> "_Row":
        return _Row(*(getattr(self, f.name)[b] for f in fields(self)))


def _hop_distribution(hops: Any) -> tuple[list[int], list[float]]:
    if isinstance(hops, bool):
        raise InputError(f"hops must be an int, a sequence or a mapping, got {hops!r}.")
    if isinstance(hops, int):
        vals, probs = [hops], [1.0]
    elif isinstance(hops, Mapping):
        vals = [int(k) for k in hops]
        probs = [float(v) for v in hops.values()]
    else:
        vals = [int(h) for h in hops]
        probs = [1.0] * len(vals)
    if not vals or min(vals) < 1:
        raise InputError(f"hops must be >= 1 (a chain has at least one statement), got {hops!r}.")
    total = sum(probs)
    if total <= 0 or any(p < 0 for p in probs) or not math.isfinite(total):
        raise InputError(f"hop probabilities must be non-negative with a positive sum, got {hops!r}.")
    return vals, [p / total for p in probs]
