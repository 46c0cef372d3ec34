"""The dataset type every vitlab data source produces, and its in-memory and on-disk kinds.

``VisionDataset[i]`` returns ``(transform(image), label)`` where ``image`` is a uint8 (C, H, W) tensor with
``in_chans`` channels. A dataset built with ``skip_bad_images=True`` returns ``None`` for an undecodable
image instead of raising, and records it; :func:`vitlab.data.create_loader` drops those samples.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from vitlab.data.errors import BadImageError
from vitlab.data.image import load_image, to_channels

log = logging.getLogger(__name__)

Transform = Callable[[Tensor], Tensor]


class SkipsBadImages:
    """``skip_bad_images`` bookkeeping shared by the classification and the dense data sets: a sample whose image
    (or mask) cannot be decoded comes out as ``None``, which the loaders' collate functions drop; each such file is
    warned about once and counted across DataLoader workers (one flag per sample in shared memory: workers, fork
    or spawn, write into the same storage, so the parent counts distinct files across epochs)."""

    skip_bad_images: bool = False

    def _track_bad_images(self, n: int, skip: bool) -> None:
        self.skip_bad_images = skip
        self._skipped = torch.zeros(n, dtype=torch.bool).share_memory_()

    def _bad_image(self, index: int, error: BadImageError, *, hint: str | None = None) -> None:
        """Sample ``index`` is undecodable: with ``skip_bad_images`` remembered (and warned about once), else
        ``error`` is raised (with ``hint`` appended, if given)."""
        if not self.skip_bad_images:
            if hint:
                raise BadImageError(f"{error} ({hint})") from None
            raise error
        if not self._skipped[index]:
            log.warning("skipping bad image: %s", error)
        self._skipped[index] = True

    def describe(self, index: int) -> str:
        raise NotImplementedError

    @property
    def num_skipped(self) -> int:
        """Distinct samples skipped so far because a file could not be decoded (``skip_bad_images=True``)."""
        return int(self._skipped.sum())

    def skipped(self) -> list[str]:
        """Where each skipped sample comes from (``describe``), for totals across splits of one source."""
        return [self.describe(i) for i in self._skipped.nonzero().flatten().tolist()]


class VisionDataset(SkipsBadImages, Dataset):
    """Base class: labelled uint8 images plus what reports and models need to know about them.

    Attributes:
        classes: class names, index = label.
        targets: label of every sample (no decoding needed to read them, e.g. for stratified splits).
        in_chans: channels of the uint8 images this dataset yields (1 for digits/MNIST, 3 for colour).
        native_size: (H, W) when every image has that size, else None.
        source: human-readable description for logs and reports.
    """

    def __init__(
        self,
        *,
        classes: Sequence[str],
        targets: Sequence[int],
        in_chans: int,
        native_size: tuple[int, int] | None,
        source: str,
        transform: Transform | None = None,
        skip_bad_images: bool = False,
    ) -> None:
        self.classes = list(classes)
        self.targets = [int(t) for t in targets]
        self.in_chans = int(in_chans)
        self.native_size = native_size
        self.source = source
        self.transform = transform
        self._track_bad_images(len(self.targets), skip_bad_images)

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def skipped_per_class(self) -> dict[str, tuple[int, int]]:
        """{class: (images skipped, images)} for the classes with skipped images, in class order."""
        skipped = [0] * len(self.classes)
        for i in self._skipped.nonzero().flatten().tolist():
            skipped[self.targets[i]] += 1
        return {name: (k, n) for name, k, n in zip(self.classes, skipped, self.class_counts()) if k}

    def load(self, index: int) -> Tensor:
        """The uint8 (in_chans, H, W) image of sample ``index``, untransformed; raises BadImageError."""
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """Where sample ``index`` comes from (a path, or source + index), for error messages."""
        return f"{self.source}[{index}]"

    def __getitem__(self, index: int) -> tuple[Tensor, int] | None:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} samples")
        try:
            img = self.load(index)
        except BadImageError as e:
            self._bad_image(index, e)
            return None
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]

    def class_counts(self) -> list[int]:
        counts = [0] * len(self.classes)
        for t in self.targets:
            counts[t] += 1
        return counts

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(source={self.source!r}, samples={len(self)}, classes={len(self.classes)}, "
            f"in_chans={self.in_chans}, native_size={self.native_size})"
        )


class TensorImageDataset(VisionDataset):
    """Images held in memory as one uint8 tensor (N, C, H, W): digits, MNIST, CIFAR."""

    def __init__(self, images: Tensor, targets: Sequence[int], *, classes: Sequence[str], source: str,
                 transform: Transform | None = None, skip_bad_images: bool = False) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"{source}: expected uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if images.shape[0] != len(targets):
            raise ValueError(f"{source}: {images.shape[0]} images but {len(targets)} labels")
        super().__init__(classes=classes, targets=targets, in_chans=images.shape[1],
                         native_size=(int(images.shape[2]), int(images.shape[3])), source=source,
                         transform=transform, skip_bad_images=skip_bad_images)
        self.images = images
        self.indices: list[int] | None = None  # positions in the stored split, when this is a subset

    def load(self, index: int) -> Tensor:
        return self.images[index]


class ImageFileDataset(VisionDataset):
    """Images decoded lazily from files; building the dataset only lists paths."""

    def __init__(self, paths: Sequence[str | os.PathLike], targets: Sequence[int], *, classes: Sequence[str],
                 in_chans: int, source: str, native_size: tuple[int, int] | None = None,
                 transform: Transform | None = None, skip_bad_images: bool = False) -> None:
        if len(paths) != len(targets):
            raise ValueError(f"{source}: {len(paths)} paths but {len(targets)} labels")
        super().__init__(classes=classes, targets=targets, in_chans=in_chans, native_size=native_size,
                         source=source, transform=transform, skip_bad_images=skip_bad_images)
        self.paths = [os.fspath(p) for p in paths]
        self._cache: Tensor | list[Tensor | None] | None = None
        self._cache_errors: dict[int, str] = {}
        self._cache_transform: Transform | None = None  # the transform whose outputs the cache holds, if any
        # whether a colour image was warned about (a 1-channel data set): shared, as _skipped, across workers
        self._colour_warned = torch.zeros(1, dtype=torch.bool).share_memory_()

    @property
    def cached(self) -> bool:
        """True once :func:`vitlab.data.cache.cache_decoded` has decoded the images into memory."""
        return self._cache is not None

    @property
    def cache_nbytes(self) -> int:
        """Memory the decoded images take (0 when not cached)."""
        if self._cache is None:
            return 0
        if isinstance(self._cache, Tensor):
            return self._cache.numel() * self._cache.element_size()
        return sum(t.numel() * t.element_size() for t in self._cache if t is not None)

    def set_cache(self, images: Tensor | list[Tensor | None], errors: dict[int, str], *,
                  transform: Transform | None = None) -> None:
        """Serve ``images[i]`` instead of decoding file i (``errors``: the files that failed, by index).
        ``transform``: the images are that (deterministic) transform's outputs, served as they are while it is
        the data set's transform (another one decodes the files again).

        The failed files are skipped from here on (``skip_bad_images``): each is named in a warning now, and
        counted by ``num_skipped`` and ``skipped_per_class`` before any epoch has read it."""
        if len(images) != len(self):
            raise ValueError(f"{self.source}: cache of {len(images)} images for {len(self)} files")
        self._cache, self._cache_errors, self._cache_transform = images, dict(errors), transform
        if self.skip_bad_images:
            for i in sorted(errors):
                if not self._skipped[i]:
                    log.warning("skipping bad image: %s", errors[i])
                    self._skipped[i] = True

    def decode(self, index: int, *, min_size: int | None = None) -> Tensor:
        """Decode file ``index`` to uint8 (in_chans, H, W); raises BadImageError. In a 1-channel data set, the
        first colour image (channels that differ) is named in a warning: its colour is lost."""
        image = load_image(self.paths[index], min_size=min_size)
        if self.in_chans == 1 and image.shape[0] == 3 and not self._colour_warned[0] and _in_colour(image):
            self._colour_warned[0] = True
            log.warning("%s: a colour image in %s, a 1-channel data set (in_chans=1; an image folder is, where "
                        "the headers read were all grayscale): converted to grayscale, its colour is lost to the "
                        "model; a data set with in_chans=3 keeps it", self.paths[index], self.source)
        return to_channels(image, self.in_chans)

    def __getitem__(self, index: int) -> tuple[Tensor, int] | None:
        if self._cache is None or self._cache_transform is None or self.transform is not self._cache_transform:
            return super().__getitem__(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} samples")
        if index in self._cache_errors:
            self._bad_image(index, BadImageError(self._cache_errors[index]))
            return None
        # transformed already; a copy, as the transform's output would be (an in-place edit leaves the cache alone)
        return self._cache[index].clone(), self.targets[index]  # type: ignore[union-attr]

    def load(self, index: int) -> Tensor:
        if self._cache is not None:
            if index in self._cache_errors:
                raise BadImageError(self._cache_errors[index])
            if self._cache_transform is None:
                return self._cache[index]  # type: ignore[return-value]
        # the transform says what resolution it needs, so that a huge photo is decoded no larger than that
        return self.decode(index, min_size=getattr(self.transform, "min_source_size", None))

    def describe(self, index: int) -> str:
        return self.paths[index]


def _in_colour(image: Tensor) -> bool:
    """Whether a (3, H, W) image's channels differ somewhere (not a grey picture stored as RGB)."""
    return not (torch.equal(image[0], image[1]) and torch.equal(image[1], image[2]))
