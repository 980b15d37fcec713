from __future__ import annotations

import functools

import lensprobe as lp
from lensprobe.tasks.priority import PriorityTask, priority_dataset


@functools.lru_cache(maxsize=1)
def _run():
    """A cyclic dataset (one tied SCC), the paper's model briefly trained, checkpoints 0/10/30."""
    task = PriorityTask.random(6, 4, tie_size=3, seed=0)
    X, y = priority_dataset(task, 6, seed=0, require_cycle=True)
    model = lp.priority_model(6, 8, seed=1, vocab=task.vocab)
    res = lp.train_priority(model, X, y, steps=30, lr=0.5, progress=False, checkpoint_steps=[0, 10, 30])
    tpg = lp.TokenPriorityGraph.from_data(X, y, vocab=task.vocab)
    return X, model, res, tpg


def token_priority_graph():
    return _run()[3]


def retrieval():
    X, _, _, tpg = _run()
    return tpg.retrieve(X[0])


def graph_svm():
    _, model, _, tpg = _run()
    return lp.graph_svm(tpg, model)


def priority_alignment():
    _, model, _, tpg = _run()
    return lp.priority_alignment(model, tpg)


def alignment_curve():
    _, _, res, tpg = _run()
    return lp.alignment_curve(res, tpg, progress=False)


EXAMPLES = {"TokenPriorityGraph": token_priority_graph, "Retrieval": retrieval, "GraphSVM": graph_svm,
            "PriorityAlignment": priority_alignment, "AlignmentCurve": alignment_curve}
