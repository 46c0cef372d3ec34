"""vitlab's image preprocessing against timm's (which runs on Pillow): large images decoded smaller, "nearest"
resizing, and the centre crop of a non-square input.

References: Pillow, computed here, and ``fixtures/transforms_timm_eval.json``, made by timm
(``fixtures/transforms_timm_make.py``).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from vitlab.data import eval_transform, load_image
from vitlab.data.functional import resize
from vitlab.data.transforms import train_transform
from vitlab.models.base import Preprocessing

torch.set_num_threads(1)

FIXTURE = Path(__file__).parent / "fixtures" / "transforms_timm_eval.json"
README = Path(__file__).resolve().parents[1] / "README.md"
ZERO_ONE = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}  # outputs stay in [0, 1]


def _photo(h: int, w: int) -> np.ndarray:
    """A (h, w, 3) uint8 stand-in photo: smooth shading with a few sharp edges."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32) * (750 / h)
    rgb = np.stack([128 + 120 * np.sin(x / 40), 128 + 120 * np.cos(y / 33), 128 + 100 * np.sin((x + y) / 57)], -1)
    rgb[(x // 150 + y // 150) % 2 == 0] *= 0.6  # a checker of 150-px squares (at 750 px high)
    return np.uint8(np.clip(rgb, 0, 255))


def _pattern(h: int = 480, w: int = 640) -> np.ndarray:
    """The image of transforms_timm_make.py (integer arithmetic only, so both build the same bytes)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.int64)
    return np.stack([(x * 7 + y * 3) % 256, (x * x // 5 + y * 11) % 256, (x * y // 7) % 256], -1).astype(np.uint8)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("photos")
    out = {}
    for name, (h, w) in {"1000x750.jpg": (750, 1000), "1000x750.png": (750, 1000), "2048x1536.png": (1536, 2048),
                         "1001x750.png": (750, 1001)}.items():
        out[name] = root / name
        Image.fromarray(_photo(h, w)).save(out[name], **({"quality": 90} if name.endswith("jpg") else
                                                          {"compress_level": 1}))
    return out


# ------------------------------------------------------------------------- large images decoded smaller
@pytest.mark.parametrize("name", ["1000x750.jpg", "1000x750.png", "2048x1536.png"])
@pytest.mark.parametrize("size", [32, 224])
@pytest.mark.parametrize("crop_pct", [0.875, 1.0])
def test_reduced_decode_gives_the_full_decode_input(photos, name, size, crop_pct):
    """``load_image(min_size=...)`` (predict, explain, the data sets, the image cache) is only a cheaper source for
    the eval input: the same resize size and crop as the full decode (what timm and the README's serving snippet
    see), pixels within what a different proper downscaling gives. A JPEG drafted at 1/8 was 125 x 94 for
    1000 x 750 (Pillow rounds up): resized to 36 x 47 instead of 36 x 48, a shifted, stretched input."""
    t = eval_transform(Preprocessing(input_size=(3, size, size), crop_pct=crop_pct, **ZERO_ONE))
    full, small = load_image(photos[name]), load_image(photos[name], min_size=t.min_source_size)
    if size == 32:
        assert small.shape[1] < full.shape[1] / 4  # the reduction is taken
    assert t.resize_size(*small.shape[1:]) == t.resize_size(*full.shape[1:])
    a, b = t(small), t(full)
    assert a.shape == b.shape == (3, size, size)
    diff = (a - b).abs() * 255
    assert diff.mean() < 1.0 and diff.max() < 6.0, f"|diff| mean {diff.mean():.2f}, max {diff.max():.1f} (/ 255)"


@pytest.mark.parametrize(("name", "min_size", "expected"), [
    ("1000x750.jpg", 36, (75, 100)),    # 1/10: DCT scaling 1/2, then a 5 x 5 box (was 1/8: 94 x 125)
    ("1000x750.png", 36, (75, 100)),    # (was a box of 11: 69 x 91, the last row and column partial)
    ("2048x1536.png", 36, (96, 128)),
    ("2048x1536.png", 114, (384, 512)),  # a training crop's need (32 px, scale 0.08): 1/4
    ("1001x750.png", 36, (750, 1001)),  # no common factor: decoded in full
])
def test_reduced_decode_is_the_original_scaled_exactly(photos, name, min_size, expected):
    """The reduction divides both sides, so the smaller image has the original's aspect exactly: the eval
    geometry and a random resized crop's area and aspect are those of the full image."""
    small = load_image(photos[name], min_size=min_size)
    assert tuple(small.shape[1:]) == expected
    h, w = load_image(photos[name]).shape[1:]
    assert h % expected[0] == 0 and w % expected[1] == 0 and h // expected[0] == w // expected[1]
    assert train_transform(Preprocessing(input_size=(3, 32, 32))).min_source_size == 114


# ------------------------------------------------------------------------------------ nearest resizing
@pytest.mark.parametrize(("src", "dst"), [
    ((2, 8), (2, 4)),        # Pillow takes the odd columns, torch's "nearest" the even ones
    ((448, 448), (224, 224)),
    ((64, 64), (7, 7)),      # an exact tie: 3.5 * 64 / 7 = 32, which Pillow's summed positions put at 31
    ((10, 10), (3, 3)),      # a tie too (1.5 * 10 / 3 = 5)
    ((750, 1000), (36, 48)),
    ((33, 31), (97, 131)),   # enlarging, odd sizes
    ((7, 5), (3, 4)),
    ((3, 64), (4, 7)),
])
def test_nearest_resize_picks_pillows_pixels(src, dst):
    """Pillow's NEAREST (timm, Hugging Face's processors with resample 0, the README's serving snippet) takes
    the pixel under each output pixel's centre, floor((i + 0.5) * in / out); torch's "nearest" takes
    floor(i * in / out), half a pixel off when shrinking."""
    img = np.random.default_rng(sum(src + dst)).integers(0, 256, (*src, 3), dtype=np.uint8)
    expected = np.array(Image.fromarray(img).resize(dst[::-1], Image.NEAREST))
    x = torch.from_numpy(img).permute(2, 0, 1)
    assert np.array_equal(resize(x, dst, "nearest").permute(1, 2, 0).numpy(), expected)
    as_float = resize(x.float() / 255, dst, "nearest")[None]  # a batch of float images, the same pixels
    assert torch.equal(as_float[0], torch.from_numpy(expected).permute(2, 0, 1).float() / 255)


def test_nearest_eval_input_equals_pillows():
    img = np.random.default_rng(0).integers(0, 256, (448, 448, 3), dtype=np.uint8)
    t = eval_transform(Preprocessing(input_size=(3, 224, 224), crop_pct=1.0, interpolation="nearest", **ZERO_ONE))
    expected = np.array(Image.fromarray(img).resize((224, 224), Image.NEAREST))
    assert torch.equal(t(torch.from_numpy(img).permute(2, 0, 1)), torch.from_numpy(expected).permute(2, 0, 1) / 255)


# ---------------------------------------------------------------------------- non-square centre crop
def test_eval_resize_size_is_timms():
    """timm's transforms_imagenet_eval: a square target resizes the shorter side (the longer one truncated), a
    non-square one keeps the aspect with ResizeKeepRatio (both sides rounded, ties as timm's floats give them);
    vitlab squashed a non-square target instead."""
    rows = json.loads(FIXTURE.read_text())["resize"]
    wrong = []
    for img_h, img_w, th, tw, crop_pct, rh, rw in rows:
        t = eval_transform(Preprocessing(input_size=(3, th, tw), crop_pct=crop_pct))
        if t.resize_size(img_h, img_w) != (rh, rw):
            wrong.append(((img_h, img_w), (th, tw), crop_pct, (rh, rw), t.resize_size(img_h, img_w)))
    assert not wrong, wrong[:5]
    assert len(rows) == 252


@pytest.mark.parametrize("size", [(96, 64), (64, 96)])
@pytest.mark.parametrize("crop_pct", [0.9, 1.0])
def test_non_square_center_crop_is_timms_bit_for_bit(size, crop_pct):
    """With "nearest" every pixel is a source pixel, so timm's output (its sha256) pins the whole geometry."""
    expected = {(th, tw, cp): h for th, tw, cp, h in json.loads(FIXTURE.read_text())["nearest"]}
    t = eval_transform(Preprocessing(input_size=(3, *size), crop_pct=crop_pct, interpolation="nearest", **ZERO_ONE))
    v = t(torch.from_numpy(_pattern()).permute(2, 0, 1))
    u8 = (v * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    assert hashlib.sha256(u8.tobytes()).hexdigest() == expected[(*size, crop_pct)]


def _timm_center(img: Image.Image, size: tuple[int, int], crop_pct: float, resample: int) -> np.ndarray:
    """timm's eval geometry for a non-square target in Pillow: ResizeKeepRatio to floor(side / crop_pct) per
    side, then torchvision's CenterCrop."""
    th, tw = size
    sh, sw = (int(s / crop_pct + 1e-6) for s in size)
    ratio = min(img.height / sh, img.width / sw)
    img = img.resize((round(img.width / ratio), round(img.height / ratio)), resample)
    top, left = round((img.height - th) / 2), round((img.width - tw) / 2)
    return np.asarray(img.crop((left, top, left + tw, top + th)), dtype=np.float32) / 255


@pytest.mark.parametrize("size", [(96, 64), (64, 96)])
@pytest.mark.parametrize("crop_pct", [0.9, 1.0])
def test_non_square_center_crop_keeps_the_aspect(size, crop_pct):
    img = _photo(480, 640)
    t = eval_transform(Preprocessing(input_size=(3, *size), crop_pct=crop_pct, interpolation="bilinear", **ZERO_ONE))
    ours = t(torch.from_numpy(img).permute(2, 0, 1)).permute(1, 2, 0).numpy()
    theirs = _timm_center(Image.fromarray(img), size, crop_pct, Image.BILINEAR)
    assert ours.shape == theirs.shape == (*size, 3)
    diff = np.abs(ours - theirs) * 255
    assert diff.mean() < 0.5 and diff.max() < 2.0, (diff.mean(), diff.max())  # Pillow rounds to 8 bits


def test_readme_serving_snippet_crops_a_non_square_input_as_vitlab(tmp_path):
    """The README's ONNX Runtime client, following a file's metadata, prepares a non-square model's input as
    vitlab does (nearest resampling: the same pixels)."""
    code = next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "def decode(" in b)
    c, h, w = 3, 96, 64
    ns = {"np": np, "math": math, "Image": Image, "ImageOps": ImageOps, "json": json, "c": c, "h": h, "w": w,
          "meta": {"channel_order": "RGB"}, "mean": np.float32([0, 0, 0]), "std": np.float32([1, 1, 1]),
          "crop_pct": 0.9, "crop_mode": "center", "resample": Image.NEAREST}
    for name in ("decode", "prepare"):
        exec(re.search(rf"^def {name}\(.*?(?=^\S)", code, re.S | re.M).group(0), ns)  # noqa: S102
    path = tmp_path / "photo.png"
    Image.fromarray(_pattern()).save(path)
    t = eval_transform(Preprocessing(input_size=(c, h, w), crop_pct=0.9, interpolation="nearest", **ZERO_ONE))
    assert np.array_equal(ns["prepare"](path), t(load_image(path, min_size=t.min_source_size)).numpy())  # as predict


def test_segmentation_masks_are_resized_at_pixel_centres_as_pillow() -> None:
    """A mask resized with its image keeps the image's pixel centres (Pillow's NEAREST, as Hugging Face's
    segmentation processors resize labels); torch's "nearest" was half a pixel off."""
    from vitlab.data.dense import resize_sample

    rng = np.random.default_rng(0)
    for (h, w), size in (((37, 50), (16, 24)), ((20, 20), (7, 9)), ((9, 12), (31, 40))):
        mask = rng.integers(0, 300, size=(h, w)).astype(np.int32)
        out = resize_sample({"image": torch.rand(3, h, w), "mask": torch.from_numpy(mask).long()}, size)["mask"]
        expected = np.asarray(Image.fromarray(mask, mode="I").resize(size[::-1], Image.NEAREST))
        assert out.dtype == torch.long and np.array_equal(out.numpy(), expected)
