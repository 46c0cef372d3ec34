"""What a run folder is and who may write it: a run stopped before its first checkpoint, two runs into one
folder, a user's own job.json / recipe.json, --resume of a fine-tune whose --from is gone, an unreadable
recipe.json, and a distillation teacher replaced between a run and its --resume."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vitlab.cli.main import main
from vitlab.train import apply_overrides, load_recipe
from vitlab.train.run import Distill, TrainJob, run_training

torch.set_num_threads(1)

LOCK_FILE = ".vitlab.lock"  # vitlab.train.run.LOCK_FILE

# a tiny ViT on the bundled digits (8x8 grey), a few steps
TINY = ["--recipe", "digits", "--threads", "1", "--no-progress", "--batch-size", "16", "--steps", "2",
        "--set", "model_overrides.depth=1", "--set", "model_overrides.embed_dim=16",
        "--set", "model_overrides.num_heads=2", "--set", "log_every=1"]
TINY_SETS = ["batch_size=16", "model_overrides.depth=1", "model_overrides.embed_dim=16",
             "model_overrides.num_heads=2", "log_every=1", "checkpoint_every=1"]
PRETRAIN = ["--method", "mae", "--recipe", "digits", "--data", "digits", "--threads", "1", "--no-progress",
            "--batch-size", "16", "--steps", "2", "--set", "model_overrides.depth=1",
            "--set", "model_overrides.embed_dim=16", "--set", "model_overrides.num_heads=2", "--set", "log_every=1",
            "--opt", "decoder_dim=16", "--opt", "decoder_depth=1", "--opt", "decoder_heads=2"]


def steps_of(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished tiny digits run (2 steps)."""
    out = tmp_path_factory.mktemp("safety") / "run"
    assert main(["train", "--output", str(out), *TINY]) == 0
    return out


def unresumable_copy(run: Path, to: Path) -> Path:
    """``run`` as a kill after its first logged steps but before its first checkpoint leaves it: job.json,
    recipe.json, metrics.jsonl (and TensorBoard events), no train_state.pt, no model."""
    shutil.copytree(run, to)
    for name in ("train_state.pt", "model.safetensors", "results.json"):
        (to / name).unlink(missing_ok=True)
    assert steps_of(to)
    return to


# ------------------------------------------------------------------ (3) a run stopped before its first checkpoint
def test_a_run_stopped_before_its_first_checkpoint_is_not_appended_to(finished, tmp_path, caplog):
    out = unresumable_copy(finished, tmp_path / "run")
    metrics = (out / "metrics.jsonl").read_text()
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(["train", "--output", str(out), "--resume", "--threads", "1", "--no-progress"]) == 2
        assert "stopped before its first checkpoint" in caplog.text and "--overwrite" in caplog.text
        caplog.clear()
        # the same command again, without --overwrite: refused (it used to append to the old metrics.jsonl)
        assert main(["train", "--output", str(out), *TINY]) == 2
    assert f"{out} holds a run that stopped before its first checkpoint" in caplog.text
    assert "metrics.jsonl" in caplog.text and "start it over with --overwrite" in caplog.text
    assert (out / "metrics.jsonl").read_text() == metrics
    assert main(["train", "--output", str(out), *TINY, "--overwrite"]) == 0
    steps = steps_of(out)
    assert sorted(set(steps)) == [1, 2] and len(steps) == len(metrics.splitlines())  # the new run's records only


def test_a_pretraining_run_stopped_before_its_first_checkpoint_is_not_appended_to(tmp_path, caplog):
    out = tmp_path / "mae"
    assert main(["pretrain", *PRETRAIN, "--output", str(out)]) == 0
    out = unresumable_copy(out, tmp_path / "stopped")
    metrics = (out / "metrics.jsonl").read_text()
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(["pretrain", *PRETRAIN, "--output", str(out)]) == 2
    assert "stopped before its first checkpoint" in caplog.text
    assert (out / "metrics.jsonl").read_text() == metrics


