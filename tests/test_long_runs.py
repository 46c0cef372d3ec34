"""Long runs and their folders: the last progress line, --resume with another length, --overwrite of a run that
was evaluated, fit into a folder that holds a run, --time-budget too short for its set-up or overriding what the
command line set, and the root logger after an int8 export."""

from __future__ import annotations

import io
import json
import logging
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

import vitlab
from vitlab.checkpoints import CheckpointError
from vitlab.cli.main import main
from vitlab.train import Recipe, fit, load_recipe, lr_factor
from vitlab.train import budget as budget_module
from vitlab.train.budget import finish_reserve_s, fit_recipe_to_budget, least_budget_s, user_set_fields
from vitlab.train.run import clear_run_outputs, run_marker
from vitlab.train.schedule import Horizon
from vitlab.train.state import load_train_state

torch.set_num_threads(1)


class Noise(Dataset):
    """4 classes of 8x8 grey images: a class-dependent mean plus noise."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 4, (n,), generator=g)
        self.x = self.y[:, None, None, None].float() / 2 - 0.75 + 0.5 * torch.randn(n, 1, 8, 8, generator=g)
        self.classes = ["a", "b", "c", "d"]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


def tiny_vit():
    torch.manual_seed(0)
    return vitlab.create_model("vit_tiny_patch16_224", num_classes=4, img_size=8, patch_size=4, in_chans=1,
                               embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0, mean=(0.5,), std=(0.5,))


def recipe(**kw) -> Recipe:
    base = {"name": "test", "epochs": 2, "batch_size": 16, "lr": 3e-3, "min_lr": 1e-4, "warmup_steps": 2,
            "log_every": 1, "augment": False, "hflip": 0.0, "workers": 0}
    base.update(kw)
    return Recipe(**base)


def records(run: Path, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


# ------------------------------------------------------------------------------------------ progress
def test_the_last_progress_line_shows_the_last_steps_numbers(tmp_path, monkeypatch, caplog):
    """Off a terminal, the final "train step N/N" line shows the loss and lr of the last step (metrics.jsonl's
    last record), not those of the log interval before it."""
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal: LogProgress
    monkeypatch.setenv("VITLAB_LOG_INTERVAL", "3600")  # one line: the last step's
    with caplog.at_level(logging.INFO, logger="vitlab.train"):
        fit(tiny_vit(), recipe(log_every=3), train_set=Noise(64), output_dir=tmp_path)  # 8 steps: logs 3, 6, 8
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train step")]
    last = records(tmp_path)[-1]
    assert line.startswith("train step 8/8 (100%)") and last["step"] == 8
    assert f"loss {last['loss']:.4f}," in line and f"lr {last['lr']:.2e}," in line, line


# ------------------------------------------------------------------------------------------ resume, another length
def test_resume_with_a_longer_run_replans_the_decay_from_the_step_reached(tmp_path, caplog):
    """A run of 14 steps stopped at 8 and resumed as 28: the learning rate goes on from its value at step 8
    (no jump back up) and decays to min_lr at step 28, as Horizon.replan does for a deadline."""
    data, r = Noise(112), recipe(epochs=2)  # 7 steps per epoch: 14 planned
    fit(tiny_vit(), r, train_set=data, output_dir=tmp_path, progress=False, until_step=8)
    with caplog.at_level(logging.WARNING):
        res = fit(tiny_vit(), r.replace(epochs=4), train_set=data, output_dir=tmp_path, progress=False, resume=True)
    assert res.step == res.total_steps == 28
    lrs = {rec["step"]: rec["lr"] for rec in records(tmp_path)}  # record s: the lr of step s (0-based s - 1)
    # continuous at the resume: steps 7 (before), 8 and 9 (after) on one curve; the step to step ratio stays
    # that of a short cosine (about 0.8 here), where the whole new length's curve would jump up (x 1.4)
    old = [r.lr * lr_factor(s, total_steps=14, warmup_steps=2, kind="cosine", min_factor=r.min_lr / r.lr)
           for s in range(14)]
    assert lrs[8] == pytest.approx(old[7]) and lrs[9] == pytest.approx(old[8])  # as the 14-step plan had them
    assert 0.7 < lrs[9] / lrs[8] < 1 and 0.7 < lrs[10] / lrs[9] < 1
    assert all(a >= b for a, b in zip(list(lrs.values())[2:], list(lrs.values())[3:]))  # never rises after warm-up
    h = Horizon(total_steps=28, warmup_steps=2, knot_step=8, knot_progress=(8 - 2) / (14 - 2))
    expect = [r.lr * lr_factor(s, total_steps=28, warmup_steps=2, kind="cosine", min_factor=r.min_lr / r.lr,
                               horizon=h) for s in range(8, 28)]
    assert [lrs[s + 1] for s in range(8, 28)] == pytest.approx(expect)
    state = load_train_state(tmp_path / "train_state.pt")
    group = state["optimizer"]["param_groups"][-1]
    assert group["lr"] / group["lr_scale"] == pytest.approx(r.min_lr)  # the floor, at the new end
    assert json.loads((tmp_path / "recipe.json").read_text())["resolved"]["total_steps"] == 28
    assert "resuming with another length (14 -> 28 steps, at step 8)" in caplog.text
    assert "decaying to min_lr (0.0001) at the new end" in caplog.text


def test_resume_with_another_length_keeps_the_runs_own_warmup(tmp_path, caplog):
    """A 7-step run's warm-up of 10 steps was cut to 6; made 21 steps long, it keeps those 6 (no drop from 4/6
    of the peak to 4/10 mid-warm-up); a finished run made longer stays at min_lr, and the log says so."""
    data, r = Noise(112), recipe(epochs=1, warmup_steps=10)  # 7 steps, warm-up cut to 6
    fit(tiny_vit(), r, train_set=data, output_dir=tmp_path / "a", progress=False, until_step=3)
    fit(tiny_vit(), r.replace(epochs=3), train_set=data, output_dir=tmp_path / "a", progress=False, resume=True)
    lrs = {rec["step"]: rec["lr"] for rec in records(tmp_path / "a")}
    assert [lrs[s] for s in range(1, 7)] == pytest.approx([r.lr * s / 6 for s in range(1, 7)])
    assert lrs[7] == pytest.approx(r.lr) and lrs[21] < lrs[8] < lrs[7] and json.loads((tmp_path / "a" / "recipe.json").read_text())[
        "resolved"]["warmup_steps"] == 6
    fit(tiny_vit(), r, train_set=data, output_dir=tmp_path / "b", progress=False)  # finished: at min_lr
    with caplog.at_level(logging.WARNING):
        fit(tiny_vit(), r.replace(epochs=3), train_set=data, output_dir=tmp_path / "b", progress=False, resume=True)
    lrs = {rec["step"]: rec["lr"] for rec in records(tmp_path / "b")}
    assert [lrs[s] for s in range(8, 22)] == pytest.approx([r.min_lr] * 14)
    assert "which stays at min_lr: the run had ended its decay" in caplog.text


def test_resume_with_a_length_not_past_the_step_reached_is_refused(tmp_path):
    data, r = Noise(112), recipe(epochs=2)
    fit(tiny_vit(), r, train_set=data, output_dir=tmp_path, progress=False)  # finished: 14 of 14
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(CheckpointError, match=r"already reached step 14 \(of 14\).*10 steps \(max_steps 10\).*"
                                              r"--steps 15 or more"):
        fit(tiny_vit(), r.replace(max_steps=10), train_set=data, output_dir=tmp_path, progress=False, resume=True)
    with pytest.raises(CheckpointError, match=r"already reached step 14.*7 steps \(epochs 1\).*--epochs 3 or more"):
        fit(tiny_vit(), r.replace(epochs=1), train_set=data, output_dir=tmp_path, progress=False, resume=True)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert after == before  # recipe.json still says 2 epochs; nothing trained, nothing logged


# ------------------------------------------------------------------------------------------ run folders
def _eval_report(folder: Path, checkpoint: str, extra: tuple[str, ...] = ()) -> None:
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps({"checkpoint": checkpoint, "top1": 0.5}))
    (folder / "per_class.csv").write_text("class,support,accuracy\n")
    for name in extra:
        (folder / name).write_text("mine")


def test_overwrite_removes_the_eval_reports_of_the_old_runs_models(tmp_path):
    """`vitlab eval`'s default report folders beside the run's models (eval_SPLIT, naming them) go with the old
    run; folders of the user's, and reports of other checkpoints, stay."""
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "job.json").write_text(json.dumps({**run_marker(), "data": "digits", "model": "m"}))
    (run / "model.safetensors").write_bytes(b"old")
    _eval_report(run / "eval_test", "runs/r/model.safetensors")  # eval run from tmp_path
    _eval_report(run / "eval_val", str(run / "model_ema.safetensors"))  # an absolute path
    _eval_report(run / "eval_train", "model.safetensors")  # eval run inside the folder
    _eval_report(run / "eval_other", "elsewhere/model.safetensors")  # another run's model
    _eval_report(run / "eval_notes", "runs/r/model.safetensors", extra=("notes.txt",))  # the user added a file
    (run / "eval_empty").mkdir()
    clear_run_outputs(run)
    assert sorted(p.name for p in run.iterdir()) == ["eval_empty", "eval_notes", "eval_other"]
    assert (run / "eval_notes" / "notes.txt").read_text() == "mine"


