"""Run an exported ONNX file like a vitlab model: :class:`OnnxModel`.

The file's metadata (written by :func:`vitlab.export.export_onnx`) gives the preprocessing, the class
names, the model name and the task, so predict/eval/detect/segment need nothing but the file. The adapter
is an ``nn.Module`` without parameters that answers like the PyTorch model it was exported from: images
(B, C, H, W) in; float32 logits (B, K) out for a classifier, a dict of the named outputs for a detector
(``logits`` (B, Q, C+1), ``boxes`` (B, Q, 4)) or a segmenter (``logits`` (B, C, H, W)), so the evaluation,
detection and benchmark code runs it as it runs a PyTorch model.

A file over 2 GB keeps its weights in an external data file beside it (``model.onnx.data``); ONNX Runtime reads
it from there, and a missing one is a :class:`FileNotFoundError` naming it.

A fixed-size file refuses other sizes with :class:`InputSizeError` before ONNX Runtime sees them (ONNX
Runtime's own message is "INVALID_ARGUMENT : Got invalid dimensions for input ..."), and so does a
dynamic-size file for the sizes its metadata rules out (not a multiple of the patch, where PyTorch refuses
them too); a file exported with a fixed batch of 1 is run image by image. A file from another tool must
take NCHW images; of several outputs, the one named like logits is scored.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
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
# the task of a backbone's file (num_classes=0): its output holds pooled features, not class logits
FEATURES_TASK = "features"


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


def external_data_files(proto: Any, folder: str | os.PathLike) -> list[Path]:
    """The external data files (``model.onnx.data`` beside a large ``model.onnx``) that an ONNX model's tensors
    reference, in ``folder`` (the file's own): locations are relative to it."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    locations = {ExternalDataInfo(t).location for t in graph_tensors(proto.graph) if uses_external_data(t)}
    return [Path(folder) / loc for loc in sorted(locations)]


def graph_tensors(graph: Any) -> Iterator[Any]:
    """Every TensorProto of an ONNX graph: its initializers and the tensors in node attributes (Constant
    nodes), subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from graph_tensors(g)


def check_external_data(proto: Any, path: str | os.PathLike) -> None:
    """A clear error where a file's weights are in an external data file that is not beside it, or outside its
    folder (an absolute location, '..' or a symbolic link out of it: ONNX Runtime refuses those too)."""
    path = Path(path)
    folder = path.parent.resolve()
    files = external_data_files(proto, path.parent)
    if outside := [f for f in files if not f.resolve().is_relative_to(folder)]:
        raise ValueError(f"{path}: its weights are to be read from {outside[0]}, outside its folder {path.parent} "
                         f"(an absolute path, '..' or a symbolic link out of it); an ONNX file's external data "
                         f"must lie in its own folder")
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{path}: its weights are in the external data file {missing[0]}, which is missing: "
                                f"a model over 2 GB is two files, {path.name} and {missing[0].name}; copy both into "
                                f"the same folder")


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """vitlab's metadata record of an ONNX file (empty if the file was not written by vitlab)."""
    require("onnx")
    return _metadata(_load_header(path), path)


def _load_header(path: str | os.PathLike) -> Any:
    """The ModelProto of an ONNX file, its external data left where it is; a truncated or damaged file is a
    ValueError naming it (onnx raises protobuf's DecodeError)."""
    import onnx
    from google.protobuf.message import Error as ProtobufError

    try:
        return onnx.load(str(path), load_external_data=False)
    except (ProtobufError, RecursionError, ValueError) as e:
        raise ValueError(f"{path}: not a readable ONNX file ({e}); a truncated or damaged copy?") from None


# metadata fields that must be JSON objects where present (read with .get)
_METADATA_OBJECTS = ("input", "preprocessing", "config")


def _metadata(proto: Any, path: str | os.PathLike) -> dict[str, Any]:
    from vitlab.checkpoints.io import parse_json

    props = {p.key: p.value for p in proto.metadata_props}
    if METADATA_KEY not in props:
        return {}
    try:
        meta = parse_json(props[METADATA_KEY])
    except ValueError as e:  # malformed, nested too deeply, an integer of too many digits
        raise ValueError(f"{path}: the vitlab metadata is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: the vitlab metadata is a JSON {type(meta).__name__}, not an object")
    if bad := [k for k in _METADATA_OBJECTS if meta.get(k) is not None and not isinstance(meta[k], dict)]:
        raise ValueError(f"{path}: the vitlab metadata's {bad[0]!r} is a JSON {type(meta[bad[0]]).__name__}, not an "
                         f"object")
    return meta


_SHAPE_FAILURE = re.compile(r"shape|broadcast|dimension|Scale value", re.I)  # ORT's words for a size a node refuses
_LOGITS_NAMES = (re.compile(r"logits?", re.I), re.compile(r".*logit.*", re.I),
                 re.compile(r"outputs?|output_?0|y|probs?|scores?", re.I))
_warned_detectors: set[tuple[str, tuple[int, int]]] = set()


def _derived_size_rule(meta: dict[str, Any], path: Path) -> dict[str, list[int]]:
    """The size rule of a dynamic-size file from a vitlab that did not record it (files exported before
    ``size_multiple`` / ``min_size``), worked out as export does, from the model its metadata describes
    (built on the meta device: no weights); {} with a warning when that model cannot be rebuilt."""
    from vitlab.checkpoints.vitlab_format import config_from_dict
    from vitlab.export.onnx import _any_size_model, size_rule
    from vitlab.models.registry import get_entry

    try:
        entry = get_entry(meta["model"])
        c, h, w = meta["preprocessing"]["input_size"]
        with torch.device("meta"):
            model = _any_size_model(entry.build(config_from_dict(entry.config, meta["config"])).eval())
        rule = size_rule(model, c, h, w, device="meta")
    except Exception as e:  # any failure: the file runs as before, with the caveat said
        log.warning("%s does not record the input sizes it takes (an older vitlab wrote it) and they could not be "
                    "worked out (%s): a size its model refuses in PyTorch (not a multiple of its patch) may give "
                    "wrong outputs; export it again", path, e)
        return {}
    log.info("%s does not record the input sizes it takes (an older vitlab wrote it): worked out from its model: "
             "multiples of %dx%d, at least %dx%d", path, *rule["multiple"], *rule["min"])
    return {"size_multiple": rule["multiple"], "min_size": rule["min"]}


def _channels_last(shape: list[Any]) -> bool:
    """An image input laid out (N, H, W, C): 1 or 3 channels last, and not at index 1."""
    return len(shape) == 4 and shape[3] in (1, 3) and shape[1] not in (1, 3)


def _shape_text(shape: list[Any]) -> str:
    return "(" + ", ".join(str(s) if s not in (None, "") else "?" for s in shape) + ")"


def _numbers(values: Any) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def _logits_output(names: list[str], path: Path) -> str:
    """The output a foreign classifier file is scored on: the only one, else the one named like logits
    ("logits", then "*logit*", then "output"...); several candidates or none is an error naming them."""
    if len(names) == 1:
        return names[0]
    for pattern in _LOGITS_NAMES:
        hits = [n for n in names if pattern.fullmatch(n)]
        if len(hits) == 1:
            log.info("%s has %d outputs (%s): scoring %r", path.name, len(names), ", ".join(names), hits[0])
            return hits[0]
        if hits:
            break
    raise ValueError(f"{path.name} has {len(names)} outputs ({', '.join(map(repr, names))}) and vitlab cannot tell "
                     f"which holds the class logits: export the model with one output, or name the logits output "
                     f"'logits'")


def _warn_fixed_size_detector(name: str, hw: tuple[int, int]) -> None:
    """Once per model and size: a fixed-size DETR file is fed squashed images (vitlab's checkpoint keeps the
    aspect), so its boxes on non-square images differ from the checkpoint's."""
    if (name, tuple(hw)) in _warned_detectors:
        return
    _warned_detectors.add((name, tuple(hw)))
    log.warning("%s: this ONNX detector takes %dx%d images only, so every image is resized to %dx%d without keeping "
                "its aspect (the PyTorch checkpoint resizes the shorter side and keeps it): on non-square images its "
                "boxes differ from the checkpoint's; export with --dynamic-size to keep the aspect", name, *hw, *hw)


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
        size_multiple, min_size: the sizes a dynamic-size file takes (from its metadata; None: any).
        fixed_batch: the batch size of a file exported without a dynamic batch axis, else None.
        task: "classification", "detection" or "segmentation" (from the metadata; classification for a
            foreign file, and for a backbone's file, with ``num_classes`` 0).
        features: the file holds a backbone without a classifier (metadata task "features", or num_classes 0
            from an older vitlab): its output is (B, D) pooled features; ``forward_features`` gives them.
        output_names: the graph's outputs in order; ``logits_name`` the one a classifier is scored on.
        config: the exported model's config (a dict; empty for a foreign file).
    """

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None) -> None:
        super().__init__()
        require("onnx", "onnxruntime")
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no such ONNX file")
        header = _load_header(self.path)  # tensors in a .data file stay there
        check_external_data(header, self.path)
        self.meta = _metadata(header, self.path)
        del header
        try:
            self.session = ort.InferenceSession(str(self.path), session_options(threads),
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT's own exception classes (Fail, InvalidGraph, ...) derive from Exception only
            if not type(e).__module__.startswith("onnxruntime"):
                raise
            raise ValueError(f"{self.path}: ONNX Runtime cannot load it ({str(e).strip()})") from None
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        shape = list(inp.shape)  # ints for fixed axes, strings (or None) for dynamic ones
        if not self.meta and _channels_last(shape):
            raise ValueError(
                f"{self.path.name}: its input {inp.name!r} has shape {_shape_text(shape)}, channels last (NHWC: batch, "
                f"height, width, {shape[3]} channels); vitlab feeds images channels first (NCHW: batch, channels, "
                f"height, width): export the model with an NCHW input (or a transpose in front of it)")
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None
        self.input_hw = (shape[2], shape[3]) if all(isinstance(s, int) for s in shape[2:4]) else None
        self.in_chans = shape[1] if isinstance(shape[1], int) else None
        # the sizes a dynamic-size file takes (export's size_rule): multiples of its patch, from a minimum
        io = self.meta.get("input") or {}
        if self.input_hw is None and self.meta and "size_multiple" not in io:
            io = {**io, **_derived_size_rule(self.meta, self.path)}
        self.size_multiple = tuple(io["size_multiple"]) if io.get("size_multiple") else None
        self.min_size = tuple(io["min_size"]) if io.get("min_size") else None
        # a dynamic-size detector's cap on the longer side (the model's ``max_size``, read by ``transform_for``)
        resize = io.get("resize") or {}
        self.max_size = int(resize["max_size"]) if resize.get("max_size") else None
        pre = self.meta.get("preprocessing")
        if pre is not None:
            self.preprocessing = Preprocessing.from_dict(pre)
        else:  # a foreign file: only the input size is known; say what the rest is, since it is a guess
            c, (h, w) = self.in_chans or 3, self.input_hw or (224, 224)
            self.preprocessing = Preprocessing(input_size=(c, h, w))
            p = self.preprocessing
            log.warning("%s has no vitlab metadata: assuming vitlab's default preprocessing at its input size: %dx%d, "
                        "shorter side resized to %d (%s) and centre-cropped, mean %s, std %s (Inception-style, not "
                        "ImageNet's), softmax scores; a model trained with other values scores worse", self.path, h, w,
                        p.resize_side(min(h, w)), p.interpolation, _numbers(p.mean), _numbers(p.std))
        task = self.meta.get("task", "classification")
        # a backbone's file (task "features"; an older vitlab wrote "classification" with num_classes 0) runs as the
        # PyTorch backbone does: a classifier of no classes, which predict refuses and eval probes (k-NN, linear)
        self.features = task == FEATURES_TASK or (task == "classification" and self.meta.get("num_classes") == 0)
        self.task = "classification" if self.features else task
        self.score_function = "none" if self.features else self.meta.get("score_function", "softmax")
        self.config = dict(self.meta.get("config") or {})
        outputs = self.session.get_outputs()
        self.output_names = [o.name for o in outputs]
        self.logits_name = OUTPUT_NAME if OUTPUT_NAME in self.output_names else _logits_output(self.output_names,
                                                                                                   self.path)
        shape = outputs[self.output_names.index(self.logits_name)].shape
        # the class axis: (B, K) logits, (B, Q, C + 1) with "no object" last, (B, C, H, W)
        k = {"detection": shape[-1], "segmentation": shape[1]}.get(self.task, shape[-1])
        k = k - (self.task == "detection") if isinstance(k, int) else None
        names = None if self.features else self.meta.get("class_names")
        if self.meta and not self.features and self.task == "classification" and isinstance(k, int):
            self._check_classes(k, names)
        self.num_classes = 0 if self.features else len(names) if names else (k or self.meta.get("num_classes") or 0)
        self.class_names = list(names) if names else [str(i) for i in range(self.num_classes)]
        self.model_name = self.meta.get("model", self.path.stem)
        if self.task == "detection" and self.input_hw is not None:
            _warn_fixed_size_detector(self.model_name, self.input_hw)

    def _check_classes(self, width: int, names: list[str] | None) -> None:
        """A vitlab classifier file whose logits are not as wide as the classes its metadata records is refused:
        read as class scores, its outputs would be labelled wrongly."""
        recorded = self.meta.get("num_classes")
        counts = ([f"{len(names)} class names"] if names and len(names) != width else []) + (
            [f"num_classes {recorded}"] if isinstance(recorded, int) and recorded != width else [])
        if counts:
            raise ValueError(f"{self.path}: its output {self.logits_name!r} has {width} values per image but its "
                             f"metadata records {' and '.join(counts)}: its outputs cannot be read as class scores; "
                             f"export it again from its checkpoint (vitlab export)")

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, D) pooled features of a backbone's file (what ``extract_features`` probes); a classifier's file gives
        its logits only."""
        if not self.features:
            raise ValueError(f"{self.path.name}: an exported classifier gives its logits only, not its features; "
                             f"probe the PyTorch checkpoint it was exported from")
        return self.run_outputs(x)[self.logits_name]

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """The features as they are: a backbone's file has no head (``forward_features`` already pools)."""
        return x

    @property
    def dynamic_size(self) -> bool:
        return self.input_hw is None

    def size_text(self) -> str:
        """The sizes a dynamic-size file takes, in words ("" when any size)."""
        mh, mw = self.size_multiple or (1, 1)
        nh, nw = self.min_size or (1, 1)
        parts = ([f"height and width multiples of {mh}x{mw} (its patch size; PyTorch refuses other sizes)"]
                 if (mh, mw) != (1, 1) else []) + ([f"at least {nh}x{nw}"] if (nh, nw) != (1, 1) else [])
        return " and ".join(parts)

    def check_input(self, x: Tensor) -> None:
        if x.ndim != 4 or (self.in_chans is not None and x.shape[1] != self.in_chans):
            raise InputSizeError(f"{self.path.name}: expected images of shape (batch, {self.in_chans}, H, W), "
                                 f"got {tuple(x.shape)}")
        if self.input_hw is not None and tuple(x.shape[-2:]) != tuple(self.input_hw):
            h, w = self.input_hw
            raise InputSizeError(
                f"{self.path.name} was exported for {h}x{w} images and got {x.shape[-2]}x{x.shape[-1]}: "
                f"resize the images to {h}x{w} (its preprocessing does), or export again with --dynamic-size")
        if self.input_hw is None:
            h, w = x.shape[-2:]
            mh, mw = self.size_multiple or (1, 1)
            nh, nw = self.min_size or (1, 1)
            if h % mh or w % mw or h < nh or w < nw:
                fit_h, fit_w = max(nh, -(-h // mh) * mh), max(nw, -(-w // mw) * mw)
                raise InputSizeError(f"{self.path.name} takes images of {self.size_text()}, and got {h}x{w}: resize "
                                     f"(or pad) them to e.g. {fit_h}x{fit_w}")

    def run_numpy(self, x: np.ndarray) -> np.ndarray:
        """One ORT call, the logits output; ORT's complaints about the input come back as :class:`InputSizeError`."""
        return self.run_all_numpy(x)[self.output_names.index(self.logits_name)]

    def run_all_numpy(self, x: np.ndarray) -> list[np.ndarray]:
        """One ORT call, every output (in ``output_names``' order)."""
        try:
            return self.session.run(None, {self.input_name: x})
        except Exception as e:  # onnxruntime's InvalidArgument/Fail are not importable portably
            text = str(e)
            if "INVALID_ARGUMENT" in text or "invalid dimensions" in text.lower():
                raise InputSizeError(f"{self.path.name}: ONNX Runtime rejected an input of shape {x.shape}: {e}") from e
            if "Non-zero status code returned while running" in text and (
                    self.dynamic_size or _SHAPE_FAILURE.search(text)):  # a node that cannot take this size
                rule = f" (it takes {self.size_text()})" if self.size_text() else ""
                raise InputSizeError(f"{self.path.name}: ONNX Runtime cannot run this graph on an input of shape "
                                     f"{x.shape}{rule}: {e}") from e
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
            return outs[self.logits_name]
        return outs

    def extra_repr(self) -> str:
        size = "any size" if self.input_hw is None else f"{self.input_hw[0]}x{self.input_hw[1]}"
        return f"{self.path.name}, {self.model_name}, {self.task}, {size}"
