"""Swin v1 / v2 checkpoints -> vitlab: timm, Hugging Face and Microsoft's original repository.

* timm: vitlab's names, but the head is ``head.fc`` (vitlab: ``head``).
* official (microsoft/Swin-Transformer ``.pth``, ``{"model": sd}``): patch merging at the END of stage i
  (``layers.i.downsample``; vitlab and timm: at the start of stage i + 1); persistent
  ``relative_position_index`` / ``attn_mask`` / ``relative_coords_table`` buffers, recomputed by vitlab.
* Hugging Face ``Swin(v2)ForImageClassification``: ``swin.`` / ``swinv2.`` prefix, split q / k / v, merging
  at the end of a stage. The hub files spell the attention ``attention.self.{query,key,value}`` /
  ``attention.output.dense`` and the MLP ``intermediate.dense`` / ``output.dense``; transformers 5 renames
  Swin v1 in memory to ``attention.{q,k,v,o}_proj``, ``attention.relative_position_bias.*``, ``mlp.fc1/fc2``.
  Both are read. transformers pads a token map to a multiple of the window before the cyclic shift (timm
  after it), so these files build ``pad_before_shift=True``; a rectangular ``image_size`` on which
  transformers clamps the window differently from vitlab is refused.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from vitlab.checkpoints.convert_timm import head_overrides
from vitlab.checkpoints.converters import (
    Converted,
    register_converter,
    register_format_detector,
    register_hf_model_type,
)

_RECOMPUTED = ("relative_position_index", "attn_mask", "relative_coords_table")
_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.(.+)$")
_BLOCK = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.")


def _is_v2(sd: dict[str, Tensor]) -> bool:
    return any(".cpb_mlp." in k or ".continuous_position_bias_mlp." in k or k.endswith("logit_scale") for k in sd)


def _check_version(sd: dict[str, Tensor], family: str) -> None:
    v2 = _is_v2(sd)
    if family == "swin" and v2:
        raise ValueError("this is a Swin v2 checkpoint (continuous position bias); load it as a swinv2_* model")
    if family == "swinv2" and not v2:
        raise ValueError("this is a Swin v1 checkpoint (no continuous position bias); load it as a swin_* model")
    if not any(_BLOCK.match(k) for k in sd):
        raise ValueError("no 'layers.<i>.blocks.<j>.' keys: not a Swin checkpoint")


def _overrides(sd: dict[str, Tensor]) -> dict[str, Any]:
    """What the tensors fix: width, depths, heads, MLP ratio, classes (window and resolution are resampled
    instead)."""
    over = head_overrides(sd)
    if "patch_embed.proj.weight" in sd:
        w = sd["patch_embed.proj.weight"]
        over.update(embed_dim=int(w.shape[0]), in_chans=int(w.shape[1]), patch_size=int(w.shape[-1]))
    depths: dict[int, int] = {}
    heads: dict[int, int] = {}
    for k, v in sd.items():
        if m := _BLOCK.match(k):
            i, j = int(m.group(1)), int(m.group(2))
            depths[i] = max(depths.get(i, 0), j + 1)
            if k.endswith("relative_position_bias_table"):
                heads[i] = int(v.shape[1])
            elif k.endswith("logit_scale"):
                heads[i] = int(v.shape[0])
    if depths:
        over["depths"] = tuple(depths[i] for i in sorted(depths))
    if heads and len(heads) == len(depths):
        over["num_heads"] = tuple(heads[i] for i in sorted(heads))
    fc1 = sd.get("layers.0.blocks.0.mlp.fc1.weight")
    if fc1 is not None:
        over["mlp_ratio"] = fc1.shape[0] / fc1.shape[1]
    if any(k.endswith("attn.qkv.weight") for k in sd) and not any(
            k.endswith(("attn.qkv.bias", "attn.q_bias")) for k in sd):
        over["qkv_bias"] = False
    return over


def _finish(out: dict[str, Tensor], family: str) -> Converted:
    for k in out:
        if "absolute_pos_embed" in k:
            raise ValueError("checkpoint has an absolute position table (ape=True), which vitlab's Swin does not have")
    _check_version(out, family)
    return Converted(out, _overrides(out))


def _from_timm(sd: dict[str, Tensor], family: str) -> Converted:
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if k.endswith(_RECOMPUTED):
            continue
        if k.startswith("head.fc."):
            k = "head." + k[len("head.fc."):]
        out[k] = v
    return _finish(out, family)


def _from_official(sd: dict[str, Tensor], family: str) -> Converted:
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if k.endswith(_RECOMPUTED):
            continue
        if m := _DOWNSAMPLE.match(k):  # end of stage i -> start of stage i + 1
            k = f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}"
        out[k] = v
    return _finish(out, family)


@register_format_detector("swin")
def detect_swin(sd: dict[str, Any]) -> str | None:
    """Microsoft's layout has a patch merging in stage 0; timm's never does (nor a ``head.fc``)."""
    if any(k.startswith("layers.0.downsample.") for k in sd):
        return "official"
    return None


register_format_detector("swinv2")(detect_swin)


@register_converter("swin", "timm")
def convert_timm_swin(sd: dict[str, Tensor], meta: dict[str, Any]) -> Converted:
    return _from_timm(sd, "swin")


@register_converter("swinv2", "timm")
def convert_timm_swinv2(sd: dict[str, Tensor], meta: dict[str, Any]) -> Converted:
    return _from_timm(sd, "swinv2")


@register_converter("swin", "official")
def convert_official_swin(sd: dict[str, Tensor], meta: dict[str, Any]) -> Converted:
    return _from_official(sd, "swin")


@register_converter("swinv2", "official")
def convert_official_swinv2(sd: dict[str, Tensor], meta: dict[str, Any]) -> Converted:
    return _from_official(sd, "swinv2")


# ------------------------------------------------------------------------------------ Hugging Face
_HF_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")
_HF_BLOCK_MAP = {  # both spellings: hub files and transformers 5 in-memory (Swin v1)
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "attention.self.relative_position_bias_table": "attn.relative_position_bias_table",
    "attention.relative_position_bias.relative_position_bias_table": "attn.relative_position_bias_table",
    "attention.self.logit_scale": "attn.logit_scale",
    "attention.self.continuous_position_bias_mlp": "attn.cpb_mlp",
}
_HF_QKV = {"attention.self.query": "q", "attention.self.key": "k", "attention.self.value": "v",
           "attention.q_proj": "q", "attention.k_proj": "k", "attention.v_proj": "v"}
_HF_IGNORED = ("relative_position_index", "relative_coords_table", "embeddings.mask_token")


def _hf_block(rest: str) -> tuple[str, str] | None:
    """('attention.self.query.weight') -> ('attention.self.query', 'weight'), matched against the maps."""
    for table in (_HF_QKV, _HF_BLOCK_MAP):
        for src in table:
            if rest == src or rest.startswith(src + "."):
                return src, rest[len(src) + 1:]
    return None


def _from_hf(sd: dict[str, Tensor], config: dict[str, Any], family: str) -> Converted:
    prefix = next((p for p in ("swin.", "swinv2.") if any(k.startswith(p) for k in sd)), "")
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[int, int], dict[str, Tensor]] = {}
    for k, v in sd.items():
        if k.startswith("classifier."):
            out["head." + k[len("classifier."):]] = v
            continue
        if not k.startswith(prefix) or k.endswith(_HF_IGNORED):
            continue
        k = k[len(prefix):]
        if k.startswith("embeddings.patch_embeddings.projection."):
            out["patch_embed.proj." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("embeddings.norm."):
            out["patch_embed.norm." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("layernorm."):
            out["norm." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("embeddings.position_embeddings"):
            raise ValueError("HF checkpoint uses absolute position embeddings, which vitlab's Swin does not have")
        elif m := _HF_LAYER.match(k):
            stage, rest = int(m.group(1)), m.group(2)
            if rest.startswith("downsample."):  # end of stage i -> start of stage i + 1
                out[f"layers.{stage + 1}.{rest}"] = v
                continue
            bm = re.match(r"^blocks\.(\d+)\.(.+)$", rest)
            found = _hf_block(bm.group(2)) if bm else None
            if found is None:
                raise ValueError(f"HF checkpoint: unexpected key {prefix}{k}")
            block, (src, param) = int(bm.group(1)), found
            base = f"layers.{stage}.blocks.{block}."
            if src in _HF_QKV:
                qkv.setdefault((stage, block), {})[f"{_HF_QKV[src]}.{param}"] = v
            else:
                out[base + _HF_BLOCK_MAP[src] + (f".{param}" if param else "")] = v
        elif k.startswith("pooler."):
            continue
        else:
            raise ValueError(f"HF checkpoint: unexpected key {prefix}{k}")
    for (stage, block), parts in qkv.items():
        base = f"layers.{stage}.blocks.{block}.attn."
        out[base + "qkv.weight"] = torch.cat([parts["q.weight"], parts["k.weight"], parts["v.weight"]])
        if family == "swinv2":  # separate q and v biases; k has none
            if "q.bias" in parts:
                out[base + "q_bias"], out[base + "v_bias"] = parts["q.bias"], parts["v.bias"]
        elif "q.bias" in parts:
            out[base + "qkv.bias"] = torch.cat([parts["q.bias"], parts["k.bias"], parts["v.bias"]])
    converted = _finish(out, family)
    # transformers pads a map to a multiple of the window before the cyclic shift (timm: after it)
    converted.overrides["pad_before_shift"] = True
    converted.overrides.update(_hf_config_overrides(config, family))
    return converted


_HF_EMBED_NORM_EPS = 1e-5  # nn.LayerNorm's default: transformers' SwinEmbeddings / SwinPatchMerging norms


def _hf_config_overrides(config: dict[str, Any], family: str) -> dict[str, Any]:
    if not config:
        return {}
    if config.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"HF Swin config: hidden_act={config['hidden_act']!r}; vitlab's Swin uses exact 'gelu'")
    if config.get("use_absolute_embeddings"):
        raise ValueError("HF Swin config: use_absolute_embeddings=True is not supported by vitlab's Swin")
    over: dict[str, Any] = {}
    if "image_size" in config:
        img = config["image_size"]
        over["img_size"] = tuple(int(s) for s in img) if isinstance(img, (list, tuple)) else int(img)
    if "window_size" in config:
        over["window_size"] = int(config["window_size"])
    if "mlp_ratio" in config:
        over["mlp_ratio"] = float(config["mlp_ratio"])
    if "layer_norm_eps" in config:
        over["norm_eps"] = float(config["layer_norm_eps"])
        if over["norm_eps"] != _HF_EMBED_NORM_EPS:  # transformers' embedding / merging norms keep nn.LayerNorm's
            over["embed_norm_eps"] = _HF_EMBED_NORM_EPS
    if family == "swinv2":
        pws = config.get("pretrained_window_sizes")
        over["pretrained_window_sizes"] = tuple(int(w) for w in pws) if pws and any(pws) else None
    _check_hf_window_clamp(config, family)
    return over


def _check_hf_window_clamp(config: dict[str, Any], family: str) -> None:
    """Refuse a rectangular input on which transformers clamps the window differently from vitlab.

    A stage whose map is no larger than the window along an axis uses the map there and no shift. vitlab (and
    timm) decide per axis; transformers decides once for both axes: Swin from the shorter side (window =
    min(H, W), no shift), Swin v2 from the height. On square maps, and where the window is smaller than both
    sides, they agree."""
    img, patch = config.get("image_size"), config.get("patch_size", 4)
    window, depths = config.get("window_size"), config.get("depths")
    if not isinstance(img, (list, tuple)) or window is None or not depths:
        return
    patch = tuple(patch) if isinstance(patch, (list, tuple)) else (patch, patch)
    h, w = (-(-int(img[0]) // int(patch[0])), -(-int(img[1]) // int(patch[1])))  # HF pads to whole patches
    window = int(window)
    for stage in range(len(depths)):
        if stage:
            h, w = (h + 1) // 2, (w + 1) // 2
        ours = tuple(s if s <= window else window for s in (h, w))
        our_shift = tuple(0 if s <= win else window // 2 for s, win in zip((h, w), ours))
        if family == "swin":
            hf_win = min(h, w) if min(h, w) <= window else window
            hf_shift = 0 if min(h, w) <= window else window // 2
        else:
            hf_win = min(h, window)
            hf_shift = 0 if h <= hf_win else window // 2
        if ours != (hf_win, hf_win) or (depths[stage] > 1 and our_shift != (hf_shift, hf_shift)):
            raise ValueError(
                f"HF {family} config: image_size={list(img)} with patch_size={config.get('patch_size', 4)} and "
                f"window_size={window} gives stage {stage} a {h}x{w} map, on which transformers uses one "
                f"{hf_win}x{hf_win} window (shift {hf_shift}) for both axes and vitlab a per-axis "
                f"{ours[0]}x{ours[1]} window (shift {our_shift}); vitlab supports HF Swin inputs whose maps are "
                f"square or larger than the window on both sides")


register_hf_model_type("swin", "swin_tiny_patch4_window7_224")
register_hf_model_type("swinv2", "swinv2_tiny_window8_256")


@register_converter("swin", "hf")
def convert_hf_swin(sd: dict[str, Tensor], meta: dict[str, Any]) -> Converted:
    return _from_hf(sd, meta.get("config") or {}, "swin")


@register_converter("swinv2", "hf")
def convert_hf_swinv2(sd: dict[str, Tensor], meta: dict[str, Any]) -> Converted:
    return _from_hf(sd, meta.get("config") or {}, "swinv2")
