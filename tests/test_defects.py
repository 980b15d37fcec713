"""Regression tests for defects found in review (issue 11, items 2-5 and 11).

Each expected value is derived here by hand or by a plain computation, not by lensprobe.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import lensprobe as lp
from lensprobe.errors import InputError, NonFiniteError

D64 = torch.float64


# --------------------------------------------------------------------------- item 2
def _rank_deficient_head(n_heads: int = 1):
    """d_model 4, d_head 2: W_V = I[:, :2], W_O = diag(-1.5, 0) W_V^T in head 0.

    H = W_V W_O = diag(-1.5, 0, 0, 0): one non-zero OV eigenvalue, -1.5, and a zero one
    inside the head's own d_head block (W_O W_V = diag(-1.5, 0)). Further heads are zero.
    """
    model = lp.tiny_model(n_layers=1, n_heads=n_heads, d_model=4, d_head=2, d_vocab=6, n_ctx=8,
                          attn_only=True, normalization=None, positional="none", dtype=D64)
    sd = dict(lp._tl.portable_state_dict(model))
    W_V = torch.zeros(n_heads, 4, 2, dtype=D64)
    W_V[0] = torch.eye(4, dtype=D64)[:, :2]
    W_O = torch.zeros(n_heads, 2, 4, dtype=D64)
    W_O[0] = torch.diag(torch.tensor([-1.5, 0.0], dtype=D64)) @ W_V[0].T
    sd["blocks.0.attn.W_V"] = W_V
    sd["blocks.0.attn.W_O"] = W_O
    lp._tl.load_portable_state_dict(model, sd)
    return model


SELF_WEIGHTS = [1.0, 0.5, 0.7, 0.9]  # causal: row 0 attends only to itself


def _forced_pattern(n_heads: int) -> torch.Tensor:
    """A causal pattern whose diagonal is SELF_WEIGHTS, the rest of each row spread evenly."""
    n = len(SELF_WEIGHTS)
    P = torch.zeros(n, n, dtype=D64)
    for i, a in enumerate(SELF_WEIGHTS):
        P[i, i] = a
        if i:
            P[i, :i] = (1 - a) / i
    return P.expand(1, n_heads, n, n).clone()


@pytest.mark.parametrize("n_heads", [1, 2])
def test_dominance_ignores_zero_ov_eigenvalues(n_heads):
    model = _rank_deficient_head(n_heads)
    pattern = _forced_pattern(n_heads)
    # By hand: H's only non-zero eigenvalue is -1.5, so mu_DC = |1 - 1.5| = 0.5; the HF
    # attention eigenvalues are the self-weights 0.5, 0.7, 0.9, so
    # mu_HF = max |1 - 1.5 a| = max(0.25, 0.05, 0.35) = 0.35 < mu_DC: DC dominates.
    mu_dc = abs(1 - 1.5)
    mu_hf = max(abs(1 - 1.5 * a) for a in SELF_WEIGHTS[1:])
    assert (mu_dc, mu_hf) == (0.5, pytest.approx(0.35))
    model.blocks[0].attn.hook_pattern.add_hook(lambda act, hook: pattern.to(act.dtype))
    try:
        dom = lp.dominance(model, torch.tensor([[1, 2, 3, 4]]), progress=False)
    finally:
        model.reset_hooks()
    assert dom.attn_eigenvalues[0, 0, 0].tolist() == pytest.approx(SELF_WEIGHTS)
    assert float(dom.mu_dc[0, 0]) == pytest.approx(mu_dc)
    assert float(dom.mu_hf[0, 0, 0]) == pytest.approx(mu_hf)
    assert int(dom.dominant[0, 0, 0]) == 1
    # The head sum has the same spectrum (other heads are zero) and, with every head on
    # the same pattern, the same attention eigenvalues.
    assert float(dom.layer_mu_dc[0]) == pytest.approx(mu_dc)
    assert float(dom.layer_mu_hf[0, 0]) == pytest.approx(mu_hf)
    assert int(dom.layer_dominant[0, 0]) == 1


# --------------------------------------------------------------------------- item 3
def _paper_loss(W: torch.Tensor, E: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Li et al.'s loss, written plainly: s = softmax(X W x_T), -log sum_t s_t 1[x_t = y]."""
    total = 0.0
    for seq, label in zip(X.tolist(), y.tolist()):
        emb = E[seq]  # [T, d]
        s = torch.softmax(emb @ W @ emb[-1], 0)
        total = total - torch.log(sum(s[t] for t, tok in enumerate(seq) if tok == label))
    return total / len(X)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_train_priority_lr_is_the_step_on_the_papers_W(schedule):
    model = lp.priority_model(6, 8, seed=0)
    X = torch.tensor([[0, 1, 2, 3], [2, 4, 1, 5]])
    y = torch.tensor([1, 4])
    E = model.W_E.detach().to(D64)
    lr = 0.01
    for _ in range(3):  # from W = 0, then from W != 0
        W0 = lp.head_W(model)
        g = torch.func.grad(lambda W: _paper_loss(W, E, X, y))(W0)
        lp.train_priority(model, X, y, steps=1, lr=lr, schedule=schedule, progress=False)
        dW = lp.head_W(model) - W0
        assert float(dW.norm()) == pytest.approx(lr, rel=1e-9)
        torch.testing.assert_close(dW, -lr * g / g.norm(), rtol=0, atol=1e-12)


def test_train_priority_warns_when_lr_cannot_be_the_step_on_W():
    model = lp.tiny_model(n_layers=1, n_heads=2, d_model=8, d_vocab=6, n_ctx=8, attn_only=True,
                          normalization=None, dtype=D64)
    with pytest.warns(UserWarning, match="not on W"):
        lp.train_priority(model, torch.tensor([[0, 1, 2]]), torch.tensor([1]), steps=1,
                          lr=0.01, progress=False)
