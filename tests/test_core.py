"""The extraction core: Jacobians through hooks, and the guard that keeps the model intact."""

from __future__ import annotations

import pytest
import torch

import lensprobe as lp
from lensprobe.core import capture_acts


def _x0(model, toks, hook="blocks.0.hook_resid_pre"):
    with lp.guard(model):
        return capture_acts(model, toks, [hook])[hook]


@pytest.fixture
def model_and_tokens(tiny):
    model = tiny(n_layers=2, d_model=12, n_heads=3, positional="rotary")
    toks = torch.tensor([[3, 1, 4, 1, 5, 9]])
    return model, toks


def _fd_jacobian(fn, x, eps=1e-6):
    """Central finite differences, one input coordinate at a time (float64)."""
    y0 = fn(x)
    cols = []
    flat = x.reshape(-1)
    for i in range(flat.numel()):
        e = torch.zeros_like(flat)
        e[i] = eps
        cols.append((fn((flat + e).reshape(x.shape)) - fn((flat - e).reshape(x.shape))) / (2 * eps))
    return torch.stack(cols, dim=-1).reshape(*y0.shape, *x.shape)


def _loop_jacobian(fn, x):
    """One plain autograd.grad per output entry."""
    x = x.detach().requires_grad_(True)
    y = fn(x)
    rows = []
    for i in range(y.numel()):
        (g,) = torch.autograd.grad(y.reshape(-1)[i], x, retain_graph=True)
        rows.append(g)
    return torch.stack(rows).reshape(*y.shape, *x.shape)


@pytest.mark.parametrize("mode", ["rev", "fwd"])
def test_jacobian_matches_finite_differences_and_row_loop(model_and_tokens, mode):
    model, toks = model_and_tokens
    x0 = _x0(model, toks)
    with lp.guard(model):
        fn = lp.hooked_fn(
            model, toks, "blocks.0.hook_resid_pre", "ln_final.hook_normalized",
            select=lambda y: y[:, -2:],
        )
        jac = lp.jacobian(fn, x0, mode=mode, chunk_size=5)
        with torch.no_grad():
            fd = _fd_jacobian(fn, x0)
        loop = _loop_jacobian(fn, x0)
    assert jac.shape == (1, 2, 12, 1, 6, 12)
    torch.testing.assert_close(jac, loop, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(jac, fd, rtol=1e-6, atol=1e-7)
    # causal model: the last outputs cannot depend on nothing at all, and earlier outputs
    # (position 4) must not depend on the last input position (5).
    assert jac[0, 0, :, 0, 5].abs().max() == 0
    assert jac[0, 1, :, 0, 0].abs().max() > 0


def test_vjp_rows_memory_bound_changes_chunks_not_results(model_and_tokens):
    model, toks = model_and_tokens
    x0 = _x0(model, toks)
    with lp.guard(model):
        fn = lp.hooked_fn(model, toks, "blocks.0.hook_resid_pre", "blocks.1.hook_resid_post")
        cot = torch.randn(7, *fn(x0).shape, dtype=x0.dtype, generator=torch.Generator().manual_seed(0))
        a = lp.vjp_rows(fn, x0, cot, chunk_size=7)
        b = lp.vjp_rows(fn, x0, cot, max_memory_mb=1e-3)  # forces chunks of one
        loop = torch.stack([_single_vjp(fn, x0, c) for c in cot])
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, loop)


def _single_vjp(fn, x0, c):
    x = x0.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(x), x, grad_outputs=c)
    return g


def test_torch_func_transforms_apply(model_and_tokens):
    model, toks = model_and_tokens
    x0 = _x0(model, toks)
    with lp.guard(model):
        fn = lp.hooked_fn(model, toks, "blocks.0.hook_resid_pre", "blocks.0.hook_resid_post")
        jr = torch.func.jacrev(fn)(x0)
        v = torch.randn_like(x0)
        _, jv = torch.func.jvp(fn, (x0,), (v,))
    torch.testing.assert_close(jv, torch.einsum("abcdef,def->abc", jr, v))


def test_run_hooked_stops_early_and_injects(model_and_tokens):
    model, toks = model_and_tokens
    seen = []
    with lp.guard(model):
        model.add_hook("blocks.1.hook_resid_post", lambda t, hook: seen.append(1))
        out = lp.run_hooked(model, toks, ["blocks.0.hook_resid_post"])
        assert seen == []  # the forward pass stopped before block 1
        full = lp.run_hooked(model, toks, ["blocks.0.hook_resid_post"], stop_early=False)
        assert seen == [1] and "logits" in full
        zero = lp.run_hooked(
            model, toks, ["blocks.0.hook_resid_post"],
            inject={"blocks.0.hook_attn_out": torch.zeros(1, 6, 12, dtype=torch.float64),
                    "blocks.0.hook_mlp_out": lambda a: a * 0},
        )
        pre = lp.run_hooked(model, toks, ["blocks.0.hook_resid_pre"])
    torch.testing.assert_close(zero["blocks.0.hook_resid_post"], pre["blocks.0.hook_resid_pre"])
    assert not torch.equal(out["blocks.0.hook_resid_post"], pre["blocks.0.hook_resid_pre"])


