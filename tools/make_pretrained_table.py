"""Regenerate ``src/vitlab/models/pretrained.json``'s timm rows from timm's own pretrained configurations.

Every (model, tag) that timm publishes on the Hugging Face hub for a model name vitlab registers becomes one
row: hub id, class count, input size, mean/std, crop (fraction and mode) and interpolation, license, as timm's
``PretrainedCfg`` states them. Each name's first row is the one ``timm.create_model(NAME, pretrained=True)``
loads (timm's default tag, ``get_pretrained_cfg(NAME).tag``), marked ``"default": true``; the other rows follow
in ``timm.list_pretrained()``'s (alphabetical) order. Rows in other formats (Hugging Face folders, written by
hand) are kept as they are, after the name's timm rows. Families whose timm weights vitlab does not read (timm's
ResNets, which the DETR backbone does not take) are left out. Offline: timm's registry only.

Run in the peer environment (``../shared/tools/peer-venv.sh``), from the repository root:

    PYTHONPATH=src /tmp/peers/bin/python tools/make_pretrained_table.py
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import timm
from timm.models import get_pretrained_cfg

import vitlab

TABLE = Path(__file__).resolve().parents[1] / "src" / "vitlab" / "models" / "pretrained.json"
NOT_READ = ("resnet",)  # timm layouts vitlab has no converter for


def timm_rows() -> list[dict]:
    names = set(vitlab.list_models())
    tags: dict[str, list[str]] = collections.defaultdict(list)
    for full in timm.list_pretrained():  # sorted by name, not by timm's preference
        name, _, tag = full.partition(".")
        if name in names and not name.startswith(NOT_READ):
            tags[name].append(tag)
    rows = []
    for name in sorted(tags):
        default = get_pretrained_cfg(name).tag  # what timm loads for the bare name
        if default not in tags[name]:
            raise SystemExit(f"{name}: timm's default tag {default!r} is not among its published weights")
        for tag in sorted(tags[name], key=lambda t: t != default):  # stable: the default first
            cfg = get_pretrained_cfg(f"{name}.{tag}")
            if not cfg.hf_hub_id:  # a URL vitlab does not fetch; a default there leaves the name's rows unmarked
                if tag == default:
                    print(f"{name}.{tag}: timm's default weights are not on the hub; no row marked default",
                          file=sys.stderr)
                continue
            if cfg.crop_mode not in ("center", "squash"):  # vitlab's Preprocessing has no other
                raise SystemExit(f"{name}.{tag}: crop_mode {cfg.crop_mode!r} is not one vitlab follows")
            rows.append({"model": name, "tag": tag, **({"default": True} if tag == default else {}),
                         "hub": f"hf-hub:{cfg.hf_hub_id}", "format": "timm",
                         "num_classes": cfg.num_classes, "input_size": list(cfg.input_size),
                         "mean": [float(v) for v in cfg.mean], "std": [float(v) for v in cfg.std],
                         "crop_pct": cfg.crop_pct, "crop_mode": cfg.crop_mode, "interpolation": cfg.interpolation,
                         "license": cfg.license or "unknown"})
    return rows


def main() -> None:
    table = json.loads(TABLE.read_text())
    kept = [r for r in table["weights"] if r["format"] != "timm"]
    rows = timm_rows() + kept
    rows.sort(key=lambda r: r["model"])  # stable: each model's timm rows first, its default first of all
    table["weights"] = rows
    lines = ",\n".join("  " + json.dumps(r) for r in rows)  # one row per line, as the file is read by people too
    TABLE.write_text(f'{{\n "_comment": {json.dumps(table["_comment"])},\n "weights": [\n{lines}\n ]\n}}\n')
    print(f"{TABLE}: {len(rows)} rows ({len(rows) - len(kept)} timm, {len(kept)} other)")


if __name__ == "__main__":
    main()
