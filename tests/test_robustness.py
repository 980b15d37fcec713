"""Robustness (issue 11): no autograd graph left on the model, dtype casts without
deep copies, report sections that fail alone, no TransformerLens prints, Hutchinson
probes under a memory bound, and one check for every ``layers=`` argument."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import cached_graphs

import lensprobe as lp
from lensprobe import cli, core, report

TOKENS = torch.tensor([[1, 5, 2, 7, 3, 9]])


# --------------------------------------------------------------------------- HF fixtures
def _hf_dir(root, kind: str):
    """A 2-layer GPT-2 or GPT-NeoX HF directory with a WordLevel tokenizer, built here."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = root / kind
    path.mkdir()
    vocab = {f"w{i}": i for i in range(40)}
    vocab["<unk>"] = 40
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))
    specials = {"unk_token": "<unk>", "bos_token": "<unk>", "eos_token": "<unk>"}
    (path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **specials}))
    ids = {"bos_token_id": 40, "eos_token_id": 40}
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=41, n_positions=32, n_ctx=32, n_embd=16,
                                      n_layer=2, n_head=2, **ids)
        cls = transformers.GPT2LMHeadModel
    else:
        cfg = transformers.GPTNeoXConfig(vocab_size=41, max_position_embeddings=32,
                                         hidden_size=16, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=32, **ids)
        cls = transformers.GPTNeoXForCausalLM
    with torch.random.fork_rng():  # HF initialises from the global RNG; keep the suite's
        torch.manual_seed(0)
        cls(cfg).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {kind: _hf_dir(root, kind) for kind in ("gpt2", "neox")}


def _tensor_attrs(model):
    """Every plain (non-parameter) tensor attribute of every module, by identity."""
    return {
        (name, k): v
        for name, m in model.named_modules()
        for k, v in vars(m).items()
        if isinstance(v, torch.Tensor) and not isinstance(v, torch.nn.Parameter)
    }


# --------------------------------------------------------------------------- item 7
def _extractors():
    return {
        "sensitivity": lambda m: lp.sensitivity(m, TOKENS, progress=False),
        "hutchinson": lambda m: lp.sensitivity(m, TOKENS, method="hutchinson", n_probes=4,
                                               progress=False),
        "path_bound": lambda m: lp.path_bound(m, TOKENS, progress=False),
        "collapse_curve": lambda m: lp.collapse_curve(m, lengths=[2, 4], progress=False),
        "ov_spectrum": lambda m: lp.ov_spectrum(m, progress=False),
        "dominance": lambda m: lp.dominance(m, TOKENS, progress=False),
        "smoothing_profile": lambda m: lp.smoothing_profile(m, TOKENS),
        "block_jacobians": lambda m: lp.block_jacobians(m, TOKENS),
        "coupling": lambda m: lp.block_coupling(m, TOKENS, progress=False),
        "trajectory_metrics": lambda m: lp.trajectory_metrics(m, TOKENS),
        "induction_heads": lambda m: lp.induction_heads(m, half=4, batch=2),
    }


@pytest.mark.parametrize("kind", ["gpt2", "neox"])
def test_no_autograd_graph_is_left_on_hf_models(hf_dirs, kind, fingerprint):
    """HF bridges cache the attention pattern on the module (``_pattern``); after a
    gradient-based extractor it held a SoftmaxBackward graph (TL 4.3)."""
    model = lp.load_model(hf_dirs[kind])
    for name, run in _extractors().items():
        before = fingerprint(model)
        run(model)
        assert cached_graphs(model) == [], name
        assert fingerprint(model) == before, name


def _cache_on_hookpoint(act, hook):
    hook.last = act * 2  # a module caching a forward tensor, like the HF bridges do
    return act


def test_guard_puts_back_the_users_cached_tensor_and_drops_new_graphs(tiny, fingerprint):
    model = tiny()
    model.add_hook("blocks.1.hook_resid_post", _cache_on_hookpoint, is_permanent=True)
    hp = model.hook_dict["blocks.1.hook_resid_post"]
    next(model.parameters()).requires_grad_(True)
    model(TOKENS)  # the user's own grad-mode forward: their graph, theirs to keep
    users = hp.last
    assert users.grad_fn is not None
    before = fingerprint(model)
    lp.sensitivity(model, TOKENS, progress=False)
    assert hp.last is users
    assert fingerprint(model) == before
    del hp.last  # an attribute the run creates is removed again
    lp.sensitivity(model, TOKENS, progress=False)
    assert not hasattr(hp, "last")
    assert cached_graphs(model) == []


