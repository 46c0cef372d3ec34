"""T2T-ViT checkpoints -> vitlab: the official yitu-opensource/T2T-ViT ``.pth.tar`` files.

Those are timm-train-script checkpoints (``state_dict`` / ``state_dict_ema``, possibly with ``module.``
prefixes; checkpoints/io.py unwraps them and takes the EMA weights, the published ones). vitlab keeps the
official module names except inside the Performer T2T layers, whose attention is a module of its own:
``attentionI.kqv`` (rows k, q, v) -> ``attentionI.attn.qkv`` (rows q, k, v), ``attentionI.proj`` ->
``attentionI.attn.proj``, ``attentionI.w`` (the random features, kept as they are) -> ``attentionI.attn.w``,
``attentionI.mlp.0/2`` -> ``attentionI.mlp.fc1/fc2``.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from vitlab.checkpoints.convert_timm import head_overrides
from vitlab.checkpoints.converters import Converted, register_converter, register_format_detector

_PERFORMER = re.compile(r"^(tokens_to_token\.attention\d)\.(kqv|proj|w|mlp\.0|mlp\.2)(\.weight|\.bias|)$")
_RENAME = {"kqv": "attn.qkv", "proj": "attn.proj", "w": "attn.w", "mlp.0": "mlp.fc1", "mlp.2": "mlp.fc2"}


@register_format_detector("t2t")
def detect_t2t(sd: dict[str, Any]) -> str | None:
    return "official" if any(k.startswith("tokens_to_token.") for k in sd) else None


@register_converter("t2t", "official")
def convert_official_t2t(sd: dict[str, Tensor], meta: dict[str, Any]) -> Converted:
    if "tokens_to_token.project.weight" not in sd or "cls_token" not in sd:
        raise KeyError("no tokens_to_token.project / cls_token: this is not a T2T-ViT state dict")
    out: dict[str, Tensor] = {}
    performer = False
    for k, v in sd.items():
        m = _PERFORMER.match(k)
        if m:
            performer = True
            prefix, part, suffix = m.groups()
            if part == "kqv":  # (3d, ...) rows k, q, v -> q, k, v
                kk, q, vv = v.chunk(3, dim=0)
                v = torch.cat([q, kk, vv], dim=0)
            k = f"{prefix}.{_RENAME[part]}{suffix}"
        out[k] = v
    D = int(out["cls_token"].shape[-1])
    depth = len({k.split(".")[1] for k in out if k.startswith("blocks.")})
    over: dict[str, Any] = {
        "t2t_type": "performer" if performer else "transformer", "embed_dim": D, "depth": depth,
        "token_dim": int(out["tokens_to_token.project.weight"].shape[1]) // 9,
    }
    if depth:
        over["mlp_ratio"] = out["blocks.0.mlp.fc1.weight"].shape[0] / D
        over["qkv_bias"] = "blocks.0.attn.qkv.bias" in out
    over.update(head_overrides(out))  # no head: a backbone (num_classes=0), not the variant's 1000 classes
    return Converted(out, over)


@register_converter("t2t", "timm")
def convert_timm_t2t(sd: dict[str, Tensor], meta: dict[str, Any]) -> Converted:
    # timm has no T2T-ViT; a file without the official names is not a T2T-ViT checkpoint
    return convert_official_t2t(sd, meta)
