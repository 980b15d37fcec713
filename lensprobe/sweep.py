"""Sweeps: one analysis over many models and prompt shards, serial or on Ray.

The coupling paper's central result (Aubry et al., ICLR 2025) is a correlation across
many language models and across training checkpoints; the over-squashing and smoothing
papers compare many models too. :func:`run_sweep` runs one analysis over

* **model specs**, never live models (each task loads its own model where it runs):
  ``zoo:NAME`` (final weights), ``zoo:NAME@STEP``, ``zoo:NAME@all`` (every step of the
  shipped trajectory; the final model alone when there is none), a lensprobe checkpoint
  (``*.safetensors``), a local Hugging Face directory, or ``hub:NAME@REVISION`` (a hub
  name at a git revision; needs the network or a warm cache);
* **prompt shards**: the prompts split into ``shards`` contiguous parts; text is
  tokenised in the task by each model's own tokenizer.

Each (model, revision, analysis, shard) is one task. It returns a small JSON-able
summary (see :func:`summarise`), written as one line of ``results.jsonl`` in the results
directory as soon as it finishes, so a sweep that is stopped and started again skips the
keys already done. A task that raises is recorded with its error and traceback; the
others go on.

Engines: ``engine="serial"`` (default, in this process: the reference) and
``engine="ray"`` (``pip install lensprobe[ray]``): ``address=None`` starts a local Ray
runtime (and stops it at the end), ``"auto"`` or ``"ray://host:10001"`` joins a cluster;
``num_cpus``/``num_gpus`` are the per-task requests; a task whose worker dies is retried
up to ``max_retries`` times by Ray. The driver alone writes results, so a dead worker
never leaves a partial or duplicated row.

    >>> import lensprobe as lp
    >>> df = lp.run_sweep("block_coupling", ["zoo:shakespeare@all"], prompts=texts, shards=2,
    ...                   engine="ray", results="sweep-out", top_k=10)
    >>> df.groupby("step")["scalar"].mean()
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import time
import traceback as tb
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from .errors import InputError

__all__ = [
    "run_sweep", "ModelSpec", "expand_specs", "load_spec", "summarise", "read_results",
    "coupling_and_loss", "heldout_passages", "RESULTS_FILE",
]

RESULTS_FILE = "results.jsonl"
KEY = ("model", "revision", "analysis", "shard")
MAX_VALUES = 200_000
"""Largest summary (number of values) a task may return: summaries travel and are stored."""
_RAY_HINT = "engine='ray' needs Ray: pip install lensprobe[ray]"
_WORKER_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME",
               "HF_HUB_CACHE", "TRANSFORMERS_CACHE")


# =========================================================================== model specs
@dataclass(frozen=True)
class ModelSpec:
    """Where a task gets its model: ``kind`` 'zoo', 'path' or 'hub', ``name`` (zoo name,
    filesystem path or hub name) and ``revision`` (zoo: a step as a string or 'final';
    hub: a git revision; path: '')."""

    kind: str
    name: str
    revision: str = ""

    @property
    def model(self) -> str:
        return f"{self.kind}:{self.name}" if self.kind != "path" else self.name

    @property
    def step(self) -> int | None:
        return int(self.revision) if self.kind == "zoo" and self.revision.isdigit() else None

    def __str__(self) -> str:
        return self.model + (f"@{self.revision}" if self.revision else "")


def _parse(spec: Any) -> ModelSpec:
    if isinstance(spec, ModelSpec):
        return spec
    if isinstance(spec, Path):
        spec = str(spec)
    if not isinstance(spec, str):
        if hasattr(spec, "cfg") or hasattr(spec, "state_dict"):
            raise InputError(
                "run_sweep() takes model specs, never live models (each task loads its own model"
                " where it runs); save it with lp.save_checkpoint(model, 'm.safetensors') and"
                " pass the path."
            )
        raise InputError(f"a model spec must be a string, got {type(spec).__name__}: {spec!r}.")
    if spec.startswith(("zoo:", "hub:")):
        kind, rest = spec.split(":", 1)
        name, _, rev = rest.partition("@")
        if not name:
            raise InputError(f"model spec {spec!r} names no model; e.g. 'zoo:shakespeare@all'.")
        return ModelSpec(kind, name, rev or ("final" if kind == "zoo" else ""))
    p = Path(spec).expanduser()
    if p.exists() or p.suffix == ".safetensors" or spec.startswith((".", "/", "~")):
        return ModelSpec("path", str(p))
    from . import zoo

    if spec in zoo.names():
        return ModelSpec("zoo", spec, "final")
    name, _, rev = spec.partition("@")
    return ModelSpec("hub", name, rev)


def expand_specs(models: Any) -> list[ModelSpec]:
    """Parse ``models`` (one spec or a list) and expand ``zoo:NAME@all`` into one spec per
    trajectory step (:func:`lensprobe.zoo.steps`). Specs that cannot be resolved here stay
    as they are: their tasks fail with the reason, and the rest of the sweep runs."""
    from . import zoo

    if isinstance(models, (str, Path, ModelSpec)):
        models = [models]
    out: list[ModelSpec] = []
    for m in models:
        s = _parse(m)
        if s.kind == "zoo" and s.revision == "all" and s.name in zoo.names():
            out += [ModelSpec("zoo", s.name, str(step)) for step in zoo.steps(s.name)] or [
                ModelSpec("zoo", s.name, "final")]
        else:
            out.append(s)
    if not out:
        raise InputError("run_sweep() needs at least one model spec.")
    dup = {str(s) for s in out if out.count(s) > 1}
    if dup:
        raise InputError(f"model specs repeated: {sorted(dup)}; each task key must be unique.")
    return out


def load_spec(spec: ModelSpec | str, device: str = "cpu") -> Any:
    """Load the model a spec names (in the process that runs the task)."""
    from . import zoo
    from .models import load_model

    spec = _parse(spec)
    if spec.kind == "zoo":
        if spec.revision not in ("final", "") and spec.step is None:
            raise InputError(f"{spec}: the revision of a zoo spec is a step number, 'final' or"
                             f" 'all'; got {spec.revision!r}.")
        return zoo.load(spec.name, step=spec.step, device=device)
    if spec.kind == "path":
        if not Path(spec.name).exists():
            raise InputError(f"model path {spec.name!r} does not exist; pass a lensprobe"
                             " checkpoint (.safetensors) or a local Hugging Face directory.")
        return load_model(spec.name, device=device)
    kw = {"revision": spec.revision} if spec.revision else {}
    return load_model(spec.name, device=device, **kw)


# =========================================================================== analyses
@dataclass(frozen=True)
class _Analysis:
    """What every task runs: a picklable reference (a lensprobe name or a function)."""

    label: str
    target: Any  # str name of a public extractor / 'report:<section>', or a callable
    kwargs: dict

    def resolve(self) -> Callable:
        if callable(self.target):
            return self.target
        if self.target.startswith("report:"):
            from . import report

            sections = dict(report.SECTIONS)
            name = self.target.split(":", 1)[1]
            if name not in sections:
                raise InputError(f"no report section {name!r}; choose from {report.SECTION_NAMES}.")
            return sections[name]
        import lensprobe

        fn = getattr(lensprobe, self.target, None)
        if not callable(fn) or self.target.startswith("_"):
            raise InputError(
                f"no public lensprobe analysis {self.target!r}; pass a name such as 'block_coupling',"
                " 'sensitivity', 'ov_spectrum', 'report:smoothing', or a function"
                " f(model, tokens, **kwargs)."
            )
        return fn


def _analysis(analysis: Any, kwargs: dict) -> _Analysis:
    if isinstance(analysis, str):
        name = analysis
    elif callable(analysis):
        mod = getattr(analysis, "__module__", "") or ""
        qual = getattr(analysis, "__qualname__", type(analysis).__name__)
        name = qual if mod.startswith("lensprobe") or mod == "__main__" else f"{mod}.{qual}"
    else:
        raise InputError(f"analysis must be a lensprobe analysis name or a function, got"
                         f" {type(analysis).__name__}.")
    try:
        json.dumps(kwargs, sort_keys=True)
    except TypeError as e:
        raise InputError(f"analysis keyword arguments must be JSON-able (they are sent to every"
                         f" task and part of the result key): {e}.") from e
    args = ",".join(f"{k}={json.dumps(v)}" for k, v in sorted(kwargs.items()))
    label = f"{name}({args})" if args else name
    target = analysis
    if isinstance(analysis, str):
        _Analysis(label, analysis, kwargs).resolve()  # fail early, before any task starts
    return _Analysis(label, target, dict(kwargs))


def _call(fn: Callable, model: Any, tokens: Any, kwargs: dict, spec: ModelSpec) -> Any:
    from . import report

    if getattr(fn, "__module__", "") == report.__name__ and fn in dict(report.SECTIONS).values():
        from .models import str_tokens

        if tokens is None:
            raise InputError("report sections need prompts; pass prompts=... to run_sweep().")
        zoo_name = spec.name if spec.kind == "zoo" else None
        ctx = report.Context(model, str(spec), zoo_name, tokens, str_tokens(model, tokens),
                             report._task_for(zoo_name), False)
        return fn(ctx)
    kw = dict(kwargs)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    if "progress" in params and "progress" not in kw:
        kw["progress"] = False  # one bar over tasks, none inside them
    return fn(model, **kw) if tokens is None else fn(model, tokens, **kw)


# =========================================================================== summaries
def _plain(v: Any, what: str) -> Any:
    """``v`` as JSON-able data: scalars stay, tensors/arrays become (nested) lists."""
    import numpy as np
    import torch

    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, (np.generic,)):
        return _plain(v.item(), what)
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        if v.is_floating_point():
            v = v.double()
        return _plain(v.numpy(), what)
    if isinstance(v, np.ndarray):
        if v.size > MAX_VALUES:
            raise InputError(f"{what}: an array of {v.size} values is too large for a sweep"
                             f" summary (max {MAX_VALUES}); return a reduction of it.")
        return [_plain(x, what) for x in v.tolist()] if v.dtype.kind == "f" else v.tolist()
    if isinstance(v, dict):
        return {str(k): _plain(x, f"{what}.{k}") for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x, what) for x in v]
    raise InputError(f"{what}: cannot store a {type(v).__name__} in a sweep summary; return"
                     " numbers, strings, tensors or lists of them.")


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def summarise(result: Any) -> dict[str, Any]:
    """The small, JSON-able summary of one task: ``{"scalars": {...}, "data": {...}}``.

    * a lensprobe result object: ``data["records"]`` is ``result.to_dataframe()`` as
      column lists (the numbers its figures are drawn from); ``scalars`` holds
      ``result.scalar()`` (coupling's per-model number) and ``result.summary()`` where
      the result has them;
    * a report section: its headline figures (``scalars``; non-scalar ones in ``data``);
    * a dict (an analysis function of your own): scalar values in ``scalars``, tensors,
      arrays and lists in ``data``;
    * a number: ``scalars["value"]``.

    Anything else raises :class:`lensprobe.InputError`: return one of the above.
    """
    from . import report

    if isinstance(result, report.Section):
        result = result.headline
    result = _summarisable(result)
    if isinstance(result, (int, float)):
        return {"scalars": {"value": _plain(float(result), "value")}, "data": {}}
    if isinstance(result, dict):
        plain = _plain(result, "summary")
        return {"scalars": {k: v for k, v in plain.items() if _is_scalar(v)},
                "data": {k: v for k, v in plain.items() if not _is_scalar(v)}}
    return _summarise_result(result)


def _summarisable(result: Any) -> Any:
    """``result`` itself if :func:`summarise` takes it (a one-element tensor as its number)."""
    if isinstance(result, bool) or not isinstance(result, (int, float, dict)) and not hasattr(
            result, "to_dataframe"):
        if hasattr(result, "item") and getattr(result, "numel", lambda: 0)() == 1:
            return result.item()
        raise InputError(
            f"cannot summarise a {type(result).__name__} result: a sweep analysis must return"
            " a lensprobe result (with to_dataframe()), a dict of numbers/arrays, or a number;"
            " wrap the analysis in a function that returns one."
        )
    return result


def _summarise_result(result: Any) -> dict[str, Any]:
    """A lensprobe result's summary: its table as column lists, its scalars."""
    df = result.to_dataframe()
    if df.size > MAX_VALUES:
        raise InputError(f"{type(result).__name__}.to_dataframe() has {df.size} values, more than"
                         f" a sweep summary holds ({MAX_VALUES}); pass options that shrink it"
                         " (fewer positions/layers) or return a reduction from your own function.")
    scalars: dict[str, Any] = {}
    if callable(getattr(result, "scalar", None)):
        try:
            scalars["scalar"] = _plain(float(result.scalar()), "scalar")
        except InputError:  # e.g. a one-item coupling has no off-diagonal
            scalars["scalar"] = None
    if callable(getattr(result, "summary", None)):
        s = result.summary()
        if isinstance(s, dict):
            scalars.update({k: v for k, v in _plain(s, "summary").items() if _is_scalar(v)})
    records = {str(c): _plain(df[c].to_numpy(), f"records.{c}") for c in df.columns}
    return {"scalars": scalars, "data": {"records": records}}


# =========================================================================== prompts
def _shards(prompts: Any, shards: int) -> list[Any]:
    """Split prompts into contiguous shards of texts or of token-id rows (JSON-able)."""
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise InputError(f"shards must be a positive integer, got {shards!r}.")
    if prompts is None:
        if shards != 1:
            raise InputError("shards > 1 needs prompts to split; pass prompts=... or shards=1.")
        return [None]
    prompts, ids = _prompt_rows(prompts)
    if shards > len(prompts):
        raise InputError(f"shards={shards} but only {len(prompts)} prompts; use at most one shard"
                         " per prompt.")
    bounds = [round(i * len(prompts) / shards) for i in range(shards + 1)]
    return [[list(p) if ids else p for p in prompts[a:b]] for a, b in zip(bounds, bounds[1:])]


def _prompt_rows(prompts: Any) -> tuple[list[Any], bool]:
    """The prompts as a list of texts or of token-id rows, and whether they are ids."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if hasattr(prompts, "tolist"):  # tensor / array of token ids [batch, pos] or [pos]
        prompts = prompts.tolist()
        if prompts and isinstance(prompts[0], int):
            prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise InputError("prompts is empty; pass texts or token ids [batch, pos].")
    texts = all(isinstance(p, str) for p in prompts)
    ids = all(_is_id_row(p) for p in prompts)
    if not (texts or ids):
        raise InputError("prompts must be texts or rows of integer token ids.")
    if ids and len({len(p) for p in prompts}) > 1:
        raise InputError("token-id prompts must all have the same length.")
    return prompts, ids


def _is_id_row(row: Any) -> bool:
    return isinstance(row, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in row)


def _shard_tokens(model: Any, shard: list | None) -> Any:
    """Token ids [batch, pos] for one shard on ``model``: texts are tokenised one by one
    and cut to the shortest, so that every row is real text (no padding)."""
    import torch

    from .inputs import to_tokens

    if shard is None:
        return None
    if isinstance(shard[0], str):
        rows = [to_tokens(model, t) for t in shard]
        n = min(r.shape[1] for r in rows)
        return torch.cat([r[:, :n] for r in rows])
    return to_tokens(model, torch.tensor(shard))


def _digest(x: Any) -> str:
    return hashlib.sha256(json.dumps(x, sort_keys=True).encode()).hexdigest()[:16]


# =========================================================================== one task
@dataclass(frozen=True)
class _Task:
    spec: ModelSpec
    shard: int
    prompts: Any
    digest: str

    def key(self, label: str) -> tuple:
        return (self.spec.model, self.spec.revision, label, self.shard)


def _row(task: _Task, label: str, **fields: Any) -> dict[str, Any]:
    return {"model": task.spec.model, "revision": task.spec.revision, "step": task.spec.step,
            "analysis": label, "shard": task.shard, "spec": str(task.spec),
            "prompts_digest": task.digest, **fields}


def _run_task(task: _Task, analysis: _Analysis, device: str | None = None) -> dict[str, Any]:
    """Load the task's model, run the analysis on its shard, return its result row.

    Runs where the task runs (this process or a Ray worker); never raises: an error is
    part of the row."""
    import gc
    import socket

    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() and os.environ.get("CUDA_VISIBLE_DEVICES") else "cpu"
    t0 = time.perf_counter()
    where = {"pid": os.getpid(), "host": socket.gethostname(), "device": device}
    t_load = t_an = None
    model = None
    try:
        fn = analysis.resolve()
        model = load_spec(task.spec, device=device)
        t_load = time.perf_counter() - t0
        t1 = time.perf_counter()
        tokens = _shard_tokens(model, task.prompts)
        result = _call(fn, model, tokens, analysis.kwargs, task.spec)
        summary = summarise(result)
        t_an = time.perf_counter() - t1
        json.dumps(summary)
        return _row(task, analysis.label, status="ok", error=None, traceback=None,
                    **summary, load_s=t_load, analysis_s=t_an,
                    task_s=time.perf_counter() - t0, **where)
    except Exception as e:  # one failing task must not stop the sweep: record it
        return _row(task, analysis.label, status="error", error=f"{type(e).__name__}: {e}",
                    traceback=tb.format_exc(), scalars={}, data={}, load_s=t_load,
                    analysis_s=t_an, task_s=time.perf_counter() - t0, **where)
    finally:
        del model
        gc.collect()


# =========================================================================== results on disk
def read_results(results: str | Path) -> list[dict[str, Any]]:
    """The rows of a results directory (or ``results.jsonl`` file), the last row per key.
    A line cut short (the driver was killed while writing) is ignored."""
    path = Path(results)
    path = path / RESULTS_FILE if path.is_dir() or path.suffix != ".jsonl" else path
    rows: dict[tuple, dict] = {}
    if not path.is_file():
        return []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            key = tuple(row[k] for k in KEY)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
        rows.pop(key, None)
        rows[key] = row
    return list(rows.values())


class _Writer:
    """Appends each row as one JSON line as soon as it exists (flushed and synced)."""

    def __init__(self, results: str | Path | None):
        self.path = None if results is None else Path(results) / RESULTS_FILE
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            text = self.path.read_text() if self.path.is_file() else ""
            if text and not text.endswith("\n"):  # a line cut short by a killed driver
                self.path.write_text(text[: text.rfind("\n") + 1])

    def write(self, row: dict) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def compact(self) -> None:
        """Rewrite the file with one row per key when re-runs (of failed or stale keys)
        appended a second one; atomic (write then rename)."""
        if self.path is None or not self.path.is_file():
            return
        rows = read_results(self.path)
        n_lines = len(self.path.read_text().splitlines())
        if n_lines != len(rows):
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
            os.replace(tmp, self.path)


# =========================================================================== engines
def _import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise InputError(f"{_RAY_HINT} (import failed: {e}); or use engine='serial'.") from e
    return ray


def ray_runtime_env(extra: dict | None = None, *, local: bool = True) -> dict:
    """The runtime environment lensprobe gives Ray workers when it starts or joins Ray:
    the driver's Hugging Face offline/cache variables (workers then load exactly as the
    serial engine does) and, on a local runtime, ``PYTHONPATH`` leading with the folder
    this lensprobe was imported from (workers run the same code). On a cluster, install
    lensprobe on the nodes or pass ``runtime_env={"py_modules": [...]}``."""
    env = {k: os.environ[k] for k in _WORKER_ENV if k in os.environ}
    if local:
        root = str(Path(__file__).resolve().parents[1])
        rest = os.environ.get("PYTHONPATH", "")
        env["PYTHONPATH"] = root + (os.pathsep + rest if rest else "")
    out = dict(extra or {})
    out["env_vars"] = {**env, **out.get("env_vars", {})}
    return out


def _serial(todo: list[_Task], analysis: _Analysis, device: str | None, emit: Callable) -> None:
    for task in todo:
        emit(_run_task(task, analysis, device or "cpu"))


def _ray(todo: list[_Task], analysis: _Analysis, device: str | None, emit: Callable, *,
         address: str | None, num_cpus: float, num_gpus: float, max_retries: int,
         workers: int | None, runtime_env: dict | None) -> None:
    ray = _import_ray()
    started = False
    if not ray.is_initialized():
        kw: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False,
                                  runtime_env=ray_runtime_env(runtime_env, local=address is None))
        if address is None:
            kw["num_cpus"] = workers if workers is not None else os.cpu_count()
        else:
            kw["address"] = address
        ray.init(**kw)
        started = True
    elif runtime_env is not None:
        raise InputError("Ray is already initialised: its runtime_env was fixed by ray.init();"
                         " pass runtime_env there (lensprobe.sweep.ray_runtime_env() gives the"
                         " one lensprobe would use), not to run_sweep().")
    try:
        remote = ray.remote(_run_task).options(
            num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries, retry_exceptions=False)
        ref_analysis = ray.put(analysis)
        pending = {remote.remote(t, ref_analysis, device): t for t in todo}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                task = pending.pop(ref)
                try:
                    row = ray.get(ref)
                except Exception as e:  # worker lost more than max_retries times, ...
                    row = _row(task, analysis.label, status="error",
                               error=f"{type(e).__name__}: {e}", traceback=tb.format_exc(),
                               scalars={}, data={}, load_s=None, analysis_s=None, task_s=None,
                               pid=None, host=None, device=device)
                emit(row)
    finally:
        if started:
            ray.shutdown()


# =========================================================================== the sweep
def run_sweep(
    analysis: str | Callable,
    models: Any,
    prompts: Any = None,
    *,
    shards: int = 1,
    engine: str = "serial",
    results: str | Path | None = None,
    address: str | None = None,
    num_cpus: float = 1,
    num_gpus: float = 0,
    workers: int | None = None,
    max_retries: int = 3,
    runtime_env: dict | None = None,
    device: str | None = None,
    progress: bool = True,
    **kwargs: Any,
) -> Any:
    """Run ``analysis`` on every (model spec, prompt shard) and return a tidy DataFrame.

    ``analysis``: a public lensprobe analysis by name ('block_coupling', 'sensitivity',
    'ov_spectrum', ...), a report section ('report:smoothing'), or a function
    ``f(model, tokens, **kwargs)`` (``f(model, **kwargs)`` when ``prompts`` is None) whose
    result :func:`summarise` accepts; ``kwargs`` go to it (JSON-able: they are part of
    the result key, e.g. ``analysis='block_coupling(top_k=10)'``).
    ``models``: specs (module docstring), never live models. ``prompts``: texts (each
    model tokenises them; a shard's rows are cut to its shortest) or token ids [batch, pos],
    split into ``shards`` contiguous shards.

    ``results``: a directory; every finished task is appended to ``results.jsonl`` at
    once, and keys already there with status 'ok' (and the same prompts) are skipped, so
    a stopped sweep resumes. Failed keys run again.

    ``engine``: 'serial' (this process, the reference) or 'ray' (``address``,
    ``num_cpus``/``num_gpus`` per task, ``workers`` CPUs for a runtime it starts,
    ``max_retries`` for tasks whose worker dies, ``runtime_env`` for a runtime it starts
    or joins). ``device``: where tasks load their model (default: cuda when the task was
    given a GPU, else cpu).

    Returns one row per task, ordered as the tasks: model, revision, step, analysis,
    shard, status ('ok' or 'error'), error, traceback, one column per summary scalar,
    ``data`` (the summary's arrays and records), load_s, analysis_s, task_s, pid, host.
    ``df.attrs`` has ``ran`` and ``skipped`` (task counts).
    """
    from tqdm.auto import tqdm

    if engine not in ("serial", "ray"):
        raise InputError(f"engine must be 'serial' or 'ray', got {engine!r}.")
    if engine == "ray":
        _import_ray()
    an = _analysis(analysis, kwargs)
    specs = expand_specs(models)
    parts = _shards(prompts, shards)
    tasks = [_Task(s, i, p, _digest(p)) for s in specs for i, p in enumerate(parts)]
    writer = _Writer(results)
    done = {tuple(r[k] for k in KEY): r for r in (read_results(results) if results else [])
            if r.get("status") == "ok"}
    rows: dict[tuple, dict] = {}
    todo = []
    for t in tasks:
        old = done.get(t.key(an.label))
        if old is not None and old.get("prompts_digest") == t.digest:
            rows[t.key(an.label)] = old
        else:
            todo.append(t)
    bar = tqdm(total=len(tasks), initial=len(tasks) - len(todo), desc=f"sweep {an.label}",
               disable=not progress)
    failed = 0

    def emit(row: dict) -> None:
        nonlocal failed
        writer.write(row)
        rows[tuple(row[k] for k in KEY)] = row
        failed += row["status"] != "ok"
        bar.update(1)
        bar.set_postfix_str(f"{failed} failed" if failed else "")

    try:
        if engine == "serial":
            _serial(todo, an, device, emit)
        else:
            _ray(todo, an, device, emit, address=address, num_cpus=num_cpus, num_gpus=num_gpus,
                 max_retries=max_retries, workers=workers, runtime_env=runtime_env)
    finally:
        bar.close()
        writer.compact()
    df = to_dataframe([rows[t.key(an.label)] for t in tasks if t.key(an.label) in rows])
    df.attrs.update(ran=len(todo), skipped=len(tasks) - len(todo))
    return df


def to_dataframe(rows: Iterable[dict]) -> Any:
    """Result rows (from :func:`run_sweep` or :func:`read_results`) as a tidy DataFrame: the
    key columns, status, one column per summary scalar, then the rest."""
    import pandas as pd

    rows = list(rows)
    flat = []
    for r in rows:
        r = dict(r)
        scalars = r.pop("scalars", {}) or {}
        flat.append({**{k: r.pop(k) for k in (*KEY, "step", "status", "error") if k in r},
                     **{k: v for k, v in scalars.items() if k not in r}, **r})
    df = pd.DataFrame(flat)
    if "step" in df:
        df["step"] = df["step"].astype("Int64")
    return df


# =========================================================================== the paper's demo
def heldout_passages() -> list[str]:
    """Passages of The Tempest and Macbeth, the plays the Shakespeare zoo model never saw:
    the texts of ``lensprobe/zoo/results/shakespeare_prompts.json`` (16 windows of 512
    tokens, written by ``scripts/shakespeare_findings.py prompts`` from the training
    script's corpus reader)."""
    path = Path(__file__).resolve().parent / "zoo" / "results" / "shakespeare_prompts.json"
    body = json.loads(path.read_text())
    texts = [p.get("text") for p in body.get("passages", []) if isinstance(p, dict)]
    if not texts or not all(isinstance(t, str) and t for t in texts):
        raise InputError(f"{path}: no passages; regenerate it with"
                         " scripts/shakespeare_findings.py prompts.")
    return texts


def coupling_and_loss(model: Any, tokens: Any, *, k: int = 10,
                      max_tokens: int | None = None) -> dict[str, float]:
    """The coupling paper's two per-model numbers on one prompt shard (Aubry et al.):

    * ``coupling``: mean depth-wise coupling of the last token's block Jacobians,
      mean over prompts and layer pairs i != j of 1 - m_K(J^i_tt, J^j_tt)^2
      (:func:`lensprobe.block_coupling`, K = ``k``);
    * ``heldout_loss``: mean next-token cross-entropy on the same tokens,
      -1/(B(T-1)) sum_b sum_t log p(x_{b,t+1} | x_{b,<=t}) (nats per token).

    Feed it held-out text (:func:`heldout_passages`) to correlate coupling with
    generalisation across checkpoints, as the paper does across LLMs. ``max_tokens``
    cuts every prompt to its first ``max_tokens`` tokens (both numbers use the same).
    """
    import torch

    from .core import guard
    from .coupling import block_coupling
    from .inputs import to_tokens

    tokens = to_tokens(model, tokens)
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2:
            raise InputError(f"max_tokens must be an integer >= 2, got {max_tokens!r}.")
        tokens = tokens[:, :max_tokens]

    c = block_coupling(model, tokens, top_k=k, keep_products=False, progress=False)
    with guard(model), torch.no_grad():
        logits = model(tokens)
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).double(), tokens[:, 1:].flatten())
    return {"coupling": c.scalar(), "heldout_loss": float(loss), "n_tokens": int(tokens.numel())}


# =========================================================================== CLI
def add_cli(sub: Any) -> None:
    """The ``lensprobe sweep`` subcommand's arguments."""
    s = sub.add_parser(
        "sweep", help="one analysis over many models and prompt shards (serial or Ray)",
        description="Run one analysis over model specs x prompt shards; rows go to"
                    " OUT/results.jsonl as tasks finish and a rerun skips finished keys.")
    s.add_argument("analysis", help="a lensprobe analysis ('block_coupling', 'sensitivity', ...),"
                   " 'report:<section>', or 'coupling_and_loss' (coupling + loss on the prompts)")
    s.add_argument("--model", action="append", required=True, dest="models",
                   help="model spec (repeatable): zoo:NAME[@STEP|@all], checkpoint, HF dir,"
                   " hub:NAME[@REV]")
    s.add_argument("--prompt", action="append", default=None, help="a prompt text (repeatable)")
    s.add_argument("--heldout", action="store_true",
                   help="use the shipped held-out Shakespeare passages as prompts")
    s.add_argument("--shards", type=int, default=1)
    s.add_argument("--engine", default="serial", choices=["serial", "ray"])
    s.add_argument("--address", default=None, help="Ray cluster ('auto' or ray://host:port)")
    s.add_argument("--workers", type=int, default=None, help="CPUs of a local Ray runtime")
    s.add_argument("--num-cpus", type=float, default=1, help="CPUs per Ray task")
    s.add_argument("--num-gpus", type=float, default=0, help="GPUs per Ray task")
    s.add_argument("--kw", action="append", default=[], metavar="KEY=JSON",
                   help="analysis keyword argument, value as JSON (repeatable): --kw top_k=10")
    s.add_argument("--out", default="sweep", help="results directory (default: ./sweep)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")


def cli_main(args: Any) -> int:
    """Run ``lensprobe sweep`` from parsed arguments; print one line per task."""
    kwargs = {}
    for item in args.kw:
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise InputError(f"--kw takes KEY=JSON, got {item!r}.")
        try:
            kwargs[key] = json.loads(val)
        except json.JSONDecodeError:
            kwargs[key] = val
    prompts = list(args.prompt or [])
    if args.heldout:
        prompts += heldout_passages()
    analysis: Any = coupling_and_loss if args.analysis == "coupling_and_loss" else args.analysis
    df = run_sweep(analysis, args.models, prompts or None, shards=args.shards, engine=args.engine,
               results=args.out, address=args.address, workers=args.workers,
               num_cpus=args.num_cpus, num_gpus=args.num_gpus, progress=not args.quiet, **kwargs)
    scalar_cols = [c for c in df.columns if c not in (*KEY, "step", "status", "error", "spec",
                   "traceback", "data", "prompts_digest", "load_s", "analysis_s", "task_s",
                   "pid", "host", "device")]
    for _, r in df.iterrows():
        vals = " ".join(f"{c}={r[c]:.4g}" if isinstance(r[c], float) else f"{c}={r[c]}"
                        for c in scalar_cols if r[c] is not None and r[c] == r[c])
        print(f"{r['spec']} shard {r['shard']}: {r['status']} "
              + (vals if r["status"] == "ok" else str(r["error"])))
    print(f"{len(df)} tasks ({df.attrs['ran']} ran, {df.attrs['skipped']} skipped,"
          f" {int((df['status'] != 'ok').sum())} failed); rows in {Path(args.out) / RESULTS_FILE}")
    return 0 if (df["status"] == "ok").all() else 1
