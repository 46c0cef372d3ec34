"""Image-folder layouts users bring from timm, Hugging Face and Kaggle: split folders without class folders,
Hugging Face's split names, unlabelled held-out folders, merged sub-folders, and label files (HF imagefolder's
metadata.csv / metadata.jsonl, Kaggle's train.csv)."""

from __future__ import annotations

import json
import logging
import re
import unicodedata

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.cli.main import main
from vitlab.data import build_dataset
from vitlab.data.errors import DatasetError
from vitlab.data.folder import SPLIT_DIR_NAMES

torch.set_num_threads(1)

TINY = ["--img-size", "16", "--set", "model_overrides.depth=1", "--steps", "1", "--threads", "1", "--no-progress"]


def _png(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)


def class_folders(root, classes=("cat", "dog"), n=4):
    for c in classes:
        for i in range(n):
            _png(root / c / f"{i}.png", i)
    return root


def flat(root, n=4, prefix=""):
    for i in range(n):
        _png(root / f"{prefix}{i}.png", i)
    return root


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# ------------------------------------------------------- 2: split folders that hold their images without labels
@pytest.mark.parametrize("held_out", ["test", "validation"])
def test_split_folders_of_unlabelled_images_are_not_classes(tmp_path, held_out):
    flat(tmp_path / "train", 6)
    flat(tmp_path / held_out, 3)
    with pytest.raises(DatasetError) as e:  # was: a 2-class set "test" vs "train", test images trained on
        build_dataset(tmp_path, split="train", val_fraction=0)
    msg = str(e.value)
    assert f"{tmp_path / 'train'}" in msg and "no class folders" in msg
    assert "metadata.csv" in msg and "file_name,label" in msg and "train.csv" in msg
    class_folders(tmp_path, ("bus", "car"), 2)  # beside other class folders, train/ is a class (README)
    assert build_dataset(tmp_path, split="train", val_fraction=0).classes == sorted(["bus", "car", held_out, "train"])


# ----------------------------------------------------------------------- 4: Hugging Face's split folder names
def test_hugging_face_split_names_are_recognised(tmp_path):
    assert set(SPLIT_DIR_NAMES["val"]) == {"validation", "valid", "dev", "val"}  # datasets' SPLIT_KEYWORDS
    assert set(SPLIT_DIR_NAMES["test"]) == {"test", "testing", "eval", "evaluation"}
    class_folders(tmp_path / "a" / "train", n=5)
    class_folders(tmp_path / "a" / "dev", n=2)
    val = build_dataset(tmp_path / "a", split="val", val_fraction=0.1)
    assert len(val) == 4 and all("/dev/" in p for p in val.paths)  # was: dev/ dropped, val carved from train
    assert len(build_dataset(tmp_path / "a", split="train", val_fraction=0.1)) == 10
    class_folders(tmp_path / "b" / "train", n=5)
    class_folders(tmp_path / "b" / "Evaluation", n=3)
    test = build_dataset(tmp_path / "b", split="test")
    assert len(test) == 6 and all("/Evaluation/" in p for p in test.paths)


def test_a_folder_beside_train_that_is_no_split_is_named_in_a_warning(tmp_path, caplog):
    class_folders(tmp_path / "train", n=3)
    class_folders(tmp_path / "holdout", n=2)  # images one level down: not a class of train/'s level
    with caplog.at_level(logging.WARNING, logger="vitlab"):
        assert len(build_dataset(tmp_path, split="train", val_fraction=0)) == 6
    assert any("holdout/" in w and "not read" in w for w in warnings_of(caplog))


# ------------------------------------------------------------ 5: an unlabelled held-out folder (Kaggle's test/)
def test_an_unlabelled_test_folder_is_left_out_with_a_warning(tmp_path, caplog):
    class_folders(tmp_path / "train", n=10)
    flat(tmp_path / "test", 6)
    with caplog.at_level(logging.WARNING, logger="vitlab"):
        sizes = [len(build_dataset(tmp_path, split=s)) for s in ("train", "val", "test")]
    assert sizes == [18, 2, 2]  # was: refused ("test: no class folders"); test is the held-out part of train/
    said = [w for w in warnings_of(caplog) if str(tmp_path / "test") in w]
    assert len(said) == 1 and "unlabelled" in said[0] and "val_fraction" in said[0]
    from vitlab.data.build import check_labelled_split

    with pytest.raises(DatasetError, match=r"test: the test folder holds images without labels"):
        check_labelled_split(str(tmp_path), "test")  # what `vitlab eval --split test` must say
    check_labelled_split(str(tmp_path), "val")


