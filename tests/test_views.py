"""Views render offline and escape every token string."""

from __future__ import annotations

import re

import pytest
import torch

from lensprobe import views

EVIL = "<script>alert(1)</script>"


def _external_refs(page: str) -> list[str]:
    """<script src=http...>, <link href=http...>, @import url(http...) and the like."""
    tags = re.findall(r"<(?:script|link|img|iframe)\b[^>]*>", page, flags=re.I)
    refs = [t for t in tags if re.search(r"(src|href)\s*=\s*[\"']?\s*(https?:)?//", t, re.I)]
    refs += re.findall(r"@import\s+url\(\s*[\"']?https?://", page, flags=re.I)
    refs += re.findall(r"\bimport\b[^;]{0,200}?from\s*[\"']https?://", page)
    return refs


def _executable_evil(page: str) -> bool:
    """Does the raw evil token appear anywhere outside an escaped form?"""
    return EVIL in page


def test_colored_tokens_page_is_offline_and_escaped(tmp_path):
    view = views.colored_tokens(["a", EVIL, "b"], [0.1, 0.5, 0.9], title=EVIL)
    path = view.save(tmp_path / "v.html")
    page = path.read_text()
    assert "CircuitsVis.ColoredTokens" in page
    assert "var CircuitsVis" in page  # the bundle is inlined
    assert page.count("var CircuitsVis=") == 1
    assert _external_refs(page) == []
    assert not _executable_evil(page)
    # ColoredTokens writes tokens with innerHTML: the prop holds the HTML-escaped token
    assert "\\u0026lt;script\\u0026gt;alert(1)\\u0026lt;/script\\u0026gt;" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # the title, escaped


def test_attention_heads_view_and_shape_check(tmp_path):
    att = torch.softmax(torch.randn(2, 3, 3), -1).tril()
    view = views.attention_heads(att, ["x", EVIL, "y"], ["L0H0", "L0H1"])
    page = view.to_html()
    assert "CircuitsVis.AttentionHeads" in page and "L0H1" in page
    assert not _executable_evil(page)
    assert _external_refs(page) == []
    with pytest.raises(ValueError, match=r"\[heads, dest, src\]"):
        views.attention_heads(att, ["x", "y"])


def test_html_page_includes_bundle_once_for_many_views():
    parts = [views.colored_tokens(["a"], [1.0]), views.colored_tokens(["b"], [2.0]),
             f"<p>{views.escape(EVIL)}</p>"]
    page = views.html_page("two views", parts)
    assert page.count("var CircuitsVis=") == 1
    assert page.count("CircuitsVis.render(") == 2
    assert not _executable_evil(page)
    page_plain = views.html_page("no views", ["<p>plain</p>"])
    assert "CircuitsVis" not in page_plain


def test_external_ref_detector_catches_cdn_pages():
    """The checker above must be able to fail: circuitsvis's own CDN output trips it."""
    import circuitsvis.tokens

    cdn = circuitsvis.tokens.colored_tokens(["a"], [1.0]).cdn_src
    assert "unpkg.com" in cdn
    assert _external_refs(cdn)
    assert _external_refs('<script src="https://cdn.example/x.js"></script>')


def test_jupyter_display_is_inline():
    view = views.colored_tokens(["a", "b"], [0.0, 1.0])
    html = view._repr_html_()
    assert "var CircuitsVis" in html and "unpkg" not in html


def test_figure_html_inlines_png():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    html = views.figure_html(fig, alt=EVIL)
    assert html.startswith("<figure><img") and "data:image/png;base64," in html
    assert not _executable_evil(html)
