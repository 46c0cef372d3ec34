"""MobileViT (v1, v2, v3) checkpoints -> vitlab.

Three layouts:

* timm: vitlab uses timm's module names; only the head moves (``head.fc`` -> ``head``).
* Hugging Face (``MobileViTForImageClassification`` / ``MobileViTV2ForImageClassification``):
  ``mobilevit[v2].conv_stem``, ``encoder.layer.{i}`` with ``downsampling_layer`` / ``conv_kxk`` /
  ``transformer.layer.{j}`` (v1: split query/key/value), ``conv_projection``, ``fusion``, ``conv_1x1_exp``,
  ``classifier``. Hugging Face's processor feeds BGR images, so the converted model records
  ``channel_order="BGR"`` and vitlab's transforms flip the channels for it. Hugging Face's v2 does not
  resize odd maps (a 224 px input ends on a 7x7 map) where cvnets, timm and vitlab by default resize the block
  input to an even size (8x8); it unfolds with stride 2, leaving the last row and column out of the
  transformer and zero after folding. Its folders convert with ``patch_remainder="drop"``, which computes that.
  ``config.json`` gives the heads, ``patch_size``, ``image_size`` (the input size) and ``layer_norm_eps``;
  ``mlp_ratio`` / ``ffn_multiplier``, ``qkv_bias`` and ``conv_kernel_size`` are read off the tensors (the
  stated MLP ratio first). A ``hidden_act`` other than SiLU, ``output_stride`` other than 32 (dilated
  segmentation backbones) and an even ``conv_kernel_size`` are refused.
* the official cvnets layout (apple/ml-cvnets and micronDLA/MobileViTv3 ``checkpoint_ema_best.pt``):
  ``conv_1.block.{conv,norm}``, ``layer_{i}.{j}.block.{exp_1x1,conv_3x3,red_1x1}.block.*``,
  ``layer_{i}.1.local_rep.{conv_3x3,conv_1x1}`` (v1, v3-S/XS/XXS) or ``local_rep.{0,1}`` (v2, v3-0.5..1.0),
  ``global_rep.{j}.pre_norm_mha.{0,1.qkv_proj,1.out_proj}`` / ``pre_norm_attn.{0,1.qkv_proj.block.conv,...}``,
  ``pre_norm_ffn.{0,1,4}`` (v1) or ``{0,1,3}`` (v2), the final norm ``global_rep.{depth}``, ``conv_proj``,
  ``fusion``, ``conv_1x1_exp``, ``classifier.fc`` (v1) or ``classifier.1`` (v2). Key facts read from Hugging
  Face's ``convert_mlcvnets_to_pytorch.py`` (both versions) and the MobileViTv3 code @5e3f490.

The converters also read the architecture off the tensors (widths, depths, head), so one registered name
loads a checkpoint of any size of its version; a checkpoint of another version is refused when loading
(:meth:`vitlab.models.mobilevit.MobileViT.adapt_checkpoint`).
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor

from vitlab.checkpoints.converters import (
    Converted,
    register_converter,
    register_format_detector,
    register_hf_model_type,
)


def _hf_v1_name(config: dict[str, Any]) -> str | None:
    """The named v1 size whose transformer widths (HF hidden_sizes) the folder has."""
    sizes = {(64, 80, 96): "mobilevit_xxs", (96, 120, 144): "mobilevit_xs", (144, 192, 240): "mobilevit_s"}
    return sizes.get(tuple(config.get("hidden_sizes") or ()))


def _hf_v2_name(config: dict[str, Any]) -> str | None:
    """The named v2 width (mobilevitv2_050 .. _200) of the folder's width_multiplier."""
    width = config.get("width_multiplier", 1.0)
    name = f"mobilevitv2_{round(float(width) * 100):03d}" if isinstance(width, (int, float)) else None
    return name if name in {f"mobilevitv2_{w:03d}" for w in (50, 75, 100, 125, 150, 175, 200)} else None


register_hf_model_type("mobilevit", "mobilevit_s", _hf_v1_name)
register_hf_model_type("mobilevitv2", "mobilevitv2_100", _hf_v2_name)

_BUFFERS = ("num_batches_tracked",)


@register_format_detector("mobilevit")
def detect_mobilevit(sd: dict[str, Any]) -> str | None:
    keys = list(sd)
    if any(k.startswith(("conv_1.block.", "encoder.conv_1.", "layer_1.", "encoder.layer_1.")) for k in keys):
        return "official"
    if any(k.startswith(("mobilevit.", "mobilevitv2.")) for k in keys):
        return "hf"
    return None


