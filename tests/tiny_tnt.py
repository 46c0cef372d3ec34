"""Tiny TNT settings for the registry-wide tests: 16 x 16 patches of 4 x 4 pixels and the layout kept."""

FAMILY = "tnt"


def tiny(name, cfg) -> dict:
    return {"embed_dim": 32, "inner_dim": 8, "depth": 2, "num_heads_outer": 4, "num_heads_inner": 2, "img_size": 32}


# timm 1.0.31 on the meta device: parameters, and GMACs (torch FlopCounterMode, matmul + conv) at the
# name's resolution where measured; test_models checks every entry against vitlab.model_info
PUBLISHED = {
    "tnt_b_patch16_224": (65_428_680, 14.05),
    "tnt_s_legacy_patch16_224": (23_755_336, 5.22),
    "tnt_s_patch16_224": (23_768_584, 5.22),
}
