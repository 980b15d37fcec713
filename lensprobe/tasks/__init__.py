"""Synthetic tasks with ground truth: retrieval chains, counting/copying, priority graphs.

Every task follows :class:`lensprobe.tasks.base.Task` (seeded ``sample`` -> :class:`Batch`).
"""

from .base import IGNORE, Batch, Task
from .counting import CopyTask, CountTask, counting_vocab
from .priority import FixedData, PriorityTask, priority_dataset
from .retrieval import RetrievalTask

__all__ = ["IGNORE", "Batch", "CopyTask", "CountTask", "FixedData", "PriorityTask", "RetrievalTask", "Task",
           "counting_vocab", "priority_dataset"]
