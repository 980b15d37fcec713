"""Build the documentation site from nothing, offline: ``make docs`` runs this.

Steps (each fails the build with a message that names the problem):

1. **Execute** every ``tutorials/*.ipynb`` once with nbclient into ``build/docs/executed/``
   (outputs are never committed). An executed copy is reused while its stamp matches: a
   hash of the notebook, of every file of the ``lensprobe`` package (zoo included) and of
   the installed TransformerLens version. ``tests/test_tutorials.py`` reads the same
   copies, so CI executes each notebook once for the tests and the site together.
2. **Check** the executed notebooks: no error output, nothing on stderr (text-mode
   progress bars, warnings and logging all land there), no TransformerLens chatter on
   stdout ("Moving model to device", ...); progress bars are ipywidgets, not text.
3. **Figures** for the paper pages, computed now by :func:`paper_figures` on the zoo's
   real-text language model when it is shipped (``lp.zoo.load("shakespeare")``), else on
   the stand-in the caption names.
4. **Stage** the site's sources in ``build/docs/src``: ``docs/`` as written, ``index.md``
   from ``README.md`` (so the README stays the single source), ``changelog.md`` from
   ``CHANGELOG.md``, ``api.md`` from ``lensprobe.__all__``, the findings tables from the
   zoo cards and ``benchmarks/results/*.json``, and the executed tutorials (progress-bar
   widgets removed: they are transient and their JavaScript manager would come from a CDN).
5. **Check docstrings**: every name in ``lensprobe.__all__`` has its own docstring.
6. **mkdocs build --strict** into ``build/docs/site``: any warning (a broken link or
   anchor, a reference mkdocstrings cannot resolve) fails the build.
7. **Check offline**: no page, stylesheet or script of the site loads anything from
   the network (``tests/test_docs.py`` also opens every page in headless chromium).

Usage: ``python scripts/build_docs.py [--execute-only] [--force]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = ROOT / "tutorials"
BUILD = ROOT / "build" / "docs"
EXECUTED = BUILD / "executed"
SRC = BUILD / "src"
SITE = BUILD / "site"
SNIPPETS = BUILD / "snippets"  # figure + caption per paper page (--8<-- includes them)
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
#: stdout lines TransformerLens prints on its own; a lensprobe call must not cause them.
TL_CHATTER = re.compile(
    r"^(Moving model to device|Loaded pretrained model|Changing model dtype|"
    r"Set(ting)? center_|Setting .* to False|You are not using LayerNorm)", re.M
)
#: The real-text language model of the zoo; the paper figures use it once it is shipped.
REAL_TEXT = "shakespeare"


def tutorials() -> list[Path]:
    return sorted(TUTORIALS.glob("*.ipynb"))


# --------------------------------------------------------------------------- 1. execute
def _tree_hash(h: "hashlib._Hash", root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts:
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())


def _code_stamp() -> str:
    """What an executed notebook depends on besides itself: the package and TL."""
    from importlib.metadata import version

    h = hashlib.sha256()
    _tree_hash(h, ROOT / "lensprobe")
    h.update(version("transformer-lens").encode())
    h.update(sys.version.encode())
    return h.hexdigest()


def stamp(nb_path: Path, code_stamp: str | None = None) -> str:
    h = hashlib.sha256(nb_path.read_bytes())
    h.update((code_stamp or _code_stamp()).encode())
    return h.hexdigest()[:20]


def kernel_env() -> dict[str, str]:
    """The kernel's environment: offline, this checkout first, the inline plot backend.

    MPLBACKEND is removed (the test suite sets Agg, which would hide every figure) and
    TQDM_DISABLE too: the progress bars are part of what the page shows.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("MPLBACKEND", "TQDM_DISABLE")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYDEVD_DISABLE_FILE_VALIDATION="1")
    # The tutorials' models are small: one OpenMP thread is faster (much faster on a busy
    # machine), as in tests/conftest.py.
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def execute(nb_path: Path, out_dir: Path = EXECUTED, *, force: bool = False,
            code_stamp: str | None = None) -> Path:
    """Execute one tutorial into ``out_dir`` (reused while its stamp matches)."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    out = out_dir / nb_path.name
    want = stamp(nb_path, code_stamp)
    if not force and out.is_file():
        old = nbformat.read(out, as_version=4)
        if old.metadata.get("lensprobe", {}).get("stamp") == want:
            return out
    nb = nbformat.read(nb_path, as_version=4)
    work = out_dir / "work" / nb_path.stem  # files a tutorial writes land here, not in tutorials/
    work.mkdir(parents=True, exist_ok=True)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", allow_errors=True,
                            resources={"metadata": {"path": str(work)}})
    t0 = time.perf_counter()
    try:
        client.execute(env=kernel_env())
    except CellExecutionError:  # allow_errors keeps going; errors are checked in step 2
        pass
    nb.metadata["lensprobe"] = {"stamp": want, "seconds": round(time.perf_counter() - t0, 1)}
    out_dir.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out)
    return out


def execute_all(*, force: bool = False) -> list[Path]:
    code = _code_stamp()
    paths = []
    for p in tutorials():
        t0 = time.perf_counter()
        paths.append(execute(p, force=force, code_stamp=code))
        print(f"  {p.name}: {time.perf_counter() - t0:.1f} s", flush=True)
    return paths


# --------------------------------------------------------------------------- 2. check
@dataclass
class Cleanliness:
    """What one executed notebook showed that a reader should not see."""

    errors: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    chatter: list[str] = field(default_factory=list)
    widgets: int = 0  # progress bars rendered as ipywidgets

    @property
    def problems(self) -> list[str]:
        return ([f"error: {e}" for e in self.errors] + [f"stderr: {s!r}" for s in self.stderr]
                + [f"TransformerLens print: {c!r}" for c in self.chatter])


def cleanliness(nb_path: Path) -> Cleanliness:
    import nbformat

    nb = nbformat.read(nb_path, as_version=4)
    c = Cleanliness()
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        for o in cell.get("outputs", []):
            kind = o.get("output_type")
            if kind == "error":
                c.errors.append(f"cell {i}: {o.get('ename')}: {o.get('evalue')}")
            elif kind == "stream" and o.get("name") == "stderr":
                c.stderr.append(f"cell {i}: {o.get('text', '')[:300]}")
            elif kind == "stream":
                c.chatter += [f"cell {i}: {m.group(0)}" for m in TL_CHATTER.finditer(o.get("text", ""))]
            elif WIDGET_VIEW in o.get("data", {}):
                c.widgets += 1
    return c


# --------------------------------------------------------------------------- 3. figures
FIGURES = {
    "oversquash": "Sensitivity of the last token's final representation to each input position",
    "smoothing": "OV eigenvalues per layer with the smoothing and sharpening regions",
    "coupling": "Depth-wise coupling of the residual block Jacobians",
    "stacking": "Hop scores of every head on the retrieval task",
    "priority": "Attention on the highest-priority SCC per training sequence, and edge agreement",
}


def paper_figures(out: Path) -> dict[str, str]:
    """One figure per paper page, computed now; returns each figure's caption.

    Papers 1-3 apply to any language model and use the zoo's real-text model
    (``REAL_TEXT``) when it is shipped, else the retrieval model as a stand-in (the
    caption says which). Papers 4 and 5 need ground truth (hop referents, the priority
    graph of the training data), so they use the task models they were trained for.
    """
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib.pyplot as plt
    import torch

    import lensprobe as lp
    from lensprobe.models import read_checkpoint_metadata, vocab_of
    from lensprobe.tasks.retrieval import RetrievalTask

    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # small models: OpenMP threads cost more than they give (conftest.py)
    captions: dict[str, str] = {}
    real = REAL_TEXT if REAL_TEXT in lp.zoo.names() else None
    lm_name = real or "retrieval"
    lm = lp.zoo.load(lm_name)
    if real:
        lines = ["Now is the winter of our discontent made glorious summer by this sun of York;"
                 " and all the clouds that lour'd upon our house in the deep bosom of the ocean"
                 " buried.",
                 "To be, or not to be, that is the question: whether 'tis nobler in the mind to"
                 " suffer the slings and arrows of outrageous fortune, or to take arms against a"
                 " sea of troubles."]
        rows = [lp.to_tokens(lm, t) for t in lines]
        n = min(48, *(r.shape[1] for r in rows))
        tokens = torch.cat([r[:, :n] for r in rows])
        about = (f"the zoo's real-text language model `{real}` on the opening lines of"
                 " Richard III (and Hamlet's soliloquy for the coupling spread)")
    else:
        task = RetrievalTask(**lp.zoo.info("retrieval")["task"])
        tokens = task.sample(2, torch.Generator().manual_seed(0)).tokens
        about = ("the zoo's `retrieval` model (a stand-in: the real-text model"
                 f" `{REAL_TEXT}` is not in this build's zoo)")

    clock = [time.perf_counter()]

    def save(name: str, fig) -> None:
        fig.savefig(out / f"{name}.png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        print(f"  {name}: {time.perf_counter() - clock[0]:.1f} s", flush=True)
        clock[0] = time.perf_counter()

    save("oversquash", lp.sensitivity(lm, tokens[:1], progress=False).plot())
    captions["oversquash"] = f"`lp.sensitivity(model, tokens).plot()` for {about}."
    save("smoothing", lp.ov_spectrum(lm, progress=False).plot())
    captions["smoothing"] = f"`lp.ov_spectrum(model).plot()` for {about}."
    save("coupling", lp.block_coupling(lm, tokens[:, :32], progress=False).plot())
    captions["coupling"] = f"`lp.block_coupling(model, tokens).plot()` for {about}."

    ret = lp.zoo.load("retrieval")
    task = RetrievalTask(**lp.zoo.info("retrieval")["task"])
    batch = task.sample(128, torch.Generator().manual_seed(1))
    save("stacking", lp.stacked_heads(ret, batch).plot())
    captions["stacking"] = ("`lp.stacked_heads(model, batch).plot()` for the zoo's `retrieval`"
                            " model on 128 fresh retrieval queries.")

    pri = lp.zoo.load("priority")
    extra = read_checkpoint_metadata(lp.zoo.path("priority"))["extra"]
    tpg = lp.TokenPriorityGraph.from_data(extra["sequences"], extra["labels"], vocab=vocab_of(pri))
    al = lp.priority_alignment(pri, tpg, svm=lp.graph_svm(tpg, pri))
    save("priority", al.plot())
    captions["priority"] = ("`lp.priority_alignment(model, tpg).plot()` for the zoo's `priority`"
                            " model against the token-priority graph of its training data.")
    (out / "captions.json").write_text(json.dumps(captions, indent=1))
    return captions


def paper_captions() -> dict[str, str]:
    """The captions of the last build's paper figures."""
    return json.loads((BUILD / "figures" / "captions.json").read_text())


