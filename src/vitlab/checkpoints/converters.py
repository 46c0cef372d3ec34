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

SourceFormat = Literal["vitlab", "timm", "hf", "jax"]


@dataclass
class Converted:
    state_dict: dict[str, Tensor]
    overrides: dict[str, Any] = field(default_factory=dict)


Converter = Callable[[Any, dict[str, Any]], Converted]
_CONVERTERS: dict[tuple[str, str], Converter] = {}


def register_converter(family: str, fmt: SourceFormat) -> Callable[[Converter], Converter]:
    def deco(fn: Converter) -> Converter:
        _CONVERTERS[(family, fmt)] = fn
        return fn

    return deco


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
    from vitlab.checkpoints import convert_cait, convert_deit, convert_hf, convert_jax, convert_timm  # noqa: F401
