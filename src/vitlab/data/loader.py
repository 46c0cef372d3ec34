"""``create_loader``: a seeded DataLoader whose augmentation is drawn per sample and which drops skipped images.

Augmentation is a function of the sample, not of the process that draws it: the loader's sampler is wrapped
(:class:`SeededSampler`) so that it yields each item with a seed, :func:`sample_seed` of (the loader's seed,
the epoch, the item's position in the epoch's order), and the dataset is wrapped (:class:`SeededDataset`) so
that the transform's random sources are seeded with it just before the sample is made. Which worker (or how
many workers, or none) loads a sample therefore does not change its crops, flips or erasing, a run resumed
mid-epoch draws what the uninterrupted run drew (positions stay absolute past the skipped samples), and
under ``DistributedSampler`` / ``RepeatAugSampler`` the position is the one in the epoch's order shared by
all ranks, so N processes augment each sample as one process does.
"""

from __future__ import annotations

import contextlib
import gc
import random
import signal
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    default_collate,
    get_worker_info,
)

_MASK64 = (1 << 64) - 1


class WorkerLoader(DataLoader):
    """A DataLoader that collects the process's garbage before it starts worker processes.

    Workers are forked (Linux's default) from a process that may hold unreachable objects whose destructors
    need threads that a forked child does not have: an ONNX Runtime session left in a reference cycle waited
    forever on its thread pool when the child's first garbage collection freed it (a worker hung in
    ``torch.manual_seed``). Collected in the parent first, nothing of the kind is left for a child to free."""

    def _get_iterator(self):  # noqa: ANN202 - DataLoader's own
        if self.num_workers > 0:
            gc.collect()
        return super()._get_iterator()


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


# ------------------------------------------------------------------------------------------ per-sample seeds


def _splitmix64(x: int) -> int:
    """One SplitMix64 step (Steele et al. 2014): a bijective, well-mixing map of 64-bit integers."""
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """The augmentation seed (63 bits, non-negative) of the sample at ``position`` in epoch ``epoch``'s order of a
    loader seeded with ``seed``: the same in every process, worker and resumed run."""
    h = _splitmix64(int(seed) & _MASK64)
    h = _splitmix64(h ^ (int(epoch) & _MASK64))
    return _splitmix64(h ^ (int(position) & _MASK64)) >> 1


class SeededIndex(NamedTuple):
    """What :class:`SeededSampler` yields: the wrapped sampler's item and its augmentation seed."""

    index: Any  # an int, or what the wrapped sampler yields (a multi-scale (index, size) pair)
    seed: int


def _shard(sampler: Any) -> tuple[int, int]:
    """(rank, num_replicas) of a sharding index sampler (DistributedSampler, RepeatAugSampler), also under a
    batch sampler (``.sampler``, ``.indices``); (0, 1) for one that does not shard."""
    for _ in range(4):
        if sampler is None:
            break
        rank, replicas = getattr(sampler, "rank", None), getattr(sampler, "num_replicas", None)
        if isinstance(rank, int) and isinstance(replicas, int) and replicas >= 1:
            return rank, replicas
        inner = getattr(sampler, "indices", None)
        sampler = inner if isinstance(inner, Sampler) else getattr(sampler, "sampler", None)
    return 0, 1


class SeededSampler(Sampler[Any]):
    """Wraps an index sampler (or, ``batched=True``, a batch sampler) to yield :class:`SeededIndex` items (lists of
    them) whose seed is ``sample_seed(seed, epoch, position)``.

    ``position`` counts the samples of the epoch's order from 0, the first ``skip`` items included (set ``skip``
    to resume mid-epoch: those items are not yielded, and the next ones keep their positions). Under a sharding
    sampler (``num_replicas`` / ``rank``: DistributedSampler, RepeatAugSampler, also inside a multi-scale batch
    sampler's ``indices``) the position is the one in the order all ranks share, ``rank + num_replicas * i``
    for this rank's i-th sample. ``epoch`` is the wrapped sampler's ``epoch`` (set by its ``set_epoch``, which
    this sampler's ``set_epoch`` reaches); a sampler without one counts this sampler's passes instead.
    """

    def __init__(self, sampler: Sampler[Any], *, seed: int, batched: bool = False) -> None:
        self.sampler = sampler
        self.seed = int(seed)
        self.batched = batched
        self.skip = 0
        self._epoch: int | None = None
        self._passes = 0

    def set_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        inner = getattr(self.sampler, "epoch", None)
        if isinstance(inner, int):
            return inner
        return self._epoch if self._epoch is not None else self._passes

    def __iter__(self) -> Iterator[Any]:
        epoch = self.epoch
        self._passes += 1
        rank, replicas = _shard(self.sampler)

        def seeded(item: Any, pos: int) -> SeededIndex:
            return SeededIndex(item, sample_seed(self.seed, epoch, rank + replicas * pos))

        pos = 0
        for i, item in enumerate(self.sampler):
            if self.batched:
                if i >= self.skip:
                    yield [seeded(x, pos + j) for j, x in enumerate(item)]
                pos += len(item)
            else:
                if i >= self.skip:
                    yield seeded(item, pos)
                pos += 1

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)  # type: ignore[arg-type]


def seeded_sampler(loader: DataLoader) -> SeededSampler:
    """The :class:`SeededSampler` of a :func:`create_loader` loader (its ``skip`` resumes an epoch mid-way)."""
    for s in (loader.batch_sampler, loader.sampler):
        if isinstance(s, SeededSampler):
            return s
    raise TypeError("seeded_sampler: the loader was not made by create_loader (or holds an iterable dataset)")


