"""More detection / segmentation data as users bring it: masks scored at their own size, an official DETR's
labels read as COCO category ids, `eval --split test`, the training and evaluation options the dense tasks
honour (or refuse), bad files found before training, 16-bit and 1-bit masks."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitlab
from dense_helpers import DETR_TINY, SETR_TINY
from vitlab.cli.main import main
from vitlab.data.dense import MaskFolder

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------ helpers


def _thin_mask(h: int, w: int) -> np.ndarray:
    """Class 1 a block, class 2 one-pixel lines on odd columns (a nearest resize to half the size drops them)."""
    m = np.zeros((h, w), np.uint8)
    m[2:h // 2, 2:w // 2] = 1
    m[:, w // 2 + 3::4] = 2
    return m


def _seg_split(root: Path, masks: dict[str, np.ndarray]) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for name, m in masks.items():
        Image.fromarray((m * 60 + 20).astype(np.uint8)).save(root / "images" / f"{name}.png")
        Image.fromarray(m).save(root / "masks" / f"{name}.png")


def _seg_data(root: Path, val: dict[str, np.ndarray] | None = None) -> Path:
    _seg_split(root / "train", {f"t{i}": _thin_mask(32, 32) for i in range(4)})
    _seg_split(root / "val", val or {"v0": _thin_mask(32, 32)})
    (root / "classes.json").write_text(json.dumps(["bg", "block", "thin"]))
    return root


def _setr(num_classes: int = 3, *, constant: int | None = 0) -> torch.nn.Module:
    """A tiny RGB SETR at 32 px; ``constant``: every pixel predicted as that class."""
    model = vitlab.create_model("setr_naive_vit_small_patch16", num_classes=num_classes, img_size=32, channels=8,
                                backbone_args={"embed_dim": 32, "depth": 1, "num_heads": 2, "patch_size": 8}).eval()
    if constant is not None:
        with torch.no_grad():
            model.decode_head.cls.weight.zero_()
            model.decode_head.cls.bias.zero_()
            model.decode_head.cls.bias[constant] = 10.0
    return model


def _recipe(tmp_path: Path, task: str, **extra) -> Path:
    model, over = ("detr_resnet50", DETR_TINY) if task == "detection" else ("setr_naive_vit_small_patch16", SETR_TINY)
    p = tmp_path / f"{task}.json"
    p.write_text(json.dumps({"model": model, "model_overrides": over, "img_size": 32, "max_steps": 2,
                             "batch_size": 2, "hflip": 0.0, "cpu_threads": 1, **extra}))
    return p


def _coco_data(root: Path, sizes: dict[str, tuple[int, int]] | None = None) -> Path:
    """train/ and val/ with two 32x32 grey images each (one box of category id 1), COCO JSON."""
    for split in ("train", "val"):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for i in range(2):
            name = f"{split}{i}.png"
            Image.new("L", (32, 32), 40 * i).save(root / split / "images" / name)
            w, h = (sizes or {}).get(name, (32, 32))
            images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
            anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [4, 4, 12, 12]})
        (root / split / "annotations.json").write_text(json.dumps(
            {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))
    return root


def _truncate(image: Path) -> bytes:
    """Write a noisy PNG cut after its header and a part of its pixel data at ``image``; returns the old bytes."""
    good = image.read_bytes()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8)).save(image)
    image.write_bytes(image.read_bytes()[:120])
    return good


def _train(task: str, data: Path, out: Path, recipe: Path, *extra: str) -> int:
    return main(["train", "--task", task, "--data", str(data), "--recipe", str(recipe), "--output", str(out),
                 "--no-progress", *extra])


# ------------------------------------------------------------------------------------ 1. masks at their own size


def test_segmentation_is_scored_at_each_masks_own_size(tmp_path):
    """mIoU was computed on masks squashed (nearest) to the model's 32 px: the 1-px class vanished from the
    ground truth. Two masks of different sizes go through one batch, each scored at its own size."""
    from vitlab.tasks.run import evaluate_folder, transform_for

    a, b = _thin_mask(64, 64), _thin_mask(40, 48)
    _seg_split(tmp_path / "val", {"a": a, "b": b})
    model = _setr(constant=0)  # every pixel predicted "bg"
    metrics = evaluate_folder(model, tmp_path, "val")
    gt = np.concatenate([a.ravel(), b.ravel()])
    background = float((gt == 0).mean())  # pred all 0: IoU(bg) = pixel accuracy = share of bg pixels
    assert metrics["pixel_acc"] == pytest.approx(background)
    assert metrics["iou"] == [pytest.approx(background), 0.0, 0.0]  # the thin class is in the ground truth
    assert metrics["mIoU"] == pytest.approx(background / 3)
    # training keeps resizing the mask with the image (the loss at the model's size), evaluation does not
    sample = {"image": torch.zeros(3, 40, 48, dtype=torch.uint8), "mask": torch.from_numpy(b.astype(np.int64))}
    assert transform_for(model, train=True, hflip=0.0)(sample)["mask"].shape == (32, 32)
    evaluated = transform_for(model, train=False)(sample)
    assert evaluated["image"].shape == (3, 32, 32) and torch.equal(evaluated["mask"], sample["mask"])
    assert transform_for(model, train=False, keep_mask_size=False)(sample)["mask"].shape == (32, 32)


def test_segmentation_trains_without_augmentation_on_masks_of_other_sizes(tmp_path):
    """A training set without augmentation (the eval transform) still resizes its masks to the model's size."""
    data = tmp_path / "data"
    _seg_split(data / "train", {"a": _thin_mask(40, 48), "b": _thin_mask(64, 64)})
    _seg_split(data / "val", {"v": _thin_mask(40, 48)})
    (data / "classes.json").write_text(json.dumps(["bg", "block", "thin"]))
    assert _train("segmentation", data, tmp_path / "run", _recipe(tmp_path, "segmentation", augment=False)) == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["val"]["iou"][2] is not None


