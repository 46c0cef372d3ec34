"""Images to class scores in Python, exactly as ``vitlab predict`` computes them.

The CLI calls the same pieces: :func:`prepare_image` (decode a file as the CLI does, smaller when the model
needs less than its full size, then the model's eval transform) and :func:`to_scores` (the checkpoint's
``score_function``: softmax; sigmoid for a multi-label or single-label Hugging Face head; raw values for
regression).
"""

from __future__ import annotations

import inspect
import io
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from vitlab.data import image as _image
from vitlab.data.image import load_image
from vitlab.data.transforms import EvalTransform, eval_transform
from vitlab.train.evaluate import eval_mode

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
    min_size=transform.min_source_size)`` (a large JPEG at 1/2..1/8 scale, as ``vitlab predict`` does); an encoded
    file (bytes, ``io.BytesIO``, a file opened ``"rb"``) is decoded the same way, to the same pixels; a PIL
    image, a uint8 (H, W[, C]) array or a uint8 (C, H, W) tensor goes to ``transform`` as it is."""
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image, min_size=transform.min_source_size)
    elif _is_encoded(image):
        image = _load_encoded(image, min_size=transform.min_source_size)
    return transform(image)


_IMAGE_FORMS = ("file paths, encoded image files (bytes, io.BytesIO, a file opened 'rb'), PIL images, uint8 "
               "(H, W[, C]) arrays or uint8 (C, H, W) tensors, one or a list of them; a (B, C, H, W) uint8 "
               "tensor is B images")


def _is_encoded(x: Any) -> bool:
    """Whether ``x`` is an encoded image file in memory: bytes-like, or an object with ``read`` (a file)."""
    return isinstance(x, (bytes, bytearray, memoryview)) or callable(getattr(x, "read", None))


def _is_image(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike, Image.Image, np.ndarray, Tensor)) or _is_encoded(x)


def _kind(x: Any) -> str:
    if x is None:
        return "None"
    name = type(x).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def _load_encoded(data: Any, *, min_size: int | None = None) -> Tensor:
    """An encoded image (bytes-like or a binary file object) -> uint8 (C, H, W), decoded by
    :func:`~vitlab.data.image.decode_image` as :func:`~vitlab.data.load_image` decodes the same file from a path.
    A failure is a :class:`~vitlab.data.errors.BadImageError` naming the input."""
    if isinstance(data, io.TextIOBase):
        raise TypeError(f"{getattr(data, 'name', 'a file')}: open in text mode; open image files with 'rb'")
    if inspect.iscoroutinefunction(getattr(data, "read", None)):  # Starlette / FastAPI's UploadFile
        raise TypeError(f"{type(data).__name__}: its read() is a coroutine; pass its file (upload.file) or the bytes "
                        f"(await upload.read())")
    if isinstance(data, (bytes, bytearray, memoryview)):
        what, fp = f"image ({memoryview(data).nbytes:,} bytes)", io.BytesIO(data)
    else:
        name = getattr(data, "name", None)
        what, fp = (os.fspath(name) if isinstance(name, (str, os.PathLike)) else type(data).__name__), data
    return _image.decode_image(fp, name=what, min_size=min_size)


def _single(images: Any) -> bool:
    return (isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)) or _is_encoded(images)
            or (isinstance(images, Tensor) and images.ndim != 4))


def _image_list(images: Any) -> tuple[list, bool]:
    """(the images as a list, whether one image was given); anything but the accepted forms is a TypeError."""
    if _single(images):
        return [images], True
    if isinstance(images, Tensor):
        return list(images), False
    if images is None or isinstance(images, (Mapping, set, frozenset)) or not hasattr(images, "__iter__"):
        hint = " (give list(d) or list(d.values()))" if isinstance(images, Mapping) else (
            " (a set has no order: give a list)" if isinstance(images, (set, frozenset)) else "")
        raise TypeError(f"predict: images is {_kind(images)}{hint}; expected {_IMAGE_FORMS}")
    items = list(images)
    for i, im in enumerate(items):
        if not _is_image(im):
            raise TypeError(f"predict: images[{i}] is {_kind(im)}; expected {_IMAGE_FORMS}")
    return items, False


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _same_device(want: torch.device, have: torch.device) -> bool:
    """``want`` names where ``have`` is: the same type and index ("cuda" is any CUDA device; the CPU has one)."""
    return want.type == have.type and (want.type == "cpu" or want.index is None or want.index == have.index)


@torch.no_grad()
def predict(model: nn.Module | str | os.PathLike, images: Any, *, topk: int | None = 5, batch_size: int = 32,
            device: str | torch.device | None = None, scores: str = "auto", threshold: float | None = None) -> list:
    """Class scores for images, as ``vitlab predict`` gives them (same decoding, preprocessing and scores).

    Args:
        model: a vitlab classifier, or a checkpoint path (vitlab checkpoint, Hugging Face folder, or an
            ONNX file written by ``vitlab export``; run with ONNX Runtime).
        images: one image or a list of them: file paths, encoded image files (bytes, ``io.BytesIO``, a file
            opened ``"rb"``: what a web framework hands over for an upload; decoded as the same file from a
            path), PIL images, uint8 (H, W[, C]) arrays or uint8 (C, H, W) tensors; a (B, C, H, W) uint8 tensor
            is a list of B images. Anything else (a dict, a set, None, a number) is a TypeError.
        topk: classes per image, best first (None: all).
        batch_size: images per forward.
        device: where the model runs. A path is loaded on the CPU and moved there (None: the CPU). A model given
            as a module is never moved (other calls may be using it): ``device`` must be where its parameters
            are (None: there), otherwise a ValueError; move it yourself first (``model.to(device)``).
        scores: "auto" (the model's ``score_function``), "softmax", "sigmoid" or "none" (raw logits).
        threshold: instead of the top-k, every label whose score is >= ``threshold``, best first (``topk`` does not
            limit them): a multi-label model's (sigmoid scores) predicted labels, as ``vitlab predict`` lists them
            (its ``--threshold``, default 0.5); possibly none.

    Returns:
        per image a list of ``{"label": name, "score": float, "index": class}`` (the Hugging Face pipeline's
        form, plus the class index); for a single image, that list alone.

    Threads: calls from several threads may share one model. A model in eval mode (``model.eval()``, as a
    service should hold it; every ``vitlab.export`` runtime is) is not touched. A model with modules in train
    mode (``vitlab.load_model`` returns one so) is switched to eval mode by the first of the concurrent calls
    and its modules' modes are restored by the last one to finish, so no call's forward runs in train mode;
    code of your own that switches the model's mode meanwhile is not guarded against.

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
    items, single = _image_list(images)
    loaded = isinstance(model, (str, os.PathLike))
    if loaded:
        from vitlab.export.runtimes import load_for_inference

        model, _ = load_for_inference(model)
    task = getattr(model, "task", "classification")
    if task != "classification":
        raise ValueError(f"predict: a {task} model; predict works on classifiers")
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    if not num_classes:
        raise ValueError("predict: a backbone without a classifier (num_classes 0): no classes to predict")
    kind = score_kind(model, scores)
    names = getattr(model, "class_names", None) or [str(i) for i in range(num_classes)]
    k = num_classes if topk is None or threshold is not None else min(topk, num_classes)
    transform = eval_transform(model.preprocessing)
    runtime = str(getattr(model, "name", "")) if hasattr(model, "inner") else ""  # a vitlab.export Runtime
    if runtime.startswith("onnx") or runtime == "torch-int8":
        device = torch.device("cpu")  # ONNX Runtime and torch.ao int8 kernels run on the CPU here
    elif loaded:
        device = torch.device(device) if device is not None else torch.device("cpu")
        model.to(device)  # predict's own model
    else:
        here = _device_of(model)
        if device is not None and not _same_device(torch.device(device), here):
            raise ValueError(f"predict: device={str(device)!r}, but the model's parameters are on {here}; predict "
                             f"does not move a model it is given: move it first (model.to({str(device)!r})) "
                             f"or leave device out")
        device = here
    out: list[list[dict[str, Any]]] = []
    with eval_mode(model):
        from vitlab.train.evaluate import logits_of

        for start in range(0, len(items), batch_size):
            x = torch.stack([prepare_image(im, transform) for im in items[start:start + batch_size]]).to(device)
            top = to_scores(logits_of(model(x)).float(), kind).topk(k, dim=-1)
            out.extend([{"label": names[i], "score": v, "index": i} for v, i in zip(values, indices)
                        if threshold is None or v >= threshold]
                       for values, indices in zip(top.values.tolist(), top.indices.tolist()))
    return out[0] if single else out


__all__ = ["SCORE_KINDS", "predict", "prepare_image", "score_kind", "to_scores"]