def test_fit_into_a_folder_holding_a_run_needs_overwrite_or_resume(tmp_path, caplog):
    """A notebook cell run twice: the second fit is refused, naming the folder and the arguments; with
    overwrite=True the old run's files are removed first (metrics.jsonl and tb/ hold only the new run's)."""
    data, r = Noise(64), recipe(epochs=2, log_every=4)  # 8 steps: records at 4 and 8
    fit(tiny_vit(), r, train_set=data, output_dir=tmp_path, progress=False)
    _eval_report(tmp_path / "eval_test", str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"fit: output_dir {re.escape(str(tmp_path))} already holds a run "
                                         r"\(train_state.pt, model.safetensors, metrics.jsonl, tb\).*overwrite=True.*"
                                         r"resume=True"):
        fit(tiny_vit(), r, train_set=data, output_dir=tmp_path, progress=False)
    assert [rec["step"] for rec in records(tmp_path)] == [4, 8]
    events = sorted((tmp_path / "tb").iterdir())
    res = fit(tiny_vit(), r, train_set=data, output_dir=tmp_path, progress=False, overwrite=True)
    assert res.step == 8 and [rec["step"] for rec in records(tmp_path)] == [4, 8]
    assert not (tmp_path / "eval_test").exists() and not set(events) & set((tmp_path / "tb").iterdir())
    # resuming it is still allowed; a model.safetensors that vitlab did not write is never replaced
    assert fit(tiny_vit(), r, train_set=data, output_dir=tmp_path, progress=False, resume=True).step == 8
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "model.safetensors").write_bytes(b"not vitlab's")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="model.safetensors"):
            fit(tiny_vit(), r, train_set=data, output_dir=mine, progress=False, overwrite=overwrite)
    assert (mine / "model.safetensors").read_bytes() == b"not vitlab's"


