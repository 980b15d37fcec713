"""The main job: every analysis on one model, one self-contained HTML page plus a JSON.

``run_report()`` (and ``lensprobe report``) resolves the model (zoo name, checkpoint, local
HuggingFace directory or hub name), picks prompts (the model's own task when it is a zoo
model, else ``--prompt`` text or a seeded random sample), runs each section, and writes

* ``report.html``: plots as inline PNG, circuitsvis views with their bundle inlined once,
  graphs as inline SVG; no external reference, so it opens offline;
* ``report.json``: the headline figures of every section.

A section that does not apply to the model as such (no retrieval task for a language
model, ...) is replaced by the nearest analysis that applies. A section that raises is shown as failed, with its error, in the page and the JSON (``failed``
lists them); the other sections are still run and written, and ``lensprobe report``
exits with status 1 naming the failed sections.
"""

from __future__ import annotations

import json
import math
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from . import _tl, views, zoo
from .errors import InputError
from .inputs import model_device, move_model, resolve_device, to_tokens
from .models import load_model, str_tokens, vocab_of

__all__ = ["run_report", "ReportResult", "Section", "SECTION_NAMES"]


@dataclass
class Section:
    name: str
    title: str
    text: str = ""  # one or two sentences: what the figure shows, what to conclude
    parts: list[Any] = field(default_factory=list)  # Views and trusted HTML strings
    headline: dict[str, Any] = field(default_factory=dict)
    failed: str | None = None  # "ErrorType: message" when the section raised
    traceback: str | None = None
    seconds: float = 0.0


@dataclass
class Context:
    model: Any
    name: str
    zoo_name: str | None
    tokens: torch.Tensor  # [batch, pos] prompts
    str_tokens: list[list[str]]
    task: Any | None
    progress: bool
    init: Any | None = None  # the same architecture at step 0 of its training trajectory


@dataclass
class ReportResult:
    html_path: Path
    json_path: Path
    sections: list[Section]
    seconds: float
    headline: dict[str, Any]

    @property
    def failed(self) -> list[Section]:
        """The sections that raised (each shown in the page and the JSON with its error)."""
        return [s for s in self.sections if s.failed is not None]


# --------------------------------------------------------------------------- model + prompts
def _resolve_model(spec: str | None, device: str) -> tuple[Any, str, str | None]:
    dev = resolve_device(device)
    if spec is None:
        spec = zoo.DEFAULT
    # Loaded where the checkpoint was saved, then moved without TL's "Moving model" print.
    if spec in zoo.names():
        return move_model(zoo.load(spec), dev), spec, spec
    p = Path(spec)
    looks_like_path = p.suffix == ".safetensors" or spec.startswith((".", "/", "~")) or p.exists()
    if looks_like_path and not p.exists():
        raise InputError(
            f"model path {spec!r} does not exist; pass a zoo name ({', '.join(zoo.names())}),"
            " a lensprobe checkpoint, a local HuggingFace directory, or a hub name."
        )
    return load_model(spec, device=str(dev)), spec, None


def _task_for(zoo_name: str | None) -> Any | None:
    """The task a zoo model was trained on (its card records the task's config)."""
    if zoo_name != "retrieval":
        return None
    from .tasks.retrieval import RetrievalTask

    return RetrievalTask(**zoo.info(zoo_name)["task"])


def _heldout_prompts(model: Any, name: str | None, n: int = 2, length: int = 256) -> torch.Tensor | None:
    """[n, length] held-out real-text prompts of a zoo language model, if it ships them
    (``zoo/results/<name>_prompts.json``, made by ``scripts/shakespeare_findings.py``)."""
    path = Path(zoo.__file__).parent / "results" / f"{name}_prompts.json"
    if name is None or not path.is_file():
        return None
    rows = [p["tokens"][:length] for p in json.loads(path.read_text())["passages"][:n]]
    toks = torch.tensor(rows, dtype=torch.long)
    if toks.ndim != 2 or toks.shape[1] > model.cfg.n_ctx or int(toks.max()) >= model.cfg.d_vocab:
        raise InputError(f"{path}: prompts do not fit the model (n_ctx {model.cfg.n_ctx},"
                         f" d_vocab {model.cfg.d_vocab}); regenerate them.")
    return toks.to(model_device(model))


