"""Threads, loader workers and decoded-image caching: vitlab uses the cores it is given, and data loading
keeps up with the model (issue 14)."""

from __future__ import annotations

import logging

import pytest
import torch

from test_train_failures import FAST, write_folder
from vitlab.cli.main import main
from vitlab.data import BadImageError, build_dataset, eval_transform
from vitlab.data.cache import cache_decoded
from vitlab.models.base import Preprocessing
from vitlab.train import hardware, list_recipes, load_recipe
from vitlab.train.hardware import default_threads, default_workers, training_threads


@pytest.mark.parametrize("name", list_recipes())
def test_no_shipped_recipe_pins_threads_or_workers(name):
    recipe = load_recipe(name)
    assert recipe.cpu_threads is None and recipe.workers is None


def test_threads_follow_the_cores_given_and_omp(monkeypatch):
    monkeypatch.setattr(hardware, "available_cores", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert default_threads() == 8 and default_threads(processes_per_machine=2) == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    before = torch.get_num_threads()
    with training_threads(None) as n:
        assert n == 3 and torch.get_num_threads() == 3
    with training_threads(2) as n:  # --threads wins over OMP_NUM_THREADS
        assert n == 2 and torch.get_num_threads() == 2
    assert torch.get_num_threads() == before  # restored
    with pytest.raises(ValueError, match="--threads"), training_threads(0):
        pass


def test_default_workers():
    assert default_workers(in_memory=True, cores=2) == 0  # augmentation keeps up; a worker would take a core
    assert default_workers(in_memory=True, cores=16) == 4
    assert default_workers(in_memory=False, cores=2) == 1
    assert default_workers(in_memory=False, cores=64) == 8


def test_cli_threads_option(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        assert main(["train", "--output", str(tmp_path / "run"), "--steps", "1", "--threads", "1",
                     "--batch-size", "32", "--no-progress", "--set", "model_overrides.depth=1",
                     "--set", "model_overrides.embed_dim=16", "--set", "model_overrides.num_heads=2"]) == 0
    assert "1 CPU thread(s) per process" in caplog.text


def _pre(size=8, chans=1):
    return Preprocessing(input_size=(chans, size, size), mean=(0.5,) * chans, std=(0.5,) * chans, crop_pct=1.0)


def test_cache_decoded_serves_the_same_images(tmp_path):
    data = write_folder(tmp_path / "data", per_class=5)
    ds = build_dataset(data, split="train", val_fraction=0.0, transform=eval_transform(_pre()))
    expected = [ds[i][0] for i in range(len(ds))]
    assert cache_decoded(ds, max_bytes=10**6, workers=1)
    assert ds.cached and isinstance(ds._cache, torch.Tensor) and ds.cache_nbytes == 10 * 64
    for i in range(len(ds)):
        assert torch.equal(ds[i][0], expected[i])
    small = build_dataset(data, split="train", val_fraction=0.0)
    assert not cache_decoded(small, max_bytes=100) and not small.cached  # does not fit: decoded every epoch


def test_cache_decoded_with_bad_images(tmp_path):
    data = write_folder(tmp_path / "data", per_class=5, bad=("b/2.png",))
    with pytest.raises(BadImageError, match="2.png"):
        cache_decoded(build_dataset(data, split="train", val_fraction=0.0), max_bytes=10**6)
    ds = build_dataset(data, split="train", val_fraction=0.0, skip_bad_images=True)
    assert cache_decoded(ds, max_bytes=10**6)
    bad = ds.paths.index(str(data / "b" / "2.png"))
    assert ds[bad] is None and ds.num_skipped == 1 and ds[0] is not None


def test_cache_decoded_through_workers_with_mixed_sizes_and_bad_images(tmp_path):
    """Workers send a batch's most common size as one stacked tensor; other sizes and errors go one by one,
    and every image still lands at its own index."""
    import numpy as np
    from PIL import Image

    data = write_folder(tmp_path / "data", per_class=6, bad=("a/3.png",))
    rng = np.random.default_rng(1)
    for name, size in (("b/1.png", (5, 7)), ("b/4.png", (9, 9)), ("a/5.png", (5, 7))):
        Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8), mode="L").save(data / name)
    ds = build_dataset(data, split="train", val_fraction=0.0, skip_bad_images=True)
    expected = {i: ds.decode(i) for i in range(len(ds)) if not ds.paths[i].endswith("a/3.png")}
    assert cache_decoded(ds, max_bytes=10**6, workers=1)
    assert isinstance(ds._cache, list)  # mixed sizes: one tensor per image
    for i, want in expected.items():
        assert torch.equal(ds._cache[i], want), ds.paths[i]
    assert ds[ds.paths.index(str(data / "a" / "3.png"))] is None and ds.num_skipped == 1


