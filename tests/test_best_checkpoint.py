"""model_best.safetensors: the model at its best validation by recipe.best_metric (top-1 by default, the loss
minimised), with the EMA's by its own; kept across --resume; reported in results.json; evaluated on the run's
held-out split."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F

from test_cli_resume_checks import write_folder
from test_long_runs import Noise, recipe, records, tiny_vit
from vitlab.checkpoints import read_vitlab
from vitlab.cli.main import main
from vitlab.train import Recipe, apply_overrides, fit, load_recipe
from vitlab.train import trainer as trainer_module
from vitlab.train.run import checkpoint_metadata
from vitlab.train.state import load_train_state, save_train_state

torch.set_num_threads(1)


def _weights(path):
    return read_vitlab(path)[0]


def _same(a, b) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


class Scripted:
    """Cross entropy while training; in validation (no grad) the next of ``values``, as the validation loss
    (each validation is one batch of 32 images)."""

    def __init__(self, values: list[float], start: int = 0) -> None:
        self.values, self.i = values, start

    def __call__(self, x, out, y):
        if torch.is_grad_enabled():
            return F.cross_entropy(out, y)
        self.i += 1
        return torch.tensor(self.values[self.i - 1])


@pytest.fixture
def writes(monkeypatch):
    """The names of the files the trainer's checkpoints write, in order."""
    names: list[str] = []
    save = trainer_module.save_model

    def spy(model, path, **kw):
        names.append(path.name)
        return save(model, path, **kw)

    monkeypatch.setattr(trainer_module, "save_model", spy)
    return names


