"""What every lensprobe task provides, so one training loop and one set of views serve all.

A task is a seeded generator of batches over a fixed vocabulary. Token id ``i`` is the
string ``task.vocab[i]``; a model for the task has ``d_vocab = len(task.vocab)`` and
``n_ctx >= task.seq_len``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

IGNORE = -100
"""Target value at unsupervised positions (torch cross_entropy's ignore_index)."""


@dataclass
class Batch:
    """A batch of task sequences with per-position supervision and ground truth.

    tokens:     [batch, pos] int64 token ids.
    targets:    [batch, pos] int64 next-token targets read at each position's logits,
                ``IGNORE`` where the position is not supervised.
    difficulty: [batch, pos] int64 difficulty of each supervised target (hop count,
                count, ...), -1 where unsupervised; accuracy is reported per value.
    info:       task-specific ground truth (e.g. k-hop referent positions).
    """

    tokens: torch.Tensor
    targets: torch.Tensor
    difficulty: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> "Batch":
        def mv(v: Any) -> Any:
            return v.to(device) if isinstance(v, torch.Tensor) else v

        return Batch(mv(self.tokens), mv(self.targets), mv(self.difficulty),
                     {k: mv(v) for k, v in self.info.items()})

    def __len__(self) -> int:
        return self.tokens.shape[0]


@runtime_checkable
class Task(Protocol):
    """A seeded batch generator over ``vocab`` with sequences of length ``seq_len``."""

    vocab: list[str]
    seq_len: int

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch: ...

    def str_tokens(self, tokens: torch.Tensor) -> list[str]:
        """Token strings of one sequence [pos]."""
        ...
