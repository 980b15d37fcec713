"""A small training loop for TransformerLens models on lensprobe tasks.

``train`` fits a model *in place* (unlike the extractors, changing the weights is its
job): AdamW with linear warm-up (or normalised gradient descent, ``optimizer='ngd'``,
the optimiser of Li et al., "Mechanics of Next Token Prediction with Self-Attention"),
seeded batches, per-difficulty evaluation on a fixed held-out batch, checkpoints kept in
memory or written with :func:`lensprobe.save_checkpoint`, callbacks and resumption.

Default loss (the implicit-curriculum objective of Musat, "Mechanism and Emergence of
Stacked Attention Heads in Multi-Layer Transformers", ICLR 2025, when the task
supervises every statement): cross-entropy of the logits at every position whose target
is not ``IGNORE``,

    L = - 1/|S| sum_{(b,i) in S} log softmax(logits[b, i])[targets[b, i]],
    S = {(b, i) : targets[b, i] != IGNORE}.

Batch ``s`` of a run is drawn from ``torch.Generator().manual_seed(seed * 1_000_003 + s)``,
so a run resumed at step ``s`` sees exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Literal, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float

from . import _tl
from .core import copy_model, guard
from .errors import InputError
from .inputs import check_finite, model_device, to_tokens
from .results import Result, Table
from .tasks.base import IGNORE, Batch, Task

__all__ = ["train", "TrainConfig", "evaluate", "per_difficulty", "TrainResult", "Evaluation", "Checkpoint", "NGD"]

_EVAL_SEED_OFFSET = 7_777_777


# --------------------------------------------------------------------------- evaluation
@dataclass(frozen=True)
class Evaluation(Result):
    """Accuracy and loss per difficulty on one batch.

    accuracy[d] = mean over supervised positions of difficulty d of
    1[argmax logits = target]; loss[d] the mean cross-entropy there; count[d] how many
    positions; ``overall_*`` pool every supervised position. No tensor fields: the
    table has one row per difficulty (columns difficulty, accuracy, loss, count).
    """

    TITLE: ClassVar = "Accuracy per difficulty"

    accuracy: dict[int, float]
    loss: dict[int, float]
    count: dict[int, int]
    overall_accuracy: float
    overall_loss: float

    def __getitem__(self, difficulty: int) -> float:
        return self.accuracy[difficulty]

    def _table(self) -> Table:
        ds = list(self.accuracy)
        return Table({"difficulty": ds}, {
            "accuracy": (("difficulty",), np.array([self.accuracy[d] for d in ds], dtype=float)),
            "loss": (("difficulty",), np.array([self.loss[d] for d in ds], dtype=float)),
            "count": (("difficulty",), np.array([self.count[d] for d in ds], dtype=np.int64)),
        })

    def summary(self) -> dict[str, Any]:
        return {"overall_accuracy": self.overall_accuracy, "overall_loss": self.overall_loss,
                "positions": sum(self.count.values())}

    def plot(self) -> Any:
        """Accuracy per difficulty (bars, labelled with their position counts)."""
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2))
        ds = list(self.accuracy)
        bars = ax.bar([str(d) for d in ds], [self.accuracy[d] for d in ds])
        ax.bar_label(bars, labels=[f"n={self.count[d]}" for d in ds], fontsize=7)
        ax.set_xlabel("difficulty")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.1)
        ax.set_title(f"overall accuracy {self.overall_accuracy:.3f}")
        fig.tight_layout()
        return fig


def _upcast_half(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits are upcast to float32 for the loss; float32/64 stay."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def per_difficulty(logits: Float[torch.Tensor, "batch pos vocab"], batch: Batch) -> Evaluation:
    """Accuracy and cross-entropy of ``logits`` per difficulty of ``batch`` (supervised
    positions, ``targets != IGNORE``), as an :class:`Evaluation`."""
    targets = batch.targets.to(logits.device)
    diff = batch.difficulty.to(logits.device)
    mask = targets != IGNORE
    if not bool(mask.any()):
        return Evaluation({}, {}, {}, float("nan"), float("nan"))
    lg = _upcast_half(logits[mask])
    tg = targets[mask]
    df = diff[mask]
    nll = F.cross_entropy(lg, tg, reduction="none")
    hit = (lg.argmax(-1) == tg).float()
    acc, loss, count = {}, {}, {}
    for d in sorted(int(v) for v in torch.unique(df)):
        sel = df == d
        acc[d] = float(hit[sel].mean())
        loss[d] = float(nll[sel].mean())
        count[d] = int(sel.sum())
    return Evaluation(acc, loss, count, float(hit.mean()), float(nll.mean()))


_per_difficulty = per_difficulty  # the old private name (stacking); use per_difficulty


def evaluate(
    model: Any,
    task_or_batch: Task | Batch,
    *,
    batch_size: int = 512,
    seed: int = 0,
) -> Evaluation:
    """Accuracy (and loss) per difficulty of ``model`` on a task sample or a given batch.

    A task is sampled with ``torch.Generator().manual_seed(seed)``. The model is left as
    found (run inside :func:`lensprobe.guard`); NaN/inf logits raise NonFiniteError.
    """
    _tl.require_model(model)
    batch = _as_batch(task_or_batch, batch_size, seed)
    with guard(model), torch.no_grad():
        logits = check_finite(model(to_tokens(model, batch.tokens)), "logits")
    return per_difficulty(logits, batch)


def _as_batch(task_or_batch: Any, batch_size: int, seed: int) -> Batch:
    if isinstance(task_or_batch, Batch):
        return task_or_batch
    if not hasattr(task_or_batch, "sample"):
        raise InputError(
            f"expected a lensprobe Task (with .sample) or a Batch, got"
            f" {type(task_or_batch).__name__}."
        )
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}.")
    return task_or_batch.sample(batch_size, torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- optimisers
class NGD(torch.optim.Optimizer):
    """Normalised gradient descent: ``theta <- theta - lr * g / ||g||``.

    ``||g||`` is the Frobenius norm of the gradient over all parameters of the group
    together (Li et al. train their one-layer attention model this way). Optional
    decoupled weight decay ``theta <- theta (1 - lr * wd)``.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-2, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> Any:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if not ps:
                continue
            norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in ps))
            if float(norm) == 0.0:
                continue
            for p in ps:
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(p.grad / norm.to(p.dtype), alpha=-group["lr"])
        return loss


