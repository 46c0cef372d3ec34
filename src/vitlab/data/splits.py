"""Seeded, stratified hold-out splits: disjoint, deterministic, and independent of file-listing order."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def stratified_split(targets: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split sample indices into (kept, held_out), holding out ``fraction`` of every class.

    Each class with at least two samples contributes round(fraction * n) samples (at least one when
    ``fraction > 0``, and never all of them), so a small class is still seen on both sides. Both lists
    are sorted; the same (targets, fraction, seed) always give the same split.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"split fraction must be in [0, 1), got {fraction}")
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(int(t), []).append(i)
    g = torch.Generator().manual_seed(int(seed))
    held: list[int] = []
    # Iterate classes in sorted order so that the random stream does not depend on dict order.
    for c in sorted(by_class):
        idx = by_class[c]
        n = len(idx)
        k = round(fraction * n)
        if fraction > 0 and n >= 2:
            k = min(max(k, 1), n - 1)
        elif n < 2:
            k = 0
        perm = torch.randperm(n, generator=g).tolist()
        held.extend(idx[j] for j in perm[:k])
    held_set = set(held)
    kept = [i for i in range(len(targets)) if i not in held_set]
    return kept, sorted(held)
