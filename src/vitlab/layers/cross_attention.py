"""Cross-attention fusion through a class token (Chen et al., 2021, CrossViT, arXiv:2103.14899, section 3.3).

CrossViT fuses its two branches by letting one branch's class token, projected to the other branch's
width, attend to itself and to the other branch's patch tokens. Only the class token is a query, so the
attention is :class:`~vitlab.layers.class_attention.ClassAttention` (linear in the number of tokens);
the block adds the result to the class token and has no MLP.
"""

from __future__ import annotations

from functools import partial

from torch import Tensor, nn

from vitlab.layers.class_attention import ClassAttention
from vitlab.layers.drop_path import DropPath


class CrossAttentionBlock(nn.Module):
    """cls <- cls + CA(LN([cls, other patches])); no MLP. Input (B, 1 + N, D), output (B, 1, D).

    Capture mode of its attention emits (B, heads, 1, 1 + N): the class token over itself and the
    other branch's patch tokens.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer: type[nn.Module] | partial = partial(nn.LayerNorm, eps=1e-6),
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = ClassAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                   proj_drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return x[:, :1] + self.drop_path(self.attn(self.norm1(x)))
