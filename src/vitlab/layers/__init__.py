"""Building blocks shared by every model family; each concept lives in one file."""

from vitlab.layers.attention import Attention, CapturableAttention, attend_explicit, capture_attention
from vitlab.layers.block import Block
from vitlab.layers.class_attention import ClassAttention, ClassAttentionBlock
from vitlab.layers.drop_path import DropPath, drop_path
from vitlab.layers.helpers import to_2tuple
from vitlab.layers.layer_scale import LayerScale
from vitlab.layers.mlp import Mlp
from vitlab.layers.patch_embed import PatchEmbed, check_image_size, check_images
from vitlab.layers.pos_embed import resample_pos_embed, sincos_2d_pos_embed
from vitlab.layers.std_conv import MaxPool2dSame, StdConv2d, pad_same
from vitlab.layers.talking_heads import TalkingHeadsAttention
from vitlab.layers.tracing import is_tracing_any_size, size_differs, tracing_any_size

__all__ = [
    "Attention", "Block", "CapturableAttention", "ClassAttention", "ClassAttentionBlock", "DropPath", "LayerScale", "MaxPool2dSame", "Mlp",
    "PatchEmbed", "StdConv2d", "attend_explicit", "capture_attention", "check_image_size", "check_images", "drop_path",
    "TalkingHeadsAttention", "is_tracing_any_size", "pad_same", "resample_pos_embed", "sincos_2d_pos_embed",
    "size_differs", "to_2tuple", "tracing_any_size",
]
