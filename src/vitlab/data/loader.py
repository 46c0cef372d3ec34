"""``create_loader``: a seeded DataLoader that reseeds augmentation per worker and drops skipped images."""

from __future__ import annotations

import random
import signal
from typing import Any

import numpy as np
import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    Sampler,
    default_collate,
    get_worker_info,
)


def collate_skip_none(batch: list[Any]) -> Any:
    """``default_collate`` after dropping the ``None`` samples a ``skip_bad_images`` dataset yields.
    A batch in which every sample was bad collates to ``None``; training loops should skip it."""
    kept = [b for b in batch if b is not None]
    if not kept:
        return None
    return default_collate(kept)


def _skips_bad_images(dataset: Any) -> bool:
    """True when the dataset (or the dataset a Subset/ConcatDataset-style wrapper holds) may yield None."""
    for _ in range(4):
        if getattr(dataset, "skip_bad_images", False):
            return True
        inner = getattr(dataset, "datasets", None)
        if inner is not None:  # ConcatDataset
            return any(_skips_bad_images(d) for d in inner)
        dataset = getattr(dataset, "dataset", None)
        if dataset is None:
            return False
    return False


def _reseed_transforms(obj: Any, seed: int, depth: int = 0) -> None:
    """Reseed explicit generators of the dataset's transform (also inside Subset-style wrappers)."""
    if obj is None or depth > 3:
        return
    t = getattr(obj, "transform", None)
    if t is not None and hasattr(t, "reseed"):
        t.reseed(seed)
    _reseed_transforms(getattr(obj, "dataset", None), seed, depth + 1)


def seed_worker(worker_id: int) -> None:
    """Worker init: seed python/numpy from torch's per-worker seed (base_seed + worker_id, where the base
    seed comes from the loader's seeded generator), and give each worker's transform its own stream."""
    info = get_worker_info()
    if info is not None:  # Ctrl-C reaches the whole process group: the main process finishes its step and
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # shuts the workers down
    seed = info.seed if info is not None else torch.initial_seed()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    if info is not None:
        _reseed_transforms(info.dataset, seed)


def create_loader(dataset: Dataset, *, batch_size: int, shuffle: bool, num_workers: int = 0, seed: int = 0,
                  drop_last: bool = False, sampler: Sampler | None = None, distributed: bool = False,
                  batch_sampler: Sampler | None = None,
                  pin_memory: bool | None = None, persistent_workers: bool | None = None) -> DataLoader:
    """A DataLoader whose order and augmentation are a function of ``seed``.

    Args:
        shuffle: random order (ignored when ``sampler`` is given; passed to the DistributedSampler).
        distributed: without an explicit ``sampler``, shard with ``DistributedSampler(seed=seed)``;
            call ``loader.sampler.set_epoch(epoch)`` each epoch (as for ``RepeatAugSampler``).
        pin_memory: default True when CUDA is available.
        persistent_workers: default True when ``num_workers > 0`` (workers keep their RNG across epochs).
        batch_sampler: yields whole batches (e.g. :class:`~vitlab.data.multiscale.MultiScaleBatchSampler`);
            ``batch_size``, ``shuffle``, ``sampler`` and ``drop_last`` are then unused.
    """
    if sampler is None and distributed:
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    # a dataset may batch its own way (detection: padded images, pixel masks, per-image target lists)
    collate = getattr(dataset, "collate", None) or (collate_skip_none if _skips_bad_images(dataset) else default_collate)
    generator = torch.Generator().manual_seed(int(seed))
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    if persistent_workers is None:
        persistent_workers = num_workers > 0
    if batch_sampler is not None:
        batching: dict[str, Any] = {"batch_sampler": batch_sampler}
    else:
        batching = {"batch_size": batch_size, "shuffle": shuffle if sampler is None else False, "sampler": sampler,
                    "drop_last": drop_last}
    return DataLoader(
        dataset,
        **batching,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        worker_init_fn=seed_worker,
        generator=generator,
        persistent_workers=persistent_workers and num_workers > 0,
    )
