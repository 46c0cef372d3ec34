"""Errors raised by the data package; every message names the file or folder at fault."""

from __future__ import annotations


class BadImageError(ValueError):
    """An image that cannot be decoded (missing, truncated, not an image, unsupported mode).

    A ``ValueError`` with a single message argument, so that PyTorch's DataLoader can re-raise it in the
    main process with the same type; the message always starts with the file's path.
    """


class DatasetError(ValueError):
    """A data source that cannot be turned into a dataset (unknown form, empty class folder, bad archive)."""
