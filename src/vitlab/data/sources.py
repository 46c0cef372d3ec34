"""Readers for the in-memory data sets: scikit-learn's digits, MNIST-style IDX files, CIFAR python batches.

Each reader returns ``(images uint8 (N, C, H, W), labels list[int], class names)`` for one stored split.
CIFAR batches are pickles: they are read with an unpickler that only admits the numpy reconstruction
helpers a batch needs, so a crafted file cannot run code.
"""

from __future__ import annotations

import functools
import gzip
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vitlab.checkpoints.io import dtype_problem
from vitlab.data.errors import DatasetError

# --------------------------------------------------------------------------------------------- digits


@functools.lru_cache(maxsize=1)
def read_digits() -> tuple[Tensor, list[int], list[str]]:
    """scikit-learn's bundled 8x8 digits (1797 images, no download), 0..16 scaled to 0..255.

    Cached: callers index the tensor (which copies) and must not modify it in place."""
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # (N, 8, 8)
    images = torch.from_numpy(imgs).unsqueeze(1)  # (N, 1, 8, 8)
    return images, [int(t) for t in d.target], [str(i) for i in range(10)]


# ------------------------------------------------------------------------------------------------ IDX

_IDX_DTYPES = {
    0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (raw or gzip, detected by content) into a numpy array of its stored shape."""
    p = Path(path)
    try:
        raw = p.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DatasetError(f"{p}: cannot read IDX file ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetError(f"{p}: not an IDX file (bad magic number {raw[:4].hex()})")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{p}: IDX header truncated")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    expected = header + count * dtype.itemsize
    if len(raw) != expected:
        raise DatasetError(f"{p}: IDX size mismatch: header says shape {shape} ({expected} bytes), "
                           f"file holds {len(raw)} bytes (truncated?)")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(shape)


def find_idx_file(root: Path, prefix: str, kind: str) -> Path | None:
    """Locate e.g. ``train-images-idx3-ubyte[.gz]`` (also the ``train-images.idx3-ubyte`` spelling)."""
    ndim = "3" if kind == "images" else "1"
    for sep in ("-", "."):
        for suffix in ("", ".gz"):
            cand = root / f"{prefix}-{kind}{sep}idx{ndim}-ubyte{suffix}"
            if cand.is_file():
                return cand
    return None


def has_idx_files(root: Path) -> bool:
    return find_idx_file(root, "train", "images") is not None or find_idx_file(root, "t10k", "images") is not None


def read_mnist(root: str | Path, prefix: str) -> tuple[Tensor, list[int], list[str]]:
    """Images and labels of one MNIST-style split; ``prefix`` is "train" or "t10k"."""
    root = Path(root)
    img_path, lbl_path = find_idx_file(root, prefix, "images"), find_idx_file(root, prefix, "labels")
    if img_path is None or lbl_path is None:
        raise DatasetError(f"{root}: missing {prefix}-images-idx3-ubyte[.gz] or {prefix}-labels-idx1-ubyte[.gz]")
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.ndim != 3 or labels.ndim != 1:
        raise DatasetError(f"{img_path}: expected images (N, H, W) and labels (N,), got {images.shape}, {labels.shape}")
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(f"{img_path}: {images.shape[0]} images but {lbl_path.name} has {labels.shape[0]} labels")
    if images.dtype != np.uint8:
        images = np.clip(images, 0, 255).astype(np.uint8)
    if labels.size and labels.min() < 0:
        raise DatasetError(f"{lbl_path}: negative labels")
    num_classes = int(labels.max()) + 1 if labels.size else 0
    t = torch.from_numpy(images.copy()).unsqueeze(1)  # (N, 1, H, W); copy: frombuffer is read-only
    return t, labels.astype(np.int64).tolist(), [str(i) for i in range(num_classes)]


# ---------------------------------------------------------------------------------------------- CIFAR

# The only globals a CIFAR batch (written by Python 2 or 3, any numpy) refers to.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"), ("builtins", "bytearray"),
}


# A batch's numpy objects go through the classes below instead of numpy's: the unpickler's BUILD calls the
# object's __setstate__, and numpy's takes a dtype's fields, subarray and flags from the file unchecked (a
# dtype that holds object pointers while saying it does not turns file bytes into pointers), while
# numpy.ndarray(shape, "O", buffer) makes an object array from raw bytes. Only the classes and functions below
# meet the file; they check each dtype before numpy sees it. numpy 2 pickles its helpers as numpy._core.*,
# numpy 1.x as numpy.core.*: either spelling gets this numpy's own function.

# dtype kinds a CIFAR batch's arrays may have: bool, integer, float, complex, bytes, str (real batches: uint8)
_ARRAY_KINDS = "biufcSU"
_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(0))[0]  # numpy._core.multiarray._reconstruct (numpy 1.x: .core.)
_SCALAR = np.float64(0).__reduce__()[0]
_FROMBUFFER = np.frombuffer(bytearray(1), np.uint8).__reduce_ex__(5)[0]  # numpy._core.numeric._frombuffer


class _Refused(pickle.UnpicklingError):
    """What a CIFAR batch holds beyond plain numbers, bytes and numeric arrays (told apart from a damaged file)."""


def _check_dtype(dtype: Any) -> np.dtype:
    """``dtype`` itself if it is a plain dtype of a kind in ``_ARRAY_KINDS``, with the flags, size and
    alignment numpy gives that type code."""
    if isinstance(dtype, _Dtype):
        dtype = dtype.dtype
    problem = dtype_problem(dtype, _ARRAY_KINDS)
    if problem:
        raise _Refused(f"{problem}: not allowed in a CIFAR batch")
    return dtype


class _Dtype:
    """What ``numpy.dtype(...)`` makes in a CIFAR batch; ``dtype`` is the checked numpy dtype."""

    def __init__(self, *args: Any) -> None:
        self.dtype = _check_dtype(np.dtype(*args))

    def __setstate__(self, state: Any) -> None:
        # (3, byte order, subarray, names, fields, size, alignment, flags): only plain dtypes
        if not (isinstance(state, tuple) and len(state) == 8 and state[0] == 3
                and state[2] is None and state[3] is None and state[4] is None):
            raise _Refused("numpy dtype state with fields or a subarray in a CIFAR batch")
        dtype = np.dtype(self.dtype, False, True)  # a copy: numpy's builtin dtypes ignore __setstate__
        dtype.__setstate__(state)
        self.dtype = _check_dtype(dtype)


class _Array(np.ndarray):
    """What ``_reconstruct`` makes in a CIFAR batch: an ndarray whose BUILD checks the dtype first."""

    def __setstate__(self, state: Any) -> None:
        # (version, shape, dtype, is_fortran, raw bytes); old numpy wrote it without the version
        if not (isinstance(state, tuple) and len(state) in (4, 5) and isinstance(state[-1], (bytes, bytearray))):
            raise _Refused("numpy array state without raw bytes in a CIFAR batch")
        super().__setstate__((*state[:-3], _check_dtype(state[-3]), *state[-2:]))


class _NdarrayName:
    """``numpy.ndarray`` as a CIFAR batch names it, only ever the first argument of ``_reconstruct``."""

    def __init__(self, *args: Any) -> None:
        raise _Refused("numpy.ndarray(...) is not allowed in a CIFAR batch")


def _reconstruct(subtype: Any, shape: Any, typecode: Any) -> _Array:
    if subtype is not _NdarrayName:
        raise _Refused("_reconstruct of anything but numpy.ndarray in a CIFAR batch")
    return _RECONSTRUCT(_Array, (0,), b"b")  # what numpy writes; BUILD sets shape, dtype and data


def _scalar(dtype: Any, *args: Any) -> Any:
    return _SCALAR(_check_dtype(dtype), *args)


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> _Array:  # protocol 5 pickles
    return _FROMBUFFER(buf, _check_dtype(dtype), shape, order).view(_Array)


_CHECKED = {"dtype": _Dtype, "ndarray": _NdarrayName, "_reconstruct": _reconstruct, "scalar": _scalar,
            "_frombuffer": _frombuffer}


def _plain(value: Any) -> Any:
    """A batch's value with numpy objects made plain again (nested ones stay checked subclasses)."""
    if isinstance(value, _Array):
        return value.view(np.ndarray)
    return value.dtype if isinstance(value, _Dtype) else value


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise _Refused(f"global '{module}.{name}' is not allowed in a CIFAR batch")
        if name in _CHECKED:
            return _CHECKED[name]
        return super().find_class(module, name)


def load_cifar_pickle(path: Path) -> dict:
    """Unpickle a CIFAR batch with only numpy array reconstruction allowed; keys come back as str."""
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(f, encoding="bytes").load()
    except _Refused as e:
        raise DatasetError(f"{path}: refused to load CIFAR batch: {e}") from e
    except Exception as e:  # a truncated, corrupt or foreign file, or a numpy helper this numpy lacks
        raise DatasetError(f"{path}: not a readable CIFAR python batch ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: a CIFAR batch must hold a dict, found {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: _plain(v) for k, v in obj.items()}


def _names(values: Any, path: Path) -> list[str]:
    if not isinstance(values, (list, tuple)):
        raise DatasetError(f"{path}: class names must be a list")
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def _cifar_root(root: Path) -> Path:
    """The folder holding the batch files: ``root`` itself or the one sub-folder the tar extracts to."""
    if is_cifar_dir(root, descend=False):
        return root
    for sub in ("cifar-10-batches-py", "cifar-100-python"):
        if is_cifar_dir(root / sub, descend=False):
            return root / sub
    raise DatasetError(f"{root}: no CIFAR python batches (data_batch_*, test_batch, batches.meta or "
                       f"train, test, meta) found")


def is_cifar_dir(root: Path, *, descend: bool = True) -> bool:
    if not root.is_dir():
        return False
    if (root / "batches.meta").is_file() or (root / "data_batch_1").is_file():
        return True
    if (root / "meta").is_file() and ((root / "train").is_file() or (root / "test").is_file()):
        return True
    return descend and any(is_cifar_dir(root / s, descend=False) for s in ("cifar-10-batches-py", "cifar-100-python"))


def read_cifar(root: str | Path, split: str) -> tuple[Tensor, list[int], list[str]]:
    """CIFAR-10 (``data_batch_*``/``test_batch``/``batches.meta``) or CIFAR-100 (``train``/``test``/``meta``,
    fine labels); ``split`` is "train" or "test"."""
    root = _cifar_root(Path(root))
    if (root / "batches.meta").is_file() or (root / "data_batch_1").is_file():  # CIFAR-10 layout
        meta_path = root / "batches.meta"
        files = sorted(root.glob("data_batch_*"), key=lambda p: p.name) if split == "train" else [root / "test_batch"]
        label_key, names_key = "labels", "label_names"
    else:  # CIFAR-100 layout
        meta_path = root / "meta"
        files = [root / ("train" if split == "train" else "test")]
        label_key, names_key = "fine_labels", "fine_label_names"
    files = [f for f in files if f.is_file()]
    if not files:
        raise DatasetError(f"{root}: no CIFAR {split} batch files")
    datas, labels = [], []
    for f in files:
        batch = load_cifar_pickle(f)
        if "data" not in batch or label_key not in batch:
            raise DatasetError(f"{f}: CIFAR batch lacks 'data' or '{label_key}' (keys: {sorted(batch)})")
        data = np.asarray(batch["data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DatasetError(f"{f}: CIFAR 'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
        lab = [int(v) for v in batch[label_key]]
        if len(lab) != data.shape[0]:
            raise DatasetError(f"{f}: {data.shape[0]} images but {len(lab)} labels")
        datas.append(data)
        labels.extend(lab)
    if meta_path.is_file():
        meta = load_cifar_pickle(meta_path)
        if names_key not in meta:
            raise DatasetError(f"{meta_path}: lacks '{names_key}'")
        classes = _names(meta[names_key], meta_path)
    else:
        classes = [str(i) for i in range(max(labels) + 1)]
    if labels and max(labels) >= len(classes):
        raise DatasetError(f"{root}: label {max(labels)} but only {len(classes)} class names")
    # Rows are channel-planar: 1024 red, 1024 green, 1024 blue values, row-major 32x32.
    images = torch.from_numpy(np.concatenate(datas).reshape(-1, 3, 32, 32).copy())  # (N, 3, 32, 32)
    return images, labels, classes
