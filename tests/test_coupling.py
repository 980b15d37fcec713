"""Block Jacobians, coupling metrics, trajectories (Aubry et al., ICLR 2025).

Oracles written plainly here, independent of lensprobe.core / lensprobe.coupling:
* the reference method: per (layer, t2), d scalar backward passes through the block on the
  whole sequence (model.run_with_hooks with our own hooks), keeping the t1 slice;
* central finite differences in float64;
* numpy SVD and Python loops over pairs for every coupling variant;
* numpy loops for the trajectory formulas.
"""

from __future__ import annotations

import copy
import math
import types

import numpy as np
import pytest
import torch

import lensprobe as lp
import lensprobe.coupling as lpc
from lensprobe.errors import InputError, LensprobeError

N_POS = 6


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one torch thread is faster, and on a loaded 2-core machine two OpenMP
    threads made small ops 10-50x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------ plain oracles
def _resid_pre(model, toks, layer):
    got = {}

    def cap(act, hook):
        got["x"] = act.detach().clone()
        return act

    with torch.no_grad():
        model.run_with_hooks(toks, fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", cap)])
    return got["x"]


def _block_out(model, toks, layer, x):
    """f^l(x) = resid_post - x with x written into resid_pre (plain run_with_hooks)."""
    got = {}

    def inject(act, hook):
        return x

    def cap(act, hook):
        got["y"] = act
        return act

    model.run_with_hooks(
        toks,
        fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", inject),
                   (f"blocks.{layer}.hook_resid_post", cap)],
    )
    return got["y"] - x


def reference_rows(model, toks, layer, outputs):
    """The reference method: for each (b, t2) in ``outputs``, d backward passes through the
    block on the whole sequence, one per output coordinate of token t2. Returns
    {(b, t2): [pos (t1), d (i), d (j)]} with [t1, i, j] = d f(X)_{t2}[i] / d x_{t1}[j]."""
    x = _resid_pre(model, toks, layer).requires_grad_(True)
    y = _block_out(model, toks, layer, x)
    d = x.shape[-1]
    out = {}
    for b, t2 in outputs:
        rows = [torch.autograd.grad(y[b, t2, i], x, retain_graph=True)[0][b] for i in range(d)]
        out[b, t2] = torch.stack(rows, dim=1)
    return out


def reference_jacobian(model, toks, layer, t1, t2, b=0):
    return reference_rows(model, toks, layer, [(b, t2)])[b, t2][t1]


def fd_jacobian(model, toks, layer, t1, t2, b=0, h=1e-6):
    x = _resid_pre(model, toks, layer)
    d = x.shape[-1]
    cols = []
    with torch.no_grad():
        for j in range(d):
            xp, xm = x.clone(), x.clone()
            xp[b, t1, j] += h
            xm[b, t1, j] -= h
            cols.append((_block_out(model, toks, layer, xp)[b, t2]
                         - _block_out(model, toks, layer, xm)[b, t2]) / (2 * h))
    return torch.stack(cols, dim=1)


def dense_m(J1, J2, K, variant="frob"):
    """m_K written out with numpy, straight from the paper's formula."""
    J1, J2 = np.asarray(J1, dtype=np.float64), np.asarray(J2, dtype=np.float64)
    U2, _, V2t = np.linalg.svd(J2)
    s1 = np.linalg.svd(J1, compute_uv=False)[:K]
    U2K, V2K = U2[:, :K], V2t[:K].T
    M = V2K.T @ J1 @ U2K if variant == "swap" else U2K.T @ J1 @ V2K
    num = np.linalg.norm(np.abs(M) - np.diag(s1), "fro")
    den = s1.sum() if variant == "trace" else np.sqrt((s1 ** 2).sum())
    return num / den


def _toks(model, batch=2, n=N_POS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.d_vocab, (batch, n), generator=g)


def _tol(opts):
    """float64 agreement expected between two exact methods. Looser where TL 4.x bridges
    compute in float32 inside a float64 model (RMS norm) or use float32-built rotary
    tables (the separable method assumes exactly orthogonal rotations)."""
    return 1e-6 if opts.get("positional") == "rotary" or opts.get("normalization") == "RMS" else 1e-10


def _rel(a, b):
    return float((a - b).norm() / b.norm())


CONFIGS = [
    dict(),
    dict(positional="rotary", normalization="RMS"),
    dict(attn_only=True, n_layers=3),
    dict(normalization=None, positional="none", act_fn="relu"),
]


