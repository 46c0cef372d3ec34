"""DETR's 2-D sine position encoding of a feature map (Carion et al., 2020, appendix A.4).

Row and column positions are the cumulative count of real (not padded) cells, normalised to
(0, 2*pi] per image, and encoded with ``dim / 2`` sines/cosines each (temperature 10000); the row half
comes first. Padding never shifts the encoding of the real image.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def sine_position_2d(mask: Tensor, dim: int, *, temperature: float = 10000.0, normalize: bool = True,
                     scale: float = 2 * math.pi, dtype: torch.dtype = torch.float32) -> Tensor:
    """Encodings (B, dim, H, W) for a (B, H, W) mask that is True on real cells."""
    if dim % 4 != 0:
        raise ValueError(f"sine_position_2d: dim={dim} must be divisible by 4")
    npf = dim // 2
    m = mask.to(dtype)
    y = m.cumsum(1)
    x = m.cumsum(2)
    if normalize:
        eps = 1e-6
        y = y / (y[:, -1:, :] + eps) * scale
        x = x / (x[:, :, -1:] + eps) * scale
    i = torch.arange(npf, dtype=torch.int64, device=mask.device).to(dtype)
    freq = temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / npf)
    px, py = x[..., None] / freq, y[..., None] / freq  # (B, H, W, npf)
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((py, px), dim=3).permute(0, 3, 1, 2)
