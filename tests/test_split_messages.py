"""What eval and --resume say about a run's held-out split: the changed-files warning states what the record
knows and a bound that holds; a moved copy of the run's folder is recognised as the run's data by its files; and
--resume without a training state is refused before any data, model or recipe is built."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

import vitlab.data
from test_split_stability import TINY, _png, rel, write_folder
from vitlab.cli.main import main
from vitlab.data import build_dataset
from vitlab.data.splits import changed_split_note, split_source, split_source_changes

torch.set_num_threads(1)


def _record(names: dict[str, list[str]]) -> dict:
    keys = [f"{c}/{n}" for c, ns in names.items() for n in ns]
    targets = [i for i, ns in enumerate(names.values()) for _ in ns]
    return split_source(keys, targets, list(names))


# ------------------------------------------------------------------------------ (3) the changed-split warning


def test_the_change_says_counts_not_net_additions():
    base = [f"{j:02d}.png" for j in range(30)]
    was = _record({"c0": base, "c1": base})
    # 3 files added and 2 removed: the count grows by one, which is all the record can tell
    grown = split_source_changes(was, _record({"c0": base[2:] + ["n1", "n2", "n3"], "c1": base}))
    assert "'c0': 30 -> 31 files" in grown and "added" not in grown and "'c1'" not in grown
    # every held-out file replaced: the same count
    swapped = split_source_changes(was, _record({"c0": base[6:] + [f"new{k}" for k in range(6)], "c1": base}))
    assert "'c0': 30 files, the same count but other files" in swapped
    assert "replaced or renamed (30)" not in swapped
    gone = split_source_changes(was, _record({"c0": base}))
    assert "'c1': gone (30 files)" in gone


def test_the_note_states_a_bound_that_holds(tmp_path):
    note = changed_split_note("path-hash-v1")
    assert "about one image per changed class" not in note
    assert "up to one per file added or removed there" in note and "only each class's file count" in note
    # the repro's case: the 6 held-out images of a class removed, 6 new ones added: more than one trained image
    # moves into the held-out part (the old note said one at most), and no more than one per file changed
    root = write_folder(tmp_path / "data", per_class=30)
    val0 = rel(build_dataset(root, split="val", val_fraction=0.2, seed=0), root)
    train0 = rel(build_dataset(root, split="train", val_fraction=0.2, seed=0), root)
    gone = sorted(p for p in val0 if p.startswith("cat/"))
    for p in gone:
        (root / p).unlink()
    for k in range(len(gone)):
        _png(root / "cat" / f"new{k}.png", 5000 + k)
    moved = rel(build_dataset(root, split="val", val_fraction=0.2, seed=0), root) & train0
    assert 1 < len(moved) <= 2 * len(gone)


def test_eval_warns_with_the_counts_and_what_to_do(run, tmp_path, caplog):
    data, out = _copy(run, tmp_path)
    held = rel(build_dataset(data, split="val", val_fraction=0.25, seed=0), data)
    victim = sorted(p for p in held if p.startswith("dog/"))[0]
    (data / victim).rename(data / "dog" / "renamed.png")
    with caplog.at_level(logging.WARNING, logger="vitlab"):
        _eval(out, tmp_path / "ev")
    warned = [r.getMessage() for r in caplog.records if "have changed" in r.getMessage()]
    assert len(warned) == 1
    assert "'dog': 12 files, the same count but other files" in warned[0]
    assert "up to one per file added or removed there" in warned[0]
    assert "give --data the run's folder as it was" in warned[0]


# ---------------------------------------------------------------------- (6) eval --data on a moved copy


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    """(data, run folder) of a finished tiny run on a flat folder (the held-out part is its test split)."""
    tmp = tmp_path_factory.mktemp("split_messages")
    data = write_folder(tmp / "data")
    out = tmp / "run"
    assert main(["train", "--data", str(data), "--output", str(out), "--steps", "2", *TINY]) == 0
    return data, out


def _copy(run, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the run and its data, its job.json naming the copied data."""
    data, out = shutil.copytree(run[0], tmp_path / "data"), shutil.copytree(run[1], tmp_path / "run")
    job = json.loads((out / "job.json").read_text())
    job.pop("data_source", None)
    job["data"] = str(data)
    (out / "job.json").write_text(json.dumps(job))
    return data, out


