"""One line that says what was built: the registered name, what differs from it, the input and the size."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

# Fields every run sets from its data, and normalisation constants: reported as the input, not as changes.
_INPUT_FIELDS = frozenset({"img_size", "num_classes", "in_chans", "mean", "std", "crop_pct", "interpolation"})


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "(" + ", ".join(_fmt(v) for v in value) + ")"
    return str(value)


def config_changes(model: nn.Module) -> dict[str, Any]:
    """Config fields of ``model`` that differ from its registered template (input fields left out)."""
    from vitlab.models.registry import get_entry

    template = get_entry(model.model_name).config
    cfg = model.cfg
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
            if f.name not in _INPUT_FIELDS and hasattr(template, f.name)
            and getattr(cfg, f.name) != getattr(template, f.name)}


def describe_model(model: nn.Module) -> str:
    """E.g. "vit_tiny_patch16_224 with embed_dim=64, depth=6, patch_size=4 at 28 px, 1 channel, 10 classes,
    0.21 M parameters" for a model built with ``vitlab.create_model``."""
    name = getattr(model, "model_name", type(model).__name__)
    parts = [name]
    if hasattr(model, "cfg") and hasattr(model, "model_name"):
        changes = config_changes(model)
        if changes:
            parts.append("with " + ", ".join(f"{k}={_fmt(v)}" for k, v in changes.items()))
    pre = getattr(model, "preprocessing", None)
    if pre is not None:
        c, h, w = pre.input_size
        parts.append(f"at {h} px" if h == w else f"at {h}x{w} px")
        size = f"{c} channel" + ("s" if c != 1 else "")
    else:
        size = None
    params = sum(p.numel() for p in model.parameters())
    tail = [s for s in (size, f"{getattr(model, 'num_classes', '?')} classes", f"{params / 1e6:.2f} M parameters")
            if s]
    return " ".join(parts) + ", " + ", ".join(tail)
