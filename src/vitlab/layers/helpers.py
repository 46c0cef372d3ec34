"""Small shared helpers for the layers package."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_2tuple(x: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(x, int):
        return (x, x)
    # symbolic sizes (torch.SymInt, while an exporter traces any size) must stay symbolic: int() would fix them
    t = tuple(v if isinstance(v, (int, torch.SymInt)) else int(v) for v in x)
    if len(t) != 2:
        raise ValueError(f"expected an int or a pair of ints, got {x!r}")
    return t  # type: ignore[return-value]
