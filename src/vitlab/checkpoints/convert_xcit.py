"""XCiT checkpoints -> vitlab: timm state dicts and the official facebookresearch/xcit ``.pth`` files.

vitlab's XCiT uses timm's module names except for LayerScale: timm and the official code keep the
vectors on the block (``gamma1``, ``gamma2``, ``gamma3``), vitlab in the shared ``LayerScale``
(``ls1.gamma`` ...). The official files (``{"model": state_dict}``) name the position encoding
``pos_embeder.`` and fuse the class-attention projections into one ``qkv``; vitlab's class attention has
separate ``q``, ``k``, ``v`` (only the class token's query is computed), so the fused one is split.
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor

from vitlab.checkpoints.convert_timm import head_overrides
from vitlab.checkpoints.converters import Converted, register_converter, register_format_detector

_GAMMA = re.compile(r"^((?:blocks|cls_attn_blocks)\.\d+)\.gamma([123])$")
_FUSED = re.compile(r"^(cls_attn_blocks\.\d+\.attn)\.qkv\.(weight|bias)$")


@register_format_detector("xcit")
def detect_xcit(sd: dict[str, Any]) -> str | None:
    if any(k.startswith("pos_embeder.") or _FUSED.match(k) for k in sd):
        return "official"
    return None


def _convert(sd: dict[str, Tensor]) -> Converted:
    if "blocks.0.attn.temperature" not in sd:
        some = ", ".join(list(sd)[:4])
        raise ValueError(f"not an XCiT checkpoint: no 'blocks.0.attn.temperature' (its first keys: {some})")
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if k.startswith("pos_embeder."):
            k = "pos_embed." + k[len("pos_embeder."):]
        if m := _GAMMA.match(k):
            k = f"{m[1]}.ls{m[2]}.gamma"
        if m := _FUSED.match(k):
            for name, part in zip("qkv", v.chunk(3, dim=0)):
                out[f"{m[1]}.{name}.{m[2]}"] = part.contiguous()
            continue
        out[k] = v
    temp = out["blocks.0.attn.temperature"]  # (heads, 1, 1)
    blocks = {int(k.split(".")[1]) for k in out if k.startswith("blocks.")}
    ca = {int(k.split(".")[1]) for k in out if k.startswith("cls_attn_blocks.")}
    stem_convs = {k.split(".")[2] for k in out if k.startswith("patch_embed.proj.") and k.endswith(".0.weight")}
    overrides: dict[str, Any] = dict(
        embed_dim=int(out["cls_token"].shape[-1]), depth=max(blocks) + 1, num_heads=int(temp.shape[0]),
        cls_attn_layers=max(ca) + 1 if ca else 0, patch_size=16 if len(stem_convs) == 4 else 8,
        in_chans=int(out["patch_embed.proj.0.0.weight"].shape[1]),
        mlp_ratio=out["blocks.0.mlp.fc1.weight"].shape[0] / out["cls_token"].shape[-1],
        qkv_bias="blocks.0.attn.qkv.bias" in out, **head_overrides(out),
    )
    return Converted(out, overrides)


@register_converter("xcit", "timm")
def convert_timm_xcit(sd: dict[str, Tensor], meta: dict[str, Any]) -> Converted:
    return _convert(sd)


@register_converter("xcit", "official")
def convert_official_xcit(sd: dict[str, Tensor], meta: dict[str, Any]) -> Converted:
    return _convert(sd)
