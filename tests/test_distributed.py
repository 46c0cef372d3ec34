"""Distributed training under torchrun on the CPU (gloo): equivalence with one process, and failure handling."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vitlab.checkpoints import read_vitlab

# SGD, no augmentation, no dropout: the two runs then differ only by float summation order.
RUN = ["train", "--data", "digits", "--steps", "3", "--no-progress", "--set", "optimizer=sgd", "--set", "lr=0.05",
       "--set", "augment=false", "--set", "model_overrides.drop_path_rate=0", "--set", "model_overrides.depth=1",
       "--set", "model_overrides.embed_dim=32", "--set", "model_overrides.num_heads=2", "--set", "warmup_steps=0",
       "--set", "warmup_epochs=0", "--device", "cpu"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", VITLAB_DIST_TIMEOUT="60")
    env.pop("WORLD_SIZE", None)
    return env


def _torchrun(args, timeout=150):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, check=False)


def two_match_one(run: list[str], batch: int, out: Path) -> tuple[dict, dict]:
    """``run`` (vitlab CLI arguments) under torchrun on two processes of ``batch`` (into ``out / "two"``) and in one
    process of ``2 * batch`` (``out / "one"``): both succeed and their final weights agree as one global batch's
    update should (float rounding apart). Returns the weights (one, two)."""
    two = _torchrun(["-m", "vitlab.cli.main", *run, "--batch-size", str(batch), "--output", str(out / "two")])
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "vitlab.cli.main", *run, "--batch-size", str(2 * batch),
                          "--output", str(out / "one")], env=_env(), capture_output=True, text=True,
                         timeout=150, check=False)
    assert one.returncode == 0, one.stderr[-3000:]
    a, _ = read_vitlab(out / "one" / "model.safetensors")
    b, _ = read_vitlab(out / "two" / "model.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    return a, b


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    two = _torchrun(["-m", "vitlab.cli.main", *RUN, "--batch-size", "16", "--output", str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "vitlab.cli.main", *RUN, "--batch-size", "32",
                          "--output", str(tmp_path / "one")], env=_env(), capture_output=True, text=True,
                         timeout=150, check=False)
    assert one.returncode == 0, one.stderr[-3000:]
    a, _ = read_vitlab(tmp_path / "one" / "model.safetensors")
    b, meta = read_vitlab(tmp_path / "two" / "model.safetensors")
    assert meta["extra"]["step"] == 3
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    # training did move the weights: the zero-initialised head is no longer zero
    assert a["head.weight"].abs().max() > 1e-3
    assert "global batch 32 (16 x 1 accum x 2 processes)" in two.stderr


FAILING = textwrap.dedent("""
    import os, sys
    import vitlab.train.losses as losses
    from vitlab.cli.main import main

    if os.environ["RANK"] == "1":
        original = losses.ClassificationLoss.forward
        calls = {"n": 0}

        def failing(self, *args):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("injected failure on rank 1")
            return original(self, *args)

        losses.ClassificationLoss.forward = failing
    sys.exit(main(sys.argv[1:]))
""")


def test_a_failing_rank_fails_the_run_without_hanging(tmp_path):
    script = tmp_path / "failing.py"
    script.write_text(FAILING)
    try:
        res = _torchrun([str(script), *RUN, "--set", "max_steps=50", "--batch-size", "16", "--output",
                         str(tmp_path / "out")], timeout=150)
    except subprocess.TimeoutExpired:
        pytest.fail("the run hung after a rank failed")
    assert res.returncode != 0
    assert "injected failure on rank 1" in res.stderr + res.stdout


def test_multi_label_two_processes_match_one(tmp_path):
    """--multi-label under torchrun: the same weights as one process with the same global batch (BCE's mean over
    the batch's labels), the same validation mAP and the same best checkpoint, written once."""
    import json

    from test_multilabel import tagged_digits

    data = tagged_digits(tmp_path / "tagged", n=80)
    run = [r for r in RUN if r not in ("--data", "digits")] + [
        "--data", str(data), "--multi-label", "--recipe", "digits", "--set", "val_fraction=0.25", "--img-size", "8",
        "--set", "model_overrides.patch_size=4"]
    a, _ = two_match_one(run, 8, tmp_path)
    assert a["head.weight"].abs().max() > 1e-3
    ra, rb = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert ra["val"]["val_mAP"] == pytest.approx(rb["val"]["val_mAP"], abs=1e-6)
    assert ra["best"]["step"] == rb["best"]["step"] and (tmp_path / "two" / "model_best.safetensors").is_file()


def test_early_stopping_stops_every_process_at_the_same_step(tmp_path):
    """Rank 0 validates and judges early stopping; the other rank follows it (without the broadcast it would train
    on alone and the run would hang at its next collective)."""
    import json

    from test_cli_resume_checks import write_folder

    data = write_folder(tmp_path / "A", ("cat", "dog", "ship"), per_class=12)
    swap = {"digits": str(data), "3": "30", "lr=0.05": "lr=1e-12"}  # --data, --steps, the same top-1 every epoch
    run = [swap.get(r, r) for r in RUN] + [
        "--recipe", "digits", "--set", "val_fraction=0.25", "--set", "eval_every_epochs=1",
        "--set", "early_stopping_patience=1", "--batch-size", "4", "--output", str(tmp_path / "two")]
    two = _torchrun(["-m", "vitlab.cli.main", *run])
    assert two.returncode == 0, two.stderr[-3000:]
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert results["stopped_early"]["step"] == results["steps"] == 6  # 27 training images, global batch 8: 3 per epoch


def test_class_balanced_sampling_two_processes_match_one(tmp_path):
    """class_balance=sampler under torchrun: each rank takes its share of the one draw of (seed, epoch), so two
    processes of batch 16 train the weights of one process of batch 32; both record the same class probabilities."""
    import json

    run = [r if r != "3" else "6" for r in RUN] + ["--set", "class_balance=sampler", "--set", "class_balance_power=0.5"]
    two_match_one(run, 16, tmp_path)
    ra, rb = (json.loads((tmp_path / d / "results.json").read_text())["class_balance"] for d in ("one", "two"))
    assert ra == rb and ra["mode"] == "sampler" and len(ra["class_probabilities"]) == 10