def test_train_runs_on_class_folders_beside_an_unlabelled_test_folder(tmp_path):
    class_folders(tmp_path / "data" / "train", n=4)
    flat(tmp_path / "data" / "test", 3)
    assert main(["train", "--data", str(tmp_path / "data"), "--output", str(tmp_path / "run"), *TINY]) == 0
    assert json.loads((tmp_path / "run" / "results.json").read_text())["test"]["samples"] == 2


# ---------------------------------------------------------------- 6: what lies below a class folder
def test_a_wrapper_folder_is_named_as_the_data_to_give(tmp_path):
    for split, n in (("train", 4), ("val", 2)):
        class_folders(tmp_path / "wrap" / "mydata" / split, n=n)
    with pytest.raises(DatasetError, match=f"give --data {tmp_path / 'wrap' / 'mydata'}$"):
        build_dataset(tmp_path / "wrap")
    # pre-training reads every image below, as before
    assert len(build_dataset(tmp_path / "wrap", split="train", val_fraction=0, unlabelled=True)) == 12


def test_class_folders_that_merge_sub_folders_are_named_once(tmp_path, caplog):
    class_folders(tmp_path / "animals", ("cat", "dog"), 2)
    class_folders(tmp_path / "vehicles", ("car",), 2)
    with caplog.at_level(logging.WARNING, logger="vitlab"):
        ds = build_dataset(tmp_path, split="train", val_fraction=0)
        build_dataset(tmp_path, split="val")
    assert ds.classes == ["animals", "vehicles"]  # the documented merge stays (torchvision's ImageFolder)
    said = [w for w in warnings_of(caplog) if "animals (cat, dog)" in w]
    assert len(said) == 1 and "leaf folder" in said[0] and "vehicles" not in said[0]


def test_class_folders_named_like_splits_warn(tmp_path, caplog):
    for name in ("seg_pred", "seg_test", "seg_train"):
        class_folders(tmp_path / name, (name,), 2)
    with caplog.at_level(logging.WARNING, logger="vitlab"):
        build_dataset(tmp_path, split="train", val_fraction=0)
    assert any("seg_pred, seg_test, seg_train are named like data splits" in w for w in warnings_of(caplog))
    from vitlab.data.folder import looks_like_split

    assert looks_like_split("val2017") and not looks_like_split("protester") and not looks_like_split("cat")


# ------------------------------------------------------------------------------------------- B: label files
def _metadata(folder, labels):
    flat(folder, len(labels))
    (folder / "metadata.csv").write_text("file_name,label\n" + "".join(f"{i}.png,{lab}\n"
                                                                       for i, lab in enumerate(labels)))


def test_hugging_face_metadata_csv_labels_split_folders(tmp_path):
    _metadata(tmp_path / "train", ["dog", "cat"] * 4)
    _metadata(tmp_path / "validation", ["cat", "dog", "cat"])
    train = build_dataset(tmp_path, split="train")
    assert train.classes == ["cat", "dog"] and train.class_counts() == [4, 4]
    assert [p.rsplit("/", 1)[1] for p, t in zip(train.paths, train.targets) if t == 0] == \
        ["1.png", "3.png", "5.png", "7.png"]
    val = build_dataset(tmp_path, split="val")
    assert [p.rsplit("/", 1)[1] for p in val.paths] == ["0.png", "2.png", "1.png"] and val.targets == [0, 0, 1]


def test_a_kaggle_csv_beside_train_labels_it_and_training_keeps_its_classes(tmp_path):
    data = tmp_path / "data"
    flat(data / "train", 8, prefix="img")
    rows = "".join(f"img{i},{['zebra', 'ant'][i % 2]}\n" for i in range(8))  # ids: file stems
    (data / "train.csv").write_text("id,category\n" + rows)
    flat(data / "test", 3, prefix="t")  # unlabelled: left out
    assert main(["train", "--data", str(data), "--output", str(tmp_path / "run"), *TINY]) == 0
    import vitlab

    assert vitlab.load_model(tmp_path / "run" / "model.safetensors").class_names == ["ant", "zebra"]