# ------------------------------------------------------------------ Jacobians
@pytest.mark.parametrize("opts", CONFIGS, ids=["ln", "rotary-rms", "attn-only", "nonorm-nope"])
def test_diagonal_jacobians_equal_reference(tiny, opts):
    model = tiny(**opts)
    toks = _toks(model)
    res = lp.block_jacobians(model, toks, progress=False)
    assert res.method == "separable"
    assert res.jacobians.shape == (2, model.cfg.n_layers, N_POS, 16, 16)
    tol = _tol(opts)
    outputs = [(0, 0), (1, 2), (0, 5), (1, 5)]
    for l in range(model.cfg.n_layers):
        ref = reference_rows(model, toks, l, outputs)
        for b, t in outputs:
            assert _rel(res[l, t][b], ref[b, t][t]) < tol, (l, t, b)
    # the per-token method equals the reference everywhere, to rounding
    slow = lp.block_jacobians(model, toks, layers=[-1], positions=[1, 4], method="per_token",
                              progress=False)
    assert slow.method == "per_token"
    assert _rel(slow.jacobians[:, 0], res.jacobians[:, -1, [1, 4]]) < tol


@pytest.mark.parametrize("opts", [dict(), dict(positional="rotary")], ids=["ln", "rotary"])
def test_jacobians_match_finite_differences(tiny, opts):
    # (RMS norm on TL 4.x bridges runs in float32 even in a float64 model, so float64
    # finite differences are only meaningful with LayerNorm there.)
    model = tiny(**opts)
    toks = _toks(model, batch=1)
    diag = lp.block_jacobians(model, toks, positions=[4], progress=False)
    fin = lp.block_jacobians(model, toks, layers=[0], input_token=1, progress=False)
    fout = lp.block_jacobians(model, toks, layers=[1], output_token=4, progress=False)
    tol = 1e-6 if opts else 1e-7  # see _tol
    for l in range(2):
        assert _rel(diag[l, 4][0], fd_jacobian(model, toks, l, 4, 4)) < tol
    assert _rel(fin[0, 3][0], fd_jacobian(model, toks, 0, 1, 3)) < 1e-7
    assert _rel(fout[1, 2][0], fd_jacobian(model, toks, 1, 2, 4)) < 1e-7


@pytest.mark.parametrize("opts", CONFIGS[:2], ids=["ln", "rotary-rms"])
def test_cross_token_jacobians_equal_reference(tiny, opts):
    model = tiny(**opts)
    toks = _toks(model)
    fin = lp.block_jacobians(model, toks, input_token=2, progress=False)
    fout = lp.block_jacobians(model, toks, layers=[1], output_token=-1, positions=[0, 2, 5],
                              progress=False)
    assert fin.kind == "fixed_input" and fin.token == 2 and fin.positions == tuple(range(N_POS))
    assert fout.kind == "fixed_output" and fout.token == 5 and fout.jacobians.shape[1:3] == (1, 3)
    for l in range(2):
        ref = reference_rows(model, toks, l, [(1, t2) for t2 in (0, 1, 3, 5)] + [(0, 5)])
        for t2 in (0, 1, 3, 5):
            if t2 < 2:  # causal: output t2 cannot see input 2
                assert ref[1, t2][2].abs().max() == 0 and fin[l, t2][1].abs().max() == 0
            else:
                assert _rel(fin[l, t2][1], ref[1, t2][2]) < _tol(opts)
        if l == 1:
            for t1 in (0, 2, 5):
                assert _rel(fout[1, t1][0], ref[0, 5][t1]) < _tol(opts)


def test_chunking_and_memory_bound_do_not_change_results(tiny):
    model = tiny()
    toks = _toks(model)
    a = lp.block_jacobians(model, toks, layers=[1], progress=False)
    b = lp.block_jacobians(model, toks, layers=[1], chunk_size=3, progress=False)
    c = lp.block_jacobians(model, toks, layers=[1], max_memory_mb=0.05, progress=False)
    d = lp.block_jacobians(model, toks, layers=[1], output_token=3, chunk_size=5, progress=False)
    assert torch.equal(a.jacobians, b.jacobians) or _rel(a.jacobians, b.jacobians) < 1e-13
    assert _rel(a.jacobians, c.jacobians) < 1e-13
    assert _rel(d.jacobians[:, :, 3], a.jacobians[:, :, 3]) < 1e-12
    e = lp.block_jacobians(model, toks, layers=[1], input_token=2, max_memory_mb=0.05, progress=False)
    f = lp.block_jacobians(model, toks, layers=[1], input_token=2, progress=False)
    assert _rel(e.jacobians, f.jacobians) < 1e-13 and _rel(e.jacobians[:, :, 2], a.jacobians[:, :, 2]) < 1e-12
    # every prompt is computed on its own forward pass: batching changes nothing
    single = lp.block_jacobians(model, toks[1:], layers=[1], progress=False)
    assert _rel(single.jacobians[0], a.jacobians[1]) < 1e-12


