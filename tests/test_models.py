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
