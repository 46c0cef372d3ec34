"""Talking-heads attention (Shazeer et al., 2020, arXiv:2003.02436), as used by CaiT's self-attention stage.

Plain multi-head attention keeps the heads independent. Talking heads mixes them with two learned
(heads x heads) maps: one on the attention logits before the softmax and one on the weights after it.
Because heads are mixed before the softmax, the fused ``scaled_dot_product_attention`` kernel cannot be
used; the weights are always materialised, so capture mode costs nothing extra and is exactly the
default computation.
"""

from __future__ import annotations

from torch import Tensor, nn

from vitlab.layers.attention import CapturableAttention


class TalkingHeadsAttention(CapturableAttention):
    """Self-attention with pre- and post-softmax mixing across heads.

    Args:
        dim: token width.
        num_heads: number of heads; ``dim`` must be divisible by it.
        qkv_bias: bias on the fused q, k, v projection.
        attn_drop: dropout on the (mixed) attention weights.
        proj_drop: dropout after the output projection.

    In capture mode the emitted (B, heads, N, N) map is the softmax distribution of each head (after
    the pre-softmax mixing, before the post-softmax one), so rows sum to one as analysis tools such as
    attention rollout expect; the weights that finally multiply the values are its ``proj_w`` mixture.
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
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_l = nn.Linear(num_heads, num_heads)  # mixes the logits (before softmax)
        self.proj_w = nn.Linear(num_heads, num_heads)  # mixes the weights (after softmax)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        # (B, N, 3*C) -> (3, B, heads, N, head_dim)
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, heads, N, N)
        # Linear acts on the last axis, so move heads there: (B, N, N, heads) -> mix -> (B, heads, N, N)
        attn = self.proj_l(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        attn = attn.softmax(dim=-1)
        self._emit(attn)
        attn = self.proj_w(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)  # (B, heads, N, hd) -> (B, N, C)
        return self.proj_drop(self.proj(x))
