"""Evaluation of a classifier on a labelled data set: loss, top-1/top-5, per-class accuracy, confusion."""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from vitlab.data.loader import collate_skip_none


@dataclass(kw_only=True)
class EvalResult:
    num_samples: int
    loss: float
    top1: float
    top5: float
    # accuracy of each class; NaN for a class with no image in the data set (its accuracy is undefined):
    # written out through per_class_json(), which gives null there, as JSON has no NaN
    per_class: list[float]
    confusion: Tensor  # (K, K) int64: row = true class, column = predicted class
    class_names: list[str] = field(default_factory=list)
    predictions: Tensor | None = None  # (N,) top-1 class of every sample, in data set order

    def summary(self) -> dict[str, Any]:
        return {"samples": self.num_samples, "loss": round(self.loss, 6), "top1": round(self.top1, 6),
                "top5": round(self.top5, 6)}

    def per_class_json(self, class_names: list[str] | None = None) -> dict[str, float | None]:
        """{class name: accuracy} for a JSON report: None (null) for a class with no image, where ``per_class``
        holds NaN (``json.dumps`` would write ``NaN``, which is not JSON). Names: ``class_names``, else the
        result's own, else the class indices."""
        names = class_names or self.class_names or [str(i) for i in range(len(self.per_class))]
        if len(names) != len(self.per_class):
            raise ValueError(f"per_class_json: {len(names)} class names for {len(self.per_class)} classes")
        return {name: (None if math.isnan(acc) else acc) for name, acc in zip(names, self.per_class)}


def autocast_context(device: torch.device, amp: str):
    """bf16 autocast on CPU or CUDA, fp16 on CUDA; "none" is a no-op."""
    if amp == "none":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("amp=fp16 needs CUDA (a gradient scaler on the GPU); use amp=bf16 on the CPU")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def logits_of(outputs: Tensor | tuple[Tensor, ...] | dict[str, Any]) -> Tensor:
    """The class logits of a model's output: a distilled DeiT in training mode returns (class, distillation)
    logits, averaged here; a detector or segmenter returns named outputs, whose class logits are "logits"."""
    if isinstance(outputs, dict):
        return outputs["logits"]
    if isinstance(outputs, tuple):
        return sum(outputs) / len(outputs)
    return outputs


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, *, num_classes: int, batch_size: int = 256,
             device: torch.device | str = "cpu", amp: str = "none", workers: int = 0,
             class_names: list[str] | None = None, progress: bool = False) -> EvalResult:
    """Run ``model`` over ``dataset`` (already transformed with the model's eval preprocessing)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=collate_skip_none, generator=torch.Generator().manual_seed(0))
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    loss_sum, n, top5_hits = 0.0, 0, 0
    preds: list[Tensor] = []
    bar = None
    if progress and sys.stderr.isatty():  # a redrawn bar is noise in a log file
        from tqdm.auto import tqdm

        bar = tqdm(total=len(loader), desc="eval", unit="batch", leave=False)
    try:
        for batch in loader:
            if batch is None:
                continue
            x, y = batch
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast_context(device, amp):
                logits = logits_of(model(x))
            logits = logits.float()
            if logits.shape[-1] != num_classes:
                raise ValueError(f"evaluate: the model outputs {logits.shape[-1]} classes, the data has {num_classes}")
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            k = min(5, num_classes)
            topk = logits.topk(k, dim=-1).indices  # (B, k)
            top5_hits += (topk == y[:, None]).any(dim=-1).sum().item()
            pred = topk[:, 0]
            preds.append(pred.cpu())
            confusion += torch.bincount((y * num_classes + pred).cpu(), minlength=num_classes ** 2).view(
                num_classes, num_classes)  # (K, K)
            n += y.numel()
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    if n == 0:
        raise ValueError("evaluate: the data set is empty")
    correct = confusion.diag()
    support = confusion.sum(dim=1)
    per_class = [c / s if s > 0 else float("nan") for c, s in zip(correct.tolist(), support.tolist())]
    return EvalResult(num_samples=n, loss=loss_sum / n, top1=correct.sum().item() / n, top5=top5_hits / n,
                      per_class=per_class, confusion=confusion, class_names=list(class_names or []),
                      predictions=torch.cat(preds))
