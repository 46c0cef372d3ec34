"""Detection on the engine: DETR's set loss as an :class:`~vitlab.train.objective.Objective`, and COCO
evaluation of a detector on a :class:`~vitlab.data.dense.CocoDetection` data set."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from vitlab.tasks.boxes import xyxy_to_xywh
from vitlab.tasks.metrics import coco_map, detections_from_outputs
from vitlab.tasks.set_loss import SetCriterion
from vitlab.train.objective import Metrics, Objective, StepBatches


def _targets_on(targets: list[dict[str, Any]], device: torch.device) -> list[dict[str, Tensor]]:
    return [{"labels": t["labels"].to(device), "boxes": t["boxes"].to(device)} for t in targets]


class DetectionObjective(Objective):
    """``batch`` = (images, pixel_mask, targets) as :func:`vitlab.data.dense.pad_batch` makes it; the loss
    is :class:`SetCriterion` (matching, no-object weight, batch-wide normalisation, auxiliary layers).

    Labels matter, but the engine's classification checks and validation do not apply (``supervised``
    is False); evaluate with :func:`evaluate_detection`.

    Under the trainer the loss's denominators (target boxes, the cross entropy's weight) are those of the
    step's whole global batch (:meth:`begin_step`), so accumulation and DDP equal one batch."""

    name = "detection"

    def __init__(self, num_classes: int, *, eos_coef: float = 0.1, aux: bool = True) -> None:
        self.criterion = SetCriterion(num_classes, eos_coef=eos_coef, aux=aux)
        self.num_queries: int | None = None
        self._normalisers: tuple[float, float] | None = None

    def setup(self, model: nn.Module, *, steps_per_epoch: int, total_steps: int) -> None:
        super().setup(model, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
        self.num_queries = getattr(getattr(model, "cfg", None), "num_queries", None)

    def begin_step(self, batches: StepBatches) -> None:
        if self.num_queries is None:  # a model that does not say: each micro-batch normalises by its own
            return
        counts = [0.0, 0.0]
        for _, _, targets in batches.micro_batches:
            for i, n in enumerate(self.criterion.counts(targets, self.num_queries)):
                counts[i] += n
        # at least one box (DETR's clamp); the cross entropy's weight only above zero (eos_coef 0 and no box)
        num_boxes, class_weight = batches.normaliser(counts, minimum=[1.0, 1e-12])
        self._normalisers = (num_boxes, class_weight)

    def end_step(self) -> None:
        self._normalisers = None

    def modules(self) -> dict[str, nn.Module]:
        return {}  # the criterion holds only a constant buffer

    def to(self, device: torch.device | str) -> Objective:
        self.criterion.to(device)
        return self

    def step(self, model: nn.Module, batch: Any) -> tuple[Tensor, Metrics]:
        images, pixel_mask, targets = batch
        out = model(images, pixel_mask)
        norm = self._normalisers if self.num_queries == out["logits"].shape[1] else None
        loss, parts = self.criterion(out, _targets_on(targets, images.device), normalisers=norm)
        keep = ("loss_ce", "loss_bbox", "loss_giou", "cardinality_error")
        return loss, {k: parts[k].detach() for k in keep}

    def describe(self) -> str:
        return f"detection (DETR set loss, {self.criterion.num_classes} classes)"


@torch.no_grad()
def predict_detections(model: nn.Module, images: Tensor, pixel_mask: Tensor | None, sizes: list[tuple[int, int]],
                       *, threshold: float = 0.0) -> list[dict[str, Tensor]]:
    """Boxes (xyxy pixels of images of ``sizes``), labels and scores per image."""
    out = model(images, pixel_mask)
    return detections_from_outputs(out["logits"], out["boxes"], sizes, threshold=threshold)


@torch.no_grad()
def evaluate_detection(model: nn.Module, dataset: Dataset, *, batch_size: int = 8,
                       device: torch.device | str = "cpu", amp: str = "none") -> dict[str, float]:
    """COCO AP / AP50 / AP75 of ``model`` on a CocoDetection data set (boxes in original pixels); ``amp``:
    autocast ("bf16", "fp16"). Images a ``skip_bad_images`` data set skipped are left out."""
    from vitlab.train.evaluate import autocast_context

    device = torch.device(device)
    model.eval().to(device)
    collate = getattr(dataset, "collate", None)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    base = getattr(dataset, "dataset", dataset)
    cat_ids = getattr(base, "cat_ids", None)
    gts, dets = [], []
    for batch in loader:
        if batch is None:  # every image of it was skipped
            continue
        images, mask, targets = batch
        sizes = [tuple(t["orig_size"]) for t in targets]
        # boxes are predicted relative to the transformed, unpadded image: map them to the original
        with autocast_context(device, amp):
            preds = predict_detections(model, images.to(device), mask.to(device), sizes)
        for t, p in zip(targets, preds):
            iid = int(t["image_id"])
            H, W = t["orig_size"]
            # ground truth in original pixels: the transform's normalised boxes scaled back
            b = t["boxes"]
            xyxy = torch.stack([(b[:, 0] - b[:, 2] / 2) * W, (b[:, 1] - b[:, 3] / 2) * H,
                                (b[:, 0] + b[:, 2] / 2) * W, (b[:, 1] + b[:, 3] / 2) * H], dim=1)
            for box, label in zip(xyxy_to_xywh(xyxy).tolist(), t["labels"].tolist()):
                gts.append({"image_id": iid, "category_id": cat_ids[label] if cat_ids else label, "bbox": box})
            for xyxy_crowd, label in getattr(base, "crowd", {}).get(iid, []):  # original pixels already
                x0, y0, x1, y1 = xyxy_crowd
                gts.append({"image_id": iid, "category_id": cat_ids[label] if cat_ids else label,
                            "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 1})
            for box, label, score in zip(xyxy_to_xywh(p["boxes"]).tolist(), p["labels"].tolist(),
                                         p["scores"].tolist()):
                dets.append({"image_id": iid, "category_id": cat_ids[label] if cat_ids else label, "bbox": box,
                             "score": score})
    return coco_map(gts, dets)


__all__ = ["DetectionObjective", "evaluate_detection", "predict_detections"]
