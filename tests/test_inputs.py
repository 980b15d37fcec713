"""Bad input gets a clear error that names the problem and the fix."""

from __future__ import annotations

import pytest
import torch

import lensprobe as lp
from lensprobe.inputs import (
    check_float_dtype, check_head, check_hook, check_layer, check_layers, resolve_device,
)


@pytest.fixture
def model(tiny):
    return tiny(n_ctx=8, d_vocab=12)


def test_token_shapes_are_normalised(model):
    assert lp.to_tokens(model, [1, 2, 3]).shape == (1, 3)
    assert lp.to_tokens(model, torch.tensor([[1, 2], [3, 4]])).dtype == torch.long
    assert lp.to_tokens(model, torch.tensor([1, 2], dtype=torch.int32)).dtype == torch.long


@pytest.mark.parametrize(
    "tokens, match",
    [
        (torch.zeros(1, 9, dtype=torch.long), "longer than the model's n_ctx=8"),
        (torch.zeros(1, 0, dtype=torch.long), "empty input"),
        ([], "empty input"),
        (torch.tensor([[1, 12]]), r"\[0, 12\)"),
        (torch.tensor([[-1, 3]]), r"\[0, 12\)"),
        (torch.randn(1, 3), "must be integers"),
        (torch.zeros(2, 2, 2, dtype=torch.long), r"\[batch, pos\]"),
        ("hello", "no tokenizer"),
    ],
)
def test_bad_tokens(model, tokens, match):
    with pytest.raises(lp.InputError, match=match):
        lp.to_tokens(model, tokens)


def test_text_needs_known_words(tiny):
    model = tiny(d_vocab=3, vocab=["a", "b", "c"])
    assert lp.to_tokens(model, ["a b", "c a"]).tolist() == [[0, 1], [2, 0]]
    with pytest.raises(lp.InputError, match="not in the model's vocabulary"):
        lp.to_tokens(model, "a zebra")
    with pytest.raises(lp.InputError, match="empty input"):
        lp.to_tokens(model, "")


@pytest.mark.parametrize("thing", [torch.nn.Linear(2, 2), "gpt2", None])
def test_not_a_transformerlens_model(thing):
    with pytest.raises(lp.ModelError, match="expected a TransformerLens model"):
        lp.to_tokens(thing, [1, 2])


def test_hook_names_and_ranges(model):
    assert check_hook(model, "blocks.1.hook_resid_post") == "blocks.1.hook_resid_post"
    with pytest.raises(lp.InputError, match="Did you mean 'blocks.1.hook_resid_post'"):
        check_hook(model, "blocks.1.hook_resid_pos")
    assert check_layer(model, -1) == 1
    assert check_layer(model, 2, allow_end=True) == 2
    with pytest.raises(lp.InputError, match="out of range: the model has 2 layers"):
        check_layer(model, 2)
    with pytest.raises(lp.InputError, match="layer must be an int"):
        check_layer(model, 1.0)
    assert check_layers(model, None) == [0, 1]
    with pytest.raises(lp.InputError, match="valid heads are 0..1"):
        check_head(model, 5)


def test_unknown_hook_in_run_hooked(model):
    with lp.guard(model):
        with pytest.raises(lp.InputError, match="no hook point 'blocks.7.hook_resid_pre'"):
            lp.run_hooked(model, torch.tensor([[1]]), ["blocks.7.hook_resid_pre"])


def test_hook_that_never_fires(tiny):
    model = tiny(attn_only=True)
    name = "blocks.0.hook_mlp_out"
    if name in model.hook_dict:  # bridges register MLP hooks even for attn-only models
        with lp.guard(model):
            with pytest.raises(lp.InputError, match="never fired"):
                lp.run_hooked(model, torch.tensor([[1, 2]]), [name])
    else:
        with pytest.raises(lp.InputError, match="no hook point"):
            check_hook(model, name)


def test_dtype_and_device_checks():
    assert check_float_dtype(torch.float64) == torch.float64
    with pytest.raises(lp.InputError, match="cannot run in torch.int64"):
        check_float_dtype(torch.int64)
    with pytest.raises(lp.InputError, match="use one of float32, float64"):
        check_float_dtype(torch.float16, [torch.float32, torch.float64], what="spectrum")
    if not torch.cuda.is_available():
        with pytest.raises(lp.InputError, match="CUDA is not available"):
            resolve_device("cuda")
    assert resolve_device(None).type == "cpu"
