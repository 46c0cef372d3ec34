"""Size-independent tracing: keep shape-dependent branches in a graph exported for any input size.

A model that resamples its position table only when the input grid differs from the one it was built
for takes a Python branch on the input's size. An exporter that traces the model at one size records
whichever side of the branch that size took, so a graph traced at the built size has no resampling in
it and fails (or, worse, returns wrong numbers) at any other size. While :func:`tracing_any_size` is
active, :func:`size_differs` answers True for every size, so the traced graph always contains the
resampling (an exact identity at the built size); ``vitlab.export`` turns it on for dynamic-size
exports. Families with other size-dependent branches (window padding, say) ask the same question.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

_ANY_SIZE = [False]


@contextmanager
def tracing_any_size() -> Iterator[None]:
    """Within this block, shape-dependent branches take their general side (see the module docstring)."""
    old = _ANY_SIZE[0]
    _ANY_SIZE[0] = True
    try:
        yield
    finally:
        _ANY_SIZE[0] = old


def is_tracing_any_size() -> bool:
    return _ANY_SIZE[0]


def size_differs(size: Sequence[int], built: Sequence[int]) -> bool:
    """Whether ``size`` (a grid, or a padding amount's operands) differs from ``built``; always True while
    a size-independent graph is being traced."""
    return _ANY_SIZE[0] or tuple(size) != tuple(built)
