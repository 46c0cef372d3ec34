"""Tensor image operations shared by the transforms: resizing, cropping, affine warps, normalisation.

Images are (C, H, W) tensors, either uint8 (0..255) or float (0..1); operations that interpolate return
the input dtype (uint8 results are rounded and clamped, like a PIL round trip would be).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

Interpolation = str  # "bicubic" | "bilinear" | "nearest"


class Rng:
    """Random draws from an explicit ``torch.Generator``, or the global torch RNG when it is None.

    :func:`~vitlab.data.create_loader` seeds the global RNG (and reseeds explicit generators) before each sample,
    so transforms without an explicit generator are still reproducible under ``create_loader(seed=...)``.
    """

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def random(self) -> float:
        return float(torch.rand((), generator=self.generator))

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self.random()

    def randint(self, low: int, high: int) -> int:
        """Uniform integer in [low, high)."""
        return int(torch.randint(low, high, (), generator=self.generator))

    def normal(self, shape: Sequence[int] = ()) -> Tensor:
        return torch.randn(tuple(shape), generator=self.generator)

    def sign(self) -> float:
        return -1.0 if self.random() < 0.5 else 1.0


class PicklableGenerator:
    """Mixin for callables holding an optional ``self.generator``: pickles the generator as plain bytes.

    DataLoader workers started with "spawn" receive the dataset through torch's shared-memory pickler,
    which cannot rebuild a ``torch.Generator`` (its state tensor fails to map); bytes travel fine, and
    the worker gets a generator in the same state.
    """

    def __getstate__(self) -> dict:
        d = self.__dict__.copy()
        g = d.get("generator")
        if isinstance(g, torch.Generator):
            d["generator"] = ("torch.Generator", str(g.device), g.get_state().numpy().tobytes())
        return d

    def __setstate__(self, d: dict) -> None:
        g = d.get("generator")
        if isinstance(g, tuple) and len(g) == 3 and g[0] == "torch.Generator":
            gen = torch.Generator(device=g[1])
            gen.set_state(torch.frombuffer(bytearray(g[2]), dtype=torch.uint8))
            d = {**d, "generator": gen}
        self.__dict__.update(d)


# float images a little outside [0, 1] (rounding in an earlier operation) are still images in [0, 1]
_UNIT_RANGE_SLACK = 1e-3


def check_unit_range(x: Tensor, where: str = "image") -> None:
    """Refuse a non-uint8 image whose values are not in [0, 1] (0..255 floats, an already normalised
    tensor, NaN or inf): the operations here would silently give a wrong image. One min/max pass."""
    if x.dtype == torch.uint8 or x.numel() == 0:
        return
    lo, hi = (float(v) for v in torch.aminmax(x.detach().float()))
    if not (math.isfinite(lo) and math.isfinite(hi)):  # NaN fails every comparison below
        raise ValueError(f"{where}: a {str(x.dtype).removeprefix('torch.')} image with NaN or infinite values; "
                         f"expected uint8 (0..255) or floats in [0, 1]")
    if lo < -_UNIT_RANGE_SLACK or hi > 1 + _UNIT_RANGE_SLACK:
        if lo >= -_UNIT_RANGE_SLACK and hi <= 255:
            hint = " (0..255 values: pass them as uint8, or divide by 255)"
        elif lo < -_UNIT_RANGE_SLACK:
            hint = " (normalised already? transform the image before normalisation)"
        else:
            hint = ""
        raise ValueError(f"{where}: a {str(x.dtype).removeprefix('torch.')} image with values in {lo:.4g}..{hi:.4g}; "
                         f"expected uint8 (0..255) or floats in [0, 1]{hint}")


def to_float(x: Tensor) -> Tensor:
    """uint8 0..255 -> float32 0..1; float tensors in [0, 1] are returned as float32 unchanged; other
    ranges (0..255 floats, normalised tensors) are refused with a ValueError."""
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    check_unit_range(x)
    return x.float()


@functools.lru_cache(maxsize=256)
def _nearest_index(n_in: int, n_out: int) -> Tensor:
    """Source index of each output position for a nearest resize of ``n_in`` -> ``n_out``, as Pillow's NEAREST
    takes it: floor((i + 0.5) * n_in / n_out), the centre of output pixel i, with the positions accumulated in
    doubles as Pillow's ImagingScaleAffine adds them up (which decides the exact ties, e.g. 64 -> 7 at i = 3:
    31, not 32). torch's "nearest" takes floor(i * scale), half a pixel off; "nearest-exact" uses a float32
    scale, which rounds some ties the other way."""
    step = n_in / n_out
    pos, out = step * 0.5, []
    for _ in range(n_out):
        out.append(min(max(int(pos), 0), n_in - 1))
        pos += step
    return torch.tensor(out, dtype=torch.long)  # shared by later calls: read, never written


def resize(x: Tensor, size: tuple[int, int], interpolation: Interpolation = "bilinear") -> Tensor:
    """Resize a (C, H, W) or (B, C, H, W) image to ``size`` = (H, W); anti-aliased when shrinking. "nearest"
    picks the source pixels Pillow's NEAREST picks (timm, Hugging Face's processors)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if interpolation == "nearest":
        rows, cols = _nearest_index(x.shape[-2], size[0]), _nearest_index(x.shape[-1], size[1])
        return x.index_select(-2, rows.to(x.device)).index_select(-1, cols.to(x.device))
    squeeze = x.ndim == 3
    v = x[None] if squeeze else x
    dtype = v.dtype
    if interpolation == "bicubic":  # the clamp below assumes a [0, 1] image: 0..255 floats would turn white
        check_unit_range(v)
    v = v.float()
    antialias = interpolation in ("bilinear", "bicubic")
    kwargs = {"align_corners": False} if interpolation in ("bilinear", "bicubic") else {}
    v = F.interpolate(v, size=tuple(size), mode=interpolation, antialias=antialias, **kwargs)
    if dtype == torch.uint8:
        v = v.round_().clamp_(0, 255).to(torch.uint8)
    elif interpolation == "bicubic":
        v = v.clamp_(0.0, 1.0)  # bicubic overshoots; keep values in the image range
    else:
        v = v.to(dtype)
    return v[0] if squeeze else v