# --------------------------------------------------------------------------- 4. stage
def _strip_widgets(nb_path: Path, dest: Path) -> None:
    """The docs copy: progress-bar widget outputs and widget state removed."""
    import nbformat

    nb = nbformat.read(nb_path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.get("outputs", []) if WIDGET_VIEW not in o.get("data", {})]
    nb.metadata.pop("widgets", None)
    nbformat.write(nb, dest)


def readme_page() -> str:
    """README.md as the site's index: paths into docs/ become site paths."""
    text = (ROOT / "README.md").read_text()
    return text.replace("](docs/", "](")


API_SECTIONS = {
    "": "Errors and version",
    "_tl": "Backend", "core": "Extraction core", "inputs": "Inputs", "models": "Models",
    "training": "Training", "oversquash": "1. Over-squashing and collapse",
    "smoothing": "2. OV spectra and smoothing", "coupling": "3. Block coupling",
    "stacking": "4. Stacked heads", "induction": "4b. Induction heads (real-text stacked heads)",
    "priority": "5. Token-priority graphs", "sweep": "Sweeps (serial or Ray)",
    "tasks": "Tasks", "views": "Views", "zoo": "The zoo",
}


def api_page() -> str:
    """One ``::: path`` block per public name, grouped by the module that defines it."""
    import lensprobe as lp

    groups: dict[str, list[str]] = {}
    for name, path in public_paths().items():
        mod = lp._ORIGIN.get(name, name if name in lp._SUBMODULES else "")
        groups.setdefault(mod, []).append(path)
    lines = ["# API reference", "",
             "Every public name of `lensprobe` (its `__all__`), rendered from the docstrings.", ""]
    for mod, title in API_SECTIONS.items():
        if mod not in groups:
            continue
        lines += [f"## {title}", ""]
        for path in groups.pop(mod):
            lines += [f"::: {path}", "    options:", "      show_root_heading: true",
                      "      heading_level: 3", ""]
    if groups:
        raise SystemExit(f"docs: API_SECTIONS has no section for {sorted(groups)}")
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return "`" + json.dumps(v, default=str)[:120].replace("|", "/") + "`"
    return str(v).replace("|", "/")


