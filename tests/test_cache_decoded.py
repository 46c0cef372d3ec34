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