# ------------------------------------------------------------------------------------------ per-sample reseeding


def _reseeders(obj: Any, depth: int = 0) -> list[Callable[[int], Any]]:
    """The explicit random sources of a dataset's transform, also inside Subset/ConcatDataset-style wrappers: the
    transform's ``reseed``, or ``generator.manual_seed`` for a transform that holds a bare ``torch.Generator``."""
    if obj is None or depth > 4:
        return []
    found: list[Callable[[int], Any]] = []
    t = getattr(obj, "transform", None)
    if t is not None:
        if hasattr(t, "reseed"):
            found.append(t.reseed)
        elif isinstance(getattr(t, "generator", None), torch.Generator):
            found.append(t.generator.manual_seed)
    for inner in getattr(obj, "datasets", None) or ():  # ConcatDataset
        found += _reseeders(inner, depth + 1)
    return found + _reseeders(getattr(obj, "dataset", None), depth + 1)


@contextlib.contextmanager
def _global_rngs_kept() -> Iterator[None]:
    """Leave torch's CPU generator, Python's and NumPy's global generators as they were: the samples' seeding
    must not move the main process's streams (dropout, masking) when it loads samples itself (no workers)."""
    t, p, n = torch.default_generator.get_state(), random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.default_generator.set_state(t)
        random.setstate(p)
        np.random.set_state(n)


class SeededDataset(Dataset):
    """``dataset[item.index]`` with every random source of its transform seeded with ``item.seed`` first (for a
    :class:`SeededIndex`; other items pass through unseeded): the global generators of torch (CPU), Python and
    NumPy, which the transforms without an explicit generator draw from, and the explicit ones (``reseed``).
    Attributes not found here are read from the wrapped dataset."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "dataset":  # (unpickling: no ``dataset`` yet)
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def _get(self, item: Any, reseed: list[Callable[[int], Any]]) -> Any:
        if not isinstance(item, SeededIndex):
            return self.dataset[item]
        torch.default_generator.manual_seed(item.seed)
        random.seed(item.seed)
        np.random.seed(item.seed % 2**32)
        for r in reseed:
            r(item.seed)
        return self.dataset[item.index]

    def __getitem__(self, item: Any) -> Any:
        with _global_rngs_kept():
            return self._get(item, _reseeders(self.dataset))

    def __getitems__(self, items: list[Any]) -> list[Any]:
        """A batch's samples (DataLoader's batched fetch): the global generators saved and restored once."""
        with _global_rngs_kept():
            reseed = _reseeders(self.dataset)
            return [self._get(item, reseed) for item in items]


def seed_worker(worker_id: int) -> None:
    """Worker init: seed python/numpy from torch's per-worker seed (base_seed + worker_id, where the base seed
    comes from the loader's seeded generator); augmentation is seeded per sample (:class:`SeededDataset`)."""
    info = get_worker_info()
    if info is not None:  # Ctrl-C reaches the whole process group: the main process finishes its step and
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # shuts the workers down
    seed = info.seed if info is not None else torch.initial_seed()
    random.seed(seed)
    np.random.seed(seed % 2**32)


def create_loader(dataset: Dataset, *, batch_size: int, shuffle: bool, num_workers: int = 0, seed: int = 0,
                  drop_last: bool = False, sampler: Sampler | None = None, distributed: bool = False,
                  batch_sampler: Sampler | None = None,
                  pin_memory: bool | None = None, persistent_workers: bool | None = None) -> DataLoader:
    """A DataLoader whose order and augmentation are a function of ``seed``.

    Each sample's augmentation is seeded with :func:`sample_seed` of (``seed``, the epoch, its position in the
    epoch's order), whatever worker loads it (see the module's docstring); the loader's
    :func:`seeded_sampler` skips the start of an epoch for a resumed run.

    Args:
        shuffle: random order (ignored when ``sampler`` is given; passed to the DistributedSampler).
        distributed: without an explicit ``sampler``, shard with ``DistributedSampler(seed=seed)``;
            call ``loader.sampler.set_epoch(epoch)`` each epoch (as for ``RepeatAugSampler``): the order and the
            augmentation follow the epoch. (Without a sampler that has an epoch, each pass counts as one.)
        pin_memory: default True when CUDA is available.
        persistent_workers: default True when ``num_workers > 0`` (workers stay up between epochs).
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
    batching: dict[str, Any]
    if isinstance(dataset, IterableDataset):  # no order to take positions from: as DataLoader has it
        batching = {"batch_size": batch_size, "shuffle": shuffle if sampler is None else False, "sampler": sampler,
                    "drop_last": drop_last}
    elif batch_sampler is not None:
        batching = {"batch_sampler": SeededSampler(batch_sampler, seed=seed, batched=True)}
        dataset = SeededDataset(dataset)
    else:
        if sampler is None:  # the order DataLoader itself would draw: the same generator, the same permutation
            sampler = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
        batching = {"batch_size": batch_size, "sampler": SeededSampler(sampler, seed=seed), "drop_last": drop_last}
        dataset = SeededDataset(dataset)
    return WorkerLoader(
        dataset,
        **batching,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        worker_init_fn=seed_worker,
        generator=generator,
        persistent_workers=persistent_workers and num_workers > 0,
    )
