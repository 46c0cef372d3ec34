"""Class order of checkpoints that do not name their classes (a bare timm state dict): timm numbers class folders in
natural order ("2" before "10", "bird" before "Cat"), vitlab in text order; eval warns, ``--class-order natural``
and ``--class-map FILE`` (timm's .txt class map) give timm's numbering. And ``fit`` refuses data that is not a
map-style data set before it writes anything.

The timm numbers come from tests/fixtures/class_order_timm.json (class_order_make_timm.py). The model is a
ViT without blocks whose output 0 is bright images and output 1 dark ones: trained by timm on folders "2" (bright)
and "10" (dark), so a wrong numbering scores 0% where the right one scores 100%.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import vitlab
from eval_helpers import grey_class_folders
from vitlab.cli.main import main

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "class_order_timm.json").read_text(encoding="utf-8"))
MODEL = ["--model", "vit_tiny_patch16_224", *[a for kv in ("img_size=16", "patch_size=16", 'global_pool="avg"',
                                                             "class_token=false", "depth=0", "embed_dim=8",
                                                             "num_heads=2", "num_classes=2")
                                               for a in ("--model-arg", kv)], "--threads", "1"]


def bare_bright_dark(path: Path) -> Path:
    """A bare state dict (no class names) whose output 0 is bright images, output 1 dark ones."""
    model = vitlab.create_model("vit_tiny_patch16_224", img_size=16, patch_size=16, depth=0, embed_dim=8,
                                num_heads=2, num_classes=2, global_pool="avg", class_token=False)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.patch_embed.proj.weight[0] = 1.0  # feature 0: brightness; feature 1: darkness
        model.patch_embed.proj.weight[1] = -1.0
        model.fc_norm.weight.fill_(1.0)
        model.head.weight[0, 0], model.head.weight[1, 1] = 1.0, 1.0
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture
def timm_run(tmp_path: Path) -> tuple[Path, Path]:
    """The bare checkpoint and its data: folders "2" (bright) and "10" (dark), timm's classes 0 and 1."""
    data = grey_class_folders(tmp_path / "data" / "test", {"2": 250, "10": 5}).parent
    (data / "train").symlink_to(data / "test")
    return bare_bright_dark(tmp_path / "timm.pth"), data


def _eval(capsys: pytest.CaptureFixture, ckpt: Path, data: Path, *args: str) -> dict:
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(data), *MODEL, "--json",
                 "--output", str(data.parent / "report"), "--overwrite", *args]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("case", sorted(FIXTURE["cases"]))
def test_natural_order_is_timms(case: str) -> None:
    from vitlab.cli.eval import natural_key

    folders = FIXTURE["cases"][case]["folders"]
    assert sorted(folders, key=natural_key) == FIXTURE["cases"][case]["timm_order"]


def test_class_map_file_reads_as_timms(tmp_path: Path) -> None:
    from vitlab.cli.common import read_class_map

    path = tmp_path / "classes.txt"
    path.write_text(FIXTURE["class_map"]["text"], encoding="utf-8")
    assert read_class_map(str(path)) == FIXTURE["class_map"]["timm_names"]
    path.write_text("\ufeffcat\n\n dog \n\n", encoding="utf-8")  # a BOM, blank lines
    assert read_class_map(str(path)) == ["cat", "dog"]


def test_nameless_checkpoint_warns_of_timms_order(timm_run, capsys, caplog) -> None:
    ckpt, data = timm_run
    metrics = _eval(capsys, ckpt, data)
    assert metrics["top1"] == 0.0  # the default: folders numbered as text, "10" taken for output 0
    text = caplog.text
    assert "names no classes of its own" in text and "'10', '2'" in text and "('2', '10' there)" in text
    assert "--class-order natural" in text and "--class-map" in text
    assert "class names differ" not in text  # no stand-in names "0", "1" quoted


def test_class_order_natural_scores_a_timm_checkpoint(timm_run, capsys, caplog) -> None:
    ckpt, data = timm_run
    metrics = _eval(capsys, ckpt, data, "--class-order", "natural")
    assert metrics["top1"] == 1.0 and metrics["per_class"] == {"10": 1.0, "2": 1.0}
    assert metrics["class_order"] == "natural" and metrics["class_match"] == {"10": "1", "2": "0"}
    assert "names no classes of its own" not in caplog.text


