"""timm / original CaiT state dicts -> vitlab.

vitlab's CaiT reuses the shared ``Block`` and ``LayerScale`` (``ls1.gamma``), where timm and the
original code name the LayerScale vectors ``gamma_1`` / ``gamma_2`` on the block itself.
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor

from vitlab.checkpoints.convert_timm import head_overrides
from vitlab.checkpoints.converters import Converted, register_converter

_GAMMA = re.compile(r"^(blocks(?:_token_only)?\.\d+)\.gamma_([12])$")


@register_converter("cait", "timm")
def convert_timm_cait(sd: dict[str, Tensor], meta: dict[str, Any]) -> Converted:
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if m := _GAMMA.match(k):
            k = f"{m.group(1)}.ls{m.group(2)}.gamma"
        out[k] = v
    overrides = head_overrides(out)
    blocks = {int(k.split(".")[1]) for k in out if k.startswith("blocks.")}
    token_blocks = {int(k.split(".")[1]) for k in out if k.startswith("blocks_token_only.")}
    if blocks:
        overrides["depth"] = max(blocks) + 1
    if token_blocks:
        overrides["depth_token_only"] = max(token_blocks) + 1
    if "cls_token" in out:
        overrides["embed_dim"] = int(out["cls_token"].shape[-1])
    if "blocks.0.attn.proj_l.weight" in out:  # the talking-heads maps are (heads x heads)
        overrides["num_heads"] = int(out["blocks.0.attn.proj_l.weight"].shape[0])
    return Converted(out, overrides)
