"""Detection / segmentation data: augmentations keep boxes and masks on their pixels; readers refuse bad
annotations with the file and entry named; canvases are deterministic and self-consistent."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dense_helpers import write_fake_mnist
from vitlab.data import DatasetError
from vitlab.data.dense import (
    CocoDetection,
    DenseTransform,
    MaskFolder,
    canvas_datasets,
    crop_sample,
    hflip,
    make_canvases,
    pad_batch,
    resize_sample,
)


def _sample() -> dict:
    img = torch.zeros(1, 40, 60, dtype=torch.uint8)
    img[0, 10:20, 5:25] = 255
    img[0, 25:35, 40:50] = 255
    mask = (img[0] > 0).long() * 3
    return {"image": img, "boxes": torch.tensor([[5.0, 10.0, 25.0, 20.0], [40.0, 25.0, 50.0, 35.0]]),
            "labels": torch.tensor([0, 1]), "mask": mask}


def _box_of_pixels(img: torch.Tensor, box: torch.Tensor) -> list[float]:
    """The tight box of the bright pixels inside (a margin around) ``box``."""
    x0, y0, x1, y1 = [int(v) for v in box.round()]
    region = torch.zeros_like(img[0], dtype=torch.bool)
    region[max(0, y0 - 2):y1 + 2, max(0, x0 - 2):x1 + 2] = True
    ys, xs = torch.nonzero((img[0] > 127) & region, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


@pytest.mark.parametrize("op", ["flip", "resize", "crop", "chain"])
def test_augmentations_keep_boxes_and_masks_on_the_pixels(op: str) -> None:
    s = _sample()
    if op == "flip":
        s = hflip(s)
    elif op == "resize":
        s = resize_sample(s, (80, 90))
    elif op == "crop":
        s = crop_sample(s, 5, 8, 30, 40)
    else:
        s = crop_sample(resize_sample(hflip(s), (80, 120)), 12, 10, 60, 100)
    for b in s["boxes"]:
        got = _box_of_pixels(s["image"], b)
        assert got == pytest.approx(b.tolist(), abs=1.01)
    m, bright = s["mask"] > 0, s["image"][0] > 127
    assert (m & bright).sum() / (m | bright).sum() > 0.9  # nearest vs bilinear differ only on the edges


def test_crop_drops_boxes_left_outside() -> None:
    s = crop_sample(_sample(), 0, 0, 22, 30)
    assert s["labels"].tolist() == [0] and s["boxes"].tolist() == [[5.0, 10.0, 25.0, 20.0]]


def test_transform_gives_normalised_cxcywh_of_the_transformed_image() -> None:
    t = DenseTransform(size=(32,), square=True, mean=(0.0,), std=(1.0,), channels=1)
    s = t(_sample())
    assert s["image"].shape == (1, 32, 32)
    torch.testing.assert_close(s["boxes"][0], torch.tensor([15 / 60, 15 / 40, 20 / 60, 10 / 40]))
    images, mask, targets = pad_batch([s, t({**_sample(), "image": _sample()["image"][:, :20]})])
    assert images.shape == (2, 1, 32, 32) and mask.all()


def _coco(tmp_path: Path, **change) -> Path:
    (tmp_path / "img").mkdir(exist_ok=True)
    Image.fromarray(np.zeros((20, 30), dtype=np.uint8)).save(tmp_path / "img" / "a.png")
    data = {"images": [{"id": 1, "file_name": "a.png", "width": 30, "height": 20}],
            "annotations": [{"id": 7, "image_id": 1, "category_id": 3, "bbox": [2, 3, 10, 5]}],
            "categories": [{"id": 3, "name": "x"}, {"id": 5, "name": "y"}]}
    for k, v in change.items():
        if k == "ann":
            data["annotations"][0].update(v)
        elif k == "image":
            data["images"][0].update(v)
    p = tmp_path / "ann.json"
    p.write_text(json.dumps(data))
    return p


def test_coco_reader_and_its_errors(tmp_path: Path) -> None:
    ds = CocoDetection(tmp_path / "img", _coco(tmp_path))
    s = ds[0]
    assert s["labels"].tolist() == [0] and s["boxes"].tolist() == [[2.0, 3.0, 12.0, 8.0]]
    assert ds.cat_ids == [3, 5] and ds.classes == ["x", "y"]
    with pytest.raises(DatasetError, match=r"ann\.json: annotation id 7: bbox .* outside image id 1"):
        CocoDetection(tmp_path / "img", _coco(tmp_path, ann={"bbox": [25, 3, 10, 5]}))
    with pytest.raises(DatasetError, match=r"annotation id 7: unknown category_id 4"):
        CocoDetection(tmp_path / "img", _coco(tmp_path, ann={"category_id": 4}))
    with pytest.raises(DatasetError, match=r"image id 1: file .*b\.png not found"):
        CocoDetection(tmp_path / "img", _coco(tmp_path, image={"file_name": "b.png"}))


def test_mask_folder_and_its_errors(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.zeros((8, 10, 3), dtype=np.uint8)).save(tmp_path / "images" / "a.jpg")
    m = np.zeros((8, 10), dtype=np.uint8)
    m[0, 0] = 255
    m[1, 1] = 2
    Image.fromarray(m).save(tmp_path / "masks" / "a.png")
    img, mask = MaskFolder(tmp_path / "images", tmp_path / "masks", num_classes=3)[0]
    assert img.shape == (3, 8, 10) and mask[0, 0] == 255 and mask[1, 1] == 2
    with pytest.raises(DatasetError, match=r"a\.png: class 2 outside 0\.\.1"):
        MaskFolder(tmp_path / "images", tmp_path / "masks", num_classes=2)[0]
    Image.fromarray(np.zeros((9, 10), dtype=np.uint8)).save(tmp_path / "masks" / "a.png")
    with pytest.raises(DatasetError, match=r"masks/a\.png: mask is 10x9, its image a\.jpg is 10x8"):
        MaskFolder(tmp_path / "images", tmp_path / "masks")[0]
    Image.fromarray(np.zeros((8, 10, 3), dtype=np.uint8)).save(tmp_path / "images" / "b.png")
    with pytest.raises(DatasetError, match=r"b\.png: no mask"):
        MaskFolder(tmp_path / "images", tmp_path / "masks")


def test_canvases_are_deterministic_and_boxes_masks_agree(tmp_path: Path) -> None:
    mnist = write_fake_mnist(tmp_path / "mnist")
    a = make_canvases(tmp_path / "a", mnist=mnist, seed=3, n_train=6, n_val=2, size=64)
    make_canvases(tmp_path / "b", mnist=mnist, seed=3, n_train=6, n_val=2, size=64)
    assert a["train"]["images"] == 6 and a["train"]["objects"] >= 6
    for split in ("train", "val"):
        assert (tmp_path / "a" / split / "annotations.json").read_text() == \
            (tmp_path / "b" / split / "annotations.json").read_text()
    det = canvas_datasets(tmp_path / "a", "train", task="detection")
    seg = canvas_datasets(tmp_path / "a", "train", task="segmentation")
    for i in range(len(det)):
        s = det[i]
        _, mask = seg[i]
        for box, label in zip(s["boxes"], s["labels"]):
            x0, y0, x1, y1 = box.int().tolist()
            inside = mask[y0:y1, x0:x1]
            assert (inside == label + 1).any()  # the digit's own pixels lie in its box
            ys, xs = torch.nonzero(inside == label + 1, as_tuple=True)
            assert ys.min() == 0 and xs.min() == 0 and ys.max() == y1 - y0 - 1 and xs.max() == x1 - x0 - 1


def test_canvases_never_half_written_or_mixed_with_an_older_set(tmp_path: Path) -> None:
    mnist = write_fake_mnist(tmp_path / "mnist")
    out = tmp_path / "c"
    make_canvases(out, mnist=mnist, seed=0, n_train=5, n_val=2, size=32)
    assert json.loads((out / "classes.json").read_text())[0] == "background"
    with pytest.raises(DatasetError, match=r"c exists and is not empty; pass --overwrite"):
        make_canvases(out, mnist=mnist, seed=1, n_train=3, n_val=1, size=32)
    assert len(list((out / "train" / "images").iterdir())) == 5  # untouched
    # a smaller set over a larger one: replaced whole, no image left without its annotation
    make_canvases(out, mnist=mnist, seed=1, n_train=3, n_val=1, size=32, overwrite=True)
    files = sorted(p.name for p in (out / "train" / "images").iterdir())
    coco = json.loads((out / "train" / "annotations.json").read_text())
    assert files == sorted(im["file_name"] for im in coco["images"]) and len(files) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".c.")]  # no temporary folder left
    # an interrupted run leaves the folder as it was
    with pytest.raises(DatasetError):
        make_canvases(out, mnist=tmp_path / "no-mnist", n_train=2, n_val=1, size=32, overwrite=True)
    assert len(list((out / "train" / "images").iterdir())) == 3
    # --overwrite replaces a canvas set, never a folder of other files
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("mine")
    with pytest.raises(DatasetError, match="holds files that are not a canvas set"):
        make_canvases(tmp_path / "mine", mnist=mnist, n_train=2, n_val=1, size=32, overwrite=True)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "mine"
