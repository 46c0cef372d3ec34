"""Bad input to the commands is refused up front with an error naming the option, or reported as it is:
numbers out of range (benchmark, make-canvases, export, detect, segment, eval), a report written over the user's
files (eval), support images scored as test images (fewshot), a file name that is not UTF-8 (explain), a folder
of undecodable images (detect, segment), a checkpoint given to `vitlab info`."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitlab
from dense_helpers import DETR_TINY, SETR_TINY, make_test_canvases
from vitlab.cli.main import main

TINY_VIT = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=1, num_heads=2, num_classes=2,
                mean=(0.5,), std=(0.5,), crop_pct=1.0)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = vitlab.create_model("vit_tiny_patch16_224", **TINY_VIT)
    model.class_names = ["a", "b"]
    return vitlab.save_model(model, tmp_path_factory.mktemp("vit") / "model.safetensors")


def _folder(root: Path, classes: tuple[str, ...] = ("a", "b"), n: int = 3) -> Path:
    """Class folders of ``n`` grey 16 x 16 images each."""
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((16, 16), 40 + 150 * c + 10 * i, np.uint8)).save(root / name / f"{i}.png")
    return root


def _refused_by_argparse(argv: list[str], option: str, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert f"argument {option}" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ eval
def test_eval_refuses_the_users_files_in_output_unless_overwrite(classifier, tmp_path, caplog, capsys):
    data = _folder(tmp_path / "data")
    out = tmp_path / "report"
    out.mkdir()
    (out / "metrics.json").write_text("MY OWN NOTES")
    (out / "confusion.csv").write_text("my,own,table")
    args = ["eval", "--checkpoint", str(classifier), "--data", str(data), "--split", "train", "--output", str(out),
            "--threads", "1", "--json"]
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(args) == 2
    assert f"--output {out}: {out / 'metrics.json'}, {out / 'confusion.csv'} exist" in caplog.text
    assert "pass --overwrite" in caplog.text
    assert (out / "metrics.json").read_text() == "MY OWN NOTES" and (out / "confusion.csv").read_text() == "my,own,table"
    assert sorted(p.name for p in out.iterdir()) == ["confusion.csv", "metrics.json"]  # nothing else written
    assert main([*args, "--overwrite"]) == 0
    assert json.loads((out / "metrics.json").read_text())["checkpoint"] == str(classifier)
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="vitlab"):  # its own earlier report: refused too, and said so
        assert main(args) == 2
    assert "an earlier `vitlab eval` report there?" in caplog.text


def test_eval_replaces_its_report_in_the_default_folder(classifier, tmp_path, capsys):
    data = _folder(tmp_path / "data")
    args = ["eval", "--checkpoint", str(classifier), "--data", str(data), "--split", "train", "--threads", "1",
            "--json"]
    assert main(args) == 0 and main(args) == 0  # eval_train/ beside the checkpoint is eval's own folder
    assert (classifier.parent / "eval_train" / "confusion.csv").is_file()


def test_eval_workers_must_not_be_negative(capsys):
    _refused_by_argparse(["eval", "--checkpoint", "x.safetensors", "--workers", "-2"], "--workers", capsys)


# ------------------------------------------------------------------------------------------------ fewshot
@pytest.mark.parametrize("splits", [("test", "test"), ("train", "train"), ("val", "test")])
def test_fewshot_refuses_support_images_as_test_images(classifier, tmp_path, caplog, splits):
    data = _folder(tmp_path / "data", n=6)  # no test/ folder: its "test" is the "val" part
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(["fewshot", "--checkpoint", str(classifier), "--data", str(data), "--shots", "1", "--seeds", "1",
                     "--train-split", splits[0], "--test-split", splits[1], "--threads", "1"]) == 2
    assert f"--train-split {splits[0]} --test-split {splits[1]}: the same" in caplog.text
    assert "support images would be scored as test images" in caplog.text


def test_fewshot_refuses_one_class(classifier, tmp_path, caplog):
    data = _folder(tmp_path / "data", classes=("only",), n=10)
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(["fewshot", "--checkpoint", str(classifier), "--data", str(data), "--shots", "1", "--seeds", "1",
                     "--threads", "1"]) == 2
    assert "has 1 class (only): few-shot accuracy needs at least 2 classes" in caplog.text


# ------------------------------------------------------------------------------------------------ benchmark
@pytest.mark.parametrize("option, value", [("--matmul-size", "0"), ("--matmul-size", "-4"), ("--min-repeat-s", "nan"),
                                           ("--min-repeat-s", "inf"), ("--min-repeat-s", "-1"), ("--warmup", "-1")])
def test_benchmark_refuses_bad_numbers_naming_the_option(option, value, capsys):
    _refused_by_argparse(["benchmark", option, value], option, capsys)


# ------------------------------------------------------------------------------------------------ make-canvases
@pytest.mark.parametrize("option, values", [("--size", ["0"]), ("--train", ["-1"]), ("--val", ["-1"]),
                                            ("--digits", ["-1", "2"])])
def test_make_canvases_refuses_bad_numbers_naming_the_option(option, values, tmp_path, capsys):
    _refused_by_argparse(["make-canvases", "--mnist", str(tmp_path), "--output", str(tmp_path / "c"), option,
                          *values], option, capsys)


@pytest.mark.parametrize("digits", [("5", "1"), ("0", "0")])
def test_make_canvases_refuses_an_empty_digit_range(digits, tmp_path, caplog):
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(["make-canvases", "--mnist", str(tmp_path), "--output", str(tmp_path / "c"), "--digits",
                     *digits]) == 2
    assert f"--digits {' '.join(digits)}: expected MIN <= MAX and MAX >= 1" in caplog.text
    assert not (tmp_path / "c").exists()


def _fake_mnist(monkeypatch) -> None:
    """Ten 28 x 28 digits, each a bright square: no MNIST files needed."""
    pool = torch.zeros(10, 1, 28, 28, dtype=torch.uint8)
    pool[:, :, 4:24, 4:24] = 255
    monkeypatch.setattr("vitlab.data.sources.read_mnist",
                        lambda root, prefix: (pool, list(range(10)), [str(d) for d in range(10)]))


def test_make_canvases_warns_when_fewer_digits_fit_than_asked(tmp_path, caplog, monkeypatch, capsys):
    _fake_mnist(monkeypatch)
    args = ["make-canvases", "--mnist", str(tmp_path), "--train", "2", "--val", "1", "--size", "32"]
    with caplog.at_level(logging.WARNING, logger="vitlab"):
        assert main([*args, "--output", str(tmp_path / "crowded"), "--digits", "8", "9"]) == 0
    assert "--digits 8 9: 3 of 3 canvases hold fewer than 8 digits" in caplog.text
    assert "on a 32 px canvas" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vitlab"):  # one digit always fits: no warning
        assert main([*args, "--output", str(tmp_path / "one"), "--digits", "1", "1"]) == 0
    assert "fewer than" not in caplog.text


# ------------------------------------------------------------------------------------------------ explain
def test_explain_draws_a_file_name_that_is_not_utf8(classifier, tmp_path, capsys):
    name = os.fsdecode(b"photo\xff.png")  # "photo\udcff.png": a surrogate matplotlib cannot draw
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.full((16, 16), 90, np.uint8)).save(folder / name)
    out = tmp_path / "maps"
    assert main(["explain", str(folder), "--checkpoint", str(classifier), "--output", str(out), "--threads", "1"]) == 0
    assert [p.name for p in out.iterdir()] == [os.fsdecode(b"photo\xff_rollout.png")]


def test_explain_figure_title_escapes_undecodable_bytes(tmp_path):
    from vitlab.analysis.figures import explain_figure

    path = explain_figure(torch.rand(1, 8, 8), torch.rand(8, 8), tmp_path / "f.png",
                          title=os.fsdecode(b"photo\xff.png: 3 (90%)"))
    assert Image.open(path).size == (900, 340)


@pytest.mark.parametrize("case", ["missing image", "discard ratio"])
def test_explain_leaves_no_output_folder_when_its_input_is_refused(case, classifier, tmp_path, caplog):
    image = tmp_path / "img.png"
    Image.fromarray(np.full((16, 16), 90, np.uint8)).save(image)
    extra = [str(tmp_path / "missing.png")] if case == "missing image" else [str(image), "--discard-ratio", "1.5"]
    out = tmp_path / "maps"
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(["explain", *extra, "--checkpoint", str(classifier), "--output", str(out), "--threads", "1"]) == 2
    assert ("missing.png" if case == "missing image" else "--discard-ratio 1.5") in caplog.text
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ export
@pytest.mark.parametrize("option, value", [("--tolerance", "nan"), ("--tolerance", "0"), ("--tolerance", "inf"),
                                           ("--min-agreement", "98"), ("--min-agreement", "-0.1"),
                                           ("--min-agreement", "nan")])
def test_export_refuses_bad_limits_naming_the_option(option, value, tmp_path, capsys):
    _refused_by_argparse(["export", "--model", "vit_tiny_patch16_224", "--output", str(tmp_path / "m.onnx"), "--int8",
                          option, value], option, capsys)


def test_export_min_agreement_needs_int8(tmp_path, caplog):
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(["export", "--model", "vit_tiny_patch16_224", "--output", str(tmp_path / "m.onnx"),
                     "--min-agreement", "0.9"]) == 2
    assert "--min-agreement applies to --int8 files" in caplog.text
    assert not (tmp_path / "m.onnx").exists()


def test_export_help_says_min_agreement_is_a_fraction(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    assert "a fraction from 0 to 1" in " ".join(capsys.readouterr().out.split())


# ------------------------------------------------------------------------------------------------ detect / segment
@pytest.mark.parametrize("command, option", [("detect", "--threshold"), ("segment", "--alpha")])
@pytest.mark.parametrize("value", ["nan", "-1", "2"])
def test_detect_threshold_and_segment_alpha_are_fractions(command, option, value, tmp_path, capsys):
    _refused_by_argparse([command, str(tmp_path), "--checkpoint", "x.safetensors", option, value], option, capsys)


@pytest.fixture(scope="module")
def dense_checkpoints(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("dense")
    torch.manual_seed(0)
    detr = vitlab.create_model("detr_resnet50", **{**DETR_TINY, "img_size": 32, "num_classes": 3})
    setr = vitlab.create_model("setr_pup_vit_small_patch16", **{**SETR_TINY, "img_size": 32, "num_classes": 3})
    return {"detect": vitlab.save_model(detr, folder / "detr.safetensors", class_names=["a", "b", "c"]),
            "segment": vitlab.save_model(setr, folder / "setr.safetensors", class_names=["bg", "x", "y"])}


@pytest.mark.parametrize("command", ["detect", "segment"])
def test_detect_and_segment_fail_when_no_image_could_be_read(command, dense_checkpoints, tmp_path, caplog, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_text("not a png")
    (bad / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main([command, str(bad), "--checkpoint", str(dense_checkpoints[command]), "--output", str(out),
                     "--skip-bad-images", "--threads", "1"]) == 2
    assert "none of the 2 image(s) could be read" in caplog.text
    assert "overlays and masks in" not in capsys.readouterr().out
    listed = "detections.json" if command == "detect" else "segments.json"
    assert sorted(p.name for p in out.iterdir()) == [listed]  # the errors, and no picture


@pytest.mark.parametrize("which", ["classifier", "detector"])
def test_explain_fails_when_no_image_could_be_read(which, classifier, dense_checkpoints, tmp_path, caplog):
    """explain --skip-bad-images exited 0, writing nothing and saying nothing, where predict / detect / segment
    exit 2."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_text("not a png")
    ckpt = classifier if which == "classifier" else dense_checkpoints["detect"]
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(["explain", str(bad), "--checkpoint", str(ckpt), "--output", str(tmp_path / "out"),
                     "--skip-bad-images", "--threads", "1"]) == 2
    assert "none of the 1 image(s) could be read" in caplog.text