def _prompts(model: Any, task: Any | None, prompts: list[str] | None, n: int = 4,
             zoo_name: str | None = None):
    if prompts:
        rows = [to_tokens(model, p) for p in prompts]
        if len({r.shape[1] for r in rows}) > 1:
            warnings.warn("prompts of different lengths: the report analyses the first one only;"
                          " pass prompts of equal token length to analyse them together.", stacklevel=3)
            rows = rows[:1]
        toks = torch.cat(rows)
        return toks, str_tokens(model, toks)
    if (held := _heldout_prompts(model, zoo_name)) is not None:
        return held, str_tokens(model, held)
    if task is not None:
        batch = task.sample(n, torch.Generator().manual_seed(0))
        toks = batch.tokens.to(model_device(model))
        return toks, [task.str_tokens(t) for t in batch.tokens]
    g = torch.Generator().manual_seed(0)
    length = min(64, model.cfg.n_ctx)
    toks = torch.randint(0, model.cfg.d_vocab, (n, length), generator=g).to(model_device(model))
    return toks, str_tokens(model, toks)


# --------------------------------------------------------------------------- sections
def _model_card(ctx: Context) -> Section:
    cfg = ctx.model.cfg
    card = zoo.info(ctx.zoo_name) if ctx.zoo_name else {}
    rows = {
        "model": ctx.name,
        "backend": f"{type(ctx.model).__name__} (transformer-lens {_tl.TL_VERSION})",
        "layers x heads": f"{cfg.n_layers} x {cfg.n_heads}",
        "d_model / d_head / d_mlp": f"{cfg.d_model} / {cfg.d_head} / {getattr(cfg, 'd_mlp', None)}",
        "n_ctx / d_vocab": f"{cfg.n_ctx} / {cfg.d_vocab}",
        "normalization": str(cfg.normalization_type),
        "positional": str(cfg.positional_embedding_type),
        "attention": str(getattr(cfg, "attention_dir", "causal")),
        "layer norm folded": str(_tl.is_folded(ctx.model)),
        "parameters": f"{sum(p.numel() for p in ctx.model.parameters()):,}",
        "prompts analysed": f"{ctx.tokens.shape[0]} x {ctx.tokens.shape[1]} tokens",
    }
    for k in ("script", "seed", "metrics"):
        if k in card:
            rows[f"training {k}"] = json.dumps(card[k]) if not isinstance(card[k], str) else card[k]
    table = "<table>" + "".join(
        f"<tr><th>{views.escape(k)}</th><td>{views.escape(v)}</td></tr>" for k, v in rows.items()
    ) + "</table>"
    example = " ".join(ctx.str_tokens[0][:48])
    return Section(
        "model", "Model card",
        text="What was analysed: the architecture, where it came from, and the prompts used below.",
        parts=[table, f"<p class='note'>First prompt: <code>{views.escape(example)}</code></p>"],
        headline={"n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "d_model": cfg.d_model,
                  "backend": type(ctx.model).__name__},
    )


def _fig(fig: Any, alt: str) -> str:
    import matplotlib.pyplot as plt

    html = views.figure_html(fig, alt=alt)
    plt.close(fig)
    return html


def _table(df: Any, max_rows: int = 24) -> str:
    """A pandas DataFrame as an escaped HTML table (bidirectional controls written out)."""
    return views.table_html(df, max_rows)


def _is_big(model: Any) -> bool:
    """Models where exact all-position work would not fit the report's time budget."""
    return model.cfg.d_model * model.cfg.n_layers > 4096


