"""The attention of T2T-ViT's tokens-to-token layers (Yuan et al., 2021, arXiv:2101.11986, section 3.1).

A T2T layer takes the soft-split tokens (width 3*7*7 = 147, then 64*3*3 = 576) down to a narrow width
(``token_dim``, 64) in its attention: q, k and v are projected to that width, there is one head, and the
residual of the attention is the value projection itself (the input has another width), so the layer
returns ``v + proj(attention(q, k, v))``.

Two kinds, as in the released code:

* :class:`TokenAttention` (T2T-ViT_t): softmax attention whose scale is 1/sqrt(input width), not of the
  64-wide head (the released code computes the head width from the input).
* :class:`PerformerAttention` (T2T-ViT): softmax kernel approximated with m = token_dim / 2 positive random
  features (Choromanski et al., 2020, "Rethinking Attention with Performers"): phi(x) = exp(w x - |x|^2/2)
  / sqrt(m), attention = phi(q) (phi(k)^T v) / (phi(q) . sum_t phi(k_t) + 1e-8), linear in the number of
  tokens. The features ``w`` (m x token_dim, orthogonal rows scaled by sqrt(m)) are drawn once at
  construction and are a persistent buffer: loading a checkpoint restores the trained model's draw.
  Capture mode emits the attention the kernel implies, phi(q) phi(k)^T with each row divided by its sum,
  (B, 1, N, N), and computes the output from it with the eps-guarded denominator (same output up to
  rounding; the emitted rows sum to one even where the guard is not negligible).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitlab.layers.attention import CapturableAttention, attend_explicit


class TokenAttention(CapturableAttention):
    """Single-head softmax attention from ``dim`` down to ``out_dim``, residual on v.

    Args:
        dim: input width (147 or 576 in T2T-ViT); also what the scale is computed from.
        out_dim: width of q, k, v and of the output (``token_dim``).
    """

    def __init__(self, dim: int, out_dim: int, *, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.out_dim = 1, out_dim, out_dim
        self.scale = dim**-0.5  # the released code: head width computed from the INPUT width
        self.qkv = nn.Linear(dim, 3 * out_dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(out_dim, out_dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, 1, self.out_dim).permute(2, 0, 3, 1, 4).unbind(0)  # (B, 1, N, d)
        if self.capturing:
            y = attend_explicit(q, k, v, scale=self.scale, dropout=self.attn_drop, sink=self._emit)
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0,
                                               scale=self.scale)
        y = self.proj_drop(self.proj(y[:, 0]))  # (B, N, d)
        return v[:, 0] + y


class PerformerAttention(CapturableAttention):
    """Single-head Performer attention (positive random features) from ``dim`` down to ``out_dim``, residual on v.

    Args:
        kernel_ratio: random features per output channel (m = out_dim * kernel_ratio).
        drop: dropout after the output projection (the released code uses 0.1 in training).
    """

    eps = 1e-8

    def __init__(self, dim: int, out_dim: int, *, kernel_ratio: float = 0.5, qkv_bias: bool = True,
                 drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.out_dim = 1, out_dim, out_dim
        self.qkv = nn.Linear(dim, 3 * out_dim, bias=qkv_bias)
        self.proj = nn.Linear(out_dim, out_dim)
        self.proj_drop = nn.Dropout(drop)
        self.m = int(out_dim * kernel_ratio)
        w = nn.init.orthogonal_(torch.empty(self.m, out_dim)) * math.sqrt(self.m)
        self.register_buffer("w", w)  # persistent: the checkpoint's draw, never redrawn on load

    def features(self, x: Tensor) -> Tensor:
        """phi(x) = exp(w x - |x|^2 / 2) / sqrt(m), in float32: (B, N, d) -> (B, N, m)."""
        x = x.float()
        half_sq = (x * x).sum(dim=-1, keepdim=True) / 2
        return torch.exp(x @ self.w.float().t() - half_sq) / math.sqrt(self.m)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).split(self.out_dim, dim=-1)  # (B, N, d) each
        qp, kp = self.features(q), self.features(k)  # (B, N, m)
        denom = qp @ kp.sum(dim=1).unsqueeze(-1) + self.eps  # (B, N, 1)
        if self.capturing:
            scores = qp @ kp.transpose(1, 2)  # (B, N, N): the kernel's unnormalised attention
            # emitted: rows normalised by their sum (a distribution, as analysis tools expect); the output
            # keeps the released code's eps-guarded denominator, which matters where the features underflow
            self._emit((scores / scores.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(scores.dtype).tiny)).unsqueeze(1))
            y = (scores / denom) @ v.float()
        else:
            y = (qp @ (kp.transpose(1, 2) @ v.float())) / denom  # linear in N: (m x d) summary first
        return v + self.proj_drop(self.proj(y.to(v.dtype)))
