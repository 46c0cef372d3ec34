"""What predict / detect / segment write and in which order: every file a run writes has its own name (an
input named like another's mask or attention figure included), each JSON entry names its pictures, predict's
output follows the inputs whatever the batch size, and a URL or ``-`` is refused with a message that keeps it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitlab
from dense_helpers import DETR_TINY, SETR_TINY
from vitlab.cli.main import main
from vitlab.data import BadImageError, expand_image_paths, load_image, unique_stems

TINY_VIT = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=1, num_heads=2, num_classes=3,
                mean=(0.5,), std=(0.5,))


def _photo(path: Path, seed: int, size: tuple[int, int] = (40, 40)) -> Path:
    """A random colour picture of ``size`` (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8")).save(path)
    return path


@pytest.fixture(scope="module")
def detector(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = vitlab.create_model("detr_resnet50", **{**DETR_TINY, "img_size": 32, "num_classes": 3})
    return vitlab.save_model(model, tmp_path_factory.mktemp("detr") / "detr.safetensors", class_names=["a", "b", "c"])


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = vitlab.create_model("setr_pup_vit_small_patch16", **{**SETR_TINY, "img_size": 32, "num_classes": 3})
    return vitlab.save_model(model, tmp_path_factory.mktemp("setr") / "setr.safetensors",
                             class_names=["bg", "x", "y"])


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = vitlab.create_model("vit_tiny_patch16_224", **TINY_VIT)
    return vitlab.save_model(model, tmp_path_factory.mktemp("vit") / "model.safetensors", class_names=["a", "b", "c"])


# ------------------------------------------------------------------------------------ distinct output names
def test_output_names_are_distinct_over_every_suffix():
    assert unique_stems(["p/a.png", "q/a_mask.png"], ("", "_mask")) == ["a", "a_mask-1"]
    assert unique_stems(["a_mask.png", "a.png"], ("", "_mask")) == ["a_mask", "a-1"]
    # without suffixes, as before (explain's names)
    assert unique_stems(["a/x.png", "b/x.png", "x-1.png"]) == ["x", "x-1", "x-1-1"]


def test_segment_keeps_the_class_mask_of_an_image_beside_one_named_like_its_mask(segmenter, tmp_path):
    a = _photo(tmp_path / "in" / "a.png", 0, (40, 40))
    other = _photo(tmp_path / "in" / "a_mask.png", 1, (36, 24))  # a user's picture, named like a.png's mask
    ckpt = ["--checkpoint", str(segmenter), "--threads", "1"]
    assert main(["segment", str(a), "--output", str(tmp_path / "alone"), *ckpt]) == 0
    assert main(["segment", str(a), str(other), "--output", str(tmp_path / "both"), *ckpt]) == 0
    out = tmp_path / "both"
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "a_mask-1.png", "a_mask-1_mask.png", "a_mask.png",
                                                     "segments.json"]
    mask = Image.open(out / "a_mask.png")
    assert mask.mode == "L" and mask.size == (40, 40)  # the class indices of a.png, not the other's overlay
    values = np.asarray(mask)
    assert set(np.unique(values).tolist()) <= {0, 1, 2}
    assert np.array_equal(values, np.asarray(Image.open(tmp_path / "alone" / "a_mask.png")))
    assert Image.open(out / "a_mask-1.png").size == (36, 24) and Image.open(out / "a_mask-1_mask.png").mode == "L"
    rows = json.loads((out / "segments.json").read_text())
    assert [(r["image"], r["picture"], r["mask"]) for r in rows] == [
        (str(a), "a.png", "a_mask.png"), (str(other), "a_mask-1.png", "a_mask-1_mask.png")]


def test_detect_attention_keeps_the_figure_of_an_image_beside_one_named_like_it(detector, tmp_path):
    a = _photo(tmp_path / "in" / "a.png", 0)
    other = _photo(tmp_path / "in" / "a_attention.png", 1, (36, 24))
    out = tmp_path / "out"
    assert main(["detect", str(a), str(other), "--checkpoint", str(detector), "--threads", "1", "--attention",
                 "--threshold", "0", "--output", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "a_attention-1.png", "a_attention-1_attention.png",
                                                     "a_attention.png", "detections.json"]
    # a.png's attention figure (the picture and one panel per object, 300 px high), not the other's boxes
    assert Image.open(out / "a_attention.png").size[1] == 300
    assert Image.open(out / "a_attention-1.png").size == (36, 24)
    rows = json.loads((out / "detections.json").read_text())
    assert [(r["picture"], r["attention"]) for r in rows] == [("a.png", "a_attention.png"),
                                                              ("a_attention-1.png", "a_attention-1_attention.png")]


def test_a_duplicate_in_the_planned_outputs_is_refused(monkeypatch, tmp_path):
    import vitlab.tasks.run as run

    paths = [tmp_path / "a.png", tmp_path / "a_mask.png"]
    assert len(set(run.output_files(paths, tmp_path / "out", "segmentation"))) == 5
    # output names that forget the suffixes (as before): the guard refuses them before anything is written
    monkeypatch.setattr(run, "output_stems", lambda paths, task, attention=False: unique_stems(paths))
    with pytest.raises(ValueError, match="a_mask.png would be written for two inputs"):
        run.output_files(paths, tmp_path / "out", "segmentation")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ which picture is whose
@pytest.mark.parametrize("command", ["detect", "segment"])
def test_same_named_inputs_say_which_picture_is_theirs(command, detector, segmenter, tmp_path, capsys):
    p = _photo(tmp_path / "in" / "p" / "x.png", 0)
    q = _photo(tmp_path / "in" / "q" / "x.png", 1, (36, 24))
    out = tmp_path / "out"
    ckpt = detector if command == "detect" else segmenter
    capsys.readouterr()
    assert main([command, str(tmp_path / "in"), "--checkpoint", str(ckpt), "--threads", "1", "--output",
                 str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = json.loads((out / ("detections.json" if command == "detect" else "segments.json")).read_text())
    assert [(r["image"], r["picture"]) for r in rows] == [(str(p), "x.png"), (str(q), "x-1.png")]
    assert Image.open(out / "x-1.png").size == (36, 24)  # the picture named for q is q's
    if command == "detect":
        assert lines[0].startswith(f"{p} -> {out / 'x.png'}: ") and lines[1].startswith(f"{q} -> {out / 'x-1.png'}: ")
    else:
        assert [r["mask"] for r in rows] == ["x_mask.png", "x-1_mask.png"]
        assert lines[0].startswith(f"{p} -> {out / 'x.png'}, {out / 'x_mask.png'}: ")
        assert lines[1].startswith(f"{q} -> {out / 'x-1.png'}, {out / 'x-1_mask.png'}: ")


# ------------------------------------------------------------------------------------ predict's order
def test_predict_keeps_the_input_order_whatever_the_batch_size(classifier, tmp_path, capsys):
    folder = tmp_path / "imgs"
    for i, name in enumerate("abc"):
        _photo(folder / f"{name}.png", i, (20, 20))
    (folder / "b_bad.png").write_text("not a png")
    expected = [str(folder / f"{n}.png") for n in ("a", "b", "b_bad", "c")]
    base = ["predict", str(folder), "--checkpoint", str(classifier), "--threads", "1", "--skip-bad-images",
            "--topk", "1"]
    texts, jsons = {}, {}
    for batch in ("1", "2", "4"):
        capsys.readouterr()
        assert main([*base, "--batch-size", batch]) == 0
        texts[batch] = capsys.readouterr().out.splitlines()
        assert main([*base, "--batch-size", batch, "--json"]) == 0
        jsons[batch] = json.loads(capsys.readouterr().out)
    assert [line.split(": ")[0] for line in texts["4"]] == expected
    assert "(skipped)" in texts["4"][2]
    assert [r["image"] for r in jsons["4"]] == expected and "error" in jsons["4"][2]
    assert texts["1"] == texts["2"] == texts["4"] and jsons["1"] == jsons["2"] == jsons["4"]


# ------------------------------------------------------------------------------------ URLs and stdin
URL = "https://example.com/cat.jpg"


@pytest.mark.parametrize("command", ["predict", "explain", "detect", "segment"])
def test_a_url_or_stdin_is_refused_with_the_argument_as_typed(command, classifier, detector, segmenter, tmp_path,
                                                              caplog, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = {"detect": detector, "segment": segmenter}.get(command, classifier)
    output = [] if command == "predict" else ["--output", "out"]
    for given, message in ((URL, f"{URL}: URLs are not read; download the file first"),
                           ("-", "-: images are not read from stdin; save the image to a file")):
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="vitlab"):
            assert main([command, given, "--checkpoint", str(ckpt), "--threads", "1", *output]) == 2
        assert message in caplog.text and "file not found" not in caplog.text
    assert not (tmp_path / "out").exists()


def test_load_image_names_a_url_as_given(tmp_path, monkeypatch):
    with pytest.raises(BadImageError, match=f"^{URL}: URLs are not read"):
        load_image(URL)
    # a file that is really named "-" is an image like any other
    monkeypatch.chdir(tmp_path)
    _photo(tmp_path / "dash.png", 0).rename(tmp_path / "-")
    assert expand_image_paths(["-"]) == ["-"] and load_image("-").shape == (3, 40, 40)
