"""RandAugment (Cubuk et al., "RandAugment: Practical automated data augmentation with a reduced search
space", arXiv:1909.13719) on tensors, in the form DeiT trains with: timm's "rand-m9-mstd0.5-inc1".

The operations and their magnitude -> argument mappings are timm's increasing ("inc1") list
(``timm.data.auto_augment._RAND_INCREASING_TRANSFORMS``; :data:`TIMM_NAMES` gives each op's timm name).
Each call picks ``num_ops`` operations uniformly (with replacement) and applies each with probability
``prob`` (0.5, as in timm's recipe used by DeiT). The magnitude lives on a 0..10 scale; with
``magnitude_std > 0`` every application draws its magnitude from N(magnitude, std), clipped to [0, 10].
Rotations, shears, translations and enhancement factors take a random sign. Not every op is close to the
identity at magnitude 0: Invert, AutoContrast and Equalize ignore the magnitude, and Posterize keeps 4 bits
at magnitude 0 down to none at 10.

Operations take and return a (C, H, W) image: uint8 in 0..255 or float in 0..1 (converted internally).
Geometric ops interpolate bilinearly (timm: the training interpolation, bicubic in DeiT, else bilinear or
bicubic at random) and fill with ``fill`` (timm: ``img_mean``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from vitlab.data.functional import PicklableGenerator, Rng, affine

MAX_LEVEL = 10.0
_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)

# ------------------------------------------------------------------ helpers on float images in 0..255


def _gray(v: Tensor) -> Tensor:
    """Luma plane (1, H, W) of a 0..255 float image (the image itself when it has one channel)."""
    return v if v.shape[0] == 1 else (v * _LUMA).sum(0, keepdim=True)


def _blend(degenerate: Tensor, v: Tensor, factor: float) -> Tensor:
    """PIL ImageEnhance semantics: factor 0 -> degenerate, 1 -> original, > 1 extrapolates."""
    return (degenerate + factor * (v - degenerate)).clamp_(0.0, 255.0)


def _factor(level: float, rng: Rng) -> float:
    """timm's increasing enhancement factor: 1 +- 0.9 * level / 10, at least 0.1."""
    return max(0.1, 1.0 + rng.sign() * (level / MAX_LEVEL) * 0.9)


# ------------------------------------------------------------------------------------------ operations


def invert(v: Tensor, level: float, rng: Rng, fill: Tensor) -> Tensor:
    return 255.0 - v


def autocontrast(v: Tensor, level: float, rng: Rng, fill: Tensor) -> Tensor:
    lo = v.amin(dim=(1, 2), keepdim=True)
    hi = v.amax(dim=(1, 2), keepdim=True)
    scale = torch.where(hi > lo, 255.0 / (hi - lo).clamp_min(1e-6), torch.ones_like(hi))
    lo = torch.where(hi > lo, lo, torch.zeros_like(lo))  # flat channels stay as they are
    return ((v - lo) * scale).clamp_(0.0, 255.0)


