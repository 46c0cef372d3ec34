"""ResNet checkpoints -> vitlab: timm and torchvision classifier files, Hugging Face ``ResNetForImageClassification``.

* timm and torchvision (one layout: ``conv1``, ``bn1``, ``layerS.B.{conv1..3, bn1..3, downsample.0/1}``, ``fc``):
  the ResNet v1.5 of both libraries (stride on the bottleneck's 3x3 convolution), as vitlab builds it. timm's
  variants with other stems or blocks (``resnet50d``'s deep stem, squeeze-excitation, selective kernels, ResNeXt's
  groups, wide bottlenecks, group norm) are refused by name. Its anti-aliased ``resnetaa*`` / ``resnetblur*`` hold
  the plain ResNet's tensors (the blur has no weights): their files cannot be told apart, and load as a plain
  ResNet, which computes something else. Files saved before PyTorch 0.4.1 have no ``num_batches_tracked``; it is
  set to zero.
* Hugging Face (``resnet.embedder``, ``resnet.encoder.stages.S.layers.B``, ``classifier.1``): the config's
  ``layer_type``, ``downsample_in_bottleneck`` (stride on the first 1x1, ResNet v1) and
  ``downsample_in_first_stage`` are kept; an activation other than ReLU is refused. transformers' ResNetConfig has
  no input size; an ``image_size`` there (which vitlab's export writes and transformers keeps) is read.

Sizes (blocks per stage, widths, the stem's width, basic or bottleneck blocks) come from the tensors. The
helpers that rename ResNet keys also serve DETR's backbone (``convert_detr``).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from vitlab.checkpoints.convert_timm import head_overrides
from vitlab.checkpoints.converters import (
    Converted,
    register_converter,
    register_format_detector,
    register_hf_model_type,
)
from vitlab.models.resnet import BOTTLENECK_EXPANSION

_TV_BLOCK = re.compile(r"^layer(\d+)\.(\d+)\.(.+)$")
_HF_BLOCK = re.compile(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.(.+)$")
_TV_BLOCK_PARTS = re.compile(r"^(conv[123]|bn[123]|downsample\.[01])\.(weight|bias|running_mean|running_var|"
                             r"num_batches_tracked)$")


def tv_resnet_key(k: str) -> str:
    """torchvision/timm ResNet names (``conv1``, ``bn1``, ``layerS.B.*``) -> vitlab's ResNet names."""
    if k.startswith("conv1."):
        return "stem.conv." + k[len("conv1."):]
    if k.startswith("bn1."):
        return "stem.norm." + k[len("bn1."):]
    m = _TV_BLOCK.match(k)
    if not m:
        raise ValueError(f"unexpected backbone key {k!r}")
    rest = m.group(3)
    rest = re.sub(r"^bn(\d)\.", r"norm\1.", rest)
    rest = rest.replace("downsample.0.", "downsample.conv.").replace("downsample.1.", "downsample.norm.")
    return f"stages.{int(m.group(1)) - 1}.blocks.{m.group(2)}.{rest}"


def hf_resnet_key(k: str) -> str:
    """transformers' ResNet names (``embedder``, ``encoder.stages``; no ``resnet.`` prefix) -> vitlab's."""
    k = k.replace("embedder.embedder.convolution.", "stem.conv.").replace("embedder.embedder.normalization.",
                                                                         "stem.norm.")
    if k.startswith("stem."):
        return k
    m = _HF_BLOCK.match(k)
    if not m:
        raise ValueError(f"unexpected backbone key {k!r}")
    rest = m.group(3).replace("shortcut.convolution.", "downsample.conv.").replace("shortcut.normalization.",
                                                                                   "downsample.norm.")
    rest = re.sub(r"^layer\.(\d)\.convolution\.", lambda g: f"conv{int(g.group(1)) + 1}.", rest)
    rest = re.sub(r"^layer\.(\d)\.normalization\.", lambda g: f"norm{int(g.group(1)) + 1}.", rest)
    return f"stages.{m.group(1)}.blocks.{m.group(2)}.{rest}"


def resnet_args(backbone: dict[str, Tensor]) -> dict[str, Any]:
    """A vitlab ResNet's layers / channels / stem width / block kind from its (vitlab-named) tensors."""
    stages: dict[int, set[int]] = {}
    for k in backbone:
        m = re.match(r"^stages\.(\d+)\.blocks\.(\d+)\.", k)
        if m:
            stages.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    n = len(stages)
    bottleneck = any(k.endswith("conv3.weight") for k in backbone)
    last = "conv3" if bottleneck else "conv2"
    return {
        "layers": tuple(len(stages[i]) for i in range(n)),
        "channels": tuple(int(backbone[f"stages.{i}.blocks.0.{last}.weight"].shape[0]) for i in range(n)),
        "stem_chs": int(backbone["stem.conv.weight"].shape[0]),
        "block": "bottleneck" if bottleneck else "basic",
    }


def _classifier(out: dict[str, Tensor], where: str) -> dict[str, Any]:
    """Sizes and head of a converted classifier; every BatchNorm gets its ``num_batches_tracked`` (old files lack
    it, and it changes nothing at inference)."""
    if "stem.conv.weight" not in out or not any(k.startswith("stages.") for k in out):
        raise ValueError(f"not a ResNet classifier: no {where} stem convolution and residual stages")
    for k in [k for k in out if k.endswith(".running_mean")]:
        out.setdefault(k[: -len("running_mean")] + "num_batches_tracked", torch.tensor(0, dtype=torch.long))
    return {**resnet_args(out), **head_overrides(out)}


