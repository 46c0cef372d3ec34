"""The model registry: every family registers the named variants generated from its variants table."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(entry: ModelEntry) -> None:
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
    _ensure_families_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `vitlab models`"
        raise ValueError(f"unknown model {name!r}{hint}") from None


def _ensure_families_loaded() -> None:
    # Importing the families package registers every family's variants.
    import vitlab.models  # noqa: F401
