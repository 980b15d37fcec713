"""The documentation site: built offline and strict, complete, and clean in a real browser.

The session fixture builds the site with ``scripts/build_docs.py`` (a no-op when
``make docs`` just built it from the same sources; the tutorials are executed once and
shared with tests/test_tutorials.py). Pages are then opened from ``file://`` in headless
chromium with every host name unresolvable, so any network fetch would fail and show.
"""

from __future__ import annotations

import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from tests.test_browser_views import _page_requests, _run, find_chromium
from tests.test_tutorials import build_docs

ROOT = Path(__file__).resolve().parent.parent

PAPERS = ["oversquash", "smoothing", "coupling", "stacking", "priority"]
OFFLINE_FLAGS = ["--host-resolver-rules=MAP * ~NOTFOUND", "--allow-file-access-from-files"]


@pytest.fixture(scope="session")
def site() -> Path:
    return build_docs.build()


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.links += [v for k, v in attrs if k == "href" and v]


def _internal_pages(page: Path, site: Path) -> set[Path]:
    p = _Links()
    p.feed(page.read_text())
    out = set()
    for href in p.links:
        u = urlparse(href)
        if u.scheme or u.netloc or not u.path:
            continue
        target = (page.parent / unquote(u.path)).resolve()
        if target.suffix == ".html" and target.is_relative_to(site.resolve()):
            out.add(target)
    return out


def _content_pages(site: Path) -> set[Path]:
    return {p.resolve() for p in site.rglob("*.html") if p.name != "404.html"}


def test_site_has_every_page(site):
    names = {p.relative_to(site.resolve()).as_posix() for p in _content_pages(site)}
    expected = {"index.html", "api.html", "findings.html", "changelog.html",
                *(f"papers/{n}.html" for n in PAPERS),
                *(f"tutorials/{p.stem}.html" for p in build_docs.tutorials())}
    assert expected <= names, sorted(expected - names)


def test_every_page_is_reachable_from_the_index(site):
    seen, todo = set(), [(site / "index.html").resolve()]
    while todo:
        page = todo.pop()
        if page in seen:
            continue
        seen.add(page)
        for target in _internal_pages(page, site):
            assert target.is_file(), f"{page.name} links to missing {target}"
            todo.append(target)
    assert _content_pages(site) - seen == set()


def test_index_is_the_readme(site):
    html = (site / "index.html").read_text()
    first_line = next(line for line in (ROOT / "README.md").read_text().splitlines()[1:] if line.strip())
    assert first_line.split(",")[0] in html
    assert 'src="report_stacking.png"' in html and (site / "report_stacking.png").is_file()


@pytest.mark.parametrize("paper", PAPERS)
def test_paper_page_has_claim_formula_call_and_a_computed_figure(site, paper):
    html = (site / "papers" / f"{paper}.html").read_text()
    for heading in ("What it claims", "The formula", "The lensprobe call", "The figure"):
        assert heading in html, heading
    assert "lp." in html and "arxiv.org" in html
    img = re.search(rf'<img[^>]+src="\.\./figures/{paper}\.png"', html)
    assert img, "figure missing"
    png = site / "figures" / f"{paper}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    caption = build_docs.paper_captions()[paper]
    assert re.sub(r"`([^`]*)`", r"<code>\1</code>", caption.rstrip("."))[:60] in html


def test_paper_figures_name_the_model_they_came_from(site):
    import lensprobe as lp

    caps = build_docs.paper_captions()
    real = build_docs.REAL_TEXT in lp.zoo.names()
    for paper in ("oversquash", "smoothing", "coupling"):
        assert (f"`{build_docs.REAL_TEXT}`" in caps[paper]) and (("stand-in" in caps[paper]) != real)
    assert "`retrieval`" in caps["stacking"] and "`priority`" in caps["priority"]


@pytest.mark.parametrize("nb", build_docs.tutorials(), ids=[p.stem for p in build_docs.tutorials()])
def test_tutorial_page_shows_executed_outputs(site, nb):
    html = (site / "tutorials" / f"{nb.stem}.html").read_text()
    assert "jp-OutputArea" in html, "no outputs rendered"
    assert "data:image/png;base64," in html, "no figure output"
    assert "widget-view+json" not in html and "widget-state+json" not in html


def test_api_reference_covers_every_public_name(site):
    html = (site / "api.html").read_text()
    for name, path in build_docs.public_paths().items():
        assert f'id="{path}"' in html, f"{name} ({path}) not in the API reference"
    assert build_docs.missing_docstrings() == []


def test_html_in_docstrings_is_shown_as_text(site):
    """views.bundle_script's docstring says "a classic <script> that ...": text, not a tag."""
    html = (site / "api.html").read_text()
    assert "classic &lt;script&gt; that defines" in html
    assert "classic <script>" not in html


def test_docstring_check_finds_a_missing_docstring(tmp_path):
    pkg = tmp_path / "fakepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        '"""Fake."""\nfrom dataclasses import dataclass\n\n'
        'def documented():\n    """Has one."""\n\ndef bare():\n    pass\n\n'
        '@dataclass\nclass Plain:\n    x: int = 0\n\nVALUE = 3\n"""A documented constant."""\n')
    paths = {n: f"fakepkg.{n}" for n in ("documented", "bare", "Plain", "VALUE")}
    assert build_docs.missing_docstrings(paths, package="fakepkg", search_path=tmp_path) == [
        "bare", "Plain"]


def test_strict_build_fails_on_a_broken_link(tmp_path):
    """The site's own validation settings turn a link to a missing page into a failure."""
    import yaml

    cfg = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text("# Home\n\nSee [the guide](guide.md).\n")
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump({
        "site_name": "t", "strict": cfg["strict"], "validation": cfg["validation"],
        "theme": cfg["theme"], "docs_dir": "docs", "site_dir": "site"}))
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "-f", str(tmp_path / "mkdocs.yml")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0 and "guide.md" in r.stderr


def test_no_page_stylesheet_or_script_loads_from_the_network(site):
    assert build_docs.external_loads(site) == []


def test_offline_check_catches_external_loads(tmp_path):
    (tmp_path / "a.html").write_text(
        '<a href="https://example.org">a link is fine</a>'
        '<script src="https://cdn.example.org/x.js"></script>')
    (tmp_path / "b.css").write_text("@import url('https://fonts.googleapis.com/css?family=Roboto');")
    hits = build_docs.external_loads(tmp_path)
    assert len(hits) == 2 and any("cdn.example.org" in h for h in hits)


def test_every_page_loads_offline_in_chromium_without_console_errors(site, tmp_path):
    chromium = find_chromium()
    for page in sorted(_content_pages(site)):
        netlog = tmp_path / f"{page.stem}.json"
        r = _run(chromium, ["--enable-logging=stderr", "--v=0", f"--log-net-log={netlog}",
                            *OFFLINE_FLAGS, "--dump-dom", page.as_uri()], tmp_path, 120)
        name = page.relative_to(site.resolve())
        assert r.returncode == 0, f"{name}: {r.stderr[-1000:]}"
        console = re.findall(r":CONSOLE[^\]]*\] (.*)", r.stderr)
        assert console == [], f"{name}: console messages {console}"
        assert _page_requests(netlog) == [], f"{name}: network requests"
        assert 'class="md-content"' in r.stdout, f"{name}: the page did not render"
