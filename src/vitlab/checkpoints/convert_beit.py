"""BEiT / BEiT v2 / BEiT-3 checkpoints -> vitlab: timm, Hugging Face, and BEiT-3's torchscale layout.

* timm ``beit_*`` / ``beitv2_*`` (and microsoft/unilm's beit, beit2 files, which timm's layout follows): vitlab's
  names except LayerScale (``blocks.N.gamma_1`` -> ``blocks.N.ls1.gamma``); the ``relative_position_index``
  buffers are recomputed. Pre-training files also hold ``mask_token``, ``lm_head.*`` (and v2's
  ``cls_pt_layers.*``): they are not part of the backbone and are dropped here, with a log line
  (:mod:`vitlab.ssl.beit_mim` reads them).
* timm ``beit3_*``: timm's VisionTransformer layout, which vitlab's BEiT-3 keeps (``attn.norm``, ``mlp.norm``).
* BEiT-3 torchscale / unilm ``beit3/`` checkpoints (``{"model": sd}``, keys under ``beit3.``): branch A
  (vision) of every Multiway module is kept, branch B (text) and the text embedding dropped; q, k, v
  fused; the position table loses its first 2 rows (fairseq numbers positions from 2); the encoder's
  final ``layer_norm`` becomes ``norm`` (those files normalise before pooling AND after: ``final_norm``).
* Hugging Face ``BeitModel`` / ``BeitForImageClassification`` / ``BeitForMaskedImageModeling`` /
  ``BeitForSemanticSegmentation`` (its backbone: the FPN necks and UperNet heads are dropped with a log line), and
  data2vec-vision's ``Data2VecVision*`` classes (the same architecture under ``data2vec_vision.``): the hub spelling
  (``beit.encoder.layer.N.attention.attention.query``, ``...relative_position_bias...``, ``intermediate.dense``)
  and transformers 5's in-memory one (``beit.layers.N.attention.q_proj``, ``mlp.fc1``,
  ``beit.shared_position_bias``) are both read. The MIM head (mask token, ``lm_head``) is dropped with a log
  line; the MIM model's ``layernorm`` is the backbone's final norm.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from torch import Tensor

from vitlab.checkpoints.adapt import SourceStateDict
from vitlab.checkpoints.convert_timm import head_overrides
from vitlab.checkpoints.converters import (
    Converted,
    register_converter,
    register_format_detector,
    register_hf_model_type,
)

log = logging.getLogger(__name__)

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
# pre-training parts that are not the backbone (BEiT's MIM head, BEiT v2's patch-aggregation "cls_pt_*" blocks)
PRETRAINING_KEYS = ("mask_token", "lm_head.", "cls_pt_")


def _report_dropped(dropped: list[str], what: str) -> None:
    if dropped:
        log.info("%s: %d pre-training key(s) not part of the backbone dropped (%s); "
                 "vitlab.ssl.beit_mim.load_beit_mim reads the MIM head", what, len(dropped),
                 ", ".join(sorted(dropped)[:4]) + (", ..." if len(dropped) > 4 else ""))


def beit_overrides(sd: dict[str, Tensor]) -> dict[str, Any]:
    """What a state dict in vitlab's BEiT names fixes: widths, depth, heads, the position scheme, the bias
    layout, LayerScale, sub-LN and the norms (the resolution stays the model's: tables are resampled)."""
    if "patch_embed.proj.weight" not in sd or not any(_BLOCK.match(k) for k in sd):
        raise ValueError("no 'patch_embed.proj.weight' / 'blocks.<i>.' keys: not a BEiT checkpoint")
    w = sd["patch_embed.proj.weight"]
    over = head_overrides(sd)
    over.update(embed_dim=int(w.shape[0]), in_chans=int(w.shape[1]), patch_size=int(w.shape[-1]),
                depth=1 + max(int(m.group(1)) for k in sd if (m := _BLOCK.match(k))))
    fc1 = sd.get("blocks.0.mlp.fc1.weight")
    if fc1 is not None:
        over["mlp_ratio"] = fc1.shape[0] / fc1.shape[1]
    table = sd.get("blocks.0.attn.relative_position_bias_table", sd.get("rel_pos_bias.relative_position_bias_table"))
    if table is not None:
        over["num_heads"] = int(table.shape[1])
    over["use_abs_pos_emb"] = "pos_embed" in sd
    over["use_rel_pos_bias"] = "blocks.0.attn.relative_position_bias_table" in sd
    over["use_shared_rel_pos_bias"] = "rel_pos_bias.relative_position_bias_table" in sd
    if "blocks.0.attn.q_bias" in sd:
        over.update(qkv_bias=True, qkv_bias_layout="qv")
    elif "blocks.0.attn.qkv.bias" in sd:
        over.update(qkv_bias=True, qkv_bias_layout="qkv")
    else:
        over["qkv_bias"] = False
    # any value makes the LayerScale modules exist (the file's gammas replace it); keep the file's scale on record
    gamma = sd.get("blocks.0.ls1.gamma")
    over["init_values"] = None if gamma is None else (round(float(gamma.float().abs().mean()), 6) or 0.1)
    over["sub_ln"] = "blocks.0.attn.norm.weight" in sd
    has_norm, has_fc_norm = "norm.weight" in sd, "fc_norm.weight" in sd
    over["fc_norm"], over["final_norm"] = has_fc_norm, has_norm
    if has_fc_norm:
        over["global_pool"] = "avg"
    elif has_norm and "head.weight" in sd:
        # a classifier with the final norm before pooling read the class token: timm's Beit (BEiT, BEiT v2) and
        # its VisionTransformer (BEiT-3) build fc_norm exactly when they average (use_fc_norm / fc_norm default
        # to global_pool == "avg"), as transformers' use_mean_pooling does. A file without a head (pre-training)
        # does not say how a classifier pools: it keeps the fine-tuning default, averaging
        over["global_pool"] = "token"
    return over


def _from_timm_names(sd: dict[str, Tensor], what: str) -> Converted:
    out: dict[str, Tensor] = {}
    dropped = []
    for k, v in sd.items():
        if k.endswith("relative_position_index"):
            continue
        if k.startswith(PRETRAINING_KEYS):
            dropped.append(k)
            continue
        if k.startswith("head.fc."):
            k = "head." + k[len("head.fc."):]
        k = re.sub(r"^(blocks\.\d+)\.gamma_([12])$", r"\1.ls\2.gamma", k)
        out[k] = v
    _report_dropped(dropped, what)
    return Converted(out, beit_overrides(out))


@register_format_detector("beit3")
def detect_beit3(sd: dict[str, Any]) -> str | None:
    """torchscale's BEiT-3 keys live under ``beit3.``; timm's never do."""
    return "official" if any(k.startswith("beit3.") for k in sd) else None


register_format_detector("beit")(detect_beit3)


@register_converter("beit", "timm")
def convert_timm_beit(sd: dict[str, Tensor], meta: dict[str, Any]) -> Converted:
    return _from_timm_names(sd, "timm BEiT checkpoint")


@register_converter("beit3", "timm")
def convert_timm_beit3(sd: dict[str, Tensor], meta: dict[str, Any]) -> Converted:
    return _from_timm_names(sd, "timm BEiT-3 checkpoint")


# ------------------------------------------------------------------------------------- BEiT-3 torchscale
_TS_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)\.A\.(weight|bias)$")
_TS_BLOCK_MAP = {
    "self_attn.out_proj": "attn.proj",
    "self_attn.inner_attn_ln": "attn.norm",
    "self_attn_layer_norm": "norm1",
    "final_layer_norm": "norm2",
    "ffn.fc1": "mlp.fc1",
    "ffn.fc2": "mlp.fc2",
    "ffn.ffn_layernorm": "mlp.norm",
}
_TS_QKV = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v"}
# the text side and task heads of vision-language fine-tuning: not part of the vision encoder
_TS_IGNORED = ("text_embed.", "vision_embed.mask_token", "language_head", "vision_head", "logit_scale", "pooler.")
FAIRSEQ_POSITION_OFFSET = 2  # torchscale's PositionalEmbedding numbers positions from 2, as fairseq


