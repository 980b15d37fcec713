from __future__ import annotations

import torch

import lensprobe as lp

TOKENS = torch.tensor([[1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1]])


def _model(seed=0):
    return lp.tiny_model(n_layers=2, d_model=16, n_heads=2, d_vocab=12, n_ctx=8, seed=seed)


def block_jacobians():
    return lp.block_jacobians(_model(), TOKENS, positions=[2, 5], progress=False)


def block_coupling():
    return lp.block_coupling(_model(), TOKENS, positions=[3, 5], top_k=[2, 3], progress=False)


def trajectory_metrics():
    return lp.trajectory_metrics(_model(), TOKENS)


def coupling_through_training():
    return lp.coupling_through_training([_model(0), _model(1)], TOKENS, steps=[0, 10], top_k=2,
                                        progress=False)


EXAMPLES = {"BlockJacobians": block_jacobians, "Coupling": block_coupling,
            "TrajectoryMetrics": trajectory_metrics, "TrainingCoupling": coupling_through_training}
