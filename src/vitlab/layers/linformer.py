"""Linformer attention (Wang et al., 2020, "Linformer: Self-Attention with Linear Complexity", arXiv:2006.04768).

Keys and values are projected along the SEQUENCE axis to a fixed length k before attention:
head_i = softmax(Q_i (E K_i)^T / sqrt(d)) (F V_i), with E, F in R^{k x n} learned. The attention matrix is
n x k, so time and memory grow linearly with n for a fixed k.

Sharing (paper, section 4): "none": an E and an F per head and layer; "headwise": one E and one F per
layer, shared by its heads; "kv": one matrix per layer used as both E and F; "layerwise": a single
matrix for E and F in every layer (owned by the model and handed to each layer).

Other sequence lengths: the projections are tied to the length n they were built for. A shorter
sequence (n' < n) uses the first n' columns of E and F, as fairseq's reference code and the PyPI
``linformer`` package do; a longer one is refused. For images, :func:`resample_projection` moves a
projection to another patch grid (used when loading a checkpoint at another resolution).

The captured maps are (B, heads, n, k): queries are tokens but keys are k mixtures of tokens, so they
are not token-to-token maps (``token_map = False``); attention rollout is undefined for Linformer.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitlab.layers.attention import CapturableAttention, attend_explicit

Sharing = Literal["none", "headwise", "kv", "layerwise"]
SHARING_MODES: tuple[str, ...] = ("none", "headwise", "kv", "layerwise")


def init_projection(weight: Tensor) -> Tensor:
    """Xavier-uniform over (k, n), per head where there is a head axis (fairseq's choice, gain 1)."""
    k, n = weight.shape[-2:]
    bound = (6.0 / (k + n)) ** 0.5
    with torch.no_grad():
        return weight.uniform_(-bound, bound)


class LinformerAttention(CapturableAttention):
    """Multi-head self-attention over keys and values projected to length ``k`` along the sequence.

    Args:
        dim: token width.
        seq_len: n, the sequence length the projections are built for (class token included).
        k: the projected length.
        sharing: see the module docstring.
        shared: for ``sharing="layerwise"``, the model's (k, seq_len) parameter used by every layer;
            held without registering it here, so that it appears once in the state dict.
    """

    token_map = False  # maps are (n queries x k projected keys)

    def __init__(
        self,
        dim: int,
        *,
        seq_len: int,
        k: int,
        num_heads: int = 8,
        sharing: Sharing = "headwise",
        shared: nn.Parameter | None = None,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if sharing not in SHARING_MODES:
            raise ValueError(f"LinformerAttention: sharing must be one of {', '.join(SHARING_MODES)}, got {sharing!r}")
        if k < 1 or seq_len < 1:
            raise ValueError(f"LinformerAttention: k={k} and seq_len={seq_len} must be positive")
        self._init_heads(dim, num_heads)
        self.seq_len, self.k, self.sharing = seq_len, k, sharing
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self._shared: tuple[nn.Parameter, ...] = ()
        if sharing == "layerwise":
            if shared is None or tuple(shared.shape) != (k, seq_len):
                raise ValueError(f"LinformerAttention: sharing='layerwise' needs the model's shared ({k}, {seq_len}) "
                                 f"projection, got {None if shared is None else tuple(shared.shape)}")
            self._shared = (shared,)
        else:
            shape = (num_heads, k, seq_len) if sharing == "none" else (k, seq_len)
            self.proj_e = nn.Parameter(init_projection(torch.empty(shape)))
            if sharing in ("none", "headwise"):
                self.proj_f = nn.Parameter(init_projection(torch.empty(shape)))

    def projections(self) -> tuple[Tensor, Tensor]:
        """(E, F), each (k, n) or (heads, k, n)."""
        if self._shared:
            return self._shared[0], self._shared[0]
        e = self.proj_e
        return e, getattr(self, "proj_f", e)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        if N > self.seq_len:
            raise ValueError(f"LinformerAttention: a sequence of {N} tokens is longer than the {self.seq_len} its "
                             f"projections were built for; build the model for the longer input")
        # (B, N, 3*C) -> (3, B, heads, N, head_dim)
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        e, f = self.projections()
        e, f = e[..., :N], f[..., :N]  # shorter sequences: the first N columns (fairseq's rule)
        k = torch.matmul(e, k)  # (k, N) @ (B, heads, N, hd) -> (B, heads, k, hd); per-head E broadcasts too
        v = torch.matmul(f, v)
        if self.capturing:
            x = attend_explicit(q, k, v, scale=self.scale, dropout=self.attn_drop, sink=self._emit)
        else:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, heads, N, hd) -> (B, N, C)
        return self.proj_drop(self.proj(x))


def resample_projection(proj: Tensor, new_grid: tuple[int, int], *, old_grid: tuple[int, int],
                        num_prefix_tokens: int = 1) -> Tensor:
    """Move a (..., k, prefix + rows*cols) projection to another patch grid.

    The prefix columns are kept; the patch columns of each row of E are resampled bilinearly on the grid
    and scaled by old/new patch count, so that a projected key stays a weighted sum of comparable mass.
    """
    p = num_prefix_tokens
    if tuple(new_grid) == tuple(old_grid):
        return proj
    lead, n = proj.shape[:-1], proj.shape[-1]
    if n != p + old_grid[0] * old_grid[1]:
        raise ValueError(f"resample_projection: {n} columns do not match {p} prefix + {old_grid} grid")
    prefix, grid = proj[..., :p], proj[..., p:]
    g = grid.float().reshape(-1, 1, *old_grid)  # (prod(lead), 1, rows, cols)
    g = F.interpolate(g, size=tuple(new_grid), mode="bilinear", align_corners=False)
    g = g * (old_grid[0] * old_grid[1]) / (new_grid[0] * new_grid[1])
    return torch.cat([prefix, g.reshape(*lead, -1).to(proj.dtype)], dim=-1)
