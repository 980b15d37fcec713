"""lp.run_sweep: serial and Ray engines over model specs x prompt shards, results that survive.

The Ray tests share one local runtime (``ray.init(num_cpus=2, ...)``, module scope) to
keep worker start-ups (each imports torch and TransformerLens) to a minimum.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lensprobe as lp
from lensprobe.sweep import (
    RESULTS_FILE, ModelSpec, coupling_and_loss, expand_specs, heldout_passages, load_spec,
    ray_runtime_env, read_results, summarise,
)

K = 2  # top-K singular vectors: small models (d_model 16)
TOKENS = torch.tensor([[1, 5, 6, 7, 0, 4, 3, 2], [2, 4, 4, 6, 1, 0, 3, 5],
                       [7, 1, 2, 3, 5, 0, 6, 4], [0, 2, 4, 6, 7, 1, 3, 5]])  # < 8: zoo:priority


def _write_tiny_gpt2(directory: Path) -> Path:
    """A 2-layer GPT-2 HuggingFace directory with a word tokenizer (built here, offline)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    vocab = ["<unk>", "<bos>"] + [f"w{i}" for i in range(14)]
    config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=len(vocab), n_positions=32,
                        n_ctx=32, bos_token_id=1, eos_token_id=1)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        GPT2LMHeadModel(config).eval().save_pretrained(directory)
    lp.word_tokenizer(vocab).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    """Four loadable specs of three kinds (checkpoints, zoo, HF directory)."""
    d = tmp_path_factory.mktemp("sweep-models")
    a = lp.save_checkpoint(lp.tiny_model(n_layers=2, n_heads=2, d_model=16, d_vocab=12, n_ctx=32,
                                         dtype=torch.float64, seed=1), d / "a.safetensors")
    b = lp.save_checkpoint(lp.tiny_model(n_layers=3, n_heads=2, d_model=16, d_vocab=12, n_ctx=32,
                                         dtype=torch.float64, seed=2), d / "b.safetensors")
    return [str(a), str(b), "zoo:priority", str(_write_tiny_gpt2(d / "gpt2"))]


def _direct(spec: str):
    """The model a spec names, loaded by the plain public API (not by the sweep)."""
    if spec.startswith("zoo:"):
        return lp.zoo.load(spec[4:])
    return lp.load_model(spec)


@pytest.fixture(scope="module")
def serial(specs, tmp_path_factory):
    out = tmp_path_factory.mktemp("serial")
    return lp.run_sweep("block_coupling", specs, TOKENS, shards=2, results=out, progress=False, top_k=K)


# --------------------------------------------------------------------------- specs, summaries
def test_spec_grammar_and_trajectory_expansion(monkeypatch, tmp_path):
    monkeypatch.setattr(lp.zoo, "steps", lambda name: [0, 50, 200] if name == "priority" else [])
    got = expand_specs(["zoo:priority@all", "zoo:retrieval@all", "zoo:priority",
                        "hub:gpt2@v1.0", "gpt2", str(tmp_path), "priority@3"])
    assert got[:3] == [ModelSpec("zoo", "priority", s) for s in ("0", "50", "200")]
    assert got[3] == ModelSpec("zoo", "retrieval", "final")  # no trajectory: the final model
    assert got[4] == ModelSpec("zoo", "priority", "final")
    assert got[5:] == [ModelSpec("hub", "gpt2", "v1.0"), ModelSpec("hub", "gpt2", ""),
                       ModelSpec("path", str(tmp_path)), ModelSpec("hub", "priority", "3")]
    assert [s.step for s in got[:5]] == [0, 50, 200, None, None]
    assert expand_specs("retrieval") == [ModelSpec("zoo", "retrieval", "final")]
    with pytest.raises(lp.InputError, match="never live models"):
        expand_specs([lp.tiny_model(d_model=8, n_heads=2)])
    with pytest.raises(lp.InputError, match="repeated"):
        expand_specs(["zoo:priority", "zoo:priority@final"])


