from __future__ import annotations

import torch

import lensprobe as lp

TOKENS = torch.tensor([[1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1]])


def _model(**kw):
    return lp.tiny_model(n_layers=2, d_model=16, n_heads=2, d_vocab=12, n_ctx=8, seed=0, **kw)


def ov_spectrum():
    return lp.ov_spectrum(_model(), progress=False)


def dominance():
    # bidirectional attention: complex attention eigenvalues go through save/load too
    return lp.dominance(_model(causal=False), TOKENS, progress=False)


def smoothing_profile():
    return lp.smoothing_profile(_model(), TOKENS, label="tiny")


EXAMPLES = {"OVSpectrum": ov_spectrum, "Dominance": dominance, "SmoothingProfile": smoothing_profile}
