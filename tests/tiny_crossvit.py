"""Tiny CrossViT settings for the registry-wide tests: both branches, patch sizes and dagger stem kept."""

FAMILY = "crossvit"


def tiny(name, cfg) -> dict:
    # 48 px: a 4 x 4 grid for the small branch, 3 x 3 for the large one (48 * 224/240 -> 48 by the size rule)
    return {"embed_dim": (16, 32), "depth": ((1, 1),), "num_heads": (2, 2), "img_size": 48}