def test_the_best_file_is_the_model_at_its_best_top1_and_the_emas_at_its_own(tmp_path):
    """Default (auto): top-1, the earliest of equal ones; model_best.safetensors is bitwise the model a run
    stopped at that step wrote, and model_ema_best.safetensors the EMA at the EMA's best step."""
    r, data, val = recipe(epochs=4, ema_decay=0.9), Noise(64), Noise(32, seed=1)  # 4 steps per epoch
    res = fit(tiny_vit(), r, train_set=data, val_set=val, output_dir=tmp_path / "a", progress=False)
    vals = records(tmp_path / "a", "val")
    assert [v["step"] for v in vals] == [4, 8, 12, 16]
    for key, name, found in (("val_top1", "model_best.safetensors", res.best),
                             ("val_ema_top1", "model_ema_best.safetensors", res.best_ema)):
        top = max(v[key] for v in vals)
        step = min(v["step"] for v in vals if v[key] == top)
        assert found == {"metric": "top1", "value": top, "step": step, "epoch": step // 4, "file": name}
        extra = checkpoint_metadata(tmp_path / "a" / name)["extra"]
        assert extra["step"] == step and extra["epoch"] == step // 4 and extra["best"] == found
        stopped = fit(tiny_vit(), r, train_set=data, val_set=val, output_dir=tmp_path / f"until{step}",
                      progress=False, until_step=step, overwrite=True)
        assert stopped.step == step
        last = "model.safetensors" if key == "val_top1" else "model_ema.safetensors"
        assert _same(tmp_path / "a" / name, tmp_path / f"until{step}" / last)
    stale = sum(v["step"] > res.best["step"] for v in vals)  # validations since the best (early stopping's count)
    assert load_train_state(tmp_path / "a" / "train_state.pt")["best"] == {**res.best, "setting": "auto", "stale": stale}


def test_the_loss_is_minimised_and_no_worse_validation_rewrites_the_file(tmp_path, writes):
    """best_metric loss: validation losses 3, 1, 2, 1 (a tie), 4: written at steps 4 and 8 only."""
    r = recipe(epochs=5, best_metric="loss")
    res = fit(tiny_vit(), r, train_set=Noise(64), val_set=Noise(32, seed=1), output_dir=tmp_path / "a",
              progress=False, criterion=Scripted([3.0, 1.0, 2.0, 1.0, 4.0]))
    assert [v["val_loss"] for v in records(tmp_path / "a", "val")] == [3.0, 1.0, 2.0, 1.0, 4.0]
    assert writes.count("model_best.safetensors") == 2
    assert res.best == {"metric": "loss", "value": 1.0, "step": 8, "epoch": 2, "file": "model_best.safetensors"}
    fit(tiny_vit(), r, train_set=Noise(64), val_set=Noise(32, seed=1), output_dir=tmp_path / "b", progress=False,
        criterion=Scripted([3.0, 1.0]), until_step=8)
    assert _same(tmp_path / "a" / "model_best.safetensors", tmp_path / "b" / "model.safetensors")


def test_a_resumed_run_keeps_the_best_of_an_uninterrupted_one(tmp_path):
    """Stopped mid-epoch and after a validation, resumed twice: the same best steps and bitwise the same files
    (model and EMA) as the run without a break."""
    r, data, val = recipe(epochs=4, ema_decay=0.9), Noise(64), Noise(32, seed=1)
    straight = fit(tiny_vit(), r, train_set=data, val_set=val, output_dir=tmp_path / "a", progress=False)
    for until in (6, 12, None):
        resumed = fit(tiny_vit(), r, train_set=data, val_set=val, output_dir=tmp_path / "b", progress=False,
                      until_step=until, resume=until != 6)
    assert resumed.best == straight.best and resumed.best_ema == straight.best_ema
    for name in ("model_best.safetensors", "model_ema_best.safetensors"):
        assert _same(tmp_path / "a" / name, tmp_path / "b" / name)


@pytest.mark.parametrize("older_state", [False, True], ids=["state", "state-without-best"])
def test_resume_never_replaces_a_better_best_and_an_older_state_has_none(tmp_path, writes, older_state):
    """Validation losses 3, 1 | resumed | 2, 1, 4: the best of step 8 stays. A state written before it kept the
    best is resumed as having none yet: the next validation (2) is the best so far, then the 1 after it."""
    r, data, val = recipe(epochs=5, best_metric="loss"), Noise(64), Noise(32, seed=1)
    fit(tiny_vit(), r, train_set=data, val_set=val, output_dir=tmp_path, progress=False,
        criterion=Scripted([3.0, 1.0]), until_step=8)
    if older_state:
        state = load_train_state(tmp_path / "train_state.pt")
        for key in ("best", "best_ema", "format", "version"):
            state.pop(key, None)
        save_train_state(tmp_path / "train_state.pt", state)
    writes.clear()
    res = fit(tiny_vit(), r, train_set=data, val_set=val, output_dir=tmp_path, progress=False, resume=True,
              criterion=Scripted([3.0, 1.0, 2.0, 1.0, 4.0], start=2))
    step = 16 if older_state else 8
    assert res.best["step"] == step and res.best["value"] == 1.0
    assert checkpoint_metadata(tmp_path / "model_best.safetensors")["extra"]["step"] == step
    assert writes.count("model_best.safetensors") == (2 if older_state else 0)  # older: at steps 12 and 16


def test_an_unknown_or_unreported_best_metric_is_refused_before_anything_is_written(tmp_path, caplog):
    with pytest.raises(ValueError, match=r"best_metric='accuracy' is not a validation metric; choose from auto"):
        apply_overrides(load_recipe("digits"), ["best_metric=accuracy"])
    with pytest.raises(ValueError, match="best_metric"):
        Recipe(best_metric="top-1")
    assert main(["train", "--output", str(tmp_path / "cli"), "--steps", "2", "--no-progress",
                 "--set", "best_metric=acc"]) != 0
    assert "best_metric='acc' is not a validation metric" in caplog.text and not (tmp_path / "cli").exists()
    # a metric of the other kind of targets: a single-label run's validation reports no mAP
    with pytest.raises(ValueError, match=r"best_metric='mAP' is not reported by the validation of a single-label"):
        fit(tiny_vit(), recipe(best_metric="mAP"), train_set=Noise(32), val_set=Noise(16), output_dir=tmp_path / "f",
            progress=False)
    assert not (tmp_path / "f").exists()


def test_a_run_without_validation_writes_no_best_and_says_so_once(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="vitlab.train"):
        res = fit(tiny_vit(), recipe(epochs=2), train_set=Noise(32), output_dir=tmp_path, progress=False)
    assert res.best is None and not (tmp_path / "model_best.safetensors").exists()
    assert caplog.text.count("no model_best.safetensors is written") == 1
    assert load_train_state(tmp_path / "train_state.pt")["best"] is None


def test_eval_of_model_best_uses_the_runs_held_out_split_and_results_record_it(tmp_path, caplog):
    """A folder without val/ or test/, held out with seed 3 and val_fraction 0.25: `vitlab eval` of
    model_best.safetensors, without --data, scores the run's held-out images, where the run measured its best."""
    data = write_folder(tmp_path / "A", ("cat", "dog", "ship"), per_class=12)  # 36 images, 9 held out
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        assert main(["train", "--data", str(data), "--output", str(out), "--recipe", "digits", "--threads", "1",
                     "--no-progress", "--batch-size", "9", "--steps", "9", "--set", "model_overrides.depth=1",
                     "--set", "model_overrides.embed_dim=16", "--set", "model_overrides.num_heads=2",
                     "--set", "val_fraction=0.25", "--set", "seed=3", "--set", "eval_every_epochs=1"]) == 0
    results = json.loads((out / "results.json").read_text())
    best = results["best"]
    assert best["metric"] == "top1" and best["file"] == str(out / "model_best.safetensors")
    assert f"val top1 {best['value']:.4f} at step {best['step']}): {out / 'model_best.safetensors'}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(["eval", "--checkpoint", str(out / "model_best.safetensors"), "--threads", "1"]) == 0
    assert "split of" in caplog.text and "held it out (seed 3, val_fraction 0.25)" in caplog.text
    report = json.loads((out / "eval_test_model_best" / "metrics.json").read_text())
    assert report["samples"] == 9 and report["top1"] == pytest.approx(best["value"], abs=1e-6)


def test_resume_with_auto_after_an_explicit_metric_starts_over(tmp_path, caplog):
    """best_metric=loss, then --resume with auto (top-1 for classes): the comparison starts over (it kept comparing
    the loss); the same setting, or auto again, continues; a state without the setting continues as before."""
    from vitlab.train.trainer import _Best

    saved = {"metric": "loss", "value": 0.5, "step": 8, "epoch": 2, "file": "model_best.safetensors",
             "setting": "loss"}

    def restored(setting, record):
        b = _Best(file="model_best.safetensors", prefix="val_", setting=setting)
        b.restore(record, tmp_path / "train_state.pt", check_file=False)
        return b.value

    with caplog.at_level(logging.WARNING, logger="vitlab"):
        assert restored("auto", saved) is None
    assert "best_metric is now auto" in caplog.text
    assert restored("loss", saved) == 0.5
    assert restored("auto", {**saved, "metric": "top1", "setting": "auto"}) == 0.5
    assert restored("auto", {k: v for k, v in saved.items() if k != "setting"}) == 0.5