def test_separable_check_catches_a_wrong_surgery(tiny, monkeypatch, fingerprint):
    model = tiny()
    toks = _toks(model, batch=1)
    # A wrong score scale makes the zero-valued key path carry the wrong gradient.
    monkeypatch.setattr(lp._tl, "attn_scale", lambda m, l: 1.0)
    before = fingerprint(model)
    with pytest.warns(UserWarning, match="per-token"):
        res = lp.block_jacobians(model, toks, progress=False)
    assert res.method == "per_token"
    assert _rel(res[1, 4][0], reference_jacobian(model, toks, 1, 4, 4)) < 1e-10
    with pytest.raises(LensprobeError, match="per_token"):
        lp.block_jacobians(model, toks, method="separable", progress=False)
    assert fingerprint(model) == before


def test_block_jacobians_float32_model():
    model = lp.tiny_model(n_layers=2, n_heads=2, d_model=16, d_vocab=12, n_ctx=16, seed=3)
    toks = _toks(model)
    res = lp.block_jacobians(model, toks, progress=False)
    assert res.jacobians.dtype == torch.float32 and res.method == "separable"
    m64 = copy.deepcopy(model).to(torch.float64)
    ref = lp.block_jacobians(m64, toks, progress=False)
    assert _rel(res.jacobians.double(), ref.jacobians) < 1e-5


def test_block_jacobians_input_errors(tiny):
    model = tiny()
    toks = _toks(model)
    with pytest.raises(InputError, match="not both"):
        lp.block_jacobians(model, toks, input_token=0, output_token=1)
    with pytest.raises(InputError, match="method"):
        lp.block_jacobians(model, toks, method="fast")
    with pytest.raises(InputError, match="out of range"):
        lp.block_jacobians(model, toks, positions=[N_POS])
    with pytest.raises(InputError, match="out of range"):
        lp.block_jacobians(model, toks, layers=[5])
    with pytest.raises(InputError, match="out of range"):
        lp.block_jacobians(model, toks, output_token=-7)
    with pytest.raises(InputError, match="empty"):
        lp.block_jacobians(model, toks, positions=[])
    with pytest.raises(InputError, match="integers"):
        lp.block_jacobians(model, toks.double())
    with pytest.raises(lp.ModelError):
        lp.block_jacobians(torch.nn.Linear(2, 2), toks)


# ------------------------------------------------------------------ the metric
def test_metric_zero_on_itself_and_near_one_for_independent_gaussians():
    g = torch.Generator().manual_seed(0)
    J = torch.randn(64, 64, generator=g, dtype=torch.float64)
    assert float(lp.coupling_metric(J, J, top_k=10)) < 1e-12
    for v in ("frob", "trace"):
        assert float(lp.coupling_metric(J, J, top_k=[5, 16], variant=v).max()) < 1e-12
    # swapping U and V of a non-symmetric matrix does not give m = 0
    assert float(lp.coupling_metric(J, J, top_k=10, variant="swap")) > 0.5
    ms = []
    for _ in range(3):
        A = torch.randn(128, 128, generator=g, dtype=torch.float64)
        B = torch.randn(128, 128, generator=g, dtype=torch.float64)
        ms.append(float(lp.coupling_metric(A, B, top_k=10)))
    assert 0.9 < np.mean(ms) < 1.1, ms
    # coupling 1 - m^2 of unrelated matrices is near zero, of a matrix with itself one
    assert abs(1 - np.mean(ms) ** 2) < 0.2


def test_swap_variant_zero_for_symmetric_psd():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(20, 20, generator=g, dtype=torch.float64)
    S = A @ A.T  # symmetric PSD: U = V, so swapping them changes nothing
    assert float(lp.coupling_metric(S, S, top_k=5, variant="swap")) < 1e-10


