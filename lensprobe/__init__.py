"""lensprobe: how information moves through a transformer, for TransformerLens models.

Hook-based extractors for five papers (over-squashing, OV smoothing, block coupling,
stacked retrieval heads, token-priority graphs). Every extractor takes a TransformerLens
model (HookedTransformer or TransformerBridge) and returns a result object, and leaves
the model exactly as it found it.
"""

from ._tl import BACKEND, TL_VERSION
from .core import guard, hooked_fn, jacobian, jvp_cols, run_hooked, vjp_rows
from .errors import InputError, LensprobeError, ModelError, NonFiniteError
from .inputs import to_tokens
from .models import (
    load_checkpoint,
    load_model,
    save_checkpoint,
    tiny_model,
    word_tokenizer,
)

__version__ = "0.1.0"
from . import tasks, views
from .coupling import block_jacobians, coupling, coupling_metric, trajectory_metrics, coupling_through_training, CouplingTracker
from .training import train, evaluate, TrainResult
from . import zoo
from .stacking import stacked_heads, emergence, depth_study, hop_scores, query_accuracy, StackedHeads, Emergence, DepthStudy
from .smoothing import ov_spectrum, dominance, smoothing_profile, sign_controlled, flip_ln_gamma
from .priority import TokenPriorityGraph, Retrieval, GraphSVM, InfeasibleError, graph_svm, head_W, priority_model, priority_loss, train_priority, PriorityAlignment, priority_alignment, AlignmentCurve, alignment_curve, retrieval_graph_view
from .oversquash import collapse_curve, path_bound, sensitivity
