"""Every tutorial notebook executes offline, top to bottom, and looks right in Jupyter.

The notebooks are executed once, by ``scripts/build_docs.py`` (``make docs``, which the
test target runs first), into ``build/docs/executed``; the docs site renders those same
copies. A copy is reused only while its stamp (the notebook, the whole package and the
TransformerLens version) matches, so these tests never read stale outputs: when nothing
was built, or something changed, the session fixture executes the notebooks here.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent

def _load_build_docs():
    """scripts/build_docs.py as a module (also used by tests/test_docs.py)."""
    if "build_docs" not in sys.modules:
        spec = importlib.util.spec_from_file_location("build_docs", ROOT / "scripts" / "build_docs.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["build_docs"] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["build_docs"]


build_docs = _load_build_docs()

TUTORIALS = build_docs.tutorials()


@pytest.fixture(scope="session")
def executed() -> dict[str, Path]:
    return {p.name: p for p in build_docs.execute_all()}


def test_there_are_tutorials():
    assert TUTORIALS, "tutorials/ has no notebooks"


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_executes_cleanly(path, executed):
    out = executed[path.name]
    nb = nbformat.read(out, as_version=4)
    assert nb.metadata["lensprobe"]["stamp"] == build_docs.stamp(path), "stale executed copy"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.get("execution_count") for c in code), "not every cell ran"
    clean = build_docs.cleanliness(out)
    assert not clean.errors, clean.errors
    assert not clean.stderr, f"stderr in cell outputs (warnings, logging, text progress bars): {clean.stderr}"
    assert not clean.chatter, f"TransformerLens prints in cell outputs: {clean.chatter}"


def test_some_tutorial_shows_a_progress_widget(executed):
    assert sum(build_docs.cleanliness(p).widgets for p in executed.values()) > 0


def _run_cell(source: str) -> list[dict]:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
    NotebookClient(nb, timeout=120, kernel_name="python3").execute(env=build_docs.kernel_env())
    return nb.cells[0].outputs


def test_progress_bar_is_a_widget_in_jupyter_and_quiet_on_stderr():
    """lensprobe's progress bar in a Jupyter kernel: an ipywidget, nothing on stderr."""
    outs = _run_cell("from lensprobe.core import progress_bar\n"
                     "total = sum(progress_bar(range(5), True, 'steps'))\nprint(total)")
    assert any(build_docs.WIDGET_VIEW in o.get("data", {}) for o in outs), outs
    assert not [o for o in outs if o.get("name") == "stderr"], outs
    assert [o["text"] for o in outs if o.get("name") == "stdout"] == ["10\n"]


def test_cleanliness_check_catches_what_it_should(tmp_path):
    """The checker itself: stderr text, an error and a TransformerLens print are all found."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x", outputs=[
        nbformat.v4.new_output("stream", name="stderr", text="UserWarning: careful\n"),
        nbformat.v4.new_output("stream", name="stdout", text="ok\nMoving model to device:  cpu\n"),
        nbformat.v4.new_output("error", ename="ValueError", evalue="bad", traceback=[]),
    ])])
    p = tmp_path / "nb.ipynb"
    nbformat.write(nb, p)
    c = build_docs.cleanliness(p)
    assert len(c.stderr) == 1 and len(c.errors) == 1 and len(c.chatter) == 1
    assert c.widgets == 0