# ------------------------------------------------------------------------------------------ --time-budget
def test_a_budget_used_up_by_the_set_up_is_refused_with_the_least_that_trains():
    r = load_recipe("digits")
    kw = {"elapsed_s": 3.6, "step_s": 0.07, "num_images": 1438, "eval_images": 359}
    with pytest.raises(ValueError) as e:
        fit_recipe_to_budget(r, budget_s=6 - finish_reserve_s(6), time_budget_s=6, **kw)
    least = least_budget_s(elapsed_s=3.6, step_s=0.07, eval_images=359, batch=r.batch_size)
    msg = str(e.value)
    assert msg.startswith("--time-budget 6s is used up before training starts") and "took 4s" in msg
    assert f"Give --time-budget {math.ceil(least)}s at least" in msg and 8 <= least <= 10
    # that budget trains (a step), one second less does not
    b = math.ceil(least)
    assert fit_recipe_to_budget(r, budget_s=b - finish_reserve_s(b), time_budget_s=b, **kw).max_steps >= 1
    with pytest.raises(ValueError, match="--time-budget"):
        fit_recipe_to_budget(r, budget_s=b - 1 - finish_reserve_s(b - 1), time_budget_s=b - 1, **kw)


def test_cli_time_budget_shorter_than_the_set_up_is_refused(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(budget_module, "measure_step_seconds", lambda *a, **k: 0.05)  # no timing in tests
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        assert main(["train", "--output", str(out), "--threads", "1", "--no-progress", "--time-budget", "5s",
                     "--set", "model_overrides.depth=1"]) == 2
    err = caplog.text
    assert "--time-budget 5s is used up before training starts: the set-up" in err and "at least" in err
    assert "steps_for_budget" not in err and not (out / "model.safetensors").exists()


def test_the_command_lines_set_keys_reach_the_budget_even_on_the_auto_recipe(tmp_path, monkeypatch):
    """The auto recipe plans its own warm-up and validation, so a --set of them cannot be told from the values:
    the command line's --set keys are passed along (TrainJob.set_fields)."""
    seen = {}

    def fit(recipe, **kw):
        seen.update(kw)
        raise ValueError("stop here")

    monkeypatch.setattr(budget_module, "measure_step_seconds", lambda *a, **k: 0.05)
    monkeypatch.setattr(budget_module, "fit_recipe_to_budget", fit)
    assert main(["train", "--output", str(tmp_path / "run"), "--threads", "1", "--no-progress", "--time-budget",
                 "1m", "--set", "model_overrides.depth=1", "--set", "eval_every_epochs=1"]) == 2
    assert {"eval_every_epochs", "model_overrides.depth"} <= seen["user_fields"]


def test_a_budget_keeps_the_warmup_and_validation_the_command_line_set(caplog):
    """--set eval_every_epochs / warmup_epochs are kept (the warm-up in steps of the planned epochs); the
    recipe's own values are re-planned, and the log says which is which."""
    digits = load_recipe("digits")  # warm-up 2 epochs, validation every 10
    kw = {"budget_s": 10, "elapsed_s": 4, "step_s": 0.035, "num_images": 1295, "eval_images": 502}  # 145 steps
    spe = 1295 // digits.batch_size
    with caplog.at_level(logging.INFO, logger="vitlab.train.budget"):
        planned = fit_recipe_to_budget(digits, **kw)
    assert planned.eval_every_epochs == 10**6 and planned.warmup_steps == planned.max_steps // 20
    assert "re-planned warm-up 20 -> " in caplog.text and "validation only at the end" in caplog.text
    mine = digits.replace(eval_every_epochs=1, warmup_epochs=10)
    assert user_set_fields(mine) == {"eval_every_epochs", "warmup_epochs"}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vitlab.train.budget"):
        kept = fit_recipe_to_budget(mine, **kw)
    assert kept.max_steps == planned.max_steps > 10 * spe
    assert kept.eval_every_epochs == 1 and kept.warmup_steps == 10 * spe and kept.warmup_epochs == 0
    assert f"kept as set: warmup_epochs 10 ({10 * spe} warm-up steps), eval_every_epochs 1" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vitlab.train.budget"):
        cut = fit_recipe_to_budget(digits.replace(warmup_epochs=100), **kw)  # longer than the whole run
    assert cut.warmup_steps == cut.max_steps // 20
    assert "would take the whole run" in caplog.text and "WARNING" in [r.levelname for r in caplog.records]
    # a recipe of the user's own: what differs from Recipe's defaults was set; the auto recipe planned its own
    # warm-up steps and validation (never a warmup_epochs)
    assert user_set_fields(Recipe(name="mine", eval_every_epochs=2)) == {"eval_every_epochs"}
    assert user_set_fields(Recipe(name="auto", eval_every_epochs=2, warmup_steps=9)) == set()
    assert user_set_fields(Recipe(name="auto", warmup_steps=9, warmup_epochs=1)) == {"warmup_epochs"}


# ------------------------------------------------------------------------------------------ export
def test_an_int8_export_leaves_the_root_logger_as_it_was(tmp_path):
    """onnxruntime.quantization logs through logging.info, whose implicit basicConfig() would leave a handler
    on the root logger: a notebook's own logging.basicConfig(level=INFO) afterwards would do nothing."""
    for module in ("onnx", "onnxruntime", "onnxscript"):
        pytest.importorskip(module, reason="ONNX export tests need the optional extra: pip install 'vitlab[export]'")
    from vitlab.export import export_onnx

    model = tiny_vit().eval()
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    root.handlers.clear()  # as in a fresh interpreter (pytest's own capture handlers aside)
    try:
        export_onnx(model, tmp_path / "m.onnx", int8=True, timing=False, min_agreement=0.0)
        after, level_after = root.handlers[:], root.level
    finally:
        root.handlers[:] = saved
        root.setLevel(level)
    assert after == [] and level_after == level


def test_eval_default_report_folders_are_each_checkpoints_own(tmp_path, caplog):
    """Two checkpoints in one folder (a run's model and model_ema, downloaded files) wrote the same eval_test/,
    each replacing the other's report, and a user's own metrics.json there was replaced silently."""
    model = tiny_vit()
    for name in ("model", "model_ema", "vit_small"):
        vitlab.save_model(model, tmp_path / f"{name}.safetensors", class_names=["a", "b", "c", "d"])
    data = tmp_path / "data"
    for c in "abcd":
        (data / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8), 60 * "abcd".index(c), np.uint8)).save(data / c / f"{i}.png")
    for name in ("model", "model_ema", "vit_small"):
        assert main(["eval", "--checkpoint", str(tmp_path / f"{name}.safetensors"), "--data", str(data),
                     "--split", "train", "--val-fraction", "0"]) == 0
    folders = {"model": "eval_train", "model_ema": "eval_train_model_ema", "vit_small": "eval_train_vit_small"}
    for name, folder in folders.items():
        report = json.loads((tmp_path / folder / "metrics.json").read_text())
        assert Path(report["checkpoint"]).name == f"{name}.safetensors"
    (tmp_path / folders["vit_small"] / "notes.txt").write_text("mine")
    args = ["eval", "--checkpoint", str(tmp_path / "vit_small.safetensors"), "--data", str(data), "--split", "train",
            "--val-fraction", "0"]
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(args) == 2
    assert "eval_train_vit_small, the default report folder" in caplog.text and "notes.txt" in caplog.text
    assert main([*args, "--overwrite"]) == 0 and (tmp_path / folders["vit_small"] / "notes.txt").read_text() == "mine"


