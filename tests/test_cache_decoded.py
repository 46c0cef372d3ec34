"""vitlab.data.cache.cache_decoded (regression guards of its one-block filling, whose peak memory is measured in
benchmarks/RESULTS.md): the images served from memory are the images decoded from the files, for a folder of one
image size (one (N, C, H, W) block filled as the images arrive), of mixed sizes, and with an undecodable file
skipped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.data import build_dataset
from vitlab.data.cache import cache_decoded

torch.set_num_threads(1)


def _folder(root: Path, sizes: list[tuple[int, int]], bad: int | None = None) -> Path:
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        d = root / "train" / ("a" if i % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        if i == bad:
            (d / f"{i:02d}.png").write_bytes(b"not an image")
        else:
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{i:02d}.png")
    return root


def _served_equal_decoded(root: Path, *, skip: bool = False) -> object:
    ds = build_dataset(root, split="train", val_fraction=0.0, transform=None, skip_bad_images=skip)
    fresh = build_dataset(root, split="train", val_fraction=0.0, transform=None, skip_bad_images=skip)
    assert cache_decoded(ds, max_bytes=1 << 30) and ds.cached
    for i in range(len(ds)):
        a, b = ds[i], fresh[i]
        assert (a is None) == (b is None), i
        if a is not None:
            assert a[1] == b[1] and torch.equal(a[0], b[0]), i
    return ds._cache


def test_one_size_is_one_block(tmp_path):
    store = _served_equal_decoded(_folder(tmp_path, [(12, 10)] * 9))
    assert isinstance(store, torch.Tensor) and store.shape == (9, 3, 10, 12)


def test_mixed_sizes(tmp_path):
    store = _served_equal_decoded(_folder(tmp_path, [(12, 10), (12, 10), (9, 14), (12, 10), (5, 5), (12, 10)]))
    assert isinstance(store, list) and len(store) == 6


@pytest.mark.filterwarnings("ignore")
def test_an_undecodable_file_skipped(tmp_path):
    store = _served_equal_decoded(_folder(tmp_path, [(12, 10)] * 6, bad=3), skip=True)
    assert isinstance(store, list) and sum(t is None for t in store) == 1


# ------------------------------------------------------------- an evaluation split kept as the model's inputs
def _eval_split(root: Path, side: int, *, skip: bool = False):
    from vitlab.data import eval_transform
    from vitlab.models.base import Preprocessing

    pre = Preprocessing(input_size=(3, side, side), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), crop_pct=0.875,
                        interpolation="bicubic")
    return build_dataset(root, split="train", val_fraction=0.0, transform=eval_transform(pre), skip_bad_images=skip)


@pytest.mark.filterwarnings("ignore")
def test_an_evaluation_split_of_large_images_is_kept_as_the_models_inputs(tmp_path):
    """Photos larger than the model's input under the (deterministic) evaluation transform are kept as its
    float outputs, smaller than their pixels; served bitwise as the transform computes them from the files."""
    root = _folder(tmp_path, [(60, 45)] * 5 + [(45, 60)], bad=2)
    ds, fresh = _eval_split(root, 8, skip=True), _eval_split(root, 8, skip=True)
    assert cache_decoded(ds, max_bytes=1 << 30)
    assert ds.cache_nbytes == 5 * 3 * 8 * 8 * 4  # five decodable images, float32, at 8 x 8
    served = [ds[i] for i in range(len(ds))]
    assert sum(a is None for a in served) == 1
    for i, a in enumerate(served):
        b = fresh[i]
        assert (a is None) == (b is None)
        if a is not None:
            assert a[1] == b[1] and torch.equal(a[0], b[0]), i
    assert torch.equal(ds.load(0), fresh.decode(0)) and ds.load(0).dtype == torch.uint8  # the file's pixels
    x = ds[0][0]
    x.fill_(7.0)  # a caller's in-place edit of what it was served leaves the cache alone
    assert torch.equal(ds[0][0], fresh[0][0])
    other = _eval_split(root, 4, skip=True).transform  # another transform: images from the files again
    ds.transform = other
    assert torch.equal(ds[1][0], _eval_split(root, 4, skip=True)[1][0]) and ds[1][0].shape == (3, 4, 4)


def test_small_images_stay_decoded(tmp_path):
    """Images whose pixels take less than the model's float inputs are kept as pixels."""
    ds = _eval_split(_folder(tmp_path, [(8, 8)] * 4), 8)
    assert cache_decoded(ds, max_bytes=1 << 30) and ds.cache_nbytes == 4 * 3 * 8 * 8
    assert ds._cache.dtype == torch.uint8
