"""MobileViT v1 / v2 -> transformers' ``MobileViTForImageClassification`` / ``MobileViTV2ForImageClassification``
folders, with ``MobileViTImageProcessor``.

transformers' MobileViT classes fix what vitlab's configs leave open, so a model is written only where they agree:

* v1: two stages of inverted residuals of 1 and 3 blocks (``mv2_depths=(1, 3)``), transformer depths (2, 4, 3) and
  a final 1x1 expansion; the widths are free (``neck_hidden_sizes``, ``hidden_sizes``).
* v2: inverted residual depths (1, 2), every width derived from one ``width_multiplier`` (the stem
  ``make_divisible(clip(32 m, 16, 64))``, the stages ``make_divisible(64 m, 16)``, ``make_divisible(128 m)``, ...,
  ``512 m``), the attention widths from ``base_attn_unit_dims`` times it, an integer ``ffn_multiplier`` whose MLP
  widths are rounded down to multiples of 16; transformer depths are free (``n_attn_blocks``). transformers' v2
  unfolds with stride p, dropping an odd map's last row / column (vitlab's ``patch_remainder="drop"``): a model
  that resizes instead (vitlab's default, as cvnets and timm) is written only where its maps are multiples of the
  patch at its input size, with a note for other sizes.
* both: inverted residuals expanded to ``make_divisible(round(C * expand_ratio))`` channels with 3x3 depthwise
  convolutions, SiLU, odd local kernels (``conv_kernel_size``). MobileViT v3 has no transformers class.

``MobileViTImageProcessor`` resizes, crops and rescales to [0, 1], flips RGB to BGR unless
``do_flip_channel_order`` is false, and never normalises. It is written for a model with vitlab's MobileViT
preprocessing (mean 0, std 1; BGR for weights converted from transformers' or cvnets' v1 files, else RGB); a model
fine-tuned with another mean / std gets the generic processor of :func:`~vitlab.checkpoints.to_hf.image_processor`
(with ``do_flip_channel_order: false``, which readers of MobileViT folders look for) if it reads RGB, and is refused
if it reads BGR (no transformers processor flips and normalises).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from vitlab.checkpoints.to_hf import (
    HfFamily,
    common_processor_fields,
    image_processor,
    processor_geometry,
    split_qkv,
    tensors,
)
from vitlab.layers import InvertedResidual, make_divisible

_V1_DEPTHS = {"mv2_depths": (1, 3), "transformer_depths": (2, 4, 3)}
_V2_MV2_DEPTHS = (1, 2)
_HF_FFN_ROUND = 16  # transformers' MobileViTV2Transformer: int((ffn_multiplier * d // 16) * 16)
_V2_BASES = (32, 64, 128, 256, 384, 512)  # the stem's and the five stages' widths at width_multiplier 1


def _v2_widths(m: float) -> tuple[int, ...]:
    """(stem, C1..C5) of transformers' MobileViTV2Encoder at width multiplier ``m``."""
    stem = make_divisible(max(16.0, min(64.0, 32 * m)), 8, min_value=16)
    return (stem, make_divisible(64 * m, 16), *(make_divisible(b * m, 8) for b in _V2_BASES[2:]))


def _width_multiplier(cfg: Any) -> float:
    """The width multiplier whose widths are the model's (read off the last stage: 512 m)."""
    return cfg.channels[-1] / 512


def _check(model: nn.Module, name: str) -> None:
    cfg = model.cfg
    kind = (cfg.version, cfg.attention)
    if kind not in (("v1", "mhsa"), ("v2", "separable")):
        raise ValueError(f"{name} is a MobileViT {cfg.version} model ({cfg.attention} attention): transformers has "
                         f"MobileViT v1 and v2 classes only; export it with --format onnx")
    if cfg.kernel_size % 2 == 0:
        raise ValueError(f"{name} has kernel_size={cfg.kernel_size}: transformers pads an even kernel otherwise")
    for module_name, module in model.named_modules():
        if isinstance(module, InvertedResidual):
            cin, mid = module.conv1_1x1.conv.in_channels, module.conv1_1x1.conv.out_channels
            hf = make_divisible(int(round(cin * cfg.expand_ratio)), 8)
            if mid != hf:
                raise ValueError(f"{name}: {module_name} expands {cin} channels to {mid}; transformers' MobileViT "
                                 f"expands them to make_divisible(round({cin} x expand_ratio {cfg.expand_ratio})) "
                                 f"= {hf}")
    if cfg.version == "v1":
        _check_v1(model, name)
    else:
        _check_v2(model, name)


def _check_v1(model: nn.Module, name: str) -> None:
    cfg = model.cfg
    for field, fixed in _V1_DEPTHS.items():
        if tuple(getattr(cfg, field)) != fixed:
            raise ValueError(f"{name} has {field}={tuple(getattr(cfg, field))}: transformers' MobileViT (v1) builds "
                             f"{fixed}")
    if not cfg.final_chs:
        raise ValueError(f"{name} has final_chs=0 (no 1x1 expansion before pooling): transformers' MobileViT (v1) "
                         f"classifier has one")


