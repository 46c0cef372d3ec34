"""Decoding one image file to a uint8 (C, H, W) tensor with Pillow, whatever its mode.

Colour images come back with 3 channels, grayscale ones with 1; the dataset decides whether to convert.
Transparent pixels are composited on white (what a viewer shows), so RGBA/LA/P-with-transparency images
keep their look instead of showing whatever colour hides under alpha = 0.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import threading
import warnings
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from vitlab.data.errors import BadImageError

log = logging.getLogger(__name__)

# Photo and bitmap formats a class folder may hold, in the order error messages list them. Pillow registers the
# extensions of a format it can read only when its codec is present (WebP, AVIF), so the list is decided here,
# at import, from Pillow's registered extensions: a file this Pillow cannot decode is not taken for an image.
# (Pillow knows more extensions than these: video frames, HDF5/GRIB stubs, EPS through Ghostscript, icons; a
# data folder's stray ones of those are not images to train on.)
_CANDIDATE_EXTENSIONS = (
    ".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".avif",
    ".ppm", ".pgm", ".pbm", ".pnm",
)


def _decodable_extensions(candidates: tuple[str, ...]) -> tuple[str, ...]:
    """The ``candidates`` whose format Pillow both registers for the extension and can open."""
    registered = Image.registered_extensions()  # imports Pillow's plugins (Image.init)
    return tuple(e for e in candidates if registered.get(e) in Image.OPEN)


IMAGE_EXTENSIONS = _decodable_extensions(_CANDIDATE_EXTENSIONS)
# Modes whose natural channel count is one (before alpha handling).
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


def is_image_file(name: str | os.PathLike) -> bool:
    return str(name).lower().endswith(IMAGE_EXTENSIONS)


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def not_a_local_file(given: str | os.PathLike) -> str | None:
    """Why ``given`` (as typed, before ``Path`` folds its ``//``) is not read: a URL, or ``-`` (stdin), unless a
    file of that name exists; None otherwise."""
    text = os.fspath(given)
    if not isinstance(text, str) or os.path.exists(text):
        return None
    if _URL.match(text):
        return f"{text}: URLs are not read; download the file first and give its path"
    if text == "-":
        return "-: images are not read from stdin; save the image to a file and give its path"
    return None


def expand_image_paths(paths: list[str | os.PathLike]) -> list[str]:
    """Image paths as a command line gives them: a file stays as written (decoding reports a bad one), a folder
    stands for the image files below it (sorted, hidden ones skipped). A folder with none is an error that
    names it, and so is a URL or ``-`` (:func:`not_a_local_file`)."""
    out: list[str] = []
    for given in paths:
        if why := not_a_local_file(given):
            raise ValueError(why)
        p = Path(given)
        if not p.is_dir():
            out.append(str(given))
            continue
        found = sorted(walk_image_files(p), key=Path)  # as the image-folder datasets scan
        if not found:
            raise ValueError(f"{p}: a folder with no image files in it ({', '.join(IMAGE_EXTENSIONS)})")
        out.extend(found)
    return out


_reported_links: set[str] = set()  # folders (by path) already reported as links back into the scan


def listed_image(name: str) -> bool:
    """Whether a file name is one an image folder lists: an image extension, and not hidden (a name starting with
    ".": macOS's AppleDouble ``._photo.jpg`` beside each file copied from a Mac, ``.DS_Store``)."""
    return not name.startswith(".") and is_image_file(name)


def listed_folder(name: str) -> bool:
    """Whether a sub-folder is one an image folder reads (a class): not hidden, not the ``__MACOSX`` folder of
    resource forks that macOS's zip adds."""
    return not name.startswith(".") and name != "__MACOSX"


def walk_image_files(top: str | os.PathLike, *, inside: tuple[str | os.PathLike, ...] = ()) -> list[str]:
    """The image files below ``top`` (hidden files and folders skipped), following symbolic links to folders,
    but never into a folder already read by this walk (by resolved path), nor into one that holds ``top``
    itself or a folder of ``inside`` (a link such as ``a/up -> ..``, which would lead round and round, and
    count other classes' images as this one's). Each such link is named in one warning.

    Args:
        inside: folders the walk must not climb back into (the data set's root, beside the class folder).
    """
    top = os.fspath(top)
    guard = [os.path.realpath(d) for d in (top, *inside)]
    visited = {os.path.realpath(top)}
    files: list[str] = []
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        kept = []
        for d in sorted(dirnames):
            if d.startswith("."):
                continue
            full = os.path.join(dirpath, d)
            real = os.path.realpath(full)
            loop = any(g == real or g.startswith(real.rstrip(os.sep) + os.sep) for g in guard)
            if loop or real in visited:
                if full not in _reported_links:
                    _reported_links.add(full)
                    why = (f"which holds {top} (a symbolic-link loop)" if loop
                           else f"a folder already read in {top}")
                    log.warning("%s: a link to %s, %s: not followed", full, real, why)
                continue
            visited.add(real)
            kept.append(d)
        dirnames[:] = kept
        files.extend(os.path.join(dirpath, f) for f in filenames if listed_image(f))
    return files


def unique_stems(paths: list[str | os.PathLike], suffixes: tuple[str, ...] = ("",)) -> list[str]:
    """Output names for input files: each file's stem, with -1, -2, ... where a name it gives is taken (a/1.png
    and b/1.png must not write over each other's results).

    ``suffixes``: the names written per input (``stem + suffix``); all of them, over all the inputs, are
    distinct: with ("", "_mask"), a.png and a_mask.png give a, a_mask and a_mask-1, a_mask-1_mask."""
    names: list[str] = []
    taken: set[str] = set()
    for p in paths:
        stem = name = Path(p).stem
        n = 0
        # also a file whose own stem is another's generated name (x-1.png beside 2 x.png)
        while any(name + s in taken for s in suffixes):
            n += 1
            name = f"{stem}-{n}"
        taken.update(name + s for s in suffixes)
        names.append(name)
    return names


def _composite_on_white(img: Image.Image, out_mode: str) -> Image.Image:
    """Alpha-composite ``img`` (RGBA or LA) over a white background and return ``out_mode``."""
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert(out_mode)


def _to_uint8_array(img: Image.Image) -> np.ndarray:
    """Pillow image of any mode -> uint8 array (H, W) or (H, W, 3). Float ("F") images: scaled by 255 when their
    finite values lie in [0, 1], else taken as 0..255; NaN pixels (missing values) become 0, +-inf 255 / 0."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        # 16-bit grayscale: the full 0..65535 range maps to 0..255 (x / 257, rounded).
        a = np.asarray(img).astype(np.float32)
        return np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8)
    if mode == "I":
        # 32-bit integer mode: in practice 16-bit data (TIFF, older Pillow PNG decoding). Values that fit
        # in 8 bits are taken as they are; otherwise the 16-bit range is scaled down.
        a = np.asarray(img).astype(np.float64)
        if a.size and (a.max() > 255 or a.min() < 0):
            a = np.clip(a, 0, 65535) / 257.0
        return np.clip(np.rint(a), 0, 255).astype(np.uint8)
    if mode == "F":
        a = np.asarray(img).astype(np.float64)
        finite = a[np.isfinite(a)]  # a NaN (a missing value) or inf pixel does not decide the range
        if finite.size and finite.max() <= 1.0 and finite.min() >= 0.0:  # float images are usually stored in [0, 1]
            a = a * 255.0
        return np.clip(np.rint(np.nan_to_num(a, nan=0.0)), 0, 255).astype(np.uint8)
    if mode == "1":
        return np.asarray(img.convert("L"), dtype=np.uint8)
    if mode == "L":
        return np.asarray(img, dtype=np.uint8)
    if mode in ("LA", "La"):
        return np.asarray(_composite_on_white(img, "L"), dtype=np.uint8)
    if mode == "P":
        # A palette may carry transparency (tRNS chunk / GIF transparent index): go through RGBA then.
        if "transparency" in img.info:
            return np.asarray(_composite_on_white(img.convert("RGBA"), "RGB"), dtype=np.uint8)
        return np.asarray(img.convert("RGB"), dtype=np.uint8)
    if mode in ("PA", "RGBA", "RGBa"):
        return np.asarray(_composite_on_white(img, "RGB"), dtype=np.uint8)
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8)
    # CMYK, YCbCr, LAB, HSV, RGBX, ...: Pillow knows the conversion to RGB.
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


# The largest image (width x height) that load_image decodes. Pillow's own guard warns above about 89
# megapixels and refuses above 179, which stops ordinary panoramas and large camera photos; vitlab keeps a
# guard against decompression bombs but at a limit a real photo does not reach. Change it with
# set_max_image_pixels, the --max-image-pixels option or the VITLAB_MAX_IMAGE_PIXELS environment variable
# (read at import, so DataLoader workers started with "spawn" see it too).
DEFAULT_MAX_IMAGE_PIXELS = 400_000_000
_ENV_MAX_PIXELS = "VITLAB_MAX_IMAGE_PIXELS"
_pillow_guard = threading.Lock()
# Modes Image.reduce handles (not "1", "P", "I;16"; those are decoded at full size).
_REDUCIBLE_MODES = frozenset({"L", "LA", "RGB", "RGBA", "I", "F", "CMYK", "YCbCr", "PA"})


def _initial_max_pixels() -> int | None:
    raw = os.environ.get(_ENV_MAX_PIXELS, "").strip()
    if not raw:
        return DEFAULT_MAX_IMAGE_PIXELS
    if raw.lower() in ("none", "0", "off"):
        return None
    try:
        return int(float(raw))
    except ValueError:
        raise ValueError(f"{_ENV_MAX_PIXELS}={raw!r}: expected a number of pixels (e.g. 400000000) or none") from None


MAX_IMAGE_PIXELS: int | None = _initial_max_pixels()


def set_max_image_pixels(limit: int | None) -> None:
    """Refuse images of more than ``limit`` pixels (None: no limit). Also exported to the environment, so
    that worker processes agree."""
    global MAX_IMAGE_PIXELS
    if limit is not None and limit < 1:
        raise ValueError(f"--max-image-pixels must be >= 1 (or none), got {limit}")
    MAX_IMAGE_PIXELS = limit
    os.environ[_ENV_MAX_PIXELS] = "none" if limit is None else str(int(limit))


def _open_unguarded(p: Path | IO[bytes], formats: tuple[str, ...] | None = None) -> Image.Image:
    """``Image.open`` without Pillow's global pixel guard (load_image applies MAX_IMAGE_PIXELS instead)."""
    with _pillow_guard:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(p, formats=formats)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _reduce_factor(size: tuple[int, int], min_size: int | None) -> int:
    """The largest integer that divides both sides and keeps the shorter side at least twice ``min_size`` (1: keep
    the image). Dividing both sides, the smaller image is exactly the original scaled down (no partial box at the
    right or bottom edge, the aspect ratio unchanged), so a transform computes the same resize and crop from it
    as from the full image: 1000 x 750 with ``min_size`` 36 takes 10 (100 x 75), where a JPEG drafted at 1/8
    would be 125 x 94 (Pillow rounds up) and resize to 36 x 47 instead of 36 x 48."""
    if not min_size:
        return 1
    w, h = size
    most = min(w, h) // (2 * int(min_size))
    common = math.gcd(w, h)
    return next((f for f in range(most, 1, -1) if common % f == 0), 1)


def load_image(path: str | os.PathLike, *, min_size: int | None = None) -> Tensor:
    """Decode ``path`` to a uint8 tensor (C, H, W), C = 1 for grayscale files and 3 for colour ones.

    EXIF orientation is applied. Any failure (missing file, not an image, truncated data, unsupported
    mode, more than ``MAX_IMAGE_PIXELS`` pixels) raises :class:`BadImageError` whose message names the
    file and the reason.

    Args:
        min_size: the shorter side the caller needs (e.g. ``EvalTransform.min_source_size``). An image
            at least four times larger is decoded smaller, by integer factors that divide both sides and
            keep the shorter side at least ``2 * min_size``: JPEGs first at 1/2, 1/4 or 1/8 scale inside the
            decoder (``Image.draft``), then (other formats from the start) by the largest such box reduction
            after decoding, so a 100-megapixel photo never exists as several full-size copies. The smaller
            image is exactly the original scaled down, so a transform's resize and crop (and a random crop's
            area and aspect) are the full image's; an image whose sides have no common factor in range is
            decoded in full.
    """
    if why := not_a_local_file(path):
        raise BadImageError(why)
    p = Path(path)
    try:
        return decode_image(p, name=str(p), min_size=min_size)
    except FileNotFoundError as e:
        raise BadImageError(f"{p}: file not found") from e


def decode_image(source: Path | IO[bytes], *, name: str, min_size: int | None = None) -> Tensor:
    """:func:`load_image`'s decoding of a path or an open binary file (an upload in memory: ``io.BytesIO``), to the
    same pixels; ``name`` names the image in errors (:class:`BadImageError`). A missing path raises
    FileNotFoundError (load_image says so)."""
    try:
        with warnings.catch_warnings():
            # Pillow warns about palette/EXIF oddities; keep them quiet so that a bad file never floods a log.
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with _open_unguarded(source) as img:
                w, h = img.size
                if MAX_IMAGE_PIXELS is not None and w * h > MAX_IMAGE_PIXELS:
                    raise BadImageError(
                        f"{name}: refused, {w} x {h} = {w * h:,} pixels is above the limit of "
                        f"{MAX_IMAGE_PIXELS:,} (a decompression bomb?); raise it with --max-image-pixels, "
                        f"{_ENV_MAX_PIXELS} or vitlab.data.image.set_max_image_pixels")
                if img.format == "JPEG" and min_size:
                    # the largest DCT scaling (1/8, 1/4, 1/2) that divides both sides (an exact size) in range:
                    # decoding at 1/4 is several times faster than a full decode and a box reduction
                    most = min(w, h) // (2 * int(min_size))
                    draft = next((a for a in (8, 4, 2) if a <= most and w % a == 0 and h % a == 0), 1)
                    if draft > 1:
                        img.draft(None, (w // draft, h // draft))
                img.load()  # force the full decode here, so truncation errors surface inside the try
                factor = _reduce_factor(img.size, min_size) if img.mode in _REDUCIBLE_MODES else 1
                small = img.reduce(factor) if factor > 1 else img
                small = ImageOps.exif_transpose(small) or small
                arr = _to_uint8_array(small)
                del small
    except (BadImageError, FileNotFoundError):
        raise
    except UnidentifiedImageError as e:
        raise BadImageError(f"{name}: not an image file Pillow can identify") from e
    except (OSError, SyntaxError, ValueError, TypeError, IndexError, EOFError) as e:
        # OSError covers "image file is truncated" and decoder errors; SyntaxError is what some Pillow
        # plugins raise on malformed headers.
        raise BadImageError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from e
    if 0 in arr.shape[:2]:
        raise BadImageError(f"{name}: image has zero size {arr.shape[:2]}")
    return _chw_tensor(arr)


def _chw_tensor(arr: np.ndarray) -> Tensor:
    """uint8 (H, W) or (H, W, C) array -> a (C, H, W) tensor owning its memory."""
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)  # -> (C, H, W)
    arr = np.ascontiguousarray(arr)
    if not arr.flags.writeable:  # Pillow's buffer is read-only; torch tensors must own writable memory
        arr = arr.copy()
    return torch.from_numpy(arr)


def pil_to_tensor(img: Image.Image) -> Tensor:
    """A Pillow image -> uint8 (C, H, W), converted as :func:`load_image` converts a decoded file: EXIF
    orientation applied, transparency laid over white, 16-bit and float modes scaled to 0..255, 1 channel for
    grayscale modes and 3 for the others."""
    return _chw_tensor(_to_uint8_array(ImageOps.exif_transpose(img) or img))


def peek_channels(path: str | os.PathLike) -> int | None:
    """Natural channel count (1 or 3) from the file header only, or None when the header is unreadable. The file is
    opened first as the format its extension names (half the time of Pillow's probing through every format: a
    folder's channels are read from every header), then as any format."""
    fmt = _extension_formats().get(os.path.splitext(path)[1].lower())
    for formats in ((fmt,), None) if fmt is not None else (None,):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Pillow's EXIF / palette oddities
                with _open_unguarded(Path(path), formats=formats) as img:
                    return 1 if img.mode in GRAY_MODES else 3
        except Exception:  # noqa: BLE001 - a bad file is reported when it is decoded, not while peeking
            continue
    return None


@functools.cache
def _extension_formats() -> dict[str, str]:
    """Pillow's format name per image file extension (".jpg" -> "JPEG")."""
    return {e: f for e, f in Image.registered_extensions().items() if e in IMAGE_EXTENSIONS}


def to_channels(x: Tensor, channels: int) -> Tensor:
    """Convert a (C, H, W) or (B, C, H, W) image between 1 and 3 channels.

    1 -> 3 repeats the plane; 3 -> 1 takes the ITU-R 601-2 luma (the weights Pillow uses for "L").
    Works on uint8 (rounded) and float tensors.
    """
    c = x.shape[-3]
    if c == channels:
        return x
    if c == 1 and channels == 3:
        return x.expand(*x.shape[:-3], 3, *x.shape[-2:]).contiguous()
    if c == 3 and channels == 1:
        w = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32).view(3, 1, 1)
        y = (x.float() * w).sum(dim=-3, keepdim=True)
        if x.dtype == torch.uint8:
            return y.round_().clamp_(0, 255).to(torch.uint8)
        return y.to(x.dtype)
    raise ValueError(f"cannot convert an image with {c} channels to {channels} channels (only 1 <-> 3)")
