"""vitlab's own checkpoint: self-describing, atomic, and loaded without naming the model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import vitlab
from vitlab.checkpoints import atomic_write

from model_helpers import perturb_

TINY = dict(embed_dim=64, depth=2, num_heads=4, img_size=32)


def test_save_then_load_needs_only_the_file(tmp_path: Path) -> None:
    model = perturb_(vitlab.create_model("vit_small_patch16_224", num_classes=3, global_pool="avg",
                                         class_token=False, **TINY)).eval()
    path = vitlab.save_model(model, tmp_path / "m.safetensors", class_names=["cat", "dog", "emu"])
    loaded = vitlab.load_model(path).eval()
    assert loaded.model_name == "vit_small_patch16_224"
    assert loaded.class_names == ["cat", "dog", "emu"]
    assert loaded.cfg == model.cfg
    assert loaded.preprocessing == model.preprocessing
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    # the same file at another resolution and class count: resampled table, zero-initialised head
    other = vitlab.load_model(path, img_size=48, num_classes=5).eval()
    assert other.pos_embed.shape == (1, 9, 64) and not other.head.weight.any()


def test_vitlab_checkpoint_of_another_family_is_refused(tmp_path: Path) -> None:
    resnet = vitlab.create_model("resnet18", num_classes=3, layers=(1, 1, 1, 1))
    path = vitlab.save_model(resnet, tmp_path / "r.safetensors")
    with pytest.raises(vitlab.CheckpointError, match=r"a checkpoint of resnet18 \(resnet\), not of the vit family"):
        vitlab.create_model("vit_tiny_patch16_224", pretrained=path)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "ckpt.bin"
    target.write_bytes(b"old")

    def failing(tmp: str) -> None:
        Path(tmp).write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, failing)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.bin"]  # no temporary left behind
    atomic_write(target, lambda tmp: Path(tmp).write_bytes(b"new"))
    assert target.read_bytes() == b"new"


def test_hf_folder_class_names_come_from_id2label() -> None:
    folder = Path(__file__).parent / "fixtures" / "deit_hf_plain_tiny"
    import json

    id2label = json.loads((folder / "config.json").read_text())["id2label"]
    model = vitlab.load_model(folder)
    assert model.class_names == [id2label[str(i)] for i in range(len(id2label))]
