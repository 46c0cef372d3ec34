"""vitlab models -> Hugging Face transformers folders, as ``save_pretrained`` writes them.

A ViT (and a DeiT without a distillation token, which transformers runs as ``ViTForImageClassification``, as the
hub's ``facebook/deit-*`` folders do) becomes ``ViTForImageClassification``; a distilled DeiT with its two heads
``DeiTForImageClassificationWithTeacher`` (the average of the class and distillation heads, as vitlab's
inference); a Swin v1 ``SwinForImageClassification`` (each stage's patch merging at the end of the stage before,
as transformers places it). The folder holds ``model.safetensors`` under transformers' names (those its saved files carry:
``vit.encoder.layer.N.attention.attention.query``, ...; the fused q / k / v projection split), ``config.json``
(sizes, ``hidden_act``, ``layer_norm_eps``, ``id2label`` from the class names, ``problem_type`` for a sigmoid or
regression head) and ``preprocessor_config.json``: the processor that prepares images as the model's
preprocessing does (``ViTImageProcessor`` for a squash to the input size, ``DeiTImageProcessor`` for a squash
and a crop, ``BitImageProcessor`` for the shorter side and a centre crop). ``AutoModelForImageClassification``,
``AutoImageProcessor`` and ``pipeline("image-classification")`` load it without timm or vitlab; vitlab reads it
back (``vitlab.load_model``) with the same outputs.

What transformers' classes cannot compute is refused, naming it (average pooling, registers, LayerScale, a
pre-logits layer, a norm before the blocks, fixed or no position tables, Linformer, a hybrid stem; a Swin with
windows per stage, other norm epsilons in its embedding, padding after the shift where its maps need padding;
other families). What differs only in preprocessing or at other input sizes is returned as notes: transformers' processors
place an odd crop margin's extra pixel after the crop (``margin // 2``; vitlab's default, as timm's, rounds
``margin / 2``), keep the aspect of a non-square input's shorter side, and resample the position table only when
asked (``interpolate_pos_encoding=True``, bicubic without antialiasing).
"""

from __future__ import annotations

import logging
import re
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
    """Refuse what transformers' ViT / DeiT / Swin classifiers cannot compute, naming it."""
    name = getattr(model, "model_name", type(model).__name__)
    family = _family(model)
    if family not in ("vit", "deit", "swin"):
        raise ValueError(f"{name} is a {family_label(family)} model: vitlab writes Hugging Face folders of ViT, DeiT "
                         f"and Swin (v1) models; export it with --format timm (a timm hub folder, which transformers' "
                         f"AutoModelForImageClassification loads with timm installed) or --format onnx")
    if not model.num_classes:
        raise ValueError(f"{name} has no classifier (num_classes=0): vitlab writes Hugging Face image classifiers")
    if family == "swin":
        _check_swin(model, name)
        return
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


_HF_SWIN_EMBED_EPS = 1e-5  # transformers' Swin patch-embedding and patch-merging norms: nn.LayerNorm's default


def _check_swin(model: nn.Module, name: str) -> None:
    cfg = model.cfg
    if cfg.version != 1:
        raise ValueError(f"{name} is a Swin v2 model: vitlab writes Hugging Face folders of Swin v1; export it with "
                         f"--format timm or onnx")
    windows = cfg.window_size if isinstance(cfg.window_size, tuple) else (cfg.window_size,)
    if len(set(windows)) != 1:
        raise ValueError(f"{name} has window_size={cfg.window_size!r}: transformers' Swin has one window for every "
                         f"stage")
    embed_eps = cfg.embed_norm_eps if cfg.embed_norm_eps is not None else cfg.norm_eps
    if embed_eps != _HF_SWIN_EMBED_EPS:
        raise ValueError(f"{name}: its patch-embedding and patch-merging norms have eps {embed_eps}; transformers' "
                         f"Swin keeps {_HF_SWIN_EMBED_EPS} there (build it with embed_norm_eps={_HF_SWIN_EMBED_EPS})")
    small = _stages(model, lambda side, window: side < window)
    if small:
        raise ValueError(f"{name}: at its input size stage(s) {small} have maps smaller than the window, which vitlab "
                         f"(as the official Swin and timm) shrinks there with its bias table; transformers builds "
                         f"every stage's table for the full window")
    if not cfg.pad_before_shift and _padded_stages(model):
        raise ValueError(f"{name}: at its input size stage(s) {_padded_stages(model)} pad their map to a multiple of "
                         f"the window, after the cyclic shift (timm's order, pad_before_shift=False); transformers "
                         f"pads before it, which gives other outputs there")
    from vitlab.checkpoints.convert_swin import _check_hf_window_clamp

    size = cfg.img_size if isinstance(cfg.img_size, tuple) else (cfg.img_size, cfg.img_size)
    try:
        _check_hf_window_clamp({"image_size": list(size), "patch_size": cfg.patch_size, "window_size": windows[0],
                                "depths": list(cfg.depths)}, "swin")
    except ValueError as e:  # the reading side's check, in its words: transformers decides the window otherwise
        raise ValueError(f"{name}: transformers' Swin would compute this input size otherwise, so there is no "
                         f"transformers layout to export it to ({e})") from None


