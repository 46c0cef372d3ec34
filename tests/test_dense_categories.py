"""Detection labels follow COCO category ids, never the position of a category in one file's list: a val
annotations.json listing fewer categories than train keeps train's (and the checkpoint's) labels."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from dense_helpers import DETR_TINY, write_fake_mnist
from vitlab.cli.main import main
from vitlab.data.dense import CocoDetection, canvas_datasets
from vitlab.data.errors import DatasetError

torch.set_num_threads(1)


def _coco(root: Path, name: str, categories: list[dict], category_ids: list[int]) -> Path:
    """One 16x16 image with a box per category id, under ``root/images``; returns the JSON file."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    Image.new("L", (16, 16)).save(root / "images" / "a.png")
    anns = [{"id": i + 1, "image_id": 1, "category_id": c, "bbox": [1, 1, 4, 4]} for i, c in enumerate(category_ids)]
    path = root / name
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "width": 16, "height": 16}],
                                "annotations": anns, "categories": categories}))
    return path


TRAIN_CATS = [{"id": 1, "name": "zero"}, {"id": 2, "name": "one"}, {"id": 7, "name": "six"}]


def test_a_split_with_fewer_categories_keeps_the_reference_labels(tmp_path):
    train = CocoDetection(tmp_path / "images", _coco(tmp_path, "train.json", TRAIN_CATS, [1, 2, 7]))
    assert train.raw(0)["labels"].tolist() == [0, 1, 2]
    # val lists only "one" and "six": per file they would be labels 0 and 1
    val_json = _coco(tmp_path, "val.json", TRAIN_CATS[1:], [2, 7])
    assert CocoDetection(tmp_path / "images", val_json).raw(0)["labels"].tolist() == [0, 1]
    val = CocoDetection(tmp_path / "images", val_json, categories=TRAIN_CATS)
    assert val.raw(0)["labels"].tolist() == [1, 2]
    assert val.classes == ["zero", "one", "six"] and val.cat_ids == [1, 2, 7]
    # a reference with names only (an older checkpoint): matched by name
    by_name = CocoDetection(tmp_path / "images", val_json, categories=[{"name": c["name"]} for c in TRAIN_CATS])
    assert by_name.raw(0)["labels"].tolist() == [1, 2] and by_name.cat_ids[1:] == [2, 7]


def test_a_category_the_reference_lacks_is_an_error_naming_the_file(tmp_path):
    val_json = _coco(tmp_path, "val.json", [*TRAIN_CATS, {"id": 9, "name": "eight"}], [9])
    with pytest.raises(DatasetError, match=r"val\.json: category id 9 \('eight'\) is not one of the categories "
                                           r"of the training set"):
        CocoDetection(tmp_path / "images", val_json, categories=TRAIN_CATS, categories_from="the training set")
    renamed = _coco(tmp_path, "renamed.json", [{"id": 2, "name": "two"}], [2])
    with pytest.raises(DatasetError, match=r"renamed\.json: category id 2 \('two'\) is 'one'"):
        CocoDetection(tmp_path / "images", renamed, categories=TRAIN_CATS)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Canvases whose val/annotations.json lists only the categories it uses, without digit 0 (id 1)."""
    tmp = tmp_path_factory.mktemp("categories")
    mnist = write_fake_mnist(tmp / "mnist")
    assert main(["make-canvases", "--mnist", str(mnist), "--output", str(tmp / "c"), "--train", "4", "--val", "3",
                 "--size", "32"]) == 0
    path = tmp / "c" / "val" / "annotations.json"
    coco = json.loads(path.read_text())
    coco["annotations"] = [a for a in coco["annotations"] if a["category_id"] != 1]
    coco["categories"] = [c for c in coco["categories"] if c["id"] != 1]
    path.write_text(json.dumps(coco))
    return tmp / "c"


def test_val_labels_follow_the_train_category_ids(data):
    val = canvas_datasets(data, "val", task="detection")
    assert val.cat_ids == list(range(1, 11)) and val.classes == [str(d) for d in range(10)]
    coco = json.loads((data / "val" / "annotations.json").read_text())
    first = coco["annotations"][0]
    labels = val.raw([i["id"] for i in coco["images"]].index(first["image_id"]))["labels"].tolist()
    assert first["category_id"] - 1 in labels  # digit d (id d + 1) is label d, as in train


def test_train_and_eval_score_val_with_the_models_categories(data, tmp_path, caplog, capsys, monkeypatch):
    import vitlab.tasks.detection
    from vitlab.tasks.run import recorded_categories

    scored = []  # the category id of each label of the data sets that train and eval score
    evaluate = vitlab.tasks.detection.evaluate_detection
    monkeypatch.setattr(vitlab.tasks.detection, "evaluate_detection",
                        lambda model, ds, **kw: scored.append(list(ds.cat_ids)) or evaluate(model, ds, **kw))
    recipe = tmp_path / "detr.json"
    recipe.write_text(json.dumps({"model": "detr_resnet50", "model_overrides": DETR_TINY, "img_size": 32,
                                  "max_steps": 2, "batch_size": 2, "hflip": 0.0, "cpu_threads": 1}))
    out = tmp_path / "run"
    assert main(["train", "--task", "detection", "--data", str(data), "--recipe", str(recipe), "--output", str(out),
                 "--no-progress"]) == 0
    checkpoint = out / "model.safetensors"
    assert [c["id"] for c in recorded_categories(checkpoint)] == list(range(1, 11))
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--split", "val"]) == 0
    assert "AP50" in capsys.readouterr().out
    assert scored == [list(range(1, 11))] * 2  # val lacks id 1, yet id d + 1 is label d in both
    # a val category the model does not know: one clear error naming the file
    other = tmp_path / "other"
    (other / "val").mkdir(parents=True)
    (other / "val" / "images").symlink_to(data / "val" / "images")
    coco = json.loads((data / "val" / "annotations.json").read_text())
    coco["categories"].append({"id": 11, "name": "ten"})
    coco["annotations"][0]["category_id"] = 11
    (other / "val" / "annotations.json").write_text(json.dumps(coco))
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(other), "--split", "val"]) == 2
    assert f"{other / 'val' / 'annotations.json'}: category id 11 ('ten')" in caplog.text
    assert str(checkpoint) in caplog.text
