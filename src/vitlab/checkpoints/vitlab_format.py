"""vitlab's own checkpoint: one safetensors file whose header carries the JSON metadata.

The metadata names the registered model, its full config, the class names and the preprocessing, so
that every later command (finetune, eval, predict, explain, export) needs nothing but the file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from vitlab.checkpoints.io import CheckpointError, atomic_write, parse_json, read_safetensors, strip_wrapper_prefixes

log = logging.getLogger(__name__)

FORMAT_KEY = "format"
FORMAT_NAME = "vitlab"
FORMAT_VERSION = 1


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples -> lists, JSON-safe


def config_from_dict(template: Any, d: dict[str, Any]) -> Any:
    """Rebuild a family config from its dict, refusing unknown fields."""
    names = {f.name for f in dataclasses.fields(template)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise CheckpointError(f"config has fields {unknown} that {type(template).__name__} does not know")
    return dataclasses.replace(template, **{k: _tuplify(v) for k, v in d.items()})


def _tuplify(v: Any) -> Any:
    return tuple(_tuplify(x) for x in v) if isinstance(v, list) else v


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside its wrappers: ``torch.compile``'s (``_orig_mod``) and DDP's / DataParallel's
    (``module``), nested in any order; their state dicts prefix every key, which a checkpoint must not."""
    # torch.compile's wrapper class, where torch.compile was ever called (no dynamo import otherwise)
    compiled = getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", None)
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif compiled is not None and isinstance(model, compiled):
            model = model._orig_mod
        else:
            return model


def _vitlab_version() -> str:
    from vitlab import __version__

    return __version__


def model_metadata(model: nn.Module, *, class_names: list[str] | None = None,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    model = unwrap_model(model)
    name = getattr(model, "model_name", None)
    if name is None:
        raise ValueError("save_model: the model has no registered name; build it with vitlab.create_model")
    if not dataclasses.is_dataclass(getattr(model, "cfg", None)):
        what = ("a features_only extractor, which a vitlab checkpoint does not describe: save the classifier it is "
                "made from (create_model without features_only), or its state_dict() with torch / safetensors"
                if hasattr(model, "feature_info") else "a model without a config (model.cfg)")
        raise ValueError(f"save_model: {name} is {what}")
    classes = getattr(model, "num_classes", 0)
    if class_names is not None and classes and len(class_names) != classes:
        raise ValueError(f"save_model: {len(class_names)} class names for a model with {classes} classes "
                         f"(after reset_classifier(n), give n names)")
    if class_names is None:
        class_names = getattr(model, "class_names", None)
        if class_names is not None and classes and len(class_names) != classes:
            # names set on the model by hand for another head: a checkpoint must not pair them with this one
            log.warning("save_model: %s.class_names has %d names but its head has %d classes: the checkpoint is "
                        "written without class names (pass class_names= with %d names)", name, len(class_names),
                        classes, classes)
            class_names = None
    meta: dict[str, Any] = {
        FORMAT_KEY: FORMAT_NAME,
        "version": FORMAT_VERSION,
        "model": name,
        "config": config_to_dict(model.cfg),
        "preprocessing": model.preprocessing.to_dict(),
        "class_names": list(class_names) if class_names is not None else None,
        "vitlab_version": _vitlab_version(),  # what wrote it (as the ONNX files record)
    }
    score = getattr(model, "score_function", "softmax")
    if score != "softmax":  # a multi-label or regression head (from a Hugging Face config's problem_type)
        meta["score_function"] = score
    style = getattr(model, "preprocessing_style", None)
    if style:  # set from a Hugging Face / timm hub folder's preprocessing: restored on load
        meta["preprocessing_style"] = dict(style)
    if extra:
        meta["extra"] = extra
    return meta


def save_model(model: nn.Module, path: str | Path, *, class_names: list[str] | None = None,
               extra: dict[str, Any] | None = None, state_dict: dict[str, Tensor] | None = None) -> Path:
    """Write ``model`` as a self-describing vitlab checkpoint, atomically.

    ``state_dict``: the weights to write instead of ``model.state_dict()`` (a sharded model's gathered
    full state dict; ``model`` then only describes them)."""
    from safetensors.torch import save_file

    model = unwrap_model(model)  # a compiled / DDP model's keys carry the wrapper's prefix
    meta = model_metadata(model, class_names=class_names, extra=extra)
    # safetensors refuses shared storage; contiguous copies of tied/viewed tensors are fine here
    state_dict = model.state_dict() if state_dict is None else strip_wrapper_prefixes(dict(state_dict))
    sd = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    header = {"vitlab": json.dumps(meta)}
    # save_file streams the tensors (no in-memory copy of the file, as safetensors.torch.save would make);
    # the temporary file it makes beside ``tmp`` lands in atomic_write's own temporary folder
    return atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=header))


def read_vitlab(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """(state dict, metadata) if ``path`` is a vitlab checkpoint, else None."""
    sd, header = read_safetensors(path)
    if "vitlab" not in header:
        return None
    try:
        meta = parse_json(header["vitlab"])
    except ValueError as e:  # malformed, nested too deeply, an integer of too many digits
        raise CheckpointError(f"{path}: vitlab metadata is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: vitlab metadata is a JSON {_json_kind(meta)}, not an object (expected "
                              f"{{\"format\": \"vitlab\", \"model\": ..., \"config\": {{...}}, ...}})")
    if meta.get(FORMAT_KEY) != FORMAT_NAME or "model" not in meta or "config" not in meta:
        raise CheckpointError(f"{path}: vitlab metadata lacks the model name or config")
    if not isinstance(meta["config"], dict):
        raise CheckpointError(f"{path}: vitlab metadata's config is a JSON {_json_kind(meta['config'])}, not an "
                              f"object of the model's config fields")
    # files that save_model wrote from a compiled / DDP model before it unwrapped them
    return strip_wrapper_prefixes(sd), meta


def _json_kind(value: Any) -> str:
    kinds = {list: "list", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)
