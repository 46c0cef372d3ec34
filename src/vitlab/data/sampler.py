"""Index samplers of the training loop beyond the plain shuffle.

Repeated augmentation (Hoffer et al., arXiv:1901.09335), as DeiT uses it: every image appears
``num_repeats`` times per epoch, its copies spread over the replicas so that each process sees a
different augmentation of it, and each replica draws ``ceil(N / num_replicas)`` samples per epoch
(an epoch is as long as without repetition; it sees about N / num_repeats distinct images).

Class-balanced sampling (``recipe.class_balance = "sampler"``): images drawn with replacement, class c with
probability proportional to ``n_c ** (1 - power)`` (``power`` 1: every class equally often; 0.5: the
"square-root sampling" of the long-tail literature), an epoch as long as a shuffled one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence, Sized
from typing import Any

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


def training_labels(dataset: Any) -> list[Any]:
    """The label of every sample of ``dataset``, in order, without loading any image: its ``targets`` (vitlab's
    data sets: an int per image, a tuple of label indices per image for multi-label data), also through
    ``torch.utils.data.Subset`` (or a wrapper's ``dataset`` with the same length), or a ``TensorDataset``'s second
    tensor (class indices, or multi-hot rows, given as tuples of their labels)."""
    from torch.utils.data import Subset, TensorDataset

    if isinstance(dataset, Subset):
        inner = training_labels(dataset.dataset)
        return [inner[int(i)] for i in dataset.indices]
    targets = getattr(dataset, "targets", None)
    if targets is None and isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        targets = dataset.tensors[1]
    if isinstance(targets, torch.Tensor):
        if targets.ndim == 2:  # multi-hot rows
            return [tuple(row.nonzero().flatten().tolist()) for row in targets]
        return [int(t) for t in targets.tolist()]
    if targets is not None:
        return [tuple(int(x) for x in t) if isinstance(t, (tuple, list)) else int(t) for t in targets]
    inner = getattr(dataset, "dataset", None)
    if inner is not None and hasattr(dataset, "__len__") and hasattr(inner, "__len__") and len(inner) == len(dataset):
        return training_labels(inner)
    raise ValueError(f"class_balance: the labels of the training data ({type(dataset).__name__}) cannot be read "
                     f"without loading its images: give the data set a `targets` attribute (the class index of "
                     f"every sample, in order), as vitlab's data sets have, or train with class_balance=none")


def label_counts(labels: Sequence[Any], num_classes: int) -> list[int]:
    """Images per class of ``labels`` (an int per image; multi-label: a tuple of labels per image, each counted)."""
    counts = [0] * num_classes
    for y in labels:
        for c in (y if isinstance(y, tuple) else (y,)):
            if not 0 <= c < num_classes:
                raise ValueError(f"class_balance: label {c} outside 0..{num_classes - 1} in the training data")
            counts[c] += 1
    return counts


def balanced_class_probabilities(counts: Sequence[int], power: float = 1.0) -> list[float]:
    """The probability of drawing each class, proportional to ``n_c ** (1 - power)``; 0 for a class without
    images."""
    w = [float(n) ** (1.0 - power) if n > 0 else 0.0 for n in counts]
    total = sum(w)
    if total <= 0:
        raise ValueError(f"class_balance: no class has images (counts {list(counts)})")
    return [x / total for x in w]


class ClassBalancedSampler(Sampler[int]):
    """Class-balanced sampling with replacement; call ``set_epoch(e)`` each epoch for a new draw.

    An epoch's draw is a function of (``seed``, epoch): ``num_samples`` classes drawn with the probabilities of
    :func:`balanced_class_probabilities` (of ``counts``, default the labels' own), then an image of each drawn
    class uniformly among the class's images in ``labels``; a class with no image in ``labels`` is left out
    (the others' probabilities renormalised). Like ``DistributedSampler``, every replica makes the same draw of
    ``num_replicas * (len(labels) // num_replicas)`` positions and takes every ``num_replicas``-th from its
    ``rank``: the replicas' shares are disjoint parts of one draw, and one process with batch B x W sees the
    samples that W processes with batch B see. With ``num_repeats`` > 1 (repeated augmentation) each drawn image
    is repeated, its copies on consecutive positions (so on different replicas).

    Args:
        labels: the class index of every sample, in order.
        counts: the images per class the probabilities come from (a resumed run's counts at its start).
        power: 1 draws every class equally often; 0 as often as the data has it.
    """

    def __init__(self, labels: Sequence[int], num_replicas: int = 1, rank: int = 0, *, power: float = 1.0,
                 counts: Sequence[int] | None = None, num_classes: int | None = None, num_repeats: int = 1,
                 seed: int = 0) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside [0, {num_replicas})")
        if num_repeats < 1:
            raise ValueError(f"num_repeats must be >= 1, got {num_repeats}")
        if not 0.0 <= power <= 1.0:
            raise ValueError(f"power must be in [0, 1], got {power}")
        k = num_classes if num_classes is not None else (len(counts) if counts is not None
                                                         else max(labels, default=-1) + 1)
        y = torch.as_tensor(list(labels), dtype=torch.long)
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= k):
            raise ValueError(f"labels outside 0..{k - 1}")
        self.num_classes = k
        self.order = torch.argsort(y, stable=True)  # the images grouped by class, in data set order within one
        self.sizes = torch.bincount(y, minlength=k)  # images per class in ``labels``
        self.starts = torch.cumsum(self.sizes, 0) - self.sizes
        self.length = len(y)
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.power, self.num_repeats, self.seed = float(power), int(num_repeats), int(seed)
        self.num_samples = self.length // self.num_replicas
        self.total_size = self.num_samples * self.num_replicas
        self.epoch = 0
        self.set_counts(self.sizes.tolist() if counts is None else counts)

    def set_counts(self, counts: Sequence[int]) -> None:
        """Draw classes by ``counts`` (images per class) from now on; classes without images here are left out."""
        if len(counts) != self.num_classes:
            raise ValueError(f"{len(counts)} class counts for {self.num_classes} classes")
        self.counts = [int(c) for c in counts]
        p = torch.tensor(balanced_class_probabilities(self.counts, self.power), dtype=torch.float64)
        p = p * (self.sizes > 0)
        if p.sum() <= 0:
            raise ValueError("class_balance: none of the classes to draw has images in the training data")
        self.probabilities = p / p.sum()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        draws = math.ceil(self.total_size / self.num_repeats)
        if draws == 0:
            return iter([])
        classes = torch.multinomial(self.probabilities, draws, replacement=True, generator=g)  # (draws,)
        within = (torch.rand(draws, generator=g, dtype=torch.float64) * self.sizes[classes]).long()
        indices = self.order[self.starts[classes] + within]
        indices = indices.repeat_interleave(self.num_repeats)[: self.total_size]
        return iter(indices[self.rank:self.total_size:self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples
