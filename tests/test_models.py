"""Offline models: tiny_model options, portable checkpoints (same and cross version), load_model."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lensprobe as lp

GOLDEN = Path(__file__).parent / "golden"
NAMES = [f"blocks.{l}.hook_resid_post" for l in range(2)] + [
    f"blocks.{l}.attn.hook_pattern" for l in range(2)
]


def _acts(model, toks):
    with lp.guard(model):
        out = lp.run_hooked(model, toks, NAMES, stop_early=False)
    return out


OPTIONS = list(
    itertools.product(["standard", "rotary", "none"], ["LN", "RMS", None], [True, False])
)


@pytest.mark.parametrize("positional,norm,causal", OPTIONS)
def test_tiny_model_roundtrip(tmp_path, positional, norm, causal):
    model = lp.tiny_model(
        n_layers=2, n_heads=2, d_model=16, d_vocab=12, n_ctx=16, positional=positional,
        normalization=norm, causal=causal, attn_only=(norm == "RMS"), seed=3,
    )
    toks = torch.tensor([[0, 3, 7, 1, 1, 9], [5, 5, 5, 11, 6, 8]])
    a = _acts(model, toks)
    pattern = a["blocks.1.attn.hook_pattern"]
    upper = torch.triu(torch.ones(6, 6, dtype=torch.bool), diagonal=1)
    if causal:
        assert pattern[..., upper].abs().max() == 0
    else:
        assert pattern[..., upper].min() > 0
    if positional == "none":
        assert model.W_pos.abs().max() == 0
        assert [n for n, p in model.named_parameters() if not p.requires_grad]
    path = lp.save_checkpoint(model, tmp_path / "m.safetensors")
    loaded = lp.load_checkpoint(path)
    b = _acts(loaded, toks)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    frozen = lambda m: sorted(n for n, p in m.named_parameters() if not p.requires_grad)
    assert frozen(model) == frozen(loaded)


@pytest.mark.parametrize("name", ["gpt", "rotary_halves", "bidir"])
def test_golden_checkpoint_from_transformer_lens_2(name):
    """Written once by scripts/make_golden.py with HookedTransformer on TL 2.18."""
    model = lp.load_checkpoint(GOLDEN / f"{name}.safetensors")
    expected = load_file(str(GOLDEN / f"{name}.expected.safetensors"))
    got = _acts(model, expected["tokens"])
    for k in NAMES + ["logits"]:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-5, msg=k)


def test_tiny_model_dtype_and_vocab():
    vocab = [f"t{i}" for i in range(10)]
    model = lp.tiny_model(d_model=8, n_heads=2, d_vocab=10, n_ctx=8, dtype=torch.float64, vocab=vocab)
    assert next(model.parameters()).dtype == torch.float64
    toks = lp.to_tokens(model, "t3 t1 t4")
    assert toks.tolist() == [[3, 1, 4]]
    assert not model.training


def test_checkpoint_keeps_vocab_and_extra(tmp_path):
    vocab = [f"t{i}" for i in range(10)]
    model = lp.tiny_model(d_model=8, n_heads=2, d_vocab=10, n_ctx=8, vocab=vocab)
    path = lp.save_checkpoint(model, tmp_path / "v", extra={"step": 7})
    assert path.suffix == ".safetensors"
    loaded = lp.load_checkpoint(path)
    assert lp.to_tokens(loaded, "t9 t0").tolist() == [[9, 0]]
    assert lp.models.read_checkpoint_metadata(path)["extra"] == {"step": 7}


def test_checkpoint_errors(tmp_path):
    with pytest.raises(lp.InputError, match="does not exist"):
        lp.load_checkpoint(tmp_path / "missing.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(lp.ModelError, match="not a lensprobe checkpoint"):
        lp.load_checkpoint(tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(lp.ModelError, match="not a safetensors file"):
        lp.load_checkpoint(tmp_path / "junk.safetensors")


def test_tiny_model_bad_options():
    with pytest.raises(lp.InputError, match="positional"):
        lp.tiny_model(positional="alibi")
    with pytest.raises(lp.InputError, match="normalization"):
        lp.tiny_model(normalization="batchnorm")
    with pytest.raises(lp.InputError, match="divisible"):
        lp.tiny_model(d_model=10, n_heads=3)


# --------------------------------------------------------------------------- pretrained
def _write_tiny_gpt2(directory: Path):
    """A 2-layer GPT-2 saved as a HuggingFace directory, with a word tokenizer built here."""
    from transformers import GPT2Config, GPT2LMHeadModel

    vocab = ["<unk>", "<bos>"] + [f"w{i}" for i in range(30)]
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=len(vocab), n_positions=32, n_ctx=32,
        bos_token_id=1, eos_token_id=1,
    )
    hf = GPT2LMHeadModel(config).eval()
    hf.save_pretrained(directory)
    lp.word_tokenizer(vocab).save_pretrained(directory)
    return hf


@pytest.mark.parametrize("processed", [False, True])
def test_load_model_from_local_hf_directory(tmp_path, processed, fingerprint):
    hf = _write_tiny_gpt2(tmp_path / "gpt2-tiny")
    model = lp.load_model(tmp_path / "gpt2-tiny", processed=processed)
    assert lp._tl.is_folded(model) == processed
    toks = torch.tensor([[1, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        want = hf(toks).logits.log_softmax(-1)
        got = model(toks).log_softmax(-1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert model.to_str_tokens("w3 w4") [-2:] == ["w3", "w4"]


def test_load_model_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(lp.InputError, match="config.json"):
        lp.load_model(tmp_path / "empty")
    with pytest.raises(lp.InputError, match="does not exist"):
        lp.load_model(tmp_path / "nope.safetensors")


def test_hub_name_without_network_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(lp.ModelError, match="could not load"):
        lp.load_model("lensprobe-no-such-org/no-such-model")


@pytest.mark.parametrize("norm", ["LN", "RMS", None])
def test_final_hook_is_gamma_xhat_plus_beta(norm):
    """y = gamma * x_hat + beta on both backends (TL 4 bridges' hook_normalized is x_hat)."""
    model = lp.tiny_model(n_layers=1, d_model=16, n_heads=2, d_vocab=10, n_ctx=8,
                          dtype=torch.float64, normalization=norm, attn_only=True)
    sd = lp._tl.portable_state_dict(model)
    g = torch.Generator().manual_seed(0)
    if norm is not None:
        sd["ln_final.w"] = torch.randn(16, dtype=torch.float64, generator=g)
    if norm == "LN":
        sd["ln_final.b"] = torch.randn(16, dtype=torch.float64, generator=g)
    lp._tl.load_portable_state_dict(model, sd)
    hook = lp._tl.final_hook(model)
    with lp.guard(model):
        acts = lp.run_hooked(model, torch.tensor([[1, 2, 3]]), [hook, "blocks.0.hook_resid_post"],
                             stop_early=False)
    x = acts["blocks.0.hook_resid_post"]
    if norm == "LN":
        xc = x - x.mean(-1, keepdim=True)
        want = xc / (xc.pow(2).mean(-1, keepdim=True) + model.cfg.eps).sqrt() * sd["ln_final.w"] + sd["ln_final.b"]
    elif norm == "RMS":
        want = x / (x.pow(2).mean(-1, keepdim=True) + model.cfg.eps).sqrt()
        if lp._tl.is_bridge(model):  # HookedTransformer's RMSNorm has no hook after its gain
            want = want * sd["ln_final.w"]
    else:
        want = x
    torch.testing.assert_close(acts[hook], want, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- issue 11
def _rng_states():
    import random

    import numpy as np

    return torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()


def _assert_rng_unchanged(before):
    after = _rng_states()
    assert torch.equal(before[0], after[0]), "torch global RNG changed"
    assert before[1] == after[1], "python random changed"
    assert (before[2] == after[2]).all(), "numpy RNG changed"


def test_tiny_model_leaves_the_global_rng_alone(tmp_path):
    """Issue 11.10: tiny_model (and so priority_model) called torch.manual_seed."""
    torch.manual_seed(1234)
    before = _rng_states()
    a = lp.tiny_model(d_model=16, n_heads=2, d_vocab=10, n_ctx=8, seed=5)
    lp.priority_model(4, 8, seed=2)
    path = lp.save_checkpoint(a, tmp_path / "a")
    lp.load_checkpoint(path)  # bridges' unseeded nn.Linear init drew from the global RNG
    _assert_rng_unchanged(before)
    b = lp.tiny_model(d_model=16, n_heads=2, d_vocab=10, n_ctx=8, seed=5)
    c = lp.tiny_model(d_model=16, n_heads=2, d_vocab=10, n_ctx=8, seed=6)
    assert torch.equal(a.W_Q, b.W_Q) and not torch.equal(a.W_Q, c.W_Q)


def test_load_model_does_not_leave_hf_hub_offline_set(monkeypatch, tmp_path):
    """Issue 11.10: load_model(local_dir) set HF_HUB_OFFLINE=1 for the rest of the process."""
    import os

    import huggingface_hub.constants as hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    const = hub.HF_HUB_OFFLINE
    _write_tiny_gpt2(tmp_path / "g")
    lp.load_model(tmp_path / "g")
    assert "HF_HUB_OFFLINE" not in os.environ
    assert hub.HF_HUB_OFFLINE == const


@pytest.mark.parametrize("entry", ["tiny_model", "load_checkpoint", "load_model"])
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "gpu"])
def test_unavailable_device_is_an_input_error(entry, device, tmp_path, monkeypatch):
    """Issue 11.13: 'Torch not compiled with CUDA enabled' (AssertionError) from each entry point."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if entry == "tiny_model":
        call = lambda: lp.tiny_model(d_model=8, n_heads=2, d_vocab=10, n_ctx=8, device=device)
    elif entry == "load_checkpoint":
        path = lp.save_checkpoint(lp.tiny_model(d_model=8, n_heads=2, d_vocab=10, n_ctx=8), tmp_path / "m")
        call = lambda: lp.load_checkpoint(path, device=device)
    else:
        _write_tiny_gpt2(tmp_path / "g")
        call = lambda: lp.load_model(tmp_path / "g", device=device)
    with pytest.raises(lp.InputError, match="CUDA is not available" if "cuda" in device else "not a torch device"):
        call()


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"n_heads": 0}, "n_heads must be a positive integer"),
        ({"n_heads": -2}, "n_heads must be a positive integer"),
        ({"d_head": 0}, "d_head must be a positive integer"),
        ({"n_layers": 1.5}, "n_layers must be a positive integer"),
        ({"act_fn": "nope"}, "act_fn must be one of"),
        ({"n_key_value_heads": 3}, "must divide n_heads"),
        ({"n_key_value_heads": 0}, "n_key_value_heads must be a positive integer"),
        ({"positional": "rotary", "d_head": 3}, "even d_head"),
        ({"dtype": torch.int64}, "floating torch.dtype"),
    ],
)
def test_tiny_model_rejects_bad_sizes_and_activations(kw, match):
    """Issue 11.14: n_heads=0 raised ZeroDivisionError, act_fn='nope' a backend error."""
    opts = {"d_model": 16, "n_heads": 4, "d_vocab": 10, "n_ctx": 8}
    opts.update(kw)
    with pytest.raises(lp.InputError, match=match):
        lp.tiny_model(**opts)


@pytest.mark.parametrize("act_fn", lp.models.ACT_FNS)
def test_every_listed_activation_builds(act_fn):
    model = lp.tiny_model(d_model=8, n_heads=2, d_vocab=10, n_ctx=8, act_fn=act_fn)
    x = torch.linspace(-2, 2, 5)
    mlp = model.blocks[0].mlp
    act = getattr(mlp, "act_fn", None) or getattr(getattr(mlp, "original_component", mlp), "act", None)
    want = {
        "gelu": torch.nn.functional.gelu(x),
        "gelu_new": torch.nn.functional.gelu(x, approximate="tanh"),
        "relu": x.clamp(min=0),
        "silu": x * torch.sigmoid(x),
    }[act_fn]
    torch.testing.assert_close(act(x), want, rtol=1e-6, atol=1e-6)


def _rewrite_metadata(src, dst, **changes):
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    for k, v in changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    save_file(load_file(str(src)), str(dst), metadata=meta)
    return dst


@pytest.mark.parametrize(
    "change,match",
    [
        ({"dtype": "manual_seed"}, "dtype 'manual_seed' is not one of"),
        ({"dtype": "Tensor"}, "dtype 'Tensor' is not one of"),
        ({"config": "[1, 2]"}, "'config' is missing or not a JSON object"),
        ({"config": None}, "'config' is missing"),
        ({"config": "{not json"}, "not valid JSON"),
        ({"vocab": '["a"]'}, "'vocab' must be a list of 10 strings"),
        ({"lensprobe": '{"positional": "alibi"}'}, "positional must be one of"),
    ],
)
def test_checkpoint_metadata_is_validated(tmp_path, change, match):
    """Issue 11.15: getattr(torch, meta['dtype']) accepted 'manual_seed'."""
    model = lp.tiny_model(d_model=8, n_heads=2, d_vocab=10, n_ctx=8)
    src = lp.save_checkpoint(model, tmp_path / "ok")
    bad = _rewrite_metadata(src, tmp_path / "bad.safetensors", **change)
    with pytest.raises(lp.ModelError, match=match):
        lp.load_checkpoint(bad)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("n_layers", None, "config\\['n_layers'\\] must be a positive integer, got None"),
        ("n_heads", 0, "config\\['n_heads'\\] must be a positive integer"),
        ("d_mlp", None, "needs config\\['d_mlp'\\]"),
        ("n_key_value_heads", 3, "does not divide n_heads"),
        ("normalization_type", "BatchNorm", "normalization_type"),
        ("attention_dir", "sideways", "attention_dir"),
    ],
)
def test_checkpoint_config_schema(tmp_path, field, value, match):
    """Issue 11.15: a config without n_layers raised TypeError."""
    import json

    from safetensors import safe_open

    model = lp.tiny_model(d_model=8, n_heads=2, d_vocab=10, n_ctx=8)
    src = lp.save_checkpoint(model, tmp_path / "ok")
    with safe_open(str(src), framework="pt") as f:
        cfg = json.loads(f.metadata()["config"])
    if value is None:
        cfg.pop(field, None)
    else:
        cfg[field] = value
    bad = _rewrite_metadata(src, tmp_path / "bad.safetensors", config=json.dumps(cfg))
    with pytest.raises(lp.ModelError, match=match):
        lp.load_checkpoint(bad)


def test_hf_directory_with_only_pickle_weights_is_refused(tmp_path, monkeypatch):
    """Issue 11.15: a .bin-only directory must not be unpickled; ModelError says why."""
    hf = _write_tiny_gpt2(tmp_path / "g")
    for f in (tmp_path / "g").glob("*.safetensors"):
        f.unlink()
    torch.save(hf.state_dict(), tmp_path / "g" / "pytorch_model.bin")  # the legacy pickle format

    def no_unpickling(*a, **k):
        raise AssertionError("torch.load was called on a pickle")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(lp.ModelError, match="only pickle weights \\(pytorch_model.bin\\).*safetensors"):
        lp.load_model(tmp_path / "g")


@pytest.mark.parametrize("positional", ["standard", "rotary"])
def test_grouped_query_attention_is_repeated_kv_heads(positional, tmp_path):
    """tiny_model(n_key_value_heads=2): query head h uses K/V head h // 2, checked against a
    full multi-head model whose K/V weights are the grouped ones repeated (built by hand)."""
    opts = {"n_layers": 2, "n_heads": 4, "d_model": 16, "d_vocab": 10, "n_ctx": 8, "positional": positional,
                "dtype": torch.float64}
    gqa = lp.tiny_model(n_key_value_heads=2, **opts)
    assert gqa.cfg.n_key_value_heads == 2
    sd = lp._tl.portable_state_dict(gqa)
    assert sd["blocks.0.attn._W_K"].shape == (2, 16, 4)
    full_sd = {}
    for k, v in sd.items():
        if "._W_" in k or "._b_" in k:  # [n_kv, ...] -> [n_heads, ...], head h <- kv head h // 2
            full_sd[k.replace("._", ".")] = v.repeat_interleave(2, dim=0)
        else:
            full_sd[k] = v
    mha = lp.tiny_model(**opts)
    lp._tl.load_portable_state_dict(mha, full_sd)
    toks = torch.tensor([[1, 2, 3, 4, 5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(gqa(toks), mha(toks), rtol=0, atol=1e-10)
        # the other grouping (head h <- kv head h % 2) must not match: the test can fail
        alt = {k.replace("._", "."): v.repeat((2,) + (1,) * (v.ndim - 1)) if ("._W_" in k or "._b_" in k)
               else v for k, v in sd.items()}
        lp._tl.load_portable_state_dict(mha, alt)
        assert (gqa(toks) - mha(toks)).abs().max() > 1e-3  # the h // 2 grouping is what matched
    loaded = lp.load_checkpoint(lp.save_checkpoint(gqa, tmp_path / "gqa"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(toks), gqa(toks), rtol=0, atol=1e-10)


def test_dtype_by_name_gives_the_same_model(tmp_path):
    a = lp.tiny_model(d_model=8, n_heads=2, d_vocab=10, n_ctx=8, dtype=torch.float64, seed=3)
    b = lp.tiny_model(d_model=8, n_heads=2, d_vocab=10, n_ctx=8, dtype="float64", seed=3)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]) and v.dtype == b.state_dict()[k].dtype, k
    assert next(b.parameters()).dtype == torch.float64
    path = lp.save_checkpoint(a, tmp_path / "a.safetensors")
    assert next(lp.load_checkpoint(path, dtype="torch.float32").parameters()).dtype == torch.float32
    with pytest.raises(lp.InputError, match="floating torch.dtype"):
        lp.tiny_model(d_model=8, n_heads=2, d_vocab=10, n_ctx=8, dtype="manual_seed")
