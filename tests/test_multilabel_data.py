"""Multi-label data (``--multi-label``): the label files vitlab reads give several labels per image, as multi-hot
rows; errors name the file, the line and the column."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.data import build_dataset
from vitlab.data.errors import DatasetError
from vitlab.data.multilabel import build_multilabel_dataset, random_split


def _images(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((8, 8), i * 10, np.uint8)).save(folder / f"{i}.png")


def _rows(ds) -> dict[str, list[str]]:
    """{file name: its labels} of a multi-label data set, read through __getitem__'s multi-hot rows."""
    out = {}
    for i, p in enumerate(ds.paths):
        y = ds[i][1]
        assert y.dtype == torch.float32 and y.shape == (len(ds.classes),)
        out[Path(p).name] = [c for c, v in zip(ds.classes, y.tolist()) if v == 1.0]
    return out


def _jsonl(folder: Path, tags: list) -> None:
    (folder / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f"{i}.png", "labels": t}) + "\n" for i, t in enumerate(tags)))


def test_jsonl_lists_with_an_empty_one(tmp_path: Path) -> None:
    _images(tmp_path, 4)
    _jsonl(tmp_path, [["dog", "cat"], [], ["cat"], ["bird", 7]])
    ds = build_multilabel_dataset(tmp_path, split="train", val_fraction=0.0)
    assert ds.classes == ["7", "bird", "cat", "dog"]  # the sorted union of the tags
    assert _rows(ds) == {"0.png": ["cat", "dog"], "1.png": [], "2.png": ["cat"], "3.png": ["7", "bird"]}
    assert ds.class_counts() == [1, 1, 2, 1]  # positives per label


@pytest.mark.parametrize("cells", [
    ["cat dog", "", "haze", "  cat   haze "],  # Planet: spaces
    ['"cat|dog"', "", "haze", '"cat | haze"'],
    ['"cat;dog"', "", "haze", '"cat;haze;"'],
    ['"cat,dog"', "", "haze", '"cat, haze"'],
])
def test_a_column_of_separated_tags(tmp_path: Path, cells: list[str]) -> None:
    _images(tmp_path / "train", 4)
    # Kaggle's form: train.csv beside train/, ids without the extension, a tags column
    (tmp_path / "train.csv").write_text("image_name,tags\n" + "".join(f"{i},{c}\n" for i, c in enumerate(cells)))
    ds = build_multilabel_dataset(tmp_path, split="train", val_fraction=0.0)
    assert ds.classes == ["cat", "dog", "haze"]
    assert _rows(ds) == {"0.png": ["cat", "dog"], "1.png": [], "2.png": ["haze"], "3.png": ["cat", "haze"]}


def test_separators_keep_spaces_inside_label_names(tmp_path: Path) -> None:
    _images(tmp_path, 2)
    (tmp_path / "metadata.csv").write_text('file_name,labels\n0.png,"traffic light|person"\n1.png,person\n')
    ds = build_multilabel_dataset(tmp_path, split="train", val_fraction=0.0)
    assert ds.classes == ["person", "traffic light"]


def test_two_separators_in_one_file_are_refused_with_file_and_line(tmp_path: Path) -> None:
    _images(tmp_path, 3)
    (tmp_path / "metadata.csv").write_text('file_name,labels\n0.png,"a|b"\n1.png,c\n2.png,"a;c"\n')
    with pytest.raises(DatasetError, match=r"metadata\.csv, line 4: the labels 'a;c' hold ';' but line 2 separates "
                                           r"labels with '\|'; expected one separator"):
        build_multilabel_dataset(tmp_path, split="train", val_fraction=0.0)


def test_one_0_1_column_per_label_in_header_order(tmp_path: Path) -> None:
    _images(tmp_path, 3)
    (tmp_path / "metadata.csv").write_text("file_name,zebra,cat,dog\n0.png,0,1,1\n1.png,0,0,0\n2.png,1,0,1\n")
    ds = build_multilabel_dataset(tmp_path, split="train", val_fraction=0.0)
    assert ds.classes == ["zebra", "cat", "dog"]  # the header's order, not sorted
    assert torch.equal(torch.stack([ds[i][1] for i in range(3)]),
                       torch.tensor([[0.0, 1, 1], [0, 0, 0], [1, 0, 1]]))


