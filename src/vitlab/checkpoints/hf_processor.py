"""A Hugging Face folder's ``preprocessor_config.json``: how its model's images are prepared, in vitlab's terms.

transformers' image processors resize (to a ``{"height", "width"}`` size, aspect not kept, or to a
``{"shortest_edge"}``), optionally centre-crop (``crop_size``), rescale, normalise and, for MobileViT, flip RGB to
BGR. :func:`processor_style` turns that into the :class:`~vitlab.models.base.Preprocessing` fields that
:func:`~vitlab.models.base.set_preprocessing_style` sets on the loaded model, so that ``vitlab predict`` on a
Hugging Face folder prepares images as ``pipeline("image-classification")`` does. The output size stays the
model's (its config's ``image_size``). What vitlab cannot reproduce is returned as notes, which the loader logs
as warnings; it never changes the numbers silently.
"""

from __future__ import annotations

from typing import Any

# processors whose plain-integer ``size`` is the shortest edge (transformers' ``default_to_square=False``)
_SHORTEST_EDGE_TYPES = ("MobileViT", "ConvNext", "Bit", "CLIP", "LevitImage", "PoolFormer", "EfficientFormer")
# processors that flip RGB to BGR unless ``do_flip_channel_order`` says otherwise
_BGR_TYPES = ("MobileViT",)
# PIL resampling codes (transformers writes them as integers) and names
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic", "nearest": "nearest", "bilinear": "bilinear",
             "bicubic": "bicubic"}
_RESAMPLE_NEAR = {1: ("lanczos", "bicubic"), 4: ("box", "bilinear"), 5: ("hamming", "bilinear"),
                  "lanczos": ("lanczos", "bicubic"), "box": ("box", "bilinear"), "hamming": ("hamming", "bilinear")}
_CONVNEXT_CROP_BELOW = 384  # ConvNext's processor crops (crop_pct) below this shortest edge, warps at or above it
_STANDARD_RESCALE = 1 / 255


def processor_type(config: dict[str, Any]) -> str:
    return str(config.get("image_processor_type") or config.get("feature_extractor_type") or "")


def processor_style(config: dict[str, Any], input_hw: tuple[int, int]) -> tuple[dict[str, Any], list[str]]:
    """The Preprocessing fields (mean, std, crop_pct, interpolation, crop_mode, crop_offset, channel_order) that
    ``config`` (a preprocessor_config.json) asks for, for a model whose input is ``input_hw``, and notes on
    what vitlab does otherwise."""
    kind = processor_type(config)
    style: dict[str, Any] = {}
    notes: list[str] = []
    resample = config.get("resample")
    if resample is not None:
        if resample in _RESAMPLE:
            style["interpolation"] = _RESAMPLE[resample]
        elif resample in _RESAMPLE_NEAR:
            name, used = _RESAMPLE_NEAR[resample]
            style["interpolation"] = used
            notes.append(f"resample {name}: vitlab resizes with {used}")
        else:
            notes.append(f"resample {resample!r} is not a PIL resampling filter vitlab knows; resizing with the "
                         f"model's default")
    if config.get("do_resize", True) is False:
        notes.append("do_resize is false: vitlab resizes images to the model's input size")
    else:
        style.update(_geometry(config, kind, input_hw, notes))
    style.update(normalisation(config))
    flip = config.get("do_flip_channel_order")
    if flip is None and any(kind.startswith(t) for t in _BGR_TYPES):
        flip = True
    if flip is not None:
        style["channel_order"] = "BGR" if flip else "RGB"
    return style, notes


