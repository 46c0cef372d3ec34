"""What --resume, --overwrite and finetune's defaults do with the command line: options a resumed run would
ignore are refused, --overwrite leaves nothing of the old run, and the fine-tuning size of weights alone."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from vitlab.cli.main import main

torch.set_num_threads(1)

# a tiny ViT on the bundled digits (8x8 grey), a few steps
TINY = ["--recipe", "digits", "--threads", "1", "--no-progress", "--batch-size", "16", "--steps", "2",
        "--set", "model_overrides.depth=1", "--set", "model_overrides.embed_dim=16",
        "--set", "model_overrides.num_heads=2", "--set", "log_every=1"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """An unfinished run (2 of 4 steps, adamw) to resume."""
    out = tmp_path_factory.mktemp("ft") / "run"
    assert main(["train", "--output", str(out), *TINY, "--steps", "4", "--set", "optimizer=adamw"]
                + ["--set", "lr=0.002"]) == 0
    state = torch.load(out / "train_state.pt", weights_only=False)
    state["step"] = 2  # as if it stopped half-way (only the step count matters to the checks)
    torch.save(state, out / "train_state.pt")
    return out


# ------------------------------------------------------------------ --resume refuses what the saved state overrides


@pytest.mark.parametrize("sets", [["lr=0.5"], ["weight_decay=0.3"], ["betas=0.5,0.6"]])
def test_resume_refuses_optimiser_values_the_saved_state_would_override(base_run, tmp_path, caplog, sets):
    out = shutil.copytree(base_run, tmp_path / "run")
    recipe = (out / "recipe.json").read_text()
    args = [a for s in sets for a in ("--set", s)]
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(["train", "--output", str(out), "--resume", "--threads", "1", "--no-progress", *args]) == 2
    key = sets[0].split("=")[0]
    assert key in caplog.text and "continues its saved optimiser and schedule" in caplog.text
    assert "vitlab finetune --from" in caplog.text
    assert (out / "recipe.json").read_text() == recipe  # nothing recorded


def test_resume_with_the_runs_own_optimiser_values_goes_on(base_run, tmp_path):
    out = shutil.copytree(base_run, tmp_path / "run")
    assert main(["train", "--output", str(out), "--resume", "--threads", "1", "--no-progress",
                 "--set", "lr=0.002"]) == 0
    assert torch.load(out / "train_state.pt", weights_only=False)["step"] == 4


# ------------------------------------------------------------------------------ --overwrite starts from nothing


def test_overwrite_removes_the_previous_runs_outputs(tmp_path, caplog):
    out = tmp_path / "run"
    assert main(["train", "--output", str(out), *TINY, "--set", "ema_decay=0.9"]) == 0
    assert (out / "model_ema.safetensors").is_file()
    (out / "notes.txt").write_text("mine")  # not the run's: kept
    with caplog.at_level(logging.INFO, logger="vitlab"):
        assert main(["train", "--output", str(out), *TINY, "--steps", "1", "--overwrite"]) == 0
    assert not (out / "model_ema.safetensors").exists()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 1 and steps.count(1) <= 2  # the new run's records only (train and val at step 1)
    if (out / "tb").is_dir():
        assert len(list((out / "tb").iterdir())) <= 1
    assert (out / "notes.txt").read_text() == "mine"
    assert "--overwrite: removed" in caplog.text


# ------------------------------------------------------------------------ finetune's size for weights alone


@pytest.fixture(scope="module")
def bare_vit(tmp_path_factory) -> Path:
    """A ViT's weights alone (no vitlab metadata), trained at 32 px with patch 8: a 4x4 position table."""
    from safetensors.torch import save_file

    import vitlab

    m = vitlab.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2,
                            num_classes=10)
    path = tmp_path_factory.mktemp("bare") / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    return path


FT = ["--model", "vit_tiny_patch16_224", "--set", "model_overrides.depth=1", "--set", "model_overrides.patch_size=8",
      "--set", "model_overrides.embed_dim=32", "--set", "model_overrides.num_heads=2", "--set", "global_batch=none",
      "--batch-size", "8", "--steps", "1", "--threads", "1", "--no-progress"]


def test_finetune_sizes_weights_alone_from_their_position_table_with_the_overrides(bare_vit, tmp_path, caplog):
    out = tmp_path / "ft"
    with caplog.at_level(logging.INFO, logger="vitlab"):
        assert main(["finetune", "--from", str(bare_vit), *FT, "--output", str(out)]) == 0
    assert "4x4 position table x patch 8), 32 px" in caplog.text
    assert json.loads((out / "recipe.json").read_text())["img_size"] == 32


