"""Multi-label image data: several labels per image, read from an image folder's label file (``--multi-label``).

The label files are those of :mod:`vitlab.data.folder` (metadata.jsonl lists, a column of separated tags, one 0/1
column per label; see :func:`vitlab.data.folder.scan_folder_multilabel`). A sample is ``(image, target)`` with a
float multi-hot (K,) target. Where the source has no val/ folder, "val" is a seeded random ``val_fraction`` of the
training images (stratification by class does not apply to label sets).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from vitlab.data.dataset import ImageFileDataset, Transform
from vitlab.data.errors import DatasetError
from vitlab.data.folder import (
    check_not_wrapper,
    folder_layout,
    guess_channels,
    scan_folder_multilabel,
    unlabelled_split_dirs,
)
from vitlab.data.splits import (
    SPLIT_METHOD,
    check_split_method,
    held_out_count,
    relative_keys,
    split_source,
    stratified_split,
)

log = logging.getLogger(__name__)


class MultiLabelImageDataset(ImageFileDataset):
    """Image files with a set of labels each; ``targets[i]`` is the tuple of label indices of image i and a
    sample's target the float (K,) multi-hot row of them."""

    multi_label = True

    def __init__(self, paths: Sequence[str], label_sets: Sequence[Sequence[int]], *, classes: Sequence[str],
                 in_chans: int, source: str, transform: Transform | None = None,
                 skip_bad_images: bool = False) -> None:
        super().__init__(paths, [0] * len(paths), classes=classes, in_chans=in_chans, source=source,
                         transform=transform, skip_bad_images=skip_bad_images)
        k = len(self.classes)
        self.targets = [tuple(sorted({int(t) for t in s})) for s in label_sets]  # type: ignore[misc]
        bad = next((s for s in self.targets if s and (s[0] < 0 or s[-1] >= k)), None)
        if bad is not None:
            raise ValueError(f"{source}: label indices {bad} outside 0..{k - 1}")

    def target(self, index: int) -> Tensor:
        """The float32 multi-hot (K,) target of sample ``index``."""
        y = torch.zeros(len(self.classes), dtype=torch.float32)
        y[list(self.targets[index])] = 1.0
        return y

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor] | None:  # type: ignore[override]
        item = super().__getitem__(index)
        if item is None:
            return None
        return item[0], self.target(index % len(self))

    def class_counts(self) -> list[int]:
        """Images that have each label (positives per label)."""
        counts = [0] * len(self.classes)
        for s in self.targets:
            for t in s:
                counts[t] += 1
        return counts

    def skipped_per_class(self) -> dict[str, tuple[int, int]]:
        skipped = [0] * len(self.classes)
        for i in self._skipped.nonzero().flatten().tolist():
            for t in self.targets[i]:
                skipped[t] += 1
        return {name: (k, n) for name, k, n in zip(self.classes, skipped, self.class_counts()) if k}


def random_split(n: int, fraction: float, seed: int, *,
                 keys: Sequence[str] | None = None) -> tuple[list[int], list[int]]:
    """(kept, held out) indices: a seeded random ``round(fraction * n)`` held out (at least one where
    ``fraction > 0`` and ``n >= 2``, never all); both sorted. With ``keys`` (paths relative to the data root):
    the first of them in the order of a hash of (seed, key), stable under added files (``path-hash-v1``, see
    :func:`vitlab.data.splits.stratified_split`); without: the old randperm draw."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"split fraction must be in [0, 1), got {fraction}")
    if keys is not None:
        return stratified_split([0] * n, fraction, seed, keys=keys)
    k = held_out_count(n, fraction)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
    held = sorted(perm[:k])
    held_set = set(held)
    return [i for i in range(n) if i not in held_set], held


def build_multilabel_dataset(source: str | Path, *, split: str = "train", val_fraction: float = 0.1, seed: int = 0,
                             transform: Transform | None = None, skip_bad_images: bool = False,
                             split_method: str = SPLIT_METHOD) -> MultiLabelImageDataset:
    """The ``split`` ("train" | "val" | "test") of an image folder whose label file gives several labels per
    image, as :func:`vitlab.data.build_dataset` splits a folder: its own val/ and test/ folders, else "val" held
    out of the training images (a seeded random ``val_fraction``, drawn by ``split_method``) and "test" answered
    with it."""
    from vitlab.data.build import SPLITS, empty_split_message, parse_source

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    check_split_method(split_method)
    kind, root = parse_source(source)
    if kind != "folder" or root is None:
        raise DatasetError(f"{source}: --multi-label reads several labels per image from an image folder's label "
                           f"file (metadata.jsonl, metadata.csv or a Kaggle train.csv); a {kind} source has one "
                           f"label per image")
    train_dir, val_dir, test_dir = folder_layout(root)
    if train_dir == root:
        check_not_wrapper(root)  # a folder whose only folder is the data set: named, as for class folders
    paths, label_sets, classes = scan_folder_multilabel(train_dir)
    in_chans = guess_channels(paths, [0] * len(paths))
    split_eff = split
    split_from = None  # what a held-out split was drawn from
    if split == "test" and test_dir is None:
        log.info("%s has no test/ folder%s: split 'test' is the validation part", root,
                 " of labelled images" if "test" in unlabelled_split_dirs(root) else "")
        split_eff = "val"
    if split_eff == "test" or (split_eff == "val" and val_dir is not None):
        folder = test_dir if split_eff == "test" else val_dir
        paths, label_sets, _ = scan_folder_multilabel(folder, classes)  # type: ignore[arg-type]
        desc = f"folder:{folder}"
    elif val_dir is not None:  # train, with a separate val folder: all of train/
        desc = f"folder:{train_dir}"
    else:
        if split == "val" and val_fraction == 0.0:
            raise DatasetError(f"{source}: split='val' requested with val_fraction=0 (the source has no "
                               f"validation set of its own)")
        keys = relative_keys(paths, train_dir)
        split_from = split_source(keys, [0] * len(keys), ["(all images)"])
        kept, held = random_split(len(paths), val_fraction, seed, keys=keys if split_method == SPLIT_METHOD else None)
        idx = held if split_eff == "val" else kept
        paths, label_sets = [paths[i] for i in idx], [label_sets[i] for i in idx]
        desc = f"folder:{train_dir}[{split}, val_fraction={val_fraction}, seed={seed}]"
    ds = MultiLabelImageDataset(paths, label_sets, classes=classes, in_chans=in_chans, source=desc,
                                transform=transform, skip_bad_images=skip_bad_images)
    if split_from is not None:
        ds.split_from = split_from
    log.info("dataset %s: %d images, %d labels (multi-label)", ds.source, len(ds), len(ds.classes))
    if len(ds) == 0:
        raise DatasetError(empty_split_message(ds.source, split, val_fraction))
    return ds


def is_multi_label(dataset: object) -> bool:
    """Whether ``dataset`` yields multi-hot targets (a :class:`MultiLabelImageDataset`)."""
    return bool(getattr(dataset, "multi_label", False))


__all__ = ["MultiLabelImageDataset", "build_multilabel_dataset", "is_multi_label", "random_split"]
