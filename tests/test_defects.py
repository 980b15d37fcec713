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


# --------------------------------------------------------------------------- item 4
def _cyclic_data():
    from lensprobe.tasks.priority import PriorityTask, priority_dataset

    return priority_dataset(PriorityTask.random(6, 4, tie_size=3, seed=0), 6, seed=0,
                            require_cycle=True)


@pytest.mark.parametrize("bad, match", [
    ([[0.5, 1.5]], "integer token ids"),
    (torch.tensor([[0.0, 1.0]]), "integer token ids"),
    ([[[0, 1]], [[1, 2]]], r"shape \[n\]"),
    (torch.zeros(1, 2, 2, dtype=torch.long), r"shape \[n, T\]"),
    (["ab", "ba"], "text"),
    ("0 1", "text"),
    ([[0, "x"]], "cannot read"),
])
def test_priority_inputs_are_never_truncated_or_raw_errors(bad, match):
    X, y = _cyclic_data()
    tpg = lp.TokenPriorityGraph.from_data(X, y)
    model = lp.priority_model(6, 8, seed=1)
    labels = [1] * (len(bad) if not isinstance(bad, str) else 1)
    with pytest.raises(InputError, match=match):
        lp.priority_alignment(model, tpg, bad)
    with pytest.raises(InputError, match=match):
        lp.priority_alignment(model, tpg, bad, labels)
    with pytest.raises(InputError, match=match):
        lp.TokenPriorityGraph.from_data(bad, labels)
    if not isinstance(bad, str):
        with pytest.raises(InputError, match="integer token ids"):
            lp.TokenPriorityGraph.from_data([[0, 1]], [1.5])


def test_train_priority_rejects_float_ids():
    model = lp.priority_model(6, 8, seed=0)
    with pytest.raises(InputError, match="integer token ids"):
        lp.train_priority(model, [[0.5, 1.5, 2.0]], [1], steps=1, progress=False)
    with pytest.raises(InputError, match="integer token ids"):
        lp.train_priority(model, [[0, 1, 2]], [1.0], steps=1, progress=False)


def _fill_nan(model, key: str) -> None:
    """NaN into the portable state-dict entries whose name contains ``key`` ('' = all)."""
    sd = dict(lp._tl.portable_state_dict(model))
    hit = [k for k in sd if key in k and sd[k].is_floating_point()]
    assert hit, key
    lp._tl.load_portable_state_dict(model, {k: torch.full_like(v, math.nan) if k in hit else v
                                            for k, v in sd.items()})


@pytest.mark.parametrize("where", ["W_K", "all"])
def test_priority_alignment_raises_on_nan_weights(where, fingerprint):
    X, y = _cyclic_data()
    tpg = lp.TokenPriorityGraph.from_data(X, y)
    model = lp.priority_model(6, 8, seed=1)
    lp.train_priority(model, X, y, steps=20, lr=0.5, progress=False)
    svm = lp.graph_svm(tpg, model)
    _fill_nan(model, "" if where == "all" else "attn.W_K")
    assert not all(bool(torch.isfinite(p).all()) for p in model.parameters())
    before = fingerprint(model)
    with pytest.raises(NonFiniteError):
        lp.priority_alignment(model, tpg, svm=svm)
    with pytest.raises(NonFiniteError):
        lp.priority_alignment(model, tpg)  # builds the Graph-SVM from the (NaN) embeddings too
    assert fingerprint(model) == before


def _retrieval_setup():
    from lensprobe.tasks.retrieval import RetrievalTask

    task = RetrievalTask(hops=[1, 2], n_statements=3, n_vars=4, n_values=3)
    batch = task.sample(8, torch.Generator().manual_seed(0))
    model = lp.tiny_model(n_layers=2, n_heads=2, d_model=16, d_vocab=len(task.vocab),
                          n_ctx=task.seq_len, dtype=D64)
    return model, batch


