"""DETR's bipartite matching of predictions to ground-truth objects (Carion et al., 2020, section 3.1).

Per image, the cost of giving target ``j`` to query ``i`` is

    w_class * (-p_i(class_j)) + w_l1 * ||b_i - b_j||_1 + w_giou * (-GIoU(b_i, b_j))

(the probability, not its log; boxes in normalised cxcywh, GIoU on their corners), and the assignment
of least total cost comes from the Hungarian algorithm (scipy's ``linear_sum_assignment``, the
optional extra ``vitlab[detection]``). Queries left unassigned are trained towards "no object".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vitlab.tasks.boxes import cxcywh_to_xyxy, generalized_box_iou

Match = tuple[Tensor, Tensor]  # (query indices, target indices), both int64, same length


def linear_sum_assignment(cost: Tensor) -> Match:
    """The minimum-cost assignment of a (queries, targets) cost matrix, rows and columns as int64 tensors."""
    try:
        from scipy.optimize import linear_sum_assignment as lsa
    except ImportError:
        raise ImportError("DETR's Hungarian matching needs scipy: pip install 'vitlab[detection]'") from None
    rows, cols = lsa(cost.detach().cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


@dataclass(frozen=True)
class HungarianMatcher:
    """Args:
    cost_class / cost_bbox / cost_giou: the weights of the three costs (DETR: 1, 5, 2).
    """

    cost_class: float = 1.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0

    def cost_matrix(self, logits: Tensor, boxes: Tensor, labels: Tensor, target_boxes: Tensor) -> Tensor:
        """The (queries, targets) cost of one image: logits (Q, C+1), boxes (Q, 4), labels (T,), target_boxes (T, 4)."""
        prob = logits.float().softmax(-1)
        c_class = -prob[:, labels]
        c_bbox = torch.cdist(boxes.float(), target_boxes.float(), p=1)
        c_giou = -generalized_box_iou(cxcywh_to_xyxy(boxes.float()), cxcywh_to_xyxy(target_boxes.float()))
        return self.cost_bbox * c_bbox + self.cost_class * c_class + self.cost_giou * c_giou

    @torch.no_grad()
    def __call__(self, logits: Tensor, boxes: Tensor, targets: list[dict[str, Tensor]]) -> list[Match]:
        """One match per image: logits (B, Q, C+1), boxes (B, Q, 4) and per-image targets with
        ``labels`` (T,) and ``boxes`` (T, 4) in normalised cxcywh."""
        out = []
        for i, t in enumerate(targets):
            if len(t["labels"]) == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                out.append((empty, empty))
                continue
            out.append(linear_sum_assignment(self.cost_matrix(logits[i], boxes[i], t["labels"], t["boxes"])))
        return out


__all__ = ["HungarianMatcher", "Match", "linear_sum_assignment"]
