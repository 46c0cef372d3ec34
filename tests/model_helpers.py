"""Tiny overrides per family, so that registry-wide tests build every registered name quickly."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

import vitlab
from vitlab.models import get_entry


def _family_plugins() -> dict[str, ModuleType]:
    """Per-family tiny settings: every ``tests/tiny_<family>.py`` defines ``FAMILY`` (the registry's family
    name), ``tiny(name, cfg) -> dict`` and optionally ``HAS_ATTENTION = False`` (no attention layer to
    capture, e.g. MLP-Mixer) and ``PUBLISHED = {name: (params, GMACs or None)}`` (checked by the registry-wide
    model_info test, which computes them anyway). New families add a file instead of editing this one."""
    plugins: dict[str, ModuleType] = {}
    for path in sorted(Path(__file__).parent.glob("tiny_*.py")):
        module = importlib.import_module(path.stem)
        plugins[module.FAMILY] = module
    return plugins


FAMILY_PLUGINS = _family_plugins()


def has_attention(name: str) -> bool:
    """Whether the family has attention layers that capture mode reports."""
    family = get_entry(name).family
    if family == "resnet":
        return False
    return getattr(FAMILY_PLUGINS.get(family), "HAS_ATTENTION", True)


def published_size(name: str) -> tuple[int, float | None] | None:
    """(parameters, GMACs at the default size or None) that the family's ``tiny_<family>.PUBLISHED`` lists for
    ``name`` (the reference implementation's figures), checked where model_info is computed anyway."""
    plugin = FAMILY_PLUGINS.get(get_entry(name).family)
    return getattr(plugin, "PUBLISHED", {}).get(name)


def tiny_overrides(name: str) -> dict[str, Any]:
    """Small widths/depths for ``name`` that keep what makes the variant distinct (patch size, hybrid stride)."""
    entry = get_entry(name)
    cfg = entry.config
    if entry.family in FAMILY_PLUGINS:
        return dict(FAMILY_PLUGINS[entry.family].tiny(name, cfg))
    fields = set(type(cfg).__dataclass_fields__)
    over: dict[str, Any] = {}
    if entry.family == "resnet":
        basic = cfg.block == "basic"
        over.update(layers=(1,) * len(cfg.layers), stem_chs=16,
                    channels=(16, 32, 32, 64) if basic else (32, 64, 64, 128), img_size=32)
        return over
    for key, value in (("embed_dim", 64), ("depth", 2), ("num_heads", 4), ("depth_token_only", 1)):
        if key in fields:
            over[key] = value
    if getattr(cfg, "hybrid_layers", None) is not None:
        n = len(cfg.hybrid_layers)
        over.update(hybrid_layers=(1,) * n, hybrid_channels=(128,) * n, hybrid_stem_chs=32)
        over["img_size"] = 4 * 2 ** (n - 1) * 2  # a 2x2 grid at the hybrid's stride
    elif "patch_size" in fields:
        p = cfg.patch_size
        over["img_size"] = 2 * p if p >= 14 else 4 * p
    return over


def make_tiny(name: str, num_classes: int = 5, **extra: Any) -> nn.Module:
    return vitlab.create_model(name, num_classes=num_classes, **{**tiny_overrides(name), **extra})


def perturb_(model: nn.Module, std: float = 0.05, seed: int = 0) -> nn.Module:
    """Add noise to every parameter, so that zero-initialised heads/scales do not hide gradient paths."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def input_for(model: nn.Module, batch: int = 2, seed: int = 0) -> torch.Tensor:
    c, h, w = model.preprocessing.input_size
    return torch.randn(batch, c, h, w, generator=torch.Generator().manual_seed(seed))


def train_tiny_digits_vit(path: Path, class_names: list[str]) -> Path:
    """A tiny ViT trained for a few seconds on the bundled digits (about 90% test accuracy), saved to ``path``: a
    model whose predictions mean something, for agreement checks."""
    from vitlab.data import build_dataset, eval_transform

    torch.manual_seed(0)
    model = vitlab.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, in_chans=1, embed_dim=32,
                                depth=2, num_heads=2, num_classes=10, crop_pct=1.0, mean=(0.5,), std=(0.5,))
    ds = build_dataset("digits", split="train", transform=eval_transform(model.preprocessing))
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor([ds[i][1] for i in range(len(ds))])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(100):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    vitlab.save_model(model.eval(), path, class_names=class_names)
    return path
