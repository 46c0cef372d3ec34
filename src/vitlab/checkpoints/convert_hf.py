"""Hugging Face transformers ViT (``ViTModel`` / ``ViTForImageClassification``) -> vitlab.

Both spellings of the encoder are read: the hub files' (transformers 4, and what transformers 5 writes with
``save_pretrained``: ``encoder.layer.N.attention.attention.query``, ``attention.output.dense``,
``intermediate.dense``) and transformers 5's in-memory one, which ``torch.save(model.state_dict())`` writes
(``layers.N.attention.q_proj``, ``attention.o_proj``, ``mlp.fc1``).

DINOv2 (``Dinov2Model``, ``Dinov2WithRegistersModel``: model_type ``dinov2`` / ``dinov2_with_registers``) is read
as a headless ViT with LayerScale (``layer_scale1.lambda1``). transformers interpolates the position table for
every input (bicubic; antialiased for the register model only), so these folders load with ``dynamic_img_size=True``. The register model
adds the table to the class and patch tokens and inserts the registers after: the class entry goes into
``cls_token`` and the table covers the patches only (``no_embed_class``), as timm's DINOv2 converter does.

CLIP's and SigLIP's image towers (model_type ``clip_vision_model`` / ``clip``, ``siglip_vision_model`` / ``siglip``)
are read as vitlab's CLIP / SigLIP layouts: see the section at the end of this file.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from vitlab.checkpoints.adapt import SourceStateDict
from vitlab.checkpoints.convert_timm import head_overrides
from vitlab.checkpoints.converters import Converted, register_converter, register_hf_model_type

_LAYER = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)$")
_LAYER_MAP = {  # both spellings: hub files (transformers 4) and transformers 5 in memory
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "lambda1": "ls1.gamma",
    "lambda2": "ls2.gamma",
    "norm1": "norm1",  # DINOv2
    "norm2": "norm2",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
}
_QKV = {"attention.attention.query": "query", "attention.attention.key": "key", "attention.attention.value": "value",
        "attention.q_proj": "query", "attention.k_proj": "key", "attention.v_proj": "value"}


# transformers' ViTConfig defaults, for the fields a config.json may leave out
HF_LAYER_NORM_EPS = 1e-12
# transformers' hidden_act names -> vitlab's ViTConfig.gelu
HF_GELU = {"gelu": "exact", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "quick_gelu": "quick"}


def hf_vit_overrides(config: dict[str, Any]) -> dict[str, Any]:
    """Architecture fields of a ViT ``config.json``."""
    # "gelu" is the exact (erf) GELU in transformers, as vitlab's default; "gelu_new" / "gelu_pytorch_tanh" the tanh
    # approximation (vitlab's gelu="tanh"), which differs from it at 1e-4
    act = config.get("hidden_act", "gelu")
    if act not in HF_GELU:
        raise ValueError(f"HF ViT config: hidden_act={act!r}; vitlab's ViT has {' / '.join(map(repr, HF_GELU))}")
    if config.get("pooler_act", "tanh") != "tanh":
        raise ValueError(f"HF ViT config: pooler_act={config.get('pooler_act')!r}; vitlab's pre-logits use 'tanh'")
    try:
        hidden = int(config["hidden_size"])
        depth, heads = int(config["num_hidden_layers"]), int(config["num_attention_heads"])
    except KeyError as e:
        raise ValueError(f"HF ViT config lacks {e.args[0]!r}") from None
    img, patch = config.get("image_size", 224), config.get("patch_size", 16)
    if isinstance(patch, (list, tuple)):
        if len(set(patch)) != 1:
            raise ValueError(f"HF ViT config: patch_size={list(patch)}; vitlab's ViT supports square patches only")
        patch = patch[0]
    sides = tuple(int(s) for s in img) if isinstance(img, (list, tuple)) else (int(img),)
    return {
        # transformers' patch convolution leaves the pixels past the last whole patch unused, as timm's
        **({"drop_remainder": True} if any(s % int(patch) for s in sides) else {}),
        "embed_dim": hidden,
        "depth": depth,
        "num_heads": heads,
        "mlp_ratio": int(config.get("intermediate_size", 4 * hidden)) / hidden,
        "img_size": tuple(int(s) for s in img) if isinstance(img, (list, tuple)) else int(img),
        "patch_size": int(patch),
        "in_chans": int(config.get("num_channels", 3)),
        "qkv_bias": bool(config.get("qkv_bias", True)),
        "norm_eps": float(config.get("layer_norm_eps", HF_LAYER_NORM_EPS)),
        "pos_antialias": False,  # interpolate_pos_encoding: bicubic without antialiasing
        "gelu": HF_GELU[act],
    }


def convert_hf_encoder(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The shared embeddings + encoder part of HF ViT-like models (ViT, DeiT) under ``prefix``; the position table
    resamples to another grid as transformers' ``interpolate_pos_encoding`` does (bicubic, not antialiased)."""
    out: dict[str, Tensor] = SourceStateDict(pos_antialias=False)
    qkv: dict[int, dict[str, Tensor]] = {}
    for k, v in sd.items():
        if not k.startswith(prefix):
            continue
        k = k[len(prefix):]
        if k == "embeddings.cls_token":
            out["cls_token"] = v
        elif k == "embeddings.distillation_token":
            out["dist_token"] = v
        elif k == "embeddings.register_tokens":
            out["reg_token"] = v
        elif k == "embeddings.position_embeddings":
            out["pos_embed"] = v
        elif k.startswith("embeddings.patch_embeddings.projection."):
            out["patch_embed.proj." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("layernorm."):
            out["norm." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("pooler.dense."):
            out["pre_logits.fc." + k.rsplit(".", 1)[1]] = v
        elif k == "embeddings.mask_token":
            continue  # only used for masked image modelling
        elif m := _LAYER.match(k):
            i, rest = int(m.group(1)), m.group(2)
            name, param = rest.rsplit(".", 1) if rest.count(".") else (rest, "")
            if name in _QKV:
                qkv.setdefault(i, {})[f"{_QKV[name]}.{param}"] = v
                continue
            if rest in _LAYER_MAP:
                out[f"blocks.{i}.{_LAYER_MAP[rest]}"] = v
            elif name in _LAYER_MAP:
                out[f"blocks.{i}.{_LAYER_MAP[name]}.{param}"] = v
            else:
                raise ValueError(f"HF checkpoint: unexpected key {prefix}{k}")
        else:
            raise ValueError(f"HF checkpoint: unexpected key {prefix}{k}")
    _fuse_qkv(out, qkv)
    return out


def _fuse_qkv(out: dict[str, Tensor], qkv: dict[int, dict[str, Tensor]]) -> None:
    """Each block's separate query / key / value projections (``parts["query.weight"]`` ...) -> the one fused
    (3D, D) projection vitlab's attention has (``blocks.N.attn.qkv``); biases where the file has them."""
    for i, parts in qkv.items():
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([parts[f"{n}.weight"] for n in ("query", "key", "value")])
        if "query.bias" in parts:
            out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([parts[f"{n}.bias"] for n in ("query", "key", "value")])


register_hf_model_type("vit", "vit_base_patch16_224")
DINOV2_TYPES = {"dinov2": "", "dinov2_with_registers": "_reg4"}  # model_type -> the tag of vitlab's names
_DINOV2_SIZES = {384: "small", 768: "base", 1024: "large"}


def _dinov2_name(model_type: str) -> Any:
    def choose(config: dict[str, Any]) -> str | None:
        size = _DINOV2_SIZES.get(config.get("hidden_size"))
        return f"vit_{size}_patch14{DINOV2_TYPES[model_type]}_dinov2" if size else None

    return choose


for _type, _tag in DINOV2_TYPES.items():
    register_hf_model_type(_type, f"vit_base_patch14{_tag}_dinov2", _dinov2_name(_type))


def hf_dinov2_overrides(config: dict[str, Any]) -> dict[str, Any]:
    """Architecture fields of a ``Dinov2Config`` / ``Dinov2WithRegistersConfig``; SwiGLU (ViT-g) is refused."""
    if config.get("use_swiglu_ffn"):
        raise ValueError("HF DINOv2 config: use_swiglu_ffn=True (the ViT-g models' SwiGLU MLP); vitlab's ViT has a "
                         "GELU MLP only")
    hidden = int(config.get("hidden_size", 768))
    over = hf_vit_overrides({**config, "intermediate_size": round(float(config.get("mlp_ratio", 4)) * hidden),
                             "hidden_size": hidden, "layer_norm_eps": config.get("layer_norm_eps", 1e-6)})
    regs = int(config.get("num_register_tokens", 0)) if config.get("model_type") == "dinov2_with_registers" else 0
    over.update(init_values=float(config.get("layerscale_value", 1.0)) or 1.0, reg_tokens=regs,
                no_embed_class=regs > 0, dynamic_img_size=True, num_classes=0, global_pool="token")
    return over


def _convert_hf_dinov2(sd: dict[str, Tensor], config: dict[str, Any]) -> Converted:
    heads = sorted(k for k in sd if k.startswith("classifier."))
    if heads:
        raise ValueError(f"HF DINOv2 classifier ({heads[0]}): Dinov2ForImageClassification reads the class token and "
                         f"the mean patch token together, which vitlab's ViT head does not; load its Dinov2Model "
                         f"backbone (the 'dinov2.' weights) instead")
    prefix = "dinov2." if any(k.startswith("dinov2.") for k in sd) else ""
    out = convert_hf_encoder(sd, prefix)
    over = hf_dinov2_overrides(config)
    if config.get("model_type") == "dinov2_with_registers":
        # its interpolate_pos_encoding antialiases (Dinov2Model's does not), which changes bicubic's kernel
        over["pos_antialias"] = out.pos_antialias = True
    if over["reg_tokens"] and "pos_embed" in out and "cls_token" in out:
        pos = out["pos_embed"]  # (1, 1 + H*W, D): the class entry goes into the class token, (1, H*W, D) remain
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    return Converted(out, over)


@register_converter("vit", "hf")
def convert_hf_vit(sd: dict[str, Tensor], meta: dict[str, Any]) -> Converted:
    config = meta.get("config") or {}
    if config.get("model_type") in DINOV2_TYPES:
        return _convert_hf_dinov2(sd, config)
    if config.get("model_type") in CLIP_TYPES + SIGLIP_TYPES:
        return convert_hf_tower(sd, config)
    prefix = "vit." if any(k.startswith("vit.") for k in sd) else ""
    out = convert_hf_encoder(sd, prefix)
    for k, v in sd.items():
        if k.startswith("classifier."):
            out["head." + k.split(".", 1)[1]] = v
    # without a config.json (a bare state dict) the sizes come from the caller; the eps is HF's default
    overrides = hf_vit_overrides(meta["config"]) if meta.get("config") else {"norm_eps": HF_LAYER_NORM_EPS}
    overrides.update(head_overrides(out))
    if "pre_logits.fc.weight" in out:
        overrides["representation_size"] = int(out["pre_logits.fc.weight"].shape[0])
    return Converted(out, overrides)


# ------------------------------------------------------------------------------------- CLIP / SigLIP towers
# CLIP's image tower (CLIPVisionModel, CLIPVisionModelWithProjection: model_type clip_vision_model; the vision_model
# of a CLIPModel folder, model_type clip) and SigLIP's (SiglipVisionModel: siglip_vision_model; the vision_model of
# a SiglipModel: siglip), read as vitlab's CLIP / SigLIP ViT layouts (pre_norm; attention pooling "map").
# transformers' outputs: last_hidden_state is CLIP's last block's tokens BEFORE post_layernorm (vitlab's
# forward_intermediates' last block; forward_features normalises them) and SigLIP's AFTER it (forward_features);
# pooler_output is CLIP's normalised class token and SigLIP's attention-pooled vector (the headless forward).
# CLIP's visual_projection, where the folder has it, becomes the head (no bias): transformers' image_embeds, the
# un-normalised image embedding of the joint space, is then ``forward``, as timm's CLIP models (num_classes =
# projection width) read OpenAI's projection; forward_head(pre_logits=True) stays pooler_output. transformers
# resamples the position table only when asked (interpolate_pos_encoding=True: bicubic, not antialiased): a model
# built at another img_size (or with dynamic_img_size=True) resamples it by that rule.
CLIP_TYPES = ("clip_vision_model", "clip")
SIGLIP_TYPES = ("siglip_vision_model", "siglip")
# the config classes' defaults (CLIPVisionConfig, SiglipVisionConfig), for fields a config.json leaves out
_CLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
_SIGLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                        vision_use_head=True)
_CLIP_SIZES = {256: "xsmall", 512: "medium", 640: "betwixt", 768: "base", 1024: "large", 1280: "huge",
               1408: "giant", 1664: "gigantic"}
_SIGLIP_SIZES = {768: "base", 1024: "large", 1152: "so400m", 1536: "giantopt"}
_TOWER_LAYER = {"layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.out_proj": "attn.proj",
                "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_TOWER_QKV = {"self_attn.q_proj": "query", "self_attn.k_proj": "key", "self_attn.v_proj": "value"}
_TOWER_HEAD = {"head.attention.out_proj": "attn_pool.proj", "head.layernorm": "attn_pool.norm",
               "head.mlp.fc1": "attn_pool.mlp.fc1", "head.mlp.fc2": "attn_pool.mlp.fc2"}


def tower_config(config: dict[str, Any]) -> dict[str, Any]:
    """The vision tower's config with its class defaults filled in: a full CLIPModel / SiglipModel config's
    ``vision_config``, else the config itself."""
    kind = config.get("model_type")
    vision = config.get("vision_config") or {} if kind in ("clip", "siglip") else config
    return {**(_CLIP_DEFAULTS if kind in CLIP_TYPES else _SIGLIP_DEFAULTS), **vision}


def _tower_name(model_type: str) -> Any:
    clip = model_type in CLIP_TYPES

    def choose(config: dict[str, Any]) -> str | None:
        from vitlab.models.registry import list_models

        cfg = tower_config({**config, "model_type": model_type})
        size = (_CLIP_SIZES if clip else _SIGLIP_SIZES).get(cfg["hidden_size"])
        img, patch = cfg["image_size"], cfg["patch_size"]
        if clip:
            tag = "_clip_quickgelu" if cfg["hidden_act"] == "quick_gelu" else "_clip"
            fallback = f"vit_base_patch32{tag}_224"
        else:
            tag = "_siglip" if cfg["vision_use_head"] else "_siglip_gap"
            fallback = f"vit_base_patch16{tag}_224"
        # the config's resolution, else another of the same width and patch, else base (the config sets the sizes)
        for pattern in (f"vit_{size}_patch{patch}{tag}_{img}", f"vit_{size}_patch{patch}{tag}_*"):
            found = sorted(list_models(pattern)) if size else []
            if found:
                return found[0]
        return fallback

    return choose


for _type in CLIP_TYPES:
    register_hf_model_type(_type, "vit_base_patch32_clip_quickgelu_224", _tower_name(_type))
for _type in SIGLIP_TYPES:
    register_hf_model_type(_type, "vit_base_patch16_siglip_224", _tower_name(_type))


def hf_tower_overrides(config: dict[str, Any], *, projection: int = 0) -> dict[str, Any]:
    """Architecture fields of a CLIP / SigLIP vision config (``projection``: the width of CLIP's visual_projection,
    the head; 0 where the folder has none)."""
    kind = config.get("model_type")
    cfg = tower_config(config)
    act = cfg["hidden_act"]
    if act not in HF_GELU:
        raise ValueError(f"HF {kind} config: hidden_act={act!r}; vitlab's ViT has "
                         f"{' / '.join(map(repr, HF_GELU))}")
    over = hf_vit_overrides({**cfg, "hidden_act": "gelu"})
    hidden, inner = over["embed_dim"], int(cfg["intermediate_size"])
    if int(hidden * over["mlp_ratio"]) != inner:  # a ratio that rounds below the width (int() in the MLP)
        over["mlp_ratio"] = (inner + 0.5) / hidden
    over.update(gelu=HF_GELU[act], representation_size=None, init_values=None, reg_tokens=0,
                no_embed_class=False, pos_embed="learn", hybrid_layers=None)
    if kind in CLIP_TYPES:
        over.update(pre_norm=True, class_token=True, global_pool="token", fc_norm=None, num_classes=projection)
    else:  # without its attention pooling head (vision_use_head=False, PaliGemma's): timm's "_gap" layout
        pool = dict(global_pool="map") if cfg["vision_use_head"] else dict(global_pool="avg")
        over.update(pre_norm=False, class_token=False, fc_norm=False, num_classes=0, **pool)
    return over


def convert_hf_tower(sd: dict[str, Tensor], config: dict[str, Any]) -> Converted:
    """A CLIP / SigLIP vision folder (either spelling: transformers 4's ``vision_model.`` keys, or transformers 5's
    CLIPVisionModel / SiglipVisionModel without it) -> vitlab's ViT."""
    kind = config.get("model_type")
    heads = sorted(k for k in sd if k.startswith("classifier."))
    if heads:
        raise ValueError(f"HF {kind} classifier ({heads[0]}): CLIPForImageClassification / "
                         f"SiglipForImageClassification average the patch tokens into a classifier that vitlab does "
                         f"not read; load the vision tower (the 'vision_model.' weights) as its own folder instead")
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in sd) else ""
    out: dict[str, Tensor] = SourceStateDict(pos_antialias=False)  # interpolate_pos_encoding's rule
    qkv: dict[int, dict[str, Tensor]] = {}
    pool: dict[str, Tensor] = {}
    for key, v in sd.items():
        if key.startswith(("text_model.", "text_projection.")) or key in ("logit_scale", "logit_bias"):
            continue  # the text tower of a full CLIPModel / SiglipModel
        if key == "visual_projection.weight":
            out["head.weight"] = v  # (P, D), no bias in CLIP
            out["head.bias"] = v.new_zeros(v.shape[0])
            continue
        if not key.startswith(prefix):
            raise ValueError(f"HF {kind} checkpoint: unexpected key {key}")
        k = key[len(prefix):]
        name, _, param = k.rpartition(".")
        if k == "embeddings.class_embedding":
            out["cls_token"] = v.reshape(1, 1, -1)  # (D,) -> (1, 1, D)
        elif k == "embeddings.position_embedding.weight":
            out["pos_embed"] = v.unsqueeze(0)  # (N, D) -> (1, N, D)
        elif k == "embeddings.position_ids":
            continue  # a buffer older files saved
        elif name == "embeddings.patch_embedding":
            out[f"patch_embed.proj.{param}"] = v
        elif name == "pre_layrnorm":  # transformers' spelling
            out[f"norm_pre.{param}"] = v
        elif name == "post_layernorm":
            out[f"norm.{param}"] = v
        elif k == "head.probe":
            out["attn_pool.latent"] = v  # (1, 1, D)
        elif name == "head.attention":  # nn.MultiheadAttention: in_proj (3D, D) = [q; k; v]
            pool[param] = v
        elif name in _TOWER_HEAD:
            out[f"{_TOWER_HEAD[name]}.{param}"] = v
        elif (m := re.match(r"^encoder\.layers\.(\d+)\.(.+)$", name)) and m.group(2) in _TOWER_QKV:
            qkv.setdefault(int(m.group(1)), {})[f"{_TOWER_QKV[m.group(2)]}.{param}"] = v
        elif m and m.group(2) in _TOWER_LAYER:
            out[f"blocks.{m.group(1)}.{_TOWER_LAYER[m.group(2)]}.{param}"] = v
        else:
            raise ValueError(f"HF {kind} checkpoint: unexpected key {key}")
    _fuse_qkv(out, qkv)
    for param in ("weight", "bias"):
        if f"in_proj_{param}" in pool:
            w = pool[f"in_proj_{param}"]
            d = w.shape[0] // 3
            out[f"attn_pool.q.{param}"], out[f"attn_pool.kv.{param}"] = w[:d], w[d:]  # (D, ...), (2D, ...)
    projection = int(out["head.weight"].shape[0]) if "head.weight" in out else 0
    return Converted(out, hf_tower_overrides(config, projection=projection))
