"""Detection and segmentation data: COCO-format JSON + image folder, VOC-style mask-PNG folders, and
augmentations that move boxes and masks with the pixels.

A sample is a dict: ``image`` (C, H, W), ``boxes`` (N, 4) xyxy in pixels, ``labels`` (N,) contiguous
class indices, and/or ``mask`` (H, W) int64 class per pixel (``ignore_index`` where unlabelled). The
transforms (:class:`DenseTransform`: flip, resize, crop) change all of them together; at the end the
image is normalised and the boxes become DETR's normalised (cx, cy, w, h) of the transformed image.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from vitlab.checkpoints.io import parse_json
from vitlab.data.dataset import SkipsBadImages
from vitlab.data.errors import BadImageError, DatasetError
from vitlab.data.folder import image_files_in, leaves_folder
from vitlab.data.functional import normalize, resize, to_float
from vitlab.data.image import load_image, to_channels

log = logging.getLogger(__name__)

Sample = dict[str, Any]

# Pillow modes of a mask of class indices: grey (8, 16 or 32 bit), palette, and 1-bit (classes 0 and 1, what
# Image.fromarray of a boolean array writes)
MASK_MODES = ("1", "L", "P", "I", "I;16", "I;16L", "I;16B")
SKIP_HINT = "--skip-bad-images skips such files"

# ------------------------------------------------------------------------------------ transforms


def hflip(s: Sample) -> Sample:
    """Mirror left-right: x -> W - x for the boxes (their corners swap)."""
    w = s["image"].shape[-1]
    out = {**s, "image": s["image"].flip(-1)}
    if "boxes" in s:
        b = s["boxes"]
        out["boxes"] = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
    if "mask" in s:
        out["mask"] = s["mask"].flip(-1)
    return out


def resize_sample(s: Sample, size: tuple[int, int]) -> Sample:
    """Resize to (H, W): bilinear image, nearest mask, boxes scaled per axis."""
    h, w = s["image"].shape[-2:]
    out = {**s, "image": resize(s["image"], size, "bilinear")}
    if "boxes" in s:
        sy, sx = size[0] / h, size[1] / w
        out["boxes"] = s["boxes"] * torch.tensor([sx, sy, sx, sy], dtype=s["boxes"].dtype)
    if "mask" in s:
        out["mask"] = resize(s["mask"][None], size, "nearest")[0]  # pixel centres, as Pillow's NEAREST
    return out


def crop_sample(s: Sample, top: int, left: int, height: int, width: int) -> Sample:
    """Crop the region; boxes are shifted and clipped to it, and those left without area are dropped."""
    out = {**s, "image": s["image"][..., top:top + height, left:left + width]}
    if "boxes" in s:
        b = s["boxes"] - torch.tensor([left, top, left, top], dtype=s["boxes"].dtype)
        b = torch.stack([b[:, 0].clamp(0, width), b[:, 1].clamp(0, height), b[:, 2].clamp(0, width),
                         b[:, 3].clamp(0, height)], dim=1)
        keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
        out["boxes"], out["labels"] = b[keep], s["labels"][keep]
    if "mask" in s:
        out["mask"] = s["mask"][top:top + height, left:left + width]
    return out


def _shorter_side_size(h: int, w: int, shorter: int, max_size: int | None) -> tuple[int, int]:
    """DETR's resize: the shorter side to ``shorter`` unless the longer would exceed ``max_size``."""
    if max_size is not None:
        lo, hi = min(h, w), max(h, w)
        if hi / lo * shorter > max_size:
            shorter = int(round(max_size * lo / hi))
            if shorter < 1:  # a 3 x 900 strip at a small size: one row, the longer side at the limit
                return (1, max_size) if h <= w else (max_size, 1)
    if h <= w:
        return shorter, int(shorter * w / h)
    return int(shorter * h / w), shorter


