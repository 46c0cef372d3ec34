"""Weight-standardised convolution (Qiao et al., 2019), as in BiT and the ViT hybrid's ResNet.

``padding="same"`` pads asymmetrically at run time the way TensorFlow does, so that checkpoints
trained in JAX/TF give the same feature maps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitlab.layers.tracing import is_tracing_any_size


def pad_same(x: Tensor, kernel: int, stride: int, dilation: int = 1, value: float = 0.0) -> Tensor:
    """Pad (B, C, H, W) like TF's 'SAME': output size ceil(in / stride), extra pixel on the bottom/right."""
    # integer ceil-division, and no branch on the sizes while an exporter traces any size (they are
    # symbolic then: math.ceil, max() and any() would fix them to the traced size)
    any_size = is_tracing_any_size()
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad order: last dim first
        total = ((size + stride - 1) // stride - 1) * stride + (kernel - 1) * dilation + 1 - size
        if (kernel - 1) * dilation + 1 < stride:  # only then can the total be negative
            total = torch.sym_max(total, 0) if any_size else max(total, 0)
        pads += [total // 2, total - total // 2]
    if any_size or any(pads):
        x = F.pad(x, pads, value=value)
    return x


class StdConv2d(nn.Conv2d):
    """Conv2d whose weight is standardised per output channel (zero mean, unit variance) on every call."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int | str = "same",
        bias: bool = False,
        eps: float = 1e-8,
    ) -> None:
        self.same = padding == "same"
        super().__init__(in_channels, out_channels, kernel_size, stride=stride,
                         padding=0 if self.same else padding, bias=bias)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if self.same:
            x = pad_same(x, self.kernel_size[0], self.stride[0], self.dilation[0])
        # batch_norm over a (1, C_out, fan_in) view standardises each output filter in one fused call
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                         training=True, momentum=0.0, eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class MaxPool2dSame(nn.MaxPool2d):
    """Max pooling with TF 'SAME' padding (pads with -inf)."""

    def __init__(self, kernel_size: int, stride: int) -> None:
        super().__init__(kernel_size, stride)

    def forward(self, x: Tensor) -> Tensor:
        x = pad_same(x, self.kernel_size, self.stride, value=float("-inf"))
        return F.max_pool2d(x, self.kernel_size, self.stride)
