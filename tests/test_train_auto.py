"""The recipe chooser (train/auto.py) on data sets described by hand, and the time budget (train/budget.py)."""

from __future__ import annotations

import dataclasses
import json
import logging
import time

import pytest
import torch

import vitlab
from test_train_failures import write_folder
from vitlab.cli.main import main
from vitlab.data import build_dataset
from vitlab.train import budget as budget_module
from vitlab.train import run as run_module
from vitlab.train.auto import (
    CCT_BASE_MODEL,
    DataFacts,
    cct_grid,
    cct_train_flops,
    choose_recipe,
    model_params,
    vit_params,
    vit_train_flops,
)
from vitlab.train.budget import fit_recipe_to_budget, parse_duration, steps_for_budget, time_steps
from vitlab.train.hardware import Hardware

LAPTOP = Hardware(cores=2, threads=2, memory_gb=8, cpu_bf16=False)
BF16_CPU = Hardware(cores=2, threads=2, memory_gb=8, cpu_bf16=True)
H100 = Hardware(cores=16, threads=16, memory_gb=128, gpu="NVIDIA H100", gpu_memory_gb=80, gpu_bf16=True)
SMALL_GPU = Hardware(cores=4, threads=4, memory_gb=16, gpu="NVIDIA T4", gpu_memory_gb=15, gpu_bf16=False)

MNIST = DataFacts(num_images=60000, num_classes=10, image_size=(28, 28), channels=1, has_test=True)
CIFAR = DataFacts(num_images=45000, num_classes=10, image_size=(32, 32), channels=3)
DIGITS = DataFacts(num_images=1437, num_classes=10, image_size=(8, 8), channels=1, has_test=True)
PHOTOS = DataFacts(num_images=3000, num_classes=5, image_size=(375, 500), channels=3)
IMAGENET = DataFacts(num_images=1_281_167, num_classes=1000, image_size=(375, 500), channels=3)
TINY = DataFacts(num_images=40, num_classes=2, image_size=(64, 48), channels=3)


