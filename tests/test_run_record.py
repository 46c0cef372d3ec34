"""What a run folder records: settings changed on --resume (with the step they took effect), the last
validation after a resume that only finishes the run, the data of a run resumed from another folder, the
progress interval's variable, the step the progress line's values are of, and job.json's provenance."""

from __future__ import annotations

import io
import json
import logging
import platform
import sys
from pathlib import Path

import pytest
import torch

from test_cli_resume_checks import write_folder
from test_cli_train import FAST
from test_long_runs import Noise, recipe, records, tiny_vit
from vitlab.cli.main import main
from vitlab.train import fit, load_recipe
from vitlab.train.progress import LogProgress
from vitlab.train.run import checkpoint_metadata
from vitlab.train.state import load_train_state, save_train_state

torch.set_num_threads(1)


# ---------------------------------------------------------------------------- settings changed on --resume
def test_settings_changed_on_resume_are_recorded_with_their_step(tmp_path, caplog):
    """Resumed at step 3 with label_smoothing 0.1 -> 0.0: recipe.json, model.safetensors and train_state.pt keep
    the settings in force now and the change from step 4; a run from that recipe.json is told it does not
    reproduce the run."""
    data, r = Noise(64), recipe(epochs=2, label_smoothing=0.1)  # 4 steps per epoch
    fit(tiny_vit(), r, train_set=data, output_dir=tmp_path, progress=False, until_step=3)
    with caplog.at_level(logging.WARNING):
        fit(tiny_vit(), r.replace(label_smoothing=0.0, epochs=3), train_set=data, output_dir=tmp_path,
            progress=False, resume=True)
    change = {"from_step": 4, "settings": {"epochs": [2, 3], "label_smoothing": [0.1, 0.0]}}
    saved = json.loads((tmp_path / "recipe.json").read_text())
    assert saved["label_smoothing"] == 0.0 and saved["changes"] == [change]
    extra = checkpoint_metadata(tmp_path / "model.safetensors")["extra"]
    assert extra["recipe_settings"]["label_smoothing"] == 0.0 and extra["recipe_changes"] == [change]
    assert load_train_state(tmp_path / "train_state.pt")["recipe_changes"] == [change]
    assert 'record this change ("changes": from step 4)' in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = load_recipe(tmp_path / "recipe.json")
    assert again.label_smoothing == 0.0
    assert ("from step 4: epochs 2 -> 3, label_smoothing 0.1 -> 0.0" in caplog.text
            and "does not reproduce that run (whose first 3 steps used the earlier ones)" in caplog.text)


def test_a_second_change_is_appended_and_an_unchanged_resume_adds_none(tmp_path):
    data, r = Noise(64), recipe(epochs=3, label_smoothing=0.1)
    fit(tiny_vit(), r, train_set=data, output_dir=tmp_path, progress=False, until_step=2)
    fit(tiny_vit(), r.replace(label_smoothing=0.0), train_set=data, output_dir=tmp_path, progress=False,
        resume=True, until_step=5)
    fit(tiny_vit(), r.replace(label_smoothing=0.0), train_set=data, output_dir=tmp_path, progress=False,
        resume=True, until_step=7)  # the settings in force: nothing new
    fit(tiny_vit(), r.replace(label_smoothing=0.2), train_set=data, output_dir=tmp_path, progress=False, resume=True)
    assert json.loads((tmp_path / "recipe.json").read_text())["changes"] == [
        {"from_step": 3, "settings": {"label_smoothing": [0.1, 0.0]}},
        {"from_step": 8, "settings": {"label_smoothing": [0.0, 0.2]}}]