def test_metric_invariant_to_paired_and_one_sided_sign_flips():
    g = torch.Generator().manual_seed(2)
    J1 = torch.randn(24, 24, generator=g, dtype=torch.float64)
    J2 = torch.randn(24, 24, generator=g, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(J2)
    flip = torch.ones(24, dtype=torch.float64)
    flip[[0, 3, 5]] = -1
    # paired flips (u_i, v_i) -> (-u_i, -v_i) leave J2 itself unchanged
    J2_paired = (U * flip) @ torch.diag(S) @ (Vh * flip[:, None])
    assert torch.allclose(J2_paired, J2)
    # one-sided flips give a different matrix with the same singular subspaces up to sign
    J2_one = (U * flip) @ torch.diag(S) @ Vh
    assert not torch.allclose(J2_one, J2)
    base = lp.coupling_metric(J1, J2, top_k=[4, 8])
    assert torch.allclose(lp.coupling_metric(J1, J2_one, top_k=[4, 8]), base, atol=1e-12)
    for v in ("frob", "trace", "swap"):
        for K in (4, 8):
            assert abs(float(lp.coupling_metric(J1, J2, top_k=K, variant=v))
                       - dense_m(J1, J2, K, v)) < 1e-10
    # and the numpy oracle itself does not care about the signs the SVD returned
    U2, s2, V2t = np.linalg.svd(J2.numpy())
    f = flip.numpy()
    M = (U2 * f)[:, :8].T @ J1.numpy() @ (V2t.T * f)[:, :8]
    s1 = np.linalg.svd(J1.numpy(), compute_uv=False)[:8]
    alt = np.linalg.norm(np.abs(M) - np.diag(s1)) / np.linalg.norm(s1)
    assert abs(alt - dense_m(J1, J2, 8)) < 1e-12


def test_metric_errors():
    J = torch.eye(8)
    with pytest.raises(InputError, match="variant"):
        lp.coupling_metric(J, J, top_k=2, variant="nope")
    with pytest.raises(InputError, match="K must"):
        lp.coupling_metric(J, J, top_k=9)


# ------------------------------------------------------------------ coupling matrices
def test_depth_coupling_matches_dense_loops(tiny):
    model = tiny(n_layers=3)
    toks = _toks(model)
    c = lp.block_coupling(model, toks, positions="all", top_k=[2, 4], progress=False)
    assert c.mode == "depth" and c.ks == (2, 4)
    assert c.m.shape == (3, 2, 2, N_POS, 3, 3)
    assert c.groups == tuple(range(N_POS)) and c.items == (0, 1, 2)
    J = {}
    for l in range(3):
        ref = reference_rows(model, toks, l, [(b, t) for b in (0, 1) for t in (1, 5)])
        for t in (1, 5):
            J[l, t] = [ref[b, t][t] for b in (0, 1)]
    for vi, v in enumerate(("frob", "trace", "swap")):
        for qi, K in enumerate((2, 4)):
            for b in (0, 1):
                for t in (1, 5):
                    for i in range(3):
                        for j in range(3):
                            want = dense_m(J[i, t][b], J[j, t][b], K, v)
                            assert abs(float(c.m[vi, qi, b, t, i, j]) - want) < 1e-7
    # the documented scalar: mean over prompts, tokens and ordered pairs i != j of 1 - m^2
    m = c.m[0, 0].double().numpy()
    off = [1 - m[b, t, i, j] ** 2 for b in range(2) for t in range(N_POS)
           for i in range(3) for j in range(3) if i != j]
    assert abs(c.scalar() - np.mean(off)) < 1e-12
    assert torch.allclose(c.matrix(2), torch.as_tensor(1 - m ** 2).mean(0))
    assert torch.allclose(c.matrix(2, reduce="std"), torch.as_tensor(1 - m ** 2).std(0, unbiased=False))
    assert torch.allclose(c.matrix(4, "trace").diagonal(dim1=-2, dim2=-1),
                          torch.ones(N_POS, 3, dtype=torch.float64))
    # |U_j^T J_i V_j| kept for K = max(ks)
    U, _, Vt = np.linalg.svd(J[0, 5][1].numpy())
    want = np.abs(U[:, :4].T @ J[2, 5][1].numpy() @ Vt[:4].T)
    assert np.allclose(c.products[1, 5, 2, 0].numpy(), want, atol=1e-8)


def test_depth_default_is_last_token_and_k_clamped(tiny):
    model = tiny(n_layers=2)
    c = lp.block_coupling(model, _toks(model, batch=1), progress=False)
    assert c.groups == (N_POS - 1,)
    assert c.ks == (4,)  # 10, 30, 50 clamped to d_model // 4 = 4


def test_token_and_context_coupling_match_dense_loops(tiny):
    model = tiny()
    toks = _toks(model, batch=1)
    tok = lp.block_coupling(model, toks, mode="token", top_k=3, positions=[1, 3, 5], progress=False)
    assert tok.group_axis == "layer" and tok.items == (1, 3, 5) and tok.m.shape == (3, 1, 1, 2, 3, 3)
    for l in range(2):
        ref = reference_rows(model, toks, l, [(0, t) for t in (1, 3, 5)])
        Js = {t: ref[0, t][t] for t in (1, 3, 5)}
        for a, ta in enumerate((1, 3, 5)):
            for bb, tb in enumerate((1, 3, 5)):
                assert abs(float(tok.m[0, 0, 0, l, a, bb]) - dense_m(Js[ta], Js[tb], 3)) < 1e-7
    ctx = lp.block_coupling(model, toks, mode="context", top_k=3, progress=False)  # fixed output: last
    assert ctx.jacobians.kind == "fixed_output" and ctx.items == tuple(range(N_POS))
    Js = reference_rows(model, toks, 1, [(0, N_POS - 1)])[0, N_POS - 1]
    for a in range(N_POS):
        for bb in range(N_POS):
            want = dense_m(Js[a], Js[bb], 3, "swap")
            assert abs(float(ctx.m[2, 0, 0, 1, a, bb]) - want) < 1e-7
    ctx_in = lp.block_coupling(model, toks, mode="context", input_token=2, top_k=3, progress=False)
    assert ctx_in.jacobians.kind == "fixed_input" and ctx_in.items == (2, 3, 4, 5)
    ref = reference_rows(model, toks, 0, [(0, 2), (0, 5)])
    Js = {t2: ref[0, t2][2] for t2 in (2, 5)}
    assert abs(float(ctx_in.m[1, 0, 0, 0, 0, 3]) - dense_m(Js[2], Js[5], 3, "trace")) < 1e-7


def test_coupling_from_precomputed_jacobians_and_errors(tiny):
    model = tiny()
    toks = _toks(model)
    jac = lp.block_jacobians(model, toks, positions=[2, 5], progress=False)
    a = lp.block_coupling(jac, top_k=2)
    b = lp.block_coupling(model, toks, positions=[2, 5], top_k=2, progress=False)
    assert torch.allclose(a.m, b.m)
    with pytest.raises(InputError, match="cross-token"):
        lp.block_coupling(jac, mode="context")
    with pytest.raises(InputError, match="needs tokens"):
        lp.block_coupling(model)
    with pytest.raises(InputError, match="mode"):
        lp.block_coupling(jac, mode="width")
    with pytest.raises(InputError, match="K must"):
        lp.block_coupling(jac, top_k=17)
    with pytest.raises(InputError, match="not computed"):
        a.matrix(top_k=3)
    with pytest.raises(InputError, match="at least two"):
        lp.block_coupling(lp.block_jacobians(model, toks, layers=[0], progress=False), top_k=2).scalar()


def test_outputs_dataframe_plot_show(tiny, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = tiny(vocab=[f"<w{i}>" for i in range(12)])
    toks = _toks(model)
    c = lp.block_coupling(model, toks, positions=[3, 5], top_k=[2, 3], progress=False)
    df = c.to_dataframe()
    assert len(df) == 3 * 2 * 2 * 2 * 2 * 2
    row = df[(df.variant == "trace") & (df.k == 3) & (df.prompt == 1) & (df.pos == 5)
             & (df.layer_i == 1) & (df.layer_j == 0)]
    assert abs(float(row.m.iloc[0]) - float(c.m[1, 1, 1, 1, 1, 0])) < 1e-12
    assert abs(float(row.coupling.iloc[0]) - (1 - float(c.m[1, 1, 1, 1, 1, 0]) ** 2)) < 1e-12
    fig = c.plot()
    assert len(fig.axes) >= 3
    plt.close(fig)
    html = c.show().to_html()
    assert "data:image/png;base64" in html and "mean off-diagonal coupling" in html
    jac = c.jacobians
    back = type(jac).load(jac.save(tmp_path / "jac.safetensors"))
    assert torch.equal(back.jacobians, jac.jacobians) and back.str_tokens == jac.str_tokens
    assert (back.kind, back.layers, back.positions, back.token) == (jac.kind, jac.layers, jac.positions, jac.token)
    assert torch.equal(lp.block_coupling(back, top_k=[2, 3]).m, c.m)
    with pytest.raises(InputError, match="not written"):
        type(jac).load(lp.save_checkpoint(model, tmp_path / "model.safetensors"))
    jdf = jac.to_dataframe()
    assert len(jdf) == 2 * 2 * 2
    assert np.allclose(jdf.frobenius.values, jac.norms().permute(0, 1, 2).reshape(-1).numpy())
    plt.close(jac.plot())
    tm = lp.trajectory_metrics(model, toks)
    assert tm.str_tokens[0][0].startswith("<w")
    page = tm.show().to_html()
    # the token reaches circuitsvis HTML-escaped (it renders token strings as HTML)
    assert f"\\u0026lt;w{int(toks[0, 0])}\\u0026gt;" in page and f"<w{int(toks[0, 0])}>" not in page
    plt.close(tm.plot(token=2))
    assert set(tm.to_dataframe().columns) >= {"lss", "norm_slope", "norm_r2", "step_ratio_cv", "token"}


# ------------------------------------------------------------------ trajectories
def test_trajectory_metrics_match_numpy_loops(tiny):
    model = tiny(n_layers=4)
    toks = _toks(model)
    tm = lp.trajectory_metrics(model, toks)
    xs = [_resid_pre(model, toks, 0)]
    for l in range(4):
        got = {}
        with torch.no_grad():
            model.run_with_hooks(toks, fwd_hooks=[(f"blocks.{l}.hook_resid_post",
                                                   lambda a, hook, got=got: got.setdefault("y", a.clone()))])
        xs.append(got["y"])
    X = torch.stack(xs, 1).numpy()  # [b, L+1, pos, d]
    assert np.allclose(tm.residuals.numpy(), X)
    for b in range(2):
        for t in range(N_POS):
            path = X[b, :, t]
            xt = path[0].copy()
            for l in range(1, 5):
                step = path[l] - path[l - 1]
                xt = xt + step / np.linalg.norm(step)
            lss = 4 / np.linalg.norm(xt - path[0])
            assert abs(float(tm.lss[b, t]) - lss) < 1e-10
            assert float(tm.lss[b, t]) >= 1 - 1e-12  # triangle inequality
            ln = np.log(np.linalg.norm(path, axis=-1))
            slope, icpt = np.polyfit(np.arange(5), ln, 1)
            r2 = 1 - ((ln - (slope * np.arange(5) + icpt)) ** 2).sum() / ((ln - ln.mean()) ** 2).sum()
            assert abs(float(tm.norm_slope[b, t]) - slope) < 1e-10
            assert abs(float(tm.norm_r2[b, t]) - r2) < 1e-10
            steps = np.linalg.norm(np.diff(path, axis=0), axis=-1)
            ls = np.log(steps)
            sl, _ = np.polyfit(np.arange(4), ls, 1)
            assert abs(float(tm.step_slope[b, t]) - sl) < 1e-10
            r = steps[1:] / steps[:-1]
            assert abs(float(tm.step_ratio_cv[b, t]) - r.std() / r.mean()) < 1e-10
    s = tm.summary()
    assert abs(s["lss"] - float(tm.lss.mean())) < 1e-12


def test_trajectory_straight_exponential_path():
    """A hand-built case: residual x^l = 2^l v is a straight line with exact exponential
    growth: LSS = 1, slope log 2, R^2 = 1, ratio spread 0 -- checked through the same
    formulas on a synthetic TrajectoryMetrics input."""
    v = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    X = torch.stack([2.0 ** l * v for l in range(5)])[None]  # [1, 5, 1, 2]
    steps = X[:, 1:] - X[:, :-1]
    sn = steps.norm(dim=-1)
    chord = (steps / sn.unsqueeze(-1)).sum(1).norm(dim=-1)
    assert torch.allclose(4 / chord, torch.ones(1, 1, dtype=torch.float64))
    slope, r2 = lpc._linfit(X.norm(dim=-1).log().transpose(1, 2))
    assert abs(float(slope) - math.log(2)) < 1e-12 and abs(float(r2) - 1) < 1e-12


# ------------------------------------------------------------------ through training
def test_through_training_from_models_paths_and_callback(tiny, tmp_path, fingerprint):
    models = [tiny(seed=s) for s in range(3)]
    toks = _toks(models[0], batch=2)
    path = lp.save_checkpoint(models[2], tmp_path / "s2.safetensors")
    direct = [lp.block_coupling(m, toks, top_k=[2, 4], progress=False) for m in models]
    a = lp.coupling_through_training(models, toks, steps=[0, 10, 20], top_k=[2, 4], progress=False)
    c = lp.coupling_through_training({20: path, 0: models[0]}, toks, top_k=[2, 4], progress=False)
    assert a.steps == (0, 10, 20) and c.steps == (0, 20)
    for s in range(3):
        for q, K in enumerate((2, 4)):
            assert abs(float(a.scalar[s, q]) - direct[s].scalar(K)) < 1e-12
            assert torch.allclose(a.matrices[s, q], direct[s].matrix(K).mean(0).double())
        traj = lp.trajectory_metrics(models[s], toks).summary()
        assert abs(float(a.trajectory["lss"][s]) - traj["lss"]) < 1e-12
    for q, K in enumerate((2, 4)):  # the checkpoint file gives the same numbers as the model
        assert abs(float(c.scalar[1, q]) - direct[2].scalar(K)) < 1e-9
        assert abs(float(c.scalar[0, q]) - direct[0].scalar(K)) < 1e-12
    df = a.to_dataframe()
    assert list(df.step) == [0, 10, 20] and "coupling_k2" in df
    import matplotlib.pyplot as plt

    plt.close(a.plot())
    # as a training callback: state (incl. train mode and grad flags) must survive
    model = tiny()
    model.train()
    before = fingerprint(model)
    tracker = lp.CouplingTracker(toks, top_k=2, every=2)
    for step in range(5):
        assert tracker(step, model, {}) is False
    assert fingerprint(model) == before
    res = tracker.result()
    assert res.steps == (0, 2, 4)
    assert abs(float(res.scalar[0, 0]) - lp.block_coupling(model, toks, top_k=2, progress=False).scalar()) < 1e-12


def test_tracker_inside_lp_train(tiny):
    from lensprobe.tasks.base import Batch

    class Copy:
        vocab = [str(i) for i in range(12)]
        seq_len = N_POS

        def sample(self, n, generator):
            t = torch.randint(0, 12, (n, N_POS), generator=generator)
            return Batch(t, t.clone(), torch.zeros_like(t))

        def str_tokens(self, tokens):
            return [self.vocab[i] for i in tokens]

    model = tiny()
    toks = _toks(model)
    tracker = lp.CouplingTracker(toks, top_k=2)
    lp.train(model, Copy(), steps=4, batch_size=8, eval_every=2, eval_batch_size=8,
             callbacks=[tracker], progress=False)
    res = tracker.result()
    assert res.steps == (2, 4) and res.scalar.shape == (2, 1)
    assert torch.isfinite(res.scalar).all()


# ------------------------------------------------------------------ the model is sacred
def _user_hook(act, hook):
    return act


@pytest.mark.parametrize("call", ["jac", "cross", "coupling", "traj"])
def test_model_state_untouched(tiny, fingerprint, call):
    model = tiny()
    model.blocks[0].hook_resid_pre.add_hook(_user_hook)
    model.blocks[1].attn.train()
    toks = _toks(model)
    before = fingerprint(model)
    {
        "jac": lambda: lp.block_jacobians(model, toks, progress=False),
        "cross": lambda: lp.block_jacobians(model, toks, input_token=1, progress=False),
        "coupling": lambda: lp.block_coupling(model, toks, mode="context", top_k=2, progress=False),
        "traj": lambda: lp.trajectory_metrics(model, toks),
    }[call]()
    assert fingerprint(model) == before


def test_model_state_untouched_when_raising_midway(tiny, fingerprint, monkeypatch):
    model = tiny()
    model.blocks[1].hook_resid_post.add_hook(_user_hook)
    model.train()
    toks = _toks(model)
    before = fingerprint(model)
    calls = {"n": 0}
    real = lpc.vjp_rows

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(lpc, "vjp_rows", failing)
    with pytest.raises(RuntimeError, match="boom"):
        lp.block_jacobians(model, toks, method="per_token", progress=False)
    assert fingerprint(model) == before
    monkeypatch.setattr(lpc, "vjp_rows", real)

    def bad_svd(*a, **k):
        raise RuntimeError("svd failed")

    monkeypatch.setattr(lpc, "_svd_top", bad_svd)
    with pytest.raises(RuntimeError, match="svd failed"):
        lp.block_coupling(model, toks, top_k=2, progress=False)
    assert fingerprint(model) == before


def test_training_raises_depthwise_coupling_above_initialisation(tiny):
    """The paper's training observation, on a small model and the retrieval task:
    mean off-diagonal depth-wise coupling after training exceeds the initialisation's."""
    task = lp.tasks.RetrievalTask(hops=2, n_statements=4, n_vars=8, n_values=6)
    model = lp.tiny_model(n_layers=3, n_heads=4, d_model=48, d_vocab=len(task.vocab),
                          n_ctx=task.seq_len, seed=0)
    probe = task.sample(8, torch.Generator().manual_seed(123)).tokens
    before = lp.block_coupling(model, probe, positions=[-1, -3, -5], top_k=10, progress=False).scalar()
    lp.train(model, task, steps=100, batch_size=32, lr=3e-3, eval_every=100, progress=False)
    after = lp.block_coupling(model, probe, positions=[-1, -3, -5], top_k=10, progress=False).scalar()
    assert after > before + 0.02, (before, after)


# ------------------------------------------------------------------ names and inputs
def test_import_gives_the_module_and_block_coupling_the_function():
    assert isinstance(lp.coupling, types.ModuleType) and lp.coupling is lpc
    assert lpc.block_coupling is lp.block_coupling and "coupling" not in lp._ORIGIN  # no name shadows a module


def test_old_names_warn_and_give_the_same_numbers(tiny):
    model = tiny()
    toks = _toks(model)
    new = lp.block_coupling(model, toks, top_k=[2, 3], progress=False)
    with pytest.warns(DeprecationWarning, match="block_coupling"):
        old = lpc.coupling(model, toks, top_k=[2, 3], progress=False)
    with pytest.warns(DeprecationWarning, match="top_k"):
        old_k = lp.block_coupling(model, toks, k=[2, 3], progress=False)
    assert torch.equal(old.m, new.m) and torch.equal(old_k.m, new.m)
    with pytest.warns(DeprecationWarning, match="top_k"):
        assert old.scalar(k=3) == new.scalar(top_k=3)
    with pytest.warns(DeprecationWarning, match="top_k"):
        assert torch.equal(old.matrix(k=3), new.matrix(top_k=3))
    J1, J2 = new.jacobians.jacobians[0, 0, 0], new.jacobians.jacobians[0, 1, 0]
    with pytest.warns(DeprecationWarning, match="top_k"):
        assert torch.equal(lp.coupling_metric(J1, J2, k=[2, 3]), lp.coupling_metric(J1, J2, top_k=[2, 3]))
    with pytest.warns(DeprecationWarning, match="top_k"):
        tr = lp.coupling_through_training([model], toks, k=2, progress=False)
    with pytest.warns(DeprecationWarning, match="top_k"):
        tracker = lp.CouplingTracker(toks, k=2)
    tracker.record(model)
    want = lp.coupling_through_training([model], toks, top_k=2, progress=False)
    assert torch.equal(tr.scalar, want.scalar) and torch.equal(tracker.result().scalar, want.scalar)


def test_trajectory_metrics_from_a_cache_equal_the_forward_pass(tiny):
    model = tiny(n_layers=3)
    toks = _toks(model)
    _, cache = model.run_with_cache(toks)
    a = lp.trajectory_metrics(model, toks)
    b = lp.trajectory_metrics(model, cache=cache)
    c = lp.trajectory_metrics(model, toks, cache=cache)
    for f in ("residuals", "lss", "norm_slope", "norm_r2", "step_slope", "step_r2", "step_ratio_cv"):
        assert torch.allclose(getattr(b, f).cpu(), getattr(a, f).cpu(), rtol=1e-12, atol=1e-12, equal_nan=True), f
    assert b.tokens is None and torch.equal(c.tokens, a.tokens) and a.hooks == b.hooks
    assert len(b.to_dataframe()) == 2 * N_POS
    # hooks in TransformerLens's names_filter convention: the resid_pre of every block
    pre = [f"blocks.{l}.hook_resid_pre" for l in range(3)]
    d = lp.trajectory_metrics(model, toks, hooks=lambda n: n.endswith("hook_resid_pre"))
    e = lp.trajectory_metrics(model, cache=cache, hooks=pre)
    assert d.hooks == tuple(pre) and torch.allclose(d.lss, e.lss, rtol=1e-12)
    X = torch.stack([cache[h].detach().double() for h in pre], 1)  # an independent L = 2 path
    steps = X[:, 1:] - X[:, :-1]
    lss = 2 / (steps / steps.norm(dim=-1, keepdim=True)).sum(1).norm(dim=-1)
    assert torch.allclose(d.lss, lss, rtol=1e-10)
    _, part = model.run_with_cache(toks, names_filter=lambda n: n.endswith("hook_resid_pre"))
    with pytest.raises(InputError, match="lacks hook points"):
        lp.trajectory_metrics(model, cache=part)
    with pytest.raises(InputError, match="tokens"):
        lp.trajectory_metrics(model)
