"""Views that render offline: circuitsvis components with their bundle inlined, and
self-contained HTML pages (inline SVG/CSS/JS, every token string escaped).

circuitsvis's ``RenderedHTML`` shows a CDN version by default (and probes the internet to
decide); lensprobe never uses it. :func:`circuitsvis_view` builds the component from
circuitsvis's own bundled JavaScript (``circuitsvis/dist/cdn/iife.js``), loaded in a
classic ``<script>`` so a page can include it once for many components, and writes the
props as JSON with ``<``, ``>`` and ``&`` escaped so a token such as ``</script>`` cannot
end the script early.

Every string that reaches a page passes through one of two functions: :func:`escape` for
HTML (lensprobe's own views, and circuitsvis props that circuitsvis writes with
``innerHTML``) and :func:`visible` for text that React or a canvas renders as text. Both
write bidirectional controls out as ``\\u202e`` so a token cannot reorder what is shown
around it. :func:`circuitsvis_view` picks which one per prop (:data:`CIRCUITSVIS_TEXT_PROPS`).
"""

from __future__ import annotations

import html
import json
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

__all__ = [
    "View",
    "circuitsvis_view",
    "attention_heads",
    "colored_tokens",
    "html_page",
    "escape",
    "visible",
    "table_html",
    "save_html",
    "CIRCUITSVIS_TEXT_PROPS",
]

# Unicode bidirectional controls (the "Trojan Source" characters, CVE-2021-42574): a token
# holding one would reorder the text displayed after it. Written out, never applied.
_BIDI_CONTROLS = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
_BIDI_VISIBLE = {ord(c): f"\\u{ord(c):04x}" for c in _BIDI_CONTROLS}


def visible(text: Any) -> str:
    """``str(text)`` with every bidirectional control written out as ``\\uXXXX`` text.

    For strings that are rendered as text (React children, canvas labels, pandas cells
    before pandas escapes them); :func:`escape` adds HTML escaping on top.
    """
    return str(text).translate(_BIDI_VISIBLE)


def escape(text: Any) -> str:
    """HTML-escape any value's string form (quotes included), for text and attributes.

    Bidirectional controls are written out first (:func:`visible`).
    """
    return html.escape(visible(text), quote=True)


def table_html(df: Any, max_rows: int | None = None, *, na_rep: str = "NaN") -> str:
    """A pandas DataFrame as an HTML table, every header and cell through :func:`escape`."""
    df = df if max_rows is None else df.head(max_rows)
    df = df.rename(columns=visible)
    for col in df.columns:
        if df[col].map(lambda v: isinstance(v, str)).any():
            df[col] = df[col].map(lambda v: visible(v) if isinstance(v, str) else v)
    # pandas escapes <, > and & in every cell and header (escape=True).
    return df.to_html(index=False, escape=True, na_rep=na_rep, float_format=lambda v: f"{v:.4g}")