def test_metadata_jsonl_at_the_root_labels_its_images(tmp_path):
    flat(tmp_path, 6)
    lines = [json.dumps({"file_name": f"{i}.png", "digit": i % 3}) for i in range(6)]  # the only other column
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    ds = build_dataset(tmp_path, split="train", val_fraction=0)
    assert ds.classes == ["0", "1", "2"] and ds.class_counts() == [2, 2, 2]


def test_labels_are_class_names_in_nfc_sorted(tmp_path):
    _metadata(tmp_path / "train", ["zoo", unicodedata.normalize("NFD", "café"), "café", "bee"])
    assert build_dataset(tmp_path, split="train", val_fraction=0).classes == ["bee", "café", "zoo"]


@pytest.mark.parametrize("content, pattern", [
    ("file_name,label\n0.png,a\n9.png,b\n", r"metadata.csv, line 3: no image file '9.png' in .*train"),
    ("file_name,label\n0.png,a\n1.png,\n", r"metadata.csv, line 3: '1.png' has an empty label"),
    ("file_name,kind,colour\n0.png,a,b\n", r"cannot tell which column holds the labels \(columns: \['file_name', "
                                           r"'kind', 'colour'\]\); name it one of label, labels, class"),
])
def test_label_file_errors_name_the_file_and_line(tmp_path, content, pattern):
    flat(tmp_path / "train", 2)
    (tmp_path / "train" / "metadata.csv").write_text(content)
    with pytest.raises(DatasetError, match=pattern):
        build_dataset(tmp_path, split="train", val_fraction=0)


def test_images_a_label_file_does_not_list_are_counted_in_a_warning(tmp_path, caplog):
    flat(tmp_path / "train", 5)
    (tmp_path / "train.csv").write_text("image,label\n0.png,a\n1.png,b\n2.png,a\n")
    with caplog.at_level(logging.WARNING, logger="vitlab"):
        assert len(build_dataset(tmp_path, split="train", val_fraction=0)) == 3
    assert any("2 image(s) not listed in train.csv are not used" in w for w in warnings_of(caplog))


def test_a_held_out_label_the_training_split_lacks_is_an_error(tmp_path):
    _metadata(tmp_path / "train", ["a", "b", "a", "b"])
    _metadata(tmp_path / "val", ["a", "c"])
    with pytest.raises(DatasetError, match=r"labels \['c'\] do not exist in the training split"):
        build_dataset(tmp_path, split="val")


# ------------------------------------------------- C: label files with sub-folders, unlabelled rows, CSV forms
def _labels_by_path(ds, root):
    return {str(p)[len(str(root)) + 1:]: ds.classes[t] for p, t in zip(ds.paths, ds.targets)}


@pytest.mark.parametrize("parts", [("part1", "part2"), ("images",)])
def test_metadata_file_names_may_point_into_sub_folders(tmp_path, parts):
    rows = []
    for i in range(6):  # labels cross the sub-folders: sub-folder names are no classes
        rel = f"{parts[i * len(parts) // 6]}/{i:03d}.png"
        _png(tmp_path / rel, i)
        rows.append(f"{rel},{'dark' if i % 2 == 0 else 'bright'}\n")
    (tmp_path / "metadata.csv").write_text("file_name,label\n" + "".join(rows))
    ds = build_dataset(tmp_path, split="train", val_fraction=0)  # was: classes part1/part2, or only 'images'
    assert ds.classes == ["bright", "dark"]
    assert _labels_by_path(ds, tmp_path) == {r.split(",")[0]: r.strip().split(",")[1] for r in rows}


@pytest.mark.parametrize("given", ["../outside.png", "/etc/x.png", "part1/../../x.png"])
def test_metadata_file_names_cannot_leave_the_folder(tmp_path, given):
    flat(tmp_path / "data" / "part1", 2)
    _png(tmp_path / "outside.png")
    (tmp_path / "data" / "metadata.csv").write_text(f"file_name,label\npart1/0.png,a\n{given},b\n")
    with pytest.raises(DatasetError, match=rf"metadata.csv, line 3: '{re.escape(given)}' is not inside"):
        build_dataset(tmp_path / "data", split="train", val_fraction=0)


