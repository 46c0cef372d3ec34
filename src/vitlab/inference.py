"""Images to class scores and to embeddings in Python, exactly as ``vitlab predict`` and ``vitlab embed`` compute
them.

The CLI calls the same pieces: :func:`prepare_image` (decode a file as the CLI does, smaller when the model
needs less than its full size, then the model's eval transform), :func:`to_scores` (the checkpoint's
``score_function``: softmax; sigmoid for a multi-label or single-label Hugging Face head; raw values for
regression), and for embeddings :func:`load_for_embedding` and :func:`embed_batches`.
"""

from __future__ import annotations

import inspect
import io
import math
import os
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from vitlab.data import image as _image
from vitlab.data.image import load_image
from vitlab.data.transforms import EvalTransform, eval_transform
from vitlab.train.evaluate import eval_mode

if TYPE_CHECKING:
    from vitlab.export.runtimes import Runtime

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


def _image_list(images: Any, who: str = "predict") -> tuple[list, bool]:
    """(the images as a list, whether one image was given); anything but the accepted forms is a TypeError
    (its message starts with ``who``, the function called)."""
    if _single(images):
        return [images], True
    if isinstance(images, Tensor):
        return list(images), False
    if images is None or isinstance(images, (Mapping, set, frozenset)) or not hasattr(images, "__iter__"):
        hint = " (give list(d) or list(d.values()))" if isinstance(images, Mapping) else (
            " (a set has no order: give a list)" if isinstance(images, (set, frozenset)) else "")
        raise TypeError(f"{who}: images is {_kind(images)}{hint}; expected {_IMAGE_FORMS}")
    items = list(images)
    for i, im in enumerate(items):
        if not _is_image(im):
            raise TypeError(f"{who}: images[{i}] is {_kind(im)}; expected {_IMAGE_FORMS}")
    return items, False


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _same_device(want: torch.device, have: torch.device) -> bool:
    """``want`` names where ``have`` is: the same type and index ("cuda" is any CUDA device; the CPU has one)."""
    return want.type == have.type and (want.type == "cpu" or want.index is None or want.index == have.index)


def _placed(model: nn.Module, device: str | torch.device | None, *, owned: bool, who: str) -> torch.device:
    """Where ``model`` runs: the CPU for ONNX Runtime and torch.ao int8 kernels; a model of the call's own
    (``owned``: loaded from a path) is moved to ``device`` (None: the CPU); a caller's model is never moved (other
    calls may be using it), so ``device`` must be where its parameters are (None: there), else a ValueError."""
    from vitlab.export.runtimes import cpu_only

    if hasattr(model, "inner") and cpu_only(str(getattr(model, "name", ""))):  # a vitlab.export Runtime
        return torch.device("cpu")
    if owned:
        device = torch.device(device) if device is not None else torch.device("cpu")
        model.to(device)
        return device
    here = _device_of(model)
    if device is not None and not _same_device(torch.device(device), here):
        raise ValueError(f"{who}: device={str(device)!r}, but the model's parameters are on {here}; {who} "
                         f"does not move a model it is given: move it first (model.to({str(device)!r})) "
                         f"or leave device out")
    return here


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
    device = _placed(model, device, owned=loaded, who="predict")
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


# --------------------------------------------------------------------------------------------------- embeddings
# What an embedding is, in the words the output file and the docs use (timm's spelling of the same computation).
PRE_LOGITS = "forward_head(forward_features(x), pre_logits=True)"


def _refuse_unembeddable(model: nn.Module, source: str) -> None:
    """A clear error for a model whose pre-logits features are not one vector per image."""
    task = getattr(model, "task", "classification")
    if task != "classification":
        raise ValueError(f"{source}: a {task} model; embeddings come from classifiers and backbones (the vector "
                         f"their classifier head reads), where a {task} model's outputs are per "
                         f"{'object' if task == 'detection' else 'pixel'}: give a classifier's or a backbone's "
                         f"checkpoint instead")
    if getattr(model, "features", None) is False:  # an ONNX file of a classifier (vitlab.export.runtime.OnnxModel)
        raise ValueError(f"{source}: an exported classifier, whose only output is its class logits (metadata task "
                         f"{task!r}): embed the PyTorch checkpoint it was exported from (--runtime onnx runs it "
                         f"through ONNX Runtime), or an ONNX file of a backbone without a classifier (metadata task "
                         f"'features')")
    if getattr(model, "global_pool", None) == "":
        raise ValueError(f"{source}: global_pool '' (no pooling): its pre-logits features are every token, not one "
                         f"vector per image; load it with another pooling (global_pool \"token\" or \"avg\"; "
                         f"--model-arg global_pool='\"avg\"')")


def embedding_meaning(model: nn.Module, *, normalized: bool = False) -> str:
    """What ``model``'s embeddings are, in one sentence for an output file: the pre-logits features as timm computes
    them (the pooling named where the model has a ``global_pool``), or an ONNX backbone file's output."""
    if hasattr(model, "features") and hasattr(model, "meta"):  # an ONNX file of a backbone
        what = f"the output of the ONNX file {model.path.name}: the pooled pre-logit features of a backbone"
    else:
        pool = getattr(model, "global_pool", None)
        what = (f"pre-logits features, {PRE_LOGITS}: the vector the classifier head reads"
                + (f" (global_pool {pool!r})" if isinstance(pool, str) and pool else ""))
    return what + ("; each row L2-normalized (unit length)" if normalized else "; not normalized")