def resize_shorter(x: Tensor, shorter: int, interpolation: Interpolation = "bilinear") -> Tensor:
    """Resize so that the shorter side becomes ``shorter``, keeping the aspect ratio."""
    h, w = x.shape[-2:]
    if h <= w:
        size = (shorter, max(1, int(shorter * w / h)))
    else:
        size = (max(1, int(shorter * h / w)), shorter)
    return resize(x, size, interpolation)


def center_crop(x: Tensor, size: tuple[int, int], offset: str = "round") -> Tensor:
    """Centre crop to ``size`` = (H, W); an image smaller than that is zero-padded around the centre first.
    ``offset`` places the crop on an odd margin: "round" at ``round(margin / 2)`` (half to even, as timm and
    torchvision), "floor" at ``margin // 2`` (as Hugging Face's image processors)."""
    if offset not in ("round", "floor"):
        raise ValueError(f"center_crop: offset must be 'round' or 'floor', got {offset!r}")
    th, tw = size
    h, w = x.shape[-2:]
    if h < th or w < tw:
        ph, pw = max(th - h, 0), max(tw - w, 0)
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        h, w = x.shape[-2:]
    if offset == "floor":
        top, left = (h - th) // 2, (w - tw) // 2
    else:
        top, left = round((h - th) / 2.0), round((w - tw) / 2.0)
    return x[..., top:top + th, left:left + tw]


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(x - mean) / std per channel; a one-value mean/std applies to every channel."""
    c = x.shape[-3]
    if len(mean) not in (1, c) or len(std) not in (1, c):
        raise ValueError(f"normalisation has {len(mean)} mean / {len(std)} std values for a {c}-channel image")
    m = torch.tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return (x - m) / s


def affine(v: Tensor, matrix: Sequence[Sequence[float]], translate: tuple[float, float] = (0.0, 0.0), *,
           fill: float | Sequence[float] = 0.0, interpolation: str = "bilinear") -> Tensor:
    """Warp a float (C, H, W) image; ``matrix`` (2x2) and ``translate`` (pixels, x then y) map an output
    pixel's offset from the image centre to the input offset it samples. Outside pixels get ``fill``."""
    c, h, w = v.shape
    (a, b), (cc, d) = matrix
    tx, ty = translate
    # Pixel offsets -> normalised coordinates (align_corners=False: x_norm = 2 * x_pix / W), so
    # theta = S A S^-1 with S = diag(2/W, 2/H), and the translation scaled by S.
    theta = torch.tensor([[a, b * h / w, 2.0 * tx / w], [cc * w / h, d, 2.0 * ty / h]], dtype=torch.float32)
    grid = F.affine_grid(theta[None], [1, c, h, w], align_corners=False)  # (1, H, W, 2)
    f = torch.as_tensor(fill, dtype=v.dtype).reshape(-1, 1, 1)
    # grid_sample pads with zeros: shift so that the padding value becomes `fill`.
    out = F.grid_sample((v - f)[None], grid, mode=interpolation, padding_mode="zeros", align_corners=False)[0]
    return out + f


def random_resized_crop_params(h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float],
                               rng: Rng, attempts: int = 10) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a crop covering a random area fraction in ``scale`` with a
    log-uniform aspect ratio in ``ratio``; falls back to the largest centred crop within ``ratio``."""
    area = h * w
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        cw = round(math.sqrt(target * aspect))
        ch = round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return rng.randint(0, h - ch + 1), rng.randint(0, w - cw + 1), ch, cw
    in_ratio = w / h
    if in_ratio < min(ratio):
        cw, ch = w, round(w / min(ratio))
    elif in_ratio > max(ratio):
        ch, cw = h, round(h * max(ratio))
    else:
        ch, cw = h, w
    return (h - ch) // 2, (w - cw) // 2, ch, cw
