"""A run's held-out split of an image folder: stable under added files (path-hash-v1), recorded in job.json with
the files it was drawn from, warned of on --resume / eval when the folder changed, and the old randperm draw kept
for runs recorded before the method was; and --workers 0 honoured while images are decoded into memory."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitlab.data
from vitlab.cli.main import main
from vitlab.data import build_dataset
from vitlab.data.multilabel import build_multilabel_dataset

torch.set_num_threads(1)

CLASSES = ("cat", "dog", "ship")
# a tiny ViT on 8x8 grey images, a few steps; a quarter of each class held out (a flat folder's test split)
TINY = ["--recipe", "digits", "--threads", "1", "--no-progress", "--batch-size", "8",
        "--set", "model_overrides.depth=1", "--set", "model_overrides.embed_dim=16",
        "--set", "model_overrides.num_heads=2", "--set", "val_fraction=0.25", "--workers", "0"]


def _png(path: Path, seed: int) -> None:
    img = np.random.default_rng(seed).integers(0, 255, size=(8, 8)).astype(np.uint8)
    Image.fromarray(img, mode="L").save(path)


def write_folder(root: Path, per_class: int = 12, prefix: str = "", seed: int = 0) -> Path:
    for i, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for j in range(per_class):
            _png(root / name / f"{prefix}{j:02d}.png", seed + 100 * i + j)
    return root


def rel(ds, root: Path) -> set[str]:
    return {Path(p).relative_to(root).as_posix() for p in ds.paths}


def legacy_val(root: Path, fraction: float, seed: int) -> set[str]:
    """The held-out part as vitlab drew it before split_method was recorded: one torch.randperm per class (in
    class order) from one generator seeded with ``seed``, over the class's files in sorted order."""
    g = torch.Generator().manual_seed(seed)
    held = set()
    for name in CLASSES:
        files = sorted(p.name for p in (root / name).iterdir())
        n = len(files)
        k = min(max(round(fraction * n), 1), n - 1)
        held |= {f"{name}/{files[j]}" for j in torch.randperm(n, generator=g).tolist()[:k]}
    return held


# ------------------------------------------------------------------------------------------- the split itself


def test_adding_a_file_leaves_other_classes_and_most_of_its_class_in_place(tmp_path):
    root = write_folder(tmp_path / "data")
    before = rel(build_dataset(root, split="val", val_fraction=0.25, seed=3), root)
    train_before = rel(build_dataset(root, split="train", val_fraction=0.25, seed=3), root)
    for extra in range(5):  # one image after the other added to "cat"
        _png(root / "cat" / f"new{extra}.png", 999 + extra)
        after = rel(build_dataset(root, split="val", val_fraction=0.25, seed=3), root)
        assert {p for p in after if not p.startswith("cat/")} == {p for p in before if not p.startswith("cat/")}
        # of the images the split trained on before, at most one per added image is held out now
        assert len(after & train_before) <= extra + 1, sorted(after & train_before)
    assert len(after & train_before) < len(before)  # the old draw re-drew every class: most of them


def test_a_moved_folder_splits_the_same(tmp_path):
    """Regression guard (the old draw never read paths either): the split is of paths within the folder."""
    root = write_folder(tmp_path / "a" / "data")
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(root, moved)
    assert rel(build_dataset(root, split="val", seed=1), root) == rel(build_dataset(moved, split="val", seed=1), moved)


def test_the_old_draw_is_kept_for_runs_recorded_without_a_method(tmp_path):
    root = write_folder(tmp_path / "data")
    old = build_dataset(root, split="val", val_fraction=0.25, seed=3, split_method="randperm")
    assert rel(old, root) == legacy_val(root, 0.25, 3)
    with pytest.raises(ValueError, match="split method 'path-hash-v9'"):
        build_dataset(root, split="val", seed=3, split_method="path-hash-v9")


def test_multilabel_split_is_stable_under_added_files(tmp_path):
    root = tmp_path / "ml"
    (root / "images").mkdir(parents=True)
    lines = ["file_name,tags"]
    for j in range(30):
        _png(root / "images" / f"{j:02d}.png", j)
        lines.append(f"images/{j:02d}.png,{'a b' if j % 2 else 'b'}")
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    before = rel(build_multilabel_dataset(root, split="val", val_fraction=0.2, seed=0), root)
    _png(root / "images" / "zz.png", 77)
    (root / "metadata.csv").write_text("\n".join([*lines, "images/zz.png,a"]) + "\n")
    after = rel(build_multilabel_dataset(root, split="val", val_fraction=0.2, seed=0), root)
    assert len(after - before - {"images/zz.png"}) <= 1 and len(before - after) <= 1


