"""Reading weight files without executing code from them.

safetensors files are read with ``safetensors``; PyTorch pickles only with
``torch.load(weights_only=True)``; JAX ``.npz`` archives with ``numpy.load(allow_pickle=False)``.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No file or folder at the given path (caught by ``except FileNotFoundError`` too)."""


PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pth.tar")
# Containers that training scripts wrap their weights in, tried in this order. timm's train script (and
# the repositories built on it, e.g. T2T-ViT) saves "state_dict" and, with EMA on, "state_dict_ema": the
# averaged weights are the ones those repositories evaluate and publish, so they come first.
WRAPPER_KEYS = ("state_dict_ema", "state_dict", "model", "model_state", "module", "teacher")  # teacher: DINO training checkpoints


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        tensors: dict[str, Tensor] = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
        return tensors, meta
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


def read_pickle(path: Path, *, mmap: bool = False) -> Any:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # torch's message opens with advice to retry with weights_only=False; keep only what it refused
        lines = [ln for ln in str(e).splitlines() if "GLOBAL" in ln or "global" in ln]
        what = f" ({lines[0].strip()})" if lines else ""
        raise CheckpointError(
            f"{path}: refused to load: the pickle holds objects other than tensors and plain containers, "
            f"and loading it could execute code{what}. Convert it to safetensors with the tool that wrote it."
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupted?): {e}") from e


def read_npz(path: Path) -> dict[str, np.ndarray]:
    # np.load treats anything that is neither a zip nor a .npy as a pickle; say what the file is not instead
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            raise CheckpointError(f"{path}: not a .npz archive (no zip signature at the start of the file)")
    try:
        with np.load(str(path), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError as e:
        raise CheckpointError(f"{path}: refused to load: the .npz holds pickled objects ({e})") from e
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise CheckpointError(f"{path}: not a readable .npz archive (truncated or corrupted?): {e}") from e


def unwrap_state_dict(obj: Any, path: Path | str) -> dict[str, Tensor]:
    """Find the tensor mapping inside a training checkpoint and strip DDP's ``module.`` prefix."""
    for _ in range(3):
        if isinstance(obj, Mapping) and not _is_tensor_map(obj):
            for key in WRAPPER_KEYS:
                if key in obj and isinstance(obj[key], Mapping):
                    if key == "state_dict_ema":
                        log.info("%s: using the EMA weights (state_dict_ema)", path)
                    obj = obj[key]
                    break
            else:
                break
    if not isinstance(obj, Mapping) or not _is_tensor_map(obj):
        raise CheckpointError(f"{path}: holds no state dict (a mapping of names to tensors)")
    sd = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _is_tensor_map(obj: Mapping) -> bool:
    return len(obj) > 0 and sum(isinstance(v, Tensor) for v in obj.values()) >= max(1, len(obj) // 2)


def atomic_write(path: str | os.PathLike, write_fn) -> Path:
    """Write through ``write_fn(tmp_path)`` to a temporary file beside ``path``, then rename it into place.

    A crash leaves either the old file or the new one, never a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable JSON file ({e})") from e
