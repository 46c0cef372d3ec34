"""Evaluation of a classifier on a labelled data set: loss, top-1/top-5, per-class accuracy, confusion; for a
multi-label classifier (multi-hot targets, sigmoid scores) loss, mAP, F1 and exact match
(:mod:`vitlab.train.multilabel`)."""

from __future__ import annotations

import contextlib
import math
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from vitlab.data.loader import WorkerLoader, collate_skip_none
from vitlab.train.multilabel import DEFAULT_THRESHOLD, MultiLabelMetrics, multilabel_metrics


@dataclass(kw_only=True)
class EvalResult:
    num_samples: int
    loss: float
    # None where the targets are not classes (a custom criterion's regression or multi-label targets)
    top1: float | None
    top5: float | None
    # accuracy of each class; NaN for a class with no image in the data set (its accuracy is undefined):
    # written out through per_class_json(), which gives null there, as JSON has no NaN
    per_class: list[float]
    confusion: Tensor  # (K, K) int64: row = true class, column = predicted class
    class_names: list[str] = field(default_factory=list)
    # (N,) top-1 class of every sample, in data set order; multi-label: (N, K) bool, the labels at the threshold
    predictions: Tensor | None = None
    multilabel: MultiLabelMetrics | None = None  # multi-label evaluation: mAP, F1, exact match, per label
    nonfinite: int = 0  # samples whose logits hold NaN or infinite values (the loss is then not finite either)

    @property
    def balanced_accuracy(self) -> float | None:
        """The mean of the per-class accuracies (recall) over the classes the data set has images of: each class
        counts alike, however many images it has (None where there is no per-class accuracy)."""
        seen = [a for a in self.per_class if not math.isnan(a)]
        return sum(seen) / len(seen) if seen else None

    def summary(self) -> dict[str, Any]:
        """samples, loss, top1, top5, balanced_accuracy (the last three left out where top-1 is None); multi-label:
        samples, loss, mAP, micro_f1, macro_f1, exact_match, threshold, labels_without_positives. A NaN or infinite
        loss is None (JSON's null: ``json.dumps`` would write ``NaN``, which is not JSON)."""
        loss = round(self.loss, 6) if math.isfinite(self.loss) else None
        out: dict[str, Any] = {"samples": self.num_samples, "loss": loss}
        if self.multilabel is not None:
            out.update(self.multilabel.summary())
        elif self.top1 is not None and self.top5 is not None:
            out.update(top1=round(self.top1, 6), top5=round(self.top5, 6))
            if (balanced := self.balanced_accuracy) is not None:
                out.update(balanced_accuracy=round(balanced, 6))
        return out

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


EXPECTED_BATCH = ("(image, label) batches: images float (B, C, H, W), already transformed (vitlab.data."
                  "eval_transform / train_transform(model.preprocessing) scale uint8 images to [0, 1] and normalise "
                  "them); labels int64 class indices (B,), or float class probabilities (B, K)")


def _kind(v: Any) -> str:
    if isinstance(v, Tensor):
        return f"{str(v.dtype).removeprefix('torch.')} tensor {tuple(v.shape)}"
    if isinstance(v, (tuple, list)) and v:
        return f"{type(v).__name__} of {type(v[0]).__name__}"
    return type(v).__name__


def _not_probabilities(y: Tensor) -> tuple[int, float] | None:
    """(row, its sum) of the first (B, K) row that does not sum to 1 within 1e-3 (multi-hot, all zero), or
    None."""
    sums = y.detach().float().sum(dim=-1)
    bad = ((sums - 1).abs() > 1e-3).nonzero()
    return (int(bad[0, 0]), float(sums[bad[0, 0]])) if len(bad) else None


