"""CrossViT checkpoints -> vitlab: timm's state dicts and the official IBM/CrossViT ones.

vitlab keeps the released module names (``blocks.K.blocks.B.I``, ``projs``, ``fusion``, ``revert_projs``,
``norm.B``, ``head.B``) and the official ``pos_embed.B`` / ``cls_token.B`` (timm renames those to
``pos_embed_B`` / ``cls_token_B``). The fusion's attention is vitlab's ``ClassAttention``, whose
projections are ``q``/``k``/``v`` where both sources say ``wq``/``wk``/``wv``.
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor

from vitlab.checkpoints.convert_timm import head_overrides
from vitlab.checkpoints.converters import Converted, register_converter, register_format_detector

_TABLE = re.compile(r"^(pos_embed|cls_token)[._]([01])$")
_FUSION = re.compile(r"^(blocks\.\d+\.fusion\.\d+\.attn\.)w([qkv])\.")


@register_format_detector("crossvit")
def detect_crossvit(sd: dict[str, Any]) -> str | None:
    if "pos_embed.0" in sd:
        return "official"
    if "pos_embed_0" in sd:
        return "timm"
    return None


def _convert(sd: dict[str, Tensor]) -> Converted:
    if not any(_TABLE.match(k) for k in sd):
        raise KeyError("no pos_embed_0 / pos_embed.0: this is not a CrossViT state dict")
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        m = _TABLE.match(k)
        if m:
            k = f"{m.group(1)}.{m.group(2)}"
        k = _FUSION.sub(r"\1\2.", k)
        out[k] = v
    return Converted(out, _overrides(out))


def _overrides(sd: dict[str, Tensor]) -> dict[str, Any]:
    """The architecture the tensors fix: widths, blocks per branch, MLP ratios, dagger stem, classes (0 without
    heads)."""
    dims = tuple(int(sd[f"cls_token.{b}"].shape[-1]) for b in range(2))
    over: dict[str, Any] = {"embed_dim": dims, "multi_conv": "patch_embed.0.proj.0.weight" in sd}
    blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("blocks.")})
    depth = []
    for i in blocks:
        per_branch = []
        for b in range(2):
            ids = {int(k.split(".")[4]) for k in sd if k.startswith(f"blocks.{i}.blocks.{b}.")}
            per_branch.append(len(ids))
        depth.append(tuple(per_branch))
    if depth:
        over["depth"] = tuple(depth)
        over["mlp_ratio"] = tuple(sd[f"blocks.0.blocks.{b}.0.mlp.fc1.weight"].shape[0] / dims[b] for b in range(2))
    over.update(head_overrides(sd, "head.0"))  # no heads: a backbone (timm's num_classes=0)
    return over


@register_converter("crossvit", "timm")
def convert_timm_crossvit(sd: dict[str, Tensor], meta: dict[str, Any]) -> Converted:
    return _convert(sd)


@register_converter("crossvit", "official")
def convert_official_crossvit(sd: dict[str, Tensor], meta: dict[str, Any]) -> Converted:
    return _convert(sd)
