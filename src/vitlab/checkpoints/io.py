"""Reading weight files without executing code from them.

safetensors files are read with ``safetensors``; PyTorch pickles only with
``torch.load(weights_only=True)``; JAX ``.npz`` archives with ``numpy.load(allow_pickle=False)``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import json
import logging
import os
import pickle
import re
import shutil
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

    # the leading name component every key of the file shares (:func:`shared_key_prefix`), set where the keys
    # may not fit because of it; create_model then tries them without it
    key_prefix: str | None = None


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No file or folder at the given path (caught by ``except FileNotFoundError`` too)."""


PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pth.tar")
# Containers that training scripts wrap their weights in, tried in this order. timm's train script (and
# the repositories built on it, e.g. T2T-ViT) saves "state_dict" and, with EMA on, "state_dict_ema": the
# averaged weights are the ones those repositories evaluate and publish, so they come first.
WRAPPER_KEYS = ("state_dict_ema", "state_dict", "model", "model_state", "module", "teacher")  # teacher: DINO training checkpoints
# prefixes that wrapping a model adds to every key: DistributedDataParallel / DataParallel ("module."),
# torch.compile ("_orig_mod.")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


# what torch's weights-only unpickler says when a real pickle names a class or function it will not import;
# random bytes that happen to hold a GLOBAL opcode name no dotted identifier
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)")
_GIT_LFS_POINTER = b"version https://git-lfs.github.com/spec/"
GIT_LFS_POINTER_MESSAGE = ("a git-lfs pointer file (a few lines of text naming the real file) stands in its place; "
                           "`git lfs pull` in its repository fetches the real file")
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = b"\x80"  # torch.save's legacy (non-zip) format: pickle protocol 2, which opens with PROTO


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
        if _starts_with(path, _GIT_LFS_POINTER):
            raise CheckpointError(f"{path}: not a readable safetensors file: {GIT_LFS_POINTER_MESSAGE}") from e
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False


def read_pickle(path: Path, *, mmap: bool = False) -> Any:
    not_a_checkpoint = _not_a_pickle_checkpoint(path)
    if not_a_checkpoint == GIT_LFS_POINTER_MESSAGE:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint: {not_a_checkpoint}")
    try:
        with _allow_data_globals():
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except _RefusedNumpyValue as e:
        raise CheckpointError(f"{path}: refused to load: the pickle holds a {e}") from e
    except pickle.UnpicklingError as e:
        refused = _REFUSED_GLOBAL.search(str(e))
        if refused is None:  # the unpickler choked on the bytes themselves: not a pickle, or a damaged one
            raise _unreadable(path, not_a_checkpoint, e) from e
        raise CheckpointError(
            f"{path}: refused to load: the pickle holds objects other than tensors and plain containers, "
            f"and loading it could execute code (GLOBAL {refused.group(1)}). Convert it to safetensors with "
            f"the tool that wrote it."
        ) from e
    except Exception as e:
        # torch.load reads bytes that are not a checkpoint (a text file, a web page, a truncated zip) into any
        # exception the unpickler or the zip reader happens to hit: KeyError, IndexError, struct.error,
        # UnicodeDecodeError, EOFError, RuntimeError, BadZipFile ... all mean the same to the caller
        raise _unreadable(path, not_a_checkpoint, e) from e


