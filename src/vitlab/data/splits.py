"""Seeded, stratified hold-out splits: disjoint, deterministic, and independent of file-listing order.

Two methods, recorded in a run's job.json (``split_method``) so that --resume and eval hold out what the run did:

- ``path-hash-v1`` (:data:`SPLIT_METHOD`, for files): within each class the files are ordered by a hash of (seed,
  path relative to the data root) and the first k are held out, so each file added or removed moves at most one
  other file of its own class between the parts, and a moved folder splits the same.
- ``randperm`` (:data:`LEGACY_SPLIT_METHOD`): one ``torch.randperm`` per class from a shared seeded generator; what
  runs written before ``split_method`` was recorded used, and the split of fixed arrays (digits, MNIST, CIFAR).
"""

from __future__ import annotations

import hashlib
import os
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

SPLIT_METHOD = "path-hash-v1"
LEGACY_SPLIT_METHOD = "randperm"
SPLIT_METHODS = (SPLIT_METHOD, LEGACY_SPLIT_METHOD)


def check_split_method(method: str) -> str:
    if method not in SPLIT_METHODS:
        raise ValueError(f"split method {method!r} is not one this vitlab knows ({', '.join(SPLIT_METHODS)}); "
                         f"a run recorded by a newer vitlab needs that version")
    return method


def recorded_split_method(job: Mapping[str, Any]) -> str:
    """The split method a run's job.json records; a run without one was split with the old randperm draw."""
    return check_split_method(str(job.get("split_method", LEGACY_SPLIT_METHOD)))


def held_out_count(n: int, fraction: float) -> int:
    """round(fraction * n), at least one of a class of two or more where ``fraction > 0``, never all."""
    if n < 2:
        return 0
    k = round(fraction * n)
    return min(max(k, 1), n - 1) if fraction > 0 else k


def relative_keys(paths: Sequence[str | os.PathLike], root: str | os.PathLike) -> list[str]:
    """Each path relative to ``root`` ('/'-separated, Unicode NFC): the key a file is split by."""
    prefix = os.path.join(os.fspath(root), "")
    out = []
    for p in map(os.fspath, paths):
        rel = p[len(prefix):] if p.startswith(prefix) else os.path.relpath(p, root)  # the common case: fast
        out.append(unicodedata.normalize("NFC", Path(rel).as_posix() if os.sep != "/" else rel))
    return out


def _rank(seed: int, key: str) -> bytes:
    return hashlib.sha256(f"{int(seed)}\0{key}".encode("utf-8", "surrogateescape")).digest()