def findings_page() -> str:
    """The measured findings as tables: zoo cards' metrics and every benchmark's JSON."""
    import lensprobe as lp

    out = ["# Findings", "",
           "Measured, not copied: this page is generated at build time from the zoo cards"
           " (`lensprobe/zoo/*.json`) and the benchmark results (`benchmarks/results/*.json`,"
           " written by `make bench`). The README's summary table is on the"
           " [home page](index.md#results-measured-on-the-projects-2-core-cpu-machines).", ""]
    out += ["## Zoo models", "", "| model | metric | value |", "|---|---|---|"]
    for name in lp.zoo.names():
        for k, v in (lp.zoo.info(name).get("metrics") or {}).items():
            out.append(f"| `{name}` | {k} | {_fmt(v)} |")
    for p in sorted((ROOT / "benchmarks" / "results").glob("*.json")):
        data = json.loads(p.read_text())
        out += ["", f"## Benchmark `{p.stem}`", "", "| key | value |", "|---|---|"]
        flat = data.items() if isinstance(data, dict) else enumerate(data)
        for k, v in flat:
            out.append(f"| {k} | {_fmt(v)} |")
    return "\n".join(out) + "\n"


def stage(executed: list[Path], captions: dict[str, str]) -> None:
    if SRC.exists():
        shutil.rmtree(SRC)
    shutil.copytree(ROOT / "docs", SRC)
    (SRC / "index.md").write_text(readme_page())
    (SRC / "changelog.md").write_text((ROOT / "CHANGELOG.md").read_text())
    (SRC / "api.md").write_text(api_page())
    (SRC / "findings.md").write_text(findings_page())
    (SRC / "tutorials").mkdir()
    for p in executed:
        _strip_widgets(p, SRC / "tutorials" / p.name)
    (SRC / "figures").mkdir()
    SNIPPETS.mkdir(parents=True, exist_ok=True)
    for name, cap in captions.items():
        shutil.copy(BUILD / "figures" / f"{name}.png", SRC / "figures" / f"{name}.png")
        (SNIPPETS / f"{name}.md").write_text(
            f"![{FIGURES[name]}](../figures/{name}.png)\n\n*{cap}*\n")