@dataclass
class DenseTransform:
    """Training or evaluation transform of a detection / segmentation sample.

    Args:
        size: shorter side after resizing (a sequence: one drawn per sample, DETR's multi-scale);
            ``square=True`` resizes to (size, size) instead (fixed-size inputs, e.g. SETR / ViT).
        max_size: cap on the longer side (DETR: 1333).
        train: random horizontal flip (probability ``hflip``) and, with probability ``crop_prob``, a random crop of
            ``crop_scale`` of each side before resizing.
        mean / std: normalisation after scaling to [0, 1].
        channels: the model's input channels (grey images are repeated, RGB averaged).
        resize_mask: resize the mask with the image (training); False keeps the mask at its own size
            (flipped and cropped with the image all the same), so that evaluation scores the predictions,
            upsampled to it, against the user's masks rather than against copies squashed to the model's size
            (where a class a pixel or two wide vanishes).
    """

    size: int | Sequence[int] = 800
    max_size: int | None = 1333
    square: bool = False
    train: bool = False
    hflip: float = 0.5
    crop_prob: float = 0.0
    crop_scale: tuple[float, float] = (0.6, 1.0)
    mean: Sequence[float] = (0.485, 0.456, 0.406)
    std: Sequence[float] = (0.229, 0.224, 0.225)
    channels: int = 3
    resize_mask: bool = True
    generator: torch.Generator | None = None

    def _rand(self) -> float:
        return float(torch.rand((), generator=self.generator))

    def __call__(self, s: Sample) -> Sample:
        s = {**s, "image": to_channels(s["image"], self.channels)}
        if self.train:
            if self.hflip > 0 and self._rand() < self.hflip:
                s = hflip(s)
            if self.crop_prob > 0 and self._rand() < self.crop_prob:
                h, w = s["image"].shape[-2:]
                lo, hi = self.crop_scale
                ch = max(1, int(h * (lo + (hi - lo) * self._rand())))
                cw = max(1, int(w * (lo + (hi - lo) * self._rand())))
                top, left = int((h - ch) * self._rand()), int((w - cw) * self._rand())
                s = crop_sample(s, top, left, ch, cw)
        sizes = [self.size] if isinstance(self.size, int) else list(self.size)
        size = sizes[min(int(self._rand() * len(sizes)), len(sizes) - 1)] if self.train else sizes[-1]
        h, w = s["image"].shape[-2:]
        mask = None if self.resize_mask else s.pop("mask", None)
        s = resize_sample(s, (size, size) if self.square else _shorter_side_size(h, w, size, self.max_size))
        if mask is not None:
            s["mask"] = mask
        s["image"] = normalize(to_float(s["image"]), self.mean, self.std)
        if "boxes" in s:
            h, w = s["image"].shape[-2:]
            b = s["boxes"]
            s["boxes_xyxy"] = b
            s["boxes"] = torch.stack([(b[:, 0] + b[:, 2]) / 2 / w, (b[:, 1] + b[:, 3]) / 2 / h,
                                      (b[:, 2] - b[:, 0]) / w, (b[:, 3] - b[:, 1]) / h], dim=1)
        return s


# ------------------------------------------------------------------------------------ bad files


def image_header(path: Path, *, oriented: bool = True) -> tuple[str, tuple[int, int]]:
    """(mode, (width, height)) of an image file from its header, without decoding the pixels; ``oriented``:
    the size :func:`~vitlab.data.image.load_image` gives it (EXIF rotations by 90 degrees swap the sides).
    A file Pillow cannot open raises :class:`BadImageError` naming it."""
    mode, size, _, orientation = _header(path, with_format=False)
    return mode, _oriented(size, orientation) if oriented else size


