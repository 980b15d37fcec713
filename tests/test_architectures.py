"""Real Hugging Face architectures, tiny and random, loaded from local directories.

Each directory is built by tests/hf_fixtures.py (no hub). Loading reads the architecture
from config.json on both backends and reproduces ``transformers`` logits.
"""

from __future__ import annotations

import shutil

import hf_fixtures
import pytest
import torch
from hf_fixtures import ARCHITECTURES, DEFAULT_VOCAB

import lensprobe as lp

hf_dir = hf_fixtures.hf_dir  # the session fixture

ARCHS = list(ARCHITECTURES)
TOKENS = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11, 3, 5]])  # longer than the sliding windows (4)


def _hf_logits(directory, toks):
    from transformers import AutoModelForCausalLM

    # eager: the reference implementation (transformers 4.x SDPA skips Gemma-2 soft-capping)
    hf = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    with torch.no_grad():
        return hf(toks).logits


@pytest.fixture(scope="module")
def loaded(hf_dir):
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = lp.load_model(hf_dir(arch))
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_load_model_matches_transformers(arch, hf_dir, loaded):
    model = loaded(arch)
    with torch.no_grad():
        got = model(TOKENS)
    want = _hf_logits(hf_dir(arch), TOKENS)
    assert want.std() > 0.1  # far from uniform: a wrong conversion would show
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizer_is_the_word_vocabulary(arch, loaded):
    """Both backends tokenise as the plain vocabulary lookup (no BOS/prefix-space rules)."""
    model = loaded(arch)
    words = "w3 w0 w17 <eos> w28"
    want = [DEFAULT_VOCAB.index(w) for w in words.split()]
    assert model.to_tokens(words, prepend_bos=False)[0].tolist() == want
    assert model.to_str_tokens(words, prepend_bos=False) == words.split()


def test_gpt2_under_a_gemma_named_path(tmp_path, hf_dir):
    """Issue 11.12: the path once decided the architecture ("Gemma not supported")."""
    d = tmp_path / "gemma-runs" / "gpt2"
    shutil.copytree(hf_dir("gpt2"), d)
    model = lp.load_model(d)
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), _hf_logits(d, TOKENS), rtol=0, atol=1e-4)


def test_llama_under_a_llama_named_path(tmp_path, hf_dir):
    """Issue 11.12: a Llama directory whose path says 'llama' raised UnboundLocalError on TL 2."""
    d = tmp_path / "my-llama-runs" / "llama-tiny"
    shutil.copytree(hf_dir("llama"), d)
    model = lp.load_model(d)
    assert model.cfg.n_heads == 4
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), _hf_logits(d, TOKENS), rtol=0, atol=1e-4)


def test_config_without_architectures_is_a_model_error(tmp_path, hf_dir):
    import json

    d = tmp_path / "noarch"
    shutil.copytree(hf_dir("gpt2"), d)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["architectures"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(lp.ModelError, match="architectures"):
        lp.load_model(d)
