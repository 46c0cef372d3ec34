"""Published weights as data: ``pretrained.json`` lists, per registered model, the checkpoints vitlab
can load (hub id, file format, classes, license) and the preprocessing they were trained with. A name's first
row, marked ``default``, is what ``pretrained=True`` loads for the bare name: timm's default tag, as
``timm.create_model(NAME, pretrained=True)`` loads it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any


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
    crop_mode: str = "center"  # "squash": both sides resized to size / crop_pct (timm's crop_mode)
    default: bool = False  # the weights a bare name gets


@cache
def _table() -> tuple[PretrainedWeights, ...]:
    raw = json.loads(resources.files("vitlab.models").joinpath("pretrained.json").read_text(encoding="utf-8"))
    return tuple(
        PretrainedWeights(**{k: tuple(v) if isinstance(v, list) else v for k, v in row.items()})
        for row in raw["weights"]
    )


def pretrained_weights(model: str) -> list[PretrainedWeights]:
    """Known published weights of ``model``, default first."""
    return [w for w in _table() if w.model == model]


def find_weights(model: str, tag: str | None = None) -> PretrainedWeights:
    """The weights of ``model`` with ``tag``; no tag: the row marked default (timm's default tag, whatever its
    class count: ``vit_huge_patch14_224`` gets the ImageNet-21k backbone), else the first."""
    rows = pretrained_weights(model)
    if not rows:
        raise ValueError(f"no published weights are known for {model!r}; pass a file path as pretrained=")
    if tag is None:
        return next((w for w in rows if w.default), rows[0])
    for w in rows:
        if w.tag == tag:
            return w
    raise ValueError(f"{model!r} has no weights tagged {tag!r}; known: {', '.join(w.tag for w in rows)}")


def weights_of_hub(repo_id: str, model: str | None = None) -> PretrainedWeights | None:
    """The row whose ``hub`` is ``repo_id`` (``ORG/NAME``, hub ids are case-insensitive; a ``@REV`` is ignored),
    of ``model`` when given; None when no row lists it."""
    repo = repo_id.partition("@")[0].lower()
    return next((w for w in _table() if w.hub.partition(":")[2].lower() == repo
                 and (model is None or w.model == model)), None)


# the row fields that set a model's preprocessing (the input size goes through the config's img_size)
PREPROCESSING_FIELDS = ("mean", "std", "crop_pct", "interpolation", "crop_mode")


def weights_settings(weights: PretrainedWeights, fields: set[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """What ``create_model(..., pretrained=True)`` sets from ``weights`` on a family whose config has ``fields``:
    the config overrides (the preprocessing fields the config has, ``img_size`` for weights fine-tuned at
    another size, e.g. mobilevitv2_150 at 384) and the preprocessing style (the fields the family fixes
    otherwise, e.g. ``crop_mode``, which no config holds)."""
    overrides = {k: getattr(weights, k) for k in PREPROCESSING_FIELDS if k in fields}
    style = {k: getattr(weights, k) for k in PREPROCESSING_FIELDS if k not in fields}
    if "img_size" in fields:
        h, w = weights.input_size[1:]
        overrides["img_size"] = h if h == w else (h, w)
    return overrides, style
