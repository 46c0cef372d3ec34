"""Swin v1 / v2 -> transformers' ``SwinForImageClassification`` / ``Swinv2ForImageClassification`` folders.

transformers' Swin places each stage's patch merging at the end of the stage before (vitlab, as timm, at the start
of the stage after), splits q / k / v, and v2's keys have no bias (vitlab's ``q_bias`` / ``v_bias`` become the
query and value biases). v2's continuous position bias (the MLP on log-spaced offsets, scaled by
``pretrained_window_sizes``), its clamped logit scales and post-norm blocks are the same computation in both.

Refused, naming it: a window per stage (transformers has one ``window_size``), patch-embedding / patch-merging norms
with an epsilon other than nn.LayerNorm's 1e-5 (transformers builds those without ``layer_norm_eps``), maps that a
window does not divide padded after the cyclic shift (timm's order; transformers pads before it), a rectangular
input on which transformers picks another window, and for v1 maps smaller than the window (vitlab shrinks the
bias table there; transformers builds it for the full window), for v2 a pre-training window of 1 (transformers
divides by ``window - 1``).

Noted: transformers' Swin v2 adds the shifted-window mask twice (-200 where vitlab, timm and the official code add
-100). A masked key's weight is then e^-100 smaller there; it matters only where a head's logit scale lets cosine
scores span about 80 (a scale above ~30), which the note reports from the weights.
"""

from __future__ import annotations

import math
import re
from typing import Any

from torch import Tensor, nn

from vitlab.checkpoints.to_hf import BLOCK_NAMES, HfFamily, rename_block_part, split_qkv, tensors

_HF_EMBED_EPS = 1e-5  # transformers' Swin patch-embedding and patch-merging norms: nn.LayerNorm's default
# exp(logit scale) above which transformers' doubled shift mask (-200 against -100) can move outputs by more than
# float32 rounding: a masked score exceeds the query's own by at most 2 * scale + 16 (cosines in [-1, 1], v2's
# bias in (0, 16)); with up to 64 keys per window, 64 * e^(2 * scale + 16 - 100) stays below 1e-6 for scale <= 30
_MASK_SCALE = 30.0


def _windows(cfg: Any) -> tuple[int, ...]:
    return cfg.window_size if isinstance(cfg.window_size, tuple) else (cfg.window_size,)


def _check_common(model: nn.Module, name: str) -> None:
    """What transformers' Swin v1 and v2 share."""
    cfg = model.cfg
    windows = _windows(cfg)
    if len(set(windows)) != 1:
        raise ValueError(f"{name} has window_size={cfg.window_size!r}: transformers' Swin has one window for every "
                         f"stage")
    embed_eps = cfg.embed_norm_eps if cfg.embed_norm_eps is not None else cfg.norm_eps
    if embed_eps != _HF_EMBED_EPS:
        raise ValueError(f"{name}: its patch-embedding and patch-merging norms have eps {embed_eps}; transformers' "
                         f"Swin keeps {_HF_EMBED_EPS} there (build it with embed_norm_eps={_HF_EMBED_EPS})")
    if not cfg.pad_before_shift and _padded_stages(model):
        raise ValueError(f"{name}: at its input size stage(s) {_padded_stages(model)} pad their map to a multiple of "
                         f"the window, after the cyclic shift (timm's order, pad_before_shift=False); transformers "
                         f"pads before it, which gives other outputs there")
    from vitlab.checkpoints.convert_swin import _check_hf_window_clamp

    size = cfg.img_size if isinstance(cfg.img_size, tuple) else (cfg.img_size, cfg.img_size)
    try:
        _check_hf_window_clamp({"image_size": list(size), "patch_size": cfg.patch_size, "window_size": windows[0],
                                "depths": list(cfg.depths)}, "swin" if cfg.version == 1 else "swinv2")
    except ValueError as e:  # the reading side's check, in its words: transformers decides the window otherwise
        raise ValueError(f"{name}: transformers' Swin would compute this input size otherwise, so there is no "
                         f"transformers layout to export it to ({e})") from None


def _check_swin(model: nn.Module, name: str) -> None:
    """v1 and v2 (by the config's ``version``, whatever the registered name) share the checks of :func:`_check_common`."""
    cfg = model.cfg
    if cfg.version == 1 and (small := _stages(model, lambda side, window: side < window)):
        raise ValueError(f"{name}: at its input size stage(s) {small} have maps smaller than the window, which vitlab "
                         f"(as the official Swin and timm) shrinks there with its bias table; transformers builds "
                         f"every stage's table for the full window")
    if cfg.version == 2 and cfg.pretrained_window_sizes and 1 in cfg.pretrained_window_sizes:
        raise ValueError(f"{name} has pretrained_window_sizes={list(cfg.pretrained_window_sizes)}: transformers' Swin "
                         f"v2 scales the position-bias offsets by 1 / (window - 1), which a pre-training window of 1 "
                         f"divides by zero (vitlab takes 1)")
    _check_common(model, name)


