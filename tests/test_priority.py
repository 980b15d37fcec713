"""Token-priority graph, Graph-SVM, the one-layer model and alignment (Li et al. 2024).

Every expected value here comes from an independent computation written in the test:
hand-derived graphs and closed forms, brute-force reachability, a dense SLSQP solve of
the Graph-SVM, loop-based losses, and attention recomputed from the embeddings.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import lensprobe as lp
from lensprobe.tasks.priority import PriorityTask, priority_dataset


# --------------------------------------------------------------------------- helpers
def reach_matrix(n: int, edges: set[tuple[int, int]]) -> np.ndarray:
    """Brute-force reachability (Warshall) including the trivial path i ~> i."""
    R = np.eye(n, dtype=bool)
    for a, b in edges:
        R[a, b] = True
    for m in range(n):
        R = R | (R[:, [m]] & R[[m], :])
    return R


def brute_graph(X, y):
    """{k: (nodes, edges)} straight from the definition."""
    out = {}
    for seq, lab in zip(X, y):
        k = seq[-1]
        nodes, edges = out.setdefault(k, (set(), set()))
        nodes |= set(seq) | {lab}
        edges |= {(lab, t) for t in seq if t != lab}
    return out


def brute_sccs(nodes, edges):
    n = max(nodes) + 1
    R = reach_matrix(n, edges)
    return {frozenset(j for j in nodes if R[i, j] and R[j, i]) for i in nodes}, R


def loop_loss(W, E, X, y, keep=None):
    """Mean -log sum_{t: x_t=y} softmax_t(e_{x_t}^T W e_k) with plain Python loops."""
    total, n = 0.0, 0
    for seq, lab in zip(X, y):
        k = seq[-1]
        pos = [t for t in seq if keep is None or keep(k, lab, t)]
        if lab not in pos:
            continue
        s = [float(E[t] @ W @ E[k]) for t in pos]
        m = max(s)
        off = sum(math.exp(v - m) for v, t in zip(s, pos) if t != lab)
        on = sum(math.exp(v - m) for v, t in zip(s, pos) if t == lab)
        total += math.log1p(off / on)  # = -log(on / (on + off)), exact when off << on
        n += 1
    return total / n


def unit_embeddings(K, d, seed):
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(K, d, generator=g, dtype=torch.float64)
    return E / E.norm(dim=1, keepdim=True)


def cos(a, b):
    return float((a * b).sum() / (a.norm() * b.norm()))


# --------------------------------------------------------------------------- the graph
def test_tpg_edges_hand_derived():
    X = [[0, 1, 2, 3], [1, 2, 2, 3], [2, 0, 4]]
    y = [1, 2, 0]
    tpg = lp.TokenPriorityGraph.from_data(X, y)
    assert tpg.last_tokens == [3, 4]
    assert set(tpg.graph(3).edges) == {(1, 0), (1, 2), (1, 3), (2, 1), (2, 3)}
    assert set(tpg.graph(4).edges) == {(0, 2), (0, 4)}
    assert tpg.graph(3)[1][2]["count"] == 1
    # 1 <-> 2 is a cycle: SCC {1, 2} on top, then {0} and {3}
    assert tpg.sccs(3) == ((1, 2), (0,), (3,))
    assert tpg.levels(3) == (0, 1, 1)
    assert not tpg.is_acyclic
    df = tpg.to_dataframe()
    assert len(df) == 7 and df["same_scc"].sum() == 2
    # per last token, by hand: k=3 has nodes 0..3, 5 edges, SCCs {1,2},{0},{3} on 2 levels;
    # k=4 has nodes 0, 2, 4, edges 0->2, 0->4, three singleton SCCs on 2 levels
    table = tpg.last_token_table()
    assert table.to_dict("list") == dict(k=[3, 4], k_str=["3", "4"], nodes=[4, 3], edges=[5, 2],
                                         sccs=[3, 3], largest_scc=[2, 1], levels=[2, 2])
    assert tpg.summary() == dict(samples=3, last_tokens=2, edges=7, sccs=6, largest_scc=2,
                                 acyclic=False, excluded=0)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_sccs_and_levels_match_brute_force(seed):
    task = PriorityTask.random(9, 5, tie_size=3, seed=seed, last_tokens=[0, 4])
    X, y = priority_dataset(task, 40, seed=seed)
    tpg = lp.TokenPriorityGraph.from_data(X, y)
    ref = brute_graph(X.tolist(), y.tolist())
    assert set(tpg.last_tokens) == set(ref)
    for k, (nodes, edges) in ref.items():
        assert set(tpg.graph(k).nodes) == nodes and set(tpg.graph(k).edges) == edges
        comps, R = brute_sccs(nodes, edges)
        assert {frozenset(c) for c in tpg.sccs(k)} == comps
        lv = dict(zip(tpg.sccs(k), tpg.levels(k)))
        level_of = {t: lv[c] for c in tpg.sccs(k) for t in c}
        for a, b in edges:
            if not R[b, a]:  # a strictly outranks b
                assert level_of[a] < level_of[b]
        for c in tpg.sccs(k):
            # level 0 <=> nothing outside the SCC reaches it
            reached = any(R[u, c[0]] for u in nodes if u not in c)
            assert (lv[c] == 0) == (not reached)


def test_retrieval_hand_cases():
    # last token 9: 1 <-> 2 tied on top of 3; 5 and 6 incomparable (no path either way)
    X = [[1, 2, 3, 9], [2, 1, 3, 9], [5, 7, 9], [6, 8, 9]]
    y = [1, 2, 5, 6]
    tpg = lp.TokenPriorityGraph.from_data(X, y)
    r = tpg.retrieve([3, 1, 9])
    assert r.tokens == (1,) and r.status == "unique" and not r.tie
    r = tpg.retrieve([3, 2, 1, 9])
    assert r.tokens == (1, 2) and r.tie and not r.incomparable and r.status == "tie"
    r = tpg.retrieve([5, 6, 9])
    assert r.tokens == (5, 6) and r.incomparable and r.sccs == ((5,), (6,))
    r = tpg.retrieve([3, 4, 9])  # 3 and 9 are incomparable; 4 never seen with last token 9
    assert r.tokens == (3, 9) and r.incomparable and r.unranked == (4,)
    r = tpg.retrieve([3, 4, 1, 9])
    assert r.tokens == (1,) and r.unranked == (4,) and r.status == "unique"
    r = tpg.retrieve([1, 2, 8])
    assert not r.known and r.status == "unknown last token" and r.tokens == ()


@pytest.mark.parametrize("seed", [0, 1])
def test_retrieval_matches_brute_force(seed):
    task = PriorityTask.random(8, 5, tie_size=2, seed=seed, last_tokens=[1, 2])
    X, y = priority_dataset(task, 30, seed=seed)
    tpg = lp.TokenPriorityGraph.from_data(X, y)
    ref = brute_graph(X.tolist(), y.tolist())
    probe = torch.randint(0, 8, (50, 5), generator=torch.Generator().manual_seed(seed))
    probe[:, -1] = torch.tensor([1, 2] * 25)
    for seq in probe.tolist():
        nodes, edges = ref[seq[-1]]
        _, R = brute_sccs(nodes, edges)
        present = {t for t in seq if t in nodes}
        # t is retrieved iff no present u strictly outranks it
        want = {t for t in present if not any(R[u, t] and not R[t, u] for u in present)}
        assert set(tpg.retrieve(seq).tokens) == want


def test_task_generator_is_seeded_and_labels_follow_priority():
    task = PriorityTask.random(7, 6, tie_size=2, seed=3)
    a = task.sample(64, torch.Generator().manual_seed(5))
    b = task.sample(64, torch.Generator().manual_seed(5))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.targets, b.targets)
    assert (a.targets[:, :-1] == lp.tasks.IGNORE).all()
    for seq, lab in zip(a.tokens.tolist(), a.info["labels"].tolist()):
        groups = task.priority[seq[-1]]
        top = next(g for g in groups if set(g) & set(seq))
        assert lab in top and lab in seq
    acyc = PriorityTask.random(8, 6, tie_size=1, seed=0)
    X, y = priority_dataset(acyc, 200, seed=1)
    assert lp.TokenPriorityGraph.from_data(X, y).is_acyclic
    Xc, yc = priority_dataset(PriorityTask.random(6, 4, tie_size=3, seed=0), 6, require_cycle=True)
    assert not lp.TokenPriorityGraph.from_data(Xc, yc).is_acyclic
    with pytest.raises(lp.InputError, match="no draw"):
        priority_dataset(acyc, 5, require_cycle=True, max_tries=3)
    with pytest.raises(lp.InputError, match="partition"):
        PriorityTask(3, 4, {0: [[0, 1]]})


def test_tpg_bad_input():
    with pytest.raises(lp.InputError, match="labels"):
        lp.TokenPriorityGraph.from_data([[0, 1]], [0, 1])
    with pytest.raises(lp.InputError, match="empty"):
        lp.TokenPriorityGraph.from_data([], [])
    tpg = lp.TokenPriorityGraph.from_data([[0, 1]], [0])
    with pytest.raises(lp.InputError, match="ends in token 5"):
        tpg.graph(5)


# --------------------------------------------------------------------------- Graph-SVM
def test_graph_svm_closed_forms():
    E = torch.eye(5, dtype=torch.float64)
    # one edge 0 -> 2 for last token 3 (and 0 -> 3): w = W e_3 solves
    # min ||w|| s.t. (e0 - e2).w >= 1, (e0 - e3).w >= 1  =>  w = 2/3 e0 - 1/3 (e2 + e3)
    tpg = lp.TokenPriorityGraph.from_data([[0, 2, 3]], [0])
    svm = lp.graph_svm(tpg, E)
    want = torch.zeros(5, 5, dtype=torch.float64)
    want[:, 3] = torch.tensor([2 / 3, 0, -1 / 3, -1 / 3, 0])
    assert torch.allclose(svm.W_svm, want, atol=1e-9)
    assert svm.feasible and abs(svm.margin - 1) < 1e-9
    # a single edge 1 -> 4 with last token 4: w = (e1 - e4) / 2
    svm = lp.graph_svm(lp.TokenPriorityGraph.from_data([[1, 4]], [1]), E)
    want = torch.zeros(5, 5, dtype=torch.float64)
    want[1, 4], want[4, 4] = 0.5, -0.5
    assert torch.allclose(svm.W_svm, want, atol=1e-9)


def test_single_scc_graph_gives_zero_svm():
    # every last token's graph is one SCC: each token of the context is a label once
    X = [[0, 1, 2]] * 3 + [[1, 3]] * 2
    y = [0, 1, 2, 1, 3]
    tpg = lp.TokenPriorityGraph.from_data(X, y)
    assert all(len(tpg.sccs(k)) == 1 for k in tpg.last_tokens)
    svm = lp.graph_svm(tpg, unit_embeddings(4, 6, 0))
    assert svm.feasible and svm.n_cross == 0
    assert float(svm.W_svm.abs().max()) == 0.0
    # each token is the label once in the same context: uniform attention is optimal
    assert float(svm.W_fin.norm()) < 1e-8
    assert abs(svm.reduced_loss - (3 * math.log(3) + 2 * math.log(2)) / 5) < 1e-12


def _dense_svm(tpg, E):
    """The Graph-SVM as a dense QP over all d*d entries, solved by SLSQP in the test."""
    from scipy.optimize import minimize

    d = E.shape[1]
    En = E.numpy()
    ineq, eq = [], []
    for k in tpg.last_tokens:
        comps, _ = brute_sccs(set(tpg.graph(k).nodes), set(tpg.graph(k).edges))
        cid = {t: i for i, c in enumerate(comps) for t in c}
        for a, b in tpg.graph(k).edges:
            row = np.outer(En[a] - En[b], En[k]).ravel()
            (eq if cid[a] == cid[b] else ineq).append(row)
    if eq:  # SLSQP needs independent equality rows
        from scipy.linalg import orth

        eq = list(orth(np.array(eq).T).T)
    A_in = np.array(ineq)
    cons = [{"type": "ineq", "fun": lambda w: A_in @ w - 1, "jac": lambda w: A_in}]
    if eq:
        A_eq = np.array(eq)
        cons.append({"type": "eq", "fun": lambda w: A_eq @ w, "jac": lambda w: A_eq})
    res = minimize(lambda w: 0.5 * w @ w, np.zeros(d * d), jac=lambda w: w, constraints=cons,
                   method="SLSQP", options=dict(ftol=1e-14, maxiter=1000))
    assert res.success, res.message
    return torch.from_numpy(res.x.reshape(d, d))


@pytest.mark.parametrize("tie_size,seed", [(1, 0), (3, 1), (2, 2)])
def test_graph_svm_matches_dense_qp_and_is_orthogonal_to_fin_span(tie_size, seed):
    task = PriorityTask.random(6, 4, tie_size=tie_size, seed=seed, last_tokens=[0, 1, 2])
    X, y = priority_dataset(task, 12, seed=seed)
    tpg = lp.TokenPriorityGraph.from_data(X, y)
    E = unit_embeddings(6, 8, seed)
    svm = lp.graph_svm(tpg, E)
    assert torch.allclose(svm.W_svm, _dense_svm(tpg, E), atol=1e-6)
    # orthogonal to every within-SCC direction (e_i - e_j) e_k^T, all pairs of each SCC
    for k in tpg.last_tokens:
        comps, _ = brute_sccs(set(tpg.graph(k).nodes), set(tpg.graph(k).edges))
        for c in comps:
            for i, j in itertools.combinations(sorted(c), 2):
                assert abs(float((E[i] - E[j]) @ svm.W_svm @ E[k])) < 1e-10


def test_w_fin_matches_independent_minimiser():
    from scipy.optimize import minimize

    X, y = priority_dataset(PriorityTask.random(6, 4, tie_size=3, seed=0), 6, require_cycle=True)
    tpg = lp.TokenPriorityGraph.from_data(X, y)
    E = unit_embeddings(6, 8, 1)
    svm = lp.graph_svm(tpg, E)
    Xl, yl = X.tolist(), y.tolist()
    comps = {}
    dirs = []
    for k, (nodes, edges) in brute_graph(Xl, yl).items():
        cs, _ = brute_sccs(nodes, edges)
        comps[k] = {t: c for c in cs for t in c}
        for c in cs:
            c = sorted(c)
            dirs += [torch.outer(E[t] - E[c[0]], E[k]) for t in c[1:]]
    assert dirs, "the dataset must have a cycle"
    keep = lambda k, lab, t: t in comps[k][lab]  # noqa: E731
    D = torch.stack(dirs)

    def f(c):
        return loop_loss(torch.einsum("r,rij->ij", torch.from_numpy(c), D), E, Xl, yl, keep)

    res = minimize(f, np.zeros(len(dirs)), method="Nelder-Mead",
                   options=dict(xatol=1e-10, fatol=1e-14, maxiter=20000))
    W_ref = torch.einsum("r,rij->ij", torch.from_numpy(res.x), D)
    assert abs(svm.reduced_loss - f(res.x)) < 1e-9
    assert torch.allclose(svm.W_fin, W_ref, atol=1e-4)
    # W_fin lies in the within-SCC span: projecting onto the span changes nothing
    assert torch.allclose(svm.project_fin(svm.W_fin), svm.W_fin, atol=1e-12)


def test_graph_svm_reports_infeasibility():
    E = unit_embeddings(4, 6, 0)
    E[2] = E[1]  # tokens 1 and 2 look identical to any W ...
    tpg = lp.TokenPriorityGraph.from_data([[1, 2, 3]], [1])  # ... but 1 must outrank 2
    with pytest.raises(lp.InfeasibleError, match="infeasible.*linearly dependent"):
        lp.graph_svm(tpg, E)
    svm = lp.graph_svm(tpg, E, require_feasible=False)
    assert not svm.feasible and "infeasible" in svm.message
    assert float(svm.W_svm.abs().max()) == 0.0
    with pytest.raises(lp.InputError, match="rows"):
        lp.graph_svm(tpg, E[:2])


# --------------------------------------------------------------------------- the model
@pytest.mark.parametrize("layer,head", [(0, 1), (1, 0)])
def test_head_W_convention_against_attention_pattern(tiny, layer, head):
    model = tiny(normalization=None, positional="none", attn_only=True)
    toks = torch.randint(0, 12, (2, 7), generator=torch.Generator().manual_seed(0))
    W = lp.head_W(model, layer, head)
    assert not torch.allclose(W, W.T)  # a transpose slip would show
    name_x, name_p = f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.attn.hook_pattern"
    with lp.guard(model):
        acts = lp.run_hooked(model, toks, [name_x, name_p])
    x, pat = acts[name_x].double(), acts[name_p][:, head].double()
    for T in range(7):
        s = torch.softmax(torch.einsum("btd,de,be->bt", x[:, : T + 1], W, x[:, T]), -1)
        assert torch.allclose(s, pat[:, T, : T + 1], atol=1e-10)


def test_priority_model_is_the_papers_model():
    model = lp.priority_model(6, 8, seed=2)
    E = model.W_E.detach().double()
    assert torch.allclose(E.norm(dim=1), torch.ones(6, dtype=torch.float64))
    assert float(model.W_pos.abs().max()) == 0.0
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0].numel() == 64
    with torch.no_grad():
        trainable[0].copy_(torch.randn(trainable[0].shape, generator=torch.Generator().manual_seed(0)))
    W = lp.head_W(model)
    X = torch.tensor([[0, 3, 3, 5, 1], [2, 2, 4, 0, 5]])
    with lp.guard(model):
        pat = lp.run_hooked(model, X, ["blocks.0.attn.hook_pattern"])["blocks.0.attn.hook_pattern"]
    s = torch.softmax(torch.einsum("btd,de,be->bt", E[X], W, E[X[:, -1]]), -1)
    assert torch.allclose(pat[:, 0, -1], s, atol=1e-12)
    y = torch.tensor([3, 4])
    batch = lp.tasks.FixedData(X, y).sample(2, torch.Generator())
    loss, metrics = lp.priority_loss(model, batch)
    assert abs(float(loss.detach()) - loop_loss(W, E, X.tolist(), y.tolist())) < 1e-12
    # far into training p(y) rounds to 1; the loss must keep the tiny off-label mass
    onehot = torch.eye(8, dtype=torch.float64)[:6]
    model = lp.priority_model(6, 8, embeddings=onehot)
    (wk,) = [p for p in model.parameters() if p.requires_grad]
    M = torch.zeros(8, 8, dtype=torch.float64)
    M[3, 1] = M[1, 3] = M[4, 5] = M[5, 4] = 120.0  # symmetric: no layout question
    with torch.no_grad():
        wk.copy_(M.reshape(wk.shape))
    W = lp.head_W(model)
    ref = loop_loss(W, onehot, X.tolist(), y.tolist())
    got = float(lp.priority_loss(model, batch)[0].detach())
    assert 0 < ref < 1e-15 and abs(got - ref) <= 1e-6 * ref


# --------------------------------------------------------------------------- training checks
@pytest.fixture(scope="module")
def acyclic_run():
    task = PriorityTask.random(8, 6, tie_size=1, seed=0)
    X, y = priority_dataset(task, 4, seed=0)
    model = lp.priority_model(8, 8, seed=1)
    res = lp.train_priority(model, X, y, steps=1500, lr=0.5, progress=False,
                            checkpoint_steps=[0, 50, 1500])
    return X, y, model, res


@pytest.fixture(scope="module")
def cyclic_run():
    task = PriorityTask.random(6, 4, tie_size=3, seed=0)
    X, y = priority_dataset(task, 6, seed=0, require_cycle=True)
    model = lp.priority_model(6, 8, seed=1)
    res = lp.train_priority(model, X, y, steps=1500, lr=0.5, progress=False)
    return X, y, model, res


def test_acyclic_training_converges_to_graph_svm(acyclic_run):
    X, y, model, _ = acyclic_run
    tpg = lp.TokenPriorityGraph.from_data(X, y)
    assert tpg.is_acyclic
    E = model.W_E.detach().double()
    W_ref = _dense_svm(tpg, E)
    W = lp.head_W(model)
    assert cos(W, W_ref) >= 0.99
    with lp.guard(model):
        pat = lp.run_hooked(model, X, ["blocks.0.attn.hook_pattern"])["blocks.0.attn.hook_pattern"]
    on_label = (pat[:, 0, -1] * (X == y[:, None])).sum(-1)
    assert float(on_label.min()) > 0.999


def test_cyclic_training_converges_to_svm_plus_fin(cyclic_run):
    X, y, model, res = cyclic_run
    tpg = lp.TokenPriorityGraph.from_data(X, y)
    assert not tpg.is_acyclic
    E = model.W_E.detach().double()
    svm = lp.graph_svm(tpg, E)
    W = lp.head_W(model)
    assert cos(W, _dense_svm(tpg, E)) >= 0.97
    # projection onto the within-SCC span, built here from brute-force SCCs
    dirs = []
    for k, (nodes, edges) in brute_graph(X.tolist(), y.tolist()).items():
        for c in brute_sccs(nodes, edges)[0]:
            c = sorted(c)
            dirs += [torch.outer(E[t] - E[c[0]], E[k]).reshape(-1) for t in c[1:]]
    Q, _ = torch.linalg.qr(torch.stack(dirs).T)
    P_W = (Q @ (Q.T @ W.reshape(-1))).reshape(8, 8)
    assert float((P_W - svm.W_fin).norm()) <= 0.01
    final = loop_loss(W, E, X.tolist(), y.tolist())
    assert abs(final - svm.reduced_loss) <= 1e-3
    assert abs(res.final["eval_loss"] - final) < 1e-9


# --------------------------------------------------------------------------- alignment
def test_alignment_on_trained_cyclic_model(cyclic_run, fingerprint):
    X, y, model, _ = cyclic_run
    tpg = lp.TokenPriorityGraph.from_data(X, y)
    before = fingerprint(model)
    al = lp.priority_alignment(model, tpg)
    assert fingerprint(model) == before
    E = model.W_E.detach().double()
    W = lp.head_W(model)
    svm = lp.graph_svm(tpg, E)
    assert abs(al.cos_svm - cos(W, svm.W_svm)) < 1e-12
    P = svm.project_fin(W)
    assert abs(al.cos_orth_svm - cos(W - P, svm.W_svm)) < 1e-12
    assert al.cos_orth_svm >= al.cos_svm - 1e-9
    # attention recomputed from the embeddings
    for i, (seq, lab) in enumerate(zip(X.tolist(), y.tolist())):
        k = seq[-1]
        s = torch.softmax(torch.tensor([float(E[t] @ W @ E[k]) for t in seq], dtype=torch.float64), 0)
        ret = tpg.retrieve(seq).tokens
        assert abs(float(al.retrieved_mass[i]) - sum(float(s[j]) for j, t in enumerate(seq) if t in ret)) < 1e-9
        assert abs(float(al.label_mass[i]) - sum(float(s[j]) for j, t in enumerate(seq) if t == lab)) < 1e-9
        if len(ret) > 1:
            assert float(al.split_error[i]) < 0.01  # soft composition follows W_fin
    assert al.retrieved_mass.min() > 0.99
    assert al.edge_recall == 1.0 and al.edge_precision == 1.0
    df = al.to_dataframe()
    assert len(df) == len(X)
    assert set(al.edges_dataframe()["status"]) <= {"agree", "implied"}


def test_local_graph_brute_force_on_a_generic_model(tiny, fingerprint):
    """Any model, any head, any data: the head's edges follow the definition."""
    model = tiny(n_layers=2, n_heads=2, d_model=16, d_vocab=12)
    g = torch.Generator().manual_seed(4)
    X = torch.randint(0, 12, (20, 6), generator=g)
    X[:, -1] = torch.tensor([3, 7] * 10)
    y = X[torch.arange(20), torch.randint(0, 5, (20,), generator=g)]
    tpg = lp.TokenPriorityGraph.from_data(X, y, n_tokens=12)
    before = fingerprint(model)
    al = lp.priority_alignment(model, tpg, layer=1, head=1, threshold=0.2)
    assert fingerprint(model) == before
    with lp.guard(model):
        pat = lp.run_hooked(model, X, ["blocks.1.attn.hook_pattern"])["blocks.1.attn.hook_pattern"]
    model_edges, tested = set(), set()
    for i, seq in enumerate(X.tolist()):
        mass = {}
        for t, a in zip(seq, pat[i, 1, -1].tolist()):
            mass[t] = mass.get(t, 0.0) + a
        ret = {t for t, m in mass.items() if m > 0.2}
        assert set(al.model_retrieved[i]) == ret
        model_edges |= {(seq[-1], a, b) for a in ret for b in set(seq) if a != b}
        tested |= {(seq[-1], a, b) for a in set(seq) for b in set(seq) if a != b}
    status = {(k, a, b): s for k, a, b, s in al.edges}
    data = {(k, a, b) for k in tpg.last_tokens for a, b in tpg.graph(k).edges}
    for e in data:
        assert status[e] == ("agree" if e in model_edges else "missed")
    for e in model_edges - data:
        k, a, b = e
        _, R = brute_sccs(set(tpg.graph(k).nodes), set(tpg.graph(k).edges))
        inside = a in tpg.graph(k) and b in tpg.graph(k)
        want = "implied" if inside and R[a, b] else "reversed" if inside and R[b, a] else "unsupported"
        assert status[e] == want
    assert math.isfinite(al.cos_svm) or not al.feasible


