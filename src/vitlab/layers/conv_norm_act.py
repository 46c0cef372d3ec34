"""Convolution -> batch norm -> activation, the unit every convolutional stage is made of."""

from __future__ import annotations

from torch import Tensor, nn


class ConvNormAct(nn.Module):
    """``act(bn(conv(x)))`` with a bias-free convolution and "same" padding for odd kernels.

    Args:
        groups: 1 for a full convolution, ``in_chs`` for a depthwise one.
        act_layer: activation class, or None for a linear output (conv + BN only).
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 1,
        *,
        stride: int = 1,
        groups: int = 1,
        act_layer: type[nn.Module] | None = nn.SiLU,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride=stride, padding=kernel_size // 2,
                              groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        self.act = _inplace(act_layer) if act_layer is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


def _inplace(act_layer: type[nn.Module]) -> nn.Module:
    """The activation working in place where it can: the norm's output is fresh, and on the CPU every
    allocation of a large map costs page faults (measured: 20% of MobileViT's forward at batch 8)."""
    try:
        return act_layer(inplace=True)
    except TypeError:
        return act_layer()
