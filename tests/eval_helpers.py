"""A hand-set classifier that tells bright images from dark ones, and grey class folders for it: a wrong mapping of
the data's classes to the head shows as 0% where the right one gives 100% (eval's class matching, Unicode names)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitlab
from vitlab.cli.main import main


def bright_dark_checkpoint(path: Path, names: Sequence[str] = ("2", "10")) -> Path:
    """A ViT without blocks whose class ``names[0]`` is bright images and ``names[1]`` dark ones (default "2" and
    "10": the head's order as numbers sort, not as a folder listing sorts them)."""
    model = vitlab.create_model("vit_tiny_patch16_224", img_size=16, patch_size=16, depth=0, embed_dim=8,
                                num_heads=2, num_classes=2, global_pool="avg", class_token=False, in_chans=1,
                                mean=(0.5,), std=(0.5,), crop_pct=1.0)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.patch_embed.proj.weight[0] = 1.0  # feature 0: the image's summed brightness (normalised: -256..256)
        model.patch_embed.proj.weight[1] = -1.0  # feature 1: its darkness
        model.fc_norm.weight.fill_(1.0)
        model.head.weight[0, 0], model.head.weight[1, 1] = 1.0, 1.0
    model.class_names = list(names)
    return vitlab.save_model(model, path)


def grey_class_folders(root: Path, classes: dict[str, int], n: int = 3) -> Path:
    """Class folders (named exactly as given) of ``n`` grey 16 x 16 images each, all of one brightness."""
    for name, value in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((16, 16), value, np.uint8)).save(root / name / f"{i}.png")
    return root


def eval_json(capsys: pytest.CaptureFixture, *args: str) -> dict:
    """``vitlab eval ARGS --json``'s report."""
    assert main(["eval", *args, "--json", "--threads", "1"]) == 0
    return json.loads(capsys.readouterr().out)
