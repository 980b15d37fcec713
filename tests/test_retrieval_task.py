"""The retrieval-chain generator against a plain brute-force reading of its own strings."""

from __future__ import annotations

import collections

import pytest
import torch

import lensprobe as lp
from lensprobe.tasks import IGNORE
from lensprobe.tasks.retrieval import RetrievalTask, depth_bound, doubling_hops


def brute_force(words: list[str], n_values: int, sep: str | None, assign: str | None):
    """Parse 'x = y' statements left to right and resolve every chain by walking it."""
    values = {str(v) for v in range(n_values)}
    i = 1 if words[0] == "<bos>" else 0
    stmt_len = 2 + (assign is not None) + (sep is not None)
    rhs_off = 1 + (assign is not None)
    stmts = []  # (lhs position, var, rhs token)
    while words[i] != "?":
        stmts.append((i, words[i], words[i + rhs_off]))
        i += stmt_len
    query_pos, query_var = i + 1, words[i + 1]
    lhs_pos = {var: p for p, var, _ in stmts}
    rhs_of = {var: r for _, var, r in stmts}

    def value(var):
        while var not in values:
            var = rhs_of[var]
        return var

    def chain_from(pos, var):
        """Referent statements (lhs positions) walking from var; None if one comes later."""
        out = []
        while var not in values:
            if lhs_pos[var] > pos:
                return None
            out.append(lhs_pos[var])
            var = rhs_of[var]
        return out

    truth = {}  # position -> (value, [lhs positions of referents])
    for p, var, r in stmts:
        truth[p + rhs_off] = (value(var), chain_from(p + rhs_off, r))
    truth[query_pos] = (value(query_var), chain_from(query_pos, query_var))
    var_values = {var: value(var) for _, var, _ in stmts}
    return truth, var_values, rhs_off


@pytest.mark.parametrize(
    "opts",
    [
        dict(hops=4, n_statements=8),
        dict(hops=[1, 2, 3], n_statements=6, separator=None),
        dict(hops={2: 0.3, 5: 0.7}, n_statements=9, assign=None, bos=False),
        dict(hops=3, n_statements=7, order="shuffled"),
        dict(hops=[1, 4], n_statements=6, supervision="final"),
        # distractor chains longer than the main chain (issue 13: used to raise IndexError)
        dict(hops=[1], distractor_hops=4),
        dict(hops=[2], n_statements=7, distractor_hops=6, separator=None),
    ],
)
def test_ground_truth_matches_brute_force(opts):
    task = RetrievalTask(**opts)
    batch = task.sample(40, torch.Generator().manual_seed(3))
    # a chain of n statements: its last rhs needs n - 1 hops, the query D
    K = max(task.max_hops, task.distractor_hops - 1)
    assert batch.info["ref_pos"].shape == (40, task.seq_len, K)
    lo, hi = batch.info["literals"]
    assert [task.vocab[i] for i in range(lo, hi)] == [str(v) for v in range(task.n_values)]
    assert batch.tokens.shape == (40, task.seq_len)
    for b in range(40):
        words = task.str_tokens(batch.tokens[b])
        truth, var_values, rhs_off = brute_force(words, task.n_values, task.separator, task.assign)
        assert sorted(p - rhs_off for p in truth if p != task.seq_len - 1) == batch.info["stmt_lhs"].tolist()
        supervised = set()
        for pos in range(task.seq_len):
            refs_rhs = batch.info["ref_pos"][b, pos].tolist()
            refs_lhs = batch.info["ref_lhs"][b, pos].tolist()
            if pos not in truth:
                assert refs_rhs == [-1] * K and batch.targets[b, pos] == IGNORE
                assert batch.info["resolved"][b, pos] == -1
                continue
            val, chain = truth[pos]
            assert task.vocab[int(batch.info["resolved"][b, pos])] == val
            if chain is None:  # a definition comes later: unresolvable for a causal model
                assert batch.targets[b, pos] == IGNORE and refs_rhs == [-1] * K
                continue
            assert refs_lhs == chain + [-1] * (K - len(chain))
            assert refs_rhs == [p + rhs_off for p in chain] + [-1] * (K - len(chain))
            assert batch.info["hops"][b, pos] == len(chain)
            is_query = pos == task.seq_len - 1
            if task.supervision == "curriculum" or is_query:
                supervised.add(pos)
                assert task.vocab[int(batch.targets[b, pos])] == val
                assert batch.difficulty[b, pos] == len(chain)
        assert set(torch.nonzero(batch.targets[b] != IGNORE).flatten().tolist()) == supervised
        assert (batch.difficulty[b] >= 0).sum() == len(supervised)
        # resolved value of every variable
        for i, v in enumerate(batch.info["value_of"][b].tolist()):
            name = task.vocab[task.var_offset + i]
            if v < 0:
                assert name not in var_values
            else:
                assert var_values[name] == task.vocab[v]
        # the main chain ends at the query
        assert batch.info["main_hops"][b] == batch.info["hops"][b, -1]


def test_hop_distribution_and_structure():
    task = RetrievalTask(hops={1: 0.5, 3: 0.5}, n_statements=5)
    batch = task.sample(400, torch.Generator().manual_seed(0))
    counts = collections.Counter(batch.info["main_hops"].tolist())
    assert set(counts) == {1, 3} and 150 < counts[1] < 250
    # every variable is defined once per sequence; literals start each chain
    for b in range(20):
        words = task.str_tokens(batch.tokens[b])
        lhs = [words[1 + 4 * s] for s in range(5)]
        assert len(set(lhs)) == 5
    # interleaved order: curriculum supervises every statement
    assert ((batch.targets != IGNORE).sum(1) == 6).all()


