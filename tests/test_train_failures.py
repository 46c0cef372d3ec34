"""Issue 14's reliability battery: bad input that used to lose work or end in a traceback.

Single-class data, a corrupt image read by a DataLoader worker, --resume into another model's run, --device
cuda without CUDA (every command), a finished run given as --output, a killed checkpoint write, and the
--skip-bad-images total and large-photo limit.
"""

from __future__ import annotations

import json
import logging
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.cli.main import main
from vitlab.data import BadImageError, build_dataset
from vitlab.data import image as image_module
from vitlab.data.checks import check_classification_data
from vitlab.data.errors import DatasetError

FAST = ["--recipe", "digits", "--img-size", "8", "--batch-size", "4", "--no-progress", "--set", "model_overrides.depth=1", "--set",
        "model_overrides.embed_dim=16", "--set", "model_overrides.num_heads=2", "--set", "val_fraction=0.25",
        "--set", "warmup_epochs=0"]


def write_folder(root, classes=("a", "b"), per_class=8, bad=()):
    """PNG digits-like images under root/<class>/; ``bad`` names files (class/name) written as garbage."""
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8), mode="L").save(root / c / f"{i}.png")
    for rel in bad:
        (root / rel).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


def errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """An unfinished digits run (2 of 4 steps), as a kill would leave it."""
    from vitlab.train import apply_overrides, load_recipe
    from vitlab.train.run import TrainJob, run_training

    out = tmp_path_factory.mktemp("digits") / "run"
    recipe = apply_overrides(load_recipe("digits"), ["max_steps=4", "batch_size=16", "model_overrides.depth=1",
                                                     "model_overrides.embed_dim=16", "model_overrides.num_heads=2",
                                                     "log_every=1", "checkpoint_every=1"])
    run_training(TrainJob(recipe=recipe, data="digits", output=out, progress=False, until_step=2))
    return out


# ---------------------------------------------------------------------------------------- the data
def test_single_class_is_refused_before_anything_is_written(tmp_path, caplog):
    data = write_folder(tmp_path / "data", classes=("only",))
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR):
        assert main(["train", "--data", str(data), "--output", str(out), "--steps", "2", *FAST]) == 2
    assert "only the class 'only'" in caplog.text and "at least two classes" in caplog.text
    assert not out.exists()


def test_classes_with_few_images_are_warned_about(tmp_path, caplog):
    data = write_folder(tmp_path / "data", classes=("a", "b", "c"), per_class=12)
    for p in sorted((data / "c").iterdir())[3:]:
        p.unlink()
    ds = build_dataset(data, split="train", val_fraction=0.0)
    with caplog.at_level(logging.WARNING):
        assert check_classification_data(ds) == ["c"]
    assert "c (3)" in caplog.text and "fewer than 10" in caplog.text
    with pytest.raises(DatasetError, match="at least two classes"):
        check_classification_data(build_dataset(data, split="train", val_fraction=0.0).__class__(
            ds.paths[:3], [0, 0, 0], classes=["a"], in_chans=1, source="one"))


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_corrupt_image_is_one_line_error_with_any_number_of_workers(tmp_path, caplog, workers):
    data = write_folder(tmp_path / "data", bad=("a/3.png", "b/3.png"))
    with caplog.at_level(logging.ERROR):
        code = main(["train", "--data", str(data), "--output", str(tmp_path / "out"), "--steps", "4",
                     "--workers", str(workers), "--set", "cache_images=false", *FAST])
    assert code == 2
    (msg,) = errors(caplog)
    assert "\n" not in msg and "Traceback" not in msg and "worker" not in msg
    assert re.fullmatch(r"error: \S+/data/[ab]/3\.png: cannot decode image \(OSError: .*\)", msg), msg


# ------------------------------------------------------------------------------------ the run folder
def test_resume_into_another_model_changes_nothing(digits_run, tmp_path, caplog):
    out = tmp_path / "run"
    shutil.copytree(digits_run, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with caplog.at_level(logging.ERROR):
        assert main(["train", "--output", str(out), "--resume", "--no-progress", "--model",
                     "vit_small_patch16_224"]) == 2
    assert "vit_small_patch16_224" in caplog.text and "--resume" in caplog.text
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == before  # job.json, recipe.json, metrics and checkpoints untouched
    # and the original run is still resumable as it was
    assert main(["train", "--output", str(out), "--resume", "--no-progress"]) == 0
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == 4


def test_finished_run_is_refused_without_overwrite(digits_run, tmp_path, caplog):
    out = tmp_path / "run"
    shutil.copytree(digits_run, out)
    state = torch.load(out / "train_state.pt", weights_only=True)
    state["total_steps"] = state["step"]  # as if the run had finished
    torch.save(state, out / "train_state.pt")
    model_before = (out / "model.safetensors").read_bytes()
    argv = ["train", "--output", str(out), "--steps", "1", *FAST]
    with caplog.at_level(logging.ERROR):
        assert main(argv) == 2
    assert "finished run" in caplog.text and "--overwrite" in caplog.text
    assert (out / "model.safetensors").read_bytes() == model_before
    assert main([*argv, "--overwrite"]) == 0


def test_resume_removes_stale_temporaries_and_repeated_metrics(digits_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(digits_run, out)
    # a kill after step 3 was logged but before its checkpoint, in the middle of writing the checkpoint
    stale = out / ".model.safetensors.k1ll3d.tmp"
    stale.write_bytes(b"\0" * 4096)
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"kind": "train", "step": 3, "epoch": 0, "loss": 9.0}) + "\n")
        f.write('{"kind": "train", "step": 4, "ep')  # torn by the kill
    assert main(["train", "--output", str(out), "--resume", "--no-progress"]) == 0
    assert not stale.exists() and not list(out.glob(".*.tmp"))
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == [1, 2, 3, 4]
    assert all(json.loads(line).get("loss") != 9.0 for line in (out / "metrics.jsonl").read_text().splitlines())


