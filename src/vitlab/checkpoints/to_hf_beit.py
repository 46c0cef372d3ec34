"""BEiT -> transformers' ``BeitForImageClassification`` folders (data2vec-vision, BEiT's layout, is written as
``beit``).

transformers' BEiT has what vitlab's BEiT v1 / v2 build: an absolute position table or none
(``use_absolute_position_embeddings``), a relative position table per layer (``use_relative_position_bias``) and /
or one shared by all layers (``use_shared_relative_position_bias``), each with BEiT's three class-token entries;
q and v biases and none on k; LayerScale (``lambda_1`` / ``lambda_2``, present when ``layer_scale_init_value`` is
positive); and either the mean of the patch tokens normalised after pooling (``use_mean_pooling``: vitlab's
``global_pool="avg"`` with ``fc_norm`` and no final norm) or the class token after a final norm
(``global_pool="token"``, no ``fc_norm``).

Refused, naming it: BEiT-3's sub-LN and its fused q / k / v bias (``qkv_bias_layout="qkv"``), other combinations
of pooling and norms, and position tables on a rectangular patch grid (transformers reads a relative table's axes
swapped there and resamples the absolute table as a square one). A model without projection biases is written
with zero q and v biases (transformers' query and value projections always have one).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vitlab.checkpoints.to_hf import (
    BLOCK_NAMES,
    HfFamily,
    rename_block_part,
    resampled_positions_note,
    split_qkv,
    tensors,
)

# a positive layer_scale_init_value makes transformers build LayerScale; the weights then set it
_SOME_LAYER_SCALE = 1e-5


def _grid(cfg: Any) -> tuple[int, int]:
    h, w = cfg.img_size if isinstance(cfg.img_size, tuple) else (cfg.img_size, cfg.img_size)
    return h // cfg.patch_size, w // cfg.patch_size


def _check(model: nn.Module, name: str) -> None:
    cfg = model.cfg
    if cfg.sub_ln:
        raise ValueError(f"{name} has sub_ln=True (BEiT-3's LayerNorms inside attention and MLP): transformers' BEiT "
                         f"has none; export it with --format timm or onnx")
    if cfg.qkv_bias and cfg.qkv_bias_layout != "qv":
        raise ValueError(f"{name} has qkv_bias_layout={cfg.qkv_bias_layout!r} (a bias on the keys too): "
                         f"transformers' BEiT has q and v biases only")
    pooling = (cfg.global_pool, cfg.uses_fc_norm, cfg.uses_final_norm)
    if pooling not in (("avg", True, False), ("token", False, True)):
        raise ValueError(f"{name} has global_pool={cfg.global_pool!r}, fc_norm={cfg.uses_fc_norm}, "
                         f"final_norm={cfg.uses_final_norm}: transformers' BEiT either averages the patch tokens and "
                         f"normalises after pooling (use_mean_pooling: 'avg', fc_norm, no final norm) or reads the "
                         f"class token after a final norm ('token', final norm, no fc_norm)")
    tables = cfg.use_abs_pos_emb or cfg.use_rel_pos_bias or cfg.use_shared_rel_pos_bias
    h, w = _grid(cfg)
    if tables and h != w:
        raise ValueError(f"{name}: its {h}x{w} patch grid is not square; transformers' BEiT reads relative position "
                         f"tables of such a grid with their axes swapped and resamples the absolute table as a "
                         f"square one, which gives other outputs")
    if int(cfg.mlp_ratio * cfg.embed_dim) != cfg.mlp_ratio * cfg.embed_dim:
        raise ValueError(f"{name}: mlp_ratio {cfg.mlp_ratio} x embed_dim {cfg.embed_dim} is not a whole MLP width "
                         f"(transformers' intermediate_size)")


def _config(model: nn.Module) -> dict[str, Any]:
    cfg = model.cfg
    size = cfg.img_size
    # LayerScale: None builds none (0 in transformers); any other value builds it, and the weights set it
    scale = 0.0 if cfg.init_values is None else (cfg.init_values if cfg.init_values > 0 else _SOME_LAYER_SCALE)
    return {
        "architectures": ["BeitForImageClassification"], "model_type": "beit",
        "hidden_size": cfg.embed_dim, "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.num_heads,
        "intermediate_size": int(cfg.mlp_ratio * cfg.embed_dim), "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0, "drop_path_rate": 0.0, "initializer_range": 0.02,
        "layer_norm_eps": cfg.norm_eps, "image_size": list(size) if isinstance(size, tuple) else size,
        "patch_size": cfg.patch_size, "num_channels": cfg.in_chans, "use_mask_token": False,
        "use_absolute_position_embeddings": cfg.use_abs_pos_emb, "use_relative_position_bias": cfg.use_rel_pos_bias,
        "use_shared_relative_position_bias": cfg.use_shared_rel_pos_bias, "layer_scale_init_value": scale,
        "use_mean_pooling": cfg.global_pool == "avg",
    }


_TOP = {"cls_token": "beit.embeddings.cls_token", "pos_embed": "beit.embeddings.position_embeddings",
        "patch_embed.proj.weight": "beit.embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": "beit.embeddings.patch_embeddings.projection.bias",
        "rel_pos_bias.relative_position_bias_table":
            "beit.encoder.relative_position_bias.relative_position_bias_table",
        "norm.weight": "beit.layernorm.weight", "norm.bias": "beit.layernorm.bias",
        "fc_norm.weight": "beit.pooler.layernorm.weight", "fc_norm.bias": "beit.pooler.layernorm.bias",
        "head.weight": "classifier.weight", "head.bias": "classifier.bias"}
_BLOCK_PARTS = {**BLOCK_NAMES, "attn.proj.": "attention.output.dense.", "ls1.gamma": "lambda_1",
                "ls2.gamma": "lambda_2", "attn.q_bias": "attention.attention.query.bias",
                "attn.v_bias": "attention.attention.value.bias",
                "attn.relative_position_bias_table":
                    "attention.attention.relative_position_bias.relative_position_bias_table"}


def _state_dict(model: nn.Module) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for k, v in tensors(model).items():
        if k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            base = f"beit.encoder.layer.{i}."
            if rest.startswith("attn.qkv."):
                split_qkv(out, base + "attention.attention.", v, rest.rsplit(".", 1)[1])
            else:
                out[base + rename_block_part(rest, _BLOCK_PARTS, model.model_name)] = v
        elif k in _TOP:
            out[_TOP[k]] = v
        else:
            raise ValueError(f"{model.model_name}: no transformers name for {k!r}")
    if not model.cfg.qkv_bias:  # transformers' query and value projections always have a bias
        for i in range(model.cfg.depth):
            base = f"beit.encoder.layer.{i}.attention.attention."
            for part in ("query", "value"):
                out[f"{base}{part}.bias"] = torch.zeros(model.cfg.embed_dim, dtype=out[f"{base}query.weight"].dtype)
    return out


def _notes(model: nn.Module) -> list[str]:
    cfg = model.cfg
    if not (cfg.dynamic_img_size and cfg.use_abs_pos_emb):
        return []
    return [resampled_positions_note(cfg.pos_antialias, always=True)]


BEIT = HfFamily(_check, _config, _state_dict, notes=_notes)

__all__ = ["BEIT"]
