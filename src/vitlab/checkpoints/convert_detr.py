"""DETR checkpoints -> vitlab: Hugging Face ``DetrForObjectDetection`` and facebookresearch/detr.

* Hugging Face (v5 in-memory names or the v4 names of saved files - ``out_proj``, ``fc1``,
  ``backbone.conv_encoder``; a ResNet backbone from ``ResNetConfig`` - ``embedder`` /
  ``encoder.stages.S.layers.B.layer.i`` - or from timm - ``conv1`` / ``layerS.B``): separate
  ``q_proj`` / ``k_proj`` / ``v_proj``, ``o_proj``, ``self_attn_layer_norm``, ``encoder_attn``,
  ``final_layer_norm``, ``model.decoder.layernorm``, ``model.query_position_embeddings``,
  ``class_labels_classifier``, ``bbox_predictor``. The config gives the heads (``decoder_attention_heads``
  may differ from the encoder's), ``auxiliary_loss`` (true: transformers' decoder normalises each layer's
  output before the next, kept as ``dec_norm_between_layers``) and, in ``backbone_config``, where the ResNet
  strides (``downsample_in_bottleneck``, ``downsample_in_first_stage``) and which stage's map is used
  (``out_features``: the backbone ends there); a backbone ``hidden_act`` other than relu is refused.
* The official repository (``{"model": ...}``; ``backbone.0.body.*`` in torchvision's ResNet names,
  ``transformer.encoder.layers.N.self_attn.in_proj_weight`` fused q/k/v, ``linear1/2``, ``norm1..3``,
  ``multihead_attn``, ``transformer.decoder.norm``, ``query_embed``, ``input_proj``, ``class_embed``,
  ``bbox_embed``). Sizes come from the tensors; the number of heads is not in the weights (8 unless
  ``num_heads=`` is given).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from torch import Tensor

from vitlab.checkpoints.convert_resnet import hf_resnet_key as _hf_resnet_key
from vitlab.checkpoints.convert_resnet import resnet_args as _resnet_args
from vitlab.checkpoints.convert_resnet import tv_resnet_key as _tv_resnet_key
from vitlab.checkpoints.converters import (
    Converted,
    register_converter,
    register_format_detector,
    register_hf_model_type,
)

log = logging.getLogger(__name__)

register_hf_model_type("detr", "detr_resnet50")

def _backbone_name(args: dict[str, Any]) -> str:
    from vitlab.models.resnet import resnet_name

    return resnet_name(args["block"])


def _split_qkv(prefix: str, w: Tensor, kind: str, out: dict[str, Tensor]) -> None:
    q, k, v = w.chunk(3)
    out[f"{prefix}.q_proj.{kind}"], out[f"{prefix}.k_proj.{kind}"], out[f"{prefix}.v_proj.{kind}"] = q, k, v


def _transformer_overrides(sd: dict[str, Tensor]) -> dict[str, Any]:
    """Sizes of the vitlab state dict's transformer part."""
    enc = {int(m.group(1)) for k in sd if (m := re.match(r"^encoder\.layers\.(\d+)\.", k))}
    dec = {int(m.group(1)) for k in sd if (m := re.match(r"^decoder\.layers\.(\d+)\.", k))}
    return {
        "dim": int(sd["query_embed.weight"].shape[1]),
        "num_queries": int(sd["query_embed.weight"].shape[0]),
        "enc_depth": len(enc),
        "dec_depth": len(dec),
        "ffn_dim": int(sd["encoder.layers.0.mlp.fc1.weight"].shape[0]) if enc else
        int(sd["decoder.layers.0.mlp.fc1.weight"].shape[0]),
        "num_classes": int(sd["class_embed.weight"].shape[0]) - 1,
    }


_HF_LAYER = [
    ("self_attn.o_proj.", "{a}.proj."), ("self_attn.q_proj.", "{a}.q_proj."), ("self_attn.k_proj.", "{a}.k_proj."),
    ("self_attn.v_proj.", "{a}.v_proj."), ("encoder_attn.o_proj.", "cross_attn.proj."),
    ("encoder_attn.q_proj.", "cross_attn.q_proj."), ("encoder_attn.k_proj.", "cross_attn.k_proj."),
    ("encoder_attn.v_proj.", "cross_attn.v_proj."), ("mlp.fc1.", "mlp.fc1."), ("mlp.fc2.", "mlp.fc2."),
    ("self_attn_layer_norm.", "norm1."), ("encoder_attn_layer_norm.", "norm2."),
]


