"""DETR's set prediction loss (Carion et al., 2020, section 3.1 and appendix A.2).

After Hungarian matching (:mod:`vitlab.tasks.matcher`):

* cross entropy over all queries, unmatched ones towards the extra "no object" class, whose weight is
  ``eos_coef`` (0.1) to balance the many empty queries: a weighted mean, divided by the weights' sum;
* L1 on the matched boxes (normalised cxcywh) and ``1 - GIoU`` on their corners, both summed over the
  matched pairs and divided by the number of target boxes of the whole batch - across processes under
  DDP (the all-reduced count divided by the world size, since DDP averages gradients), at least 1;
* under the trainer (:class:`~vitlab.tasks.detection.DetectionObjective`), both denominators are counted
  over the whole global batch - every micro-batch of a step and every process (:meth:`SetCriterion.counts`)
  - so that gradient accumulation and DDP give the loss of one process with that batch;
* the same three terms on every earlier decoder layer's predictions (the same heads), each with its own
  matching ("auxiliary decoding losses").

Weights: class 1, L1 5, GIoU 2. ``cardinality_error`` (how far the number of non-empty predictions is
from the number of objects) is reported without a gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitlab.tasks.boxes import cxcywh_to_xyxy, generalized_box_iou
from vitlab.tasks.matcher import HungarianMatcher, Match


def num_boxes_across_processes(targets: list[dict[str, Tensor]], device: torch.device) -> float:
    """The loss normaliser: target boxes in the batch of every process, divided by the world size, >= 1."""
    n = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    world = 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(n)
        world = torch.distributed.get_world_size()
    return max(n.item() / world, 1.0)


class SetCriterion(nn.Module):
    """Args:
    num_classes: object classes (the logits have one more, the last, for "no object").
    matcher: the Hungarian matcher (its costs default to DETR's 1 / 5 / 2).
    eos_coef: cross-entropy weight of the no-object class.
    weight_class / weight_bbox / weight_giou: the loss weights (1, 5, 2).
    aux: apply the loss to every decoder layer's predictions (when the model returns them).
    """

    def __init__(self, num_classes: int, *, matcher: HungarianMatcher | None = None, eos_coef: float = 0.1,
                 weight_class: float = 1.0, weight_bbox: float = 5.0, weight_giou: float = 2.0,
                 aux: bool = True) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher or HungarianMatcher()
        self.weights = {"loss_ce": weight_class, "loss_bbox": weight_bbox, "loss_giou": weight_giou}
        self.aux = aux
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    def counts(self, targets: list[dict[str, Tensor]], num_queries: int) -> list[float]:
        """The loss's denominators for a batch of ``targets``, before any prediction: its target boxes, and the
        cross-entropy weight of its queries (each image's ``min(boxes, num_queries)`` matched queries weigh 1,
        the others ``eos_coef``)."""
        boxes = [len(t["labels"]) for t in targets]
        eos = float(self.empty_weight[-1])
        matched = [min(n, num_queries) for n in boxes]
        return [float(sum(boxes)), float(sum(m + (num_queries - m) * eos for m in matched))]

    def layer_losses(self, logits: Tensor, boxes: Tensor, targets: list[dict[str, Tensor]], matches: list[Match],
                     num_boxes: float, class_weight: float | None = None) -> dict[str, Tensor]:
        """The three terms (and the cardinality error) of one decoder layer's predictions; ``class_weight``: the
        cross entropy's denominator (None: the weights' sum over this batch, a weighted mean)."""
        B, Q, _ = logits.shape
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(matches)]).to(logits.device)
        query_idx = torch.cat([src for src, _ in matches]).to(logits.device)
        target_classes = torch.full((B, Q), self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[batch_idx, query_idx] = torch.cat(
            [t["labels"][tgt.to(t["labels"].device)] for t, (_, tgt) in zip(targets, matches)]).to(logits.device)
        # the losses in float32 at least, as the matcher's costs (under bfloat16 autocast the heads' outputs are
        # bfloat16: rounding the targets and the no-object weight 0.1 to them moved the GIoU gradient by 7%)
        dtype = torch.promote_types(logits.dtype, torch.float32)
        if class_weight is None:
            loss_ce = F.cross_entropy(logits.to(dtype).transpose(1, 2), target_classes, self.empty_weight.to(dtype))
        else:
            loss_ce = F.cross_entropy(logits.to(dtype).transpose(1, 2), target_classes, self.empty_weight.to(dtype),
                                      reduction="sum") / class_weight
        src_boxes = boxes[batch_idx, query_idx].to(dtype)
        tgt_boxes = torch.cat([t["boxes"][tgt.to(t["boxes"].device)] for t, (_, tgt) in zip(targets, matches)]
                              ).to(device=boxes.device, dtype=dtype)
        loss_bbox = F.l1_loss(src_boxes, tgt_boxes, reduction="none").sum() / num_boxes
        giou = torch.diag(generalized_box_iou(cxcywh_to_xyxy(src_boxes), cxcywh_to_xyxy(tgt_boxes)))
        loss_giou = (1 - giou).sum() / num_boxes
        with torch.no_grad():
            lengths = torch.tensor([float(len(t["labels"])) for t in targets], device=logits.device)
            card = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1).float()
            card_err = F.l1_loss(card, lengths)
        return {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou, "cardinality_error": card_err}

    def forward(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]], *,
                normalisers: tuple[float, float] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """``outputs``: the model's ``logits`` (B, Q, C+1) and ``boxes`` (B, Q, 4), and optionally
        ``aux_logits`` / ``aux_boxes`` (L-1, B, Q, ...). Returns the weighted total and every term
        (aux terms suffixed ``_0`` .. ``_{L-2}``, as in the reference). ``normalisers``: the denominators of the
        box terms and of the cross entropy, counted by the caller over a larger batch (:meth:`counts`); None:
        this batch's (the box count all-reduced under DDP)."""
        logits, boxes = outputs["logits"], outputs["boxes"]
        if logits.shape[-1] != self.num_classes + 1:
            raise ValueError(f"SetCriterion: logits have {logits.shape[-1]} classes, expected num_classes + 1 = "
                             f"{self.num_classes + 1} (the last is 'no object')")
        for i, t in enumerate(targets):
            if len(t["labels"]) and (int(t["labels"].max()) >= self.num_classes or int(t["labels"].min()) < 0):
                raise ValueError(f"SetCriterion: target {i} has a label outside 0..{self.num_classes - 1}")
        if normalisers is None:
            num_boxes, class_weight = num_boxes_across_processes(targets, logits.device), None
        else:
            num_boxes, class_weight = normalisers
        parts = self.layer_losses(logits, boxes, targets, self.matcher(logits, boxes, targets), num_boxes,
                                  class_weight)
        total = sum(self.weights[k] * parts[k] for k in self.weights)
        if self.aux and "aux_logits" in outputs:
            for j, (lg, bx) in enumerate(zip(outputs["aux_logits"], outputs["aux_boxes"])):
                aux = self.layer_losses(lg, bx, targets, self.matcher(lg, bx, targets), num_boxes, class_weight)
                total = total + sum(self.weights[k] * aux[k] for k in self.weights)
                parts.update({f"{k}_{j}": v for k, v in aux.items()})
        return total, parts


__all__ = ["SetCriterion", "num_boxes_across_processes"]