def stratified_split(targets: Sequence[int], fraction: float, seed: int, *,
                     keys: Sequence[str] | None = None) -> tuple[list[int], list[int]]:
    """Split sample indices into (kept, held_out), holding out ``fraction`` of every class.

    Each class with at least two samples contributes round(fraction * n) samples (at least one when
    ``fraction > 0``, and never all of them), so a small class is still seen on both sides. Both lists
    are sorted; the same (targets, fraction, seed, keys) always give the same split.

    Args:
        keys: one string per sample (a file's path relative to the data root): each class's held-out part is
            then its first k samples in the order of a hash of (seed, key), which another sample added to or
            removed from the class changes by at most one (``path-hash-v1``). Without keys: the old seeded
            randperm draw (``randperm``), which any change of the class sizes re-draws.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"split fraction must be in [0, 1), got {fraction}")
    if keys is not None and len(keys) != len(targets):
        raise ValueError(f"{len(keys)} keys for {len(targets)} samples")
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(int(t), []).append(i)
    g = torch.Generator().manual_seed(int(seed))
    held: list[int] = []
    # Iterate classes in sorted order so that the random stream does not depend on dict order.
    for c in sorted(by_class):
        idx = by_class[c]
        k = held_out_count(len(idx), fraction)
        if keys is not None:
            order = sorted(idx, key=lambda i: (_rank(seed, keys[i]), keys[i]))
            held.extend(order[:k])
        else:
            perm = torch.randperm(len(idx), generator=g).tolist()
            held.extend(idx[j] for j in perm[:k])
    held_set = set(held)
    kept = [i for i in range(len(targets)) if i not in held_set]
    return kept, sorted(held)


def split_source(keys: Sequence[str], targets: Sequence[int], classes: Sequence[str]) -> dict[str, Any]:
    """What a split was taken from, for a run record: per class, its file count and a hash of its sorted keys."""
    per: dict[int, list[str]] = {}
    for k, t in zip(keys, targets):
        per.setdefault(int(t), []).append(k)
    out: dict[str, Any] = {}
    for c, names in sorted(per.items()):
        digest = hashlib.sha256("\n".join(sorted(names)).encode("utf-8", "surrogateescape")).hexdigest()[:16]
        out[str(classes[c]) if c < len(classes) else str(c)] = {"files": len(names), "sha256": digest}
    return {"files": len(keys), "classes": out}


MULTI_LABEL_CLASS = "(all images)"  # a multi-label folder's split is drawn from all its images as one class


def folder_split_source(source: str | os.PathLike, *, multi_label: bool = False) -> dict[str, Any] | None:
    """``split_source`` of the training files of an image folder without val/, listed as ``build_dataset`` (or,
    ``multi_label``, ``build_multilabel_dataset``) lists them, without reading an image: what a run on it would
    record. None for another source, a folder with val/, or one that cannot be read."""
    from vitlab.data.build import parse_source
    from vitlab.data.errors import DatasetError
    from vitlab.data.folder import folder_layout, scan_folder, scan_folder_multilabel

    try:
        kind, path = parse_source(source)
        if kind != "folder" or path is None:
            return None
        train_dir, val_dir, _ = folder_layout(path)
        if val_dir is not None:
            return None
        if multi_label:
            paths = scan_folder_multilabel(train_dir)[0]
            targets, classes = [0] * len(paths), [MULTI_LABEL_CLASS]
        else:
            paths, targets, classes = scan_folder(train_dir)
    except (DatasetError, OSError, ValueError):
        return None
    return split_source(relative_keys(paths, train_dir), targets, classes)


def split_source_changes(recorded: Mapping[str, Any], now: Mapping[str, Any], limit: int = 5) -> str | None:
    """How the files a split is taken from differ from those recorded (``split_source``), or None if they don't.

    The record holds each class's file count and a hash of its names, so per changed class only the counts before
    and after are known (not which files, nor how many, were added or removed)."""
    was, cur = recorded.get("classes") or {}, now.get("classes") or {}
    changes = []
    for name in sorted(set(was) | set(cur)):
        a, b = was.get(name), cur.get(name)
        if a == b:
            continue
        n0, n1 = int((a or {}).get("files", 0)), int((b or {}).get("files", 0))
        if a is None:
            changes.append(f"{name!r}: a new class ({n1} files)")
        elif b is None:
            changes.append(f"{name!r}: gone ({n0} files)")
        elif n0 != n1:
            changes.append(f"{name!r}: {n0} -> {n1} files")
        else:
            changes.append(f"{name!r}: {n0} files, the same count but other files")
    if not changes:
        return None
    total = f"{int(recorded.get('files', 0))} -> {int(now.get('files', 0))} files"
    more = f"; and {len(changes) - limit} more class(es)" if len(changes) > limit else ""
    return f"{total}; {len(changes)} class(es) changed: " + "; ".join(changes[:limit]) + more


def changed_split_note(method: str) -> str:
    """What a change of the files a run's held-out split was drawn from means, for that split's ``method``."""
    if method == SPLIT_METHOD:
        # a file added or removed shifts each class's hash order by one place at most, and its held-out count by
        # one at most: at most one trained image of its class moves into the held-out part per file
        return ("so its held-out part may now hold images it trained on: with split method path-hash-v1, in each "
                "changed class up to one per file added or removed there (the record holds only each class's file "
                "count and a hash of its names, not how many files changed), and the other classes' held-out "
                "images are unchanged")
    return (f"and with the run's split method {method!r} every class's held-out part is drawn anew: most of its "
            f"held-out images may now be images it trained on")
