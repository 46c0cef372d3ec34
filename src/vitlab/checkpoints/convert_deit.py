"""DeiT checkpoints -> vitlab: timm / original DeiT state dicts, and Hugging Face DeiT models.

vitlab's DeiT keeps timm's module names (``dist_token``, ``head_dist``), so the timm converter only
reuses ViT's. Whether the model has a distillation token is the model name's (``deit_*_distilled_*``, or
``distilled=``), as in timm: a timm file that disagrees is refused when it is loaded
(:func:`vitlab.checkpoints.adapt.check_distillation`), never built as another model than the one named.
Hugging Face's ``DeiTForImageClassificationWithTeacher`` has ``cls_classifier`` / ``distillation_classifier``;
``DeiTForImageClassification`` has one ``classifier`` on the class token although its encoder still
carries the distillation token (``dist_head=False``).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from vitlab.checkpoints.convert_hf import convert_hf_encoder, hf_vit_overrides
from vitlab.checkpoints.convert_timm import convert_timm_vit, head_overrides
from vitlab.checkpoints.converters import Converted, register_converter, register_hf_model_type

_HF_HEADS = {"cls_classifier.": "head.", "distillation_classifier.": "head_dist.", "classifier.": "head."}


@register_converter("deit", "timm")
def convert_timm_deit_named(sd: dict[str, Tensor], meta: dict[str, Any]) -> Converted:
    """A timm / original DeiT file for a named model: ``distilled`` is left to the name."""
    conv = convert_timm_deit(sd, meta)
    conv.overrides.pop("distilled", None)
    return conv


def convert_timm_deit(sd: dict[str, Tensor], meta: dict[str, Any]) -> Converted:
    """The tensors and the architecture the file implies, distillation token included (``distilled``): what the
    official MAE / DINO encoders' converter builds (vitlab.checkpoints.convert_mae)."""
    # The distillation parts are DeiT's own; ViT's converter handles (and checks) the rest.
    dist: dict[str, Tensor] = {}
    for k, v in sd.items():
        if k == "dist_token" or k.startswith("head_dist."):
            dist[k.replace("head_dist.fc.", "head_dist.")] = v  # older ClassifierHead wrappers
    conv = convert_timm_vit({k: v for k, v in sd.items() if k != "dist_token" and not k.startswith("head_dist.")},
                            meta)
    out, overrides = {**conv.state_dict, **dist}, dict(conv.overrides)
    distilled = "dist_token" in out
    overrides["distilled"] = distilled
    if distilled:
        overrides["dist_head"] = True
    return Converted(out, overrides)


register_hf_model_type("deit", "deit_base_patch16_224")


@register_converter("deit", "hf")
def convert_hf_deit(sd: dict[str, Tensor], meta: dict[str, Any]) -> Converted:
    prefix = "deit." if any(k.startswith("deit.") for k in sd) else ""
    # DeiT's classifiers never read the pooler (Dense + tanh on the class token); drop it if present
    encoder = {k: v for k, v in sd.items() if not k.startswith(f"{prefix}pooler.")}
    out = convert_hf_encoder(encoder, prefix)
    for k, v in sd.items():
        for src, dst in _HF_HEADS.items():
            if k.startswith(src):
                out[dst + k[len(src):]] = v
    overrides = hf_vit_overrides(meta.get("config", {})) if meta.get("config") else {}
    overrides.update(head_overrides(out))
    distilled = "dist_token" in out
    overrides["distilled"] = distilled
    if distilled:
        overrides["dist_head"] = "head_dist.weight" in out or not any(k.startswith("classifier.") for k in sd)
    return Converted(out, overrides)
