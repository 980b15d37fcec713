"""The real-text model (zoo 'shakespeare'), trained vs initialised, and the induction analysis.

Each claim is one that holds across seeds of the random prompts, checked against a plain
computation written here: attention read from TransformerLens hooks, losses from logits,
composition scores from the Hugging Face weights on disk, Jacobians from autograd.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import lensprobe as lp
from lensprobe import induction

RESULTS = Path(lp.zoo.__file__).parent / "results"


# --------------------------------------------------------------------------- plain helpers
def plain_patterns(model, toks):
    """{layer: [b, H, q, k]} captured by a hook written here."""
    got = {}

    def keep(layer):
        def hook(act, hook):
            got[layer] = act.detach().double().clone()
        return hook

    hooks = [(f"blocks.{l}.attn.hook_pattern", keep(l)) for l in range(model.cfg.n_layers)]
    with torch.no_grad():
        model.run_with_hooks(toks, fwd_hooks=hooks)
    return got


def plain_scores(model, toks, half):
    """Previous-token and induction scores by loops over the repeat's queries."""
    o = toks.shape[1] - 2 * half
    pats = plain_patterns(model, toks)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    prev, ind = torch.zeros(L, H, dtype=torch.float64), torch.zeros(L, H, dtype=torch.float64)
    for l in range(L):
        for h in range(H):
            p = i = 0.0
            n = 0
            for b in range(toks.shape[0]):
                for q in range(o + half, o + 2 * half):
                    p += float(pats[l][b, h, q, q - 1])
                    i += float(pats[l][b, h, q, q - half + 1])  # token after the first copy's
                    n += 1
            prev[l, h], ind[l, h] = p / n, i / n
    return prev, ind


def plain_half_losses(model, toks, half, hooks=()):
    o = toks.shape[1] - 2 * half
    with torch.no_grad():
        logits = model.run_with_hooks(toks, fwd_hooks=list(hooks)).double()
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), toks[:, 1:].flatten(),
                                           reduction="none").view(toks.shape[0], -1)
    # ce[:, t] is the loss of predicting token t + 1
    return float(ce[:, o: o + half - 1].mean()), float(ce[:, o + half: o + 2 * half - 1].mean())


def mean_ablate(heads):
    def hook(z, hook):
        z = z.clone()
        for h in heads:
            z[:, :, h] = z[:, :, h].mean(dim=(0, 1))
        return z
    return hook


# --------------------------------------------------------------------------- tiny model
def test_induction_heads_match_plain_loops_on_a_tiny_model(fingerprint):
    model = lp.tiny_model(n_layers=2, n_heads=2, d_model=16, d_vocab=20, n_ctx=32,
                          dtype=torch.float64, seed=4)
    before = fingerprint(model)
    res = lp.induction_heads(model, half=7, batch=3, seed=2, bos=None, threshold=0.5, progress=False)
    assert fingerprint(model) == before
    toks = res.tokens
    assert toks.shape == (3, 14) and torch.equal(toks[:, :7], toks[:, 7:])
    prev, ind = plain_scores(model, toks, 7)
    torch.testing.assert_close(res.previous_token, prev, atol=1e-12, rtol=0)
    torch.testing.assert_close(res.induction, ind, atol=1e-12, rtol=0)
    first, second = plain_half_losses(model, toks, 7)
    assert res.loss_first == pytest.approx(first, abs=1e-10)
    assert res.loss_second == pytest.approx(second, abs=1e-10)
    for l in range(2):
        for h in range(2):
            f, s = plain_half_losses(model, toks, 7, [(f"blocks.{l}.attn.hook_z", mean_ablate([h]))])
            assert float(res.ablation[l, h, 0]) == pytest.approx(f, abs=1e-10)
            assert float(res.ablation[l, h, 1]) == pytest.approx(s, abs=1e-10)
    q = torch.arange(7, 14, dtype=torch.float64)
    assert res.uniform == pytest.approx(float((1 / (q + 1)).mean()))


