"""Datasets and decoding: IDX, CIFAR batches, image folders, digits, splits, bad inputs, loaders."""

from __future__ import annotations

import gzip
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.data import (
    BadImageError,
    DatasetError,
    build_dataset,
    create_loader,
    load_image,
    read_idx,
    stratified_split,
    to_channels,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if not DATA.is_dir():
    DATA = Path("/work/shared/data")
MNIST = DATA / "mnist"
CIFAR_TAR = DATA / "cifar10-jpg-train.tar"
CIFAR_META = DATA / "cifar10-batches.meta"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

needs_mnist = pytest.mark.skipif(not MNIST.is_dir(), reason="shared MNIST data not present")
needs_cifar = pytest.mark.skipif(not CIFAR_TAR.is_file(), reason="shared CIFAR-10 tar not present")


# ------------------------------------------------------------------------------------------------ IDX


def write_idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    """An IDX file written from the format description (magic 0 0 type ndim, big-endian dims, data)."""
    code = {np.dtype("u1"): 0x08, np.dtype(">i4"): 0x0C}[arr.dtype]
    header = bytes([0, 0, code, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    payload = header + arr.tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)


@needs_mnist
def test_mnist_real_counts_and_labels():
    labels = read_idx(MNIST / "train-labels-idx1-ubyte.gz")
    assert labels.shape == (60000,) and labels[0] == 5
    hist = np.bincount(labels, minlength=10)
    assert hist.sum() == 60000 and hist.min() > 5000 and hist.max() < 7000
    full = build_dataset(MNIST, val_fraction=0.0)
    assert len(full) == 60000 and full.targets[0] == 5
    assert full.in_chans == 1 and full.native_size == (28, 28) and full.classes == [str(i) for i in range(10)]
    x, y = full[0]
    assert x.dtype == torch.uint8 and x.shape == (1, 28, 28) and y == 5 and int(x.max()) == 255
    test = build_dataset(f"mnist:{MNIST}", split="test")
    assert len(test) == 10000 and np.bincount(test.targets, minlength=10).min() > 800
    train, val = build_dataset(MNIST, split="train", seed=3), build_dataset(MNIST, split="val", seed=3)
    assert len(train) + len(val) == 60000 and abs(len(val) - 6000) <= 10
    assert not set(train.indices) & set(val.indices)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dot_name", [False, True])
def test_idx_written_files(tmp_path, gz, dot_name):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(30, 5, 7), dtype=np.uint8)
    labels = np.repeat(np.arange(3, dtype=np.uint8), 10)
    sep = "." if dot_name else "-"
    suffix = ".gz" if gz else ""
    for prefix in ("train", "t10k"):
        write_idx(tmp_path / f"{prefix}-images{sep}idx3-ubyte{suffix}", imgs, gz)
        write_idx(tmp_path / f"{prefix}-labels{sep}idx1-ubyte{suffix}", labels, gz)
    np.testing.assert_array_equal(read_idx(tmp_path / f"train-images{sep}idx3-ubyte{suffix}"), imgs)
    ds = build_dataset(tmp_path, split="test")  # detected as MNIST by content
    assert len(ds) == 30 and ds.classes == ["0", "1", "2"] and ds.native_size == (5, 7)
    assert torch.equal(ds[4][0], torch.from_numpy(imgs[4])[None]) and ds[15][1] == 1
    val = build_dataset(tmp_path, split="val", val_fraction=0.2)
    assert sorted(val.targets) == [0, 0, 1, 1, 2, 2]  # stratified: 2 of 10 per class


def test_idx_int32_and_truncated(tmp_path):
    arr = np.arange(12, dtype=">i4").reshape(3, 4)
    write_idx(tmp_path / "a.idx", arr, gz=False)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.idx"), arr)
    raw = (tmp_path / "a.idx").read_bytes()
    (tmp_path / "b.idx").write_bytes(raw[:-3])
    with pytest.raises(DatasetError, match=r"b\.idx.*size mismatch"):
        read_idx(tmp_path / "b.idx")
    (tmp_path / "c.idx").write_bytes(b"hello world")
    with pytest.raises(DatasetError, match=r"c\.idx.*not an IDX"):
        read_idx(tmp_path / "c.idx")


# ---------------------------------------------------------------------------------------------- CIFAR


def write_cifar10(root: Path, n_per_batch: int = 6, protocol: int = 2) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    batches = {}
    for name in ("data_batch_1", "data_batch_2", "test_batch"):
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 3, size=n_per_batch)]
        with open(root / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data}, f, protocol=protocol)
        batches[name] = (data, labels)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"cat", b"dog", b"emu"], b"num_vis": 3072}, f, protocol=protocol)
    return batches


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_batches(tmp_path, protocol):
    batches = write_cifar10(tmp_path / "cifar-10-batches-py", protocol=protocol)
    train = build_dataset(tmp_path, val_fraction=0.0)  # descends into cifar-10-batches-py
    assert len(train) == 12 and train.classes == ["cat", "dog", "emu"] and train.in_chans == 3
    assert train.native_size == (32, 32)
    data, labels = batches["data_batch_2"]
    x, y = train[6 + 1]
    # Row layout is 1024 red, 1024 green, 1024 blue values, each a row-major 32x32 plane.
    assert y == labels[1]
    assert torch.equal(x[1], torch.from_numpy(data[1, 1024:2048].reshape(32, 32)))
    assert x[0, 0, 5] == data[1, 5] and x[2, 31, 31] == data[1, 3071]
    test = build_dataset(f"cifar:{tmp_path / 'cifar-10-batches-py'}", split="test")
    assert test.targets == batches["test_batch"][1]