@register_converter("beit3", "official")
def convert_torchscale_beit3(sd: dict[str, Tensor], meta: dict[str, Any]) -> Converted:
    out: dict[str, Tensor] = {}
    qkv: dict[int, dict[str, Tensor]] = {}
    for k, v in sd.items():
        if not k.startswith("beit3."):
            if k.startswith(("fc_norm.", "head.")):
                out[k] = v
            elif not k.startswith(_TS_IGNORED):
                raise ValueError(f"BEiT-3 checkpoint: unexpected key {k!r}")
            continue
        k = k[len("beit3."):]
        if k.startswith(_TS_IGNORED) or ".B." in k:
            continue
        if k.startswith("vision_embed.proj."):
            out["patch_embed.proj." + k.rsplit(".", 1)[1]] = v
        elif k == "vision_embed.cls_token":
            out["cls_token"] = v
        elif k == "encoder.embed_positions.A.weight":
            out["pos_embed"] = v[FAIRSEQ_POSITION_OFFSET:].unsqueeze(0)  # (1, 1 + N, D)
        elif k.startswith("encoder.layer_norm.A."):
            out["norm." + k.rsplit(".", 1)[1]] = v
        elif m := _TS_LAYER.match(k):
            i, module, param = int(m.group(1)), m.group(2), m.group(3)
            if module in _TS_QKV:
                qkv.setdefault(i, {})[f"{_TS_QKV[module]}.{param}"] = v
            elif module in _TS_BLOCK_MAP:
                out[f"blocks.{i}.{_TS_BLOCK_MAP[module]}.{param}"] = v
            else:
                raise ValueError(f"BEiT-3 checkpoint: unexpected key 'beit3.{k}'")
        else:
            raise ValueError(f"BEiT-3 checkpoint: unexpected key 'beit3.{k}'")
    for i, parts in qkv.items():
        missing = [p for p in ("q.weight", "k.weight", "v.weight") if p not in parts]
        if missing:
            raise ValueError(f"BEiT-3 checkpoint: layer {i} lacks self_attn {', '.join(missing)}")
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([parts["q.weight"], parts["k.weight"], parts["v.weight"]])
        if "q.bias" in parts:
            out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([parts["q.bias"], parts["k.bias"], parts["v.bias"]])
    return Converted(out, beit_overrides(out))