def test_guard_detaches_a_tensor_that_gained_a_graph_in_place(tiny):
    model = tiny()
    hp = model.hook_dict["blocks.0.hook_resid_post"]
    hp.buffer_like = torch.zeros(1, TOKENS.shape[1], 16, dtype=torch.float64)

    def write_in_place(act, hook):
        hook.buffer_like[:, : act.shape[1]] = act  # CopySlices: the cache gains a graph
        return act

    model.add_hook("blocks.0.hook_resid_post", write_in_place, is_permanent=True)
    lp.sensitivity(model, TOKENS, progress=False)
    assert hp.buffer_like.grad_fn is None
    assert cached_graphs(model) == []


# --------------------------------------------------------------------------- item 6
def _reference_linf(path, dtype, pairs):
    """The collapse distance computed plainly: a fresh model cast with torch, one
    forward per sequence, linf between the last tokens' final representations."""
    model = lp.load_model(path)
    torch.nn.Module.to(model, dtype)
    model.cfg.dtype = dtype
    hook = lp._tl.final_hook(model)
    out = []
    with torch.no_grad():
        for a, b in pairs:
            ya = model.run_with_cache(torch.tensor([a]), names_filter=hook)[1][hook][0, -1]
            yb = model.run_with_cache(torch.tensor([b]), names_filter=hook)[1][hook][0, -1]
            out.append(float((ya.double() - yb.double()).abs().max()))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["gpt2", "neox"])
def test_collapse_curve_after_a_grad_mode_forward(hf_dirs, kind, fingerprint):
    """TL 4.3: copy.deepcopy of a model whose modules cache a graph raised
    'Only Tensors created explicitly by the user ... support the deepcopy protocol'."""
    model = lp.load_model(hf_dirs[kind])
    model(TOKENS)  # a user's forward in grad mode, as in any notebook
    attrs = _tensor_attrs(model)
    params = [(p, p.data_ptr(), p.dtype) for p in model.parameters()]
    before = fingerprint(model)
    curve = lp.collapse_curve(model, "ones", lengths=[2, 5], bos=3, one=4, per_head=False,
                              progress=False)
    assert fingerprint(model) == before
    assert all(p.data_ptr() == ptr and p.dtype == dt for p, ptr, dt in params)
    assert model.cfg.dtype == torch.float32
    after = _tensor_attrs(model)  # the user's cached tensors are the same objects
    assert after.keys() == attrs.keys() and all(after[k] is attrs[k] for k in attrs)
    pairs = [([3] + [4] * n, [3] + [4] * (n + 1)) for n in (2, 5)]
    ref = _reference_linf(hf_dirs[kind], torch.float64, pairs)
    torch.testing.assert_close(curve.distance(metric="linf"), ref, rtol=1e-9, atol=1e-15)
    low = curve.low["bfloat16"].distances[curve.threshold_hook][:, 0, 2]
    torch.testing.assert_close(low, _reference_linf(hf_dirs[kind], torch.bfloat16, pairs))


def test_copy_model_after_a_grad_mode_forward(hf_dirs, fingerprint):
    model = lp.load_model(hf_dirs["gpt2"])
    model(TOKENS)
    if lp._tl.is_bridge(model):  # the bridge keeps a graph: plain deepcopy would raise
        assert cached_graphs(model)
        with pytest.raises(RuntimeError, match="deepcopy"):
            copy.deepcopy(model)
    before = fingerprint(model)
    twin = core.copy_model(model)
    assert fingerprint(model) == before and cached_graphs(twin) == []
    assert twin.blocks[0].attn is not model.blocks[0].attn
    with torch.no_grad():
        torch.testing.assert_close(twin(TOKENS), model(TOKENS), rtol=0, atol=0)


