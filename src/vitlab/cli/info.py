"""``vitlab info NAME``: parameters, GMACs and default preprocessing of a model, and its published weights with
the preprocessing each was trained with. ``vitlab info NAME.TAG``: the model as those weights build it."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from vitlab.models.factory import model_info


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="parameters, GMACs and preprocessing of a model",
                       description="Show a registered model's size, compute and default preprocessing, and its "
                                   "published weights with the preprocessing each was trained with; (default) marks those "
                                   "pretrained=True loads for the bare name. NAME.TAG (as `vitlab models "
                                   "--pretrained` lists them) shows the model those weights build.",
                       epilog="examples:\n  vitlab info vit_base_patch16_224\n"
                              "  vitlab info vit_base_patch16_224.augreg_in1k",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help="registered model name (see `vitlab models`), optionally .TAG of its weights")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def weights_info(name: str) -> dict[str, Any]:
    """:func:`model_info` of ``name``; for ``NAME.TAG``, of the model ``create_model(NAME.TAG, pretrained=True)``
    builds (the weights' classes, input size and preprocessing), with that row alone as ``pretrained``."""
    from vitlab.models.pretrained import find_weights, weights_settings
    from vitlab.models.registry import get_entry

    name, _, tag = name.partition(".")
    if not tag:
        return model_info(name)
    entry = get_entry(name)  # an unknown name says so before its weights are looked up
    weights = find_weights(name, tag)
    fields = {f.name for f in dataclasses.fields(entry.config)}
    overrides, style = weights_settings(weights, fields)
    if "num_classes" in fields:
        overrides["num_classes"] = weights.num_classes
    info = model_info(name, **overrides)
    info["preprocessing"].update({k: list(v) if isinstance(v, tuple) else v for k, v in style.items()})
    info["pretrained"] = [dataclasses.asdict(weights)]
    return info


def _numbers(values: Any) -> str:
    values = [float(v) for v in values]
    return f"{values[0]:g}" if len(set(values)) == 1 else ",".join(f"{v:g}" for v in values)


def _weights_preprocessing(w: dict[str, Any]) -> str:
    """One line: ``224x224, crop 0.9, bicubic, mean 0.5 std 0.5`` (``crop 1.0 squash`` for timm's crop_mode)."""
    c, h, wd = w["input_size"]
    size = f"{h}x{wd}" + (f" ({c} channels)" if c != 3 else "")
    crop = f"crop {float(w['crop_pct'])}" + (" squash" if w.get("crop_mode", "center") != "center" else "")
    return f"{size}, {crop}, {w['interpolation']}, mean {_numbers(w['mean'])} std {_numbers(w['std'])}"


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    if Path(args.name).exists():  # a checkpoint or run folder, not a name (whose dots would read as .TAG)
        kind = "a folder" if Path(args.name).is_dir() else "a file"
        raise ValueError(f"{args.name} is {kind}: `vitlab info` takes a registered model name (see `vitlab models`), "
                         f"optionally NAME.TAG of its published weights, e.g. vit_base_patch16_224.augreg_in1k")
    info = weights_info(args.name)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    pre = info["preprocessing"]
    print(f"{args.name}  ({info['family']}) {info['description']}")
    print(f"  parameters     {info['params']:,} ({info['params_m']} M)")
    print(f"  GMACs          {info['gmacs']} at {pre['input_size'][1]}x{pre['input_size'][2]}")
    print(f"  classes        {info['num_classes']}")
    print(f"  input size     {tuple(pre['input_size'])}")
    print(f"  mean / std     {tuple(pre['mean'])} / {tuple(pre['std'])}")
    if pre.get("channel_order", "RGB") != "RGB":
        print(f"  channel order  {pre['channel_order']}")
    squash = ", both sides (squash)" if pre.get("crop_mode", "center") == "squash" else ""
    print(f"  crop fraction  {pre['crop_pct']}{squash}, {pre['interpolation']} interpolation")
    if pre.get("crop_offset", "round") != "round":
        print(f"  crop offset    {pre['crop_offset']} (odd margins split as Hugging Face's processors do)")
    if info["pretrained"]:
        from vitlab.models.pretrained import find_weights

        default_tag = find_weights(info["name"]).tag
    for w in info["pretrained"]:
        default = " (default)" if w["tag"] == default_tag else ""
        print(f"  weights        {info['name']}.{w['tag']}{default}: {w['hub']} ({w['format']}, "
              f"{w['num_classes']} classes, {w['license']})")
        print(f"                   {_weights_preprocessing(w)}")
    return 0