def test_a_run_refused_before_it_trained_starts_again_without_overwrite(finished, tmp_path):
    """A run that wrote its job.json and recipe.json but logged nothing (refused at the start of training):
    the same folder takes the corrected command, which rewrites both."""
    out = unresumable_copy(finished, tmp_path / "run")
    (out / "metrics.jsonl").unlink()
    shutil.rmtree(out / "tb", ignore_errors=True)
    assert main(["train", "--output", str(out), *TINY]) == 0
    assert sorted(set(steps_of(out))) == [1, 2]


# ------------------------------------------------------------------ (4) one run at a time in a folder
HOLD = textwrap.dedent("""
    import fcntl, os, socket, sys
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, f"{sys.argv[2] if len(sys.argv) > 2 else os.getpid()} {socket.gethostname()}\\n".encode())
    print("locked", flush=True)
    sys.stdin.read()
""")


def hold_lock(folder: Path, recorded_pid: int | None = None) -> subprocess.Popen:
    """Another process holding ``folder``'s lock as a running vitlab run does (its PID, or ``recorded_pid``,
    and host in the file)."""
    folder.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-c", HOLD, str(folder / LOCK_FILE)] + ([str(recorded_pid)] if recorded_pid else [])
    p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_run_started_while_another_trains_in_its_folder_is_refused(tmp_path, monkeypatch, caplog):
    """Two runs into one --output at the same time used to be both accepted (interleaved metrics.jsonl and
    results.json): the second, started here as the first begins to train, is refused."""
    import vitlab.train.run as run_module

    out = tmp_path / "run"
    fit, second = run_module.fit, []

    def fit_and_start_another(*args, **kwargs):
        if not second:
            second.append(None)
            second[0] = main(["train", "--output", str(out), *TINY, "--seed", "1"])
        return fit(*args, **kwargs)

    monkeypatch.setattr(run_module, "fit", fit_and_start_another)
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(["train", "--output", str(out), *TINY]) == 0
    assert second == [2]
    assert f"--output {out} is in use by another vitlab run (PID {os.getpid()} on {socket.gethostname()}" \
        in caplog.text
    assert steps_of(out) == [1, 2]  # one run's records
    assert json.loads((out / "recipe.json").read_text())["seed"] == 0


def test_a_second_run_into_a_folder_in_use_is_refused(tmp_path, caplog):
    out = tmp_path / "run"
    holder = hold_lock(out)
    try:
        with caplog.at_level(logging.ERROR, logger="vitlab"):
            assert main(["train", "--output", str(out), *TINY]) == 2
            assert f"--output {out} is in use by another vitlab run (PID {holder.pid} on " in caplog.text
            caplog.clear()
            assert main(["pretrain", *PRETRAIN, "--output", str(out)]) == 2
            assert f"PID {holder.pid}" in caplog.text
            caplog.clear()
            assert main(["train", "--task", "detection", "--data", str(tmp_path / "canvases"), "--model",
                         "detr_resnet50", "--output", str(out), "--no-progress"]) == 2
            assert f"PID {holder.pid}" in caplog.text
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    # the holder died (SIGKILL): its lock went with it, and its file is taken over
    with caplog.at_level(logging.INFO, logger="vitlab"):
        assert main(["train", "--output", str(out), *TINY]) == 0
    assert f"took over the lock left by PID {holder.pid}" in caplog.text
    assert not (out / LOCK_FILE).exists()  # released at the end of the run
    assert main(["train", "--output", str(out), "--resume", "--threads", "1", "--no-progress", "--steps", "3"]) == 0


def test_a_lock_whose_process_is_gone_is_taken_over(tmp_path, caplog):
    """A lock file naming a PID that no longer runs on this host, still held by a process it left (a data
    loader worker of a killed run), does not block the folder."""
    out = tmp_path / "run"
    pid = dead_pid()
    orphan = hold_lock(out, recorded_pid=pid)
    try:
        with caplog.at_level(logging.WARNING, logger="vitlab"):
            assert main(["train", "--output", str(out), *TINY]) == 0
        assert f"the run of PID {pid} that locked it is not running any more" in caplog.text
    finally:
        orphan.kill()
        orphan.wait()