# ------------------------------------------------------------------------------------ 2. official DETR labels


class _OneBox(torch.nn.Module):
    """A detector without class names whose one query finds the box [8, 8, 24, 24] of a 32x32 image as
    ``label`` (score ~1)."""

    task = "detection"
    class_names = None

    def __init__(self, num_classes: int, label: int) -> None:
        super().__init__()
        from vitlab.models.base import Preprocessing

        self.num_classes, self.label = num_classes, label
        self.preprocessing = Preprocessing(input_size=(1, 32, 32), crop_pct=1.0, mean=(0.5,), std=(0.5,))

    def forward(self, images, mask=None):
        logits = torch.full((images.shape[0], 1, self.num_classes + 1), -10.0)
        logits[:, 0, self.label] = 10.0
        return {"logits": logits, "boxes": torch.tensor([0.5, 0.5, 0.5, 0.5]).expand(images.shape[0], 1, 4)}


@pytest.mark.parametrize(("num_classes", "label", "said"), [
    (5, 3, "read as the category ids"),  # official DETR: num_classes = largest id + 1, label 3 = category id 3
    (9, 3, "ambiguous"),  # ids read as labels, with a warning
    (4, 2, "in id order"),  # 4 labels cannot reach id 4: category id 3 is the third category, label 2
])
def test_a_detector_without_class_names_is_scored_as_its_labels_read(tmp_path, caplog, num_classes, label, said):
    root = tmp_path / "val"
    (root / "images").mkdir(parents=True)
    images = []
    for i in range(2):
        Image.new("L", (32, 32)).save(root / "images" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": 32, "height": 32})
    anns = [{"id": i + 1, "image_id": i + 1, "category_id": 3, "bbox": [8, 8, 16, 16]} for i in range(2)]
    cats = [{"id": k, "name": n} for k, n in ((1, "dog"), (2, "car"), (3, "bus"), (4, "kite"))]
    (root / "annotations.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    from vitlab.tasks.run import evaluate_folder

    with caplog.at_level(logging.INFO, logger="vitlab"):
        assert evaluate_folder(_OneBox(num_classes, label), tmp_path, "val")["AP"] == pytest.approx(1.0)
    assert said in caplog.text and "names no classes" in caplog.text


# ------------------------------------------------------------------------------------ 3. eval --split test


def test_eval_split_test_scores_test_or_says_there_is_none(tmp_path, caplog):
    data = tmp_path / "data"
    _seg_split(data / "val", {"v": _thin_mask(32, 32)})
    _seg_split(data / "test", {"t": np.zeros((32, 32), np.uint8)})  # all background: the constant model is right
    checkpoint = tmp_path / "setr.safetensors"
    vitlab.save_model(_setr(constant=0), checkpoint, class_names=["bg", "block", "thin"])
    args = ["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--split", "test", "--json"]
    assert main([*args, "--output", str(tmp_path / "e1")]) == 0
    metrics = json.loads((tmp_path / "e1" / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["pixel_acc"] == 1.0  # val's would be below 1
    (data / "test").rename(data / "Testing")  # the split names of classification, whatever the case
    assert main([*args, "--output", str(tmp_path / "e3")]) == 0
    assert json.loads((tmp_path / "e3" / "metrics.json").read_text())["pixel_acc"] == 1.0
    (data / "Testing").rename(data / "held")
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main([*args, "--output", str(tmp_path / "e2")]) == 2
    assert f"{data}: no test split folder" in caplog.text and "held/" in caplog.text and "--split val" in caplog.text
    assert not (tmp_path / "e2").exists()


# ------------------------------------------------------------------------------------ 5. train options


def test_dense_training_honours_the_time_budget(tmp_path, monkeypatch, caplog):
    """--time-budget was ignored: the recipe's 60 steps ran whatever the budget."""
    import vitlab.tasks.run as run
    import vitlab.train.budget as budget

    monkeypatch.setattr(run, "_dense_step_seconds", lambda *a, **k: 1.0)  # as if one step took a second
    # the budget counts from the command's start, not from this test process's (whose start-up, when the test
    # runs first in a fresh process, would use the 10 s up: refused since the set-up leaves no step)
    monkeypatch.setattr(budget, "process_started", lambda *a, **k: time.monotonic())
    data = _seg_data(tmp_path / "data")
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="vitlab"):
        assert _train("segmentation", data, out, _recipe(tmp_path, "segmentation", max_steps=None, epochs=30),
                      "--time-budget", "10s") == 0
    steps = json.loads((out / "recipe.json").read_text())["resolved"]["total_steps"]
    assert 1 <= steps <= 5  # (10 s - 5 s kept for the end) x 0.92 at 1 s per step, not 30 epochs x 2 steps
    assert "time budget 10s" in caplog.text and (out / "metrics.json").is_file()
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert _train("segmentation", data, tmp_path / "x", _recipe(tmp_path, "segmentation"), "--time-budget", "10s",
                      "--steps", "3") == 2
    assert "--time-budget sizes the run itself" in caplog.text


@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_dense_step_time_is_measured_with_the_tasks_objective(tmp_path, task):
    from vitlab.tasks.detection import DetectionObjective
    from vitlab.tasks.run import _dense_step_seconds, open_split, transform_for
    from vitlab.tasks.segmentation import SegmentationObjective
    from vitlab.train.recipe import Recipe

    if task == "detection":
        data = _coco_data(tmp_path)
        model = vitlab.create_model("detr_resnet50", img_size=32, num_classes=2, **DETR_TINY)
        objective = DetectionObjective(2)
    else:
        data = _seg_data(tmp_path)
        model = vitlab.create_model("setr_naive_vit_small_patch16", img_size=32, num_classes=3, **SETR_TINY)
        objective = SegmentationObjective()
    ds = open_split(data, "train", task, transform_for(model, train=True), model.num_classes)
    before = torch.get_rng_state()
    seconds = _dense_step_seconds(model, objective, Recipe(batch_size=2, cpu_threads=1), ds, torch.device("cpu"))
    assert math.isfinite(seconds) and seconds > 0 and torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_dense_training_skips_bad_images_when_asked(tmp_path, task, caplog):
    """--skip-bad-images was ignored: one undecodable training image stopped the run."""
    data = _coco_data(tmp_path / "data") if task == "detection" else _seg_data(tmp_path / "data")
    bad = next(iter(sorted((data / "train" / "images").iterdir())))
    bad.write_text("not an image")
    recipe = _recipe(tmp_path, task)
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert _train(task, data, tmp_path / "stopped", recipe) == 2
    assert f"{bad}: not an image file" in caplog.text and "--skip-bad-images" in caplog.text
    assert not (tmp_path / "stopped" / "train_state.pt").exists()  # found before training
    with caplog.at_level(logging.INFO, logger="vitlab"):
        assert _train(task, data, tmp_path / "run", recipe, "--skip-bad-images") == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["skipped_images"] == 1
    assert "skipped 1 undecodable image(s) in total" in caplog.text


def test_dense_training_compiles_when_asked_and_refuses_distillation(tmp_path, monkeypatch, caplog):
    import vitlab.export.runtimes as runtimes

    compiled = []

    def fake_compile(module, **kw):  # torch.compile takes minutes here: the wrapper fit uses, recorded
        compiled.append(type(module).__name__)
        module.compile_s = 0.0
        return module

    monkeypatch.setattr(runtimes, "compile_model", fake_compile)
    data = _seg_data(tmp_path / "data")
    with caplog.at_level(logging.INFO, logger="vitlab"):
        assert _train("segmentation", data, tmp_path / "run", _recipe(tmp_path, "segmentation"), "--compile") == 0
    # compile_seconds: the first step's forward and backward less the second's (nothing compiles here: ~0)
    seconds = json.loads((tmp_path / "run" / "metrics.json").read_text())["compile_seconds"]
    assert compiled and 0.0 <= seconds < 1.0 and f"torch.compile: {seconds} s" in caplog.text
    teacher = tmp_path / "run" / "model.safetensors"
    for extra in (["--teacher", str(teacher)], ["--teacher", str(teacher), "--distill", "soft"]):
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="vitlab"):
            assert _train("segmentation", data, tmp_path / "t", _recipe(tmp_path, "segmentation"), *extra) == 2
        assert "distillation (DeiT's) trains classifiers only" in caplog.text
        assert not (tmp_path / "t").exists()


# ------------------------------------------------------------------------------------ 6. eval options


def test_dense_eval_honours_batch_size_device_and_amp_and_refuses_probes(tmp_path, monkeypatch, caplog):
    import vitlab.tasks.segmentation as seg

    seen = []
    evaluate = seg.evaluate_segmentation

    def spy(model, dataset, **kw):
        model.register_forward_hook(lambda m, i, o: seen.append(torch.is_autocast_enabled("cpu")))
        seen.append(kw)
        return evaluate(model, dataset, **kw)

    monkeypatch.setattr(seg, "evaluate_segmentation", spy)
    data = _seg_data(tmp_path / "data", val={"a": _thin_mask(32, 32), "b": _thin_mask(40, 48)})
    checkpoint = tmp_path / "setr.safetensors"
    vitlab.save_model(_setr(constant=None), checkpoint, class_names=["bg", "block", "thin"])
    args = ["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--split", "val", "--json"]
    assert main([*args, "--batch-size", "1", "--amp", "bf16", "--device", "cpu", "--output", str(tmp_path / "e")]) == 0
    kw, *forwards = seen
    assert kw["batch_size"] == 1 and kw["amp"] == "bf16" and torch.device(kw["device"]).type == "cpu"
    assert forwards == [True, True]  # two batches of one image, each under autocast
    seen.clear()  # without --batch-size: 8 images a batch, not the 256 of a classifier's default
    assert main([*args, "--output", str(tmp_path / "d")]) == 0
    assert seen[0]["batch_size"] == 8 and seen[0]["amp"] == "none" and seen[1:] == [False]
    for protocol in ("knn", "linear"):
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="vitlab"):
            assert main([*args, "--protocol", protocol, "--output", str(tmp_path / "p")]) == 2
        assert f"--protocol {protocol} probes a classifier's features" in caplog.text


# ------------------------------------------------------------------------------------ 7. bad data before training


def _rgb_mask(data: Path) -> str:
    path = data / "val" / "masks" / "v0.png"
    Image.new("RGB", (32, 32)).save(path)
    return f"{path}: mask mode RGB"


def _small_mask(data: Path) -> str:
    path = data / "val" / "masks" / "v0.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(path)
    return f"{path}: mask is 16x16, its image v0.png is 32x32"


def _unknown_class(data: Path) -> str:
    path = data / "val" / "masks" / "v0.png"
    Image.fromarray(np.full((32, 32), 7, np.uint8)).save(path)
    return f"{path}: class 7 outside 0..2"


def _garbage_val_image(data: Path) -> str:
    path = data / "val" / "images" / "v0.png"
    path.write_bytes(b"\x89PNG garbage")
    return f"{path}: "


@pytest.mark.parametrize("spoil", [_rgb_mask, _small_mask, _unknown_class, _garbage_val_image])
def test_bad_segmentation_data_is_named_before_training(tmp_path, caplog, spoil):
    """Found only when the loader reached the file: after the whole training, for val, with no metrics.json."""
    data = _seg_data(tmp_path / "data")
    said = spoil(data)
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert _train("segmentation", data, tmp_path / "run", _recipe(tmp_path, "segmentation")) == 2
    assert said in caplog.text
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written


def test_a_coco_image_of_another_size_than_its_json_is_named_before_training(tmp_path, caplog):
    data = _coco_data(tmp_path / "data", sizes={"val1.png": (33, 32)})
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert _train("detection", data, tmp_path / "run", _recipe(tmp_path, "detection")) == 2
    assert "val1.png is 32x32, the JSON says 33x32" in caplog.text and not (tmp_path / "run").exists()


def test_a_file_undecodable_past_its_header_leaves_the_run_resumable(tmp_path, caplog):
    """A truncated val image passes the header checks and stops the evaluation after training: the error says
    that the model is saved and how to evaluate it; --resume then does, without training again."""
    data = _seg_data(tmp_path / "data")
    image = data / "val" / "images" / "v0.png"
    good = _truncate(image)
    out = tmp_path / "run"
    recipe = _recipe(tmp_path, "segmentation")
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert _train("segmentation", data, out, recipe) == 2
    assert str(image) in caplog.text and "the training finished and its model is saved" in caplog.text
    assert f"vitlab train --output {out} --resume" in caplog.text and not (out / "metrics.json").exists()
    image.write_bytes(good)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vitlab"):
        assert main(["train", "--output", str(out), "--resume", "--no-progress"]) == 0
    assert json.loads((out / "metrics.json").read_text())["val"]["mIoU"] >= 0


def test_a_training_image_undecodable_past_its_header_says_how_to_go_on(tmp_path, caplog):
    data = _seg_data(tmp_path / "data")
    recipe = _recipe(tmp_path, "segmentation")
    assert _train("segmentation", data, tmp_path / "done", recipe) == 0
    image = data / "train" / "images" / "t1.png"
    good = _truncate(image)
    with caplog.at_level(logging.ERROR, logger="vitlab"):  # a new run stops in its first epoch
        assert _train("segmentation", data, tmp_path / "new", recipe) == 2
    assert str(image) in caplog.text and "before its first checkpoint" in caplog.text and "--overwrite" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="vitlab"):  # a run with a saved state: --resume goes on from it
        assert main(["train", "--output", str(tmp_path / "done"), "--resume", "--steps", "4", "--no-progress"]) == 2
    assert f"its state after step 2 is saved in {tmp_path / 'done'}" in caplog.text
    assert f"vitlab train --output {tmp_path / 'done'} --resume` continues" in caplog.text
    image.write_bytes(good)
    assert main(["train", "--output", str(tmp_path / "done"), "--resume", "--no-progress"]) == 0
    assert json.loads((tmp_path / "done" / "recipe.json").read_text())["resolved"]["total_steps"] == 4