def test_alignment_guard_on_error_and_bad_input(tiny, fingerprint):
    model = tiny(n_layers=1, d_vocab=12)
    tpg = lp.TokenPriorityGraph.from_data([[0, 1, 2]], [1])
    before = fingerprint(model)
    with pytest.raises(lp.InputError, match="token ids"):  # raises inside the guard
        lp.priority_alignment(model, tpg, [[0, 1, 99]])
    assert fingerprint(model) == before
    with pytest.raises(lp.InputError, match="threshold"):
        lp.priority_alignment(model, tpg, threshold=1.5)
    with pytest.raises(lp.InputError, match="layer"):
        lp.priority_alignment(model, tpg, layer=3)
    with pytest.raises(lp.InputError, match="dimension"):
        lp.priority_alignment(model, tpg, embeddings=torch.eye(12, 5))
    assert fingerprint(model) == before


def test_alignment_curve_from_training(acyclic_run):
    X, y, model, res = acyclic_run
    tpg = lp.TokenPriorityGraph.from_data(X, y)
    curve = lp.alignment_curve(res, tpg, progress=False)
    assert curve.steps.tolist() == [0, 50, 1500]
    # step 0: W = 0, uniform attention -> label mass = (#label occurrences) / T
    uniform = ((X == y[:, None]).sum(1).double() / X.shape[1]).mean()
    assert abs(float(curve["label_mass"][0]) - float(uniform)) < 1e-12
    assert math.isnan(float(curve["cos_svm"][0]))
    assert float(curve["cos_svm"][2]) >= 0.99 and float(curve["label_mass"][2]) > 0.999
    assert curve["W_norm"][1] < curve["W_norm"][2]
    assert len(curve.to_dataframe()) == 3