def test_a_lock_held_on_another_machine_is_not_taken(tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text(f"12345 not-{socket.gethostname()}\n")
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(["train", "--output", str(out), *TINY]) == 2
    assert f"locked by a vitlab run on another machine (PID 12345 on not-{socket.gethostname()}" in caplog.text


def test_only_the_main_process_takes_the_lock(tmp_path):
    """Under torchrun the other ranks (which write nothing) do not take the lock rank 0 holds."""
    from vitlab.train.run import RunDirInUseError, run_dir_lock

    with run_dir_lock(tmp_path / "run"):
        assert (tmp_path / "run" / LOCK_FILE).read_text().split()[0] == str(os.getpid())
        with run_dir_lock(tmp_path / "run", enabled=False):
            pass
        with pytest.raises(RunDirInUseError, match=f"PID {os.getpid()}"):
            with run_dir_lock(tmp_path / "run"):
                pass
    assert not (tmp_path / "run").exists()  # made for the lock, left empty: removed


# ------------------------------------------------------------------ (5) what makes a folder a run
def test_a_users_folder_with_a_recipe_copied_from_a_run_is_not_a_run(finished, tmp_path, caplog):
    mine = tmp_path / "exp2"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    recipe = json.loads((finished / "recipe.json").read_text())  # with its "resolved" values
    text = json.dumps({**recipe, "lr": 0.001, "description": "MY EDITED RECIPE"}, indent=1)
    (mine / "recipe.json").write_text(text)
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(["train", *TINY, "--recipe", str(mine / "recipe.json"), "--set", "lr=0.002",
                     "--output", str(mine)]) == 2
    assert "would be replaced" in caplog.text
    assert files_of(mine) == {"notes.txt": b"my notes", "recipe.json": text.encode()}


def test_a_users_job_json_with_data_and_model_is_not_a_run(tmp_path, caplog):
    mine = tmp_path / "exp3"
    mine.mkdir()
    text = '{"data": "s3://bucket/imgs", "model": "vit", "gpus": 8, "owner": "me"}'
    (mine / "job.json").write_text(text)
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(["train", *TINY, "--output", str(mine)]) == 2
        assert "is not a vitlab run and is not empty (job.json)" in caplog.text
        assert main(["train", *TINY, "--output", str(mine), "--overwrite"]) == 2
    assert files_of(mine) == {"job.json": text.encode()}


def test_runs_mark_their_job_json_and_runs_written_before_the_marker_stay_runs(finished, tmp_path, caplog):
    from vitlab import __version__
    from vitlab.train.run import is_run_dir

    job = json.loads((finished / "job.json").read_text())
    assert job["written_by"] == f"vitlab {__version__}"
    old = shutil.copytree(finished, tmp_path / "old")  # a run written before job.json had the marker
    (old / "job.json").write_text(json.dumps({k: v for k, v in job.items() if k != "written_by"}))
    assert is_run_dir(old)
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(["train", "--output", str(old), *TINY]) == 2
    assert "holds a finished run" in caplog.text
    assert main(["train", "--output", str(old), "--resume", "--threads", "1", "--no-progress", "--steps", "3"]) == 0
    assert json.loads((old / "job.json").read_text())["written_by"] == f"vitlab {__version__}"  # marked now
    # such a job.json without a vitlab model or training state beside it is not a run
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "job.json").write_text(json.dumps({k: v for k, v in job.items() if k != "written_by"}))
    (bare / "model.safetensors").write_bytes(b"not a vitlab model")
    assert not is_run_dir(bare)


