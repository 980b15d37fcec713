"""Stacked-head detection, emergence and the depth study, against plain computations."""

from __future__ import annotations

import pytest
import torch

import lensprobe as lp
from lensprobe import stacking
from lensprobe.tasks import IGNORE
from lensprobe.tasks.retrieval import RetrievalTask


@pytest.fixture(scope="module")
def task():
    return RetrievalTask(hops=[1, 2, 3], n_statements=5, n_vars=8, n_values=5)


@pytest.fixture(scope="module")
def batch(task):
    return task.sample(6, torch.Generator().manual_seed(0))


def model_for(task, **kw):
    opts = dict(n_layers=2, n_heads=2, d_model=16, d_vocab=len(task.vocab), n_ctx=task.seq_len,
                attn_only=True, dtype=torch.float64, vocab=task.vocab)
    opts.update(kw)
    return lp.tiny_model(**opts)


def plain_patterns(model, tokens):
    _, cache = model.run_with_cache(tokens)
    return [cache[f"blocks.{l}.attn.hook_pattern"] for l in range(model.cfg.n_layers)]


def test_hop_scores_match_loops(task, batch):
    model = model_for(task, seed=3)
    pats = plain_patterns(model, batch.tokens)
    res = stacking.hop_scores(model, batch, target="statement")
    res_rhs = stacking.hop_scores(model, batch, target="rhs")
    K = task.max_hops
    B, T = batch.tokens.shape
    for l in range(2):
        for h in range(2):
            for k in range(1, K + 1):
                tot, tot_rhs, n = 0.0, 0.0, 0
                for b in range(B):
                    for i in range(T):
                        if batch.info["hops"][b, i] < k:
                            continue
                        lhs = int(batch.info["ref_lhs"][b, i, k - 1])
                        rhs = int(batch.info["ref_pos"][b, i, k - 1])
                        tot += float(sum(pats[l][b, h, i, j] for j in range(lhs, lhs + task.stmt_len)))
                        tot_rhs += float(pats[l][b, h, i, rhs])
                        n += 1
                assert res.scores[l, h, k - 1] == pytest.approx(tot / n, abs=1e-9)
                assert res_rhs.scores[l, h, k - 1] == pytest.approx(tot_rhs / n, abs=1e-9)
            # baselines over positions with >= 1 hop
            prev = same = bos = self_ = 0.0
            n = 0
            for b in range(B):
                for i in range(T):
                    if batch.info["hops"][b, i] < 1:
                        continue
                    A = pats[l][b, h, i]
                    prev += float(A[i - 1])
                    same += float(sum(A[j] for j in range(i) if batch.tokens[b, j] == batch.tokens[b, i]))
                    bos += float(A[0])
                    self_ += float(A[i])
                    n += 1
            assert res.baselines["previous"][l, h] == pytest.approx(prev / n, abs=1e-9)
            assert res.baselines["same_token"][l, h] == pytest.approx(same / n, abs=1e-9)
            assert res.baselines["bos"][l, h] == pytest.approx(bos / n, abs=1e-9)
            assert res.baselines["self"][l, h] == pytest.approx(self_ / n, abs=1e-9)


def test_k_composition_matches_factored_matrices(task):
    model = model_for(task, seed=5)
    with torch.no_grad():
        _compositions(model)


def _compositions(model):
    """K, Q and V composition through TransformerLens's FactoredMatrix products."""
    for (l1, h1), (l2, h2) in [((0, 0), (1, 1)), ((0, 1), (1, 0))]:
        comp = model.QK[l2, h2] @ model.OV[l1, h1].T  # FactoredMatrix product
        expected = comp.norm() / (model.QK[l2, h2].norm() * model.OV[l1, h1].norm())
        assert stacking.k_composition(model, (l1, h1), (l2, h2)) == pytest.approx(float(expected), rel=1e-8)
        q = model.OV[l1, h1] @ model.QK[l2, h2]
        v = model.OV[l1, h1] @ model.OV[l2, h2]
        assert stacking.composition(model, (l1, h1), (l2, h2), "Q") == pytest.approx(
            float(q.norm() / (model.OV[l1, h1].norm() * model.QK[l2, h2].norm())), rel=1e-8)
        assert stacking.composition(model, (l1, h1), (l2, h2), "V") == pytest.approx(
            float(v.norm() / (model.OV[l1, h1].norm() * model.OV[l2, h2].norm())), rel=1e-8)