def test_summary_of_result_objects_dicts_and_numbers(tiny):
    model = tiny()
    coup = lp.block_coupling(model, TOKENS[:2], top_k=K, progress=False)
    s = summarise(coup)
    df = coup.to_dataframe()
    assert s["scalars"]["scalar"] == pytest.approx(coup.scalar(), abs=1e-12)
    assert list(s["data"]["records"]) == list(df.columns)
    assert s["data"]["records"]["coupling"] == pytest.approx(df["coupling"].tolist(), abs=1e-12)
    traj = lp.trajectory_metrics(model, TOKENS[:2])
    want = {k: (None if v != v else v) for k, v in traj.summary().items()}  # NaN -> JSON null
    assert summarise(traj)["scalars"] == pytest.approx(want)
    d = summarise({"a": 1.5, "name": "x", "v": torch.tensor([1.0, 2.0]), "nan": float("nan")})
    assert d == {"scalars": {"a": 1.5, "name": "x", "nan": None}, "data": {"v": [1.0, 2.0]}}
    assert summarise(torch.tensor(3.0)) == {"scalars": {"value": 3.0}, "data": {}}
    with pytest.raises(lp.InputError, match="cannot summarise a object"):
        summarise(object())
    with pytest.raises(lp.InputError, match="too large"):
        summarise({"big": torch.zeros(300_000)})


def test_coupling_and_loss_against_a_plain_loop(tiny, fingerprint):
    model = tiny(d_vocab=12)
    before = fingerprint(model)
    got = coupling_and_loss(model, TOKENS[:2], k=K)
    assert fingerprint(model) == before
    with torch.no_grad():
        logp = model(TOKENS[:2]).log_softmax(-1)
    nll = [-float(logp[b, t, TOKENS[b, t + 1]]) for b in range(2) for t in range(7)]
    assert got["heldout_loss"] == pytest.approx(sum(nll) / len(nll), rel=1e-10)
    assert got["coupling"] == pytest.approx(lp.block_coupling(model, TOKENS[:2], top_k=K).scalar(), abs=1e-12)
    texts = heldout_passages()
    assert len(texts) >= 4 and all(len(t) > 300 for t in texts)


# --------------------------------------------------------------------------- serial engine
def test_serial_matches_direct_calls_per_spec_and_shard(serial, specs):
    assert list(serial[["model", "shard"]].itertuples(index=False, name=None)) == [
        (ModelSpec("zoo", s[4:]).model if s.startswith("zoo:") else s, i)
        for s in specs for i in (0, 1)]
    assert (serial["status"] == "ok").all(), serial["error"].tolist()
    for spec in specs:
        model = _direct(spec)
        for shard, rows in ((0, TOKENS[:2]), (1, TOKENS[2:])):
            want = lp.block_coupling(model, rows, top_k=K, progress=False)
            row = serial[(serial["spec"].str.startswith(spec)) & (serial["shard"] == shard)].iloc[0]
            if model.cfg.n_layers == 1:  # zoo:priority: no layer pair, no off-diagonal mean
                assert row["scalar"] is None or row["scalar"] != row["scalar"]  # null/NaN
                with pytest.raises(lp.InputError, match="two items"):
                    want.scalar()
            else:
                assert row["scalar"] == pytest.approx(want.scalar(), abs=1e-9)
            got_m = row["data"]["records"]["m"]
            assert got_m == pytest.approx(want.to_dataframe()["m"].tolist(), abs=1e-9)


def test_failures_are_recorded_and_the_rest_finish(specs, tmp_path):
    def boom(model, tokens):
        if model.cfg.n_layers == 3:
            raise ValueError("deliberate failure")
        return {"n": model.cfg.n_layers}

    df = lp.run_sweep(boom, [specs[0], specs[1], str(tmp_path / "missing.safetensors"), "zoo:nosuch"],
                  TOKENS, progress=False)
    assert df["status"].tolist() == ["ok", "error", "error", "error"]
    assert df["n"].iloc[0] == 2
    assert df["error"].iloc[1] == "ValueError: deliberate failure"
    assert "in boom" in df["traceback"].iloc[1]
    assert "does not exist" in df["error"].iloc[2]
    assert "no zoo model 'nosuch'" in df["error"].iloc[3]


