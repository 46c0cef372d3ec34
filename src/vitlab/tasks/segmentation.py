"""Segmentation on the engine: SETR's cross entropy with auxiliary heads as an
:class:`~vitlab.train.objective.Objective`, and mean IoU / pixel accuracy evaluation."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from vitlab.models.setr import segmentation_loss
from vitlab.tasks.metrics import SegmentationMeter
from vitlab.train.objective import Metrics, Objective, StepBatches


class SegmentationObjective(Objective):
    """``batch`` = (images, masks); loss = CE(main) + aux_weight x CE(each auxiliary head), each a mean over the
    labelled pixels; under the trainer, over those of the step's whole global batch (:meth:`begin_step`), so
    that accumulation and DDP equal one batch, and a micro-batch without a labelled pixel adds nothing."""

    name = "segmentation"

    def __init__(self, *, aux_weight: float = 0.4, ignore_index: int = 255) -> None:
        self.aux_weight, self.ignore_index = aux_weight, ignore_index
        self._normaliser: float | None = None

    def begin_step(self, batches: StepBatches) -> None:
        labelled = sum(float((masks != self.ignore_index).sum()) for _, masks in batches.micro_batches)
        (self._normaliser,) = batches.normaliser([labelled])

    def end_step(self) -> None:
        self._normaliser = None

    def step(self, model: nn.Module, batch: Any) -> tuple[Tensor, Metrics]:
        images, masks = batch
        out = model(images)
        loss, parts = segmentation_loss(out, masks, aux_weight=self.aux_weight, ignore_index=self.ignore_index,
                                        normaliser=self._normaliser)
        return loss, parts

    def describe(self) -> str:
        return f"segmentation (cross entropy, auxiliary heads x {self.aux_weight})"


def collate_eval(batch: list[tuple[Tensor, Tensor] | None]) -> tuple[Tensor, list[Tensor]] | None:
    """(images stacked, masks as a list): evaluation masks keep each image's own size. Skipped samples
    (``None``) are dropped; a batch of only those is ``None``."""
    kept = [b for b in batch if b is not None]
    if not kept:
        return None
    return torch.stack([image for image, _ in kept]), [mask for _, mask in kept]


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, dataset: Dataset, *, num_classes: int, batch_size: int = 8,
                          ignore_index: int = 255, device: torch.device | str = "cpu",
                          amp: str = "none") -> dict[str, Any]:
    """Mean IoU and pixel accuracy of ``model`` on (image, mask) pairs.

    Each image's logits are upsampled (bilinear) to its mask's size before the argmax, as mmsegmentation and
    Hugging Face score: with masks at their original size (``DenseTransform(resize_mask=False)``, what
    :func:`vitlab.tasks.run.transform_for` gives for evaluation), the score is the one on the user's masks,
    where thin structures are not lost to a resize to the model's input. ``amp``: autocast ("bf16", "fp16")."""
    from vitlab.train.evaluate import autocast_context

    device = torch.device(device)
    model.eval().to(device)
    meter = SegmentationMeter(num_classes, ignore_index)
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_eval):
        if batch is None:
            continue
        images, masks = batch
        with autocast_context(device, amp):
            logits = model(images.to(device))["logits"]  # (B, classes, h, w)
        for lg, mask in zip(logits, masks):
            lg = lg.float()
            if lg.shape[-2:] != mask.shape[-2:]:
                lg = F.interpolate(lg[None], size=tuple(mask.shape[-2:]), mode="bilinear", align_corners=False)[0]
            meter.update(lg.argmax(0), mask.to(device))
    return meter.summary()


__all__ = ["SegmentationObjective", "collate_eval", "evaluate_segmentation"]
