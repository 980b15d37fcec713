"""Tiny random Hugging Face model directories of real architectures, built offline.

``tiny_hf_dir(path, arch, vocab=None)`` writes a directory that ``save_pretrained`` would
write (config.json + model.safetensors) plus a word-level tokenizer built with the
``tokenizers`` library itself (tokenizer.json written by ``tokenizers``, so the older
transformers of the TL 2 environment reads it too, and a tokenizer_config.json that names
``PreTrainedTokenizerFast`` so no architecture-specific BOS/prefix rules apply).

Weights are the architecture's own random init plus N(0, 0.2^2) noise on every parameter
(norm gains included), so logits are far from uniform and a wrong conversion shows.

Use the session fixture ``hf_dir`` (``hf_dir("llama")``) in tests: each directory is
built once per session. ``ARCHITECTURES`` lists what the builder knows.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

#: Architecture features each tiny config exercises (see ``_config``).
ARCHITECTURES: dict[str, str] = {
    "gpt2": "learned positions, LayerNorm, biases",
    "neox": "Pythia: parallel attention+MLP, partial rotary (rotary_pct 0.5)",
    "llama": "RMSNorm, rotary, gated MLP, grouped-query attention (4 heads, 2 K/V heads)",
    "mistral": "Llama + sliding-window attention (window 4), GQA",
    "qwen2": "Llama-like with q/k/v biases, GQA",
    "gemma": "RMSNorm (1+w), scaled embeddings, gelu-tanh gated MLP, multi-query (1 K/V head)",
    "gemma2": "Gemma + attention/logit soft-capping, local/global layers (window 4), pre+post norms",
}

DEFAULT_VOCAB: list[str] = ["<unk>", "<bos>", "<eos>"] + [f"w{i}" for i in range(29)]


def _config(arch: str, vocab_size: int, bos: int, eos: int):
    import transformers as tf

    common = {"vocab_size": vocab_size, "bos_token_id": bos, "eos_token_id": eos,
              "tie_word_embeddings": False}
    rms = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
           "num_attention_heads": 4, "max_position_embeddings": 32, **common}
    if arch == "gpt2":
        return tf.GPT2Config(n_layer=3, n_embd=32, n_head=4, n_positions=32, n_ctx=32, **common)
    if arch == "neox":
        return tf.GPTNeoXConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=32, rotary_pct=0.5, use_parallel_residual=True, **common,
        )
    if arch == "llama":
        return tf.LlamaConfig(num_key_value_heads=2, **rms)
    if arch == "mistral":
        return tf.MistralConfig(num_key_value_heads=2, sliding_window=4, head_dim=8, **rms)
    if arch == "qwen2":
        return tf.Qwen2Config(num_key_value_heads=2, use_sliding_window=False, **rms)
    if arch == "gemma":
        return tf.GemmaConfig(num_key_value_heads=1, head_dim=8, hidden_activation="gelu_pytorch_tanh",
                              **dict(rms, tie_word_embeddings=True))
    if arch == "gemma2":
        return tf.Gemma2Config(
            num_key_value_heads=2, head_dim=8, sliding_window=4, query_pre_attn_scalar=8,
            attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
            **dict(rms, tie_word_embeddings=True),
        )
    raise ValueError(f"unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}")


def write_tokenizer(path: Path, vocab: list[str]) -> None:
    """tokenizer.json (written by ``tokenizers``) and a PreTrainedTokenizerFast config."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab_map = {tok: i for i, tok in enumerate(vocab)}
    tk = Tokenizer(models.WordLevel(vocab=vocab_map, unk_token="<unk>" if "<unk>" in vocab_map else None))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.save(str(path / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 32}
    for special, key in (("<unk>", "unk_token"), ("<bos>", "bos_token"), ("<eos>", "eos_token")):
        if special in vocab_map:
            cfg[key] = special
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))


def tiny_hf_dir(path: str | Path, arch: str, vocab: list[str] | None = None, seed: int = 0) -> Path:
    """Write a tiny random ``arch`` model with a word tokenizer over ``vocab`` to ``path``."""
    from transformers import AutoModelForCausalLM

    vocab = list(DEFAULT_VOCAB if vocab is None else vocab)
    bos = vocab.index("<bos>") if "<bos>" in vocab else None
    eos = vocab.index("<eos>") if "<eos>" in vocab else None
    config = _config(arch, len(vocab), bos, eos)
    # fork_rng: the HF init draws from the global RNG; the caller's stream stays as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    write_tokenizer(path, vocab)
    return path


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    """``hf_dir(arch, vocab=None)`` -> a directory built once per session per (arch, vocab)."""
    cache: dict[tuple, Path] = {}

    def get(arch: str, vocab: list[str] | None = None) -> Path:
        key = (arch, None if vocab is None else tuple(vocab))
        if key not in cache:
            root = tmp_path_factory.mktemp(f"hf-{arch}")
            cache[key] = tiny_hf_dir(root / arch, arch, vocab)
        return cache[key]

    return get
