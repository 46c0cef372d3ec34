"""Classification losses: cross entropy on soft targets (Mixup/CutMix), binary cross entropy on multi-hot targets
(multi-label), and a uniform signature; per-class weights for imbalanced classes (``recipe.class_balance``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SoftTargetCrossEntropy(nn.Module):
    """Cross entropy against a probability vector per sample (Mixup/CutMix labels, smoothing included)."""

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def class_weights(counts: Sequence[int], power: float = 1.0) -> Tensor:
    """Per-class weights of a class-balanced cross entropy from the training images per class ``counts``:
    ``w_c`` proportional to ``n_c ** -power``, scaled so that the mean weight over the training images,
    ``sum_c n_c w_c / N``, is 1 (the loss keeps its scale, and the learning rate its meaning). A class without
    images is weighted as one of a single image (only soft targets, smoothed or mixed, reach it)."""
    n = torch.tensor([float(c) for c in counts], dtype=torch.float64)
    if len(n) == 0 or n.sum() <= 0 or bool((n < 0).any()):
        raise ValueError(f"class_weights: counts {list(counts)} must be non-negative with at least one image")
    w = n.clamp(min=1.0) ** -power
    return (w * n.sum() / (n * w).sum()).float()


def positive_weights(counts: Sequence[int], images: int, power: float = 1.0) -> Tensor:
    """Binary cross entropy's ``pos_weight`` per label of multi-label data: ``(negatives / positives) ** power``,
    from the images that have each label (``counts``) among ``images``; 1 for a label that is on none of them or
    on all (nothing to balance)."""
    pos = torch.tensor([float(c) for c in counts], dtype=torch.float64)
    if bool((pos < 0).any()) or bool((pos > images).any()):
        raise ValueError(f"positive_weights: label counts {list(counts)} must lie in 0..{images} (the images)")
    neg = images - pos
    both = (pos > 0) & (neg > 0)
    return torch.where(both, (neg / pos.clamp(min=1.0)) ** power, torch.ones_like(pos)).float()


class ClassificationLoss(nn.Module):
    """``loss(images, outputs, targets)``: the signature the trainer calls, shared with distillation.

    ``targets`` are class indices or (B, K) class probabilities, label smoothing applied here to both alike
    (``(1 - s) y + s / K``), except to targets made by Mixup (``mixed_targets``: ``ClassificationObjective`` sets it
    when it mixes, as Mixup/CutMix smooth the targets they make).
    A tuple of outputs (a distilled DeiT's class and distillation heads) is averaged for the plain loss.

    ``class_weights`` (K,) (:func:`class_weights`; None: off): each sample's loss is ``-sum_c w_c t_c log p_c``
    over its target distribution t (a class index: ``w_y * -log p_y``), averaged over the batch (divided by B,
    not by the batch's sum of weights, so that accumulation and processes give one process's update).
    """

    def __init__(self, *, label_smoothing: float = 0.0, mixed_targets: bool = False,
                 class_weights: Tensor | None = None) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing
        self.mixed_targets = mixed_targets
        self.soft = SoftTargetCrossEntropy()
        # not saved with the training state: the trainer sets it from the class counts it records
        self.register_buffer("class_weights", class_weights, persistent=False)

    def base(self, logits: Tensor, targets: Tensor) -> Tensor:
        if self.class_weights is not None:
            return self._weighted(logits, targets, self.class_weights)
        if targets.ndim == 2:
            if not self.mixed_targets and self.label_smoothing:
                targets = targets.float() * (1.0 - self.label_smoothing) + self.label_smoothing / targets.shape[-1]
            return self.soft(logits, targets)
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)

    def _weighted(self, logits: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
        logp = F.log_softmax(logits.float(), dim=-1)  # (B, K)
        t = targets.float() if targets.ndim == 2 else F.one_hot(targets.long(), logp.shape[-1]).float()
        if not self.mixed_targets and self.label_smoothing:
            t = t * (1.0 - self.label_smoothing) + self.label_smoothing / t.shape[-1]
        return -(t * weights.to(logp.device) * logp).sum(dim=-1).mean()

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
        """With ``class_weights`` set (here :func:`positive_weights`): binary cross entropy's ``pos_weight``."""
        logits = logits.float()
        if not targets.is_floating_point() and targets.ndim == 1:
            targets = F.one_hot(targets.long(), logits.shape[-1])
        if targets.shape != logits.shape:
            raise ValueError(f"multi-label loss: targets of shape {tuple(targets.shape)} for logits of shape "
                             f"{tuple(logits.shape)}; expected multi-hot (B, K) rows")
        targets = targets.float()
        if not self.mixed_targets and self.label_smoothing:
            targets = targets * (1.0 - self.label_smoothing) + self.label_smoothing / targets.shape[-1]
        if self.class_weights is not None:
            return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=self.class_weights.to(logits.device))
        return F.binary_cross_entropy_with_logits(logits, targets)