# --------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Checkpoint:
    """The model's weights at one training step.

    ``state_dict`` (native keys of the training model, detached CPU clones) when kept in
    memory, else ``path`` of a portable checkpoint written by ``save_checkpoint``.
    ``metrics`` is the evaluation record at that step (if the step was evaluated).
    """

    step: int
    state_dict: dict[str, torch.Tensor] | None = None
    path: Path | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    def load_into(self, model: Any) -> Any:
        """Load these weights into ``model`` (same architecture) and return it."""
        if self.state_dict is not None:
            model.load_state_dict(self.state_dict, strict=True)
            return model
        from safetensors.torch import load_file

        _tl.load_portable_state_dict(model, load_file(str(self.path)))
        return model

    def model(self, template: Any | None = None) -> Any:
        """A fresh model holding these weights (a deep copy of ``template``, or loaded from disk)."""
        if self.path is not None and template is None:
            from .models import load_checkpoint

            return load_checkpoint(self.path)
        if template is None:
            raise InputError("an in-memory checkpoint needs a template model: ckpt.model(model).")
        m = copy_model(template)
        self.load_into(m)
        m.eval()
        return m


@dataclass(frozen=True)
class TrainResult(Result):
    """What :func:`train` did.

    history:     one dict per evaluation: step, examples, seconds, lr, train_loss (mean
                 over the steps since the last evaluation), eval_loss, eval_acc (overall),
                 acc_<d> and loss_<d> per difficulty d, plus custom loss_fn metrics (the
                 table: one row per evaluated step, one column per key).
    checkpoints: step -> :class:`Checkpoint` for the requested ``checkpoint_steps``
                 (and the final step); in-memory weights are saved with the result.
    final:       the last evaluation record.
    config:      the options of the run (:meth:`TrainConfig.record`).
    steps_done:  the number of optimiser steps taken (including any resumed ones).
    model_ref:   the trained model (not saved: ``model_at`` of a loaded result needs
                 on-disk checkpoints).
    """

    TITLE: ClassVar = "Training run"

    history: list[dict[str, Any]]
    checkpoints: dict[int, Checkpoint]
    final: dict[str, Any]
    config: dict[str, Any]
    steps_done: int
    seconds: float
    optimizer_state: dict[str, Any] | None = field(default=None, repr=False)
    model_ref: Any = field(default=None, repr=False, compare=False, metadata={"save": False})

    def _table(self) -> Table:
        keys = [k for k in dict.fromkeys(k for rec in self.history for k in rec) if k != "step"]
        cols = {k: (("step",), np.array([rec.get(k, math.nan) for rec in self.history])) for k in keys}
        return Table({"step": [rec["step"] for rec in self.history]}, cols)

    def summary(self) -> dict[str, Any]:
        return {"steps_done": self.steps_done, "seconds": self.seconds,
                **{k: v for k, v in self.final.items() if k.startswith(("eval_", "acc_"))}}

    def _state(self) -> dict[str, Any]:
        state = super()._state()
        state["checkpoints"] = {s: {f.name: getattr(c, f.name) for f in fields(c)}
                                for s, c in self.checkpoints.items()}
        return state

    @classmethod
    def _from_state(cls, state: dict[str, Any]) -> "TrainResult":
        names = {f.name for f in fields(Checkpoint)}
        ckpts = state.get("checkpoints", {})
        if any(not isinstance(c, dict) or set(c) - names for c in ckpts.values()):
            raise InputError(f"checkpoints of a saved TrainResult hold only {sorted(names)}.")
        return super()._from_state(dict(state, checkpoints={s: Checkpoint(**c) for s, c in ckpts.items()}))

    def difficulties(self) -> list[int]:
        ds = set()
        for rec in self.history:
            ds |= {int(k[4:]) for k in rec if k.startswith("acc_") and k[4:].lstrip("-").isdigit()}
        return sorted(ds)

    def first_step_reaching(self, difficulty: int, accuracy: float) -> int | None:
        """The first evaluated step with accuracy >= ``accuracy`` on ``difficulty``."""
        for rec in self.history:
            if rec.get(f"acc_{difficulty}", -1.0) >= accuracy:
                return int(rec["step"])
        return None

    def model_at(self, step: int) -> Any:
        """A copy of the trained model with the weights of checkpoint ``step``."""
        if step not in self.checkpoints:
            raise InputError(f"no checkpoint at step {step}; have {sorted(self.checkpoints)}.")
        return self.checkpoints[step].model(self.model_ref)

    def plot(self) -> Any:
        """Training loss and accuracy per difficulty against steps (matplotlib Figure)."""
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
        steps = [r["step"] for r in self.history]
        ax1.plot(steps, [r.get("train_loss", math.nan) for r in self.history], label="train")
        ax1.plot(steps, [r.get("eval_loss", math.nan) for r in self.history], label="eval")
        ax1.set_xlabel("step")
        ax1.set_ylabel("loss")
        ax1.set_yscale("log")
        ax1.legend()
        for d in self.difficulties():
            ax2.plot(steps, [r.get(f"acc_{d}", math.nan) for r in self.history], label=f"{d}")
        ax2.set_xlabel("step")
        ax2.set_ylabel("accuracy")
        ax2.set_ylim(-0.02, 1.02)
        if self.difficulties():
            ax2.legend(title="difficulty", fontsize=8)
        fig.tight_layout()
        return fig


