"""DINO's multi-crop augmentation: 2 global crops and N local crops of one image, each at its own size.

Global crops cover 40-100% of the image (``global_scale``) at the model's input size; local crops
5-40% (``local_scale``) at a smaller size (96 px for 224 px globals in DINO; here by default 3/7 of the
global size rounded to the patch grid by the caller); both of aspect ratio 3/4 to 4/3 (``ratio``). Each
crop is flipped with probability 0.5 and gets a brightness/contrast jitter; DINO's blur, solarisation and
colour jitter are left out (a documented deviation). Returns a list of normalised tensors, globals first;
the default collate turns a batch into a list of (B, C, h, w) tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vitlab.data.functional import PicklableGenerator, Rng, normalize, random_resized_crop_params, resize, to_float
from vitlab.data.image import to_channels
from vitlab.models.base import Preprocessing


class MultiCropTransform(PicklableGenerator):
    def __init__(self, pre: Preprocessing, *, local_size: int | tuple[int, int], num_local: int = 8,
                 global_scale: tuple[float, float] = (0.4, 1.0), local_scale: tuple[float, float] = (0.05, 0.4),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), jitter: float = 0.4, hflip: float = 0.5,
                 generator: torch.Generator | None = None) -> None:
        c, h, w = pre.input_size
        self.pre, self.channels, self.global_size = pre, c, (h, w)
        self.local_size = (local_size, local_size) if isinstance(local_size, int) else tuple(local_size)
        self.num_local = num_local
        self.global_scale, self.local_scale, self.ratio = tuple(global_scale), tuple(local_scale), tuple(ratio)
        self.jitter, self.hflip = jitter, hflip
        self.generator = generator

    def reseed(self, seed: int) -> None:
        """Restart the random stream from ``seed`` (``create_loader`` calls it before each sample)."""
        if self.generator is not None:
            self.generator.manual_seed(int(seed))

    def _crop(self, x: Tensor, size: tuple[int, int], scale: tuple[float, float], rng: Rng) -> Tensor:
        top, left, ch, cw = random_resized_crop_params(x.shape[-2], x.shape[-1], scale, self.ratio, rng)
        v = resize(x[..., top:top + ch, left:left + cw], size, self.pre.interpolation)
        if rng.random() < self.hflip:
            v = v.flip(-1)
        v = to_float(to_channels(v, self.channels))  # [0, 1]
        if self.jitter > 0:  # brightness and contrast, each by a factor in [1 - j, 1 + j]
            b = rng.uniform(1 - self.jitter, 1 + self.jitter)
            c = rng.uniform(1 - self.jitter, 1 + self.jitter)
            v = ((v * b - v.mean()) * c + v.mean()).clamp(0, 1)
        return normalize(v, self.pre.mean, self.pre.std)

    def __call__(self, x: Tensor) -> list[Tensor]:
        rng = Rng(self.generator)
        crops = [self._crop(x, self.global_size, self.global_scale, rng) for _ in range(2)]
        crops += [self._crop(x, self.local_size, self.local_scale, rng) for _ in range(self.num_local)]
        return crops

    def __repr__(self) -> str:
        return (f"MultiCropTransform(global={self.global_size}, local={self.local_size} x {self.num_local}, "
                f"scales={self.global_scale}/{self.local_scale})")
