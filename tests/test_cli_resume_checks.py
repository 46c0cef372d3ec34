"""What a run records and what later commands check against it: --resume on other data, --output in a folder
that is not a run, eval / fewshot on the run's own held-out split, and --resume of a detection run."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dense_helpers import DETR_TINY, write_fake_mnist
from vitlab.cli.main import main

torch.set_num_threads(1)

# a tiny ViT on 8x8 grey images, a few steps; a quarter of each class held out (a flat folder's test split)
TINY = ["--recipe", "digits", "--threads", "1", "--no-progress", "--batch-size", "8", "--steps", "2",
        "--set", "model_overrides.depth=1", "--set", "model_overrides.embed_dim=16",
        "--set", "model_overrides.num_heads=2", "--set", "val_fraction=0.25"]


def write_folder(root: Path, classes: tuple[str, ...] = ("cat", "dog", "ship"), per_class: int = 8) -> Path:
    """A flat class folder (no train/ val/ test/) of 8x8 grey PNGs: class i is brighter rows."""
    g = np.random.default_rng(0)
    for i, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for j in range(per_class):
            img = g.integers(0, 64, size=(8, 8)).astype(np.uint8)
            img[i % 8] = 255
            Image.fromarray(img, mode="L").save(root / name / f"{j}.png")
    return root


@pytest.fixture(scope="module")
def run_a(tmp_path_factory) -> Path:
    """A finished run on a folder with classes cat, dog, ship."""
    tmp = tmp_path_factory.mktemp("resume")
    write_folder(tmp / "A", ("cat", "dog", "ship"))
    out = tmp / "run"
    assert main(["train", "--data", str(tmp / "A"), "--output", str(out), *TINY]) == 0
    return out


def _copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


# ---------------------------------------------------------------------------------------- --resume on other data


def test_resume_on_data_with_other_class_names_is_refused(run_a, tmp_path, caplog):
    out = _copy_run(run_a, tmp_path / "run")
    other = write_folder(tmp_path / "B", ("cat", "dog", "frog"))  # the same count, other classes
    job = (out / "job.json").read_text()
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(["train", "--output", str(out), "--resume", "--data", str(other), *TINY, "--steps", "3"]) == 2
    assert "cat, dog, ship" in caplog.text and "cat, dog, frog" in caplog.text
    assert str(other) in caplog.text and "A" in caplog.text
    assert (out / "job.json").read_text() == job  # nothing rewritten
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == 2


def test_resume_of_a_run_without_recorded_classes_checks_the_checkpoints(run_a, tmp_path, caplog):
    """A run written before job.json recorded its classes: the checkpoint's class names are the reference."""
    out = _copy_run(run_a, tmp_path / "run")
    job = json.loads((out / "job.json").read_text())
    (out / "job.json").write_text(json.dumps({k: job[k] for k in ("data", "model", "pretrained", "skip_bad_images")}))
    other = write_folder(tmp_path / "B", ("cat", "dog", "frog"))
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(["train", "--output", str(out), "--resume", "--data", str(other), *TINY, "--steps", "3"]) == 2
    assert "cat, dog, ship" in caplog.text and "frog" in caplog.text


def test_resume_on_another_source_with_the_same_classes_warns(run_a, tmp_path, caplog):
    out = _copy_run(run_a, tmp_path / "run")
    moved = shutil.copytree(run_a.parent / "A", tmp_path / "A_copy")
    shutil.copy(moved / "cat" / "0.png", moved / "cat" / "extra.png")  # other files (an identical copy: a note)
    with caplog.at_level(logging.WARNING, logger="vitlab"):
        assert main(["train", "--output", str(out), "--resume", "--data", str(moved), *TINY, "--steps", "3"]) == 0
    assert "was trained on" in caplog.text and str(moved) in caplog.text
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == 3


# ---------------------------------------------------------------------------------------- --output not a run


