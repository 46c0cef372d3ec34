"""Looking inside a vision transformer: the ViT paper's inspection tools as pure tensor functions.

- :func:`capture`: every layer's attention weights and token states in one forward pass.
- rollout: attention rollout, gradient-weighted rollout, last-layer maps (:func:`explain`).
- distance: mean attention distance per head and layer.
- windows / explain_windows: rollout, gradient rollout and attention distance through the windows, shifts
  and patch merging of windowed attention (Swin), for models that describe their windows.
- pos_similarity: cosine similarity of the learned position embeddings.
- filters: principal components of the patch-embedding filters.
- fewshot: closed-form linear few-shot and k-NN accuracy on frozen features.
- figures / report: PNG figures (matplotlib Agg) and a small HTML report.
"""

from vitlab.analysis.capture import Captured, TokenLayout, attention_blocks, capture, token_layout
from vitlab.analysis.distance import AttentionDistanceMeter, mean_attention_distance, patch_centre_distances
from vitlab.analysis.explain import METHODS, Explanation, explain, uses_class_token
from vitlab.analysis.explain_windows import capture_windowed, explain_windowed, register_windowed
from vitlab.analysis.fewshot import (
    FewShotResult,
    extract_features,
    fewshot_evaluate,
    knn_accuracy,
    linear_accuracy,
    ridge_classifier,
)
from vitlab.analysis.filters import FilterComponents, filter_components, patch_embedding_weight
from vitlab.analysis.pos_similarity import PositionTable, position_similarity, position_table
from vitlab.analysis.rollout import (
    attention_rollout,
    discard_lowest,
    embed_square,
    fuse_heads,
    gradient_rollout,
    normalize_map,
    relevance_to_image,
    rollout_fused,
    token_relevance,
)
from vitlab.analysis.windows import (
    MergeStep,
    WindowDistanceMeter,
    analysis_steps,
    propagate_through_merge,
    propagate_through_window,
    window_attention_dense,
    window_attention_distance,
    window_gradient_rollout,
    window_last_layer,
    window_rollout,
)

__all__ = [
    "METHODS", "AttentionDistanceMeter", "Captured", "Explanation", "FewShotResult", "FilterComponents",
    "PositionTable", "TokenLayout", "attention_blocks", "attention_rollout", "capture", "discard_lowest",
    "embed_square", "explain", "extract_features", "fewshot_evaluate", "filter_components", "fuse_heads", "gradient_rollout",
    "knn_accuracy", "linear_accuracy", "mean_attention_distance", "normalize_map", "patch_centre_distances",
    "patch_embedding_weight", "position_similarity", "position_table", "relevance_to_image", "ridge_classifier",
    "rollout_fused", "token_layout", "token_relevance", "uses_class_token",
    "MergeStep", "WindowDistanceMeter", "analysis_steps", "capture_windowed", "explain_windowed",
    "propagate_through_merge", "propagate_through_window", "register_windowed", "window_attention_dense",
    "window_attention_distance", "window_gradient_rollout", "window_last_layer", "window_rollout",
]
