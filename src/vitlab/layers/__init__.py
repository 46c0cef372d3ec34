"""Building blocks shared by every model family; each concept lives in one file."""

from vitlab.layers.attention import (
    Attention,
    CapturableAttention,
    FoldedAttention,
    attend_explicit,
    capture_attention,
)
from vitlab.layers.attention_pool import AttentionPoolLatent
from vitlab.layers.block import Block
from vitlab.layers.checkpointing import call_block, run_sequential
from vitlab.layers.class_attention import ClassAttention, ClassAttentionBlock
from vitlab.layers.conv_norm_act import ConvNormAct
from vitlab.layers.cross_attention import CrossAttention, CrossAttentionBlock
from vitlab.layers.drop_path import DropPath, drop_path
from vitlab.layers.frozen_batch_norm import FrozenBatchNorm2d, freeze_batch_norm
from vitlab.layers.helpers import make_divisible, to_2tuple, trunc_normal_linears
from vitlab.layers.inverted_residual import InvertedResidual
from vitlab.layers.layer_scale import LayerScale
from vitlab.layers.mlp import ConvMlp, Mlp
from vitlab.layers.patch_embed import PatchEmbed, check_image_size, check_images
from vitlab.layers.patch_fold import (
    fold_patches,
    fold_tokens,
    patch_grid,
    resize_to_patches,
    unfold_patches,
    unfold_tokens,
)
from vitlab.layers.patch_merging import PatchMerging, merge_2x2
from vitlab.layers.pos_embed import resample_pos_embed, sincos_2d_pos_embed, sinusoid_1d_pos_embed
from vitlab.layers.rel_pos_attention import RelativePositionBias, RelPosAttention
from vitlab.layers.separable_attention import SeparableAttentionBlock, SeparableSelfAttention
from vitlab.layers.sine_position import sine_position_2d
from vitlab.layers.std_conv import MaxPool2dSame, StdConv2d, pad_same
from vitlab.layers.talking_heads import TalkingHeadsAttention
from vitlab.layers.token_mask import TokenMasker, keep_tokens
from vitlab.layers.tracing import is_tracing_any_size, size_differs, tracing_any_size
from vitlab.layers.window_attention import (
    WindowAttention,
    WindowAttentionV2,
    relative_position_index,
    resample_rel_pos_table,
    shift_attention_mask,
    window_partition,
    window_reverse,
)
from vitlab.layers.window_geometry import WindowGeometry

__all__ = [
    "Attention", "Block", "CapturableAttention", "ClassAttention", "ClassAttentionBlock", "DropPath", "LayerScale", "MaxPool2dSame", "Mlp",
    "PatchEmbed", "StdConv2d", "attend_explicit", "capture_attention", "check_image_size", "check_images", "drop_path",
    "TalkingHeadsAttention", "pad_same", "ConvMlp", "ConvNormAct", "FoldedAttention", "InvertedResidual",
    "SeparableAttentionBlock", "SeparableSelfAttention", "fold_patches", "fold_tokens", "make_divisible", "patch_grid",
    "resize_to_patches", "unfold_patches", "unfold_tokens", "resample_pos_embed", "sincos_2d_pos_embed", "sinusoid_1d_pos_embed", "to_2tuple",
    "trunc_normal_linears",
    "PatchMerging", "WindowAttention", "WindowAttentionV2", "WindowGeometry", "merge_2x2", "relative_position_index",
    "resample_rel_pos_table", "shift_attention_mask", "window_partition", "window_reverse",
    "CrossAttention", "CrossAttentionBlock", "FrozenBatchNorm2d", "freeze_batch_norm", "sine_position_2d",
    "TokenMasker", "keep_tokens", "RelativePositionBias", "RelPosAttention",
    "is_tracing_any_size", "size_differs", "tracing_any_size", "call_block", "run_sequential", "AttentionPoolLatent",
]