def test_results_render(cyclic_run):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    X, y, model, _ = cyclic_run
    vocab = ["<b>", "t&1", "t2", '"q"', "t4", "</script>"]
    tpg = lp.TokenPriorityGraph.from_data(X, y, vocab=vocab)
    al = lp.priority_alignment(model, tpg)
    for fig in (al.plot(), tpg.plot(), al.svm.plot()):
        assert isinstance(fig, matplotlib.figure.Figure)
        plt.close(fig)
    html = al.show().to_html()
    n_nodes = sum(g.number_of_nodes() for g in tpg.graphs.values())
    n_data = sum(g.number_of_edges() for g in tpg.graphs.values())
    n_model = sum(1 for e in al.edges if e[3] in ("agree", "implied", "reversed", "unsupported"))
    assert html.count('class="lp-node"') == n_nodes
    assert html.count('data-kind="data"') == n_data
    assert html.count('data-kind="model"') == n_model
    assert "&lt;/script&gt;" in html and html.count("</script>") == html.count("<script>")
    assert "&lt;b&gt;" in html and "t&amp;1" in html and "&quot;q&quot;" in html
    assert "<b>" not in html
    assert len(al.svm.to_dataframe()) == al.svm.n_cross + al.svm.n_within


def test_alignment_on_mixed_lengths_and_plain_graph_view(cyclic_run):
    X, y, model, _ = cyclic_run
    tpg = lp.TokenPriorityGraph.from_data(X, y)
    seqs = [X[0].tolist(), X[1].tolist()[1:], [5, 0, 1, 2, 3, 4, 2]]
    al = lp.priority_alignment(model, tpg, seqs)
    assert al.labels is None and bool(torch.isnan(al.label_mass).all())
    E, W = model.W_E.detach().double(), lp.head_W(model)
    for i, seq in enumerate(seqs):
        s = torch.softmax(torch.stack([E[t] @ W @ E[seq[-1]] for t in seq]), 0)
        ret = tpg.retrieve(seq).tokens
        want = sum(float(s[j]) for j, t in enumerate(seq) if t in ret)
        assert abs(float(al.retrieved_mass[i]) - want) < 1e-9
    html = tpg.show(svm=al.svm).to_html()
    assert html.count('class="lp-node"') == sum(g.number_of_nodes() for g in tpg.graphs.values())
    assert 'data-kind="model"' not in html and "w=" in html


