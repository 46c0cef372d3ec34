"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021, arXiv:2106.09685), on a Linear layer.

The pretrained weight W (out x in) stays frozen; the layer learns a low-rank update B A (B: out x r, A: r x in)
and computes ``W x + b + (alpha / r) B A dropout(x)``. A is initialised as ``nn.Linear`` initialises its weight
(Kaiming-uniform, a = sqrt(5), as the paper's loralib does) and B to zero, so the adapted layer starts as the
pretrained one. After training, ``W + (alpha / r) B A`` (:func:`merged_weight`) is a plain Linear's weight: the
adapter costs nothing at inference.

The pretrained layer is kept as a child (``base``) and the update is added to its output, never folded into a
weight tensor during training: the gradient of W (out x in) is then never formed, only those of A and B. The
module has no ``weight`` of its own on purpose: code that hands a layer's weight to ``F.linear`` with a bias of its
own (BEiT's and Swin v2's q / v biases, :func:`vitlab.layers.helpers.linear_with_bias`) runs the layer itself
instead, adapter included.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LoRALinear(nn.Module):
    """``base(x) + scaling * B A dropout(x)``, with ``base`` frozen and ``scaling = alpha / rank``.

    Args:
        base: the pretrained Linear (its parameters are frozen here).
        rank: r, the rank of the update (>= 1).
        alpha: the update is scaled by alpha / r, so that changing r leaves the initial learning-rate scale alone.
        dropout: dropout on the adapter's input (training only); the pretrained path never sees it.
        generator: the random generator A is drawn from (a run seeds its own: the model's weights do not depend on
            what the global generator drew before).
    """

    def __init__(self, base: nn.Linear, *, rank: int, alpha: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRALinear: rank must be >= 1, got {rank}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.rank = rank
        self.alpha = float(alpha)
        self.scaling = self.alpha / rank
        w = base.weight
        a = torch.empty(rank, base.in_features)  # drawn on the CPU: the same numbers on any device
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_a = nn.Parameter(a.to(device=w.device, dtype=w.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: Tensor) -> Tensor:
        # (..., in) -> (..., r) -> (..., out); scaled at rank r, the smallest tensor of the three (an in-place add
        # into the base's output measured slower on the CPU: autograd copies the view it writes to)
        update = F.linear(F.linear(self.dropout(x), self.lora_a) * self.scaling, self.lora_b)
        return self.base(x) + update

    def merged(self) -> nn.Linear:
        """A plain Linear computing what this layer computes (without dropout): weight W + scaling * B A."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None,
                        device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(merged_weight(self.base.weight, self.lora_a, self.lora_b, self.scaling))
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"


def merged_weight(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float) -> Tensor:
    """W + scaling * B A, in float32 at least (a bfloat16 W is rounded once, at the end)."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    delta = lora_b.detach().to(dtype) @ lora_a.detach().to(dtype)  # (out, r) @ (r, in) -> (out, in)
    return (weight.detach().to(dtype) + delta * scaling).to(weight.dtype)
