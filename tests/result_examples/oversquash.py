from __future__ import annotations

import torch

import lensprobe as lp


def _model():
    return lp.tiny_model(n_layers=2, d_model=16, n_heads=2, d_vocab=12, n_ctx=8, seed=0)


def path_bound():
    return lp.path_bound(_model(), torch.tensor([[1, 2, 3, 4, 5, 6]]), progress=False)


def path_bound_each():
    return lp.path_bound(_model(), torch.tensor([[1, 2, 3, 4, 5, 6]]), reduce_heads="none", compare=False)


EXAMPLES = {"PathBound": path_bound}