def check_classification_batch(batch: Any, *, num_classes: int, in_chans: int | None = None,
                               labels: bool = True, where: str = "fit", multi_label: bool = False) -> None:
    """Refuse a batch that a classifier cannot be trained or evaluated on, with one message naming what came,
    what is expected and the conversion to use (run on the first batch: the errors deep inside the model or
    the loss name none of these). ``labels=False``: the labels are a custom criterion's business.
    ``multi_label``: the labels must be float multi-hot (B, K) rows of values in [0, 1]."""
    def refuse(what: str, fix: str) -> None:
        raise ValueError(f"{where}: the data's first batch has {what}; expected {EXPECTED_BATCH} (K = {num_classes} "
                         f"here). {fix}")

    if isinstance(batch, dict):
        refuse(f"dict samples (keys {sorted(map(str, batch))})", "Return (image, label) from the data set's "
               "__getitem__ (e.g. a wrapper returning sample['image'], sample['label']), or give the data set a "
               "collate(samples) method that makes such batches")
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        n = len(batch) if isinstance(batch, (tuple, list)) else None
        refuse(f"samples of {n} items" if n is not None else f"samples of type {_kind(batch)}",
               "Return exactly (image, label) per sample (drop extra items such as indices or paths)")
    x, y = batch
    if not isinstance(x, Tensor) or not x.is_floating_point():
        refuse(f"images of type {_kind(x)}", "Transform the images first: uint8 (C, H, W) tensors through "
               "vitlab.data.eval_transform(model.preprocessing) (or train_transform); PIL images / numpy arrays "
               "first to uint8 (C, H, W) tensors (torch.from_numpy(np.asarray(img)).permute(2, 0, 1)), or use "
               "vitlab.data.build_dataset / TensorImageDataset, which do both")
    if x.ndim != 4 or (in_chans is not None and x.shape[1] != in_chans):
        refuse(f"images of shape {tuple(x.shape)}" + (f" for a model that takes {in_chans} channel(s)" if in_chans else ""),
               "Give each image as a channels-first (C, H, W) tensor (permute(2, 0, 1) from (H, W, C)), with the "
               "model's channels (vitlab.data.eval_transform converts grayscale / RGB)")
    if not labels:
        return
    if multi_label:
        if not isinstance(y, Tensor) or not y.is_floating_point() or y.ndim != 2 or y.shape[1] != num_classes:
            refuse(f"labels of type {_kind(y)} for multi-label training", f"Give float multi-hot (K,) = "
                   f"({num_classes},) rows per sample (1.0 for each label of the image, else 0.0), as "
                   f"vitlab.data.multilabel's data sets do")
        if y.numel() and (float(y.min()) < 0 or float(y.max()) > 1):
            refuse(f"multi-hot labels outside [0, 1] ({float(y.min()):.4g}..{float(y.max()):.4g})",
                   "Give 0/1 (or soft, in [0, 1]) values per label")
        if len(y) != len(x):
            refuse(f"{len(x)} images but {len(y)} labels", "Give one label row per image")
        return
    if not isinstance(y, Tensor):
        refuse(f"labels of type {_kind(y)}", "Give class indices: map label names to their index (classes.index(name)),"
               " as vitlab.data's data sets do")
    if y.is_floating_point():
        if y.ndim != 2 or y.shape[1] != num_classes:
            refuse(f"float labels of shape {tuple(y.shape)}", f"Give int class indices, or (K,) = ({num_classes},) "
                   "class probabilities per sample")
        if bad := _not_probabilities(y):
            refuse(f"float label rows that are not class probabilities (row {bad[0]} sums to {bad[1]:.4g})",
                   "Softmax cross entropy takes one class per image; for multi-label (multi-hot) targets train "
                   "with the recipe's multi_label (--multi-label; fit(..., recipe.replace(multi_label=True))), or "
                   "pass criterion=lambda x, out, y: F.binary_cross_entropy_with_logits(out, y) to fit and set "
                   "model.score_function = 'sigmoid'")
    elif y.dtype == torch.bool or y.is_complex() or y.ndim != 1:
        refuse(f"labels of type {_kind(y)}", "Give each label as an int (int(label), or label.squeeze() for a (1,) "
               "tensor)" if y.ndim == 2 and y.shape[1] == 1 else "Give each label as an int class index")
    elif y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        refuse(f"class indices in {int(y.min())}..{int(y.max())} for a head of {num_classes} classes",
               f"Give indices 0..{num_classes - 1} (or reset_classifier to the data's number of classes)")
    if len(y) != len(x):
        refuse(f"{len(x)} images but {len(y)} labels", "Give one label per image")


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, *, num_classes: int, batch_size: int = 256,
             device: torch.device | str = "cpu", amp: str = "none", workers: int = 0,
             class_names: list[str] | None = None, progress: bool = False,
             criterion: Callable[[Tensor, Any, Tensor], Tensor] | None = None, multi_label: bool = False,
             threshold: float = DEFAULT_THRESHOLD) -> EvalResult:
    """Run ``model`` over ``dataset`` (already transformed with the model's eval preprocessing).

    Labels: class indices, or (K,) class probabilities per sample (one-hot / soft labels: cross-entropy
    against them, accuracy against their most probable class).

    ``criterion``: ``loss(images, outputs, targets)`` (fit's, a mean over the batch): the loss is its value and
    the targets are its business (regression, multi-label); top-1 / top-5, per-class accuracy and the confusion
    are then given only where every target is a class index or a row of class probabilities, else None / empty.

    ``multi_label``: the targets are multi-hot (K,) rows; the loss is binary cross entropy with logits (mean over
    samples x labels; ``criterion``'s where given) and the result's ``multilabel`` holds mAP, F1 at ``threshold``
    (on the sigmoid scores) and exact match (:func:`vitlab.train.multilabel.multilabel_metrics`).
    """
    if multi_label:
        return _evaluate_multilabel(model, dataset, num_classes=num_classes, batch_size=batch_size, device=device,
                                    amp=amp, workers=workers, class_names=class_names, progress=progress,
                                    criterion=criterion, threshold=threshold)
    device = torch.device(device)
    in_chans = getattr(getattr(model, "preprocessing", None), "input_size", (None,))[0]
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    loss_sum, n, top5_hits, nonfinite = 0.0, 0, 0, 0
    scored = True  # every target so far is a class (index or probabilities): accuracy means something
    preds: list[Tensor] = []
    with _eval_batches(model, dataset, batch_size=batch_size, workers=workers, progress=progress) as batches:
        for batch in batches:
            if n == 0:
                check_classification_batch(batch, num_classes=num_classes, in_chans=in_chans, where="evaluate",
                                           labels=criterion is None)
            x, y, logits, loss = _forward_batch(model, batch, device=device, amp=amp, criterion=criterion)
            loss_sum += loss
            nonfinite += _nonfinite_rows(logits)
            if criterion is not None:
                n += len(x)
                scored = scored and _class_targets(y, logits, num_classes)
                if not scored:
                    continue
            elif logits.shape[-1] != num_classes:
                raise ValueError(f"evaluate: the model outputs {logits.shape[-1]} classes, the data has {num_classes}")
            y = y.float() if y.is_floating_point() else y.long()  # (B, K) class probabilities or (B,) indices
            if criterion is None:
                loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
                n += y.shape[0]
            if y.is_floating_point():  # one-hot / soft labels: accuracy against the most probable class
                y = y.argmax(dim=-1)
            k = min(5, num_classes)
            topk = logits.topk(k, dim=-1).indices  # (B, k)
            top5_hits += (topk == y[:, None]).any(dim=-1).sum().item()
            pred = logits.argmax(dim=-1)  # the first maximal class on ties (topk's order on ties is unspecified)
            preds.append(pred.cpu())
            confusion += torch.bincount((y * num_classes + pred).cpu(), minlength=num_classes ** 2).view(
                num_classes, num_classes)  # (K, K)
    if n == 0:
        raise ValueError("evaluate: the data set is empty")
    if not scored:
        return EvalResult(num_samples=n, loss=loss_sum / n, top1=None, top5=None, per_class=[],
                          confusion=torch.zeros(0, 0, dtype=torch.int64), class_names=list(class_names or []),
                          nonfinite=nonfinite)
    correct = confusion.diag()
    support = confusion.sum(dim=1)
    per_class = [c / s if s > 0 else float("nan") for c, s in zip(correct.tolist(), support.tolist())]
    return EvalResult(num_samples=n, loss=loss_sum / n, top1=correct.sum().item() / n, top5=top5_hits / n,
                      per_class=per_class, confusion=confusion, class_names=list(class_names or []),
                      predictions=torch.cat(preds), nonfinite=nonfinite)


