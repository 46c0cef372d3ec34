"""Evaluation and training pipelines: uint8 (C, H, W) image in, normalised float (C', H', W') out.

Both are plain picklable callables (DataLoader workers may be spawned), built from a model's
:class:`~vitlab.models.base.Preprocessing`:

    eval:  resize to cover size / crop_pct, aspect kept (both sides to it for crop_mode "squash") -> centre crop
           -> channels -> [0, 1] -> normalise
    train: random resized crop -> h-flip -> channels -> RandAugment -> [0, 1] -> normalise -> random erasing

Images are decoded as RGB; a model whose ``channel_order`` is "BGR" gets the channels reversed just before
normalisation (its mean/std are in its own order).

as in the DeiT recipe (arXiv:2012.12877), except that the crop uses the model's interpolation mode
instead of a random one.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from vitlab.data.functional import (
    PicklableGenerator,
    Rng,
    center_crop,
    normalize,
    random_resized_crop_params,
    resize,
    to_float,
)
from vitlab.data.image import pil_to_tensor, to_channels
from vitlab.data.randaugment import RandAugment
from vitlab.models.base import Preprocessing


def to_channel_order(x: Tensor, order: str) -> Tensor:
    """RGB (C, H, W) image -> the model's channel order ("RGB" unchanged, "BGR" reversed)."""
    return x.flip(-3) if order == "BGR" and x.shape[-3] == 3 else x


IMAGE_FORMS = ("a uint8 (C, H, W) tensor, a PIL image or a (H, W[, C]) uint8 array; e.g. "
               "vitlab.data.load_image(path)")


def image_tensor(x: Any, where: str = "eval_transform") -> Tensor:
    """An image as the transforms take it: a (C, H, W) tensor (uint8, or floats in [0, 1]) as it is; a PIL
    image as :func:`~vitlab.data.load_image` converts a decoded file (:func:`~vitlab.data.image.pil_to_tensor`:
    EXIF orientation, transparency over white); a uint8 (H, W) or (H, W, C) array through Pillow the same way.
    Anything else, a (H, W, C) tensor included, is a ValueError naming the accepted forms; so is an empty image
    (0 height or width)."""
    if isinstance(x, Image.Image):
        _refuse_empty(where, x.height, x.width, f"a {x.width} x {x.height} (width x height) PIL image")
        return pil_to_tensor(x)
    if isinstance(x, np.ndarray):
        if x.dtype == np.uint8 and (x.ndim == 2 or (x.ndim == 3 and x.shape[-1] in (1, 2, 3, 4))):
            _refuse_empty(where, x.shape[0], x.shape[1], f"an array of shape {x.shape}")
            return pil_to_tensor(Image.fromarray(x[..., 0] if x.ndim == 3 and x.shape[-1] == 1 else x))
        raise ValueError(f"{where}: a {x.dtype} array of shape {x.shape}; expected {IMAGE_FORMS}")
    if not isinstance(x, Tensor):
        raise ValueError(f"{where}: got {type(x).__name__}; expected {IMAGE_FORMS}")
    if x.ndim not in (3, 4):
        raise ValueError(f"{where}: a tensor of shape {tuple(x.shape)}; expected {IMAGE_FORMS}")
    if x.shape[-1] in (1, 3, 4) and x.shape[-3] not in (1, 3, 4):
        raise ValueError(f"{where}: a tensor of shape {tuple(x.shape)} looks channels-last (H, W, C); expected "
                         f"{IMAGE_FORMS} (permute(2, 0, 1) a (H, W, C) tensor)")
    _refuse_empty(where, x.shape[-2], x.shape[-1], f"a tensor of shape {tuple(x.shape)}")
    return x


def _refuse_empty(where: str, h: int, w: int, what: str) -> None:
    if h < 1 or w < 1:
        raise ValueError(f"{where}: an empty image, {what} (height {h}, width {w}): nothing to resize")


