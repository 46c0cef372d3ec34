"""Tiny XCiT settings for the registry-wide tests: the variant's patch size (stem depth) and tokens_norm,
width 32, one XCA block and the two class-attention blocks, a 2x2 grid."""

FAMILY = "xcit"


def tiny(name: str, cfg) -> dict:
    return {"embed_dim": 32, "depth": 1, "num_heads": 4, "img_size": 2 * cfg.patch_size}
