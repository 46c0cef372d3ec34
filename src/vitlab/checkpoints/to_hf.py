"""vitlab models -> Hugging Face transformers folders, as ``save_pretrained`` writes them.

Each family becomes transformers' own classifier of it:

* ViT (and a DeiT without a distillation token, which transformers runs as ``ViTForImageClassification``, as the
  hub's ``facebook/deit-*`` folders do): ``ViTForImageClassification``; a distilled DeiT with its two heads
  ``DeiTForImageClassificationWithTeacher`` (the average of the class and distillation heads, as vitlab's
  inference).
* Swin v1 / v2: ``SwinForImageClassification`` / ``Swinv2ForImageClassification`` (each stage's patch merging at the
  end of the stage before, as transformers places it; v2's position-bias MLP, logit scales and
  ``pretrained_window_sizes``): :mod:`vitlab.checkpoints.to_hf_swin`.
* BEiT (data2vec-vision has BEiT's layout and is written as ``beit``): ``BeitForImageClassification``, relative
  position tables per layer or shared, LayerScale, mean pooling with its norm (``use_mean_pooling``) or the class
  token: :mod:`vitlab.checkpoints.to_hf_beit`.
* MobileViT v1 / v2: ``MobileViTForImageClassification`` / ``MobileViTV2ForImageClassification`` with
  ``MobileViTImageProcessor`` (which flips to BGR when the model reads BGR and never normalises):
  :mod:`vitlab.checkpoints.to_hf_mobilevit`.
* ResNet: ``ResNetForImageClassification`` (basic / bottleneck blocks, ``downsample_in_bottleneck``,
  ``downsample_in_first_stage``) with ``ConvNextImageProcessor`` as the hub's ResNet folders:
  :mod:`vitlab.checkpoints.to_hf_resnet`.

The folder holds ``model.safetensors`` under the names transformers' saved files carry
(``vit.encoder.layer.N.attention.attention.query``, ...; fused q / k / v projections split), ``config.json``
(sizes, activations, norm epsilons, ``id2label`` from the class names, ``problem_type`` for a sigmoid or regression
head) and ``preprocessor_config.json``: the processor that prepares images as the model's preprocessing does
(``ViTImageProcessor`` for a squash to the input size, ``DeiTImageProcessor`` for a squash and a crop,
``BitImageProcessor`` for the shorter side and a centre crop; the families' own where they express it).
``AutoModelForImageClassification``, ``AutoImageProcessor`` and ``pipeline("image-classification")`` load it
without timm or vitlab; vitlab reads it back (``vitlab.load_model``) with the same outputs.

What transformers' classes cannot compute is refused, naming it (ViT: average pooling, registers, LayerScale, a
pre-logits layer, a norm before the blocks, fixed or no position tables, Linformer, a hybrid stem; each family's
own in its module; other families). What differs only in preprocessing or at other input sizes is returned as
notes: transformers' processors place an odd crop margin's extra pixel after the crop (``margin // 2``; vitlab's
default, as timm's, rounds ``margin / 2``), keep the aspect of a non-square input's shorter side, and resample
the position table only when asked (``interpolate_pos_encoding=True``, bicubic without antialiasing).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
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
# the names of a block's norms and MLP in transformers' ViT / DeiT / Swin / BEiT layers
BLOCK_NAMES = {"norm1.": "layernorm_before.", "norm2.": "layernorm_after.", "mlp.fc1.": "intermediate.dense.",
               "mlp.fc2.": "output.dense."}


@dataclass(frozen=True)
class HfExport:
    """What was written: transformers' class (``architecture``), its ``model_type`` and what a user should know
    (``notes``: preprocessing or behaviour at other sizes that transformers' classes do otherwise)."""

    architecture: str
    model_type: str
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class HfFamily:
    """How one vitlab family becomes a transformers folder.

    ``check(model, name)`` raises a ValueError naming what transformers' class cannot compute; ``config(model)``
    gives config.json's architecture fields (the labels are added here); ``state_dict(model)`` the weights under
    transformers' names; ``processor(model)`` (None: :func:`image_processor`) the preprocessor_config.json and its
    notes; ``notes(model)`` what differs beyond preprocessing (other input sizes)."""

    check: Callable[[nn.Module, str], None]
    config: Callable[[nn.Module], dict[str, Any]]
    state_dict: Callable[[nn.Module], dict[str, Tensor]]
    processor: Callable[[nn.Module], tuple[dict[str, Any], list[str]]] | None = None
    notes: Callable[[nn.Module], list[str]] | None = None


def _family(model: nn.Module) -> str:
    from vitlab.models.registry import get_entry

    return get_entry(model.model_name).family


def _families() -> dict[str, HfFamily]:
    """vitlab family -> its transformers layout (the family modules import this one)."""
    from vitlab.checkpoints import to_hf_beit, to_hf_mobilevit, to_hf_resnet, to_hf_swin

    vit = HfFamily(_check_vit, _vit_config, _vit_state_dict, notes=_vit_notes)
    return {"vit": vit, "deit": vit, "swin": to_hf_swin.SWIN, "swinv2": to_hf_swin.SWIN, "beit": to_hf_beit.BEIT,
            "mobilevit": to_hf_mobilevit.MOBILEVIT, "resnet": to_hf_resnet.RESNET}


_WRITTEN = "ViT, DeiT, Swin (v1, v2), BEiT, MobileViT (v1, v2) and ResNet"


def _exporter(model: nn.Module) -> HfFamily:
    """The family's layout, after refusing what transformers' classes cannot compute."""
    name = getattr(model, "model_name", type(model).__name__)
    family = _family(model)
    exporter = _families().get(family)
    if exporter is None:
        raise ValueError(f"{name} is a {family_label(family)} model: vitlab writes Hugging Face folders of "
                         f"{_WRITTEN} models; export it with --format timm (a timm hub folder, which transformers' "
                         f"AutoModelForImageClassification loads with timm installed) or --format onnx")
    if not model.num_classes:
        raise ValueError(f"{name} has no classifier (num_classes=0): vitlab writes Hugging Face image classifiers")
    exporter.check(model, name)
    return exporter


def split_qkv(out: dict[str, Tensor], base: str, fused: Tensor, param: str) -> None:
    """A fused (3D, ...) q / k / v projection's ``param`` ("weight" / "bias") as ``{base}query.{param}``, key,
    value."""
    for part, t in zip(("query", "key", "value"), fused.chunk(3)):
        out[f"{base}{part}.{param}"] = t.contiguous()


def rename_block_part(rest: str, table: dict[str, str], what: str) -> str:
    """``rest`` (a key inside a block) with its prefix renamed by ``table``; a key no prefix covers is refused."""
    prefix = next((p for p in table if rest.startswith(p)), None)
    if prefix is None:
        raise ValueError(f"{what}: no transformers name for {rest!r}")
    return table[prefix] + rest[len(prefix):]


def tensors(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict, detached, contiguous, on the CPU."""
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------------- ViT / DeiT
def _distilled(model: nn.Module) -> bool:
    return bool(getattr(model.cfg, "distilled", False))


def _check_vit(model: nn.Module, name: str) -> None:
    """Refuse what transformers' ViT / DeiT classifiers cannot compute, naming it."""
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


def _vit_config(model: nn.Module) -> dict[str, Any]:
    cfg = model.cfg
    size = cfg.img_size
    distilled = _distilled(model)
    return {
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
    }


def _vit_state_dict(model: nn.Module) -> dict[str, Tensor]:
    distilled = _distilled(model)
    root = "deit." if distilled else "vit."
    out: dict[str, Tensor] = {}
    for k, v in tensors(model).items():
        if k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            base = f"{root}encoder.layer.{i}."
            if rest.startswith("attn.qkv."):
                split_qkv(out, f"{base}attention.attention.", v, rest.rsplit(".", 1)[1])
                continue
            out[base + rename_block_part(rest, {**BLOCK_NAMES, "attn.proj.": "attention.output.dense."},
                                         model.model_name)] = v
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


def _vit_notes(model: nn.Module) -> list[str]:
    if not model.cfg.dynamic_img_size:
        return []
    return [resampled_positions_note(model.cfg.pos_antialias)]


def resampled_positions_note(antialias: bool, *, always: bool = False) -> str:
    """What transformers does with a position table at other input sizes (``always``: without being asked)."""
    when = "" if always else " only when asked (interpolate_pos_encoding=True)"
    return (f"at other input sizes transformers resamples the position table{when}, bicubic without antialiasing"
            + ("; vitlab's resamples it antialiased" if antialias else ""))


# ---------------------------------------------------------------------------------------------------- the folder
def hf_config(model: nn.Module, *, class_names: list[str] | None = None) -> dict[str, Any]:
    """``config.json`` of ``model``'s transformers folder (the family's config fields, as save_pretrained writes
    them); a ValueError names what transformers cannot build."""
    model = unwrap_model(model)
    return _config(model, _exporter(model), class_names)


def _config(model: nn.Module, exporter: HfFamily, class_names: list[str] | None) -> dict[str, Any]:
    meta = model_metadata(model, class_names=class_names)
    names = meta["class_names"] or [f"LABEL_{i}" for i in range(model.num_classes)]
    labels: dict[str, Any] = {"id2label": {str(i): n for i, n in enumerate(names)},
                              "label2id": {n: i for i, n in enumerate(names)}}
    problem = _PROBLEM.get(meta.get("score_function", ""))
    if problem is None and model.num_classes == 1:  # transformers takes one output for a regression / sigmoid head
        problem = "single_label_classification"
    if problem:  # transformers' pipeline then scores with sigmoid / raw values (softmax: said for one output), as vitlab
        labels["problem_type"] = problem
    return {**exporter.config(model), **labels}


def to_hf_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model``'s weights under the names of transformers' saved files (fused q / k / v projections split into
    query / key / value); the class :func:`hf_config` names loads them strictly."""
    model = unwrap_model(model)
    return _exporter(model).state_dict(model)


def hf_processor_config(model: nn.Module) -> tuple[dict[str, Any], list[str]]:
    """``preprocessor_config.json`` for ``model``'s preprocessing, and notes on what transformers' processor does
    otherwise (the crop's odd pixel, the shorter side of a non-square input)."""
    model = unwrap_model(model)
    exporter = _families().get(_family(model))
    if exporter is not None and exporter.processor is not None:
        return exporter.processor(model)
    return image_processor(model)


def image_processor(model: nn.Module) -> tuple[dict[str, Any], list[str]]:
    """The processor of transformers' RGB families for ``model``'s preprocessing: ``ViTImageProcessor`` (a squash
    to the input size), ``DeiTImageProcessor`` (a squash and a crop), ``BitImageProcessor`` (the shorter side and a
    centre crop); a model that reads BGR gets ``MobileViTImageProcessor``, the one that flips, where it can."""
    pre = model.preprocessing
    if pre.channel_order != "RGB":
        from vitlab.checkpoints.to_hf_mobilevit import flipping_processor

        return flipping_processor(model)
    notes: list[str] = []
    config = {"image_processor_type": "", **processor_geometry(model, notes), **common_processor_fields(model, notes),
              "do_normalize": True, "image_mean": list(pre.mean), "image_std": list(pre.std)}
    config["image_processor_type"] = ("ViTImageProcessor" if not config.get("do_center_crop") else
                                      "BitImageProcessor" if "shortest_edge" in config["size"] else
                                      "DeiTImageProcessor")
    return config, notes


def common_processor_fields(model: nn.Module, notes: list[str]) -> dict[str, Any]:
    """Resampling and rescaling (and the notes on them) that every exported processor writes."""
    pre = model.preprocessing
    c = pre.input_size[0]
    if c == 1:
        notes.append("a 1-channel model: call its processor and model with grayscale images yourself; "
                     "pipeline('image-classification') converts every image to RGB and cannot feed it")
    if pre.interpolation == "nearest":
        notes.append("nearest resampling: transformers' default (torchvision) processors pick other pixels than "
                     "Pillow's, which vitlab follows; load the processor with backend='pil' for vitlab's inputs")
    # grey, RGBA and palette images to RGB first, as vitlab does (the processors otherwise fail on them)
    return {"do_resize": True, "resample": _RESAMPLE[pre.interpolation], "do_rescale": True,
            "rescale_factor": 1 / 255, "do_convert_rgb": c == 3}


def processor_geometry(model: nn.Module, notes: list[str]) -> dict[str, Any]:
    """``size`` and the centre crop (``do_center_crop``, ``crop_size``) that resize and crop as the model does: a
    ``{"height", "width"}`` size for a squash (and a crop of it), ``{"shortest_edge"}`` and a crop otherwise."""
    pre = model.preprocessing
    _, h, w = pre.input_size
    rh, rw = pre.resize_side(h), pre.resize_side(w)
    cropped = (rh, rw) != (h, w)
    if pre.crop_mode == "squash" and not cropped:
        return {"size": {"height": h, "width": w}, "do_center_crop": False}
    if pre.crop_mode == "squash" or h != w:
        # a non-square centre crop: transformers' shorter-edge resize would leave the longer side short of the crop
        # (the processor pads it with black); squashed to the cover size, the aspect is lost instead
        geometry = {"size": {"height": rh, "width": rw}, "do_center_crop": True,
                    "crop_size": {"height": h, "width": w}}
        if pre.crop_mode != "squash":
            notes.append(f"a {h}x{w} input: transformers' processors cannot keep an image's aspect and cover "
                         f"{rh}x{rw} as vitlab (timm's ResizeKeepRatio) does; the exported processor squashes every "
                         f"image to {rh}x{rw} before the crop, so the inputs differ for images of another aspect")
    else:
        geometry = {"size": {"shortest_edge": rh}, "do_center_crop": True, "crop_size": {"height": h, "width": w}}
    if pre.crop_offset == "round":
        notes.append(crop_margin_note(pre, squashed=pre.crop_mode == "squash" or h != w))
    return geometry


def crop_margin_note(pre: Any, *, squashed: bool = False) -> str:
    """What transformers' centre crop (at ``margin // 2``) does against vitlab's (``round(margin / 2)``, half to
    even, as timm) for a model with preprocessing ``pre``: where the margin at the model's own size puts them a pixel
    apart, every image is (``squashed``: the processor resizes both sides to fixed sizes; else the shorter side)."""
    _, h, w = pre.input_size
    margins = {"rows": pre.resize_side(h) - h, "columns": pre.resize_side(w) - w}
    off = {axis: m for axis, m in margins.items() if m // 2 != round(m / 2)}
    rule = ("transformers' processors start a centre crop at margin // 2, vitlab (as timm) at round(margin / 2), "
            "half to even")
    if not off:
        return (f"{rule}: the same start at this model's size (margins {margins['rows']} x {margins['columns']}); "
                f"images whose longer side leaves another odd margin are cropped one pixel apart along it")
    if squashed:  # both sides resized to fixed sizes: each axis's margin is the same for every image
        where = " and ".join(f"{axis} (margin {m}: transformers starts at {m // 2}, vitlab at {round(m / 2)})"
                             for axis, m in off.items())
        which = f"every image is cropped one pixel off along its {where}"
    else:  # the shorter side resized: its margin is the same for every image
        m = margins["rows"]
        which = (f"every image is cropped one pixel off along its shorter side (a square image: both), whose margin "
                 f"is {m} ({pre.resize_side(h)} to {h}): transformers starts at {m // 2}, vitlab at {round(m / 2)}")
    return (f"{rule}: at this model's size {which}; the folder's scores differ from the checkpoint's a little (the "
            f"model computes the same on the same pixels); an input size whose margin is even or 1 more than a "
            f"multiple of 4 avoids it")


def save_hf_folder(model: nn.Module, folder: str | Path, *, class_names: list[str] | None = None,
                   overwrite: bool = False) -> HfExport:
    """Write ``model`` as a transformers folder (``model.safetensors``, ``config.json``, ``preprocessor_config.json``),
    which ``AutoModelForImageClassification`` / ``AutoImageProcessor.from_pretrained(FOLDER)`` load with the same
    outputs. The files are written into a temporary folder beside ``folder`` and renamed into place; an existing
    non-empty ``folder`` is refused unless ``overwrite`` (its other files are kept)."""
    model = unwrap_model(model)
    folder = Path(folder)
    exporter = _exporter(model)  # refuses before anything is written
    config = _config(model, exporter, class_names)
    processor, notes = hf_processor_config(model)
    notes += exporter.notes(model) if exporter.notes else []
    sd = exporter.state_dict(model)
    write_model_folder(folder, sd, {CONFIG_FILE: config, PROCESSOR_FILE: processor}, overwrite=overwrite,
                       kind="a Hugging Face export")
    for note in notes:
        log.debug("Hugging Face export of %s: %s", model.model_name, note)
    return HfExport(config["architectures"][0], config["model_type"], tuple(notes))