def test_class_map_names_a_timm_checkpoints_classes(timm_run, tmp_path, capsys, caplog) -> None:
    ckpt, data = timm_run
    (tmp_path / "classes.txt").write_text("2\n10\n", encoding="utf-8")  # timm's order: the head's
    metrics = _eval(capsys, ckpt, data, "--class-map", str(tmp_path / "classes.txt"))
    assert metrics["top1"] == 1.0 and metrics["class_match"] == {"10": "10", "2": "2"}
    assert "names no classes of its own" not in caplog.text
    assert main(["predict", str(data / "test" / "10" / "0.png"), "--checkpoint", str(ckpt), *MODEL, "--json",
                 "--class-map", str(tmp_path / "classes.txt")]) == 0
    best = json.loads(capsys.readouterr().out)[0]["predictions"][0]
    assert best["class"] == "10" and best["index"] == 1 and best["probability"] > 0.9


def test_class_map_errors(timm_run, tmp_path, capsys, caplog) -> None:
    ckpt, data = timm_run
    image = str(data / "test" / "2" / "0.png")
    marker = tmp_path / "unpickled"

    class Sneaky:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (tmp_path / "map.pkl").write_bytes(pickle.dumps(Sneaky()))
    (tmp_path / "three.txt").write_text("a\nb\nc\n", encoding="utf-8")
    (tmp_path / "twice.txt").write_text("a\n\na\n", encoding="utf-8")
    expected = {"missing.txt": r"missing.txt: no such file",
                "map.pkl": r"map.pkl: a pickle file is not read",
                "three.txt": r"three.txt: 3 class names, but the checkpoint's head has 2 outputs",
                "twice.txt": r"twice.txt: class 'a' is named twice \(lines 1 and 3\)"}
    for name, message in expected.items():
        for command in (["eval", "--checkpoint", str(ckpt), "--data", str(data)],
                        ["predict", image, "--checkpoint", str(ckpt)]):
            caplog.clear()
            assert main([*command, *MODEL, "--class-map", str(tmp_path / name)]) != 0
            assert f"--class-map {tmp_path}/" in caplog.text
            assert re.search(message, caplog.text), (command, caplog.text)
    assert not marker.exists()


def test_named_checkpoint_is_matched_by_name_as_before(tmp_path, capsys, caplog) -> None:
    from eval_helpers import bright_dark_checkpoint

    ckpt = bright_dark_checkpoint(tmp_path / "m.safetensors")  # names "2" (bright), "10" (dark)
    data = grey_class_folders(tmp_path / "data" / "test", {"2": 250, "10": 5}).parent
    (data / "train").symlink_to(data / "test")
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(data), "--json", "--threads", "1",
                 "--class-order", "natural"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == 1.0
    assert "names no classes" not in caplog.text and "--class-order natural: classes are matched by name" in caplog.text


def _fit(tmp_path: Path, **data) -> Path:
    from vitlab.train import fit
    from vitlab.train.recipe import load_recipe

    recipe = load_recipe("digits").replace(max_steps=2, batch_size=4, ema_decay=None)
    model = vitlab.create_model("vit_tiny_patch16_224", num_classes=2, img_size=16, patch_size=8, depth=1)
    out = tmp_path / "run"
    fit(model, recipe, output_dir=out, progress=False, **data)
    return out


def test_fit_refuses_a_dataloader_and_arrays_before_writing(tmp_path: Path) -> None:
    ds = torch.utils.data.TensorDataset(torch.rand(8, 3, 16, 16), torch.tensor([0, 1] * 4))
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    with pytest.raises(TypeError, match=r"train_set must be a map-style data set .* got a torch\.utils\.data\."
                                        r"dataloader\.DataLoader; pass its data set \(loader\.dataset\)"):
        _fit(tmp_path, train_set=loader)
    x, y = np.zeros((8, 16, 16, 3), np.uint8), np.array([0, 1] * 4)
    with pytest.raises(TypeError, match=r"train_set .* got a tuple of 2 arrays \(shapes \(8, 16, 16, 3\), \(8,\)\)"
                                        r".*TensorDataset"):
        _fit(tmp_path, train_set=(x, y))
    with pytest.raises(TypeError, match=r"val_set must be a map-style data set .*DataLoader"):
        _fit(tmp_path, train_set=ds, val_set=loader)
    assert not (tmp_path / "run").exists()  # nothing written: no recipe.json, no tb/
