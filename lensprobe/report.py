"""The main job: every analysis on one model, one self-contained HTML page plus a JSON.

``run_report()`` (and ``lensprobe report``) resolves the model (zoo name, checkpoint, local
HuggingFace directory or hub name), picks prompts (the model's own task when it is a zoo
model, else ``--prompt`` text or a seeded random sample), runs each section, and writes

* ``report.html``: plots as inline PNG, circuitsvis views with their bundle inlined once,
  graphs as inline SVG; no external reference, so it opens offline;
* ``report.json``: the headline figures of every section, and which sections were skipped
  and why.

A section that does not apply to the model (no retrieval task for a language model, ...)
is skipped with its reason, or replaced by the nearest analysis that applies.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from . import _tl, views, zoo
from .errors import InputError
from .inputs import model_device, resolve_device, to_tokens
from .models import load_model, str_tokens, vocab_of

__all__ = ["run_report", "ReportResult", "Section", "SECTION_NAMES"]


class Skip(Exception):
    """Raised by a section that does not apply to this model; the message says why."""


@dataclass
class Section:
    name: str
    title: str
    text: str = ""  # one or two sentences: what the figure shows, what to conclude
    parts: list[Any] = field(default_factory=list)  # Views and trusted HTML strings
    headline: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None
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


@dataclass
class ReportResult:
    html_path: Path
    json_path: Path
    sections: list[Section]
    seconds: float
    headline: dict[str, Any]


# --------------------------------------------------------------------------- model + prompts
def _resolve_model(spec: str | None, device: str) -> tuple[Any, str, str | None]:
    dev = resolve_device(device)
    if spec is None:
        spec = zoo.DEFAULT
    if spec in zoo.names():
        return zoo.load(spec, device=dev), spec, spec
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


def _prompts(model: Any, task: Any | None, prompts: list[str] | None, n: int = 4):
    if prompts:
        rows = [to_tokens(model, p) for p in prompts]
        if len({r.shape[1] for r in rows}) > 1:
            warnings.warn("prompts of different lengths: the report analyses the first one only;"
                          " pass prompts of equal token length to analyse them together.")
            rows = rows[:1]
        toks = torch.cat(rows)
        return toks, str_tokens(model, toks)
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
    """A pandas DataFrame as an escaped HTML table (pandas escapes cell text)."""
    return df.head(max_rows).to_html(index=False, escape=True, float_format=lambda v: f"{v:.4g}")


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
    from .coupling import coupling, trajectory_metrics

    big = _is_big(ctx.model)
    toks = ctx.tokens[:1, :32] if big else ctx.tokens[:2]
    n = toks.shape[1]
    positions = sorted({n - 1, n // 2, 0}) if n > 32 or big else None
    coup = coupling(ctx.model, toks, positions=positions, progress=False)
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


def induction_scan(model: Any, *, n: int = 24, batch: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Previous-token and induction scores per head on repeated random tokens.

    Tokens r_1..r_n r_1..r_n (uniform random, seeded). For query i in the second half,
    previous-token score = mean A[i, i-1]; induction score = mean A[i, i-n+1] (the token
    after the earlier copy of the current token). Returns [layers, heads] tensors.
    """
    from .core import guard, run_hooked

    g = torch.Generator().manual_seed(seed)
    n = min(n, model.cfg.n_ctx // 2)
    half = torch.randint(0, model.cfg.d_vocab, (batch, n), generator=g)
    toks = torch.cat([half, half], dim=1).to(model_device(model))
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(model.cfg.n_layers)]
    with guard(model), torch.no_grad():
        acts = run_hooked(model, toks, names)
    q = torch.arange(n, 2 * n)
    prev = torch.stack([acts[nm][:, :, q, q - 1].mean(dim=(0, 2)) for nm in names]).cpu()
    ind = torch.stack([acts[nm][:, :, q, q - n + 1].mean(dim=(0, 2)) for nm in names]).cpu()
    return {"previous_token": prev.float(), "induction": ind.float()}


def _stacking(ctx: Context) -> Section:
    from .stacking import query_accuracy, stacked_heads

    if ctx.task is None:
        scan = induction_scan(ctx.model)
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        for ax, (name, val) in zip(axes, scan.items()):
            im = ax.imshow(val.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
            ax.set_title(f"{name.replace('_', ' ')} score")
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            fig.colorbar(im, ax=ax)
        fig.tight_layout()
        ind = scan["induction"]
        l, h = divmod(int(ind.argmax()), ind.shape[1])
        return Section(
            "stacking", "Stacked heads (induction / previous-token scan)",
            text=(
                "This model has no retrieval task with ground-truth hop referents, so the"
                " section scans for the simplest stacked circuit instead: previous-token heads"
                " feeding induction heads, on repeated random tokens. Strongest induction head:"
                f" L{l}H{h} with score {float(ind.max()):.2f} (uniform attention would give"
                f" about {2 / (3 * 24):.2f})."
            ),
            parts=[_fig(fig, "induction scan")],
            headline={"mode": "induction scan", "max_induction": float(ind.max()),
                      "max_induction_head": f"L{l}H{h}",
                      "max_previous_token": float(scan["previous_token"].max())},
        )
    batch = ctx.task.sample(128, torch.Generator().manual_seed(1))
    stack = stacked_heads(ctx.model, batch)
    acc = query_accuracy(ctx.model, batch)
    names = ", ".join(f"{s['name']} (hop {s['hop']}, +{s['over_baseline']:.2f} over"
                      f" {s['baseline_name']})" for s in stack.stack) or "none"
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
    toks, strs = _prompts(m, task, prompts)
    ctx = Context(m, name, zoo_name, toks, strs, task, progress)
    chosen = [(n, f) for n, f in SECTIONS if only is None or n in only or n == "model"]
    sections: list[Section] = []
    bar = tqdm(chosen, desc="lensprobe report", disable=not progress)
    for sec_name, fn in bar:
        bar.set_postfix_str(sec_name)
        t = time.perf_counter()
        try:
            sec = fn(ctx)
        except Skip as why:
            sec = Section(sec_name, sec_name, skipped=str(why))
        sec.seconds = time.perf_counter() - t
        sections.append(sec)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    headline = {
        "model": name,
        "backend": type(m).__name__,
        "transformer_lens": _tl.TL_VERSION,
        "sections": {
            s.name: ({"skipped": s.skipped} if s.skipped else dict(s.headline, seconds=round(s.seconds, 3)))
            for s in sections
        },
    }
    html_path = views.save_html(_render(name, sections), out / "report.html")
    json_path = out / "report.json"
    json_path.write_text(json.dumps(headline, indent=2, default=_json_default))
    return ReportResult(html_path, json_path, sections, time.perf_counter() - t0, headline)


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
        + (f" (skipped: {views.escape(s.skipped)})" if s.skipped else "") + "</li>"
        for s in sections
    )
    parts.append(f"<ol>{toc}</ol>")
    for s in sections:
        parts.append(f"<section id='{s.name}' data-section='{s.name}'><h2>{views.escape(s.title)}</h2>")
        if s.skipped:
            parts.append(f"<p class='note'>Skipped: {views.escape(s.skipped)}</p>")
        else:
            parts.append(f"<p>{views.escape(s.text)}</p>")
            parts.extend(s.parts)
        parts.append("</section>")
    return views.html_page(f"lensprobe report: {name}", parts)