def test_restarted_sweep_skips_finished_keys(specs, tmp_path):
    calls = []

    def count(model, tokens):
        calls.append(tokens[0].tolist())
        return {"first": int(tokens[0, 0])}

    run = lambda prompts=TOKENS: lp.run_sweep(count, specs[:2], prompts, shards=2, results=tmp_path,
                                          progress=False)
    first = run()
    assert len(calls) == 4
    path = tmp_path / RESULTS_FILE
    lines = path.read_text().splitlines()
    # stopped after two tasks, the driver killed in the middle of writing the third
    path.write_text("\n".join(lines[:2]) + "\n" + lines[2][:25])
    again = run()
    assert len(calls) == 6 and again.attrs == {"ran": 2, "skipped": 2}
    assert again.drop(columns=["task_s", "load_s", "analysis_s"]).equals(
        first.drop(columns=["task_s", "load_s", "analysis_s"]))
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(rows) == 4 and len({(r["model"], r["shard"]) for r in rows}) == 4
    assert run().attrs == {"ran": 0, "skipped": 4} and len(calls) == 6
    other = TOKENS.flip(0)  # other prompts: the same keys are stale and run again
    run(other)
    assert len(calls) == 10 and len(read_results(tmp_path)) == 4


def test_report_section_and_named_analysis(specs):
    df = lp.run_sweep("report:coupling", specs[:1], TOKENS[:2], progress=False)
    assert df["status"].tolist() == ["ok"], df["error"].tolist()
    want = lp.block_coupling(_direct(specs[0]), TOKENS[:2], progress=False).scalar()
    assert df["mean_offdiag_coupling"].iloc[0] == pytest.approx(want, abs=1e-9)
    with pytest.raises(lp.InputError, match="no public lensprobe analysis"):
        lp.run_sweep("not_an_analysis", specs[:1], TOKENS)
    with pytest.raises(lp.InputError, match="shards=5 but only 4 prompts"):
        lp.run_sweep("block_coupling", specs[:1], TOKENS, shards=5)


def test_ray_missing_gives_install_hint(monkeypatch, specs):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(lp.InputError, match=r"pip install lensprobe\[ray\]"):
        lp.run_sweep("block_coupling", specs[:1], TOKENS, engine="ray")


