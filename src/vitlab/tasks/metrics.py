"""Detection and segmentation metrics.

* :func:`coco_map`: COCO box AP as pycocotools computes it for the "all" area range and 100
  detections per image: per category and IoU threshold (0.50:0.05:0.95), detections matched greedily
  by score to the unmatched ground truth of highest IoU (crowd boxes are "ignore" regions), precision
  made monotone and sampled at 101 recall points, then averaged over categories that have ground
  truth. Checked against pycocotools on committed fixtures (tests/test_detection_metrics.py).
* :class:`SegmentationMeter`: a confusion matrix giving mean IoU (over classes present in the
  labels or predictions) and pixel accuracy, ignoring ``ignore_index`` pixels.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import torch
from torch import Tensor

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


def _iou_xywh(d: np.ndarray, g: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """IoU (D, G) of xywh boxes; for a crowd ground truth the union is the detection's area."""
    if len(d) == 0 or len(g) == 0:
        return np.zeros((len(d), len(g)))
    dx1, dy1 = d[:, 0] + d[:, 2], d[:, 1] + d[:, 3]
    gx1, gy1 = g[:, 0] + g[:, 2], g[:, 1] + g[:, 3]
    iw = (np.minimum(dx1[:, None], gx1[None]) - np.maximum(d[:, None, 0], g[None, :, 0])).clip(min=0)
    ih = (np.minimum(dy1[:, None], gy1[None]) - np.maximum(d[:, None, 1], g[None, :, 1])).clip(min=0)
    inter = iw * ih
    da, ga = d[:, 2] * d[:, 3], g[:, 2] * g[:, 3]
    union = np.where(crowd[None, :], da[:, None], da[:, None] + ga[None, :] - inter)
    return inter / union


def coco_map(ground_truth: list[dict[str, Any]], detections: list[dict[str, Any]], *,
             max_dets: int = 100) -> dict[str, float]:
    """COCO AP@[.5:.95], AP50 and AP75 of box ``detections`` against ``ground_truth``.

    Both are COCO-style lists of dicts: ground truth ``{"image_id", "category_id", "bbox": [x, y, w, h],
    "iscrowd" (optional)}``; detections ``{"image_id", "category_id", "bbox", "score"}``. Returns
    ``{"AP", "AP50", "AP75"}`` (-1 when no category has ground truth).
    """
    gts: dict[tuple[int, int], list[dict]] = defaultdict(list)
    dts: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for g in ground_truth:
        gts[int(g["image_id"]), int(g["category_id"])].append(g)
    for d in detections:
        dts[int(d["image_id"]), int(d["category_id"])].append(d)
    cats = sorted({c for _, c in gts} | {c for _, c in dts})
    images = sorted({i for i, _ in gts} | {i for i, _ in dts})
    T, R = len(IOU_THRESHOLDS), len(RECALL_POINTS)
    precision = -np.ones((T, R, len(cats)))
    for k, cat in enumerate(cats):
        scores, matched, ignored, n_gt = [], [], [], 0
        for img in images:
            g, d = gts.get((img, cat), []), dts.get((img, cat), [])
            crowd = np.array([bool(x.get("iscrowd", 0)) for x in g], dtype=bool)
            g_order = np.argsort(crowd, kind="mergesort")  # ignored ground truth last
            g = [g[i] for i in g_order]
            crowd = crowd[g_order]
            d = sorted(d, key=lambda x: -x["score"])[:max_dets]  # stable, as numpy's mergesort
            n_gt += int((~crowd).sum())
            if not d:
                continue
            ious = _iou_xywh(np.array([x["bbox"] for x in d], dtype=float).reshape(-1, 4),
                             np.array([x["bbox"] for x in g], dtype=float).reshape(-1, 4), crowd)
            dt_m = np.zeros((T, len(d)), dtype=bool)
            dt_ig = np.zeros((T, len(d)), dtype=bool)
            for t, thr in enumerate(IOU_THRESHOLDS):
                gt_m = np.zeros(len(g), dtype=bool)
                for di in range(len(d)):
                    best, m = min(thr, 1 - 1e-10), -1
                    for gi in range(len(g)):
                        if gt_m[gi] and not crowd[gi]:
                            continue
                        if m > -1 and not crowd[m] and crowd[gi]:
                            break  # the rest are ignore regions; a real match was found
                        if ious[di, gi] < best:
                            continue
                        best, m = ious[di, gi], gi
                    if m == -1:
                        continue
                    dt_ig[t, di] = crowd[m]
                    dt_m[t, di] = True
                    gt_m[m] = True
            scores.append(np.array([x["score"] for x in d]))
            matched.append(dt_m)
            ignored.append(dt_ig)
        if n_gt == 0:
            continue
        if not scores:
            precision[:, :, k] = 0
            continue
        s = np.concatenate(scores)
        order = np.argsort(-s, kind="mergesort")
        dm, di = np.concatenate(matched, axis=1)[:, order], np.concatenate(ignored, axis=1)[:, order]
        tps = np.cumsum(dm & ~di, axis=1).astype(float)
        fps = np.cumsum(~dm & ~di, axis=1).astype(float)
        for t in range(T):
            tp, fp = tps[t], fps[t]
            rc = tp / n_gt
            pr = tp / (fp + tp + np.spacing(1))
            pr = pr.tolist()
            for i in range(len(pr) - 1, 0, -1):
                pr[i - 1] = max(pr[i - 1], pr[i])
            idx = np.searchsorted(rc, RECALL_POINTS, side="left")
            q = np.zeros(R)
            for ri, pi in enumerate(idx):
                if pi < len(pr):
                    q[ri] = pr[pi]
            precision[t, :, k] = q

    def mean(p: np.ndarray) -> float:
        v = p[p > -1]
        return float(v.mean()) if v.size else -1.0

    return {"AP": mean(precision), "AP50": mean(precision[0]), "AP75": mean(precision[5])}


