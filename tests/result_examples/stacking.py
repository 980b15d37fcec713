from __future__ import annotations

import torch

import lensprobe as lp
from lensprobe.tasks.retrieval import RetrievalTask

_TASK = RetrievalTask(hops=[1, 2], n_statements=3, n_vars=5, n_values=3)


def _model(seed: int = 0):
    return lp.tiny_model(n_layers=2, n_heads=2, d_model=16, d_vocab=len(_TASK.vocab), n_ctx=_TASK.seq_len,
                         attn_only=True, vocab=_TASK.vocab, seed=seed)


def _batch():
    return _TASK.sample(4, torch.Generator().manual_seed(0))


def hop_scores():
    return lp.hop_scores(_model(), _batch())


def stacked_heads():
    return lp.stacked_heads(_model(), _batch(), threshold=0.0, min_over=-1.0, ablation="mean")


def emergence():
    return lp.emergence({0: _model(0), 5: _model(1)}, _batch(), threshold=0.2, progress=False)


def depth_study():
    return lp.depth_study(_TASK, layers=(1,), seeds=(0,), steps=1, eval_batch_size=8,
                          model_kwargs=dict(d_model=16, n_heads=2), progress=False)


EXAMPLES = {"HopScores": hop_scores, "StackedHeads": stacked_heads, "Emergence": emergence,
            "DepthStudy": depth_study}
