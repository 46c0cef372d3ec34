"""Tiny Swin v1 settings for the registry-wide tests: 2 stages, width 16, a 32px image with 4px patches
(an 8x8 map: stage 0 is one 8x8 window, so every attention map has batch B * nW = B; the shifted windows are
covered by tests/test_swin.py)."""

from __future__ import annotations

from typing import Any

FAMILY = "swin"


def tiny(name: str, cfg: Any) -> dict:
    return {"img_size": 32, "embed_dim": 16, "depths": (2, 1), "num_heads": (2, 2), "window_size": 8,
            "pretrained_window_sizes": (cfg.pretrained_window_sizes[0], cfg.pretrained_window_sizes[-1])
            if cfg.pretrained_window_sizes else None}
