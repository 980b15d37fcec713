"""OV eigenspectra, dominance, smoothing profiles and sign-controlled models (Dovonon et al.).

Every check compares lensprobe against an independent computation written here: dense
d x d eigensolves, an explicit Kronecker matrix, plain loops over token pairs and
attention eigenvalues, a grid over attention eigenvalues, TransformerLens's own weight
folding, and hand-derived spectra.
"""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch

import lensprobe as lp
from lensprobe import smoothing as S
from lensprobe.errors import InputError, NonFiniteError

D64 = torch.float64


# --------------------------------------------------------------------------- helpers
def match_multisets(a, b, atol):
    """Greedy nearest matching of two complex multisets; returns the largest distance."""
    a = [complex(z) for z in np.asarray(a).ravel()]
    b = [complex(z) for z in np.asarray(b).ravel()]
    assert len(a) == len(b), (len(a), len(b))
    worst = 0.0
    rest = list(b)
    for z in sorted(a, key=lambda z: -abs(z)):
        j = int(np.argmin([abs(z - w) for w in rest]))
        worst = max(worst, abs(z - rest.pop(j)))
    assert worst <= atol, f"multisets differ by {worst}"
    return worst


def nonzero(eigs, rel=1e-6):
    eigs = np.asarray(eigs)
    return eigs[np.abs(eigs) > rel * max(np.abs(eigs).max(), 1e-300)]


def ln1_gamma(model, layer):
    """ln1's scale read straight from the state dict (each backend's own key)."""
    sd = model.state_dict()
    for key in (f"blocks.{layer}.ln1.w", f"blocks.{layer}.ln1.weight"):
        if key in sd:
            return sd[key].detach().to(D64)
    return None


