"""`vitlab train` on folders nobody had seen: what an exploratory tester's data sets showed (split folders spelled
another way, a class called train, tiny folders, link loops, bad images, formats left out)."""

from __future__ import annotations

import json
import logging
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image, features
from torch import nn

from vitlab.cli.main import main
from vitlab.data import build_dataset, expand_image_paths
from vitlab.data.dataset import TensorImageDataset
from vitlab.data.errors import DatasetError
from vitlab.data.image import IMAGE_EXTENSIONS
from vitlab.data.splits import stratified_split
from vitlab.train.auto import DataFacts, choose_recipe, held_out_images
from vitlab.train.evaluate import evaluate
from vitlab.train.hardware import Hardware

torch.set_num_threads(1)

LAPTOP = Hardware(cores=2, threads=1, memory_gb=8, cpu_bf16=False)
# a short run of the auto recipe (the CCT it picks for 8 px images), one thread
QUICK = ["--steps", "2", "--threads", "1", "--no-progress"]
# the digits recipe made tiny, for runs that must train a few steps
TINY = ["--recipe", "digits", "--img-size", "8", "--batch-size", "4", "--threads", "1", "--no-progress", "--set",
        "model_overrides.depth=1", "--set", "model_overrides.embed_dim=16", "--set", "model_overrides.num_heads=2",
        "--set", "warmup_epochs=0"]


def write_images(root, classes=("a", "b"), per_class=4, *, size=8, mode="RGB", ext="png", fmt=None):
    """``per_class`` images of ``size`` px under root/<class>/, each class its own colour plus noise."""
    rng = np.random.default_rng(0)
    for ci, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.array([(60 * ci) % 256, 255 - (40 * ci) % 256, 128], np.float32)
            arr = np.clip(base + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).convert(mode).save(root / c / f"{i}.{ext}", format=fmt)
    return root


def garble(*files):
    for f in files:
        f.write_bytes(b"ftypheic" + bytes(200))  # an iPhone photo renamed .png: not an image Pillow reads


# ------------------------------------------------------------------------------ 2: a folder's own val/
def test_a_folders_own_val_split_is_validated_on_whatever_val_fraction_says(tmp_path):
    data = tmp_path / "data"
    write_images(data / "train", per_class=6)
    write_images(data / "val", per_class=2)
    write_images(data / "test", per_class=3)
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--output", str(out), *QUICK]) == 0
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["name"] == "auto" and recipe["val_fraction"] == 0.0  # nothing held out of train/ ...
    results = json.loads((out / "results.json").read_text())
    assert results["val"] is not None and results["val"]["val_samples"] == 4  # ... and val/ measured
    assert results["test"]["samples"] == 6  # test/ stays the test set
    assert any(json.loads(line)["kind"] == "val" for line in (out / "metrics.jsonl").read_text().splitlines())


# ------------------------------------------------------------------------ 3: the auto batch, tiny folders
def test_the_auto_batch_and_estimate_count_the_training_part():
    tiny = DataFacts(num_images=8, num_classes=2, image_size=(32, 32), channels=3, class_counts=(4, 4))
    c = choose_recipe(tiny, LAPTOP)
    assert c.recipe.val_fraction == 0.1 and 1 <= c.recipe.batch_size <= 6  # 2 of the 8 are held out
    assert "of 6 images" in c.summary and "2 more held out" in c.summary
    many = DataFacts(num_images=360, num_classes=120, image_size=(16, 16), channels=3, class_counts=(3,) * 120)
    c = choose_recipe(many, LAPTOP)
    assert "of 240 images" in c.summary and "120 more held out" in c.summary
    assert c.recipe.batch_size <= 240
    # a source with its own val/ holds nothing out: all of train/ trains
    c = choose_recipe(DataFacts(num_images=8, num_classes=2, image_size=(32, 32), channels=3, has_val=True), LAPTOP)
    assert c.recipe.val_fraction == 0.0 and c.recipe.batch_size == 8 and "held out" not in c.summary
    assert choose_recipe(DataFacts(num_images=3, num_classes=2, image_size=(8, 8), channels=1,
                                   class_counts=(2, 1)), LAPTOP).recipe.batch_size == 2


@pytest.mark.parametrize("counts", [(4, 4), (2, 1), (3,) * 7, (1, 1, 1), (200, 4), (10, 25, 2), (41, 39, 40)])
def test_the_held_out_count_is_the_splits_own(counts):
    targets = [c for c, n in enumerate(counts) for _ in range(n)]
    facts = DataFacts(num_images=len(targets), num_classes=len(counts), image_size=(8, 8), channels=1,
                      class_counts=counts)
    assert held_out_images(facts, 0.1) == len(stratified_split(targets, 0.1, seed=3)[1])


def test_a_tiny_folder_trains_with_the_auto_recipe(tmp_path, caplog):
    data = write_images(tmp_path / "data", per_class=4)  # 2 x 4 images: 6 train after the hold-out
    with caplog.at_level(logging.INFO, logger="vitlab"):
        assert main(["train", "--data", str(data), "--output", str(tmp_path / "run"), *QUICK]) == 0
    assert "batch 6," in caplog.text
    assert json.loads((tmp_path / "run" / "results.json").read_text())["steps"] == 2


