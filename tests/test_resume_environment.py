"""--resume in a changed environment: what the run records is what continues it (its --skip-bad-images, its
recipe when recipe.json is gone), a moved teacher or data folder is found again by a new path, options a resumed
run would not use are refused rather than recorded, and --compile switched on resume is warned of and recorded.
Also: --time-budget prices the model the run builds (its overrides and --img-size)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from test_cli_resume_checks import TINY, write_folder
from vitlab.cli.main import main

torch.set_num_threads(1)

# a tiny ViT on 8x8 grey images; a quarter of each class held out
RESUME = ["--resume", "--threads", "1", "--no-progress"]


def step_of(run: Path) -> int:
    return int(torch.load(run / "train_state.pt", weights_only=False)["step"])


def job_of(run: Path) -> dict:
    return json.loads((run / "job.json").read_text())


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """A finished 2-step run on the bundled digits: a checkpoint to fine-tune from, or to distil from."""
    out = tmp_path_factory.mktemp("env") / "digits"
    assert main(["train", "--data", "digits", "--output", str(out), *TINY]) == 0
    return out


# ------------------------------------------------------------------------------ --skip-bad-images on --resume


@pytest.mark.parametrize("command", ["train", "finetune"])
def test_a_run_that_skipped_bad_images_resumes_skipping_them(digits_run, tmp_path, caplog, command):
    data = write_folder(tmp_path / "data")
    (data / "cat" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # not decodable
    out = tmp_path / "run"
    start = (["train", *TINY] if command == "train" else
             ["finetune", "--from", str(digits_run / "model.safetensors"), "--set", "global_batch=none",
              "--batch-size", "8", "--steps", "2", "--threads", "1", "--no-progress"])
    assert main([*start, "--data", str(data), "--output", str(out), "--skip-bad-images"]) == 0
    assert job_of(out)["skip_bad_images"] is True
    with caplog.at_level(logging.INFO, logger="vitlab"):
        assert main([command, "--output", str(out), *RESUME, "--steps", "3"]) == 0
    assert step_of(out) == 3
    assert "skipped, as the run did" in caplog.text
    assert job_of(out)["skip_bad_images"] is True


def test_pretrain_resumes_skipping_bad_images(tmp_path):
    data = write_folder(tmp_path / "data")
    for i in range(3):  # pre-training holds out a tenth of each class: some are training images
        (data / "dog" / f"bad{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    out = tmp_path / "run"
    assert main(["pretrain", "--method", "mpp", "--recipe", "digits", "--data", str(data), "--output", str(out),
                 "--batch-size", "8", "--steps", "2", "--threads", "1", "--no-progress", "--skip-bad-images",
                 "--set", "model_overrides.depth=1", "--set", "model_overrides.embed_dim=16",
                 "--set", "model_overrides.num_heads=2"]) == 0
    assert main(["pretrain", "--output", str(out), *RESUME, "--steps", "3"]) == 0
    assert step_of(out) == 3


# ------------------------------------------------------------------------------ finetune --resume --from OTHER


def test_finetune_resume_keeps_its_source_and_refuses_another_from(digits_run, tmp_path, caplog):
    source = str(digits_run / "model.safetensors")
    other = tmp_path / "other.safetensors"
    shutil.copy(source, other)
    out = tmp_path / "ft"
    ft = ["--set", "global_batch=none", "--batch-size", "16", "--threads", "1", "--no-progress"]
    assert main(["finetune", "--from", source, "--data", "digits", "--output", str(out), *ft, "--steps", "2"]) == 0
    job = (out / "job.json").read_text()
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(["finetune", "--output", str(out), "--resume", "--from", str(other), *ft, "--steps", "3"]) == 2
    assert f"fine-tunes from {source}" in caplog.text and "leave --from out" in caplog.text
    assert (out / "job.json").read_text() == job and step_of(out) == 2  # nothing rewritten
    # the run's own source repeated (here as a relative path), or left out: it goes on, and the record names it
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vitlab"):
        assert main(["finetune", "--output", str(out), "--resume", "--from",
                     os.path.relpath(source), *ft, "--steps", "3"]) == 0
    assert job_of(out)["pretrained"] == source and step_of(out) == 3
    assert f"{source} is not read" in caplog.text
    assert main(["finetune", "--output", str(out), "--resume", *ft, "--steps", "4"]) == 0
    assert job_of(out)["pretrained"] == source and step_of(out) == 4


# ------------------------------------------------------------------------------ --resume --epochs on a steps run


def test_resume_refuses_epochs_for_a_run_whose_length_is_its_steps(digits_run, tmp_path, caplog):
    out = shutil.copytree(digits_run, tmp_path / "run")
    recipe = (out / "recipe.json").read_text()
    for extra in (["--epochs", "10"], ["--set", "epochs=10"]):
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="vitlab"):
            assert main(["train", "--output", str(out), *RESUME, *extra]) == 2
        assert "--steps N" in caplog.text and "2 steps long" in caplog.text
    assert (out / "recipe.json").read_text() == recipe and step_of(out) == 2
    assert main(["train", "--output", str(out), *RESUME, "--steps", "3"]) == 0  # another length: --steps
    assert step_of(out) == 3


# ------------------------------------------------------------------------------ a distillation teacher moved


def test_a_moved_teacher_is_given_by_its_new_path(digits_run, tmp_path, caplog):
    teacher = tmp_path / "teacher.safetensors"
    shutil.copy(digits_run / "model.safetensors", teacher)
    out = tmp_path / "student"
    assert main(["train", "--data", "digits", "--output", str(out), *TINY, "--seed", "1",
                 "--teacher", str(teacher)]) == 0
    fingerprint = job_of(out)["distill"]["fingerprint"]
    moved = tmp_path / "moved" / "teacher.safetensors"
    moved.parent.mkdir()
    teacher.rename(moved)
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(["train", "--output", str(out), *RESUME, "--steps", "3"]) == 2
    assert "is not there any more" in caplog.text and "--teacher NEWPATH" in caplog.text
    assert step_of(out) == 2
    assert main(["train", "--output", str(out), *RESUME, "--steps", "3", "--teacher", str(moved)]) == 0
    distill = job_of(out)["distill"]
    assert distill["teacher"] == str(moved) and distill["moved_from"] == [str(teacher)]
    assert distill["fingerprint"] == fingerprint and step_of(out) == 3
    # then plain --resume finds it at the recorded new path
    assert main(["train", "--output", str(out), *RESUME, "--steps", "4"]) == 0
    assert step_of(out) == 4
    # a teacher with other weights at a new path is refused
    other = tmp_path / "other"
    assert main(["train", "--data", "digits", "--output", str(other), *TINY, "--seed", "2"]) == 0
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(["train", "--output", str(out), *RESUME, "--steps", "5", "--teacher",
                     str(other / "model.safetensors")]) == 2
    assert "not the teacher this run distilled from" in caplog.text and "weights differ" in caplog.text
    assert job_of(out)["distill"]["teacher"] == str(moved) and step_of(out) == 4


# ------------------------------------------------------------------------------ the data folder moved


def test_a_moved_data_folder_is_named_and_continued_with_data(tmp_path, caplog):
    data = write_folder(tmp_path / "A")
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--output", str(out), *TINY]) == 0
    moved = data.rename(tmp_path / "B")
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(["train", "--output", str(out), *RESUME, "--steps", "3"]) == 2
    assert "cannot be read any more" in caplog.text and "--data NEWPATH" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vitlab"):
        assert main(["train", "--output", str(out), *RESUME, "--steps", "3", "--data", str(moved)]) == 0
    assert step_of(out) == 3
    # the same files at the new path (split_from): a note, no warning that the run will not match
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not any("was trained on" in m for m in warnings), warnings
    assert "holds the training files the run recorded" in caplog.text


def test_a_copy_with_other_files_is_still_warned_of(tmp_path, caplog):
    data = write_folder(tmp_path / "A")
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--output", str(out), *TINY]) == 0
    grown = shutil.copytree(data, tmp_path / "B")
    shutil.copy(grown / "cat" / "0.png", grown / "cat" / "extra.png")
    with caplog.at_level(logging.WARNING, logger="vitlab"):
        assert main(["train", "--output", str(out), *RESUME, "--steps", "3", "--data", str(grown)]) == 0
    assert "will not match an uninterrupted run" in caplog.text


def test_resume_without_recipe_json_takes_the_recipe_from_the_training_state(tmp_path, caplog):
    data = write_folder(tmp_path / "A")
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--output", str(out), *TINY]) == 0
    recipe = json.loads((out / "recipe.json").read_text())
    (out / "recipe.json").unlink()
    with caplog.at_level(logging.WARNING, logger="vitlab"):
        assert main(["train", "--output", str(out), *RESUME, "--steps", "3"]) == 0
    assert "recipe.json is missing" in caplog.text.replace(str(out) + "/", "")
    assert step_of(out) == 3
    again = json.loads((out / "recipe.json").read_text())
    assert again["model_overrides"] == recipe["model_overrides"] and again["name"] == recipe["name"]
    assert again["max_steps"] == 3


# ------------------------------------------------------------------------------ --compile switched on resume


def test_compile_switched_on_resume_is_warned_of_and_recorded(digits_run, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)  # a real compile takes long on a CPU
    out = shutil.copytree(digits_run, tmp_path / "run")
    assert job_of(out)["compile"] is False
    with caplog.at_level(logging.WARNING, logger="vitlab"):
        assert main(["train", "--output", str(out), *RESUME, "--steps", "3", "--compile"]) == 0
    assert "will not match an uninterrupted run bitwise" in caplog.text
    job = job_of(out)
    assert job["compile"] is True and job["compile_changes"] == [{"from_step": 3, "compile": [False, True]}]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vitlab"):
        assert main(["train", "--output", str(out), *RESUME, "--steps", "4", "--compile"]) == 0  # as it was
        assert "bitwise" not in caplog.text
        assert main(["train", "--output", str(out), *RESUME, "--steps", "5"]) == 0  # dropped again
    assert "bitwise" in caplog.text
    assert job_of(out)["compile_changes"] == [{"from_step": 3, "compile": [False, True]},
                                              {"from_step": 5, "compile": [True, False]}]


# ------------------------------------------------------------------------------ --time-budget with --model


def test_time_budget_prices_the_model_with_its_overrides_and_size(tmp_path, monkeypatch):
    import vitlab.train.hardware as hardware
    from vitlab.cli.train import auto_recipe

    monkeypatch.setattr(hardware, "detect", lambda *a, **k: hardware.Hardware(cores=1, threads=1))
    data = write_folder(tmp_path / "A", per_class=16)
    small = ["model_overrides.patch_size=4", "model_overrides.depth=1", "model_overrides.embed_dim=32",
             "model_overrides.num_heads=2"]

    def plan(img_size, overrides):
        args = argparse.Namespace(data=str(data), multi_label=False, threads=1, device="cpu", time_budget=20.0,
                                  model="vit_tiny_patch16_224", img_size=img_size, overrides=overrides)
        r = auto_recipe(args)
        return r.max_steps or r.epochs * (42 // r.batch_size), r.warmup_steps  # 48 images, 2 per class held out

    tiny_steps, tiny_warmup = plan(16, small)
    full_steps, _ = plan(None, [])  # the registered model at 224 px: far more work per image
    assert tiny_steps > 4 * full_steps
    assert tiny_warmup == max(1, round(0.05 * tiny_steps)) > 1
