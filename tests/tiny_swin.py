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

# timm 1.0.31 on the meta device (tests/fixtures/README.md: the peer environment): parameters and GMACs at the
# default input size; checked by test_models' model_info test for every name
PUBLISHED = {
    "swin_base_patch4_window12_384": (87_903_584, 47.08),
    "swin_base_patch4_window7_224": (87_768_224, 15.43),
    "swin_large_patch4_window12_384": (196_735_516, 103.92),
    "swin_large_patch4_window7_224": (196_532_476, 34.48),
    "swin_small_patch4_window7_224": (49_606_258, 8.74),
    "swin_tiny_patch4_window7_224": (28_288_354, 4.49),
}