def _oriented(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """The (width, height) of stored pixels of ``size`` as displayed after the EXIF ``orientation``."""
    return (size[1], size[0]) if orientation in _QUARTER_TURNS else size


# EXIF orientations that turn the image by 90 degrees (its displayed width and height swap)
_QUARTER_TURNS = {5: "mirrored and rotated 90 degrees", 6: "rotated 90 degrees clockwise",
                  7: "mirrored and rotated 90 degrees", 8: "rotated 90 degrees counter-clockwise"}


def _header(path: Path, *, with_format: bool = True) -> tuple[str, tuple[int, int], str | None, int]:
    """(mode, stored (width, height), format (:func:`_format_of`; None without ``with_format``), EXIF orientation
    (1: none)) from the header."""
    from PIL import Image, UnidentifiedImageError

    from vitlab.data.image import _open_unguarded

    try:
        with _open_unguarded(path) as img:
            # Image.getexif reads the EXIF (and XMP) the header holds; a PNG's own getexif would decode the
            # whole file to look past the pixel data (an eXIf chunk there, rare, is not seen here)
            orientation = Image.Image.getexif(img).get(0x0112, 1)
            return img.mode, img.size, _format_of(path, img) if with_format else None, orientation
    except FileNotFoundError:
        raise BadImageError(f"{path}: file not found") from None
    except UnidentifiedImageError:
        raise BadImageError(f"{path}: not an image file Pillow can identify") from None
    except (OSError, SyntaxError, ValueError, TypeError, IndexError, EOFError) as e:
        raise BadImageError(f"{path}: cannot read the image header ({type(e).__name__}: {e})") from None


def _format_of(path: Path, img: Any) -> str | None:
    """Pillow's format name of an open image, with "(lossy)" / "(JPEG-compressed)" for the WebP and TIFF files
    whose compression is lossy."""
    fmt = img.format
    if fmt == "TIFF" and str(img.info.get("compression", "")).endswith("jpeg"):
        return "TIFF (JPEG-compressed)"
    if fmt == "WEBP" and _webp_is_lossy(path):
        return "WEBP (lossy)"
    return fmt


def _webp_is_lossy(path: Path) -> bool:
    """Whether a WebP file's first image chunk is VP8 (lossy) rather than VP8L (lossless), walking the RIFF
    chunks from the header."""
    with open(path, "rb") as f:
        f.seek(12)  # "RIFF", size, "WEBP"
        while len(head := f.read(8)) == 8:
            fourcc, size = head[:4], int.from_bytes(head[4:], "little")
            if fourcc in (b"VP8 ", b"ALPH"):  # ALPH: the alpha of a lossy image
                return True
            if fourcc == b"VP8L":
                return False
            if fourcc == b"ANMF":  # an animation frame: its own chunks start after 16 bytes of frame header
                f.seek(16, 1)
                continue
            f.seek(size + size % 2, 1)
    return False


# mask file formats whose compression changes pixel values (a class index off by one at every edge)
LOSSY_MASK_FORMATS = ("JPEG", "MPO", "WEBP (lossy)", "TIFF (JPEG-compressed)")


# ------------------------------------------------------------------------------------ COCO detection


class CocoDetection(SkipsBadImages, Dataset):
    """COCO-format detection: ``annotations`` JSON (``images``, ``annotations`` with ``bbox`` =
    [x, y, w, h] in pixels, ``categories``) and the folder the ``file_name``s are relative to.

    Categories become contiguous labels 0..K-1 in the order of their ids (``cat_ids[label]`` maps
    back). A split evaluated against a model takes the labels of the training set or checkpoint instead
    (``categories``): each category of this file is matched by its id (its name must then agree) or, for a
    reference that records names only, by name; a category the reference lacks is an error, one this file
    lacks is fine. Crowd annotations are skipped in training targets. Every annotation is checked when the
    data set is opened: a box outside its image, an unknown category id, a missing image or a malformed
    entry raises a :class:`DatasetError` naming the JSON file and the entry; :meth:`check_files` checks the
    image files from their headers (before training, say).

    Args:
        categories: the label order to use, one ``{"id", "name"}`` dict per label (either key may be
            missing); None: this file's own categories, sorted by id.
        categories_from: what ``categories`` come from, for the errors (e.g. "the training set").
        skip_bad_images: an undecodable image gives ``None`` (dropped by :meth:`collate`), counted.
    """

    def __init__(self, images: str | os.PathLike, annotations: str | os.PathLike, *,
                 transform: DenseTransform | None = None, tolerance: float = 1.0,
                 categories: Sequence[dict[str, Any]] | None = None, categories_from: str = "the model",
                 skip_bad_images: bool = False) -> None:
        self.root, self.ann_path = Path(images), Path(annotations)
        self.transform = transform
        try:
            data = parse_json(self.ann_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            folder = self.ann_path.parent
            there = sorted(p.name for p in folder.glob("*.json")) if folder.is_dir() else []
            raise DatasetError(f"{self.ann_path}: annotation file not found"
                               + (f" (JSON files there: {', '.join(there[:10])})" if there else "")) from None
        except OSError as e:
            raise DatasetError(f"{self.ann_path}: cannot read the annotation file ({e.strerror or e})") from None
        except ValueError as e:  # bad JSON (nested too deeply, an integer of too many digits) or not UTF-8
            raise DatasetError(f"{self.ann_path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise DatasetError(f"{self.ann_path}: COCO JSON must be an object with 'images', 'annotations' and "
                               f"'categories'")
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key), list):
                raise DatasetError(f"{self.ann_path}: COCO JSON needs a list {key!r}")
        try:
            own = sorted(({**c, "id": int(c["id"])} for c in data["categories"]), key=lambda c: c["id"])
        except (KeyError, TypeError, ValueError):
            raise DatasetError(f"{self.ann_path}: every entry of 'categories' needs an integer 'id'") from None
        if dup := sorted({c["id"] for c in own if sum(o["id"] == c["id"] for o in own) > 1}):
            raise DatasetError(f"{self.ann_path}: category id(s) {dup} appear more than once in 'categories'")
        if categories is None:
            self.categories = own
            label_of = {c["id"]: i for i, c in enumerate(own)}
            self.cat_ids = [c["id"] for c in own]
        else:
            self.categories = [dict(c) for c in categories]
            label_of = match_categories(own, self.categories, self.ann_path, categories_from)
            # a label this file has no category for keeps the reference's id (or none: -1 - label, never a
            # ground-truth id), so that its detections still count as false positives
            id_of = {label: cid for cid, label in label_of.items()}
            self.cat_ids = [int(c["id"]) if "id" in c else id_of.get(i, -1 - i)
                            for i, c in enumerate(self.categories)]
        self.classes = [str(c.get("name", c.get("id"))) for c in self.categories]
        self.images = data["images"]
        by_id: dict[int, dict] = {}
        for img in self.images:
            try:
                name, W, H = img["file_name"], img["width"], img["height"]
            except (KeyError, TypeError) as e:
                raise DatasetError(f"{self.ann_path}: image entry {img!r} lacks {e}") from None
            try:
                iid = int(img["id"])
            except (KeyError, TypeError, ValueError):
                raise DatasetError(f"{self.ann_path}: image entry {img!r}: 'id' must be an integer") from None
            if not isinstance(name, str) or leaves_folder(name):
                raise DatasetError(f"{self.ann_path}: image id {iid}: file_name {name!r} is not inside {self.root} "
                                   f"(file names are relative to {self.root}: no absolute paths, no '..')")
            if not (self.root / name).is_file():
                raise DatasetError(f"{self.ann_path}: image id {iid}: file {self.root / name} not found")
            if iid in by_id:  # their annotations could not be told apart
                raise DatasetError(f"{self.ann_path}: image id {iid} is given to both {by_id[iid]['file_name']} "
                                   f"and {name}")
            by_id[iid] = img
        self.targets: dict[int, list[tuple[list[float], int]]] = {int(i["id"]): [] for i in self.images}
        # crowd regions (iscrowd=1): not trained on; evaluation counts a detection inside one as neither right
        # nor wrong, as COCO's does
        self.crowd: dict[int, list[tuple[list[float], int]]] = {int(i["id"]): [] for i in self.images}
        for ann in data["annotations"]:
            aid = ann.get("id", "?")
            try:
                iid, cid, (x, y, w, h) = int(ann["image_id"]), int(ann["category_id"]), map(float, ann["bbox"])
            except (KeyError, TypeError, ValueError) as e:
                raise DatasetError(f"{self.ann_path}: annotation id {aid}: malformed entry ({e!r})") from None
            if iid not in by_id:
                raise DatasetError(f"{self.ann_path}: annotation id {aid}: unknown image_id {iid}")
            if cid not in label_of:
                raise DatasetError(f"{self.ann_path}: annotation id {aid}: unknown category_id {cid} "
                                   f"(categories: {[c['id'] for c in own]})")
            W, H = float(by_id[iid]["width"]), float(by_id[iid]["height"])
            if not all(math.isfinite(v) for v in (x, y, w, h)):
                raise DatasetError(f"{self.ann_path}: annotation id {aid}: bbox {[x, y, w, h]} is not finite")
            if w <= 0 or h <= 0 or x < -tolerance or y < -tolerance or x + w > W + tolerance or y + h > H + tolerance:
                raise DatasetError(f"{self.ann_path}: annotation id {aid}: bbox {[x, y, w, h]} (x, y, w, h) lies "
                                   f"outside image id {iid} ({by_id[iid]['file_name']}, {W:g}x{H:g}) or is empty")
            if ann.get("iscrowd", 0):
                self.crowd[iid].append(([x, y, x + w, y + h], label_of[cid]))
                continue
            self.targets[iid].append(([x, y, x + w, y + h], label_of[cid]))
        self._track_bad_images(len(self.images), skip_bad_images)

    def __len__(self) -> int:
        return len(self.images)

    def describe(self, index: int) -> str:
        return str(self.root / self.images[index]["file_name"])

    def _size_error(self, img: dict[str, Any], width: int, height: int) -> DatasetError:
        """The JSON size disagrees with the image as read (EXIF orientation applied); where the stored pixels
        have the JSON's size and an EXIF orientation turns them, the error says so."""
        turned = ""
        try:
            _, stored, _, orientation = _header(self.root / img["file_name"])
        except BadImageError:
            orientation, stored = 1, (width, height)
        if orientation in _QUARTER_TURNS and stored == (int(img["width"]), int(img["height"])):
            turned = (f"; the file stores {stored[0]}x{stored[1]}, {width}x{height} after its EXIF orientation "
                      f"({orientation}: {_QUARTER_TURNS[orientation]}). COCO boxes refer to the image as displayed, "
                      f"EXIF applied (as transformers' load_image reads it): where they were drawn on the stored "
                      f"pixels, remove the file's EXIF orientation tag; else give the JSON the displayed size")
        return DatasetError(f"{self.ann_path}: image id {int(img['id'])}: {img['file_name']} is {width}x{height}, "
                            f"the JSON says {img['width']}x{img['height']}{turned}")

    def check_files(self) -> None:
        """Every image opens and has the size its JSON entry gives, read from the file headers (no decoding):
        a :class:`DatasetError` (wrong size) or :class:`BadImageError` (unreadable; skipped and counted
        instead with ``skip_bad_images``) naming the file."""
        for i, img in enumerate(self.images):
            try:
                _, (w, h) = image_header(self.root / img["file_name"])
            except BadImageError as e:
                self._bad_image(i, e, hint=SKIP_HINT)
                continue
            if (h, w) != (int(img["height"]), int(img["width"])):
                raise self._size_error(img, w, h)

    def raw(self, index: int) -> Sample:
        img = self.images[index]
        iid = int(img["id"])
        anns = self.targets[iid]
        boxes = torch.tensor([a[0] for a in anns], dtype=torch.float32).reshape(-1, 4)
        image = load_image(self.root / img["file_name"])
        if tuple(image.shape[-2:]) != (int(img["height"]), int(img["width"])):
            raise self._size_error(img, image.shape[-1], image.shape[-2])
        W, H = image.shape[-1], image.shape[-2]
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, W)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, H)
        return {"image": image, "boxes": boxes, "labels": torch.tensor([a[1] for a in anns], dtype=torch.int64),
                "image_id": iid, "orig_size": (H, W)}

    def __getitem__(self, index: int) -> Sample | None:
        try:
            s = self.raw(index)
        except BadImageError as e:
            self._bad_image(index, e, hint=SKIP_HINT)
            return None
        return self.transform(s) if self.transform is not None else s

    @staticmethod
    def collate(batch: list[Sample | None]) -> tuple[Tensor, Tensor, list[dict[str, Any]]] | None:
        """Pad images to the largest in the batch: (images, pixel_mask True on real pixels, targets); the
        samples of skipped images are dropped (a batch of only those is ``None``)."""
        kept = [s for s in batch if s is not None]
        return pad_batch(kept) if kept else None


