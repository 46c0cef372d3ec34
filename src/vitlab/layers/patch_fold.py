"""MobileViT's unfold / fold: a feature map cut into p x p patches, so that each of the P = p*p pixel
positions of a patch forms its own sequence over the N patches (Mehta & Rastegari 2021, section 3.1).

Layouts:
    map     (B, C, H, W)
    patches (B, C, P, N)   P = ph*pw pixel position inside a patch (row-major), N = nh*nw patch index
    tokens  (B*P, N, C)    the P sequences of one image next to each other in the batch

Every reshape here is at most 5-D (CoreML's limit; timm #1407), so the functions export without rank-6 tensors.
Maps whose sides are not multiples of the patch are resized first (see :func:`resize_to_patches`).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from vitlab.layers.tracing import size_differs


def patch_grid(h: int, w: int, patch: tuple[int, int]) -> tuple[int, int]:
    """Sides of the map rounded up to the next multiple of the patch (integer ceil-division, so that
    symbolic sizes stay symbolic while an exporter traces any size)."""
    return (h + patch[0] - 1) // patch[0] * patch[0], (w + patch[1] - 1) // patch[1] * patch[1]


def resize_to_patches(x: Tensor, patch: tuple[int, int], *, align_corners: bool) -> Tensor:
    """Bilinear resize of ``x`` (B, C, H, W) to the next multiple of the patch; unchanged if it fits.

    MobileViT v1 resizes with ``align_corners=False`` before unfolding and back after folding; v2 (cvnets
    and timm) resizes the block input with ``align_corners=True`` and keeps the larger output. While an
    exporter traces any size (:func:`vitlab.layers.tracing_any_size`) the resize is always in the graph:
    at a size that fits it maps every pixel onto itself with weight 1, an exact identity.
    """
    h, w = x.shape[-2:]
    size = patch_grid(h, w, patch)
    if not size_differs(size, (h, w)):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


def unfold_patches(x: Tensor, patch: tuple[int, int]) -> Tensor:
    """(B, C, H, W) -> (B, C, P, N); H and W must be multiples of the patch. One copy."""
    B, C, H, W = x.shape
    ph, pw = patch
    nh, nw = H // ph, W // pw
    x = x.reshape(B * C, nh, ph, nw, pw).permute(0, 2, 4, 1, 3)  # (B*C, ph, pw, nh, nw)
    return x.reshape(B, C, ph * pw, nh * nw)


def fold_patches(x: Tensor, grid: tuple[int, int], patch: tuple[int, int]) -> Tensor:
    """(B, C, P, N) -> (B, C, H, W) for ``grid`` = (nh, nw) patches; the inverse of :func:`unfold_patches`."""
    B, C = x.shape[:2]
    ph, pw = patch
    nh, nw = grid
    x = x.reshape(B * C, ph, pw, nh, nw).permute(0, 3, 1, 4, 2)  # (B*C, nh, ph, nw, pw)
    return x.reshape(B, C, nh * ph, nw * pw)


def unfold_tokens(x: Tensor, patch: tuple[int, int]) -> Tensor:
    """(B, C, H, W) -> (B*P, N, C): one token sequence per pixel position, for a standard transformer."""
    B, C = x.shape[:2]
    p = unfold_patches(x, patch)  # (B, C, P, N)
    return p.permute(0, 2, 3, 1).reshape(B * p.shape[2], p.shape[3], C)  # (B, P, N, C) -> (B*P, N, C)


def fold_tokens(x: Tensor, grid: tuple[int, int], patch: tuple[int, int]) -> Tensor:
    """(B*P, N, C) -> (B, C, H, W); the inverse of :func:`unfold_tokens`."""
    P, N, C = patch[0] * patch[1], grid[0] * grid[1], x.shape[-1]
    B = x.shape[0] // P
    return fold_patches(x.reshape(B, P, N, C).permute(0, 3, 1, 2), grid, patch)  # via (B, C, P, N)
