"""The shared contract of every result class (lensprobe.results.Result).

Every result class of the package must have an example in tests/result_examples/, and
every example passes the same checks: to_dataframe, plot, show, summary, AXES against
the tensors' shapes, and a save/load round trip with equal tensors and fields.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import pkgutil

import matplotlib.figure
import pandas as pd
import pytest
import torch

import lensprobe
from lensprobe.errors import InputError
from lensprobe.results import Result, Table, frame
from lensprobe.views import View

from result_examples import all_examples

EXAMPLES = all_examples()


def _package_result_classes() -> set[str]:
    for info in pkgutil.walk_packages(lensprobe.__path__, "lensprobe."):
        if info.name.split(".")[-1] not in ("cli", "__main__"):
            importlib.import_module(info.name)
    return {n for n, c in Result._registry.items() if c.__module__.startswith("lensprobe.")}


def test_every_result_class_has_an_example():
    missing = _package_result_classes() - set(EXAMPLES)
    assert not missing, f"result classes without an example in tests/result_examples: {sorted(missing)}"


def _same(a, b, where="result"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.cpu(), b) or (a.is_floating_point() and torch.equal(a.isnan().cpu(), b.isnan())
                                           and torch.equal(a.nan_to_num().cpu(), b.nan_to_num())), where
    elif isinstance(a, Result):
        assert type(a) is type(b), where
        sa, sb = a._state(), b._state()
        assert sa.keys() == sb.keys(), where
        for k in sa:
            _same(sa[k], sb[k], f"{where}.{k}")
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for k in a:
            _same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and a != a:
        assert b != b, where
    else:
        assert a == b and type(a) is type(b), f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="module", params=sorted(EXAMPLES))
def example(request):
    return EXAMPLES[request.param]()


def test_axes_name_every_tensor_field(example):
    cls, axes = type(example), example.axes
    for f in dataclasses.fields(example):
        v = getattr(example, f.name)
        if isinstance(v, torch.Tensor):
            assert f.name in axes, f"{cls.__name__}.{f.name} is a tensor without AXES"
            assert v.ndim == len(axes[f.name]), (cls.__name__, f.name, v.shape, axes[f.name])
    assert set(axes) <= {f.name for f in dataclasses.fields(example)}


def test_to_dataframe(example):
    df = example.to_dataframe()
    assert isinstance(df, pd.DataFrame) and len(df) > 0 and len(df.columns) >= 2


def test_plot_and_show(example):
    import matplotlib.pyplot as plt

    fig = example.plot()
    assert isinstance(fig, matplotlib.figure.Figure) and fig.axes
    plt.close(fig)
    before = plt.get_fignums()
    view = example.show()
    assert isinstance(view, View) and len(view.body) > 100
    assert plt.get_fignums() == before, "show() left a figure open"


def test_summary_is_a_dict(example):
    s = example.summary()
    assert isinstance(s, dict)
    json.dumps({k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v)) for k, v in s.items()})


def test_save_load_round_trip(example, tmp_path):
    path = example.save(tmp_path / "r.safetensors")
    back = type(example).load(path)
    _same(example, back)
    assert Result.load(path).__class__ is type(example)


# --------------------------------------------------------------------------- the base itself
def test_frame_matches_a_loop():
    t = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4) / 7
    names = [["a", "b", "c", "d"], ["e", "f", "g", "h"]]
    df = frame(Table({"target": ["x", "y"], "prompt": range(3), "pos": range(4)},
                     {"norm": (("target", "prompt", "pos"), t),
                      "token": (("target", "pos"), names)},
                     {"method": "exact"}))
    rows = [dict(target=tg, prompt=b, pos=i, norm=float(t[ti, b, i]), token=names[ti][i], method="exact")
            for ti, tg in enumerate(["x", "y"]) for b in range(3) for i in range(4)]
    pd.testing.assert_frame_equal(df, pd.DataFrame(rows))


def test_frame_rejects_a_wrong_shape():
    with pytest.raises(InputError, match="shape"):
        frame(Table({"a": range(2)}, {"v": (("a",), torch.zeros(3))}))


def test_load_refuses_foreign_classes_and_files(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "evil.safetensors"
    meta = {"format": 1, "data": {"$result": "Popen", "fields": {"args": "echo hi"}}}
    save_file({"x": torch.zeros(1)}, str(p), metadata={"lensprobe_result": json.dumps(meta)})
    with pytest.raises(InputError, match="not a lensprobe result class"):
        Result.load(p)
    meta = {"format": 1, "data": {"$dict": 5}}
    save_file({"x": torch.zeros(1)}, str(p), metadata={"lensprobe_result": json.dumps(meta)})
    with pytest.raises(InputError, match="malformed"):
        Result.load(p)
    save_file({"x": torch.zeros(1)}, str(p))
    with pytest.raises(InputError, match="not written by"):
        Result.load(p)
    p.write_text("not a safetensors file")
    with pytest.raises(InputError, match="not a safetensors"):
        Result.load(p)


def test_a_result_class_must_draw_itself():
    @dataclasses.dataclass(frozen=True)
    class NoPlot(Result):
        x: int = 0

    with pytest.raises(TypeError, match="abstract"):
        NoPlot()
