"""The auto recipe (train/auto.py) on data that is not plain square colour pictures in even classes: grey pictures
saved as RGB, non-square pictures (squashed whole), imbalanced classes."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.train.auto import DataFacts, choose_recipe, data_facts, facts_for_source
from vitlab.train.hardware import Hardware

LAPTOP = Hardware(cores=2, threads=2, memory_gb=8, cpu_bf16=False)


def write_pictures(root, *, grey: bool, classes=("a", "b", "c"), per_class=6, size=(12, 12), fmt="png"):
    """RGB files under root/<class>/: grey pictures (R == G == B) or colour ones; each class a vertical bar at
    its own column, so that mirroring changes the class."""
    rng = np.random.default_rng(0)
    h, w = size
    for ci, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            v = rng.integers(0, 60, (h, w)).astype(np.uint8)
            v[:, ci % w] = 250
            rgb = np.stack([v, v, v], -1) if grey else np.stack([v, 255 - v, v // 2], -1)
            Image.fromarray(rgb, mode="RGB").save(root / c / f"{i}.{fmt}")
    return root


# ------------------------------------------------------------------------- grey pictures stored as RGB
@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_grey_pictures_stored_as_rgb_are_grey_for_the_flips(tmp_path, fmt):
    grey = facts_for_source(str(write_pictures(tmp_path / "grey", grey=True, fmt=fmt)))
    colour = facts_for_source(str(write_pictures(tmp_path / "colour", grey=False, fmt=fmt)))
    assert colour.channels == 3 and not colour.grey_rgb
    assert grey.grey_rgb == (grey.channels == 3)  # three channels kept for the model, grey for the choices
    g, c = choose_recipe(grey, LAPTOP), choose_recipe(colour, LAPTOP)
    assert g.recipe.hflip == 0.0 and c.recipe.hflip == 0.5
    assert "grey pictures stored as RGB: no flips" in g.summary and "flips" in c.summary
    assert "grey pictures" not in c.summary


def test_grey_pictures_stored_as_rgb_get_no_randaugment_in_long_runs():
    facts = DataFacts(num_images=2000, num_classes=10, image_size=(28, 28), channels=3)
    long_budget = 10 * 3600  # enough for the wanted epochs: a long run
    colour = choose_recipe(facts, LAPTOP, time_budget_s=long_budget).recipe
    grey = choose_recipe(DataFacts(**{**facts.__dict__, "grey_rgb": True}), LAPTOP, time_budget_s=long_budget).recipe
    assert colour.randaugment is not None and colour.hflip == 0.5
    assert grey.randaugment is None and grey.hflip == 0.0
    assert grey.scale[0] == 0.8  # small grey pictures keep most of the picture, as 1-channel ones do


def test_one_colour_picture_among_the_sample_makes_the_data_colour(tmp_path):
    root = write_pictures(tmp_path / "data", grey=True)
    Image.fromarray(np.full((12, 12, 3), (200, 30, 30), np.uint8)).save(root / "b" / "0.png")
    from vitlab.data import build_dataset

    assert not data_facts(build_dataset(str(root), split="train", val_fraction=0.0)).grey_rgb


# -------------------------------------------------------------------------------- non-square pictures
@pytest.mark.parametrize("size", [(28, 56), (56, 28), (16, 256)])
def test_non_square_pictures_are_squashed_whole_and_cropped_with_their_own_aspect(size):
    """A 2:1 picture's square centre crop kept half of it (a 16x256 one 6%), and no crop of >= 80% of its area
    had an aspect in 0.8-1.25, so training fell back to one fixed crop every time."""
    facts = DataFacts(num_images=3000, num_classes=100, image_size=size, channels=1)
    choice = choose_recipe(facts, LAPTOP)
    aspect = size[1] / size[0]
    lo, hi = choice.recipe.ratio
    assert choice.recipe.model_overrides["crop_mode"] == "squash"
    assert lo < aspect < hi and hi / lo == pytest.approx(1.25 / 0.8)
    assert "whole pictures squashed to the square" in choice.summary


def test_a_non_square_run_evaluates_and_exports_the_whole_picture(tmp_path):
    """End to end: the checkpoint records crop_mode "squash", so eval's transform sees every column."""
    import vitlab
    from vitlab.cli.main import main
    from vitlab.data import eval_transform

    root = write_pictures(tmp_path / "data", grey=False, size=(8, 24), per_class=4)
    assert main(["train", "--data", str(root), "--steps", "2", "--threads", "1", "--no-progress",
                 "--output", str(tmp_path / "run")]) == 0
    model = vitlab.load_model(tmp_path / "run" / "model.safetensors")
    assert model.preprocessing.crop_mode == "squash"
    x = torch.zeros(3, 8, 24, dtype=torch.uint8)
    x[:, :, -1] = 255  # the last column only: a centre crop drops it
    assert float(eval_transform(model.preprocessing)(x).amax()) > float(eval_transform(model.preprocessing)(
        torch.zeros_like(x)).amax())


@pytest.mark.parametrize("size", [(28, 28), (375, 500), (64, 48), (32, 48)])
def test_square_and_photo_shaped_pictures_get_no_warning(size, caplog):
    with caplog.at_level(logging.WARNING, logger="vitlab"):
        choose_recipe(DataFacts(num_images=3000, num_classes=10, image_size=size, channels=3), LAPTOP)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# ------------------------------------------------------------------------------------ imbalanced classes
def test_strongly_imbalanced_classes_are_named_with_both_counts(caplog):
    counts = (1000, 600, 200, 50, 10)
    facts = DataFacts(num_images=sum(counts), num_classes=5, image_size=(16, 16), channels=3, class_counts=counts)
    with caplog.at_level(logging.WARNING, logger="vitlab"):
        choose_recipe(facts, LAPTOP)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1
    assert "1,000 images" in warned[0] and "the smallest 10 (100x)" in warned[0] and "`vitlab eval`" in warned[0]


def test_mildly_imbalanced_classes_get_no_warning(caplog):
    counts = (1000, 500, 101)
    facts = DataFacts(num_images=sum(counts), num_classes=3, image_size=(16, 16), channels=3, class_counts=counts)
    with caplog.at_level(logging.WARNING, logger="vitlab"):
        choose_recipe(facts, LAPTOP)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_create_model_takes_preprocessing_the_family_fixes(tmp_path):
    """crop_mode is no config field of CCT or ViT: create_model sets it on the model's preprocessing (as timm's
    pretrained_cfg_overlay does), a checkpoint keeps it, and a caller's value wins over the checkpoint's."""
    import vitlab

    model = vitlab.create_model("cct_7_3x2_32", num_classes=3, img_size=16, depth=1, crop_mode="squash")
    assert model.preprocessing.crop_mode == "squash"
    path = vitlab.save_model(model, tmp_path / "m.safetensors")
    assert vitlab.load_model(path).preprocessing.crop_mode == "squash"
    again = vitlab.create_model("cct_7_3x2_32", pretrained=path, crop_mode="center")
    assert again.preprocessing.crop_mode == "center"
    with pytest.raises(ValueError, match="crop_mode must be 'center' or 'squash'"):
        vitlab.create_model("cct_7_3x2_32", num_classes=3, img_size=16, depth=1, crop_mode="border")
