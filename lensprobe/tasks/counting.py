"""Copying and counting tasks of Barbero et al., "Transformers need glasses! Information
over-squashing in language tasks" (NeurIPS 2024): copy the first vs the last element of a
long sequence, and count ones, optionally with separator tokens every few items.

A copy sequence (``bos=True``, ``separator_every=3``)::

    <bos> 1 1 0 , 1 1 1 , 1 first?        -> target at 'first?': 1

A count sequence::

    <bos> 1 1 1 , 1 1 count?               -> target at 'count?': 5

Sequences have ``n`` items (n drawn uniformly from ``[min_len, max_len]``), the query
token last, and ``<pad>`` after it up to ``seq_len`` (a causal model never sees the pads
at the query). Only the query position is supervised; its difficulty is ``n``.

``content='ones'`` is the paper's hard case: every item is 1 except the one being asked
for (copy: the first or last item is a random bit; count: the sequence is ``1^n``), so
sequences differ by one token and collapse (``lp.collapse_curve``) predicts where models
must fail. ``content='random'`` draws i.i.d. bits (count then counts the ones).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InputError
from ..inputs import insert_separators
from .base import IGNORE, Batch

__all__ = ["CopyTask", "CountTask", "counting_vocab", "insert_separators"]

_SPECIALS = ["<pad>", "<bos>", ",", "first?", "last?", "count?"]


def counting_vocab(max_count: int = 1) -> list[str]:
    """The shared vocabulary: specials, then numbers "0".."max(1, max_count)".

    Items are the tokens "0" and "1"; counts are the number tokens.
    """
    return _SPECIALS + [str(k) for k in range(max(1, max_count) + 1)]


def _check_lengths(min_len: int, max_len: int, separator_every: int | None) -> None:
    if not (isinstance(min_len, int) and isinstance(max_len, int) and 1 <= min_len <= max_len):
        raise InputError(
            f"need integers 1 <= min_len <= max_len, got min_len={min_len!r}, max_len={max_len!r}."
        )
    if separator_every is not None and (not isinstance(separator_every, int) or separator_every < 1):
        raise InputError(f"separator_every must be None or a positive int, got {separator_every!r}.")


@dataclass
class _CountingBase:
    min_len: int = 4
    max_len: int = 32
    content: str = "ones"
    separator_every: int | None = None
    bos: bool = True
    vocab: list[str] = field(init=False)
    seq_len: int = field(init=False)

    def _setup(self, max_count: int) -> None:
        _check_lengths(self.min_len, self.max_len, self.separator_every)
        if self.content not in ("ones", "random"):
            raise InputError(f"content must be 'ones' or 'random', got {self.content!r}.")
        self.vocab = counting_vocab(max_count)
        self.id = {t: i for i, t in enumerate(self.vocab)}
        n_sep = (self.max_len - 1) // self.separator_every if self.separator_every else 0
        self.seq_len = int(self.bos) + self.max_len + n_sep + 1

    def _assemble(self, items: list[int], query: str) -> list[int]:
        seq = ([self.id["<bos>"]] if self.bos else []) + insert_separators(
            items, self.id[","], self.separator_every
        )
        return seq + [self.id[query]]

    def _pack(self, rows: list[list[int]], answers: list[int], lengths: list[int],
              info: dict[str, Any]) -> Batch:
        B = len(rows)
        tokens = torch.full((B, self.seq_len), self.id["<pad>"], dtype=torch.long)
        targets = torch.full((B, self.seq_len), IGNORE, dtype=torch.long)
        difficulty = torch.full((B, self.seq_len), -1, dtype=torch.long)
        query_pos = torch.tensor([len(r) - 1 for r in rows])
        for b, r in enumerate(rows):
            tokens[b, : len(r)] = torch.tensor(r)
            targets[b, len(r) - 1] = answers[b]
            difficulty[b, len(r) - 1] = lengths[b]
        info = dict(info, length=torch.tensor(lengths), answer=torch.tensor(answers),
                    query_pos=query_pos)
        return Batch(tokens, targets, difficulty, info)

    def _lengths(self, batch_size: int, generator: torch.Generator) -> list[int]:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive int, got {batch_size!r}.")
        return torch.randint(self.min_len, self.max_len + 1, (batch_size,), generator=generator).tolist()

    def str_tokens(self, tokens: torch.Tensor) -> list[str]:
        """Token strings of one sequence [pos]."""
        return [self.vocab[int(t)] for t in tokens]


@dataclass
class CopyTask(_CountingBase):
    """Copy the first or the last item of a bit sequence (Barbero et al. 2024).

    ``mode``: 'first', 'last', or 'both' (each sequence asks one of the two, chosen at
    random; the query token 'first?' / 'last?' says which). ``info['mode']`` [batch] is
    0 for first, 1 for last. Difficulty is the number of items n.
    """

    mode: str = "both"

    def __post_init__(self) -> None:
        if self.mode not in ("first", "last", "both"):
            raise InputError(f"mode must be 'first', 'last' or 'both', got {self.mode!r}.")
        self._setup(1)

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        lengths = self._lengths(batch_size, generator)
        if self.mode == "both":
            modes = torch.randint(0, 2, (batch_size,), generator=generator).tolist()
        else:
            modes = [int(self.mode == "last")] * batch_size
        one, zero = self.id["1"], self.id["0"]
        rows, answers = [], []
        for n, m in zip(lengths, modes):
            if self.content == "ones":
                items = [one] * n
                items[-1 if m else 0] = [zero, one][int(torch.randint(0, 2, (1,), generator=generator))]
            else:
                items = [[zero, one][int(b)] for b in torch.randint(0, 2, (n,), generator=generator)]
            answers.append(items[-1 if m else 0])
            rows.append(self._assemble(items, "last?" if m else "first?"))
        return self._pack(rows, answers, lengths, {"mode": torch.tensor(modes)})


@dataclass
class CountTask(_CountingBase):
    """Count the ones in the sequence (Barbero et al. 2024); the answer is a number token.

    ``content='ones'``: the sequence is ``1^n`` and the answer is n; ``'random'``: i.i.d.
    bits, the answer is the number of ones. Difficulty is the number of items n.
    """

    def __post_init__(self) -> None:
        self._setup(self.max_len)

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        lengths = self._lengths(batch_size, generator)
        one, zero = self.id["1"], self.id["0"]
        rows, answers = [], []
        for n in lengths:
            if self.content == "ones":
                bits = [1] * n
            else:
                bits = torch.randint(0, 2, (n,), generator=generator).tolist()
            answers.append(self.id[str(sum(bits))])
            rows.append(self._assemble([one if b else zero for b in bits], "count?"))
        return self._pack(rows, answers, lengths, {})
