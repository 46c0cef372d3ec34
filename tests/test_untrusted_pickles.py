"""Crafted pickles that pass a name allowlist yet make numpy read file bytes as object pointers: checkpoints
(torch's weights-only unpickler with vitlab's numpy additions) and CIFAR batches (vitlab's restricted
unpickler) must refuse them with an error naming the file. The loads run in a child process, so a regression
kills the child (SIGSEGV), not pytest. Real files of both kinds still load."""

from __future__ import annotations

import collections
import json
import os
import pickle
import pickletools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vitlab.checkpoints.io import read_pickle
from vitlab.data.sources import load_cifar_pickle, read_cifar

FIX = Path(__file__).parent / "fixtures" / "interop" / "timm_train"
_SCALAR = np.float64(0).__reduce__()[0]  # numpy._core.multiarray.scalar
_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(0))[0]  # numpy._core.multiarray._reconstruct
_A = b"\x41" * 16  # what the forged object pointers point to: 0x4141414141414141


def _load_in_child(loader: str, paths: list[Path]) -> list[str]:
    """Load each path in a child process; one line per path: 'LOADED' or '<error type>: <message>'."""
    code = (
        "import json, sys\nfrom pathlib import Path\n"
        "from vitlab.checkpoints.io import read_pickle\nfrom vitlab.data.sources import read_cifar\n"
        "for p in sys.argv[1:]:\n"
        "    try:\n"
        f"        {loader}\n        print(json.dumps('LOADED'), flush=True)\n"
        "    except Exception as e:\n"
        "        print(json.dumps(f'{type(e).__name__}: {e}'), flush=True)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, *map(str, paths)], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, f"child died with return code {r.returncode} (-11: SIGSEGV): {r.stderr[-800:]}"
    return [json.loads(line) for line in r.stdout.splitlines()]


# ------------------------------------------------------------------------------------ checkpoints


class _Dtype:
    """numpy.dtype(code, False, True), then BUILD with ``state`` (None: no BUILD)."""

    def __init__(self, code: str, state: tuple | None = None) -> None:
        self.code, self.state = code, state

    def __reduce__(self):
        return (np.dtype, (self.code, False, True)) + ((self.state,) if self.state is not None else ())


_OBJECT_FIELD = (3, "|", None, ("a",), {"a": (_Dtype("O"), 0)}, 16, 1, 0)  # an object field, flags "no objects"
_OBJECT_SUBARRAY = (3, "|", (_Dtype("O"), (1,)), None, None, 8, 8, 0)  # a subarray of one object, same flags


class _Scalar:
    def __init__(self, dtype: _Dtype, data: object) -> None:
        self.dtype, self.data = dtype, data

    def __reduce__(self):
        return (_SCALAR, (self.dtype, self.data))


class _Iterated:
    """OrderedDict(x): iterating a void scalar reads its (object) field."""

    def __init__(self, obj: object) -> None:
        self.obj = obj

    def __reduce__(self):
        return (collections.OrderedDict, (self.obj,))


_CHECKPOINT_ATTACKS = {
    # the security tester's file: a V16 dtype whose state claims no objects while holding an object field
    "void_object_field": _Iterated(_Scalar(_Dtype("V16", _OBJECT_FIELD), _A)),
    # numeric dtype classes take the same forged states (an object dtype inside is refused on its own) ...
    "float_object_field": _Scalar(_Dtype("f8", (3, "|", None, ("a",), {"a": (_Dtype("O"), 0)}, 8, 1, 0)), _A[:8]),
    "float_object_subarray": _Scalar(_Dtype("f8", _OBJECT_SUBARRAY), _A[:8]),
    "object_dtype": _Scalar(_Dtype("O"), [1, 2]),
    # ... and numpy's scalar gets no numeric dtype with forged flags ("holds objects"), fields or a subarray
    "float_object_flags": _Scalar(_Dtype("f8", (3, "<", None, None, None, -1, -1, 0xFF)), _A[:8]),
    "float_float_field": _Scalar(_Dtype("f8", (3, "|", None, ("a",), {"a": (_Dtype("f8"), 0)}, 8, 1, 0)), _A[:8]),
    "float_float_subarray": _Scalar(_Dtype("f8", (3, "|", (_Dtype("f8"), (1,)), None, None, 8, 8, 0)), _A[:8]),
}


def test_checkpoints_with_forged_numpy_dtypes_are_refused(tmp_path: Path) -> None:
    paths = []
    for name, value in _CHECKPOINT_ATTACKS.items():
        paths.append(tmp_path / f"{name}.pth")
        torch.save({"model": {"pos_embed": torch.zeros(1, 5, 8)}, "best_acc": value}, paths[-1])
    results = _load_in_child("read_pickle(Path(p))", paths)
    assert len(results) == len(paths)
    for path, result in zip(paths, results):
        assert result.startswith(f"CheckpointError: {path}: refused to load: the pickle holds a numpy"), result
        assert "only bool, integer, float and complex" in result


@pytest.mark.parametrize("name, key, value", [("dino_style.pth", "best_acc", np.float32(75.5)),
                                              ("deit_style.pth", "max_accuracy", np.float64(81.25))])
def test_official_training_checkpoints_keep_their_numpy_metrics(name: str, key: str, value: np.generic) -> None:
    # DINO / DeiT main.py save numpy metrics beside the weights and the args
    obj = read_pickle(FIX / name)
    assert type(obj[key]) is type(value) and obj[key] == value
    assert obj["args"].model == "vit_tiny_patch16_224"


class _BigEndian:
    def __reduce__(self):
        return (_SCALAR, (_Dtype(">f8", (3, ">", None, None, None, -1, -1, 0)), np.array(2.5, ">f8").tobytes()))


def test_numeric_numpy_scalars_of_every_kind_round_trip(tmp_path: Path) -> None:
    values = [np.bool_(True), np.int8(-3), np.uint16(7), np.int32(-5), np.int64(-2**40), np.uint64(2**63 + 1),
              np.float16(0.5), np.float32(75.5), np.float64(81.25), np.longdouble(1.25), np.complex64(1 + 2j),
              np.complex128(-3.5j)]
    torch.save({"model": {"w": torch.ones(2)}, "metrics": values, "big_endian": _BigEndian()}, tmp_path / "m.pth")
    obj = read_pickle(tmp_path / "m.pth")
    assert [type(v) for v in obj["metrics"]] == [type(v) for v in values] and obj["metrics"] == values
    assert obj["big_endian"] == 2.5


# ---------------------------------------------------------------------------------------- CIFAR


class _Array:
    """numpy's own pickle of an array: _reconstruct(ndarray, (0,), b'b'), BUILD (1, shape, dtype, False, raw)."""

    def __init__(self, dtype: _Dtype, shape: tuple, data: bytes) -> None:
        self.dtype, self.shape, self.data = dtype, shape, data

    def __reduce__(self):
        return (_RECONSTRUCT, (np.ndarray, (0,), b"b"), (1, self.shape, self.dtype, False, self.data))


class _NdarrayCall:
    """numpy.ndarray((2,), "O", raw bytes): an object array whose pointers are the file's bytes."""

    def __reduce__(self):
        return (np.ndarray, ((2,), "O", _A))


class _Bytearray:
    """bytearray(x) consumes x while the file is still being unpickled: a check of the loaded batch is too late."""

    def __init__(self, obj: object) -> None:
        self.obj = obj

    def __reduce__(self):
        return (bytearray, (self.obj,))


_V8_OBJECT = _Dtype("V8", (3, "|", (_Dtype("O"), (1,)), None, None, 8, 8, 0))
_CIFAR_ATTACKS = {
    # the security tester's batch: labels an array of a V8 dtype forged to be one object pointer
    "void_object_subarray": {b"labels": _Array(_V8_OBJECT, (2,), _A)},
    "ndarray_call": {b"labels": _NdarrayCall()},
    "uint8_object_subarray": {b"labels": _Array(_Dtype("u1", _OBJECT_SUBARRAY), (2,), _A[:2])},
    "uint8_object_flags": {b"labels": _Array(_Dtype("u1", (3, "|", None, None, None, -1, -1, 0xFF)), (2,),
                                             _A[:2])},
}
_CIFAR_ATTACKS_PROTOCOL_3 = {  # protocol 2 names bytearray __builtin__.bytearray, which is refused outright
    "bytearray_of_forged_array": {b"labels": [0, 1], b"batch_label": _Bytearray(_Array(_V8_OBJECT, (2,), _A))},
}


def _write_cifar10(root: Path, batch: dict, protocol: int = 2) -> Path:
    root.mkdir(parents=True)
    for name in ("data_batch_1", "test_batch"):
        (root / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"cat", b"dog"]}, protocol=2))
    return root