def _not_a_pickle_checkpoint(path: Path) -> str | None:
    """What the file is instead of a PyTorch checkpoint, judged from its first bytes; None when it may be one
    (a zip archive, torch.save's default, or a pickle, its legacy format)."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return None  # torch.load reports it
    if head.startswith((_ZIP_MAGIC, _PICKLE_PROTO)):
        return None
    if head.startswith(_GIT_LFS_POINTER):
        return GIT_LFS_POINTER_MESSAGE
    if not head:
        return "the file is empty"
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head")):
        return "it is a web page (a download that saved the server's page instead of the file?)"
    return "it is neither a zip archive (torch.save) nor a pickle (torch.save's legacy format)"


def _unreadable(path: Path, what: str | None, e: BaseException) -> CheckpointError:
    # torch wraps the unpickler's complaint in advice to retry with weights_only=False: keep the complaint only
    detail = str(e).rpartition("WeightsUnpickler error:")[2].strip().split("\n")[0]
    detail = f"{type(e).__name__}: {detail}" if detail else type(e).__name__
    if what is None:
        return CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupted?): {detail}")
    return CheckpointError(f"{path}: not a readable PyTorch checkpoint: {what} ({detail})")


@functools.cache
def _data_globals() -> tuple[Any, ...]:
    """Classes and functions outside torch that training checkpoints hold beside the weights, and that the
    weights-only unpickler may call: each one only rebuilds plain data from plain data (itself produced by the
    same restricted unpickler); none imports, opens or runs anything. torch does not allow them by default
    because they belong to other libraries."""
    other_name = ("numpy.core.multiarray.scalar" if _SCALAR.__module__.startswith("numpy._core")
                  else "numpy._core.multiarray.scalar")
    return (
        # the training script's arguments: timm's CheckpointSaver, DeiT, MAE, DINO and DETR save "args".
        # Unpickling makes an empty Namespace and fills its __dict__ from a plain dict (no __setstate__)
        argparse.Namespace,
        # numpy scalars, e.g. a "best_acc" / "max_accuracy" / "metric" computed with numpy: numpy's
        # scalar(dtype, bytes) behind a check (_numpy_scalar), under the names numpy 2 and numpy 1.x write
        (_numpy_scalar, _SCALAR.__module__ + ".scalar"),
        (_numpy_scalar, other_name),
        # the scalar's dtype: numpy.dtype("f8", False, True) (numeric dtypes only), then BUILD with the concrete
        # dtype class's C-level __setstate__. No void, object, string or datetime dtype class is allowed: their
        # __setstate__ takes fields and flags from the file as they are
        (_numeric_dtype, "numpy.dtype"),
        *{type(np.dtype(c)) for c in np.typecodes["All"] if np.dtype(c).kind in _SCALAR_KINDS},
    )


# numpy dtype kinds a checkpoint's numpy scalar may have: bool, signed and unsigned integer, float, complex
_SCALAR_KINDS = "biufc"
_SCALAR = np.float64(0).__reduce__()[0]  # numpy._core.multiarray.scalar (numpy 2) / numpy.core... (1.x)


class _RefusedNumpyValue(Exception):
    """A numpy dtype or scalar in a checkpoint that vitlab will not build (read_pickle names the file)."""


def dtype_problem(dtype: Any, kinds: str) -> str | None:
    """Why ``dtype`` (from an untrusted pickle) is not a plain numpy dtype of one of ``kinds`` (numpy's kind
    codes, e.g. ``"biufc"``), or None when it is: a dtype with fields, a subarray or object pointers, or whose
    flags, size or alignment differ from what numpy gives its type code (numpy's ``__setstate__`` takes them from
    the file unchecked), is not. No repr of the dtype in the reason: only what numpy takes from its class."""
    if not isinstance(dtype, np.dtype):
        return f"a numpy dtype was expected, got a {type(dtype).__name__}"
    if dtype.kind not in kinds or dtype.fields is not None or dtype.subdtype is not None or dtype.hasobject:
        return f"numpy {type(dtype).__name__} with fields, a subarray or object pointers, or of kind {dtype.kind!r}"
    same = np.dtype(dtype.str)
    if (dtype.flags, dtype.itemsize, dtype.alignment) != (same.flags, same.itemsize, same.alignment) or (
            dtype.kind in "SUV" and dtype.itemsize == 0):
        return f"numpy dtype {dtype.str} with forged flags or size"
    return None


def _numeric_dtype(*args: Any) -> np.dtype:
    """``numpy.dtype(...)`` as a checkpoint's pickle calls it, for plain numeric dtypes only."""
    dtype = np.dtype(*args)
    problem = dtype_problem(dtype, _SCALAR_KINDS)
    if problem:
        raise _RefusedNumpyValue(f"{problem} (only bool, integer, float and complex dtypes are read)")
    return dtype


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    """numpy's ``scalar(dtype, bytes)`` for bool, integer, float and complex numbers only.

    The pickle BUILDs ``dtype`` with numpy's ``__setstate__``, which takes fields, a subarray and flags from the
    file unchecked (a dtype saying it holds no object pointers while it does would turn file bytes into
    pointers), so such a dtype is refused and the number is made with a dtype rebuilt from its type code and
    byte order alone."""
    problem = dtype_problem(dtype, _SCALAR_KINDS)
    if problem:
        raise _RefusedNumpyValue(f"numpy scalar: {problem} (only bool, integer, float and complex numbers are read)")
    clean = np.dtype(dtype.char).newbyteorder(dtype.byteorder)
    if not isinstance(data, bytes) or len(data) != clean.itemsize:
        raise _RefusedNumpyValue(f"numpy scalar of dtype {clean} made from {type(data).__name__} "
                                 f"(expected {clean.itemsize} bytes)")
    return _SCALAR(clean, data)


