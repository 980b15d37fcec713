"""Packaging a user can trust: the wheel, its metadata, and what start-up imports.

The wheel test builds lensprobe's wheel (``pip wheel --no-deps --no-build-isolation``:
nothing is downloaded), installs it with ``--no-deps --no-index`` into a fresh virtual
environment that sees this environment's packages (torch, TransformerLens ...) through a
``.pth`` line, and runs ``lensprobe report`` from a directory outside the source tree with
PYTHONPATH cleared, so only the installed copy can answer.
"""

from __future__ import annotations

import ast
import json
import os
import site
import subprocess
import sys
import sysconfig
import venv
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

import lensprobe as lp

ROOT = Path(__file__).resolve().parent.parent


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg")
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "--disable-pip-version-check", "-q", "-w", str(out), str(ROOT)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = out.glob("lensprobe-*.whl")
    return whl


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed; returns its python."""
    env_dir = tmp_path_factory.mktemp("venv") / "env"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True, env=_clean_env()).stdout.strip()
    r = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                        "--disable-pip-version-check", str(wheel)], capture_output=True, text=True,
                       env=_clean_env())  # with PYTHONPATH, pip would see the source tree's lensprobe
    assert r.returncode == 0, r.stderr[-3000:]
    # Then this environment's packages, after the venv's own (so the wheel's lensprobe wins
    # and the editable install's finder, a .pth file there, is never processed). Written
    # after the install: pip would otherwise see the editable lensprobe and skip the wheel.
    theirs = [p for p in {sysconfig.get_path("purelib"), *site.getsitepackages()} if Path(p).is_dir()]
    (Path(purelib) / "_parent_env.pth").write_text("\n".join(theirs) + "\n")
    return py


def test_wheel_contents_and_metadata(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(z.read(meta_name).decode())
    assert "lensprobe/py.typed" in names
    zoo = ROOT / "lensprobe" / "zoo"
    shipped = {f"lensprobe/zoo/{p.relative_to(zoo).as_posix()}" for p in zoo.rglob("*")
               if p.is_file() and p.suffix in (".safetensors", ".json")}
    assert shipped and shipped <= names, sorted(shipped - names)
    assert meta["Version"] == lp.__version__
    assert {"dev", "ray", "docs"} <= set(meta.get_all("Provides-Extra"))
    classifiers = meta.get_all("Classifier")
    assert "Typing :: Typed" in classifiers and any(c.startswith("License ::") for c in classifiers)


def test_version_has_one_source():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in text and 'attr = "lensprobe._version.__version__"' in text
    assert "\nversion =" not in text.split("[tool.setuptools.dynamic]")[0]
    tree = ast.parse((ROOT / "lensprobe" / "_version.py").read_text())
    (assign,) = [n for n in tree.body if isinstance(n, ast.Assign)]
    assert ast.literal_eval(assign.value) == lp.__version__
    assert f"## {lp.__version__}" in (ROOT / "CHANGELOG.md").read_text()


def test_installed_wheel_runs_report_outside_the_source_tree(installed, tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run(
        [str(installed), "-c", "import json, lensprobe, lensprobe.zoo as z; print(json.dumps("
         "[lensprobe.__file__, str(z.path(z.DEFAULT)), lensprobe.__version__]))"],
        cwd=work, env=_clean_env(), capture_output=True, text=True)
    assert where.returncode == 0, where.stderr[-2000:]
    init, zoo_file, version = json.loads(where.stdout)
    venv_dir = installed.parent.parent.resolve()
    for p in (init, zoo_file):
        assert Path(p).resolve().is_relative_to(venv_dir) and "site-packages" in p, p
        assert not Path(p).resolve().is_relative_to(ROOT), p
    assert version == lp.__version__
    cli = installed.parent / "lensprobe"
    r = subprocess.run([str(cli), "report", "--out", "rep", "--only", "smoothing", "--quiet"],
                       cwd=work, env=_clean_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((work / "rep" / "report.json").read_text())
    assert "smoothing" in report["sections"] and "skipped" not in report["sections"]["smoothing"]
    assert (work / "rep" / "report.html").stat().st_size > 10_000
    v = subprocess.run([str(cli), "--version"], cwd=work, env=_clean_env(), capture_output=True, text=True)
    assert v.stdout.strip() == f"lensprobe {lp.__version__}"


# --------------------------------------------------------------------------- start-up
def _modules_after(code: str) -> set[str]:
    r = subprocess.run([sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr[-2000:]
    return set(json.loads(r.stdout.splitlines()[-1]))


LAZY = ("matplotlib", "pandas", "scipy", "networkx", "circuitsvis")


def test_cli_help_does_not_import_torch():
    mods = _modules_after("import sys; sys.argv = ['lensprobe', '--help']\nfrom lensprobe.cli import main\n"
                          "try:\n    main()\nexcept SystemExit:\n    pass")
    assert "lensprobe.cli" in mods and "torch" not in mods


def test_the_whole_api_loads_without_the_heavy_optional_modules():
    """Every public name resolved, nothing run: the plotting and graph libraries stay out.

    pandas and scipy are checked only where TransformerLens itself does not import them.
    """
    base = _modules_after("import transformer_lens")
    mods = _modules_after("import lensprobe as lp\nfor n in lp.__all__: getattr(lp, n)")
    assert "lensprobe.priority" in mods and "lensprobe.stacking" in mods
    for name in LAZY:
        if name not in base:
            assert name not in mods, f"{name} is imported by `import lensprobe`"
    if lp.BACKEND == "bridge":
        assert "transformer_lens.model_bridge" not in mods


def test_lazy_names_are_the_eager_ones():
    """The TYPE_CHECKING re-exports (for type checkers) match the runtime lazy table."""
    tree = ast.parse((ROOT / "lensprobe" / "__init__.py").read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    static = {}
    for node in block.body:
        if isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                static[a.name] = node.module
    assert static == lp._ORIGIN
    assert set(lp.__all__) == {"__version__", "InputError", "LensprobeError", "ModelError",
                               "NonFiniteError", *lp._ORIGIN, *lp._SUBMODULES}
    import importlib

    for mod in lp._EXPORTS:  # every submodule loaded first: no name may be shadowed by one
        importlib.import_module(f"lensprobe.{mod}")
    for name, mod in lp._ORIGIN.items():
        assert getattr(lp, name) is getattr(sys.modules[f"lensprobe.{mod}"], name), name
    assert callable(lp.block_coupling) and lp.tasks.RetrievalTask is not None
    from lensprobe.oversquash import sensitivity

    assert lp.sensitivity is sensitivity
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        lp.not_a_name  # noqa: B018