# ------------------------------------------------------------------------------ runs: record, resume and eval


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    """(data, run folder) of a finished tiny run on a flat folder (the held-out part is its test split)."""
    tmp = tmp_path_factory.mktemp("split_run")
    data = write_folder(tmp / "data")
    out = tmp / "run"
    assert main(["train", "--data", str(data), "--output", str(out), "--steps", "2", *TINY]) == 0
    return data, out


def _copy(run, tmp_path: Path, drop: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """A copy of the run and its data, its job.json naming the copied data (without the keys ``drop``)."""
    data, out = shutil.copytree(run[0], tmp_path / "data"), shutil.copytree(run[1], tmp_path / "run")
    job = json.loads((out / "job.json").read_text())
    for key in ("data_source", *drop):
        job.pop(key, None)
    job["data"] = str(data)
    (out / "job.json").write_text(json.dumps(job))
    return data, out


def _resume(data: Path, out: Path) -> None:
    assert main(["train", "--data", str(data), "--output", str(out), "--resume", "--steps", "3", *TINY]) == 0


def _eval(out: Path, report: Path) -> None:
    assert main(["eval", "--checkpoint", str(out), "--threads", "1", "--json", "--output", str(report),
                 "--workers", "0"]) == 0


def _spy_val(monkeypatch) -> list:
    """The "val" datasets build_dataset returns from here on (train and eval import it when they run)."""
    real, seen = vitlab.data.build_dataset, []

    def spy(*args, **kwargs):
        ds = real(*args, **kwargs)
        if kwargs.get("split") in ("val", "test"):
            seen.append(ds)
        return ds

    monkeypatch.setattr(vitlab.data, "build_dataset", spy)
    return seen


def test_a_run_records_its_split_method_and_files(run):
    data, out = run
    job = json.loads((out / "job.json").read_text())
    assert job["split_method"] == "path-hash-v1"
    assert job["split_from"]["files"] == 36
    assert {k: v["files"] for k, v in job["split_from"]["classes"].items()} == dict.fromkeys(CLASSES, 12)


def test_a_checkpoint_away_from_its_run_folder_keeps_its_split_method(run, tmp_path):
    """The checkpoint records how its run drew the held-out part (metadata ``extra.split_method``), for eval of a
    file copied out of its run folder (no job.json beside it); one written before runs recorded it (its
    recipe_settings without the field) drew randperm; a file that no run wrote: the current method."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    from vitlab.cli.eval import run_split_method

    data, out = run
    moved = tmp_path / "moved.safetensors"
    shutil.copy(out / "model.safetensors", moved)
    assert run_split_method(str(moved), str(data)) == "path-hash-v1"
    with safe_open(str(moved), "pt") as f:
        meta, sd = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    record = json.loads(meta["vitlab"])
    assert record["extra"]["split_method"] == "path-hash-v1"
    del record["extra"]["split_method"]  # as a run before today wrote it
    save_file(sd, str(tmp_path / "older.safetensors"), metadata={**meta, "vitlab": json.dumps(record)})
    assert run_split_method(str(tmp_path / "older.safetensors"), str(data)) == "randperm"
    del record["extra"]["recipe_settings"]  # not written by a training run
    save_file(sd, str(tmp_path / "other.safetensors"), metadata={**meta, "vitlab": json.dumps(record)})
    assert run_split_method(str(tmp_path / "other.safetensors"), str(data)) == "path-hash-v1"


def test_resume_and_eval_warn_of_an_added_file(run, tmp_path, caplog):
    data, out = _copy(run, tmp_path)
    _png(data / "dog" / "zz_new.png", 4242)
    with caplog.at_level(logging.WARNING, logger="vitlab"):
        _resume(data, out)
    warned = [r.getMessage() for r in caplog.records if "have changed" in r.getMessage()]
    assert len(warned) == 1 and "'dog': 12 -> 13 files" in warned[0] and "'cat'" not in warned[0]
    assert "path-hash-v1" in warned[0]
    # the record keeps what the run's split was first drawn from
    assert json.loads((out / "job.json").read_text())["split_from"]["classes"]["dog"]["files"] == 12
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vitlab"):
        _eval(out, tmp_path / "ev")
    warned = [r.getMessage() for r in caplog.records if "have changed" in r.getMessage()]
    assert len(warned) == 1 and "'dog': 12 -> 13 files" in warned[0]


def test_an_old_run_keeps_its_old_split_on_resume_and_eval(run, tmp_path, caplog, monkeypatch):
    data, out = _copy(run, tmp_path, drop=("split_method", "split_from"))  # as a run recorded before them
    old = legacy_val(data, 0.25, 0)
    seen = _spy_val(monkeypatch)
    _resume(data, out)
    assert seen and all(rel(ds, data) == old for ds in seen)
    assert json.loads((out / "job.json").read_text())["split_method"] == "randperm"  # said so from now on
    seen.clear()
    _eval(out, tmp_path / "ev")
    assert len(seen) == 1 and rel(seen[0], data) == old


def test_eval_of_a_new_run_holds_out_what_it_did(run, tmp_path, monkeypatch):
    data, out = run
    seen = _spy_val(monkeypatch)
    _eval(out, tmp_path / "ev")
    held = rel(build_dataset(data, split="val", val_fraction=0.25, seed=0), data)
    assert len(seen) == 1 and rel(seen[0], data) == held != legacy_val(data, 0.25, 0)


def test_fine_tuning_holds_out_what_its_pre_training_run_left_out(tmp_path):
    from vitlab.train.recipe import Recipe
    from vitlab.train.run import TrainJob, _split_method

    data = write_folder(tmp_path / "data", per_class=2)
    pre = tmp_path / "pre"
    pre.mkdir()
    (pre / "model.safetensors").write_bytes(b"")
    held = {"split": "val", "val_fraction": 0.1, "seed": 0, "images": 3}
    (pre / "job.json").write_text(json.dumps({"data": str(data), "held_out": held}))  # before split_method
    job = TrainJob(recipe=Recipe(val_fraction=0.1, seed=0), data=str(data), output=tmp_path / "ft",
                   pretrained=str(pre / "model.safetensors"))
    assert _split_method(job) == "randperm"
    (pre / "job.json").write_text(json.dumps({"data": str(data), "held_out": held, "split_method": "path-hash-v1"}))
    assert _split_method(job) == "path-hash-v1"
    job.pretrained = "vit_tiny_patch16_224.augreg_in21k"  # published weights: this run's own split
    assert _split_method(job) == "path-hash-v1"


# ---------------------------------------------------------------------- --workers 0 while decoding into memory


def _images(tmp_path: Path):
    root = write_folder(tmp_path / "data", per_class=4)
    return build_dataset(root, split="train", val_fraction=0.0)


def test_workers_0_decodes_the_cache_in_this_process(tmp_path, monkeypatch):
    import vitlab.data.cache
    import vitlab.train.hardware
    from vitlab.train.recipe import Recipe
    from vitlab.train.run import _prepare_data

    real, used = vitlab.data.cache.WorkerLoader, []

    def loader(*args, **kwargs):
        used.append(kwargs.get("num_workers"))
        return real(*args, **kwargs)

    monkeypatch.setattr(vitlab.data.cache, "WorkerLoader", loader)
    monkeypatch.setattr(vitlab.train.hardware, "available_cores", lambda: 4)
    ds = _images(tmp_path)
    recipe = _prepare_data(Recipe(workers=0, cache_images=True), [ds])
    assert ds.cached and used == [0] and recipe.workers == 0


def test_each_process_of_a_torchrun_caches_within_its_share_of_memory_and_cores(tmp_path, monkeypatch):
    """Under torchrun every process of a machine holds its own copy of the decoded images and runs its own workers:
    with 2 processes each gets half the memory budget (a set that fits one process's whole budget but not half of
    it is decoded every epoch, not cached twice) and half the cores."""
    import vitlab.data.cache
    import vitlab.train.hardware
    from vitlab.train.recipe import Recipe
    from vitlab.train.run import _prepare_data

    asked = []

    def decode(ds, *, max_bytes, workers):
        asked.append((max_bytes, workers))
        return False

    monkeypatch.setattr(vitlab.data.cache, "cache_decoded", decode)
    monkeypatch.setattr(vitlab.train.hardware, "available_cores", lambda: 16)
    monkeypatch.setattr(vitlab.train.hardware, "available_memory_gb", lambda: 8.0)
    one = _prepare_data(Recipe(), [_images(tmp_path)])
    two = _prepare_data(Recipe(), [_images(tmp_path / "again")], processes=2)
    assert asked == [(2 * 2**30, 8), (2**30, 8)]  # a quarter of the memory; decoding on up to 8 cores
    assert (one.workers, two.workers) == (8, 4)  # files to decode: half the process's cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert vitlab.train.hardware.processes_per_machine(8) == 4  # torchrun on two machines of 4
    assert vitlab.train.hardware.processes_per_machine(1) == 1  # left in a single process's environment
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert vitlab.train.hardware.processes_per_machine(2) == 2


def test_a_full_dev_shm_while_caching_names_the_ways_out(tmp_path, monkeypatch):
    import vitlab.data.cache
    from vitlab.train.recipe import Recipe
    from vitlab.train.run import _prepare_data

    def full(ds, *, max_bytes, workers):
        raise RuntimeError("unable to write to file </torch_123_456_0>: No space left on device (28)")

    monkeypatch.setattr(vitlab.data.cache, "cache_decoded", full)
    with pytest.raises(ValueError, match=r"/dev/shm.*--workers 0.*cache_images=false"):
        _prepare_data(Recipe(workers=2, cache_images=True), [_images(tmp_path)])


def test_a_pretraining_run_records_its_split_and_fine_tuning_from_it_holds_out_the_same(tmp_path, monkeypatch):
    """vitlab pretrain draws its held-out part the new way and records it; fine-tuning and eval from its checkpoint
    take that method (not the old draw that a run recorded without one gets), so they hold out the images that
    pre-training left out."""
    from vitlab.cli.main import main
    from vitlab.train.recipe import Recipe
    from vitlab.train.run import TrainJob, _split_method

    data = write_folder(tmp_path / "data", per_class=12)
    pre = tmp_path / "pre"
    assert main(["pretrain", "--method", "mpp", "--data", str(data), "--output", str(pre), "--threads", "1",
                 "--no-progress", "--steps", "1", "--batch-size", "8", "--img-size", "16", "--workers", "0",
                 "--set", "model_overrides.depth=1", "--set", "global_batch=none"]) == 0
    job_record = json.loads((pre / "job.json").read_text())
    assert job_record["split_method"] == "path-hash-v1" and job_record["held_out"]["images"] > 0
    held = job_record["held_out"]
    ft = TrainJob(recipe=Recipe(val_fraction=held["val_fraction"], seed=held["seed"]), data=str(data),
                  output=tmp_path / "ft", pretrained=str(pre / "model.safetensors"))
    assert _split_method(ft) == "path-hash-v1"
    pretrained_on = build_dataset(data, split="train", val_fraction=held["val_fraction"], seed=held["seed"],
                                  unlabelled=True, split_method="path-hash-v1")
    val = build_dataset(data, split="val", val_fraction=held["val_fraction"], seed=held["seed"],
                        split_method=_split_method(ft))
    assert len(val) == held["images"] and not set(val.paths) & set(pretrained_on.paths)


def test_fine_tuning_from_an_older_training_run_holds_out_what_it_left_out(tmp_path):
    """A `vitlab train` run recorded before split_method (its seed and fraction in recipe.json, no held_out):
    fine-tuning from it on its data with its seed and fraction takes its old draw, so the fine-tune's held-out
    images are the ones the base run never trained on; another seed draws anew."""
    from vitlab.train.recipe import Recipe
    from vitlab.train.run import TrainJob, _split_method, source_identity

    data = write_folder(tmp_path / "data", per_class=12)
    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").write_bytes(b"")
    (base / "job.json").write_text(json.dumps({"task": "classification", "data": str(data),
                                               "data_source": source_identity(str(data)), "classes": CLASSES}))
    (base / "recipe.json").write_text(json.dumps({"seed": 0, "val_fraction": 0.25}))
    ft = TrainJob(recipe=Recipe(seed=0, val_fraction=0.25), data=str(data), output=tmp_path / "ft",
                  pretrained=str(base / "model.safetensors"))
    assert _split_method(ft) == "randperm"
    trained = set(build_dataset(data, split="train", val_fraction=0.25, seed=0, split_method="randperm").paths)
    held = build_dataset(data, split="val", val_fraction=0.25, seed=0, split_method=_split_method(ft))
    assert not set(held.paths) & trained
    ft.recipe = Recipe(seed=1, val_fraction=0.25)
    assert _split_method(ft) == "path-hash-v1"