# --------------------------------------------------------------------- 4: split folders, whatever their case
@pytest.mark.parametrize("names", [("Train", None, "Test"), ("training", "Validation", "testing"),
                                   ("TRAIN", "Valid", None)])
def test_split_folder_names_are_recognised_whatever_their_case(tmp_path, names):
    train_name, val_name, test_name = names
    write_images(tmp_path / train_name, classes=("cat", "dog"), per_class=5)
    for name in (val_name, test_name):
        if name:
            write_images(tmp_path / name, classes=("cat", "dog"), per_class=2)
    train = build_dataset(tmp_path, split="train", val_fraction=0.0)
    assert train.classes == ["cat", "dog"] and len(train) == 10  # not a 2-class Train-vs-Test classifier
    test = build_dataset(tmp_path, split="test", val_fraction=0.0)
    assert len(test) == 4 and {os.path.basename(os.path.dirname(os.path.dirname(p))) for p in test.paths} == \
        {test_name or val_name}


def test_two_folders_naming_one_split_are_refused(tmp_path):
    write_images(tmp_path / "train", per_class=2)
    write_images(tmp_path / "Training", per_class=2)
    with pytest.raises(DatasetError, match="Training and train both name the train split"):
        build_dataset(tmp_path)


# ---------------------------------------------------------------------------- 5: a class called train
def test_a_class_called_train_is_a_class(tmp_path):
    write_images(tmp_path, classes=("bus", "car", "train"), per_class=3)
    ds = build_dataset(tmp_path, split="train", val_fraction=0.0)
    assert ds.classes == ["bus", "car", "train"] and ds.class_counts() == [3, 3, 3]


def test_a_train_folder_with_sub_folders_beside_classes_says_how_to_proceed(tmp_path):
    write_images(tmp_path, classes=("bus", "car"), per_class=3)
    write_images(tmp_path / "train", classes=("side", "front"), per_class=2)  # a class kept in sub-folders?
    with pytest.raises(DatasetError, match=r"train/ was taken for the training split.*bus, car.*"
                                           r"If 'train' is a class, rename its folder"):
        build_dataset(tmp_path)


# ------------------------------------------------------------------------ 6: per-class accuracy in JSON
class _Fixed(nn.Module):
    def forward(self, x):
        return torch.tensor([[2.0, 1.0, 0.0]]).expand(x.shape[0], 3)  # always class 0


def test_the_accuracy_of_a_class_without_images_is_null_in_json():
    ds = TensorImageDataset(torch.zeros(4, 1, 4, 4, dtype=torch.uint8), [0, 0, 1, 1], classes=["a", "b", "c"],
                            source="three classes, c absent", transform=lambda x: x.float() / 255)
    r = evaluate(_Fixed(), ds, num_classes=3, class_names=ds.classes)
    assert r.per_class[:2] == [1.0, 0.0] and math.isnan(r.per_class[2])
    per_class = r.per_class_json()
    assert per_class == {"a": 1.0, "b": 0.0, "c": None}
    assert json.loads(json.dumps(per_class, allow_nan=False)) == per_class  # valid JSON: null, not NaN


# -------------------------------------------------------------------------------- 7: symbolic-link loops
def test_a_symlink_loop_is_not_followed(tmp_path, caplog):
    write_images(tmp_path, per_class=5)
    os.symlink("..", tmp_path / "a" / "up")
    with caplog.at_level(logging.WARNING):
        ds = build_dataset(tmp_path, split="train", val_fraction=0.0)
    assert ds.class_counts() == [5, 5] and not any("/b/" in p for p in ds.paths[:5])
    assert f"{tmp_path / 'a' / 'up'}: a link to {os.path.realpath(tmp_path)}" in caplog.text
    assert caplog.text.count("symbolic-link loop") == 1
    assert len(expand_image_paths([tmp_path / "a"])) == 5


def test_a_linked_class_folder_and_linked_files_still_count(tmp_path):
    write_images(tmp_path / "elsewhere", classes=("real",), per_class=3)
    write_images(tmp_path / "data", classes=("a",), per_class=3)
    os.symlink(tmp_path / "elsewhere" / "real", tmp_path / "data" / "b")
    os.symlink(tmp_path / "elsewhere" / "real", tmp_path / "data" / "a" / "more")  # another folder: followed
    ds = build_dataset(tmp_path / "data", split="train", val_fraction=0.0)
    assert ds.class_counts() == [6, 3]


