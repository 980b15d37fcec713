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


# --------------------------------------------------------------------------- the matrix
MATRIX_TOKENS = torch.tensor([[1, 5, 6, 7, 8, 9]])
EXTRACTORS = {
    "sensitivity": lambda m: lp.sensitivity(m, MATRIX_TOKENS),
    "path_bound": lambda m: lp.path_bound(m, MATRIX_TOKENS, progress=False),
    "collapse_curve": lambda m: lp.collapse_curve(m, lengths=[4, 8], one=5, zero=6),
    "ov_spectrum": lambda m: lp.ov_spectrum(m, progress=False),
    "dominance": lambda m: lp.dominance(m, MATRIX_TOKENS, progress=False),
    "smoothing_profile": lambda m: lp.smoothing_profile(m, MATRIX_TOKENS),
    "block_jacobians": lambda m: lp.block_jacobians(m, MATRIX_TOKENS),
    "coupling": lambda m: lp.block_coupling(m, MATRIX_TOKENS, top_k=2),
    "trajectory_metrics": lambda m: lp.trajectory_metrics(m, MATRIX_TOKENS),
}


def _nonfinite_fields(result):
    import dataclasses

    return [
        f.name for f in dataclasses.fields(result)
        if isinstance(v := getattr(result, f.name), torch.Tensor) and v.is_floating_point()
        and not torch.isfinite(v).all()
    ]


def _cached_graphs(model):
    return [(n, k) for n, mod in model.named_modules() for k, v in vars(mod).items()
            if isinstance(v, torch.Tensor) and v.grad_fn is not None]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_extractor_runs_on_the_architecture(arch, loaded, fingerprint):
    """Finite results, model untouched (weights, modes, grad flags, hooks, no cached graph)."""
    model = loaded(arch)
    for name, run in EXTRACTORS.items():
        before = fingerprint(model)
        result = run(model)
        assert _nonfinite_fields(result) == [], (arch, name)
        assert fingerprint(model) == before, (arch, name)
        assert _cached_graphs(model) == [], (arch, name)  # GPT-2/NeoX bridges cached attn._pattern


@pytest.mark.parametrize("arch", ["mistral", "gemma2"])
def test_sliding_window_reaches_the_patterns(arch, loaded):
    """path_bound, dominance and stacking read hook_pattern: sliding-window layers must show
    zero attention beyond the window (4) there, global layers must not."""
    model = loaded(arch)
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(model.cfg.n_layers)]
    with lp.guard(model):
        acts = lp.run_hooked(model, TOKENS, names, stop_early=False)
    T = TOKENS.shape[1]
    q, k = torch.meshgrid(torch.arange(T), torch.arange(T), indexing="ij")
    far = k <= q - 4  # keys outside a window of 4 ending at the query
    local = {"mistral": [True] * 3, "gemma2": [True, False, True]}[arch]
    for l, is_local in enumerate(local):
        pat = acts[names[l]][0]  # [head, q, k]
        if is_local:
            assert pat[:, far].abs().max() == 0, (arch, l)
        else:
            assert pat[:, far].min() > 0, (arch, l)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma", "gemma2"])
def test_grouped_kv_heads_in_ov(arch, hf_dir, loaded):
    """OV (what ov_spectrum and composition read) of query head h uses K/V head
    h // (n_heads / n_kv): checked against the HF v_proj / o_proj weights by hand."""
    from transformers import AutoModelForCausalLM

    model = loaded(arch)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir(arch))
    cfg = hf.config
    n, n_kv, dh = cfg.num_attention_heads, cfg.num_key_value_heads, model.cfg.d_head
    assert n_kv < n
    for l, layer in enumerate(hf.model.layers):
        Wv = layer.self_attn.v_proj.weight.detach().T  # [d_model, n_kv * dh]
        Wo = layer.self_attn.o_proj.weight.detach().T  # [n * dh, d_model]
        for h in range(n):
            g = h // (n // n_kv)
            want = Wv[:, g * dh:(g + 1) * dh] @ Wo[h * dh:(h + 1) * dh]
            torch.testing.assert_close(model.OV[l, h].AB.detach(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_induction_heads_run_on_the_architecture(arch, loaded, fingerprint):
    """The induction analysis (attention read from hooks, K-composition through model.OV and
    model.QK, which expand grouped K/V heads) on every architecture: finite, model untouched."""
    model = loaded(arch)
    before = fingerprint(model)
    res = lp.induction_heads(model, half=4, batch=2)
    assert _nonfinite_fields(res) == ["composition"], arch  # NaN where l1 >= l2 by definition
    L = model.cfg.n_layers
    earlier = torch.tensor([[l1 < l2 for l2 in range(L)] for l1 in range(L)])[:, None, :, None]
    comp = res.composition
    assert torch.isfinite(comp[earlier.expand_as(comp)]).all() and comp[~earlier.expand_as(comp)].isnan().all()
    assert fingerprint(model) == before and _cached_graphs(model) == [], arch


@pytest.mark.parametrize("arch", ARCHS)
def test_report_runs_on_the_architecture(arch, hf_dir, tmp_path):
    """`lensprobe report --model DIR` (run_report with the directory as its spec): every
    section is written and none fails, on each architecture and backend."""
    from lensprobe.report import run_report

    res = run_report(str(hf_dir(arch)), prompts=["w1 w2 w3 w4 w5 w6 w7 w8"], out=tmp_path,
                     progress=False)
    assert [s.name for s in res.failed] == [], [(s.name, s.failed) for s in res.failed]
    assert res.html_path.is_file() and res.json_path.is_file()
    assert {s.name for s in res.sections} >= {"oversquash", "smoothing", "coupling", "stacking"}
