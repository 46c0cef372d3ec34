"""The dense-task commands end to end on tiny canvases: make-canvases, train --task, eval, detect,
explain (DETR's per-object cross-attention) and segment."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vitlab
from dense_helpers import DETR_EXPORT, DETR_TINY, SETR_EXPORT, SETR_TINY, make_test_canvases
from vitlab.cli.main import main


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    canvases = make_test_canvases(tmp_path_factory.mktemp("canvases"))
    assert json.loads((canvases / "classes.json").read_text())[0] == "background"
    return canvases


def _recipe(tmp: Path, model: str, overrides: dict) -> Path:
    p = tmp / f"{model}.json"
    p.write_text(json.dumps({"model": model, "model_overrides": overrides, "img_size": 32, "max_steps": 2,
                             "batch_size": 2, "augment": True, "hflip": 0.0, "cpu_threads": 1}))
    return p


def test_detection_commands(data: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["train", "--task", "detection", "--data", str(data), "--recipe",
                 str(_recipe(tmp_path, "detr_resnet50", DETR_TINY)), "--output", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert set(summary["val"]) == {"AP", "AP50", "AP75"}
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "model.safetensors"), "--data", str(data), "--split", "val"]) == 0
    assert "AP50" in capsys.readouterr().out
    image = data / "val" / "images" / "00000.png"
    assert main(["detect", str(image), "--checkpoint", str(out / "model.safetensors"), "--threshold", "0.0",
                 "--output", str(tmp_path / "det")]) == 0
    dets = json.loads((tmp_path / "det" / "detections.json").read_text())
    assert len(dets[0]["objects"]) == 4 and (tmp_path / "det" / "00000.png").is_file()
    assert dets[0]["objects"][0]["label"] in [str(d) for d in range(10)]
    # a folder, and a second file of the same name: both pictures kept
    other = tmp_path / "other"
    other.mkdir()
    (other / image.name).write_bytes((data / "val" / "images" / "00001.png").read_bytes())
    assert main(["detect", str(data / "val" / "images"), str(other), "--checkpoint", str(out / "model.safetensors"),
                 "--threshold", "0.0", "--output", str(tmp_path / "det2")]) == 0
    n_val = len(list((data / "val" / "images").glob("*.png")))
    assert len(json.loads((tmp_path / "det2" / "detections.json").read_text())) == n_val + 1
    assert (tmp_path / "det2" / "00000.png").is_file() and (tmp_path / "det2" / "00000-1.png").is_file()
    # an undecodable file: skipped and reported with --skip-bad-images; without it the run stops, and
    # detections.json keeps the images done before it (it was written only at the end)
    bad = tmp_path / "mixed"
    bad.mkdir()
    (bad / "a.png").write_bytes(image.read_bytes())
    (bad / "b.png").write_text("not a png")
    args = ["detect", str(bad), "--checkpoint", str(out / "model.safetensors"), "--threshold", "0.0"]
    assert main([*args, "--output", str(tmp_path / "det3"), "--skip-bad-images"]) == 0
    rows = json.loads((tmp_path / "det3" / "detections.json").read_text())
    assert [("error" in r) for r in rows] == [False, True] and "b.png" in rows[1]["error"]
    assert main([*args, "--output", str(tmp_path / "det4")]) == 2
    assert [r["image"] for r in json.loads((tmp_path / "det4" / "detections.json").read_text())] == [str(bad / "a.png")]
    assert main(["explain", str(image), "--checkpoint", str(out / "model.safetensors"),
                 "--output", str(tmp_path / "exp")]) == 0
    # explain of a detector honours --skip-bad-images (it stopped at the bad file although given the flag)
    assert main(["explain", str(bad), "--checkpoint", str(out / "model.safetensors"), "--skip-bad-images",
                 "--output", str(tmp_path / "exp2")]) == 0
    assert (tmp_path / "exp2" / "a.png").is_file()
    assert f"{bad / 'a.png'} -> {tmp_path / 'exp2' / 'a.png'}" in capsys.readouterr().out  # which picture is whose
    # the detector's threshold (0.5) may keep no object of an untrained model; the picture is always written
    assert (tmp_path / "exp" / "00000.png").is_file()


def test_segmentation_commands(data: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["train", "--task", "segmentation", "--data", str(data), "--recipe",
                 str(_recipe(tmp_path, "setr_pup_vit_small_patch16", SETR_TINY)), "--output", str(out),
                 "--no-progress"]) == 0
    assert {"mIoU", "pixel_acc"} <= set(json.loads((out / "metrics.json").read_text())["val"])
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "model.safetensors"), "--data", str(data), "--split", "val"]) == 0
    assert "mIoU" in capsys.readouterr().out
    image = data / "val" / "images" / "00001.png"
    n_val = len(list((data / "val" / "images").glob("*.png")))
    assert main(["segment", str(image), "--checkpoint", str(out / "model.safetensors"),
                 "--output", str(tmp_path / "seg")]) == 0
    assert (tmp_path / "seg" / "00001.png").is_file() and (tmp_path / "seg" / "00001_mask.png").is_file()
    assert main(["segment", str(data / "val" / "images"), str(image), "--checkpoint", str(out / "model.safetensors"),
                 "--output", str(tmp_path / "seg2")]) == 0
    assert (tmp_path / "seg2" / "00001_mask.png").is_file() and (tmp_path / "seg2" / "00001-1_mask.png").is_file()
    assert len(json.loads((tmp_path / "seg2" / "segments.json").read_text())) == n_val + 1


def test_task_and_model_must_agree(data: Path, tmp_path: Path) -> None:
    assert main(["train", "--task", "segmentation", "--data", str(data), "--model", "detr_resnet50",
                 "--output", str(tmp_path / "x"), "--no-progress"]) == 2


@pytest.mark.parametrize("name, classes", [("detr_canvases", 10), ("setr_canvases", 11)])
def test_canvas_recipes_build_their_models(name: str, classes: int) -> None:
    import torch

    import vitlab
    from vitlab.train.recipe import load_recipe

    recipe = load_recipe(name)
    assert recipe.hflip == 0.0  # digits are not mirror-symmetric
    model = vitlab.create_model(recipe.model, img_size=recipe.img_size,
                                **{**recipe.model_overrides, "num_classes": classes}).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 1, recipe.img_size, recipe.img_size))
    assert out["logits"].shape[:2] == ((1, 12) if name == "detr_canvases" else (1, classes))


def test_make_canvases_names_a_missing_mnist_folder(tmp_path: Path, caplog) -> None:
    import logging

    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(["make-canvases", "--mnist", str(tmp_path / "nope"), "--output", str(tmp_path / "c")]) == 2
    assert "nope: no such folder; give the folder with MNIST's IDX files" in caplog.text
    assert not (tmp_path / "c").exists()


_DENSE = [("setr_pup_vit_small_patch16", "segmentation", "vitlab segment"),
          ("detr_resnet50", "detection", "vitlab detect")]
_TOOLS = [["explain", "IMAGE"], ["analyze", "--data", "digits"], ["fewshot", "--data", "digits"]]


# explain of a DETR draws each object's attention (test_detection_commands), so it is not among these
@pytest.mark.parametrize("command, name, task, runs_it", [
    (c, *d) for c in _TOOLS for d in _DENSE if not (c[0] == "explain" and d[1] == "detection")])
def test_classifier_tools_name_the_command_for_a_dense_model(tmp_path, caplog, command, name, task, runs_it):
    """explain (of a SETR) / analyze / fewshot on a DETR or SETR checkpoint ended in AttributeError tracebacks
    ('dict' object has no attribute 'shape', no forward_head) or an unrelated token-grid error; now one line naming
    the commands that run the model. (explain of a DETR draws each object's attention: test_detection_commands.)"""
    over = SETR_EXPORT if name.startswith("setr") else DETR_EXPORT
    path = tmp_path / "model.safetensors"
    vitlab.save_model(vitlab.create_model(name, **over), path)
    image = tmp_path / "image.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(image)
    args = [str(image) if a == "IMAGE" else a for a in command]
    assert main([args[0], *args[1:], "--checkpoint", str(path), "--output", str(tmp_path / "out")]
                if args[0] != "fewshot" else [*args, "--checkpoint", str(path)]) == 2
    assert f"a {task} model; `vitlab {args[0]}` works on classifiers. Run it with `{runs_it}" in caplog.text


def test_compile_switched_on_resume_of_a_dense_run_is_recorded(data: Path, tmp_path: Path, caplog, monkeypatch) -> None:
    """As for classification: a segmentation run resumed with --compile is warned of (not bitwise an uninterrupted
    run) and job.json records it."""
    import logging

    import torch

    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)  # a real compile takes long on a CPU
    out = tmp_path / "run"
    recipe = str(_recipe(tmp_path, "setr_pup_vit_small_patch16", SETR_TINY))
    base = ["train", "--task", "segmentation", "--data", str(data), "--recipe", recipe, "--output", str(out),
            "--no-progress"]
    assert main(base) == 0
    assert json.loads((out / "job.json").read_text())["compile"] is False
    with caplog.at_level(logging.WARNING, logger="vitlab"):
        assert main([*base, "--resume", "--steps", "3", "--compile"]) == 0
    assert "will not match an uninterrupted run bitwise" in caplog.text
    job = json.loads((out / "job.json").read_text())
    assert job["compile"] is True and job["compile_changes"] == [{"from_step": 3, "compile": [False, True]}]
