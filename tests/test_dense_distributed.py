"""Detection training under torchrun (2 CPU processes, gloo): the same weights as one process with the same
global batch. DETR's box losses are normalised by the boxes of all processes, so with one digit per canvas
(equal no-object weights per process) the two runs differ only by float summation order."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import torch

from dense_helpers import DETR_TINY as TINY
from dense_helpers import write_fake_mnist
from vitlab.checkpoints import read_vitlab
from vitlab.cli.main import main


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", VITLAB_DIST_TIMEOUT="60")
    env.pop("WORLD_SIZE", None)
    return env


def test_detection_two_processes_match_one(tmp_path: Path) -> None:
    mnist = write_fake_mnist(tmp_path / "mnist")
    data = tmp_path / "c"
    assert main(["make-canvases", "--mnist", str(mnist), "--seed", "3", "--output", str(data), "--train", "8",
                 "--val", "2", "--size", "32", "--digits", "1", "1"]) == 0
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"model": "detr_resnet50", "model_overrides": TINY, "img_size": 32, "max_steps": 3,
                                  "optimizer": "sgd", "lr": 0.05, "weight_decay": 0.0, "schedule": "constant",
                                  "augment": False, "hflip": 0.0, "warmup_steps": 0}))
    common = ["-m", "vitlab.cli.main", "train", "--task", "detection", "--data", str(data), "--recipe", str(recipe),
              "--no-progress", "--device", "cpu"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *common, "--batch-size", "2", "--output", str(tmp_path / "two")],
                         env=_env(), capture_output=True, text=True, timeout=180, check=False)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, *common, "--batch-size", "4", "--output", str(tmp_path / "one")],
                         env=_env(), capture_output=True, text=True, timeout=180, check=False)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "global batch 4 (2 x 1 accum x 2 processes)" in two.stderr
    a, _ = read_vitlab(tmp_path / "one" / "model.safetensors")
    b, _ = read_vitlab(tmp_path / "two" / "model.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["val"].keys() >= {"AP50"}


def test_a_finished_dense_run_is_not_replaced_without_overwrite(tmp_path: Path, caplog) -> None:
    mnist = write_fake_mnist(tmp_path / "mnist")
    data = tmp_path / "c"
    assert main(["make-canvases", "--mnist", str(mnist), "--output", str(data), "--train", "2", "--val", "1",
                 "--size", "32"]) == 0
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"model": "detr_resnet50", "model_overrides": TINY, "img_size": 32, "max_steps": 1,
                                  "batch_size": 2, "augment": False}))
    args = ["train", "--task", "detection", "--data", str(data), "--recipe", str(recipe), "--no-progress",
            "--output", str(tmp_path / "run"), "--threads", "1"]
    assert main(args) == 0
    before = (tmp_path / "run" / "model.safetensors").read_bytes()
    with caplog.at_level(logging.ERROR):
        assert main(args) == 2
    assert "finished run" in caplog.text and "--overwrite" in caplog.text
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == before
    assert main([*args, "--overwrite"]) == 0
