"""recipe.early_stopping_patience: training stops after N validations in a row without a better best_metric; the
count survives --resume, results.json and the CLI say where the run stopped."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from test_best_checkpoint import Scripted, _same
from test_cli_resume_checks import write_folder
from test_long_runs import Noise, recipe, records, tiny_vit
from vitlab.cli.main import main
from vitlab.train import Recipe, fit
from vitlab.train.state import load_train_state

torch.set_num_threads(1)
# validation losses at steps 4, 8, 12, ... (4 steps per epoch): best at 8, then 3 worse ones, then a better one
LOSSES = [1.0, 0.9, 0.95, 0.96, 0.97, 0.5, 0.4, 0.3, 0.2, 0.1]


def _fit(out, *, patience, start=0, **kw):
    r = recipe(epochs=10, best_metric="loss", early_stopping_patience=patience)
    return fit(tiny_vit(), r, train_set=Noise(64), val_set=Noise(32, seed=1), output_dir=out, progress=False,
               criterion=Scripted(LOSSES, start=start), **kw)


def test_the_run_stops_after_patience_validations_without_a_better_one(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="vitlab.train"):
        res = _fit(tmp_path / "p3", patience=3)
    assert [v["step"] for v in records(tmp_path / "p3", "val")] == [4, 8, 12, 16, 20]
    assert res.step == 20 and res.total_steps == 40
    assert res.stopped_early == {"step": 20, "epoch": 5, "total_steps": 40, "patience": 3, "metric": "loss",
                                 "best_step": 8}
    assert res.best["step"] == 8 and load_train_state(tmp_path / "p3" / "train_state.pt")["step"] == 20
    assert "early stopping at step 20 of 40: no better validation loss in 3 validations (best 0.9 at step 8" in caplog.text
    # a patience the losses never exhaust trains to the end, and a better validation resets the count
    assert _fit(tmp_path / "p4", patience=4).stopped_early is None
    assert [v["step"] for v in records(tmp_path / "p4", "val")][-1] == 40


def test_the_count_survives_resume_and_a_larger_patience_trains_on(tmp_path, caplog):
    """Stopped at step 12 (one validation without a better one) and resumed: the run stops at step 20 as the
    uninterrupted one, bitwise the same model; resumed at its stop it trains no further unless the patience grows."""
    whole = _fit(tmp_path / "whole", patience=3)
    _fit(tmp_path / "parts", patience=3, until_step=12)
    resumed = _fit(tmp_path / "parts", patience=3, start=3, resume=True)  # without the count: 20 is 3 of 2 -> on
    assert resumed.step == whole.step == 20 and resumed.stopped_early == whole.stopped_early
    assert _same(tmp_path / "whole" / "model.safetensors", tmp_path / "parts" / "model.safetensors")
    with caplog.at_level(logging.INFO, logger="vitlab.train"):
        again = _fit(tmp_path / "parts", patience=3, start=5, resume=True)
    assert again.step == 20 and "the run stopped at step 20 of 40" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vitlab.train"):
        longer = _fit(tmp_path / "parts", patience=5, start=5, resume=True)  # 0.5 at step 24 is better: to the end
    assert longer.step == 40 and longer.stopped_early is None and longer.best["step"] == 40
    assert "will not match" not in caplog.text  # the patience changes no update: not a change of the training


def test_the_count_before_any_finite_validation_is_kept_by_resume():
    from vitlab.train.trainer import _Best

    b = _Best(file="model_best.safetensors", prefix="val_", setting="loss")
    for _ in range(2):
        b.offer({"val_loss": float("nan")}, step=4, epoch=1)
    assert b.value is None and b.stale == 2
    again = _Best(file="model_best.safetensors", prefix="val_", setting="loss")
    again.restore(b.state(), None, check_file=False)
    assert again.stale == 2


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match=r"early_stopping_patience must be >= 1"):
        Recipe(early_stopping_patience=0)
    with pytest.raises(ValueError, match=r"early_stopping_patience needs a best_metric to compare \(it is 'none'\)"):
        Recipe(early_stopping_patience=2, best_metric="none")


def test_the_cli_reports_the_stop_tests_the_model_and_refuses_to_start_over_silently(tmp_path, caplog):
    data = write_folder(tmp_path / "A", ("cat", "dog", "ship"), per_class=12)
    out = tmp_path / "run"
    args = ["train", "--data", str(data), "--output", str(out), "--recipe", "digits", "--threads", "1",
            "--no-progress", "--batch-size", "9", "--steps", "30", "--set", "model_overrides.depth=1",
            "--set", "model_overrides.embed_dim=16", "--set", "model_overrides.num_heads=2",
            "--set", "val_fraction=0.25", "--set", "lr=1e-12", "--set", "warmup_steps=0", "--set", "mixup_alpha=0",
            "--set", "cutmix_alpha=0", "--set", "eval_every_epochs=1", "--set", "early_stopping_patience=1"]
    assert main(args) == 0  # lr 1e-12: the same top-1 every epoch, so the second one is not better
    results = json.loads((out / "results.json").read_text())
    assert results["stopped_early"]["step"] == results["steps"] == 6 and results["stopped_early"]["total_steps"] == 30
    assert "top1" in results["test"]
    caplog.clear()
    assert main(args) != 0
    assert "stopped early at step 6 of 30" in caplog.text and "--resume --set early_stopping_patience=N" in caplog.text


def test_a_run_without_validation_says_the_patience_has_no_effect(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="vitlab.train"):
        res = fit(tiny_vit(), recipe(epochs=2, early_stopping_patience=1), train_set=Noise(32), output_dir=tmp_path,
                  progress=False)
    assert res.step == res.total_steps and res.stopped_early is None
    assert "early_stopping_patience=1 has no effect: this run does not validate" in caplog.text
