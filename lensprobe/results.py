"""The one result base: every lensprobe analysis returns a :class:`Result`.

A result is a frozen dataclass of tensors with named axes and plain metadata. The base
gives every result the same verbs:

* ``to_dataframe()`` -- one row per cell of the result's main grid, built generically
  from :meth:`Result._table` (axis coordinates + columns over some of those axes; no
  hand-written loops);
* ``plot(**kw)`` -- a matplotlib figure (each class draws its own);
* ``show(**kw)`` -- a :class:`lensprobe.views.View` for Jupyter: the figure and the
  summary table (classes with a circuitsvis view override it);
* ``summary()`` -- a ``dict`` of the headline scalars;
* ``save(path)`` / ``Result.load(path)`` -- one ``.safetensors`` file: every tensor
  (nested ones included) plus the rest as JSON metadata, no pickle. ``load`` rebuilds
  only lensprobe result classes and checks every field name, so a file cannot name
  arbitrary code.

Subclasses declare ``AXES``: the axis names of each tensor field, in order (the shared
test checks every tensor field against it), e.g.::

    @dataclass(frozen=True)
    class PathBound(Result):
        AXES: ClassVar = {"bound": ("prompt", "pos"), "tokens": ("prompt", "pos")}

and either rely on the default table (the first ``AXES`` field's grid, every field
with the same axes as a column, axis coordinates from :meth:`_coords`) or override
:meth:`_table`.
"""

from __future__ import annotations

import abc
import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np
import torch

from .errors import InputError

__all__ = ["Result", "Table", "frame"]

_META_KEY = "lensprobe_result"
_FORMAT = 1


# --------------------------------------------------------------------------- tables
@dataclasses.dataclass(frozen=True)
class Table:
    """A long-format table over a grid of named axes.

    axes:      axis name -> its coordinates (outermost first); the table has one row
               per cell of the grid, in C order.
    columns:   column name -> (the axes it varies over, values of that shape); a column
               is repeated over the axes it does not name.
    constants: column name -> one value for every row.
    """

    axes: Mapping[str, Sequence[Any]]
    columns: Mapping[str, tuple[Sequence[str], Any]] = dataclasses.field(default_factory=dict)
    constants: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def _array(values: Any) -> np.ndarray:
    """Values as numpy: float tensors as float64 (``float(t)`` of every entry), others as is."""
    if isinstance(values, torch.Tensor):
        t = values.detach().cpu()
        if t.is_floating_point():
            t = t.double()
        return t.numpy()
    if isinstance(values, np.ndarray):
        return values
    values = list(values) if not isinstance(values, (list, tuple)) else values
    arr = np.empty(_nested_shape(values), dtype=object)
    for idx in np.ndindex(arr.shape):
        v: Any = values
        for i in idx:
            v = v[i]
        arr[idx] = v
    return arr


def _nested_shape(values: Any) -> tuple[int, ...]:
    shape = []
    while isinstance(values, (list, tuple)):
        shape.append(len(values))
        if not values:
            break
        values = values[0]
    return tuple(shape)


def frame(table: Table) -> Any:
    """The ``pandas.DataFrame`` of a :class:`Table` (axes first, then columns, then constants)."""
    import pandas as pd

    names = list(table.axes)
    coords = [list(table.axes[a]) for a in names]
    shape = tuple(len(c) for c in coords)
    grid = np.indices(shape).reshape(len(shape), -1) if shape else np.zeros((0, 1), dtype=int)
    data: dict[str, Any] = {}
    for i, (a, c) in enumerate(zip(names, coords)):
        data[a] = _array(c)[grid[i]] if c else np.empty(0, dtype=object)
        if data[a].dtype == object and all(isinstance(x, (int, np.integer)) for x in c):
            data[a] = data[a].astype(np.int64)
    for col, (dims, values) in table.columns.items():
        unknown = [d for d in dims if d not in table.axes]
        if unknown:
            raise InputError(f"column {col!r} names axes {unknown} that the table lacks ({names}).")
        arr = _array(values)
        want = tuple(len(table.axes[d]) for d in dims)
        if arr.shape != want:
            raise InputError(f"column {col!r} has shape {arr.shape}, its axes {list(dims)} want {want}.")
        data[col] = arr[tuple(grid[names.index(d)] for d in dims)] if dims else np.repeat(arr, grid.shape[1])
    n = grid.shape[1] if shape else 1
    for col, value in table.constants.items():
        data[col] = [value] * n
    return pd.DataFrame(data)


