"""Global self-attention with a learned relative position bias and a class token (BEiT, arXiv:2106.08254).

Every pair of the H x W patch tokens adds a per-head bias looked up by their offset (dy, dx) in a
(2H-1)(2W-1) table, as Swin does inside a window (:mod:`vitlab.layers.window_attention`), but over the
whole grid; three more rows hold the class token's biases: class -> patch, patch -> class and
class -> class. BEiT keeps one table per layer when fine-tuned and one shared by all layers (the
model's ``rel_pos_bias``) in pre-training; the two add up when both exist.

The same layer covers BEiT-3's vision encoder (arXiv:2208.10442), which has no table but a LayerNorm
on the attention output before the output projection (Magneto's sub-LN, ``inner_norm``).

The projections are BEiT's: the fused qkv Linear has no bias; q and v have their own bias vectors and k
has none (``qkv_bias="qv"``), or a plain fused bias (BEiT-3: ``"qkv"``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from vitlab.layers.attention import Attention
from vitlab.layers.helpers import linear_with_bias
from vitlab.layers.window_attention import relative_position_index, resample_rel_pos_table

CLASS_SLOTS = 3  # the extra table rows: class -> patch, patch -> class, class -> class


def class_relative_position_index(grid: tuple[int, int]) -> Tensor:
    """(1 + N, 1 + N) long index into a (2H-1)(2W-1) + 3 table; token 0 is the class token."""
    H, W = grid
    size = (2 * H - 1) * (2 * W - 1)
    index = torch.empty(1 + H * W, 1 + H * W, dtype=torch.long)
    index[1:, 1:] = relative_position_index((H, W))
    index[0, :] = size  # class -> patch
    index[:, 0] = size + 1  # patch -> class
    index[0, 0] = size + 2  # class -> class
    return index


def resample_class_rel_pos_table(table: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> Tensor:
    """A ((2H-1)(2W-1) + 3, heads) table for another grid: the grid part resampled as timm's
    ``resize_rel_pos_bias_table`` does (from the BEiT code), the three class-token rows kept."""
    if tuple(old_grid) == tuple(new_grid):
        return table
    grid_part, cls_part = table[:-CLASS_SLOTS], table[-CLASS_SLOTS:]
    return torch.cat([resample_rel_pos_table(grid_part, old_grid, new_grid, mode="timm"), cls_part])


def gather_bias(bias: Tensor, index: Tensor) -> Tensor:
    """The bias between the tokens a mask kept: (heads, M, M) bias, (B, n) token indices -> (B, heads, n, n)."""
    return bias[:, index[:, :, None], index[:, None, :]].permute(1, 0, 2, 3)  # (heads, B, n, n) -> (B, heads, n, n)


def table_grid(rows: int) -> tuple[int, int] | None:
    """The square grid whose table (with the class rows) has ``rows`` rows, or None."""
    side = int(round((rows - CLASS_SLOTS) ** 0.5))
    if side % 2 == 0 or side * side != rows - CLASS_SLOTS:
        return None
    return (side + 1) // 2, (side + 1) // 2


class _TableBias:
    """A learned (T, heads) table and the (heads, 1+N, 1+N) bias it gives on the module's grid."""

    grid: tuple[int, int]
    relative_position_bias_table: nn.Parameter
    relative_position_index: Tensor

    def _make_table(self, grid: tuple[int, int], num_heads: int) -> None:
        self.grid = tuple(grid)
        rows = (2 * grid[0] - 1) * (2 * grid[1] - 1) + CLASS_SLOTS
        self.relative_position_bias_table = nn.Parameter(torch.zeros(rows, num_heads))
        self.register_buffer("relative_position_index", class_relative_position_index(self.grid), persistent=False)

    def _init_buffers(self) -> None:
        index = getattr(self, "relative_position_index", None)  # None: a layer reading a shared table
        if index is not None:
            self.relative_position_index = class_relative_position_index(self.grid).to(index.device)

    def position_bias(self) -> Tensor:
        """(heads, 1 + N, 1 + N); differentiable w.r.t. the table."""
        n = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]  # (n * n, heads)
        return bias.view(n, n, -1).permute(2, 0, 1).contiguous()  # a dense mask keeps SDPA on its fast kernel