# ------------------------------------------------------------------ (8) finetune --resume without its source
def test_finetune_resumes_from_the_run_alone_after_its_source_is_deleted(finished, tmp_path):
    source = tmp_path / "pre.safetensors"
    shutil.copy(finished / "model.safetensors", source)
    recipe = apply_overrides(load_recipe("vit_finetune"), [*TINY_SETS, "max_steps=4", "img_size=8",
                                                            "global_batch=none", "cpu_threads=1"])

    def job(out: Path, **kw) -> TrainJob:
        return TrainJob(recipe=recipe, data="digits", output=out, model="vit_tiny_patch16_224",
                        pretrained=str(source), progress=False, **kw)

    whole = run_training(job(tmp_path / "whole"))
    run_training(job(tmp_path / "ft", until_step=2))
    source.unlink()
    assert main(["finetune", "--output", str(tmp_path / "ft"), "--resume", "--threads", "1", "--no-progress"]) == 0
    state = torch.load(tmp_path / "ft" / "train_state.pt", weights_only=True)
    assert state["step"] == 4
    reference = torch.load(tmp_path / "whole" / "train_state.pt", weights_only=True)["model"]
    for k, v in reference.items():  # the resumed run is the uninterrupted one
        torch.testing.assert_close(state["model"][k], v, rtol=0, atol=0, msg=k)
    assert whole["steps"] == 4
    # a fresh fine-tune still needs --from
    assert main(["finetune", "--output", str(tmp_path / "new"), *TINY]) == 2


# ------------------------------------------------------------------ (9) an unreadable recipe.json on --resume
def test_resume_with_a_broken_recipe_json_names_the_file(finished, tmp_path, caplog):
    out = shutil.copytree(finished, tmp_path / "run")
    (out / "recipe.json").write_text((out / "recipe.json").read_text().replace('"epochs":', '"epochs":,', 1))
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(["train", "--output", str(out), "--resume", "--threads", "1", "--no-progress"]) == 2
    assert f"{out / 'recipe.json'}: not valid JSON" in caplog.text


# ------------------------------------------------------------------ (2) a distillation teacher replaced
def test_resume_refuses_a_teacher_replaced_since_the_run_began(finished, tmp_path, caplog):
    teacher = tmp_path / "teacher" / "model.safetensors"
    teacher.parent.mkdir()
    shutil.copy(finished / "model.safetensors", teacher)
    other = tmp_path / "other"
    assert main(["train", "--output", str(other), *TINY, "--seed", "1"]) == 0
    recipe = apply_overrides(load_recipe("digits"), [*TINY_SETS, "max_steps=4", "cpu_threads=1"])
    out = tmp_path / "run"
    run_training(TrainJob(recipe=recipe, data="digits", output=out, progress=False, until_step=2,
                          distill=Distill(teacher=str(teacher), kind="soft", alpha=0.5)))
    recorded = json.loads((out / "job.json").read_text())["distill"]["fingerprint"]
    assert recorded.startswith("sha256:")
    original = teacher.read_bytes()
    shutil.copy(other / "model.safetensors", teacher)  # the teacher's file is now another model
    resume = ["train", "--output", str(out), "--resume", "--threads", "1", "--no-progress"]
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(resume) == 2
    assert f"the teacher {teacher} is not the one this run distilled from" in caplog.text
    assert recorded[len("sha256:"):][:12] in caplog.text and "put the run's teacher back" in caplog.text
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == 2
    teacher.write_bytes(original)  # the same weights (a copy, a new mtime): accepted
    assert main(resume) == 0
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == 4
    assert json.loads((out / "job.json").read_text())["distill"]["fingerprint"] == recorded


def test_overwrite_also_removes_what_a_killed_checkpoint_write_left(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    left = run / ".model.safetensors.k1ll3d00.tmp"  # atomic_write's folder, as a SIGKILL leaves it
    left.mkdir()
    (left / "model.safetensors").write_bytes(b"\0" * 64)
    assert main(["train", "--output", str(run), "--overwrite", *TINY]) == 0
    assert not left.exists()
