"""Over-squashing and collapse (Barbero et al. 2024) against independent computations:
per-row autograd loops, float64 finite differences, closed forms for uniform attention,
dense matrix products, direct model runs."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import lensprobe as lp
from lensprobe._tl import final_hook
from lensprobe.oversquash import collapse_curve, path_bound, sensitivity

SRC = "blocks.0.hook_resid_pre"


def _forward_with(model, toks, source, x, target):
    """y = target activation when ``x`` replaces the activation at ``source`` (plain hooks)."""
    box = {}

    def put(act, hook):
        return x

    def grab(act, hook):
        box["y"] = act
        return act

    model.run_with_hooks(toks, fwd_hooks=[(source, put), (target, grab)])
    return box["y"]


def _clean_source(model, toks, source=SRC):
    box = {}

    def grab(act, hook):
        box["x"] = act.detach().clone()
        return act

    with torch.no_grad():
        model.run_with_hooks(toks, fwd_hooks=[(source, grab)])
    return box["x"]


class Boom(RuntimeError):
    pass


def _bomb(model, name, after):
    """A user hook that lets ``after`` forward passes through, then raises."""
    calls = {"n": 0}

    def hook(act, hook):
        calls["n"] += 1
        if calls["n"] > after:
            raise Boom("user hook failed")
        return act

    model.hook_dict[name].add_hook(hook)


def _brute_norms(model, toks, target, position):
    """[B, N] Frobenius norms from one autograd.grad call per output row and prompt."""
    for p in model.parameters():
        p.requires_grad_(False)
    x = _clean_source(model, toks).requires_grad_(True)
    y = _forward_with(model, toks, SRC, x, target)[:, position]
    B, N = toks.shape
    sq = torch.zeros(B, N, dtype=torch.float64)
    for b in range(B):
        for r in range(y.shape[-1]):
            (g,) = torch.autograd.grad(y[b, r], x, retain_graph=True)
            sq[b] += g[b].pow(2).sum(-1)
    return sq.sqrt()


def _fd_jacobian(model, toks, target, position, b, i, h=1e-6):
    """d y[b, position] / d x[b, i] by central differences, [d_out, d_in]."""
    x0 = _clean_source(model, toks)
    cols = []
    with torch.no_grad():
        for k in range(x0.shape[-1]):
            xp, xm = x0.clone(), x0.clone()
            xp[b, i, k] += h
            xm[b, i, k] -= h
            yp = _forward_with(model, toks, SRC, xp, target)[b, position]
            ym = _forward_with(model, toks, SRC, xm, target)[b, position]
            cols.append((yp - ym) / (2 * h))
    return torch.stack(cols, -1)


@pytest.fixture
def toks():
    return torch.randint(0, 12, (2, 7), generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------- sensitivity
@pytest.mark.parametrize("positional", ["standard", "rotary"])
def test_exact_sensitivity_matches_per_row_autograd_loop(tiny, toks, positional):
    model = tiny(positional=positional)
    res = sensitivity(model, toks, per_layer=True, progress=False)
    assert res.target_hooks == ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post",
                           final_hook(model))
    assert res.norms.shape == (3, 2, 7)
    for t, target in enumerate(res.target_hooks):
        ref = _brute_norms(copy.deepcopy(model), toks, target, -1)
        torch.testing.assert_close(res.norms[t], ref, rtol=1e-10, atol=1e-12)


def test_exact_and_spectral_match_finite_differences(tiny, toks):
    model = tiny()
    res = sensitivity(model, toks, position=4, spectral=True, chunk_size=5, progress=False)
    probe = copy.deepcopy(model)
    for b, i in [(0, 0), (0, 4), (1, 2)]:
        J = _fd_jacobian(probe, toks, final_hook(model), 4, b, i)
        assert math.isclose(float(res.profile[b, i]), float(torch.linalg.norm(J)), rel_tol=1e-6)
        s_max = float(torch.linalg.svdvals(J)[0])
        assert math.isclose(float(res.spectral[0, b, i]), s_max, rel_tol=1e-6)
    # causal: tokens after the target position have no influence at all
    assert torch.all(res.profile[:, 5:] == 0)
    torch.testing.assert_close(res.relative.sum(-1), torch.ones(2, dtype=torch.float64))


def test_hook_embed_source_and_resid_post_target(tiny, toks):
    model = tiny()
    res = sensitivity(model, toks, source_hook="hook_embed", target_hook="blocks.1.hook_resid_post",
                      progress=False)
    # hook_embed feeds resid_pre additively (resid_pre = embed + pos): same Jacobian
    ref = _brute_norms(copy.deepcopy(model), toks, "blocks.1.hook_resid_post", -1)
    torch.testing.assert_close(res.profile, ref, rtol=1e-10, atol=1e-12)


def test_hutchinson_estimator_is_unbiased_with_honest_stderr(tiny, toks):
    model = tiny()
    exact = sensitivity(model, toks, progress=False).profile
    est = sensitivity(model, toks, method="hutchinson", n_probes=400, seed=3, progress=False)
    assert est.stderr is not None and torch.all(est.stderr > 0)
    z = (est.profile - exact).abs() / est.stderr[-1]
    assert float(z.max()) < 4.5
    assert float(((est.profile - exact).abs() / exact).max()) < 0.2
    few = sensitivity(model, toks, method="hutchinson", n_probes=25, seed=3, progress=False)
    # standard error shrinks like 1/sqrt(k): 400 probes vs 25 -> ~4x smaller
    ratio = float((few.stderr[-1] / est.stderr[-1]).median())
    assert 2.5 < ratio < 6.5


def test_sensitivity_result_views(tiny, toks):
    import matplotlib

    matplotlib.use("Agg")
    model = tiny(vocab=[f"w{i}" for i in range(12)])
    res = sensitivity(model, toks, method="hutchinson", n_probes=8, progress=False)
    df = res.to_dataframe()
    assert len(df) == 2 * 7 and {"norm", "relative", "stderr", "token"} <= set(df.columns)
    assert df.loc[(df.prompt == 1) & (df.pos == 3), "norm"].item() == pytest.approx(
        float(res.profile[1, 3]))
    assert df.token.iloc[0] == f"w{int(toks[0, 0])}"
    fig = res.plot()
    assert fig.axes[0].get_yscale() == "log"
    html = res.show().to_html()
    assert "ColoredTokens" in html and "w%d" % int(toks[0, 0]) in html


def test_sensitivity_leaves_model_untouched(tiny, toks, fingerprint):
    model = tiny(attn_only=True)
    model.train()
    _bomb(model, "blocks.1.hook_resid_post", after=2)
    before = fingerprint(model)
    sensitivity(model, toks, spectral=True, progress=False)  # capture + VJP forward
    assert fingerprint(model) == before
    with pytest.raises(Boom):  # the capture passes, the VJP forward raises
        sensitivity(model, toks, progress=False)
    assert fingerprint(model) == before
    assert model.training


def test_sensitivity_input_errors(tiny, toks):
    model = tiny()
    with pytest.raises(lp.InputError, match="position"):
        sensitivity(model, toks, position=7, progress=False)
    with pytest.raises(lp.InputError, match="method"):
        sensitivity(model, toks, method="svd", progress=False)
    with pytest.raises(lp.InputError, match="spectral"):
        sensitivity(model, toks, method="hutchinson", spectral=True, progress=False)
    with pytest.raises(lp.InputError, match="n_probes"):
        sensitivity(model, toks, method="hutchinson", n_probes=1, progress=False)
    with pytest.raises(lp.InputError, match="no hook point"):
        sensitivity(model, toks, target_hook="ln_final.hook_normalised", progress=False)
    with pytest.raises(lp.InputError, match="n_ctx"):
        sensitivity(model, torch.zeros(1, 40, dtype=torch.long), progress=False)


# --------------------------------------------------------------------------- path bound
def _zero_queries(model):
    """Make every attention pattern uniform over the causal window (q = 0 -> scores 0)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("attn.W_Q", "attn.b_Q")) or ".q." in name:
                p.zero_()


