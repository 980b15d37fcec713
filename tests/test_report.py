"""The main job: `lensprobe report` on the embedded default, its page in a browser, its CLI."""

from __future__ import annotations

import json

import pytest
import torch

import lensprobe as lp
from lensprobe import cli, report
from test_browser_views import count_dom, load_in_browser

ORDER = ["model", "oversquash", "smoothing", "coupling", "stacking", "priority"]


@pytest.fixture(scope="module")
def default_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    assert cli.main(["report", "--out", str(out), "--quiet"]) == 0
    return out


def test_default_report_has_every_section_in_order(default_report):
    data = json.loads((default_report / "report.json").read_text())
    assert data["model"] == lp.zoo.DEFAULT
    assert list(data["sections"]) == ORDER
    assert all("skipped" not in s for s in data["sections"].values())
    page = (default_report / "report.html").read_text()
    positions = [page.index(f"data-section='{name}'") for name in ORDER]
    assert positions == sorted(positions)
    # headline figures are numbers read off the analyses, within their ranges
    sec = data["sections"]
    assert -1 <= sec["oversquash"]["spearman_bound_vs_measured"] <= 1
    assert 0 <= sec["smoothing"]["frac_dc"] <= 1
    assert -1 <= sec["coupling"]["mean_offdiag_coupling"] <= 1
    assert sec["stacking"]["stack"], "the shipped retrieval model has a detected stack"
    # the default model is the real-text one: its sections compare with its step 0
    assert data["model"] == "shakespeare" and sec["stacking"]["mode"] == "induction heads"
    assert "init" in sec["oversquash"] and "init" in sec["coupling"] and "init" in sec["stacking"]
    assert page.count("at initialisation") >= 4
    assert 0.9 <= sec["priority"]["retrieved_mass"] <= 1


def test_report_page_loads_offline_in_headless_chromium(default_report):
    load = load_in_browser(default_report / "report.html", window=(1280, 4000))
    assert load.console == [], load.console
    assert load.requests == [], load.requests
    assert load.ink > 0.02 and load.colors > 20
    dom = count_dom(load.dom)
    for name in ORDER:
        assert dom.attrs.get(("data-section", name), 0) == 1, name
    assert dom.tags.get("img", 0) >= 8  # the inline figures
    assert dom.tags.get("svg", 0) >= 1  # the retrieval graph


def test_report_on_a_user_checkpoint_looks_for_induction_heads(tmp_path):
    model = lp.tiny_model(n_layers=2, n_heads=2, d_model=16, d_vocab=20, n_ctx=32)
    path = lp.save_checkpoint(model, tmp_path / "user.safetensors")
    res = report.run_report(str(path), out=tmp_path / "out", progress=False,
                            only=["stacking", "smoothing"])
    names = [s.name for s in res.sections]
    assert names == ["model", "smoothing", "stacking"]
    stacking = res.sections[-1]
    assert stacking.headline["mode"] == "induction heads"
    assert "no retrieval task" in stacking.text


def test_report_on_user_prompts(tmp_path):
    vocab = [f"w{i}" for i in range(20)]
    model = lp.tiny_model(n_layers=2, n_heads=2, d_model=16, d_vocab=20, n_ctx=32, vocab=vocab)
    path = lp.save_checkpoint(model, tmp_path / "words.safetensors")
    res = report.run_report(str(path), prompts=["w1 w2 w3 w4", "w4 w3 w2 w1"],
                            out=tmp_path / "out", progress=False, only=["oversquash"])
    assert res.headline["sections"]["model"]["n_layers"] == 2
    page = res.html_path.read_text()
    assert "2 x 4 tokens" in page and "w1 w2 w3 w4" in page
    with pytest.warns(UserWarning, match="different lengths"):
        res = report.run_report(str(path), prompts=["w1 w2", "w1 w2 w3"], out=tmp_path / "o2",
                                progress=False, only=["model"])
    assert "1 x 2 tokens" in res.html_path.read_text()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["report", "--only", "bogus"], "unknown section"),
        (["report", "--model", "./no/such/model.safetensors"], "does not exist"),
        (["report", "--model", "lensprobe-no-such-org/no-such-model"], "could not load"),
    ],
)
def test_cli_errors_are_clear(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli.main(argv + ["--out", str(tmp_path), "--quiet"]) == 2
    assert message in capsys.readouterr().err


def test_cli_cuda_without_gpu_is_a_clear_error(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["report", "--device", "cuda", "--out", str(tmp_path), "--quiet"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_cli_listing_and_bad_flags(capsys):
    assert cli.main(["report", "--list-models"]) == 0
    assert capsys.readouterr().out.split() == lp.zoo.names()
    assert cli.main(["report", "--list-sections"]) == 0
    assert capsys.readouterr().out.split() == ORDER
    with pytest.raises(SystemExit) as e:
        cli.main(["report", "--no-such-flag"])
    assert e.value.code == 2
