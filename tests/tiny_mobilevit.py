"""Tiny MobileViT settings for the registry-wide tests: the variant's version and attention kind stay,
widths and depths shrink (a final expansion conv is kept where the variant has one)."""

from __future__ import annotations

from typing import Any

FAMILY = "mobilevit"


def tiny(name: str, cfg: Any) -> dict[str, Any]:
    return dict(stem_chs=8, channels=(8, 8, 16, 16, 24), mv2_depths=(1, 1), transformer_dims=(8, 16, 16),
                transformer_depths=(1, 2, 1), expand_ratio=2.0, final_chs=32 if cfg.final_chs else 0,
                img_size=64)
