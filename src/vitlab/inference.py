"""Images to class scores in Python, exactly as ``vitlab predict`` computes them.

The CLI calls the same pieces: :func:`prepare_image` (decode a file as the CLI does, smaller when the model
needs less than its full size, then the model's eval transform) and :func:`to_scores` (the checkpoint's
``score_function``: softmax; sigmoid for a multi-label or single-label Hugging Face head; raw values for
regression).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from vitlab.data.image import load_image
from vitlab.data.transforms import EvalTransform, eval_transform

SCORE_KINDS = ("softmax", "sigmoid", "none")


def score_kind(model: nn.Module, scores: str = "auto") -> str:
    """How ``model``'s logits become scores: ``scores``, or with "auto" the model's ``score_function``
    (softmax unless its checkpoint records another)."""
    kind = getattr(model, "score_function", "softmax") if scores == "auto" else scores
    if kind not in SCORE_KINDS:
        raise ValueError(f"scores must be 'auto' or one of {', '.join(map(repr, SCORE_KINDS))}, got {kind!r}")
    return kind


def to_scores(logits: Tensor, kind: str) -> Tensor:
    """(B, K) logits -> (B, K) scores by ``kind`` (:func:`score_kind`)."""
    if kind == "softmax":
        return logits.softmax(dim=-1)
    if kind == "sigmoid":
        return torch.sigmoid(logits)
    if kind == "none":
        return logits
    raise ValueError(f"scores: expected one of {', '.join(map(repr, SCORE_KINDS))}, got {kind!r}")


def prepare_image(image: Any, transform: EvalTransform) -> Tensor:
    """One image -> the model's (C, H, W) input. A path is decoded with ``load_image(path,
    min_size=transform.min_source_size)`` (a large JPEG at 1/2..1/8 scale, as ``vitlab predict`` does); a PIL
    image, a uint8 (H, W[, C]) array or a uint8 (C, H, W) tensor goes to ``transform`` as it is."""
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image, min_size=transform.min_source_size)
    return transform(image)


def _single(images: Any) -> bool:
    return (isinstance(images, (str, os.PathLike, Image.Image, np.ndarray))
            or (isinstance(images, Tensor) and images.ndim != 4))


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def predict(model: nn.Module | str | os.PathLike, images: Any, *, topk: int | None = 5, batch_size: int = 32,
            device: str | torch.device | None = None, scores: str = "auto", threshold: float | None = None) -> list:
    """Class scores for images, as ``vitlab predict`` gives them (same decoding, preprocessing and scores).

    Args:
        model: a vitlab classifier, or a checkpoint path (vitlab checkpoint, Hugging Face folder, or an
            ONNX file written by ``vitlab export``; run with ONNX Runtime).
        images: one image or a list of them: file paths, PIL images, uint8 (H, W[, C]) arrays or uint8
            (C, H, W) tensors; a (B, C, H, W) uint8 tensor is a list of B images.
        topk: classes per image, best first (None: all).
        batch_size: images per forward.
        device: where the model runs (None: where its parameters are; a path loads on the CPU).
        scores: "auto" (the model's ``score_function``), "softmax", "sigmoid" or "none" (raw logits).
        threshold: instead of the top-k, every label whose score is >= ``threshold``, best first (``topk`` does not
            limit them): a multi-label model's (sigmoid scores) predicted labels, as ``vitlab predict`` lists them
            (its ``--threshold``, default 0.5); possibly none.

    Returns:
        per image a list of ``{"label": name, "score": float, "index": class}`` (the Hugging Face pipeline's
        form, plus the class index); for a single image, that list alone.

    Example::

        vitlab.predict("runs/mine/model.safetensors", "photo.jpg", topk=3)
        # [{'label': 'cat', 'score': 0.91, 'index': 3}, ...]
        vitlab.predict("runs/tags/model.safetensors", "photo.jpg", threshold=0.5)   # multi-label
        # [{'label': 'even', 'score': 0.93, 'index': 1}, {'label': 'big', 'score': 0.71, 'index': 0}]
    """
    if (topk is not None and topk < 1) or batch_size < 1:
        raise ValueError(f"predict: topk and batch_size must be >= 1, got topk={topk}, batch_size={batch_size}")
    if threshold is not None and not math.isfinite(threshold):
        raise ValueError(f"predict: threshold must be a finite number, got {threshold}")
    if isinstance(model, (str, os.PathLike)):
        from vitlab.export.runtimes import load_for_inference

        model, _ = load_for_inference(model)
    task = getattr(model, "task", "classification")
    if task != "classification":
        raise ValueError(f"predict: a {task} model; predict works on classifiers")
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    if not num_classes:
        raise ValueError("predict: a backbone without a classifier (num_classes 0): no classes to predict")
    kind = score_kind(model, scores)
    single = _single(images)
    items = [images] if single else list(images)
    names = getattr(model, "class_names", None) or [str(i) for i in range(num_classes)]
    k = num_classes if topk is None or threshold is not None else min(topk, num_classes)
    transform = eval_transform(model.preprocessing)
    device = torch.device(device) if device is not None else _device_of(model)
    runtime = str(getattr(model, "name", "")) if hasattr(model, "inner") else ""  # a vitlab.export Runtime
    if runtime.startswith("onnx") or runtime == "torch-int8":
        device = torch.device("cpu")  # ONNX Runtime and torch.ao int8 kernels run on the CPU here
    was_training = model.training
    model.to(device).eval()
    out: list[list[dict[str, Any]]] = []
    try:
        from vitlab.train.evaluate import logits_of

        for start in range(0, len(items), batch_size):
            x = torch.stack([prepare_image(im, transform) for im in items[start:start + batch_size]]).to(device)
            top = to_scores(logits_of(model(x)).float(), kind).topk(k, dim=-1)
            out.extend([{"label": names[i], "score": v, "index": i} for v, i in zip(values, indices)
                        if threshold is None or v >= threshold]
                       for values, indices in zip(top.values.tolist(), top.indices.tolist()))
    finally:
        model.train(was_training)
    return out[0] if single else out


__all__ = ["SCORE_KINDS", "predict", "prepare_image", "score_kind", "to_scores"]
