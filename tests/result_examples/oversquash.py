from __future__ import annotations

import torch

import lensprobe as lp

TOKENS = torch.tensor([[1, 2, 3, 4, 5, 6]])


def _model(n_ctx=8):
    return lp.tiny_model(n_layers=2, d_model=16, n_heads=2, d_vocab=12, n_ctx=n_ctx, seed=0)


def sensitivity():
    return lp.sensitivity(_model(), TOKENS, method="hutchinson", n_probes=4, progress=False)


def path_bound():
    return lp.path_bound(_model(), TOKENS, progress=False)


def path_bound_each():
    return lp.path_bound(_model(), TOKENS, reduce_heads="none", compare=False)


def _collapse():
    return lp.collapse_curve(_model(n_ctx=20), "ones", [2, 4, 8], bos=3, precisions=("bfloat16",), progress=False)


def precision_run():
    return _collapse().low["bfloat16"]


EXAMPLES = {"Sensitivity": sensitivity, "PathBound": path_bound, "PrecisionRun": precision_run,
            "CollapseCurve": _collapse}
