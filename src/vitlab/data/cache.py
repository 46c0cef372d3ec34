"""Decoded-image caching: a small image-folder data set decoded once, into memory, instead of every epoch.

Decoding dominates the time per image of small images (a 32x32 JPEG decodes in about as long as a tiny ViT
trains on it), so a data set whose decoded pixels fit comfortably in memory is decoded once, in parallel
worker processes, before training; every epoch after that reads memory. Images of one size are stacked
into a single uint8 tensor (one allocation, shared copy-on-write with DataLoader workers).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from vitlab.data.dataset import ImageFileDataset
from vitlab.data.errors import BadImageError
from vitlab.data.loader import WorkerLoader

log = logging.getLogger(__name__)

# At most this share of the memory available now goes to decoded images.
MEMORY_SHARE = 0.25


class _Decode(Dataset):
    """(index, uint8 image or the BadImageError message) of every file, decoded at ``min_size``; with
    ``transform``, the transform's output of it."""

    def __init__(self, ds: ImageFileDataset, min_size: int | None, transform: Any = None) -> None:
        self.ds, self.min_size, self.transform = ds, min_size, transform

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[int, Tensor | str]:
        try:
            image = self.ds.decode(i, min_size=self.min_size)
        except BadImageError as e:
            return i, str(e)
        return i, image if self.transform is None else self.transform(image)


def _kept_transformed(ds: ImageFileDataset, decoded_bytes: int) -> int | None:
    """Bytes of one transformed image where ``ds``'s transform is deterministic (evaluation's resize and crop)
    and its float32 output is smaller than the decoded image: a validation split of large photos is kept as
    the model's inputs (e.g. 3 x 64 x 64 floats, 49 KB, for a 500 x 375 photo's 563 KB), which are what the
    transform would compute from the kept pixels every epoch. None: keep the decoded images."""
    from vitlab.data.transforms import EvalTransform

    t = ds.transform
    if not isinstance(t, EvalTransform):
        return None
    out = t.channels * t.size[0] * t.size[1] * 4
    return out if out < decoded_bytes else None


def _pack(batch: list[tuple[int, Tensor | str]]) -> tuple[list[int], Tensor | None, list[tuple[int, Tensor | str]]]:
    """A worker's batch as (indices, their images stacked, the rest as (index, item) pairs).

    A tensor sent from a worker travels through its own shared-memory file descriptor, and receiving one
    costs about 0.4 ms (CIFAR-10's 50,000 images: 25 of the 29 s the cache took), so the images of the
    batch's most common size go as one stacked tensor; other sizes and error messages go one by one.
    """
    shapes: dict[tuple[int, ...], int] = {}
    for _, item in batch:
        if isinstance(item, Tensor):
            shapes[tuple(item.shape)] = shapes.get(tuple(item.shape), 0) + 1
    if not shapes:
        return [], None, batch
    common = max(shapes, key=shapes.__getitem__)
    same = [(i, t) for i, t in batch if isinstance(t, Tensor) and tuple(t.shape) == common]
    rest = [(i, t) for i, t in batch if not (isinstance(t, Tensor) and tuple(t.shape) == common)]
    return [i for i, _ in same], torch.stack([t for _, t in same]), rest


def estimated_bytes(ds: ImageFileDataset, min_size: int | None = None, sample: int = 8) -> int:
    """Decoded size of the whole data set, from a few images spread over it."""
    n = len(ds)
    idx = sorted({round(i * (n - 1) / max(1, sample - 1)) for i in range(min(sample, n))})
    sizes = []
    for i in idx:
        try:
            sizes.append(ds.decode(i, min_size=min_size).numel())
        except BadImageError:
            continue
    return int(sum(sizes) / max(1, len(sizes)) * n)


def cache_decoded(ds: ImageFileDataset, *, max_bytes: int, workers: int = 0) -> bool:
    """Decode every image of ``ds`` into memory if they take at most ``max_bytes``; True when cached.

    Images are decoded at the size the dataset's transform needs (``min_source_size``). With
    ``skip_bad_images`` an undecodable file is remembered as such (and reported when first read), else
    the first one raises :class:`BadImageError` here, before training starts.
    """
    if ds.cached:
        return True
    min_size = getattr(ds.transform, "min_source_size", None)
    need = estimated_bytes(ds, min_size)
    per_image = _kept_transformed(ds, need // max(1, len(ds)))
    transform = ds.transform if per_image is not None else None
    if per_image is not None:
        need = per_image * len(ds)
    if need > max_bytes:
        log.info("%s: decoded images would take about %.1f GB (limit %.1f GB): decoded every epoch instead",
                 ds.source, need / 1e9, max_bytes / 1e9)
        return False
    t0 = time.perf_counter()
    images: list[Tensor | None] = [None] * len(ds)
    errors: dict[int, str] = {}
    # images of one shape go straight into one (N, C, H, W) block as they arrive (one copy of the data set in
    # memory, not a list and then a stacked copy); others, if any, stay tensors of their own. The block's rows
    # that no image fills are never written, so their pages are never taken.
    block: Tensor | None = None

    def keep(i: int, image: Tensor) -> None:
        nonlocal block
        if block is None:  # the first image's shape (a folder of one size: every image's)
            block = image.new_empty((len(ds), *image.shape))
        if block is not None and block.shape[1:] == image.shape:
            block[i].copy_(image)
            images[i] = block[i]
        else:
            images[i] = image.clone() if workers else image

    loader = WorkerLoader(_Decode(ds, min_size, transform), batch_size=64, shuffle=False, num_workers=workers,
                        collate_fn=_pack)
    for indices, stacked, rest in loader:
        if stacked is not None:
            # a tensor from a worker lives in shared memory held by an open file descriptor: copied out, it
            # goes, so that caching 50,000 images does not exhaust the process's descriptors (ulimit -n)
            for j, i in enumerate(indices):
                keep(i, stacked[j])
        for i, item in rest:
            if isinstance(item, str):
                if not ds.skip_bad_images:
                    raise BadImageError(item)
                errors[i] = item
            else:
                keep(i, item)
    same = block is not None and not errors and all(t is not None and t.data_ptr() == block[i].data_ptr()
                                                    for i, t in enumerate(images))
    store: Tensor | list[Tensor | None] = block if same else images  # type: ignore[assignment]
    ds.set_cache(store, errors, transform=transform)
    log.info("%s: %d images decoded into memory%s (%.0f MB) in %.1f s%s", ds.source, len(ds) - len(errors),
             " as the model's inputs" if transform is not None else "", need / 1e6, time.perf_counter() - t0,
             f"; {len(errors)} undecodable, skipped" if errors else "")
    return True