def test_cast_restores_the_model_when_the_run_raises(tiny, fingerprint):
    model = tiny(dtype=torch.float32)

    def fail_in_bf16(act, hook):
        if act.dtype == torch.bfloat16:
            raise RuntimeError("boom in bf16")
        return act

    model.add_hook("blocks.0.hook_resid_post", fail_in_bf16, is_permanent=True)
    params = [(p, p.data_ptr()) for p in model.parameters()]
    buffers = [(b, b.dtype) for b in model.buffers()]
    before = fingerprint(model)
    with pytest.raises(RuntimeError, match="boom in bf16"):
        lp.collapse_curve(model, lengths=[2, 4], progress=False)
    assert fingerprint(model) == before
    assert all(p.data_ptr() == ptr and p.dtype == torch.float32 for p, ptr in params)
    assert all(b is b0 and b.dtype == dt for b, (b0, dt) in zip(model.buffers(), buffers))
    assert model.cfg.dtype == torch.float32


def test_cast_puts_back_what_modules_cached_in_the_other_dtype(tiny):
    """A module that caches a table and the length it was built for (like RoPE) during
    the float64 / bf16 runs must not keep them: the pair comes back as it was."""
    model = tiny(dtype=torch.float32)
    hp = model.hook_dict["blocks.0.hook_resid_pre"]
    table, hp.table, hp.table_len = torch.zeros(1), None, 0
    hp.table = table

    def cache_table(act, hook):
        hook.table, hook.table_len = act.detach()[0, :, 0], act.shape[1]
        hook.made_here = True
        return act

    model.add_hook("blocks.0.hook_resid_pre", cache_table, is_permanent=True)
    lp.collapse_curve(model, lengths=[2, 4], progress=False)
    assert hp.table is table and hp.table_len == 0
    assert not hasattr(hp, "made_here")


# --------------------------------------------------------------------------- item 10
def test_no_transformerlens_prints_inside_lensprobe_calls(tiny, capfd, tmp_path):
    model = tiny(dtype=torch.float32)
    capfd.readouterr()
    lp.collapse_curve(model, lengths=[2, 4], progress=False)  # casts to f64, bf16, fp16
    report.run_report(None, out=tmp_path, only=["model"], device="cpu", progress=False)
    out = capfd.readouterr().out
    assert "Changing model dtype" not in out and "Moving model to device" not in out
    assert out == ""


# --------------------------------------------------------------------------- item 8
def test_a_failing_section_is_reported_and_the_others_written(monkeypatch, tmp_path, capsys):
    def broken(ctx):
        raise RuntimeError("<script>alert(1)</script> singular matrix")

    sections = [(n, broken if n == "smoothing" else f) for n, f in report.SECTIONS]
    monkeypatch.setattr(report, "SECTIONS", sections)
    code = cli.main(["report", "--only", "smoothing,priority", "--out", str(tmp_path), "--quiet"])
    captured = capsys.readouterr()
    assert code == 1
    assert "section 'smoothing' failed" in captured.err and "singular matrix" in captured.err
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["failed"] == ["smoothing"]
    assert data["sections"]["smoothing"]["failed"].startswith("RuntimeError: <script>")
    assert "singular matrix" in data["sections"]["smoothing"]["traceback"]
    assert 0.9 <= data["sections"]["priority"]["retrieved_mass"] <= 1  # still computed
    page = (tmp_path / "report.html").read_text()
    assert "<script>alert(1)" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; singular matrix" in page
    assert "data-section='smoothing' data-status='failed'" in page
    assert page.index("data-section='smoothing'") < page.index("data-section='priority'")


def test_report_without_failures_exits_zero_and_lists_none(tmp_path):
    assert cli.main(["report", "--only", "model", "--out", str(tmp_path), "--quiet"]) == 0
    assert json.loads((tmp_path / "report.json").read_text())["failed"] == []