# --------------------------------------------------------------------------- renamed keywords
def test_graph_svm_dataframe_needs_no_graph(cyclic_run):
    X, y, model, _ = cyclic_run
    tpg = lp.TokenPriorityGraph.from_data(X, y)
    svm = lp.graph_svm(tpg, model)
    df = svm.to_dataframe()
    E = model.W_E.detach().double()
    want = {(k, a, b, kind): float((E[a] - E[b]) @ svm.W_svm @ E[k])
            for k in tpg.last_tokens
            for kind, pairs in (("margin", tpg.cross_pairs(k)), ("equal", tpg.within_pairs(k)))
            for a, b in pairs}
    got = {(r.k, r.src, r.dst, r.kind): r.svm_value for r in df.itertuples()}
    assert got.keys() == want.keys()
    assert all(abs(got[key] - want[key]) < 1e-12 for key in want)
    with pytest.warns(DeprecationWarning, match="no argument"):
        old = svm.to_dataframe(tpg)
    assert old.equals(df)


@pytest.mark.parametrize("method,kw", [
    ("graph", {}), ("sccs", {}), ("levels", {}), ("scc_index", {}), ("outranks", dict(a=1, b=0)),
    ("within_pairs", {}), ("cross_pairs", {}),
])
def test_old_k_keyword_of_graph_methods(method, kw):
    X = [[0, 1, 2, 3], [1, 2, 2, 3], [2, 0, 4]]
    tpg = lp.TokenPriorityGraph.from_data(X, [1, 2, 0])
    fn = getattr(tpg, method)
    new = fn(last_token=3, **kw)
    with pytest.warns(DeprecationWarning, match="last_token"):
        old = fn(k=3, **kw)
    assert old == new and fn(3, *kw.values()) == new
    with pytest.raises(lp.InputError, match="last_token= only"):
        fn(k=3, last_token=3, **kw)