def _oversquash(ctx: Context) -> Section:
    from .oversquash import collapse_curve, path_bound, sensitivity

    cfg = ctx.model.cfg
    big = _is_big(ctx.model)
    toks = ctx.tokens[:1, : 64 if big else None]
    method = "hutchinson" if big else "exact"
    sens = sensitivity(ctx.model, toks, method=method, progress=False)
    bound = path_bound(ctx.model, toks, sensitivity_result=sens, progress=False)
    n_max = cfg.n_ctx - 2
    lengths = sorted({n for n in (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if n <= n_max // 2})
    curve = collapse_curve(ctx.model, "repeat_last", lengths=lengths, per_head=False,
                           progress=False)
    rho = float(bound.spearman.mean())
    rel = sens.relative[0]
    first, last = float(rel[0]), float(rel[-1])
    slope = curve.slope()
    thr = {k: (None if v != v else float(v)) for k, v in curve.thresholds_fit.items()}
    est = (" (Hutchinson estimate with 32 probes: the model is too large for the exact"
           " Jacobian within the report's budget)") if big else ""
    return Section(
        "oversquash", "Over-squashing and representational collapse",
        text=(
            "Sensitivity of the last token's final representation to every input position"
            f" (Frobenius norm of the Jacobian{est}), the path-count bound of Barbero et al."
            " (Theorem 5.1) from this model's own attention, and the collapse curve of"
            " prefix+a vs prefix+a a with the number formats' epsilon lines. Rank"
            f" correlation between bound and measurement: {rho:.2f}; relative influence of"
            f" the first token {first:.3f} vs the last {last:.3f}; the collapse distance"
            f" falls with log-log slope {slope:.2f} over n = {lengths[0]}..{lengths[-1]}"
            + ("" if slope < -0.2 else " (no clear collapse: learned positions or a short"
               " context keep the pair apart)") + "."
        ),
        parts=[_fig(sens.plot(), "sensitivity profile"), sens.show(),
               _fig(bound.plot(), "bound vs measured"), _fig(curve.plot(), "collapse curve")],
        headline={"spearman_bound_vs_measured": rho, "relative_first": first,
                  "relative_last": last, "collapse_slope": slope,
                  "n_star_fit": thr, "method": method},
    )


def _smoothing(ctx: Context) -> Section:
    from .smoothing import dominance, ov_spectrum, smoothing_profile

    per_layer = not _is_big(ctx.model)  # the head sum's spectrum is a d x d eigensolve
    spec = ov_spectrum(ctx.model, per_layer=per_layer, progress=False)
    dom = dominance(ctx.model, ctx.tokens, per_layer=per_layer, progress=False)
    prof = smoothing_profile(ctx.model, ctx.tokens)
    readings = [str(r) for r in spec.layer_reading] if per_layer else None
    frac_dc = float(dom.frac_dc.mean())
    hc = prof.mean("hc_dc")
    cos = prof.mean("cosine")
    return Section(
        "smoothing", "Smoothing and sharpening (OV eigenspectra)",
        text=(
            f"OV eigenvalues per layer with the regions that guarantee smoothing or sharpening"
            f" ({spec.weights}); the dominance table says which eigenmode wins for these"
            f" prompts, and the profile tracks ||HC||/||DC|| and token cosine similarity with"
            f" depth. Here the DC (smoothing) mode dominates in {100 * frac_dc:.0f}% of"
            f" (input, layer, head) cases, and ||HC||/||DC|| goes from {float(hc[0]):.3g} to"
            f" {float(hc[-1]):.3g} across depth"
            + ("" if per_layer else " (per-head spectra only: the per-layer head sum needs"
               " d x d eigensolves, skipped for a model this size)") + ": "
            + ("the residual stream is being smoothed." if float(hc[-1]) < float(hc[0])
               else "no smoothing: token representations stay distinct.")
        ),
        parts=[_fig(spec.plot(), "OV eigenvalues"), _table(dom.to_dataframe()),
               _fig(prof.plot(), "smoothing profile")],
        headline={"layer_readings": readings, "frac_dc": frac_dc,
                  "hc_dc_first": float(hc[0]), "hc_dc_last": float(hc[-1]),
                  "cosine_first": float(cos[0]), "cosine_last": float(cos[-1])},
    )


def _coupling(ctx: Context) -> Section:
    from .coupling import block_coupling, trajectory_metrics

    big = _is_big(ctx.model)
    toks = ctx.tokens[:1, :32] if big else ctx.tokens[:2]
    n = toks.shape[1]
    positions = sorted({n - 1, n // 2, 0}) if n > 32 or big else None
    coup = block_coupling(ctx.model, toks, positions=positions, progress=False)
    traj = trajectory_metrics(ctx.model, toks)
    scalar = coup.scalar()
    summary = traj.summary()
    note = (f" (Jacobians at positions {positions} of {n}-token prompts, {toks.shape[0]}"
            " prompt(s), to bound time)" if positions is not None else "")
    return Section(
        "coupling", "Transformer block coupling",
        text=(
            "Depth-wise coupling 1 - m_K^2 of the residual block Jacobians J^l_tt (1 = the"
            " top singular vectors of one block diagonalise another) and the shape of each"
            f" token's trajectory through depth{note}. Mean off-diagonal coupling here is"
            f" {scalar:.3f}; the paper finds higher coupling in better-generalising LLMs."
        ),
        parts=[_fig(coup.plot(), "coupling matrix"), _fig(traj.plot(), "trajectories")],
        headline={"mean_offdiag_coupling": scalar, "k": list(coup.ks),
                  **{f"trajectory_{k}": v for k, v in summary.items()}},
    )


def _induction(ctx: Context) -> Section:
    """Stacked heads on a model without a retrieval task: its induction circuit
    (:func:`lensprobe.induction_heads`), against the same architecture at step 0; on the
    zoo's language model, followed by the retrieval model's stack."""
    from .induction import induction_heads

    half = min(64, (ctx.model.cfg.n_ctx - 1) // 2)
    res = induction_heads(ctx.model, half=half, batch=8, progress=False)
    name, score = res.best
    base = (induction_heads(ctx.init, tokens=res.tokens, half=half, ablate=False, progress=False)
            if ctx.init is not None else None)
    pair = res.strongest_pair
    found = (f"Induction heads (score >= {res.threshold:.1f}): {', '.join(res.induction_heads)};"
             f" previous-token heads: {', '.join(res.previous_token_heads) or 'none'}"
             + (f"; the strongest pair {pair['previous_token_head']} -> {pair['induction_head']}"
                f" K-composes at the {100 * pair['percentile']:.0f}th percentile of all head pairs"
                if pair else "")
             + (f"; mean-ablating the induction heads raises the repeat's loss from"
                f" {res.loss_second:.2f} to {res.ablation_all[1]:.2f} nats (first half"
                f" {res.loss_first:.2f} -> {res.ablation_all[0]:.2f})" if res.ablation_all else "")
             + "." if res.induction_heads else
             f"No induction head: the best score is {score:.3f} ({name}; uniform attention gives"
             f" {res.uniform:.3f}); previous-token heads:"
             f" {', '.join(res.previous_token_heads) or 'none'}.")
    text = (
        "This model has no retrieval task with ground-truth hop referents, so the section looks"
        " for the stacked circuit of natural text: previous-token heads feeding induction heads"
        f" on repeated random tokens ({half} tokens, then the same again). {found} The repeat"
        f" costs {res.loss_second:.2f} nats per token against {res.loss_first:.2f} for the first half"
        + (f"; at initialisation the best induction score is {base.best[1]:.3f} and the repeat"
           f" costs {base.loss_second:.2f} vs {base.loss_first:.2f}." if base is not None else ".")
    )
    headline = {"mode": "induction heads", "max_induction": score, "max_induction_head": name,
                "max_previous_token": float(res.previous_token.max()),
                **{k: v for k, v in res.summary().items()
                   if k in ("induction_heads", "previous_token_heads", "pairs", "loss_first",
                            "loss_second", "in_context_gain", "ablate_induction_heads")}}
    if base is not None:
        headline["init"] = {"max_induction": base.best[1], "loss_first": base.loss_first,
                            "loss_second": base.loss_second}
    sec = Section("stacking", "Stacked heads: the induction circuit", text=text,
                  parts=[_fig(res.plot(), "induction heads"), res.attention_view()], headline=headline)
    if ctx.zoo_name is not None and ctx.zoo_name != "retrieval" and "retrieval" in zoo.names():
        model = zoo.load("retrieval")
        task = _task_for("retrieval")
        toks, strs = _prompts(model, task, None, zoo_name="retrieval")
        stack = _stacking(Context(model, "retrieval", "retrieval", toks, strs, task, ctx.progress))
        sec.title = "Stacked heads: the induction circuit, and the retrieval model's stack"
        sec.text += " Below, the shipped retrieval model: " + stack.text
        sec.parts += ["<h3>The retrieval model's stack</h3>", *stack.parts]
        sec.headline.update({f"retrieval_{k}" if k in sec.headline else k: v
                             for k, v in stack.headline.items()})
    return sec


def _stacking(ctx: Context) -> Section:
    from .stacking import query_accuracy, stacked_heads

    if ctx.task is None:
        return _induction(ctx)
    batch = ctx.task.sample(128, torch.Generator().manual_seed(1))
    stack = stacked_heads(ctx.model, batch)
    acc = query_accuracy(ctx.model, batch)
    names = ", ".join(f"{s.name} (hop {s.hop}, +{s.over_baseline:.2f} over"
                      f" {s.baseline_name})" for s in stack.stack) or "none"
    from .stacking import load_depth_study

    try:
        depth = load_depth_study()
    except InputError:  # a source checkout without the shipped record
        depth = None
    df = stack.to_dataframe()
    return Section(
        "stacking", "Stacked attention heads on the retrieval task",
        text=(
            "Attention mass each head puts on the ground-truth k-hop referents (Musat), set"
            " against baselines a head scores without following the chain (previous token,"
            " same token, BOS, self, and the chance level of an average statement, of any"
            " literal, of a statement that mentions the referent's variable). The stack holds"
            f" every head whose score beats its best baseline: {names}; largest hop per"
            f" stack layer {stack.hop_profile} (rising with layer: {stack.increasing})."
            " Then the stack's attention on one example and the retrieval chain, with the"
            " resolved segment each stacked head reads for the query. Query accuracy per"
            " number of hops: "
            + ", ".join(f"{d}: {100 * a:.0f}%" for d, a in sorted(acc.items()))
            + ". Ablating a stack head should hurt queries needing at least its hop count"
            " more than shorter ones (table)."
            + ("" if depth is None else
               " Last, the shipped depth study: query accuracy per (layers, hops) after at"
               f" most {depth.config.get('steps')} training steps per model over seeds"
               f" {depth.seeds} (literal-guess chance in brackets), with the bound"
               " D <= 3^t/2 and the doubling line 2^t.")
        ),
        parts=[_fig(stack.plot(), "hop scores"), stack.attention_view(), stack.chain_view(),
               _table(df[[c for c in df.columns
                          if c in ("name", "best_hop", "best_score", "best_over",
                                   "specialist", "in_stack")]])]
        + ([] if depth is None else [_fig(depth.plot(), "depth study")]),
        headline={"stack": [dict(s) for s in stack.stack], "increasing": stack.increasing,
                  "hop_profile": stack.hop_profile,
                  "query_accuracy": {str(k): v for k, v in acc.items()},
                  "ablation_check": stack.ablation_check(),
                  "depth_study_mean": None if depth is None else depth.to_dict()["mean"]},
    )


def _priority(ctx: Context) -> Section:
    """The token-priority graph of the shipped priority model (its own data), always."""
    from .models import read_checkpoint_metadata
    from .priority import TokenPriorityGraph, graph_svm, priority_alignment, retrieval_graph_view

    model = zoo.load("priority")
    extra = read_checkpoint_metadata(zoo.path("priority"))["extra"]
    tpg = TokenPriorityGraph.from_data(extra["sequences"], extra["labels"], vocab=vocab_of(model))
    svm = graph_svm(tpg, model)
    al = priority_alignment(model, tpg, svm=svm)
    summ = al.summary()
    return Section(
        "priority", "Token-priority graph: hard retrieval and soft composition",
        text=(
            "The shipped one-layer priority model (Li et al.) against the token-priority graph"
            " of its training data: each panel is one last token's graph with SCCs laid out by"
            " priority and the head's own retrieval edges drawn on top. Here cos(W, W_svm) ="
            f" {summ['cos_svm']:.3f}, the within-SCC part is {summ['fin_distance']:.1e} from"
            f" W_fin, and {100 * summ['retrieved_mass']:.2f}% of attention lands on the"
            " highest-priority SCC: the head does hard retrieval into the top SCC and a soft,"
            " finite mix inside it, as the paper predicts."
            + ("" if ctx.zoo_name == "priority" else
               " (This section always uses the shipped priority model: the analysis needs a"
               " one-layer attention model trained on priority-graph data.)")
        ),
        parts=[retrieval_graph_view(tpg, al, svm, max_panels=8), _table(al.to_dataframe())],
        headline={k: (float(v) if isinstance(v, (int, float)) else v) for k, v in summ.items()},
    )


# --------------------------------------------------------------------------- versus step 0
_VERSUS = {
    "oversquash": (("spearman_bound_vs_measured", "rank correlation of bound and measurement"),
                   ("relative_first", "first-token share"), ("relative_last", "last-token share"),
                   ("collapse_slope", "collapse slope")),
    "smoothing": (("frac_dc", "DC-dominant share"), ("hc_dc_last", "last-layer ||HC||/||DC||"),
                  ("cosine_last", "last-layer cosine")),
    "coupling": (("mean_offdiag_coupling", "mean off-diagonal coupling"),),
}


def _init_model(zoo_name: str | None, device: str) -> Any | None:
    """Step 0 of a zoo model's training trajectory (the same architecture, untrained)."""
    if zoo_name is None or 0 not in zoo.steps(zoo_name):
        return None
    return zoo.load(zoo_name, step=0, device=resolve_device(device))


def _versus_init(sec: Section, fn: Callable[[Context], Section], ctx: Context) -> Section:
    """Run the section again at initialisation and add one sentence comparing the two."""
    keys = _VERSUS.get(sec.name)
    if ctx.init is None or not keys:
        return sec
    from dataclasses import replace

    base = fn(replace(ctx, model=ctx.init, init=None)).headline
    cmp = []
    for k, label in keys:
        a, b = sec.headline.get(k), base.get(k)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isfinite(a) and math.isfinite(b):
            rel = "higher than" if a > b else "lower than" if a < b else "the same as"
            cmp.append(f"{label} {a:.3g} ({rel} {b:.3g} at step 0)")
    if cmp:
        sec.text += " Trained vs the same architecture at initialisation: " + "; ".join(cmp) + "."
    sec.headline["init"] = {k: base.get(k) for k, _ in keys}
    return sec


SECTIONS: list[tuple[str, Callable[[Context], Section]]] = [
    ("model", _model_card),
    ("oversquash", _oversquash),
    ("smoothing", _smoothing),
    ("coupling", _coupling),
    ("stacking", _stacking),
    ("priority", _priority),
]
SECTION_NAMES = [n for n, _ in SECTIONS]


# --------------------------------------------------------------------------- driver
def run_report(
    model: Any = None,
    *,
    prompts: list[str] | None = None,
    out: str | Path = "report",
    device: str = "cpu",
    only: list[str] | None = None,
    progress: bool = True,
) -> ReportResult:
    """Run the sections on ``model`` (a model object, or a spec string as for the CLI)."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    if model is None or isinstance(model, (str, Path)):
        m, name, zoo_name = _resolve_model(None if model is None else str(model), device)
    else:
        _tl.require_model(model)
        m, name, zoo_name = model, type(model).__name__, None
    task = _task_for(zoo_name)
    toks, strs = _prompts(m, task, prompts, zoo_name=zoo_name)
    ctx = Context(m, name, zoo_name, toks, strs, task, progress, init=_init_model(zoo_name, device))
    chosen = [(n, f) for n, f in SECTIONS if only is None or n in only or n == "model"]
    sections: list[Section] = []
    bar = tqdm(chosen, desc="lensprobe report", disable=not progress)
    for sec_name, fn in bar:
        bar.set_postfix_str(sec_name)
        t = time.perf_counter()
        try:
            sec = _versus_init(fn(ctx), fn, ctx)
        except Exception as e:  # noqa: BLE001 -- one broken section must not cost the others
            sec = Section(sec_name, sec_name, failed=f"{type(e).__name__}: {e}",
                          traceback="".join(traceback.format_exception(e)[-_TB_LINES:]))
        sec.seconds = time.perf_counter() - t
        sections.append(sec)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    headline = {
        "model": name,
        "backend": type(m).__name__,
        "transformer_lens": _tl.TL_VERSION,
        "sections": {s.name: _section_json(s) for s in sections},
        "failed": [s.name for s in sections if s.failed is not None],
    }
    html_path = views.save_html(_render(name, sections), out / "report.html")
    json_path = out / "report.json"
    json_path.write_text(json.dumps(headline, indent=2, default=_json_default))
    return ReportResult(html_path, json_path, sections, time.perf_counter() - t0, headline)


_TB_LINES = 12  # the innermost frames of a failed section's traceback


def _section_json(s: Section) -> dict[str, Any]:
    if s.failed is not None:
        return {"failed": s.failed, "traceback": s.traceback, "seconds": round(s.seconds, 3)}
    return dict(s.headline, seconds=round(s.seconds, 3))


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def _render(name: str, sections: list[Section]) -> str:
    parts: list[Any] = [f"<h1>lensprobe report: {views.escape(name)}</h1>"]
    toc = "".join(
        f"<li><a href='#{s.name}'>{views.escape(s.title)}</a>"
        + (" (failed)" if s.failed is not None else "") + "</li>"
        for s in sections
    )
    parts.append(f"<ol>{toc}</ol>")
    for s in sections:
        status = " data-status='failed'" if s.failed is not None else ""
        parts.append(f"<section id='{s.name}' data-section='{s.name}'{status}>"
                     f"<h2>{views.escape(s.title)}</h2>")
        if s.failed is not None:
            parts.append(
                f"<p class='failed' style='color:#a00000'><strong>This section failed</strong>: {views.escape(s.failed)}."
                " The other sections are unaffected.</p>"
                f"<details><summary>traceback</summary><pre>{views.escape(s.traceback or '')}"
                "</pre></details>"
            )
        else:
            parts.append(f"<p>{views.escape(s.text)}</p>")
            parts.extend(s.parts)
        parts.append("</section>")
    return views.html_page(f"lensprobe report: {name}", parts)