# --------------------------------------------------------------------------- item 9
def test_hutchinson_chunking_changes_memory_not_the_estimate(tiny):
    model = tiny()
    toks = torch.tensor([[1, 5, 2, 7, 3, 9], [4, 4, 0, 1, 8, 2]])
    runs = [lp.sensitivity(model, toks, method="hutchinson", n_probes=7, seed=5,
                           chunk_size=c, progress=False) for c in (7, 1, 3)]
    runs.append(lp.sensitivity(model, toks, method="hutchinson", n_probes=7, seed=5,
                               max_memory_mb=1e-4, progress=False))
    runs.append(lp.sensitivity(model, toks, method="hutchinson", n_probes=7, seed=5,
                               progress=False))
    for r in runs[1:]:
        torch.testing.assert_close(r.norms, runs[0].norms, rtol=1e-12, atol=0)
        torch.testing.assert_close(r.stderr, runs[0].stderr, rtol=1e-10, atol=0)
    # the estimate itself, written plainly: per-probe ||v^T J_i||^2 from the full Jacobian
    with lp.guard(model):
        x0 = core.capture_acts(model, toks, ["blocks.0.hook_resid_pre"])["blocks.0.hook_resid_pre"]
        fn = lp.hooked_fn(model, toks, "blocks.0.hook_resid_pre", lp._tl.final_hook(model),
                          select=lambda y: y[:, -1])
        J = torch.autograd.functional.jacobian(fn, x0)  # [B, d, B, N, d]
    gen = torch.Generator().manual_seed(5)
    v = torch.randint(0, 2, (7, 2, 16), generator=gen).double() * 2 - 1
    per_probe = torch.stack([
        torch.stack([torch.einsum("r,rnd->nd", v[k, b], J[b, :, b]).pow(2).sum(-1)
                     for b in range(2)]) for k in range(7)])
    torch.testing.assert_close(runs[0].profile, per_probe.mean(0).sqrt(), rtol=1e-10, atol=0)


def test_hutchinson_batches_no_more_rows_per_backward_than_exact(tiny, monkeypatch):
    """n = 8192 with 8 probes took 14.5 GB (4.5x exact): every probe in one batched
    backward, while the exact method runs one row per backward on CPU."""
    model = tiny()
    real = torch.autograd.grad
    rows: list[int] = []

    def spy(outputs, inputs, grad_outputs=None, **kw):
        rows.append(grad_outputs.shape[0] if kw.get("is_grads_batched") else 1)
        return real(outputs, inputs, grad_outputs=grad_outputs, **kw)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    lp.sensitivity(model, TOKENS, progress=False)
    exact = max(rows)
    rows.clear()
    lp.sensitivity(model, TOKENS, method="hutchinson", n_probes=8, progress=False)
    assert len(rows) == 8 and max(rows) <= exact


def test_default_chunk_is_memory_bounded():
    mb = 2**20
    assert core._chunk_size(None, None, per_row=1024) == core.MAX_DEFAULT_CHUNK
    assert core._chunk_size(None, None, per_row=100 * mb) == int(core.DEFAULT_CHUNK_MB // 100)
    assert core._chunk_size(None, None, per_row=4096 * mb) == 1
    assert core._chunk_size(None, 10.0, per_row=mb) == 10
    assert core._chunk_size(5, 10.0, per_row=mb) == 5
    with pytest.raises(lp.InputError, match="chunk_size"):
        core._chunk_size(2.5, None, per_row=mb)
    with pytest.raises(lp.InputError, match="max_memory_mb"):
        core._chunk_size(None, 0, per_row=mb)


# --------------------------------------------------------------------------- item 14
@pytest.mark.parametrize("bad", [2.5, [0, 1.0], "0", [], [[0]], True])
@pytest.mark.parametrize("fn", ["ov_spectrum", "dominance", "block_jacobians", "block_coupling"])
def test_layers_argument_is_checked_once_for_all(tiny, fn, bad):
    model = tiny()
    args = () if fn == "ov_spectrum" else (TOKENS,)
    with pytest.raises(lp.InputError, match="layers"):
        getattr(lp, fn)(model, *args, layers=bad)


def test_layers_accepts_ints_sequences_and_arrays(tiny):
    import numpy as np

    from lensprobe.inputs import check_layers

    model = tiny(n_layers=3)
    assert check_layers(model, -1) == [2]
    assert check_layers(model, range(2)) == [0, 1]
    assert check_layers(model, np.array([2, 0])) == [2, 0]
    assert check_layers(model, torch.tensor([1])) == [1]
    assert check_layers(model, (np.int64(1),)) == [1]
    with pytest.raises(lp.InputError, match="out of range"):
        check_layers(model, [0, 3])
    spec = lp.ov_spectrum(model, layers=np.int64(1), progress=False)
    assert spec.layers == (1,)


@pytest.mark.parametrize("lengths, message", [([], "lengths is empty"),
                                              ([2, 4.5], "lengths must hold ints"),
                                              (3.0, "lengths must be an int"),
                                              ([0, 2], "n >= 1")])
def test_collapse_curve_lengths_are_checked(tiny, lengths, message):
    with pytest.raises(lp.InputError, match=message):
        lp.collapse_curve(tiny(), lengths=lengths, progress=False)
