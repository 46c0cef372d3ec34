"""recipe.class_balance with the rest of the trainer: `vitlab train` / `finetune --set class_balance=...` and what
the run records, repeated augmentation, multi-scale batches, a time budget's re-planned length with --resume, the
auto recipe on imbalanced data."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_class_balance import LongTail, recipe, tiny_vit
from vitlab.checkpoints import read_vitlab
from vitlab.cli.main import main
from vitlab.train import fit
from vitlab.train.recipe import recipe_from_dict

torch.set_num_threads(1)

TINY = ["--recipe", "digits", "--threads", "1", "--no-progress", "--batch-size", "8", "--steps", "3",
        "--set", "model_overrides.depth=1", "--set", "model_overrides.embed_dim=16",
        "--set", "model_overrides.num_heads=2", "--set", "val_fraction=0.25"]


def long_tailed_folder(root: Path, counts=(24, 8, 4)) -> Path:
    """A flat class folder of 8x8 grey PNGs, ``counts[i]`` images of class i (its row i bright)."""
    g = np.random.default_rng(0)
    for i, n in enumerate(counts):
        (root / f"c{i}").mkdir(parents=True)
        for j in range(n):
            img = g.integers(0, 64, size=(8, 8)).astype(np.uint8)
            img[i] = 255
            Image.fromarray(img, mode="L").save(root / f"c{i}" / f"{j}.png")
    return root


def test_train_and_finetune_record_the_class_balance_they_used(tmp_path):
    data = long_tailed_folder(tmp_path / "data")
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--output", str(run), *TINY, "--set", "class_balance=loss",
                 "--set", "class_balance_power=0.5"]) == 0
    results = json.loads((run / "results.json").read_text())
    used = results["class_balance"]
    assert used["mode"] == "loss" and used["power"] == 0.5
    assert used["counts"] == [18, 6, 3] and used["images"] == 27  # a quarter of each class held out
    n = np.array(used["counts"], dtype=float)
    w = n ** -0.5 * n.sum() / (n * n ** -0.5).sum()
    assert used["class_weights"] == pytest.approx(w.tolist(), abs=1e-6)
    assert "balanced_accuracy" in results["test"] and "val_balanced_accuracy" in results["val"]
    recorded = json.loads((run / "recipe.json").read_text())
    assert recorded["class_balance"] == "loss" and recorded["resolved"]["class_balance"]["counts"] == [18, 6, 3]
    _, meta = read_vitlab(run / "model.safetensors")
    assert meta["extra"]["recipe_settings"]["class_balance"] == "loss"

    tuned = tmp_path / "tuned"
    assert main(["finetune", "--from", str(run / "model.safetensors"), "--data", str(data), "--output", str(tuned),
                 *TINY[2:], "--set", "global_batch=none", "--set", "class_balance=sampler"]) == 0
    used = json.loads((tuned / "results.json").read_text())["class_balance"]
    assert used["mode"] == "sampler" and used["class_probabilities"] == pytest.approx([1 / 3] * 3)


def test_resumed_cli_run_continues_bitwise(tmp_path, monkeypatch):
    import vitlab.train.run as run_module

    data = long_tailed_folder(tmp_path / "data")
    args = [*TINY, "--set", "class_balance=sampler", "--set", "label_smoothing=0.1", "--set", "warmup_steps=1"]
    args[args.index("--steps") + 1] = "8"  # 3 steps per epoch: the stop falls mid-epoch
    assert main(["train", "--data", str(data), "--output", str(tmp_path / "a"), *args]) == 0
    fit_ = run_module.fit
    with monkeypatch.context() as m:  # the run stopped after 4 steps, its state saved
        m.setattr(run_module, "fit", lambda *a, **kw: fit_(*a, **{**kw, "until_step": 4}))
        assert main(["train", "--data", str(data), "--output", str(tmp_path / "b"), *args]) == 0
    assert torch.load(tmp_path / "b" / "train_state.pt", weights_only=False)["step"] == 4
    assert main(["train", "--output", str(tmp_path / "b"), "--resume", "--threads", "1", "--no-progress"]) == 0
    a, _ = read_vitlab(tmp_path / "a" / "model.safetensors")
    b, _ = read_vitlab(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_repeated_augmentation_repeats_balanced_draws(tmp_path, monkeypatch):
    """repeat_aug 2 with the sampler: each drawn image twice in a row (one process), the classes balanced."""
    from vitlab.train import objective as objective_module

    seen: list[list[int]] = []
    step = objective_module.ClassificationObjective.step

    def record(self, model, batch):
        seen.append(batch[1].tolist())
        return step(self, model, batch)

    monkeypatch.setattr(objective_module.ClassificationObjective, "step", record)
    data = LongTail()
    data.augment = True
    res = fit(tiny_vit(), recipe(epochs=10, class_balance="sampler", repeat_aug=2), train_set=data,
              output_dir=tmp_path, progress=False)
    labels = [y for batch in seen for y in batch]
    assert res.step == 50 and len(labels) == 800
    assert all(labels[i] == labels[i + 1] for i in range(0, len(labels), 2))
    counts = Counter(labels)
    assert all(abs(counts[c] / 800 - 0.25) < 0.06 for c in range(4)), counts


def test_multi_scale_batches_draw_from_the_balanced_sampler(tmp_path):
    from test_multiscale import Textures
    from vitlab.data.sampler import ClassBalancedSampler

    from model_helpers import make_tiny

    data = Textures(48)
    data.targets = data.y.tolist()
    r = recipe(max_steps=2, batch_size=8, class_balance="sampler", multi_scale=(32, 64))
    torch.manual_seed(0)
    res = fit(make_tiny("mobilevit_xxs", num_classes=4), r, train_set=data, output_dir=tmp_path, progress=False)
    # the probabilities reached the sampler inside the multi-scale batch sampler
    counts = Counter(data.targets)
    expect = ClassBalancedSampler(data.targets).probabilities.tolist()
    assert res.step == 2 and res.class_balance["counts"] == [counts[c] for c in range(4)]
    assert res.class_balance["class_probabilities"] == pytest.approx(expect) == [0.25] * 4


def test_a_time_budgets_replanned_run_resumes_exactly(tmp_path):
    """A deadline lengthens the run past its planned epochs; the balanced sampler goes on drawing, and a run
    stopped after the re-plan resumes (as --resume does, from its recipe.json) to the same weights."""
    from test_train import _fake_clock
    from vitlab.train.budget import Deadline

    r = recipe(epochs=2, warmup_steps=4, class_balance="sampler", class_balance_power=0.5)
    data = LongTail(augment=True)  # 5 steps per epoch: 10 planned

    def deadline():  # timed at step 2, then re-planned at the end of the warm-up
        return Deadline(end=9.0, checks=(0.0, 0.5), clock=_fake_clock(0.0, 1.0, 6.0))

    straight = fit(tiny_vit(), r, train_set=data, output_dir=tmp_path / "a", progress=False, deadline=deadline())
    assert straight.total_steps == straight.step > 10
    fit(tiny_vit(), r, train_set=data, output_dir=tmp_path / "b", progress=False, deadline=deadline(),
        until_step=straight.total_steps - 3)
    saved = json.loads((tmp_path / "b" / "recipe.json").read_text())
    assert saved["resolved"]["class_balance"]["counts"] == [48, 24, 8, 4]
    resumed = fit(tiny_vit(), recipe_from_dict({k: v for k, v in saved.items() if k != "resolved"}),
                  train_set=data, output_dir=tmp_path / "b", progress=False, resume=True)
    assert resumed.step == straight.step
    a, _ = read_vitlab(tmp_path / "a" / "model.safetensors")
    b, _ = read_vitlab(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_auto_recipe_balances_strongly_imbalanced_classes(caplog):
    """Past IMBALANCE_RATIO (10x) single-label data trains with class-balanced sampling at power 0.5, said in the
    warning and the summary; milder imbalance, and multi-label data, train on the data's own mix."""
    from vitlab.train.auto import DataFacts, choose_recipe
    from vitlab.train.hardware import Hardware

    def choose(counts, **kw):
        facts = DataFacts(num_images=sum(counts), num_classes=len(counts), image_size=(28, 28), channels=1,
                          has_test=True, class_counts=counts, **kw)
        return choose_recipe(facts, Hardware(cores=2, threads=2))

    with caplog.at_level(logging.WARNING):
        choice = choose((4000, 900, 100))
    assert (choice.recipe.class_balance, choice.recipe.class_balance_power) == ("sampler", 0.5)
    assert "class-balanced sampling (power 0.5)" in choice.summary
    assert "imbalanced classes: the largest has 4,000 images, the smallest 100 (40x); the auto recipe trains with " \
           "class-balanced sampling (class_balance=sampler, class_balance_power=0.5" in caplog.text
    assert "--set class_balance=none" in caplog.text
    for counts in ((4000, 900, 401), (500, 500, 500)):
        mild = choose(counts)
        assert mild.recipe.class_balance == "none" and "class-balanced" not in mild.summary
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        tags = choose((4000, 900, 100), multi_label=True)
    assert tags.recipe.class_balance == "none" and "--set class_balance=loss weighs each label's positives" in \
        caplog.text


