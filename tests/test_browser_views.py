"""Saved lensprobe pages in a real headless browser (Debian's chromium), no extra packages.

:func:`load_in_browser` is reusable (``from tests.test_browser_views import
load_in_browser``): it opens a saved HTML file twice in headless chromium -- once with
``--dump-dom`` (the DOM after scripts ran) and once with ``--screenshot`` -- and reports

* console messages, read from chromium's ``--enable-logging=stderr`` output (every
  ``console.*`` call and every uncaught error is logged there as ``INFO:CONSOLE``; the
  levels are not distinguished, so a clean page must log nothing at all);
* network requests made by the page, read from chromium's own NetLog
  (``--log-net-log``): every ``URL_REQUEST_START_JOB`` to a non-local URL whose
  initiator is the page (browser-internal background jobs carry the initiator
  ``"not an origin"`` and are ignored);
* the screenshot's share of non-background pixels and its number of colours.

If chromium is missing these tests FAIL with the command that installs it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest

import lensprobe as lp

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
    "--disable-default-apps", "--hide-scrollbars",
)
INSTALL_HINT = (
    "chromium is not installed, so the browser tests cannot run. Install it with"
    " `apt-get update && apt-get install -y chromium` (Debian/Ubuntu; the Makefile's CI"
    " target does this), or point LENSPROBE_CHROMIUM at a chromium/chrome binary."
)
_LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:", "chrome:", "chrome-extension:",
                  "devtools:")


def find_chromium() -> str:
    """Path of a chromium binary, or a pytest failure saying how to install one."""
    for cand in (os.environ.get("LENSPROBE_CHROMIUM"), "chromium", "chromium-browser",
                 "google-chrome", "/usr/bin/chromium"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    pytest.fail(INSTALL_HINT)


@dataclass
class PageLoad:
    dom: str
    console: list[str]
    requests: list[str]
    screenshot: Path
    ink: float  # share of pixels differing from the top-left (background) pixel
    colors: int


def _page_requests(netlog: Path) -> list[str]:
    d = json.loads(netlog.read_text())
    start = d["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    urls = []
    for e in d["events"]:
        p = e.get("params") or {}
        if e["type"] != start or "url" not in p:
            continue
        if p["url"].startswith(_LOCAL_SCHEMES) or p.get("initiator") == "not an origin":
            continue
        urls.append(p["url"])
    return urls


def _run(chromium: str, args: list[str], workdir: Path, timeout: float) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(prefix="profile-", dir=workdir)
    return subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=timeout,
    )


def screenshot_stats(png: Path) -> tuple[float, int]:
    from PIL import Image

    img = Image.open(png).convert("RGB")
    px = img.load()
    bg = px[0, 0]
    w, h = img.size
    data = list(img.getdata())
    ink = sum(1 for p in data if p != bg) / (w * h)
    return ink, len(set(data))


def load_in_browser(page: str | Path, *, window: tuple[int, int] = (1280, 1000),
                    timeout: float = 120) -> PageLoad:
    """Open a saved page in headless chromium: DOM, console, page requests, screenshot."""
    chromium = find_chromium()
    page = Path(page).resolve()
    work = Path(tempfile.mkdtemp(prefix="lp-browser-"))
    url = page.as_uri()
    netlog = work / "netlog.json"
    dumped = _run(chromium, ["--enable-logging=stderr", "--v=0", f"--log-net-log={netlog}",
                             "--dump-dom", url], work, timeout)
    assert dumped.returncode == 0, f"chromium --dump-dom failed: {dumped.stderr[-2000:]}"
    shot = work / "shot.png"
    netlog2 = work / "netlog2.json"
    snap = _run(chromium, ["--enable-logging=stderr", "--v=0", f"--log-net-log={netlog2}",
                           f"--window-size={window[0]},{window[1]}", f"--screenshot={shot}", url],
                work, timeout)
    assert snap.returncode == 0 and shot.exists(), f"chromium --screenshot failed: {snap.stderr[-2000:]}"
    console = [m for err in (dumped.stderr, snap.stderr) for m in re.findall(r":CONSOLE[^\]]*\] (.*)", err)]
    requests = _page_requests(netlog) + _page_requests(netlog2)
    ink, colors = screenshot_stats(shot)
    return PageLoad(dumped.stdout, console, requests, shot, ink, colors)


class _Counter(HTMLParser):
    """Counts elements by tag and by (attribute, value) in a DOM dump."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: dict[str, int] = {}
        self.attrs: dict[tuple[str, str], int] = {}

    def handle_starttag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        for k, v in attrs:
            for part in (v or "").split() if k == "class" else [v or ""]:
                self.attrs[(k, part)] = self.attrs.get((k, part), 0) + 1