def match_categories(own: list[dict[str, Any]], reference: list[dict[str, Any]], path: Path,
                     source: str) -> dict[int, int]:
    """The reference's label of each category id of the file at ``path``: by id (with the name checked) when
    the reference records ids, else by name (a category without one is named by its id)."""
    by_id = {int(c["id"]): i for i, c in enumerate(reference) if "id" in c}
    by_name = {str(c["name"]): i for i, c in enumerate(reference) if "name" in c}
    known = ", ".join(f"{c['id']} ({c['name']})" if "id" in c and "name" in c else str(c.get("id", c.get("name")))
                      for c in reference)
    label_of = {}
    for c in own:
        cid, name = int(c["id"]), c.get("name")
        what = f"category id {cid}" + (f" ({name!r})" if name is not None else "")
        if by_id:
            label = by_id.get(cid)
            if label is None:
                raise DatasetError(f"{path}: {what} is not one of the categories of {source} ({known}); "
                                   f"it cannot be scored")
            expected = reference[label].get("name")
            if name is not None and expected is not None and str(name) != str(expected):
                raise DatasetError(f"{path}: {what} is {expected!r} in {source}; the category ids of the two "
                                   f"files must name the same categories")
        else:
            label = by_name.get(str(name if name is not None else cid))
            if label is None:
                raise DatasetError(f"{path}: {what} is not one of the categories of {source} ({known}); "
                                   f"it cannot be scored")
        label_of[cid] = label
    return label_of


