"""Per-step learning-rate schedules: linear warm-up, then cosine or linear decay to a floor."""

from __future__ import annotations

import math
from typing import Literal

import torch


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, kind: Literal["cosine", "linear", "constant"],
              min_factor: float = 0.0) -> float:
    """Multiplier of the peak learning rate used for optimiser step ``step`` (0-based).

    Warm-up climbs linearly to 1.0 at ``step == warmup_steps - 1``; the decay then reaches ``min_factor``
    at ``step == total_steps``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if kind == "cosine":
        return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "linear":
        return min_factor + (1.0 - min_factor) * (1.0 - progress)
    raise ValueError(f"unknown schedule {kind!r}; choose cosine, linear or constant")


def build_scheduler(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int,
                    kind: Literal["cosine", "linear", "constant"], peak_lr: float,
                    min_lr: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per optimiser step; each group keeps its own ``lr_scale``."""
    if min_lr > peak_lr:
        raise ValueError(f"min_lr={min_lr} is above the peak learning rate {peak_lr}")
    min_factor = min_lr / peak_lr

    def fn(step: int) -> float:
        return lr_factor(step, total_steps=total_steps, warmup_steps=warmup_steps, kind=kind, min_factor=min_factor)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
