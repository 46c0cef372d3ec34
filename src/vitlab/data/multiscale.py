"""The multi-scale sampler of MobileViT (Mehta & Rastegari 2021, arXiv:2110.02178, sec. 3.3; cvnets'
``VariableBatchSampler``): every batch is drawn at one resolution from a set, and its batch size grows as
the resolution shrinks, so that each batch holds about as many pixels as a batch at the base size.

Rule (the paper's eq.: b_t = H_n W_n b / (H_t W_t)): at size s, ``batch = max(1, round(b * H0 W0 / s^2))``
where ``b`` is the recipe's batch size at the model's input size H0 x W0. (cvnets' code instead keeps ``b``
for the sizes above the base - ``max(b, ...)`` - so its larger batches hold more pixels; vitlab follows the
paper's constant budget, which also bounds memory.)

Exact resumption: an epoch's plan is a pure function of (seed, epoch). The indices come from an index
sampler (the trainer's DistributedSampler or RepeatAugSampler: the same permutation on every rank, each
rank its share); the sizes from a generator of (seed, epoch) of the sampler's own, so it never touches
the global random generators. Every rank uses the same size at each step. An epoch has a fixed number of
batches, ``len(indices) // mean batch size``, its sizes a shuffled cycle over the set (each size equally
often); indices wrap around to the start of the epoch's order when the drawn batches need more than one
pass (cvnets fills its last batch the same way).

Images: :class:`MultiScaleDataset` resizes each sample (produced by the data set's own transform) to its
batch's size, bilinear with antialiasing. Build the training transform at the largest size so that every
batch is a down-sampled crop (``train/run.py`` does); a transform at the base size gives blurrier images
at the larger sizes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Sampler


def multiscale_batches(base_size: tuple[int, int], base_batch: int, sizes: Sequence[int]) -> list[tuple[int, int]]:
    """(size, batch size) for each size: ``max(1, round(base_batch * H0 * W0 / size**2))``, sorted by size."""
    if not sizes:
        raise ValueError("multi-scale sampling: give at least one size")
    bad = [s for s in sizes if int(s) != s or s < 1]
    if bad:
        raise ValueError(f"multi-scale sampling: sizes must be positive integers, got {list(sizes)}")
    if base_batch < 1:
        raise ValueError(f"multi-scale sampling: the base batch size must be >= 1, got {base_batch}")
    h0, w0 = base_size
    return [(int(s), max(1, round(base_batch * h0 * w0 / (s * s)))) for s in sorted(set(int(s) for s in sizes))]


class MultiScaleBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(index, size)`` pairs; call ``set_epoch(e)`` each epoch (passed on to ``indices``).

    Args:
        indices: an index sampler giving this process's share of the epoch's order (with ``set_epoch``
            for a new order per epoch, as DistributedSampler and RepeatAugSampler have).
        base_size: (H0, W0), the resolution at which ``base_batch`` applies (the model's input size).
        base_batch: the batch size at ``base_size``.
        sizes: the square training resolutions (MobileViT: 160, 192, 256, 288, 320).
        seed: the size plan's seed; every rank must use the same one.
    """

    def __init__(self, indices: Sampler[int], *, base_size: tuple[int, int], base_batch: int,
                 sizes: Sequence[int], seed: int = 0) -> None:
        self.indices = indices
        self.scales = multiscale_batches(base_size, base_batch, sizes)
        self.seed = int(seed)
        self.epoch = 0
        n = len(indices)  # type: ignore[arg-type]
        mean_batch = sum(b for _, b in self.scales) / len(self.scales)
        self.num_batches = math.floor(n / mean_batch)
        if self.num_batches < 1:
            raise ValueError(f"multi-scale sampling: {n} samples per process cannot fill one batch of the mean "
                             f"size {mean_batch:.1f} (sizes and batches {self.scales})")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.indices, "set_epoch"):
            self.indices.set_epoch(epoch)

    def plan(self) -> list[tuple[int, int]]:
        """This epoch's (size, batch size) per batch: a shuffled cycle over the scales, from (seed, epoch)."""
        k = len(self.scales)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch + 7_919)  # not the order's stream
        cycles = math.ceil(self.num_batches / k)
        order = torch.cat([torch.randperm(k, generator=g) for _ in range(cycles)])[: self.num_batches]
        return [self.scales[i] for i in order.tolist()]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = list(self.indices)
        pos = 0
        for size, batch in self.plan():
            yield [(order[(pos + j) % len(order)], size) for j in range(batch)]
            pos += batch

    def __len__(self) -> int:
        return self.num_batches


class MultiScaleDataset(Dataset):
    """``dataset[i]`` (an (image, target) pair with a (C, H, W) tensor image) resized to the size that
    :class:`MultiScaleBatchSampler` pairs with ``i``. Plain integer indices give the sample unchanged."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.skip_bad_images = getattr(dataset, "skip_bad_images", False)
        self.classes = getattr(dataset, "classes", None)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: int | tuple[int, int]) -> Any:
        if not isinstance(item, tuple):
            return self.dataset[item]
        index, size = item
        sample = self.dataset[index]
        if sample is None:  # an undecodable image, skipped by the collate
            return None
        image, *rest = sample
        if not isinstance(image, Tensor) or image.ndim != 3:
            raise TypeError(f"multi-scale sampling needs (C, H, W) tensor images, got "
                            f"{type(image).__name__}{tuple(image.shape) if isinstance(image, Tensor) else ''} "
                            f"from {type(self.dataset).__name__}")
        if image.shape[-2:] != (size, size):
            image = F.interpolate(image[None].float(), size=(size, size), mode="bilinear", align_corners=False,
                                  antialias=True)[0]  # (C, size, size)
        return (image, *rest)