def test_eval_scores_every_image_of_data_the_checkpoint_never_trained_on(tmp_path, capsys):
    """A folder without split folders that the checkpoint's run did not train on: every image is scored (only
    the held-out 10% was, with a message that the test split is the validation part)."""
    run = tmp_path / "run"
    run.mkdir()
    vitlab.save_model(tiny_vit(), run / "model.safetensors", class_names=["a", "b", "c", "d"])
    (run / "job.json").write_text(json.dumps({**run_marker(), "data": "digits", "model": "m"}))
    data = tmp_path / "new"
    for c in "abcd":
        (data / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.full((8, 8), 60 * "abcd".index(c) + i, np.uint8)).save(data / c / f"{i}.png")
    assert main(["eval", "--checkpoint", str(run / "model.safetensors"), "--data", str(data), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["split"] == "all" and report["samples"] == 20
    # --val-fraction holds a part out as before; the run's own data keeps the run's held-out split
    assert main(["eval", "--checkpoint", str(run / "model.safetensors"), "--data", str(data), "--val-fraction", "0.2",
                 "--seed", "0", "--json", "--overwrite"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 4


def test_a_warmup_as_long_as_the_run_is_warned_of(tmp_path, caplog):
    """--steps 20 under the digits recipe's 22-step warm-up trained at a rising lr to the end, silently."""
    with caplog.at_level(logging.WARNING):
        fit(tiny_vit(), recipe(epochs=1, warmup_steps=10), train_set=Noise(112), output_dir=tmp_path / "a",
            progress=False)
    assert "the warm-up (10 steps) is as long as the run (7 steps)" in caplog.text
    assert "--set warmup_steps=... shorter than the run (warmup_epochs is 0)" in caplog.text
    caplog.clear()
    # the recipe's epochs set it: lowering warmup_steps alone would change nothing, so the hint names warmup_epochs
    with caplog.at_level(logging.WARNING):
        fit(tiny_vit(), recipe(epochs=1, warmup_steps=1, warmup_epochs=2.0), train_set=Noise(112),
            output_dir=tmp_path / "c", progress=False)
    assert "--set warmup_epochs=... shorter than the run (warmup_steps is 1)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # both long enough: lowering one alone would change nothing
        fit(tiny_vit(), recipe(epochs=1, warmup_steps=20, warmup_epochs=2.0), train_set=Noise(112),
            output_dir=tmp_path / "d", progress=False)
    assert "--set warmup_epochs=... and warmup_steps=..., both shorter than the run" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        fit(tiny_vit(), recipe(epochs=1, warmup_steps=3), train_set=Noise(112), output_dir=tmp_path / "b",
            progress=False)
    assert "warm-up" not in caplog.text