# ------------------------------------------------------------------------------------------ Hugging Face
_HF_LAYER = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)$")
_HF_BLOCK_MAP = {  # both spellings: hub files (transformers 4) and transformers 5 in memory
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "lambda_1": "ls1.gamma",
    "lambda_2": "ls2.gamma",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "attention.attention.relative_position_bias.relative_position_bias_table": "attn.relative_position_bias_table",
    "relative_position_bias.relative_position_bias_table": "attn.relative_position_bias_table",
}
_HF_QKV = {"attention.attention.query": "q", "attention.attention.key": "k", "attention.attention.value": "v",
           "attention.q_proj": "q", "attention.k_proj": "k", "attention.v_proj": "v"}
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "encoder.relative_position_bias.relative_position_bias_table": "rel_pos_bias.relative_position_bias_table",
    "shared_position_bias.relative_position_bias_table": "rel_pos_bias.relative_position_bias_table",
}
HF_LAYER_NORM_EPS = 1e-12  # transformers' BeitConfig default
# where a task model keeps the backbone: BEiT's classes, and data2vec-vision's (the same architecture)
HF_BACKBONE_PREFIXES = ("beit.", "data2vec_vision.")
# ForSemanticSegmentation's necks (fpn1-fpn4, "fpn." in transformers 5's spelling), UperNet and FCN heads
HF_SEGMENTATION_HEAD = ("fpn1.", "fpn2.", "fpn3.", "fpn4.", "fpn.", "decode_head.", "auxiliary_head.")


def _hf_param(rest: str, table: dict[str, str]) -> tuple[str, str] | None:
    for src in table:
        if rest == src:
            return src, ""
        if rest.startswith(src + "."):
            return src, rest[len(src) + 1:]
    return None