def _check_v2(model: nn.Module, name: str) -> None:
    cfg = model.cfg
    if tuple(cfg.mv2_depths) != _V2_MV2_DEPTHS:
        raise ValueError(f"{name} has mv2_depths={tuple(cfg.mv2_depths)}: transformers' MobileViTV2 builds "
                         f"{_V2_MV2_DEPTHS}")
    m = _width_multiplier(cfg)
    ours, theirs = (cfg.stem_chs, *cfg.channels), _v2_widths(m)
    if ours != theirs:
        raise ValueError(f"{name} has stem and stage widths {ours}: transformers' MobileViTV2 derives them from one "
                         f"width_multiplier, and width_multiplier={m:g} (the last stage's {cfg.channels[-1]} / 512) "
                         f"gives {theirs}")
    bases = _attn_bases(cfg, m)
    if bases is None:
        raise ValueError(f"{name} has transformer_dims={tuple(cfg.transformer_dims)}: transformers' MobileViTV2 "
                         f"builds make_divisible(base x {m:g}, 8), multiples of 8")
    ratio = cfg.mlp_ratio
    hidden = [int(d * ratio) for d in cfg.transformer_dims]
    if ratio != int(ratio) or any(h % _HF_FFN_ROUND for h in hidden):
        raise ValueError(f"{name} has mlp_ratio={ratio} (MLP widths {hidden}): transformers' MobileViTV2 takes an "
                         f"integer ffn_multiplier and rounds each width down to a multiple of {_HF_FFN_ROUND}")
    odd = _odd_maps(model)
    if cfg.patch_remainder == "resize" and odd:
        raise ValueError(f"{name}: at its input size stage(s) {odd} have maps that are not multiples of the patch "
                         f"({cfg.patch_size}); vitlab resizes them (patch_remainder='resize', as cvnets and timm), "
                         f"transformers' MobileViTV2 leaves the remainder out of the attention "
                         f"(patch_remainder='drop'), which gives other outputs")


def _attn_bases(cfg: Any, m: float) -> list[int] | None:
    """``base_attn_unit_dims``: the integer bases whose make_divisible(base * m, 8) are the attention widths."""
    bases = [round(d / m) for d in cfg.transformer_dims]
    if [make_divisible(b * m, 8) for b in bases] != list(cfg.transformer_dims):
        return None
    return bases


