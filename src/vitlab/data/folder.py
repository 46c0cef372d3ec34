"""Image-folder data sets: ``root/<class>/<image>``, optionally under ``train/`` and ``val/`` (or ``test/``).

The split folders are recognised whatever their case, under Hugging Face datasets' split keywords:
``train``/``training``, ``val``/``valid``/``validation``/``dev``, ``test``/``testing``/``eval``/``evaluation``
(Kaggle's ``Train/`` and ``Test/`` included). A ``train`` folder that holds images itself and no sub-folders,
beside class folders that are not split folders (bus/, car/, train/), is a class, not a split.

A folder with a label file (:func:`label_file`) is labelled by it, whatever its sub-folders: Hugging Face
imagefolder's ``metadata.csv`` / ``metadata.jsonl`` inside it (file names relative to it, sub-folders allowed), or,
for a split folder, Kaggle's CSV beside it (``train.csv`` or ``train_labels.csv`` for ``train/``; ids matched
against the files below it, wrappers such as ``train/train/`` included). Class folders (two or more, no images
beside them) that their label file cannot label keep their classes, with a warning naming the file. A held-out
split folder (val, test) of images with neither, or whose label file gives no labels (no label column; every
label empty, null or -1), is unlabelled: left out, with a warning, and its part taken from the training images.

Everything below a class folder belongs to that class, as in torchvision's ImageFolder (timm's reader makes each
leaf folder a class instead); a class folder that merges several sub-folders is named in a warning.

Building lists file names only (one ``os.walk`` per class folder) and reads the image headers (no pixels) to decide
the channel count (:func:`guess_channels`); images are decoded in ``__getitem__``.

Multi-label targets (:func:`scan_folder_multilabel`, ``--multi-label``) come from the same label files: a metadata.jsonl
list per image, a column of tags separated by spaces or by one of ``|`` ``;`` ``,`` (the same one in the whole file;
then spaces belong to the tag), or one 0/1 column per label. The label names are the sorted union of the tags, or
the 0/1 columns in the header's order.

Class names are the folder names in Unicode NFC (:func:`class_name`), sorted as such: macOS (and zips made there)
stores "café" as "cafe" + a combining accent (NFD), which would otherwise be another name, sorted elsewhere, than
the "café" a checkpoint trained on Linux or Windows knows. Files are read from the folders as named on disk.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import posixpath
import random
import re
import threading
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vitlab.checkpoints.io import parse_json
from vitlab.data.errors import DatasetError
from vitlab.data.image import (
    IMAGE_EXTENSIONS,
    listed_folder,
    listed_image,
    peek_channels,
    walk_image_files,
)

log = logging.getLogger(__name__)

# The names of the split folders, compared in lower case: Hugging Face datasets' SPLIT_KEYWORDS (data_files.py).
SPLIT_DIR_NAMES = {
    "train": ("train", "training"),
    "val": ("val", "valid", "validation", "dev"),
    "test": ("test", "testing", "eval", "evaluation"),
}
SPLIT_NAMES = frozenset(n for names in SPLIT_DIR_NAMES.values() for n in names)
HELD_OUT_DIRS = (*SPLIT_DIR_NAMES["val"], *SPLIT_DIR_NAMES["test"])
# Label files of a folder of images without class folders (Hugging Face imagefolder's, inside the folder).
METADATA_FILES = ("metadata.csv", "metadata.jsonl")
# The label column of a label file, by name (compared in lower case); else the only column beside the file's.
LABEL_COLUMNS = ("label", "labels", "class", "category", "target")
LABEL_FILE_FORMS = ("FOLDER/metadata.csv with a header file_name,label and one line per image (Hugging Face "
                    "imagefolder; or metadata.jsonl), or for a split folder train/ a train.csv beside it with a "
                    "header such as id,label and lines <file name or its stem>,<class> (Kaggle's)")
# Multi-label reading (--multi-label): the tags column, by name (compared in lower case; Planet's "tags"), else the
# only column beside the file's; several other columns, none named so, are one 0/1 column per label.
MULTI_LABEL_COLUMNS = (*LABEL_COLUMNS, "tags")
# Tag separators inside one cell, besides white space (Planet's): one of them per file.
TAG_SEPARATORS = ("|", ";", ",")
MULTI_LABEL_FORMS = ("FOLDER/metadata.jsonl with a list per image ({\"file_name\": \"a.png\", \"labels\": [\"cat\", "
                     "\"dog\"]}, [] for none), or a metadata.csv / Kaggle train.csv whose label column holds the tags "
                     "of each image separated by spaces (Planet's image_name,tags) or by one of | ; , (quoted), or "
                     "one 0/1 column per label (a header file,cat,dog,...)")
# Word parts of a class folder name that say it is a split, not a class (Kaggle's seg_train, seg_test, seg_pred).
_SPLIT_WORDS = SPLIT_NAMES | {"pred", "predict", "prediction"}

_warned: set[tuple[str, str]] = set()  # (kind, folder): warnings given once per data set and process


def _warn_once(kind: str, folder: Path, msg: str, *args: object) -> None:
    if (kind, str(folder)) not in _warned:
        _warned.add((kind, str(folder)))
        log.warning(msg, *args)


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
    """(paths, labels, classes) for ``root/<class>/**/<image>``, or for a folder of images labelled by a label file
    (:func:`labelled_by`); paths sorted within each class.

    ``classes`` fixes the label order (e.g. the train split's classes for a val folder); a class folder
    of ``root`` that is not in it is an error, a missing or empty one is allowed (a val set may lack a class).
    Symbolic links are followed, but never back into a folder already read (see ``walk_image_files``).
    """
    if (labels_file := labelled_by(root)) is not None:
        return _scan_label_file(root, labels_file, classes)
    folders = _class_dirs(root)
    held_out = classes is not None
    classes = _split_classes(list(folders), classes, f"{root}: class folders")
    index = {c: i for i, c in enumerate(classes)}
    paths: list[str] = []
    labels: list[int] = []
    empty: list[str] = []
    merged: list[str] = []
    for name in folders:
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
        top = str(cdir)
        if not any(os.path.dirname(f) == top for f in files):  # no image of its own: sub-folders' only
            subs = sorted({os.path.relpath(f, top).split(os.sep)[0] for f in files})
            if len(subs) > 1:
                merged.append(f"{name} ({', '.join(subs[:4])}{', ...' if len(subs) > 4 else ''})")
    if empty:
        log.info("%s: class folder(s) %s hold no images; this split has none of %s", root, ", ".join(empty),
                 "that class" if len(empty) == 1 else "those classes")
    if merged and not held_out:
        _warn_once("merged", root, "%s: class folder(s) %s hold no images themselves: each is one class of "
                   "all its sub-folders' images (timm would make each leaf folder a class)", root,
                   "; ".join(merged))
    return paths, labels, list(classes)


def labelled_by(folder: Path) -> Path | None:
    """The label file that labels ``folder``'s images (:func:`label_file`), whatever its sub-folders; None where
    there is none, or where ``folder`` is a class-folder layout (two or more sub-folders, no images of its own)
    that its label file cannot label (no labels, unreadable, or naming none of the images): the class folders
    label the images then, and a warning names the file and why."""
    path = label_file(folder)
    if path is None or len(_sub_dirs(folder)) < 2 or _holds_images(folder):
        return path
    try:
        table = _label_table(path, folder)
        why = table.no_labels or table.columns_error or (
            None if any(table.images.find(g) for _, g, _ in table.rows)
            else f"it names none of the images below {folder}")
        if why is None and table.label_key.strip().lower() not in LABEL_COLUMNS:
            why = (f"its labels would come from {table.label_key!r}, the only other column, not one named "
                   f"{'/'.join(LABEL_COLUMNS)}")
    except DatasetError as e:
        why = str(e)
    if why is None:
        return path
    _warn_once("label-file-unused", folder, "%s: not used (%s); the class folders of %s label its images", path,
               why, folder)
    return None


def label_file(folder: Path) -> Path | None:
    """``folder``'s ``metadata.csv`` / ``metadata.jsonl`` (Hugging Face imagefolder) or, where ``folder`` is a
    split folder (train/, val/, test/, ...), a CSV beside it named after it (``train.csv``, ``train_labels.csv``:
    Kaggle's); None if there is none. Two of them are an error."""
    found = [folder / n for n in METADATA_FILES if (folder / n).is_file()]
    if folder.name.lower() in SPLIT_NAMES:
        wanted = {f"{folder.name.lower()}.csv", f"{folder.name.lower()}_labels.csv"}
        try:
            found += sorted(folder.parent / e.name for e in os.scandir(folder.parent)
                            if e.name.lower() in wanted and e.is_file())
        except OSError:
            pass
    if len(found) > 1:
        raise DatasetError(f"{folder}: {' and '.join(str(f) for f in found)} both label its images; keep one")
    return found[0] if found else None


class _Images:
    """The image files below a label file's folder, found by the file name or id a label file gives."""

    def __init__(self, folder: Path):
        top = os.fspath(folder)
        self.rel = sorted(os.path.relpath(p, top).replace(os.sep, "/") for p in walk_image_files(top))
        self._paths = set(self.rel)
        self._keys: dict[str, dict[str, list[str]]] = {"path_stem": {}, "name": {}, "stem": {}}
        for r in self.rel:
            name = r.rsplit("/", 1)[-1]
            self._keys["path_stem"].setdefault(os.path.splitext(r)[0], []).append(r)
            self._keys["name"].setdefault(name, []).append(r)
            self._keys["stem"].setdefault(os.path.splitext(name)[0], []).append(r)

    def find(self, given: str) -> list[str]:
        """The relative paths ``given`` names: a path relative to the folder (sub-folders allowed), with or without
        its extension, or a bare file name or stem anywhere below (a wrapper such as train/train/); several where
        it is ambiguous, none where it names nothing or leaves the folder."""
        if not given or leaves_folder(given):
            return []
        given = posixpath.normpath(given.replace("\\", "/"))
        if given in self._paths:
            return [given]
        for key in ("path_stem", "name", "stem"):
            if key != "path_stem" and "/" in given:
                break
            if hits := self._keys[key].get(given):
                return hits
        return []


def _named_image(path: Path, line: int, given: str, root: Path, table: Any) -> str:
    """The one image file below ``root`` that line ``line`` of the label file ``path`` names as ``given``; a
    DatasetError naming the line where it leaves the folder, names none or several."""
    if leaves_folder(given):
        raise DatasetError(f"{path}, line {line}: {given!r} is not inside {root} (file names are relative to "
                           f"{root}: no absolute paths, no '..')")
    hits = table.images.find(given)
    if len(hits) > 1:
        raise DatasetError(f"{path}, line {line}: {given!r} names several files below {root} "
                           f"({', '.join(hits[:4])}); give the file's path relative to {root}")
    if not hits:
        raise DatasetError(f"{path}, line {line}: no image file {given!r} in {root}")
    return hits[0]


def leaves_folder(given: str) -> bool:
    """Whether a file name that a label or annotation file gives is absolute or climbs out of its folder with
    ``..`` (``/`` or ``\\`` separated; a Windows drive too): such names are refused, never opened."""
    g = given.replace("\\", "/")
    return g.startswith("/") or re.match(r"^[A-Za-z]:/", g) is not None or ".." in g.split("/")


class _LabelTable:
    """A label file read against its folder's images."""

    def __init__(self, rows: list[tuple[int, str, Any]], label_key: str | None, no_label_column: str | None,
                 images: _Images, columns_error: str | None = None):
        # (line, file name or id, label: None where null, missing or without a label column; a metadata.jsonl's
        # JSON list or object as it is)
        self.rows = rows
        self.label_key = label_key or ""
        self.images = images
        # several columns beside the file's, none named as labels: an error for single-label reading (raised when
        # the file is read for labels), one 0/1 column per label for multi-label reading
        self.columns_error = columns_error
        if no_label_column is not None:
            self.no_labels: str | None = no_label_column
        elif columns_error is None and rows and all(
                not isinstance(lab, (list, dict)) and lab in _NO_LABEL_VALUES for _, _, lab in rows):
            self.no_labels = "every label is empty, null or -1"
        else:
            self.no_labels = None


# Label values of an unlabelled image (Hugging Face datasets' ClassLabel writes -1): a file of only these gives no
# labels; "-1" beside other labels is a class name.
_NO_LABEL_VALUES = (None, "", "-1")
_tables: dict[tuple, _LabelTable] = {}


def _label_table(path: Path, folder: Path) -> _LabelTable:
    """``path`` read against the images below ``folder`` (cached while neither changes)."""
    try:
        st, fst = path.stat(), folder.stat()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read the label file ({e})") from e
    key = (str(path), str(folder), st.st_mtime_ns, st.st_size, fst.st_mtime_ns)
    if key not in _tables:
        if len(_tables) >= 16:
            _tables.clear()
        images = _Images(folder)
        rows, label_key, no_label_column, columns_error = _read_label_rows(path, images.find)
        _tables[key] = _LabelTable(rows, label_key, no_label_column, images, columns_error)
    return _tables[key]


def _label_column(path: Path, columns: list[str], file_col: int) -> int | None:
    """The label column: one named as labels, else the only column beside the file's; None where there is no
    other column."""
    lower = [c.strip().lower() for c in columns]
    for name in LABEL_COLUMNS:
        if name in lower and lower.index(name) != file_col:
            return lower.index(name)
    others = [i for i in range(len(columns)) if i != file_col]
    if len(others) <= 1:
        return others[0] if others else None
    raise DatasetError(f"{path}: cannot tell which column holds the labels (columns: {columns}); name it one of "
                       f"{', '.join(LABEL_COLUMNS)}, or keep one column beside {columns[file_col]!r}")


def _read_label_text(path: Path) -> str:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read the label file ({e})") from e


def _csv_entries(path: Path, text: str, names_image: Callable[[str], object]
                 ) -> tuple[list[str], int | None, list[tuple[int, list[str]]], bool]:
    """(columns, the file column or None for metadata.csv without ``file_name``, (line, cells) per non-blank
    entry, whether the file has no header) of a CSV label file (``,``, ``;`` or tab separated)."""
    try:
        try:
            sample = "".join(text.splitlines(keepends=True)[:20])
            delimiter = csv.Sniffer().sniff(sample, delimiters=",;\t").delimiter
        except csv.Error:
            delimiter = ","
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
        header = next(reader, None)
        if not header:
            raise DatasetError(f"{path}: an empty label file (expected {LABEL_FILE_FORMS})")
        cols = [c.strip() for c in header]
        headerless = bool(names_image(cols[0]))
        file_col: int | None = 0
        if headerless:  # the first line is an entry: file, label
            log.info("%s: read without a header (its first line names the image %s)", path, cols[0])
            cols = ["file", "label"][:len(cols)] + cols[2:]
        elif path.name.lower() == "metadata.csv":
            file_col = cols.index("file_name") if "file_name" in cols else None
        entries = [(reader.line_num, header)] if headerless else []
        entries += ((reader.line_num, row) for row in reader)
    except csv.Error as e:
        raise DatasetError(f"{path}: cannot read the label file ({e})") from e
    return cols, file_col, [(line, row) for line, row in entries if any(c.strip() for c in row)], headerless


def _read_label_rows(path: Path, names_image: Callable[[str], object] = lambda name: False
                     ) -> tuple[list[tuple[int, str, Any]], str | None, str | None, str | None]:
    """((line, file name or stem, label or None) per entry, the label column's name, why the file has no label
    column or None, why the label column cannot be told or None) of a label
    file: a CSV (``,``, ``;`` or tab separated) with a header whose file column is ``file_name`` (metadata.csv) or
    the first one (Kaggle's), or without a header where its first cell names an image (``names_image``): then the
    columns are file, label; or metadata.jsonl, its label key taken over all lines."""
    text = _read_label_text(path)
    if path.suffix.lower() == ".jsonl":
        return (*_read_jsonl(path, text), None)
    cols, file_col, entries, headerless = _csv_entries(path, text, names_image)
    if file_col is None:
        raise DatasetError(f"{path}: no 'file_name' column (columns: {cols})")
    columns_error = None
    if headerless:
        label_col = 1 if len(cols) > 1 else None
    else:
        try:
            label_col = _label_column(path, cols, file_col)
        except DatasetError as e:  # several other columns: refused when read for single labels
            label_col, columns_error = None, str(e)
    rows: list[tuple[int, str, Any]] = []
    for line, row in entries:
        if len(row) <= max(file_col, label_col or 0):
            raise DatasetError(f"{path}, line {line}: {len(row)} column(s), the header has {len(cols)}")
        rows.append((line, row[file_col].strip(), None if label_col is None else row[label_col].strip()))
    if columns_error is not None:
        return rows, None, None, columns_error
    if label_col is None:
        return rows, None, f"no label column (columns: {cols})", None
    return rows, cols[label_col], None, None


def _jsonl_entries(path: Path, text: str) -> list[tuple[int, dict]]:
    """(line, object) per non-blank line of a metadata.jsonl; each must be an object with a ``file_name``."""
    entries: list[tuple[int, dict]] = []
    for line, s in enumerate(text.splitlines(), start=1):
        if not s.strip():
            continue
        try:
            entry = parse_json(s)
        except ValueError as e:  # malformed, nested too deeply, an integer of too many digits
            raise DatasetError(f"{path}, line {line}: not a JSON object ({e})") from None
        if not isinstance(entry, dict):
            raise DatasetError(f"{path}, line {line}: not a JSON object")
        if "file_name" not in entry:
            raise DatasetError(f"{path}, line {line}: no 'file_name' key (keys: {list(entry)})")
        entries.append((line, entry))
    return entries


def _read_jsonl(path: Path, text: str) -> tuple[list[tuple[int, str, Any]], str | None, str | None]:
    """_read_label_rows for metadata.jsonl: the label key is one named as labels on any line, else the only key
    beside ``file_name``, which every line must then have. A JSON list or object is kept as it is (multi-label
    reading takes lists; single-label reading refuses them)."""
    entries = _jsonl_entries(path, text)
    others = list(dict.fromkeys(k for _, e in entries for k in e if k != "file_name"))
    lower = [k.strip().lower() for k in others]
    named = [others[lower.index(n)] for n in LABEL_COLUMNS if n in lower]
    first = set(entries[0][1]) if entries else set()
    differ = next(((line, e) for line, e in entries if set(e) != first), None)
    if named:
        key: str | None = named[0]
    elif not others:
        key = None
    elif len(others) == 1 and differ is None:
        key = others[0]
    else:
        lines = (f"; line {entries[0][0]} has the keys {list(entries[0][1])}, line {differ[0]} {list(differ[1])}"
                 if differ is not None else "")
        raise DatasetError(f"{path}: cannot tell which key holds the labels (keys: {['file_name', *others]}{lines}); "
                           f"name it one of {', '.join(LABEL_COLUMNS)} on every line, or keep one key beside "
                           f"'file_name'")
    rows = [(line, str(e["file_name"]), None if key is None or e.get(key) is None
             else e[key] if isinstance(e[key], (list, dict)) else str(e[key])) for line, e in entries]
    return rows, key, (f"no label key (keys: {['file_name', *others]})" if key is None else None)


def _scan_label_file(root: Path, path: Path, classes: list[str] | None) -> tuple[list[str], list[int], list[str]]:
    """scan_folder's result for the images below ``root`` labelled by ``path``; file names are relative to
    ``root``."""
    table = _label_table(path, root)
    held_out = classes is not None
    if table.columns_error is not None:
        raise DatasetError(f"{table.columns_error}; for one 0/1 column per label (multi-label targets), train with "
                           f"--multi-label")
    for line, _, label in table.rows:  # str() of a list would make one class per combination of labels
        if isinstance(label, (list, dict)):
            raise DatasetError(f"{path}, line {line}: the label {table.label_key!r} is a JSON "
                               f"{type(label).__name__} ({json.dumps(label)[:80]}); vitlab trains single-label "
                               f"classifiers by default, one label per image (a string or an int); for multi-label "
                               f"targets (a list of labels per image), train with --multi-label (recipe field "
                               f"multi_label: true)")
    if table.no_labels is not None:
        raise DatasetError(f"{path}: gives no labels ({table.no_labels}), so the images of {root} cannot be "
                           f"{'measured' if held_out else 'trained'} on; expected {LABEL_FILE_FORMS}")
    seen: dict[str, int] = {}
    entries: list[tuple[str, str]] = []
    unlabelled: tuple[int, str] | None = None
    labelled: tuple[int, str] | None = None
    for line, given, label in table.rows:
        name = _named_image(path, line, given, root, table)
        if not label:
            if not held_out:
                raise DatasetError(f"{path}, line {line}: {given!r} has "
                                   f"{'an empty label' if label == '' else 'no label (null or no label key)'}")
            unlabelled = unlabelled or (line, given)
            continue
        labelled = labelled or (line, given)
        if name in seen:
            raise DatasetError(f"{path}, lines {seen[name]} and {line}: {name} is listed twice")
        seen[name] = line
        entries.append((os.path.join(root, name), class_name(label)))
    if unlabelled and labelled:
        raise DatasetError(f"{path}: line {unlabelled[0]} ({unlabelled[1]!r}) has no label but line {labelled[0]} "
                           f"({labelled[1]!r}) has one; label every image of a held-out split, or none (it is then "
                           f"left out as unlabelled)")
    if not entries:
        raise DatasetError(f"{path}: lists no images (expected {LABEL_FILE_FORMS})")
    _warn_if_values(path, table.label_key, [c for _, c in entries])
    classes = _split_classes(sorted({c for _, c in entries}), classes, f"{path}: labels")
    if unlisted := [n for n in table.images.rel if n not in seen]:
        _warn_once("unlisted", root, "%s: %d image(s) not listed in %s are not used (e.g. %s)", root,
                   len(unlisted), path.name, unlisted[0])
    index = {c: i for i, c in enumerate(classes)}
    entries.sort(key=lambda e: (index[e[1]], e[0]))
    return [p for p, _ in entries], [index[c] for _, c in entries], list(classes)


def scan_folder_multilabel(root: Path, classes: list[str] | None = None
                            ) -> tuple[list[str], list[tuple[int, ...]], list[str]]:
    """(paths, label indices per image, label names) for the images below ``root`` labelled by its label file
    with several labels per image (see the module docstring); paths sorted. ``classes`` (a held-out split's: the
    training split's label names) fixes the order; a label outside it is an error."""
    path = labelled_by(root)
    if path is None:
        raise DatasetError(f"{root}: --multi-label reads the labels of each image from a label file, and there is none "
                           f"(class folders give one label per image); expected {MULTI_LABEL_FORMS}")
    table = _label_table(path, root)
    rows, header_names = _read_multilabel_rows(path, table.images.find)
    held_out = classes is not None
    seen: dict[str, int] = {}
    entries: list[tuple[str, list[str]]] = []
    for line, given, tags in rows:
        name = _named_image(path, line, given, root, table)
        if tags is None:
            raise DatasetError(f"{path}, line {line}: {given!r} has no labels (null or no label key); give [] for an "
                               f"image without any of the labels")
        if name in seen:
            raise DatasetError(f"{path}, lines {seen[name]} and {line}: {name} is listed twice")
        seen[name] = line
        entries.append((os.path.join(root, name), tags))
    if not entries:
        raise DatasetError(f"{path}: lists no images (expected {MULTI_LABEL_FORMS})")
    found = header_names if header_names is not None else sorted({t for _, tags in entries for t in tags})
    if not found and not held_out:
        raise DatasetError(f"{path}: no image has any label (every label list is empty)")
    names = _split_classes(found, classes, f"{path}: labels")
    if unlisted := [n for n in table.images.rel if n not in seen]:
        _warn_once("unlisted", root, "%s: %d image(s) not listed in %s are not used (e.g. %s)", root,
                   len(unlisted), path.name, unlisted[0])
    index = {c: i for i, c in enumerate(names)}
    entries.sort(key=lambda e: e[0])
    return ([p for p, _ in entries], [tuple(sorted({index[t] for t in tags})) for _, tags in entries],
            list(names))


def _read_multilabel_rows(path: Path, names_image: Callable[[str], object]
                          ) -> tuple[list[tuple[int, str, list[str] | None]], list[str] | None]:
    """((line, file name or id, label names or None where the image has no label value) per entry, the label names
    of a file of 0/1 columns in its header's order, else None) of a label file read for several labels per
    image (names in NFC)."""
    text = _read_label_text(path)
    if path.suffix.lower() == ".jsonl":
        records = [(line, str(e["file_name"]), e) for line, e in _jsonl_entries(path, text)]
        keys = list(dict.fromkeys(k for _, _, e in records for k in e if k != "file_name"))
        where = "key"
    else:
        cols, file_col, entries, headerless = _csv_entries(path, text, names_image)
        if file_col is None:
            raise DatasetError(f"{path}: no 'file_name' column (columns: {cols})")
        if len(set(cols)) != len(cols):
            raise DatasetError(f"{path}: the header names a column twice (columns: {cols})")
        records = []
        for line, row in entries:
            if len(row) != len(cols):
                raise DatasetError(f"{path}, line {line}: {len(row)} column(s), the header has {len(cols)}")
            records.append((line, row[file_col].strip(), {c: v for j, (c, v) in enumerate(zip(cols, row))
                                                          if j != file_col}))
        keys = [c for j, c in enumerate(cols) if j != file_col]
        where = "column"
    lower = [k.strip().lower() for k in keys]
    named = [keys[lower.index(n)] for n in MULTI_LABEL_COLUMNS if n in lower]
    if named or len(keys) == 1:
        key = named[0] if named else keys[0]
        return _tag_rows(path, [(line, given, e.get(key)) for line, given, e in records], key), None
    if not keys:
        raise DatasetError(f"{path}: no label {where} (expected {MULTI_LABEL_FORMS})")
    names = [class_name(k.strip()) for k in keys]
    if len(set(names)) != len(names):
        raise DatasetError(f"{path}: two label {where}s have the same name ({keys})")
    rows: list[tuple[int, str, list[str] | None]] = []
    for line, given, e in records:
        tags = []
        for k, name in zip(keys, names):
            v = e.get(k)
            if isinstance(v, str):
                v = v.strip()
            if v in (1, "1", "1.0", True):
                tags.append(name)
            elif v not in (0, "0", "0.0", False):
                raise DatasetError(f"{path}, line {line}, {where} {k!r}: {json.dumps(v)[:40]} is not 0 or 1 (with "
                                   f"several {where}s beside the file's, none named "
                                   f"{'/'.join(MULTI_LABEL_COLUMNS)}, each is one label, 0 or 1 for every image)")
        rows.append((line, given, tags))
    return rows, names


def _tag_rows(path: Path, cells: list[tuple[int, str, Any]], key: str
              ) -> list[tuple[int, str, list[str] | None]]:
    """The tags of each row from its label value: a JSON list, or text split by the file's one separator (the
    first of ``TAG_SEPARATORS`` it holds; white space where it holds none); None for a null or missing value."""
    first: dict[str, int] = {}  # separator -> the first line holding it
    for line, _, v in cells:
        if isinstance(v, str):
            for sep in TAG_SEPARATORS:
                if sep in v:
                    first.setdefault(sep, line)
    if len(first) > 1:
        (a, la), (b, lb) = sorted(first.items(), key=lambda kv: kv[1])[:2]
        row = next(v for line, _, v in cells if line == lb)
        raise DatasetError(f"{path}, line {lb}: the labels {row!r} hold {b!r} but line {la} separates labels with "
                           f"{a!r}; expected one separator in the whole file: spaces (Planet's tags), or one of "
                           f"{' '.join(TAG_SEPARATORS)} (then spaces belong to the label names)")
    sep = next(iter(first), None)
    rows: list[tuple[int, str, list[str] | None]] = []
    for line, given, v in cells:
        if v is None:
            rows.append((line, given, None))
            continue
        if isinstance(v, dict) or (isinstance(v, list) and any(isinstance(t, (list, dict)) or t is None for t in v)):
            raise DatasetError(f"{path}, line {line}: the label {key!r} is {json.dumps(v)[:80]}; expected a list of "
                               f"label names (strings or numbers) per image")
        if isinstance(v, list):
            tags = [str(t).strip() for t in v]
        else:
            v = str(v)
            tags = [t.strip() for t in (v.split(sep) if sep is not None else v.split())]
        rows.append((line, given, sorted({class_name(t) for t in tags if t})))
    return rows


def _warn_if_values(path: Path, column: str, labels: list[str]) -> None:
    """Warn when the labels look like a regression target (all numbers, some with a fraction, or nearly all
    distinct): each value would become a class."""
    try:
        values = [float(v) for v in labels]
    except ValueError:
        return
    distinct = len(set(labels))
    fractional = [v for v in values if math.isfinite(v) and not v.is_integer()]
    if fractional or (len(labels) >= 20 and distinct >= 0.9 * len(labels)):
        _warn_once("numeric labels", path, "%s: the label column %r holds numbers (%d distinct values over %d "
                   "images, e.g. %s), and each value becomes a class: vitlab trains single-label classifiers; for "
                   "regression, train with vitlab.train.fit and a criterion of your own", path, column, distinct,
                   len(labels), ", ".join(sorted(set(labels), key=labels.index)[:3]))


def _split_classes(found: list[str], classes: list[str] | None, where: str) -> list[str]:
    """The classes of a split: its own (``found``), or for a held-out split the training split's ``classes``, of
    which ``found`` must be a subset (an error starting with ``where`` names those that are not)."""
    if classes is None:
        return found
    classes = [class_name(c) for c in classes]
    extra = sorted(set(found) - set(classes))
    if extra:
        raise DatasetError(f"{where} {extra} do not exist in the training split (classes: {classes})")
    return classes


# guess_channels reads every file's header up to this many files (about 40 us a file from a warm disk cache: 2 s
# for CIFAR-10's 50,000 JPEGs), a seeded sample of this many beyond
GUESS_CHANNELS_MAX_FILES = 100_000


def guess_channels(paths: list[str], labels: list[int], max_files: int = GUESS_CHANNELS_MAX_FILES) -> int:
    """1 if the headers of the files are all grayscale, else 3: mixed folders get 3 channels (grayscale images
    are then repeated to RGB). Headers are read (no pixels) from the first file of each class, then in a seeded
    random order, up to the first colour one; past ``max_files`` files, a seeded sample of that many is read
    instead, and a warning says so where it finds no colour one. Unreadable headers are left out. The answer is
    kept for the same files, unchanged (size and time stamp), as the splits of one source ask for the training
    files' channels each."""
    digest = hashlib.blake2b(repr(max_files).encode(), digest_size=16)
    for p in paths:
        digest.update(repr(_file_stamp(p)).encode())
    key = digest.hexdigest()
    with _channels_lock:
        if key in _channels_of:
            return _channels_of[key]
    found = _guess_channels(paths, labels, max_files)
    with _channels_lock:
        while len(_channels_of) >= 8:
            _channels_of.pop(next(iter(_channels_of)))
        _channels_of[key] = found
    return found


# guess_channels' recent answers, by a digest of the files' (path, size, modification time) stamps
_channels_of: dict[str, int] = {}
_channels_lock = threading.Lock()


def _file_stamp(path: str) -> tuple[str, int, int]:
    """(path, size, modification time in ns); -1s where the file cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return path, -1, -1
    return path, st.st_size, st.st_mtime_ns


def _guess_channels(paths: list[str], labels: list[int], max_files: int) -> int:
    firsts: dict[int, str] = {}
    for p, t in zip(paths, labels):
        firsts.setdefault(t, p)
    order = list(dict.fromkeys(firsts.values()))
    chosen = set(order)
    rest = [p for p in paths if p not in chosen]
    random.Random(0).shuffle(rest)  # a few colour files of one class are met early, whatever their names
    order += rest
    sampled = len(order) > max_files
    seen = 0
    for p in order[:max_files]:
        c = peek_channels(p)
        if c == 3:
            return 3
        seen += c is not None
    if not seen:
        return 3
    if sampled:
        _warn_once("grey-sample", Path(os.path.dirname(order[0])), "%d image files: the headers of a seeded "
                   "sample of %d (the first is %s) are all grayscale, so the data set is 1-channel; a colour image "
                   "among the others is converted to grayscale", len(order), max_files, order[0])
    return 1


def _sub_dirs(root: Path) -> list[str]:
    """The non-hidden sub-folders of ``root`` (links to folders included), sorted."""
    try:
        return sorted(e.name for e in os.scandir(root)
                      if e.is_dir() and listed_folder(e.name))
    except OSError as e:
        raise DatasetError(f"{root}: cannot list image folder ({e})") from e


def image_files_in(folder: Path) -> list[Path]:
    """The image files directly in ``folder`` (:func:`listed_image`), sorted; sub-folders are not read."""
    return sorted(folder / e.name for e in os.scandir(folder) if listed_image(e.name) and e.is_file())


def _holds_images(folder: Path) -> bool:
    """Whether ``folder`` holds image files itself (not only in sub-folders)."""
    try:
        return any(listed_image(e.name) and e.is_file() for e in os.scandir(folder))
    except OSError:
        return False


def _images_within(folder: Path, levels: int = 2) -> bool:
    """Whether ``folder`` or its sub-folders down to ``levels`` deep hold image files."""
    if _holds_images(folder):
        return True
    if levels <= 1:
        return False
    try:
        return any(_images_within(folder / d, levels - 1) for d in _sub_dirs(folder))
    except DatasetError:
        return False


def looks_like_split(name: str) -> bool:
    """Whether a folder name has a split's name as a word part (seg_train, val2017, seg_pred)."""
    return any(part in _SPLIT_WORDS for part in re.split(r"[^a-z]+", name.lower()))


def _split_dirs(root: Path, names: list[str], split: str) -> Path | None:
    """The one folder among ``names`` (sub-folders of ``root``) named as ``split``, whatever its case."""
    hits = [n for n in names if n.lower() in SPLIT_DIR_NAMES[split]]
    if len(hits) > 1:
        raise DatasetError(f"{root}: {' and '.join(hits)} both name the {split} split; keep one of them (rename "
                           f"or move the other out of {root})")
    return root / hits[0] if hits else None


def unlabelled_dir(folder: Path | None) -> bool:
    """Whether ``folder`` holds images without labels (:func:`unlabelled_reason`)."""
    return unlabelled_reason(folder) is not None


def unlabelled_reason(folder: Path | None) -> str | None:
    """Why ``folder`` holds images without labels: neither class folders nor a label file, or a label file that
    gives none (no label column; every label empty, null or -1); None where it is labelled."""
    if folder is None:
        return None
    if (path := labelled_by(folder)) is None:
        no_classes = not _sub_dirs(folder) and _holds_images(folder)
        return "no class folders, no label file" if no_classes else None
    why = _label_table(path, folder).no_labels
    return None if why is None else f"{path}: {why}"


def unlabelled_split_dirs(root: Path) -> dict[str, Path]:
    """The held-out split folders of ``root`` (``"val"``, ``"test"``) that :func:`folder_layout` leaves out as
    unlabelled (:func:`unlabelled_dir`)."""
    names = _sub_dirs(root)
    if _split_dirs(root, names, "train") is None or folder_layout(root)[0] == root:
        return {}
    return {s: d for s in ("val", "test") if unlabelled_dir(d := _split_dirs(root, names, s))}


def check_not_wrapper(root: Path) -> None:
    """Refuse a root whose only folder holds no images itself, only sub-folders: a wrapper (as zips add) whose
    contents are the data set, not one class."""
    names = _sub_dirs(root)
    if len(names) != 1 or _holds_images(root) or label_file(root) is not None:
        return
    inner = root / names[0]
    subs = _sub_dirs(inner)
    if subs and not _holds_images(inner):
        raise DatasetError(f"{root}: its only folder, {names[0]}/, holds no images itself but the folders "
                           f"{', '.join(subs[:5])}{', ...' if len(subs) > 5 else ''}, which would make one class; "
                           f"if {names[0]}/ wraps the data set, give --data {inner}")


def folder_layout(root: Path) -> tuple[Path, Path | None, Path | None]:
    """(train dir, val dir or None, test dir or None). A root without a train split folder is one flat class
    folder set (returned as the train dir).

    Split folders are recognised by name, whatever the case (``SPLIT_DIR_NAMES``). A ``train`` folder holding
    images itself and no sub-folders is a class of a flat folder set (bus/, car/, train/) where folders that are
    not split folders stand beside it and it has no label file; where every folder is a split folder, it is the
    training split, read through its label file (an error without one). A train folder with sub-folders beside
    folders that hold images as classes do and are not split folders is ambiguous, and refused with an error that
    says how to proceed. A val or test folder of images without labels (:func:`unlabelled_reason`) is left out
    (None), with a warning; so is a label file of ``root`` itself beside the split folders.
    """
    names = _sub_dirs(root)
    train = _split_dirs(root, names, "train")
    if train is None:
        if like := [n for n in names if looks_like_split(n)]:
            _warn_once("split-like", root, "%s: the class folder(s) %s are named like data splits, not classes; "
                       "if they are splits, give --data the folder that holds them as train/ and val/ or test/",
                       root, ", ".join(like))
        return root, None, None
    if (unused := label_file(root)) is not None:
        _warn_once("label-file-beside-splits", root, "%s: not used: the split folders of %s are read instead (a "
                   "label file labels its own folder's images: one in each split folder, its file names relative "
                   "to it)", unused, root)
    others = [n for n in names if n.lower() not in SPLIT_NAMES]
    if not _sub_dirs(train) and _holds_images(train) and label_file(train) is None:
        if others:
            return root, None, None  # images, no class folders: "train" is a class beside the others
        raise DatasetError(
            f"{root}: {train.name}/ holds images but no class folders, and no label file gives their classes "
            f"(every folder of {root} is named as a split: {', '.join(names)}). Put each class's images in "
            f"{train}/<class>/, or give a label file: {train}/metadata.csv with a header file_name,label and a "
            f"line per image (Hugging Face imagefolder's), or {root}/{train.name}.csv with a header such as id,label "
            f"and lines <file name or its stem>,<class> (Kaggle's)")
    classes_beside = [n for n in others if _holds_images(root / n)]
    if classes_beside:
        shown = ", ".join(classes_beside[:5]) + (f" and {len(classes_beside) - 5} more"
                                                  if len(classes_beside) > 5 else "")
        raise DatasetError(
            f"{root}: {train.name}/ was taken for the training split ({train}/<class>/<images>), but {shown} "
            f"beside it hold images as class folders do, and would be left out. If {train.name!r} is a class, "
            f"rename its folder (e.g. {train.name}_) so that it is not read as a split; if it is the training "
            f"split, move {shown} into it (or out of {root})")
    if unread := [n for n in others if _images_within(root / n)]:
        _warn_once("unread", root, "%s: %s beside %s/ hold(s) images but is not read: not a split folder name "
                   "(%s)", root, ", ".join(f"{n}/" for n in unread), train.name,
                   "; ".join("/".join(v) for v in SPLIT_DIR_NAMES.values()))
    val, test = _split_dirs(root, names, "val"), _split_dirs(root, names, "test")
    for split, folder in (("val", val), ("test", test)):
        if why := unlabelled_reason(folder):
            instead = (f"split 'test' is {val.name}/ instead" if split == "test" and val is not None
                       and not unlabelled_dir(val) else
                       f"the held-out part is taken from {train.name}/ (val_fraction) instead")
            _warn_once("unlabelled", folder, "%s: images without labels (%s), unlabelled: left out; %s", folder,
                       why, instead)
    return (train, None if unlabelled_dir(val) else val, None if unlabelled_dir(test) else test)