def test_output_folder_that_is_not_a_run_is_refused_and_its_files_kept(tmp_path, caplog):
    data = write_folder(tmp_path / "A", ("cat", "dog"))
    mine = tmp_path / "myproj"
    mine.mkdir()
    text = json.dumps({"description": "my own recipe", "model": "vit_tiny_patch16_224", "img_size": 8,
                       "model_overrides": {"patch_size": 2, "depth": 1, "embed_dim": 16, "num_heads": 2},
                       "batch_size": 8, "max_steps": 2, "val_fraction": 0.0})
    (mine / "recipe.json").write_text(text)
    base = ["train", "--data", str(data), "--threads", "1", "--no-progress", "--output", str(mine)]
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        # the user's recipe.json, also given as --recipe, is never replaced (--overwrite or not)
        assert main([*base, "--recipe", str(mine / "recipe.json")]) == 2
        assert "would be replaced" in caplog.text
        assert main([*base, "--recipe", str(mine / "recipe.json"), "--overwrite"]) == 2
        caplog.clear()
        # nor is it when another recipe is named: the folder is not a run
        assert main([*base, *TINY]) == 2
        assert "not a vitlab run" in caplog.text and "recipe.json" in caplog.text
        caplog.clear()
        assert main([*base, *TINY, "--overwrite"]) == 2
        assert "not a vitlab run" in caplog.text and "recipe.json" in caplog.text
    assert (mine / "recipe.json").read_text() == text
    assert sorted(p.name for p in mine.iterdir()) == ["recipe.json"]


def test_output_folder_with_other_files_needs_overwrite_and_keeps_them(tmp_path, caplog):
    data = write_folder(tmp_path / "A", ("cat", "dog"))
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    base = ["train", "--data", str(data), "--output", str(folder), *TINY]
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(base) == 2
    assert "not a vitlab run" in caplog.text and "notes.txt" in caplog.text and "--overwrite" in caplog.text
    assert main([*base, "--overwrite"]) == 0  # written beside the user's file
    assert (folder / "notes.txt").read_text() == "mine" and (folder / "model.safetensors").is_file()
    # now a run: --resume and --overwrite work on it as on any run
    assert main([*base, "--resume", "--steps", "3"]) == 0
    assert main([*base, "--overwrite"]) == 0
    assert (folder / "notes.txt").read_text() == "mine"


def test_an_existing_empty_folder_is_a_fine_output(tmp_path):
    data = write_folder(tmp_path / "A", ("cat", "dog"))
    (tmp_path / "empty").mkdir()
    assert main(["train", "--data", str(data), "--output", str(tmp_path / "empty"), *TINY]) == 0


# ---------------------------------------------------------------------------------------- the run's held-out split


@pytest.fixture(scope="module")
def seeded_run(tmp_path_factory) -> Path:
    """A run on a flat folder with its own seed and held-out share (the folder has no val/ or test/)."""
    tmp = tmp_path_factory.mktemp("split")
    write_folder(tmp / "F", ("cat", "dog", "ship"))
    out = tmp / "run"
    assert main(["train", "--data", str(tmp / "F"), "--output", str(out), *TINY, "--seed", "3"]) == 0
    return out


def _eval(checkpoint: Path, data: Path, out: Path, *extra: str) -> list:
    return ["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--threads", "1", "--output", str(out),
            "--json", *extra]


def test_eval_uses_the_runs_held_out_split(seeded_run, tmp_path, caplog):
    from vitlab.data import build_dataset

    data = seeded_run.parent / "F"
    held_out = build_dataset(data, split="val", val_fraction=0.25, seed=3)
    with caplog.at_level(logging.INFO, logger="vitlab"):
        assert main(_eval(seeded_run / "model.safetensors", data, tmp_path / "e")) == 0
    assert "seed 3, val_fraction 0.25" in caplog.text and "may hold" not in caplog.text
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["samples"] == len(held_out)
    caplog.clear()
    # an explicit other seed is the user's choice: used, with a warning that the split overlaps training
    with caplog.at_level(logging.WARNING, logger="vitlab"):
        assert main(_eval(seeded_run / "model.safetensors", data, tmp_path / "e0", "--seed", "0")) == 0
    assert "holds images it trained on" in caplog.text


def test_eval_of_a_checkpoint_without_its_run_warns_about_the_split(seeded_run, tmp_path, caplog):
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(seeded_run / "model.safetensors", alone / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="vitlab"):
        assert main(_eval(alone / "model.safetensors", seeded_run.parent / "F", tmp_path / "e")) == 0
    assert "no run record" in caplog.text and "may hold its training images" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vitlab"):
        assert main(_eval(alone / "model.safetensors", seeded_run.parent / "F", tmp_path / "e2", "--seed", "3",
                          "--val-fraction", "0.25")) == 0
    assert "may hold" not in caplog.text


def test_fewshot_and_analyze_use_the_runs_held_out_split(seeded_run, tmp_path, caplog):
    data = seeded_run.parent / "F"
    with caplog.at_level(logging.INFO):
        assert main(["fewshot", "--checkpoint", str(seeded_run / "model.safetensors"), "--data", str(data),
                     "--shots", "1", "--seeds", "1", "--threads", "1", "--json"]) == 0
    assert "val_fraction=0.25, seed=3" in caplog.text and "may hold" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(["analyze", "--checkpoint", str(seeded_run / "model.safetensors"), "--data", str(data),
                     "--num-images", "2", "--components", "2", "--threads", "1",
                     "--output", str(tmp_path / "an")]) == 0
    assert "val_fraction=0.25, seed=3" in caplog.text


