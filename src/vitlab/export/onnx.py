"""Validated ONNX export: :func:`export_onnx`.

The graph is written to a temporary file beside the target, checked, and only then renamed into place:

1. export with the exporter the installed torch recommends (``torch.onnx.export(dynamo=True)``, which
   needs onnxscript); without onnxscript, or when the dynamo exporter fails, the TorchScript exporter
   (logged);
2. vitlab's metadata goes into the file's ``metadata_props``: model name, config, class names and the
   preprocessing (input size, channel order, mean/std, crop, interpolation);
3. the same real images (``validate_images``, by default digits from the bundled scikit-learn set rendered
   at the model's input size) go through PyTorch and ONNX Runtime after the model's own preprocessing;
   the maximum absolute logit difference and the top-1 agreement are measured, and the file is refused
   (:class:`ExportValidationError`, nothing written) when the difference exceeds ``tolerance``, unless
   ``force=True`` (then the report says so);
4. a dynamic-size export is traced at a larger size (:func:`trace_size`: no 1 x 1 map that the tracer
   would fix) and checked at the model's size and two other sizes, against PyTorch at those sizes; a
   graph that runs there but gives other numbers is refused, never written; the sizes the file takes
   (:func:`size_rule`: multiples of the patch where PyTorch requires them) go into its metadata;
5. ``int8=True``: ONNX Runtime's dynamic quantisation of the linear layers (MatMul/Gemm nodes whose
   weight is a constant), leaving convolutions, LayerNorm, softmax and the attention's activation-by-
   activation products in float; its top-1 agreement with the float PyTorch model, each image run alone,
   must reach ``min_agreement`` (activations are scaled per call, so a batched run's outputs depend on the
   batch: that effect is reported apart).
6. a model whose tensors exceed one file (:data:`MAX_PROTO_BYTES`, protobuf's 2 GiB, less
   :data:`GRAPH_MARGIN_BYTES` for the graph: ViT-H, ViT-g) is written as ``model.onnx`` and its tensors in one
   external data file beside it, ``model.onnx.data``, which the .onnx references by that relative name; the data
   file is renamed into place first, then the .onnx; a data file there is replaced only with the .onnx that uses
   it. An int8 file that fits is one file again.

Families: a model whose config has ``dynamic_img_size`` is rebuilt with it switched on for a dynamic-size
export; shape-dependent branches use :func:`vitlab.layers.size_differs` / ``is_tracing_any_size``, which
the exporter sets to take the general side while tracing (ViT/DeiT/CaiT position-table resampling, Swin's
window padding, crop, patch merging and shift mask, MobileViT's resize to a multiple of its patch), and
sizes are computed with integer ceil-divisions so that they stay symbolic. A family that cannot export a
size-independent graph declares it with a class attribute (or property) ``onnx_fixed_size_reason = "why"``
(CrossViT, T2T, TNT, MLP-Mixer, a Linformer ViT); the exporter then refuses ``dynamic_size`` with that
reason. A family whose inputs must be a multiple of something other than its patch size sets
``input_size_multiple``.

Detection and segmentation models (``task`` "detection" / "segmentation": DETR, SETR) are exported with
their inference outputs as named graph outputs (:data:`TASK_OUTPUTS`: DETR ``logits`` (B, Q, C+1) and
``boxes`` (B, Q, 4, normalised cx, cy, w, h); SETR ``logits`` (B, C, H, W) at the input resolution);
auxiliary outputs (DETR's earlier decoder layers, SETR's auxiliary heads) are training-only and left
out. An exported DETR takes the image only: no padding mask, every pixel is real (as ``pixel_mask=None``).
They are validated the same way, with the dense tasks' own evaluation preprocessing (a resize to the
input size, no crop) and a task agreement: the argmax class of each query (DETR, plus the largest box
difference) or of each pixel (SETR).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import glob
import json
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vitlab.export.runtime import (
    FEATURES_TASK,
    INPUT_NAME,
    METADATA_KEY,
    OUTPUT_NAME,
    OnnxModel,
    _load_header,
    external_data_files,
    graph_tensors,
    require,
)
from vitlab.models.base import Preprocessing
from vitlab.models.base import rebuild as rebuild_model

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 1e-3  # max |logit difference| between ONNX Runtime and PyTorch in float32
DEFAULT_MIN_AGREEMENT = 0.98  # top-1 agreement of an int8 file with the float32 PyTorch model
DEFAULT_NUM_IMAGES = 64
MAX_PROTO_BYTES = 2**31 - 1  # a single-file ONNX model is one protobuf message, smaller than 2 GiB
# room for the rest of the message (nodes, shapes, metadata): a ViT-B/16 graph without its weights is 0.6 MB
GRAPH_MARGIN_BYTES = 64 * 2**20
DETECTION_NO_MASK = ("none: the exported detector takes the image only and treats every pixel as real (PyTorch's "
                     "pixel_mask=None); run images one by one, or batch images of one size, never padded ones")


@dataclass(frozen=True)
class TaskOutputs:
    """The named outputs of an exported model of one task, what they mean, and what the validation's
    agreement measures (the argmax of ``logits`` over ``class_dim``, compared position by position)."""

    names: tuple[str, ...]
    meaning: dict[str, str]
    agreement: str
    class_dim: int = -1
    # "argmax": the class each position's logits pick; "labels": a multi-label head's labels (logit >= 0, a
    # sigmoid's 0.5), the same set for the whole image
    decide: str = "argmax"


# a sigmoid-scored (multi-label) classifier: its validation compares each image's set of labels
MULTI_LABEL_OUTPUTS = TaskOutputs(
    ("logits",), {"logits": "class logits (batch, classes)"}, "label-set agreement (threshold 0.5)",
    decide="labels")


TASK_OUTPUTS: dict[str, TaskOutputs] = {
    "classification": TaskOutputs(
        ("logits",), {"logits": "class logits (batch, classes); softmax gives class probabilities"},
        "top-1 agreement"),
    "detection": TaskOutputs(
        ("logits", "boxes"),
        {"logits": "class logits (batch, queries, classes + 1); the last class is 'no object'; softmax gives "
                   "probabilities",
         "boxes": "boxes (batch, queries, 4): normalised (cx, cy, w, h) in [0, 1], relative to the input image"},
        "per-query class agreement"),
    "segmentation": TaskOutputs(
        ("logits",), {"logits": "per-pixel class logits (batch, classes, H, W) at the input resolution; argmax over "
                                "the classes gives the mask"},
        "per-pixel class agreement", class_dim=1),
}


# What a classifier's logits become, by the model's ``score_function`` (a multi-label Hugging Face checkpoint
# scores each class with a sigmoid; a regression one gives raw values).
SCORE_MEANINGS = {
    "softmax": "softmax over the classes gives class probabilities",
    "sigmoid": "multi-label: a sigmoid of each logit gives that class's own probability (no softmax)",
    "none": "raw scores (regression): use them as they are (no softmax, no sigmoid)",
}


# A backbone without a classifier (num_classes=0: MAE / DINO / BEiT pre-training) exports its pooled features: the
# metadata's task says so, for deployments and for vitlab predict / eval, which refuse to read them as class scores.
FEATURES_MEANING = ("features (batch, dim): the pooled pre-logit features of a backbone without a classifier; not "
                    "class scores (no softmax, no classes): for k-NN, retrieval or a new head")


def output_meanings(task: str, spec: TaskOutputs, score_function: str) -> dict[str, str]:
    """Each output's meaning; a classifier's logits as its ``score_function`` turns them into scores."""
    if task == FEATURES_TASK:
        return {"logits": FEATURES_MEANING}
    if task != "classification":
        return dict(spec.meaning)
    return {"logits": f"class logits (batch, classes); {SCORE_MEANINGS.get(score_function, SCORE_MEANINGS['softmax'])}"}


def task_outputs(model: nn.Module) -> tuple[str, TaskOutputs]:
    task = getattr(model, "task", "classification")
    if task not in TASK_OUTPUTS:
        raise ExportError(f"{getattr(model, 'model_name', type(model).__name__)}: vitlab export writes "
                          f"{', '.join(TASK_OUTPUTS)} models, not a {task!r} one")
    if task == "classification" and getattr(model, "score_function", "softmax") == "sigmoid" \
            and (getattr(model, "num_classes", 0) or 0) > 1:
        return task, MULTI_LABEL_OUTPUTS
    return task, TASK_OUTPUTS[task]


class ExportError(ValueError):
    """The model cannot be exported as asked (and why)."""


class ExportValidationError(ExportError):
    """The exported graph disagrees with PyTorch beyond the tolerance; nothing was written."""

    def __init__(self, message: str, report: ExportReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass(kw_only=True)
class SizeCheck:
    """PyTorch vs ONNX Runtime at one input size."""

    size: tuple[int, int]
    max_abs_diff: float
    top1_agreement: float  # the task's agreement (see ExportReport)


@dataclass(kw_only=True)
class ExportReport:
    """What :func:`export_onnx` did and measured (``format()`` for text, ``to_dict()`` for JSON).

    ``max_abs_diff`` is the largest difference over all outputs (``output_diffs`` has each output's);
    ``top1_agreement`` is the task's agreement (``agreement``): top-1 of a classifier, the argmax class
    per query of a detector, per pixel of a segmenter."""

    path: str
    model: str
    task: str = "classification"
    agreement: str = TASK_OUTPUTS["classification"].agreement
    exporter: str = ""
    opset: int | None = None
    input_size: tuple[int, int, int] = (3, 224, 224)
    dynamic_batch: bool = False
    dynamic_size: bool = False
    int8: bool = False
    images: int = 0
    image_source: str = ""
    tolerance: float = DEFAULT_TOLERANCE
    max_abs_diff: float = float("nan")
    output_diffs: dict[str, float] = field(default_factory=dict)
    top1_agreement: float = float("nan")
    other_sizes: list[SizeCheck] = field(default_factory=list)
    int8_max_abs_diff: float | None = None
    int8_output_diffs: dict[str, float] | None = None
    int8_top1_agreement: float | None = None  # each image run alone (batch 1)
    # a dynamic-batch int8 file run on the whole validation batch at once vs each image alone: dynamic
    # quantisation scales activations per call, so an image's outputs depend on the rest of its batch
    int8_batched_max_abs_diff: float | None = None
    int8_batched_agreement: float | None = None
    min_agreement: float = DEFAULT_MIN_AGREEMENT
    timing_batch: int = 0
    torch_images_per_s: float | None = None
    onnx_images_per_s: float | None = None
    export_s: float = 0.0
    file_bytes: int = 0
    # a model whose tensors exceed a single file's limit (MAX_PROTO_BYTES): its weights in this external data
    # file beside ``path`` (``model.onnx.data``), which the .onnx references by its name
    data_path: str | None = None
    data_bytes: int = 0
    written: bool = False
    forced: bool = False
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # checks that passed only after a closer look (float64)

    @property
    def speedup(self) -> float | None:
        if self.torch_images_per_s and self.onnx_images_per_s:
            return self.onnx_images_per_s / self.torch_images_per_s
        return None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["speedup"] = self.speedup
        return d

    def format(self) -> str:
        c, h, w = self.input_size
        data = f" + {Path(self.data_path).name}" if self.data_path else ""
        lines = [f"{self.model} -> {self.path}{data}" + ("" if self.written else " (NOT written)"),
                 f"  exporter {self.exporter}, opset {self.opset}, input (batch, {c}, {h}, {w}), batch "
                 f"{'dynamic' if self.dynamic_batch else 'fixed 1'}, size {'dynamic' if self.dynamic_size else 'fixed'}"
                 + (", int8 linear layers" if self.int8 else "")]
        if self.task == FEATURES_TASK:
            lines.append("  exported features: a backbone without a classifier (num_classes 0); its output 'logits' "
                         "holds (batch, dim) pooled features, not class scores (metadata task 'features'; vitlab "
                         "predict refuses it, vitlab eval scores it by k-NN or a linear probe)")
        lines.append(f"  validation: {self.images} real images ({self.image_source}), model's own preprocessing")
        lines.append(f"  float32 ONNX vs PyTorch: {_diffs_text(self.output_diffs, self.max_abs_diff, '.2e')} (tolerance "
                     f"{self.tolerance:g}), {self.agreement} {100 * self.top1_agreement:.1f}%")
        lines.extend(f"  note: {n}" for n in self.notes)
        for s in self.other_sizes:
            lines.append(f"  at {s.size[0]}x{s.size[1]}: max |diff| {s.max_abs_diff:.2e}, {self.agreement} "
                         f"{100 * s.top1_agreement:.1f}%")
        if self.int8_top1_agreement is not None:
            lines.append(f"  int8 ONNX vs float32 PyTorch: {self.agreement} {100 * self.int8_top1_agreement:.1f}% "
                         f"(required {100 * self.min_agreement:.0f}%), "
                         f"{_diffs_text(self.int8_output_diffs or {}, self.int8_max_abs_diff, '.3g')}, "
                         f"each image run alone")
        if self.int8_batched_agreement is not None:
            lines.append(f"  int8 batching effect: the {self.images} images in batches of up to {VALIDATION_BATCH} vs "
                         f"each alone: max |diff| "
                         f"{self.int8_batched_max_abs_diff:.3g}, {self.agreement} {100 * self.int8_batched_agreement:.1f}% "
                         f"(activation scales are per batch: outputs depend on the other images in the batch)")
        if self.speedup is not None:
            lines.append(f"  speed at batch {self.timing_batch}: PyTorch {self.torch_images_per_s:.1f} img/s, "
                         f"ONNX Runtime{' int8' if self.int8 else ''} {self.onnx_images_per_s:.1f} img/s "
                         f"({self.speedup:.2f}x)")
        if self.file_bytes and self.data_path:
            lines.append(f"  files {Path(self.path).name} {self.file_bytes / 1e6:.1f} MB + {Path(self.data_path).name} "
                         f"{self.data_bytes / 1e6:.1f} MB (the weights, over a single ONNX file's 2 GB: keep both "
                         f"files in one folder), export took {self.export_s:.1f} s")
        elif self.file_bytes:
            lines.append(f"  file {self.file_bytes / 1e6:.1f} MB, export took {self.export_s:.1f} s")
        for p in self.problems:
            lines.append(f"  {'FORCED past: ' if self.forced else 'problem: '}{p}")
        return "\n".join(lines)


def _diffs_text(diffs: dict[str, float], overall: float | None, fmt: str) -> str:
    """The report's difference figure: one for a single output, one per output (``max |boxes diff|``) for
    several."""
    if len(diffs) <= 1:
        return f"max |logit diff| {format(overall if overall is not None else float('nan'), fmt)}"
    return ", ".join(f"max |{k} diff| {format(v, fmt)}" for k, v in diffs.items())


# ------------------------------------------------------------------------------------------- images
def bundled_images(n: int = DEFAULT_NUM_IMAGES) -> Tensor:
    """``n`` real images that ship with vitlab: digits of scikit-learn's bundled set (uint8 (n, 1, 8, 8)),
    evenly spread over the set; the model's preprocessing resizes them to its input size."""
    from vitlab.data.sources import read_digits

    images, _, _ = read_digits()
    idx = torch.linspace(0, len(images) - 1, steps=min(n, len(images))).long()
    return images[idx].clone()


def images_from_source(source: str | os.PathLike, n: int = DEFAULT_NUM_IMAGES) -> Tensor:
    """``n`` raw images (uint8 (n, C, H, W), one size) from a data source (``vitlab.data.build_dataset``'s
    forms: a folder, ``mnist:DIR``, ``digits``...), test split, evenly spread. Only the pixels are used: a folder
    whose label file gives images sets of labels (a multi-label model's data) gives them too."""
    from vitlab.data import build_dataset
    from vitlab.data.errors import DatasetError
    from vitlab.data.multilabel import build_multilabel_dataset

    try:
        ds = build_dataset(source, split="test", transform=None)
    except DatasetError as e:
        try:
            ds = build_multilabel_dataset(source, split="test", transform=None)
        except (DatasetError, ValueError):
            raise e from None
    idx = torch.linspace(0, len(ds) - 1, steps=min(n, len(ds))).long().tolist()
    imgs = [ds[i][0] for i in idx]
    sizes = {tuple(t.shape) for t in imgs}
    if len(sizes) > 1:  # a folder of assorted sizes: the preprocessing handles each; keep them as a list
        return imgs  # type: ignore[return-value]
    return torch.stack(imgs)


def preprocess(images: Any, pre: Preprocessing, task: str = "classification") -> Tensor:
    """Raw images -> the model's input batch (B, C, H, W), with ``pre``'s eval pipeline: a
    classifier's (resize, centre crop), or for detection / segmentation the dense tasks' evaluation
    transform (bilinear resize to the input size, no crop; :class:`~vitlab.data.dense.DenseTransform`).

    ``images``: a list (or a (B, C, H, W) batch) of uint8 (C, H, W) tensors, PIL images, uint8 (H, W[, C])
    arrays or file paths; a path is decoded as ``vitlab predict`` decodes it (``load_image`` with the
    transform's ``min_source_size`` for a classifier)."""
    import numpy as np
    from PIL import Image

    from vitlab.data.image import load_image
    from vitlab.data.transforms import eval_transform, image_tensor

    if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
        images = [images]  # one image
    t = eval_transform(pre) if task == "classification" else None
    min_size = t.min_source_size if t is not None else None

    def decoded(img: Any) -> Tensor:
        if isinstance(img, (str, os.PathLike)):
            return load_image(img, min_size=min_size)
        return image_tensor(img, "preprocess")

    if t is not None:
        return torch.stack([t(decoded(img)) for img in images])
    from vitlab.data.dense import resize_sample
    from vitlab.data.functional import normalize, to_float
    from vitlab.data.image import to_channels

    c, h, w = pre.input_size
    return torch.stack([normalize(to_float(resize_sample({"image": to_channels(decoded(img), c)}, (h, w))["image"]),
                                  pre.mean, pre.std) for img in images])


def _resolve_images(validate_images: Any, n: int) -> tuple[Any, str]:
    if validate_images is None:
        return bundled_images(n), "bundled scikit-learn digits"
    if isinstance(validate_images, (str, os.PathLike)):
        return images_from_source(validate_images, n), str(validate_images)
    if isinstance(validate_images, Tensor):
        if validate_images.ndim != 4 or validate_images.dtype != torch.uint8:
            raise ValueError(f"validate_images: expected uint8 images (N, C, H, W), got {validate_images.dtype} "
                             f"{tuple(validate_images.shape)}")
        return validate_images, f"{len(validate_images)} given images"
    return list(validate_images), f"{len(validate_images)} given images"


# ------------------------------------------------------------------------------------------ helpers
def compare_outputs(spec: TaskOutputs, ref: dict[str, Tensor], out: dict[str, Tensor]) -> tuple[dict[str, float], float]:
    """({output: max |difference|}, agreement of the argmax of ``logits`` over the classes, position by
    position: per image, per query or per pixel; for a multi-label head, of each image's set of labels)."""
    diffs = {}
    for name in spec.names:
        r, o = ref[name].float(), out[name].float()
        if r.shape != o.shape:
            raise ExportError(f"output {name!r} shapes differ: PyTorch {tuple(r.shape)}, ONNX {tuple(o.shape)}")
        diffs[name] = (r - o).abs().max().item() if r.numel() else 0.0
    r, o = ref["logits"].float(), out["logits"].float()
    if not r.numel():
        agree = 1.0
    elif spec.decide == "labels":
        agree = ((r >= 0) == (o >= 0)).all(dim=-1).float().mean().item()
    else:
        agree = (r.argmax(spec.class_dim) == o.argmax(spec.class_dim)).float().mean().item()
    return diffs, agree


# Images re-run in float64 when an output exceeds the tolerance, and how much further from float64 than
# PyTorch's own float32 the ONNX file may be.
FLOAT64_IMAGES = 16
FLOAT64_SLACK = 2.0


@dataclass(frozen=True)
class Float64Verdict:
    accepted: bool
    text: str


def float64_verdict(model: nn.Module, x: Tensor, spec: TaskOutputs, name: str, ref: dict[str, Tensor],
                    got: dict[str, Tensor], tolerance: float) -> Float64Verdict | None:
    """Whether output ``name`` exceeds the tolerance because the graph is wrong or because the inputs are
    ill-conditioned in float32 (a LayerNorm over near-constant tokens amplifies rounding: a trained Swin-T on
    flat CIFAR-10 images was 8.9e-4 from float64 in PyTorch float32 and 9.2e-4 in ONNX Runtime). The images where
    the two differ most go through a float64 copy of the model: the file is accepted when ONNX Runtime is at
    most ``FLOAT64_SLACK`` x as far from float64 as PyTorch's float32 is (plus the tolerance). None when the
    model does not run in float64. Costs a float64 copy of the model (twice its float32 memory), only here."""
    import copy

    diff = (ref[name].float() - got[name].float()).abs().flatten(1).amax(1)
    idx = diff.argsort(descending=True)[:FLOAT64_IMAGES]
    try:
        r64 = _outputs(copy.deepcopy(model).double(), x[idx].double(), spec)[name]
    except (RuntimeError, TypeError, ValueError):
        return None
    torch_err = (ref[name][idx].double() - r64).abs().max().item()
    onnx_err = (got[name][idx].double() - r64).abs().max().item()
    accepted = onnx_err <= FLOAT64_SLACK * torch_err + tolerance
    text = (f"on the {len(idx)} images where float32 ONNX {name} and PyTorch differ most, against float64 PyTorch: "
            f"PyTorch float32 is {torch_err:.3g} off, ONNX Runtime {onnx_err:.3g}")
    return Float64Verdict(accepted, text + (" (ill-conditioned inputs, not a graph error: accepted)" if accepted
                                            else ""))


def _worst(diffs: dict[str, float]) -> float:
    """The largest difference; NaN if any is NaN (a NaN must never pass a tolerance check)."""
    vals = list(diffs.values())
    return float("nan") if any(v != v for v in vals) else max(vals, default=0.0)


# images per ONNX Runtime call in validation: one call on every image (64 at 800x800 for a detector) can need
# far more memory than the model (a DETR's encoder attention grows with the tokens of the whole batch)
VALIDATION_BATCH = 8


def _onnx_outputs(onnx_model: OnnxModel, x: Tensor, batch: int = VALIDATION_BATCH) -> dict[str, Tensor]:
    """ONNX Runtime's outputs by name, through the adapter's forward (as predict / detect run it), in calls of at
    most ``batch`` images (a file with a fixed batch of 1 runs them one by one), concatenated."""
    parts = []
    for i in range(0, len(x), batch):
        out = onnx_model(x[i:i + batch])
        parts.append(out if isinstance(out, dict) else {"logits": out})
    return parts[0] if len(parts) == 1 else {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _one_by_one(onnx_model: OnnxModel, x: Tensor) -> dict[str, Tensor]:
    """ONNX Runtime's outputs for each image of ``x`` run alone (batch 1), concatenated."""
    parts = [_onnx_outputs(onnx_model, x[i:i + 1]) for i in range(len(x))]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


class InferenceOutputs(nn.Module):
    """A detection / segmentation model as a graph of named tensors: ``forward(images)`` returns its
    inference outputs (``names``) in order, without the training-only auxiliary outputs."""

    def __init__(self, model: nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        out = self.model(x)
        return tuple(out[k] for k in self.names)


def _outputs(model: nn.Module, x: Tensor, spec: TaskOutputs) -> dict[str, Tensor]:
    """PyTorch's outputs by name, in the dtype of ``x`` (float32, or float64 for :func:`float64_verdict`)."""
    from vitlab.train.evaluate import logits_of

    with torch.no_grad():
        out = model(x)
    if isinstance(out, dict):
        return {k: out[k].to(x.dtype) for k in spec.names}
    return {"logits": logits_of(out).to(x.dtype)}


def size_multiple(model: nn.Module) -> tuple[int, int]:
    """The step between valid input sizes: ``model.input_size_multiple``, else its patch (or hybrid stem's
    reduction), else 32 (a ResNet's stride)."""
    from vitlab.layers import to_2tuple

    m = getattr(model, "input_size_multiple", None)
    if m is not None:
        return to_2tuple(m)
    pe = getattr(model, "patch_embed", None)
    if pe is not None and getattr(pe, "patch_size", None) is not None:
        return to_2tuple(pe.patch_size)
    red = getattr(getattr(model, "cfg", None), "reduction", None)
    return to_2tuple(red) if isinstance(red, int) else (32, 32)


def other_sizes(model: nn.Module, h: int, w: int) -> list[tuple[int, int]]:
    """Two sizes besides (h, w) a dynamic-size export is checked at: one step larger (square), and a
    non-square one two steps taller."""
    sh, sw = size_multiple(model)
    return [(h + sh, w + sw), (h + 2 * sh, w)]


def trace_size(model: nn.Module, h: int, w: int) -> tuple[int, int]:
    """The input size a dynamic-size graph is traced at: about twice the model's, and not square.

    The tracer fixes any size that is 1 at the traced input (a feature map of 1 x 1, a single window per
    axis, a 1 x 1 patch grid: PyTorch specialises sizes 0 and 1) and may tie sizes that happen to be equal;
    a small model traced at its own size has such maps in its last stages, and its graph would be wrong at
    larger inputs. Twice the size, one step taller, gives every stage at least two of everything."""
    sh, _ = size_multiple(model)
    return 2 * h + sh, 2 * w


def _any_size_model(model: nn.Module) -> nn.Module:
    """The model rebuilt to accept any input size, where its config (or its backbone's, for DETR / SETR)
    has ``dynamic_img_size`` switched off; otherwise ``model`` itself."""
    cfg = getattr(model, "cfg", None)
    if cfg is None or not dataclasses.is_dataclass(cfg):
        return model
    fields = {f.name for f in dataclasses.fields(cfg)}
    if "dynamic_img_size" in fields:
        return model if cfg.dynamic_img_size else rebuild(model, dynamic_img_size=True)
    backbone_cfg = getattr(getattr(model, "backbone", None), "cfg", None)
    if "backbone_args" in fields and dataclasses.is_dataclass(backbone_cfg) \
            and "dynamic_img_size" in {f.name for f in dataclasses.fields(backbone_cfg)} \
            and not backbone_cfg.dynamic_img_size:
        return rebuild(model, backbone_args={**cfg.backbone_args, "dynamic_img_size": True})
    return model


def rebuild(model: nn.Module, **changes: Any) -> nn.Module:
    """A copy of ``model`` built from its config with ``changes``, carrying its weights (position tables
    resampled where the size changed): :func:`vitlab.models.base.rebuild`, its refusals as ExportError."""
    from vitlab.checkpoints import CheckpointError

    try:
        return rebuild_model(model, **changes)
    except CheckpointError:
        raise
    except ValueError as e:
        raise ExportError(str(e)) from e


def size_rule(model: nn.Module, c: int, h: int, w: int, *, device: str = "cpu") -> dict[str, list[int]]:
    """The input sizes a dynamic-size graph takes, as the PyTorch model does: ``{"multiple": [mh, mw], "min":
    [h, w]}``. A family whose patch embedding checks divisibility (ViT, DeiT, CaiT, BEiT-3, XCiT, the R50 hybrid,
    SETR) refuses a size one pixel past a multiple of its step, where the graph would drop the last rows and
    columns (or fail inside ONNX Runtime): the file takes multiples of the step. The families that pad or resize
    per input (Swin, MobileViT, ResNet, CCT, DETR) take any size. The minimum is the smallest of 1, 2, 4...
    steps (up to the model's own size) that PyTorch runs (a hybrid's stem needs more than one patch).
    ``device="meta"`` for a model built there (shapes only: an operator meta tensors cannot run counts as a
    refusal, so the rule errs on the strict side)."""
    def runs(hw: tuple[int, int]) -> bool:
        try:
            with torch.no_grad():
                model(torch.zeros(1, c, *hw, device=device))
        except Exception:  # any refusal: PyTorch does not take this size
            return False
        return True

    sh, sw = size_multiple(model)
    mh, mw = (1, 1) if (sh, sw) == (1, 1) or runs((h + 1, w + 1)) else (sh, sw)
    k = 1
    while k * mh < h and k * mw < w and not runs((k * mh, k * mw)):
        k *= 2
    low = (k * mh, k * mw) if k * mh < h and k * mw < w else (h, w)
    return {"multiple": [mh, mw], "min": list(low)}


def dense_resize(model: nn.Module, task: str, pre: Preprocessing, dynamic_size: bool) -> dict[str, Any] | None:
    """How vitlab resizes a detector's / segmenter's images for the exported file (``tasks.run.transform_for``):
    SETR and a fixed-size DETR squash both sides to the input size; a dynamic-size DETR takes the shorter side
    to the input size with the longer one capped at ``max_size``. No crop either way; bilinear. None for a
    classifier (its ``preprocessing`` says it)."""
    if task == "classification":
        return None
    _, h, w = pre.input_size
    if task == "segmentation" or not dynamic_size:
        return {"mode": "squash", "size": [h, w], "interpolation": "bilinear"}
    from vitlab.tasks.run import transform_for

    t = transform_for(model, train=False)
    return {"mode": "shorter_side", "shorter": int(t.size), "max_size": t.max_size, "interpolation": "bilinear"}


def metadata(model: nn.Module, pre: Preprocessing, *, class_names: list[str] | None, dynamic_batch: bool,
             dynamic_size: bool, int8: bool, sizes: dict[str, list[int]] | None = None) -> dict[str, str]:
    """The ``metadata_props`` entries: the full JSON record under "vitlab", plus flat copies that a
    deployment can read without knowing vitlab. ``sizes``: :func:`size_rule` of a dynamic-size export."""
    from vitlab import __version__
    from vitlab.checkpoints.vitlab_format import config_to_dict

    names = list(class_names) if class_names is not None else getattr(model, "class_names", None)
    task, spec = task_outputs(model)
    score = getattr(model, "score_function", "softmax")
    if task == "classification" and not model.num_classes:  # a backbone: its output is features
        task, score, names = FEATURES_TASK, "none", None
    elif task == "classification" and names is not None and len(names) != model.num_classes:
        if class_names is not None:
            raise ExportError(f"class_names: {len(names)} names for a model with {model.num_classes} classes")
        log.warning("%s.class_names has %d names but its head has %d classes: exported without class names",
                    getattr(model, "model_name", type(model).__name__), len(names), model.num_classes)
        names = None
    meanings = output_meanings(task, spec, score)
    c, h, w = pre.input_size
    # the order the weights expect (a Hugging Face MobileViT wants BGR): a deployment reading only these
    # keys must feed what vitlab's own preprocessing feeds
    channel_order = {1: "L", 3: pre.channel_order}.get(c, f"{c} channels")
    resize = dense_resize(model, task, pre, dynamic_size)
    record = {
        "format": "vitlab", "version": 1, "vitlab_version": __version__,
        "model": getattr(model, "model_name", type(model).__name__),
        "config": config_to_dict(model.cfg) if dataclasses.is_dataclass(getattr(model, "cfg", None)) else None,
        "class_names": names,
        "preprocessing": pre.to_dict(),
        "input": {"name": INPUT_NAME, "layout": "NCHW", "dtype": "float32", "channel_order": channel_order,
                  "pixel_scale": "values in [0, 1] (uint8 / 255), then (x - mean) / std",
                  "dynamic_batch": dynamic_batch, "dynamic_size": dynamic_size},
        "task": task,
        "num_classes": int(model.num_classes),
        "score_function": score,
        "output": {"name": OUTPUT_NAME, "meaning": meanings[OUTPUT_NAME]},  # the (first) logits output
        "outputs": [{"name": k, "meaning": meanings[k]} for k in spec.names],
        "int8": int8,
    }
    if dynamic_size and sizes is not None:
        record["input"]["size_multiple"], record["input"]["min_size"] = sizes["multiple"], sizes["min"]
    if resize is not None:  # a dense task's own resize (no crop), which its Preprocessing cannot express
        record["input"]["resize"] = resize
    if task == "detection":
        record["input"]["padding_mask"] = DETECTION_NO_MASK
    flat = {
        METADATA_KEY: json.dumps(record),
        "model_name": record["model"],
        "class_names": json.dumps(names),
        "input_size": json.dumps([c, h, w]),
        "channel_order": channel_order,
        "layout": "NCHW",
        "mean": json.dumps(list(pre.mean)),
        "std": json.dumps(list(pre.std)),
        "crop_pct": str(pre.crop_pct),
        "crop_mode": pre.crop_mode,
        "crop_offset": pre.crop_offset,  # "floor": the crop at margin // 2 (Hugging Face); absent in older files: "round"
        "interpolation": pre.interpolation,
        "pixel_scale": "1/255",
        "task": task,
        "num_classes": str(int(model.num_classes)),
        "score_function": score,
        "output_names": json.dumps(list(spec.names)),
        "outputs": json.dumps(meanings),
    }
    if dynamic_size and sizes is not None:
        flat["size_multiple"], flat["min_size"] = json.dumps(sizes["multiple"]), json.dumps(sizes["min"])
    if resize is not None:
        flat.update(crop_pct="1.0", interpolation=resize["interpolation"])
        if resize["mode"] == "squash":  # both sides to the input size
            flat["crop_mode"] = "squash"
        else:  # shorter side to resize_shorter, the longer one at most max_size, no crop
            flat.update(crop_mode="none", resize_shorter=str(resize["shorter"]), max_size=str(resize["max_size"]))
    return flat


def _torchscript_exporter() -> dict[str, bool]:
    """The argument that picks torch.onnx.export's TorchScript exporter: ``dynamo=False`` where the function
    takes it (torch >= 2.5, where dynamo became an option), nothing before (the TorchScript exporter was the
    only one)."""
    import inspect

    return {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporters warn at length about things that do not concern the user (torchvision ops, pytree
    deprecations); keep the CLI's output readable. Errors still propagate."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "onnx_ir", "onnxruntime")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    root = logging.getLogger()
    # onnxruntime.quantization advises through the root logger itself (logging.warning); a filter on the root
    # logger drops only records made there, not vitlab's own, which reach the root's handlers by propagation
    drop_root_records = _DropBelow(logging.ERROR)
    root.addFilter(drop_root_records)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.removeFilter(drop_root_records)
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


@contextlib.contextmanager
def _root_logging_kept() -> Iterator[None]:
    """The root logger's handlers and level as they were, after the block: onnxruntime.quantization logs through
    the module-level ``logging.info`` / ``logging.warning``, which call ``logging.basicConfig()`` when the root
    logger has no handler, and that handler would stay (a notebook's own ``logging.basicConfig(...)`` afterwards
    would then do nothing). A NullHandler meanwhile makes those implicit calls no-ops."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    placeholder = logging.NullHandler()
    if not handlers:
        root.addHandler(placeholder)
    try:
        yield
    finally:
        for h in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(h)  # the placeholder, and whatever else the block added
        for h in handlers:
            if h not in root.handlers:
                root.addHandler(h)
        root.setLevel(level)


class _DropBelow(logging.Filter):
    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


def _has_onnxscript() -> bool:
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


def export_graph(model: nn.Module, x: Tensor, path: str, *, dynamic_batch: bool, dynamic_size: bool,
                 opset: int | None, output_names: tuple[str, ...] = (OUTPUT_NAME,), external_data: bool = False) -> str:
    """Write the bare graph of ``model`` traced on ``x`` (outputs named ``output_names``); returns which
    exporter wrote it. ``external_data``: the dynamo exporter writes the weights into ``path + ".data"`` (a
    model over 2 GB; the TorchScript exporter decides that itself)."""
    from vitlab.layers import tracing_any_size

    any_size = tracing_any_size() if dynamic_size else contextlib.nullcontext()
    axes = {**({0: "batch"} if dynamic_batch else {}), **({2: "height", 3: "width"} if dynamic_size else {})}
    dynamo_error: Exception | None = None
    if _has_onnxscript():
        try:
            with _quiet_exporter(), any_size, torch.no_grad():
                torch.onnx.export(model, (x,), path, dynamo=True, input_names=[INPUT_NAME],
                                  output_names=list(output_names), opset_version=opset, external_data=external_data,
                                  dynamic_shapes=(axes,) if axes else None, verbose=False,
                                  optimize=True)
            written = file_opset(path)
            if opset is None or written == opset:
                return "torch.onnx dynamo"
            if written is not None and opset > written:
                # it builds an opset-18 graph and converts it to the opset asked for; that conversion failed
                default = getattr(getattr(torch.onnx, "_constants", None), "ONNX_DEFAULT_OPSET", None)
                raise ExportError(f"--opset {opset}: the installed exporter does not support opset {opset} (it could "
                                  f"not convert its opset-{written} graph to it); ask for an older one, or leave "
                                  f"--opset out" + (f" (it then writes opset {default})" if default else ""))
            # below the dynamo exporter's own minimum (18): the TorchScript exporter writes older opsets
            log.info("--opset %d: the dynamo exporter wrote opset %s; using the TorchScript exporter", opset, written)
        except ExportError:
            raise
        except Exception as e:  # the dynamo exporter's failures come from many layers; report and fall back
            dynamo_error = e
            log.warning("the dynamo ONNX exporter failed (%s: %s); trying the TorchScript exporter",
                        type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "")
    else:
        log.warning("onnxscript is not installed: using the TorchScript ONNX exporter (pip install 'vitlab[export]' "
                    "for the exporter torch recommends)")
    dyn_axes = {INPUT_NAME: axes, **{k: ({0: "batch"} if dynamic_batch else {}) for k in output_names}} if axes else None
    printed: list[str] = []
    try:  # it prints its whole TorchScript graph (from C++) when it fails: captured, an excerpt goes in the error
        with _quiet_exporter(), _captured_output(printed), any_size, torch.no_grad():
            torch.onnx.export(model, (x,), path, input_names=[INPUT_NAME], **_torchscript_exporter(),
                              output_names=list(output_names), opset_version=opset or 17, dynamic_axes=dyn_axes,
                              do_constant_folding=True)
    except Exception as e:
        extra = f"; the dynamo exporter failed first with {type(dynamo_error).__name__}: {dynamo_error}" \
            if dynamo_error else ""
        lines = "".join(printed).strip().splitlines()
        if lines:
            extra += f" (the exporter printed {len(lines)} lines, starting: {lines[0][:120]}...)"
        raise ExportError(f"ONNX export of {getattr(model, 'model_name', type(model).__name__)} failed: "
                          f"{type(e).__name__}: {e}{extra}") from e
    return "torch.onnx TorchScript"


@contextlib.contextmanager
def _captured_output(into: list[str]) -> Iterator[None]:
    """What the process writes to its stdout and stderr (file descriptors 1 and 2, C++ included) within the
    block, appended to ``into`` instead of shown. Where the descriptors cannot be duplicated, nothing is
    captured."""
    import ctypes
    import sys

    def flush() -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        with contextlib.suppress(Exception):
            ctypes.CDLL(None).fflush(None)  # C stdio buffers (std::cout writes through them)

    flush()
    with tempfile.TemporaryFile() as tmp:
        try:
            saved = [os.dup(1), os.dup(2)]
        except OSError:
            saved = []
        try:
            for fd in ([1, 2] if saved else []):
                os.dup2(tmp.fileno(), fd)
            yield
        finally:
            if saved:
                flush()
                for fd, old in zip((1, 2), saved):
                    os.dup2(old, fd)
                    os.close(old)
                tmp.seek(0)
                into.append(tmp.read().decode(errors="replace"))


def linear_nodes(path: str) -> list[str]:
    """Names of the MatMul/Gemm nodes whose second operand is a constant weight: the linear layers
    (the attention's query-key and weight-value products multiply two activations and are left out)."""
    proto = _load_header(path)  # names only: a large model's weights stay in its .data
    consts = {t.name for t in proto.graph.initializer}
    consts |= {o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in proto.graph.node
            if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in consts]


def quantize_int8(src: str, dst: str) -> int:
    """ONNX Runtime dynamic int8 quantisation of ``src``'s linear layers into ``dst``; returns how many
    layers were quantised. Weights int8 per output channel, activations quantised per call (uint8).

    A ``src`` with external data (over 2 GB) gives a ``dst`` with its tensors in ``dst + ".data"``
    (:func:`_set_metadata` makes it one file again where the quantised model fits)."""
    with _root_logging_kept():
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.quantization.shape_inference import quant_pre_process

    nodes = linear_nodes(src)
    if not nodes:
        raise ExportError(f"{src}: found no linear layer (MatMul/Gemm with a constant weight) to quantise")
    src, dst = os.path.abspath(src), os.path.abspath(dst)
    prepared = dst + ".prep.onnx"
    external = bool(external_data_files(_load_header(src), os.path.dirname(src)))
    # a model over 2 GB cannot be one protobuf message: ORT's steps write (and read) their tensors in one file beside
    big = dict(save_as_external_data=True, all_tensors_to_one_file=True,
               external_data_location=os.path.basename(prepared) + ".data") if external else {}
    cwd, scratch = os.getcwd(), tempfile.mkdtemp(prefix="vitlab-int8-")
    try:
        with _root_logging_kept(), _quiet_exporter():
            try:  # shape inference first, as ORT recommends
                # where it fails, ORT saves its partial model into the working directory: a scratch folder
                os.chdir(scratch)
                quant_pre_process(src, prepared, skip_optimization=True, **big)
            except Exception as e:  # its symbolic pass cannot follow some any-size graphs (MobileViT's resizes)
                log.info("int8: symbolic shape inference failed (%s); using ONNX's own shape inference", e)
                _remove_with_data(prepared)  # onnx appends to an existing data file
                quant_pre_process(src, prepared, skip_optimization=True, skip_symbolic_shape=True, **big)
            finally:
                os.chdir(cwd)
                shutil.rmtree(scratch, ignore_errors=True)
            nodes = [n for n in linear_nodes(prepared) if n in set(nodes)] or nodes
            quantize_dynamic(prepared, dst, op_types_to_quantize=["MatMul", "Gemm"], nodes_to_quantize=nodes,
                             per_channel=True, weight_type=QuantType.QInt8, use_external_data_format=external)
    finally:
        _remove_with_data(prepared)
    return len(nodes)


def _remove_with_data(path: str) -> None:
    """Remove ``path`` and its data file (``path + ".data"``) where they exist."""
    for f in (path, path + ".data"):
        if os.path.exists(f):
            os.remove(f)


def data_path_of(path: str | os.PathLike) -> Path:
    """The external data file of a large ONNX file: ``model.onnx.data`` beside ``model.onnx`` (the name torch's
    exporter and onnx give it); the .onnx references it by that name, relative to its folder."""
    path = Path(path)
    return path.with_name(path.name + ".data")


def tensor_bytes(proto: Any) -> int:
    """The bytes of an ONNX model's tensors, those in external data files included (from their shapes)."""
    import numpy as np
    from onnx.external_data_helper import uses_external_data
    from onnx.helper import tensor_dtype_to_np_dtype

    total = 0
    for t in graph_tensors(proto.graph):
        if uses_external_data(t):
            total += int(np.prod(t.dims, dtype=np.int64)) * tensor_dtype_to_np_dtype(t.data_type).itemsize
        else:
            total += t.ByteSize()
    return total


def needs_external_data(nbytes: int) -> bool:
    """Whether tensors of ``nbytes`` (plus :data:`GRAPH_MARGIN_BYTES` for the graph) exceed one ONNX file."""
    return nbytes + GRAPH_MARGIN_BYTES > MAX_PROTO_BYTES


def file_opset(path: str) -> int | None:
    """The default-domain opset an ONNX file declares."""
    proto = _load_header(path)
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def _set_metadata(path: str, props: dict[str, str]) -> int | None:
    """Write ``props`` into the file's metadata_props and lay its tensors out as :func:`needs_external_data`
    says: in the file, or all in ``data_path_of(path)`` (and no other data file), whatever the exporter or
    quantiser wrote (one file, a file per tensor, another name). ``path`` is in export's own temporary folder:
    the data files it referenced are replaced. Returns the file's default-domain opset."""
    import onnx

    path = os.path.abspath(path)
    proto = onnx.load(path, load_external_data=False)
    folder = os.path.dirname(path)
    old = external_data_files(proto, folder)
    external, data = needs_external_data(tensor_bytes(proto)), data_path_of(path)
    if old and (not external or old != [data]):  # tensors to move: into the file, or into one data file
        onnx.load_external_data_for_model(proto, folder)
        for f in old:
            f.unlink()  # onnx appends to an existing data file
        old = []
    del proto.metadata_props[:]
    for k, v in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    if external and not old:
        onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
                        convert_attribute=True)
    else:  # one file, or the header of a file whose tensors already are in ``data``
        onnx.save(proto, path)
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def _data_of_existing(path: Path) -> bool:
    """Whether the data file beside ``path`` (``data_path_of``) is the one an existing ``path`` references."""
    import onnx

    data = data_path_of(path)
    if not (data.is_file() and path.is_file()):
        return False
    try:
        header = onnx.load(str(path), load_external_data=False)
    except Exception:  # not an ONNX file: the data file is not its
        return False
    return data in external_data_files(header, path.parent)


def _foreign_data_error(path: Path) -> ExportError:
    data = data_path_of(path)
    return ExportError(f"--output {path}: {data} exists and is not the data file of {path.name} (a model over 2 GB "
                       f"is written as {path.name} + {data.name}): remove it, or choose another --output")


def _install(src: str, path: Path) -> Path | None:
    """Move the validated ``src`` to ``path``; a ``src`` with external data takes its data file to
    ``data_path_of(path)`` first and then the .onnx (renamed to reference it), so that the new .onnx never
    appears without its data; if the second rename fails, the first is undone (a data file it replaced is put
    back). A data file that the replaced ``path`` used and the new one does not is removed. Returns the data
    file, or None for a single file."""
    import onnx

    data, src_data = data_path_of(path), data_path_of(src)  # ``src`` as _set_metadata laid it out
    previous = _data_of_existing(path)
    if not src_data.exists():
        os.replace(src, path)
        if previous:  # the replaced file's weights, used by nothing now
            data.unlink()
        return None
    if data.exists() and not previous:
        raise _foreign_data_error(path)
    from onnx.external_data_helper import uses_external_data

    header = onnx.load(src, load_external_data=False)  # small: the tensors are in ``src_data``
    for t in graph_tensors(header.graph):  # the data file's name beside ``path``
        for e in (t.external_data if uses_external_data(t) else []):
            if e.key == "location":
                e.value = data.name
    onnx.save(header, src)
    backup = src_data.with_name("previous.data")
    if previous:
        os.replace(data, backup)
    os.chmod(src_data, 0o644)
    os.replace(src_data, data)
    try:
        os.replace(src, path)
    except OSError:
        os.replace(data, src_data)  # back into the temporary folder, removed with it
        if previous:
            os.replace(backup, data)
        raise
    return data


def _time_pair(model: nn.Module, onnx_model: nn.Module, x: Tensor) -> tuple[float, float]:
    """Images/s of PyTorch and ONNX Runtime on ``x``, timed in interleaved rounds."""
    from vitlab.benchmark import run_interleaved

    def torch_step() -> None:
        with torch.no_grad():
            model(x)

    stats = run_interleaved({"torch": torch_step, "onnx": lambda: onnx_model(x)}, warmup=1, repeats=3,
                            min_repeat_s=0.2)
    return len(x) / stats["torch"].median, len(x) / stats["onnx"].median


# ------------------------------------------------------------------------------------------- export
@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode within the block, then every submodule back in the mode it had (a training
    loop that exports a snapshot goes on training; frozen BatchNorm layers stay frozen)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _float32(model: nn.Module, name: str) -> nn.Module:
    """``model`` itself when its floating-point weights are float32, else a float32 copy (the ONNX graph takes
    and computes float32, and the validation compares against float32 PyTorch)."""
    dtypes = {t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()}
    if dtypes <= {torch.float32}:
        return model
    log.info("%s: exporting a float32 copy of the %s model (the ONNX file is float32)", name,
             "/".join(sorted(str(d).removeprefix("torch.") for d in dtypes - {torch.float32})))
    return copy.deepcopy(model).float()


def _state_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (a tensor shared by two names counted once)."""
    seen: dict[int, int] = {}
    for t in (*model.parameters(), *model.buffers()):
        seen[t.data_ptr()] = max(seen.get(t.data_ptr(), 0), t.numel() * t.element_size())
    return sum(seen.values())


def remove_stale_temp_folders(path: Path) -> list[Path]:
    """Remove the temporary folders (``.NAME.XXXXXXXX``, from :func:`tempfile.mkdtemp`) that exports to ``path``
    killed before their end left beside it; a folder holding anything but files is left alone."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}")
    removed = []
    for p in sorted(path.parent.glob(f".{glob.escape(path.name)}.*")):
        if (pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink()
                and all(f.is_file() and not f.is_symlink() for f in p.iterdir())):
            shutil.rmtree(p, ignore_errors=True)
            log.info("removed %s, left by an interrupted export to %s", p, path)
            removed.append(p)
    return removed


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    img_size: int | tuple[int, int] | None = None,
    dynamic_batch: bool = False,
    dynamic_size: bool = False,
    opset: int | None = None,
    validate_images: Tensor | str | os.PathLike | None = None,
    num_images: int = DEFAULT_NUM_IMAGES,
    tolerance: float = DEFAULT_TOLERANCE,
    int8: bool = False,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    force: bool = False,
    class_names: list[str] | None = None,
    timing: bool = True,
) -> ExportReport:
    """Export ``model`` to ONNX at ``path``, validated against PyTorch before the file is written.

    Args:
        img_size: export resolution (default: the model's); the position table is resampled to it.
        dynamic_batch: a symbolic batch axis (else the batch is fixed to 1).
        dynamic_size: symbolic height and width, checked at two other sizes; refused for families that
            declare ``onnx_fixed_size_reason`` or whose graph is not correct at other sizes.
        opset: ONNX opset (default: the exporter's).
        validate_images: real images: uint8 (N, C, H, W), a data source (folder, ``mnist:DIR``...), or
            None for digits of the bundled scikit-learn set; ``num_images`` of them are used.
        tolerance: largest acceptable |difference| of each output (logits; a detector's boxes too)
            between ONNX Runtime (float32) and PyTorch.
        int8: quantise the linear layers (ONNX Runtime dynamic quantisation) and write that file; its
            agreement with float32 PyTorch (top-1; per query for a detector, per pixel for a segmenter)
            must reach ``min_agreement``.
        force: write the file even when a check fails (the report lists what failed).
        class_names: stored in the metadata (default: ``model.class_names``).
    Returns:
        The :class:`ExportReport`; raises :class:`ExportValidationError` (nothing written) when a check
        fails and ``force`` is False.
    """
    require("onnx", "onnxruntime")
    task, spec = task_outputs(model)
    if tolerance <= 0:
        raise ValueError(f"tolerance must be > 0, got {tolerance}")
    from vitlab.layers import to_2tuple

    if img_size is not None and min(to_2tuple(img_size)) < 1:
        raise ValueError(f"--img-size must be a positive number of pixels, got {img_size}")
    if opset is not None and opset < 1:
        raise ValueError(f"--opset must be a positive ONNX opset version, got {opset}")
    path = Path(path)
    name = getattr(model, "model_name", type(model).__name__)
    model = _float32(model, name)
    with _eval_mode(model):  # the caller's model goes back to the mode(s) it had
        if img_size is not None:
            if tuple(to_2tuple(img_size)) != tuple(model.preprocessing.input_size[1:]):
                model = rebuild(model, img_size=img_size)
        if dynamic_size:
            reason = getattr(model, "onnx_fixed_size_reason", None)
            if reason:
                raise ExportError(f"{name}: --dynamic-size is not supported for {type(model).__name__}: {reason}")
            model = _any_size_model(model)
        # over a single file's 2 GB, the weights go into one external data file beside it (model.onnx.data)
        external = needs_external_data(_state_bytes(model))
        if external and data_path_of(path).exists() and not _data_of_existing(path):
            raise _foreign_data_error(path)  # before the long work, not after
        pre = model.preprocessing
        c, h, w = pre.input_size
        sizes = size_rule(model, c, h, w) if dynamic_size else None
        raw, source = _resolve_images(validate_images, num_images)
        x = preprocess(raw, pre, task)  # (N, C, H, W)
        features = task == "classification" and not model.num_classes
        report = ExportReport(path=str(path), model=name, task=FEATURES_TASK if features else task,
                              agreement="argmax agreement" if features else spec.agreement, input_size=(c, h, w),
                              dynamic_batch=dynamic_batch, dynamic_size=dynamic_size, int8=int8, images=len(x),
                              image_source=source, tolerance=tolerance, min_agreement=min_agreement, forced=force)
        ref = _outputs(model, x, spec)
        if all(bool((r == r.flatten()[0]).all()) for r in ref.values() if isinstance(r, Tensor)):
            log.warning("%s: its outputs are the same for every image (random weights: a zero-initialised head), so "
                        "the validation below compares nothing; export a trained checkpoint to check it", name)
        graph = model if task == "classification" else InferenceOutputs(model, spec.names)

        try:  # a temporary folder beside the file, renamed into place at the end
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temp_folders(path)
            tmpdir = tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)
        except OSError as e:
            raise ExportError(f"--output {path}: cannot write in {path.parent} ({e.strerror or e})") from None
        try:
            float_path = os.path.join(tmpdir, "float.onnx")
            t0 = time.perf_counter()
            trace_x = x[:2] if dynamic_batch and len(x) >= 2 else x[:1]  # batch 2: never specialised like 1
            if dynamic_size:  # traced at a larger size, where no map is 1 x 1 (see trace_size)
                trace_pre = dataclasses.replace(pre, input_size=(c, *trace_size(model, h, w)))
                trace_x = preprocess(raw[:len(trace_x)], trace_pre, task)
            report.exporter = export_graph(graph, trace_x, float_path, dynamic_batch=dynamic_batch,
                                           dynamic_size=dynamic_size, opset=opset, output_names=spec.names,
                                           external_data=external)
            props = metadata(model, pre, class_names=class_names, dynamic_batch=dynamic_batch,
                             dynamic_size=dynamic_size, int8=False, sizes=sizes)
            report.opset = _set_metadata(float_path, props)
            if opset is not None and report.opset != opset:  # neither exporter could write the opset asked for
                raise ExportError(f"--opset {opset}: {report.exporter} wrote opset {report.opset} instead (it cannot "
                                  f"convert this graph to {opset}); ask for {report.opset}, or leave --opset out")
            report.export_s = time.perf_counter() - t0

            onnx_float = OnnxModel(float_path)
            got = _onnx_outputs(onnx_float, x)
            report.output_diffs, report.top1_agreement = compare_outputs(spec, ref, got)
            report.max_abs_diff = _worst(report.output_diffs)
            for k, d in report.output_diffs.items():
                if d <= tolerance:
                    continue
                verdict = float64_verdict(model, x, spec, k, ref, got, tolerance) if d == d else None  # not for NaN
                if verdict is not None and verdict.accepted:
                    report.notes.append(verdict.text)
                else:
                    report.problems.append(f"float32 ONNX {k} differ from PyTorch's by {d:.3g} (> tolerance {tolerance:g})"
                                           + (f"; {verdict.text}" if verdict is not None else ""))
            if dynamic_size:
                for hw in other_sizes(model, h, w):
                    xs = preprocess(raw, dataclasses.replace(pre, input_size=(c, *hw)), task)
                    try:
                        ds, a = compare_outputs(spec, _outputs(model, xs, spec), _onnx_outputs(onnx_float, xs))
                        d = _worst(ds)
                    except Exception as e:  # a graph with the size baked in fails at run time
                        report.problems.append(f"at {hw[0]}x{hw[1]} the graph fails: {str(e).splitlines()[0][:300]}")
                        continue
                    report.other_sizes.append(SizeCheck(size=hw, max_abs_diff=d, top1_agreement=a))
                    if not d <= tolerance:
                        report.problems.append(f"at {hw[0]}x{hw[1]} ONNX differs from PyTorch by {d:.3g} "
                                               f"(> tolerance {tolerance:g}): the size is baked into the graph")
            final_path, final_model = float_path, onnx_float
            if int8:
                int8_path = os.path.join(tmpdir, "int8.onnx")
                n = quantize_int8(float_path, int8_path)
                _set_metadata(int8_path, metadata(model, pre, class_names=class_names, dynamic_batch=dynamic_batch,
                                                  dynamic_size=dynamic_size, int8=True, sizes=sizes))
                log.info("%s: quantised %d linear layers to int8", name, n)
                onnx_int8 = OnnxModel(int8_path)
                # dynamic quantisation scales the activations per call, over the whole batch: the gate measures
                # what the file answers for each image alone; how much batching moves that is reported apart
                alone = _one_by_one(onnx_int8, x)
                report.int8_output_diffs, report.int8_top1_agreement = compare_outputs(spec, ref, alone)
                if dynamic_batch and len(x) > 1:
                    batched_diffs, report.int8_batched_agreement = compare_outputs(spec, alone, _onnx_outputs(onnx_int8, x))
                    report.int8_batched_max_abs_diff = _worst(batched_diffs)
                report.int8_max_abs_diff = _worst(report.int8_output_diffs)
                if not report.int8_top1_agreement >= min_agreement:
                    report.problems.append(f"int8 {spec.agreement} with float32 PyTorch {100 * report.int8_top1_agreement:.1f}%"
                                           f" < required {100 * min_agreement:.0f}%")
                final_path, final_model = int8_path, onnx_int8
            if timing:
                tx = x[:VALIDATION_BATCH] if dynamic_batch else x[:1]
                report.timing_batch = len(tx)
                report.torch_images_per_s, report.onnx_images_per_s = _time_pair(graph, final_model, tx)
            if data_path_of(final_path).exists():  # _set_metadata put its tensors there
                report.data_path = str(data_path_of(path))
            if report.problems and not force:
                raise ExportValidationError(f"{name}: refusing to write {path}: " + "; ".join(report.problems)
                                            + " (pass force=True / --force to write it anyway)", report)
            if report.problems:
                log.warning("%s: writing %s despite failed checks (forced): %s", name, path, "; ".join(report.problems))
            os.chmod(final_path, 0o644)
            try:
                data = _install(final_path, path)
            except OSError as e:
                raise ExportError(f"--output {path}: cannot write it ({e.strerror or e})") from None
            report.written = True
            report.file_bytes = path.stat().st_size
            if data is not None:
                report.data_bytes = data.stat().st_size
            return report
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
