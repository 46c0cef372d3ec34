"""Run an exported ONNX file like a vitlab model: :class:`OnnxModel`.

The file's metadata (written by :func:`vitlab.export.export_onnx`) gives the preprocessing, the class
names, the model name and the task, so predict/eval/detect/segment need nothing but the file. The adapter
is an ``nn.Module`` without parameters that answers like the PyTorch model it was exported from: images
(B, C, H, W) in; float32 logits (B, K) out for a classifier, a dict of the named outputs for a detector
(``logits`` (B, Q, C+1), ``boxes`` (B, Q, 4)) or a segmenter (``logits`` (B, C, H, W)), so the evaluation,
detection and benchmark code runs it as it runs a PyTorch model.

A fixed-size file refuses other sizes with :class:`InputSizeError` before ONNX Runtime sees them (ONNX
Runtime's own message is "INVALID_ARGUMENT : Got invalid dimensions for input ..."); a file exported
with a fixed batch of 1 is run image by image.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from vitlab.models.base import Preprocessing

log = logging.getLogger(__name__)

METADATA_KEY = "vitlab"  # the full JSON record; the other keys are flat copies for non-vitlab deployments
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"


class ExportUnavailableError(ImportError):
    """onnx / onnxruntime (the optional extra ``vitlab[export]``) are not installed."""


class InputSizeError(ValueError):
    """Images of a size (or batch) the exported graph was not made for."""


def require(*modules: str) -> None:
    """Import ``modules`` or raise :class:`ExportUnavailableError` naming the extra that provides them."""
    import importlib

    missing = []
    for m in modules:
        try:
            importlib.import_module(m)
        except ImportError:
            missing.append(m)
    if missing:
        raise ExportUnavailableError(
            f"{', '.join(missing)} not installed: ONNX export and the ONNX runtime need the optional extra, "
            f"pip install 'vitlab[export]'")


def is_onnx_file(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(".onnx")


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """vitlab's metadata record of an ONNX file (empty if the file was not written by vitlab)."""
    require("onnx")
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    if METADATA_KEY not in props:
        return {}
    try:
        return json.loads(props[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: the vitlab metadata is not valid JSON ({e})") from e


def session_options(threads: int | None = None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is None:
        threads = torch.get_num_threads()  # follow torch's setting, so comparisons use the same cores
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 4  # failures come back as exceptions; ORT's own log would repeat them on stderr
    # no spinning after a run: the idle spin would steal the cores from PyTorch in interleaved comparisons
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


class OnnxModel(nn.Module):
    """An ONNX file run by ONNX Runtime (CPU), with the vitlab metadata it carries.

    Attributes:
        preprocessing: the :class:`Preprocessing` recorded at export.
        class_names: the class names recorded at export (or "0".."K-1").
        input_hw: (H, W) of a fixed-size file, None for a dynamic-size one.
        fixed_batch: the batch size of a file exported without a dynamic batch axis, else None.
        task: "classification", "detection" or "segmentation" (from the metadata; classification for a
            foreign file).
        output_names: the graph's outputs in order.
        config: the exported model's config (a dict; empty for a foreign file).
    """

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None) -> None:
        super().__init__()
        require("onnx", "onnxruntime")
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no such ONNX file")
        self.meta = read_metadata(self.path)
        self.session = ort.InferenceSession(str(self.path), session_options(threads),
                                            providers=["CPUExecutionProvider"])
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        shape = list(inp.shape)  # ints for fixed axes, strings (or None) for dynamic ones
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None
        self.input_hw = (shape[2], shape[3]) if all(isinstance(s, int) for s in shape[2:4]) else None
        self.in_chans = shape[1] if isinstance(shape[1], int) else None
        pre = self.meta.get("preprocessing")
        if pre is not None:
            self.preprocessing = Preprocessing.from_dict(pre)
        else:  # a foreign file: only the input size is known; say so, since mean/std are a guess
            log.warning("%s has no vitlab metadata: assuming ImageNet-style preprocessing at its input size",
                        self.path)
            c, (h, w) = self.in_chans or 3, self.input_hw or (224, 224)
            self.preprocessing = Preprocessing(input_size=(c, h, w))
        self.task = self.meta.get("task", "classification")
        self.score_function = self.meta.get("score_function", "softmax")
        self.config = dict(self.meta.get("config") or {})
        self.output_names = [o.name for o in self.session.get_outputs()]
        shape = self.session.get_outputs()[0].shape
        # the class axis: (B, K) logits, (B, Q, C + 1) with "no object" last, (B, C, H, W)
        k = {"detection": shape[-1], "segmentation": shape[1]}.get(self.task, shape[-1])
        k = k - (self.task == "detection") if isinstance(k, int) else None
        names = self.meta.get("class_names")
        self.num_classes = len(names) if names else (k or self.meta.get("num_classes") or 0)
        self.class_names = list(names) if names else [str(i) for i in range(self.num_classes)]
        self.model_name = self.meta.get("model", self.path.stem)

    @property
    def dynamic_size(self) -> bool:
        return self.input_hw is None

    def check_input(self, x: Tensor) -> None:
        if x.ndim != 4 or (self.in_chans is not None and x.shape[1] != self.in_chans):
            raise InputSizeError(f"{self.path.name}: expected images of shape (batch, {self.in_chans}, H, W), "
                                 f"got {tuple(x.shape)}")
        if self.input_hw is not None and tuple(x.shape[-2:]) != tuple(self.input_hw):
            h, w = self.input_hw
            raise InputSizeError(
                f"{self.path.name} was exported for {h}x{w} images and got {x.shape[-2]}x{x.shape[-1]}: "
                f"resize the images to {h}x{w} (its preprocessing does), or export again with --dynamic-size")

    def run_numpy(self, x: np.ndarray) -> np.ndarray:
        """One ORT call, the first output; ORT's complaints about the input come back as :class:`InputSizeError`."""
        return self.run_all_numpy(x)[0]

    def run_all_numpy(self, x: np.ndarray) -> list[np.ndarray]:
        """One ORT call, every output (in ``output_names``' order)."""
        try:
            return self.session.run(None, {self.input_name: x})
        except Exception as e:  # onnxruntime's InvalidArgument/Fail are not importable portably
            if "INVALID_ARGUMENT" in str(e) or "invalid dimensions" in str(e).lower():
                raise InputSizeError(f"{self.path.name}: ONNX Runtime rejected an input of shape {x.shape}: {e}") from e
            raise

    def run_outputs(self, x: Tensor) -> dict[str, Tensor]:
        """Every output by name for images ``x`` (B, C, H, W); a file with a fixed batch of 1 runs them one
        by one."""
        self.check_input(x)
        a = x.detach().to("cpu", torch.float32).contiguous().numpy()
        if self.fixed_batch is not None and a.shape[0] != self.fixed_batch:
            if self.fixed_batch != 1:
                raise InputSizeError(f"{self.path.name} was exported for batches of {self.fixed_batch}, got "
                                     f"{a.shape[0]}; export again with --dynamic-batch")
            parts = [self.run_all_numpy(a[i:i + 1]) for i in range(a.shape[0])]
            outs = [np.concatenate(p, axis=0) for p in zip(*parts)]
        else:
            outs = self.run_all_numpy(a)
        return {k: torch.from_numpy(o).to(x.device) for k, o in zip(self.output_names, outs)}

    def forward(self, x: Tensor, pixel_mask: Tensor | None = None) -> Tensor | dict[str, Tensor]:
        """A classifier's logits, or a detector's / segmenter's dict of outputs (as the PyTorch model's
        forward in eval mode, without auxiliary outputs). An exported detector takes no padding mask:
        ``pixel_mask`` is accepted only when it marks every pixel real."""
        if pixel_mask is not None and not bool(pixel_mask.all()):
            raise InputSizeError(f"{self.path.name}: an exported {self.task} model takes the image only (no padding "
                                 f"mask); run padded images one by one at their own size (a dynamic-size export)")
        outs = self.run_outputs(x)
        if self.task == "classification":
            return outs[self.output_names[0]]
        return outs

    def extra_repr(self) -> str:
        size = "any size" if self.input_hw is None else f"{self.input_hw[0]}x{self.input_hw[1]}"
        return f"{self.path.name}, {self.model_name}, {self.task}, {size}"