def _padded_stages(model: nn.Module) -> list[int]:
    """The stages with a shifted block (two blocks or more) whose map (at the model's input size) is larger than the
    window and not a multiple of it: where padding before or after the shift gives other outputs."""
    return [s for s in _stages(model, lambda side, window: side > window and side % window) if model.cfg.depths[s] > 1]


def _stages(model: nn.Module, test: Any) -> list[int]:
    """The stages where ``test(side, window)`` holds for a side of the map at the model's input size."""
    cfg = model.cfg
    h, w = cfg.img_size if isinstance(cfg.img_size, tuple) else (cfg.img_size, cfg.img_size)
    h, w = -(-h // cfg.patch_size), -(-w // cfg.patch_size)
    window = _windows(cfg)[0]
    out = []
    for stage in range(len(cfg.depths)):
        if stage:
            h, w = (h + 1) // 2, (w + 1) // 2
        if any(test(side, window) for side in (h, w)):
            out.append(stage)
    return out


def _config(model: nn.Module) -> dict[str, Any]:
    cfg = model.cfg
    size = cfg.img_size
    v2 = cfg.version == 2
    config: dict[str, Any] = {
        "architectures": ["Swinv2ForImageClassification" if v2 else "SwinForImageClassification"],
        "model_type": "swinv2" if v2 else "swin",
        "image_size": list(size) if isinstance(size, tuple) else size, "patch_size": cfg.patch_size,
        "num_channels": cfg.in_chans, "embed_dim": cfg.embed_dim, "depths": list(cfg.depths),
        "num_heads": list(cfg.num_heads), "window_size": _windows(cfg)[0]}
    if v2:  # 0: the stage's own window
        config["pretrained_window_sizes"] = list(cfg.pretrained_window_sizes or (0,) * len(cfg.depths))
    return {**config, "mlp_ratio": cfg.mlp_ratio, "qkv_bias": cfg.qkv_bias, "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0, "drop_path_rate": 0.0, "hidden_act": "gelu",
            "use_absolute_embeddings": False, "initializer_range": 0.02, "layer_norm_eps": cfg.norm_eps,
            "encoder_stride": 32}


def _state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Swin v1 / v2 under transformers' names: a stage's patch merging belongs to the stage before it there."""
    v2 = model.cfg.version == 2
    root = "swinv2." if v2 else "swin."
    out: dict[str, Tensor] = {}
    for k, v in tensors(model).items():
        if k.startswith(("patch_embed.proj.", "patch_embed.norm.")):
            part = "patch_embeddings.projection." if k.startswith("patch_embed.proj.") else "norm."
            out[root + "embeddings." + part + k.rsplit(".", 1)[1]] = v
        elif k.startswith("norm."):
            out[root + "layernorm." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("head."):
            out["classifier." + k.rsplit(".", 1)[1]] = v
        elif m := re.match(r"^layers\.(\d+)\.downsample\.(.+)$", k):
            out[f"{root}encoder.layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"] = v
        elif m := re.match(r"^layers\.(\d+)\.blocks\.(\d+)\.(.+)$", k):
            base, rest = f"{root}encoder.layers.{m.group(1)}.blocks.{m.group(2)}.", m.group(3)
            if rest.startswith("attn.qkv."):
                split_qkv(out, base + "attention.self.", v, rest.rsplit(".", 1)[1])
            elif rest in ("attn.q_bias", "attn.v_bias"):  # v2: the key has no bias
                out[base + ("attention.self.query.bias" if rest == "attn.q_bias" else "attention.self.value.bias")] = v
            else:
                out[base + rename_block_part(rest, _BLOCK_PARTS, model.model_name)] = v
        else:
            raise ValueError(f"{model.model_name}: no transformers name for {k!r}")
    return out


_BLOCK_PARTS = {**BLOCK_NAMES, "attn.proj.": "attention.output.dense.",
                "attn.relative_position_bias_table": "attention.self.relative_position_bias_table",
                "attn.logit_scale": "attention.self.logit_scale",
                "attn.cpb_mlp.": "attention.self.continuous_position_bias_mlp."}


def _notes(model: nn.Module) -> list[str]:
    """v2: the doubled shift mask, where the weights' logit scales can make it matter."""
    if model.cfg.version != 2:
        return []
    largest = 0.0
    for stage in model.layers:
        for block in stage.blocks:
            if any(block.shift):
                scale = block.attn.logit_scale.detach().float().clamp(max=math.log(100.0)).exp().max()
                largest = max(largest, float(scale))
    if largest <= _MASK_SCALE:
        return []
    return [f"transformers' Swin v2 adds the shifted-window mask twice (-200 where vitlab, timm and the official code "
            f"add -100); with logit scales up to {largest:.1f} (above {_MASK_SCALE:g}) a masked key can keep a weight "
            f"that transformers removes, so shifted windows may give other outputs there"]


SWIN = HfFamily(_check_swin, _config, _state_dict, notes=_notes)  # the swin and swinv2 families

__all__ = ["SWIN"]