def test_a_kaggle_csv_finds_ids_in_a_wrapper_folder(tmp_path):
    for i in range(6):  # Kaggle zips unpack as train/train/*.jpg beside train.csv
        _png(tmp_path / "train" / "train" / f"{i:03d}.png", i)
    (tmp_path / "train.csv").write_text("id,label\n" + "".join(f"{i:03d},{'ab'[i % 2]}\n" for i in range(6)))
    ds = build_dataset(tmp_path, split="train", val_fraction=0)
    assert ds.classes == ["a", "b"] and ds.class_counts() == [3, 3]  # was: one class "train"
    assert _labels_by_path(ds, tmp_path)["train/train/001.png"] == "b"
    _png(tmp_path / "train" / "extra" / "003.png")  # the id 003 now names two files
    with pytest.raises(DatasetError, match=r"train.csv, line 5: '003' names several files below .*train "
                                           r"\(extra/003.png, train/003.png\)"):
        build_dataset(tmp_path, split="train", val_fraction=0)


def test_label_files_that_are_not_used_are_named_in_a_warning(tmp_path, caplog):
    class_folders(tmp_path / "a", ("cat", "dog"), 2)  # captions, no labels: the class folders label the images
    (tmp_path / "a" / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{c}/{i}.png", "text": "x"})
                                                           + "\n" for c in ("cat", "dog") for i in range(2)))
    _metadata(tmp_path / "b" / "train", ["x", "y"] * 2)  # a root metadata.csv beside split folders
    (tmp_path / "b" / "metadata.csv").write_text("file_name,label\ntrain/0.png,x\n")
    with caplog.at_level(logging.WARNING, logger="vitlab"):
        assert build_dataset(tmp_path / "a", split="train", val_fraction=0).classes == ["cat", "dog"]
        assert build_dataset(tmp_path / "b", split="train", val_fraction=0).classes == ["x", "y"]
    said = warnings_of(caplog)
    assert any(f"{tmp_path / 'a' / 'metadata.jsonl'}: not used (its labels would come from 'text'" in w and
               "class folders" in w for w in said)
    assert any(f"{tmp_path / 'b' / 'metadata.csv'}: not used: the split folders" in w for w in said)


@pytest.mark.parametrize("name, content, why", [
    ("test.csv", "id\n100\n101\n102\n", r"no label column \(columns: \['id'\]\)"),
    ("test/metadata.jsonl", "".join(json.dumps({"file_name": f"{i}.png", "label": -1}) + "\n" for i in range(100, 103)),
     "every label is empty, null or -1"),
    ("test/metadata.jsonl", "".join(json.dumps({"file_name": f"{i}.png", "label": None}) + "\n"
                                    for i in range(100, 103)), "every label is empty, null or -1"),
    ("test/metadata.jsonl", "".join(json.dumps({"file_name": f"{i}.png"}) + "\n" for i in range(100, 103)),
     r"no label key \(keys: \['file_name'\]\)"),
], ids=["kaggle-ids-only", "hf-minus-1", "hf-null", "hf-file-name-only"])
def test_a_held_out_label_file_without_labels_leaves_the_folder_out(tmp_path, caplog, name, content, why):
    _metadata(tmp_path / "train", ["a", "b"] * 5)
    flat(tmp_path / "test", 3, prefix="1")  # 10.png ... 12.png
    for i in range(3):
        (tmp_path / "test" / f"1{i}.png").rename(tmp_path / "test" / f"{100 + i}.png")
    (tmp_path / name).write_text(content)
    with caplog.at_level(logging.WARNING, logger="vitlab"):  # was: an error, training refused
        test = build_dataset(tmp_path, split="test")
    assert len(test) == 2 and all("/train/" in p for p in test.paths)
    said = [w for w in warnings_of(caplog) if "unlabelled: left out" in w]
    assert len(said) == 1 and re.search(why, said[0]) and str(tmp_path / name) in said[0]
    from vitlab.data.build import check_labelled_split

    with pytest.raises(DatasetError, match=f"test folder holds images without labels .*{why}"):
        check_labelled_split(str(tmp_path), "test")
    # the same file for the training split stays an error, naming it and why
    (tmp_path / "test").rename(tmp_path / "train2")
    (tmp_path / "train").rename(tmp_path / "valid")
    (tmp_path / "train2").rename(tmp_path / "train")
    if name == "test.csv":
        (tmp_path / "test.csv").rename(tmp_path / "train.csv")
    with pytest.raises(DatasetError, match=f"gives no labels \\({why}\\), so the images of .*train cannot be "
                                           f"trained on"):
        build_dataset(tmp_path, split="train")