def test_old_k_keyword_of_fin_scores_and_task_rank():
    X, y = priority_dataset(PriorityTask.random(6, 4, tie_size=3, seed=0), 6, require_cycle=True)
    svm = lp.graph_svm(lp.TokenPriorityGraph.from_data(X, y), unit_embeddings(6, 8, 0))
    with pytest.warns(DeprecationWarning, match="last_token"):
        old = svm.fin_scores(k=int(X[0, -1]), tokens=[0, 1, 2])
    assert torch.equal(old, svm.fin_scores(int(X[0, -1]), [0, 1, 2]))
    task = PriorityTask.random(5, 3, seed=1)
    with pytest.warns(DeprecationWarning, match="last_token"):
        assert task.rank(k=2) == task.rank(2)


def test_old_sequences_keyword(cyclic_run):
    X, y, model, _ = cyclic_run
    tpg = lp.TokenPriorityGraph.from_data(X, y)
    new = lp.priority_alignment(model, tpg, tokens=X[:3], labels=y[:3])
    with pytest.warns(DeprecationWarning, match="tokens="):
        old = lp.priority_alignment(model, tpg, sequences=X[:3], labels=y[:3])
    assert old.summary() == new.summary() and old.edges == new.edges
    with pytest.warns(DeprecationWarning, match="tokens="):
        curve = lp.alignment_curve([model], tpg, sequences=X[:3], labels=y[:3], progress=False)
    assert float(curve["label_mass"][0]) == new.summary()["label_mass"]
    m1, m2 = lp.priority_model(6, 8, seed=1), lp.priority_model(6, 8, seed=1)
    r1 = lp.train_priority(m1, X, y, steps=5, lr=0.5, progress=False)
    with pytest.warns(DeprecationWarning, match="tokens="):
        r2 = lp.train_priority(m2, sequences=X, labels=y, steps=5, lr=0.5, progress=False)
    assert torch.equal(lp.head_W(m1), lp.head_W(m2))
    assert r1.final["eval_loss"] == r2.final["eval_loss"]


