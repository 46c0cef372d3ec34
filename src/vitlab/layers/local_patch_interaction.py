"""Local patch interaction, LPI (El-Nouby et al., 2021, XCiT, arXiv:2106.09681, section 3.2).

XCA mixes channels, never neighbouring patches; LPI adds explicit communication between patches in
3x3 neighbourhoods: depthwise 3x3 conv -> GELU -> BatchNorm -> depthwise 3x3 conv on the token grid.
"""

from __future__ import annotations

from torch import Tensor, nn


class LPI(nn.Module):
    """(B, N, D) tokens on a (rows, cols) grid -> (B, N, D)."""

    def __init__(self, dim: int, *, kernel_size: int = 3, act_layer: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.conv1 = nn.Conv2d(dim, dim, kernel_size, padding=pad, groups=dim)
        self.act = act_layer()
        self.bn = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size, padding=pad, groups=dim)

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        B, N, C = x.shape
        x = x.transpose(1, 2).reshape(B, C, *grid)  # (B, D, rows, cols)
        x = self.conv2(self.bn(self.act(self.conv1(x))))
        return x.reshape(B, C, N).transpose(1, 2)  # (B, N, D)
