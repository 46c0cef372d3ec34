"""Repeated augmentation (Hoffer et al., arXiv:1901.09335), as DeiT uses it: every image appears
``num_repeats`` times per epoch, its copies spread over the replicas so that each process sees a
different augmentation of it, and each replica draws ``ceil(N / num_replicas)`` samples per epoch
(an epoch is as long as without repetition; it sees about N / num_repeats distinct images)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


class RepeatAugSampler(Sampler[int]):
    """Sampler for repeated augmentation; call ``set_epoch(e)`` each epoch for a new order.

    Args:
        dataset: the dataset or its length.
        num_replicas, rank: the process group's size and this process's rank; None reads them from
            ``torch.distributed`` when it is initialised (else 1 and 0).
        shuffle: random order (seeded by ``seed + epoch``) or the dataset order.
        num_repeats: copies of each index per epoch (DeiT: 3).
        seed: shared by all replicas, which must agree on the permutation.
    """

    def __init__(self, dataset: Sized | int, num_replicas: int | None = 1, rank: int | None = 0, *,
                 shuffle: bool = True, num_repeats: int = 3, seed: int = 0) -> None:
        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside [0, {num_replicas})")
        if num_repeats < 1:
            raise ValueError(f"num_repeats must be >= 1, got {num_repeats}")
        self.length = dataset if isinstance(dataset, int) else len(dataset)
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.shuffle, self.num_repeats, self.seed = shuffle, int(num_repeats), int(seed)
        self.epoch = 0
        # Padded so that every replica gets the same number of repeated indices.
        self.num_repeated = math.ceil(self.length * self.num_repeats / self.num_replicas)
        self.total_size = self.num_repeated * self.num_replicas
        self.num_selected = math.ceil(self.length / self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.length, generator=g)
        else:
            order = torch.arange(self.length)
        indices = order.repeat_interleave(self.num_repeats).tolist()  # i, i, i, j, j, j, ...
        pad = self.total_size - len(indices)
        if pad > 0:
            indices += indices[:pad]
        # Consecutive copies of one image go to different replicas.
        mine = indices[self.rank:self.total_size:self.num_replicas]
        return iter(mine[: self.num_selected])

    def __len__(self) -> int:
        return self.num_selected