def test_cli_sweep_in_a_fresh_process_never_imports_ray(specs, tmp_path):
    gpt2 = specs[3]
    code = ("import sys; from lensprobe.cli import main;"
            f" rc = main(['sweep', 'block_coupling', '--model', {gpt2!r}, '--shards', '2',"
            f" '--kw', 'top_k={K}', '--out', {str(tmp_path)!r}, '--quiet',"
            " '--prompt', 'w1 w2 w3 w4', '--prompt', 'w5 w6 w7 w8 w9']);"
            " print('RAY', 'ray' in sys.modules, 'RC', rc)")
    env = dict(os.environ, PYTHONPATH=str(Path(lp.__file__).parents[1]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    assert "RAY False RC 0" in out.stdout, out.stdout + out.stderr
    assert "2 tasks (2 ran, 0 skipped, 0 failed)" in out.stdout
    rows = read_results(tmp_path)
    assert [r["analysis"] for r in rows] == [f"block_coupling(top_k={K})"] * 2
    model = lp.load_model(gpt2)
    want = lp.block_coupling(model, lp.to_tokens(model, "w5 w6 w7 w8 w9"), top_k=K, progress=False)
    assert rows[1]["scalars"]["scalar"] == pytest.approx(want.scalar(), abs=1e-6)


# --------------------------------------------------------------------------- Ray engine
@pytest.fixture(scope="module")
def ray_runtime():
    import ray
    from ray import cloudpickle

    # this test module is not importable in workers: ship its functions by value
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    # Ray nices its workers +15 by default: next to the other backend's test run (make test
    # runs both at once) that starves them. The variable is read when the raylet starts.
    old = os.environ.get("RAY_worker_niceness")
    os.environ["RAY_worker_niceness"] = "0"
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env=ray_runtime_env())
    finally:
        if old is None:
            del os.environ["RAY_worker_niceness"]
        else:
            os.environ["RAY_worker_niceness"] = old
    yield ray
    ray.shutdown()
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_ray_matches_serial_and_records_a_missing_spec(ray_runtime, serial, specs, tmp_path):
    missing = str(tmp_path / "no-such-model")
    df = lp.run_sweep("block_coupling", specs + [missing], TOKENS, shards=2, engine="ray",
                  results=tmp_path / "out", progress=False, top_k=K)
    assert len(df) == 10
    bad = df[df["model"] == missing]
    assert bad["status"].tolist() == ["error", "error"]
    assert bad["error"].str.contains("does not exist").all()
    ok = df[df["model"] != missing].reset_index(drop=True)
    assert (ok["status"] == "ok").all(), ok["error"].tolist()
    assert (ok["pid"] != os.getpid()).all()  # ran in Ray workers
    assert ok["scalar"].isna().tolist() == serial["scalar"].isna().tolist()
    has = ok["scalar"].notna()
    assert ok["scalar"][has].to_numpy(float) == pytest.approx(
        serial["scalar"][has].to_numpy(float), abs=1e-6)
    for (_, r), (_, s) in zip(ok.iterrows(), serial.iterrows()):
        assert (r["model"], r["shard"]) == (s["model"], s["shard"])
        assert r["data"]["records"]["m"] == pytest.approx(s["data"]["records"]["m"], abs=1e-6)


def kill_once(model, tokens, *, log_dir):
    """The first attempt of the first task to get here kills its own worker process."""
    log = Path(log_dir)
    with open(log / "attempts.log", "a") as f:
        f.write(json.dumps([os.getpid(), model.cfg.n_layers, tokens[0].tolist()]) + "\n")
    try:
        os.close(os.open(log / "killed", os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return {"coupling": lp.block_coupling(model, tokens, top_k=K, progress=False).scalar()}
    os.kill(os.getpid(), signal.SIGKILL)


def test_ray_retries_a_killed_worker_and_restart_skips(ray_runtime, serial, specs, tmp_path):
    out = tmp_path / "out"
    run = lambda: lp.run_sweep(kill_once, specs[:2], TOKENS, shards=2, engine="ray", results=out,
                           max_retries=2, progress=False, log_dir=str(tmp_path))
    df = run()
    assert (tmp_path / "killed").exists()
    attempts = [tuple(json.dumps(x) for x in json.loads(line)[1:])
                for line in (tmp_path / "attempts.log").read_text().splitlines()]
    assert len(attempts) == 5 and len(set(attempts)) == 4  # one task ran twice
    assert (df["status"] == "ok").all(), df["error"].tolist()
    assert df["coupling"].to_numpy() == pytest.approx(serial["scalar"].to_numpy()[:4], abs=1e-6)
    rows = [json.loads(x) for x in (out / RESULTS_FILE).read_text().splitlines()]
    assert sorted((r["model"], r["shard"]) for r in rows) == sorted(
        (s, i) for s in specs[:2] for i in (0, 1))  # exactly one row per key
    again = run()
    assert again.attrs == {"ran": 0, "skipped": 4}
    assert len((tmp_path / "attempts.log").read_text().splitlines()) == 5


def test_load_spec_names_the_fix_for_bad_zoo_revision():
    with pytest.raises(lp.InputError, match="step number"):
        load_spec("zoo:priority@latest")


def test_functions_using_the_package_pickle_for_workers():
    """Ray ships an analysis function with cloudpickle; one that refers to ``lp`` (the lazy
    package, a ModuleType subclass) must pickle the package by reference."""
    import pickle

    from ray import cloudpickle  # what Ray ships tasks with

    assert pickle.loads(pickle.dumps(lp)) is lp

    def uses_lp(model, tokens):
        return lp.block_coupling(model, tokens)

    assert cloudpickle.loads(cloudpickle.dumps(uses_lp)).__globals__["lp"] is lp


def test_the_module_is_not_shadowed_by_the_function():
    import importlib
    import types

    mod = importlib.import_module("lensprobe.sweep")
    import lensprobe.sweep

    assert isinstance(lp.sweep, types.ModuleType) and lp.sweep is mod is lensprobe.sweep
    assert lp.run_sweep is mod.run_sweep and callable(lp.run_sweep)