def convert_hf_beit_state_dict(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """HF BEiT tensors -> vitlab names, and the MIM-head keys left out (mask token, lm_head).

    The MIM model's own ``layernorm`` becomes the final ``norm`` when the backbone has none
    (``use_mean_pooling``, the released configs); with two norms it is part of the MIM head and left out too.
    """
    out: dict[str, Tensor] = {}
    head_keys: list[str] = []
    qkv: dict[int, dict[str, Tensor]] = {}
    # a task model (ForImageClassification / ForMaskedImageModeling) keeps the backbone under "beit."; a bare
    # BeitModel has no prefix, and its top-level "layernorm" is its own final norm
    task_model = any(k.startswith(HF_BACKBONE_PREFIXES) for k in sd)
    mim_norm = {k: v for k, v in sd.items() if task_model and k.startswith("layernorm.")}
    for k, v in sd.items():
        if k.endswith("relative_position_index"):
            continue
        if k.startswith("classifier."):
            out["head." + k[len("classifier."):]] = v
            continue
        if k.startswith(("lm_head.", *HF_SEGMENTATION_HEAD)) or k in mim_norm or k.endswith("embeddings.mask_token"):
            head_keys.append(k)
            continue
        for prefix in HF_BACKBONE_PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix):]
                break
        if k in _HF_TOP:
            out[_HF_TOP[k]] = v
        elif k.startswith("embeddings.patch_embeddings.projection."):
            out["patch_embed.proj." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("layernorm."):
            out["norm." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("pooler.layernorm."):
            out["fc_norm." + k.rsplit(".", 1)[1]] = v
        elif m := _HF_LAYER.match(k):
            i, rest = int(m.group(1)), m.group(2)
            found = _hf_param(rest, _HF_QKV)
            if found is not None:
                src, param = found
                qkv.setdefault(i, {})[f"{_HF_QKV[src]}.{param}"] = v
                continue
            found = _hf_param(rest, _HF_BLOCK_MAP)
            if found is None:
                raise ValueError(f"HF BEiT checkpoint: unexpected key {k!r}")
            src, param = found
            out[f"blocks.{i}.{_HF_BLOCK_MAP[src]}" + (f".{param}" if param else "")] = v
        else:
            raise ValueError(f"HF BEiT checkpoint: unexpected key {k!r}")
    for i, parts in qkv.items():
        base = f"blocks.{i}.attn."
        out[base + "qkv.weight"] = torch.cat([parts["q.weight"], parts["k.weight"], parts["v.weight"]])
        if "q.bias" in parts:  # HF's key projection has no bias: BEiT's q / v bias layout
            out[base + "q_bias"], out[base + "v_bias"] = parts["q.bias"], parts["v.bias"]
    if mim_norm and "norm.weight" not in out and "fc_norm.weight" not in out:
        out.update({"norm." + k.rsplit(".", 1)[1]: v for k, v in mim_norm.items()})
        head_keys = [k for k in head_keys if not k.startswith("layernorm.")]
    return out, head_keys


def hf_beit_overrides(config: dict[str, Any]) -> dict[str, Any]:
    """Architecture fields of a BEiT ``config.json`` (the tensors fix the rest)."""
    if not config:
        return {}
    if config.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"HF BEiT config: hidden_act={config['hidden_act']!r}; vitlab's BEiT uses exact 'gelu'")
    over: dict[str, Any] = {"norm_eps": float(config.get("layer_norm_eps", HF_LAYER_NORM_EPS)),
                            "pos_antialias": False}  # interpolate_pos_encoding: bicubic without antialiasing
    if "num_attention_heads" in config:
        over["num_heads"] = int(config["num_attention_heads"])
    if "image_size" in config:
        img = config["image_size"]
        over["img_size"] = tuple(int(s) for s in img) if isinstance(img, (list, tuple)) else int(img)
    if "layer_scale_init_value" in config:
        value = float(config["layer_scale_init_value"])
        over["init_values"] = value if value > 0 else None
    _warn_hf_rect_rel_pos(config)
    if isinstance(config.get("use_mean_pooling"), bool):
        # transformers' pooler (BeitPooler, and the classifier on top of it): the normalised mean of the patch
        # tokens, or the class token. A classifier's norms already say which; a headless BeitModel's do not
        over["global_pool"] = "avg" if config["use_mean_pooling"] else "token"
    return over


def _warn_hf_rect_rel_pos(config: dict[str, Any]) -> None:
    """Warn where transformers reads a relative position table differently from vitlab (and timm): on a
    rectangular patch grid, BeitRelativePositionBias reshapes the (2H-1)(2W-1) entries as (2W-1, 2H-1) rows and
    columns and resamples them bilinearly to (2H-1, 2W-1), even at the model's own size."""
    img, patch = config.get("image_size"), config.get("patch_size", 16)
    if not isinstance(img, (list, tuple)) or not (config.get("use_relative_position_bias")
                                                  or config.get("use_shared_relative_position_bias")):
        return
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    h, w = int(img[0]) // int(patch), int(img[1]) // int(patch)
    if h != w:
        log.warning("HF BEiT config: image_size=%s gives a %dx%d patch grid; transformers reads the relative "
                    "position tables (%dx%d offsets) with their axes swapped and resamples them bilinearly "
                    "(BeitRelativePositionBias), where vitlab reads them as stored, as timm does: outputs differ "
                    "from transformers' (by about 1e-4 on small models)", list(img), h, w, 2 * h - 1, 2 * w - 1)


@register_converter("beit", "hf")
def convert_hf_beit(sd: dict[str, Tensor], meta: dict[str, Any]) -> Converted:
    out, head_keys = convert_hf_beit_state_dict(sd)
    # transformers' resizing: the absolute table bicubic without antialiasing (interpolate_pos_encoding), the
    # relative ones bilinearly (BeitRelativePositionBias; data2vec-vision's is the same)
    out = SourceStateDict(out, pos_antialias=False, rel_pos_interpolation="bilinear")
    seg = [k for k in head_keys if k.startswith(HF_SEGMENTATION_HEAD)]
    if seg:
        log.info("HF BEiT segmentation checkpoint: %d key(s) of the FPN necks and the UperNet / auxiliary heads "
                 "dropped; the backbone is read (its blocks' outputs: forward_intermediates)", len(seg))
    _report_dropped([k for k in head_keys if not k.startswith(HF_SEGMENTATION_HEAD)], "HF BEiT checkpoint")
    over = beit_overrides(out)  # use_mean_pooling=False (a final norm, no fc_norm): class-token pooling
    over.update(hf_beit_overrides(meta.get("config") or {}))
    return Converted(out, over)


register_hf_model_type("beit", "beit_base_patch16_224")
register_hf_model_type("data2vec-vision", "beit_base_patch16_224")  # data2vec's vision model is BEiT's
