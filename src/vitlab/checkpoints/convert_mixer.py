"""MLP-Mixer checkpoints -> vitlab: timm state dicts and the original JAX ``.npz`` files.

timm names the stem ``stem.proj`` (vitlab: ``patch_embed.proj``, as in every family, so that the analysis
tools find it) and otherwise uses vitlab's names. The JAX files of google-research/vision_transformer
(``gs://mixer_models``) hold ``stem/kernel`` (HWIO), ``MixerBlock_i/{LayerNorm_0, token_mixing/Dense_{0,1},
LayerNorm_1, channel_mixing/Dense_{0,1}}``, ``pre_head_layer_norm`` and ``head``, Dense kernels (in, out).
The JAX models use the tanh approximation of GELU, timm's the exact one: each converter says which.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vitlab.checkpoints.convert_timm import head_overrides
from vitlab.checkpoints.converters import Converted, register_converter

_ROOTS = ("opt/target/", "params/")


def _shape_overrides(out: dict[str, Tensor]) -> dict[str, Any]:
    """Width, depth, patch, grid and MLP ratios read off the converted tensors."""
    w = out["patch_embed.proj.weight"]  # (D, C, P, P)
    D, C, P = int(w.shape[0]), int(w.shape[1]), int(w.shape[-1])
    depth = len({m[1] for k in out if (m := re.match(r"^blocks\.(\d+)\.", k))})
    tok = out["blocks.0.mlp_tokens.fc1.weight"]  # (D_S, N)
    ch = out["blocks.0.mlp_channels.fc1.weight"]  # (D_C, D)
    side = math.isqrt(int(tok.shape[1]))
    over: dict[str, Any] = dict(embed_dim=D, in_chans=C, patch_size=P, depth=depth,
                                tokens_mlp_ratio=tok.shape[0] / D, channels_mlp_ratio=ch.shape[0] / D)
    if side * side == tok.shape[1]:
        over["img_size"] = side * P
    return over


def _refuse_other_family(sd: dict[str, Any], expected: str) -> None:
    if expected not in sd:
        some = ", ".join(list(sd)[:4])
        raise ValueError(f"not an MLP-Mixer checkpoint: no {expected!r} (its first keys: {some})")


@register_converter("mixer", "timm")
def convert_timm_mixer(sd: dict[str, Tensor], meta: dict[str, Any]) -> Converted:
    _refuse_other_family(sd, "blocks.0.mlp_tokens.fc1.weight")
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if k.startswith("stem."):
            k = "patch_embed." + k[len("stem."):]
        out[k] = v
    _refuse_other_family(out, "patch_embed.proj.weight")
    overrides = {**_shape_overrides(out), **head_overrides(out), "gelu": "exact"}
    return Converted(out, overrides)


def _t(a: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).float()


@register_converter("mixer", "jax")
def convert_jax_mixer(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Converted:
    w = dict(arrays)
    for root in _ROOTS:
        if f"{root}stem/kernel" in w:
            w = {k[len(root):]: v for k, v in w.items() if k.startswith(root)}
            break
    _refuse_other_family(w, "stem/kernel")
    out: dict[str, Tensor] = {
        "patch_embed.proj.weight": _t(w["stem/kernel"].transpose(3, 2, 0, 1)),  # HWIO -> OIHW
        "patch_embed.proj.bias": _t(w["stem/bias"]),
    }
    depth = len({m[1] for k in w if (m := re.match(r"^MixerBlock_(\d+)/", k))})
    if depth == 0:
        raise ValueError("no 'MixerBlock_N/' arrays: expected the google-research MLP-Mixer .npz layout")
    for i in range(depth):
        src, dst = f"MixerBlock_{i}/", f"blocks.{i}."
        for j, norm in ((0, "norm1"), (1, "norm2")):
            out[f"{dst}{norm}.weight"] = _t(w[f"{src}LayerNorm_{j}/scale"])
            out[f"{dst}{norm}.bias"] = _t(w[f"{src}LayerNorm_{j}/bias"])
        for mix, mlp in (("token_mixing", "mlp_tokens"), ("channel_mixing", "mlp_channels")):
            for j in (0, 1):
                out[f"{dst}{mlp}.fc{j + 1}.weight"] = _t(w[f"{src}{mix}/Dense_{j}/kernel"].T)  # (in, out) -> (out, in)
                out[f"{dst}{mlp}.fc{j + 1}.bias"] = _t(w[f"{src}{mix}/Dense_{j}/bias"])
    out["norm.weight"] = _t(w["pre_head_layer_norm/scale"])
    out["norm.bias"] = _t(w["pre_head_layer_norm/bias"])
    if "head/kernel" in w:
        out["head.weight"] = _t(w["head/kernel"].T)
        out["head.bias"] = _t(w["head/bias"])
    overrides = {**_shape_overrides(out), **head_overrides(out), "gelu": "tanh"}
    return Converted(out, overrides)