def equalize(v: Tensor, level: float, rng: Rng, fill: Tensor) -> Tensor:
    """Histogram equalisation per channel, with PIL's lookup-table rule (the top level keeps its weight)."""
    q = v.round().clamp(0, 255).long()
    out = []
    for ch in q:
        hist = torch.bincount(ch.flatten(), minlength=256)
        nonzero = hist[hist > 0]
        step = (int(hist.sum()) - int(nonzero[-1])) // 255 if nonzero.numel() > 1 else 0
        if step == 0:
            out.append(ch.float())
            continue
        # lut[i] = (step // 2 + number of pixels darker than i) // step
        lut = ((torch.cumsum(hist, 0) - hist + step // 2) // step).clamp_(0, 255)
        out.append(lut[ch].float())
    return torch.stack(out)


def rotate(v: Tensor, level: float, rng: Rng, fill: Tensor) -> Tensor:
    angle = torch.deg2rad(torch.tensor(rng.sign() * (level / MAX_LEVEL) * 30.0))  # PIL's rotate(+deg) for +
    cos, sin = float(torch.cos(angle)), float(torch.sin(angle))
    return affine(v, ((cos, -sin), (sin, cos)), fill=fill)


def solarize(v: Tensor, level: float, rng: Rng, fill: Tensor) -> Tensor:
    """Invert values >= the threshold 256 - int(256 * level / 10) (level 0: nothing; level 10: all)."""
    threshold = 256 - min(256, int((level / MAX_LEVEL) * 256))
    return torch.where(v >= threshold, 255.0 - v, v)


def solarize_add(v: Tensor, level: float, rng: Rng, fill: Tensor) -> Tensor:
    """Add int(110 * level / 10) to values below 128 (capped at 255); the others are kept."""
    add = min(128, int((level / MAX_LEVEL) * 110))
    return torch.where(v < 128.0, (v + add).clamp_max(255.0), v)


def color(v: Tensor, level: float, rng: Rng, fill: Tensor) -> Tensor:
    if v.shape[0] == 1:
        return v  # saturation means nothing for one channel
    return _blend(_gray(v), v, _factor(level, rng))


def posterize(v: Tensor, level: float, rng: Rng, fill: Tensor) -> Tensor:
    """Keep the 4 - int(4 * level / 10) most significant bits: 4 at level 0 down to 0 (black) at 10."""
    bits = 4 - int((level / MAX_LEVEL) * 4)
    mask = 0xFF ^ ((1 << (8 - bits)) - 1)
    return (v.round().clamp(0, 255).to(torch.uint8) & mask).float()


def contrast(v: Tensor, level: float, rng: Rng, fill: Tensor) -> Tensor:
    mean = _gray(v).mean().round()  # PIL blends with the rounded mean grey level
    return _blend(mean.expand_as(v), v, _factor(level, rng))


def brightness(v: Tensor, level: float, rng: Rng, fill: Tensor) -> Tensor:
    return _blend(torch.zeros_like(v), v, _factor(level, rng))


_SMOOTH = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0


def sharpness(v: Tensor, level: float, rng: Rng, fill: Tensor) -> Tensor:
    _c, h, w = v.shape
    if h < 3 or w < 3:
        return v
    # PIL's SMOOTH filter on the interior; the one-pixel border keeps its original values.
    smooth = F.conv2d(v[:, None], _SMOOTH.view(1, 1, 3, 3).to(v.dtype))[:, 0]  # (C, H-2, W-2)
    degenerate = v.clone()
    degenerate[:, 1:-1, 1:-1] = smooth.round()
    return _blend(degenerate, v, _factor(level, rng))


def shear_x(v: Tensor, level: float, rng: Rng, fill: Tensor) -> Tensor:
    # PIL's affine (1, s, 0, 0, 1, 0) samples x + s * y: a shear about the top-left corner, so about the
    # centre plus a shift of s * H / 2
    s = rng.sign() * (level / MAX_LEVEL) * 0.3
    return affine(v, ((1.0, s), (0.0, 1.0)), (s * v.shape[1] / 2, 0.0), fill=fill)


def shear_y(v: Tensor, level: float, rng: Rng, fill: Tensor) -> Tensor:
    s = rng.sign() * (level / MAX_LEVEL) * 0.3
    return affine(v, ((1.0, 0.0), (s, 1.0)), (0.0, s * v.shape[2] / 2), fill=fill)


def translate_x(v: Tensor, level: float, rng: Rng, fill: Tensor) -> Tensor:
    t = rng.sign() * (level / MAX_LEVEL) * 0.45 * v.shape[2]  # up to 45% of the width
    return affine(v, ((1.0, 0.0), (0.0, 1.0)), (t, 0.0), fill=fill)


def translate_y(v: Tensor, level: float, rng: Rng, fill: Tensor) -> Tensor:
    t = rng.sign() * (level / MAX_LEVEL) * 0.45 * v.shape[1]
    return affine(v, ((1.0, 0.0), (0.0, 1.0)), (0.0, t), fill=fill)


Op = Callable[[Tensor, float, Rng, Tensor], Tensor]
# timm's increasing list, in its order
OPS: dict[str, Op] = {
    "autocontrast": autocontrast, "equalize": equalize, "invert": invert, "rotate": rotate,
    "posterize": posterize, "solarize": solarize, "solarize_add": solarize_add, "color": color,
    "contrast": contrast, "brightness": brightness, "sharpness": sharpness, "shear_x": shear_x,
    "shear_y": shear_y, "translate_x": translate_x, "translate_y": translate_y,
}
TIMM_NAMES: dict[str, str] = {
    "autocontrast": "AutoContrast", "equalize": "Equalize", "invert": "Invert", "rotate": "Rotate",
    "posterize": "PosterizeIncreasing", "solarize": "SolarizeIncreasing", "solarize_add": "SolarizeAdd",
    "color": "ColorIncreasing", "contrast": "ContrastIncreasing", "brightness": "BrightnessIncreasing",
    "sharpness": "SharpnessIncreasing", "shear_x": "ShearX", "shear_y": "ShearY", "translate_x": "TranslateXRel",
    "translate_y": "TranslateYRel",
}


def apply_op(name: str, x: Tensor, level: float, rng: Rng | None = None,
             fill: float | Sequence[float] = 128.0) -> Tensor:
    """Apply one named operation at ``level`` (0..10) to a uint8 or float (0..1) (C, H, W) image."""
    rng = rng or Rng()
    is_uint8 = x.dtype == torch.uint8
    v = x.float() if is_uint8 else x.float() * 255.0
    f = torch.as_tensor(fill, dtype=torch.float32).reshape(-1, 1, 1)
    if f.shape[0] not in (1, v.shape[0]):
        f = f.mean().reshape(1, 1, 1)  # e.g. an RGB fill for a grayscale image
    out = OPS[name](v, float(level), rng, f).clamp(0.0, 255.0)
    if is_uint8:
        return out.round().to(torch.uint8)
    return (out / 255.0).to(x.dtype)


class RandAugment(PicklableGenerator):
    """Callable RandAugment on (C, H, W) uint8/float images; see the module docstring.

    Args:
        num_ops: operations applied per image (the paper's N).
        magnitude: 0..10 (the paper's M); DeiT uses 9.
        magnitude_std: std of the per-application magnitude noise (DeiT: 0.5).
        prob: probability that each chosen operation is applied.
        fill: value (0..255 scale, one per channel or one for all) for pixels warped in from outside.
        generator: explicit random source; None uses the global torch RNG (seeded per sample by
            :func:`vitlab.data.create_loader`).
        ops: restrict to these operation names (default: all of ``OPS``).
    """

    def __init__(self, num_ops: int = 2, magnitude: float = 9.0, *, magnitude_std: float = 0.0, prob: float = 0.5,
                 fill: float | Sequence[float] = 128.0, generator: torch.Generator | None = None,
                 ops: Sequence[str] | None = None) -> None:
        if not 0.0 <= magnitude <= MAX_LEVEL:
            raise ValueError(f"RandAugment magnitude must be in [0, {MAX_LEVEL:g}], got {magnitude}")
        unknown = sorted(set(ops or ()) - set(OPS))
        if unknown:
            raise ValueError(f"unknown RandAugment ops {unknown}; known: {sorted(OPS)}")
        self.num_ops = int(num_ops)
        self.magnitude = float(magnitude)
        self.magnitude_std = float(magnitude_std)
        self.prob = float(prob)
        self.fill = fill
        self.ops = list(ops) if ops else list(OPS)
        self.generator = generator

    def __call__(self, x: Tensor) -> Tensor:
        rng = Rng(self.generator)
        for _ in range(self.num_ops):
            name = self.ops[rng.randint(0, len(self.ops))]
            if rng.random() > self.prob:
                continue
            level = self.magnitude
            if self.magnitude_std > 0:
                level = level + self.magnitude_std * float(rng.normal())
            level = min(max(level, 0.0), MAX_LEVEL)
            x = apply_op(name, x, level, rng, self.fill)
        return x

    def __repr__(self) -> str:
        return (f"RandAugment(num_ops={self.num_ops}, magnitude={self.magnitude}, "
                f"magnitude_std={self.magnitude_std}, prob={self.prob})")
