"""The training state for exact resumption, stored so that ``torch.load(weights_only=True)`` reads it.

Everything that decides the next step goes in: model, optimiser, schedule, gradient scaler, EMA, the
step and epoch counters (which fix the sampler's position) and the random generators of torch, CUDA,
NumPy and Python. NumPy's and Python's generator states are converted to tensors and plain lists,
since the safe unpickler accepts nothing else.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitlab.checkpoints.io import CheckpointError, atomic_write, parse_json, read_pickle

log = logging.getLogger(__name__)

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


def load_train_state(path: str | Path, *, mmap: bool = False) -> dict[str, Any]:
    """The training state at ``path``; ``mmap=True`` maps the tensors instead of reading them (cheap checks)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no training state at {path}; start without --resume")
    state = read_pickle(path, mmap=mmap)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path}: not a vitlab training state")
    return state


# what a killed checkpoint write leaves: atomic_write's folder ".NAME.XXXXXXXX.tmp" (Python's tempfile: 8 of
# [a-z0-9_]); a ".NAME.XXXXXXXX.tmp" file (earlier vitlab versions); safetensors' own ".tmpXXXXXX" (Rust's
# tempfile crate: 6 of [A-Za-z0-9]), which save_file made beside the checkpoint before vitlab wrote through a folder
_TEMP_FOLDER = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")
_TEMP_FILE = re.compile(r"\..*\.tmp")
_SAFETENSORS_TEMP = re.compile(r"\.tmp[A-Za-z0-9]{6}")


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete the temporary files a killed :func:`~vitlab.checkpoints.io.atomic_write` left in ``run_dir``.

    ``atomic_write`` writes in a folder ``.NAME.XXXXXXXX.tmp`` beside its target and renames the file into place;
    a SIGKILL between the two leaves the folder (as large as a checkpoint) behind. Earlier vitlab versions left a
    file of that name, or safetensors' own ``.tmpXXXXXX``. Called on --resume, when no other writer of this run
    can be active. Returns the files and folders removed.
    """
    removed = []
    for p in sorted(Path(run_dir).glob(".*")):
        if p.is_symlink():
            continue
        if p.is_file() and (_TEMP_FILE.fullmatch(p.name) or _SAFETENSORS_TEMP.fullmatch(p.name)):
            p.unlink(missing_ok=True)
        elif (p.is_dir() and _TEMP_FOLDER.fullmatch(p.name)
              and all(f.is_file() and not f.is_symlink() for f in p.iterdir())):  # only what a writer put there
            shutil.rmtree(p, ignore_errors=True)
        else:
            continue
        removed.append(p)
    return removed


def truncate_metrics(path: str | Path, step: int) -> int:
    """Drop the records of ``metrics.jsonl`` logged after optimiser step ``step`` (the checkpoint resumed
    from), which the resumed run logs again. A torn last line (killed mid-write) goes too. Returns how
    many lines were dropped.

    The trainer appends to the file, which would follow a symbolic link: one there (a run folder from elsewhere;
    dangling too) is replaced by a plain file holding the records of the file it points to (none where it points
    at no file), with a warning. A folder of that name is refused."""
    path = Path(path)
    link = path.is_symlink()
    if not link and not path.is_file():
        if path.exists():
            raise ValueError(f"--resume: {path} is not a file; the run appends its metrics there: remove it")
        return 0
    kept, dropped = [], 0
    text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
    for line in text.splitlines():
        try:
            record = parse_json(line)
            keep = int(record.get("step", 0)) <= step
        except (ValueError, TypeError, AttributeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped or link:
        if link:
            log.warning("%s is a symbolic link (to %s), which the run would append through: replaced by a file of "
                        "its %d record(s) up to step %d", path, os.readlink(path), len(kept), step)
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(f"{ln}\n" for ln in kept), encoding="utf-8"))
    return dropped
