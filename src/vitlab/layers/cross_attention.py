"""Cross-attention: queries from one sequence, keys and values from another.

* :class:`CrossAttention`: multi-head attention over separate query, key and value inputs (DETR's decoder
  cross-attention, and self-attention whose queries and keys carry position encodings the values do not).
  Separate ``q_proj`` / ``k_proj`` / ``v_proj`` (the inputs differ, so no fused qkv), the SDPA fast path by
  default, and the capture path of every vitlab attention.
* :class:`CrossAttentionBlock`: CrossViT's fusion through a class token (Chen et al., 2021,
  arXiv:2103.14899, section 3.3): one branch's class token, projected to the other branch's width, attends
  to itself and to the other branch's patch tokens. Only the class token is a query, so the attention is
  :class:`~vitlab.layers.class_attention.ClassAttention` (linear in the number of tokens); the block adds the
  result to the class token and has no MLP.
"""

from __future__ import annotations

from functools import partial

import torch.nn.functional as F
from torch import Tensor, nn

from vitlab.layers.attention import CapturableAttention, attend_explicit
from vitlab.layers.class_attention import ClassAttention
from vitlab.layers.drop_path import DropPath


class CrossAttention(CapturableAttention):
    """Args:
    dim: width of queries, keys and values.
    num_heads: heads; ``dim`` must be divisible by it.
    qkv_bias: bias on the three input projections.
    attn_drop: dropout on the attention weights (training only).
    """

    def __init__(self, dim: int, *, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0) -> None:
        super().__init__()
        self._init_heads(dim, num_heads)
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)

    def _heads(self, x: Tensor) -> Tensor:
        B, N, _ = x.shape
        return x.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, N, hd)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """``query`` (B, Nq, D), ``key`` and ``value`` (B, Nk, D); ``key_mask`` (B, Nk) bool, True for keys
        that may be attended (False: padding)."""
        B, Nq, C = query.shape
        q, k, v = self._heads(self.q_proj(query)), self._heads(self.k_proj(key)), self._heads(self.v_proj(value))
        mask = None if key_mask is None else key_mask[:, None, None, :]
        if self.capturing:
            x = attend_explicit(q, k, v, scale=self.scale, attn_mask=mask, dropout=self.attn_drop, sink=self._emit)
        else:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                               dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.proj(x.transpose(1, 2).reshape(B, Nq, C))


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
