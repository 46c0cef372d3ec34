"""The model registry: every family registers the named variants generated from its variants table."""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn


@dataclass(frozen=True)
class ModelEntry:
    """A registered name: its family, its config (a frozen dataclass) and how to build it."""

    name: str
    family: str
    config: Any
    build: Callable[[Any], nn.Module]
    description: str = ""
    task: str = "classification"  # "detection" / "segmentation": not on the classifier surface
    # preprocessing the name's published weights were evaluated with that its config cannot hold (crop_mode
    # "squash"), as timm's pretrained_cfg for the bare name states it: (field, value) pairs
    style: tuple[tuple[str, Any], ...] = ()


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(entry: ModelEntry) -> None:
    check_config(entry.config)
    if entry.name in _REGISTRY:
        raise ValueError(f"model name {entry.name!r} is registered twice")
    _REGISTRY[entry.name] = entry


def list_models(pattern: str = "*", *, family: str | None = None, task: str | None = "classification",
                pretrained: bool = False, include_tags: bool | None = None) -> list[str]:
    """Registered names matching a shell-style ``pattern`` (e.g. ``"vit_*_patch16_*"``), sorted.

    ``task`` selects classifiers (the default), ``"detection"`` or ``"segmentation"`` models, or all (None).
    ``pretrained``: only models with known published weights, as timm's ``list_models(pretrained=True)``:
    one ``name.tag`` per set of weights (which ``create_model("name.tag", pretrained=True)`` loads), or the
    names alone with ``include_tags=False``.
    """
    if not isinstance(pattern, str):
        raise TypeError(f"list_models: pattern must be a string such as 'vit_*', got {pattern!r}")
    _ensure_families_loaded()
    names = sorted(
        n for n, e in _REGISTRY.items() if fnmatch.fnmatch(n, pattern) and (family is None or e.family == family)
        and (task is None or e.task == task)
    )
    if not pretrained:
        return names
    from vitlab.models.pretrained import pretrained_weights

    rows = [(n, pretrained_weights(n)) for n in names]
    if include_tags is False:
        return [n for n, weights in rows if weights]
    return [f"{n}.{w.tag}" for n, weights in rows for w in weights]


def get_entry(name: str) -> ModelEntry:
    if not isinstance(name, str):
        raise TypeError(f"model name must be a string (a registered name, see `vitlab models`), got {name!r}")
    _ensure_families_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `vitlab models`"
        raise ValueError(f"unknown model {name!r}{hint}") from None


# Config fields that mean the same in every family, and the values that make sense for them (a tuple value,
# e.g. Swin's depths or CrossViT's per-branch widths, is checked entry by entry).
_POSITIVE = ("img_size", "patch_size", "in_chans", "embed_dim", "num_heads", "num_heads_outer", "num_heads_inner",
             "inner_dim", "token_dim", "stem_chs", "hybrid_stem_chs", "hybrid_channels", "channels", "conv_channels",
             "transformer_dims", "kernel_size", "first_stride", "window_size", "linformer_k", "norm_eps",
             "mlp_ratio", "mlp_ratio_token_only", "inner_mlp_ratio", "tokens_mlp_ratio", "channels_mlp_ratio",
             "expand_ratio", "kernel_ratio", "branch_scale", "crop_pct", "std",
             # DETR / SETR (a DETR without a decoder layer has no output to read)
             "dim", "ffn_dim", "num_queries", "dec_depth", "dec_num_heads", "max_size", "mla_head_channels")
# 0 blocks is a model (timm builds depth=0 too: the patch embedding, the norm and the head)
_NON_NEGATIVE = ("num_classes", "depth", "depths", "layers", "hybrid_layers", "mv2_depths", "transformer_depths",
                 "depth_token_only", "cls_attn_layers", "final_chs", "pretrained_window_sizes",
                 "enc_depth", "pup_upsamples", "aux_weight", "head_lr_scale", "backbone_lr_scale")
_RATES = ("drop_rate", "pos_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate", "t2t_drop_rate",
          "dropout")


def check_config(cfg: Any) -> None:
    """Refuse a family config whose values no model has, with a ValueError naming the field: an option outside
    its ``Literal`` annotation (a misspelled ``pos_embed="learned"`` would otherwise build another model), a size,
    width, ratio or eps that is not positive, a count of blocks or classes below 0, a dropout rate outside [0, 1).
    Each family's ``__post_init__`` calls it, so every way a config is made (create_model, a checkpoint's saved
    config, the converters, ``dataclasses.replace``) is checked."""
    where = type(cfg).__name__
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in _POSITIVE:
            _check_numbers(where, f.name, value, lambda v: v > 0, "> 0")
        elif f.name in _NON_NEGATIVE:
            _check_numbers(where, f.name, value, lambda v: v >= 0, ">= 0")
        elif f.name in _RATES:
            _check_numbers(where, f.name, value, lambda v: 0 <= v < 1, "in [0, 1)")
    for name, allowed, optional in _literal_fields(type(cfg)):
        value = getattr(cfg, name)
        if (value is None and optional) or any(_same_option(value, a) for a in allowed):
            continue
        close = difflib.get_close_matches(value, [a for a in allowed if isinstance(a, str)], n=1) \
            if isinstance(value, str) else []
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{where}: {name} must be one of {', '.join(map(repr, allowed))}, got {value!r}{hint}")


def _check_numbers(where: str, name: str, value: Any, ok: Callable[[float], bool], rule: str) -> None:
    items = _flatten(value)
    for v in items:
        # bools and texts are left to the family (and create_model's type check); NaN fails every rule
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not ok(v):
            raise ValueError(f"{where}: {name} must be {rule}{' (each entry)' if len(items) > 1 else ''}, "
                             f"got {value!r}")


def _flatten(value: Any) -> list[Any]:
    if isinstance(value, (tuple, list)):
        return [x for v in value for x in _flatten(v)]
    return [value]


def _same_option(value: Any, option: Any) -> bool:
    if isinstance(value, bool) or isinstance(option, bool):  # Literal[1, 2] is not met by True
        return type(value) is type(option) and value == option
    return isinstance(value, str) == isinstance(option, str) and value == option


@functools.cache
def _literal_fields(cls: type) -> list[tuple[str, tuple[Any, ...], bool]]:
    """(field, allowed values, None allowed) for each field of ``cls`` annotated ``Literal[...]`` or
    ``Literal[...] | None``."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        literals = [m for m in members if typing.get_origin(m) is Literal]
        if literals and all(typing.get_origin(m) is Literal or m is type(None) for m in members):
            allowed = tuple(a for m in literals for a in typing.get_args(m))
            out.append((f.name, allowed, type(None) in members))
    return out


def _ensure_families_loaded() -> None:
    # Importing the families package registers every family's variants.
    import vitlab.models  # noqa: F401
