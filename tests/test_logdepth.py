"""Issue 13: fewer layers than hops. The shipped log-depth model, the search record and the
depth study, each number measured here (on batches the card never saw), not read from a card.

``retrieval-deep`` is a GPT-2 style 2-layer transformer trained on chains of 1-4 hops
(``scripts/logdepth_experiments.py``, config A6 + phase 2, the best of three seeds): Musat's bound allows D <= 4 for
t = 2 (t >= log_3(2D)) and the doubling line reaches 2^2 = 4, while chaining one-hop heads
reaches only D = 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lensprobe as lp
from lensprobe.tasks.retrieval import RetrievalTask

RESULTS = Path(lp.__file__).parent / "zoo" / "results"


@pytest.fixture(scope="module")
def deep():
    card = lp.zoo.info("retrieval-deep")
    task = RetrievalTask(**card["task"])
    return lp.zoo.load("retrieval-deep"), task, card


@pytest.fixture(scope="module")
def fresh(deep):
    _, task, _ = deep
    return task.sample(2048, torch.Generator().manual_seed(2024))


@pytest.fixture(scope="module")
def stack(deep):
    model, task, _ = deep
    return lp.stacked_heads(model, task.sample(256, torch.Generator().manual_seed(7)))


def test_fewer_layers_than_hops(deep):
    model, task, _ = deep
    assert model.cfg.n_layers == 2 and max(task.hops) == 4
    from lensprobe.tasks.retrieval import depth_bound

    assert depth_bound(4) == 2  # the bound allows 4 hops in 2 layers


def test_accuracy_beyond_depth(deep, fresh):
    """Query accuracy per chain length D on 2048 fresh sequences, against the chance of
    answering with a random literal present in the sequence."""
    model, task, _ = deep
    qa = lp.query_accuracy(model, fresh)
    guess = task.literal_guess(fresh)
    assert qa[1] >= 0.98
    assert qa[4] >= 0.9, qa  # the longest chains: twice the depth
    for d in (2, 3, 4):
        assert qa[d] >= 0.88, (d, qa)
        assert qa[d] - guess[d] >= 0.35, (d, qa[d], guess[d])


def test_accuracy_by_brute_force(deep, fresh):
    """query_accuracy against a plain argmax over the model's logits at the query."""
    model, _, _ = deep
    q = int(fresh.info["query_pos"])
    with torch.no_grad():
        pred = model(fresh.tokens)[:, q].argmax(-1)
    hit = pred == fresh.info["resolved"][:, q]
    D = fresh.info["main_hops"]
    qa = lp.query_accuracy(model, fresh)
    for d in (1, 2, 3, 4):
        assert qa[d] == pytest.approx(hit[D == d].float().mean().item(), abs=1e-6)


def test_stack_reads_one_and_two_hops_in_the_last_layer(stack):
    """The measured mechanism: every specialist is in layer 1; it holds 1-hop heads and a
    2-hop head (attention on the referent two links up, over its best baseline); no
    layer-0 head is a specialist, so the hop profile does not rise across layers."""
    assert stack.stack and {s.layer for s in stack.stack} == {1}
    hops = {s.hop for s in stack.stack}
    assert 1 in hops and 2 in hops
    two = [s for s in stack.stack if s.hop == 2]
    assert all(s.over_baseline >= 0.1 for s in two)
    assert not stack.specialist[0].any()
    assert stack.increasing is False


def test_ablating_the_two_hop_head_hurts_long_chains_only(stack):
    """Mean-ablating each 2-hop head's output: chains of 2+ hops lose accuracy, 1-hop
    positions do not."""
    for s in (s for s in stack.stack if s.hop == 2):
        drop = stack.ablation[s.name]
        assert drop[1] <= 0.02, drop
        assert drop[2] >= 0.15 and drop[4] >= 0.2, drop
        assert s.resolves is not None and s.resolves >= 2


def test_card_records_three_seeds_with_emergence(deep):
    _, _, card = deep
    runs = card["runs"]
    assert sorted(r["seed"] for r in runs) == [0, 1, 2] and runs[0]["seed"] == card["seed"]
    for r in runs:
        em = r["emergence"]
        assert em["order"], r["seed"]
        assert set(em["loss_drop_at"]) >= {"1", "2"}


def test_search_record_lists_every_configuration():
    rec = json.loads((RESULTS / "logdepth_search.json").read_text())
    names = {r["name"] for r in rec["runs"]}
    assert {"A1", "A4", "A5", "A6", "A6+ft", "B1", "B4", "B5"} <= names
    for r in rec["runs"]:
        assert "status" in r and {"query_accuracy", "last_eval", "query_accuracy_per_layers"} & set(r), r["name"]


def test_depth_study_is_complete():
    study = lp.load_depth_study()
    assert study.layers == [1, 2, 3, 4] and study.seeds == [0, 1] and study.hops == list(range(1, 9))
    assert study.complete
    assert not torch.isnan(study.accuracy).any()