def _harmonic(k):
    return sum(1.0 / j for j in range(1, k + 1))


@pytest.mark.parametrize("n_layers", [1, 2])
def test_bound_for_uniform_causal_attention_is_the_closed_form(tiny, n_layers):
    model = tiny(n_layers=n_layers)
    _zero_queries(model)
    N = 9
    toks = torch.randint(0, 12, (1, N), generator=torch.Generator().manual_seed(0))
    res = path_bound(model, toks, compare=False)
    pos = N - 1  # 0-indexed last position n; uniform attention A[q, k] = 1 / (q + 1), k <= q
    for i in range(N):
        if n_layers == 1:  # [A + I]_{n,i}
            expect = 1 / (pos + 1) + (i == pos)
        else:  # sum_k (A + I)_{n,k} (A + I)_{k,i} with harmonic numbers
            expect = (_harmonic(pos + 1) - _harmonic(i)) / (pos + 1) + 2 / (pos + 1) + (i == pos)
        assert float(res.bound[0, i]) == pytest.approx(expect, rel=1e-12)
    half = path_bound(model, toks, compare=False, normalise=True)
    torch.testing.assert_close(half.bound, res.bound / 2**n_layers)
    summed = path_bound(model, toks, compare=False, reduce_heads="sum")  # 2 heads: A -> 2A
    if n_layers == 1:
        expect = torch.tensor([2 / N] * (N - 1) + [2 / N + 1], dtype=torch.float64)
        torch.testing.assert_close(summed.bound[0], expect)
    each = path_bound(model, toks, compare=False, reduce_heads="none")
    assert each.bound.shape == (2, 1, N)
    torch.testing.assert_close(each.bound[0], res.bound)