class EvalTransform:
    """Deterministic evaluation preprocessing for ``pre`` (see :func:`eval_transform`)."""

    def __init__(self, pre: Preprocessing) -> None:
        self.pre = pre
        c, h, w = pre.input_size
        self.channels, self.size = c, (h, w)

    @property
    def min_source_size(self) -> int:
        """The shorter side an input needs for full quality (the resize target): larger photos may be
        decoded smaller (``load_image(min_size=...)``)."""
        return self.pre.resize_side(max(self.size))

    def resize_size(self, h: int, w: int) -> tuple[int, int]:
        """The (H, W) an ``h`` x ``w`` image is resized to before the centre crop, as timm's eval transform
        computes it: each output side's target is ``side / crop_pct``; "squash" takes both. "center" keeps the
        aspect: for a square target the shorter side becomes the target and the longer one is truncated
        (torchvision's ``Resize(int)``); for a non-square one the image is scaled by the smaller of the two
        side ratios, each side rounded (timm's ``ResizeKeepRatio``), so that it covers the crop. An empty image
        (``h`` or ``w`` 0) is a ValueError."""
        if h < 1 or w < 1:
            raise ValueError(f"cannot resize an empty image of height {h} and width {w}")
        sh, sw = self.pre.resize_side(self.size[0]), self.pre.resize_side(self.size[1])
        if self.pre.crop_mode == "squash":
            return sh, sw
        if sh == sw:
            return (sh, max(1, int(sh * w / h))) if h <= w else (max(1, int(sh * h / w)), sh)
        ratio = min(h / sh, w / sw)
        return max(1, round(h / ratio)), max(1, round(w / ratio))

    def __call__(self, x: Tensor | Image.Image | np.ndarray) -> Tensor:
        """``x``: a uint8 (C, H, W) tensor (or floats in [0, 1]), a PIL image or a uint8 (H, W[, C]) array
        (:func:`image_tensor`)."""
        v = to_float(image_tensor(x))
        v = resize(v, self.resize_size(*v.shape[-2:]), self.pre.interpolation)
        v = center_crop(v, self.size, self.pre.crop_offset)
        v = to_channel_order(to_channels(v, self.channels), self.pre.channel_order)
        return normalize(v, self.pre.mean, self.pre.std)

    def __repr__(self) -> str:
        return f"EvalTransform({self.pre})"


def eval_transform(pre: Preprocessing) -> EvalTransform:
    """Resize to cover ``size / crop_pct`` with the aspect kept (``pre.interpolation``; both sides to it for
    ``pre.crop_mode`` "squash"; :meth:`EvalTransform.resize_size`), centre-crop to
    ``pre.input_size[1:]`` (an odd margin split as ``pre.crop_offset`` says), convert to ``pre.input_size[0]``
    channels (1->3 repeat, 3->1 luma), scale to [0, 1] and normalise with ``pre.mean`` / ``pre.std``."""
    return EvalTransform(pre)


class RandomErasing(PicklableGenerator):
    """Random erasing (Zhong et al., arXiv:1708.04896) in DeiT/timm's "pixel" mode: with probability
    ``prob`` one rectangle of 2%..1/3 of the area (aspect 0.3..3.3) is replaced by N(0, 1) noise per
    pixel and channel. Applied after normalisation, where N(0, 1) is a plausible pixel distribution."""

    def __init__(self, prob: float = 0.25, *, area: tuple[float, float] = (0.02, 1 / 3),
                 aspect: tuple[float, float] = (0.3, 1 / 0.3), generator: torch.Generator | None = None) -> None:
        self.prob, self.area, self.aspect = prob, area, aspect
        self.generator = generator

    def __call__(self, x: Tensor) -> Tensor:
        rng = Rng(self.generator)
        if self.prob <= 0 or rng.random() >= self.prob:
            return x
        c, h, w = x.shape
        log_lo, log_hi = math.log(self.aspect[0]), math.log(self.aspect[1])
        for _ in range(10):
            target = rng.uniform(*self.area) * h * w
            ar = math.exp(rng.uniform(log_lo, log_hi))
            eh, ew = round(math.sqrt(target * ar)), round(math.sqrt(target / ar))
            if 0 < eh < h and 0 < ew < w:
                top, left = rng.randint(0, h - eh + 1), rng.randint(0, w - ew + 1)
                x = x.clone()
                x[:, top:top + eh, left:left + ew] = rng.normal((c, eh, ew)).to(x.dtype)
                break
        return x


