"""Copy/count tasks (Barbero et al. 2024): answers checked by re-parsing the token strings."""

from __future__ import annotations

import pytest
import torch

import lensprobe as lp
from lensprobe.tasks import IGNORE, Task
from lensprobe.tasks.counting import CopyTask, CountTask


def _parse(task, row):
    """Items (as ints), query string and query position, read back from the strings."""
    toks = task.str_tokens(row)
    q = next(i for i, t in enumerate(toks) if t.endswith("?"))
    body = toks[1:q] if task.bos else toks[:q]
    if task.bos:
        assert toks[0] == "<bos>"
    assert all(t == "<pad>" for t in toks[q + 1:])
    return body, toks[q], q


def _items_and_separators(task, body):
    every = task.separator_every
    if every:
        for k, t in enumerate(body, 1):  # a ',' after every `every` items, never at the end
            assert (t == ",") == (k % (every + 1) == 0)
        assert body[-1] != ","
    items = [int(t) for t in body if t != ","]
    assert set(items) <= {0, 1}
    return items


@pytest.mark.parametrize("mode", ["first", "last", "both"])
@pytest.mark.parametrize("content", ["ones", "random"])
@pytest.mark.parametrize("sep", [None, 3])
def test_copy_task_targets(mode, content, sep):
    task = CopyTask(min_len=2, max_len=11, mode=mode, content=content, separator_every=sep)
    assert isinstance(task, Task)
    batch = task.sample(64, torch.Generator().manual_seed(0))
    assert batch.tokens.shape == (64, task.seq_len) and len(batch) == 64
    seen_modes, seen_lengths = set(), set()
    for b in range(64):
        body, query, q = _parse(task, batch.tokens[b])
        items = _items_and_separators(task, body)
        n = len(items)
        assert 2 <= n <= 11
        seen_lengths.add(n)
        want = items[0] if query == "first?" else items[-1]
        assert task.vocab[int(batch.targets[b, q])] == str(want)
        assert int(batch.difficulty[b, q]) == n
        assert (batch.targets[b] != IGNORE).sum() == 1 and (batch.difficulty[b] >= 0).sum() == 1
        assert int(batch.info["query_pos"][b]) == q and int(batch.info["length"][b]) == n
        assert int(batch.info["mode"][b]) == (query == "last?")
        seen_modes.add(query)
        if content == "ones":  # all ones but the asked-for end
            rest = items[1:] if query == "first?" else items[:-1]
            assert all(x == 1 for x in rest)
    assert seen_modes == ({"first?", "last?"} if mode == "both" else {f"{mode}?"})
    assert len(seen_lengths) > 5
    answers = batch.info["answer"]
    assert {task.vocab[int(a)] for a in answers} == {"0", "1"}


@pytest.mark.parametrize("content", ["ones", "random"])
def test_count_task_targets(content):
    task = CountTask(min_len=1, max_len=9, content=content, separator_every=2, bos=False)
    batch = task.sample(50, torch.Generator().manual_seed(1))
    for b in range(50):
        body, query, q = _parse(task, batch.tokens[b])
        assert query == "count?"
        items = _items_and_separators(task, body)
        assert task.vocab[int(batch.targets[b, q])] == str(sum(items))
        assert int(batch.difficulty[b, q]) == len(items)
        if content == "ones":
            assert all(x == 1 for x in items)
    # the longest sequence fits exactly: 9 items, 4 separators, the query
    assert task.seq_len == 9 + 4 + 1
    assert "9" in task.vocab and "10" not in task.vocab


def test_sampling_is_seeded():
    task = CopyTask(min_len=3, max_len=20)
    a = task.sample(16, torch.Generator().manual_seed(5))
    b = task.sample(16, torch.Generator().manual_seed(5))
    c = task.sample(16, torch.Generator().manual_seed(6))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.tokens, c.tokens)


def test_bad_arguments():
    with pytest.raises(lp.InputError, match="min_len"):
        CopyTask(min_len=5, max_len=4)
    with pytest.raises(lp.InputError, match="mode"):
        CopyTask(mode="middle")
    with pytest.raises(lp.InputError, match="content"):
        CountTask(content="twos")
    with pytest.raises(lp.InputError, match="separator_every"):
        CountTask(separator_every=0)
    with pytest.raises(lp.InputError, match="batch_size"):
        CountTask().sample(0, torch.Generator())


def test_tasks_drive_the_training_loop_and_evaluation():
    task = CopyTask(min_len=2, max_len=6)
    model = lp.tiny_model(n_layers=1, n_heads=2, d_model=16, n_ctx=task.seq_len,
                          d_vocab=len(task.vocab), seed=0)
    lp.train(model, task, steps=3, batch_size=8, progress=False)
    ev = lp.evaluate(model, task, batch_size=64)
    assert set(ev.accuracy) <= set(range(2, 7)) and sum(ev.count.values()) == 64
