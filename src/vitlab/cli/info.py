"""``vitlab info NAME``: parameters, GMACs and default preprocessing of a model."""

from __future__ import annotations

import argparse
import json

from vitlab.models.factory import model_info


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="parameters, GMACs and preprocessing of a model",
                       description="Show a registered model's size, compute and default preprocessing.",
                       epilog="example:\n  vitlab info vit_base_patch16_224",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help="registered model name (see `vitlab models`)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    info = model_info(args.name)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    pre = info["preprocessing"]
    print(f"{info['name']}  ({info['family']}) {info['description']}")
    print(f"  parameters     {info['params']:,} ({info['params_m']} M)")
    print(f"  GMACs          {info['gmacs']} at {pre['input_size'][1]}x{pre['input_size'][2]}")
    print(f"  classes        {info['num_classes']}")
    print(f"  input size     {tuple(pre['input_size'])}")
    print(f"  mean / std     {tuple(pre['mean'])} / {tuple(pre['std'])}")
    if pre.get("channel_order", "RGB") != "RGB":
        print(f"  channel order  {pre['channel_order']}")
    squash = ", both sides (squash)" if pre.get("crop_mode", "center") == "squash" else ""
    print(f"  crop fraction  {pre['crop_pct']}{squash}, {pre['interpolation']} interpolation")
    for w in info["pretrained"]:
        print(f"  weights        {args.name}.{w['tag']}: {w['hub']} ({w['format']}, {w['num_classes']} classes, "
              f"{w['license']})")
    return 0
