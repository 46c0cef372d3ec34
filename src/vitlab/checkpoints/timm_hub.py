"""timm hub folders (written by timm's ``save_for_hf`` / ``push_to_hf_hub``): what config.json adds to the weights.

timm's config.json names the model (``architecture``) and records how it was built (``model_args``: img_size,
num_classes, global_pool, fc_norm, depth, ...), how its inputs are prepared (``pretrained_cfg``: input_size, mean,
std, crop_pct, interpolation, crop_mode) and its classes (``label_names``). ``timm.create_model("local-dir:...")``
builds the architecture with ``model_args`` and preprocesses with ``pretrained_cfg``; :func:`timm_hub_overrides`
turns both into vitlab config fields, so that vitlab builds the same function. Some of these (average pooling
without fc_norm, a depth) cannot be read off the tensors.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

# timm constructor arguments whose vitlab config field has another name, per family
TIMM_ARG_NAMES: dict[str, dict[str, str]] = {
    "beit": {"use_fc_norm": "fc_norm"},
    # timm's BEiT-3 is its VisionTransformer with a norm inside attention and inside the MLP: vitlab's sub-LN
    "beit3": {"scale_attn_norm": "sub_ln", "scale_mlp_norm": "sub_ln"},
    "mixer": {"num_blocks": "depth", "act_layer": "gelu"},
    "vit": {"act_layer": "gelu"},
    "deit": {"act_layer": "gelu"},
    "crossvit": {"img_scale": "branch_scale"},
}
# timm argument values that vitlab spells otherwise
TIMM_ARG_VALUES: dict[tuple[str, Any], Any] = {("pos_embed", ""): "none", ("act_layer", "gelu"): "exact",
                                               ("act_layer", "gelu_tanh"): "tanh",
                                               ("act_layer", "quick_gelu"): "quick",  # CLIP's QuickGELU
                                               ("init_values", 0): None}  # timm: no LayerScale for 0 / None
# timm arguments that only decide the initialisation, which the loaded weights replace
INIT_ONLY_ARGS = frozenset({"weight_init", "fix_init", "head_init_scale"})
# timm options vitlab's models do not have, at the value that turns them off (any other value is an error)
TIMM_OFF_VALUES: dict[str, Any] = {
    "reg_tokens": 0, "no_embed_class": False, "pre_norm": False, "final_norm": True, "qk_norm": False,
    "patch_drop_rate": 0.0, "dynamic_img_pad": False, "proj_bias": True, "swiglu_mlp": False, "scale_mlp": False,
    "scale_attn_norm": False, "scale_mlp_norm": False, "strict_img_size": True, "act_layer": "exact",
}
# what a family without a global_pool option computes (timm's save_for_hf writes global_pool="avg" for them all)
FIXED_POOLING = "avg"
# pretrained_cfg entries that are config fields in vitlab (the rest of the preprocessing is fixed per family)
PREPROCESSING_FIELDS = ("mean", "std", "crop_pct", "interpolation")


def timm_hub_overrides(config: dict[str, Any], family: str, template: Any) -> dict[str, Any]:
    """The config fields of ``template`` (a family's config dataclass) that a timm hub ``config.json`` sets.

    ``pretrained_cfg`` gives the preprocessing (and the input size, unless ``model_args`` has ``img_size``);
    ``model_args`` the architecture, on top. A model argument vitlab has no counterpart for is a ValueError
    naming it: building without it would compute something else than the checkpoint's model.
    """
    fields = {f.name for f in dataclasses.fields(template)}
    hints = typing.get_type_hints(type(template))
    out: dict[str, Any] = {}
    pcfg = config.get("pretrained_cfg") or {}
    for key in PREPROCESSING_FIELDS:
        if key in fields and pcfg.get(key) is not None:
            out[key] = _value(pcfg[key])
    if pcfg.get("input_size"):
        c, h, w = (int(s) for s in pcfg["input_size"])
        if "img_size" in fields:
            out["img_size"] = h if h == w else (h, w)
        if "in_chans" in fields:
            out["in_chans"] = c
    names = TIMM_ARG_NAMES.get(family, {})
    from_args: dict[str, tuple[str, Any]] = {}  # vitlab field -> (timm argument, value)
    model_args = dict(config.get("model_args") or {})
    if family == "crossvit":
        model_args = _crossvit_args(model_args)
    if family in ("swin", "swinv2"):
        model_args = _swin_windows(model_args, len(getattr(template, "depths", ())))
    if family == "resnet" and isinstance(model_args.get("channels"), (list, tuple)):  # timm: a bottleneck's inner
        from vitlab.models.resnet import expansion  # widths; vitlab: a stage's output

        model_args["channels"] = [int(c) * expansion(getattr(template, "block", "basic"))
                                  for c in model_args["channels"]]
    if family == "mixer" and "mlp_ratio" in model_args:  # timm's (token-mixing, channel-mixing) pair, or one for both
        ratio = model_args.pop("mlp_ratio")
        tokens, channels = ratio if isinstance(ratio, (list, tuple)) else (ratio, ratio)
        model_args.update(tokens_mlp_ratio=float(tokens), channels_mlp_ratio=float(channels))
    for arg, raw in model_args.items():
        value = TIMM_ARG_VALUES.get((arg, raw), _value(raw)) if isinstance(raw, (str, int, float)) else _value(raw)
        key = names.get(arg, arg)
        if key not in fields:
            if arg in INIT_ONLY_ARGS or (arg in TIMM_OFF_VALUES and value == TIMM_OFF_VALUES[arg]):
                continue
            if arg == "global_pool" and value == FIXED_POOLING:  # the family has no other pooling (Swin, Mixer, ...)
                continue
            raise ValueError(f"timm model_args {arg}={raw!r} has no counterpart in vitlab's {type(template).__name__} "
                             f"(it accepts: {', '.join(sorted(fields))})")
        if key == "img_size" and isinstance(value, tuple) and len(value) == 2 and value[0] == value[1]:
            value = value[0]
        allowed = _literal_values(hints.get(key))
        if allowed and value not in allowed:
            raise ValueError(f"timm model_args {arg}={raw!r}: vitlab's {type(template).__name__} supports "
                             f"{key} = {' / '.join(map(repr, allowed))}")
        if key in from_args and from_args[key][1] != value:
            raise ValueError(f"timm model_args {from_args[key][0]}={from_args[key][1]!r} and {arg}={raw!r} differ; "
                             f"vitlab has one option for both ({key})")
        from_args[key] = (arg, value)
    out.update({key: value for key, (_, value) in from_args.items()})
    if "drop_remainder" in fields:  # timm builds any size, the floored grid where patches do not fill it
        img, patch = out.get("img_size", template.img_size), out.get("patch_size", template.patch_size)
        if any(int(s) % int(patch) for s in ((img, img) if isinstance(img, int) else img)):
            out["drop_remainder"] = True
    return out


def _swin_windows(args: dict[str, Any], template_stages: int) -> dict[str, Any]:
    """timm's Swin window arguments -> vitlab's square window per stage. timm (``resolve_stage_window_sizes``) reads
    an int or a sequence of exactly two ints as one (h, w) window for every stage, any other sequence as one window
    (an int or (h, w)) per stage; vitlab's tuple is always per stage. A non-square window is a ValueError."""
    stages = len(args["depths"]) if isinstance(args.get("depths"), (list, tuple)) else template_stages
    for arg in ("window_size", "pretrained_window_sizes"):
        raw = args.get(arg)
        if not isinstance(raw, (list, tuple)):
            continue
        per_stage = raw
        if arg == "window_size" and len(raw) == 2 and not isinstance(raw[0], (list, tuple)):
            per_stage = [raw] * stages  # one (h, w) window for all stages
        sides = []
        for w in per_stage:
            h, w2 = (w, w) if not isinstance(w, (list, tuple)) else tuple(w)
            if int(h) != int(w2):
                raise ValueError(f"timm model_args {arg}={raw!r}: a {h}x{w2} window; vitlab's Swin has square "
                                 f"windows only")
            sides.append(int(h))
        args[arg] = sides[0] if arg == "window_size" and len(set(sides)) == 1 else sides
    return args


def _crossvit_args(args: dict[str, Any]) -> dict[str, Any]:
    """timm's CrossVit depth [branch 0, branch 1, blocks after the fusion] per multi-scale block and its three MLP
    ratios (the third for those blocks) -> vitlab's pairs; blocks after the fusion are a ValueError (vitlab's
    CrossViT has none, as no published model does)."""
    from vitlab.models.crossvit import crossvit_depth_pairs

    depth, ratio = args.get("depth"), args.get("mlp_ratio")
    if isinstance(depth, (list, tuple)) and all(isinstance(d, (list, tuple)) and len(d) == 3 for d in depth):
        args["depth"] = [[int(b0), int(b1)] for b0, b1 in crossvit_depth_pairs(depth, what="timm model_args depth")]
    if isinstance(ratio, (list, tuple)) and len(ratio) == 3:  # the third: blocks after the fusion, none here
        args["mlp_ratio"] = list(ratio[:2])
    return args


def timm_hub_class_names(config: dict[str, Any]) -> list[str] | None:
    """``label_names`` of a timm config.json: a list, or a dict from class index to name."""
    names = config.get("label_names") or (config.get("pretrained_cfg") or {}).get("label_names")
    if isinstance(names, (list, tuple)):
        return [str(n) for n in names]
    if isinstance(names, dict):
        try:
            return [str(names[k]) for k in sorted(names, key=int)]
        except (TypeError, ValueError):
            return None
    return None


def timm_hub_style(config: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The preprocessing a timm config.json's ``pretrained_cfg`` asks for beyond vitlab's config fields (the
    interpolation and the crop mode, which the families fix), as :func:`vitlab.models.base.set_preprocessing_style`
    fields, and notes on what vitlab cannot follow (timm's ``crop_mode="border"``)."""
    pcfg = config.get("pretrained_cfg") or {}
    style: dict[str, Any] = {}
    notes = []
    interpolation = pcfg.get("interpolation")
    if interpolation in ("bicubic", "bilinear", "nearest"):
        style["interpolation"] = interpolation
    elif interpolation:
        notes.append(f"pretrained_cfg interpolation {interpolation!r}: vitlab resizes with the model's default")
    crop_mode = pcfg.get("crop_mode")
    if crop_mode in ("center", "squash"):
        style["crop_mode"] = crop_mode
    elif crop_mode:
        notes.append(f"pretrained_cfg crop_mode {crop_mode!r}: vitlab crops the centre")
    return style, notes


def _value(v: Any) -> Any:
    """JSON lists back to the tuples the config dataclasses hold."""
    return tuple(_value(x) for x in v) if isinstance(v, list) else v


def _literal_values(hint: Any) -> tuple[Any, ...]:
    """The allowed values of a ``Literal[...]`` (or ``Literal[...] | None``) field; () for other types."""
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    values = [a for arg in typing.get_args(hint) if typing.get_origin(arg) is Literal for a in typing.get_args(arg)]
    return (*values, None) if values else ()
