"""``pretrained="hf-hub:ORG/NAME"`` offline: weights come from the local Hugging Face cache, no network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vitlab

from model_helpers import perturb_

pytest.importorskip("huggingface_hub")

TINY = dict(embed_dim=64, depth=2, num_heads=4, img_size=32, num_classes=3)


def _fake_cache(root: Path, repo: str, files: dict[str, bytes]) -> None:
    """The on-disk layout huggingface_hub uses: models--ORG--NAME/{refs/main, snapshots/REV/...}."""
    base = root / ("models--" + repo.replace("/", "--"))
    rev = "0123456789abcdef0123456789abcdef01234567"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(rev)
    snap = base / "snapshots" / rev
    snap.mkdir(parents=True)
    for name, data in files.items():
        (snap / name).write_bytes(data)


def test_hf_hub_source_loads_from_local_cache_offline(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model = perturb_(vitlab.create_model("vit_tiny_patch16_224", **TINY)).eval()
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    timm_cfg = {"architecture": "vit_tiny_patch16_224", "num_classes": 3, "pretrained_cfg": {}}
    _fake_cache(tmp_path / "hub", "someorg/tiny-vit",
                {"model.safetensors": weights.read_bytes(), "config.json": json.dumps(timm_cfg).encode()})
    x = torch.randn(1, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    expected = model(x)
    script = (
        "import sys, torch, vitlab\n"
        "m = vitlab.create_model('vit_tiny_patch16_224', pretrained='hf-hub:someorg/tiny-vit', embed_dim=64,"
        " depth=2, num_heads=4, img_size=32).eval()\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)\n"
        "same = vitlab.load_model('hf-hub:someorg/tiny-vit', embed_dim=64, depth=2, num_heads=4, img_size=32).eval()\n"
        "assert torch.equal(same(x), m(x)) and same.model_name == 'vit_tiny_patch16_224'\n"
        f"torch.save(m(x), {str(tmp_path / 'y.pt')!r})\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=120)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt", weights_only=True), expected)


def test_hf_hub_source_missing_from_cache_is_a_clear_error(tmp_path: Path) -> None:
    script = (
        "import vitlab\n"
        "try:\n"
        "    vitlab.create_model('vit_tiny_patch16_224', pretrained='hf-hub:someorg/absent')\n"
        "except vitlab.CheckpointError as e:\n"
        "    print('ERR', e)\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert "ERR hf-hub:someorg/absent: not reachable and not in the local Hugging Face cache" in out.stdout