def pad_batch(batch: list[Sample]) -> tuple[Tensor, Tensor, list[dict[str, Any]]]:
    H = max(s["image"].shape[-2] for s in batch)
    W = max(s["image"].shape[-1] for s in batch)
    C = batch[0]["image"].shape[0]
    images = torch.zeros(len(batch), C, H, W)
    mask = torch.zeros(len(batch), H, W, dtype=torch.bool)
    targets = []
    for i, s in enumerate(batch):
        h, w = s["image"].shape[-2:]
        images[i, :, :h, :w] = s["image"]
        mask[i, :h, :w] = True
        targets.append({k: v for k, v in s.items() if k != "image"} | {"size": (h, w)})
    return images, mask, targets


# ------------------------------------------------------------------------------------ segmentation


@dataclass
class MaskValues:
    """Pixels per value over some decoded masks, and the first mask holding each value."""

    pixels: dict[int, int] = field(default_factory=dict)
    first: dict[int, Path] = field(default_factory=dict)
    masks: int = 0

    def add(self, path: Path, mask: Tensor) -> None:
        self.masks += 1
        values, counts = torch.unique(mask, return_counts=True)
        for v, c in zip(values.tolist(), counts.tolist()):
            self.pixels[v] = self.pixels.get(v, 0) + c
            self.first.setdefault(v, path)

    def __or__(self, other: MaskValues) -> MaskValues:
        out = MaskValues(dict(self.pixels), dict(self.first), self.masks + other.masks)
        for v, c in other.pixels.items():
            out.pixels[v] = out.pixels.get(v, 0) + c
            out.first.setdefault(v, other.first[v])
        return out


def check_mask_classes(values: MaskValues, classes: Sequence[str], *, ignore_index: int = 255) -> None:
    """Classes of ``classes`` (index = mask value) that no decoded mask holds: a :class:`DatasetError` for
    binary masks saved 0 / ``ignore_index`` (the object as 255, silently never trained nor scored), a warning
    naming the classes otherwise."""
    if not values.pixels:
        return
    missing = [k for k in range(len(classes)) if values.pixels.get(k, 0) == 0]
    if not missing:
        return
    total = sum(values.pixels.values())
    ignored = values.pixels.get(ignore_index, 0)
    if set(values.pixels) <= {0, ignore_index} and ignored > 0.05 * total:
        raise DatasetError(
            f"{values.first[ignore_index]}: the masks hold only the values 0 and {ignore_index} ({ignore_index} on "
            f"{ignored / total:.0%} of their pixels) and no pixel of class(es) "
            f"{', '.join(f'{classes[k]!r} ({k})' for k in missing)}: {ignore_index} is "
            f"the ignore index (unlabelled, neither trained nor scored); binary masks must hold the object as 1, "
            f"e.g. re-save each as mask // {ignore_index} (Image.fromarray(np.array(Image.open(p)) // "
            f"{ignore_index}).save(p))")
    log.warning("no pixel of class(es) %s (mask value %s) in the %d masks read: not learnt unless other masks "
                "hold them", ", ".join(repr(classes[k]) for k in missing), ", ".join(map(str, missing)), values.masks)


