"""Image-folder data sets: ``root/<class>/<image>``, optionally under ``train/`` and ``val/`` (or ``test/``).

The split folders are recognised whatever their case, under the names the public data sets use:
``train``/``training``, ``val``/``valid``/``validation``, ``test``/``testing`` (Kaggle's ``Train/`` and
``Test/`` included). A ``train`` folder that holds images itself and no sub-folders is a class, not a split.

Building lists file names only (one ``os.walk`` per class folder) and reads the headers of a few
files to decide the channel count; images are decoded in ``__getitem__``.

Class names are the folder names in Unicode NFC (:func:`class_name`), sorted as such: macOS (and zips made there)
stores "café" as "cafe" + a combining accent (NFD), which would otherwise be another name, sorted elsewhere, than
the "café" a checkpoint trained on Linux or Windows knows. Files are read from the folders as named on disk.
"""

from __future__ import annotations

import logging
import os
import random
import unicodedata
from pathlib import Path

from vitlab.data.errors import DatasetError
from vitlab.data.image import IMAGE_EXTENSIONS, is_image_file, peek_channels, walk_image_files

log = logging.getLogger(__name__)

# The names of the split folders, compared in lower case.
SPLIT_DIR_NAMES = {
    "train": ("train", "training"),
    "val": ("val", "valid", "validation"),
    "test": ("test", "testing"),
}
HELD_OUT_DIRS = (*SPLIT_DIR_NAMES["val"], *SPLIT_DIR_NAMES["test"])


def list_class_dirs(root: Path) -> list[str]:
    """Sorted names (NFC) of the (non-hidden) sub-folders of ``root``: the class names (a ``__MACOSX`` folder, the
    resource forks a macOS zip adds, is not a class)."""
    return list(_class_dirs(root))


def class_name(folder_name: str) -> str:
    """The class a folder name stands for: NFC, and UTF-8 bytes that a non-UTF-8 locale left undecoded (Python's
    surrogate escapes under LC_ALL=C) read as UTF-8, so that "café" is "café" under every locale and OS."""
    try:
        folder_name.encode("utf-8")
    except UnicodeEncodeError:
        try:
            folder_name = folder_name.encode("utf-8", "surrogateescape").decode("utf-8", "surrogateescape")
        except UnicodeError:  # a lone surrogate of another kind (Windows): the name as it is
            pass
    return unicodedata.normalize("NFC", folder_name)


def _class_dirs(root: Path) -> dict[str, str]:
    """Class name (NFC) -> the sub-folder's name on disk, sorted by class name."""
    folders: dict[str, str] = {}
    for disk in _sub_dirs(root):
        name = class_name(disk)
        if name in folders:
            raise DatasetError(f"{root}: the class folders {folders[name]!r} and {disk!r} are the same name "
                               f"{name!r} in two Unicode spellings (composed / decomposed accents); merge them "
                               f"into one folder")
        folders[name] = disk
    if not folders:
        raise DatasetError(f"{root}: no class folders (expected {root}/<class>/<image files>)")
    return dict(sorted(folders.items()))


def scan_folder(root: Path, classes: list[str] | None = None) -> tuple[list[str], list[int], list[str]]:
    """(paths, labels, classes) for ``root/<class>/**/<image>``; paths sorted within each class.

    ``classes`` fixes the label order (e.g. the train split's classes for a val folder); a class folder
    of ``root`` that is not in it is an error, a missing or empty one is allowed (a val set may lack a class).
    Symbolic links are followed, but never back into a folder already read (see ``walk_image_files``).
    """
    folders = _class_dirs(root)
    found = list(folders)
    held_out = classes is not None
    if classes is None:
        classes = found
    else:
        classes = [class_name(c) for c in classes]
        extra = sorted(set(found) - set(classes))
        if extra:
            raise DatasetError(f"{root}: class folders {extra} do not exist in the training split "
                               f"(classes: {classes})")
    index = {c: i for i, c in enumerate(classes)}
    paths: list[str] = []
    labels: list[int] = []
    empty: list[str] = []
    for name in found:
        cdir = root / folders[name]
        files = walk_image_files(cdir, inside=(root,))
        if not files:
            if held_out:  # as a class folder left out of val/: the split has no images of it
                empty.append(name)
                continue
            raise DatasetError(f"{cdir}: empty class folder (no image files with extensions "
                               f"{'/'.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)})")
        files.sort()
        paths.extend(files)
        labels.extend([index[name]] * len(files))
    if empty:
        log.info("%s: class folder(s) %s hold no images; this split has none of %s", root, ", ".join(empty),
                 "that class" if len(empty) == 1 else "those classes")
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


def _sub_dirs(root: Path) -> list[str]:
    """The non-hidden sub-folders of ``root`` (links to folders included), sorted."""
    try:
        return sorted(e.name for e in os.scandir(root)
                      if e.is_dir() and not e.name.startswith(".") and e.name != "__MACOSX")
    except OSError as e:
        raise DatasetError(f"{root}: cannot list image folder ({e})") from e


def _holds_images(folder: Path) -> bool:
    """Whether ``folder`` holds image files itself (not only in sub-folders)."""
    try:
        return any(e.is_file() and not e.name.startswith(".") and is_image_file(e.name) for e in os.scandir(folder))
    except OSError:
        return False


def _split_dirs(root: Path, names: list[str], split: str) -> Path | None:
    """The one folder among ``names`` (sub-folders of ``root``) named as ``split``, whatever its case."""
    hits = [n for n in names if n.lower() in SPLIT_DIR_NAMES[split]]
    if len(hits) > 1:
        raise DatasetError(f"{root}: {' and '.join(hits)} both name the {split} split; keep one of them (rename "
                           f"or move the other out of {root})")
    return root / hits[0] if hits else None


def folder_layout(root: Path) -> tuple[Path, Path | None, Path | None]:
    """(train dir, val dir or None, test dir or None). A root without a train split folder is one flat class
    folder set (returned as the train dir).

    Split folders are recognised by name, whatever the case (``SPLIT_DIR_NAMES``). A ``train`` folder holding
    images itself and no sub-folders is a class of a flat folder set (bus/, car/, train/), not the training
    split; one with sub-folders, beside folders that hold images as classes do and are not split folders, is
    ambiguous, and refused with an error that says how to proceed.
    """
    names = _sub_dirs(root)
    train = _split_dirs(root, names, "train")
    if train is None:
        return root, None, None
    inner = _sub_dirs(train)
    if not inner and _holds_images(train):
        return root, None, None  # images, no class folders: "train" is a class beside the others
    split_names = {n for names_ in SPLIT_DIR_NAMES.values() for n in names_}
    classes_beside = [n for n in names if n.lower() not in split_names and _holds_images(root / n)]
    if classes_beside:
        shown = ", ".join(classes_beside[:5]) + (f" and {len(classes_beside) - 5} more"
                                                  if len(classes_beside) > 5 else "")
        raise DatasetError(
            f"{root}: {train.name}/ was taken for the training split ({train}/<class>/<images>), but {shown} "
            f"beside it hold images as class folders do, and would be left out. If {train.name!r} is a class, "
            f"rename its folder (e.g. {train.name}_) so that it is not read as a split; if it is the training "
            f"split, move {shown} into it (or out of {root})")
    return train, _split_dirs(root, names, "val"), _split_dirs(root, names, "test")