@pytest.mark.parametrize("where", ["all", "unembed"])
def test_stacked_heads_raises_on_nan_weights(where, fingerprint):
    model, batch = _retrieval_setup()
    _fill_nan(model, "" if where == "all" else "unembed.W_U")
    before = fingerprint(model)
    with pytest.raises(NonFiniteError):
        lp.stacked_heads(model, batch)
    with pytest.raises(NonFiniteError):
        lp.stacking.query_accuracy(model, batch)
    if where == "all":
        with pytest.raises(NonFiniteError, match="attention"):
            lp.stacked_heads(model, batch, ablation=None)
        with pytest.raises(NonFiniteError, match="attention"):
            lp.stacking.hop_scores(model, batch)
    assert fingerprint(model) == before


def test_dominance_raises_when_attention_scores_are_nan():
    """NaN only in W_Q: the OV spectrum is finite, the attention scores are not."""
    model = lp.tiny_model(n_layers=1, n_heads=2, d_model=8, d_vocab=6, n_ctx=8, attn_only=True,
                          normalization=None, dtype=D64)
    _fill_nan(model, "attn.W_Q")
    assert all(bool(torch.isfinite(w).all()) for w in (model.W_V, model.W_O))
    with pytest.raises(NonFiniteError, match="attention"):
        lp.dominance(model, torch.tensor([[1, 2, 3, 4]]), progress=False)


# --------------------------------------------------------------------------- item 5
def test_label_outside_its_context_adds_no_edges_and_warns():
    X = [[0, 1, 2], [3, 1, 2], [0, 3, 2]]
    y = [1, 0, 3]  # sample 1: label 0 is not in [3, 1, 2]
    with pytest.warns(UserWarning, match="not in their own context"):
        tpg = lp.TokenPriorityGraph.from_data(X, y)
    assert tpg.excluded == (1,)
    # By hand, from samples 0 and 2 only (last token 2): 1 -> 0, 1 -> 2, 3 -> 0, 3 -> 2.
    assert sorted(tpg.graph(2).edges) == [(1, 0), (1, 2), (3, 0), (3, 2)]
    assert not tpg.graph(2).has_edge(0, 3) and not tpg.graph(2).has_edge(0, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clean = lp.TokenPriorityGraph.from_data([X[0], X[2]], [y[0], y[2]])
    assert clean.excluded == () and sorted(clean.graph(2).edges) == sorted(tpg.graph(2).edges)
    model = lp.priority_model(4, 6, seed=0)
    with pytest.raises(InputError, match="not in their own sequence"):
        lp.train_priority(model, X, y, steps=1, progress=False)


# --------------------------------------------------------------------------- item 11
def test_graph_svm_bounds_blas_threads_inside_the_solver(monkeypatch):
    import scipy.optimize
    from threadpoolctl import threadpool_info, threadpool_limits

    X, y = _cyclic_data()
    tpg = lp.TokenPriorityGraph.from_data(X, y)
    E = lp.priority_model(6, 8, seed=1).W_E.detach()
    seen = []
    nnls = scipy.optimize.nnls

    def spy(*args, **kw):
        seen.append({i["filepath"]: i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"})
        return nnls(*args, **kw)

    monkeypatch.setattr(scipy.optimize, "nnls", spy)
    with threadpool_limits(limits=2, user_api="blas"):  # what OpenBLAS picks on 2 cores
        outside = {i["filepath"]: i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}
        assert outside and set(outside.values()) == {2}
        ref = lp.graph_svm(tpg, E)
        assert seen and all(set(s.values()) == {1} for s in seen), seen
        after = {i["filepath"]: i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}
        assert after == outside  # restored
        seen.clear()
        free = lp.graph_svm(tpg, E, blas_threads=None)
        assert seen and all(set(s.values()) == {2} for s in seen), seen
    torch.testing.assert_close(free.W_svm, ref.W_svm, rtol=0, atol=1e-9)
    with pytest.raises(InputError, match="blas_threads"):
        lp.graph_svm(tpg, E, blas_threads=0)