class RelativePositionBias(_TableBias, nn.Module):
    """BEiT's shared table (pre-training layout): ``forward()`` -> (heads, 1 + N, 1 + N) bias for every layer."""

    def __init__(self, *, grid: tuple[int, int], num_heads: int) -> None:
        nn.Module.__init__(self)
        self._make_table(grid, num_heads)

    def forward(self) -> Tensor:
        return self.position_bias()


class RelPosAttention(_TableBias, Attention):
    """Multi-head self-attention over [class token, patches] with BEiT's projections and bias.

    Args:
        dim: token width.
        num_heads: heads; ``dim`` must be divisible by it.
        qkv_bias: True gives the projection biases of ``qkv_bias_layout`` (False: none).
        qkv_bias_layout: "qv": separate q and v bias vectors, no k bias (BEiT); "qkv": a fused bias (BEiT-3).
        grid: (H, W) patch grid of this layer's own relative position table; None: no table (BEiT's shared
            table or BEiT-3; a bias can still come in through ``forward``'s ``attn_mask``).
        inner_norm: a norm on the attention output before the projection (BEiT-3); None: none.

    ``forward(x, attn_mask=None, token_index=None)``: x (B, n, C); ``attn_mask`` an additive (heads, n, n) or
    (B, heads, n, n) bias (the shared table's), added to this layer's own; ``token_index`` (B, n): which of the
    1 + N tokens of the grid x holds (after a mask dropped some, as MAE's), so that this layer's own bias is
    taken between those; None: all of them, in order. The SDPA path and capture mode are
    :class:`~vitlab.layers.attention.Attention`'s.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int = 8,
        qkv_bias: bool = True,
        qkv_bias_layout: Literal["qv", "qkv"] = "qv",
        grid: tuple[int, int] | None = None,
        inner_norm: Callable[[int], nn.Module] | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        if qkv_bias_layout not in ("qv", "qkv"):
            raise ValueError(f"RelPosAttention: qkv_bias_layout must be 'qv' or 'qkv', got {qkv_bias_layout!r}")
        separate = qkv_bias and qkv_bias_layout == "qv"
        Attention.__init__(self, dim, num_heads=num_heads, qkv_bias=qkv_bias and not separate,
                           attn_drop=attn_drop, proj_drop=proj_drop)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if separate else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if separate else None
        if grid is not None:
            self._make_table(grid, num_heads)
        else:
            self.grid = None
            self.relative_position_bias_table = None
        self.norm = inner_norm(dim) if inner_norm is not None else nn.Identity()

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, token_index: Tensor | None = None) -> Tensor:
        B, N, C = x.shape
        if self.q_bias is not None:
            bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])  # k has no bias
            qkv = linear_with_bias(self.qkv, x, bias)
        else:
            qkv = self.qkv(x)
        # (B, N, 3*C) -> (3, B, heads, N, head_dim)
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.relative_position_bias_table is not None:
            own = self.position_bias()  # (heads, 1 + N, 1 + N)
            if token_index is not None:
                own = gather_bias(own, token_index)  # (B, heads, n, n)
            if own.shape[-1] != N:
                raise ValueError(f"RelPosAttention: the relative position table is for {own.shape[-1]} tokens "
                                 f"(1 + {self.grid[0]}x{self.grid[1]}), got {N}")
            attn_mask = own if attn_mask is None else attn_mask + own
        if attn_mask is not None:
            attn_mask = attn_mask.to(q.dtype)
            if attn_mask.ndim == 3:
                attn_mask = attn_mask.unsqueeze(0)  # (1, heads, N, N): the same for every image
        x = self._attend(q, k, v, attn_mask)
        x = self.norm(x.transpose(1, 2).reshape(B, N, C))  # (B, heads, N, hd) -> (B, N, C)
        return self.proj_drop(self.proj(x))