def test_seeded_and_strings():
    task = RetrievalTask(hops=3, n_statements=5)
    a = task.sample(8, torch.Generator().manual_seed(1))
    b = task.sample(8, torch.Generator().manual_seed(1))
    c = task.sample(8, torch.Generator().manual_seed(2))
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    text = task.to_text(a.tokens[0])
    assert text.startswith("<bos> ") and " ? " in text and text.count(";") == 5
    model = lp.tiny_model(n_layers=1, n_heads=1, d_model=8, d_vocab=len(task.vocab),
                          n_ctx=task.seq_len, vocab=task.vocab)
    # the model's word tokenizer reads the task's strings back to the same ids
    assert torch.equal(lp.to_tokens(model, text)[0], a.tokens[0])


def test_literal_guess_counts_distinct_literals():
    task = RetrievalTask(hops=[1, 2], n_statements=4, n_vars=8, separator=None)
    batch = task.sample(300, torch.Generator().manual_seed(6))
    got = task.literal_guess(batch)
    for D in (1, 2):
        vals = []
        for b in range(300):
            if batch.info["main_hops"][b] != D:
                continue
            words = task.str_tokens(batch.tokens[b])
            literals = {w for w in words if w.isdigit()}
            vals.append(1 / len(literals))
        assert got[D] == pytest.approx(sum(vals) / len(vals))


def test_config_round_trip_through_json():
    import json

    task = RetrievalTask(hops={2: 0.25, 4: 0.75}, n_statements=6, separator=None, order="shuffled")
    again = RetrievalTask(**json.loads(json.dumps(task.config())))
    a = task.sample(5, torch.Generator().manual_seed(4))
    b = again.sample(5, torch.Generator().manual_seed(4))
    assert again.vocab == task.vocab and torch.equal(a.tokens, b.tokens)


def test_bad_configurations_raise_clear_errors():
    with pytest.raises(lp.InputError, match="n_statements"):
        RetrievalTask(hops=5, n_statements=3)
    with pytest.raises(lp.InputError, match="n_vars"):
        RetrievalTask(hops=2, n_statements=30, n_vars=26)
    with pytest.raises(lp.InputError, match="hops"):
        RetrievalTask(hops=0)
    with pytest.raises(lp.InputError, match="supervision"):
        RetrievalTask(supervision="all")
    with pytest.raises(lp.InputError, match="collide"):
        RetrievalTask(separator="=")


def test_depth_bound_and_doubling():
    # t >= log_3(2D) computed with floats, independently of the integer loop
    import math

    for D in range(1, 60):
        assert depth_bound(D) == max(1, math.ceil(math.log(2 * D, 3) - 1e-12))
    assert [doubling_hops(L) for L in (1, 2, 3, 4)] == [1, 2, 4, 8]


def test_distractor_chains_longer_than_the_query_chain():
    """Issue 13: reference arrays were sized by the largest D, so a distractor chain's
    deeper right-hand sides raised IndexError."""
    batch = RetrievalTask(hops=[1], distractor_hops=4).sample(64)
    assert batch.info["main_hops"].max() == 1
    assert int(batch.info["hops"].max()) == 3  # some distractor's last rhs needs 3 hops


def _batch_digest(b):
    import hashlib

    h = hashlib.sha256()
    for t in (b.tokens, b.targets, b.difficulty):
        h.update(t.numpy().tobytes())
    for k in sorted(b.info):
        v = b.info[k]
        h.update(k.encode())
        h.update(v.numpy().tobytes() if isinstance(v, torch.Tensor) else repr(v).encode())
    return h.hexdigest()


# sha256 of sample(64, Generator(0)) computed with the code of main at 92547f3 (before
# RetrievalTask._one was split): the shipped zoo model cards depend on these batches.
_PINNED = {
    "default": ({}, "c9639c750213619ff8a23aa444ef599273e210f9dda4d909d8cb3c36b7e47ac6"),
    "shuffled_final": (dict(hops={1: 0.2, 3: 0.5, 5: 0.3}, n_statements=9, order="shuffled",
                            supervision="final", distractor_hops=3),
                       "d9d7b5f485e35c0be90c57ff44c466bc8afe76d0586b4b731ea36ab1a6ec25ae"),
    "noassign": (dict(hops=[2, 3], n_statements=6, assign=None, separator=None, bos=False, n_vars=30),
                 "9bdb85b06c0c15c5630e7dea06f37a49ff0e87544a6e0ca8ebc48c36b259a1de"),
}


@pytest.mark.parametrize("name", sorted(_PINNED))
def test_batches_are_bit_identical_to_the_pinned_ones(name):
    opts, digest = _PINNED[name]
    batch = RetrievalTask(**opts).sample(64, torch.Generator().manual_seed(0))
    assert _batch_digest(batch) == digest


def test_hop_values_is_public_and_keeps_its_old_name():
    task = RetrievalTask(hops={3: 0.5, 1: 0.5}, n_statements=4)
    assert task.hop_values == [3, 1] and task._hop_values == task.hop_values