# ---------------------------------------------------------------------------------------- dense --resume


@pytest.fixture(scope="module")
def canvases(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("dense_resume")
    mnist = write_fake_mnist(tmp / "mnist")
    assert main(["make-canvases", "--mnist", str(mnist), "--output", str(tmp / "c"), "--train", "4", "--val", "2",
                 "--size", "32"]) == 0
    return tmp / "c"


def test_detection_resume_continues_from_the_run_directory_alone(canvases, tmp_path, caplog):
    recipe = tmp_path / "detr.json"
    recipe.write_text(json.dumps({"model": "detr_resnet50", "model_overrides": DETR_TINY, "img_size": 32,
                                  "max_steps": 2, "batch_size": 2, "hflip": 0.0, "cpu_threads": 1}))
    out = tmp_path / "run"
    assert main(["train", "--task", "detection", "--data", str(canvases), "--recipe", str(recipe),
                 "--output", str(out), "--no-progress"]) == 0
    assert json.loads((out / "job.json").read_text())["task"] == "detection"
    # no --task, --data or --recipe: the run's own (its recipe's img_size 32, not the default recipe's)
    assert main(["train", "--output", str(out), "--resume", "--steps", "3", "--no-progress", "--threads", "1"]) == 0
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == 3
    # a run written before dense runs had a job.json: --task and --data given, the recipe is still the run's
    (out / "job.json").unlink()
    assert main(["train", "--task", "detection", "--data", str(canvases), "--output", str(out), "--resume",
                 "--steps", "4", "--no-progress", "--threads", "1"]) == 0
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == 4
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(["train", "--task", "segmentation", "--output", str(out), "--resume", "--no-progress"]) == 2
    assert "detection run" in caplog.text


def test_resume_may_not_change_the_held_out_split_or_take_a_new_budget(tmp_path, caplog):
    """A new seed or val_fraction on --resume re-drew the split (its test images were training images) and
    rewrote the run's record; --time-budget was ignored without a word."""
    from test_cli_train import FAST

    out = tmp_path / "run"
    assert main(["train", "--output", str(out), *FAST]) == 0
    recipe = (out / "recipe.json").read_text()
    for extra, said in ((["--seed", "3"], "held its validation images out with seed 0"),
                        (["--set", "val_fraction=0.5"], "val_fraction 0.0; this asks for seed 0, val_fraction 0.5"),
                        (["--time-budget", "5s"], "--time-budget with --resume")):
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="vitlab"):
            assert main(["train", "--output", str(out), "--resume", "--no-progress", *extra]) == 2
        assert said in caplog.text
    assert (out / "recipe.json").read_text() == recipe  # nothing rewritten


def test_the_auto_recipes_model_options_are_read_without_the_other_settings():
    """--model under the auto recipe is priced with its overrides; the other --set values are checked against the
    recipe the chooser then picks (its own lr), not against a default recipe's."""
    import argparse

    from vitlab.cli.train import built_model_options

    args = argparse.Namespace(img_size=24, overrides=["min_lr=0.0012", "model_overrides.depth=1"])
    assert built_model_options(args) == {"depth": 1, "img_size": 24}


def test_resuming_a_finished_run_with_other_settings_is_refused_and_writes_nothing(tmp_path, caplog):
    """A run that trained all its steps and is resumed with --set (and no more steps) would train nothing with the
    new settings: it was rewritten as if it had (its model file's recorded recipe, results.json). Refused now,
    naming the setting, with every file as it was; with more steps the new setting trains, and a plain --resume of
    the finished run still works."""
    data = write_folder(tmp_path / "data")
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--output", str(run), *TINY]) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with caplog.at_level(logging.ERROR):
        assert main(["train", "--resume", "--output", str(run), "--threads", "1", "--no-progress",
                     "--set", "label_smoothing=0.3"]) == 2
    assert "trained all its steps (2 of 2)" in caplog.text and "label_smoothing=0.3" in caplog.text
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert main(["train", "--resume", "--output", str(run), "--threads", "1", "--no-progress"]) == 0
    assert main(["train", "--resume", "--output", str(run), "--threads", "1", "--no-progress", "--steps", "3",
                 "--set", "label_smoothing=0.3"]) == 0
    assert json.loads((run / "results.json").read_text())["steps"] == 3
