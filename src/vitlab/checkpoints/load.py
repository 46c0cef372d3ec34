"""Find, read and convert a pretrained source: a local file or folder, or ``hf-hub:ORG/NAME[@REV]``."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitlab.checkpoints.converters import Converted, SourceFormat, detect_format, get_converter
from vitlab.checkpoints.families import LooksLike, backbone_route, looks_like, other_family_message
from vitlab.checkpoints.io import (
    PICKLE_SUFFIXES,
    CheckpointError,
    CheckpointNotFoundError,
    parse_json,
    read_json,
    read_npz,
    read_pickle,
    read_safetensors,
    read_sharded,
    shared_key_prefix,
    strip_key_prefix,
    unwrap_state_dict,
)
from vitlab.checkpoints.vitlab_format import read_vitlab

log = logging.getLogger(__name__)

HF_HUB_PREFIX = "hf-hub:"
# timm's older spelling, which timm still accepts
HF_HUB_PREFIXES = (HF_HUB_PREFIX, "hf_hub:")
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
# a large model's shards are listed by an index (save_pretrained(max_shard_size=...))
HF_SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# the order transformers prefers: safetensors before pickles, one file before shards
_FOLDER_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json", "open_clip_pytorch_model.bin")


@dataclass
class Source:
    """A read and converted checkpoint."""

    path: Path
    format: SourceFormat
    converted: Converted
    # vitlab metadata, {"config": hf_config}, or {"timm_config": config.json of a timm hub folder}
    meta: dict[str, Any] = field(default_factory=dict)
    # the family the tensors' names point to, for an error when they do not fit the model (None: vitlab's own
    # files, which record their model, or no clear sign)
    looks_like: LooksLike | None = None
    # the leading component every key of the file shared (e.g. "model." from a PyTorch Lightning module), kept
    # (None when there was none, or when it was removed: ``read_source(strip_prefix=...)``)
    key_prefix: str | None = None


def hub_repo(source: str | os.PathLike) -> str | None:
    """``ORG/NAME[@REV]`` of an ``hf-hub:`` (or timm's ``hf_hub:``) source; None for any other source."""
    s = str(source)
    prefix = next((p for p in HF_HUB_PREFIXES if s.startswith(p)), None)
    return None if prefix is None else s[len(prefix):]


def resolve(source: str | os.PathLike) -> Path:
    """Local path of ``source``; ``hf-hub:ORG/NAME`` is fetched (or found in the local cache offline)."""
    s = str(source)
    repo = hub_repo(s)
    if repo is not None:
        return _hub_snapshot(repo)
    p = Path(s).expanduser()
    if not p.exists():
        raise CheckpointNotFoundError(f"pretrained={s!r}: no such file or folder ({p.absolute()})")
    return p


# fetched first; a repo's PyTorch pickles only when it has no safetensors file (timm publishes both copies)
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.npz"]
_HUB_PICKLE_PATTERNS = ["*.json", "*.bin"]


def _hub_snapshot(spec: str) -> Path:
    """The local snapshot of ``spec`` (``ORG/NAME``, or ``ORG/NAME@REV`` for a branch, tag or commit, as timm
    writes it): downloaded when the hub is reachable, else the one the local cache holds."""
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError:
        raise CheckpointError(
            f"hf-hub:{spec}: huggingface_hub is not installed; pip install 'vitlab[hub]'"
        ) from None
    repo_id, _, revision = spec.partition("@")

    def download(**kwargs: Any) -> Path:
        path = Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=_HUB_PATTERNS, **kwargs))
        if not any(path.glob("*.safetensors")):
            path = Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=_HUB_PICKLE_PATTERNS,
                                          **kwargs))
        return path

    try:
        return download()
    except Exception as online_error:  # network down: fall back to whatever the cache holds
        if type(online_error).__name__ == "HFValidationError":
            raise CheckpointError(f"hf-hub:{spec}: not a hub repo id ORG/NAME[@REVISION]: {online_error}") from None
        try:
            path = download(local_files_only=True)
        except Exception:
            cache = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
            raise CheckpointError(
                f"hf-hub:{spec}: not reachable and not in the local Hugging Face cache (looked in {cache}"
                f"{f' for the revision {revision!r}' if revision else ''}; HF_HUB_CACHE or HF_HOME set the cache "
                f"folder): {online_error}"
            ) from online_error
        log.warning("hf-hub:%s: downloading from the hub failed (%s: %s); using the local cache's copy %s", spec,
                    type(online_error).__name__, online_error, path)
        return path