def test_training_caches_a_small_folder(tmp_path, caplog):
    data = write_folder(tmp_path / "data")
    with caplog.at_level(logging.INFO):
        assert main(["train", "--data", str(data), "--output", str(tmp_path / "out"), "--steps", "2", *FAST]) == 0
    assert "images decoded into memory" in caplog.text and "0 worker process(es) (images in memory)" in caplog.text


def test_the_printed_model_description_says_what_was_built(tmp_path, caplog):
    import vitlab
    from vitlab.models.describe import describe_model

    model = vitlab.create_model("vit_tiny_patch16_224", img_size=28, in_chans=1, num_classes=10, patch_size=4,
                                embed_dim=64, depth=6, num_heads=4, mlp_ratio=2.0)
    assert describe_model(model) == ("vit_tiny_patch16_224 with patch_size=4, embed_dim=64, depth=6, num_heads=4, "
                                     "mlp_ratio=2 at 28 px, 1 channel, 10 classes, 0.21 M parameters")
    assert describe_model(vitlab.create_model("vit_small_patch16_224")).startswith(
        "vit_small_patch16_224 at 224 px, 3 channels, 1000 classes, 22.")
    with caplog.at_level(logging.INFO):
        assert main(["train", "--output", str(tmp_path / "run"), "--steps", "1", "--batch-size", "32",
                     "--no-progress", "--set", "model_overrides.depth=1"]) == 0
    assert ("model: vit_tiny_patch16_224 with patch_size=2, embed_dim=64, depth=1, num_heads=4, mlp_ratio=2, "
            "drop_path_rate=0.1 at 8 px, 1 channel, 10 classes, 0.04 M parameters") in caplog.text


def test_cache_decoded_with_workers_keeps_no_file_descriptor_per_image(tmp_path):
    """Each image a worker decodes arrives in shared memory behind a file descriptor: kept as it came, a data set
    larger than ``ulimit -n`` failed with "received 0 items of ancdata" (CIFAR-10's 45,000 images did)."""
    import subprocess
    import sys

    data = write_folder(tmp_path / "data", per_class=300)
    script = f"""
import resource
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (400, hard))  # fewer than the images
from vitlab.data import build_dataset
from vitlab.data.cache import cache_decoded
ds = build_dataset({str(data)!r}, split="train", val_fraction=0.0)
assert cache_decoded(ds, max_bytes=10**8, workers=1) and len(ds) == 600
print("cached", ds[599][0].shape)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "cached" in r.stdout


@pytest.mark.parametrize("with_test_folder", [False, True])
def test_held_out_part_is_decoded_and_evaluated_once(tmp_path, monkeypatch, with_test_folder):
    """A folder without test/ answers "test" with its held-out part: the run caches it once and reports the
    fit's last validation as the test result, with the EMA model's too; a real test/ folder is evaluated."""
    import json

    from vitlab.train import run as run_module

    data = tmp_path / "data"
    write_folder(data / "train" if with_test_folder else data, per_class=8)
    if with_test_folder:
        write_folder(data / "test", per_class=3)
    calls = []
    real_test = run_module._test
    monkeypatch.setattr(run_module, "_test", lambda *a, **k: calls.append(a[-1]) or real_test(*a, **k))
    out = tmp_path / "out"
    assert main(["train", "--data", str(data), "--output", str(out), "--steps", "3", *FAST,
                 "--set", "ema_decay=0.9"]) == 0
    results = json.loads((out / "results.json").read_text())
    last_val = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                if json.loads(line)["kind"] == "val"][-1]
    if with_test_folder:
        assert calls == ["model", "EMA model"] and results["test"]["samples"] == 6
    else:
        assert calls == []
        assert results["test"] == {k[4:]: v for k, v in last_val.items()
                                   if k.startswith("val_") and not k.startswith("val_ema_")}
        assert results["test_ema"]["top1"] == last_val["val_ema_top1"] and results["test"]["samples"] == 4
