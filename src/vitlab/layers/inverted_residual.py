"""MobileNetV2's inverted residual (Sandler et al. 2018, arXiv:1801.04381): expand with a 1x1 convolution,
filter with a depthwise 3x3, project back linearly with a 1x1; identity shortcut when shapes allow."""

from __future__ import annotations

from torch import Tensor, nn

from vitlab.layers.conv_norm_act import ConvNormAct
from vitlab.layers.drop_path import DropPath
from vitlab.layers.helpers import make_divisible


class InvertedResidual(nn.Module):
    """Args:
    expand_ratio: width of the depthwise stage relative to ``in_chs`` (rounded to a multiple of 8).
    drop_path: stochastic-depth probability of the residual branch (only with a shortcut).
    """

    def __init__(self, in_chs: int, out_chs: int, *, stride: int = 1, expand_ratio: float = 4.0,
                 act_layer: type[nn.Module] = nn.SiLU, drop_path: float = 0.0) -> None:
        super().__init__()
        mid = make_divisible(in_chs * expand_ratio)
        self.conv1_1x1 = ConvNormAct(in_chs, mid, 1, act_layer=act_layer)
        self.conv2_kxk = ConvNormAct(mid, mid, 3, stride=stride, groups=mid, act_layer=act_layer)
        self.conv3_1x1 = ConvNormAct(mid, out_chs, 1, act_layer=None)
        self.has_shortcut = stride == 1 and in_chs == out_chs
        self.drop_path = DropPath(drop_path) if drop_path > 0 and self.has_shortcut else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv3_1x1(self.conv2_kxk(self.conv1_1x1(x)))
        return x + self.drop_path(y) if self.has_shortcut else y