@pytest.mark.parametrize("value", ["2", "", "yes", "-1"])
def test_a_0_1_column_value_that_is_not_0_or_1_names_file_line_and_column(tmp_path: Path, value: str) -> None:
    _images(tmp_path, 2)
    (tmp_path / "metadata.csv").write_text(f"file_name,cat,dog\n0.png,1,0\n1.png,{value},1\n")
    with pytest.raises(DatasetError, match=rf"metadata\.csv, line 3, column 'cat': \"{value}\" is not 0 or 1"):
        build_multilabel_dataset(tmp_path, split="train", val_fraction=0.0)


def test_without_multi_label_lists_and_0_1_columns_are_refused_naming_the_flag(tmp_path: Path) -> None:
    _images(tmp_path, 2)
    _jsonl(tmp_path, [["cat"], ["dog", "cat"]])
    with pytest.raises(DatasetError, match=r"metadata\.jsonl, line 1: the label 'labels' is a JSON list.*"
                                           r"single-label.*--multi-label"):
        build_dataset(tmp_path, split="train", val_fraction=0.0)
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "metadata.csv").write_text("file_name,cat,dog\n0.png,1,0\n1.png,1,1\n")
    with pytest.raises(DatasetError, match=r"cannot tell which column holds the labels.*--multi-label"):
        build_dataset(tmp_path, split="train", val_fraction=0.0)


def test_class_folders_are_refused_with_multi_label(tmp_path: Path) -> None:
    _images(tmp_path / "cat", 2)
    _images(tmp_path / "dog", 2)
    with pytest.raises(DatasetError, match=r"--multi-label reads the labels of each image from a label file.*"
                                           r"class folders give one label per image"):
        build_multilabel_dataset(tmp_path, split="train", val_fraction=0.0)
    with pytest.raises(DatasetError, match=r"a digits source has one label per image"):
        build_multilabel_dataset("digits")


def test_null_labels_are_refused_in_training(tmp_path: Path) -> None:
    _images(tmp_path, 2)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "0.png", "labels": ["a"]}\n'
                                             '{"file_name": "1.png", "labels": null}\n')
    with pytest.raises(DatasetError, match=r"metadata\.jsonl, line 2: '1\.png' has no labels \(null"):
        build_multilabel_dataset(tmp_path, split="train", val_fraction=0.0)


def test_the_held_out_part_is_a_plain_seeded_split(tmp_path: Path) -> None:
    _images(tmp_path, 20)
    _jsonl(tmp_path, [["a"] if i % 2 else ["a", "b"] for i in range(20)])
    train = build_multilabel_dataset(tmp_path, split="train", val_fraction=0.25, seed=3)
    val = build_multilabel_dataset(tmp_path, split="val", val_fraction=0.25, seed=3)
    test = build_multilabel_dataset(tmp_path, split="test", val_fraction=0.25, seed=3)  # no test/: the val part
    assert len(val) == 5 and len(train) == 15 and not set(val.paths) & set(train.paths)
    assert test.paths == val.paths and val.classes == train.classes == ["a", "b"]
    every = sorted(str(tmp_path / f"{i}.png") for i in range(20))  # the images in the data set's order
    kept, held = random_split(20, 0.25, 3, keys=[Path(p).name for p in every])  # stable: by file name
    assert val.paths == [every[i] for i in held] and train.paths == [every[i] for i in kept]
    other = build_multilabel_dataset(tmp_path, split="val", val_fraction=0.25, seed=4)
    assert other.paths != val.paths


def test_a_val_folder_uses_the_training_labels(tmp_path: Path) -> None:
    _images(tmp_path / "train", 3)
    _jsonl(tmp_path / "train", [["b", "c"], ["a"], []])
    _images(tmp_path / "val", 2)
    _jsonl(tmp_path / "val", [["c"], []])
    val = build_multilabel_dataset(tmp_path, split="val")
    assert val.classes == ["a", "b", "c"] and _rows(val) == {"0.png": ["c"], "1.png": []}
    _jsonl(tmp_path / "val", [["c"], ["zebra"]])
    with pytest.raises(DatasetError, match=r"labels \['zebra'\] do not exist in the training split"):
        build_multilabel_dataset(tmp_path, split="val")


def test_a_wrapper_folder_names_the_folder_to_give(tmp_path: Path) -> None:
    """As for class folders: a folder whose only folder holds the data set (as zips add) is named, not read as
    'no label file'."""
    inner = tmp_path / "dataset"
    _images(inner / "train", 4)
    _jsonl(inner / "train", [["a"], ["b"], [], ["a", "b"]])
    (inner / "val").mkdir()
    with pytest.raises(DatasetError, match=rf"give --data {inner}"):
        build_multilabel_dataset(tmp_path, split="train")
    assert len(build_multilabel_dataset(inner, split="train")) == 4