# --------------------------------------------------------------------------- the base
class Result(abc.ABC):
    """Base class of every lensprobe result (subclasses are frozen dataclasses).

    ``AXES`` maps each tensor field to its axis names; ``TITLE`` is the heading of the
    default :meth:`show`. Subclasses implement :meth:`plot` and, where the default grid
    does not fit, :meth:`_table`, :meth:`_coords` or :meth:`summary`.
    """

    AXES: ClassVar[dict[str, tuple[str, ...]]] = {}
    TITLE: ClassVar[str] = ""
    _registry: ClassVar[dict[str, type["Result"]]] = {}

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        Result._registry[cls.__name__] = cls

    # ------------------------------------------------------------------ tables
    @property
    def axes(self) -> dict[str, tuple[str, ...]]:
        """Tensor field -> its axis names (``AXES``; a class whose shapes depend on an
        option overrides this)."""
        return dict(self.AXES)

    def _coords(self) -> dict[str, Sequence[Any]]:
        """Coordinates of named axes (default: ``range(size)`` for the rest)."""
        return {}

    def _grid(self, field: str) -> dict[str, Sequence[Any]]:
        """The axes of tensor field ``field`` with their coordinates."""
        t = getattr(self, field)
        known = self._coords()
        return {a: known.get(a, range(n)) for a, n in zip(self.axes[field], t.shape)}

    def _table(self) -> Table:
        """Default table: the first ``AXES`` field's grid, with every (non-None) field of
        the same axes as a column."""
        axes = self.axes
        if not axes:
            raise TypeError(f"{type(self).__name__} declares no AXES: give it AXES or override _table().")
        main = next(iter(axes))
        dims = axes[main]
        cols = {f: (dims, getattr(self, f)) for f, d in axes.items()
                if d == dims and getattr(self, f) is not None}
        return Table(self._grid(main), cols)

    def to_dataframe(self) -> Any:
        """The result as a long ``pandas.DataFrame`` (one row per cell of the main grid)."""
        return frame(self._table())

    def summary(self) -> dict[str, Any]:
        """Headline scalars of the result (empty when it has none)."""
        return {}

    # ------------------------------------------------------------------ views
    @abc.abstractmethod
    def plot(self, **kw: Any) -> Any:
        """A matplotlib figure of the result (every result class draws its own)."""

    def show(self, **kw: Any) -> Any:
        """The figure (and the summary, when there is one) as a notebook :class:`View`."""
        from .views import figure_view

        return figure_view(self.plot(**kw), self.TITLE or type(self).__name__, self.summary())

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> Path:
        """Write to one ``.safetensors`` file: tensors + JSON metadata (no pickle)."""
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        meta = {"format": _FORMAT, "data": _encode(self, tensors, "r")}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={_META_KEY: json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Result":
        """Read a file written by :meth:`save` (``cls`` checks the class, ``Result`` takes any)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise InputError(f"result file {str(path)!r} does not exist.")
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get(_META_KEY)
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types
            raise InputError(f"{str(path)!r} is not a safetensors file: {e}") from e
        if raw is None:
            raise InputError(f"{str(path)!r} was not written by a lensprobe result's save().")
        try:
            meta = json.loads(raw)
        except json.JSONDecodeError as e:
            raise InputError(f"{str(path)!r}: result metadata is not valid JSON: {e}") from e
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            raise InputError(f"{str(path)!r}: unknown result format {meta.get('format') if isinstance(meta, dict) else meta!r}.")
        try:
            out = _decode(meta.get("data"), tensors, str(path))
        except (TypeError, ValueError, KeyError, AttributeError) as e:  # malformed metadata
            if isinstance(e, InputError):
                raise
            raise InputError(f"{str(path)!r}: malformed result metadata ({type(e).__name__}: {e}).") from e
        if not isinstance(out, cls):
            raise InputError(f"{str(path)!r} holds a {type(out).__name__}, not a {cls.__name__}.")
        return out

    # subclasses whose fields are not their dataclass fields override these two
    def _state(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)  # type: ignore[arg-type]
                if f.metadata.get("save", True)}

    @classmethod
    def _from_state(cls, state: dict[str, Any]) -> "Result":
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = set(state) - names
        if unknown:
            raise InputError(f"fields {sorted(unknown)} are not fields of {cls.__name__}.")
        return cls(**state)


# --------------------------------------------------------------------------- encoding
def _encode(value: Any, tensors: dict[str, torch.Tensor], key: str) -> Any:
    """JSON for ``value``; tensors go to ``tensors`` under ``key`` (tagged objects)."""
    if isinstance(value, Result):
        state = value._state()
        return {"$result": type(value).__name__,
                "fields": {k: _encode(v, tensors, f"{key}.{k}") for k, v in state.items()}}
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().cpu().clone().contiguous()  # no shared storage (safetensors refuses it)
        return {"$tensor": key}
    if isinstance(value, tuple):
        return {"$tuple": [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return {"$dict": [[_encode(k, tensors, f"{key}.k{i}"), _encode(v, tensors, f"{key}.{i}")]
                          for i, (k, v) in enumerate(value.items())]}
    if isinstance(value, Path):
        return {"$path": str(value)}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise InputError(f"cannot save a {type(value).__name__} (at {key!r}) in a result file.")


def _decode(value: Any, tensors: Mapping[str, torch.Tensor], where: str) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors, where) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if not isinstance(value, dict):
        raise InputError(f"{where}: unexpected value {value!r} in result metadata.")
    tag = next(iter(value), None) if len(value) == 1 else ("$result" if set(value) == {"$result", "fields"} else None)
    if tag not in _DECODERS:
        raise InputError(f"{where}: unexpected object {sorted(value)} in result metadata.")
    return _DECODERS[tag](value, tensors, where)


def _decode_tensor(value: dict, tensors: Mapping[str, torch.Tensor], where: str) -> torch.Tensor:
    if value["$tensor"] not in tensors:
        raise InputError(f"{where}: tensor {value['$tensor']!r} is missing from the file.")
    return tensors[value["$tensor"]]


def _decode_result(value: dict, tensors: Mapping[str, torch.Tensor], where: str) -> Result:
    cls = Result._registry.get(value["$result"])
    if cls is None or not cls.__module__.startswith("lensprobe."):
        raise InputError(f"{where}: {value['$result']!r} is not a lensprobe result class.")
    fields = value["fields"]
    if not isinstance(fields, dict):
        raise InputError(f"{where}: fields of {value['$result']} are not a mapping.")
    return cls._from_state({k: _decode(v, tensors, where) for k, v in fields.items()})


_DECODERS: dict[str, Any] = {
    "$tensor": _decode_tensor,
    "$tuple": lambda v, t, w: tuple(_decode(x, t, w) for x in v["$tuple"]),
    "$dict": lambda v, t, w: {_freeze(_decode(k, t, w)): _decode(x, t, w) for k, x in v["$dict"]},
    "$path": lambda v, t, w: Path(str(v["$path"])),
    "$result": _decode_result,
}


def _freeze(key: Any) -> Any:
    """Dict keys come back hashable (a list key was a tuple)."""
    return tuple(_freeze(k) for k in key) if isinstance(key, list) else key