def test_bound_equals_dense_product_and_spearman_by_hand(tiny, toks):
    model = tiny(n_layers=3)
    res = path_bound(model, toks, position=5, progress=False)
    _, cache = model.run_with_cache(toks)
    for b in range(2):
        mats = [cache[f"blocks.{l}.attn.hook_pattern"][b].mean(0).double() + torch.eye(7,
                dtype=torch.float64) for l in range(3)]
        dense = mats[2] @ mats[1] @ mats[0]
        torch.testing.assert_close(res.bound[b], dense[5], rtol=1e-10, atol=1e-12)
        m, bd = res.measured[b, :6], res.bound[b, :6]
        rank = lambda v: v.argsort().argsort().double()  # noqa: E731 (no ties here)
        rm, rb = rank(m) - rank(m).mean(), rank(bd) - rank(bd).mean()
        rho = float((rm * rb).sum() / (rm.norm() * rb.norm()))
        assert float(res.spearman[b]) == pytest.approx(rho, abs=1e-12)
        torch.testing.assert_close(res.ratio[b, :6], res.measured[b, :6] / res.bound[b, :6])
        assert math.isnan(float(res.ratio[b, 6]))
    sens = sensitivity(model, toks, position=5, progress=False)
    torch.testing.assert_close(res.measured, sens.profile.double())
    assert torch.all(res.bound[:, 6] == 0)  # causal: no path from the future
    df = res.to_dataframe()
    assert len(df) == 14 and {"bound", "measured", "ratio"} <= set(df.columns)
    res.plot()
    assert "ColoredTokens" in res.show().to_html()


def test_path_bound_leaves_model_untouched(tiny, toks, fingerprint):
    model = tiny()
    _bomb(model, "blocks.1.hook_resid_post", after=3)
    before = fingerprint(model)
    path_bound(model, toks, progress=False)  # patterns, capture, VJP forward
    with pytest.raises(Boom):  # fails inside, after the patterns were read
        path_bound(model, toks, progress=False)
    assert fingerprint(model) == before
    with pytest.raises(lp.InputError, match="reduce_heads"):
        path_bound(model, toks, reduce_heads="max")
    with pytest.raises(lp.InputError, match="beta"):
        path_bound(model, toks, beta=0)


def _assert_same_bound(a, b):
    for f in ("bound", "measured", "spearman", "ratio"):
        x, y = getattr(a, f), getattr(b, f)
        assert (x is None) == (y is None), f
        if x is not None:
            assert torch.equal(x.isnan(), y.isnan()) and torch.equal(x.nan_to_num(), y.nan_to_num()), f


