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
import math
import uuid
from dataclasses import dataclass
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
    "GraphPanel",
    "graph_view",
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


# --------------------------------------------------------------------------- graph panels
@dataclass(frozen=True)
class GraphPanel:
    """One panel of :func:`graph_view`, laid out by the analysis (pixel coordinates).

    key:     the panel's id (its ``data-k``); heading, note: its title and a one-line note.
    size:    (width, height) of the drawing.
    boxes:   ((x0, y0, w, h), highlighted) rectangles behind the nodes (highlighted: amber).
    nodes:   (id, label, x, y, weight or None) circles; a weight is written under its node.
    edges:   (src id, dst id, kind, status): kind ``"data"`` (solid) or ``"model"`` (dashed,
             shown or hidden by the view's toggle), coloured by status.
    """

    key: int
    heading: str
    note: str
    size: tuple[float, float]
    boxes: tuple
    nodes: tuple
    edges: tuple


_NODE_R = 15
# kind -> (CSS class, bend of the curve, tooltip prefix): the two kinds bend to opposite
# sides, so a data edge and a head edge of one pair never overlap.
_EDGE_KINDS = {"data": ("lp-data", 14, ""), "model": ("lp-model", -14, "head: ")}

_GRAPH_CSS = """
.lp-panel { display: inline-block; vertical-align: top; margin: 0 18px 18px 0; }
.lp-panel h3 { font-size: 1em; margin: 0.2em 0; }
.lp-scc { fill: #f6f6f2; stroke: #b9b9b0; stroke-width: 1; rx: 6; }
.lp-scc.lp-tied { fill: #fff6e0; stroke: #d9a400; }
.lp-node circle { fill: #fff; stroke: #1f4e79; stroke-width: 1.5; }
.lp-node text { font: 11px monospace; text-anchor: middle; dominant-baseline: central; }
.lp-weight { font: 9px sans-serif; fill: #8a5a00; text-anchor: middle; }
.lp-edge { fill: none; stroke-width: 1.4; }
.lp-edge.lp-model { stroke-dasharray: 5 3; }
.lp-legend span { display: inline-block; margin-right: 1em; }
.lp-hide-model .lp-model { display: none; }
"""

_GRAPH_JS = """
(function () {
  var box = document.getElementById("lp-toggle-model");
  if (!box) { return; }
  box.addEventListener("change", function () {
    document.body.classList.toggle("lp-hide-model", !box.checked);
  });
})();
"""


def _edge_path(p: tuple, q: tuple, bend: float) -> str:
    """A quadratic curve from node p to node q, bent to the left of p -> q by ``bend``."""
    (x1, y1), (x2, y2) = p, q
    dx, dy = x2 - x1, y2 - y1
    L = math.hypot(dx, dy) or 1.0
    ux, uy = dx / L, dy / L
    cx, cy = (x1 + x2) / 2 - uy * bend, (y1 + y2) / 2 + ux * bend
    sx, sy = x1 + ux * _NODE_R, y1 + uy * _NODE_R
    ex, ey = x2 - ux * (_NODE_R + 3), y2 - uy * (_NODE_R + 3)
    return f"M{sx:.1f},{sy:.1f} Q{cx:.1f},{cy:.1f} {ex:.1f},{ey:.1f}"


def _graph_edge(pos: dict, labels: dict, edge: tuple, colors: dict, uid: str) -> str:
    a, b, kind, st = edge
    cls, bend, prefix = _EDGE_KINDS[kind]
    return (
        f'<path class="lp-edge {cls} lp-{st}" data-kind="{kind}" data-status="{st}"'
        f' data-src="{a}" data-dst="{b}" d="{_edge_path(pos[a], pos[b], bend)}"'
        f' stroke="{colors[st]}" marker-end="url(#lp-arrow-{st}-{uid})">'
        f"<title>{prefix}{escape(labels[a])} \u2192 {escape(labels[b])} ({st})</title></path>"
    )


def _graph_node(key: int, node: tuple) -> str:
    t, label, x, y, weight = node
    short = label if len(label) <= 6 else label[:5] + "\u2026"
    out = (
        f'<g class="lp-node" data-k="{key}" data-token="{t}"><title>{escape(label)}</title>'
        f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{_NODE_R}"/>'
        f'<text x="{x:.1f}" y="{y:.1f}">{escape(short)}</text></g>'
    )
    if weight is not None:
        out += f'<text class="lp-weight" x="{x:.1f}" y="{y + _NODE_R + 10:.1f}">w={weight:.2f}</text>'
    return out


def _graph_panel(panel: GraphPanel, colors: dict, uid: str, defs: str) -> str:
    w, h = panel.size
    pos = {t: (x, y) for t, _, x, y, _ in panel.nodes}
    labels = {t: label for t, label, *_ in panel.nodes}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="lp-graph" width="{w:.0f}"'
             f' height="{h:.0f}" viewBox="0 0 {w:.0f} {h:.0f}">', defs]
    parts += [f'<rect class="{"lp-scc lp-tied" if tied else "lp-scc"}" x="{x0}" y="{y0}"'
              f' width="{bw}" height="{bh}" rx="6"/>' for (x0, y0, bw, bh), tied in panel.boxes]
    parts += [_graph_edge(pos, labels, e, colors, uid) for e in panel.edges]
    parts += [_graph_node(panel.key, n) for n in panel.nodes]
    parts.append("</svg>")
    return (f'<section class="lp-panel" data-k="{panel.key}"><h3>{escape(panel.heading)}</h3>'
            f'<div class="note">{escape(panel.note)}</div>{"".join(parts)}</section>')


def graph_view(
    panels: Sequence[GraphPanel],
    colors: dict[str, str],
    *,
    title: str,
    intro: str | None = None,
    toggle: str | None = None,
    note: str | None = None,
) -> View:
    """A self-contained HTML/SVG page of graph panels (the token-priority graph view).

    ``colors``: edge status -> colour (also the legend and the arrow heads). ``intro``: a
    line of text above the panels; ``toggle``: the label of a checkbox that shows or hides
    the ``"model"`` edges; ``note``: a line below. Inline SVG, CSS and a few lines of JS;
    no network; every string escaped.
    """
    uid = uuid.uuid4().hex[:8]
    markers = "".join(
        f'<marker id="lp-arrow-{name}-{uid}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7"'
        f' markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z"'
        f' fill="{color}"/></marker>'
        for name, color in colors.items()
    )
    drawn = "".join(_graph_panel(p, colors, uid, f"<defs>{markers}</defs>" if i == 0 else "")
                    for i, p in enumerate(panels))
    legend = "".join(
        f'<span><svg width="26" height="10"><line x1="0" y1="5" x2="26" y2="5"'
        f' stroke="{c}" stroke-width="2"/></svg> {escape(n)}</span>'
        for n, c in colors.items()
    )
    box = (f' <label><input type="checkbox" id="lp-toggle-model" checked> {escape(toggle)}</label>'
           if toggle else "")
    head = f"<p>{escape(intro or '')}{box}</p>" if intro or toggle else ""
    body = (
        f'<style>{_GRAPH_CSS}</style><div class="lp-tpg"><h2>{escape(title)}</h2>{head}'
        f'<p class="lp-legend">{legend}</p>{drawn}'
        + (f'<p class="note">{escape(note)}</p>' if note else "")
        + f"</div><script>{_GRAPH_JS}</script>"
    )
    return View(body, title=title)
