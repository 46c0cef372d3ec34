"""vitlab's COCO mAP against pycocotools' values (committed fixtures), and the segmentation meter by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vitlab.tasks.metrics import SegmentationMeter, coco_map, detections_from_outputs

CASES = json.loads((Path(__file__).parent / "fixtures" / "coco_map_cases.json").read_text())


@pytest.mark.parametrize("i", range(len(CASES)))
def test_coco_map_equals_pycocotools(i: int) -> None:
    c = CASES[i]
    got = coco_map(c["ground_truth"], c["detections"])
    for k in ("AP", "AP50", "AP75"):
        assert got[k] == pytest.approx(c["expected"][k], abs=1e-9), k


def test_perfect_detections_score_one() -> None:
    gt = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]}, {"image_id": 2, "category_id": 2,
                                                                       "bbox": [5, 5, 4, 4]}]
    dt = [{**g, "score": 0.9} for g in gt]
    assert coco_map(gt, dt) == pytest.approx({"AP": 1.0, "AP50": 1.0, "AP75": 1.0})


def test_postprocessing_to_pixels() -> None:
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 5.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.5, 0.5], [0.1, 0.1, 0.1, 0.1]]])
    (d,) = detections_from_outputs(logits, boxes, [(20, 40)], threshold=0.2)
    assert d["labels"].tolist() == [0]
    torch.testing.assert_close(d["boxes"], torch.tensor([[10.0, 5.0, 30.0, 15.0]]))


def test_segmentation_meter_by_hand() -> None:
    m = SegmentationMeter(3)
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 2]])
    m.update(pred, target)
    s = m.summary()
    # class 0: tp 1, union 3; class 1: tp 2, union 3; class 2: tp 1, union 2
    assert s["mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert s["pixel_acc"] == pytest.approx(4 / 6)