# ------------------------------------------------------------------------------------ 8. and 10. mask formats


def test_segment_writes_16_bit_masks_past_256_classes_and_reads_them_back(tmp_path):
    """NAME_mask.png was 8-bit: class 299 was written as 43."""
    from vitlab.tasks.run import segment_images

    model = _setr(300, constant=299)
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(photo)
    segment_images(model, [photo], tmp_path / "out")
    written = tmp_path / "out" / "photo_mask.png"
    assert Image.open(written).mode == "I;16"
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    photo.rename(tmp_path / "images" / "photo.png")
    written.rename(tmp_path / "masks" / "photo.png")
    folder = MaskFolder(tmp_path / "images", tmp_path / "masks", num_classes=300)
    folder.check_files(classes=True)
    assert folder.raw(0)["mask"].unique().tolist() == [299]
    # a model of at most 256 classes keeps 8-bit masks
    segment_images(_setr(3, constant=2), [tmp_path / "images" / "photo.png"], tmp_path / "out8")
    assert Image.open(tmp_path / "out8" / "photo_mask.png").mode == "L"


def test_a_1_bit_mask_is_classes_0_and_1(tmp_path):
    """Image.fromarray(bool_array) writes a mode "1" PNG, which was refused."""
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.new("RGB", (8, 6)).save(tmp_path / "images" / "a.png")
    m = np.zeros((6, 8), bool)
    m[2:5, 2:5] = True
    Image.fromarray(m).save(tmp_path / "masks" / "a.png")
    assert Image.open(tmp_path / "masks" / "a.png").mode == "1"
    folder = MaskFolder(tmp_path / "images", tmp_path / "masks", num_classes=2)
    folder.check_files(classes=True)
    mask = folder.raw(0)["mask"]
    assert mask.dtype == torch.int64 and torch.equal(mask, torch.from_numpy(m.astype(np.int64)))


def test_eval_refuses_binary_masks_saved_0_255(tmp_path, caplog):
    """The object saved as 255 is the ignore index: eval scored only the background, silently (training refuses
    such masks before it starts; eval now does too)."""
    blob = np.zeros((32, 32), np.uint8)
    blob[8:20, 8:20] = 255
    _seg_split(tmp_path / "data" / "val", {"v0": blob, "v1": blob})
    checkpoint = tmp_path / "setr.safetensors"
    vitlab.save_model(_setr(num_classes=2, constant=0), checkpoint, class_names=["background", "object"])
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(tmp_path / "data"), "--split", "val",
                     "--output", str(tmp_path / "e")]) == 2
    assert "255 is the ignore index" in caplog.text and "'object'" in caplog.text
