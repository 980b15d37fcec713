// Offline stand-in for MathJax on the tutorial pages (mkdocs-jupyter's default loads it
// from a CDN): TeX between $...$ / $$...$$ in rendered markdown is shown as monospace
// source, so formulas stay readable with no network and no bundled math renderer.
(function () {
  function mark(root) {
    var walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT, null);
    var nodes = [];
    while (walker.nextNode()) {
      var n = walker.currentNode;
      if (n.nodeValue.indexOf("$") >= 0 && !n.parentNode.closest("code, pre, script")) nodes.push(n);
    }
    nodes.forEach(function (n) {
      var parts = n.nodeValue.split(/(\$\$[^$]+\$\$|\$[^$]+\$)/);
      if (parts.length < 2) return;
      var frag = document.createDocumentFragment();
      parts.forEach(function (p, i) {
        if (i % 2 === 1) {
          var c = document.createElement("code");
          c.className = "tex";
          c.textContent = p.replace(/^\$+|\$+$/g, "");
          frag.appendChild(c);
        } else if (p) frag.appendChild(document.createTextNode(p));
      });
      n.parentNode.replaceChild(frag, n);
    });
  }
  function run() {
    document.querySelectorAll(".jp-RenderedMarkdown, .jp-MarkdownOutput").forEach(mark);
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", run);
  else run();
})();
