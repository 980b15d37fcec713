"""Hostile token strings in every view and in the report, opened in headless chromium.

A model's vocabulary is data from a file: a token such as ``<svg/onload=...>`` must show
as text and run nothing, and a bidirectional override (U+202E) must be written out
(``\\u202e``), not applied to the text around it. Each page is opened in a real browser
(:func:`tests.test_browser_views.load_in_browser`); the checks read the DOM after every
script ran: the title is the one lensprobe wrote, nothing was logged, no element came out
of a payload (no ``<img src=x>``, no ``on*`` attribute, no script holding a payload), and
each payload is in the page's visible text.
"""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

import lensprobe as lp
from lensprobe import cli
from lensprobe.tasks.priority import PriorityTask, priority_dataset
from lensprobe.tasks.retrieval import RetrievalTask
from tests.test_browser_views import load_in_browser

# Each payload, if it ran, would retitle the page; none holds a '|' (the HF tokenizer's
# test prompt below separates tokens by spaces, and payloads are added tokens).
SVG = "<svg/onload=document.title='PWN1'>"
SCRIPT = "</script><script>document.title='PWN2';console.log('PWN2')</script>"
IMG = "\"><img src=x onerror=document.title='PWN3'>"
BIDI = "rtl\u202eevil\u2066x\u2069"
PAYLOADS = [SVG, SCRIPT, IMG, BIDI]
BIDI_SHOWN = "rtl\\u202eevil\\u2066x\\u2069"
BIDI_CHARS = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def shown(payload: str) -> str:
    return BIDI_SHOWN if payload == BIDI else payload


