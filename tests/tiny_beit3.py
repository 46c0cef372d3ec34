"""Tiny BEiT-3 vision-encoder settings for the registry-wide tests: width 32, 2 blocks, 4 heads, a 2x2 grid of
the variant's patches (16px, or 14px for the giant names)."""

from __future__ import annotations

from typing import Any

FAMILY = "beit3"


def tiny(name: str, cfg: Any) -> dict:
    return {"img_size": 2 * cfg.patch_size, "embed_dim": 32, "depth": 2, "num_heads": 4}


# timm 1.0.31 (its VisionTransformer with scale_attn_norm / scale_mlp_norm) on the meta device: parameters and
# GMACs at the default input size; checked by test_models' model_info test
PUBLISHED = {
    "beit3_base_patch16_224": (86_659_816, 17.56),
    "beit3_large_patch16_224": (304_572_392, 61.55),
    "beit3_giant_patch14_224": (1_013_215_592, 267.03),
    "beit3_giant_patch14_336": (1_013_666_152, 620.32),
}