_TIMM_VARIANTS = {  # keys of timm ResNet variants that vitlab's ResNet does not build
    "conv1.0.": "a deep stem (timm's resnet*c / *d / *s / *t: three 3x3 convolutions)",
    ".se.": "squeeze-and-excitation blocks (timm's seresnet*)",
    ".aa.": "anti-aliased downsampling (timm's resnetaa*)",
    ".downsample.1.conv.": "average-pool downsampling shortcuts (timm's resnet*d)",
    ".paths.": "selective-kernel convolutions (timm's skresnet*)",
}
_PLAIN = "vitlab's ResNet is the plain v1.5 ResNet (resnet18 / 34 / 50 of timm and torchvision)"


def _refuse_other_blocks(out: dict[str, Tensor]) -> None:
    """timm's ResNet variants with the plain ResNet's key names but other tensors, named (not a shape listing)."""
    w1, w2 = out.get("stages.0.blocks.0.conv1.weight"), out.get("stages.0.blocks.0.conv2.weight")
    if "stages.0.blocks.0.norm1.weight" in out and "stages.0.blocks.0.norm1.running_mean" not in out:
        raise ValueError(f"the file's ResNet has norms without running statistics (group norm: timm's "
                         f"resnet*_gn); {_PLAIN}")
    if w1 is None or w2 is None or w1.ndim != 4 or w2.ndim != 4:
        return
    if w2.shape[1] != w1.shape[0]:  # conv2's input width per group against conv1's output
        raise ValueError(f"the file's ResNet has grouped 3x3 convolutions (ResNeXt: timm's resnext*); {_PLAIN}")
    w3 = out.get("stages.0.blocks.0.conv3.weight")
    if w3 is not None and w3.shape[0] != BOTTLENECK_EXPANSION * w1.shape[0]:
        raise ValueError(f"the file's ResNet has bottlenecks {w3.shape[0] // w1.shape[0]}x narrower than their output, "
                         f"not 4x (timm's wide_resnet*); {_PLAIN}")


@register_converter("resnet", "timm")
def convert_timm_resnet(sd: dict[str, Tensor], meta: dict[str, Any]) -> Converted:
    for part, what in _TIMM_VARIANTS.items():  # every key first: a variant is named before any other complaint
        if k := next((k for k in sd if part in k or k.startswith(part)), None):
            raise ValueError(f"the file's ResNet has {what} (key {k!r}); {_PLAIN}")
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if k.startswith("fc."):
            out["head." + k[len("fc."):]] = v
            continue
        m = _TV_BLOCK.match(k)
        if m and not _TV_BLOCK_PARTS.match(m.group(3)):
            raise ValueError(f"unexpected key {k!r}: vitlab's ResNet blocks hold conv1..3, bn1..3 and downsample.0/1 "
                             f"(a timm ResNet variant? {_PLAIN})")
        out[tv_resnet_key(k)] = v
    _refuse_other_blocks(out)
    return Converted(out, _classifier(out, "'conv1'"))


def _hf_name(config: dict[str, Any]) -> str | None:
    """The registered name whose blocks a transformers ResNet config has (None: resnet50, sized by the tensors)."""
    depths, kind = tuple(config.get("depths") or ()), config.get("layer_type", "bottleneck")
    return {((2, 2, 2, 2), "basic"): "resnet18", ((3, 4, 6, 3), "basic"): "resnet34",
            ((3, 4, 6, 3), "bottleneck"): "resnet50"}.get((depths, kind))


register_hf_model_type("resnet", "resnet50", _hf_name)


@register_converter("resnet", "hf")
def convert_hf_resnet(sd: dict[str, Tensor], meta: dict[str, Any]) -> Converted:
    config = meta.get("config") or {}
    act = config.get("hidden_act", "relu")
    if act != "relu":
        raise ValueError(f"config.json hidden_act={act!r}; vitlab's ResNet uses relu")
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if k.startswith("classifier.1."):  # Flatten, then the Linear
            out["head." + k[len("classifier.1."):]] = v
            continue
        if k.startswith("resnet.embedder.pooler") or k.startswith("resnet.pooler"):
            continue
        if not k.startswith("resnet."):
            raise ValueError(f"unexpected key {k!r}: expected transformers' ResNet names ('resnet.embedder', "
                             f"'resnet.encoder', 'classifier.1')")
        out[hf_resnet_key(k[len("resnet."):])] = v
    overrides = _classifier(out, "'resnet.embedder'")
    if config.get("downsample_in_bottleneck") and overrides["block"] == "bottleneck":
        overrides["stride_in_1x1"] = True  # the stride on the bottleneck's first 1x1 convolution (ResNet v1)
    if config.get("downsample_in_first_stage"):
        overrides["first_stage_stride"] = 2
    if "image_size" in config:  # not a ResNetConfig field: vitlab's export records the input size there
        img = config["image_size"]
        overrides["img_size"] = tuple(int(s) for s in img) if isinstance(img, (list, tuple)) else int(img)
    return Converted(out, overrides)


@register_format_detector("resnet")
def detect(sd: dict[str, Any]) -> str | None:
    if any(k.startswith("resnet.encoder.") for k in sd):
        return "hf"
    if any(k.startswith("layer1.") for k in sd):
        return "timm"
    return None
