"""Original JAX/Flax ``.npz`` checkpoints of google-research/vision_transformer -> vitlab.

Layouts: Dense kernels are (in, out); attention q/k/v kernels (D, heads, head_dim) and the output
kernel (heads, head_dim, D); convolutions HWIO. The hybrid's ResNet lives under ``block{s}/unit{u}``.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vitlab.checkpoints.adapt import SourceStateDict
from vitlab.checkpoints.converters import Converted, register_converter

_ENC = "Transformer/encoderblock_{}/"
# roots under which some releases nest the parameter tree (optimizer state, Flax "params")
_ROOTS = ("opt/target/", "params/")


class _Arrays(dict):
    """The .npz arrays; a missing one is a ValueError that says which key the layout needs."""

    def __missing__(self, key: str) -> np.ndarray:
        raise ValueError(
            f"no array {key!r}: expected the google-research/vision_transformer ViT layout "
            f"(embedding/kernel, Transformer/encoderblock_N/..., Transformer/encoder_norm, head)"
        )


def _strip_root(w: dict[str, np.ndarray]) -> _Arrays:
    for root in _ROOTS:
        if f"{root}embedding/kernel" in w:
            return _Arrays({k[len(root):]: v for k, v in w.items() if k.startswith(root)})
    if "Transformer/encoderblock/LayerNorm_0/scale" in w or "pos_embedding" in w:
        raise ValueError("a big_vision checkpoint (stacked 'Transformer/encoderblock/' layers); vitlab reads the "
                         "google-research/vision_transformer layout with one 'encoderblock_N' per layer")
    return _Arrays(w)


def _t(a: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).float()


def _conv(a: np.ndarray) -> Tensor:
    return _t(a.transpose(3, 2, 0, 1))  # HWIO -> OIHW


def _vec(a: np.ndarray) -> Tensor:
    return _t(a.reshape(-1))  # BiT-era GroupNorm parameters are stored (1, 1, 1, C)


def _dense(a: np.ndarray) -> Tensor:
    return _t(a.T)  # (in, out) -> (out, in)


def _convert_resnet(w: dict[str, np.ndarray], prefix: str, out: dict[str, Tensor]) -> None:
    """BiT-style ResNet (conv_root/gn_root, block{s}/unit{u}/conv{1,2,3}, gn{1,2,3}, conv_proj/gn_proj)."""
    out["patch_embed.backbone.stem.conv.weight"] = _conv(w[f"{prefix}conv_root/kernel"])
    out["patch_embed.backbone.stem.norm.weight"] = _vec(w[f"{prefix}gn_root/scale"])
    out["patch_embed.backbone.stem.norm.bias"] = _vec(w[f"{prefix}gn_root/bias"])
    unit = re.compile(rf"^{re.escape(prefix)}block(\d+)/unit(\d+)/")
    units = sorted({(int(m[1]), int(m[2])) for k in w if (m := unit.match(k))})
    for s, u in units:
        src = f"{prefix}block{s}/unit{u}/"
        dst = f"patch_embed.backbone.stages.{s - 1}.blocks.{u - 1}."
        for i in (1, 2, 3):
            out[f"{dst}conv{i}.weight"] = _conv(w[f"{src}conv{i}/kernel"])
            out[f"{dst}norm{i}.weight"] = _vec(w[f"{src}gn{i}/scale"])
            out[f"{dst}norm{i}.bias"] = _vec(w[f"{src}gn{i}/bias"])
        if f"{src}conv_proj/kernel" in w:
            out[f"{dst}downsample.conv.weight"] = _conv(w[f"{src}conv_proj/kernel"])
            out[f"{dst}downsample.norm.weight"] = _vec(w[f"{src}gn_proj/scale"])
            out[f"{dst}downsample.norm.bias"] = _vec(w[f"{src}gn_proj/bias"])


@register_converter("vit", "jax")
def convert_jax_vit(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Converted:
    w = _strip_root(arrays)
    # resampled to another grid as timm's .npz reader does (bilinear, not antialiased)
    out: dict[str, Tensor] = SourceStateDict(pos_interpolation="bilinear", pos_antialias=False)
    # the original models' MLP GELU is flax.linen.gelu, the tanh approximation (as for MLP-Mixer)
    overrides: dict[str, Any] = {"gelu": "tanh"}
    if any(k.startswith(("conv_root/", "ResNet/conv_root/")) for k in w):  # hybrid: a ResNet before the embedding
        _convert_resnet(w, "ResNet/" if "ResNet/conv_root/kernel" in w else "", out)
    out["patch_embed.proj.weight"] = _conv(w["embedding/kernel"])  # a 1x1 kernel in the hybrid
    out["patch_embed.proj.bias"] = _t(w["embedding/bias"])
    if "cls" in w:
        out["cls_token"] = _t(w["cls"])
    else:
        overrides.update(class_token=False, global_pool="avg", fc_norm=False)
    if "Transformer/posembed_input/pos_embedding" in w:
        out["pos_embed"] = _t(w["Transformer/posembed_input/pos_embedding"])
    else:
        overrides["pos_embed"] = "none"
    depth = len({m[1] for k in w if (m := re.match(r"^Transformer/encoderblock_(\d+)/", k))})
    for i in range(depth):
        src, dst = _ENC.format(i), f"blocks.{i}."
        att = src + "MultiHeadDotProductAttention_1/"
        out[dst + "norm1.weight"] = _t(w[src + "LayerNorm_0/scale"])
        out[dst + "norm1.bias"] = _t(w[src + "LayerNorm_0/bias"])
        qkv_w = [w[f"{att}{n}/kernel"] for n in ("query", "key", "value")]  # each (D, heads, hd)
        out[dst + "attn.qkv.weight"] = torch.cat([_t(k.reshape(k.shape[0], -1).T) for k in qkv_w])
        if f"{att}query/bias" in w:
            biases = [w[f"{att}{n}/bias"].reshape(-1) for n in ("query", "key", "value")]  # each (heads, hd)
            out[dst + "attn.qkv.bias"] = torch.cat([_t(b) for b in biases])
        o = w[att + "out/kernel"]  # (heads, hd, D)
        out[dst + "attn.proj.weight"] = _t(o.reshape(-1, o.shape[-1]).T)
        out[dst + "attn.proj.bias"] = _t(w[att + "out/bias"])
        out[dst + "norm2.weight"] = _t(w[src + "LayerNorm_2/scale"])
        out[dst + "norm2.bias"] = _t(w[src + "LayerNorm_2/bias"])
        for j in (0, 1):
            out[dst + f"mlp.fc{j + 1}.weight"] = _dense(w[src + f"MlpBlock_3/Dense_{j}/kernel"])
            out[dst + f"mlp.fc{j + 1}.bias"] = _t(w[src + f"MlpBlock_3/Dense_{j}/bias"])
    norm = "fc_norm" if overrides.get("fc_norm") else "norm"
    out[f"{norm}.weight"] = _t(w["Transformer/encoder_norm/scale"])
    out[f"{norm}.bias"] = _t(w["Transformer/encoder_norm/bias"])
    if "pre_logits/kernel" in w:
        out["pre_logits.fc.weight"] = _dense(w["pre_logits/kernel"])
        out["pre_logits.fc.bias"] = _t(w["pre_logits/bias"])
        overrides["representation_size"] = int(w["pre_logits/kernel"].shape[1])
    else:
        overrides["representation_size"] = None
    if "head/kernel" in w:
        out["head.weight"] = _dense(w["head/kernel"])
        out["head.bias"] = _t(w["head/bias"])
        overrides["num_classes"] = int(w["head/kernel"].shape[1])
    else:
        overrides["num_classes"] = 0
    return Converted(out, overrides)
