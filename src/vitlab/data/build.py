"""``build_dataset(source, split=...)``: one entry point for every data source vitlab reads.

Accepted forms of ``source``:
    "digits"                      scikit-learn's bundled 8x8 digits (stratified train/val/test split)
    "mnist:PATH" / "idx:PATH"     folder with MNIST-style IDX files (train-*/t10k-*, raw or .gz)
    "cifar:PATH"                  CIFAR-10 / CIFAR-100 python-batch folder
    "folder:PATH"                 image folder: PATH/<class>/*.png or PATH/{train,val|test}/<class>/*, or
                                  folders of images labelled by a label file (vitlab.data.folder.label_file)
    "PATH"                        any of the three above, recognised by content; a folder of images without
                                  class folders or label file is read only with ``unlabelled=True``
                                  (self-supervised pre-training: every image below it, one class "images")

Splits are disjoint and a pure function of (source, val_fraction, seed, split_method). Where the source has no held-out
set of its own, "val" is a seeded stratified ``val_fraction`` of the training data and "train" the rest; of image
files, drawn by ``split_method`` (:mod:`vitlab.data.splits`: by default stable under added or removed files), and
the dataset's ``split_from`` says what it was drawn from (per class: file count and a hash of the names).
"test" is the source's own test set (MNIST t10k, CIFAR test batch, a ``test/`` folder); a source
without one (a flat image folder) answers "test" with its validation part, and says so in the log.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

from vitlab.data.dataset import ImageFileDataset, TensorImageDataset, Transform, VisionDataset
from vitlab.data.errors import DatasetError
from vitlab.data.folder import (
    check_not_wrapper,
    folder_layout,
    guess_channels,
    label_file,
    labelled_by,
    scan_folder,
    unlabelled_reason,
    unlabelled_split_dirs,
)
from vitlab.data.image import expand_image_paths, listed_folder, listed_image
from vitlab.data.sources import has_idx_files, is_cifar_dir, read_cifar, read_digits, read_mnist
from vitlab.data.splits import SPLIT_METHOD, check_split_method, relative_keys, split_source, stratified_split

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# The digits test split is drawn with a fixed seed so that test numbers stay comparable across the
# training seeds; validation is carved from the remainder with the caller's seed.
DIGITS_TEST_FRACTION = 0.2
DIGITS_TEST_SEED = 1234

ACCEPTED_FORMS = (
    "'digits' (scikit-learn's 8x8 digits); "
    "'mnist:PATH' or 'idx:PATH' (folder with train-images-idx3-ubyte[.gz] etc.); "
    "'cifar:PATH' (CIFAR-10/100 python batches: data_batch_*, test_batch, batches.meta or train, test, meta); "
    "'folder:PATH' (PATH/<class>/<images> or PATH/train|val|test/<class>/<images>, or images labelled by "
    "PATH/metadata.csv or PATH/train.csv beside PATH/train/); "
    "or a plain PATH to any of these, recognised by its content"
)
_PREFIX = re.compile(r"^(digits|mnist|idx|cifar|cifar10|cifar100|folder|imagefolder):(.*)$", re.IGNORECASE)


def parse_source(source: str | Path) -> tuple[str, Path | None]:
    """(kind, path) with kind in {"digits", "mnist", "cifar", "folder"}; raises DatasetError otherwise."""
    s = str(source).strip()
    if s.lower() in ("digits", "sklearn:digits", "digits:"):
        return "digits", None
    m = _PREFIX.match(s)
    if m:
        kind = m.group(1).lower()
        kind = {"idx": "mnist", "cifar10": "cifar", "cifar100": "cifar", "imagefolder": "folder"}.get(kind, kind)
        if kind == "digits":
            return "digits", None
        path = Path(m.group(2)).expanduser()
        if not path.is_dir():
            raise DatasetError(f"data source {s!r}: {path} is not a folder")
        return kind, path
    path = Path(s).expanduser()
    if not path.exists():
        raise DatasetError(f"unknown data source {s!r}: not a known name and no such path. "
                           f"Accepted forms: {ACCEPTED_FORMS}")
    if not path.is_dir():
        raise DatasetError(f"data source {s!r}: {path} is a file; a data source is a folder. "
                           f"Accepted forms: {ACCEPTED_FORMS}")
    if is_cifar_dir(path):
        return "cifar", path
    if has_idx_files(path):
        return "mnist", path
    if any(p.is_dir() and listed_folder(p.name) for p in path.iterdir()):
        return "folder", path
    if any(listed_image(p.name) for p in path.iterdir()):
        if label_file(path) is not None:
            return "folder", path  # images labelled by a label file
        return "images", path  # no class folders: unlabelled images (pre-training only)
    raise DatasetError(f"data source {s!r}: cannot tell what {path} holds (no CIFAR batches, no IDX files, "
                       f"no class folders). Accepted forms: {ACCEPTED_FORMS}")


def _pick(kept: list[int], held: list[int], split: str) -> list[int]:
    return held if split == "val" else kept


def _check_split(split: str, val_fraction: float) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")


def _subset_tensor(images, targets: Sequence[int], idx: list[int], **kw) -> TensorImageDataset:
    ds = TensorImageDataset(images[idx], [targets[i] for i in idx], **kw)
    ds.indices = list(idx)
    return ds


def build_dataset(
    source: str | Path,
    *,
    split: str = "train",
    val_fraction: float = 0.1,
    seed: int = 0,
    transform: Transform | None = None,
    skip_bad_images: bool = False,
    unlabelled: bool = False,
    split_method: str = SPLIT_METHOD,
) -> VisionDataset:
    """Build the ``split`` ("train" | "val" | "test") of ``source``; see the module docstring for the forms.

    Args:
        val_fraction: share of the training data held out as "val" when the source has no val set.
        seed: seeds the held-out selection (stratified per class).
        transform: applied to the uint8 (C, H, W) image in ``__getitem__``.
        skip_bad_images: undecodable images yield ``None`` (dropped by ``create_loader``'s collate)
            instead of raising :class:`BadImageError`.
        unlabelled: the labels will not be used (self-supervised pre-training), so a folder of images without
            class folders is accepted, as one class.
        split_method: how image files are held out (:mod:`vitlab.data.splits`): ``"path-hash-v1"``, or
            ``"randperm"`` for a run recorded without a method. Arrays (digits, MNIST, CIFAR) always use randperm.
    """
    _check_split(split, val_fraction)
    check_split_method(split_method)
    kind, path = parse_source(source)
    if unlabelled and kind == "folder" and folder_layout(path)[1:] == (None, None) and _loose_images(path):
        kind = "images"  # images beside sub-folders: without labels, every image below counts
    kw = {"transform": transform, "skip_bad_images": skip_bad_images}
    if split == "val" and val_fraction == 0.0 and not (kind == "folder" and folder_layout(path)[1] is not None):
        raise DatasetError(f"{source}: split='val' requested with val_fraction=0 (the source has no "
                           f"validation set of its own)")

    if kind == "digits":
        images, targets, classes = read_digits()
        rest, test_idx = stratified_split(targets, DIGITS_TEST_FRACTION, DIGITS_TEST_SEED)
        if split == "test":
            idx = test_idx
        else:
            kept, held = stratified_split([targets[i] for i in rest], val_fraction, seed)
            idx = [rest[i] for i in _pick(kept, held, split)]
        desc = f"digits[{split}, seed={seed}]" if split != "test" else "digits[test]"
        ds = _subset_tensor(images, targets, idx, classes=classes, source=desc, **kw)

    elif kind in ("mnist", "cifar"):
        # both ship a fixed test set; train and val are a seeded stratified split of the training set
        read, test_name = (read_mnist, "t10k") if kind == "mnist" else (read_cifar, "test")
        if split == "test":
            images, targets, classes = read(path, test_name)
            ds = TensorImageDataset(images, targets, classes=classes, source=f"{kind}:{path}[test]", **kw)
        else:
            images, targets, classes = read(path, "train")
            idx = _pick(*stratified_split(targets, val_fraction, seed), split)
            ds = _subset_tensor(images, targets, idx, classes=classes,
                                source=f"{kind}:{path}[{split}, val_fraction={val_fraction}, seed={seed}]", **kw)

    elif kind == "images":
        if not unlabelled:
            raise DatasetError(f"data source {source!r}: {path} holds images but no class folders; labelled data "
                               f"needs one sub-folder per class ({path}/<class>/<images>). (vitlab pretrain reads "
                               f"such a folder as unlabelled images.)")
        ds = _build_unlabelled(path, split, val_fraction, seed, split_method, **kw)

    else:
        ds = _build_folder(path, split, val_fraction, seed, split_method, labelled=not unlabelled, **kw)

    log.info("dataset %s: %d images, %d classes", ds.source, len(ds), len(ds.classes))
    if len(ds) == 0:
        raise DatasetError(empty_split_message(ds.source, split, val_fraction))
    return ds


def empty_split_message(source: str, split: str, val_fraction: float) -> str:
    """The error for an empty ``split``: where the held-out part is empty because nothing was held out, how to
    get one."""
    hint = ""
    if split in ("val", "test") and val_fraction <= 0:
        hint = (f" (val_fraction {val_fraction:g} holds none of the training images out, and the source has no "
                f"{split}/ folder: give it one, or hold a part out, e.g. --set val_fraction=0.1)")
    return f"{source}: split {split!r} is empty{hint}"


def _loose_images(root: Path) -> list[str]:
    """Image files directly in ``root`` (not in a class folder)."""
    return sorted(e.name for e in root.iterdir() if e.is_file() and listed_image(e.name))


def _build_unlabelled(root: Path, split: str, val_fraction: float, seed: int, split_method: str,
                      **kw) -> ImageFileDataset:
    """Every image below ``root`` as one class; "val" (and "test") a seeded ``val_fraction`` of them."""
    paths = expand_image_paths([root])
    targets = [0] * len(paths)
    in_chans = guess_channels(paths, targets)
    if split == "test":
        log.info("%s has no test/ folder: split 'test' is the validation part", root)
    keys = relative_keys(paths, root)
    split_keys = keys if split_method == SPLIT_METHOD else None
    idx = _pick(*stratified_split(targets, val_fraction, seed, keys=split_keys), "val" if split == "test" else split)
    ds = ImageFileDataset([paths[i] for i in idx], [0] * len(idx), classes=["images"], in_chans=in_chans,
                          source=f"images:{root}[{split}, val_fraction={val_fraction}, seed={seed}]", **kw)
    ds.split_from = split_source(keys, targets, ["images"])
    return ds


def check_labelled_split(source: str | Path, split: str) -> None:
    """Raise DatasetError where ``split`` of an image folder is a folder of unlabelled images (which
    :func:`build_dataset` leaves out, answering with the held-out part of the training images instead): for a
    command that measures a model on that folder."""
    kind, path = parse_source(source)
    if kind != "folder" or split not in ("val", "test"):
        return
    if (folder := unlabelled_split_dirs(path).get(split)) is not None:
        raise DatasetError(f"{folder}: the {split} folder holds images without labels ({unlabelled_reason(folder)}), "
                           f"so a model cannot be measured on it; label it (class folders, or "
                           f"{folder}/metadata.csv with a header file_name,label) or choose another split")


def _build_folder(root: Path, split: str, val_fraction: float, seed: int, split_method: str, *,
                  labelled: bool = True, **kw) -> ImageFileDataset:
    train_dir, val_dir, test_dir = folder_layout(root)
    if labelled and train_dir == root:
        check_not_wrapper(root)
    paths, targets, classes = scan_folder(train_dir)
    if labelled_by(train_dir) is None and (loose := _loose_images(train_dir)):
        log.warning("%s: %d image(s) directly in the folder, not in a class folder, are not used (e.g. %s)",
                    train_dir, len(loose), loose[0])
    # Channels are decided from the training files, so every split of one source agrees.
    in_chans = guess_channels(paths, targets)
    if split == "test" and test_dir is None:
        log.info("%s has no test/ folder%s: split 'test' is the validation part", root,
                 " of labelled images" if "test" in unlabelled_split_dirs(root) else "")
        split_eff = "val"
    else:
        split_eff = split
    split_from = None  # what a held-out split was drawn from
    if split_eff == "test":
        paths, targets, _ = scan_folder(test_dir, classes)
        desc = f"folder:{test_dir}"
    elif split_eff == "val" and val_dir is not None:
        paths, targets, _ = scan_folder(val_dir, classes)
        desc = f"folder:{val_dir}"
    elif val_dir is not None:  # train, with a separate val folder: all of train/
        desc = f"folder:{train_dir}"
    else:
        keys = relative_keys(paths, train_dir)
        split_from = split_source(keys, targets, classes)
        kept, held = stratified_split(targets, val_fraction, seed, keys=keys if split_method == SPLIT_METHOD else None)
        if split_eff == "train" and len(held) > max(2 * val_fraction, val_fraction + 0.05) * len(targets):
            if test_dir is not None:  # test/ measures the run: nothing need be held out of train/
                advice = (f"--set val_fraction=0 keeps them all for training (the run is then measured on "
                          f"{test_dir.name}/ only, without validation during training)")
            else:  # the held-out part is also the test set here: val_fraction=0 would leave nothing to test on
                advice = (f"a val/ folder of your own keeps more for training: {root}/train/<class>/ for training, "
                          f"{root}/val/<class>/ for the images to measure it on")
            log.warning("%s: the held-out split takes %d of %d images (%.0f%%, not %.0f%%): every class with two "
                        "or more images gives at least one; with classes this small, %s", train_dir, len(held),
                        len(targets), 100 * len(held) / len(targets), 100 * val_fraction, advice)
        idx = _pick(kept, held, split_eff)
        paths, targets = [paths[i] for i in idx], [targets[i] for i in idx]
        desc = f"folder:{train_dir}[{split}, val_fraction={val_fraction}, seed={seed}]"
    ds = ImageFileDataset(paths, targets, classes=classes, in_chans=in_chans, source=desc, **kw)
    if split_from is not None:
        ds.split_from = split_from
    return ds