def _nonfinite_rows(logits: Tensor) -> int:
    """The samples (rows of (B, K) logits; any other output as one) holding NaN or infinite values."""
    bad = ~torch.isfinite(logits)
    return int(bad.flatten(1).any(dim=1).sum()) if bad.ndim >= 2 else int(bad.any())


def _forward_batch(model: nn.Module, batch: Any, *, device: torch.device, amp: str,
                   criterion: Callable[[Tensor, Any, Tensor], Tensor] | None) -> tuple[Tensor, Tensor, Tensor, float]:
    """(images, targets on ``device``, float32 logits, the criterion's loss summed over the batch: 0.0 without
    one) of one evaluation batch, the forward under ``amp``."""
    x, y = batch
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    loss = 0.0
    with autocast_context(device, amp):
        outputs = model(x)
        if criterion is not None:
            loss = float(criterion(x, outputs, y)) * len(x)
    return x, y, logits_of(outputs).float(), loss


class _EvalShare:
    """The predict calls running on one model that was in train mode: the first switched it to eval mode and
    recorded each module's mode in ``modes``; the last puts them back."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0
        self.modes: list[tuple[nn.Module, bool]] | None = None


_shares: weakref.WeakKeyDictionary[nn.Module, _EvalShare] = weakref.WeakKeyDictionary()
_shares_lock = threading.Lock()


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode meanwhile (evaluation, ``vitlab.predict``), safely for concurrent calls on one model:
    a model whose modules are all in eval mode is not touched; otherwise the first concurrent call switches it to
    eval mode and the last one to leave restores every module's own mode (a part the caller froze in eval mode
    stays so; restoring in each call would put the model back in train mode while other calls are still in their
    forward)."""
    with _shares_lock:
        share = _shares.get(model)
        if share is None:
            share = _shares[model] = _EvalShare()
    with share.lock:
        if share.users == 0:
            modes = [(m, m.training) for m in model.modules()]
            share.modes = modes if any(training for _, training in modes) else None
            if share.modes is not None:
                model.eval()
        share.users += 1
    try:
        yield
    finally:
        with share.lock:
            share.users -= 1
            if share.users == 0 and share.modes is not None:
                for m, training in share.modes:  # each module's own flag (a frozen part may have been in eval)
                    m.training = training
                share.modes = None