def test_cifar100_layout(tmp_path):
    rng = np.random.default_rng(2)
    data = rng.integers(0, 256, size=(4, 3072), dtype=np.uint8)
    for name in ("train", "test"):
        with open(tmp_path / name, "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": [0, 1, 2, 1], b"coarse_labels": [0, 0, 1, 1]}, f)
    with open(tmp_path / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [b"apple", b"bee", b"cup"], b"coarse_label_names": [b"a", b"b"]}, f)
    ds = build_dataset(f"cifar:{tmp_path}", split="test")
    assert ds.classes == ["apple", "bee", "cup"] and ds.targets == [0, 1, 2, 1]


@pytest.mark.skipif(not CIFAR_META.is_file(), reason="shared CIFAR meta not present")
def test_real_cifar_meta_loads_restricted():
    from vitlab.data.sources import load_cifar_pickle

    meta = load_cifar_pickle(CIFAR_META)
    assert [n.decode() for n in meta["label_names"]] == CIFAR10_CLASSES


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_cifar_pickle_refuses_arbitrary_globals(tmp_path):
    root = tmp_path / "c"
    write_cifar10(root)
    with open(root / "data_batch_1", "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": [0]}, f)
    with pytest.raises(DatasetError, match=r"data_batch_1.*refused.*(posix|os)\.system"):
        build_dataset(f"cifar:{root}")


# ------------------------------------------------------------------------------- decoding & folders