# ----------------------------------------------------------------------------------------------- timm
@register_converter("mobilevit", "timm")
def convert_timm_mobilevit(sd: dict[str, Tensor], meta: dict[str, Any]) -> Converted:
    out = {("head." + k[len("head.fc."):] if k.startswith("head.fc.") else k): v for k, v in sd.items()}
    return Converted(out, infer_overrides(out))


# ------------------------------------------------------------------------------------------------- HF
_HF_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), r) for p, r in (
        (r"^conv_stem\.convolution\.", "stem.conv."),
        (r"^conv_stem\.normalization\.", "stem.bn."),
        (r"^encoder\.layer\.([01])\.layer\.(\d+)\.", r"stages.\1.\2."),
        (r"^encoder\.layer\.(\d)\.downsampling_layer\.", r"stages.\1.0."),
        (r"^encoder\.layer\.(\d)\.", r"stages.\1.1."),
        (r"^conv_1x1_exp\.", "final_conv."),
        (r"\.expand_1x1\.", ".conv1_1x1."),
        (r"\.conv_3x3\.", ".conv2_kxk."),
        (r"\.reduce_1x1\.", ".conv3_1x1."),
        (r"\.conv_projection\.", ".conv_proj."),
        (r"\.fusion\.", ".conv_fusion."),
        (r"\.conv_1x1\.convolution\.", ".conv_1x1."),
        (r"\.transformer\.layer\.", ".transformer."),
        (r"\.layernorm_before\.", ".norm1."),
        (r"\.layernorm_after\.", ".norm2."),
        (r"\.layernorm\.", ".norm."),
        (r"\.attention\.output\.dense\.", ".attn.proj."),  # v1
        (r"\.intermediate\.dense\.", ".mlp.fc1."),
        (r"\.output\.dense\.", ".mlp.fc2."),
        (r"\.attention\.qkv_proj\.convolution\.", ".attn.qkv_proj."),  # v2
        (r"\.attention\.out_proj\.convolution\.", ".attn.out_proj."),
        (r"\.ffn\.conv1\.convolution\.", ".mlp.fc1."),
        (r"\.ffn\.conv2\.convolution\.", ".mlp.fc2."),
        (r"\.convolution\.", ".conv."),
        (r"\.normalization\.", ".bn."),
    )
]
_HF_QKV = re.compile(r"^(.*)\.attention\.attention\.(query|key|value)\.(weight|bias)$")


def _rename(key: str, rules: list[tuple[re.Pattern[str], str]]) -> str:
    for pattern, repl in rules:
        key = pattern.sub(repl, key)
    return key


@register_converter("mobilevit", "hf")
def convert_hf_mobilevit(sd: dict[str, Tensor], meta: dict[str, Any]) -> Converted:
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for k, v in sd.items():
        if k.startswith("classifier."):
            out["head." + k[len("classifier."):]] = v
            continue
        if k.startswith("segmentation_head."):
            continue
        k = re.sub(r"^mobilevit(v2)?\.", "", k)
        if m := _HF_QKV.match(k):  # v1 splits the fused projection: q, k, v -> qkv
            qkv.setdefault((_rename(m.group(1), _HF_RULES), m.group(3)), {})[m.group(2)] = v
            continue
        out[_rename(k, _HF_RULES)] = v
    for (prefix, kind), parts in qkv.items():
        out[f"{prefix}.attn.qkv.{kind}"] = _cat(parts["query"], parts["key"], parts["value"])
    config = meta.get("config") or {}
    stated = config.get("mlp_ratio", config.get("ffn_multiplier"))  # v1 / v2
    overrides = infer_overrides(out, mlp_ratio=float(stated) if stated is not None else None)
    overrides["channel_order"] = "BGR"  # the checkpoints were trained on (and HF's processor feeds) BGR images
    if any(".attn.qkv_proj." in k for k in out):  # v2: F.unfold(stride=patch) drops an odd map's last row / column
        overrides["patch_remainder"] = "drop"
    overrides.update(hf_config_overrides(config))
    return Converted(out, overrides)


# Hugging Face's defaults for what vitlab's MobileViT computes (MobileViTConfig / MobileViTV2Config)
_HF_ACTIVATIONS = ("silu", "swish")  # the same function: x * sigmoid(x)


