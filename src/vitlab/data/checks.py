"""Checks that a data set can train a classifier, run before anything is written or trained."""

from __future__ import annotations

import logging

from vitlab.data.dataset import VisionDataset
from vitlab.data.errors import DatasetError

log = logging.getLogger(__name__)

# Below this many training images a class is learned from too little to trust its accuracy.
FEW_IMAGES_PER_CLASS = 10


def check_classification_data(ds: VisionDataset, *, few: int = FEW_IMAGES_PER_CLASS) -> list[str]:
    """Refuse a training split with fewer than two classes; warn about classes with fewer than ``few`` images.

    A single class trains to 100% accuracy without learning anything, so it is an error. Returns the
    names of the classes with few images (also logged as one warning).
    """
    counts = ds.class_counts()
    present = [(name, n) for name, n in zip(ds.classes, counts) if n > 0]
    if len(present) < 2:
        what = f"only the class {present[0][0]!r} ({present[0][1]} images)" if present else "no labelled images"
        raise DatasetError(
            f"{ds.source}: {what}; a classifier needs at least two classes (for an image folder: one "
            f"sub-folder per class, e.g. DATA/cats/*.jpg and DATA/dogs/*.jpg)")
    few_ones = [f"{name} ({n})" for name, n in zip(ds.classes, counts) if n < few]
    if few_ones:
        shown = ", ".join(few_ones[:10]) + (f" and {len(few_ones) - 10} more" if len(few_ones) > 10 else "")
        log.warning("%s: %d class(es) with fewer than %d training images: %s; their accuracy will be unreliable",
                    ds.source, len(few_ones), few, shown)
    return [name for name, n in zip(ds.classes, counts) if n < few]