def test_cifar_batches_with_forged_numpy_objects_are_refused(tmp_path: Path) -> None:
    roots = [_write_cifar10(tmp_path / name, {b"data": np.zeros((2, 3072), np.uint8), **batch}, protocol)
             for attacks, protocol in ((_CIFAR_ATTACKS, 2), (_CIFAR_ATTACKS_PROTOCOL_3, 3))
             for name, batch in attacks.items()]
    results = _load_in_child("read_cifar(p, 'train')", roots)
    assert len(results) == len(roots)
    for root, result in zip(roots, results):
        assert result.startswith(f"DatasetError: {root / 'data_batch_1'}: refused to load CIFAR batch"), result


def _as_python2_batch(data: bytes) -> bytes:
    """A protocol 3 pickle as Python 2's cPickle and numpy 1.x wrote the CIFAR python batches: str opcodes for
    bytes, protocol 2, numpy.core names."""
    out = bytearray(data)
    for op, _, pos in pickletools.genops(data):
        if op.name in ("BINBYTES", "SHORT_BINBYTES"):
            out[pos] = ord("T" if op.name == "BINBYTES" else "U")  # BINSTRING / SHORT_BINSTRING, same layout
    out[1] = 2
    return bytes(out).replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


@pytest.mark.parametrize("protocol", ["python2", 2, 4, 5])
def test_real_cifar_batches_still_load(tmp_path: Path, protocol: int | str) -> None:
    rng = np.random.default_rng(0)
    batch = {b"batch_label": b"training batch 1 of 5", b"labels": [int(v) for v in rng.integers(0, 2, 50)],
             b"data": rng.integers(0, 256, (50, 3072), dtype=np.uint8),
             b"filenames": [f"cat_{i:05d}.png".encode() for i in range(50)]}
    root = _write_cifar10(tmp_path / "cifar-10-batches-py", batch, protocol=3 if protocol == "python2" else protocol)
    if protocol == "python2":
        raw = _as_python2_batch((root / "data_batch_1").read_bytes())
        assert b"cnumpy.core.multiarray\n_reconstruct" in raw
        (root / "data_batch_1").write_bytes(raw)
    loaded = load_cifar_pickle(root / "data_batch_1")
    assert type(loaded["data"]) is np.ndarray and loaded["data"].dtype == np.uint8
    assert np.array_equal(loaded["data"], batch[b"data"]) and loaded["labels"] == batch[b"labels"]
    assert loaded["filenames"] == batch[b"filenames"] and loaded["batch_label"] == batch[b"batch_label"]
    images, labels, classes = read_cifar(tmp_path, "train")
    assert torch.equal(images, torch.from_numpy(batch[b"data"].reshape(-1, 3, 32, 32)))
    assert labels == batch[b"labels"] and classes == ["cat", "dog"]
