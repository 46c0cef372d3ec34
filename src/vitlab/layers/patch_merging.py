"""Patch merging (Swin): halve a (B, H, W, C) token map by concatenating each 2 x 2 neighbourhood.

The four sub-grids are concatenated in the order (0, 0), (1, 0), (0, 1), (1, 1) - (row offset,
column offset), the row offset varying fastest - as in the reference code, so that its weights apply.
v1 normalises the 4C vector then reduces it (bias-free Linear 4C -> 2C); v2 reduces first and
normalises the 2C result. Odd sizes are padded with zeros at the bottom / right.
"""

from __future__ import annotations

from functools import partial

import torch.nn.functional as F
from torch import Tensor, nn

from vitlab.layers.tracing import is_tracing_any_size


def merge_2x2(x: Tensor) -> Tensor:
    """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 4C) in the order (0,0), (1,0), (0,1), (1,1)."""
    B, H, W, C = x.shape
    h, w = (H + 1) // 2, (W + 1) // 2  # the merged map (ceil-divisions keep symbolic sizes simple)
    if is_tracing_any_size() or 2 * h != H or 2 * w != W:  # symbolic sizes: always pad (by 0 where even)
        x = F.pad(x, (0, 0, 0, 2 * w - W, 0, 2 * h - H))
    # (B, h, dy, w, dx, C) -> (B, h, w, dx, dy, C): dy varies fastest in the flattened 4C
    return x.reshape(B, h, 2, w, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)


class PatchMerging(nn.Module):
    """Args:
    dim: input width C.
    out_dim: output width (default 2C).
    norm_first: v1 order (LayerNorm(4C) -> Linear); False: v2 order (Linear -> LayerNorm(2C)).

    Records ``last_input_size`` = (H, W) of the map it merged on every forward (read by the analysis tools).
    """

    def __init__(self, dim: int, *, out_dim: int | None = None, norm_first: bool = True,
                 norm_layer: type[nn.Module] | partial = nn.LayerNorm) -> None:
        super().__init__()
        self.out_dim = out_dim or 2 * dim
        self.norm_first = norm_first
        self.last_input_size: tuple[int, int] | None = None
        if norm_first:
            self.norm = norm_layer(4 * dim)
            self.reduction = nn.Linear(4 * dim, self.out_dim, bias=False)
        else:
            self.reduction = nn.Linear(4 * dim, self.out_dim, bias=False)
            self.norm = norm_layer(self.out_dim)

    def forward(self, x: Tensor) -> Tensor:
        if not is_tracing_any_size():  # int() would fix a symbolic size to the traced one
            self.last_input_size = (int(x.shape[1]), int(x.shape[2]))
        x = merge_2x2(x)
        if self.norm_first:
            return self.reduction(self.norm(x))
        return self.norm(self.reduction(x))
