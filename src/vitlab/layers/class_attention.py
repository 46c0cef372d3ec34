"""Class attention (Touvron et al., 2021, CaiT, arXiv:2103.17239, section 3).

CaiT separates the two jobs of ViT's class token. The patch tokens are first processed by ordinary
self-attention layers without any class token; then a few class-attention layers insert the class
token, which attends to itself and to the patch tokens while the patch tokens stay frozen (they are
keys and values only, never updated). Only the query of the class token is computed, so a layer costs
O(N) instead of O(N^2).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitlab.layers.attention import CapturableAttention, attend_explicit
from vitlab.layers.drop_path import DropPath
from vitlab.layers.layer_scale import LayerScale
from vitlab.layers.mlp import Mlp


class ClassAttention(CapturableAttention):
    """Attention whose only query is the first token (the class token).

    Input (B, 1 + N, D) with the class token first; output (B, 1, D), the class token's update.
    Capture mode emits (B, heads, 1, 1 + N) weights.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self._init_heads(dim, num_heads)
        # separate projections: q reads only the class token, k and v read every token
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        h, hd = self.num_heads, self.head_dim
        q = self.q(x[:, :1]).reshape(B, 1, h, hd).transpose(1, 2)  # (B, heads, 1, hd)
        k = self.k(x).reshape(B, N, h, hd).transpose(1, 2)  # (B, heads, N, hd)
        v = self.v(x).reshape(B, N, h, hd).transpose(1, 2)  # (B, heads, N, hd)
        if self.capturing:
            out = attend_explicit(q, k, v, scale=self.scale, dropout=self.attn_drop, sink=self._emit)
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        out = out.transpose(1, 2).reshape(B, 1, C)  # (B, heads, 1, hd) -> (B, 1, C)
        return self.proj_drop(self.proj(out))


class ClassAttentionBlock(nn.Module):
    """cls <- cls + LS(CA(LN([cls, patches]))); cls <- cls + LS(MLP(LN(cls))). Patches are not updated.

    Args:
        init_values: LayerScale initial value of both branches.
        drop_path: stochastic-depth probability of both residual branches.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values: float = 1e-5,
        drop_path: float = 0.0,
        norm_layer: type[nn.Module] | partial = partial(nn.LayerNorm, eps=1e-6),
        act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = ClassAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                   proj_drop=proj_drop)
        self.ls1 = LayerScale(dim, init_values=init_values)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values=init_values)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, cls: Tensor) -> Tensor:
        """x: (B, N, D) frozen patch tokens; cls: (B, 1, D). Returns the updated class token (B, 1, D)."""
        u = torch.cat([cls, x], dim=1)  # (B, 1 + N, D)
        cls = cls + self.drop_path1(self.ls1(self.attn(self.norm1(u))))
        cls = cls + self.drop_path2(self.ls2(self.mlp(self.norm2(cls))))
        return cls