def site_config(executed: list[Path]) -> Path:
    """mkdocs.yml with the Tutorials section listing every executed notebook (globbed)."""
    import yaml

    cfg = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    for key in ("docs_dir", "site_dir"):
        cfg[key] = str(ROOT / cfg[key])
    for plugin in cfg["plugins"]:  # paths in the config are relative to the repository
        if isinstance(plugin, dict) and "mkdocstrings" in plugin:
            plugin["mkdocstrings"]["handlers"]["python"]["paths"] = [str(ROOT)]
        if isinstance(plugin, dict) and "mkdocs-jupyter" in plugin:
            plugin["mkdocs-jupyter"]["cache_dir"] = str(ROOT / plugin["mkdocs-jupyter"]["cache_dir"])
    for entry in cfg["nav"]:
        if isinstance(entry, dict) and "Tutorials" in entry:
            entry["Tutorials"] = [f"tutorials/{p.name}" for p in executed]
    out = BUILD / "mkdocs.yml"
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


# --------------------------------------------------------------------------- 5. docstrings
def public_paths() -> dict[str, str]:
    """``lensprobe.__all__`` -> the dotted path where each name is defined."""
    import lensprobe as lp

    return {name: (f"lensprobe.{lp._ORIGIN[name]}.{name}" if name in lp._ORIGIN
                   else f"lensprobe.{name}") for name in lp.__all__}


def missing_docstrings(paths: dict[str, str] | None = None, *, package: str = "lensprobe",
                       search_path: Path = ROOT) -> list[str]:
    """Public names (``lensprobe.__all__``) without a docstring, as mkdocstrings sees them.

    Read statically by griffe (mkdocstrings' own loader): a dataclass's generated
    ``Name(field, ...)`` does not count, and a constant needs the string literal after
    its assignment. ``paths`` maps each name to its dotted path (default: lensprobe's).
    """
    import griffe

    pkg = griffe.load(package, search_paths=[str(search_path)], try_relative_path=False)
    missing = []
    for name, path in (paths if paths is not None else public_paths()).items():
        rel = path.removeprefix(package).lstrip(".")
        obj = pkg[rel] if rel else pkg
        obj = obj.final_target if obj.is_alias else obj
        if obj.docstring is None or not obj.docstring.value.strip():
            missing.append(name)
    return missing


