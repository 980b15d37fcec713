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

from . import tasks, views, zoo
from .training import TrainResult, evaluate, train

# 1. over-squashing and representational collapse (Barbero et al. 2024)
from .oversquash import collapse_curve, path_bound, sensitivity

# 2. OV eigenspectra and smoothing (Dovonon et al. 2025)
from .smoothing import dominance, flip_ln_gamma, ov_spectrum, sign_controlled, smoothing_profile

# 3. transformer block coupling (Aubry et al. 2025)
from .coupling import (
    CouplingTracker, block_jacobians, coupling, coupling_metric, coupling_through_training,
    trajectory_metrics,
)

# 4. stacked attention heads and the retrieval problem (Musat 2025)
from .stacking import (
    DepthStudy, Emergence, StackedHeads, depth_study, emergence, hop_scores, load_depth_study,
    query_accuracy, stacked_heads,
)

# 5. hard retrieval over the token-priority graph (Li et al. 2024)
from .priority import (
    AlignmentCurve, GraphSVM, InfeasibleError, PriorityAlignment, Retrieval, TokenPriorityGraph,
    alignment_curve, graph_svm, head_W, priority_alignment, priority_loss, priority_model,
    retrieval_graph_view, train_priority,
)

__version__ = "0.1.0"
