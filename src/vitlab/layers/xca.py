"""Cross-covariance attention, XCA (El-Nouby et al., 2021, XCiT, arXiv:2106.09681, section 3.1).

XCA transposes self-attention: per head, queries and keys are (head_dim x N) with each channel
L2-normalised over the N tokens, and the attention is the (head_dim x head_dim) softmax of their
cross-covariance ``q k^T`` scaled by a learned per-head temperature. The values' channels are mixed by
it, so the cost grows linearly with the number of tokens (quadratically with the head width).

Its weights are therefore a CHANNEL map (head_dim x head_dim), not a token map: nothing in them says
which patch looks at which. Capture mode emits them as (B, heads, head_dim, head_dim) and marks the
layer with ``token_map = False`` so that analysis tools do not read them as token attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitlab.layers.attention import CapturableAttention


class XCA(CapturableAttention):
    """Cross-covariance attention on (B, N, D) tokens.

    Args:
        dim: token width; split over ``num_heads`` heads of ``dim / num_heads`` channels.
        qkv_bias: bias on the fused q, k, v projection.
    """

    token_map = False  # capture emits (B, heads, head_dim, head_dim) channel attention

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
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))  # learned, one per head
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        # (B, N, 3*C) -> (3, B, heads, head_dim, N): channels are the "sequence", tokens the features
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 4, 1)
        q, k, v = qkv.unbind(0)
        q = F.normalize(q, dim=-1)  # each channel a unit vector over the N tokens
        k = F.normalize(k, dim=-1)
        # The (head_dim x head_dim) map is small, so it is always materialised: on CPU two batched matmuls
        # beat F.scaled_dot_product_attention over a "sequence" of head_dim channels (measured 1.3x in
        # float32, 2.5x in bfloat16 for XCiT-T at 224 px; benchmarks/RESULTS.md). Capture mode only adds
        # the hand-over of the weights, so both modes compute the same numbers.
        attn = (q @ k.transpose(-2, -1)) * self.temperature  # (B, heads, hd, hd)
        attn = attn.softmax(dim=-1)
        self._emit(attn)
        out = self.attn_drop(attn) @ v  # (B, heads, hd, N)
        out = out.permute(0, 3, 1, 2).reshape(B, N, C)  # (B, heads, hd, N) -> (B, N, heads*hd)
        return self.proj_drop(self.proj(out))