# --------------------------------------------------------------------------- 7. offline
_EXTERNAL = re.compile(
    r"""(?:<(?:script|link|img|iframe|source|video|audio|embed)\b[^>]*?\b(?:src|href)\s*=\s*["']?"""
    r"""|@import\s+(?:url\()?\s*["']?|url\(\s*["']?)((?:https?:)?//[^"')\s>]+)""",
    re.I,
)


def external_loads(site: Path) -> list[str]:
    """Resources the built site would fetch from the network (links to click are fine)."""
    hits = []
    for p in sorted(site.rglob("*")):
        if p.suffix in (".html", ".css") and p.is_file():
            for m in _EXTERNAL.finditer(p.read_text(errors="replace")):
                hits.append(f"{p.relative_to(site)}: {m.group(1)}")
    return hits


# --------------------------------------------------------------------------- driver
def site_stamp(executed: list[Path]) -> str:
    """Everything the site is built from; the build is skipped while it is unchanged."""
    h = hashlib.sha256(_code_stamp().encode())
    for p in [*executed, ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "mkdocs.yml",
              Path(__file__).resolve(), *sorted((ROOT / "benchmarks" / "results").glob("*.json"))]:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    _tree_hash(h, ROOT / "docs")
    return h.hexdigest()[:20]


def build(*, force: bool = False, execute_only: bool = False) -> Path:
    """Execute and check the tutorials, then build and check the site (see the module doc)."""
    t0 = time.perf_counter()
    print("executing tutorials", flush=True)
    executed = execute_all(force=force)
    bad = {p.name: cleanliness(p).problems for p in executed}
    bad = {k: v for k, v in bad.items() if v}
    if bad:
        raise SystemExit("docs: executed tutorials are not clean:\n" + "\n".join(
            f"  {k}: {msg}" for k, v in bad.items() for msg in v))
    if execute_only:
        return EXECUTED
    want = site_stamp(executed)
    record = BUILD / "build.json"
    if not force and record.is_file() and (SITE / "index.html").is_file():
        if json.loads(record.read_text()).get("stamp") == want:
            print(f"docs: {SITE / 'index.html'} is up to date")
            return SITE
    missing = missing_docstrings()
    if missing:
        raise SystemExit(f"docs: public names without a docstring: {', '.join(missing)}")
    print("paper figures", flush=True)
    t_fig = time.perf_counter()
    captions = paper_figures(BUILD / "figures")
    t_fig = time.perf_counter() - t_fig
    stage(executed, captions)
    print("mkdocs build --strict", flush=True)
    t_mk = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--clean",
                        "-f", str(site_config(executed))], cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"docs: mkdocs build failed:\n{r.stdout}\n{r.stderr}")
    t_mk = time.perf_counter() - t_mk
    ext = external_loads(SITE)
    if ext:
        raise SystemExit("docs: the site loads from the network:\n  " + "\n  ".join(ext[:20]))
    seconds = {"total": round(time.perf_counter() - t0, 1), "figures": round(t_fig, 1),
               "mkdocs": round(t_mk, 1),
               "tutorials": {p.name: _nb_seconds(p) for p in executed}}
    record.write_text(json.dumps({"stamp": want, "seconds": seconds}, indent=1))
    print(f"docs: {SITE / 'index.html'} in {seconds['total']:.0f} s (figures {t_fig:.0f} s,"
          f" mkdocs {t_mk:.0f} s; tutorials executed earlier or now: see {record})")
    return SITE


def _nb_seconds(p: Path) -> float:
    import nbformat

    return nbformat.read(p, as_version=4).metadata.get("lensprobe", {}).get("seconds", 0.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--force", action="store_true", help="re-execute every tutorial")
    ap.add_argument("--execute-only", action="store_true",
                    help="execute and check the tutorials, build no site")
    args = ap.parse_args(argv)
    build(force=args.force, execute_only=args.execute_only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