def test_cli_resume_with_set_records_the_change_and_resumes_again(tmp_path, caplog):
    """`--resume --set ...` records the change; the next `--resume` (the run's recipe.json, with its changes)
    continues it; a run without changes has none, and its recipe.json is reused without a warning."""
    out = tmp_path / "run"
    assert main(["train", "--output", str(out), *FAST, "--steps", "2", "--set", "label_smoothing=0.1"]) == 0
    assert "changes" not in json.loads((out / "recipe.json").read_text())
    with caplog.at_level(logging.WARNING):
        load_recipe(out / "recipe.json")
    assert "reproduce" not in caplog.text
    assert main(["train", "--output", str(out), "--resume", "--no-progress", "--steps", "3",
                 "--set", "label_smoothing=0.0", "--set", "augment=false"]) == 0
    saved = json.loads((out / "recipe.json").read_text())
    assert saved["changes"] == [{"from_step": 3, "settings": {"augment": [True, False], "label_smoothing": [0.1, 0.0],
                                                              "max_steps": [2, 3]}}]
    assert main(["train", "--output", str(out), "--resume", "--no-progress", "--steps", "4"]) == 0
    saved = json.loads((out / "recipe.json").read_text())
    assert saved["label_smoothing"] == 0.0 and saved["augment"] is False and len(saved["changes"]) == 2
    assert saved["changes"][1] == {"from_step": 4, "settings": {"max_steps": [3, 4]}}


# ---------------------------------------------------------------------------- VITLAB_LOG_INTERVAL
def test_log_interval_takes_seconds_or_a_duration(monkeypatch):
    from vitlab.train.progress import log_interval_s

    for raw, seconds in (("5", 5.0), ("0", 0.0), ("10s", 10.0), ("2m", 120.0), (" ", 30.0)):
        monkeypatch.setenv("VITLAB_LOG_INTERVAL", raw)
        assert log_interval_s() == seconds, raw
    for raw in ("ten", "-1", "nan"):
        monkeypatch.setenv("VITLAB_LOG_INTERVAL", raw)
        with pytest.raises(ValueError, match=r"VITLAB_LOG_INTERVAL=.*a number \(e.g. 30\) or a duration"):
            log_interval_s()


def test_a_bad_log_interval_is_refused_before_the_run_folder_is_written(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal: the variable is used
    monkeypatch.setenv("VITLAB_LOG_INTERVAL", "ten")
    out = tmp_path / "run"
    args = ["train", "--output", str(out), *[a for a in FAST if a != "--no-progress"], "--steps", "1"]
    with caplog.at_level(logging.ERROR):
        assert main(args) == 2
    assert "VITLAB_LOG_INTERVAL='ten'" in caplog.text
    assert not out.exists() or not any(out.iterdir())
    with pytest.raises(ValueError, match="VITLAB_LOG_INTERVAL"):  # fit called directly: the same, first
        fit(tiny_vit(), recipe(), train_set=Noise(32), output_dir=tmp_path / "fit")
    assert not (tmp_path / "fit").exists()
    monkeypatch.setenv("VITLAB_LOG_INTERVAL", "10s")
    assert main(args) == 0


# ---------------------------------------------------------------------------- the data of a resumed run
def test_resume_from_another_folder_finds_data_given_as_a_relative_path(tmp_path, monkeypatch):
    from test_cli_resume_checks import TINY

    write_folder(tmp_path / "work" / "A", ("cat", "dog", "ship"))
    monkeypatch.chdir(tmp_path / "work")
    out = tmp_path / "run"
    assert main(["train", "--data", "A", "--output", str(out), *TINY]) == 0
    monkeypatch.chdir(tmp_path)  # "A" does not exist here
    assert main(["train", "--output", str(out), "--resume", "--no-progress", "--steps", "3"]) == 0
    assert load_train_state(out / "train_state.pt")["step"] == 3


def test_finetune_and_pretrain_resume_from_another_folder_find_relative_data(tmp_path, monkeypatch):
    from test_cli_resume_checks import TINY

    write_folder(tmp_path / "work" / "A", ("cat", "dog", "ship"))
    monkeypatch.chdir(tmp_path / "work")
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    assert main(["train", "--data", "A", "--output", str(base), *TINY]) == 0
    assert main(["finetune", "--from", str(base), "--data", "A", "--output", str(tuned), *TINY]) == 0
    monkeypatch.chdir(tmp_path)  # "A" does not exist here
    assert main(["finetune", "--output", str(tuned), "--resume", "--no-progress", "--steps", "3"]) == 0
    assert load_train_state(tuned / "train_state.pt")["step"] == 3
    ssl = tmp_path / "mpp"
    monkeypatch.chdir(tmp_path / "work")
    assert main(["pretrain", "--method", "mpp", "--data", "A", "--output", str(ssl), "--threads", "1", "--no-progress",
                 "--steps", "2", "--batch-size", "8", "--img-size", "16", "--set", "model_overrides.depth=1",
                 "--set", "global_batch=none"]) == 0
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "--output", str(ssl), "--resume", "--no-progress", "--steps", "3"]) == 0


