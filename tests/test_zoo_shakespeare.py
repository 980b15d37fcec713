"""The real-text model in the zoo: a Llama-architecture HF directory and its trajectory.

Everything here reads the shipped files only (nothing downloads). Independent references:
`transformers`' own AutoModelForCausalLM on the same directory, the `tokenizers` library
on the shipped tokenizer.json, and losses computed directly from logits.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import lensprobe as lp
from lensprobe import zoo

NAME = "shakespeare"
TEXT = ("ROMEO.\nBut soft, what light through yonder window breaks?\nIt is the east, and"
        " Juliet is the sun.\nArise, fair sun, and kill the envious moon,\n")


@pytest.fixture(scope="module")
def card():
    return zoo.info(NAME)


@pytest.fixture(scope="module")
def model():
    return zoo.load(NAME)


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(zoo.path(NAME)), torch_dtype=torch.float32)
    return m.eval()


def _tokens(text: str) -> torch.Tensor:
    """The shipped tokenizer run by the `tokenizers` library, with the BOS/EOT token first."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(zoo.path(NAME) / "tokenizer.json"))
    return torch.tensor([[tok.token_to_id("<|endoftext|>"), *tok.encode(text).ids]])


def test_is_a_standard_hf_directory(card):
    d = zoo.path(NAME)
    assert NAME in zoo.names()
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (d / f).is_file(), f
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]      # grouped-query
    assert cfg["max_position_embeddings"] >= 512
    assert 128 <= cfg["hidden_size"] <= 256 and 2048 <= cfg["vocab_size"] <= 4096


def test_card_records_the_run(card):
    for key in ("seed", "model", "train", "baselines", "checkpoints", "wall_s", "tokens_seen",
                "samples", "final"):
        assert key in card, key
    assert len(card["corpus"]["sha256"]) == 64 and len(card["corpus"]["heldout_works"]) >= 2
    losses = [c["heldout_loss"] for c in card["checkpoints"]]
    assert card["checkpoints"][0]["step"] == 0
    assert losses[0] == pytest.approx(math.log(card["vocab_size"]), abs=0.3)   # uniform at init
    assert card["final"]["heldout_loss"] < card["baselines"]["bigram"] < card["baselines"]["unigram"]


def test_trajectory_steps(card):
    steps = zoo.steps(NAME)
    assert steps[0] == 0 and steps[-1] == card["final"]["step"]
    assert len(steps) >= 8 and steps == sorted(set(steps))
    assert steps == [c["step"] for c in card["checkpoints"]]


def test_logits_equal_transformers(model, hf_model):
    toks = model.to_tokens(TEXT)
    assert torch.equal(toks, _tokens(TEXT))                         # same tokenisation
    assert model.to_string(toks[0, 1:]) == TEXT
    with torch.no_grad():
        ours, ref = model(toks), hf_model(toks).logits
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)


def test_step_checkpoints_load_upcast(model):
    init = zoo.load(NAME, step=0)
    sd = load_file(str(zoo.path(NAME) / "trajectory" / "step_000000.safetensors"))
    assert all(v.dtype == torch.float16 for v in sd.values())
    assert init.W_E.dtype == torch.float32
    torch.testing.assert_close(init.W_E, sd["model.embed_tokens.weight"].float(), rtol=0, atol=0)
    toks = _tokens(TEXT)
    with torch.no_grad():
        def loss(m):
            logits = m(toks)[0, :-1]
            return float(torch.nn.functional.cross_entropy(logits, toks[0, 1:]))
        l_init, l_final = loss(init), loss(model)
    assert l_init == pytest.approx(math.log(init.cfg.d_vocab), abs=0.3)
    assert l_final < l_init - 2.0


def test_bad_steps_are_refused():
    with pytest.raises(lp.InputError, match="steps are"):
        zoo.load(NAME, step=7)
    with pytest.raises(lp.InputError, match="no training trajectory"):
        zoo.load("retrieval", step=0)
    assert zoo.steps("retrieval") == []


def test_zoo_stays_small():
    total = sum(p.stat().st_size for p in zoo._DIR.rglob("*") if p.is_file())
    assert total < 40 * 2**20, f"zoo is {total / 2**20:.1f} MiB"


# --------------------------------------------------------------------------- 512 real tokens
def _prompt512() -> torch.Tensor:
    """One 512-token window of a held-out play, as shipped (scripts/shakespeare_findings.py)."""
    from lensprobe.zoo import _DIR

    data = json.loads((_DIR / "results" / "shakespeare_prompts.json").read_text())
    toks = torch.tensor([data["passages"][0]["tokens"]])
    assert toks.shape == (1, 512)
    return toks


def _finite(result) -> bool:
    import dataclasses

    return all(torch.isfinite(v).all() for f in dataclasses.fields(result)
               if isinstance(v := getattr(result, f.name), torch.Tensor) and v.is_floating_point()
               and f.name != "composition")  # induction: NaN where l1 >= l2 by definition


EXTRACTORS_512 = {
    "sensitivity": lambda m, t: lp.sensitivity(m, t, method="hutchinson", n_probes=4, progress=False),
    "path_bound": lambda m, t: lp.path_bound(m, t, compare=False, progress=False),
    "collapse_curve": lambda m, t: lp.collapse_curve(m, lengths=[256, 511], precisions=("bfloat16",),
                                                     progress=False),
    "ov_spectrum": lambda m, t: lp.ov_spectrum(m, progress=False),
    "dominance": lambda m, t: lp.dominance(m, t, progress=False),
    "smoothing_profile": lambda m, t: lp.smoothing_profile(m, t),
    "block_jacobians": lambda m, t: lp.block_jacobians(m, t, positions=[511], progress=False),
    "coupling": lambda m, t: lp.block_coupling(m, t, positions=[511], top_k=4, progress=False),
    "trajectory_metrics": lambda m, t: lp.trajectory_metrics(m, t),
    "induction_heads": lambda m, t: lp.induction_heads(m, half=128, batch=2),
}


@pytest.mark.parametrize("name", list(EXTRACTORS_512))
def test_every_extractor_on_512_real_tokens(model, name, fingerprint):
    """Each public extractor that reads a language model runs on the shipped model with a
    512-token held-out prompt: finite results, model untouched (the task-bound ones,
    stacked_heads/emergence and priority_alignment, need their task's vocabulary and are
    run on the zoo models trained for them)."""
    toks = _prompt512()
    before = fingerprint(model)
    result = EXTRACTORS_512[name](model, toks)
    assert _finite(result), name
    assert fingerprint(model) == before, name
