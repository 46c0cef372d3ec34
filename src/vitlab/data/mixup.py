"""Mixup (Zhang et al., arXiv:1710.09412) and CutMix (Yun et al., arXiv:1905.04899) on a batch, with label
smoothing, producing soft targets (B, K) whose rows sum to one; multi-hot (multi-label) rows are smoothed alike
(``(1 - s) y + s / K``, timm's BinaryCrossEntropy smoothing) and mixed by the same lambda, as timm's Mixup mixes them.

Each batch is paired with its reverse (sample i with sample B-1-i), as DeiT/timm do, so no second batch
is needed. CutMix's label weight is recomputed from the box actually pasted after clipping it to the
image, so the targets match the pixels.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from vitlab.data.functional import PicklableGenerator, Rng


def one_hot_smooth(y: Tensor, num_classes: int, smoothing: float = 0.0) -> Tensor:
    """One-hot (B, K) float targets with label smoothing: ``1 - s + s/K`` on the label, ``s/K`` elsewhere."""
    y = torch.as_tensor(y).long()
    off = smoothing / num_classes
    out = torch.full((y.shape[0], num_classes), off, dtype=torch.float32, device=y.device)
    return out.scatter_(1, y.view(-1, 1), 1.0 - smoothing + off)


class Mixup(PicklableGenerator):
    """Batch-level Mixup / CutMix with label smoothing.

    Args:
        num_classes: K of the soft targets.
        mixup_alpha, cutmix_alpha: Beta(alpha, alpha) concentration; 0 disables that method.
        prob: probability of mixing a batch at all (otherwise only label smoothing).
        switch_prob: probability of CutMix instead of Mixup when both are enabled.
        label_smoothing: smoothing applied to both targets before mixing.
        generator: explicit random source (None -> global torch RNG).
    """

    def __init__(self, *, num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 prob: float = 1.0, switch_prob: float = 0.5, label_smoothing: float = 0.1,
                 generator: torch.Generator | None = None) -> None:
        self.num_classes = int(num_classes)
        self.mixup_alpha, self.cutmix_alpha = float(mixup_alpha), float(cutmix_alpha)
        self.prob, self.switch_prob = float(prob), float(switch_prob)
        self.label_smoothing = float(label_smoothing)
        self.generator = generator
        self.last_lam: float = 1.0  # label weight of the un-flipped batch in the last call (for tests/logs)
        self.last_mode: str = "none"

    def _beta(self, alpha: float, rng: Rng) -> float:
        # torch's Beta sampler takes no generator; draw a seed from ours for numpy's, so the result
        # still follows the explicit random source.
        seed = rng.randint(0, 2**31 - 1)
        return float(np.random.default_rng(seed).beta(alpha, alpha))

    def _params(self, rng: Rng) -> tuple[str, float]:
        if rng.random() >= self.prob:
            return "none", 1.0
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = rng.random() < self.switch_prob
        elif self.cutmix_alpha > 0:
            use_cutmix = True
        elif self.mixup_alpha > 0:
            use_cutmix = False
        else:
            return "none", 1.0
        if use_cutmix:
            return "cutmix", self._beta(self.cutmix_alpha, rng)
        return "mixup", self._beta(self.mixup_alpha, rng)

    @staticmethod
    def cutmix_box(h: int, w: int, lam: float, rng: Rng) -> tuple[int, int, int, int]:
        """(y0, y1, x0, x1) of a box of area ~(1 - lam) * H * W at a uniform centre, clipped to the image."""
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = rng.randint(0, h), rng.randint(0, w)
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        return y0, y1, x0, x1

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, C, H, W) float, y: (B,) labels or float (B, K) targets (one-hot, soft or multi-hot: smoothed
        as one-hot ones, ``(1 - s) y + s / K``, then mixed as given) -> (mixed x, soft targets (B, K))."""
        rng = Rng(self.generator)
        y = torch.as_tensor(y)
        if y.is_floating_point():
            if y.ndim != 2 or y.shape[1] != self.num_classes:
                raise ValueError(f"Mixup: float targets of shape {tuple(y.shape)}; expected int class indices (B,) "
                                 f"or float (B, K) = (B, {self.num_classes}) targets")
            # in float64, so that one-hot rows give exactly one_hot_smooth's values
            s = self.label_smoothing
            targets = (y.double() * (1.0 - s) + s / self.num_classes).float().to(x.device)
        else:
            targets = one_hot_smooth(y, self.num_classes, self.label_smoothing).to(x.device)
        mode, lam = self._params(rng)
        if mode == "mixup":
            x = x * lam + x.flip(0) * (1.0 - lam)
        elif mode == "cutmix":
            h, w = x.shape[-2:]
            y0, y1, x0, x1 = self.cutmix_box(h, w, lam, rng)
            x = x.clone()
            x[..., y0:y1, x0:x1] = x.flip(0)[..., y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)  # the area actually pasted
        self.last_mode, self.last_lam = mode, lam
        if mode != "none":
            targets = targets * lam + targets.flip(0) * (1.0 - lam)
        return x, targets
