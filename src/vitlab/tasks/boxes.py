"""Box arithmetic for detection: format conversions, areas, IoU and generalised IoU.

Formats: ``cxcywh`` (centre x, centre y, width, height; what DETR predicts, normalised to [0, 1]),
``xyxy`` (corners; what IoU is computed on) and ``xywh`` (COCO's left, top, width, height).
Every function takes boxes in the last dimension (..., 4).
"""

from __future__ import annotations

import torch
from torch import Tensor


def cxcywh_to_xyxy(b: Tensor) -> Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def xyxy_to_cxcywh(b: Tensor) -> Tensor:
    x0, y0, x1, y1 = b.unbind(-1)
    return torch.stack(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0), dim=-1)


def xywh_to_xyxy(b: Tensor) -> Tensor:
    x, y, w, h = b.unbind(-1)
    return torch.stack((x, y, x + w, y + h), dim=-1)


def xyxy_to_xywh(b: Tensor) -> Tensor:
    x0, y0, x1, y1 = b.unbind(-1)
    return torch.stack((x0, y0, x1 - x0, y1 - y0), dim=-1)


def box_area(b: Tensor) -> Tensor:
    """Areas of (..., 4) xyxy boxes."""
    return (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])


def box_iou(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU of xyxy boxes (N, 4) x (M, 4) -> (N, M), and the union areas."""
    area_a, area_b = box_area(a), box_area(b)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / union, union


def generalized_box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise generalised IoU (Rezatofighi et al., 2019) of xyxy boxes: IoU - (hull - union) / hull.

    Degenerate boxes (x1 < x0 or y1 < y0) would give meaningless values, so they are refused.
    """
    if not bool((a[:, 2:] >= a[:, :2]).all()) or not bool((b[:, 2:] >= b[:, :2]).all()):
        raise ValueError("generalized_box_iou: boxes must be xyxy with x1 >= x0 and y1 >= y0")
    iou, union = box_iou(a, b)
    lt = torch.minimum(a[:, None, :2], b[None, :, :2])
    rb = torch.maximum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    hull = wh[..., 0] * wh[..., 1]
    return iou - (hull - union) / hull


__all__ = ["box_area", "box_iou", "cxcywh_to_xyxy", "generalized_box_iou", "xywh_to_xyxy", "xyxy_to_cxcywh",
           "xyxy_to_xywh"]
