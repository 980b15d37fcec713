"""A Markdown extension for the docs site: raw HTML is shown as text, never passed through.

Docstrings are plain text with reST-style markup, and some mention tags ("a classic
<script> that defines ..."); Python-Markdown would pass such a tag into the page as
HTML (that one opened a script element and broke the API page). The site's own pages
need no raw HTML, so both raw-HTML paths are removed and ``<`` is escaped like any text.
"""

from __future__ import annotations

from markdown import Markdown
from markdown.extensions import Extension


class EscapeHtml(Extension):
    def extendMarkdown(self, md: Markdown) -> None:  # noqa: N802 (Markdown's API name)
        md.preprocessors.deregister("html_block")
        md.inlinePatterns.deregister("html")


def makeExtension(**kwargs) -> EscapeHtml:  # noqa: N802 (Markdown's loader looks for this name)
    return EscapeHtml(**kwargs)
