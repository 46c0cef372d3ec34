"""``vitlab eval`` meets the data's classes by name: another order (a folder sorts "10" before "2"), a subset, an
unknown class; ``--data`` defaults to the run's own data; a class without images is null, not NaN.

The model is a hand-set ViT without blocks that tells bright images (its class "2") from dark ones (class "10"), so
that a wrong label mapping shows as 0% where the right one gives 100%.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import vitlab
from eval_helpers import bright_dark_checkpoint, eval_json, grey_class_folders
from vitlab.cli.main import main


def test_classes_in_another_order_are_matched_by_name(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    ckpt = bright_dark_checkpoint(tmp_path / "m.safetensors")
    data = grey_class_folders(tmp_path / "data" / "test", {"2": 250, "10": 5}).parent  # sorted as text: "10", "2"
    (data / "train").symlink_to(data / "test")
    metrics = eval_json(capsys, "--checkpoint", str(ckpt), "--data", str(data))
    assert metrics["top1"] == 1.0 and metrics["per_class"] == {"10": 1.0, "2": 1.0}
    assert metrics["class_match"] == {"10": "10", "2": "2"}
    by_index = eval_json(capsys, "--checkpoint", str(ckpt), "--data", str(data), "--class-match", "index")
    assert by_index["top1"] == 0.0  # what eval reported before: the i-th folder taken for the head's i-th class
    assert "labels are matched by index" in caplog.text


def test_a_subset_of_the_classes_is_scored_and_an_unknown_class_refused(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    ckpt = bright_dark_checkpoint(tmp_path / "m.safetensors")
    only = grey_class_folders(tmp_path / "only" / "test", {"2": 250}).parent
    (only / "train").symlink_to(only / "test")
    metrics = eval_json(capsys, "--checkpoint", str(ckpt), "--data", str(only))
    assert metrics["top1"] == 1.0 and metrics["samples"] == 3 and metrics["per_class"] == {"2": 1.0}
    other = grey_class_folders(tmp_path / "other" / "test", {"2": 250, "7": 5}).parent
    (other / "train").symlink_to(other / "test")
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(other), "--threads", "1"]) != 0
    assert re.search(r"has class\(es\) '7' that the checkpoint .* does not know", caplog.text)


def test_a_class_without_images_in_the_split_is_null(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = bright_dark_checkpoint(tmp_path / "m.safetensors")
    data = tmp_path / "data"
    grey_class_folders(data / "train", {"2": 250, "10": 5})
    grey_class_folders(data / "test", {"2": 250})
    out = tmp_path / "report"
    metrics = eval_json(capsys, "--checkpoint", str(ckpt), "--data", str(data), "--output", str(out))
    assert metrics["per_class"] == {"10": None, "2": 1.0}
    assert json.loads((out / "metrics.json").read_text())["per_class"]["10"] is None  # valid JSON, no NaN
    assert (out / "per_class.csv").read_text().splitlines()[1:] == ["10,0,", "2,3,1.000000"]
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(data), "--output", str(out), "--threads", "1",
                 "--overwrite"]) == 0
    assert "n/a (no image)" in capsys.readouterr().out


def test_data_defaults_to_the_runs_own(tmp_path: Path, capsys: pytest.CaptureFixture,
                                       caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    run.mkdir()
    ckpt = bright_dark_checkpoint(run / "model.safetensors")
    assert main(["eval", "--checkpoint", str(ckpt), "--threads", "1"]) != 0
    assert re.search("--data is required: .* has no run record", caplog.text)
    data = grey_class_folders(tmp_path / "data" / "test", {"2": 250, "10": 5}).parent
    (data / "train").symlink_to(data / "test")
    from vitlab.train.run import source_identity

    (run / "job.json").write_text(json.dumps({"data": str(data), "data_source": source_identity(data)}))
    metrics = eval_json(capsys, "--checkpoint", str(ckpt))
    assert metrics["data"] == str(data) and metrics["top1"] == 1.0


def test_knn_bank_is_the_runs_training_split_on_a_fixed_test_set(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    from vitlab.train.run import source_identity

    run = tmp_path / "run"
    run.mkdir()
    ckpt = vitlab.save_model(vitlab.create_model("vit_tiny_patch16_224", img_size=8, patch_size=4, depth=1,
                                                 embed_dim=16, num_heads=2, in_chans=1, num_classes=0),
                             run / "model.safetensors")
    (run / "job.json").write_text(json.dumps({"data": "digits", "data_source": source_identity("digits")}))
    (run / "recipe.json").write_text(json.dumps({"seed": 0, "val_fraction": 0.0}))  # trained on every image
    with caplog.at_level("INFO"):
        metrics = eval_json(capsys, "--checkpoint", str(ckpt), "--protocol", "knn")
    assert metrics["train_images"] == 1438  # digits' whole training split, not 90% of it (1295)


def test_no_name_in_common_falls_back_to_positions_with_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    ckpt = bright_dark_checkpoint(tmp_path / "m.safetensors")  # its classes: "2" (bright), "10" (dark)
    data = grey_class_folders(tmp_path / "data" / "test", {"a_bright": 250, "b_dark": 5}).parent
    (data / "train").symlink_to(data / "test")
    metrics = eval_json(capsys, "--checkpoint", str(ckpt), "--data", str(data))
    assert metrics["top1"] == 1.0 and "labels are matched by index" in caplog.text


def test_an_interrupt_while_drawing_the_figure_leaves_the_earlier_report_whole(tmp_path: Path, monkeypatch,
                                                                               capsys: pytest.CaptureFixture) -> None:
    """The confusion figure (seconds for many classes) is drawn before any report file is replaced: Ctrl-C there
    leaves the earlier report as it was, not new metrics beside an old figure."""
    import vitlab.cli.eval as cli_eval

    ckpt = bright_dark_checkpoint(tmp_path / "m.safetensors")
    data = grey_class_folders(tmp_path / "data" / "test", {"2": 250, "10": 5}).parent
    (data / "train").symlink_to(data / "test")
    out = tmp_path / "report"
    eval_json(capsys, "--checkpoint", str(ckpt), "--data", str(data), "--output", str(out))
    before = {f: (out / f).read_bytes() for f in ("metrics.json", "per_class.csv", "confusion.csv", "confusion.png")}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_eval, "save_confusion_png", interrupted)
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(data), "--output", str(out), "--overwrite",
                 "--class-match", "index", "--json"]) == 130  # interrupted
    assert {f: (out / f).read_bytes() for f in before} == before
