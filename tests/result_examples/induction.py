from __future__ import annotations

import lensprobe as lp


def _model(seed: int = 0):
    return lp.tiny_model(n_layers=2, n_heads=2, d_model=16, d_vocab=20, n_ctx=16, seed=seed)


def induction_heads():
    return lp.induction_heads(_model(), half=5, batch=2, bos=None, threshold=0.3, progress=False)


def induction_emergence():
    return lp.induction_emergence({0: _model(0), 10: _model(1)}, half=5, batch=2, bos=None, progress=False)


EXAMPLES = {"InductionHeads": induction_heads, "InductionEmergence": induction_emergence}