class _Page(HTMLParser):
    """Visible text (outside script/style/title), element tags and attributes of a DOM dump."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.text: list[str] = []
        self.title = ""
        self.scripts: list[str] = []
        self.imgs: list[str] = []
        self.event_attrs: list[tuple[str, str]] = []
        self._stack: list[str] = []

    def handle_starttag(self, tag, attrs):
        self._stack.append(tag)
        self.event_attrs += [(tag, k) for k, _ in attrs if k.lower().startswith("on")]
        if tag == "img":
            self.imgs.append(dict(attrs).get("src") or "")

    def handle_endtag(self, tag):
        if tag in self._stack:
            while self._stack and self._stack.pop() != tag:
                pass

    def handle_data(self, data):
        where = self._stack[-1] if self._stack else ""
        if where == "script":
            self.scripts.append(data)
        elif where == "title" and "head" in self._stack:  # not an SVG <title> tooltip
            self.title += data
        elif where != "style":
            self.text.append(data)


def check_page(path: Path, title: str, payloads=PAYLOADS, visible=PAYLOADS) -> _Page:
    res = load_in_browser(path)
    page = _Page()
    page.feed(res.dom)
    text = "".join(page.text).replace("\xa0", " ")
    assert page.title == title, f"the page retitled itself: {page.title!r}"
    assert res.console == [], f"console messages: {res.console}"
    assert res.requests == [], res.requests
    assert page.event_attrs == [], f"elements with event handlers: {page.event_attrs}"
    assert all(src.startswith("data:image/png;base64,") for src in page.imgs), page.imgs
    # lensprobe's own scripts hold the payloads only inside JSON strings ("\u003c/script...")
    assert not any(s.strip().startswith("document.title") for s in page.scripts), "a payload ran as a script"
    assert not BIDI_CHARS & set(text), "a bidirectional control reached the page's text"
    for p in visible:
        assert shown(p) in text, f"payload {p!r} is not visible as text"
    return page


# --------------------------------------------------------------------------- every view
@pytest.fixture(scope="module")
def payload_model():
    vocab = ["<bos>", "a", "b", "c", *PAYLOADS]
    return lp.tiny_model(n_layers=2, n_heads=2, d_model=16, d_vocab=len(vocab), n_ctx=16,
                         dtype=torch.float64, vocab=vocab)


def test_every_view_shows_token_strings_as_text(payload_model, tmp_path):
    model = payload_model
    toks = torch.tensor([[0, 4, 1, 5, 2, 6, 3, 7]])
    sens = lp.sensitivity(model, toks, progress=False)
    bound = lp.path_bound(model, toks, sensitivity_result=sens, progress=False)
    traj = lp.trajectory_metrics(model, toks)
    heads = lp.views.attention_heads(torch.rand(2, 4, 4), [SVG, SCRIPT, IMG, BIDI], PAYLOADS[:2])

    task = RetrievalTask(hops=2, n_statements=3, n_vars=4, n_values=3, assign=SVG,
                         separator=SCRIPT, query=IMG)
    batch = task.sample(4, torch.Generator().manual_seed(0))
    rmodel = lp.tiny_model(n_layers=2, n_heads=2, d_model=16, d_vocab=len(task.vocab),
                           n_ctx=task.seq_len, vocab=task.vocab)
    stack = lp.stacked_heads(rmodel, batch, threshold=0.0, ablation=None)

    X, y = priority_dataset(PriorityTask.random(4, 3, tie_size=2, seed=0), 6, require_cycle=True)
    tpg = lp.TokenPriorityGraph.from_data(X, y, vocab=PAYLOADS)
    pmodel = lp.priority_model(4, 6, seed=0)
    al = lp.priority_alignment(pmodel, tpg)

    views = [sens.show(), bound.show(), traj.show(), heads, stack.show(), tpg.show(), al.show(),
             lp.views.colored_tokens(PAYLOADS, [0.1, 0.4, 0.7, 1.0]),
             lp.views.table_html(al.to_dataframe())]
    path = lp.views.save_html(lp.views.html_page("views", views), tmp_path / "views.html")
    check_page(path, "views")


def test_escaping_is_per_circuitsvis_prop():
    """Props circuitsvis renders as HTML are escaped; props React renders as text are not
    (escaping those would show '&lt;' literally); bidi controls are written out in both."""
    ct = lp.views.colored_tokens([IMG, BIDI], [0.0, 1.0]).body
    assert json.dumps("&quot;&gt;&lt;img src=x onerror=document.title=&#x27;PWN3&#x27;&gt;") \
        .replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e") in ct
    ah = lp.views.attention_heads(torch.ones(1, 2, 2) / 2, ["a&b", BIDI], ["h<1>"]).body
    assert '"a\\u0026b"' in ah and '"h\\u003c1\\u003e"' in ah and BIDI_SHOWN.replace("\\", "\\\\") in ah
    assert lp.views.escape(BIDI) == BIDI_SHOWN and lp.views.visible("<b>") == "<b>"


# --------------------------------------------------------------------------- the report
def _payload_gpt2(directory: Path) -> list[str]:
    """A 2-layer GPT-2 HF directory whose tokenizer maps each payload to one token.

    The tokenizer is built here with ``tokenizers`` (WordLevel over whitespace words, the
    payloads as added tokens so that spaces inside them do not split them) and named
    PreTrainedTokenizerFast in tokenizer_config.json, so both transformers 4 and 5 read it.
    """
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel

    vocab = ["<unk>", "<bos>"] + [f"w{i}" for i in range(8)] + PAYLOADS
    tk = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens([AddedToken("<bos>", special=True), AddedToken("<unk>", special=True)])
    tk.add_tokens([AddedToken(p, normalized=False) for p in PAYLOADS])
    directory.mkdir(parents=True)
    tk.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="PreTrainedTokenizerFast", bos_token="<bos>", eos_token="<bos>",
        unk_token="<unk>")))
    gen = torch.Generator().manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=len(vocab), n_positions=32,
                        n_ctx=32, bos_token_id=1, eos_token_id=1)
    hf = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    hf.save_pretrained(directory)
    return vocab


def test_report_from_a_hostile_hf_directory(tmp_path):
    directory = tmp_path / "hostile-gpt2"
    _payload_gpt2(directory)
    model = lp.load_model(directory)
    prompt = "w1 " + " w2 ".join(PAYLOADS) + " w3"
    assert lp.models.str_tokens(model, lp.to_tokens(model, prompt))[0][-8:] == [
        PAYLOADS[0], "w2", PAYLOADS[1], "w2", PAYLOADS[2], "w2", PAYLOADS[3], "w3"]
    out = tmp_path / "report"
    assert cli.main(["report", "--model", str(directory), "--prompt", prompt, "--only",
                     "model,oversquash", "--out", str(out), "--quiet"]) == 0
    html = (out / "report.html").read_text()
    assert "CircuitsVis.ColoredTokens" in html  # the over-squashing section's token view
    check_page(out / "report.html", f"lensprobe report: {directory}")