# ------------------------------------------------------------------------------------ the distillation teacher

DISTIL = ["--model", "deit_tiny_distilled_patch16_224", "--img-size", "8", "--set", "model_overrides.patch_size=4",
          "--set", "model_overrides.depth=1", "--set", "model_overrides.embed_dim=16",
          "--set", "model_overrides.num_heads=2", "--steps", "2", "--batch-size", "16", "--threads", "1",
          "--no-progress"]


@pytest.fixture(scope="module")
def bare_teacher(tmp_path_factory) -> Path:
    """vit_tiny_patch16_224's weights alone (no vitlab metadata) for the digits' 10 classes."""
    from safetensors.torch import save_file

    import vitlab

    m = vitlab.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10)
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    return path


def test_teacher_weights_alone_are_named_with_teacher_model(bare_teacher, tmp_path, caplog):
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(["train", *DISTIL, "--teacher", str(bare_teacher), "--output", str(tmp_path / "a")]) == 2
    assert "--teacher-model NAME" in caplog.text and "--model NAME" not in caplog.text
    out = tmp_path / "b"
    assert main(["train", *DISTIL, "--teacher", str(bare_teacher), "--teacher-model", "vit_tiny_patch16_224",
                 "--output", str(out)]) == 0
    assert json.loads((out / "job.json").read_text())["distill"]["model"] == "vit_tiny_patch16_224"
    # --resume rebuilds the teacher with the recorded architecture
    assert main(["train", "--output", str(out), "--resume", "--steps", "3", "--threads", "1", "--no-progress"]) == 0


def test_relative_teacher_is_recorded_absolute_and_resumes_from_elsewhere(base_run, tmp_path, monkeypatch, caplog):
    shutil.copytree(base_run, tmp_path / "teacher")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    assert main(["train", *DISTIL, "--teacher", "teacher", "--output", str(out)]) == 0
    assert json.loads((out / "job.json").read_text())["distill"]["teacher"] == str(tmp_path / "teacher")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["train", "--output", str(out), "--resume", "--steps", "3", "--threads", "1", "--no-progress",
                 "--teacher", str(tmp_path / "teacher")]) == 0
    shutil.rmtree(tmp_path / "teacher")
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(["train", "--output", str(out), "--resume", "--steps", "4", "--threads", "1",
                     "--no-progress"]) == 2
    assert "--teacher" in caplog.text and "pretrained=" not in caplog.text


# ----------------------------------------------------------------- help text and options that would be ignored


def test_finetune_help_offers_no_auto_recipe(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "or auto" not in out and "auto recipe" not in out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "or auto" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("cmd, needle", [
    (["train", "--time-budget", "1m", "--set", "max_steps=3"], "--set max_steps"),
    (["train", "--steps", "3", "--epochs", "2"], "--steps and --epochs"),
    (["finetune", "--from", "x.safetensors", "--set", "model=vit_small_patch16_224"], "--set model"),
    (["train", "--teacher", "x.safetensors", "--distill", "hard", "--tau", "4"], "--tau"),
])
def test_options_that_would_be_ignored_are_refused(tmp_path, caplog, cmd, needle):
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main([*cmd, "--output", str(tmp_path / "run"), "--threads", "1", "--no-progress"]) == 2
    assert needle in caplog.text
    assert not (tmp_path / "run").exists()


def test_the_budget_times_steps_with_the_runs_criterion() -> None:
    """With --teacher, a step includes the teacher's forward: the step timing runs the distillation loss."""
    import torch

    import vitlab
    from vitlab.data import build_dataset, eval_transform
    from vitlab.train import Recipe
    from vitlab.train.budget import measure_step_seconds
    from vitlab.train.losses import ClassificationLoss

    model = vitlab.create_model("vit_tiny_patch16_224", img_size=8, patch_size=4, depth=1, embed_dim=16,
                                num_heads=2, in_chans=1, num_classes=10)
    data = build_dataset("digits", split="train", transform=eval_transform(model.preprocessing))
    calls = []

    class Spy(ClassificationLoss):
        def forward(self, x, outputs, y):
            calls.append(len(x))
            return super().forward(x, outputs, y)

    recipe = Recipe(name="t", batch_size=8, workers=0)
    measure_step_seconds(model, recipe, data, torch.device("cpu"), steps=2, warmup=1, criterion=Spy())
    assert calls and set(calls) == {8}