def test_path_bound_from_a_cache_gives_the_numbers_of_tokens(tiny, toks):
    model = tiny(n_layers=3)
    _, cache = model.run_with_cache(toks)
    for kw in ({}, {"reduce_heads": "sum", "normalise": True}, {"reduce_heads": "none", "compare": False}):
        ref = path_bound(model, toks, position=5, progress=False, **kw)
        got = path_bound(model, toks, cache=cache, position=5, progress=False, **kw)
        _assert_same_bound(ref, got)
        assert got.str_tokens == ref.str_tokens and torch.equal(got.tokens, ref.tokens)
    # the cache alone: no forward pass is needed for the bound
    alone = path_bound(model, cache=cache, position=5, compare=False)
    assert torch.equal(alone.bound, path_bound(model, toks, position=5, compare=False).bound)
    assert alone.tokens is None and len(alone.to_dataframe()) == 14
    assert "ColoredTokens" in alone.show().to_html()
    only = {k: v for k, v in cache.items() if "hook_pattern" in k}
    assert torch.equal(path_bound(model, cache=only, position=5, compare=False).bound, alone.bound)


def test_path_bound_cache_errors(tiny, toks):
    model = tiny()
    _, cache = model.run_with_cache(toks, names_filter=lambda n: n.endswith("hook_resid_post"))
    with pytest.raises(lp.InputError, match="lacks hook points"):
        path_bound(model, toks, cache=cache, progress=False)
    _, cache = model.run_with_cache(toks)
    with pytest.raises(lp.InputError, match="sensitivity, which needs tokens"):
        path_bound(model, cache=cache)
    with pytest.raises(lp.InputError, match="tokens the cache was computed on"):
        path_bound(model, toks[:1], cache=cache, compare=False)
    with pytest.raises(lp.InputError, match="tokens"):
        path_bound(model, compare=False)


def test_old_names_warn_and_give_the_same_numbers(tiny, toks):
    model = tiny()
    new = sensitivity(model, toks, source_hook="hook_embed", target_hook="blocks.1.hook_resid_post",
                      progress=False)
    with pytest.warns(DeprecationWarning, match="target_hook"):
        old = sensitivity(model, toks, source_hook="hook_embed", target="blocks.1.hook_resid_post",
                          progress=False)
    assert torch.equal(old.norms, new.norms)
    with pytest.warns(DeprecationWarning, match="source_hook"):
        old = sensitivity(model, toks, source="hook_embed", target_hook="blocks.1.hook_resid_post",
                          progress=False)
    assert torch.equal(old.norms, new.norms) and old.source_hook == "hook_embed"
    for old_kw, new_kw in [({"heads": "sum"}, {"reduce_heads": "sum"}),
                           ({"heads": "each"}, {"reduce_heads": "none"}),
                           ({"reduce_heads": "each"}, {"reduce_heads": "none"})]:
        ref = path_bound(model, toks, compare=False, **new_kw)
        with pytest.warns(DeprecationWarning, match="reduce_heads"):
            got = path_bound(model, toks, compare=False, **old_kw)
        assert torch.equal(got.bound, ref.bound) and got.reduce_heads == ref.reduce_heads
    with pytest.raises(lp.InputError, match="reduce_heads= only"):
        path_bound(model, toks, heads="sum", reduce_heads="mean")


# --------------------------------------------------------------------------- collapse
LONG = [8, 32, 128, 512, 1024]


def test_pair_spec_and_dtype_names_give_the_same_curve(tiny):
    model = tiny(positional="rotary", n_ctx=40)
    kw = dict(bos=3, separator=4, every=3, one=5)
    ref = collapse_curve(model, "ones", [2, 5, 9], precisions=("bfloat16",), progress=False, **kw)
    spec = lp.CollapsePair("ones", **kw)
    for got in (collapse_curve(model, spec, [2, 5, 9], precisions=(torch.bfloat16,), progress=False),
                collapse_curve(model, lp.CollapsePair("ones"), [2, 5, 9], precisions=("bfloat16",),
                               reference_dtype="float64", progress=False, **kw)):
        assert got.pair == "ones" and got.reference_dtype == "float64" and list(got.low) == ["bfloat16"]
        for h in ref.hooks:
            assert torch.equal(got.distances[h], ref.distances[h])
            assert torch.equal(got.low["bfloat16"].identical[h], ref.low["bfloat16"].identical[h])
    seqs = lp.oversquash.pair_sequences("ones", 5, **kw)
    assert seqs == ([3, 5, 5, 5, 4, 5, 5], [3, 5, 5, 5, 4, 5, 5, 5])
    assert ref.seq_lengths[1].tolist() == [7, 8]
    with pytest.raises(lp.InputError, match="unknown keywords"):
        collapse_curve(model, "ones", [2], progress=False, bso=3)
    with pytest.raises(lp.InputError, match="callable pair takes none"):
        collapse_curve(model, lambda n: ([1] * n, [1] * (n + 1)), [2], progress=False, bos=3)
    with pytest.raises(lp.InputError, match="reference_dtype"):
        collapse_curve(model, "ones", [2], reference_dtype="float8", progress=False)


