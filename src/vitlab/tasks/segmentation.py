"""Segmentation on the engine: SETR's cross entropy with auxiliary heads as an
:class:`~vitlab.train.objective.Objective`, and mean IoU / pixel accuracy evaluation."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from vitlab.models.setr import segmentation_loss
from vitlab.tasks.metrics import SegmentationMeter
from vitlab.train.objective import Metrics, Objective


class SegmentationObjective(Objective):
    """``batch`` = (images, masks); loss = CE(main) + aux_weight x CE(each auxiliary head)."""

    name = "segmentation"

    def __init__(self, *, aux_weight: float = 0.4, ignore_index: int = 255) -> None:
        self.aux_weight, self.ignore_index = aux_weight, ignore_index

    def step(self, model: nn.Module, batch: Any) -> tuple[Tensor, Metrics]:
        images, masks = batch
        out = model(images)
        loss, parts = segmentation_loss(out, masks, aux_weight=self.aux_weight, ignore_index=self.ignore_index)
        return loss, parts

    def describe(self) -> str:
        return f"segmentation (cross entropy, auxiliary heads x {self.aux_weight})"


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, dataset: Dataset, *, num_classes: int, batch_size: int = 8,
                          ignore_index: int = 255, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Mean IoU and pixel accuracy of ``model`` on (image, mask) pairs."""
    model.eval().to(device)
    meter = SegmentationMeter(num_classes, ignore_index)
    for images, masks in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        pred = model(images.to(device))["logits"].argmax(1)
        meter.update(pred, masks.to(device))
    return meter.summary()


__all__ = ["SegmentationObjective", "evaluate_segmentation"]
