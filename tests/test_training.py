"""lp.train / lp.evaluate on a small copy task, checked against plain computations."""

from __future__ import annotations

import math

import pytest
import torch

import lensprobe as lp
from lensprobe.tasks import IGNORE, Batch
from lensprobe.training import NGD, default_loss


class CopyTask:
    """x_0..x_3 then predict them again at positions 4..7; difficulty = offset."""

    vocab = [str(i) for i in range(6)]
    seq_len = 8

    def sample(self, n, g):
        t = torch.randint(0, 6, (n, 8), generator=g)
        tg = torch.full_like(t, IGNORE)
        tg[:, 4:] = t[:, :4]
        d = torch.full_like(t, -1)
        d[:, 4:] = torch.arange(4)
        return Batch(t, tg, d)

    def str_tokens(self, t):
        return [self.vocab[i] for i in t]


def small(**kw):
    opts = dict(n_layers=1, n_heads=2, d_model=16, d_vocab=6, n_ctx=8, attn_only=True)
    opts.update(kw)
    return lp.tiny_model(**opts)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_default_loss_is_masked_cross_entropy():
    model = small(dtype=torch.float64)
    batch = CopyTask().sample(5, torch.Generator().manual_seed(0))
    loss, _ = default_loss(model, batch)
    logits = model(batch.tokens)
    terms = []
    for b in range(5):
        for i in range(8):
            if batch.targets[b, i] != IGNORE:
                row = logits[b, i]
                terms.append(-(row[batch.targets[b, i]] - torch.log(torch.exp(row).sum())))
    assert torch.allclose(loss, torch.stack(terms).mean(), atol=1e-10)


def test_train_learns_and_respects_frozen_parameters():
    model = small(positional="none")
    pos_name = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert pos_name  # NoPE's zero W_pos is frozen
    before = weights(model)
    flags = [(n, p.requires_grad) for n, p in model.named_parameters()]
    model.train()
    res = lp.train(model, CopyTask(), steps=60, lr=1e-2, batch_size=64, eval_every=20,
                   eval_batch_size=64, progress=False)
    after = weights(model)
    frozen = [k for k in before if torch.equal(before[k], after[k])]
    assert any("pos" in k for k in frozen)
    assert float(model.W_pos.abs().max()) == 0.0
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == flags
    assert model.training  # the mode it had before train() is restored
    assert [r["step"] for r in res.history] == [20, 40, 60]
    assert res.history[-1]["eval_loss"] < math.log(6) * 0.9
    assert set(res.difficulties()) == {0, 1, 2, 3}
    df = res.to_dataframe()
    assert list(df["step"]) == [20, 40, 60] and "acc_3" in df
    import matplotlib.pyplot as plt

    plt.close(res.plot())


def test_resume_matches_uninterrupted_run(tmp_path):
    task = CopyTask()
    straight = small(seed=1)
    lp.train(straight, task, steps=12, lr=5e-3, batch_size=32, warmup=4, eval_every=6, eval_batch_size=16, progress=False)

    a = small(seed=1)
    first = lp.train(a, task, steps=6, lr=5e-3, batch_size=32, warmup=4, eval_every=6, eval_batch_size=16, progress=False)
    b = small(seed=2)  # other weights: resuming must overwrite them
    lp.train(b, task, steps=12, lr=5e-3, batch_size=32, warmup=4, eval_every=6, eval_batch_size=16, progress=False, resume_from=first)
    for k, v in straight.state_dict().items():
        assert torch.allclose(v, b.state_dict()[k], atol=1e-6), k

    c = small(seed=1)
    lp.train(c, task, steps=6, lr=5e-3, batch_size=32, warmup=4, eval_every=6, eval_batch_size=16, progress=False,
             checkpoint_dir=tmp_path, checkpoint_steps=(3,))
    assert (tmp_path / "step_3.safetensors").is_file() and (tmp_path / "step_6.optim.pt").is_file()
    d = small(seed=3)
    res = lp.train(d, task, steps=12, lr=5e-3, batch_size=32, warmup=4, eval_every=6, eval_batch_size=16, progress=False,
                   resume_from=tmp_path / "step_6.safetensors")
    assert res.steps_done == 12
    x = task.sample(4, torch.Generator().manual_seed(9)).tokens
    assert torch.allclose(straight(x), d(x), atol=1e-5)