def count_dom(dom: str) -> _Counter:
    c = _Counter()
    c.feed(dom)
    return c


# --------------------------------------------------------------------------- tests
HOSTILE = ["<img src=x onerror=alert(1)>", "t&1", "t2", '"q"', "t4", "</script><b>"]


@pytest.fixture(scope="module")
def retrieval_page(tmp_path_factory):
    from lensprobe.tasks.priority import PriorityTask, priority_dataset

    X, y = priority_dataset(PriorityTask.random(6, 4, tie_size=3, seed=0), 6, require_cycle=True)
    model = lp.priority_model(6, 8, seed=1)
    lp.train_priority(model, X, y, steps=400, lr=0.5, progress=False)
    tpg = lp.TokenPriorityGraph.from_data(X, y, vocab=HOSTILE)
    al = lp.priority_alignment(model, tpg)
    path = al.show().save(tmp_path_factory.mktemp("page") / "tpg.html")
    return path, tpg, al


def test_retrieval_graph_page_in_headless_chromium(retrieval_page):
    path, tpg, al = retrieval_page
    res = load_in_browser(path)
    assert res.console == [], f"console messages: {res.console}"
    assert res.requests == [], f"the page made network requests: {res.requests}"
    c = count_dom(res.dom)
    n_nodes = sum(g.number_of_nodes() for g in tpg.graphs.values())
    n_data = sum(g.number_of_edges() for g in tpg.graphs.values())
    n_model = sum(1 for e in al.edges if e[3] in ("agree", "implied", "reversed", "unsupported"))
    assert c.attrs.get(("class", "lp-node"), 0) == n_nodes
    assert c.attrs.get(("data-kind", "data"), 0) == n_data
    assert c.attrs.get(("data-kind", "model"), 0) == n_model
    assert c.attrs.get(("class", "lp-panel"), 0) == len(tpg.last_tokens)
    assert c.attrs.get(("id", "lp-toggle-model"), 0) == 1
    # hostile token strings stayed text: no <img> or <b> element came out of them
    assert c.tags.get("img", 0) == 0 and c.tags.get("b", 0) == 0
    assert "&lt;img src=x onerror=alert(1)&gt;" in res.dom
    assert res.ink > 0.01 and res.colors > 20, (res.ink, res.colors)


def test_browser_check_catches_errors_requests_and_blank_pages(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text(
        '<!DOCTYPE html><html><body><img src="http://lensprobe-test.invalid/x.png">'
        '<script>console.error("boom"); undefinedFunction();</script></body></html>'
    )
    res = load_in_browser(bad)
    assert any("boom" in m for m in res.console)
    assert any("undefinedFunction" in m for m in res.console)
    assert any("lensprobe-test.invalid" in u for u in res.requests)
    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body></body></html>")
    res = load_in_browser(blank)
    assert res.console == [] and res.requests == []
    assert res.ink == 0.0 and res.colors == 1


def test_missing_chromium_fails_with_install_hint(monkeypatch):
    monkeypatch.setenv("LENSPROBE_CHROMIUM", "")
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(pytest.fail.Exception, match="apt-get install -y chromium"):
        find_chromium()
