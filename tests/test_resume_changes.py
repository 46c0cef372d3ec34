"""--resume in a changed environment: training data of another size under an epoch-based length, and a VQ-KD
teacher file whose weights were replaced (or that moved) between the segments."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

import vitlab
from test_long_runs import Noise, recipe, tiny_vit
from vitlab.checkpoints import CheckpointError, save_model
from vitlab.cli.main import main
from vitlab.train import fit, lr_factor
from vitlab.train.state import load_train_state

torch.set_num_threads(1)


def lrs(run: Path) -> dict[int, float]:
    """The learning rate of each logged step (record s: the lr of 0-based step s - 1)."""
    return {r["step"]: r["lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"}


# ------------------------------------------------------------------------------------------ data of another size
def test_resume_on_fewer_images_keeps_the_runs_length_and_names_the_steps_per_epoch(tmp_path, caplog):
    """An epoch-based run (2 epochs x 7 steps) stopped at step 12, resumed on fewer images (5 steps per epoch:
    2 epochs would be 10 steps, before the step reached): it is not refused for a length nobody asked for; it
    keeps its planned 14 steps and its learning-rate schedule, and the warning names the changed steps per
    epoch and the image count."""
    r = recipe(epochs=2)
    fit(tiny_vit(), r, train_set=Noise(112), output_dir=tmp_path, progress=False, until_step=12)
    with caplog.at_level(logging.WARNING):
        res = fit(tiny_vit(), r, train_set=Noise(80), output_dir=tmp_path, progress=False, resume=True)
    assert res.step == res.total_steps == 14
    assert load_train_state(tmp_path / "train_state.pt")["total_steps"] == 14
    assert json.loads((tmp_path / "recipe.json").read_text())["resolved"]["total_steps"] == 14
    # the 14-step plan, unchanged: no re-planned decay
    plan = [r.lr * lr_factor(s, total_steps=14, warmup_steps=2, kind="cosine", min_factor=r.min_lr / r.lr)
            for s in range(14)]
    seen = lrs(tmp_path)
    assert [seen[s + 1] for s in range(14)] == pytest.approx(plan)
    text = caplog.text
    assert "5 steps per epoch" in text and "80 images" in text and "7" in text
    assert "keeps its length of 14 steps" in text
    assert "--steps" in text and "resuming with another length" not in text


def test_resume_on_more_images_keeps_the_runs_length(tmp_path, caplog):
    """Images added to an epoch-based run's data: the resumed run keeps its planned length (no silent re-plan to
    the epochs of the larger data), with the same warning."""
    r = recipe(epochs=2)
    fit(tiny_vit(), r, train_set=Noise(112), output_dir=tmp_path, progress=False, until_step=8)
    with caplog.at_level(logging.WARNING):
        res = fit(tiny_vit(), r, train_set=Noise(144), output_dir=tmp_path, progress=False, resume=True)
    assert res.step == res.total_steps == 14
    assert "9 steps per epoch" in caplog.text and "144 images" in caplog.text


def test_an_asked_length_not_past_the_step_reached_names_the_changed_data(tmp_path):
    """--epochs given on fewer images, not past the step reached: refused, naming the steps per epoch now and
    the run's, and the --steps that continues it."""
    r = recipe(epochs=2)
    fit(tiny_vit(), r, train_set=Noise(112), output_dir=tmp_path, progress=False, until_step=12)
    with pytest.raises(CheckpointError) as e:
        fit(tiny_vit(), r.replace(epochs=1), train_set=Noise(80), output_dir=tmp_path, progress=False, resume=True)
    msg = str(e.value)
    assert "5 steps per epoch" in msg and "80 images" in msg and "7 when the run was planned" in msg
    assert "--steps 13 or more" in msg and "5 steps (epochs 1)" in msg