def test_checkpoints_in_memory_and_on_disk(tmp_path):
    task = CopyTask()
    model = small(seed=4)
    init = weights(model)
    res = lp.train(model, task, steps=8, lr=5e-3, batch_size=16, eval_every=4,
                   eval_batch_size=16, checkpoint_steps=(0, 4), progress=False)
    assert sorted(res.checkpoints) == [0, 4, 8]
    for k, v in res.checkpoints[0].state_dict.items():
        assert torch.equal(v, init[k])
    m8 = res.model_at(8)
    x = task.sample(3, torch.Generator().manual_seed(5)).tokens
    assert torch.equal(m8(x), model(x))
    m0 = res.model_at(0)
    assert not torch.allclose(m0(x), model(x))
    assert res.checkpoints[4].metrics["step"] == 4

    model2 = small(seed=4)
    res2 = lp.train(model2, task, steps=8, lr=5e-3, batch_size=16, checkpoint_steps=(4,),
                    eval_every=4, eval_batch_size=16, checkpoint_dir=tmp_path, progress=False)
    loaded = lp.load_checkpoint(res2.checkpoints[8].path)
    assert torch.allclose(loaded(x), model2(x), atol=1e-6)
    # the same seed gives the same run in memory and on disk
    assert torch.allclose(m8(x), model2(x), atol=1e-6)


def test_callback_can_stop_and_custom_loss_metrics():
    seen = []

    def cb(step, model, rec):
        seen.append(step)
        return step >= 4

    def loss_fn(model, batch):
        loss, _ = default_loss(model, batch)
        return loss, {"double_loss": 2 * float(loss.detach())}

    res = lp.train(small(), CopyTask(), steps=50, eval_every=2, batch_size=8, callbacks=[cb],
                   eval_batch_size=16,
                   loss_fn=loss_fn, progress=False)
    assert seen == [2, 4] and res.steps_done == 4
    rec = res.history[-1]
    assert rec["double_loss"] == pytest.approx(2 * rec["eval_loss"])


def test_ngd_step_is_normalised_gradient():
    p1 = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    p2 = torch.nn.Parameter(torch.tensor([[3.0]], dtype=torch.float64))
    opt = NGD([p1, p2], lr=0.5)
    loss = (p1**2).sum() + 3 * p2.sum()
    loss.backward()
    g1, g2 = 2 * torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([[3.0]], dtype=torch.float64)
    norm = math.sqrt(4 + 16 + 9)
    opt.step()
    assert torch.allclose(p1.detach(), torch.tensor([1.0, 2.0], dtype=torch.float64) - 0.5 * g1 / norm)
    assert torch.allclose(p2.detach(), torch.tensor([[3.0]], dtype=torch.float64) - 0.5 * g2 / norm)
    res = lp.train(small(), CopyTask(), steps=3, optimizer="ngd", lr=0.05, batch_size=8,
                   eval_batch_size=8, progress=False)
    assert res.config["optimizer"] == "ngd"


def test_evaluate_per_difficulty_and_leaves_model_alone(fingerprint):
    model = small(dtype=torch.float64, seed=7)
    batch = CopyTask().sample(50, torch.Generator().manual_seed(2))
    fp = fingerprint(model)
    ev = lp.evaluate(model, batch)
    assert fingerprint(model) == fp
    logits = model(batch.tokens)
    for d in range(4):
        hits = [int(logits[b, 4 + d].argmax()) == int(batch.targets[b, 4 + d]) for b in range(50)]
        assert ev.accuracy[d] == pytest.approx(sum(hits) / 50)
        assert ev.count[d] == 50
    assert len(ev.to_dataframe()) == 4
    # a failing call leaves the model as found
    bad = Batch(torch.full((2, 8), 99), batch.targets[:2], batch.difficulty[:2])
    with pytest.raises(lp.InputError, match="d_vocab"):
        lp.evaluate(model, bad)
    assert fingerprint(model) == fp