def _manual_ablated_accuracy(model, batch, layer, head, mode):
    def hook(z, hook):
        z = z.clone()
        if mode == "zero":
            z[:, :, head, :] = 0
        else:
            z[:, :, head, :] = z[:, :, head, :].reshape(-1, z.shape[-1]).mean(0)
        return z

    logits = model.run_with_hooks(batch.tokens, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", hook)])
    out = {}
    for d in sorted(set(batch.difficulty[batch.targets != IGNORE].tolist())):
        hits = [int(logits[b, i].argmax()) == int(batch.targets[b, i])
                for b in range(len(batch)) for i in range(batch.tokens.shape[1])
                if batch.targets[b, i] != IGNORE and batch.difficulty[b, i] == d]
        out[d] = sum(hits) / len(hits)
    return out


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_stacked_heads_ablation_and_model_untouched(task, batch, mode, fingerprint):
    model = model_for(task, seed=1)
    fp = fingerprint(model)
    res = stacking.stacked_heads(model, batch, threshold=0.0, ablation=mode, ablate="all")
    assert fingerprint(model) == fp
    logits = model(batch.tokens)
    for d, acc in res.clean_accuracy.items():
        sel = (batch.targets != IGNORE) & (batch.difficulty == d)
        assert acc == pytest.approx(float((logits.argmax(-1)[sel] == batch.targets[sel]).float().mean()))
    for l in range(2):
        for h in range(2):
            manual = _manual_ablated_accuracy(model, batch, l, h, mode)
            got = res.ablation[f"L{l}H{h}"]
            for d in manual:
                assert got[d] == pytest.approx(res.clean_accuracy[d] - manual[d], abs=1e-6)
    # detection logic: each layer's best specialist, by the definition
    for s in res.stack:
        l, h = s.layer, s.head
        assert s.hop == int(res.over_baseline[l, h].argmax()) + 1
        assert s.score == pytest.approx(float(res.scores[l, h, s.hop - 1]))
    assert {(s.layer, s.head) for s in res.stack} == {
        (l, h) for l in range(2) for h in range(2) if res.specialist[l, h]}
    df = res.to_dataframe()
    assert len(df) == 4 and {"hop_1", "previous", "in_stack"} <= set(df.columns)
    import matplotlib.pyplot as plt

    plt.close(res.plot())


def test_stacked_heads_failure_midway_leaves_model(task, batch, fingerprint, monkeypatch):
    model = model_for(task, seed=2)
    model.blocks[0].attn.hook_pattern.add_hook(lambda a, hook: a)  # a user hook survives
    fp = fingerprint(model)

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(stacking, "_ablated_accuracy", boom)
    with pytest.raises(RuntimeError, match="boom"):
        stacking.stacked_heads(model, batch, threshold=0.0, ablation="zero", ablate="all")
    assert fingerprint(model) == fp
    with pytest.raises(lp.InputError, match="retrieval Batch"):
        stacking.stacked_heads(model, lp.tasks.Batch(batch.tokens, batch.targets, batch.difficulty))
    with pytest.raises(lp.InputError, match="ablation"):
        stacking.stacked_heads(model, batch, ablation="half")
    assert fingerprint(model) == fp


def test_views_escape_tokens(tmp_path):
    nasty = RetrievalTask(hops=2, n_statements=3, n_vars=4, n_values=3, assign="<b>",
                          separator="&", query="</script>")
    b = nasty.sample(4, torch.Generator().manual_seed(1))
    model = model_for(nasty, seed=0)
    res = stacking.stacked_heads(model, b, threshold=0.0, ablation=None)
    html = res.chain_view().to_html()
    assert "<svg" in html and "&lt;b&gt;" in html and "&lt;/script&gt;" in html
    assert "<b>" not in html.split("<body>")[1].replace("<b>" * 0, "")
    page = res.show().to_html()
    assert "CircuitsVis.render" in page and "</script>" not in _between_scripts(page)
    out = res.show().save(tmp_path / "stack.html")
    text = out.read_text()
    assert out.is_file() and 'src="http' not in text and "<link" not in text


def _between_scripts(page: str) -> str:
    """Text outside <script>...</script> elements, where a raw token would be live HTML."""
    import re

    return re.sub(r"<script>.*?</script>", "", page, flags=re.S).replace("</body>", "")


def test_stays_from_and_emergence_on_known_sequence(task, batch):
    steps = [0, 1, 2, 3, 4]
    assert stacking.stays_from([v >= 0.3 for v in [0.1, 0.5, 0.2, 0.6, 0.7]], steps) == 3
    assert stacking.stays_from([v >= 0.3 for v in [0.1, 0.2, 0.2, 0.1, 0.2]], steps) is None
    # loss drops below half its plateau (largest loss after the first checkpoint) for good
    loss = torch.tensor([[3.0, 3.0], [1.0, 1.2], [0.9, 0.5], [0.4, 0.7], [0.3, 0.2]])
    assert stacking._loss_drops(loss, steps, [1, 2], 0.5) == {1: 3, 2: 4}
    # a model with zero queries attends uniformly; swapping in another model at step 10
    # makes exactly the heads whose score was below the threshold before emerge at 10
    sharp = model_for(task, seed=0)
    flat = model_for(task, seed=0)
    sd = lp._tl.portable_state_dict(flat)
    for l in range(2):
        sd[f"blocks.{l}.attn.W_Q"] = torch.zeros_like(sd[f"blocks.{l}.attn.W_Q"])
        sd[f"blocks.{l}.attn.b_Q"] = torch.zeros_like(sd[f"blocks.{l}.attn.b_Q"])
    lp._tl.load_portable_state_dict(flat, sd)
    em = stacking.emergence([(0, flat), (10, sharp), (20, sharp)], batch, threshold=0.0,
                            progress=False)
    assert em.steps == [0, 10, 20]
    assert set(em.order) == {f"L{l}H{h}" for l in range(2) for h in range(2)}
    assert all(v == 0 for v in em.emerged_at.values())  # threshold 0: present from the start
    hs = stacking.hop_scores(sharp, batch)
    hs_flat = stacking.hop_scores(flat, batch)
    best = hs.scores.argmax(-1)
    thr = float(hs.scores.max(-1).values.median())
    em2 = stacking.emergence({0: flat, 10: sharp, 20: sharp}, batch, threshold=thr, progress=False)
    for l in range(2):
        for h in range(2):
            k = int(best[l, h])
            assert em.scores[-1, l, h] == pytest.approx(float(hs.scores[l, h, k]))
            assert em.scores[0, l, h] == pytest.approx(float(hs_flat.scores[l, h, k]))
            want = None
            if hs.scores[l, h, k] >= thr:
                want = 0 if hs_flat.scores[l, h, k] >= thr else 10
            assert em2.emerged_at.get(f"L{l}H{h}") == want
    # losses per difficulty: plain cross-entropy at the supervised positions
    with torch.no_grad():
        logits = sharp(batch.tokens)
    for n, d in enumerate(em2.difficulties):
        sel = (batch.targets != IGNORE) & (batch.difficulty == d)
        ce = torch.nn.functional.cross_entropy(logits[sel], batch.targets[sel])
        assert em2.loss[1, n] == pytest.approx(float(ce), rel=1e-9)
    assert len(em2.to_dataframe()) == 4
    import matplotlib.pyplot as plt

    plt.close(em2.plot())


def test_depth_study_small_grid(task):
    res = stacking.depth_study(task, layers=(1,), seeds=(0, 1), steps=2, eval_batch_size=16,
                               model_kwargs=dict(d_model=16, n_heads=2), progress=False)
    assert res.accuracy.shape == (1, 2, 3)
    assert ((res.accuracy >= 0) & (res.accuracy <= 1)).all()
    df = res.to_dataframe()
    assert len(df) == 6 and set(df["bound_layers"]) == {1, 2}
    import matplotlib.pyplot as plt

    plt.close(res.plot())


def test_query_accuracy_matches_loop(task, batch):
    model = model_for(task, seed=4)
    qa = stacking.query_accuracy(model, batch)
    logits = model(batch.tokens)[:, -1]
    for D in qa:
        rows = [b for b in range(len(batch)) if batch.info["main_hops"][b] == D]
        hits = [int(logits[b].argmax()) == int(batch.targets[b, -1]) for b in rows]
        assert qa[D] == pytest.approx(sum(hits) / len(rows))


def test_shipped_model_has_an_increasing_stack_that_ablation_confirms(fingerprint):
    card = lp.zoo.info("retrieval")
    model = lp.zoo.load("retrieval")
    task = RetrievalTask(**card["task"])
    batch = task.sample(256, torch.Generator().manual_seed(11))
    qa = stacking.query_accuracy(model, batch)
    assert qa[max(qa)] >= 0.95 and max(qa) >= 4  # solves its longest chains (>= 4 hops)
    fp = fingerprint(model)
    res = stacking.stacked_heads(model, batch, ablation="mean")
    assert fingerprint(model) == fp
    layers = [s.layer for s in res.stack]
    assert len(set(layers)) >= 2 and layers == sorted(layers)
    # the depth from which each stack layer is needed (its heads' smallest) rises with it ...
    first_needed = {}
    for s in res.stack:
        if s.resolves is not None:
            first_needed[s.layer] = min(first_needed.get(s.layer, 99), s.resolves)
    r = [first_needed[l] for l in sorted(set(layers))]
    assert res.functional_order and r == sorted(r) and r[0] < r[-1], r
    # L2H0 puts most of its query attention on literals in general, not on the right one:
    # it is no D-hop head (issue 13)
    assert float(res.baselines["any_literal"][2, 0]) > 0.5
    assert "L2H0" not in {s.name for s in res.stack}
    for s in res.stack:
        assert s.over_baseline >= 0.1 and s.score >= 0.3
    # ... and ablating a head hurts depths at or above its hop more than those below
    checks = res.ablation_check()
    assert set(checks) == {s.name for s in res.stack}
    for name, c in checks.items():
        assert c["drop_at_or_above"] > c["drop_below"], (name, c)


# --------------------------------------------------------------------------- baselines
def _hand_made_patterns(batch, task):
    """[L=1, B, H=4, T, T]: h0 reads the 1-hop referent, h1 spreads over every visible
    literal, h2 reads the chain's literal (the hops(i)-hop referent), h3 is uniform."""
    B, T = batch.tokens.shape
    lo, hi = batch.info["literals"]
    P = torch.zeros(1, B, 4, T, T, dtype=torch.float64)
    for b in range(B):
        for i in range(T):
            n = int(batch.info["hops"][b, i])
            rp = batch.info["ref_pos"][b, i]
            if n >= 1:
                P[0, b, 0, i, int(rp[0])] = 1.0
                P[0, b, 2, i, int(rp[n - 1])] = 1.0
            else:
                P[0, b, 0, i, i] = P[0, b, 2, i, i] = 1.0
            lits = [j for j in range(i + 1) if lo <= int(batch.tokens[b, j]) < hi]
            for j in lits or [i]:
                P[0, b, 1, i, j] = 1.0 / len(lits or [i])
            P[0, b, 3, i, : i + 1] = 1.0 / (i + 1)
    return P


def _brute_hop_baselines(P, batch, task, target="rhs"):
    """Loops over positions and statements, written from HopScores' definitions."""
    _, B, H, T, _ = P.shape
    K = batch.info["ref_pos"].shape[-1]
    lo, hi = batch.info["literals"]
    first = 1 if task.bos else 0
    stmts = [first + s * task.stmt_len for s in range(task.n_statements)]

    def region(l0):
        if target == "rhs":
            return [l0 + task.rhs_offset]
        return list(range(l0, l0 + task.stmt_len))

    scores = torch.zeros(H, K, dtype=torch.float64)
    cat = {n: torch.zeros(H, K, dtype=torch.float64) for n in ("any_statement", "same_kind", "same_variable")}
    for h in range(H):
        for k in range(1, K + 1):
            tot, n_pos = 0.0, 0
            c_tot = {n: 0.0 for n in cat}
            for b in range(B):
                tok = [int(t) for t in batch.tokens[b]]
                for i in range(T):
                    if batch.info["hops"][b, i] < k:
                        continue
                    A = P[0, b, h, i]
                    r = int(batch.info["ref_lhs"][b, i, k - 1])
                    tot += float(sum(A[j] for j in region(r)))
                    vis = [s for s in stmts if max(region(s)) <= i]
                    is_lit = lambda s, tok=tok: lo <= tok[s + task.rhs_offset] < hi  # noqa: E731
                    v = tok[r]
                    members = {
                        "any_statement": vis,
                        "same_kind": [s for s in vis if is_lit(s) == is_lit(r)],
                        "same_variable": [s for s in vis if tok[s] == v or tok[s + task.rhs_offset] == v],
                    }
                    if k == 1:
                        del members["same_variable"]  # defined for k >= 2 only
                    for name, ms in members.items():
                        assert r in ms  # every category holds the referent
                        c_tot[name] += sum(float(sum(A[j] for j in region(s))) for s in ms) / len(ms)
                    n_pos += 1
            if n_pos:
                scores[h, k - 1] = tot / n_pos
                for name in cat:
                    cat[name][h, k - 1] = c_tot[name] / n_pos
    return scores, cat


@pytest.mark.parametrize("target", ["rhs", "statement"])
def test_hop_baselines_match_loops_and_a_literal_head_is_no_hop_head(target):
    task = RetrievalTask(hops=[2, 3], n_statements=6, n_vars=8, n_values=4)
    batch = task.sample(5, torch.Generator().manual_seed(3))
    P = _hand_made_patterns(batch, task)
    hs = stacking._hop_scores_from_patterns(P, batch, target)
    scores, cat = _brute_hop_baselines(P, batch, task, target)
    assert torch.allclose(hs.scores[0], scores, atol=1e-12)
    for name in cat:
        assert torch.allclose(hs.hop_baselines[name][0], cat[name], atol=1e-12), name
    # the literal head: its total literal mass is 1 wherever a literal is visible ...
    assert hs.baselines["any_literal"][0, 1] > 0.9
    stack, specialist, best_hop, best_score, best_over = stacking._stack_from_scores(hs, 0.3, 0.1)
    # ... yet its D-hop score equals the any-literal chance level: no specialist
    if target == "rhs":
        D = 3
        assert hs.scores[0, 1, D - 1] == pytest.approx(float(hs.hop_baselines["same_kind"][0, 1, D - 1]))
    assert not bool(specialist[0, 1]) and not bool(specialist[0, 3])
    assert hs.over_baseline[0, 1].max() < 0.1 and hs.over_baseline[0, 3].max() < 0.1
    # the 1-hop head is a 1-hop specialist, scoring 1 on its referent
    assert bool(specialist[0, 0]) and int(best_hop[0, 0]) == 1 and float(best_score[0, 0]) == pytest.approx(1.0)
    assert [s.name for s in stack] == [n for n in ("L0H0", "L0H2") if n in {s.name for s in stack}]
    assert all(s.over_baseline == pytest.approx(s.score - s.baseline) for s in stack)


def test_stack_holds_every_specialist_of_a_layer():
    task = RetrievalTask(hops=[2, 3], n_statements=6, n_vars=8, n_values=4)
    batch = task.sample(5, torch.Generator().manual_seed(3))
    P = _hand_made_patterns(batch, task)
    P = torch.cat([P, P[:, :, [0]]], dim=2)  # a second 1-hop head in the same layer
    hs = stacking._hop_scores_from_patterns(P, batch, "rhs")
    stack, *_ = stacking._stack_from_scores(hs, 0.3, 0.1)
    names = [s.name for s in stack]
    assert "L0H0" in names and "L0H4" in names


def test_shipped_depth_study_record():
    res = lp.load_depth_study()
    assert res.layers == [1, 2, 3, 4] and res.hops == list(range(1, 9)) and len(res.seeds) >= 2
    assert res.accuracy.shape == (4, len(res.seeds), 8) and res.chance.shape == res.accuracy.shape
    measured = ~torch.isnan(res.accuracy)
    assert res.complete == bool(measured.all())
    assert measured[:, 0].all()  # at least the first seed over every layer count
    # a run is measured for every D or for none
    assert (measured.all(-1) | ~measured.any(-1)).all()
    acc = res.accuracy[measured]
    assert ((acc >= 0) & (acc <= 1)).all() and ((res.chance[measured] > 0) & (res.chance[measured] <= 1)).all()
    done = res.steps_done[measured.all(-1)]
    assert (done >= 1).all() and (done <= res.config["steps"]).all()
    assert torch.allclose(res.mean(), res.accuracy.nanmean(1), equal_nan=True)
    # the record round-trips and malformed records are refused
    again = stacking.DepthStudy.from_dict(res.to_dict())
    assert torch.allclose(again.accuracy, res.accuracy, equal_nan=True)
    bad = res.to_dict()
    bad["accuracy"] = bad["accuracy"][:2]
    with pytest.raises(lp.InputError, match="shape"):
        stacking.DepthStudy.from_dict(bad)
    with pytest.raises(lp.InputError, match="depth-study record"):
        stacking.DepthStudy.from_dict({"layers": [1]})


def test_depth_study_plot_draws_the_bound_and_the_doubling_line():
    import matplotlib.pyplot as plt

    acc = torch.rand(4, 2, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    res = stacking.DepthStudy(acc, [1, 2, 3, 4], [0, 1], list(range(1, 9)), {})
    fig = res.plot()
    lines = {ln.get_label(): ln.get_xdata() for ln in fig.axes[0].get_lines()}
    # t layers: the bound reaches D = floor(3^t / 2) = 1, 4, 13, 40; doubling 2^t = 2, 4, 8, 16
    # (the boundary sits after the last such D among hops 1..8, at index + 0.5)
    assert list(lines["bound: D <= 3^t/2"]) == [0.5, 0.5, 3.5, 3.5, 7.5, 7.5, 7.5, 7.5]
    assert list(lines["doubling: D <= 2^t"]) == [1.5, 1.5, 3.5, 3.5, 7.5, 7.5, 7.5, 7.5]
    plt.close(fig)


def test_query_reads_the_segment_each_stack_head_stands_for(task, batch):
    model = model_for(task, seed=6)
    res = stacking.stacked_heads(model, batch, threshold=0.0, min_over=-1.0, ablation=None, example=2)
    assert len(res.stack) == 4  # every head, by the thresholds
    pats = plain_patterns(model, batch.tokens)
    q = int(batch.info["query_pos"])
    reads = stacking.query_reads(res)
    words = task.str_tokens(batch.tokens[2])
    for s, r in zip(res.stack, reads):
        row = pats[s.layer][2, s.head, q]
        j = int(row.argmax())
        assert r["pos"] == j and r["weight"] == pytest.approx(float(row.max()))
        assert r["token"] == words[j]
        chain = [int(p) for p in batch.info["ref_pos"][2, q] if p >= 0]
        assert r["referent"] == (chain.index(j) + 1 if j in chain else None)
        n = int(batch.info["hops"][2, j])
        assert r["segment"] == [j] + [int(p) for p in batch.info["ref_pos"][2, j, :max(n, 0)]]
    html = res.chain_view().to_html()
    assert "resolved segment it stands for" in html and html.count("<rect") >= len(reads)


# --------------------------------------------------------------------------- cache= and composition
def test_hop_scores_from_a_cache_equal_a_fresh_capture(task, batch):
    model = model_for(task, seed=3)
    _, cache = model.run_with_cache(batch.tokens)
    for target in ("rhs", "statement"):
        fresh = stacking.hop_scores(model, batch, target=target)
        cached = stacking.hop_scores(model, batch, target=target, cache=cache)
        assert torch.equal(fresh.scores, cached.scores) and torch.equal(fresh.counts, cached.counts)
        for name in fresh.hop_baselines:
            assert torch.equal(fresh.hop_baselines[name], cached.hop_baselines[name])
        for name in fresh.baselines:
            assert torch.equal(fresh.baselines[name], cached.baselines[name])
    _, resid_only = model.run_with_cache(batch.tokens, names_filter=lambda n: n.endswith("hook_resid_post"))
    with pytest.raises(lp.InputError, match="hook_pattern"):
        stacking.hop_scores(model, batch, cache=resid_only)
    _, other = model.run_with_cache(batch.tokens[:2])
    with pytest.raises(lp.InputError, match="do not belong"):
        stacking.hop_scores(model, batch, cache=other)


def _dense_composition(model, kind):
    """[L, H, L, H] by dense d x d products per head pair, from the stored weights: with
    grouped-query attention query head h reads K/V head h // (n_heads // n_kv)."""
    sd = lp._tl.portable_state_dict(model)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    n_kv = getattr(model.cfg, "n_key_value_heads", None) or H

    def w(l, name, h):
        if f"blocks.{l}.attn.{name}" in sd:
            return sd[f"blocks.{l}.attn.{name}"][h].double()
        return sd[f"blocks.{l}.attn._{name}"][h // (H // n_kv)].double()  # a shared K/V head

    ov = {(l, h): w(l, "W_V", h) @ w(l, "W_O", h) for l in range(L) for h in range(H)}
    qk = {(l, h): w(l, "W_Q", h) @ w(l, "W_K", h).T for l in range(L) for h in range(H)}
    dst = ov if kind == "V" else qk
    out = torch.full((L, H, L, H), float("nan"), dtype=torch.float64)
    for (l1, h1), A in ov.items():
        for (l2, h2), M in dst.items():
            if l1 < l2:
                C = {"K": A @ M.T, "Q": A @ M, "V": A @ M}[kind]
                out[l1, h1, l2, h2] = torch.linalg.norm(C) / (torch.linalg.norm(A) * torch.linalg.norm(M))
    return out


@pytest.mark.parametrize("n_kv", [None, 2, 1])
def test_composition_matches_dense_products_with_grouped_query_attention(n_kv):
    from lensprobe import induction

    model = lp.tiny_model(n_layers=3, n_heads=4, d_model=16, d_vocab=12, n_ctx=8, n_key_value_heads=n_kv,
                          dtype=torch.float64, seed=7)
    for kind in ("K", "Q", "V"):
        want = _dense_composition(model, kind)
        got = induction.composition_scores(model, kind)
        assert torch.allclose(got, want, rtol=1e-9, atol=0, equal_nan=True), kind
        for (l1, h1, l2, h2) in [(0, 0, 1, 3), (0, 3, 2, 1), (1, 2, 2, 0)]:
            assert stacking.composition(model, (l1, h1), (l2, h2), kind) == pytest.approx(
                float(want[l1, h1, l2, h2]), rel=1e-9)


def test_stack_entries_are_frozen_and_read_as_dicts(task, batch):
    import dataclasses

    model = model_for(task, seed=6)
    res = stacking.stacked_heads(model, batch, threshold=0.0, min_over=-1.0, ablation="zero")
    s = res.stack[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.hop = 3
    assert s["hop"] == s.hop and dict(s) == dataclasses.asdict(s)
    assert res.k_composition == [c["K"] for c in res.compositions]
    # the composition baseline is the mean over every head pair of the two layers
    kc = lp.induction.composition_scores(model, "K")
    for c in res.compositions:
        a = next(e for e in res.stack if e.name == c["src"])
        b = next(e for e in res.stack if e.name == c["dst"])
        assert c["K"] == pytest.approx(stacking.k_composition(model, (a.layer, a.head), (b.layer, b.head)))
        assert c["K_baseline"] == pytest.approx(float(kc[a.layer, :, b.layer, :].mean()))