class TrainTransform(PicklableGenerator):
    """Training augmentation for ``pre`` (see :func:`train_transform`).

    ``generator`` is shared by every random step. :func:`vitlab.data.create_loader` reseeds it before each
    sample (``reseed``) from (seed, epoch, the sample's position), so the augmentation of a sample does not
    depend on the worker that makes it.
    """

    def __init__(self, pre: Preprocessing, *, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: float = 0.5,
                 randaugment: tuple[int, float] | None = None, randaugment_mstd: float = 0.0,
                 re_prob: float = 0.0, generator: torch.Generator | None = None) -> None:
        self.pre = pre
        c, h, w = pre.input_size
        self.channels, self.size = c, (h, w)
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), float(hflip)
        self.generator = generator
        # Pixels warped in by rotate/shear/translate take the dataset mean colour (0..255 scale).
        fill = [255.0 * m for m in pre.mean]
        self.randaugment = (
            RandAugment(int(randaugment[0]), float(randaugment[1]), magnitude_std=randaugment_mstd, fill=fill,
                        generator=generator)
            if randaugment is not None and int(randaugment[0]) > 0 else None
        )
        self.erasing = RandomErasing(re_prob, generator=generator) if re_prob > 0 else None

    def __setstate__(self, d: dict) -> None:
        super().__setstate__(d)
        # Unpickling gives each part its own generator object; make them share the parent's again,
        # so that ``reseed`` reaches every random step.
        for part in (self.randaugment, self.erasing):
            if part is not None:
                part.generator = self.generator

    @property
    def min_source_size(self) -> int:
        """The shorter side at which the smallest random crop (area ``scale[0]``) still has the output's
        resolution; larger photos may be decoded smaller (``load_image(min_size=...)``)."""
        return math.ceil(max(self.size) / math.sqrt(max(self.scale[0], 1e-3)))

    def reseed(self, seed: int) -> None:
        """Restart the random stream from ``seed`` (``create_loader`` calls it before each sample)."""
        if self.generator is not None:
            self.generator.manual_seed(int(seed))

    def __call__(self, x: Tensor) -> Tensor:
        rng = Rng(self.generator)
        top, left, ch, cw = random_resized_crop_params(x.shape[-2], x.shape[-1], self.scale, self.ratio, rng)
        x = resize(x[..., top:top + ch, left:left + cw], self.size, self.pre.interpolation)
        if self.hflip > 0 and rng.random() < self.hflip:
            x = x.flip(-1)
        x = to_channels(x, self.channels)
        if self.randaugment is not None:
            x = self.randaugment(x)
        v = normalize(to_channel_order(to_float(x), self.pre.channel_order), self.pre.mean, self.pre.std)
        if self.erasing is not None:
            v = self.erasing(v)
        return v

    def __repr__(self) -> str:
        return (f"TrainTransform(size={self.size}, channels={self.channels}, scale={self.scale}, "
                f"ratio={self.ratio}, hflip={self.hflip}, randaugment={self.randaugment}, "
                f"re_prob={self.erasing.prob if self.erasing else 0.0})")


def train_transform(pre: Preprocessing, *, scale: tuple[float, float] = (0.08, 1.0),
                    ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: float = 0.5,
                    randaugment: tuple[int, float] | None = None, randaugment_mstd: float = 0.0,
                    re_prob: float = 0.0, generator: torch.Generator | None = None) -> TrainTransform:
    """Random resized crop to ``pre.input_size[1:]`` (area fraction ``scale``, aspect ``ratio``),
    horizontal flip with probability ``hflip``, channel conversion, RandAugment ``(num_ops, magnitude)``
    with magnitude noise ``randaugment_mstd``, [0, 1] + normalisation, random erasing with ``re_prob``.

    Every random draw comes from ``generator`` (or, when None, the global torch RNG), both of which
    :func:`~vitlab.data.create_loader` seeds per sample, so the output is a function of the loader's seed.
    """
    return TrainTransform(pre, scale=scale, ratio=ratio, hflip=hflip, randaugment=randaugment,
                          randaugment_mstd=randaugment_mstd, re_prob=re_prob, generator=generator)
