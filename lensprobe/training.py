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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from . import _tl
from .core import copy_model, guard
from .errors import InputError
from .inputs import check_finite, model_device, to_tokens
from .tasks.base import IGNORE, Batch, Task

__all__ = ["train", "evaluate", "TrainResult", "Evaluation", "Checkpoint", "NGD"]

_EVAL_SEED_OFFSET = 7_777_777


# --------------------------------------------------------------------------- evaluation
@dataclass(frozen=True)
class Evaluation:
    """Accuracy and loss per difficulty on one batch.

    accuracy[d] = mean over supervised positions of difficulty d of
    1[argmax logits = target]; loss[d] the mean cross-entropy there; count[d] how many
    positions; ``overall_*`` pool every supervised position.
    """

    accuracy: dict[int, float]
    loss: dict[int, float]
    count: dict[int, int]
    overall_accuracy: float
    overall_loss: float

    def __getitem__(self, difficulty: int) -> float:
        return self.accuracy[difficulty]

    def to_dataframe(self) -> Any:
        import pandas as pd

        return pd.DataFrame(
            {
                "difficulty": list(self.accuracy),
                "accuracy": list(self.accuracy.values()),
                "loss": [self.loss[d] for d in self.accuracy],
                "count": [self.count[d] for d in self.accuracy],
            }
        )


def _upcast_half(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits are upcast to float32 for the loss; float32/64 stay."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _per_difficulty(logits: torch.Tensor, batch: Batch) -> Evaluation:
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


def evaluate(
    model: Any,
    task_or_batch: Task | Batch,
    *,
    batch_size: int = 512,
    seed: int = 0,
) -> Evaluation:
    """Accuracy (and loss) per difficulty of ``model`` on a task sample or a given batch.

    A task is sampled with ``torch.Generator().manual_seed(seed)``. The model is left as
    found (run inside :func:`lensprobe.guard`).
    """
    _tl.require_model(model)
    batch = _as_batch(task_or_batch, batch_size, seed)
    with guard(model), torch.no_grad():
        logits = model(to_tokens(model, batch.tokens))
    return _per_difficulty(logits, batch)


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
class TrainResult:
    """What :func:`train` did.

    history:     one dict per evaluation: step, examples, seconds, lr, train_loss (mean
                 over the steps since the last evaluation), eval_loss, eval_acc (overall),
                 acc_<d> and loss_<d> per difficulty d, plus custom loss_fn metrics.
    checkpoints: step -> :class:`Checkpoint` for the requested ``checkpoint_steps``
                 (and the final step).
    final:       the last evaluation record.
    config:      the options of the run.
    steps_done:  the number of optimiser steps taken (including any resumed ones).
    """

    history: list[dict[str, Any]]
    checkpoints: dict[int, Checkpoint]
    final: dict[str, Any]
    config: dict[str, Any]
    steps_done: int
    seconds: float
    optimizer_state: dict[str, Any] | None = field(default=None, repr=False)
    model_ref: Any = field(default=None, repr=False, compare=False)

    def to_dataframe(self) -> Any:
        import pandas as pd

        return pd.DataFrame(self.history)

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


def _batch_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def _lr_at(step: int, lr: float, warmup: int, steps: int, schedule: str) -> float:
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "cosine":
        span = max(1, steps - warmup)
        return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / span)))
    return lr


def _make_optimizer(name: str, params: list[torch.Tensor], lr: float, wd: float) -> torch.optim.Optimizer:
    if name == "adamw":
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.98))
    if name == "ngd":
        return NGD(params, lr=lr, weight_decay=wd)
    raise InputError(f"optimizer must be 'adamw' or 'ngd', got {name!r}.")


