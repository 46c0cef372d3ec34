"""timm-format state dicts -> vitlab. vitlab's ViT uses timm's module names, so this is mostly renaming
of legacy keys, plus reading off the file the choices that change which tensors exist: head size, class
token, register tokens (``reg_token``, (1, R, D)), where the final norm sits (and so the pooling), LayerScale, qkv
bias, a norm before the blocks (``norm_pre``: CLIP's ``pre_norm``) and attention pooling (``attn_pool``: SigLIP's
``global_pool="map"``). The MLP's activation (CLIP's QuickGELU, SigLIP's tanh GELU) is not in the tensors: the
model name decides it, as in timm. Whether the position table has entries for the prefix tokens (timm's ``no_embed_class``) is the model
name's: the ``deit3_*`` and ``vit_*_reg4_dinov2`` names have none.

The official DeiT III files (facebookresearch/deit ``models_v2.py``) differ in two ways: LayerScale is
``blocks.N.gamma_1`` / ``gamma_2`` on the block (renamed to ``blocks.N.ls1.gamma``, as timm's DeiT converter does),
and the position table has no entry for the class token, which is prepended after the table is added (timm's
``no_embed_class=True``). A zero entry for it in front of the table gives the same sums in vitlab's table, which
covers the class token, at the file's resolution and when the patch grid is resampled. The ``deit3_*`` names (DeiT's
``no_embed_class``) take it back out (``DeiT.adapt_checkpoint``); timm's own deit3 files load there unchanged.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import torch
from torch import Tensor

from vitlab.checkpoints.converters import Converted, register_converter

log = logging.getLogger(__name__)

_GAMMA = re.compile(r"^(blocks\.\d+)\.gamma_([12])$")  # DeiT III's official LayerScale names

# timm ViT options whose tensors vitlab's ViT has no place for
_UNSUPPORTED = {
    "dist_token": "a distillation token (load it as a DeiT model)",
}


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
        for prefix, what in _UNSUPPORTED.items():
            if k.startswith(prefix):
                raise ValueError(f"timm checkpoint has {what}, which vitlab's ViT does not have (key {k!r})")
        if ".q_norm." in k or ".k_norm." in k:
            raise ValueError(f"timm checkpoint normalises queries and keys (key {k!r}); vitlab's ViT does not")
        if m := _GAMMA.match(k):
            k = f"{m.group(1)}.ls{m.group(2)}.gamma"
        out[k] = v
    if any(_GAMMA.match(k) for k in sd):
        _add_class_entry(out)
    overrides = head_overrides(out)
    if "pre_logits.fc.weight" in out:  # timm < 0.9 kept the representation layer
        overrides["representation_size"] = int(out["pre_logits.fc.weight"].shape[0])
    has_norm, has_fc_norm = "norm.weight" in out, "fc_norm.weight" in out
    if has_norm and has_fc_norm:
        raise ValueError("timm checkpoint has both 'norm' and 'fc_norm'; vitlab's ViT has one final norm")
    if has_fc_norm:
        # timm puts the final norm after pooling only when it averages the patch tokens (fc_norm=None default)
        overrides.update(global_pool="avg", fc_norm=True)
    if "cls_token" not in out:
        overrides.update(class_token=False, global_pool="avg", fc_norm=has_fc_norm)
    if "attn_pool.latent" in out:  # timm's AttentionPoolLatent: the final norm stays before it
        if "attn_pool.pos_embed" in out or "attn_pool.q_norm.weight" in out:
            raise ValueError("timm checkpoint's attention pool has a position table or query/key norms "
                             "('attn_pool.pos_embed' / 'attn_pool.q_norm'); vitlab's has neither")
        overrides.update(global_pool="map", fc_norm=False)
    elif any(k.startswith("attn_pool.") for k in out):
        raise ValueError("timm checkpoint pools with an attention pool without a learned query (timm's "
                         "AttentionPoolPrr, 'attn_pool.*' without 'attn_pool.latent'); vitlab's ViT has not")
    overrides["pre_norm"] = "norm_pre.weight" in out  # timm's patch projection has no bias then
    reg = out.get("reg_token")
    overrides["reg_tokens"] = int(reg.shape[1]) if reg is not None and reg.ndim == 3 else 0
    if "pos_embed" not in out:
        overrides["pos_embed"] = "none"
    if "blocks.0.ls1.gamma" in out:
        overrides["init_values"] = 1.0  # any value: it only makes the LayerScale modules exist
    if "blocks.0.attn.qkv.weight" in out and "blocks.0.attn.qkv.bias" not in out:
        overrides["qkv_bias"] = False
    return Converted(out, overrides)


def _add_class_entry(out: dict[str, Tensor]) -> None:
    """DeiT III's table (1, H*W, D), added to the patch tokens only -> (1, 1 + H*W, D) with a zero class entry."""
    pos = out.get("pos_embed")
    if "cls_token" not in out or pos is None or pos.ndim != 3:
        return
    n = int(pos.shape[1])
    if n > 1 and math.isqrt(n) ** 2 == n and math.isqrt(n - 1) ** 2 != n - 1:
        out["pos_embed"] = torch.cat([pos.new_zeros(1, 1, pos.shape[-1]), pos], dim=1)  # (1, 1 + H*W, D)
        log.info("DeiT III layout: its position table has no class-token entry; a zero one is added in front "
                 "(the same sums)")
