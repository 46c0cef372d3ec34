"""Detection / segmentation data in the shapes users bring it: binary masks saved 0/255, classes.json in
Hugging Face / COCO shapes, EXIF-rotated COCO images, Roboflow's COCO layout and other split-folder names,
lossy files under a mask's .png name."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dense_helpers import DETR_TINY
from vitlab.cli.main import main
from vitlab.data.dense import CocoDetection, MaskFolder
from vitlab.data.errors import DatasetError
from vitlab.tasks.run import _segmentation_classes, check_dense_files, open_split

torch.set_num_threads(1)


def _masks(root: Path, masks: dict[str, np.ndarray]) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for name, m in masks.items():
        Image.fromarray(np.full((*m.shape, 3), 90, np.uint8)).save(root / "images" / f"{name}.png")
        Image.fromarray(m).save(root / "masks" / f"{name}.png")


def _blob(value: int, *, h: int = 24, w: int = 32) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[4:16, 6:20] = value
    return m


def _check(root: Path, classes: list[str]) -> None:
    train = open_split(root, "train", "segmentation", None, len(classes))
    val = open_split(root, "val", "segmentation", None, len(classes))
    check_dense_files(train, val, classes=classes)


# ------------------------------------------------------------------------------------ 1. binary masks 0/255


def test_binary_masks_saved_as_0_255_are_refused_before_training(tmp_path):
    _masks(tmp_path / "train", {f"t{i}": _blob(255) for i in range(3)})
    _masks(tmp_path / "val", {"v0": _blob(255)})
    with pytest.raises(DatasetError, match=r"masks[/\\]t0\.png: .*'object'.*255 is the ignore index.*mask // 255"):
        _check(tmp_path, ["background", "object"])


def test_a_class_no_mask_holds_is_a_warning_naming_it(tmp_path, caplog):
    _masks(tmp_path / "train", {f"t{i}": _blob(1) for i in range(3)})
    _masks(tmp_path / "val", {"v0": _blob(1)})
    with caplog.at_level(logging.WARNING, logger="vitlab"):
        _check(tmp_path, ["background", "cat", "dog"])
    assert "'dog'" in caplog.text and "'cat'" not in caplog.text


def test_train_masks_are_sampled_for_their_classes(tmp_path, caplog):
    # val holds no "dog" but train does, and object edges marked 255 (VOC) are no binary masks: no complaint
    voc = _blob(1)
    voc[3, :] = 255
    _masks(tmp_path / "train", {"t0": _blob(1), "t1": _blob(2), "t2": voc})
    _masks(tmp_path / "val", {"v0": voc})
    with caplog.at_level(logging.WARNING, logger="vitlab"):
        _check(tmp_path, ["background", "cat", "dog"])
    assert "no pixel" not in caplog.text


# ------------------------------------------------------------------------------------ 2. classes.json shapes


@pytest.mark.parametrize("content", [
    ["background", "a", "b"],
    {"0": "background", "1": "a", "2": "b"},  # Hugging Face id2label
    {"2": "b", "0": "background", "1": "a"},
    [{"id": 1, "name": "a"}, {"id": 0, "name": "background"}, {"id": 2, "name": "b"}],  # COCO / ADE style
    [{"name": "background"}, {"name": "a"}, {"name": "b"}],
])
def test_classes_json_shapes_are_read_in_id_order(tmp_path, content):
    (tmp_path / "classes.json").write_text(json.dumps(content))
    assert _segmentation_classes(tmp_path) == ["background", "a", "b"]


@pytest.mark.parametrize("content, said", [
    ({"background": 0, "a": 1}, "keys of an id2label object"),
    ({"0": "background", "2": "b"}, r"ids are \[0, 2\]"),
    ([{"id": 0, "name": "background"}, {"id": 1}], "needs a 'name'"),
    ([{"id": 0, "name": "background"}, {"id": 0, "name": "a"}], "appears twice"),
    (["background", ""], "non-empty strings"),
    ([0, 1], "non-empty strings"),
    (["background", "a", "a"], "more than once"),
    ("background", "got a JSON str"),
])
def test_other_classes_json_is_refused_naming_the_accepted_forms(tmp_path, content, said):
    (tmp_path / "classes.json").write_text(json.dumps(content))
    with pytest.raises(DatasetError, match=rf"classes\.json: .*{said}.*expected a list of names.*id2label"):
        _segmentation_classes(tmp_path)


# ------------------------------------------------------------------------------------ 3. EXIF orientation


def _coco(root: Path, files: dict[str, tuple[int, int]], *, json_name: str = "annotations.json",
          images: str = "images") -> None:
    (root / images).mkdir(parents=True, exist_ok=True)
    entries, anns = [], []
    for i, (name, (w, h)) in enumerate(files.items(), 1):
        if not (root / images / name).exists():
            Image.new("RGB", (w, h), (200, 60, 60)).save(root / images / name)
        entries.append({"id": i, "file_name": name, "width": w, "height": h})
        anns.append({"id": i, "image_id": i, "category_id": 1, "bbox": [2, 2, 10, 8], "area": 80, "iscrowd": 0})
    coco = {"images": entries, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}
    (root / json_name).write_text(json.dumps(coco))


@pytest.mark.parametrize("orientation", [6, 8])
def test_an_exif_rotated_image_size_error_says_so(tmp_path, orientation):
    (tmp_path / "images").mkdir()
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.new("RGB", (64, 48)).save(tmp_path / "images" / "a.jpg", exif=exif)
    _coco(tmp_path, {"a.jpg": (64, 48)})  # the stored size, boxes drawn on the stored pixels
    ds = CocoDetection(tmp_path / "images", tmp_path / "annotations.json")
    said = rf"a\.jpg is 48x64, the JSON says 64x48; the file stores 64x48, .*EXIF orientation \({orientation}: rotated"
    with pytest.raises(DatasetError, match=said):
        ds.check_files()
    with pytest.raises(DatasetError, match=said):
        ds.raw(0)


def test_a_size_error_without_exif_does_not_mention_it(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (48, 64)).save(tmp_path / "images" / "a.jpg")
    _coco(tmp_path, {"a.jpg": (64, 48)})
    with pytest.raises(DatasetError, match=r"is 48x64, the JSON says 64x48$"):
        CocoDetection(tmp_path / "images", tmp_path / "annotations.json").check_files()


# ------------------------------------------------------------------------------------ 4. split layouts


def test_roboflow_coco_export_layout_is_read(tmp_path):
    for split in ("train", "valid", "test"):  # images beside _annotations.coco.json, no images/ folder
        _coco(tmp_path / split, {"a.jpg": (40, 30), "b.jpg": (40, 30)}, json_name="_annotations.coco.json",
              images=".")
    for split in ("train", "val", "test"):
        ds = open_split(tmp_path, split, "detection", None)
        assert len(ds) == 2 and ds.raw(1)["image"].shape[-2:] == (30, 40)


@pytest.mark.parametrize("val_name", ["valid", "Validation", "DEV"])
def test_split_folders_are_named_as_for_classification(tmp_path, val_name):
    _coco(tmp_path / "Train", {"a.png": (40, 30)})
    _coco(tmp_path / val_name, {"b.png": (40, 30)})
    assert len(open_split(tmp_path, "val", "detection", None)) == 1
    _masks(tmp_path / "seg" / "train", {"t": _blob(1)})
    _masks(tmp_path / "seg" / val_name, {"v": _blob(1)})
    assert open_split(tmp_path / "seg", "val", "segmentation", None, 2).pairs[0][1].parent.parent.name == val_name


def test_a_split_without_coco_json_lists_what_is_there(tmp_path):
    _coco(tmp_path / "train", {"a.png": (40, 30)}, json_name="instances_train.json")
    with pytest.raises(DatasetError, match=r"train: no COCO annotation file .*JSON files there: "
                                           r"instances_train\.json; folders: images/; .*Roboflow"):
        open_split(tmp_path, "train", "detection", None)
    with pytest.raises(DatasetError, match=r"no val split folder \(val/, valid/, validation/, dev/ whatever the "
                                           r"case\); folders there: train/"):
        open_split(tmp_path, "val", "detection", None)


def test_training_on_a_roboflow_export(tmp_path):
    for split in ("train", "valid"):
        _coco(tmp_path / "data" / split, {"a.jpg": (32, 32), "b.jpg": (32, 32)}, json_name="_annotations.coco.json",
              images=".")
    recipe = tmp_path / "r.json"
    over = {k: v for k, v in DETR_TINY.items() if k not in ("in_chans", "mean", "std")}
    recipe.write_text(json.dumps({"model": "detr_resnet50", "model_overrides": over, "img_size": 32,
                                  "max_steps": 1, "batch_size": 2, "augment": False}))
    assert main(["train", "--task", "detection", "--data", str(tmp_path / "data"), "--recipe", str(recipe),
                 "--output", str(tmp_path / "run"), "--no-progress", "--threads", "1"]) == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["val"]["AP"] is not None


# ------------------------------------------------------------------------------------ 5. lossy mask files


@pytest.mark.parametrize("fmt, options, said", [
    ("JPEG", {"quality": 90}, "a JPEG file"),
    ("WEBP", {"quality": 90}, r"a WEBP \(lossy\) file"),
])
def test_a_lossy_file_under_a_mask_name_is_refused(tmp_path, fmt, options, said):
    _masks(tmp_path, {"a": _blob(1)})
    Image.fromarray(_blob(3)).save(tmp_path / "masks" / "a.png", format=fmt, **options)
    ds = MaskFolder(tmp_path / "images", tmp_path / "masks", num_classes=21)
    with pytest.raises(DatasetError, match=rf"masks[/\\]a\.png: {said}.*re-export the masks as PNG"):
        ds.check_files()
    with pytest.raises(DatasetError, match=said):
        ds.raw(0)


@pytest.mark.parametrize("fmt, options", [("PNG", {}), ("BMP", {}), ("TIFF", {})])
def test_lossless_mask_files_are_read(tmp_path, fmt, options):
    _masks(tmp_path, {"a": _blob(1)})
    Image.fromarray(_blob(3)).save(tmp_path / "masks" / "a.png", format=fmt, **options)
    ds = MaskFolder(tmp_path / "images", tmp_path / "masks", num_classes=21)
    ds.check_files(classes=True)
    assert ds.raw(0)["mask"].unique().tolist() == [0, 3]


def test_a_grey_mask_stored_through_a_reordered_palette_is_refused(tmp_path):
    """Pillow saves a grey mask as GIF with a palette of the greys it holds, in another order: the indices read back
    are not the classes drawn (3 read as 2), silently; an identity grey palette (a PNG) is read as before."""
    m = np.zeros((24, 32), np.uint8)
    m[2:6, 2:6], m[10:14, 10:14] = 3, 1
    _masks(tmp_path / "train", {"t0": _blob(1)})
    _masks(tmp_path / "val", {"v0": _blob(1)})
    Image.fromarray(m).save(tmp_path / "val" / "masks" / "v0.png", format="GIF")
    with pytest.raises(DatasetError, match=r"v0\.png: a palette image whose colours are greys other than their "
                                           r"indices \(index 2 shows grey 3\)"):
        _check(tmp_path, ["bg", "a", "b", "c"])
    palette = Image.fromarray(m).convert("P")  # a grey palette in index order: its indices are the values
    palette.putpalette([v for g in range(256) for v in (g, g, g)])
    palette.save(tmp_path / "val" / "masks" / "v0.png")
    _check(tmp_path, ["bg", "a", "b", "c"])
