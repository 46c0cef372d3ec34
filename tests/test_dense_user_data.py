"""Detection / segmentation data as other tools write it: crowd regions scored as COCO scores them, malformed
entries named before training, masks with another ignore value, a segmentation folder without its classes."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image

from dense_helpers import SETR_TINY
from vitlab.cli.main import main
from vitlab.data.dense import CocoDetection, MaskFolder, _shorter_side_size
from vitlab.data.errors import DatasetError
from vitlab.tasks.metrics import SegmentationMeter, coco_map


def _coco(tmp_path, images, annotations, categories=({"id": 1, "name": "a"},)):
    root = tmp_path / "images"
    root.mkdir(exist_ok=True)
    for img in images:
        Image.new("RGB", (img.get("width", 40), img.get("height", 30))).save(root / img["file_name"])
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps({"images": list(images), "annotations": list(annotations),
                                "categories": list(categories)}))
    return root, path


def test_crowd_regions_are_kept_for_evaluation(tmp_path):
    img = {"id": 1, "file_name": "a.png", "width": 40, "height": 30}
    root, path = _coco(tmp_path, [img], [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10]},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [20, 5, 15, 20], "iscrowd": 1}])
    ds = CocoDetection(root, path)
    assert [lbl for _, lbl in ds.targets[1]] == [0] and ds.crowd[1] == [([20.0, 5.0, 35.0, 25.0], 0)]
    # a detection on the crowd region: ignored (COCO), not a false positive that lowers AP
    gts = [{"image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10]},
           {"image_id": 1, "category_id": 1, "bbox": [20, 5, 15, 20], "iscrowd": 1}]
    dets = [{"image_id": 1, "category_id": 1, "bbox": [21, 6, 12, 18], "score": 0.9},
            {"image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "score": 0.8}]
    assert coco_map(gts, dets)["AP"] == pytest.approx(1.0)
    assert coco_map(gts[:1], dets)["AP"] < 1.0  # without the crowd entry, the first detection is a miss


@pytest.mark.parametrize(("images", "annotations", "categories", "said"), [
    ([{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
     [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [1, 1, float("nan"), 3]}], None, "annotation id 7: bbox"),
    ([{"id": 1, "file_name": "a.png", "width": 40, "height": 30}, {"id": 1, "file_name": "b.png", "width": 40,
                                                                     "height": 30}],
     [], None, "image id 1 is given to both a.png and b.png"),
    ([{"id": 1, "file_name": "a.png", "width": 40, "height": 30}], [],
     [{"id": 3, "name": "x"}, {"id": 3, "name": "y"}], "category id(s) [3] appear more than once"),
    ([{"id": "img0", "file_name": "a.png", "width": 40, "height": 30}], [], None, "'id' must be an integer"),
])
def test_malformed_coco_entries_are_named(tmp_path, images, annotations, categories, said):
    root, path = _coco(tmp_path, images, annotations, categories or ({"id": 1, "name": "a"},))
    with pytest.raises(DatasetError, match=str(path).replace(".", r"\.") + ".*" + _escape(said)):
        CocoDetection(root, path)


def _escape(text):
    import re

    return re.escape(text)


def test_masks_with_another_ignore_value(tmp_path):
    for d in ("images", "masks"):
        (tmp_path / d).mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    mask = np.zeros((8, 8), np.uint8)
    mask[:2] = 254
    Image.fromarray(mask).save(tmp_path / "masks" / "a.png")
    with pytest.raises(DatasetError, match="class 254 outside"):
        MaskFolder(tmp_path / "images", tmp_path / "masks", num_classes=4).raw(0)
    sample = MaskFolder(tmp_path / "images", tmp_path / "masks", num_classes=4, ignore_index=254).raw(0)
    assert int((torch.as_tensor(np.asarray(sample["mask"])) == 254).sum()) == 16


def test_per_class_iou_is_valid_json():
    meter = SegmentationMeter(num_classes=3, ignore_index=255)
    meter.update(torch.tensor([[0, 1]]), torch.tensor([[0, 1]]))  # class 2 in neither
    text = json.dumps(meter.summary(), allow_nan=False)
    assert json.loads(text)["iou"] == [1.0, 1.0, None]


def test_an_extreme_strip_keeps_a_row():
    h, w = _shorter_side_size(3, 900, 32, 64)
    assert h >= 1 and w == pytest.approx(64, abs=1) and not math.isnan(h)


def test_segmentation_data_without_its_classes_is_refused_before_training(tmp_path, caplog):
    for split in ("train", "val"):
        for d in ("images", "masks"):
            (tmp_path / "data" / split / d).mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(tmp_path / "data" / split / "images" / "a.png")
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "data" / split / "masks" / "a.png")
    recipe = tmp_path / "r.json"
    over = {k: v for k, v in SETR_TINY.items() if k not in ("in_chans", "mean", "std")}
    recipe.write_text(json.dumps({"model": "setr_pup_vit_small_patch16", "model_overrides": over, "img_size": 32,
                                  "max_steps": 1, "batch_size": 1}))
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(["train", "--task", "segmentation", "--data", str(tmp_path / "data"), "--recipe", str(recipe),
                     "--output", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "segmentation needs its classes" in caplog.text and "classes.json" in caplog.text
    assert not (tmp_path / "run" / "train_state.pt").exists()


class _Boxes(torch.nn.Module):
    """A detector that answers the same two queries for every image: one inside the crowd region (score 0.9),
    one on the real object (0.8); boxes normalised (cx, cy, w, h) of a 40 x 30 image."""

    def __init__(self):
        super().__init__()
        from vitlab.models.base import Preprocessing

        self.preprocessing = Preprocessing(input_size=(3, 32, 32), crop_pct=1.0)

    def forward(self, images, mask=None):
        b = images.shape[0]
        logits = torch.tensor([[math.log(9.0), 0.0], [math.log(4.0), 0.0]]).expand(b, 2, 2)
        boxes = torch.tensor([[27 / 40, 15 / 30, 12 / 40, 18 / 30], [7 / 40, 7 / 30, 10 / 40, 10 / 30]])
        return {"logits": logits, "boxes": boxes.expand(b, 2, 4)}


def test_detection_ap_ignores_detections_on_crowd_regions(tmp_path):
    """vitlab's AP fell below pycocotools' on data with iscrowd annotations: crowd boxes were dropped before
    evaluation, so a detection on one counted as a false positive."""
    from vitlab.tasks.detection import evaluate_detection
    from vitlab.tasks.run import transform_for

    img = {"id": 1, "file_name": "a.png", "width": 40, "height": 30}
    root, path = _coco(tmp_path, [img], [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10]},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [20, 5, 15, 20], "iscrowd": 1}])
    model = _Boxes()
    ds = CocoDetection(root, path, transform=transform_for(model, train=False))
    assert evaluate_detection(model, ds)["AP"] == pytest.approx(1.0)


@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_the_canvas_recipe_follows_users_colour_data(tmp_path, task, caplog):
    """Without --recipe, dense training takes the digit canvases' recipe: grey (colour data was averaged) and,
    for segmentation, 11 classes whatever the masks hold."""
    from vitlab.cli.train import fit_canvas_recipe
    from vitlab.train.recipe import load_recipe

    (tmp_path / "train" / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(tmp_path / "train" / "images" /
                                                                                  f"{i}.png")
    recipe = load_recipe("detr_canvases" if task == "detection" else "setr_canvases")
    assert recipe.model_overrides["in_chans"] == 1
    with caplog.at_level(logging.INFO, logger="vitlab"):
        fitted = fit_canvas_recipe(recipe, tmp_path, task)
    assert "in_chans" not in fitted.model_overrides and "mean" not in fitted.model_overrides
    assert ("num_classes" in fitted.model_overrides) == (task == "detection" and "num_classes" in
                                                         recipe.model_overrides)
    assert "adapted to" in caplog.text
    grey = tmp_path / "grey"  # a canvas-like set (grey, its classes.json) keeps the recipe as it is
    (grey / "train" / "images").mkdir(parents=True)
    (grey / "classes.json").write_text(json.dumps(["background", "x"]))
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(grey / "train" / "images" / "0.png")
    assert fit_canvas_recipe(recipe, grey, task) == recipe