def _padded_stages(model: nn.Module) -> list[int]:
    """The stages with a shifted block (two blocks or more) whose map (at the model's input size) is larger than the
    window and not a multiple of it: where padding before or after the shift gives other outputs."""
    return [s for s in _stages(model, lambda side, window: side > window and side % window) if model.cfg.depths[s] > 1]


def _stages(model: nn.Module, test: Any) -> list[int]:
    """The stages where ``test(side, window)`` holds for a side of the map at the model's input size."""
    cfg = model.cfg
    h, w = cfg.img_size if isinstance(cfg.img_size, tuple) else (cfg.img_size, cfg.img_size)
    h, w = -(-h // cfg.patch_size), -(-w // cfg.patch_size)
    window = cfg.window_size if isinstance(cfg.window_size, int) else cfg.window_size[0]
    out = []
    for stage in range(len(cfg.depths)):
        if stage:
            h, w = (h + 1) // 2, (w + 1) // 2
        if any(test(side, window) for side in (h, w)):
            out.append(stage)
    return out


def hf_config(model: nn.Module, *, class_names: list[str] | None = None) -> dict[str, Any]:
    """``config.json`` of ``model``'s transformers folder (ViTConfig / DeiTConfig / SwinConfig fields, as save_pretrained
    writes them); a ValueError names what transformers cannot build."""
    model = unwrap_model(model)
    _check(model)
    cfg = model.cfg
    meta = model_metadata(model, class_names=class_names)
    names = meta["class_names"] or [f"LABEL_{i}" for i in range(model.num_classes)]
    labels = {"id2label": {str(i): n for i, n in enumerate(names)}, "label2id": {n: i for i, n in enumerate(names)}}
    problem = _PROBLEM.get(meta.get("score_function", ""))
    if problem is None and model.num_classes == 1:  # transformers takes one output for a regression / sigmoid head
        problem = "single_label_classification"
    if problem:  # transformers' pipeline then scores with sigmoid / raw values (softmax: said for one output), as vitlab
        labels["problem_type"] = problem
    size = cfg.img_size
    if _family(model) == "swin":
        window = cfg.window_size if isinstance(cfg.window_size, int) else cfg.window_size[0]
        return {"architectures": ["SwinForImageClassification"], "model_type": "swin",
                "image_size": list(size) if isinstance(size, tuple) else size, "patch_size": cfg.patch_size,
                "num_channels": cfg.in_chans, "embed_dim": cfg.embed_dim, "depths": list(cfg.depths),
                "num_heads": list(cfg.num_heads), "window_size": window, "mlp_ratio": cfg.mlp_ratio,
                "qkv_bias": cfg.qkv_bias, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
                "drop_path_rate": 0.0, "hidden_act": "gelu", "use_absolute_embeddings": False,
                "initializer_range": 0.02, "layer_norm_eps": cfg.norm_eps, "encoder_stride": 32, **labels}
    distilled = _distilled(model)
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
        **labels,
    }
    return config


# the names of a block's norms and MLP in transformers' ViT / DeiT / Swin layers
_BLOCK_NAMES = {"norm1.": "layernorm_before.", "norm2.": "layernorm_after.", "mlp.fc1.": "intermediate.dense.",
                "mlp.fc2.": "output.dense."}


