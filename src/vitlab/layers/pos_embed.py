"""Position embeddings: learned 1-D, fixed 2-D sin-cos, and the one resampler every model shares.

The resampler splits off prefix tokens (class, distillation, ...), reshapes the rest to its 2-D grid
and interpolates it bicubically in float32 to a new grid; it is used when loading a checkpoint at
another resolution and on the fly for ``dynamic_img_size``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitlab.layers.helpers import to_2tuple
from vitlab.layers.tracing import size_differs


def resample_pos_embed(
    posemb: Tensor,
    new_size: int | tuple[int, int],
    *,
    old_size: int | tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> Tensor:
    """Resample a (1, prefix + H*W, D) position table to the grid ``new_size``.

    Args:
        posemb: the table, prefix tokens first.
        new_size: target grid (rows, cols).
        old_size: source grid; inferred as square when omitted.
        num_prefix_tokens: leading entries that are not on the grid and are kept as they are.
    Returns:
        (1, prefix + new_rows * new_cols, D) in the input's dtype.
    """
    new_size = to_2tuple(new_size)
    num_grid = posemb.shape[1] - num_prefix_tokens
    if old_size is None:
        side = math.isqrt(num_grid)
        if side * side != num_grid:
            raise ValueError(
                f"resample_pos_embed: {num_grid} grid positions are not a square grid; pass old_size"
            )
        old_size = (side, side)
    old_size = to_2tuple(old_size)
    if old_size[0] * old_size[1] != num_grid:
        raise ValueError(
            f"resample_pos_embed: old_size {old_size} does not match {num_grid} grid positions "
            f"(table of {posemb.shape[1]} with {num_prefix_tokens} prefix tokens)"
        )
    if not size_differs(new_size, old_size):
        return posemb
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    dim, dtype = posemb.shape[-1], posemb.dtype
    grid = grid.float().reshape(1, old_size[0], old_size[1], dim).permute(0, 3, 1, 2)  # (1, D, H, W)
    grid = F.interpolate(grid, size=new_size, mode=interpolation, antialias=antialias, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(dtype)  # (1, H'*W', D)
    return torch.cat([prefix, grid], dim=1)


def sincos_2d_pos_embed(
    embed_dim: int, grid_size: int | tuple[int, int], *, temperature: float = 10000.0
) -> Tensor:
    """Fixed 2-D sin-cos table (1, H*W, D): a quarter of the channels each for sin/cos of row/column."""
    h, w = to_2tuple(grid_size)
    if embed_dim % 4 != 0:
        raise ValueError(f"sincos_2d_pos_embed: embed_dim={embed_dim} must be divisible by 4")
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float32),
                                torch.arange(w, dtype=torch.float32), indexing="ij")
    omega = torch.arange(embed_dim // 4, dtype=torch.float32) / (embed_dim // 4)
    omega = 1.0 / temperature**omega  # (D/4,)
    y = rows.flatten()[:, None] * omega[None, :]  # (H*W, D/4)
    x = cols.flatten()[:, None] * omega[None, :]
    pe = torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)  # (H*W, D)
    return pe.unsqueeze(0)


def sinusoid_1d_pos_embed(num_positions: int, dim: int) -> Tensor:
    """Fixed 1-D sinusoid table of "Attention is all you need" (T2T-ViT, CCT), (1, num_positions, dim):
    position p, channel j -> sin (even j) / cos (odd j) of p / 10000^(2 floor(j/2) / dim)."""
    pos = torch.arange(num_positions, dtype=torch.float64)[:, None]
    rate = torch.pow(10000.0, 2 * (torch.arange(dim, dtype=torch.float64) // 2) / dim)[None, :]
    angle = pos / rate
    table = torch.where(torch.arange(dim)[None, :] % 2 == 0, angle.sin(), angle.cos())
    return table.float().unsqueeze(0)


def fourier_features_2d(rows: int, cols: int, *, hidden_dim: int = 32, temperature: float = 10000.0,
                        eps: float = 1e-6) -> Tensor:
    """XCiT's Fourier position features (El-Nouby et al. 2021, after Vaswani et al.), (1, 2*hidden_dim, rows, cols).

    Row and column indices 1..n are normalised to (0, 2 pi]; channel i of each half is sin (even i) or
    cos (odd i) of the position over ``temperature ** (2 * (i // 2) / hidden_dim)``; rows first, then columns.
    """
    y = torch.arange(1, rows + 1, dtype=torch.float32) / (rows + eps) * (2 * math.pi)  # (rows,)
    x = torch.arange(1, cols + 1, dtype=torch.float32) / (cols + eps) * (2 * math.pi)  # (cols,)
    i = torch.arange(hidden_dim, dtype=torch.float32)
    freq = temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / hidden_dim)  # (hidden,)
    even = (torch.arange(hidden_dim) % 2 == 0)

    def encode(p: Tensor) -> Tensor:
        a = p[:, None] / freq  # (n, hidden)
        return torch.where(even, a.sin(), a.cos())

    fy = encode(y)[:, None, :].expand(rows, cols, hidden_dim)  # (rows, cols, hidden)
    fx = encode(x)[None, :, :].expand(rows, cols, hidden_dim)
    return torch.cat([fy, fx], dim=-1).permute(2, 0, 1).unsqueeze(0)  # (1, 2*hidden, rows, cols)


class FourierPosEmbed(nn.Module):
    """Fourier position features on the token grid, projected to ``dim`` by a learned 1x1 convolution.

    Recomputed for each grid, so a model that uses it runs at any input size.
    """

    def __init__(self, dim: int, *, hidden_dim: int = 32, temperature: float = 10000.0) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.temperature = temperature
        self.token_projection = nn.Conv2d(2 * hidden_dim, dim, kernel_size=1)

    def forward(self, grid: tuple[int, int]) -> Tensor:
        """(rows, cols) -> (1, rows*cols, dim) to add to the patch tokens."""
        w = self.token_projection.weight
        feats = fourier_features_2d(*grid, hidden_dim=self.hidden_dim, temperature=self.temperature)
        pos = self.token_projection(feats.to(w.device, w.dtype))  # (1, dim, rows, cols)
        return pos.flatten(2).transpose(1, 2)