def _odd_maps(model: nn.Module) -> list[int]:
    """The MobileViT stages (2-4) whose map at the model's input size is not a multiple of the patch."""
    cfg = model.cfg
    sides = cfg.img_size if isinstance(cfg.img_size, tuple) else (cfg.img_size, cfg.img_size)
    out = []
    for stage in range(2, 5):
        stride = 2 ** (stage + 1)  # the stem and stages 1-4 halve the map (3x3, padding 1: ceil)
        if any(-(-s // stride) % cfg.patch_size for s in sides):
            out.append(stage)
    return out


def _config(model: nn.Module) -> dict[str, Any]:
    cfg = model.cfg
    size = cfg.img_size
    common = {"num_channels": cfg.in_chans, "image_size": list(size) if isinstance(size, tuple) else size,
              "patch_size": cfg.patch_size, "expand_ratio": cfg.expand_ratio, "conv_kernel_size": cfg.kernel_size,
              "output_stride": 32, "classifier_dropout_prob": 0.0, "layer_norm_eps": cfg.norm_eps,
              "initializer_range": 0.02}
    if cfg.version == "v1":
        return {"architectures": ["MobileViTForImageClassification"], "model_type": "mobilevit", **common,
                "hidden_sizes": list(cfg.transformer_dims),
                "neck_hidden_sizes": [cfg.stem_chs, *cfg.channels, cfg.final_chs],
                "num_attention_heads": cfg.num_heads, "mlp_ratio": cfg.mlp_ratio, "qkv_bias": cfg.qkv_bias,
                "hidden_act": "silu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    m = _width_multiplier(cfg)
    return {"architectures": ["MobileViTV2ForImageClassification"], "model_type": "mobilevitv2", **common,
            "hidden_act": "swish", "width_multiplier": m, "n_attn_blocks": list(cfg.transformer_depths),
            "base_attn_unit_dims": _attn_bases(cfg, m), "ffn_multiplier": int(cfg.mlp_ratio), "attn_dropout": 0.0,
            "ffn_dropout": 0.0}


# a ConvNormAct's parts, and the parts of the blocks
_CONV = {"conv.": "convolution.", "bn.": "normalization."}
_IR = {"conv1_1x1.": "expand_1x1.", "conv2_kxk.": "conv_3x3.", "conv3_1x1.": "reduce_1x1."}
_BLOCK = {"conv_kxk.": "conv_kxk.", "conv_1x1.": "conv_1x1.convolution.", "conv_proj.": "conv_projection.",
          "conv_fusion.": "fusion.", "norm.": "layernorm."}
_LAYER_V1 = {"norm1.": "layernorm_before.", "norm2.": "layernorm_after.", "attn.proj.": "attention.output.dense.",
             "mlp.fc1.": "intermediate.dense.", "mlp.fc2.": "output.dense."}
_LAYER_V2 = {"norm1.": "layernorm_before.", "norm2.": "layernorm_after.",
             "attn.qkv_proj.": "attention.qkv_proj.convolution.", "attn.out_proj.": "attention.out_proj.convolution.",
             "mlp.fc1.": "ffn.conv1.convolution.", "mlp.fc2.": "ffn.conv2.convolution."}


def _rename(key: str, table: dict[str, str], what: str) -> str:
    for src, dst in table.items():
        if key.startswith(src):
            return dst + key[len(src):]
    raise ValueError(f"{what}: no transformers name for {key!r}")


def _conv_layer(key: str, what: str) -> str:
    """A ConvNormAct's ``conv.weight`` / ``bn.*`` -> transformers' MobileViTConvLayer names."""
    return _rename(key, _CONV, what)


def _state_dict(model: nn.Module) -> dict[str, Tensor]:
    v1 = model.cfg.version == "v1"
    root = "mobilevit." if v1 else "mobilevitv2."
    what = model.model_name
    out: dict[str, Tensor] = {}
    for k, v in tensors(model).items():
        if k.startswith("head."):
            out["classifier." + k[len("head."):]] = v
        elif k.startswith("stem."):
            out[root + "conv_stem." + _conv_layer(k[len("stem."):], what)] = v
        elif k.startswith("final_conv."):
            out[root + "conv_1x1_exp." + _conv_layer(k[len("final_conv."):], what)] = v
        elif k.startswith("stages."):
            _, stage, block, rest = k.split(".", 3)
            layer = f"{root}encoder.layer.{stage}."
            if int(stage) < 2:  # inverted residuals: stages 0-1 hold them all
                ir = _rename(rest, _IR, what)
                name, _, tail = ir.partition(".")
                out[f"{layer}layer.{block}.{name}.{_conv_layer(tail, what)}"] = v
            elif block == "0":  # the stride-2 inverted residual that opens a MobileViT stage
                ir = _rename(rest, _IR, what)
                name, _, tail = ir.partition(".")
                out[f"{layer}downsampling_layer.{name}.{_conv_layer(tail, what)}"] = v
            elif rest.startswith("transformer."):
                _, j, part = rest.split(".", 2)
                base = f"{layer}transformer.layer.{j}."
                if part.startswith("attn.qkv."):  # v1: the fused projection split
                    split_qkv(out, base + "attention.attention.", v, part.rsplit(".", 1)[1])
                else:
                    out[base + _rename(part, _LAYER_V1 if v1 else _LAYER_V2, what)] = v
            else:
                part = _rename(rest, _BLOCK, what)
                if part.startswith(("conv_kxk.", "conv_projection.", "fusion.")):
                    name, _, tail = part.partition(".")
                    part = f"{name}.{_conv_layer(tail, what)}"
                out[layer + part] = v
        else:
            raise ValueError(f"{what}: no transformers name for {k!r}")
    return out


def _plain(pre: Any) -> bool:
    """Pixels in [0, 1] as they are (vitlab's MobileViT statistics): what MobileViTImageProcessor gives."""
    return all(m == 0 for m in pre.mean) and all(s == 1 for s in pre.std)


def flipping_processor(model: nn.Module) -> tuple[dict[str, Any], list[str]]:
    """``MobileViTImageProcessor``: resize, crop, [0, 1], BGR where the model reads BGR; no normalisation."""
    pre = model.preprocessing
    if not _plain(pre):
        raise ValueError(f"{model.model_name} reads {pre.channel_order} images normalised with mean "
                         f"{tuple(pre.mean)}, std {tuple(pre.std)}: transformers' processor that flips RGB to BGR "
                         f"(MobileViTImageProcessor) does not normalise, and those that normalise do not flip")
    notes: list[str] = []
    return {"image_processor_type": "MobileViTImageProcessor", **processor_geometry(model, notes),
            **common_processor_fields(model, notes), "do_normalize": False,
            "do_flip_channel_order": pre.channel_order == "BGR"}, notes


def _processor(model: nn.Module) -> tuple[dict[str, Any], list[str]]:
    pre = model.preprocessing
    if _plain(pre) or pre.channel_order == "BGR":
        return flipping_processor(model)
    # fine-tuned with a mean / std, on RGB: a processor that normalises. It says that it does not flip: a reader of
    # a MobileViT folder (vitlab's import, as transformers' own v1 weights) takes BGR unless told (transformers'
    # processors keep the field unused)
    config, notes = image_processor(model)
    return {**config, "do_flip_channel_order": False}, notes


def _notes(model: nn.Module) -> list[str]:
    cfg = model.cfg
    if cfg.version != "v2" or cfg.patch_remainder != "resize":
        return []
    return [f"at input sizes whose MobileViT maps are not multiples of the patch ({cfg.patch_size}), vitlab resizes "
            f"them (patch_remainder='resize') where transformers' MobileViTV2 leaves the remainder out"]


MOBILEVIT = HfFamily(_check, _config, _state_dict, processor=_processor, notes=_notes)

__all__ = ["MOBILEVIT", "flipping_processor"]