# ------------------------------------------------------------------------------------------ --device
COMMANDS = {
    "train": ["train"],
    "finetune": ["finetune", "--from", "x.safetensors"],
    "eval": ["eval", "--checkpoint", "x.safetensors"],
    "predict": ["predict", "a.png", "--checkpoint", "x.safetensors"],
    "embed": ["embed", "a.png", "--checkpoint", "x.safetensors", "--output", "e.npz"],
    "explain": ["explain", "a.png", "--checkpoint", "x.safetensors"],
    "fewshot": ["fewshot", "--checkpoint", "x.safetensors", "--data", "digits"],
    "analyze": ["analyze", "--checkpoint", "x.safetensors", "--data", "digits"],
    "benchmark": ["benchmark"],
    "pretrain": ["pretrain"],
}


def test_every_command_with_a_device_option_is_checked_above() -> None:
    import argparse

    from vitlab.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    with_device = {name for name, p in sub.choices.items()
                   if any("--device" in a.option_strings for a in p._actions)}
    assert with_device == set(COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("device, needle", [("cuda", "CUDA is not available"), ("cuda:1", "CUDA is not available"),
                                            ("gpu", "expected auto, cpu, cuda or cuda:N")])
def test_every_command_checks_device_the_same_way(command, device, needle, monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.ERROR):
        assert main([*COMMANDS[command], "--device", device]) == 2
    (msg,) = errors(caplog)
    assert msg.startswith(f"error: --device {device}") and needle in msg and "\n" not in msg
    assert list(tmp_path.iterdir()) == []  # refused before any work


# ------------------------------------------------------------------------------------------ --threads
def test_every_command_that_runs_a_model_takes_threads() -> None:
    import argparse

    from vitlab.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    with_threads = {name for name, p in sub.choices.items() if any("--threads" in a.option_strings for a in p._actions)}
    assert with_threads >= set(COMMANDS) - {"finetune"} | {"detect", "segment"}


def test_threads_is_applied_and_checked(monkeypatch, caplog, tmp_path, capsys):
    from vitlab.cli.common import apply_threads
    from vitlab.cli.main import build_parser

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    apply_threads(build_parser().parse_args(["eval", "--checkpoint", "x.safetensors", "--threads", "1"]))
    apply_threads(build_parser().parse_args(["eval", "--checkpoint", "x.safetensors"]))  # torch's own setting
    assert calls == [1]
    for argv in (["predict", "a.png", "--checkpoint", "x.safetensors"], ["train"], ["benchmark"]):
        with pytest.raises(SystemExit):  # every command's --threads is checked the same way
            build_parser().parse_args([*argv, "--threads", "0"])
        assert "--threads: expected at least 1 thread, got '0'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- bad and big images
def test_skip_bad_images_reports_the_total(tmp_path, caplog):
    data = write_folder(tmp_path / "data", bad=("a/1.png", "b/5.png"))
    with caplog.at_level(logging.INFO):
        assert main(["train", "--data", str(data), "--output", str(tmp_path / "out"), "--steps", "4",
                     "--skip-bad-images", *FAST]) == 0
    assert "skipped 2 undecodable image(s) in total" in caplog.text
    assert json.loads((tmp_path / "out" / "results.json").read_text())["skipped_images"] == 2


@pytest.fixture
def small_pixel_limits(monkeypatch):
    """Pillow's guard and vitlab's limit scaled down 1000x, so that a 0.12-megapixel image plays a big photo."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # Pillow alone refuses above 20,000 pixels
    monkeypatch.setattr(image_module, "MAX_IMAGE_PIXELS", 400_000)
    monkeypatch.setenv("VITLAB_MAX_IMAGE_PIXELS", "400000")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_large_photo_is_decoded_at_the_size_needed(tmp_path, small_pixel_limits, fmt):
    path = tmp_path / f"big.{fmt.lower()}"
    rgb = np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path, format=fmt)
    full = image_module.load_image(path)  # above Pillow's limit, below vitlab's
    assert full.shape == (3, 300, 400)
    small = image_module.load_image(path, min_size=50)  # the caller needs 50 px: decoded at >= 100, < 300
    assert small.shape[0] == 3 and 100 <= min(small.shape[1:]) < 300
    assert abs(small.shape[2] / small.shape[1] - 4 / 3) < 0.02
    assert abs(small.float().mean() - full.float().mean()) < 3
    image_module.set_max_image_pixels(100_000)
    with pytest.raises(BadImageError, match=r"400 x 300 = 120,000 pixels is above the limit of 100,000.*--max-image-pixels"):
        image_module.load_image(path)


def test_predict_applies_max_image_pixels(digits_run, tmp_path, small_pixel_limits, caplog, capsys):
    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((300, 400), dtype=np.uint8)).save(path)
    ckpt = str(digits_run / "model.safetensors")
    assert main(["predict", str(path), "--checkpoint", ckpt]) == 0
    assert "big.png" in capsys.readouterr().out
    with caplog.at_level(logging.ERROR):
        assert main(["predict", str(path), "--checkpoint", ckpt, "--max-image-pixels", "100000"]) == 2
    assert "--max-image-pixels" in caplog.text


def test_a_data_set_smaller_than_one_global_batch_names_the_setting(tmp_path, caplog):
    """36 images under MAE's global batch of 4096: --batch-size 8 alone only raised the accumulation to 512;
    the error says which recipe field to change and how."""
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(18):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    assert main(["pretrain", "--method", "mae", "--data", str(root), "--steps", "1", "--batch-size", "8",
                 "--output", str(tmp_path / "run"), "--no-progress"]) == 2
    text = caplog.text
    assert "cannot fill one step of batch_size 8 x accum 512" in text
    assert "global_batch is 4096" in text and "--set global_batch=none" in text
    assert main(["pretrain", "--method", "mae", "--data", str(root), "--steps", "1", "--batch-size", "8",
                 "--set", "global_batch=none", "--output", str(tmp_path / "run"), "--overwrite",
                 "--no-progress"]) == 0


def test_output_that_is_a_file_is_one_clear_line(tmp_path, caplog):
    taken = tmp_path / "out.txt"
    taken.write_text("mine")
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        rc = main(["train", "--data", "digits", "--img-size", "16", "--steps", "1", "--no-progress",
                   "--output", str(taken)])
    assert rc == 2
    assert f"{taken}: file exists" in caplog.text and "Traceback" not in caplog.text
    assert taken.read_text() == "mine"


def test_out_of_memory_is_one_clear_line(tmp_path, caplog, monkeypatch):
    import vitlab.cli.train as train_cli

    def no_memory(args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 5435817984 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(train_cli, "run", no_memory)
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(["train", "--data", "digits"]) == 2
    assert "error: out of memory" in caplog.text and "lower --batch-size or --img-size" in caplog.text

    def a_bug(args):
        raise RuntimeError("shape mismatch")  # not memory: a real traceback, not hidden

    monkeypatch.setattr(train_cli, "run", a_bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main(["train", "--data", "digits"])


def test_a_mostly_colour_folder_gets_a_colour_model(tmp_path):
    """The first file of each class is grey, most files are colour: 3 channels (grey ones repeated)."""
    from vitlab.data.folder import guess_channels

    paths, labels = [], []
    rng = np.random.default_rng(0)
    for label, cls in enumerate(("a", "b")):
        (tmp_path / cls).mkdir()
        for i in range(40):
            p = tmp_path / cls / f"{i:03d}.png"
            pixels = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).convert("L" if i % 8 == 0 else "RGB").save(p)
            paths.append(str(p))
            labels.append(label)
    assert guess_channels(paths, labels) == 3
    grey = [p for i, p in enumerate(paths) if i % 8 == 0]
    assert guess_channels(grey, [0] * len(grey)) == 1


def test_a_macos_zips_resource_folder_is_not_a_class(tmp_path):
    root = write_folder(tmp_path / "data", classes=("a", "b"), per_class=4)
    junk = root / "__MACOSX" / "a"
    junk.mkdir(parents=True)
    (junk / "._0.png").write_bytes(b"\x00\x05\x16\x07 resource fork")
    assert build_dataset(root, val_fraction=0.0).classes == ["a", "b"]


def test_predict_fails_when_no_image_could_be_read(tmp_path, caplog):
    from test_cli_train import FAST

    out = tmp_path / "run"
    assert main(["train", "--output", str(out), *FAST]) == 0
    bad = tmp_path / "bad.png"
    bad.write_text("not a png")
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        rc = main(["predict", str(bad), "--checkpoint", str(out / "model.safetensors"), "--skip-bad-images"])
    assert rc == 2 and "none of the 1 image(s) could be read" in caplog.text


def test_tiny_classes_that_inflate_the_held_out_split_are_named(tmp_path, caplog):
    root = write_folder(tmp_path / "data", classes=tuple(f"c{i}" for i in range(6)), per_class=2)
    with caplog.at_level(logging.WARNING, logger="vitlab"):
        assert len(build_dataset(root, val_fraction=0.1)) == 6
    assert "the held-out split takes 6 of 12 images (50%, not 10%)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vitlab"):
        build_dataset(write_folder(tmp_path / "big", per_class=20), val_fraction=0.1)
    assert "held-out split takes" not in caplog.text