def features_runtime(model: nn.Module, runtime: str = "torch", **export_kwargs: Any) -> Runtime:
    """A :class:`~vitlab.export.runtimes.Runtime` (``runtime``: one of :data:`~vitlab.export.runtimes.RUNTIMES`)
    whose forward gives ``model``'s embeddings, the (B, D) pre-logits features, in float32.

    It runs a copy of ``model`` rebuilt with ``num_classes=0`` (its pooling, ``fc_norm`` and pre-logits layer kept,
    its head dropped): the same features as ``model.forward_head(model.forward_features(x), pre_logits=True)``, an
    ONNX runtime exports a backbone's features (metadata task "features"), and ``model`` itself is left as it was.
    Build it once and pass it to :func:`embed` for many calls; ``export_kwargs`` go to
    :func:`~vitlab.export.export_onnx` for the ONNX runtimes."""
    _refuse_unembeddable(model, getattr(model, "model_name", type(model).__name__))
    return _backbone_runtime(_headless(model), runtime, **export_kwargs)


def _headless(model: nn.Module) -> nn.Module:
    """A copy of ``model`` without its classifier (CPU, float32, eval mode): rebuilt with ``num_classes=0`` from its
    weights less the head's (a head-less model has no head to load: nothing is "replaced")."""
    from vitlab.checkpoints.adapt import classifier_prefixes
    from vitlab.models.base import rebuild_with

    heads = classifier_prefixes(model)
    weights = {k: v for k, v in model.state_dict().items() if k.split(".")[0] not in heads}
    return rebuild_with(model, {"num_classes": 0}, state_dict=weights, source="the model without its head")


def _backbone_runtime(backbone: nn.Module, runtime: str, **export_kwargs: Any) -> Runtime:
    from vitlab.export.runtimes import build_runtime

    return build_runtime("torch" if runtime == "auto" else runtime, backbone, **export_kwargs)


def load_for_embedding(path: str | os.PathLike, runtime: str = "auto", *, model_name: str | None = None,
                       model_args: dict[str, Any] | None = None, normalized: bool = False) -> tuple[Runtime, str]:
    """(runtime giving embeddings, :func:`embedding_meaning`) for a checkpoint or an ONNX file, as ``vitlab embed``
    loads ``--checkpoint``.

    A checkpoint (with ``model_name`` / ``model_args`` for weights that do not name their model, as
    ``vitlab.load_model``'s) runs through :func:`features_runtime` (``runtime="auto"``: PyTorch float32). An ONNX
    file is taken where its metadata says task "features" (a backbone exported without a classifier, whose output
    is its pooled features); an exported classifier is refused, its only output being logits."""
    from vitlab.export.runtime import is_onnx_file

    if is_onnx_file(path):
        from vitlab.export.runtimes import load_for_inference

        rt, _ = load_for_inference(path, runtime, model_name=model_name, model_args=model_args)
        _refuse_unembeddable(rt.inner, str(path))
        return rt, embedding_meaning(rt.inner, normalized=normalized)
    import vitlab

    model = vitlab.load_model(path, model_name=model_name, **(model_args or {}))
    _refuse_unembeddable(model, str(path))
    meaning = embedding_meaning(model, normalized=normalized)
    if model.num_classes:
        model = _headless(model)  # the loaded one is dropped: one copy held
    return _backbone_runtime(model.eval(), runtime), meaning


def _features_of(model: nn.Module, source: str) -> Callable[[Tensor], Tensor]:
    """``x -> (B, D)`` features of ``model``: a Runtime of a backbone (:func:`features_runtime`,
    :func:`load_for_embedding`) as it is; any other model through its pre-logits features."""
    from vitlab.export.runtimes import Runtime

    if isinstance(model, Runtime):  # its outputs are its model's: embeddings only where that model has no head
        if getattr(model, "task", "classification") != "classification" or model.num_classes:
            raise ValueError(f"{source}: a runtime of a {getattr(model, 'task', 'classification')} model gives its "
                             f"outputs (class logits), not embeddings; build one that gives embeddings with "
                             f"vitlab.inference.features_runtime(model, {getattr(model, 'name', 'torch')!r}), or "
                             f"give embed the PyTorch model or the checkpoint's path")
        return model
    _refuse_unembeddable(model, source)
    return lambda x: model.forward_head(model.forward_features(x), pre_logits=True)