def estimated_steps(choice):
    r = choice.recipe
    return r.max_steps or r.epochs * (MNIST.num_images // r.batch_size)


def test_the_issues_example_is_minutes_not_days():
    """A 60,000-image 28x28 set on a 2-core CPU: the issue saw ViT-B/16 at 224 px, 99 hours."""
    c = choose_recipe(MNIST, LAPTOP)
    r = c.recipe
    assert c.estimated_s <= 20 * 60
    o = r.model_overrides
    # small images: a CCT at the native size, two conv + pool blocks giving 7x7 tokens
    assert r.model == CCT_BASE_MODEL and r.img_size == 28 and o["num_conv_layers"] == 2
    assert o["embed_dim"] <= 128 and r.batch_size == 64 and r.global_batch is None
    assert o["drop_path_rate"] == o["attn_drop_rate"] == 0.0  # a short run: CCT's regularisers off
    assert r.hflip == 0.0 and r.amp == "none" and r.val_fraction == 0.0  # grayscale: no flips; MNIST has a test set
    assert r.epochs >= 3 and r.schedule == "cosine"
    assert c.summary.startswith("auto recipe: cct_7_3x2_32 with embed_dim=") and "(7x7 tokens)" in c.summary
    model = vitlab.create_model(r.model, num_classes=10, img_size=r.img_size, in_chans=1, **o)
    assert model.tokenizer.grid_size == (7, 7)
    # the FLOPs the chooser reasons with are the model's own (forward, x3 for training)
    from vitlab.benchmark import forward_flops
    fwd = forward_flops(model, (1, 28, 28))
    est = cct_train_flops(img=28, channels=1, embed_dim=o["embed_dim"], depth=o["depth"], mlp_ratio=o["mlp_ratio"],
                          num_conv=2) / 3
    attention = 2 * 2 * 49 * 49 * o["embed_dim"] * o["depth"]  # q k^T and attn v, which the counter leaves out
    assert abs(est - attention - fwd) / fwd < 0.01, (est, fwd)


@pytest.mark.parametrize("data", [MNIST, CIFAR, DIGITS, PHOTOS, IMAGENET, TINY], ids=lambda d: f"{d.num_images}")
@pytest.mark.parametrize("hw", [LAPTOP, BF16_CPU, SMALL_GPU, H100], ids=["laptop", "bf16cpu", "t4", "h100"])
def test_every_choice_fits_the_budget_and_builds(data, hw):
    c = choose_recipe(data, hw)
    r = c.recipe
    assert c.estimated_s <= (30 if hw.gpu else 20) * 60 * 1.001
    img = r.img_size
    o = r.model_overrides
    if r.model == CCT_BASE_MODEL:  # up to 64 px: a CCT with a token grid of about 8 per side
        assert img <= 64 and 4 <= cct_grid(img, o["num_conv_layers"]) <= 11
        params = model_params(r.model, o, img=img, channels=data.channels, num_classes=data.num_classes)
    else:
        assert img > 64 and img % o["patch_size"] == 0 and 4 <= (img // o["patch_size"]) <= 14
        params = vit_params(img=img, patch=o["patch_size"], channels=data.channels, embed_dim=o["embed_dim"],
                            depth=o["depth"], mlp_ratio=o["mlp_ratio"], num_classes=data.num_classes)
    assert r.batch_size <= max(8, data.num_images // 8)
    assert (r.hflip > 0) == (data.channels == 3)
    assert params <= max(200 * data.num_images, 200_000)
    assert r.val_fraction == (0.0 if data.has_test else 0.1)
    with torch.device("meta"):
        model = vitlab.create_model(r.model, num_classes=data.num_classes, img_size=img, in_chans=data.channels,
                                    **o)
    assert model.preprocessing.input_size == (data.channels, img, img)


def test_more_machine_more_model():
    laptop, gpu = choose_recipe(CIFAR, LAPTOP).recipe, choose_recipe(CIFAR, H100).recipe
    assert gpu.model_overrides["embed_dim"] > laptop.model_overrides["embed_dim"]
    assert gpu.epochs > laptop.epochs and gpu.amp == "bf16"
    assert choose_recipe(PHOTOS, H100).recipe.img_size == 224 and choose_recipe(PHOTOS, SMALL_GPU).recipe.img_size == 128
    assert choose_recipe(PHOTOS, LAPTOP).recipe.img_size == 64
    long = choose_recipe(CIFAR, LAPTOP, time_budget_s=4 * 3600).recipe
    assert long.epochs > laptop.epochs and long.scale[0] < laptop.scale[0]  # longer runs: stronger augmentation


def test_small_models_stay_float32_on_a_bf16_cpu():
    assert choose_recipe(MNIST, BF16_CPU).recipe.amp == "none"
    assert choose_recipe(MNIST, BF16_CPU, model="vit_base_patch16_224", model_flops=5e10,
                         model_width=768).recipe.amp == "bf16"
    assert choose_recipe(MNIST, BF16_CPU, model="vit_tiny_patch16_224", model_flops=7e9,
                         model_width=192).recipe.amp == "none"


def test_too_much_data_for_one_pass_stops_part_way_on_time():
    c = choose_recipe(IMAGENET, LAPTOP)
    assert c.recipe.max_steps is not None and c.recipe.epochs == 1
    assert c.estimated_s == pytest.approx(20 * 60, rel=0.01)


def test_a_named_model_gets_a_schedule_only():
    flops = vit_train_flops(img=224, patch=16, channels=3, embed_dim=768, depth=12, mlp_ratio=4.0)
    c = choose_recipe(PHOTOS, H100, model="vit_base_patch16_224", model_flops=flops, model_width=768)
    # a long run: still no stochastic depth or other change to the model the user named
    assert c.recipe.model == "vit_base_patch16_224" and c.recipe.model_overrides == {} and c.recipe.img_size is None
    assert c.recipe.epochs >= 40 and c.estimated_s <= 30 * 60 * 1.001 and c.recipe.amp == "bf16"
    short = choose_recipe(PHOTOS, LAPTOP, model="vit_base_patch16_224", model_flops=flops)
    assert short.estimated_s <= 20 * 60 * 1.001 and "at its own resolution" in short.summary


def test_single_class_is_refused():
    with pytest.raises(ValueError, match="at least two"):
        choose_recipe(DataFacts(num_images=10, num_classes=1, image_size=(8, 8), channels=1), LAPTOP)


# ------------------------------------------------------------------------------------------- budget
def test_parse_duration():
    assert [parse_duration(s) for s in ("20m", "1h30m", "90s", "1.5h", "2min")] == [1200, 5400, 90, 5400, 120]
    for bad in ("20", "m", "-5m", "20 parsecs", "0s"):
        with pytest.raises(ValueError, match="--time-budget"):
            parse_duration(bad)


def test_steps_for_budget():
    # 10 min, 60 s spent, 0.5 s/step of 100 images, 1000 images to evaluate (1000/100 * 0.5/3 = 1.67 s)
    assert steps_for_budget(budget_s=600, elapsed_s=60, step_s=0.5, eval_images=1000, batch=100) == \
        int(0.92 * (600 - 60 - 1000 / 100 * 0.5 / 3) / 0.5)
    assert steps_for_budget(budget_s=10, elapsed_s=60, step_s=0.5, eval_images=0, batch=1) == 1  # over already


def test_time_steps_is_the_mean_after_warmup():
    ticks = iter([0, 1, 10, 12, 20, 21, 30, 39, 40, 41, 50, 51])  # durations 1, 2, 1, 9, then 1, 1
    calls = []
    assert time_steps(lambda: calls.append(1), steps=4, warmup=2, clock=lambda: next(ticks)) == 13 / 4
    assert len(calls) == 6
    ticks = iter([0, 1, 10, 12, 20, 21, 30, 39, 40, 41, 50, 51])
    # at least 14 s timed: one more step
    assert time_steps(lambda: None, steps=4, warmup=0, min_seconds=14, clock=lambda: next(ticks)) == 14 / 5


def test_fit_recipe_to_budget_ends_the_schedule_on_time():
    r = choose_recipe(CIFAR, LAPTOP).recipe
    fitted = fit_recipe_to_budget(r, budget_s=1200, elapsed_s=30, step_s=0.25, num_images=45000, eval_images=5000)
    assert fitted.max_steps == steps_for_budget(budget_s=1200, elapsed_s=30, step_s=0.25, eval_images=5000,
                                                batch=r.batch_size)
    assert fitted.epochs == -(-fitted.max_steps // (45000 // r.batch_size))
    assert fitted.warmup_steps <= fitted.max_steps // 20 and fitted.eval_every_epochs > fitted.epochs


def test_cli_auto_recipe_and_time_budget(tmp_path, monkeypatch, caplog):
    data = write_folder(tmp_path / "data", per_class=12)
    monkeypatch.setattr(budget_module, "measure_step_seconds", lambda *a, **k: 10.0)  # no timing in tests
    deadlines = []

    def deadline(**kw):  # the run's deadline, without its checks: re-timing real steps would fill the 2 minutes
        deadlines.append(budget_module.Deadline(**kw))
        return dataclasses.replace(deadlines[-1], checks=())

    monkeypatch.setattr(run_module, "Deadline", deadline)
    t0 = time.monotonic()
    with caplog.at_level(logging.INFO):
        assert main(["train", "--data", str(data), "--output", str(tmp_path / "run"), "--time-budget", "2m",
                     "--no-progress"]) == 0
    (d,) = deadlines  # fit was given the command's deadline, and time for the final evaluation
    val = build_dataset(str(data), split="val", val_fraction=0.1, seed=0)
    # from the command's start (a young process: its own start, up to 30 s before main() was entered)
    # less the reserve for what follows the last step (final checkpoint, results, exit): 5 s of 2 minutes
    assert budget_module.finish_reserve_s(120) == 5.0 and budget_module.finish_reserve_s(3600) == 18.0
    assert t0 - 31 < d.end - 115 < t0 + 1 and d.eval_images == len(val)  # no test/: the val part, evaluated once
    assert "auto recipe: cct_7_3x2_32 with embed_dim=" in caplog.text
    assert "time budget 2m00s: 10.000 s per step measured" in caplog.text
    saved = json.loads((tmp_path / "run" / "recipe.json").read_text())
    assert saved["name"] == "auto" and saved["img_size"] == 8 and saved["description"].startswith("Chosen by")
    assert 1 <= saved["max_steps"] <= int(0.92 * 115 / 10) and saved["resolved"]["total_steps"] == saved["max_steps"]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["steps"] == saved["max_steps"]


def test_the_budget_counts_from_the_process_start_of_a_fresh_command():
    import subprocess
    import sys

    code = ("import time; time.sleep(0.5); from vitlab.train.budget import process_started; "
            "t = time.monotonic(); print(t - process_started(), t - process_started(max_age_s=0))")
    young, old = map(float, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                           check=True).stdout.split())
    assert 0.45 < young < 30  # the half second slept, and the start-up and imports around it
    assert old < 0.1  # a process older than max_age_s: now


def test_a_replanned_horizon_keeps_the_learning_rate_continuous():
    from vitlab.train.schedule import Horizon, lr_factor

    def f(step, h):
        return lr_factor(step, total_steps=h.total_steps, warmup_steps=10, kind="cosine", min_factor=0.01, horizon=h)

    for new_end in (300, 60):  # longer, and shorter
        h = Horizon(total_steps=100, warmup_steps=10)
        before = f(40, h)
        h.replan(40, new_end)
        assert f(40, h) == pytest.approx(before)  # no jump where it changes
        lrs = [f(s, h) for s in range(40, new_end + 1)]
        assert all(a > b for a, b in zip(lrs, lrs[1:]))  # still decaying, at a new pace
        assert lrs[-1] == pytest.approx(0.01)  # and reaching the floor at the new end
    h = Horizon(total_steps=100, warmup_steps=10)
    h.replan(10, 200)  # at the end of the warm-up: simply the schedule of a 200-step run
    assert [f(s, h) for s in range(201)] == [lr_factor(s, total_steps=200, warmup_steps=10, kind="cosine",
                                                       min_factor=0.01) for s in range(201)]
    with pytest.raises(ValueError, match="after step"):
        h.replan(50, 50)


def test_the_replanner_times_the_runs_own_steps():
    from vitlab.train.budget import REPLAN_SAFETY, Deadline, Replanner

    now = [0.0]
    per_step = {True: 2.0, False: 0.5}  # the first steps run slow, then 0.5 s each
    deadline = Deadline(end=1000.0, eval_images=400, checks=(0.0, 0.5), clock=lambda: now[0])
    r = Replanner(deadline, warmup=40, total_steps=400, batch=100)
    total, got = 400, []
    for step in range(1, 2000):
        if step > total:
            break
        now[0] += per_step[step <= 10] if len(got) < 1 else 1.0  # after the first re-plan: twice as slow
        out = r.after_step(step, total)
        if out is not None:
            got.append((step, *out))
            total = out[0]
    (s1, t1, dt1), (s2, t2, dt2) = got
    assert s1 == 40 and dt1 == pytest.approx(0.5)  # timed over steps 20-40, after the slow start
    eval_s = 400 * budget_module.EVAL_COST * 0.5 / 100
    assert t1 == 40 + int(REPLAN_SAFETY * (1000 - now_at(s1, 10, 2.0, 0.5) - eval_s) / 0.5)
    assert s2 == 40 + round(0.5 * (t1 - 40)) and dt2 == pytest.approx(1.0)
    assert t2 < t1  # slower now: the run is shortened to end on time


def test_processes_that_measure_differently_check_again_together():
    """Under DDP each rank times its own steps but runs rank 0's plan: follow() puts every rank's next check
    at the same step (else the broadcast there would hang)."""
    from vitlab.train.budget import Deadline, Replanner

    clocks = {"fast": [0.0], "slow": [0.0]}
    ranks = {k: Replanner(Deadline(end=500.0, checks=(0.0, 0.5, 0.9), clock=lambda k=k: clocks[k][0]), warmup=10,
                          total_steps=100, batch=8) for k in clocks}
    total, checks = 100, []
    for step in range(1, 2000):
        if step >= total:
            break
        clocks["fast"][0] += 1.0
        clocks["slow"][0] += 1.7
        got = {k: r.after_step(step, total) for k, r in ranks.items()}
        assert (got["fast"] is None) == (got["slow"] is None), step  # both at a check, or neither
        if got["fast"] is not None:
            assert got["fast"][0] != got["slow"][0]  # they measured differently
            total = got["fast"][0]  # rank 0's plan
            for r in ranks.values():
                r.follow(step, total)
            checks.append(step)
    assert len(checks) == 3


def now_at(step, slow_steps, slow, fast):
    return slow_steps * slow + (step - slow_steps) * fast


def test_measure_step_seconds_leaves_the_run_untouched():
    from vitlab.data import build_dataset, eval_transform
    from vitlab.train.budget import measure_step_seconds
    from vitlab.train.state import get_rng_state

    model = vitlab.create_model("vit_tiny_patch16_224", img_size=8, in_chans=1, num_classes=10, patch_size=2,
                                embed_dim=16, depth=1, num_heads=2)
    ds = build_dataset("digits", split="train", transform=eval_transform(model.preprocessing))
    recipe = choose_recipe(DIGITS, LAPTOP).recipe.replace(batch_size=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = get_rng_state()["torch"].clone()
    seconds = measure_step_seconds(model, recipe, ds, torch.device("cpu"), steps=2, warmup=1)
    assert 0 < seconds < 60
    assert torch.equal(get_rng_state()["torch"], rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("native", [True, False])
def test_bf16_only_where_the_cpu_has_it(monkeypatch, caplog, native):
    from vitlab.train import hardware
    from vitlab.train.recipe import Recipe
    from vitlab.train.run import _check_precision

    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: native)
    with caplog.at_level(logging.WARNING):
        got = _check_precision(Recipe(amp="bf16"), torch.device("cpu"))
    assert got.amp == ("bf16" if native else "none")
    assert ("no native bfloat16" in caplog.text) != native
    assert _check_precision(Recipe(amp="none"), torch.device("cpu")).amp == "none"


def test_the_auto_summary_is_followed_by_what_the_command_line_changed(tmp_path, caplog):
    data = write_folder(tmp_path / "data", per_class=12)
    with caplog.at_level(logging.INFO, logger="vitlab"):
        assert main(["train", "--data", str(data), "--img-size", "16", "--steps", "2", "--no-progress",
                     "--set", "augment=false", "--output", str(tmp_path / "run")]) == 0
    summary = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("auto recipe:"))
    assert "16 px" not in summary  # the recipe as chosen ...
    changed = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("auto recipe changed"))
    assert "img_size" in changed and "-> 16" in changed and "max_steps None -> 2" in changed
    assert "augment True -> False" in changed
    saved = json.loads((tmp_path / "run" / "recipe.json").read_text())
    assert saved["img_size"] == 16 and saved["max_steps"] == 2
