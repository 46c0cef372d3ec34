"""The training state for exact resumption, stored so that ``torch.load(weights_only=True)`` reads it.

Everything that decides the next step goes in: model, optimiser, schedule, gradient scaler, EMA, the
step and epoch counters (which fix the sampler's position) and the random generators of torch, CUDA,
NumPy and Python. NumPy's and Python's generator states are converted to tensors and plain lists,
since the safe unpickler accepts nothing else.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitlab.checkpoints.io import CheckpointError, atomic_write, read_pickle

STATE_FORMAT = "vitlab-train-state"
STATE_VERSION = 1


def get_rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block (evaluation, checkpointing) without moving any random generator of the training run."""
    state = get_rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def save_train_state(path: str | Path, state: dict[str, Any]) -> Path:
    payload = {"format": STATE_FORMAT, "version": STATE_VERSION, **state}
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_train_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no training state at {path}; start without --resume")
    state = read_pickle(path)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path}: not a vitlab training state")
    return state