def detections_from_outputs(logits: Tensor, boxes: Tensor, sizes: list[tuple[int, int]], *,
                            threshold: float = 0.0) -> list[dict[str, Tensor]]:
    """DETR's post-processing: per image, each query's best real class, its probability as the score,
    and its box in pixels (xyxy) of an image of ``sizes[i]`` = (H, W). Queries scoring below
    ``threshold`` are dropped."""
    from vitlab.tasks.boxes import cxcywh_to_xyxy

    prob = logits.float().softmax(-1)[..., :-1]
    scores, labels = prob.max(-1)
    out = []
    for i, (h, w) in enumerate(sizes):
        b = cxcywh_to_xyxy(boxes[i].float()) * torch.tensor([w, h, w, h], dtype=torch.float32, device=boxes.device)
        keep = scores[i] >= threshold
        out.append({"scores": scores[i][keep], "labels": labels[i][keep], "boxes": b[keep]})
    return out


class SegmentationMeter:
    """Accumulate a confusion matrix; ``summary()`` gives ``mIoU``, ``pixel_acc`` (None when no pixel was
    labelled) and per-class IoU."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: Tensor, target: Tensor) -> None:
        """``pred`` and ``target``: class indices of the same shape."""
        keep = target != self.ignore_index
        t, p = target[keep].long().cpu(), pred[keep].long().cpu()
        K = self.num_classes
        self.confusion += torch.bincount(t * K + p, minlength=K * K).reshape(K, K)

    def summary(self) -> dict[str, Any]:
        c = self.confusion.double()
        tp = c.diag()
        union = c.sum(0) + c.sum(1) - tp
        present = union > 0
        iou = tp / union.clamp(min=1)
        # a class in neither labels nor predictions has no IoU: None (JSON's null; NaN is not valid JSON); with no
        # labelled pixel at all (every target the ignore index) there is nothing to score: None, not 0.0
        labelled = bool(c.sum() > 0)
        return {"mIoU": float(iou[present].mean()) if labelled else None,
                "pixel_acc": float(tp.sum() / c.sum()) if labelled else None,
                "iou": [float(v) if ok else None for v, ok in zip(iou.tolist(), present.tolist())]}


__all__ = ["SegmentationMeter", "coco_map", "detections_from_outputs"]
