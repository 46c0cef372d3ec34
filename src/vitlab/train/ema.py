"""Exponential moving average of a model's weights (Polyak averaging), as DeiT trains with."""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA(nn.Module):
    """``ema = decay * ema + (1 - decay) * weights`` after every optimiser step, for the parameters and the
    floating-point buffers (BatchNorm running statistics) alike, as timm's ModelEmaV3 by default; integer
    buffers (``num_batches_tracked``) are copied.

    The average lives in a frozen copy of the model (``self.module``), usable for evaluation and export.
    """

    def __init__(self, model: nn.Module, *, decay: float) -> None:
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ModelEMA: decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_sd = self.module.state_dict()
        for name, value in model.state_dict().items():
            target = ema_sd[name]
            if value.dtype.is_floating_point:
                target.lerp_(value.detach().to(target.dtype), 1.0 - self.decay)  # ema + (1-d)(w - ema)
            else:
                target.copy_(value)
