from __future__ import annotations

import lensprobe as lp
from lensprobe.tasks.retrieval import RetrievalTask


def _task():
    return RetrievalTask(hops=2, n_statements=3, n_vars=4, n_values=3)


def _model(task):
    return lp.tiny_model(n_layers=1, n_heads=2, d_model=16, d_vocab=len(task.vocab),
                         n_ctx=task.seq_len, attn_only=True, seed=0)


def train_result():
    task = _task()
    # in-memory checkpoints (tensors) at steps 0 and 4, and the final one at 6
    return lp.train(_model(task), task, steps=6, lr=3e-3, batch_size=8, eval_every=2,
                    eval_batch_size=16, checkpoint_steps=(0, 4), progress=False)


def evaluation():
    task = _task()
    return lp.evaluate(_model(task), task, batch_size=32, seed=1)


EXAMPLES = {"TrainResult": train_result, "Evaluation": evaluation}
