"""Errors raised by the data package; every message names the file or folder at fault.

Both are ``ValueError`` subclasses with one message. A DataLoader worker that raises one has it re-raised
in the main process by PyTorch with the worker's whole traceback as the new message; these classes take
that message apart again and keep the original line, so that ``--workers 2`` reports a bad image in the
same single line as ``--workers 0``.
"""

from __future__ import annotations

_WORKER_PREFIX = "Caught "


def _original_message(cls: type, text: str) -> str:
    """The message the worker raised, found on the traceback's last line ``module.Class: message``."""
    if not text.startswith(_WORKER_PREFIX) or "Traceback" not in text:
        return text
    marker = f"{cls.__module__}.{cls.__qualname__}: "
    lines = text.rstrip().splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith(marker):
            return "\n".join([lines[i][len(marker):], *lines[i + 1:]])
    return text


class _DataError(ValueError):
    def __init__(self, *args: object, message: str | None = None) -> None:
        if message is not None:  # PyTorch's DataLoader re-raising a worker's error: keep the original line
            args = (_original_message(type(self), message),)
        super().__init__(*args)

    # torch.utils's ExceptionWrapper.reraise passes ``message=`` to exception classes that have a
    # ``message`` attribute; a property answers for instances and is truthy on the class.
    message = property(lambda self: str(self.args[0]) if self.args else "")


class BadImageError(_DataError):
    """An image that cannot be decoded (missing, truncated, not an image, unsupported mode, too many pixels).

    The message always starts with the file's path.
    """


class DatasetError(_DataError):
    """A data source that cannot be turned into a dataset (unknown form, empty class folder, bad archive)."""