def test_bad_arguments():
    m = small()
    with pytest.raises(lp.InputError, match="optimizer"):
        lp.train(m, CopyTask(), steps=1, optimizer="sgd", progress=False)
    with pytest.raises(lp.InputError, match="d_vocab"):
        lp.train(small(d_vocab=4), CopyTask(), steps=1, progress=False)
    with pytest.raises(lp.InputError, match="n_ctx"):
        lp.train(small(n_ctx=4), CopyTask(), steps=1, progress=False)
    with pytest.raises(lp.InputError, match="Task"):
        lp.train(m, object(), steps=1, progress=False)
    with pytest.raises(lp.InputError, match="steps"):
        lp.train(m, CopyTask(), steps=-1, progress=False)


def test_train_config_equals_keywords_and_checks_its_options():
    task = CopyTask()
    kw = dict(steps=6, lr=5e-3, batch_size=16, eval_every=3, eval_batch_size=16)
    a, b, c = small(seed=5), small(seed=5), small(seed=5)
    ra = lp.train(a, task, progress=False, **kw)
    rb = lp.train(b, task, lp.TrainConfig(**kw), progress=False)
    rc = lp.train(c, task, lp.TrainConfig(steps=2, lr=1.0), steps=6, lr=5e-3, batch_size=16,
                  eval_every=3, eval_batch_size=16, progress=False)  # keywords replace fields
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]) and torch.equal(v, c.state_dict()[k]), k
    assert ra.config == rb.config == rc.config and ra.config["warmup"] == 0
    assert [r["eval_loss"] for r in ra.history] == [r["eval_loss"] for r in rb.history]
    with pytest.raises(lp.InputError, match="unknown options"):
        lp.train(small(), task, steps=2, learning_rate=1e-3, progress=False)
    with pytest.raises(lp.InputError, match="schedule"):
        lp.TrainConfig(steps=2, schedule="linear")
    with pytest.raises(lp.InputError, match="eval_every"):
        lp.TrainConfig(steps=2, eval_every=0)
    cfg = lp.TrainConfig(steps=1000).resolved()
    assert (cfg.warmup, cfg.eval_every) == (100, 50)


def test_train_result_table_summary_and_file(tmp_path):
    import pandas as pd

    res = lp.train(small(seed=6), CopyTask(), steps=4, lr=5e-3, batch_size=8, eval_every=2,
                   eval_batch_size=8, checkpoint_steps=(0,), progress=False)
    pd.testing.assert_frame_equal(res.to_dataframe(), pd.DataFrame(res.history))
    s = res.summary()
    assert s["steps_done"] == 4 and s["eval_loss"] == res.final["eval_loss"]
    back = lp.TrainResult.load(res.save(tmp_path / "run.safetensors"))
    assert back.history == res.history and back.model_ref is None
    assert sorted(back.checkpoints) == [0, 4]
    for k, v in res.checkpoints[0].state_dict.items():
        assert torch.equal(back.checkpoints[0].state_dict[k], v)
    x = CopyTask().sample(2, torch.Generator().manual_seed(3)).tokens
    assert torch.equal(back.checkpoints[4].model(small())(x), res.model_at(4)(x))


def test_evaluation_table_matches_its_dicts():
    ev = lp.evaluate(small(seed=8), CopyTask(), batch_size=40, seed=3)
    df = ev.to_dataframe()
    assert list(df.columns) == ["difficulty", "accuracy", "loss", "count"]
    for row in df.itertuples():
        assert (row.accuracy, row.loss, row.count) == (ev.accuracy[row.difficulty],
                                                       ev.loss[row.difficulty], ev.count[row.difficulty])
    assert ev.summary()["positions"] == 160


def test_per_difficulty_keeps_its_old_private_name():
    from lensprobe import training

    assert training._per_difficulty is training.per_difficulty