def randomise_ln(model, seed=0):
    """Give ln1 (and ln2) scales of mixed sign and non-zero biases, in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln" in name and p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=g, dtype=D64).to(p.dtype) * 0.8 + 0.3)


def dense_effective_ov(model, layer, head=None, fold=True):
    """P_c diag(gamma) W_V W_O (or W_V W_O), as a plain d x d matrix per head or head sum."""
    W_V = model.W_V[layer].detach().to(D64)
    W_O = model.W_O[layer].detach().to(D64)
    d = W_V.shape[1]
    heads = range(W_V.shape[0]) if head is None else [head]
    M = sum(W_V[h] @ W_O[h] for h in heads)
    if fold:
        g = ln1_gamma(model, layer)
        g = torch.ones(d, dtype=D64) if g is None else g
        P = torch.eye(d, dtype=D64) - torch.full((d, d), 1.0 / d, dtype=D64)
        M = P @ torch.diag(g) @ M
    return M


def tl_fold(model):
    """A copy folded by TransformerLens itself."""
    m = copy.deepcopy(model)
    if lp.BACKEND == "bridge":
        m.enable_compatibility_mode(disable_warnings=True)
    else:
        m.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
    assert lp._tl.is_folded(m)
    return m


def profile_tokens(d_vocab, batch=6, pos=12, seed=0):
    return torch.randint(0, d_vocab, (batch, pos), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- the update's modes
@pytest.mark.parametrize("causal", [True, False])
def test_update_eigenvalues_equal_kronecker_spectrum(causal):
    g = torch.Generator().manual_seed(1)
    n, d = 5, 4
    logits = torch.randn(n, n, generator=g, dtype=D64)
    if causal:
        logits = logits.masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool), 1), -torch.inf)
    A = torch.softmax(logits, dim=-1)
    Hm = torch.randn(d, d, generator=g, dtype=D64)
    X = torch.randn(n, d, generator=g, dtype=D64)
    K = torch.kron(Hm.T.contiguous(), A)
    # The vectorised update: vec(A X H) = (H^T kron A) vec(X), column-stacking vec.
    vec = lambda M: M.T.reshape(-1)  # noqa: E731
    assert torch.allclose(K @ vec(X), vec(A @ X @ Hm), atol=1e-12)
    dense = np.linalg.eigvals((torch.eye(n * d, dtype=D64) + K).numpy())
    lam_a = S.attention_eigenvalues(A, causal=causal)
    mu = S.update_eigenvalues(lam_a, torch.linalg.eigvals(Hm))
    assert mu.shape == (n, d)
    match_multisets(mu.numpy(), dense, atol=1e-8)
    # Row 0 holds the DC attention eigenvalue 1 (A 1 = 1).
    assert abs(complex(lam_a[0]) - 1) < 1e-12
    if causal:
        assert torch.allclose(lam_a, torch.diagonal(A))
    else:
        match_multisets(lam_a.numpy(), np.linalg.eigvals(A.numpy()), atol=1e-10)


# --------------------------------------------------------------------------- spectra
@pytest.mark.parametrize("shape", [dict(n_heads=2, d_model=16), dict(n_heads=2, d_model=16, d_head=4)])
def test_factored_spectra_equal_dense_eigensolves(tiny, shape):
    model = tiny(attn_only=True, **shape)
    randomise_ln(model)
    for fold in (False, True):
        spec = lp.ov_spectrum(model, fold_ln=fold, progress=False)
        assert spec.head_eigenvalues.shape == (2, 2, model.cfg.d_head)
        for l in range(2):
            for h in range(2):
                dense = np.linalg.eigvals(dense_effective_ov(model, l, h, fold).numpy())
                match_multisets(spec.head(l, h).numpy(), nonzero(dense), atol=1e-9)
            dense = np.linalg.eigvals(dense_effective_ov(model, l, None, fold).numpy())
            match_multisets(spec.layer(l).numpy(), nonzero(dense), atol=1e-9)
            assert spec.layer_eigenvalues.shape[1] == min(16, 2 * model.cfg.d_head)
    # mu_DC is max_j |1 + lambda_j| over the dense non-zero spectrum.
    dense = nonzero(np.linalg.eigvals(dense_effective_ov(model, 1, 0).numpy()))
    assert abs(float(spec.head_mu_dc[1, 0]) - np.abs(1 + dense).max()) < 1e-9


def test_fold_ln_changes_the_spectrum_and_states_the_weights(tiny):
    model = tiny(attn_only=True)
    randomise_ln(model)
    raw = lp.ov_spectrum(model, fold_ln=False, progress=False)
    eff = lp.ov_spectrum(model, fold_ln=True, progress=False)
    assert "raw" in raw.weights and "P_c diag(gamma)" in eff.weights
    assert (raw.head_eigenvalues - eff.head_eigenvalues).abs().max() > 1e-2
    rms = tiny(attn_only=True, normalization="RMS")
    randomise_ln(rms)
    s = lp.ov_spectrum(rms, progress=False)
    assert "P_c" not in s.weights and "diag(gamma)" in s.weights
    d = rms.cfg.d_model
    W = rms.W_V[0, 1].detach().to(D64)
    dense = torch.diag(ln1_gamma(rms, 0)) @ W @ rms.W_O[0, 1].detach().to(D64)
    match_multisets(s.head(0, 1).numpy(), nonzero(np.linalg.eigvals(dense.numpy())), atol=1e-9)
    assert d == 16
    none = tiny(attn_only=True, normalization=None)
    assert "no layer norm" in lp.ov_spectrum(none, progress=False).weights


def test_spectra_agree_after_transformerlens_folds(tiny):
    model = tiny()  # with MLPs, LN
    randomise_ln(model, seed=3)
    raw_eff = lp.ov_spectrum(model, fold_ln=True, progress=False)
    raw_plain = lp.ov_spectrum(model, fold_ln=False, progress=False)
    folded = tl_fold(model)
    fol = lp.ov_spectrum(folded, progress=False)
    assert "TransformerLens folded" in fol.weights
    for l in range(2):
        for h in range(2):
            match_multisets(fol.head(l, h).numpy(), raw_eff.head(l, h).numpy(), atol=1e-5)
            assert fol.head_reading[l][h] == raw_eff.head_reading[l][h]
        match_multisets(fol.layer(l).numpy(), raw_eff.layer(l).numpy(), atol=1e-5)
    assert fol.layer_reading == raw_eff.layer_reading
    # ... and not with the gamma-free spectrum, which is a different matrix.
    assert (raw_plain.head_eigenvalues - raw_eff.head_eigenvalues).abs().max() > 1e-2
    with pytest.raises(InputError, match="already folded"):
        lp.ov_spectrum(folded, fold_ln=False)


# --------------------------------------------------------------------------- readings
@pytest.mark.parametrize(
    "eigs, causal, reading",
    [
        ([0.5, 0.2], True, "smoothing"),
        ([-0.5, -0.9], True, "sharpening"),
        ([-1.0, -1.0], True, "sharpening"),
        ([-1.5], True, "depends on attention"),
        ([-2.5], True, "DC-flipping"),
        ([-3.0, 0.5], True, "DC-flipping"),
        ([3.0, -2.5], True, "smoothing"),
        ([0.3 + 0.4j, 0.3 - 0.4j], True, "smoothing"),
        ([-0.5 + 0.3j, -0.5 - 0.3j], True, "sharpening"),
        ([-1.2 + 0.3j, -1.2 - 0.3j], True, "depends on attention"),
        ([0.0, 0.0], True, "inert"),
        ([0.5, 0.2], False, "smoothing"),
        ([0.5, -0.3], False, "smoothing"),
        ([0.3, -0.5], False, "depends on attention"),
        ([-0.5, -1.0], False, "sharpening"),
        ([-1.5], False, "depends on attention"),
    ],
)
def test_classify_spectrum_hand_cases(eigs, causal, reading):
    r, mu = S.classify_spectrum(torch.tensor(eigs, dtype=torch.complex128), causal=causal)
    assert r == reading
    nz = [z for z in eigs if abs(z) > 0]
    assert mu == pytest.approx(max(abs(1 + z) for z in nz) if nz else 1.0)


def test_causal_readings_agree_with_a_grid_over_attention_eigenvalues():
    """smoothing/DC-flipping: every HF eigenvalue a in [0, 1) loses to DC; sharpening:
    every one wins; depends: some win, some lose. Checked on a dense grid of a."""
    g = np.random.default_rng(0)
    a = np.concatenate([np.linspace(0, 1, 2001)[:-1], 1 - np.logspace(-3, -7, 9)])
    seen = set()
    for _ in range(400):
        k = int(g.integers(1, 4))
        re = g.uniform(-3, 1.5, k)
        im = g.uniform(-1, 1, k) * (g.random(k) < 0.5)
        lam = np.concatenate([re + 1j * im, re[im != 0] - 1j * im[im != 0]])
        reading, mu_dc = S.classify_spectrum(torch.tensor(lam), causal=True)
        f = np.abs(1 + a[:, None] * lam[None, :]).max(axis=1)
        assert mu_dc == pytest.approx(np.abs(1 + lam).max())
        seen.add(reading)
        if reading in ("smoothing", "DC-flipping"):
            assert (f < mu_dc + 1e-12).all()
            flips = (1 + lam.real)[np.abs(1 + lam) >= mu_dc - 1e-9] < 0
            assert flips.all() == (reading == "DC-flipping")
        elif reading == "sharpening":
            assert (f > mu_dc - 1e-12).all()
        else:
            assert (f > mu_dc + 1e-9).any() and (f <= mu_dc + 1e-6).any()
    assert seen == {"smoothing", "sharpening", "depends on attention", "DC-flipping"}


# --------------------------------------------------------------------------- dominance
def brute_dominance(model, tokens, fold=True):
    """mu_HF per (input, layer, head) from dense eigensolves and plain loops."""
    _, cache = model.run_with_cache(tokens)
    B, L, H = tokens.shape[0], model.cfg.n_layers, model.cfg.n_heads
    mu_dc = np.zeros((L, H))
    mu_hf = np.zeros((B, L, H))
    lmu_hf = np.zeros((B, L))
    lmu_dc = np.zeros(L)
    for l in range(L):
        pat = cache[f"blocks.{l}.attn.hook_pattern"].detach().to(D64).numpy()
        spectra = [nonzero(np.linalg.eigvals(dense_effective_ov(model, l, h, fold).numpy()))
                   for h in range(H)]
        lspec = nonzero(np.linalg.eigvals(dense_effective_ov(model, l, None, fold).numpy()))
        lmu_dc[l] = max(abs(1 + z) for z in lspec)
        for h in range(H):
            mu_dc[l, h] = max(abs(1 + z) for z in spectra[h])
        for b in range(B):
            for h in range(H):
                ev = list(np.linalg.eigvals(pat[b, h]))
                ev.pop(int(np.argmin([abs(e - 1) for e in ev])))  # the DC eigenvalue
                mu_hf[b, l, h] = max(abs(1 + x * z) for x in ev for z in spectra[h])
            ev = list(np.linalg.eigvals(pat[b].mean(axis=0)))
            ev.pop(int(np.argmin([abs(e - 1) for e in ev])))
            lmu_hf[b, l] = max(abs(1 + x * z) for x in ev for z in lspec)
    return mu_dc, mu_hf, lmu_dc, lmu_hf


@pytest.mark.parametrize("causal", [True, False])
def test_dominance_matches_dense_loops(tiny, causal):
    model = tiny(causal=causal)
    randomise_ln(model, seed=5)
    toks = profile_tokens(model.cfg.d_vocab, batch=3, pos=6)
    dom = lp.dominance(model, toks, progress=False)
    mu_dc, mu_hf, lmu_dc, lmu_hf = brute_dominance(model, toks)
    np.testing.assert_allclose(dom.mu_dc.numpy(), mu_dc, atol=1e-9)
    np.testing.assert_allclose(dom.mu_hf.numpy(), mu_hf, atol=1e-8)
    np.testing.assert_allclose(dom.layer_mu_dc.numpy(), lmu_dc, atol=1e-9)
    np.testing.assert_allclose(dom.layer_mu_hf.numpy(), lmu_hf, atol=1e-8)
    expect = np.where(mu_dc[None] > mu_hf + 1e-6, 1, np.where(mu_hf > mu_dc[None] + 1e-6, -1, 0))
    np.testing.assert_array_equal(dom.dominant.numpy(), expect)
    assert dom.attn_eigenvalues.shape == (3, 2, 2, 6)
    assert torch.allclose(dom.frac_dc + dom.frac_hf + (dom.dominant == 0).double().mean(0),
                          torch.ones(2, 2, dtype=D64))
    df = dom.to_dataframe()
    assert len(df) == 2 * 3 and set(df["kind"]) == {"head", "layer"}
    assert df["frac_dc"].tolist()[0] == pytest.approx(float((expect[:, 0, 0] == 1).mean()))


# --------------------------------------------------------------------------- profiles
def test_sequence_measures_against_loops():
    g = torch.Generator().manual_seed(2)
    X = torch.randn(3, 7, 5, generator=g, dtype=D64) + torch.randn(5, generator=g, dtype=D64)
    m = S.sequence_measures(X)
    for b in range(3):
        x = X[b].numpy()
        n = len(x)
        mean = x.mean(axis=0)
        hc = np.sqrt(sum(np.sum((x[i] - mean) ** 2) for i in range(n)))
        dc = np.sqrt(n * np.sum(mean**2))
        cos = [x[i] @ x[j] / np.linalg.norm(x[i]) / np.linalg.norm(x[j])
               for i, j in itertools.combinations(range(n), 2)]
        pairs = sum(np.sum((x[i] - x[j]) ** 2) for i, j in itertools.combinations(range(n), 2))
        sv = np.linalg.svd(x, compute_uv=False)
        assert float(m["hc_dc"][b]) == pytest.approx(hc / dc, rel=1e-10)
        assert float(m["cosine"][b]) == pytest.approx(np.mean(cos), rel=1e-10)
        assert float(m["dirichlet"][b]) == pytest.approx(pairs / (n * np.sum(x**2)), rel=1e-10)
        assert float(m["sigma_ratio"][b]) == pytest.approx(sv[1] / sv[0], rel=1e-10)
    same = S.sequence_measures(torch.ones(4, 3, dtype=D64) * torch.tensor([1.0, -2.0, 0.5], dtype=D64))
    assert float(same["hc_dc"]) == 0 and float(same["dirichlet"]) == 0
    assert float(same["cosine"]) == pytest.approx(1.0) and float(same["sigma_ratio"]) < 1e-12
    with pytest.raises(InputError, match="at least 2"):
        S.sequence_measures(torch.ones(1, 3, dtype=D64))


def test_smoothing_profile_reads_every_residual_stream(tiny):
    model = tiny(n_layers=3)
    toks = profile_tokens(model.cfg.d_vocab, batch=4, pos=9)
    prof = lp.smoothing_profile(model, toks, label="tiny")
    _, cache = model.run_with_cache(toks)
    streams = [cache[f"blocks.{l}.hook_resid_pre"] for l in range(3)] + [cache["blocks.2.hook_resid_post"]]
    for k, X in enumerate(streams):
        x = X.detach().to(D64)
        mean = x.mean(dim=1, keepdim=True)
        ratio = (x - mean).flatten(1).norm(dim=1) / (mean.flatten(1).norm(dim=1) * 3)
        assert torch.allclose(prof.hc_dc[:, k], ratio, rtol=1e-10)
    assert prof.hc_dc.shape == (4, 4) and len(prof.hooks) == 4
    assert torch.allclose(prof.mean("cosine"), prof.cosine.mean(0))
    assert torch.allclose(prof.std("sigma_ratio"), prof.sigma_ratio.std(0))
    df = prof.to_dataframe()
    assert len(df) == 4 * 4 and set(df["measure"]) == {"hc_dc", "cosine", "dirichlet", "sigma_ratio"}


# --------------------------------------------------------------------------- sign control
@pytest.mark.parametrize("sign", ["+", "-"])
@pytest.mark.parametrize("shape", [dict(n_heads=2, d_model=16), dict(n_heads=4, d_model=16, d_head=8)])
def test_sign_controlled_sets_the_spectrum(tiny, fingerprint, sign, shape):
    model = tiny(attn_only=True, **shape)
    before = fingerprint(model)
    H, dh = model.cfg.n_heads, model.cfg.d_head
    psi = torch.linspace(0.3, 0.9, 2 * H * dh, dtype=D64).reshape(2, H, dh)
    new = lp.sign_controlled(model, sign, psi=psi, seed=4)
    assert fingerprint(model) == before and new is not model
    s = 1 if sign == "+" else -1
    for l in range(2):
        W_V = new.W_V[l].detach().to(D64)
        for h in range(H):
            dense = np.linalg.eigvals((W_V[h] @ new.W_O[l, h].detach().to(D64)).numpy())
            match_multisets(nonzero(dense), (s * psi[l, h] ** 2).numpy(), atol=1e-10)
            assert torch.allclose(W_V[h].T @ W_V[h], torch.eye(dh, dtype=D64), atol=1e-12)
        if H * dh <= 16:  # one QR per layer: the heads' columns are mutually orthogonal
            V = torch.cat(list(W_V), dim=1)
            assert torch.allclose(V.T @ V, torch.eye(H * dh, dtype=D64), atol=1e-12)
        assert float(new.b_V[l].detach().abs().max()) == 0
        assert float(new.b_O[l].detach().abs().max()) == 0
    # The forward pass uses the new weights: attn_out = sum_h A_h LN(x) W_V^h W_O^h.
    toks = profile_tokens(model.cfg.d_vocab, batch=1, pos=5)
    _, c = new.run_with_cache(toks)
    x = c["blocks.1.ln1.hook_normalized"][0].to(D64)
    p = c["blocks.1.attn.hook_pattern"][0].to(D64)
    out = sum(p[h] @ x @ dense_effective_ov(new, 1, h, fold=False) for h in range(H))
    assert torch.allclose(out, c["blocks.1.hook_attn_out"][0].to(D64), atol=1e-10)
    # Its effective spectrum (with ln1) keeps the sign: P_c V Lambda V^T is congruent-like.
    spec = lp.ov_spectrum(new, progress=False)
    want = "smoothing" if sign == "+" else "sharpening"
    assert {r for rs in spec.head_reading for r in rs} == {want}
    lam = spec.layer_eigenvalues[spec.layer_nonzero]
    assert lam.imag.abs().max() < 1e-10 and bool((s * lam.real > 0).all())
    if H * dh <= 16:  # V Lambda V^T with |Lambda| <= 0.81: inside the reading's range
        assert set(spec.layer_reading) == {want}


def test_flip_ln_gamma_negates_the_scale_and_the_spectrum(tiny, fingerprint):
    model = tiny(attn_only=True)
    randomise_ln(model, seed=7)
    before = fingerprint(model)
    flipped = lp.flip_ln_gamma(model)
    assert fingerprint(model) == before
    for l in range(2):
        assert torch.allclose(ln1_gamma(flipped, l), -ln1_gamma(model, l))
    a = lp.ov_spectrum(model, progress=False)
    b = lp.ov_spectrum(flipped, progress=False)
    match_multisets(b.head_eigenvalues.numpy(), -a.head_eigenvalues.numpy(), atol=1e-10)
    with pytest.raises(InputError, match="no layer norm"):
        lp.flip_ln_gamma(tiny(normalization=None))


def test_flip_ln_gamma_on_a_folded_model_equals_folding_the_flipped_model(tiny):
    model = tiny()
    randomise_ln(model, seed=8)
    toks = profile_tokens(model.cfg.d_vocab, batch=2, pos=7)
    via_raw = tl_fold(lp.flip_ln_gamma(model))
    via_folded = lp.flip_ln_gamma(tl_fold(model))
    name = "blocks.1.hook_resid_post"
    a = via_raw.run_with_cache(toks)[1][name]
    b = via_folded.run_with_cache(toks)[1][name]
    assert torch.allclose(a, b, atol=1e-5)
    # ... and it is not the unflipped model.
    c = tl_fold(model).run_with_cache(toks)[1][name]
    assert (a - c).abs().max() > 1e-2


# --------------------------------------------------------------------------- the paper's predictions
def test_deep_linear_stack_plus_smooths_minus_sharpens(tiny):
    """Without layer norm the update is exactly X + A X H: the theory applies directly."""
    base = tiny(n_layers=24, attn_only=True, normalization=None, seed=1)
    toks = profile_tokens(base.cfg.d_vocab)
    plus = lp.smoothing_profile(lp.sign_controlled(base, "+"), toks)
    minus = lp.smoothing_profile(lp.sign_controlled(base, "-"), toks)
    p_hc, m_hc = plus.mean("hc_dc"), minus.mean("hc_dc")
    assert p_hc[-1] < 0.02 * p_hc[0] and plus.mean("cosine")[-1] > 0.99
    assert m_hc[-1] > m_hc[0] and m_hc[-1] > 100 * p_hc[-1]
    assert minus.mean("cosine").abs().max() < 0.2


def test_deep_layernorm_stack_and_the_gamma_flip(tiny):
    """Pre-LN: '+' smooths, '-' does not, and flipping ln1's gamma turns '+' into '-'.

    psi is small because the pre-LN update sees x / sigma(x): with TransformerLens's
    initial residual scale the effective eigenvalues are lambda / sigma (see the
    sign_controlled docstring)."""
    base = tiny(n_layers=24, attn_only=True, seed=1)
    toks = profile_tokens(base.cfg.d_vocab)
    plus_model = lp.sign_controlled(base, "+", psi_range=(0.2, 0.35))
    minus_model = lp.sign_controlled(base, "-", psi_range=(0.2, 0.35))
    plus = lp.smoothing_profile(plus_model, toks)
    minus = lp.smoothing_profile(minus_model, toks)
    flipped = lp.smoothing_profile(lp.flip_ln_gamma(plus_model), toks)
    p_hc, m_hc = plus.mean("hc_dc"), minus.mean("hc_dc")
    assert p_hc[-1] < 0.25 * p_hc[0] and plus.mean("cosine")[-1] > 0.75
    assert (p_hc[1:] < p_hc[:-1]).all()
    assert m_hc[-1] > 0.8 * m_hc[0] and m_hc[-1] > 5 * p_hc[-1]
    assert minus.mean("cosine").abs().max() < 0.2
    # gamma -> -gamma negates q, k and v (zero biases): exactly the '-' model.
    assert torch.allclose(flipped.hc_dc, minus.hc_dc, rtol=1e-8)
    assert torch.allclose(flipped.cosine, minus.cosine, atol=1e-8)
    # Dominance: all DC for '+', never DC for '-', whose spectrum lies in [-1, 0).
    dp = lp.dominance(plus_model, toks, progress=False)
    dm = lp.dominance(minus_model, toks, progress=False)
    assert bool((dp.frac_dc == 1).all()) and bool((dp.layer_frac_dc == 1).all())
    assert bool((dm.frac_dc == 0).all()) and bool((dm.layer_frac_dc == 0).all())
    assert bool((dm.frac_hf == 1).all())
    for spec in (dm.spectrum,):
        lam = spec.head_eigenvalues[spec.head_nonzero]
        assert lam.imag.abs().max() < 1e-10
        assert bool(((lam.real >= -1) & (lam.real < 0)).all())
        lam = spec.layer_eigenvalues[spec.layer_nonzero]
        assert bool(((lam.real >= -1) & (lam.real < 0)).all())


# --------------------------------------------------------------------------- the model is sacred
def test_extractors_leave_the_model_untouched(tiny, fingerprint):
    model = tiny()
    randomise_ln(model)
    model.train()
    next(model.parameters()).requires_grad_(False)
    handle = model.blocks[0].hook_resid_pre.add_hook(lambda act, hook: act)
    before = fingerprint(model)
    toks = profile_tokens(model.cfg.d_vocab, batch=2, pos=5)
    lp.ov_spectrum(model, progress=False)
    lp.dominance(model, toks, progress=False)
    lp.smoothing_profile(model, toks)
    lp.sign_controlled(model, "+")
    lp.flip_ln_gamma(model)
    assert fingerprint(model) == before
    assert model.training

    def boom(act, hook):
        raise RuntimeError("user hook failed")

    model.blocks[1].hook_resid_pre.add_hook(boom)
    before = fingerprint(model)
    with pytest.raises(RuntimeError, match="user hook failed"):
        lp.smoothing_profile(model, toks)
    with pytest.raises(RuntimeError, match="user hook failed"):
        lp.dominance(model, toks, progress=False)
    assert fingerprint(model) == before
    del handle


def test_ov_spectrum_raising_midway_restores_the_model(tiny, fingerprint):
    model = tiny()
    with torch.no_grad():  # poison one value weight (through the parameter or its view)
        lp._tl.head_weight(model, 1, "W_V")[0, 0, 0] = float("nan")
    model.train()
    before = fingerprint(model)
    with pytest.raises(NonFiniteError):
        lp.ov_spectrum(model, progress=False)
    assert fingerprint(model) == before and model.training


# --------------------------------------------------------------------------- errors and views
def test_clear_errors(tiny):
    model = tiny()
    with pytest.raises(InputError, match="at least 2 tokens"):
        lp.dominance(model, torch.tensor([[3]]))
    with pytest.raises(InputError, match="at least 2 tokens"):
        lp.smoothing_profile(model, torch.tensor([[3]]))
    with pytest.raises(InputError, match="sign must be"):
        lp.sign_controlled(model, "up")
    with pytest.raises(InputError, match="psi must broadcast"):
        lp.sign_controlled(model, "+", psi=torch.ones(3, 3))
    with pytest.raises(InputError, match="out of range"):
        lp.ov_spectrum(model, layers=[5])
    with pytest.raises(InputError, match="d_vocab"):
        lp.smoothing_profile(model, torch.tensor([[1, 99]]))
    with pytest.raises(lp.ModelError):
        lp.ov_spectrum(torch.nn.Linear(2, 2))


def test_results_plot_and_show(tiny):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as mpatches
    import matplotlib.pyplot as plt

    model = tiny(vocab=[f"t<{i}>" for i in range(12)])
    toks = profile_tokens(12, batch=2, pos=5)
    spec = lp.ov_spectrum(model, progress=False)
    fig = spec.plot()
    circles = [p for ax in fig.axes for p in ax.patches if isinstance(p, mpatches.Circle)]
    assert len(circles) == 2 * 2  # two region boundaries per layer panel
    df = spec.to_dataframe()
    assert len(df) == 2 * (2 + 1) and set(df["reading"]) <= set(S.READINGS)
    assert len(spec.eigen_dataframe()) == int(spec.head_nonzero.sum() + spec.layer_nonzero.sum())
    html = spec.show().to_html()
    assert "OV eigenspectra" in html and "<img" in html
    dom = lp.dominance(model, toks, progress=False)
    assert dom.plot() is not None and "Dominant" in dom.show().to_html()
    prof = lp.smoothing_profile(model, toks)
    fig2 = prof.plot(label="a")
    prof.plot(axes=fig2.axes, label="b")
    assert len(fig2.axes[0].lines) == 2
    assert "<img" in prof.show().to_html()
    plt.close("all")


def test_per_layer_false_skips_the_head_sum(tiny):
    model = tiny()
    full = lp.ov_spectrum(model, progress=False)
    heads = lp.ov_spectrum(model, per_layer=False, progress=False)
    assert heads.layer_eigenvalues is None and heads.layer_reading is None
    assert torch.equal(heads.head_eigenvalues, full.head_eigenvalues)
    assert len(heads.to_dataframe()) == 4 and set(heads.to_dataframe()["kind"]) == {"head"}
    with pytest.raises(InputError, match="per_layer=True"):
        heads.layer(0)
    toks = profile_tokens(model.cfg.d_vocab, batch=2, pos=5)
    dom = lp.dominance(model, toks, per_layer=False, progress=False)
    assert dom.layer_dominant is None and dom.layer_frac_dc is None
    assert torch.equal(dom.mu_hf, lp.dominance(model, toks, progress=False).mu_hf)
    assert len(dom.to_dataframe()) == 4
    import matplotlib.pyplot as plt

    heads.plot(), dom.plot()
    plt.close("all")


@pytest.mark.parametrize("causal", [True, False])
def test_hf_bound_is_the_sup_over_attention_eigenvalues(tiny, causal):
    """mu_hf_bound = sup over admissible HF attention eigenvalues a of max_j |1 + a lambda_j|:
    a in [0, 1] for causal attention, the closed unit disk otherwise (grid search here)."""
    model = tiny(causal=causal)
    randomise_ln(model, seed=11)
    spec = lp.ov_spectrum(model, progress=False)
    df = spec.to_dataframe()
    if causal:
        grid = np.linspace(0, 1, 4001)
    else:
        r, t = np.meshgrid(np.linspace(0, 1, 201), np.linspace(0, 2 * np.pi, 721))
        grid = (r * np.exp(1j * t)).ravel()
    for rec in df.itertuples():
        lam = spec.head(rec.layer, rec.head) if rec.kind == "head" else spec.layer(rec.layer)
        lam = lam.numpy()
        sup = np.abs(1 + grid[:, None] * lam[None, :]).max()
        assert rec.mu_hf_bound == pytest.approx(sup, rel=1e-4)


# --------------------------------------------------------------------------- ActivationCache inputs
@pytest.mark.parametrize("causal", [True, False])
def test_cache_gives_the_same_numbers_as_tokens(tiny, causal):
    model = tiny(n_layers=3, causal=causal)
    randomise_ln(model, seed=2)
    toks = profile_tokens(model.cfg.d_vocab, batch=3, pos=6)
    _, cache = model.run_with_cache(toks)
    a, b = lp.dominance(model, toks, progress=False), lp.dominance(model, cache=cache, progress=False)
    for f in ("attn_eigenvalues", "mu_hf", "dominant", "layer_mu_hf", "layer_dominant"):
        assert torch.allclose(getattr(b, f), getattr(a, f), rtol=1e-12, atol=1e-12), f
    p, q = lp.smoothing_profile(model, toks), lp.smoothing_profile(model, cache=cache)
    for f in ("hc_dc", "cosine", "dirichlet", "sigma_ratio"):
        assert torch.allclose(getattr(q, f), getattr(p, f), rtol=1e-12), f
    assert p.hooks == q.hooks


def test_smoothing_profile_hooks_follow_names_filter(tiny):
    model = tiny(n_layers=3)
    toks = profile_tokens(model.cfg.d_vocab, batch=2, pos=7)
    _, cache = model.run_with_cache(toks)
    mids = [f"blocks.{l}.hook_resid_mid" for l in range(3)]
    by_list = lp.smoothing_profile(model, toks, hooks=mids)
    by_pred = lp.smoothing_profile(model, cache=cache, hooks=lambda n: n.endswith("hook_resid_mid"))
    assert by_list.hooks == by_pred.hooks == tuple(mids)
    assert torch.allclose(by_list.cosine, by_pred.cosine, rtol=1e-12)
    for k, h in enumerate(mids):  # independent: a plain loop over the cached stream
        x = cache[h].detach().to(D64)
        mean = x.mean(dim=1, keepdim=True)
        want = (x - mean).flatten(1).norm(dim=1) / (mean.flatten(1).norm(dim=1) * math.sqrt(7))
        assert torch.allclose(by_list.hc_dc[:, k], want, rtol=1e-10)
    one = lp.smoothing_profile(model, toks, hooks="blocks.1.hook_resid_pre")
    assert one.hooks == ("blocks.1.hook_resid_pre",) and one.hc_dc.shape == (2, 1)
    with pytest.raises(InputError, match="one shape"):
        lp.smoothing_profile(model, toks, hooks=["blocks.0.hook_resid_pre", "blocks.0.attn.hook_pattern"])


def test_cache_lacking_hooks_is_an_input_error(tiny):
    model = tiny()
    toks = profile_tokens(model.cfg.d_vocab, batch=2, pos=5)
    _, part = model.run_with_cache(toks, names_filter=lambda n: n.endswith("hook_resid_pre"))
    with pytest.raises(InputError, match="lacks hook points"):
        lp.smoothing_profile(model, cache=part)
    with pytest.raises(InputError, match="lacks hook points"):
        lp.dominance(model, cache=part, progress=False)
    with pytest.raises(InputError, match="tokens"):
        lp.smoothing_profile(model)