def _geometry(config: dict[str, Any], kind: str, input_hw: tuple[int, int],
              notes: list[str]) -> dict[str, Any]:
    """crop_mode and crop_pct from the resize size, the optional centre crop and the model's input size; a
    processor that crops places its crop at ``margin // 2`` (``crop_offset`` "floor")."""
    size = config.get("size")
    if size is None:
        return {}
    shortest_default = any(kind.startswith(t) for t in _SHORTEST_EDGE_TYPES)
    if isinstance(size, (int, float)):
        size = {"shortest_edge": int(size)} if shortest_default else {"height": int(size), "width": int(size)}
    if not isinstance(size, dict):
        notes.append(f"size {size!r} is not a size vitlab reads; using the model's default resize")
        return {}
    crop = _crop_size(config)
    h, w = input_hw
    if "height" in size and "width" in size:
        rh, rw = int(size["height"]), int(size["width"])
        ch, cw = crop or (rh, rw)
        if ch * rw != cw * rh:
            notes.append(f"resize to {rh}x{rw} and crop to {ch}x{cw} keep different fractions of the two sides; "
                         f"vitlab crops {ch / rh:.4g} of both")
        out = {"crop_mode": "squash", "crop_pct": ch / rh}
        if crop is not None:
            out["crop_offset"] = "floor"
    elif "shortest_edge" in size:
        short = int(size["shortest_edge"])
        if "longest_edge" in size:
            notes.append(f"longest_edge {size['longest_edge']} is not applied (vitlab's input is {h}x{w})")
        crop_pct = config.get("crop_pct")
        if kind.startswith("ConvNext") and crop_pct is not None:
            if short < _CONVNEXT_CROP_BELOW:  # shorter side to shortest_edge / crop_pct, then a shortest_edge crop
                out, crop = {"crop_mode": "center", "crop_pct": float(crop_pct), "crop_offset": "floor"}, (short, short)
            else:  # warped to shortest_edge x shortest_edge, no crop
                out, crop = {"crop_mode": "squash", "crop_pct": 1.0}, (short, short)
        elif crop is None:
            notes.append(f"the processor keeps the aspect ratio (shortest edge {short}, no crop); vitlab's input is "
                         f"{h}x{w}, centre-cropped")
            out, crop = {"crop_mode": "center", "crop_pct": min(h, w) / short}, (min(h, w), min(h, w))
        else:
            out = {"crop_mode": "center", "crop_pct": min(crop) / short, "crop_offset": "floor"}
        ch, cw = crop
    else:
        notes.append(f"size {size!r} is not a size vitlab reads; using the model's default resize")
        return {}
    if (ch, cw) != (h, w):
        notes.append(f"the processor's output is {ch}x{cw}, the model's input {h}x{w}: vitlab keeps the model's "
                     f"size with the processor's crop fraction")
    return out


def _crop_size(config: dict[str, Any]) -> tuple[int, int] | None:
    if not config.get("do_center_crop"):
        return None
    crop = config.get("crop_size")
    if isinstance(crop, (int, float)):
        return int(crop), int(crop)
    if isinstance(crop, dict) and "height" in crop and "width" in crop:
        return int(crop["height"]), int(crop["width"])
    return None


def normalisation(config: dict[str, Any]) -> dict[str, Any]:
    """mean and std on vitlab's [0, 1] pixels that give the processor's ``(pixel * rescale_factor - mean) / std``
    (a processor without rescaling, or with another factor, is the same map with scaled mean and std)."""
    mean, std = config.get("image_mean"), config.get("image_std")
    if "do_normalize" in config:  # written as null by processors that do not normalise by default (MobileViT)
        normalize = bool(config["do_normalize"])
    else:
        normalize = not any(processor_type(config).startswith(t) for t in _BGR_TYPES)
    if not normalize:
        mean, std = [0.0], [1.0]
    elif mean is None or std is None:
        return {}  # the family's own statistics stand (the file does not say)
    mean = [float(v) for v in (mean if isinstance(mean, (list, tuple)) else [mean])]
    std = [float(v) for v in (std if isinstance(std, (list, tuple)) else [std])]
    if config.get("do_rescale", True) is False:
        factor = 1.0
    else:
        factor = float(config.get("rescale_factor", _STANDARD_RESCALE))
    if abs(factor * 255 - 1) > 1e-6:
        scale = 1 / (255 * factor)  # (p * factor - m) / s == (p / 255 - m * scale) / (s * scale)
        mean, std = [m * scale for m in mean], [s * scale for s in std]
    return {"mean": tuple(mean), "std": tuple(std)}
