"""The C allocator's settings for tensor work on Linux with glibc.

PyTorch's CPU tensors come from ``malloc``. glibc hands a large freed block back to the operating system: a block
above its mmap threshold is unmapped when freed, and free memory at the top of the heap is trimmed. A forward pass
frees its activations and allocates them again on the next call, so every call touches fresh pages, which the
kernel must fault in and zero: a MobileViT-S forward at batch 8 took about 300,000 page faults (1.2 GB) per call,
about half its time (benchmarks/RESULTS.md, "The allocator"). Allocators built for this (jemalloc, tcmalloc) keep
freed memory for reuse; :func:`keep_freed_memory` makes glibc do the same.

It changes the whole process, so the library never calls it by itself: the ``vitlab`` command does, at start-up,
and a Python user may. The cost is that the process keeps its peak heap until it exits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

# mallopt(3) parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_NEVER = 2**31 - 1  # mallopt's value is an int: trim only above 2 GiB of free heap top

# The environment through which a user has already chosen: glibc's own variables and tunables, or an allocator
# preloaded in glibc's place.
_GLIBC_VARIABLES = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TOP_PAD_")
_PRELOADED = ("jemalloc", "tcmalloc", "mimalloc")
OPT_OUT = "VITLAB_ALLOCATOR"  # =system leaves the allocator alone
_kept = False  # keep_freed_memory() took effect in this process


def user_choice() -> str | None:
    """Why the allocator must be left alone, from the environment; None when nothing was chosen."""
    if os.environ.get(OPT_OUT, "").strip().lower() == "system":
        return f"{OPT_OUT}=system"
    for name in _GLIBC_VARIABLES:
        if name in os.environ:
            return f"{name} is set"
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets glibc.malloc"
    preload = os.environ.get("LD_PRELOAD", "")
    for name in _PRELOADED:
        if name in preload:
            return f"{name} is preloaded"
    return None


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - present only in glibc (musl has mallopt but not this)
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        libc.mallopt.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse: serve every block from the heap (no per-block mmap) and never
    trim it. True when applied; False, doing nothing, off glibc or where :func:`user_choice` finds the user's
    own choice in the environment."""
    reason = user_choice()
    libc = None if reason else _glibc()
    if libc is None:
        log.debug("allocator left as it is: %s", reason or "not glibc")
        return False
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_NEVER) == 1
    log.debug("glibc keeps freed memory: %s", ok)
    global _kept
    _kept = _kept or ok
    return ok


def describe() -> str:
    """The allocator setting this process runs with, for benchmark records (speed depends on it)."""
    if _kept:
        return "glibc, freed memory kept (vitlab.allocator)"
    reason = user_choice()
    if reason:
        return f"the user's ({reason})"
    return "glibc defaults" if _glibc() is not None else "not glibc"
