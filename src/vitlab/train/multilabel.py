"""Multi-label metrics: mean average precision, F1 and exact match of (N, K) scores against multi-hot targets.

The definitions are scikit-learn's, so that the numbers can be checked against it:

* average precision of a label: ``sum_n (R_n - R_{n-1}) P_n`` over the distinct score thresholds, tied scores
  taken together (``sklearn.metrics.average_precision_score``); mAP is its mean over the labels with at least one
  positive in the evaluated set (a label without one has no defined AP: it is left out, and counted);
* at a threshold (score >= threshold is a predicted label): micro F1 over all (image, label) decisions, macro F1
  the mean of the per-label F1 over the same labels as mAP (``f1_score(average="macro", labels=...,
  zero_division=0)``), exact match the share of images whose predicted label set is their true one
  (``accuracy_score``, subset accuracy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

DEFAULT_THRESHOLD = 0.5


def average_precision(scores: Tensor, targets: Tensor) -> Tensor:
    """Average precision of each column: (N, K) scores and 0/1 targets -> (K,) float64, NaN for a column
    without a positive."""
    scores, targets = scores.double(), (targets > 0.5).double()
    n, k = scores.shape
    out = torch.full((k,), math.nan, dtype=torch.float64)
    for j in range(k):
        positives = targets[:, j].sum()
        if positives == 0:
            continue
        order = torch.argsort(scores[:, j], descending=True, stable=True)
        s, t = scores[order, j], targets[order, j]
        tp, fp = t.cumsum(0), (1 - t).cumsum(0)
        # the last position of each run of tied scores: one threshold per distinct score
        last = torch.ones(n, dtype=torch.bool)
        last[:-1] = s[1:] != s[:-1]
        tp, fp = tp[last], fp[last]
        precision = tp / (tp + fp)
        recall = tp / positives
        gain = torch.diff(recall, prepend=torch.zeros(1, dtype=torch.float64))
        out[j] = (gain * precision).sum()
    return out


@dataclass(kw_only=True)
class MultiLabelMetrics:
    """What :func:`multilabel_metrics` measures; per-label lists in label order."""

    threshold: float
    mAP: float  # NaN where no label has a positive
    micro_f1: float
    macro_f1: float
    exact_match: float
    labels_without_positives: int  # left out of mAP and macro F1
    ap: list[float] = field(default_factory=list)  # NaN for a label without a positive
    precision: list[float] = field(default_factory=list)
    recall: list[float] = field(default_factory=list)
    f1: list[float] = field(default_factory=list)
    support: list[int] = field(default_factory=list)  # positives per label

    def summary(self) -> dict[str, Any]:
        """mAP, micro F1, macro F1, exact match, threshold and the labels left out (None for an undefined mAP)."""
        return {"mAP": None if math.isnan(self.mAP) else round(self.mAP, 6), "micro_f1": round(self.micro_f1, 6),
                "macro_f1": round(self.macro_f1, 6), "exact_match": round(self.exact_match, 6),
                "threshold": self.threshold, "labels_without_positives": self.labels_without_positives}

    def per_label(self, names: list[str]) -> dict[str, dict[str, Any]]:
        """{label: {ap, precision, recall, f1, support}} for a JSON report (ap None for a label without a
        positive)."""
        return {name: {"ap": None if math.isnan(a) else round(a, 6), "precision": round(p, 6),
                       "recall": round(r, 6), "f1": round(f, 6), "support": s}
                for name, a, p, r, f, s in zip(names, self.ap, self.precision, self.recall, self.f1, self.support,
                                               strict=True)}


def _ratio(a: Tensor, b: Tensor) -> Tensor:
    """a / b, 0 where b is 0 (scikit-learn's zero_division=0)."""
    return torch.where(b > 0, a / b.clamp(min=1), torch.zeros_like(a))


def multilabel_metrics(scores: Tensor, targets: Tensor, *, threshold: float = DEFAULT_THRESHOLD) -> MultiLabelMetrics:
    """Metrics of (N, K) scores (probabilities: sigmoid of the logits) against (N, K) multi-hot targets (a value
    above 0.5 is a positive); see the module docstring."""
    if scores.ndim != 2 or scores.shape != targets.shape:
        raise ValueError(f"multilabel_metrics: scores {tuple(scores.shape)} and targets {tuple(targets.shape)}; "
                         f"expected two (N, K) tensors")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    truth = targets.double() > 0.5
    pred = scores.double() >= threshold
    tp = (truth & pred).sum(0).double()
    fp = (~truth & pred).sum(0).double()
    fn = (truth & ~pred).sum(0).double()
    support = truth.sum(0)
    present = support > 0
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    ap = average_precision(scores, targets)
    micro = _ratio(2 * tp.sum(), 2 * tp.sum() + fp.sum() + fn.sum())
    return MultiLabelMetrics(
        threshold=float(threshold),
        mAP=float(ap[present].mean()) if present.any() else math.nan,
        micro_f1=float(micro),
        macro_f1=float(f1[present].mean()) if present.any() else 0.0,
        exact_match=float((truth == pred).all(dim=1).double().mean()) if len(truth) else 0.0,
        labels_without_positives=int((~present).sum()),
        ap=ap.tolist(), precision=precision.tolist(), recall=recall.tolist(), f1=f1.tolist(),
        support=support.tolist())


__all__ = ["DEFAULT_THRESHOLD", "MultiLabelMetrics", "average_precision", "multilabel_metrics"]