def test_repeated_final_token_decays_like_one_over_n(tiny):
    nope = tiny(n_ctx=1100, positional="none")
    c = collapse_curve(nope, "repeat_last", LONG, precisions=(), fit_min=32, progress=False)
    assert -1.25 < c.slope(metric="linf") < -0.75
    assert -1.25 < c.slope(metric="l1") < -0.75
    assert torch.all(c.distance(metric="l2").diff() < 0)
    rot = tiny(n_ctx=1100, positional="rotary")
    c = collapse_curve(rot, "repeat_last", LONG, prefix="ones", final=0, precisions=(),
                       fit_min=32, progress=False)
    assert -1.3 < c.slope(metric="linf") < -0.75
    # negative control: changing the last token does not collapse
    for model in (nope, rot):
        ctl = collapse_curve(model, "change_last", LONG, precisions=(), progress=False)
        d = ctl.distance(metric="l2")
        assert float(d[-1]) > 0.5 * float(d[0]) and float(d[-1]) > 0.1
        assert ctl.slope(metric="l2") > -0.2


def test_bos_ones_decays_faster_than_repeated_final_token(tiny):
    model = tiny(n_ctx=1100, positional="none")
    rep = collapse_curve(model, "repeat_last", LONG, precisions=(), fit_min=32, progress=False)
    bos = collapse_curve(model, "ones", LONG, bos=2, precisions=(), fit_min=32, progress=False)
    assert bos.slope() < rep.slope() - 0.5
    assert bos.slope() < -1.6  # ~ n^-2: one of n identical tokens changes weight


def test_nope_bidirectional_equal_ratios_are_identical(tiny):
    model = tiny(positional="none", causal=False, n_ctx=64)

    def equal_ratios(n):
        return [1] * n + [0] * n + [2] * n, [1] * (2 * n) + [0] * (2 * n) + [2] * (2 * n)

    c = collapse_curve(model, equal_ratios, [1, 3, 5], precisions=(), progress=False)
    for h in c.hooks:
        assert float(c.distances[h].max()) < 1e-12
    causal = tiny(positional="none", n_ctx=64)
    c = collapse_curve(causal, equal_ratios, [1, 3, 5], precisions=(), progress=False)
    assert float(c.distance(metric="linf").min()) > 1e-4  # causal order breaks the symmetry


def _last_acts(model, seq, hooks):
    box = {}

    def grab(act, hook, name):
        box[name] = act[0, -1].detach().clone()
        return act

    fwd = [(h, lambda a, hook, h=h: grab(a, hook, h)) for h in hooks]
    with torch.no_grad():
        logits = model.run_with_hooks(torch.tensor([seq]), fwd_hooks=fwd)
    return box, int(logits[0, -1].argmax())


