"""ResNet -> transformers' ``ResNetForImageClassification`` folders.

transformers' ResNet is vitlab's classic one: a 7x7 stride-2 stem with batch norm, ReLU and a 3x3 max pool, basic or
bottleneck blocks (a bottleneck's inner width a quarter of its output), projection shortcuts where the width or
stride changes, the stride on the bottleneck's 3x3 convolution (v1.5) or on its first 1x1
(``downsample_in_bottleneck``: vitlab's ``stride_in_1x1``), and optionally a stride-2 first stage
(``downsample_in_first_stage``: ``first_stage_stride=2``). BiT's variant (group norm, weight-standardised
convolutions, TensorFlow padding) and the small 3x3 stem are refused by name.

The processor is ``ConvNextImageProcessor``, as the hub's ResNet folders (microsoft/resnet-50) have: the shorter
side to ``int(size / crop_pct)`` and a centre crop of ``size``, which is vitlab's centre crop where the two round
the resize alike (square inputs below 384 px); other preprocessing gets the generic processor.
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor, nn

from vitlab.checkpoints.to_hf import (
    HfFamily,
    common_processor_fields,
    crop_margin_note,
    image_processor,
    tensors,
)

_FIXED: dict[str, tuple[Any, str]] = {
    "norm": ("batch", "transformers' ResNet has batch norm (BiT's group-norm ResNet is BitForImageClassification, "
                      "which vitlab does not write)"),
    "std_conv": (False, "transformers' ResNet has plain convolutions (no weight standardisation)"),
    "padding": ("symmetric", "transformers' ResNet pads symmetrically (PyTorch's), not TensorFlow's 'same'"),
    "stem": ("imagenet", "transformers' ResNet has the 7x7 stride-2 stem and max pool"),
}
_CONVNEXT_CROPS_BELOW = 384  # ConvNextImageProcessor resizes and crops below this size, squashes at or above it


def _check(model: nn.Module, name: str) -> None:
    cfg = model.cfg
    for field, (value, why) in _FIXED.items():
        if getattr(cfg, field) != value:
            raise ValueError(f"{name} has {field}={getattr(cfg, field)!r}: {why}; export it with --format onnx")


def _config(model: nn.Module) -> dict[str, Any]:
    cfg = model.cfg
    size = cfg.img_size
    # image_size is no ResNetConfig field: transformers keeps it unused, vitlab reads its input size back from it
    return {"architectures": ["ResNetForImageClassification"], "model_type": "resnet",
            "image_size": list(size) if isinstance(size, tuple) else size, "num_channels": cfg.in_chans,
            "embedding_size": cfg.stem_chs, "hidden_sizes": list(cfg.stage_channels), "depths": list(cfg.layers),
            "layer_type": cfg.block, "hidden_act": "relu", "downsample_in_first_stage": cfg.first_stage_stride == 2,
            "downsample_in_bottleneck": cfg.block == "bottleneck" and cfg.stride_in_1x1}


_BLOCK = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.(conv|norm)([123])\.(.+)$")
_SHORTCUT = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.downsample\.(conv|norm)\.(.+)$")
_PART = {"conv": "convolution", "norm": "normalization"}


def _state_dict(model: nn.Module) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for k, v in tensors(model).items():
        if k.startswith("head."):
            out["classifier.1." + k[len("head."):]] = v  # transformers' head: Flatten, then the Linear
        elif k.startswith(("stem.conv.", "stem.norm.")):
            part, param = k[len("stem."):].split(".", 1)
            out[f"resnet.embedder.embedder.{_PART[part]}.{param}"] = v
        elif m := _BLOCK.match(k):
            stage, block, part, n, param = m.groups()
            out[f"resnet.encoder.stages.{stage}.layers.{block}.layer.{int(n) - 1}.{_PART[part]}.{param}"] = v
        elif m := _SHORTCUT.match(k):
            stage, block, part, param = m.groups()
            out[f"resnet.encoder.stages.{stage}.layers.{block}.shortcut.{_PART[part]}.{param}"] = v
        else:
            raise ValueError(f"{model.model_name}: no transformers name for {k!r}")
    return out


def _processor(model: nn.Module) -> tuple[dict[str, Any], list[str]]:
    """ConvNextImageProcessor where it resizes and crops as the model does, else the generic processor."""
    pre = model.preprocessing
    _, h, w = pre.input_size
    if not (pre.channel_order == "RGB" and pre.crop_mode == "center" and h == w < _CONVNEXT_CROPS_BELOW
            and int(h / pre.crop_pct) == pre.resize_side(h)):  # ConvNext rounds h / crop_pct down without a margin
        return image_processor(model)
    notes: list[str] = [crop_margin_note(pre)] if pre.crop_offset == "round" else []
    return {"image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": h}, "crop_pct": pre.crop_pct,
            **common_processor_fields(model, notes), "do_normalize": True, "image_mean": list(pre.mean),
            "image_std": list(pre.std)}, notes


RESNET = HfFamily(_check, _config, _state_dict, processor=_processor)

__all__ = ["RESNET"]
