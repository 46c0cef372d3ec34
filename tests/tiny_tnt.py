"""Tiny TNT settings for the registry-wide tests: 16 x 16 patches of 4 x 4 pixels and the layout kept."""

FAMILY = "tnt"


def tiny(name, cfg) -> dict:
    return {"embed_dim": 32, "inner_dim": 8, "depth": 2, "num_heads_outer": 4, "num_heads_inner": 2, "img_size": 32}
