"""TNT checkpoints -> vitlab: timm's state dicts (official and legacy layouts) and the official
huawei-noah/Efficient-AI-Backbones ones.

vitlab keeps timm's module names except in the attention, which is vitlab's fused-qkv ``Attention``:
timm's (and the official) separate ``qk`` (2D x D) and ``v`` (D x D) projections are concatenated into
``qkv`` (q, k, v in that order, as ``Attention`` splits them). The official names (``outer_pos``,
``inner_pos`` as (1, pixels, C), ``patch_embed``, ``inner_attn``, ...) are first renamed to timm's.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from vitlab.checkpoints.convert_timm import head_overrides
from vitlab.checkpoints.converters import Converted, register_converter, register_format_detector

# official name fragment -> timm's (the order matters: "patch_embed" before anything else that contains it)
_OFFICIAL = (
    ("outer_pos", "patch_pos"), ("inner_pos", "pixel_pos"), ("patch_embed", "pixel_embed"),
    ("proj_norm1", "norm1_proj"), ("proj_norm2", "norm2_proj"), ("inner_norm1", "norm_in"),
    ("inner_attn", "attn_in"), ("inner_norm2", "norm_mlp_in"), ("inner_mlp", "mlp_in"),
    ("outer_norm1", "norm_out"), ("outer_attn", "attn_out"), ("outer_norm2", "norm_mlp"), ("outer_mlp", "mlp"),
)


@register_format_detector("tnt")
def detect_tnt(sd: dict[str, Any]) -> str | None:
    if "outer_pos" in sd:
        return "official"
    if "patch_pos" in sd:
        return "timm"
    return None


def _fuse_qkv(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if ".qk." in k:
            v_key = k.replace(".qk.", ".v.")
            out[k.replace(".qk.", ".qkv.")] = torch.cat([v, sd[v_key]], dim=0)
        elif ".v." in k and k.replace(".v.", ".qk.") in sd:
            continue  # joined with its qk
        else:
            out[k] = v
    return out


def _overrides(sd: dict[str, Tensor]) -> dict[str, Any]:
    D = int(sd["cls_token"].shape[-1])
    inner = int(sd["pixel_pos"].shape[1])
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    over: dict[str, Any] = {"embed_dim": D, "inner_dim": inner, "depth": depth}
    if depth:
        over["legacy"] = "blocks.0.norm2_proj.weight" not in sd
        over["mlp_ratio"] = sd["blocks.0.mlp.fc1.weight"].shape[0] / D
        over["qkv_bias"] = "blocks.0.attn_out.qkv.bias" in sd
    over.update(head_overrides(sd))  # no head: a backbone (timm's num_classes=0), not the variant's 1000 classes
    return over


@register_converter("tnt", "timm")
def convert_timm_tnt(sd: dict[str, Tensor], meta: dict[str, Any]) -> Converted:
    if "patch_pos" not in sd or "pixel_pos" not in sd:
        raise KeyError("no patch_pos / pixel_pos: this is not a TNT state dict")
    out = _fuse_qkv(dict(sd))
    return Converted(out, _overrides(out))


@register_converter("tnt", "official")
def convert_official_tnt(sd: dict[str, Tensor], meta: dict[str, Any]) -> Converted:
    renamed: dict[str, Tensor] = {}
    for k, v in sd.items():
        if k == "outer_tokens":
            continue  # an unused parameter of the official model
        for src, dst in _OFFICIAL:
            k = k.replace(src, dst)
        renamed[k] = v
    pos = renamed.get("pixel_pos")
    if pos is not None and pos.ndim == 3:  # (1, pixels, C) -> (1, C, rows, cols)
        side = math.isqrt(pos.shape[1])
        renamed["pixel_pos"] = pos.transpose(1, 2).reshape(1, pos.shape[2], side, side)
    return convert_timm_tnt(renamed, meta)