def _convert(path: Path, family: str, fmt: SourceFormat, data: Any, meta: dict[str, Any],
             key_prefix: str | None = None) -> Converted:
    """Run the converter; its complaints (unknown keys, missing arrays, unsupported options) name the file, and
    the family it looks like when that is another one. ``key_prefix``: the component all keys share, recorded
    on the error (create_model then tries the keys without it)."""
    try:
        return _run_converter(path, family, fmt, data, meta)
    except CheckpointError as e:
        e.key_prefix = key_prefix
        raise


def _run_converter(path: Path, family: str, fmt: SourceFormat, data: Any, meta: dict[str, Any]) -> Converted:
    try:
        try:
            convert = get_converter(family, fmt)
        except ValueError as e:
            route = backbone_route(family)  # SETR, DETR: a classifier file is their backbone's
            if route is not None:
                raise CheckpointError(f"{path}: {e}; {route}") from e
            raise
        return convert(data, meta)
    except CheckpointError:
        raise
    except (KeyError, ValueError) as e:
        detail = f"cannot be read as a {fmt} checkpoint of the {family!r} family: {e}"
        other = other_family_message(path, looks_like(data, meta.get("config")), family)
        if other is not None:
            raise CheckpointError(f"{other}\n  ({detail})") from e
        raise CheckpointError(f"{path}: {detail}") from e


def refuse_other_family(source: Source, family: str, name: str, error: ValueError) -> None:
    """Raise the error that names the family of ``source`` when the file is plainly another family's than the
    model's (``name``, of ``family``) and loading it failed with ``error``; return otherwise."""
    other = other_family_message(source.path, source.looks_like, family, name)
    if other is not None:
        detail = str(error).strip().replace("\n", "\n  ")
        raise CheckpointError(f"{other}\n  Loading it failed: {detail}") from error


def read_source(path: Path, family: str, *, strip_prefix: str | None = None) -> Source:
    """Detect the format of ``path`` and convert it for ``family``. ``strip_prefix``: a leading component that
    every key has and that is removed first (a wrapper's attribute name, :attr:`Source.key_prefix`)."""
    if path.is_dir():
        return _read_folder(path, family, strip_prefix=strip_prefix)
    name = path.name.lower()
    if name.endswith(".index.json"):  # the index of a sharded checkpoint: read with its folder's config.json
        return _read_folder(path.parent, family, weights=path, strip_prefix=strip_prefix)
    if name.endswith(".npz"):
        arrays = read_npz(path)
        return Source(path, "jax", _convert(path, family, "jax", arrays, {}), looks_like=looks_like(arrays))
    if name.endswith(".safetensors"):
        got = read_vitlab(path)
        if got is not None:
            sd, meta = got
            return Source(path, "vitlab", Converted(recorded_grid(sd, meta), {}), meta)
        sd, header = read_safetensors(path)
        # vitlab's own timm export carries what a timm hub folder's config.json holds: read it as one
        return _read_state_dict(path, family, sd, strip_prefix, timm_file_meta(header, path))
    if name.endswith(PICKLE_SUFFIXES):
        return _read_state_dict(path, family, unwrap_state_dict(read_pickle(path), path), strip_prefix)
    if name.endswith(".onnx"):
        from vitlab.models.factory import onnx_file_message

        raise CheckpointError(onnx_file_message(path))
    raise CheckpointError(
        f"{path}: unknown checkpoint type; expected .safetensors, .pth/.pt/.bin, .npz, or a folder "
        f"with config.json and model.safetensors / pytorch_model.bin (or their .index.json and shards)"
    )


# a single-file timm export's preprocessing entries that timm's pretrained_cfg holds too
_PRETRAINED_CFG_KEYS = ("input_size", "mean", "std", "crop_pct", "interpolation", "crop_mode")


def timm_file_meta(header: dict[str, str], path: Path) -> dict[str, Any] | None:
    """The metadata of a safetensors file written by ``vitlab export --format timm`` (``save_timm``: ``format``
    "timm", ``timm_model``, ``timm_kwargs``, ``class_names``, ``preprocessing``, ``vitlab_model``) as a timm hub
    folder's: ``{"timm_config": config.json's equivalent, "timm_file": {"vitlab_model", "preprocessing"}}``;
    None for any other file."""
    if header.get("format") != "timm" or "timm_model" not in header:
        return None
    try:
        kwargs = parse_json(header.get("timm_kwargs") or "{}")
        pre = parse_json(header.get("preprocessing") or "{}")
        names = parse_json(header["class_names"]) if header.get("class_names") else None
    except ValueError as e:  # malformed, nested too deeply, an integer of too many digits
        raise CheckpointError(f"{path}: its timm export metadata is not valid JSON ({e})") from None
    if not isinstance(kwargs, dict) or not isinstance(pre, dict):
        raise CheckpointError(f"{path}: its timm export metadata (timm_kwargs, preprocessing) are not JSON objects")
    config: dict[str, Any] = {"architecture": header["timm_model"], "model_args": kwargs,
                              "pretrained_cfg": {k: pre[k] for k in _PRETRAINED_CFG_KEYS if k in pre}}
    if names:
        config["label_names"] = list(names)
    return {"timm_config": config, "timm_file": {"vitlab_model": header.get("vitlab_model"), "preprocessing": pre}}