def test_distances_and_low_precision_match_direct_runs(tiny, fingerprint):
    model = tiny(positional="rotary", n_ctx=80, dtype=torch.float32)
    before = fingerprint(model)
    lengths = [2, 5, 20]
    c = collapse_curve(model, "ones", lengths, bos=3, separator=4, every=3,
                       precisions=("bfloat16",), progress=False)
    assert fingerprint(model) == before
    assert next(model.parameters()).dtype == torch.float32 and model.cfg.dtype == torch.float32
    assert c.hooks == ("blocks.1.hook_resid_post", final_hook(model), "blocks.1.attn.hook_z")
    ref = copy.deepcopy(model).to(torch.float64)
    low = copy.deepcopy(model).to(torch.bfloat16)
    for li, n in enumerate(lengths):
        items_a, items_b = [1] * n, [1] * (n + 1)
        sep = lambda s: [t for k, x in enumerate(s, 1) for t in ([x, 4] if k % 3 == 0 and k < len(s) else [x])]  # noqa: E731,E501
        a, b = [3] + sep(items_a), [3] + sep(items_b)
        assert c.seq_lengths[li].tolist() == [len(a), len(b)]
        ra, ta = _last_acts(ref, a, c.hooks)
        rb, tb = _last_acts(ref, b, c.hooks)
        for h in c.hooks:
            diff = (ra[h] - rb[h]).reshape(ra[h].shape[0] if ra[h].ndim == 2 else 1, -1).abs()
            l1, l2, linf = diff.sum(-1), diff.pow(2).sum(-1).sqrt(), diff.amax(-1)
            got = c.distances[h][li]
            torch.testing.assert_close(got, torch.stack([l1, l2, linf], -1), rtol=1e-9, atol=1e-12)
        z = c.distances["blocks.1.attn.hook_z"][li, :, 2]
        assert float(c.distance("blocks.1.attn.hook_z", "linf", "max")[li]) == float(z.max())
        assert float(c.distance("blocks.1.attn.hook_z", "linf", "min")[li]) == float(z.min())
        assert bool(c.top_same[li]) == (ta == tb)
        la, lta = _last_acts(low, a, c.hooks)
        lb, ltb = _last_acts(low, b, c.hooks)
        run = c.low["bfloat16"]
        h = "blocks.1.hook_resid_post"
        assert float(run.identical[h][li, 0]) == pytest.approx(float((la[h] == lb[h]).double().mean()))
        assert bool(run.top_same[li]) == (lta == ltb)
        assert run.top_matches_reference[li].tolist() == [lta == ta, ltb == tb]


def test_thresholds_follow_the_epsilons(tiny):
    model = tiny(n_ctx=1100, positional="none")
    c = collapse_curve(model, "ones", LONG, bos=2, precisions=("bfloat16", "float16"),
                       fit_min=32, progress=False)
    curve = c.distance(metric="linf").tolist()
    eps = {"bfloat16": 2.0**-7, "float16": 2.0**-10, "float32": 2.0**-23}
    for name, e in eps.items():  # brute force: first swept n after which all stay below eps
        expect = float("nan")
        for j, n in enumerate(LONG):
            if all(d < e for d in curve[j:]):
                expect = float(n)
                break
        got = c.thresholds[name]
        assert (math.isnan(got) and math.isnan(expect)) or got == expect
    found = [c.thresholds[k] for k in eps if not math.isnan(c.thresholds[k])]
    assert found == sorted(found) and len(set(found)) == len(found) and len(found) >= 2
    fit = [c.thresholds_fit[k] for k in eps]
    assert fit[0] < fit[1] < fit[2]
    s, n_bf = c.slope(), c.thresholds_fit["bfloat16"]
    # the fitted power law passes eps_bf16 at n*: check against the fit through two points
    assert c.eps["bfloat16"] == eps["bfloat16"]
    assert s < -1.5 and 8 < n_bf < 1024
    # the bf16 run: past the fp16/bf16 thresholds the two last tokens become identical
    ident = c.low["bfloat16"].identical["blocks.1.hook_resid_post"][:, 0]
    assert float(ident[-1]) > float(ident[0])
    assert bool(c.low["bfloat16"].top_same[-1])
    df = c.to_dataframe()
    assert set(df.dtype) == {"float64", "bfloat16", "float16"}
    assert c.plot().axes[0].get_xscale() == "log"
    assert "n* (sweep)" in c.show().to_html()


def test_collapse_errors_and_model_untouched(tiny, fingerprint):
    model = tiny(attn_only=True, n_ctx=40)
    before = fingerprint(model)
    with pytest.raises(lp.InputError, match="n_ctx"):
        collapse_curve(model, "ones", [50], progress=False)
    with pytest.raises(lp.InputError, match="unknown pair"):
        collapse_curve(model, "twos", progress=False)
    with pytest.raises(lp.InputError, match="precision"):
        collapse_curve(model, "ones", [4], precisions=("int8",), progress=False)
    with pytest.raises(lp.InputError, match="every"):
        collapse_curve(model, "ones", [4], separator=5, progress=False)
    default = collapse_curve(model, "change_last", precisions=(), progress=False)
    assert default.lengths.tolist() == [2, 4, 8, 16, 32]
    _bomb(model, "blocks.1.hook_resid_post", after=1)
    before = fingerprint(model)
    with pytest.raises(Boom):  # the float64 copy runs, the bf16 copy's forward raises
        collapse_curve(model, "ones", [4], progress=False)
    assert fingerprint(model) == before