def test_resume_of_a_steps_run_on_fewer_images_keeps_its_warmup(tmp_path):
    """A --steps run whose warm-up came from warmup_epochs (1 epoch = 7 steps), resumed mid-warm-up on fewer
    images (5 steps per epoch): the warm-up stays the run's 7 steps (no jump of the learning rate)."""
    r = recipe(max_steps=12, warmup_steps=0, warmup_epochs=1.0)
    fit(tiny_vit(), r, train_set=Noise(112), output_dir=tmp_path, progress=False, until_step=3)
    fit(tiny_vit(), r, train_set=Noise(80), output_dir=tmp_path, progress=False, resume=True)
    seen = lrs(tmp_path)
    assert [seen[s] for s in range(1, 8)] == pytest.approx([r.lr * s / 7 for s in range(1, 8)])


# ------------------------------------------------------------------------------------------ vqkd's teacher file
SMALL = ["--set", "model_overrides.depth=1", "--set", "model_overrides.embed_dim=32", "--set",
         "model_overrides.num_heads=2", "--set", "batch_size=32"]
VQKD = ["pretrain", "--method", "vqkd", "--data", "digits", "--recipe", "digits", "--steps", "3", "--no-progress",
        "--threads", "1", "--opt", "vocab_size=16", "--opt", "code_dim=4", *SMALL]


def save_teacher(path: Path, seed: int) -> None:
    torch.manual_seed(seed)
    save_model(vitlab.create_model("vit_tiny_patch16_224", num_classes=0, img_size=8, in_chans=1, patch_size=4,
                                   embed_dim=16, depth=1, num_heads=2), path)


@pytest.fixture
def stop_after(monkeypatch):
    """stop_after(k): the next `vitlab pretrain` stops after k steps (as if killed there)."""
    import vitlab.ssl.run as ssl_run

    original = ssl_run.run_pretraining

    def arm(k: int) -> None:
        def run_pretraining(job):
            monkeypatch.setattr(ssl_run, "run_pretraining", original)  # this call only
            job.until_step = k
            return original(job)

        monkeypatch.setattr(ssl_run, "run_pretraining", run_pretraining)

    return arm


def test_vqkd_resume_with_a_replaced_teacher_is_refused_naming_the_file(tmp_path, stop_after, caplog):
    teacher, run = tmp_path / "teacher.safetensors", tmp_path / "run"
    save_teacher(teacher, 0)
    stop_after(2)
    assert main([*VQKD, "--teacher", str(teacher), "--output", str(run)]) == 0
    save_teacher(teacher, 1)  # the same architecture, other weights, at the same path
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert main(["pretrain", "--output", str(run), "--resume", "--no-progress", "--threads", "1"]) != 0
    assert f"--resume: the teacher {teacher} is not the one this run learned from" in caplog.text
    assert "its weights changed since the run began" in caplog.text
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # nothing trained or rewritten
    assert json.loads((run / "job.json").read_text())["teacher_fingerprint"].startswith("sha256:")


def test_vqkd_resume_with_a_moved_teacher_of_the_same_weights_goes_on_exactly(tmp_path, stop_after, caplog):
    teacher, moved = tmp_path / "teacher.safetensors", tmp_path / "elsewhere" / "t.safetensors"
    save_teacher(teacher, 0)
    assert main([*VQKD, "--teacher", str(teacher), "--output", str(tmp_path / "full")]) == 0
    stop_after(2)
    assert main([*VQKD, "--teacher", str(teacher), "--output", str(tmp_path / "run")]) == 0
    moved.parent.mkdir()
    shutil.move(teacher, moved)
    with caplog.at_level(logging.INFO):
        assert main(["pretrain", "--output", str(tmp_path / "run"), "--resume", "--teacher", str(moved),
                     "--no-progress", "--threads", "1"]) == 0
    assert "other options than the run's" not in caplog.text and "the teacher moved" in caplog.text
    from safetensors.torch import load_file

    full, resumed = (load_file(tmp_path / d / "tokenizer.safetensors") for d in ("full", "run"))
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    job = json.loads((tmp_path / "run" / "job.json").read_text())
    assert job["options"]["teacher"] == str(moved)
    assert job["teacher_fingerprint"] == json.loads((tmp_path / "full" / "job.json").read_text())[
        "teacher_fingerprint"]
