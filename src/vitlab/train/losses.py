"""Classification losses: cross entropy on soft targets (Mixup/CutMix), binary cross entropy on multi-hot targets
(multi-label), and a uniform signature."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SoftTargetCrossEntropy(nn.Module):
    """Cross entropy against a probability vector per sample (Mixup/CutMix labels, smoothing included)."""

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


class ClassificationLoss(nn.Module):
    """``loss(images, outputs, targets)``: the signature the trainer calls, shared with distillation.

    ``targets`` are class indices or (B, K) class probabilities, label smoothing applied here to both alike
    (``(1 - s) y + s / K``), except to targets made by Mixup (``mixed_targets``: ``ClassificationObjective`` sets it
    when it mixes, as Mixup/CutMix smooth the targets they make).
    A tuple of outputs (a distilled DeiT's class and distillation heads) is averaged for the plain loss.
    """

    def __init__(self, *, label_smoothing: float = 0.0, mixed_targets: bool = False) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing
        self.mixed_targets = mixed_targets
        self.soft = SoftTargetCrossEntropy()

    def base(self, logits: Tensor, targets: Tensor) -> Tensor:
        if targets.ndim == 2:
            if not self.mixed_targets and self.label_smoothing:
                targets = targets.float() * (1.0 - self.label_smoothing) + self.label_smoothing / targets.shape[-1]
            return self.soft(logits, targets)
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)

    def forward(self, images: Tensor, outputs: Tensor | tuple[Tensor, Tensor], targets: Tensor) -> Tensor:
        if isinstance(outputs, tuple):
            return sum(self.base(o, targets) for o in outputs) / len(outputs)
        return self.base(outputs, targets)


class MultiLabelLoss(ClassificationLoss):
    """Binary cross entropy with logits on multi-hot (B, K) targets, the mean over batch x labels (torch's default
    reduction; Hugging Face's ``problem_type="multi_label_classification"``).

    Label smoothing as timm's ``BinaryCrossEntropy``: a target 1 becomes ``1 - s + s/K``, a 0 becomes ``s/K``, i.e.
    ``(1 - s) y + s / K`` (not applied again to targets Mixup made, which smooths them alike). Class indices (B,) are
    taken as one-hot rows, as timm does."""

    def base(self, logits: Tensor, targets: Tensor) -> Tensor:
        logits = logits.float()
        if not targets.is_floating_point() and targets.ndim == 1:
            targets = F.one_hot(targets.long(), logits.shape[-1])
        if targets.shape != logits.shape:
            raise ValueError(f"multi-label loss: targets of shape {tuple(targets.shape)} for logits of shape "
                             f"{tuple(logits.shape)}; expected multi-hot (B, K) rows")
        targets = targets.float()
        if not self.mixed_targets and self.label_smoothing:
            targets = targets * (1.0 - self.label_smoothing) + self.label_smoothing / targets.shape[-1]
        return F.binary_cross_entropy_with_logits(logits, targets)