# --------------------------------------------------------------------------- the guard
def _user_setup(model):
    """A user's model in a state the guard must not touch."""
    calls = []
    model.train()
    model.blocks[0].eval()  # mixed training flags
    first = next(model.parameters())
    first.requires_grad_(False)
    model.add_hook("blocks.0.hook_resid_post", lambda t, hook: calls.append("temp"))
    model.add_hook("blocks.1.hook_resid_post", lambda t, hook: calls.append("perm"), is_permanent=True)
    return calls


def test_guard_restores_everything_on_success(tiny, fingerprint):
    model = tiny()
    calls = _user_setup(model)
    before = fingerprint(model)
    toks = torch.tensor([[1, 2, 3, 4]])
    with lp.guard(model):
        assert not model.training and all(not p.requires_grad for p in model.parameters())
        x0 = capture_acts(model, toks, ["blocks.0.hook_resid_pre"])["blocks.0.hook_resid_pre"]
        fn = lp.hooked_fn(model, toks, "blocks.0.hook_resid_pre", "ln_final.hook_normalized")
        lp.jacobian(fn, x0[:, :1].expand_as(x0).contiguous(), chunk_size=4)
        model.add_hook("blocks.0.hook_resid_mid", lambda t, hook: t)  # a stray hook, to be removed
    assert fingerprint(model) == before
    calls.clear()
    model(toks)
    assert calls == ["temp", "perm"]  # the user's hooks still fire, in order


def test_guard_restores_everything_when_extractor_raises(tiny, fingerprint):
    model = tiny()
    _user_setup(model)
    before = fingerprint(model)
    toks = torch.tensor([[1, 2, 3, 4]])

    def explode(act):
        raise RuntimeError("boom in layer 1")

    with pytest.raises(RuntimeError, match="boom"):
        with lp.guard(model):
            model.add_hook("blocks.0.hook_resid_mid", lambda t, hook: t)
            lp.run_hooked(model, toks, ["ln_final.hook_normalized"],
                          inject={"blocks.1.hook_resid_pre": explode})
    assert fingerprint(model) == before


def test_guard_rejects_non_transformerlens_models():
    with pytest.raises(lp.ModelError, match="TransformerLens model"):
        with lp.guard(torch.nn.Linear(3, 3)):
            pass


def test_nan_activations_are_reported(tiny, fingerprint):
    model = tiny()
    sd = lp._tl.portable_state_dict(model)
    sd["blocks.1.attn.W_V"] = torch.full_like(sd["blocks.1.attn.W_V"], float("nan"))
    lp._tl.load_portable_state_dict(model, sd)
    before = fingerprint(model)
    with pytest.raises(lp.NonFiniteError, match="NaN/inf"):
        with lp.guard(model):
            lp.run_hooked(model, torch.tensor([[1, 2, 3]]), ["blocks.1.hook_resid_post"], check=True)
    assert fingerprint(model) == before


def _processed(model):
    """TransformerLens's own weight processing: compatibility mode / process_weights_."""
    if lp._tl.is_bridge(model):
        model.enable_compatibility_mode(disable_warnings=True)
    else:
        model.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
    return model


def test_core_on_processed_models(tiny, fingerprint):
    """Compatibility-mode bridges / folded HookedTransformers: same function, guard intact."""
    raw = tiny(n_layers=2, d_model=12, n_heads=3)
    toks = torch.tensor([[3, 1, 4, 1, 5]])
    x0 = _x0(raw, toks)
    processed = _processed(tiny(n_layers=2, d_model=12, n_heads=3))
    assert lp._tl.is_folded(processed)
    before = fingerprint(processed)
    outs = []
    for model in (raw, processed):
        with lp.guard(model):
            fn = lp.hooked_fn(model, toks, "blocks.0.hook_resid_pre", "logits",
                              select=lambda y: y[:, -1].log_softmax(-1))
            outs.append(fn(x0))
            jac = lp.jacobian(fn, x0, chunk_size=4)
            with torch.no_grad():
                fd = _fd_jacobian(fn, x0)
        torch.testing.assert_close(jac, fd, rtol=1e-5, atol=1e-6)
    # folding and centring leave the model's function (log-probabilities) unchanged
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    assert fingerprint(processed) == before