def test_a_held_out_label_file_that_labels_some_images_only_is_an_error(tmp_path):
    _metadata(tmp_path / "train", ["a", "b"] * 2)
    flat(tmp_path / "val", 3)
    (tmp_path / "val" / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": f"{i}.png", "label": lab}) + "\n" for i, lab in enumerate(["a", None, "b"])))
    with pytest.raises(DatasetError, match=r"metadata.jsonl: line 2 \('1.png'\) has no label but line 1 "
                                           r"\('0.png'\) has one"):
        build_dataset(tmp_path, split="val")


def test_metadata_jsonl_takes_its_label_key_over_all_lines(tmp_path):
    flat(tmp_path, 4)
    lines = [{"file_name": f"{i}.png", "camera": "AB"[i // 2]} | ({"label": "xy"[i % 2]} if i else {})
             for i in range(4)]  # the first line lacks "label": "camera" must not label the images
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    with pytest.raises(DatasetError, match=r"metadata.jsonl, line 1: '0.png' has no label"):
        build_dataset(tmp_path, split="train", val_fraction=0)
    lines = [{"file_name": f"{i}.png", ("camera" if i < 2 else "digit"): i} for i in range(4)]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    with pytest.raises(DatasetError, match=r"cannot tell which key holds the labels .*line 1 has the keys "
                                           r"\['file_name', 'camera'\], line 3 \['file_name', 'digit'\]"):
        build_dataset(tmp_path, split="train", val_fraction=0)


def test_a_header_less_kaggle_csv_keeps_its_first_row(tmp_path, caplog):
    flat(tmp_path / "train", 4, prefix="img")
    (tmp_path / "train.csv").write_text("img0,ant\nimg1,bee\nimg2,ant\nimg3,bee\n")
    with caplog.at_level(logging.INFO, logger="vitlab"):
        ds = build_dataset(tmp_path, split="train", val_fraction=0)
    assert ds.class_counts() == [2, 2]  # was: 3 images, the first line read as the header
    assert any("train.csv: read without a header" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("sep", [";", "\t"])
def test_semicolon_and_tab_separated_label_files_are_read(tmp_path, sep):
    flat(tmp_path, 4)
    (tmp_path / "metadata.csv").write_text(f"file_name{sep}label\n" + "".join(f"{i}.png{sep}{'ab'[i % 2]}\n"
                                                                              for i in range(4)))
    ds = build_dataset(tmp_path, split="train", val_fraction=0)  # was: "no 'file_name' column"
    assert ds.classes == ["a", "b"] and ds.class_counts() == [2, 2]


def test_an_empty_held_out_split_says_how_to_get_one(tmp_path):
    """val_fraction 0 (e.g. the digits recipe's) on a folder without val/: the error says why it is empty and what
    to give; the multi-label reader says the same."""
    from vitlab.data.multilabel import build_multilabel_dataset

    class_folders(tmp_path / "cls")
    with pytest.raises(DatasetError, match=r"split 'test' is empty \(val_fraction 0 holds none .* no test/ folder.*"
                                           r"--set val_fraction=0.1"):
        build_dataset(tmp_path / "cls", split="test", val_fraction=0.0)
    tagged = tmp_path / "tagged"
    flat(tagged)
    (tagged / "metadata.jsonl").write_text("\n".join(
        json.dumps({"file_name": p.name, "labels": ["a"]}) for p in sorted(tagged.glob("*.png"))) + "\n")
    with pytest.raises(DatasetError, match=r"split 'test' is empty \(.*--set val_fraction=0.1"):
        build_multilabel_dataset(tagged, split="test", val_fraction=0.0)