def embed_batches(features: Callable[[Tensor], Tensor], items: list, transform: EvalTransform, *, batch_size: int,
                  device: torch.device, normalize: bool = False,
                  on_bad: Callable[[int, Exception], None] | None = None) -> Iterator[tuple[list[int], Tensor]]:
    """The embeddings of ``items`` (images in any form :func:`prepare_image` takes), ``batch_size`` at a time:
    per batch, the indices of the images embedded and their (b, D) float32 embeddings on the CPU (unit rows with
    ``normalize``). Images are decoded one batch at a time, so memory is bounded by the batch, not by
    ``len(items)``. A :class:`~vitlab.data.errors.BadImageError` is raised, or with ``on_bad`` handed to
    ``on_bad(index, error)`` and the image left out (a batch of none is not yielded)."""
    from vitlab.data.errors import BadImageError

    for start in range(0, len(items), batch_size):
        kept, pixels = [], []
        for i in range(start, min(start + batch_size, len(items))):
            try:
                pixels.append(prepare_image(items[i], transform))
            except BadImageError as e:
                if on_bad is None:
                    raise
                on_bad(i, e)
                continue
            kept.append(i)
        if not kept:
            continue
        f = features(torch.stack(pixels).to(device))  # (B, D)
        if f.ndim != 2:
            raise ValueError(f"the model's pre-logits features have shape {tuple(f.shape)}, not (batch, dim): "
                             f"not one vector per image")
        f = f.float()
        yield kept, (F.normalize(f, dim=-1) if normalize else f).cpu()


@torch.no_grad()
def embed(model: nn.Module | str | os.PathLike, images: Any, *, batch_size: int = 32, normalize: bool = False,
          device: str | torch.device | None = None, runtime: str = "auto") -> Tensor:
    """Embeddings of images: a float32 (N, D) tensor on the CPU, one row per image in order (a single image gives
    (1, D)), as ``vitlab embed`` writes them.

    An embedding is the model's pre-logits features, what timm's ``model.forward_head(model.forward_features(x),
    pre_logits=True)`` returns (and ``num_classes=0`` models' ``forward``): the class token, the average of the
    tokens or the pooled map, after ``fc_norm`` and any pre-logits layer, as each family pools (a distilled DeiT:
    the mean of its class and distillation tokens; CrossViT: both branches' tokens concatenated). A backbone
    without a classifier (num_classes 0: a pre-training checkpoint) gives the same. Detectors and segmenters are
    refused (their outputs are per object / pixel), and so is a ViT with ``global_pool=""`` (every token).

    Args:
        model: a vitlab model, or a checkpoint path (vitlab checkpoint, Hugging Face folder, or an ONNX file of a
            backbone, written by ``vitlab export`` from a checkpoint without a classifier), or a runtime from
            :func:`features_runtime`.
        images: as :func:`predict` takes them (file paths, encoded files, PIL images, uint8 arrays or tensors, one
            or a list), decoded and preprocessed exactly as predict does.
        batch_size: images per forward; they are decoded a batch at a time.
        normalize: L2-normalize each row (unit length: dot products are cosine similarities).
        device: as :func:`predict`'s: a path is loaded on the CPU and moved there; a model given is never moved.
        runtime: how a checkpoint path runs (one of :data:`vitlab.export.runtimes.RUNTIMES`; "auto": PyTorch
            float32, ONNX Runtime for an ONNX file). For a model given as a module, another runtime than "auto" /
            "torch" runs on a copy built by :func:`features_runtime` for this call (for ONNX an export each call:
            build the runtime once with :func:`features_runtime` and pass it instead).

    Threads: as :func:`predict`: calls from several threads may share one model (a model in train mode runs in
    eval mode meanwhile and gets its modes back after the last call).

    Example::

        vitlab.embed("runs/mine/model.safetensors", ["a.jpg", "b.jpg"], normalize=True)   # (2, D)
    """
    from vitlab.export.runtimes import RUNTIMES

    if batch_size < 1:
        raise ValueError(f"embed: batch_size must be >= 1, got {batch_size}")
    if runtime not in ("auto", *RUNTIMES):
        raise ValueError(f"embed: runtime must be 'auto' or one of {', '.join(RUNTIMES)}, got {runtime!r}")
    items, _ = _image_list(images, "embed")
    if not items:
        raise ValueError("embed: no images given (an empty list)")
    owned = isinstance(model, (str, os.PathLike))
    source = str(model) if owned else getattr(model, "model_name", type(model).__name__)
    if owned:
        model, _ = load_for_embedding(model, runtime)
    elif hasattr(model, "inner"):  # a runtime: it runs as it was built
        if runtime not in ("auto", model.name):
            raise ValueError(f"embed: runtime={runtime!r}, but the model given is a {model.name!r} runtime; leave "
                             f"runtime out, or build another with features_runtime(model, {runtime!r})")
    elif runtime not in ("auto", "torch"):
        here = _device_of(model)
        model = features_runtime(model, runtime)  # a copy of embed's own, on the CPU
        owned, device = True, here if device is None else device
    features = _features_of(model, source)
    device = _placed(model, device, owned=owned, who="embed")
    transform = eval_transform(model.preprocessing)
    with eval_mode(model):
        rows = [f for _, f in embed_batches(features, items, transform, batch_size=batch_size, device=device,
                                            normalize=normalize)]
    return torch.cat(rows)


__all__ = ["PRE_LOGITS", "SCORE_KINDS", "embed", "embed_batches", "embedding_meaning", "features_runtime",
           "load_for_embedding", "predict", "prepare_image", "score_kind", "to_scores"]