def test_eval_prints_the_balanced_accuracy_it_records(tmp_path, capsys):
    """`vitlab eval` prints the balanced accuracy (mean per-class accuracy) beside top-1, the value metrics.json
    holds, so that a user training on imbalanced classes sees it without opening the file."""
    data = long_tailed_folder(tmp_path / "data")
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--output", str(run), *TINY]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run / "model.safetensors"), "--data", str(data), "--split", "val",
                 "--output", str(tmp_path / "report"), "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    balanced = json.loads((tmp_path / "report" / "metrics.json").read_text())["balanced_accuracy"]
    assert f"balanced accuracy {100 * balanced:.2f}%" in printed


def test_a_recipe_of_ones_own_on_imbalanced_classes_is_told_what_helps(tmp_path, caplog):
    """The auto recipe balances strongly imbalanced classes itself; a run with a recipe of the user's own (train
    --recipe, finetune) did not even say the data was imbalanced. It warns now, naming class_balance, and not once
    class_balance is set or the classes are balanced."""
    data = long_tailed_folder(tmp_path / "data", counts=(40, 4, 4))
    with caplog.at_level(logging.WARNING):
        assert main(["train", "--data", str(data), "--output", str(tmp_path / "a"), *TINY]) == 0
    assert "imbalanced classes: the largest has 30 images, the smallest 3 (10x)" in caplog.text
    assert "--set class_balance=sampler" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main(["train", "--data", str(data), "--output", str(tmp_path / "b"), *TINY,
                     "--set", "class_balance=loss"]) == 0
    assert "imbalanced classes" not in caplog.text
    balanced = long_tailed_folder(tmp_path / "even", counts=(8, 8, 8))
    with caplog.at_level(logging.WARNING):
        assert main(["train", "--data", str(balanced), "--output", str(tmp_path / "c"), *TINY]) == 0
    assert "imbalanced classes" not in caplog.text
