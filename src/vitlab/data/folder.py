"""Image-folder data sets: ``root/<class>/<image>``, optionally under ``train/`` and ``val/`` (or ``test/``).

Building lists file names only (one ``os.scandir`` per class folder) and reads the headers of a few
files to decide the channel count; images are decoded in ``__getitem__``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from vitlab.data.errors import DatasetError
from vitlab.data.image import is_image_file, peek_channels

HELD_OUT_DIRS = ("val", "validation", "valid", "test")


def list_class_dirs(root: Path) -> list[str]:
    """Sorted names of the (non-hidden) sub-folders of ``root``: the class names (a ``__MACOSX`` folder, the
    resource forks a macOS zip adds, is not a class)."""
    try:
        names = sorted(e.name for e in os.scandir(root)
                       if e.is_dir() and not e.name.startswith(".") and e.name != "__MACOSX")
    except OSError as e:
        raise DatasetError(f"{root}: cannot list image folder ({e})") from e
    if not names:
        raise DatasetError(f"{root}: no class folders (expected {root}/<class>/<image files>)")
    return names


def scan_folder(root: Path, classes: list[str] | None = None) -> tuple[list[str], list[int], list[str]]:
    """(paths, labels, classes) for ``root/<class>/**/<image>``; paths sorted within each class.

    ``classes`` fixes the label order (e.g. the train split's classes for a val folder); a class folder
    of ``root`` that is not in it is an error, a missing one is allowed (a val set may lack a class).
    """
    found = list_class_dirs(root)
    if classes is None:
        classes = found
    else:
        extra = sorted(set(found) - set(classes))
        if extra:
            raise DatasetError(f"{root}: class folders {extra} do not exist in the training split "
                               f"(classes: {classes})")
    index = {c: i for i, c in enumerate(classes)}
    paths: list[str] = []
    labels: list[int] = []
    for name in found:
        cdir = root / name
        files = []
        for dirpath, dirnames, filenames in os.walk(cdir, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files.extend(os.path.join(dirpath, f) for f in filenames if not f.startswith(".") and is_image_file(f))
        if not files:
            raise DatasetError(f"{cdir}: empty class folder (no image files with extensions "
                               f"png/jpg/jpeg/bmp/gif/tif/tiff/webp/ppm/pgm/pbm/pnm)")
        files.sort()
        paths.extend(files)
        labels.extend([index[name]] * len(files))
    return paths, labels, list(classes)


def guess_channels(paths: list[str], labels: list[int], max_peek: int = 64) -> int:
    """1 if the headers of a sample of files (the first file of each class and a seeded random draw over all,
    up to ``max_peek`` in all) are all grayscale, else 3. Mixed folders get 3 channels; grayscale images are
    then repeated to RGB."""
    firsts: dict[int, str] = {}
    for p, t in zip(paths, labels):
        firsts.setdefault(t, p)
    sample = list(firsts.values())[:max_peek // 4]
    chosen = set(sample)
    rest = [p for p in paths if p not in chosen]
    sample += random.Random(0).sample(rest, min(len(rest), max_peek - len(sample)))
    chans = [c for c in (peek_channels(p) for p in sample) if c is not None]
    return 1 if chans and all(c == 1 for c in chans) else 3


def folder_layout(root: Path) -> tuple[Path, Path | None, Path | None]:
    """(train dir, val dir or None, test dir or None). A root without ``train/`` is one flat class folder
    set (returned as the train dir)."""
    train = root / "train"
    if not train.is_dir():
        return root, None, None
    val = next((root / d for d in ("val", "validation", "valid") if (root / d).is_dir()), None)
    test = root / "test" if (root / "test").is_dir() else None
    return train, val, test