def make_images(d: Path) -> dict[str, np.ndarray]:
    """One file per awkward mode; returns the expected uint8 (H, W[, 3]) pixels for each."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    exp = {}
    rgb = rng.integers(0, 256, size=(6, 9, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(d / "rgb.png")
    exp["rgb.png"] = rgb
    rgba = np.concatenate([rgb, np.full((6, 9, 1), 255, np.uint8)], axis=2)
    rgba[0, 0, 3] = 0  # fully transparent pixel -> white
    rgba[1, 1, 3] = 128
    Image.fromarray(rgba, "RGBA").save(d / "rgba.png")
    e = rgb.copy()
    e[0, 0] = 255
    e[1, 1] = np.rint((rgb[1, 1].astype(float) * 128 + 255 * 127) / 255)
    exp["rgba.png"] = e
    gray = rng.integers(0, 256, size=(6, 9), dtype=np.uint8)
    Image.fromarray(gray, "L").save(d / "gray.png")
    exp["gray.png"] = gray
    g16 = (gray.astype(np.uint16) * 257)
    Image.fromarray(g16).save(d / "gray16.png")  # 16-bit PNG
    exp["gray16.png"] = gray
    pal = Image.fromarray(rgb).quantize(colors=8)
    pal_rgb = np.asarray(pal.convert("RGB"))
    pal.info["transparency"] = int(np.asarray(pal)[2, 3])
    pal.save(d / "pal.png", transparency=pal.info["transparency"])
    e = pal_rgb.copy()
    e[np.asarray(pal) == pal.info["transparency"]] = 255
    exp["pal.png"] = e
    cmyk = Image.fromarray(rgb).convert("CMYK")
    cmyk.save(d / "cmyk.tif")
    exp["cmyk.tif"] = np.asarray(cmyk.convert("RGB"))
    la = Image.fromarray(np.stack([gray, np.full_like(gray, 255)], axis=2), "LA")
    la.save(d / "la.png")
    exp["la.png"] = gray
    return exp


def test_load_image_modes(tmp_path):
    exp = make_images(tmp_path)
    for name, want in exp.items():
        x = load_image(tmp_path / name)
        assert x.dtype == torch.uint8
        got = x.permute(1, 2, 0).numpy()
        if want.ndim == 2:
            assert x.shape[0] == 1, name
            got = got[..., 0]
        else:
            assert x.shape[0] == 3, name
        diff = np.abs(got.astype(int) - want.astype(int)).max()
        assert diff <= 1, f"{name}: max diff {diff}"
    # JPEG: compare with Pillow's own decode (lossy, so no pixel expectation).
    Image.fromarray(exp["rgb.png"]).save(tmp_path / "a.jpg", quality=90)
    assert torch.equal(load_image(tmp_path / "a.jpg"), torch.from_numpy(np.array(Image.open(tmp_path / "a.jpg"))).permute(2, 0, 1))
    Image.fromarray(exp["rgb.png"]).convert("CMYK").save(tmp_path / "cmyk.jpg")
    assert load_image(tmp_path / "cmyk.jpg").shape == (3, 6, 9)


def test_to_channels_luma_matches_pillow():
    rgb = np.random.default_rng(3).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    x = torch.from_numpy(rgb).permute(2, 0, 1)
    ref = np.asarray(Image.fromarray(rgb).convert("L")).astype(int)
    assert np.abs(to_channels(x, 1)[0].numpy().astype(int) - ref).max() <= 1
    g = to_channels(x, 1)
    assert torch.equal(to_channels(g, 3), g.repeat(3, 1, 1))


def write_folder(root: Path, classes=("a", "b", "c"), n=5, mode="RGB") -> None:
    rng = np.random.default_rng(4)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = rng.integers(0, 256, size=(8 + i, 10, 3), dtype=np.uint8)
            Image.fromarray(arr).convert(mode).save(root / c / f"{i:03d}.png")


def test_image_folder_flat_split(tmp_path):
    write_folder(tmp_path)
    (tmp_path / "a" / "notes.txt").write_text("not an image, ignored by extension")
    train = build_dataset(tmp_path, split="train", val_fraction=0.4, seed=1)
    val = build_dataset(f"folder:{tmp_path}", split="val", val_fraction=0.4, seed=1)
    assert train.classes == ["a", "b", "c"] and train.in_chans == 3 and train.native_size is None
    assert len(train) == 9 and len(val) == 6 and sorted(val.targets) == [0, 0, 1, 1, 2, 2]
    assert not set(train.paths) & set(val.paths)
    again = build_dataset(tmp_path, split="val", val_fraction=0.4, seed=1)
    other = [build_dataset(tmp_path, split="val", val_fraction=0.4, seed=s).paths for s in range(2, 6)]
    assert again.paths == val.paths and any(o != val.paths for o in other)
    x, y = train[0]
    assert x.shape[0] == 3 and x.dtype == torch.uint8 and y == 0


def test_image_folder_train_val_layout_and_gray(tmp_path):
    write_folder(tmp_path / "train", mode="L")
    write_folder(tmp_path / "val", classes=("a", "c"), n=2, mode="L")
    train = build_dataset(tmp_path, split="train")
    val = build_dataset(tmp_path, split="val")
    assert len(train) == 15 and train.in_chans == 1 and train[0][0].shape[0] == 1
    assert val.classes == ["a", "b", "c"] and val.targets == [0, 0, 2, 2]
    test = build_dataset(tmp_path, split="test")  # no test/: falls back to val/
    assert test.paths == val.paths


def test_image_folder_mixed_modes_become_rgb(tmp_path):
    exp = make_images(tmp_path / "cls")
    ds = build_dataset(tmp_path, split="train", val_fraction=0.0)
    assert ds.in_chans == 3 and len(ds) == len(exp)
    for i in range(len(ds)):
        assert ds[i][0].shape[0] == 3


@needs_cifar
def test_cifar_tar_members_quick(tmp_path):
    first: dict[str, tarfile.TarInfo] = {}
    with tarfile.open(CIFAR_TAR) as tar:
        for m in tar:
            parts = m.name.split("/")
            if m.isfile() and len(parts) == 3 and parts[1] not in first:
                first[parts[1]] = m
        tar.extractall(tmp_path, members=list(first.values()), filter="data")
    assert sorted(first) == CIFAR10_CLASSES
    ds = build_dataset(tmp_path, split="train", val_fraction=0.0)
    assert ds.classes == CIFAR10_CLASSES and ds.in_chans == 3 and len(ds) == 10
    x, y = ds[3]
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8 and y == 3 and x.float().std() > 5


@needs_cifar
@pytest.mark.slow
def test_cifar_tar_full(tmp_path):
    import time

    with tarfile.open(CIFAR_TAR) as tar:
        tar.extractall(tmp_path, filter="data")
    t0 = time.perf_counter()
    train = build_dataset(tmp_path, split="train", val_fraction=0.1, seed=0)
    val = build_dataset(tmp_path, split="val", val_fraction=0.1, seed=0)
    assert time.perf_counter() - t0 < 20  # listing only, no decoding
    assert len(train) == 45000 and len(val) == 5000 and train.classes == CIFAR10_CLASSES
    assert np.bincount(val.targets).tolist() == [500] * 10
    assert not set(train.paths) & set(val.paths)
    loader = create_loader(val, batch_size=500, shuffle=False)
    n = sum(len(y) for _, y in loader)
    assert n == 5000


# --------------------------------------------------------------------------------------- digits, splits


def test_digits_splits_disjoint_and_deterministic():
    parts = {s: build_dataset("digits", split=s, seed=7) for s in ("train", "val", "test")}
    idx = {s: set(d.indices) for s, d in parts.items()}
    assert sum(len(v) for v in idx.values()) == 1797
    assert idx["train"] | idx["val"] | idx["test"] == set(range(1797))
    assert not (idx["train"] & idx["val"] or idx["train"] & idx["test"] or idx["val"] & idx["test"])
    d = parts["train"]
    assert d.in_chans == 1 and d.native_size == (8, 8) and d.classes == [str(i) for i in range(10)]
    x, _ = d[0]
    assert x.dtype == torch.uint8 and x.max() <= 255 and x.max() >= 200
    assert build_dataset("digits", split="val", seed=7).indices == parts["val"].indices
    assert build_dataset("digits", split="val", seed=8).indices != parts["val"].indices
    assert build_dataset("digits", split="test", seed=8).indices == parts["test"].indices  # test split fixed


def test_stratified_split_small_classes():
    targets = [0] * 10 + [1] * 2 + [2]
    kept, held = stratified_split(targets, 0.1, seed=0)
    assert sorted(kept + held) == list(range(13))
    assert [targets[i] for i in held] == [0, 1]  # each class with >= 2 samples loses at least one, never all


# ------------------------------------------------------------------------------------------ bad inputs


def test_bad_images_name_the_file(tmp_path):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 90).save(tmp_path / "ok.jpg", quality=95)
    raw = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "text.png").write_text("hello, I am not a PNG")
    with pytest.raises(BadImageError, match=r"(?i)trunc\.jpg.*truncated"):
        load_image(tmp_path / "trunc.jpg")
    with pytest.raises(BadImageError, match=r"text\.png.*not an image"):
        load_image(tmp_path / "text.png")
    with pytest.raises(BadImageError, match=r"missing\.png.*not found"):
        load_image(tmp_path / "missing.png")


def test_empty_class_folder_and_unknown_source(tmp_path):
    write_folder(tmp_path / "root")
    (tmp_path / "root" / "empty_cls").mkdir()
    with pytest.raises(DatasetError, match=r"empty_cls.*empty class folder"):
        build_dataset(tmp_path / "root")
    with pytest.raises(DatasetError, match=r"unknown data source 'imagenet-9000'.*digits.*mnist:PATH.*cifar:PATH"):
        build_dataset("imagenet-9000")
    with pytest.raises(ValueError, match="split"):
        build_dataset("digits", split="training")


def _folder_with_bad(root: Path) -> Path:
    write_folder(root, classes=("a", "b"), n=3)
    bad = root / "b" / "001.png"
    bad.write_text("garbage")
    return bad


def test_bad_image_surfaces_from_worker(tmp_path):
    bad = _folder_with_bad(tmp_path)
    ds = build_dataset(tmp_path, val_fraction=0.0)
    with pytest.raises(BadImageError, match=str(bad).replace(".", r"\.")):
        ds[ds.paths.index(str(bad))]
    it = iter(create_loader(ds, batch_size=6, shuffle=False, num_workers=1))
    message = ""
    try:
        next(it)
    except BadImageError as e:  # re-raised in the main process: the worker's own message, not its traceback
        message = str(e)
    del it  # shut the worker down now (a traceback kept alive would keep it waiting)
    assert message == f"{bad}: not an image file Pillow can identify"


def test_skip_bad_images_collate_and_count(tmp_path):
    bad = _folder_with_bad(tmp_path)
    from vitlab.data import eval_transform
    from vitlab.models.base import Preprocessing

    tf = eval_transform(Preprocessing(input_size=(3, 8, 8), crop_pct=1.0))
    ds = build_dataset(tmp_path, val_fraction=0.0, skip_bad_images=True, transform=tf)
    assert ds[ds.paths.index(str(bad))] is None and ds.num_skipped == 1
    ds2 = build_dataset(tmp_path, val_fraction=0.0, skip_bad_images=True, transform=tf)
    for workers in (0, 1):
        xs, ys = next(iter(create_loader(ds2, batch_size=6, shuffle=False, num_workers=workers)))
        assert xs.shape == (5, 3, 8, 8) and ys.tolist() == [0, 0, 0, 1, 1]
    assert ds2.num_skipped == 1  # counted once, also from the worker process
    sub = torch.utils.data.Subset(ds2, [0, 1, 3, 4])  # wrappers keep the None-dropping collate
    assert next(iter(create_loader(sub, batch_size=4, shuffle=False)))[0].shape[0] == 3


def test_loader_seeded_order():
    ds = build_dataset("digits", split="val")
    a = [y.tolist() for _, y in create_loader(ds, batch_size=16, shuffle=True, seed=5)]
    b = [y.tolist() for _, y in create_loader(ds, batch_size=16, shuffle=True, seed=5)]
    c = [y.tolist() for _, y in create_loader(ds, batch_size=16, shuffle=True, seed=6)]
    assert a == b and a != c


def test_expand_image_paths_lists_a_folders_images_and_names_an_empty_one(tmp_path: Path) -> None:
    from vitlab.data import expand_image_paths

    (tmp_path / "b" / "deep").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    for rel in ("b/2.png", "a.JPG", "b/deep/1.webp", ".hidden/x.png", "b/.y.png"):
        (tmp_path / rel).write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an image")
    as_written = f"{tmp_path}/./elsewhere.png"  # a file is kept as the user wrote it
    assert expand_image_paths([as_written, tmp_path]) == [
        as_written, *map(str, (tmp_path / "a.JPG", tmp_path / "b" / "2.png", tmp_path / "b" / "deep" / "1.webp"))]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: a folder with no image files in it \(\.png, \.jpg"):
        expand_image_paths([tmp_path / "empty"])


def test_unique_stems_never_repeat() -> None:
    from vitlab.data import unique_stems

    assert unique_stems(["a/1.png", "b/1.jpg", "2.png", "c/1.png", "x/2.gif"]) == ["1", "1-1", "2", "1-2", "2-1"]
