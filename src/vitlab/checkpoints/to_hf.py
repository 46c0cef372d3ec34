"""vitlab models -> Hugging Face transformers folders, as ``save_pretrained`` writes them.

A ViT (and a DeiT without a distillation token, which transformers runs as ``ViTForImageClassification``, as the
hub's ``facebook/deit-*`` folders do) becomes ``ViTForImageClassification``; a distilled DeiT with its two heads
``DeiTForImageClassificationWithTeacher`` (the average of the class and distillation heads, as vitlab's
inference). The folder holds ``model.safetensors`` under transformers' names (those its saved files carry:
``vit.encoder.layer.N.attention.attention.query``, ...; the fused q / k / v projection split), ``config.json``
(sizes, ``hidden_act``, ``layer_norm_eps``, ``id2label`` from the class names, ``problem_type`` for a sigmoid or
regression head) and ``preprocessor_config.json``: the processor that prepares images as the model's
preprocessing does (``ViTImageProcessor`` for a squash to the input size, ``DeiTImageProcessor`` for a squash
and a crop, ``BitImageProcessor`` for the shorter side and a centre crop). ``AutoModelForImageClassification``,
``AutoImageProcessor`` and ``pipeline("image-classification")`` load it without timm or vitlab; vitlab reads it
back (``vitlab.load_model``) with the same outputs.

What transformers' classes cannot compute is refused, naming it (average pooling, registers, LayerScale, a
pre-logits layer, a norm before the blocks, fixed or no position tables, Linformer, a hybrid stem, other
families). What differs only in preprocessing or at other input sizes is returned as notes: transformers' processors
place an odd crop margin's extra pixel after the crop (``margin // 2``; vitlab's default, as timm's, rounds
``margin / 2``), keep the aspect of a non-square input's shorter side, and resample the position table only when
asked (``interpolate_pos_encoding=True``, bicubic without antialiasing).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from vitlab.checkpoints.families import family_label
from vitlab.checkpoints.io import write_model_folder
from vitlab.checkpoints.vitlab_format import model_metadata, unwrap_model

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
PROCESSOR_FILE = "preprocessor_config.json"
# vitlab's gelu -> transformers' hidden_act (ACT2FN); "gelu_pytorch_tanh" is F.gelu(approximate="tanh"), as vitlab's
_HIDDEN_ACT = {"exact": "gelu", "tanh": "gelu_pytorch_tanh", "quick": "quick_gelu"}
_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}  # PIL's codes, as transformers writes them
_PROBLEM = {"sigmoid": "multi_label_classification", "none": "regression"}
# ViT config fields and the value transformers' ViT computes; another value is refused with the reason
_VIT_FIXED: dict[str, tuple[Any, str]] = {
    "class_token": (True, "transformers' ViT classifies its class token"),
    "global_pool": ("token", "transformers' ViTForImageClassification classifies the class token"),
    "reg_tokens": (0, "transformers' ViT has no register tokens (Dinov2WithRegisters is a backbone there)"),
    "no_embed_class": (False, "transformers' ViT position table covers the class token"),
    "pos_embed": ("learn", "transformers' ViT has a learned position table"),
    "pre_norm": (False, "transformers' ViT has no norm before the blocks"),
    "representation_size": (None, "transformers' ViTForImageClassification has no pre-logits layer"),
    "init_values": (None, "transformers' ViT has no LayerScale"),
    "attn_type": ("softmax", "transformers' ViT has softmax attention only (no Linformer)"),
    "hybrid_layers": (None, "transformers has no hybrid (ResNet stem) ViT classifier"),
}


@dataclass(frozen=True)
class HfExport:
    """What was written: transformers' class (``architecture``), its ``model_type`` and what a user should know
    (``notes``: preprocessing or behaviour at other sizes that transformers' classes do otherwise)."""

    architecture: str
    model_type: str
    notes: tuple[str, ...] = ()


def _family(model: nn.Module) -> str:
    from vitlab.models.registry import get_entry

    return get_entry(model.model_name).family


def _distilled(model: nn.Module) -> bool:
    return bool(getattr(model.cfg, "distilled", False))


def _check(model: nn.Module) -> None:
    """Refuse what transformers' ViT / DeiT classifiers cannot compute, naming it."""
    name = getattr(model, "model_name", type(model).__name__)
    family = _family(model)
    if family not in ("vit", "deit"):
        raise ValueError(f"{name} is a {family_label(family)} model: vitlab writes Hugging Face folders of ViT and DeiT "
                         f"models; export it with --format timm (a timm hub folder, which transformers' "
                         f"AutoModelForImageClassification loads with timm installed) or --format onnx")
    cfg = model.cfg
    for field, (value, why) in _VIT_FIXED.items():
        have = getattr(cfg, field, value)
        if have != value:
            raise ValueError(f"{name} has {field}={have!r}: {why}; there is no transformers layout to export it to "
                             f"(--format timm or onnx keeps it)")
    if getattr(cfg, "fc_norm", None):
        raise ValueError(f"{name} has fc_norm=True: transformers' ViT normalises the tokens before the class token is "
                         f"read, not after pooling; there is no transformers layout to export it to")
    if _distilled(model) and not cfg.dist_head:
        raise ValueError(f"{name} has a distillation token without its own head (dist_head=False): transformers' "
                         f"distilled DeiT has both heads")
    hidden = int(cfg.mlp_ratio * cfg.embed_dim)
    if hidden != cfg.mlp_ratio * cfg.embed_dim:
        raise ValueError(f"{name}: mlp_ratio {cfg.mlp_ratio} x embed_dim {cfg.embed_dim} is not a whole MLP width "
                         f"(transformers' intermediate_size)")
    if not model.num_classes:
        raise ValueError(f"{name} has no classifier (num_classes=0): vitlab writes Hugging Face image classifiers")


def hf_config(model: nn.Module, *, class_names: list[str] | None = None) -> dict[str, Any]:
    """``config.json`` of ``model``'s transformers folder (ViTConfig / DeiTConfig fields, as save_pretrained writes
    them); a ValueError names what transformers cannot build."""
    model = unwrap_model(model)
    _check(model)
    cfg = model.cfg
    meta = model_metadata(model, class_names=class_names)
    names = meta["class_names"] or [f"LABEL_{i}" for i in range(model.num_classes)]
    distilled = _distilled(model)
    size = cfg.img_size
    config: dict[str, Any] = {
        "architectures": ["DeiTForImageClassificationWithTeacher" if distilled else "ViTForImageClassification"],
        "model_type": "deit" if distilled else "vit",
        "hidden_size": cfg.embed_dim,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": int(cfg.mlp_ratio * cfg.embed_dim),
        "hidden_act": _HIDDEN_ACT[cfg.gelu],
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": cfg.norm_eps,
        "image_size": list(size) if isinstance(size, tuple) else size,
        "patch_size": cfg.patch_size,
        "num_channels": cfg.in_chans,
        "qkv_bias": cfg.qkv_bias,
        "encoder_stride": cfg.patch_size,
        "id2label": {str(i): n for i, n in enumerate(names)},
        "label2id": {n: i for i, n in enumerate(names)},
    }
    problem = _PROBLEM.get(meta.get("score_function", ""))
    if problem:  # transformers' pipeline then scores with sigmoid / raw values, as vitlab
        config["problem_type"] = problem
    return config


def to_hf_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model``'s weights under the names of transformers' saved files (the fused q / k / v projection split into
    query / key / value); the class :func:`hf_config` names loads them strictly."""
    model = unwrap_model(model)
    _check(model)
    distilled = _distilled(model)
    root = "deit." if distilled else "vit."
    out: dict[str, Tensor] = {}
    for k, v in model.state_dict().items():
        v = v.detach().contiguous().cpu()
        if k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            base = f"{root}encoder.layer.{i}."
            if rest.startswith("attn.qkv."):
                kind = rest.rsplit(".", 1)[1]
                for part, t in zip(("query", "key", "value"), v.chunk(3)):
                    out[f"{base}attention.attention.{part}.{kind}"] = t.contiguous()
                continue
            renamed = {"norm1.": "layernorm_before.", "norm2.": "layernorm_after.", "attn.proj.": "attention.output.dense.",
                       "mlp.fc1.": "intermediate.dense.", "mlp.fc2.": "output.dense."}
            prefix = next(p for p in renamed if rest.startswith(p))
            out[base + renamed[prefix] + rest[len(prefix):]] = v
            continue
        top = {"cls_token": f"{root}embeddings.cls_token", "dist_token": f"{root}embeddings.distillation_token",
               "pos_embed": f"{root}embeddings.position_embeddings",
               "patch_embed.proj.weight": f"{root}embeddings.patch_embeddings.projection.weight",
               "patch_embed.proj.bias": f"{root}embeddings.patch_embeddings.projection.bias",
               "norm.weight": f"{root}layernorm.weight", "norm.bias": f"{root}layernorm.bias",
               "head.weight": ("cls_classifier" if distilled else "classifier") + ".weight",
               "head.bias": ("cls_classifier" if distilled else "classifier") + ".bias",
               "head_dist.weight": "distillation_classifier.weight", "head_dist.bias": "distillation_classifier.bias"}
        if k not in top:
            raise ValueError(f"{model.model_name}: no transformers name for {k!r}")
        out[top[k]] = v
    return out


def hf_processor_config(model: nn.Module) -> tuple[dict[str, Any], list[str]]:
    """``preprocessor_config.json`` for ``model``'s preprocessing, and notes on what transformers' processor does
    otherwise (the crop's odd pixel, the shorter side of a non-square input)."""
    model = unwrap_model(model)
    pre = model.preprocessing
    c, h, w = pre.input_size
    notes: list[str] = []
    if pre.channel_order != "RGB":
        raise ValueError(f"{model.model_name} reads {pre.channel_order} images: transformers' ViT processors feed RGB")
    common = {"do_resize": True, "resample": _RESAMPLE[pre.interpolation], "do_rescale": True,
              "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(pre.mean), "image_std": list(pre.std)}
    if c == 1:
        common["do_convert_rgb"] = False
        notes.append("a 1-channel model: give transformers' processor grayscale images (it does not convert them)")
    rh, rw = pre.resize_side(h), pre.resize_side(w)
    cropped = (rh, rw) != (h, w)
    if pre.crop_mode == "squash" and not cropped:
        config = {"image_processor_type": "ViTImageProcessor", **common, "size": {"height": h, "width": w}}
    elif pre.crop_mode == "squash":
        config = {"image_processor_type": "DeiTImageProcessor", **common, "size": {"height": rh, "width": rw},
                  "do_center_crop": True, "crop_size": {"height": h, "width": w}}
    else:
        config = {"image_processor_type": "BitImageProcessor", **common, "size": {"shortest_edge": min(rh, rw)},
                  "do_center_crop": True, "crop_size": {"height": h, "width": w}}
        if h != w:
            notes.append(f"a {h}x{w} input: transformers' processor resizes the shorter side to {min(rh, rw)} and crops; "
                         f"vitlab scales the image to cover {rh}x{rw} (timm's ResizeKeepRatio)")
    if config.get("do_center_crop") and pre.crop_offset == "round":
        notes.append("transformers' processors start an odd crop margin's crop at margin // 2, vitlab (as timm) at "
                     "round(margin / 2): one pixel apart on images whose margin is odd")
    return config, notes


def save_hf_folder(model: nn.Module, folder: str | Path, *, class_names: list[str] | None = None,
                   overwrite: bool = False) -> HfExport:
    """Write ``model`` as a transformers folder (``model.safetensors``, ``config.json``, ``preprocessor_config.json``),
    which ``AutoModelForImageClassification`` / ``AutoImageProcessor.from_pretrained(FOLDER)`` load with the same
    outputs. The files are written into a temporary folder beside ``folder`` and renamed into place; an existing
    non-empty ``folder`` is refused unless ``overwrite`` (its other files are kept)."""
    model = unwrap_model(model)
    folder = Path(folder)
    config = hf_config(model, class_names=class_names)  # refuses before anything is written
    processor, notes = hf_processor_config(model)
    if model.cfg.dynamic_img_size:
        notes.append("at other input sizes transformers resamples the position table only when asked "
                     "(interpolate_pos_encoding=True), bicubic without antialiasing"
                     + ("" if not model.cfg.pos_antialias else "; vitlab's resamples it antialiased"))
    sd = to_hf_state_dict(model)
    write_model_folder(folder, sd, {CONFIG_FILE: config, PROCESSOR_FILE: processor}, overwrite=overwrite,
                       kind="a Hugging Face export")
    for note in notes:
        log.debug("Hugging Face export of %s: %s", model.model_name, note)
    return HfExport(config["architectures"][0], config["model_type"], tuple(notes))