def hf_config_overrides(config: dict[str, Any]) -> dict[str, Any]:
    """What a Hugging Face MobileViT / MobileViTV2 ``config.json`` sets beyond the tensors (they give widths,
    depths, kernel, MLP widths and biases): heads, patch size, input size, LayerNorm eps; settings vitlab
    does not compute are refused, naming the field."""
    if not config:
        return {}
    what = f"HF {config.get('model_type', 'mobilevit')} config"
    act = config.get("hidden_act", "silu")
    if act not in _HF_ACTIVATIONS:
        raise ValueError(f"{what}: hidden_act={act!r}; vitlab's MobileViT uses SiLU ('silu' / 'swish') in every "
                         f"convolution and MLP")
    if int(config.get("output_stride", 32)) != 32:
        raise ValueError(f"{what}: output_stride={config['output_stride']!r} (dilated last stages, as in the "
                         f"DeepLabV3 segmentation models); vitlab's MobileViT supports output_stride=32 only")
    kernel = config.get("conv_kernel_size", 3)
    if int(kernel) % 2 == 0:
        raise ValueError(f"{what}: conv_kernel_size={kernel!r}; vitlab's MobileViT supports odd kernels only "
                         f"(Hugging Face pads an even kernel asymmetrically)")
    over: dict[str, Any] = {}
    if "num_attention_heads" in config:
        over["num_heads"] = int(config["num_attention_heads"])
    if "patch_size" in config:
        over["patch_size"] = _square(config["patch_size"], "patch_size", what)
    if "image_size" in config:
        img = config["image_size"]
        over["img_size"] = tuple(int(s) for s in img) if isinstance(img, (list, tuple)) else int(img)
    if "layer_norm_eps" in config:
        over["norm_eps"] = float(config["layer_norm_eps"])
    return over


def _square(value: Any, field: str, what: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"{what}: {field}={list(value)}; vitlab's MobileViT supports square patches only")
        value = value[0]
    return int(value)


def _cat(*ts: Tensor) -> Tensor:
    import torch

    return torch.cat(ts, dim=0)


# ------------------------------------------------------------------------------------------- official
_CVNETS_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), r) for p, r in (
        (r"^conv_1\.block\.conv\.", "stem.conv."),
        (r"^conv_1\.block\.norm\.", "stem.bn."),
        (r"^conv_1x1_exp\.block\.conv\.", "final_conv.conv."),
        (r"^conv_1x1_exp\.block\.norm\.", "final_conv.bn."),
        (r"^classifier\.(fc|1)\.", "head."),
        (r"^layer_(\d)\.", lambda m: f"stages.{int(m.group(1)) - 1}."),
        (r"\.block\.exp_1x1\.block\.", ".conv1_1x1."),
        (r"\.block\.conv_3x3\.block\.", ".conv2_kxk."),
        (r"\.block\.red_1x1\.block\.", ".conv3_1x1."),
        (r"\.local_rep\.(conv_3x3|0)\.block\.", ".conv_kxk."),
        (r"\.local_rep\.(conv_1x1|1)\.block\.conv\.", ".conv_1x1."),
        (r"\.pre_norm_(mha|attn)\.0\.", ".norm1."),
        (r"\.pre_norm_mha\.1\.qkv_proj\.", ".attn.qkv."),
        (r"\.pre_norm_mha\.1\.out_proj\.", ".attn.proj."),
        (r"\.pre_norm_attn\.1\.qkv_proj\.block\.conv\.", ".attn.qkv_proj."),
        (r"\.pre_norm_attn\.1\.out_proj\.block\.conv\.", ".attn.out_proj."),
        (r"\.pre_norm_ffn\.0\.", ".norm2."),
        (r"\.pre_norm_ffn\.1\.(block\.conv\.)?", ".mlp.fc1."),
        (r"\.pre_norm_ffn\.(3|4)\.(block\.conv\.)?", ".mlp.fc2."),
        (r"\.global_rep\.", ".transformer."),
        (r"\.conv_proj\.block\.", ".conv_proj."),
        (r"\.fusion\.block\.", ".conv_fusion."),
        (r"\.norm\.(weight|bias|running_mean|running_var|num_batches_tracked)$", r".bn.\1"),
    )
]
_FINAL_NORM = re.compile(r"^(stages\.\d\.1)\.transformer\.(\d+)\.(weight|bias)$")


