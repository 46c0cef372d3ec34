"""Tiny T2T-ViT settings for the registry-wide tests: the T2T layer kind (Performer / transformer) kept."""

FAMILY = "t2t"


def tiny(name, cfg) -> dict:
    # 32 px: soft splits give 8 x 8, 4 x 4, then a 2 x 2 backbone grid
    return {"token_dim": 16, "embed_dim": 32, "depth": 2, "num_heads": 4, "img_size": 32}
