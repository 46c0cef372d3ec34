"""timm-format state dicts -> vitlab. vitlab's ViT uses timm's module names, so this is mostly renaming
of legacy keys, plus inferring the head size."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from vitlab.checkpoints.converters import Converted, register_converter


def head_overrides(sd: dict[str, Tensor], head: str = "head") -> dict[str, Any]:
    """num_classes from the head's weight; 0 when the file has no head."""
    w = sd.get(f"{head}.weight")
    return {"num_classes": int(w.shape[0]) if w is not None else 0}


@register_converter("vit", "timm")
def convert_timm_vit(sd: dict[str, Tensor], meta: dict[str, Any]) -> Converted:
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if k.startswith("head.fc."):  # older ClassifierHead wrappers
            k = "head." + k[len("head.fc."):]
        if k.startswith("norm_pre."):
            raise ValueError("timm checkpoint has a pre-norm ('norm_pre'), which vitlab's ViT does not use")
        out[k] = v
    overrides = head_overrides(out)
    if "pre_logits.fc.weight" in out:  # timm < 0.9 kept the representation layer
        overrides["representation_size"] = int(out["pre_logits.fc.weight"].shape[0])
    if "cls_token" not in out:
        overrides.update(class_token=False, global_pool="avg")
    if "pos_embed" not in out:
        overrides["pos_embed"] = "none"
    return Converted(out, overrides)