@contextlib.contextmanager
def _eval_batches(model: nn.Module, dataset: Dataset, *, batch_size: int, workers: int,
                  progress: bool) -> Iterator[Iterator[Any]]:
    """The data set's batches in order (undecodable images' empty batches left out), the model in eval mode
    meanwhile (:func:`eval_mode`: each module's mode restored after), with a progress bar on a terminal (a redrawn
    bar is noise in a log)."""
    with eval_mode(model):
        loader = WorkerLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                              collate_fn=collate_skip_none, generator=torch.Generator().manual_seed(0))
        bar = None
        if progress and sys.stderr.isatty():
            from tqdm.auto import tqdm

            bar = tqdm(total=len(loader), desc="eval", unit="batch", leave=False)

        def batches() -> Iterator[Any]:
            for batch in loader:
                if bar is not None:
                    bar.update(1)
                if batch is not None:
                    yield batch

        try:
            yield batches()
        finally:
            if bar is not None:
                bar.close()


def _class_targets(y: Tensor, logits: Tensor, num_classes: int) -> bool:
    """Whether a custom criterion's targets are classes of ``logits``: (B,) int indices in range, or (B, K) rows
    of class probabilities."""
    if logits.ndim != 2 or logits.shape[-1] != num_classes:
        return False
    if y.is_floating_point():
        return y.ndim == 2 and y.shape[1] == num_classes and _not_probabilities(y) is None
    return (y.ndim == 1 and y.dtype not in (torch.bool, torch.uint8) and not y.is_complex()
            and (not y.numel() or (int(y.min()) >= 0 and int(y.max()) < num_classes)))


@torch.no_grad()
def _evaluate_multilabel(model: nn.Module, dataset: Dataset, *, num_classes: int, batch_size: int,
                         device: torch.device | str, amp: str, workers: int, class_names: list[str] | None,
                         progress: bool, criterion: Callable[[Tensor, Any, Tensor], Tensor] | None,
                         threshold: float) -> EvalResult:
    """evaluate() of a multi-label classifier: every sample's sigmoid scores and targets, then the metrics."""
    device = torch.device(device)
    in_chans = getattr(getattr(model, "preprocessing", None), "input_size", (None,))[0]
    loss_sum, n, nonfinite = 0.0, 0, 0
    scores: list[Tensor] = []
    targets: list[Tensor] = []
    with _eval_batches(model, dataset, batch_size=batch_size, workers=workers, progress=progress) as batches:
        for batch in batches:
            if n == 0:
                check_classification_batch(batch, num_classes=num_classes, in_chans=in_chans, where="evaluate",
                                           labels=criterion is None, multi_label=True)
            x, y, logits, loss = _forward_batch(model, batch, device=device, amp=amp, criterion=criterion)
            loss_sum += loss
            nonfinite += _nonfinite_rows(logits)
            if logits.shape[-1] != num_classes:
                raise ValueError(f"evaluate: the model outputs {logits.shape[-1]} labels, the data has {num_classes}")
            y = y.float()
            if criterion is None:  # the mean over labels, summed over samples
                loss_sum += F.binary_cross_entropy_with_logits(logits, y, reduction="sum").item() / num_classes
            n += len(x)
            scores.append(torch.sigmoid(logits).cpu())
            targets.append(y.cpu())
    if n == 0:
        raise ValueError("evaluate: the data set is empty")
    all_scores, all_targets = torch.cat(scores), torch.cat(targets)
    metrics = multilabel_metrics(all_scores, all_targets, threshold=threshold)
    return EvalResult(num_samples=n, loss=loss_sum / n, top1=None, top5=None, per_class=[],
                      confusion=torch.zeros(0, 0, dtype=torch.int64), class_names=list(class_names or []),
                      predictions=all_scores >= threshold, multilabel=metrics, nonfinite=nonfinite)