def _check_grey_palette(mask_path: Path, indices: Tensor, palette: list[int]) -> None:
    """A palette mask's indices are its classes (VOC); a palette of greys whose values differ from their indices
    is a grey mask stored through a reordered palette (Pillow saves a grey image as GIF so), whose indices are not
    the values drawn: refused."""
    used = torch.unique(indices).tolist()
    rgb = [tuple(palette[3 * i:3 * i + 3]) for i in used]
    if len(rgb[-1:]) and all(len(c) == 3 and c[0] == c[1] == c[2] for c in rgb):
        moved = [(i, c[0]) for i, c in zip(used, rgb) if c[0] != i]
        if moved:
            i, v = moved[0]
            raise DatasetError(f"{mask_path}: a palette image whose colours are greys other than their indices (index "
                               f"{i} shows grey {v}): a grey mask stored through a reordered palette (as Pillow "
                               f"saves one as GIF), so its indices are not the classes drawn; re-save the masks as "
                               f"8-bit grey PNGs")


class MaskFolder(SkipsBadImages, Dataset):
    """VOC-style segmentation: ``images/NAME.jpg|png`` and ``masks/NAME.png`` whose pixel values are
    class indices (palette, grey 8- or 16-bit, or 1-bit PNGs), ``ignore_index`` (255) for unlabelled pixels.
    Hidden files (``._NAME.png``, macOS's) are not images. Image and mask are aligned as displayed: each with its
    own EXIF orientation applied (a mask's by transposing it, its class indices unchanged).

    Each sample is checked when it is read (the mask's mode, size and classes); :meth:`check_files` checks
    them all up front. ``skip_bad_images``: a sample whose image or mask cannot be decoded is ``None``."""

    def __init__(self, images: str | os.PathLike, masks: str | os.PathLike, *, num_classes: int | None = None,
                 transform: DenseTransform | None = None, ignore_index: int = 255,
                 classes: list[str] | None = None, skip_bad_images: bool = False) -> None:
        self.images_dir, self.masks_dir = Path(images), Path(masks)
        self.transform, self.ignore_index = transform, ignore_index
        if not self.images_dir.is_dir():
            raise DatasetError(f"{self.images_dir}: image folder not found")
        files = image_files_in(self.images_dir)  # hidden files (macOS's ._NAME.png) skipped, as image folders do
        if not files:
            raise DatasetError(f"{self.images_dir}: no images")
        self.pairs = []
        for p in files:
            m = self.masks_dir / (p.stem + ".png")
            if not m.is_file():
                raise DatasetError(f"{p}: no mask {m}")
            self.pairs.append((p, m))
        self.num_classes = num_classes
        self.classes = classes
        self._track_bad_images(len(self.pairs), skip_bad_images)

    def __len__(self) -> int:
        return len(self.pairs)

    def describe(self, index: int) -> str:
        return str(self.pairs[index][0])

    @staticmethod
    def _check_mode(mask_path: Path, mode: str, fmt: str | None = None) -> None:
        if fmt in LOSSY_MASK_FORMATS:  # a JPEG saved under a .png name: its values blur at every class edge
            raise DatasetError(f"{mask_path}: a {fmt} file; a mask must be stored losslessly (PNG), lossy "
                               f"compression changes its class indices at every edge: re-export the masks as PNG")
        if mode not in MASK_MODES:
            raise DatasetError(f"{mask_path}: mask mode {mode}; expected a grey, palette or 1-bit PNG of class "
                               f"indices")

    @staticmethod
    def _check_size(mask_path: Path, mask_wh: tuple[int, int], img_path: Path, image_wh: tuple[int, int]) -> None:
        """Mask and image have the same size as displayed (EXIF orientation applied); the error says where an EXIF
        orientation turns either of them."""
        if tuple(mask_wh) == tuple(image_wh):
            return
        turned = []
        for what, path in (("the image", img_path), ("the mask", mask_path)):
            try:
                _, stored, _, orientation = _header(path, with_format=False)
            except BadImageError:
                continue
            if orientation in _QUARTER_TURNS:
                turned.append(f"{what} stores {stored[0]}x{stored[1]}, turned by its EXIF orientation ({orientation}: "
                              f"{_QUARTER_TURNS[orientation]})")
        hint = ""
        if turned:
            hint = (f" as displayed; {' and '.join(turned)}. Masks align with their image as displayed, each file's "
                    f"EXIF orientation applied: a mask drawn on the image's stored pixels needs the image's EXIF "
                    f"orientation tag too (or the image none)")
        raise DatasetError(f"{mask_path}: mask is {mask_wh[0]}x{mask_wh[1]}, its image {img_path.name} is "
                           f"{image_wh[0]}x{image_wh[1]}{hint}")

    def _read_mask(self, mask_path: Path) -> Tensor:
        """The (H, W) int64 class indices of a mask file as displayed (its own EXIF orientation applied, by
        transposing: the indices unchanged), its mode and classes checked."""
        from PIL import Image, ImageOps

        try:
            with Image.open(mask_path) as m:
                self._check_mode(mask_path, m.mode, _format_of(mask_path, m))
                palette = (m.getpalette() or []) if m.mode == "P" else None
                shown = ImageOps.exif_transpose(m) or m  # flips and quarter turns only, never resampled
                mask = torch.from_numpy(np.array(shown, dtype=np.int64))  # mode "1": booleans, classes 0 and 1
                if palette is not None:
                    _check_grey_palette(mask_path, mask, palette)
        except OSError as e:
            raise BadImageError(f"{mask_path}: cannot read the mask ({e})") from None
        if self.num_classes is not None:
            bad = (mask >= self.num_classes) & (mask != self.ignore_index)
            if bad.any():
                raise DatasetError(f"{mask_path}: class {int(mask[bad][0])} outside 0..{self.num_classes - 1} "
                                   f"(ignore index {self.ignore_index})")
        return mask

    def check_files(self, *, classes: bool = False, sample: int = 0) -> MaskValues:
        """Every image and mask opens, each mask is a lossless file of a mode of class indices and has its image's
        size as displayed (each file's EXIF orientation applied), all read from the file headers (no decoding);
        ``classes``: the masks are also decoded (they are small) and their values checked; ``sample``: that many
        of them (at most), spread over the set. A :class:`DatasetError` (a mask that does not fit) or
        :class:`BadImageError` (an unreadable file; skipped and counted instead with ``skip_bad_images``) names the
        file. Returns the values of the decoded masks."""
        n = len(self.pairs)
        k = n if classes else min(sample, n)
        decode = {i * n // k for i in range(k)} if k else set()  # k of the n, evenly spread
        values = MaskValues()
        for i, (img_path, mask_path) in enumerate(self.pairs):
            try:
                _, image_wh = image_header(img_path)
                mode, mask_wh, fmt, orientation = _header(mask_path)
            except BadImageError as e:
                self._bad_image(i, e, hint=SKIP_HINT)
                continue
            self._check_mode(mask_path, mode, fmt)
            self._check_size(mask_path, _oriented(mask_wh, orientation), img_path, image_wh)
            if i in decode:
                try:
                    values.add(mask_path, self._read_mask(mask_path))
                except BadImageError as e:
                    self._bad_image(i, e, hint=SKIP_HINT)
        return values

    def raw(self, index: int) -> Sample:
        img_path, mask_path = self.pairs[index]
        image = load_image(img_path)
        mask = self._read_mask(mask_path)
        self._check_size(mask_path, (mask.shape[1], mask.shape[0]), img_path, (image.shape[-1], image.shape[-2]))
        return {"image": image, "mask": mask}

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor] | None:
        try:
            s = self.raw(index)
        except BadImageError as e:
            self._bad_image(index, e, hint=SKIP_HINT)
            return None
        if self.transform is not None:
            s = self.transform(s)
        return s["image"], s["mask"]