@register_converter("detr", "hf")
def convert_hf(sd: dict[str, Tensor], meta: dict[str, Any]) -> Converted:
    config = meta.get("config") or {}
    if config.get("activation_function", "relu") != "relu":
        raise ValueError(f"activation_function={config['activation_function']!r}; vitlab's DETR uses relu")
    if config.get("position_embedding_type", "sine") != "sine":
        raise ValueError(f"position_embedding_type={config['position_embedding_type']!r}; vitlab's DETR uses sine")
    if config.get("dilation"):
        raise ValueError("dilation=True (DC5 backbones) is not supported by vitlab's DETR")
    out: dict[str, Tensor] = {}
    backbone: dict[str, Tensor] = {}
    for k, v in sd.items():
        if k.startswith("model.backbone.conv_encoder."):  # v4 names of the same tensors
            k = "model.backbone." + k[len("model.backbone.conv_encoder."):]
        if k.startswith("model.backbone.model."):
            rest = k[len("model.backbone.model."):]
            if rest.endswith("num_batches_tracked"):
                continue
            backbone[_hf_resnet_key(rest) if rest.startswith(("embedder.", "encoder.")) else _tv_resnet_key(rest)] = v
            continue
        m = re.match(r"^model\.(encoder|decoder)\.layers\.(\d+)\.(.+)$", k)
        if m:
            part, i, rest = m.groups()
            enc = part == "encoder"
            rest = re.sub(r"^(self_attn|encoder_attn)\.out_proj\.", r"\1.o_proj.", rest)  # v4 (Hub) names
            rest = re.sub(r"^(fc[12])\.", r"mlp.\1.", rest)
            if rest.startswith("final_layer_norm."):
                name = ("norm2." if enc else "norm3.") + rest[len("final_layer_norm."):]
            else:
                name = next((new.format(a="attn" if enc else "self_attn") + rest[len(old):]
                             for old, new in _HF_LAYER if rest.startswith(old)), None)
                if name is None:
                    raise ValueError(f"unexpected key {k!r}")
            out[f"{part}.layers.{i}.{name}"] = v
            continue
        for old, new in (("model.decoder.layernorm.", "decoder.norm."), ("model.query_position_embeddings.",
                         "query_embed."), ("model.input_projection.", "input_proj."),
                         ("class_labels_classifier.", "class_embed."), ("bbox_predictor.", "bbox_embed.")):
            if k.startswith(old):
                out[new + k[len(old):]] = v
                break
        else:
            raise ValueError(f"unexpected key {k!r}")
    backbone = _keep_stages(backbone, _feature_stage(config))
    converted = _finish(out, backbone, heads=config.get("encoder_attention_heads"))
    if config.get("auxiliary_loss"):  # transformers' decoder then normalises each layer's output before the next
        converted.overrides["dec_norm_between_layers"] = True
    if config:  # transformers' defaults: 8 heads in both
        enc_heads = int(config.get("encoder_attention_heads", 8))
        dec_heads = int(config.get("decoder_attention_heads", 8))
        converted.overrides["num_heads"] = enc_heads
        if dec_heads != enc_heads:
            converted.overrides["dec_num_heads"] = dec_heads
    converted.overrides["backbone_args"].update(_hf_backbone_args(config.get("backbone_config") or {}))
    return converted


def _feature_stage(config: dict[str, Any]) -> int | None:
    """The 1-based ResNet stage whose map feeds DETR's transformer: transformers takes the last of the backbone's
    ``out_features`` (``"stageN"``) / ``out_indices`` (0 the stem); for a timm backbone, the last of
    ``backbone_kwargs.out_indices``. None: not given (the last stage)."""
    bb = config.get("backbone_config") or {}
    if config.get("use_timm_backbone"):
        names, indices, what = None, (config.get("backbone_kwargs") or {}).get("out_indices"), "backbone_kwargs"
    else:
        names, indices, what = bb.get("out_features"), bb.get("out_indices"), "backbone_config"
    if names:
        # transformers' ResNet names its stages "stageN", a timm backbone (transformers 5's config of the published
        # DETR folders: model_type "timm_backbone") "layerN"
        m = re.fullmatch(r"(?:stage|layer)(\d+)", str(names[-1]))
        if m is None or int(m.group(1)) < 1:
            raise ValueError(f"{what}.out_features={list(names)!r}: DETR reads the last of them, which must be a "
                             f"ResNet stage ('stage1' / 'layer1', 'stage2' / 'layer2', ...), not {names[-1]!r}")
        return int(m.group(1))
    if indices:
        last = int(indices[-1])
        if last == 0:
            raise ValueError(f"{what}.out_indices={list(indices)!r}: DETR reads the last of them, which must be a "
                             f"ResNet stage (1, 2, ...), not the stem (0)")
        return last
    return None