# ------------------------------------------------------------------------ 8: the small-class advice
def test_the_small_class_advice_fits_the_layout(tmp_path, caplog):
    flat = write_images(tmp_path / "flat", classes=tuple("abcdef"), per_class=3)
    with caplog.at_level(logging.WARNING):
        build_dataset(flat, split="train", val_fraction=0.1)
    assert "the held-out split takes 6 of 18" in caplog.text
    assert "val_fraction=0" not in caplog.text and f"{flat}/val/<class>/" in caplog.text
    with pytest.raises(DatasetError, match="split 'test' is empty"):  # why: the held-out part is the test set
        build_dataset(flat, split="test", val_fraction=0.0)
    caplog.clear()
    split = tmp_path / "split"
    write_images(split / "train", classes=tuple("abcdef"), per_class=3)
    write_images(split / "test", classes=tuple("abcdef"), per_class=1)
    with caplog.at_level(logging.WARNING):
        build_dataset(split, split="train", val_fraction=0.1)
    assert "--set val_fraction=0 keeps them all for training" in caplog.text
    assert len(build_dataset(split, split="test", val_fraction=0.0)) == 6  # the advice works


# ---------------------------------------------------------------------------- 9: --skip-bad-images
def test_a_class_without_a_readable_image_is_refused(tmp_path, caplog):
    data = write_images(tmp_path / "data", classes=("a", "b", "c"), per_class=6)
    garble(*(data / "c").iterdir())
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        assert main(["train", "--data", str(data), "--output", str(out), "--skip-bad-images", *QUICK]) == 2
    text = caplog.text  # 15 training images (one of each class held out), c's 5 undecodable
    assert "10 images decoded into memory" in text and "; 5 undecodable, skipped" in text
    assert "5 of 15 images undecodable, skipped (--skip-bad-images): c 5 of 5" in text  # per class
    error = next(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    assert "class(es) 'c' have no readable training image" in error and "\n" not in error
    assert not (out / "model.safetensors").exists()


def test_running_out_of_batches_is_a_one_line_error(tmp_path, caplog):
    data = tmp_path / "data"
    write_images(data / "val", per_class=1)
    train = write_images(data / "train", per_class=8)
    garble(*sorted((train / "a").iterdir())[1:], *sorted((train / "b").iterdir())[1:])  # 2 readable of 16
    with caplog.at_level(logging.INFO):
        code = main(["train", "--data", str(data), "--output", str(tmp_path / "run"), "--skip-bad-images", "--steps",
                     "8", "--workers", "0", "--set", "cache_images=false", *TINY])
    assert code == 2
    (error,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert error.startswith("error: training stopped at step") and "ran out of batches" in error
    assert "undecodable and skipped (--skip-bad-images)" in error and "\n" not in error


def test_the_out_of_batches_error_is_a_data_error():
    from vitlab.train.trainer import OutOfBatchesError

    assert issubclass(OutOfBatchesError, DatasetError) and issubclass(OutOfBatchesError, ValueError)


# ---------------------------------------------------------------------------- 10: file extensions
def test_jpeg_aliases_and_avif_are_images(tmp_path):
    write_images(tmp_path, per_class=1, ext="jfif", fmt="JPEG")
    for c in ("a", "b"):
        Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / c / "x.jpe", format="JPEG")
        Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / c / "y.JFIF", format="JPEG")
    expected = 3
    if features.check("avif"):
        for c in ("a", "b"):
            Image.new("RGB", (8, 8), (10, 200, 10)).save(tmp_path / c / "z.avif", format="AVIF")
        expected = 4
        assert ".avif" in IMAGE_EXTENSIONS
    ds = build_dataset(tmp_path, split="train", val_fraction=0.0)
    assert ds.class_counts() == [expected, expected]
    assert all(ds.load(i).shape == (3, 8, 8) for i in range(len(ds)))
    assert {".jfif", ".jpe"} <= set(IMAGE_EXTENSIONS) and ".mpg" not in IMAGE_EXTENSIONS


# ---------------------------------------------------------------------------------------------- minor
def test_an_empty_class_folder_in_val_is_a_class_absent_from_val(tmp_path):
    write_images(tmp_path / "train", per_class=4)
    write_images(tmp_path / "val", classes=("a",), per_class=2)
    (tmp_path / "val" / "b").mkdir()  # as if b were left out of val/
    val = build_dataset(tmp_path, split="val")
    assert val.classes == ["a", "b"] and val.targets == [0, 0]


def test_finetuning_a_grayscale_checkpoint_on_colour_data_warns(tmp_path, caplog):
    import vitlab
    from vitlab.checkpoints import save_model

    model = vitlab.create_model("vit_tiny_patch16_224", num_classes=2, img_size=16, in_chans=1, patch_size=4,
                                embed_dim=16, depth=1, num_heads=2, mean=(0.5,), std=(0.5,))
    save_model(model, tmp_path / "grey.safetensors", class_names=["x", "y"])
    data = write_images(tmp_path / "colour", per_class=4, size=16)
    with caplog.at_level(logging.WARNING):
        assert main(["finetune", "--from", str(tmp_path / "grey.safetensors"), "--data", str(data), "--img-size",
                     "16", "--output", str(tmp_path / "ft"), "--steps", "1", "--batch-size", "4", "--threads", "1",
                     "--no-progress", "--set", "global_batch=none", "--set", "warmup_steps=0"]) == 0
    assert "takes 1-channel (grayscale) images: the colour images of" in caplog.text