@register_converter("mobilevit", "official")
def convert_official_mobilevit(sd: dict[str, Tensor], meta: dict[str, Any]) -> Converted:
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        k = k.removeprefix("module.").removeprefix("encoder.")
        if k.startswith(("seg_head.", "classifier.global_pool")):
            continue
        k = _rename(k, _CVNETS_RULES)
        if m := _FINAL_NORM.match(k):  # global_rep.{depth}: the norm after the last transformer block
            k = f"{m.group(1)}.norm.{m.group(3)}"
        out[k] = v
    unknown = [k for k in out if not k.startswith(("stem.", "stages.", "final_conv.", "head."))]
    if unknown:
        raise ValueError(f"keys outside the cvnets MobileViT layout: {unknown[:5]}")
    overrides = infer_overrides(out)
    if any(".attn.qkv." in k for k in out):
        # multi-head attention files (v1, v3-S/XS/XXS) come from cvnets v0.1, which decoded images with
        # OpenCV (BGR); Hugging Face's v1 weights are these files renamed and are fed BGR. The v2-layout
        # files (v2, v3-0.5..1.0) come from cvnets v0.2 (PIL, RGB). Override with channel_order=... if needed.
        overrides["channel_order"] = "BGR"
    return Converted(out, overrides)


# -------------------------------------------------------------------------------- architecture read-off
def infer_overrides(sd: dict[str, Tensor], *, mlp_ratio: float | None = None) -> dict[str, Any]:
    """The config fields a converted state dict determines: widths, depths, expansion, MLP ratio, kernel of the
    local convolution, attention biases, head. ``mlp_ratio``: the ratio a config file states (tried first; the
    tensors' own ratio otherwise)."""
    over: dict[str, Any] = {}
    if "stem.conv.weight" in sd:
        over["stem_chs"] = int(sd["stem.conv.weight"].shape[0])
        over["in_chans"] = int(sd["stem.conv.weight"].shape[1])
    channels, mv2, dims, depths = [], [], [], []
    for i in range(5):
        blocks = {int(k.split(".")[2]) for k in sd if k.startswith(f"stages.{i}.")}
        if not blocks:
            return over | _head(sd)
        if i < 2:
            mv2.append(max(blocks) + 1)
            channels.append(int(sd[f"stages.{i}.{max(blocks)}.conv3_1x1.conv.weight"].shape[0]))
        else:
            channels.append(int(sd[f"stages.{i}.0.conv3_1x1.conv.weight"].shape[0]))
            dims.append(int(sd[f"stages.{i}.1.conv_1x1.weight"].shape[0]))
            depths.append(len({int(k.split(".")[4]) for k in sd if k.startswith(f"stages.{i}.1.transformer.")
                               and k.split(".")[4].isdigit()}))
    w = sd["stages.1.0.conv1_1x1.conv.weight"]
    over.update(channels=tuple(channels), mv2_depths=tuple(mv2), transformer_dims=tuple(dims),
                transformer_depths=tuple(depths), expand_ratio=float(w.shape[0] / w.shape[1]))
    over["final_chs"] = int(sd["final_conv.conv.weight"].shape[0]) if "final_conv.conv.weight" in sd else 0
    kxk = sd.get("stages.2.1.conv_kxk.conv.weight")
    if kxk is not None:
        over["kernel_size"] = int(kxk.shape[-1])
    if "stages.2.1.transformer.0.attn.qkv.weight" in sd:  # multi-head attention (v1, v3-S/XS/XXS)
        over["qkv_bias"] = "stages.2.1.transformer.0.attn.qkv.bias" in sd
    ratio = _mlp_ratio(sd, dims, mlp_ratio)
    if ratio is not None:
        over["mlp_ratio"] = ratio
    return over | _head(sd)


def _mlp_ratio(sd: dict[str, Tensor], dims: list[int], stated: float | None) -> float | None:
    """The one ratio r with int(d * r) == the MLP width of every MobileViT stage (the model builds each stage's
    MLP that way); the stated ratio first, then the first stage's width / d. Refused when none fits."""
    widths = []
    for i, d in enumerate(dims):
        w = sd.get(f"stages.{2 + i}.1.transformer.0.mlp.fc1.weight")
        if w is None:
            return stated
        widths.append((d, int(w.shape[0])))
    if not widths:
        return stated
    for ratio in (stated, widths[0][1] / widths[0][0]):
        if ratio is not None and all(int(d * ratio) == hidden for d, hidden in widths):
            return float(ratio)
    raise ValueError(f"MobileViT transformer MLP widths {[h for _, h in widths]} for widths d = {dims}: no single "
                     f"ratio r gives them all as int(d * r)" + (f" (the config states {stated})" if stated else "")
                     + "; vitlab's MobileViT uses one mlp_ratio for every stage")


def _head(sd: dict[str, Tensor]) -> dict[str, Any]:
    return {"num_classes": int(sd["head.weight"].shape[0])} if "head.weight" in sd else {"num_classes": 0}