def to_hf_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model``'s weights under the names of transformers' saved files (the fused q / k / v projection split into
    query / key / value); the class :func:`hf_config` names loads them strictly."""
    model = unwrap_model(model)
    _check(model)
    if _family(model) == "swin":
        return _swin_state_dict(model)
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
            renamed = {**_BLOCK_NAMES, "attn.proj.": "attention.output.dense."}
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


def _swin_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """A Swin v1 under transformers' names: a stage's patch merging belongs to the stage before it there."""
    out: dict[str, Tensor] = {}
    for k, v in model.state_dict().items():
        v = v.detach().contiguous().cpu()
        if k.startswith(("patch_embed.proj.", "patch_embed.norm.")):
            part = "patch_embeddings.projection." if k.startswith("patch_embed.proj.") else "norm."
            out["swin.embeddings." + part + k.rsplit(".", 1)[1]] = v
        elif k.startswith("norm."):
            out["swin.layernorm." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("head."):
            out["classifier." + k.rsplit(".", 1)[1]] = v
        elif m := re.match(r"^layers\.(\d+)\.downsample\.(.+)$", k):
            out[f"swin.encoder.layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"] = v
        elif m := re.match(r"^layers\.(\d+)\.blocks\.(\d+)\.(.+)$", k):
            base, rest = f"swin.encoder.layers.{m.group(1)}.blocks.{m.group(2)}.", m.group(3)
            if rest.startswith("attn.qkv."):
                kind = rest.rsplit(".", 1)[1]
                for part, t in zip(("query", "key", "value"), v.chunk(3)):
                    out[f"{base}attention.self.{part}.{kind}"] = t.contiguous()
            elif rest == "attn.relative_position_bias_table":
                out[base + "attention.self.relative_position_bias_table"] = v
            elif rest.startswith("attn.proj."):
                out[base + "attention.output.dense." + rest.rsplit(".", 1)[1]] = v
            else:
                prefix = next(p for p in _BLOCK_NAMES if rest.startswith(p))
                out[base + _BLOCK_NAMES[prefix] + rest[len(prefix):]] = v
        else:
            raise ValueError(f"{model.model_name}: no transformers name for {k!r}")
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
    # grey, RGBA and palette images to RGB first, as vitlab does (ViT / DeiT processors otherwise fail on them)
    common["do_convert_rgb"] = c == 3
    if c == 1:
        notes.append("a 1-channel model: call its processor and model with grayscale images yourself; "
                     "pipeline('image-classification') converts every image to RGB and cannot feed it")
    if pre.interpolation == "nearest":
        notes.append("nearest resampling: transformers' default (torchvision) processors pick other pixels than "
                     "Pillow's, which vitlab follows; load the processor with backend='pil' for vitlab's inputs")
    rh, rw = pre.resize_side(h), pre.resize_side(w)
    cropped = (rh, rw) != (h, w)
    if pre.crop_mode == "squash" and not cropped:
        config = {"image_processor_type": "ViTImageProcessor", **common, "size": {"height": h, "width": w}}
    elif pre.crop_mode == "squash" or h != w:
        # a non-square centre crop: transformers' shorter-edge resize would leave the longer side short of the crop
        # (the processor pads it with black); squashed to the cover size, the aspect is lost instead
        config = {"image_processor_type": "DeiTImageProcessor", **common, "size": {"height": rh, "width": rw},
                  "do_center_crop": True, "crop_size": {"height": h, "width": w}}
        if pre.crop_mode != "squash":
            notes.append(f"a {h}x{w} input: transformers' processors cannot keep an image's aspect and cover "
                         f"{rh}x{rw} as vitlab (timm's ResizeKeepRatio) does; the exported processor squashes every "
                         f"image to {rh}x{rw} before the crop, so the inputs differ for images of another aspect")
    else:
        config = {"image_processor_type": "BitImageProcessor", **common, "size": {"shortest_edge": rh},
                  "do_center_crop": True, "crop_size": {"height": h, "width": w}}
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
    if model.cfg.dynamic_img_size and _family(model) != "swin":
        notes.append("at other input sizes transformers resamples the position table only when asked "
                     "(interpolate_pos_encoding=True), bicubic without antialiasing"
                     + ("" if not model.cfg.pos_antialias else "; vitlab's resamples it antialiased"))
    sd = to_hf_state_dict(model)
    write_model_folder(folder, sd, {CONFIG_FILE: config, PROCESSOR_FILE: processor}, overwrite=overwrite,
                       kind="a Hugging Face export")
    for note in notes:
        log.debug("Hugging Face export of %s: %s", model.model_name, note)
    return HfExport(config["architectures"][0], config["model_type"], tuple(notes))