def test_k_composition_scores_fold_the_ln1_gain_under_grouped_query_attention():
    """Dense per-pair products from the stored weights: K/V head h // 2 serves query head
    h, and the destination's RMSNorm gain g scales both sides of its QK circuit."""
    model = lp.tiny_model(n_layers=3, n_heads=4, d_model=16, d_vocab=12, n_ctx=8, n_key_value_heads=2,
                          normalization="RMS", dtype=torch.float64, seed=3)
    sd = lp._tl.portable_state_dict(model)
    g = torch.Generator().manual_seed(0)
    for l in range(3):
        sd[f"blocks.{l}.ln1.w"] = 0.5 + torch.rand(16, generator=g, dtype=torch.float64)
    lp._tl.load_portable_state_dict(model, sd)
    sd = lp._tl.portable_state_dict(model)
    att = lambda l, name: sd[f"blocks.{l}.attn.{name}"].double()  # noqa: E731
    ov = {(l, h): att(l, "_W_V")[h // 2] @ att(l, "W_O")[h] for l in range(3) for h in range(4)}
    comp = induction.k_composition_scores(model)
    for (l1, h1), A in ov.items():
        for l2 in range(3):
            G = torch.diag(sd[f"blocks.{l2}.ln1.w"].double())
            for h2 in range(4):
                if l1 >= l2:
                    assert math.isnan(float(comp[l1, h1, l2, h2]))
                    continue
                B = (G @ att(l2, "W_Q")[h2] @ att(l2, "_W_K")[h2 // 2].T @ G).T
                want = torch.linalg.norm(A @ B) / (torch.linalg.norm(A) * torch.linalg.norm(B))
                assert float(comp[l1, h1, l2, h2]) == pytest.approx(float(want), rel=1e-9)


def test_repeated_tokens_bos_and_errors():
    model = lp.tiny_model(n_layers=1, n_heads=1, d_model=8, d_vocab=6, n_ctx=16, seed=0)
    t = induction.repeated_tokens(model, half=5, batch=40, seed=0, bos=3)
    assert t.shape == (40, 11) and bool((t[:, 0] == 3).all()) and not bool((t[:, 1:] == 3).any())
    assert set(t[:, 1:].unique().tolist()) == {0, 1, 2, 4, 5}
    with pytest.raises(lp.InputError, match="n_ctx"):
        induction.repeated_tokens(model, half=9, batch=1, bos=None)
    with pytest.raises(lp.InputError, match="repeat"):
        lp.induction_heads(model, half=4, tokens=torch.arange(8)[None] % 6, progress=False)
    with pytest.raises(lp.InputError, match="threshold"):
        lp.induction_heads(model, half=4, threshold=1.5, progress=False)


@pytest.mark.parametrize("kind", ["induction", "previous_token"])
def test_induction_heads_read_hand_built_patterns(kind):
    """A user hook forces a known pattern; the scores must read it off (the guard keeps hooks)."""
    model = lp.tiny_model(n_layers=2, n_heads=1, d_model=8, d_vocab=50, n_ctx=64, attn_only=True)
    n = 10

    def forced(pattern, hook):
        new = torch.zeros_like(pattern)
        for i in range(pattern.shape[-1]):
            j = (i - n + 1 if i >= n else 0) if kind == "induction" else max(i - 1, 0)
            new[..., i, j] = 1.0
        return new

    model.add_hook("blocks.1.attn.hook_pattern", forced)
    res = lp.induction_heads(model, half=n, batch=2, bos=None, ablate=False, progress=False)
    other = "previous_token" if kind == "induction" else "induction"
    assert float(getattr(res, kind)[1, 0]) == pytest.approx(1.0)
    assert float(getattr(res, other)[1, 0]) == pytest.approx(0.0)
    assert res.induction_heads == (("L1H0",) if kind == "induction" else ())


# --------------------------------------------------------------------------- the real model
@pytest.fixture(scope="module")
def trained():
    return lp.zoo.load("shakespeare")


@pytest.fixture(scope="module")
def init():
    return lp.zoo.load("shakespeare", step=0)


@pytest.fixture(scope="module")
def prompts():
    data = json.loads((RESULTS / "shakespeare_prompts.json").read_text())
    return torch.tensor([p["tokens"] for p in data["passages"]])


def test_shipped_prompts_are_held_out_windows_of_the_zoo_tokenizer(trained):
    import hashlib

    data = json.loads((RESULTS / "shakespeare_prompts.json").read_text())
    tok_file = lp.zoo.path("shakespeare") / "tokenizer.json"
    assert data["tokenizer_sha256"] == hashlib.sha256(tok_file.read_bytes()).hexdigest()
    assert {p["work"] for p in data["passages"]} == set(lp.zoo.info("shakespeare")["corpus"]["heldout_works"])
    for p in data["passages"]:
        assert len(p["tokens"]) == 512 and max(p["tokens"]) < trained.cfg.d_vocab
        assert trained.tokenizer.decode(p["tokens"]) == p["text"]


def test_k_composition_matches_the_hugging_face_weights(trained):
    """GQA: key/value head h // 2 serves query heads h; the gain of the key's RMSNorm."""
    from safetensors.torch import load_file

    sd = {k: v.double() for k, v in load_file(str(lp.zoo.path("shakespeare") / "model.safetensors")).items()}
    cfg = trained.cfg
    L, H, dh = cfg.n_layers, cfg.n_heads, cfg.d_head
    rep = H // 2

    def w(l, name):
        return sd[f"model.layers.{l}.{name}.weight"]

    def ov(l, h):
        W_V = w(l, "self_attn.v_proj")[(h // rep) * dh:(h // rep + 1) * dh].T  # [d, dh]
        W_O = w(l, "self_attn.o_proj")[:, h * dh:(h + 1) * dh].T  # [dh, d]
        return W_V @ W_O

    def qk_t(l, h):  # (diag(g) W_Q W_K^T diag(g))^T
        g = torch.diag(w(l, "input_layernorm"))
        W_Q = w(l, "self_attn.q_proj")[h * dh:(h + 1) * dh].T
        W_K = w(l, "self_attn.k_proj")[(h // rep) * dh:(h // rep + 1) * dh].T
        return (g @ W_Q @ W_K.T @ g).T

    comp = induction.k_composition_scores(trained)
    for l1 in range(L):
        for l2 in range(L):
            for h1 in range(H):
                for h2 in range(H):
                    got = float(comp[l1, h1, l2, h2])
                    if l1 >= l2:
                        assert math.isnan(got)
                        continue
                    A, B = ov(l1, h1), qk_t(l2, h2)
                    want = float(torch.linalg.norm(A @ B) / (torch.linalg.norm(A) * torch.linalg.norm(B)))
                    assert got == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_training_made_previous_token_heads_and_no_induction_head(trained, init, seed, fingerprint):
    """Found, not predicted: the trained model has previous-token heads (none at step 0) but
    no induction head, and a repeated span is no cheaper to predict than its first copy."""
    half, batch = 48, 4
    toks = induction.repeated_tokens(trained, half, batch, seed=seed)
    assert int(toks[0, 0]) == trained.tokenizer.bos_token_id
    prev_t, ind_t = plain_scores(trained, toks, half)
    prev_0, ind_0 = plain_scores(init, toks, half)
    assert float(prev_t.max()) > 0.3
    assert float(prev_0.max()) < 0.05
    assert float(ind_t.max()) < 0.05 and float(ind_0.max()) < 0.05
    before = fingerprint(trained)
    res = lp.induction_heads(trained, tokens=toks, half=half, ablate=False, progress=False)
    assert fingerprint(trained) == before
    assert res.previous_token_heads and res.induction_heads == () and res.pairs == ()
    assert float(res.previous_token.max()) == pytest.approx(float(prev_t.max()), abs=1e-9)
    # in-context loss, from the logits: no gain on the repeat, trained or not
    for model in (trained, init):
        first, second = plain_half_losses(model, toks, half)
        assert abs(first - second) < 0.3


def test_no_in_context_gain_on_repeated_held_out_text(trained, prompts):
    """The same on real text: a held-out passage repeated is predicted no better the second time."""
    half = 64
    bos = trained.tokenizer.bos_token_id
    toks = torch.cat([torch.full((4, 1), bos), prompts[:4, :half], prompts[:4, :half]], dim=1)
    first, second = plain_half_losses(trained, toks, half)
    assert first < 5.0  # it does model the text
    assert abs(first - second) < 0.3
    _, ind = plain_scores(trained, toks, half)
    assert float(ind.max()) < 0.05


def test_induction_emergence_reads_each_checkpoint(trained, init):
    steps = lp.zoo.steps("shakespeare")
    first, last = steps[0], steps[-1]
    em = lp.induction_emergence({first: lambda: lp.zoo.load("shakespeare", step=first),
                                 last: lambda: lp.zoo.load("shakespeare")},
                                half=32, batch=2, progress=False)
    assert em.steps == (first, last)
    toks = induction.repeated_tokens(trained, 32, 2, seed=0)
    for c, model in enumerate((init, trained)):
        prev, ind = plain_scores(model, toks, 32)
        torch.testing.assert_close(em.induction[c], ind, atol=1e-9, rtol=0)
        torch.testing.assert_close(em.previous_token[c], prev, atol=1e-9, rtol=0)
        f, s_ = plain_half_losses(model, toks, 32)
        assert float(em.loss_first[c]) == pytest.approx(f, abs=1e-6)
        assert float(em.loss_second[c]) == pytest.approx(s_, abs=1e-6)
    assert em.emerged_at is None and em.loss_drop_at is None


def _plain_same_token_jacobian(model, toks, layer, t):
    """d (resid_post - resid_pre)_t / d resid_pre_t of block ``layer``, every other input fixed."""
    names = [f"blocks.{layer}.hook_resid_pre"]
    _, cache = model.run_with_cache(toks, names_filter=names)
    x = cache[names[0]].detach()

    def f(xt):
        x2 = x.clone()
        x2[0, t] = xt
        out = {}

        def put(act, hook):
            return x2

        def grab(act, hook):
            out["y"] = act
        model.run_with_hooks(toks, fwd_hooks=[(names[0], put), (f"blocks.{layer}.hook_resid_post", grab)],
                             stop_at_layer=None)
        return out["y"][0, t] - xt

    return torch.autograd.functional.jacobian(f, x[0, t].clone())


def _plain_coupling(J, k):
    """Mean off-diagonal 1 - m_K^2 over layer pairs (Aubry et al.), from torch.linalg.svd."""
    L = len(J)
    svd = [torch.linalg.svd(j.double()) for j in J]
    vals = []
    for i in range(L):
        for j in range(L):
            if i == j:
                continue
            U2, _, V2h = svd[j]
            s1 = svd[i][1][:k]
            M = (U2[:, :k].T @ J[i].double() @ V2h[:k].T).abs()
            m = torch.linalg.norm(M - torch.diag(s1)) / torch.linalg.norm(s1)
            vals.append(1 - m**2)
    return float(torch.stack(vals).mean())


def test_coupling_at_the_last_checkpoint_exceeds_init(trained, init, prompts):
    toks = prompts[:1, :48]
    k = 10
    plain = {}
    for name, model in (("trained", trained), ("init", init)):
        for p in model.parameters():
            p.requires_grad_(False)
        J = [_plain_same_token_jacobian(model, toks, l, 47) for l in range(model.cfg.n_layers)]
        plain[name] = _plain_coupling(J, k)
        got = lp.block_coupling(model, toks, top_k=k, progress=False).scalar(k)
        assert got == pytest.approx(plain[name], abs=2e-3)
    # small but consistent: higher after training on every held-out prompt tried
    assert plain["trained"] > plain["init"] + 0.01
    for i in (3, 6):
        toks = prompts[i:i + 1, :48]
        assert lp.block_coupling(trained, toks, top_k=k, progress=False).scalar(k) > \
            lp.block_coupling(init, toks, top_k=k, progress=False).scalar(k)


def test_shipped_findings_belong_to_the_shipped_model(trained):
    """The findings JSON was computed on the model that ships (not a stale one): its
    best induction score is recomputed here from hooks on the same sequences."""
    data = json.loads((RESULTS / "shakespeare_findings.json").read_text())
    assert data["steps"] == lp.zoo.steps("shakespeare")
    ind = data["trained"]["induction"]
    toks = induction.repeated_tokens(trained, 100, 16, seed=0)
    _, plain = plain_scores(trained, toks, 100)
    assert float(plain.max()) == pytest.approx(ind["best_induction_score"], abs=1e-3)
    assert data["init"]["induction"]["induction_heads"] == []