# --------------------------------------------------------------------------- training
def default_loss(model: Any, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy of the logits at supervised positions (targets != IGNORE)."""
    logits = model(batch.tokens)
    mask = batch.targets != IGNORE
    if not bool(mask.any()):
        raise InputError("the batch has no supervised position (every target is IGNORE).")
    loss = F.cross_entropy(_upcast_half(logits[mask]), batch.targets[mask])
    return loss, {}


@dataclass(frozen=True)
class TrainConfig:
    """The options of a :func:`train` run (checked when built).

    steps:            total optimiser steps (a resumed run continues up to it).
    lr, batch_size:   peak learning rate; training examples per step.
    warmup:           linear warm-up steps (None: ``min(200, steps // 10)``).
    weight_decay:     decoupled weight decay (AdamW: matrices only).
    schedule:         'constant' or 'cosine' (decay to 0 after the warm-up).
    grad_clip:        gradient-norm clipping (None: off; never with NGD).
    seed:             batch ``s`` is drawn from ``manual_seed(seed * 1_000_003 + s)``.
    eval_every:       steps between evaluations (None: ``max(1, steps // 20)``).
    eval_batch_size:  size of the fixed held-out evaluation batch.
    checkpoint_steps: steps to keep the weights at (0 = before any update; the last step
                      always); in memory, or files in ``checkpoint_dir``.
    optimizer:        'adamw' or 'ngd' (:class:`NGD`).
    """

    steps: int
    lr: float = 1e-3
    batch_size: int = 128
    warmup: int | None = None
    weight_decay: float = 0.01
    schedule: Literal["constant", "cosine"] = "constant"
    grad_clip: float | None = 1.0
    seed: int = 0
    eval_every: int | None = None
    eval_batch_size: int = 512
    checkpoint_steps: Sequence[int] = ()
    checkpoint_dir: str | Path | None = None
    optimizer: Literal["adamw", "ngd"] = "adamw"

    def __post_init__(self) -> None:
        if int(self.steps) < 0:
            raise InputError(f"steps must be >= 0, got {self.steps}.")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise InputError("batch_size and eval_batch_size must be >= 1.")
        if self.lr <= 0:
            raise InputError(f"lr must be positive, got {self.lr}.")
        if self.schedule not in ("constant", "cosine"):
            raise InputError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}.")
        if self.eval_every is not None and int(self.eval_every) < 1:
            raise InputError(f"eval_every must be >= 1, got {self.eval_every}.")
        if self.optimizer not in ("adamw", "ngd"):
            raise InputError(f"optimizer must be 'adamw' or 'ngd', got {self.optimizer!r}.")

    def resolved(self) -> "TrainConfig":
        """The same options with the defaults that depend on ``steps`` filled in."""
        steps = int(self.steps)
        warmup = min(200, steps // 10) if self.warmup is None else int(self.warmup)
        eval_every = max(1, steps // 20) if self.eval_every is None else int(self.eval_every)
        return replace(self, steps=steps, warmup=warmup, eval_every=eval_every)

    def lr_at(self, step: int) -> float:
        """Learning rate of ``step`` (a resolved config): warm-up, then the schedule."""
        if self.warmup > 0 and step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.schedule == "cosine":
            span = max(1, self.steps - self.warmup)
            return self.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - self.warmup) / span)))
        return self.lr

    def record(self, loss_fn: Callable) -> dict[str, Any]:
        """The options as the JSON-able ``TrainResult.config`` (and checkpoint) record."""
        return dict(
            steps=self.steps, lr=self.lr, batch_size=self.batch_size, warmup=self.warmup,
            weight_decay=self.weight_decay, schedule=self.schedule, grad_clip=self.grad_clip,
            seed=self.seed, eval_every=self.eval_every, eval_batch_size=self.eval_batch_size,
            optimizer=self.optimizer, loss_fn=getattr(loss_fn, "__name__", "custom"),
        )


def _train_config(config: TrainConfig | None, options: dict[str, Any]) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise InputError(f"train() got unknown options {unknown}; TrainConfig has {sorted(names)}.")
    if config is None:
        if "steps" not in options:
            raise InputError("train() needs steps=... (or a TrainConfig).")
        return TrainConfig(**options).resolved()
    return replace(config, **options).resolved()


def _batch_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def _make_optimizer(name: str, params: list[torch.Tensor], lr: float, wd: float) -> torch.optim.Optimizer:
    if name == "ngd":
        return NGD(params, lr=lr, weight_decay=wd)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.98))


def _check_fits(model: Any, task: Any) -> None:
    _tl.require_model(model)
    if not hasattr(task, "sample"):
        raise InputError(f"task must be a lensprobe Task with .sample(), got {type(task).__name__}.")
    if model.cfg.d_vocab < len(task.vocab):
        raise InputError(
            f"the task has {len(task.vocab)} tokens but the model's d_vocab is"
            f" {model.cfg.d_vocab}; build it with d_vocab=len(task.vocab)."
        )
    if model.cfg.n_ctx < task.seq_len:
        raise InputError(
            f"the task's sequences have {task.seq_len} tokens but the model's n_ctx is"
            f" {model.cfg.n_ctx}; build it with n_ctx >= task.seq_len."
        )


class _Checkpointer:
    """Keeps the weights at the wanted steps: detached CPU copies in memory, or with a
    directory portable ``step_<n>.safetensors`` files plus ``step_<n>.optim.pt``."""

    def __init__(self, model: Any, opt: torch.optim.Optimizer, cfg: TrainConfig,
                 record: dict[str, Any], start: int):
        self.model, self.opt, self.record = model, opt, record
        self.dir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir is not None else None
        self.wanted = {int(s) for s in cfg.checkpoint_steps if start <= int(s) <= cfg.steps}
        self.saved: dict[int, Checkpoint] = {}

    def at(self, step: int, rec: dict[str, Any] | None, history: list[dict[str, Any]]) -> None:
        """Save ``step`` if it is one of the wanted steps."""
        if step in self.wanted:
            self.save(step, rec, history)

    def save(self, step: int, rec: dict[str, Any] | None, history: list[dict[str, Any]]) -> None:
        metrics = dict(rec or {})
        if self.dir is None:
            sd = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
            self.saved[step] = Checkpoint(step, state_dict=sd, metrics=metrics)
            return
        from .models import save_checkpoint

        path = save_checkpoint(self.model, self.dir / f"step_{step}.safetensors",
                               extra={"step": step, "metrics": metrics, "train_config": self.record})
        torch.save({"step": step, "optimizer": self.opt.state_dict(), "history": history},
                   self.dir / f"step_{step}.optim.pt")
        self.saved[step] = Checkpoint(step, path=path, metrics=metrics)


class _Trainer:
    """One run of :func:`train`: the optimiser, the fixed evaluation batch, the history."""

    def __init__(self, model: Any, task: Task, cfg: TrainConfig, loss_fn: Callable,
                 resume_from: Any):
        self.model, self.task, self.cfg, self.loss_fn = model, task, cfg, loss_fn
        self.device = model_device(model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise InputError("the model has no parameter with requires_grad=True: nothing to train.")
        self.opt = _make_optimizer(cfg.optimizer, self.params, cfg.lr, cfg.weight_decay)
        self.record = cfg.record(loss_fn)
        self.start, self.history = 0, []
        if resume_from is not None:
            self.start, self.history = _resume(model, self.opt, resume_from)
        self.eval_batch = task.sample(
            cfg.eval_batch_size, _batch_generator(cfg.seed + _EVAL_SEED_OFFSET, 0)).to(self.device)
        self.checkpoints = _Checkpointer(model, self.opt, cfg, self.record, self.start)
        self.t0 = time.perf_counter()

    def step(self, step: int) -> float:
        """One optimiser step on batch ``step``; returns its training loss."""
        cfg = self.cfg
        for g in self.opt.param_groups:
            g["lr"] = cfg.lr_at(step)
        batch = self.task.sample(cfg.batch_size, _batch_generator(cfg.seed, step)).to(self.device)
        loss, _ = self.loss_fn(self.model, batch)
        check_finite(loss.detach(), f"the training loss at step {step}")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None and cfg.optimizer != "ngd":
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.opt.step()
        return float(loss.detach())

    def evaluate(self, step: int, losses: list[float]) -> dict[str, Any]:
        """The evaluation record of ``step`` on the fixed batch (model back in train mode)."""
        self.model.eval()
        with torch.no_grad():
            ev = per_difficulty(self.model(self.eval_batch.tokens), self.eval_batch)
            if self.loss_fn is default_loss:  # the same masked cross-entropy: skip a forward
                ev_loss, ev_metrics = ev.overall_loss, {}
            else:
                ev_loss, ev_metrics = self.loss_fn(self.model, self.eval_batch)
        rec: dict[str, Any] = dict(
            step=step,
            examples=step * self.cfg.batch_size,
            seconds=time.perf_counter() - self.t0,
            lr=self.opt.param_groups[0]["lr"],
            train_loss=sum(losses) / len(losses) if losses else math.nan,
            eval_loss=float(ev_loss),
            eval_acc=ev.overall_accuracy,
        )
        for d in ev.accuracy:
            rec[f"acc_{d}"] = ev.accuracy[d]
            rec[f"loss_{d}"] = ev.loss[d]
        rec.update({k: float(v) for k, v in ev_metrics.items()})
        self.model.train()
        return rec

    def run(self, callbacks: Sequence[Callable], bar: Any) -> int:
        """Train from ``start`` to ``cfg.steps`` (or until a callback returns True);
        returns the last step, evaluated and checkpointed."""
        cfg, history = self.cfg, self.history
        step, losses = self.start, []
        self.t0 = time.perf_counter()
        self.model.train()
        self.checkpoints.at(step, None, history)
        while step < cfg.steps:
            losses.append(self.step(step))
            step += 1
            rec, stop = None, False
            if step % cfg.eval_every == 0 or step == cfg.steps:
                rec, losses = self.evaluate(step, losses), []
                history.append(rec)
                bar.set_postfix(_postfix(rec), refresh=False)
                stop = any([cb(step, self.model, rec) is True for cb in callbacks])  # call every one
            self.checkpoints.at(step, rec, history)
            bar.update(1)
            if stop:
                break
        if not history or history[-1]["step"] != step:
            history.append(self.evaluate(step, losses))
        if step not in self.checkpoints.saved:
            self.checkpoints.save(step, history[-1], history)
        return step


def train(
    model: Any,
    task: Task,
    config: TrainConfig | None = None,
    *,
    callbacks: Sequence[Callable[[int, Any, dict[str, Any]], Any]] = (),
    loss_fn: Callable[[Any, Batch], tuple[torch.Tensor, Mapping[str, float]]] | None = None,
    progress: bool = True,
    resume_from: "TrainResult | str | Path | None" = None,
    **options: Any,
) -> TrainResult:
    """Train ``model`` on ``task`` in place and return the run's :class:`TrainResult`.

    The options are a :class:`TrainConfig` (``config``), or its fields as keywords
    (``lp.train(model, task, steps=2000, lr=1e-3)``; keywords given with a config
    replace its fields).

    * Optimiser: AdamW (betas 0.9/0.98, decoupled ``weight_decay`` on matrices only) or
      ``'ngd'`` (normalised gradient descent, :class:`NGD`). Learning rate: linear warm-up
      over ``warmup`` steps (default ``min(200, steps // 10)``), then constant
      (``schedule='constant'``) or cosine decay to 0 (``'cosine'``). Gradient-norm
      clipping at ``grad_clip`` (None: off; not applied with NGD).
    * Only parameters with ``requires_grad=True`` are trained (a NoPE model's frozen zero
      W_pos stays zero). The model's training flags are restored at the end.
    * Loss: ``loss_fn(model, batch) -> (loss, metrics)``; default: cross-entropy at
      positions with ``targets != IGNORE`` (see the module docstring).
    * Evaluation every ``eval_every`` steps (default ``max(1, steps // 20)``) and at the
      end, on one fixed batch of ``eval_batch_size`` drawn with a seed disjoint from the
      training batches: loss and accuracy per difficulty. Each ``callback(step, model,
      record)`` is called after each evaluation; if one returns True, training stops.
    * Checkpoints at ``checkpoint_steps`` (step 0 = before any update) and at the end:
      state-dict copies in memory, or with ``checkpoint_dir`` portable
      ``step_<n>.safetensors`` files plus ``step_<n>.optim.pt`` (optimiser state).
    * ``resume_from``: a previous TrainResult (continues from its end, optimiser state
      included) or a ``step_<n>.safetensors`` path written by a run with
      ``checkpoint_dir``. ``steps`` is the total step count, so a run resumed at step s
      takes ``steps - s`` more steps on the same batches the uninterrupted run would use.
    """
    _check_fits(model, task)
    cfg = _train_config(config, options)
    run = _Trainer(model, task, cfg, loss_fn or default_loss, resume_from)
    from tqdm.auto import tqdm

    training_flags = [(m, m.training) for m in model.modules()]
    bar = tqdm(total=cfg.steps, initial=run.start, desc="train", leave=False, disable=not progress)
    try:
        step = run.run(callbacks, bar)
    finally:
        bar.close()
        for m, flag in training_flags:
            m.training = flag
    return TrainResult(
        history=run.history,
        checkpoints=run.checkpoints.saved,
        final=run.history[-1],
        config=run.record,
        steps_done=step,
        seconds=time.perf_counter() - run.t0,
        optimizer_state=copy.deepcopy(run.opt.state_dict()),
        model_ref=model,
    )


def _postfix(rec: dict[str, Any]) -> dict[str, str]:
    out = {"loss": f"{rec['eval_loss']:.3f}"}
    for k, v in rec.items():
        if k.startswith("acc_"):
            out[k[4:]] = f"{v:.2f}"
    return out


def _resume(model: Any, opt: torch.optim.Optimizer, source: Any) -> tuple[int, list[dict[str, Any]]]:
    if isinstance(source, TrainResult):
        last = source.checkpoints.get(source.steps_done)
        if last is not None:
            last.load_into(model)
        if source.optimizer_state is not None:
            opt.load_state_dict(source.optimizer_state)
        return source.steps_done, [dict(r) for r in source.history]
    path = Path(source)
    optim_path = path.with_name(path.name.replace(".safetensors", ".optim.pt"))
    if not path.is_file() or not optim_path.is_file():
        raise InputError(
            f"cannot resume from {str(path)!r}: need the checkpoint and its optimiser state"
            f" {optim_path.name!r} written by train(..., checkpoint_dir=...)."
        )
    from safetensors.torch import load_file

    _tl.load_portable_state_dict(model, load_file(str(path)))
    state = torch.load(optim_path, map_location=model_device(model), weights_only=True)
    opt.load_state_dict(state["optimizer"])
    return int(state["step"]), list(state.get("history", []))