def _allow_data_globals() -> contextlib.AbstractContextManager:
    """Allow :func:`_data_globals` for one torch.load, leaving any the caller allowed for good in place."""
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is None:  # torch < 2.5: such files stay refused
        return contextlib.nullcontext()
    # (callable, "module.name") pairs name a callable under another module path: torch >= 2.6 reads them
    pairs_ok = torch.__version__ >= "2.6"
    have = torch.serialization.get_safe_globals()
    return safe_globals([g for g in _data_globals() if g not in have and (pairs_ok or not isinstance(g, tuple))])


def read_npz(path: Path) -> dict[str, np.ndarray]:
    # np.load treats anything that is neither a zip nor a .npy as a pickle; say what the file is not instead
    with open(path, "rb") as f:
        if f.read(4) != _ZIP_MAGIC:
            raise CheckpointError(f"{path}: not a .npz archive (no zip signature at the start of the file)")
    try:
        with np.load(str(path), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError as e:
        raise CheckpointError(f"{path}: refused to load: the .npz holds pickled objects ({e})") from e
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise CheckpointError(f"{path}: not a readable .npz archive (truncated or corrupted?): {e}") from e


def unwrap_state_dict(obj: Any, path: Path | str) -> dict[str, Tensor]:
    """Find the tensor mapping inside a training checkpoint and strip the ``module.`` (DDP) and ``_orig_mod.``
    (torch.compile) prefixes."""
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
    return strip_wrapper_prefixes({k: v for k, v in obj.items() if isinstance(v, Tensor)})


def strip_wrapper_prefixes(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """``sd`` without the prefix a wrapper added to every key: ``module.`` (DDP) and ``_orig_mod.``
    (torch.compile), nested in any order: DDP over a compiled model saves "module._orig_mod.", a compiled
    DDP model "_orig_mod.module." (timm's clean_state_dict strips the same)."""
    while stripped := next((p for p in WRAPPER_PREFIXES if sd and all(k.startswith(p) for k in sd)), None):
        sd = {k[len(stripped):]: v for k, v in sd.items()}
    return sd


def shared_key_prefix(keys) -> str | None:
    """The leading component (``"model."``) that every key shares, as a wrapper that holds the model as an
    attribute saves it (a PyTorch Lightning module's ``self.model``, ``self.net``, ``self.backbone``); None when
    the keys do not all share one. Whether the keys need it (a layout of their own, e.g. a Hugging Face
    backbone's ``vit.``) only the model they are loaded into can tell."""
    first = None
    for k in keys:
        head, dot, rest = k.partition(".")
        if not dot or not rest or head.isdigit() or (first is not None and head != first):
            return None
        first = head
    return None if first is None else first + "."


def strip_key_prefix(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """``sd`` with ``prefix`` removed from every key (each must start with it)."""
    return {k[len(prefix):]: v for k, v in sd.items()}


def _is_tensor_map(obj: Mapping) -> bool:
    return len(obj) > 0 and sum(isinstance(v, Tensor) for v in obj.values()) >= max(1, len(obj) // 2)


def atomic_write(path: str | os.PathLike, write_fn) -> Path:
    """Write through ``write_fn(tmp_path)``, then rename ``tmp_path`` into place at ``path``.

    ``tmp_path`` (named like ``path``) lies in a temporary folder ``.NAME.XXXXXXXX.tmp`` beside ``path``, which
    also holds any temporary file of the writer's own (safetensors' ``save_file`` writes one beside the path it
    is given). A crash leaves either the old file or the new one, never a partial file; a killed process leaves
    the folder, which :func:`vitlab.train.state.remove_stale_temporaries` removes. A full disk or a file-size
    limit raises an OSError naming ``path``, whatever error the writer raised.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        folder = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _write_error(path, e) or e from None
    tmp = os.path.join(folder, path.name)
    try:
        open(tmp, "xb").close()  # a writer that writes nothing leaves an empty file
        write_fn(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except Exception as e:
        if (error := _write_error(path, e)) is not None:
            raise error from e
        raise
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return path


# errnos that mean no room: a full disk, a file-size limit (ulimit -f, RLIMIT_FSIZE), a disk quota
_NO_ROOM = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
# torch.save's stream writer reports a short write without its errno: "[enforce fail at inline_container.cc:672]
# . unexpected pos 576 vs 534", or "PytorchStreamWriter failed writing file data/0: file write failed"
_TORCH_SHORT_WRITE = ("unexpected pos", "failed writing file", "file write failed")
# safetensors' writer (Rust) reports an I/O error as "... I/O error: File too large (os error 27)"
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def check_outputs_free(planned, *, inputs=(), output: str | os.PathLike, overwrite: bool = False,
                       earlier: str = "") -> None:
    """Before anything is written: refuse a ``planned`` output file that is one of the ``inputs`` (always; a
    link to one counts), and one that exists unless ``overwrite`` (a symbolic link, dangling too, counts: writers
    replace it with :func:`atomic_write`, never write through it). The errors name ``--output`` and list the
    files; ``earlier`` (e.g. "the results of an earlier `vitlab detect` there?") is added to the second."""
    sources: dict[tuple[int, int], Path] = {}
    for p in inputs:
        with contextlib.suppress(OSError):  # a missing input is reported when it is read
            st = os.stat(p)
            sources[(st.st_dev, st.st_ino)] = Path(p)
    over_inputs, existing = [], []
    for f in planned:
        try:
            st = os.lstat(f)  # a link, dangling too, counts as an existing file: it is replaced, never followed
        except OSError:
            continue
        with contextlib.suppress(OSError):
            st = os.stat(f)  # a link to an input is refused as the input is
        source = sources.get((st.st_dev, st.st_ino))
        if source is None:
            existing.append(str(f))
        else:
            over_inputs.append(str(f) if source == Path(f) else f"{f} (the input {source})")
    if over_inputs:
        raise ValueError(f"--output {output}: the results would be written over input images: "
                         f"{_listed(over_inputs)}; give another --output folder (--overwrite never replaces an "
                         f"input image)")
    if existing and not overwrite:
        one = len(existing) == 1
        raise FileExistsError(
            f"--output {output}: {_listed(existing)} {'exists' if one else 'exist'}"
            + (f" ({earlier})" if earlier else "")
            + f"; pass --overwrite to replace {'it' if one else 'them'}, or give another --output folder")


def _listed(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _write_error(path: Path, e: Exception) -> OSError | None:
    """``e``, raised while writing ``path``, as an OSError naming ``path`` where it is an I/O error (a full disk
    or a file-size limit said so); None for any other error."""
    text = str(e).strip()
    if isinstance(e, OSError):
        code = e.errno
        if code not in _NO_ROOM:
            return None
        text = e.strerror or text
    elif type(e).__name__ == "SafetensorError" and (m := _RUST_OS_ERROR.search(text)):
        code = int(m.group(1))
    elif isinstance(e, RuntimeError) and any(s in text for s in _TORCH_SHORT_WRITE):
        code = None
    else:
        return None
    if code is None or code in _NO_ROOM:
        why = "the disk may be full, or a file-size limit (ulimit -f) or disk quota reached"
        return OSError(code, f"not written: {why} ({text}); an earlier file of that name is left as it was",
                       str(path))
    return OSError(code, f"not written ({text})", str(path))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_sharded(index: Path) -> dict[str, Tensor]:
    """The tensors of a sharded checkpoint, as ``save_pretrained(max_shard_size=...)`` writes a large model: an index
    (``model.safetensors.index.json`` / ``pytorch_model.bin.index.json``) whose ``weight_map`` names the shard file
    that holds each tensor, and the shards beside it (safetensors, or PyTorch pickles read like any other)."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, Mapping) or not weight_map:
        raise CheckpointError(f"{index}: not a sharded-checkpoint index (no 'weight_map' from tensor names to "
                              f"shard files)")
    by_shard: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        # a bare file name: the index may only point at shards in its own folder
        if not isinstance(shard, str) or not shard or Path(shard).name != shard:
            raise CheckpointError(f"{index}: weight_map names {shard!r} for {key!r}, not a file in its folder")
        by_shard.setdefault(shard, []).append(key)
    absent = [s for s in sorted(by_shard) if not (index.parent / s).is_file()]
    if absent:
        raise CheckpointError(f"{index}: shard file(s) named by the index are missing from {index.parent}: "
                              f"{', '.join(absent)} (an interrupted download or copy?)")
    sd: dict[str, Tensor] = {}
    for shard, keys in sorted(by_shard.items()):
        path = index.parent / shard
        if shard.endswith(".safetensors"):
            part, _ = read_safetensors(path)
        else:  # the keys as the index lists them: wrapper prefixes are stripped from the whole, afterwards
            obj = read_pickle(path)
            if not isinstance(obj, Mapping):
                raise CheckpointError(f"{path}: holds no state dict (a mapping of names to tensors)")
            part = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
        missing = [k for k in keys if k not in part]
        if missing:
            shown = ", ".join(missing[:5]) + (f", ... ({len(missing)} in all)" if len(missing) > 5 else "")
            raise CheckpointError(f"{index}: {path.name} lacks tensors the index places in it: {shown}")
        sd.update(part)
    return sd


def parse_json(text: str | bytes) -> Any:
    """``json.loads`` where every way hostile text fails is a ValueError: malformed JSON, an integer over Python's
    digit limit, and nesting deeper than the interpreter's recursion limit (a RecursionError from json)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply to read") from None


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file (config.json, an index); anything else is a CheckpointError naming it."""
    try:
        data = parse_json(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bytes that are not UTF-8
        raise CheckpointError(f"{path}: not a readable JSON file ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(data).__name__}, not an object")
    return data


# ------------------------------------------------------------------------------------ model folders (hub layouts)
HUB_WEIGHTS = "model.safetensors"


def check_model_folder(folder: Path, overwrite: bool, *, kind: str, names: tuple[str, ...]) -> None:
    """A folder an export may write: missing, empty, or (``overwrite``) one whose ``names`` it replaces."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} exists and is not a folder; {kind} writes a folder")
    if folder.is_dir() and not overwrite:
        held = sorted(p.name for p in folder.iterdir())
        if held:
            raise ValueError(f"{folder} is a folder that is not empty ({', '.join(held[:5])}"
                             f"{', ...' if len(held) > 5 else ''}); pass overwrite=True to replace its "
                             f"{', '.join(names)}")


def write_model_folder(folder: Path, state_dict: dict[str, Tensor], files: dict[str, Any], *, overwrite: bool,
                       kind: str) -> None:
    """Write a model folder: ``model.safetensors`` (``state_dict``) and a JSON file per ``files`` entry (name ->
    object). All are written into a temporary folder beside ``folder`` and synced, then renamed into place: onto a
    missing or empty folder in one rename; into a non-empty one (``overwrite``) file by file, the weights first (a
    config never names weights it lacks), keeping its other files."""
    from safetensors.torch import save_file

    names = (HUB_WEIGHTS, *files)
    check_model_folder(folder, overwrite, kind=kind, names=names)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        save_file(state_dict, tmp / HUB_WEIGHTS, metadata={"format": "pt"})  # transformers reads "pt" files only
        for name, content in files.items():
            (tmp / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        for name in names:
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(tmp / name, 0o666 & ~_umask())
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private
        check_model_folder(folder, overwrite, kind=kind, names=names)
        if folder.is_dir() and any(folder.iterdir()):
            for name in names:
                os.replace(tmp / name, folder / name)
        else:
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