def _keep_stages(backbone: dict[str, Tensor], stage: int | None) -> dict[str, Tensor]:
    """The ResNet up to ``stage`` (1-based; None or a negative index from the end: as counted on the tensors),
    without the later stages' tensors, which transformers builds but never runs."""
    n = len({int(m.group(1)) for k in backbone if (m := re.match(r"^stages\.(\d+)\.", k))})
    if stage is None:
        return backbone
    if stage < 0:
        stage = n + 1 + stage
    if not 1 <= stage <= n:
        raise ValueError(f"backbone out_features / out_indices name stage {stage}, but the ResNet has {n} stages")
    if stage == n:
        return backbone
    log.info("DETR backbone: the map of stage %d of %d feeds the transformer (out_features); the later stages' "
             "weights are not used", stage, n)
    return {k: v for k, v in backbone.items()
            if not ((m := re.match(r"^stages\.(\d+)\.", k)) and int(m.group(1)) >= stage)}


def _hf_backbone_args(bb: dict[str, Any]) -> dict[str, Any]:
    """What a Hugging Face ``backbone_config`` (transformers' ResNetConfig) sets beyond the tensors: where the
    stride sits. An activation other than ReLU is refused."""
    act = bb.get("hidden_act", "relu")
    if act != "relu":
        raise ValueError(f"backbone_config.hidden_act={act!r}; vitlab's ResNet backbone uses relu")
    args: dict[str, Any] = {}
    if bb.get("downsample_in_bottleneck") and bb.get("layer_type", "bottleneck") == "bottleneck":
        args["stride_in_1x1"] = True  # the stride on the bottleneck's first 1x1 convolution (ResNet v1)
    if bb.get("downsample_in_first_stage"):
        args["first_stage_stride"] = 2
    return args


@register_converter("detr", "official")
def convert_official(sd: dict[str, Tensor], meta: dict[str, Any]) -> Converted:
    out: dict[str, Tensor] = {}
    backbone: dict[str, Tensor] = {}
    for k, v in sd.items():
        if k.startswith("backbone.0.body."):
            if not k.endswith("num_batches_tracked"):
                backbone[_tv_resnet_key(k[len("backbone.0.body."):])] = v
            continue
        if k.startswith("backbone."):  # backbone.1: the position encoding has no weights (sine)
            raise ValueError(f"unexpected key {k!r} (a learned position encoding is not supported)")
        m = re.match(r"^transformer\.(encoder|decoder)\.layers\.(\d+)\.(.+)$", k)
        if m:
            part, i, rest = m.groups()
            enc = part == "encoder"
            base = f"{part}.layers.{i}."
            attn = {"self_attn": "attn" if enc else "self_attn", "multihead_attn": "cross_attn"}
            am = re.match(r"^(self_attn|multihead_attn)\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)$",
                          rest)
            if am:
                a, what = attn[am.group(1)], am.group(2)
                if what.startswith("in_proj"):
                    _split_qkv(base + a, v, what.split("_")[-1], out)
                else:
                    out[f"{base}{a}.proj.{what.split('.')[-1]}"] = v
                continue
            rest = rest.replace("linear1.", "mlp.fc1.").replace("linear2.", "mlp.fc2.")
            out[base + rest] = v
            continue
        if k.startswith("transformer.decoder.norm."):
            out["decoder.norm." + k.split(".")[-1]] = v
        elif k.split(".")[0] in ("query_embed", "input_proj", "class_embed", "bbox_embed"):
            out[k] = v
        else:
            raise ValueError(f"unexpected key {k!r}")
    return _finish(out, backbone, heads=None)


def _finish(out: dict[str, Tensor], backbone: dict[str, Tensor], *, heads: Any) -> Converted:
    args = _resnet_args(backbone)
    out.update({f"backbone.{k}": v for k, v in backbone.items()})
    overrides = {**_transformer_overrides(out), "backbone": _backbone_name(args),
                 "backbone_args": {k: v for k, v in args.items() if k != "block"}}
    if heads is not None:
        overrides["num_heads"] = int(heads)
    return Converted(out, overrides)


@register_format_detector("detr")
def detect(sd: dict[str, Any]) -> str | None:
    if any(k.startswith(("transformer.", "backbone.0.body.")) for k in sd):
        return "official"
    if any(k.startswith(("model.backbone.", "class_labels_classifier.")) for k in sd):
        return "hf"
    return None