def _eval(out: Path, report: Path, *more: str) -> dict:
    assert main(["eval", "--checkpoint", str(out), "--threads", "1", "--json", "--output", str(report),
                 "--workers", "0", *more]) == 0
    return json.loads((report / "test" / "metrics.json").read_text()) if (report / "test").is_dir() else {}


def _spy(monkeypatch) -> list:
    real, seen = vitlab.data.build_dataset, []

    def spy(*args, **kwargs):
        ds = real(*args, **kwargs)
        seen.append(ds)
        return ds

    monkeypatch.setattr(vitlab.data, "build_dataset", spy)
    return seen


def test_eval_of_a_moved_copy_holds_out_what_the_run_did(run, tmp_path, monkeypatch, caplog):
    data, out = run
    moved = shutil.copytree(data, tmp_path / "elsewhere" / "moved")
    seen = _spy(monkeypatch)
    with caplog.at_level(logging.INFO, logger="vitlab"):
        _eval(out, tmp_path / "ev", "--data", str(moved))
    held = rel(build_dataset(data, split="val", val_fraction=0.25, seed=0), data)
    assert len(seen) == 1 and rel(seen[0], moved) == held  # the run's held-out images, not all 36
    assert "recognised as a copy of" in caplog.text and "by its files" in caplog.text
    assert "every image of it is scored" not in caplog.text and "have changed" not in caplog.text


def test_eval_of_other_data_scores_it_all_and_says_so_once(run, tmp_path, monkeypatch, caplog):
    _, out = run
    other = write_folder(tmp_path / "other", per_class=5, prefix="x", seed=7000)
    seen = _spy(monkeypatch)
    with caplog.at_level(logging.INFO, logger="vitlab"):
        _eval(out, tmp_path / "ev", "--data", str(other))
    assert len(seen) == 1 and len(seen[0]) == 15
    assert "every image of it is scored" in caplog.text
    assert "recognised as a copy" not in caplog.text
    assert "drawn with seed" not in caplog.text  # it used to say both: a split drawn, and every image scored


# ------------------------------------------------------- (7) --resume of a run without a training state


def _fail_if_built(monkeypatch, *, recipe: bool = False) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("built before --resume was checked")

    import vitlab.cli.train
    import vitlab.train.run

    monkeypatch.setattr(vitlab.data, "build_dataset", boom)
    monkeypatch.setattr(vitlab.train.run, "build_model", boom)
    monkeypatch.setattr(vitlab.cli.train, "auto_recipe", boom)
    if recipe:  # train checks before its recipe (pretrain and finetune resolve theirs first: cheap)
        monkeypatch.setattr(vitlab.cli.train, "resolve_recipe", boom)


def _stateless(run, folder: Path) -> Path:
    """A run folder as a run that failed before its first checkpoint leaves it: its job.json only."""
    folder.mkdir(parents=True)
    shutil.copy(run[1] / "job.json", folder / "job.json")
    return folder


@pytest.mark.parametrize("command", [["train"], ["pretrain", "--method", "mae"]])
def test_resume_without_a_training_state_is_refused_at_once(run, tmp_path, monkeypatch, caplog, command):
    out = _stateless(run, tmp_path / "failed")
    _fail_if_built(monkeypatch, recipe=command[0] == "train")
    if command[0] == "pretrain":
        import vitlab.ssl.run

        monkeypatch.setattr(vitlab.ssl.run, "build_backbone", lambda *a, **k: pytest.fail("backbone built"))
        command = [*command, "--data", str(run[0])]
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main([*command, "--resume", "--output", str(out), "--threads", "1", "--no-progress"]) == 2
    assert f"no training state at {out / 'train_state.pt'}" in caplog.text
    assert "start without --resume" in caplog.text and "built before" not in caplog.text
    assert sorted(p.name for p in out.iterdir()) == ["job.json"]


def test_finetune_resume_without_a_training_state_is_refused_before_the_data(run, tmp_path, monkeypatch, caplog):
    out = _stateless(run, tmp_path / "failed")
    _fail_if_built(monkeypatch)
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(["finetune", "--from", str(run[1]), "--resume", "--output", str(out), "--threads", "1",
                     "--no-progress", "--recipe", "digits"]) == 2
    assert "no training state" in caplog.text and "start without --resume" in caplog.text