# ---------------------------------------------------------------------------- the last validation
def _finished_then_resumed(out: Path, *, drop_state_val: bool = False) -> tuple[dict, dict]:
    common = ["--output", str(out), "--no-progress", "--threads", "1"]
    assert main(["train", *common, *FAST[:4], *FAST[5:], "--set", "val_fraction=0.1"]) == 0
    before = json.loads((out / "results.json").read_text())
    (out / "results.json").unlink()  # killed during the final test evaluation
    if drop_state_val:  # a state written before it kept the validation
        state = load_train_state(out / "train_state.pt")
        for key in ("val", "format", "version"):
            state.pop(key, None)
        save_train_state(out / "train_state.pt", state)
    assert main(["train", "--resume", *common]) == 0
    return before, json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("drop_state_val", [False, True], ids=["state", "older-state"])
def test_a_resume_that_only_finishes_the_run_keeps_its_last_validation(tmp_path, drop_state_val):
    before, after = _finished_then_resumed(tmp_path / "run", drop_state_val=drop_state_val)
    assert before["val"] and before["val"]["val_top1"] is not None
    assert after["val"] == before["val"] and after["test"] == before["test"]
    assert checkpoint_metadata(tmp_path / "run" / "model.safetensors")["extra"]["val"] == before["val"]


# ---------------------------------------------------------------------------- progress lines
def test_a_progress_line_names_the_step_its_values_are_of(caplog):
    p = LogProgress(10, interval_s=0)
    with caplog.at_level(logging.INFO, logger="vitlab.train"):
        p.set_postfix(loss="0.5000", lr="1.00e-03")
        p.update(1)
        p.update(1)  # no new values: they are step 1's
        p.set_postfix(loss="0.4000", lr="2.00e-03")
        p.update(1)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("train step 1/10 (10%), loss 0.5000, lr 1.00e-03, ") and "(at step" not in lines[0]
    assert lines[1].startswith("train step 2/10 (20%), loss 0.5000, lr 1.00e-03 (at step 1), ")
    assert lines[2].startswith("train step 3/10 (30%), loss 0.4000, lr 2.00e-03, ")


def test_training_progress_lines_match_the_logged_records(tmp_path, monkeypatch, caplog):
    """log_every 3, a line every step: each line's loss and lr are those metrics.jsonl has for the step the
    line says they are of."""
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    monkeypatch.setenv("VITLAB_LOG_INTERVAL", "0")
    with caplog.at_level(logging.INFO, logger="vitlab.train"):
        fit(tiny_vit(), recipe(log_every=3, epochs=1), train_set=Noise(112), output_dir=tmp_path)  # 7 steps
    logged = {rec["step"]: rec for rec in records(tmp_path)}
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train step")]
    assert len(lines) == 7
    for n, line in enumerate(lines, 1):
        of = max(s for s in logged if s <= n) if n >= 3 else None
        if of is None:
            assert "loss" not in line
            continue
        assert f"loss {logged[of]['loss']:.4f}," in line and f"lr {logged[of]['lr']:.2e}" in line, line
        assert (f"(at step {of})" in line) == (of != n), line


# ---------------------------------------------------------------------------- job.json
def test_job_json_records_the_command_and_versions(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--output", str(out), *FAST, "--steps", "1"]) == 0
    job = json.loads((out / "job.json").read_text())
    assert job["command"] == sys.argv and job["python"] == platform.python_version()
    assert job["torch"] == torch.__version__ and job["written_by"].startswith("vitlab ")


def test_a_resume_keeps_the_command_that_started_the_run(tmp_path, monkeypatch):
    """job.json is rewritten on --resume: the command that started the run stays, the resume's is added."""
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["vitlab", "train", "--first"])
    assert main(["train", "--output", str(out), *FAST, "--steps", "1"]) == 0
    monkeypatch.setattr(sys, "argv", ["vitlab", "train", "--second"])
    assert main(["train", "--output", str(out), "--resume", "--no-progress", "--steps", "2"]) == 0
    job = json.loads((out / "job.json").read_text())
    assert job["command"] == ["vitlab", "train", "--first"]
    assert job["resumed_with"] == [["vitlab", "train", "--second"]]
