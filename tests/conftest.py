"""Shared fixtures. The whole suite runs once per installed TransformerLens (see Makefile)."""

from __future__ import annotations

import hashlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
import torch

import lensprobe as lp

# The suite's models are tiny: one thread avoids OpenMP overhead that made small ops
# 10-50x slower on the 2-core machines, and lets `make test` run both backends at once.
torch.set_num_threads(int(os.environ.get("LENSPROBE_TEST_THREADS", "1")))


def cached_graphs(model: torch.nn.Module) -> list[tuple[str, str, int]]:
    """(module, attribute, tensor id) of every tensor a module keeps as a plain attribute
    that holds an autograd graph (HF bridges cache attention patterns this way); the
    TransformerBridge's unregistered ``original_model`` is searched too."""
    roots = [("", model)]
    original = vars(model).get("original_model")
    if isinstance(original, torch.nn.Module):
        roots.append(("original_model.", original))
    found, seen = [], set()
    for prefix, root in roots:
        for name, m in root.named_modules():
            if id(m) in seen:
                continue
            seen.add(id(m))
            for attr, v in vars(m).items():
                if isinstance(v, torch.Tensor) and v.grad_fn is not None:
                    found.append((prefix + name, attr, id(v)))
    return found


def state_fingerprint(model: torch.nn.Module) -> dict:
    """Everything an extractor must leave untouched: weights, modes, grad flags, hooks,
    and no autograd graph cached on a module (the same graph-holding tensors as before)."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    hooks = []
    for name, m in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks"):
            d = getattr(m, attr, {})
            hooks += [(name, attr, k, id(f)) for k, f in d.items()]
        if isinstance(m, lp._tl.HookPoint):
            hooks += [(name, "fwd", id(hd)) for hd in m.fwd_hooks]
            hooks += [(name, "bwd", id(hd)) for hd in m.bwd_hooks]
    return {
        "graphs": cached_graphs(model),
        "weights": h.hexdigest(),
        "training": [(n, m.training) for n, m in model.named_modules()],
        "requires_grad": [(n, p.requires_grad) for n, p in model.named_parameters()],
        "hooks": hooks,
    }


@pytest.fixture
def fingerprint():
    return state_fingerprint


@pytest.fixture
def tiny():
    """A small float64 model factory: tiny(**overrides)."""

    def make(**kw):
        opts = dict(n_layers=2, n_heads=2, d_model=16, d_vocab=12, n_ctx=32, dtype=torch.float64)
        opts.update(kw)
        return lp.tiny_model(**opts)

    return make


def pytest_report_header(config):
    return f"lensprobe backend: {lp.BACKEND} (transformer-lens {lp.TL_VERSION})"