# ------------------------------------------------------------------------------------ digit canvases


def make_canvases(output: str | os.PathLike, *, mnist: str | os.PathLike, seed: int = 0, n_train: int = 512,
                  n_val: int = 128, size: int = 96, digits: tuple[int, int] = (1, 4),
                  scale: tuple[float, float] = (0.6, 1.4), threshold: int = 128,
                  overwrite: bool = False) -> dict[str, Any]:
    """Write detection and segmentation canvases of MNIST digits, deterministically from ``seed``.

    Each ``size`` x ``size`` grey canvas holds ``digits`` digits (drawn from MNIST's training images
    for ``train``, its test images for ``val``), each resized by a random factor in ``scale`` of 28 px
    and placed at a random position without overlapping another digit's box. A digit's pixels at or
    above ``threshold`` give its per-pixel mask (class digit + 1; 0 is background) and its tight box.

    Layout under ``output``: ``{train,val}/images/*.png``, ``{train,val}/annotations.json`` (COCO:
    categories 1..10 named "0".."9"), ``{train,val}/masks/*.png`` and ``classes.json`` (the segmentation
    classes). Returns a summary.

    The set is written into a temporary folder beside ``output`` and moved into place when complete, so an
    interrupted run leaves no half set. A non-empty ``output`` is refused unless ``overwrite`` (then replaced
    whole: a smaller set written over a larger one would leave the larger one's images without annotations).
    """
    import shutil
    import tempfile

    final = Path(output)
    if final.exists() and not final.is_dir():
        raise DatasetError(f"{final} is a file; give a folder for the canvases")
    existing = sorted(p.name for p in final.iterdir()) if final.is_dir() else []
    if existing and not overwrite:
        raise DatasetError(f"{final} exists and is not empty; pass --overwrite (overwrite=True) to replace it")
    if set(existing) - {"train", "val", "classes.json"}:  # --overwrite replaces a canvas set, nothing else
        raise DatasetError(f"{final} holds files that are not a canvas set ({', '.join(existing[:5])}); "
                           f"give a new or empty folder")
    final.parent.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        summary = _write_canvases(out, mnist=mnist, seed=seed, n_train=n_train, n_val=n_val, size=size,
                                  digits=digits, scale=scale, threshold=threshold)
        (out / "classes.json").write_text(json.dumps(SEGMENTATION_CLASSES), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(out, final)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return {**summary, "output": str(final)}


def _write_canvases(out: Path, *, mnist: str | os.PathLike, seed: int, n_train: int, n_val: int, size: int,
                    digits: tuple[int, int], scale: tuple[float, float], threshold: int) -> dict[str, Any]:
    from PIL import Image

    from vitlab.data.sources import read_mnist

    summary: dict[str, Any] = {"seed": seed, "size": size}
    for split, prefix, n in (("train", "train", n_train), ("val", "t10k", n_val)):
        pool, labels, _ = read_mnist(mnist, prefix)
        g = np.random.default_rng([seed, 0 if split == "train" else 1])
        (out / split / "images").mkdir(parents=True, exist_ok=True)
        (out / split / "masks").mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        n_objects = 0
        for i in range(n):
            canvas = np.zeros((size, size), dtype=np.uint8)
            mask = np.zeros((size, size), dtype=np.uint8)
            placed: list[tuple[int, int, int, int]] = []
            for _ in range(int(g.integers(digits[0], digits[1] + 1))):
                k = int(g.integers(len(labels)))
                side = min(size, max(8, int(round(28 * g.uniform(*scale)))))
                digit = resize(pool[k], (side, side), "bilinear")[0].numpy()
                for _attempt in range(20):
                    y0, x0 = int(g.integers(0, size - side + 1)), int(g.integers(0, size - side + 1))
                    ys, xs = np.nonzero(digit >= threshold)
                    if len(ys) == 0:
                        break
                    box = (x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1)
                    if all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for b in placed):
                        region = canvas[y0:y0 + side, x0:x0 + side]
                        np.maximum(region, digit, out=region)
                        mask[y0:y0 + side, x0:x0 + side][digit >= threshold] = labels[k] + 1
                        placed.append(box)
                        n_objects += 1
                        x, y, w, h = box[0], box[1], box[2] - box[0], box[3] - box[1]
                        anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": labels[k] + 1,
                                     "bbox": [x, y, w, h], "area": int((digit >= threshold).sum()), "iscrowd": 0})
                        break
            name = f"{i:05d}.png"
            Image.fromarray(canvas, mode="L").save(out / split / "images" / name)
            Image.fromarray(mask, mode="L").save(out / split / "masks" / name)
            images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
        coco = {"images": images, "annotations": anns,
                "categories": [{"id": d + 1, "name": str(d)} for d in range(10)]}
        (out / split / "annotations.json").write_text(json.dumps(coco), encoding="utf-8")
        summary[split] = {"images": n, "objects": n_objects}
    return summary


