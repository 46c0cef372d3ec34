"""Multi-head attention over separate query, key and value inputs (cross-attention, and self-attention
whose queries and keys carry position encodings the values do not, as in DETR).

Separate ``q_proj`` / ``k_proj`` / ``v_proj`` projections (the inputs differ, so no fused qkv), the
SDPA fast path by default, and the capture path of every vitlab attention: the softmax weights
(batch, heads, queries, keys) go to the sink and the output is the same.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from vitlab.layers.attention import CapturableAttention, attend_explicit


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