def test_alignment_curve_takes_every_checkpoint_form(acyclic_run):
    """A TrainResult, a {step: model} mapping and a list with steps give the same curve."""
    X, y, model, res = acyclic_run
    tpg = lp.TokenPriorityGraph.from_data(X, y)
    ref = lp.alignment_curve(res, tpg, progress=False)
    steps = sorted(res.checkpoints)
    models = [res.model_at(s) for s in steps]
    by_dict = lp.alignment_curve(dict(zip(reversed(steps), reversed(models))), tpg, progress=False)
    by_list = lp.alignment_curve(models, tpg, steps=steps, progress=False)
    for curve in (by_dict, by_list):
        assert curve.steps.tolist() == steps
        for k, v in ref.values.items():
            assert torch.equal(v.isnan(), curve[k].isnan())
            assert torch.equal(v.nan_to_num(), curve[k].nan_to_num()), k
    with pytest.raises(lp.InputError, match="steps"):
        lp.alignment_curve(models, tpg, steps=[0, 1], progress=False)


def test_the_task_module_does_not_import_the_analysis_module():
    """Layering: tasks.priority (data) never imports lensprobe.priority (analysis)."""
    import subprocess
    import sys

    code = ("import sys, lensprobe.tasks.priority as t;"
            " t.priority_dataset(t.PriorityTask.random(6, 4, tie_size=3), 6, require_cycle=True);"
            " print('lensprobe.priority' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
