"""Synthetic tasks with ground truth: retrieval chains, counting/copying, priority graphs.

Every task follows :class:`lensprobe.tasks.base.Task` (seeded ``sample`` -> :class:`Batch`).
"""

from .base import IGNORE, Batch, Task
from .retrieval import RetrievalTask
from .priority import PriorityTask, FixedData, priority_dataset
from .counting import CopyTask, CountTask, counting_vocab