class Repeated(Dataset):
    """``dataset`` seen ``times`` times per epoch (small sets: fewer epoch ends, same batching)."""

    def __init__(self, dataset: Dataset, times: int) -> None:
        self.dataset, self.times = dataset, times
        self.collate = getattr(dataset, "collate", None)

    def __len__(self) -> int:
        return len(self.dataset) * self.times

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index % len(self.dataset)]


def train_categories(annotations: str | os.PathLike) -> list[dict[str, Any]] | None:
    """The categories (label order) of a training set's COCO JSON, or None when it has none to read."""
    try:
        data = parse_json(Path(annotations).read_text(encoding="utf-8"))
        return sorted(({"id": int(c["id"]), **({"name": str(c["name"])} if "name" in c else {})}
                       for c in data["categories"]), key=lambda c: c["id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


SEGMENTATION_CLASSES = ["background"] + [str(d) for d in range(10)]


def canvas_datasets(root: str | os.PathLike, split: str, *, task: str, transform: DenseTransform | None = None
                    ) -> Dataset:
    """The canvases of :func:`make_canvases` as a detection or segmentation data set (a split other than
    train takes the train split's category labels)."""
    base = Path(root) / split
    if task == "detection":
        categories = None
        if split != "train":
            train = Path(root) / "train" / "annotations.json"
            categories = train_categories(train)
        return CocoDetection(base / "images", base / "annotations.json", transform=transform,
                             categories=categories, categories_from=f"the training set ({Path(root) / 'train'})")
    if task == "segmentation":
        return MaskFolder(base / "images", base / "masks", num_classes=11, transform=transform,
                          classes=SEGMENTATION_CLASSES)
    raise ValueError(f"canvas_datasets: task must be 'detection' or 'segmentation', got {task!r}")


__all__ = ["LOSSY_MASK_FORMATS", "MASK_MODES", "CocoDetection", "DenseTransform", "MaskFolder", "MaskValues",
           "Repeated", "SkipsBadImages", "canvas_datasets", "check_mask_classes", "crop_sample", "hflip",
           "image_header", "make_canvases", "match_categories", "pad_batch", "resize_sample", "train_categories"]
