"""Tiny BEiT / BEiT v2 settings for the registry-wide tests: width 32, 2 blocks, 4 heads, a 32px image with
the variant's 16px patches (a 2x2 grid; per-layer relative position tables of (2*2-1)^2 + 3 rows)."""

from __future__ import annotations

from typing import Any

FAMILY = "beit"


def tiny(name: str, cfg: Any) -> dict:
    return {"img_size": 2 * cfg.patch_size, "embed_dim": 32, "depth": 2, "num_heads": 4}


# timm 1.0.31 on the meta device (tests/fixtures/README.md: the peer environment; FlopCounterMode as in
# vitlab.model_info): parameters and GMACs at the default input size; checked by test_models' model_info test
PUBLISHED = {
    "beit_base_patch16_224": (86_530_984, 17.56),
    "beit_base_patch16_384": (86_744_104, 55.48),
    "beit_large_patch16_224": (304_430_568, 61.55),
    "beit_large_patch16_384": (304_998_888, 191.07),
    "beit_large_patch16_512": (305_674_728, 361.99),
    "beitv2_base_patch16_224": (86_530_984, 17.56),
    "beitv2_large_patch16_224": (304_430_568, 61.55),
}