def _safe_json(value: Any) -> str:
    """JSON that is safe inside a <script> element."""
    return (
        json.dumps(value)
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


@lru_cache(maxsize=1)
def circuitsvis_bundle() -> str:
    """circuitsvis's bundled JavaScript (about 1.3 MB), read from the installed package."""
    import circuitsvis

    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    # A literal "</script" inside the bundle would end the element early.
    return path.read_text(encoding="utf-8").replace("</script", "<\\/script")


def bundle_script() -> str:
    """A classic <script> that defines the global ``CircuitsVis`` (include once per page)."""
    return f"<script>{circuitsvis_bundle()}</script>"


class View:
    """An HTML fragment that displays in Jupyter and saves as a standalone page."""

    def __init__(self, body: str, *, title: str = "lensprobe view", needs_bundle: bool = False):
        self.body = body
        self.title = title
        self.needs_bundle = needs_bundle

    def fragment(self, *, include_bundle: bool = True) -> str:
        """The view's HTML; with ``include_bundle`` the circuitsvis script comes along."""
        if self.needs_bundle and include_bundle:
            return bundle_script() + self.body
        return self.body

    def _repr_html_(self) -> str:
        return self.fragment()

    def to_html(self) -> str:
        """A complete, self-contained HTML document."""
        return html_page(self.title, [self])

    def save(self, path: str | Path) -> Path:
        return save_html(self.to_html(), path)

    def __repr__(self) -> str:
        return f"View({self.title!r}, {len(self.body)} chars)"


# The string props circuitsvis (1.43) renders as text, read from its bundle: AttentionHeads'
# head names are React children; AttentionHeads/AttentionPattern tokens are chart.js axis
# labels and tooltips drawn on a canvas. Every other string prop is taken to be HTML:
# ColoredTokens, ColoredTokensMulti, TopkTokens, TopkSamples, TextNeuronActivations and
# TokenLogProbs write their tokens with dangerouslySetInnerHTML (ColoredTokens' tooltip
# then shows the escaped form, e.g. ``&lt;``), and a prop not listed here is escaped too.
CIRCUITSVIS_TEXT_PROPS: dict[str, frozenset[str]] = {
    "AttentionHeads": frozenset({"tokens", "attentionHeadNames"}),
    "AttentionPattern": frozenset({"tokens"}),
}


def _circuitsvis_strings(value: Any, as_text: bool) -> Any:
    """Every string inside a prop value through :func:`visible` (text) or :func:`escape`."""
    if isinstance(value, str):
        return visible(value) if as_text else escape(value)
    if isinstance(value, (list, tuple)):
        return [_circuitsvis_strings(v, as_text) for v in value]
    if isinstance(value, dict):
        return {k: _circuitsvis_strings(v, as_text) for k, v in value.items()}
    return value


def circuitsvis_view(component: str, *, title: str | None = None, **props: Any) -> View:
    """A circuitsvis component (``AttentionHeads``, ``ColoredTokens`` ...) rendered offline.

    String props are escaped for HTML unless :data:`CIRCUITSVIS_TEXT_PROPS` lists them as
    rendered as text (then only bidirectional controls are written out).
    """
    from circuitsvis.utils.convert_props import convert_props

    text_props = CIRCUITSVIS_TEXT_PROPS.get(component, frozenset())
    props = {k: _circuitsvis_strings(v, k in text_props) for k, v in props.items()}
    div = "lensprobe-cv-" + uuid.uuid4().hex[:12]
    props_json = _safe_json(json.loads(convert_props(props)))
    body = (
        f'<div id="{div}" style="margin: 15px 0;"></div>\n'
        f"<script>CircuitsVis.render({_safe_json(div)}, CircuitsVis.{component}, {props_json});"
        "</script>"
    )
    return View(body, title=title or component, needs_bundle=True)


def attention_heads(
    attention: Any,
    tokens: Sequence[str],
    head_names: Sequence[str] | None = None,
    *,
    title: str = "attention heads",
) -> View:
    """circuitsvis ``attention_heads``: ``attention`` is [heads, dest, src]."""
    import torch

    att = torch.as_tensor(attention).detach().float().cpu()
    if att.ndim != 3 or att.shape[1] != att.shape[2] or att.shape[1] != len(tokens):
        raise ValueError(
            f"attention must be [heads, dest, src] with dest = src = len(tokens) ="
            f" {len(tokens)}, got {tuple(att.shape)}."
        )
    props: dict[str, Any] = {"attention": att.tolist(), "tokens": [str(t) for t in tokens]}
    if head_names is not None:
        props["attentionHeadNames"] = [str(h) for h in head_names]
    return circuitsvis_view("AttentionHeads", title=title, **props)


def colored_tokens(
    tokens: Sequence[str], values: Any, *, title: str = "token values"
) -> View:
    """circuitsvis ``colored_tokens``: one value per token."""
    import torch

    vals = torch.as_tensor(values).detach().float().cpu().flatten().tolist()
    if len(vals) != len(tokens):
        raise ValueError(f"got {len(vals)} values for {len(tokens)} tokens.")
    return circuitsvis_view(
        "ColoredTokens", title=title, tokens=[str(t) for t in tokens], values=vals
    )


_PAGE_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 2em auto;
       max-width: 1100px; color: #222; line-height: 1.45; }
h1, h2, h3 { font-weight: 600; }
section { margin: 2em 0; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: 2px 6px; }
figure img { max-width: 100%; }
.note { color: #555; font-size: 0.95em; }
"""


def html_page(
    title: str, parts: Iterable[View | str], *, css: str = "", head: str = ""
) -> str:
    """A complete self-contained HTML document.

    ``parts`` are Views or trusted HTML strings written by lensprobe (escape any user or
    token text with :func:`escape` before passing it as a string). The circuitsvis bundle
    is inlined once if any view needs it. No external script, stylesheet or font.
    """
    parts = list(parts)
    need_bundle = any(isinstance(p, View) and p.needs_bundle for p in parts)
    body = "\n".join(
        p.fragment(include_bundle=False) if isinstance(p, View) else str(p) for p in parts
    )
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{escape(title)}</title>\n<style>{_PAGE_CSS}{css}</style>\n{head}\n"
        + (bundle_script() if need_bundle else "")
        + f"\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def save_html(document: str, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(document, encoding="utf-8")
    return path


def figure_html(fig: Any, *, alt: str = "figure") -> str:
    """A matplotlib figure as an inline <img> (base64 PNG): no external file."""
    import base64
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<figure><img alt="{escape(alt)}" src="data:image/png;base64,{data}"></figure>'


def figure_view(fig: Any, title: str, summary: Any = None, *, extra_html: str = "") -> View:
    """The one "plot, close, wrap" of every result's ``show()``: a heading, the figure
    (closed after rendering), an optional summary (a dict or DataFrame, as a table) and
    trusted ``extra_html`` written by lensprobe."""
    import matplotlib.pyplot as plt

    try:
        body = f"<h3>{escape(title)}</h3>" + figure_html(fig, alt=title)
    finally:
        plt.close(fig)
    if summary is not None and len(summary):
        import pandas as pd

        df = summary if isinstance(summary, pd.DataFrame) else pd.DataFrame(
            {"quantity": list(summary), "value": [str(v) for v in summary.values()]})
        body += table_html(df)
    return View(body + extra_html, title=title)
