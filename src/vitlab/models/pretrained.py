"""Published weights as data: ``pretrained.json`` lists, per registered model, the checkpoints vitlab
can load (hub id, file format, classes, license) and the preprocessing they were trained with."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources


@dataclass(frozen=True, kw_only=True)
class PretrainedWeights:
    model: str
    tag: str
    hub: str
    format: str
    num_classes: int
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float
    interpolation: str
    license: str


@cache
def _table() -> tuple[PretrainedWeights, ...]:
    raw = json.loads(resources.files("vitlab.models").joinpath("pretrained.json").read_text())
    return tuple(
        PretrainedWeights(**{k: tuple(v) if isinstance(v, list) else v for k, v in row.items()})
        for row in raw["weights"]
    )


def pretrained_weights(model: str) -> list[PretrainedWeights]:
    """Known published weights of ``model``, default first."""
    return [w for w in _table() if w.model == model]


def find_weights(model: str, tag: str | None = None) -> PretrainedWeights:
    """The weights of ``model`` with ``tag`` (default: the first fine-tuned classifier, else the first)."""
    rows = pretrained_weights(model)
    if not rows:
        raise ValueError(f"no published weights are known for {model!r}; pass a file path as pretrained=")
    if tag is None:
        return next((w for w in rows if w.num_classes == 1000), rows[0])
    for w in rows:
        if w.tag == tag:
            return w
    raise ValueError(f"{model!r} has no weights tagged {tag!r}; known: {', '.join(w.tag for w in rows)}")
