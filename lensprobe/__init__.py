"""lensprobe: how information moves through a transformer, for TransformerLens models.

Hook-based extractors for five papers (over-squashing, OV smoothing, block coupling,
stacked retrieval heads, token-priority graphs). Every extractor takes a TransformerLens
model (HookedTransformer or TransformerBridge) and returns a result object, and leaves
the model exactly as it found it.

Names load on first use (PEP 562): ``import lensprobe`` itself is cheap, and the
TransformerLens model classes, networkx, matplotlib, pandas and scipy are imported only
by the functions that need them. ``from lensprobe import sensitivity`` and
``lp.sensitivity`` behave exactly as with eager imports.
"""

# ruff: noqa: F401  (the TYPE_CHECKING block re-exports names for type checkers)
from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import InputError, LensprobeError, ModelError, NonFiniteError

#: submodule -> the public names it provides (the runtime source of the lazy imports;
#: the TYPE_CHECKING block below repeats them for type checkers and IDEs, and
#: tests/test_wheel.py checks that the two agree).
_EXPORTS: dict[str, tuple[str, ...]] = {
    "_tl": ("BACKEND", "TL_VERSION"),
    "core": ("guard", "hooked_fn", "jacobian", "jvp_cols", "run_hooked", "vjp_rows"),
    "inputs": ("to_tokens",),
    "models": ("load_checkpoint", "load_model", "save_checkpoint", "tiny_model", "word_tokenizer"),
    "training": ("TrainConfig", "TrainResult", "evaluate", "train"),
    # 1. over-squashing and representational collapse (Barbero et al. 2024)
    "oversquash": ("CollapsePair", "collapse_curve", "path_bound", "sensitivity"),
    # 2. OV eigenspectra and smoothing (Dovonon et al. 2025)
    "smoothing": ("dominance", "flip_ln_gamma", "ov_spectrum", "sign_controlled",
                  "smoothing_profile"),
    # 3. transformer block coupling (Aubry et al. 2025)
    "coupling": ("CouplingTracker", "block_coupling", "block_jacobians", "coupling_metric",
                 "coupling_through_training", "trajectory_metrics"),
    # 4. stacked attention heads and the retrieval problem (Musat 2025)
    "stacking": ("DepthStudy", "Emergence", "HopScores", "StackEntry", "StackedHeads", "depth_study",
                 "emergence", "hop_scores", "load_depth_study", "query_accuracy", "stacked_heads"),
    # 5. hard retrieval over the token-priority graph (Li et al. 2024)
    "priority": ("AlignmentCurve", "GraphSVM", "InfeasibleError", "PriorityAlignment",
                 "Retrieval", "TokenPriorityGraph", "alignment_curve", "graph_svm", "head_W",
                 "priority_alignment", "priority_loss", "priority_model",
                 "retrieval_graph_view", "train_priority"),
    # 4b. induction heads: the real-text case of stacked heads
    "induction": ("InductionEmergence", "InductionHeads", "induction_emergence",
                  "induction_heads"),
    # many models x prompt shards, serial or on Ray (optional extra)
    "sweep": ("run_sweep",),
}
_SUBMODULES = ("tasks", "views", "zoo")
_ORIGIN: dict[str, str] = {name: mod for mod, names in _EXPORTS.items() for name in names}

__all__ = [
    "__version__", "InputError", "LensprobeError", "ModelError", "NonFiniteError",
    *_ORIGIN, *_SUBMODULES,
]


def __getattr__(name: str) -> Any:
    """Import the submodule that provides ``name`` the first time it is asked for."""
    if name in _ORIGIN:
        value = getattr(importlib.import_module(f".{_ORIGIN[name]}", __name__), name)
    elif not name.startswith("__"):
        try:  # any submodule: lp.tasks, lp.report, lp._tl ...
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'lensprobe' has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module 'lensprobe' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """lensprobe's module type (no public name is also a submodule name, so
    ``import lensprobe.sweep`` gives the module and ``lp.run_sweep`` the function)."""

    def __reduce__(self) -> tuple:
        # pickled by reference, like a plain module in cloudpickle: a function that uses
        # ``lp`` must reach Ray workers (a ModuleType subclass is not pickled by name).
        return importlib.import_module, (self.__name__,)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # pragma: no cover  (re-exports for type checkers and IDEs)
    from . import tasks, views, zoo
    from ._tl import BACKEND, TL_VERSION
    from .core import guard, hooked_fn, jacobian, jvp_cols, run_hooked, vjp_rows
    from .coupling import (
        CouplingTracker,
        block_coupling,
        block_jacobians,
        coupling_metric,
        coupling_through_training,
        trajectory_metrics,
    )
    from .induction import InductionEmergence, InductionHeads, induction_emergence, induction_heads
    from .inputs import to_tokens
    from .models import load_checkpoint, load_model, save_checkpoint, tiny_model, word_tokenizer
    from .oversquash import CollapsePair, collapse_curve, path_bound, sensitivity
    from .priority import (
        AlignmentCurve,
        GraphSVM,
        InfeasibleError,
        PriorityAlignment,
        Retrieval,
        TokenPriorityGraph,
        alignment_curve,
        graph_svm,
        head_W,
        priority_alignment,
        priority_loss,
        priority_model,
        retrieval_graph_view,
        train_priority,
    )
    from .smoothing import (
        dominance,
        flip_ln_gamma,
        ov_spectrum,
        sign_controlled,
        smoothing_profile,
    )
    from .stacking import (
        DepthStudy,
        Emergence,
        HopScores,
        StackedHeads,
        StackEntry,
        depth_study,
        emergence,
        hop_scores,
        load_depth_study,
        query_accuracy,
        stacked_heads,
    )
    from .sweep import run_sweep
    from .training import TrainConfig, TrainResult, evaluate, train