def train(
    model: Any,
    task: Task,
    *,
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 128,
    warmup: int | None = None,
    weight_decay: float = 0.01,
    schedule: str = "constant",
    grad_clip: float | None = 1.0,
    seed: int = 0,
    eval_every: int | None = None,
    eval_batch_size: int = 512,
    checkpoint_steps: Sequence[int] = (),
    checkpoint_dir: str | Path | None = None,
    callbacks: Sequence[Callable[[int, Any, dict[str, Any]], Any]] = (),
    loss_fn: Callable[[Any, Batch], tuple[torch.Tensor, Mapping[str, float]]] | None = None,
    optimizer: str = "adamw",
    progress: bool = True,
    resume_from: "TrainResult | str | Path | None" = None,
) -> TrainResult:
    """Train ``model`` on ``task`` in place and return the run's :class:`TrainResult`.

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
    _tl.require_model(model)
    if not hasattr(task, "sample"):
        raise InputError(f"task must be a lensprobe Task with .sample(), got {type(task).__name__}.")
    if int(steps) < 0:
        raise InputError(f"steps must be >= 0, got {steps}.")
    if batch_size < 1 or eval_batch_size < 1:
        raise InputError("batch_size and eval_batch_size must be >= 1.")
    if lr <= 0:
        raise InputError(f"lr must be positive, got {lr}.")
    if schedule not in ("constant", "cosine"):
        raise InputError(f"schedule must be 'constant' or 'cosine', got {schedule!r}.")
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
    steps = int(steps)
    warmup = min(200, steps // 10) if warmup is None else int(warmup)
    eval_every = max(1, steps // 20) if eval_every is None else int(eval_every)
    if eval_every < 1:
        raise InputError(f"eval_every must be >= 1, got {eval_every}.")
    loss_fn = loss_fn or default_loss
    device = model_device(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InputError("the model has no parameter with requires_grad=True: nothing to train.")
    opt = _make_optimizer(optimizer, params, lr, weight_decay)
    config = dict(
        steps=steps, lr=lr, batch_size=batch_size, warmup=warmup, weight_decay=weight_decay,
        schedule=schedule, grad_clip=grad_clip, seed=seed, eval_every=eval_every,
        eval_batch_size=eval_batch_size, optimizer=optimizer,
        loss_fn=getattr(loss_fn, "__name__", "custom"),
    )

    start, history = 0, []
    if resume_from is not None:
        start, history = _resume(model, opt, resume_from)
    eval_batch = task.sample(
        eval_batch_size, _batch_generator(seed + _EVAL_SEED_OFFSET, 0)
    ).to(device)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    wanted = {int(s) for s in checkpoint_steps if start <= int(s) <= steps}
    checkpoints: dict[int, Checkpoint] = {}
    training_flags = [(m, m.training) for m in model.modules()]

    def evaluate_now(step: int, losses: list[float], t0: float) -> dict[str, Any]:
        model.eval()
        with torch.no_grad():
            logits = model(eval_batch.tokens)
            ev = _per_difficulty(logits, eval_batch)
            if loss_fn is default_loss:  # the same masked cross-entropy: skip a forward
                ev_loss, ev_metrics = ev.overall_loss, {}
            else:
                ev_loss, ev_metrics = loss_fn(model, eval_batch)
        rec: dict[str, Any] = dict(
            step=step,
            examples=step * batch_size,
            seconds=time.perf_counter() - t0,
            lr=opt.param_groups[0]["lr"],
            train_loss=sum(losses) / len(losses) if losses else math.nan,
            eval_loss=float(ev_loss),
            eval_acc=ev.overall_accuracy,
        )
        for d in ev.accuracy:
            rec[f"acc_{d}"] = ev.accuracy[d]
            rec[f"loss_{d}"] = ev.loss[d]
        rec.update({k: float(v) for k, v in ev_metrics.items()})
        model.train()
        return rec

    def save(step: int, rec: dict[str, Any] | None) -> None:
        metrics = dict(rec or {})
        if ckpt_dir is None:
            sd = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            checkpoints[step] = Checkpoint(step, state_dict=sd, metrics=metrics)
            return
        from .models import save_checkpoint

        path = save_checkpoint(model, ckpt_dir / f"step_{step}.safetensors",
                               extra={"step": step, "metrics": metrics, "train_config": config})
        torch.save({"step": step, "optimizer": opt.state_dict(), "history": history},
                   ckpt_dir / f"step_{step}.optim.pt")
        checkpoints[step] = Checkpoint(step, path=path, metrics=metrics)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, desc="train", leave=False)
    t0 = time.perf_counter()
    losses: list[float] = []
    step = start
    stopped = False
    try:
        model.train()
        if start in wanted:
            save(start, None)
        while step < steps:
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, lr, warmup, steps, schedule)
            batch = task.sample(batch_size, _batch_generator(seed, step)).to(device)
            loss, _ = loss_fn(model, batch)
            check_finite(loss.detach(), f"the training loss at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None and optimizer != "ngd":
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            step += 1
            losses.append(float(loss.detach()))
            rec = None
            if step % eval_every == 0 or step == steps:
                rec = evaluate_now(step, losses, t0)
                history.append(rec)
                losses = []
                if bar is not None:
                    bar.set_postfix(_postfix(rec), refresh=False)
                for cb in callbacks:
                    if cb(step, model, rec) is True:
                        stopped = True
            if step in wanted:
                save(step, rec)
            if bar is not None:
                bar.update(1)
            if stopped:
                break
        if not history or history[-1]["step"] != step:
            history.append(evaluate_now(step, losses, t0))
        if step not in checkpoints:
            save(step, history[-1])
    finally:
        if bar is not None:
            bar.close()
        for m, flag in training_flags:
            m.training = flag
    return TrainResult(
        history=history,
        checkpoints=checkpoints,
        final=history[-1],
        config=config,
        steps_done=step,
        seconds=time.perf_counter() - t0,
        optimizer_state=copy.deepcopy(opt.state_dict()),
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