def safetensors_header(path: Path) -> dict[str, str]:
    """The metadata strings of a safetensors file, without reading its tensors ({} if it has none or cannot be
    read: the reader that loads it says why)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return f.metadata() or {}
    except Exception:  # SafetensorError, OSError...: reported when the file is read for its weights
        return {}


def recorded_grid(sd: dict, meta: dict[str, Any]) -> dict:
    """A vitlab checkpoint's state dict carrying the patch grid its config records (img_size // patch_size), so
    that a rectangular grid's position table resamples from its own layout (:class:`SourceStateDict`)."""
    from vitlab.checkpoints.adapt import SourceStateDict

    cfg = meta.get("config") or {}
    try:
        (h, w), (ph, pw) = (v if isinstance(v, (list, tuple)) else (v, v) for v in (cfg["img_size"], cfg["patch_size"]))
        grid = (int(h) // int(ph), int(w) // int(pw))
    except (KeyError, TypeError, ValueError, ZeroDivisionError):  # a family without these fields
        return sd
    return SourceStateDict(sd, grid=grid)


def _prefixed(sd: dict, strip_prefix: str | None) -> tuple[dict, str | None]:
    """``sd`` without ``strip_prefix``, and the component all its keys then still share."""
    if strip_prefix is not None:
        sd = strip_key_prefix(sd, strip_prefix)
    return sd, shared_key_prefix(sd)


def _read_state_dict(path: Path, family: str, sd: dict, strip_prefix: str | None,
                     meta: dict[str, Any] | None = None) -> Source:
    sd, prefix = _prefixed(sd, strip_prefix)
    fmt: SourceFormat = detect_format(family, sd, "hf" if _looks_hf(sd) else "timm")
    return Source(path, fmt, _convert(path, family, fmt, sd, {}, prefix), meta or {}, looks_like=looks_like(sd),
                  key_prefix=prefix)


def _looks_hf(sd: dict) -> bool:
    return any(".embeddings.patch_embeddings." in k or k.startswith("embeddings.patch_embeddings.") for k in sd)


def _read_folder(path: Path, family: str, weights: Path | None = None, strip_prefix: str | None = None) -> Source:
    weights = weights or next((path / f for f in _FOLDER_WEIGHTS if (path / f).exists()), None)
    if weights is None:
        raise CheckpointError(f"{path}: folder has none of {', '.join(HF_WEIGHT_FILES)}, nor a sharded checkpoint's "
                              f"{' / '.join(HF_SHARD_INDEXES)}")
    config = read_json(path / "config.json") if (path / "config.json").exists() else {}
    if weights.name.endswith(".index.json"):
        sd = unwrap_state_dict(read_sharded(weights), weights)
    elif weights.suffix == ".safetensors":
        got = read_vitlab(weights)
        if got is not None:
            sd, meta = got
            return Source(weights, "vitlab", Converted(recorded_grid(sd, meta), {}), meta)
        sd, header = read_safetensors(weights)
        if not config and (timm_file := timm_file_meta(header, weights)) is not None:
            return _read_state_dict(weights, family, sd, strip_prefix, timm_file)
    else:
        sd = unwrap_state_dict(read_pickle(weights), weights)
    sd, prefix = _prefixed(sd, strip_prefix)
    if "architectures" in config or "model_type" in config or _looks_hf(sd):
        meta = {"config": config}
        processor = path / "preprocessor_config.json"
        if processor.exists():  # how the folder's images are prepared (vitlab.checkpoints.hf_processor)
            meta["hf_processor"] = read_json(processor)
        return Source(weights, "hf", _convert(weights, family, "hf", sd, {"config": config}, prefix), meta,
                      looks_like(sd, config), prefix)
    # a timm hub folder: config.json with "architecture", "model_args" and "pretrained_cfg", weights in timm's
    # names; create_model applies model_args and pretrained_cfg (vitlab.checkpoints.timm_hub)
    fmt = detect_format(family, sd, "timm")
    return Source(weights, fmt, _convert(weights, family, fmt, sd, {}, prefix), {"timm_config": config},
                  looks_like(sd), prefix)
