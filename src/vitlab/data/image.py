"""Decoding one image file to a uint8 (C, H, W) tensor with Pillow, whatever its mode.

Colour images come back with 3 channels, grayscale ones with 1; the dataset decides whether to convert.
Transparent pixels are composited on white (what a viewer shows), so RGBA/LA/P-with-transparency images
keep their look instead of showing whatever colour hides under alpha = 0.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from vitlab.data.errors import BadImageError

IMAGE_EXTENSIONS = (
    ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm",
)
# Modes whose natural channel count is one (before alpha handling).
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


def is_image_file(name: str | os.PathLike) -> bool:
    return str(name).lower().endswith(IMAGE_EXTENSIONS)


def _composite_on_white(img: Image.Image, out_mode: str) -> Image.Image:
    """Alpha-composite ``img`` (RGBA or LA) over a white background and return ``out_mode``."""
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert(out_mode)


def _to_uint8_array(img: Image.Image) -> np.ndarray:
    """Pillow image of any mode -> uint8 array (H, W) or (H, W, 3)."""
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
        if a.size and a.max() <= 1.0 and a.min() >= 0.0:  # float images are usually stored in [0, 1]
            a = a * 255.0
        return np.clip(np.rint(a), 0, 255).astype(np.uint8)
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


def load_image(path: str | os.PathLike) -> Tensor:
    """Decode ``path`` to a uint8 tensor (C, H, W), C = 1 for grayscale files and 3 for colour ones.

    EXIF orientation is applied. Any failure (missing file, not an image, truncated data, unsupported
    mode, decompression bomb) raises :class:`BadImageError` whose message names the file and the reason.
    """
    p = Path(path)
    try:
        with warnings.catch_warnings():
            # Pillow warns (DecompressionBombWarning, palette/EXIF oddities); turn the bomb warning into
            # an error and keep the rest quiet so that a bad file never floods a training log.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)
            with Image.open(p) as img:
                img.load()  # force the full decode here, so truncation errors surface inside the try
                img = ImageOps.exif_transpose(img) or img
                arr = _to_uint8_array(img)
    except FileNotFoundError as e:
        raise BadImageError(f"{p}: file not found") from e
    except UnidentifiedImageError as e:
        raise BadImageError(f"{p}: not an image file Pillow can identify") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError(f"{p}: refused, too many pixels (decompression bomb?): {e}") from e
    except (OSError, SyntaxError, ValueError, TypeError, IndexError, EOFError) as e:
        # OSError covers "image file is truncated" and decoder errors; SyntaxError is what some Pillow
        # plugins raise on malformed headers.
        raise BadImageError(f"{p}: cannot decode image ({type(e).__name__}: {e})") from e
    if arr.ndim == 2:
        arr = arr[None]  # (1, H, W)
    else:
        arr = arr.transpose(2, 0, 1)  # (H, W, C) -> (C, H, W)
    if arr.shape[1] == 0 or arr.shape[2] == 0:
        raise BadImageError(f"{p}: image has zero size {arr.shape[1:]}")
    arr = np.ascontiguousarray(arr)
    if not arr.flags.writeable:  # Pillow's buffer is read-only; torch tensors must own writable memory
        arr = arr.copy()
    return torch.from_numpy(arr)


def peek_channels(path: str | os.PathLike) -> int | None:
    """Natural channel count (1 or 3) from the file header only, or None when the header is unreadable."""
    try:
        with Image.open(path) as img:
            return 1 if img.mode in GRAY_MODES else 3
    except Exception:  # noqa: BLE001 - a bad file is reported when it is decoded, not while peeking
        return None


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
