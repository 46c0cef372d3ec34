"""Per-family, per-format checkpoint converters: pure functions from a source state dict to vitlab's.

A converter takes the source's tensors and what the file says of itself (e.g. a Hugging Face
``config.json``) and returns ``Converted``: the state dict in vitlab's names and the architecture
fields the file determines unambiguously (applied on top of the registered name's config).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor

# "official": the layout of a family's original repository (Microsoft Swin, cvnets, T2T-ViT, MAE, DINO, ...)
SourceFormat = Literal["vitlab", "timm", "hf", "jax", "official"]


@dataclass
class Converted:
    state_dict: dict[str, Tensor]
    overrides: dict[str, Any] = field(default_factory=dict)


Converter = Callable[[Any, dict[str, Any]], Converted]
FormatDetector = Callable[[dict[str, Any]], "SourceFormat | None"]
_CONVERTERS: dict[tuple[str, str], Converter] = {}
_DETECTORS: dict[str, FormatDetector] = {}
_HF_MODEL_TYPES: dict[str, str] = {}
_HF_NAME_CHOOSERS: dict[str, Callable[[dict[str, Any]], str | None]] = {}


def register_converter(family: str, fmt: SourceFormat) -> Callable[[Converter], Converter]:
    def deco(fn: Converter) -> Converter:
        _CONVERTERS[(family, fmt)] = fn
        return fn

    return deco


def register_format_detector(family: str) -> Callable[[FormatDetector], FormatDetector]:
    """Register how to tell a family's state-dict layouts apart (e.g. timm vs the official repository's).

    The detector sees a plain state dict (already unwrapped from ``{"model": ...}`` / ``state_dict``) and
    returns its format, or None to keep the default guess (Hugging Face names, else timm).
    """

    def deco(fn: FormatDetector) -> FormatDetector:
        _DETECTORS[family] = fn
        return fn

    return deco


def detect_format(family: str, sd: dict[str, Any], default: SourceFormat) -> SourceFormat:
    """The format of a state dict for ``family``: its detector's answer, else ``default``."""
    _ensure_loaded()
    fn = _DETECTORS.get(family)
    found = fn(sd) if fn is not None else None
    return found or default


def register_hf_model_type(model_type: str, default_model: str,
                           choose: Callable[[dict[str, Any]], str | None] | None = None) -> None:
    """A Hugging Face ``config.json`` ``model_type`` that vitlab reads, and the registered name that
    ``load_model`` builds for it (the converter's overrides then fit the size to the file); ``choose`` picks a
    closer registered name from the config where the sizes are a named variant's (None: the default)."""
    _HF_MODEL_TYPES[model_type] = default_model
    if choose is not None:
        _HF_NAME_CHOOSERS[model_type] = choose


def hf_model_name(model_type: str, config: dict[str, Any]) -> str:
    """The registered name ``load_model`` builds for a Hugging Face folder of ``model_type`` (a known one)."""
    _ensure_loaded()
    choose = _HF_NAME_CHOOSERS.get(model_type)
    return (choose(config) if choose is not None else None) or _HF_MODEL_TYPES[model_type]


def hf_model_types() -> dict[str, str]:
    _ensure_loaded()
    return dict(_HF_MODEL_TYPES)


def get_converter(family: str, fmt: SourceFormat) -> Converter:
    _ensure_loaded()
    try:
        return _CONVERTERS[(family, fmt)]
    except KeyError:
        known = sorted(f for fam, f in _CONVERTERS if fam == family)
        raise ValueError(
            f"no converter from {fmt!r} checkpoints for the {family!r} family (it reads: {', '.join(known) or 'none'})"
        ) from None


def _ensure_loaded() -> None:
    # every module checkpoints/convert_*.py registers its converters on import
    import importlib
    import pkgutil

    import vitlab.checkpoints as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("convert_"):
            importlib.import_module(f"vitlab.checkpoints.{info.name}")
