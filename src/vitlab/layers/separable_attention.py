"""Separable self-attention (Mehta & Rastegari 2022, MobileViTv2, arXiv:2206.02680, section 3.2).

Instead of N x N token-to-token weights, one latent query scores every token: the scores (a softmax over
the N tokens) weight the keys into a single context vector, which gates the ReLU'd values. Cost O(N d).
Inputs are MobileViT patch maps (B, d, P, N) (see :mod:`vitlab.layers.patch_fold`): each of the P pixel
positions has its own softmax over the N patches, and 1x1 convolutions play the linear layers.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from vitlab.layers.attention import CapturableAttention
from vitlab.layers.drop_path import DropPath
from vitlab.layers.mlp import ConvMlp


class SeparableSelfAttention(CapturableAttention):
    """Capture mode reports the context scores as (B, P, 1, N): per pixel position ("head") one query
    row whose weights over the N patches sum to 1. The output is the same with and without capture."""

    def __init__(self, dim: int, *, attn_drop: float = 0.0, proj_drop: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        self.dim = dim
        self.qkv_proj = nn.Conv2d(dim, 1 + 2 * dim, 1, bias=bias)  # one query channel, then keys, values
        self.attn_drop = nn.Dropout(attn_drop)
        self.out_proj = nn.Conv2d(dim, dim, 1, bias=bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv_proj(x).split([1, self.dim, self.dim], dim=1)  # (B, 1, P, N), (B, d, P, N) x2
        scores = q.softmax(dim=-1)  # over the N patches
        if self.capturing:
            self._emit(scores.transpose(1, 2))  # (B, 1, P, N) -> (B, P, 1, N)
        context = (k * self.attn_drop(scores)).sum(dim=-1, keepdim=True)  # (B, d, P, 1)
        out = F.relu(v) * context  # (B, d, P, N)
        return self.proj_drop(self.out_proj(out))


class SeparableAttentionBlock(nn.Module):
    """Pre-norm block on (B, d, P, N): x + attn(norm(x)); x + MLP(norm(x)), with GroupNorm(1, d), which
    normalises each sample over all of (d, P, N) (cvnets' "layer_norm_2d"), and a 1x1-convolution MLP."""

    def __init__(self, dim: int, *, mlp_ratio: float = 2.0, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, act_layer: type[nn.Module] = nn.SiLU, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(1, dim, eps=eps)
        self.attn = SeparableSelfAttention(dim, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.GroupNorm(1, dim, eps=eps)
        self.mlp = ConvMlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))