def test_eval_json_of_a_dense_checkpoint_is_its_metrics_json(tmp_path, capsys):
    """For a detector, --json printed the bare metrics where metrics.json (and a classifier's --json) also name
    the checkpoint, data and split."""
    data = make_test_canvases(tmp_path, train=2)
    capsys.readouterr()  # make-canvases' own summary line
    torch.manual_seed(0)  # a detector of the canvases' classes (category id k + 1 is digit k)
    detr = vitlab.create_model("detr_resnet50", **{**DETR_TINY, "img_size": 32, "num_classes": 11})
    ckpt = vitlab.save_model(detr, tmp_path / "detr.safetensors", class_names=["n/a", *map(str, range(10))])
    out = tmp_path / "report"
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(data), "--split", "val",
                 "--output", str(out), "--json", "--threads", "1"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert {"checkpoint", "data", "split", "AP50"} <= set(printed)


# ------------------------------------------------------------------------------------------------ info
def test_info_of_a_checkpoint_file_says_it_takes_a_model_name(classifier, caplog):
    for path in (classifier, classifier.parent):
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="vitlab"):
            assert main(["info", str(path)]) == 2
        assert f"{path} is a {'file' if path.is_file() else 'folder'}: `vitlab info` takes a registered model " \
               f"name" in caplog.text
        assert "unknown model" not in caplog.text
