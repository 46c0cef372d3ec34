"""MAE checkpoints (He et al. 2021): the official repository's layout and Hugging Face ``ViTMAEForPreTraining``.

* Official (facebookresearch/mae ``models_mae.py``): ``{"model": ...}`` with timm-style encoder keys
  (``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.N.attn.qkv``, ``norm``) and, in the
  full pre-training checkpoints (``mae_visualize_*.pth``), the decoder: ``decoder_embed``,
  ``mask_token``, ``decoder_pos_embed``, ``decoder_blocks.N.*``, ``decoder_norm``, ``decoder_pred``.
  ``mae_pretrain_vit_*.pth`` hold the encoder alone (read as timm weights).
* Hugging Face: ``vit.*`` (the encoder, as for ViT) and ``decoder.*``; the decoder's blocks are
  ``decoder.decoder_layers.N`` (older files, and transformers 5's in-memory names with q/k/v/o_proj)
  or ``decoder.decoder_encoder.layer.N`` (files written by transformers 5), attention as separate
  query / key / value projections.

As a ``vit`` checkpoint (``create_model(..., pretrained=...)``, ``load_model``) an MAE file gives the
encoder; :func:`read_mae_decoder` gives the decoder for :func:`vitlab.ssl.mae.load_mae`. The fixed
decoder position table is not loaded but checked against the 2-D sin-cos table vitlab computes.

The loss options of a file: a Hugging Face config records ``mask_ratio`` and ``norm_pix_loss``; an official
training checkpoint (``main_pretrain.py``'s ``checkpoint-N.pth``) records them in its ``args``; the
``mae_visualize_*.pth`` releases record nothing and were trained with pixels as targets
(``norm_pix_loss=False``, ``models_mae.py``'s default; "an MAE model trained with pixels as targets for
visualization" in the official demo notebook, ``demo/mae_visualize.ipynb``), at mask ratio 0.75.

This module also holds the ``vit`` family's format detector: it tells the official MAE and DINO
layouts (:mod:`vitlab.checkpoints.convert_dino`) from plain timm state dicts. DeiT reads ViT's files, these too:
the encoder, without a distillation token (the file decides, as for any ViT file: ``distilled=False``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vitlab.checkpoints.convert_timm import convert_timm_vit
from vitlab.checkpoints.converters import (
    Converted,
    register_converter,
    register_format_detector,
    register_hf_model_type,
)
from vitlab.checkpoints.io import CheckpointError

MAE_DECODER_PREFIXES = ("decoder_embed.", "decoder_blocks.", "decoder_norm.", "decoder_pred.")
MAE_DECODER_KEYS = ("mask_token", "decoder_pos_embed")


def is_official_mae(sd: dict[str, Any]) -> bool:
    return "decoder_embed.weight" in sd and "blocks.0.attn.qkv.weight" in sd


def official_mae_encoder(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in sd.items() if not k.startswith(MAE_DECODER_PREFIXES) and k not in MAE_DECODER_KEYS}


@register_format_detector("deit")
@register_format_detector("vit")
def detect_vit_format(sd: dict[str, Any]) -> str | None:
    from vitlab.checkpoints.convert_dino import is_official_dino

    if is_official_mae(sd) or is_official_dino(sd):
        return "official"
    return None


def official_encoder(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """The encoder of an official MAE or DINO checkpoint in timm names (the decoder / projection head left out)."""
    from vitlab.checkpoints.convert_dino import dino_backbone, is_official_dino

    if is_official_mae(sd):
        return official_mae_encoder(sd)
    if is_official_dino(sd):
        return dino_backbone(sd)
    raise ValueError("not an official MAE or DINO checkpoint (no decoder_embed.* / backbone.* keys)")


@register_converter("vit", "official")
def convert_official_vit(sd: dict[str, Tensor], meta: dict[str, Any]) -> Converted:
    """The encoder of an official MAE or DINO checkpoint."""
    return convert_timm_vit(official_encoder(sd), meta)


@register_converter("deit", "official")
def convert_official_deit(sd: dict[str, Tensor], meta: dict[str, Any]) -> Converted:
    """The encoder of an official MAE or DINO checkpoint for a DeiT model (no distillation token)."""
    from vitlab.checkpoints.convert_deit import convert_timm_deit

    return convert_timm_deit(official_encoder(sd), meta)


register_hf_model_type("vit_mae", "vit_base_patch16_224")

_HF_BLOCK = re.compile(r"^decoder\.(?:decoder_layers|decoder_encoder\.layer)\.(\d+)\.(.+)$")
_HF_BLOCK_MAP = {
    "layernorm_before": "norm1", "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}
_HF_QKV = {"attention.attention.query": "q", "attention.attention.key": "k", "attention.attention.value": "v",
           "attention.q_proj": "q", "attention.k_proj": "k", "attention.v_proj": "v"}


@dataclass
class MAEDecoderWeights:
    state_dict: dict[str, Tensor]  # in :class:`vitlab.ssl.mae.MAEDecoder`'s names
    dim: int
    depth: int
    mlp_ratio: float
    pos_embed: Tensor | None  # the file's fixed table, checked against vitlab's
    num_heads: int | None = None  # official files do not record it
    options: dict[str, Any] | None = None  # mask_ratio, norm_pix_loss (and norm_eps from a HF config)
    qkv_bias: bool = True  # biases on the blocks' query/key/value (HF's qkv_bias=False has none)


def _decoder_from_official(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for k, v in sd.items():
        if k == "mask_token":
            out["mask_token"] = v
        elif k.startswith("decoder_embed."):
            out["embed." + k.split(".", 1)[1]] = v
        elif k.startswith("decoder_blocks."):
            out["blocks." + k[len("decoder_blocks."):]] = v
        elif k.startswith("decoder_norm."):
            out["norm." + k.split(".", 1)[1]] = v
        elif k.startswith("decoder_pred."):
            out["pred." + k.split(".", 1)[1]] = v
    return out


def _decoder_from_hf(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, Tensor]] = {}
    for k, v in sd.items():
        if not k.startswith("decoder."):
            continue
        if k == "decoder.mask_token":
            out["mask_token"] = v
        elif k.startswith(("decoder.decoder_embed.", "decoder.decoder_norm.", "decoder.decoder_pred.")):
            part, param = k[len("decoder.decoder_"):].split(".")
            out[f"{part}.{param}"] = v
        elif m := _HF_BLOCK.match(k):
            i, rest = int(m.group(1)), m.group(2)
            name, param = rest.rsplit(".", 1)
            if name in _HF_QKV:
                qkv.setdefault((i, param), {})[_HF_QKV[name]] = v
            elif name in _HF_BLOCK_MAP:
                out[f"blocks.{i}.{_HF_BLOCK_MAP[name]}.{param}"] = v
            else:
                raise ValueError(f"HF MAE checkpoint: unexpected decoder key {k}")
        elif k != "decoder.decoder_pos_embed":
            raise ValueError(f"HF MAE checkpoint: unexpected decoder key {k}")
    for (i, param), parts in qkv.items():
        out[f"blocks.{i}.attn.qkv.{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def read_mae_decoder(path: str | Path) -> MAEDecoderWeights:
    """The decoder of an official MAE pre-training checkpoint or a Hugging Face ViTMAEForPreTraining folder."""
    from vitlab.checkpoints.io import read_json, read_pickle, read_safetensors, unwrap_state_dict

    path = Path(path)
    config: dict[str, Any] = {}
    train_args: Any = None  # an official training checkpoint's argparse arguments
    if path.is_dir():
        weights = next((path / f for f in ("model.safetensors", "pytorch_model.bin") if (path / f).exists()), None)
        if weights is None:
            raise CheckpointError(f"{path}: no model.safetensors / pytorch_model.bin")
        config = read_json(path / "config.json") if (path / "config.json").exists() else {}
        sd = read_safetensors(weights)[0] if weights.suffix == ".safetensors" else unwrap_state_dict(
            read_pickle(weights), weights)
    elif path.suffix == ".safetensors":
        sd = read_safetensors(path)[0]
    else:
        obj = read_pickle(path)
        train_args = obj.get("args") if isinstance(obj, dict) else None
        sd = unwrap_state_dict(obj, path)
    official_options: dict[str, Any] = {}
    if is_official_mae(sd):
        dec, pos = _decoder_from_official(sd), sd.get("decoder_pos_embed")
        official_options = official_mae_options(train_args)
    elif "decoder.decoder_embed.weight" in sd:
        dec, pos = _decoder_from_hf(sd), sd.get("decoder.decoder_pos_embed")
    else:
        raise CheckpointError(f"{path}: holds no MAE decoder (an encoder-only release such as "
                              f"mae_pretrain_vit_*.pth: load it with create_model(..., pretrained=...))")
    dim = int(dec["embed.weight"].shape[0])
    depth = len({k.split(".")[1] for k in dec if k.startswith("blocks.")})
    mlp_ratio = float(dec["blocks.0.mlp.fc1.weight"].shape[0]) / dim if depth else 4.0
    heads = config.get("decoder_num_attention_heads")
    options = official_options
    if config:
        options = {"mask_ratio": float(config.get("mask_ratio", 0.75)),
                   "norm_pix_loss": bool(config.get("norm_pix_loss", False)),
                   "norm_eps": float(config.get("layer_norm_eps", 1e-12))}
    qkv_bias = "blocks.0.attn.qkv.bias" in dec if depth else True
    return MAEDecoderWeights(dec, dim, depth, mlp_ratio, pos, int(heads) if heads else None, options, qkv_bias)


def official_mae_options(train_args: Any = None) -> dict[str, Any]:
    """MAE's loss options for an official file: those its training arguments record (``--mask_ratio``,
    ``--norm_pix_loss`` of ``main_pretrain.py``), else the defaults of ``models_mae.py`` and of the
    ``mae_visualize_*`` releases: pixels as targets (``norm_pix_loss=False``), mask ratio 0.75."""
    options: dict[str, Any] = {"mask_ratio": 0.75, "norm_pix_loss": False}
    values = vars(train_args) if hasattr(train_args, "__dict__") else train_args if isinstance(train_args, dict) else {}
    if isinstance(values.get("norm_pix_loss"), bool):
        options["norm_pix_loss"] = values["norm_pix_loss"]
    if isinstance(values.get("mask_ratio"), (int, float)) and not isinstance(values.get("mask_ratio"), bool):
        options["mask_ratio"] = float(values["mask_ratio"])
    return options
