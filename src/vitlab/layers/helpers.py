"""Small shared helpers for the layers package."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def to_2tuple(x: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(x, int):
        return (x, x)
    # symbolic sizes (torch.SymInt, while an exporter traces any size) must stay symbolic: int() would fix them
    t = tuple(v if isinstance(v, (int, torch.SymInt)) else int(v) for v in x)
    if len(t) != 2:
        raise ValueError(f"expected an int or a pair of ints, got {x!r}")
    return t  # type: ignore[return-value]


def make_divisible(v: float, divisor: int = 8, *, min_value: int | None = None, round_limit: float = 0.9) -> int:
    """``v`` rounded to the nearest multiple of ``divisor`` (MobileNet's channel rule): never below
    ``min_value`` (default ``divisor``) and never more than 10% below ``v``."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


def trunc_normal_linears(module: nn.Module, *, std: float = 0.02, skip: nn.Module | None = None) -> None:
    """The DeiT-style initialisation of every ``nn.Linear`` in ``module`` (``module.modules()`` order, so a
    seeded model draws the same numbers as the loop it replaces): truncated normal weights, zero biases.
    ``skip``: a Linear left as it is (Swin's head)."""
    for m in module.modules():
        if isinstance(m, nn.Linear) and m is not skip:
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def linear_with_bias(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``layer`` (a Linear without a bias of its own) applied to ``x`` with ``bias`` (BEiT's and Swin v2's
    q / v biases beside a bias-free k). A dynamically quantised layer (``torch.ao``, the int8 runtime) has no
    weight tensor to hand to ``F.linear``: it runs itself and the bias is added after."""
    weight = getattr(layer, "weight", None)
    if isinstance(weight, torch.Tensor):
        return torch.nn.functional.linear(x, weight, bias)
    out = layer(x)
    return out if bias is None else out + bias.to(out.dtype)
