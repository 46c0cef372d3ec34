"""Tiny XCiT settings for the registry-wide tests: the variant's patch size (stem depth) and tokens_norm,
width 32, one XCA block and the two class-attention blocks, a 2x2 grid."""

FAMILY = "xcit"


def tiny(name: str, cfg) -> dict:
    return {"embed_dim": 32, "depth": 1, "num_heads": 4, "img_size": 2 * cfg.patch_size}


# timm 1.0.31 on the meta device: parameters, and GMACs (torch FlopCounterMode, matmul + conv) at the
# name's resolution where measured; test_models checks every entry against vitlab.model_info
PUBLISHED = {
    "xcit_large_24_p16_224": (189_096_136, None),
    "xcit_large_24_p16_384": (189_096_136, None),
    "xcit_large_24_p8_224": (188_932_648, None),
    "xcit_large_24_p8_384": (188_932_648, 414.21),
    "xcit_medium_24_p16_224": (84_395_752, 16.08),
    "xcit_medium_24_p16_384": (84_395_752, None),
    "xcit_medium_24_p8_224": (84_323_624, None),
    "xcit_medium_24_p8_384": (84_323_624, None),
    "xcit_nano_12_p16_224": (3_053_224, 0.55),
    "xcit_nano_12_p16_384": (3_053_224, None),
    "xcit_nano_12_p8_224": (3_049_016, None),
    "xcit_nano_12_p8_384": (3_049_016, 6.27),
    "xcit_small_12_p16_224": (26_253_304, None),
    "xcit_small_12_p16_384": (26_253_304, None),
    "xcit_small_12_p8_224": (26_213_032, None),
    "xcit_small_12_p8_384": (26_213_032, 54.71),
    "xcit_small_24_p16_224": (47_671_384, None),
    "xcit_small_24_p16_384": (47_671_384, None),
    "xcit_small_24_p8_224": (47_631_112, None),
    "xcit_small_24_p8_384": (47_631_112, None),
    "xcit_tiny_12_p16_224": (6_716_272, 1.23),
    "xcit_tiny_12_p16_384": (6_716_272, None),
    "xcit_tiny_12_p8_224": (6_706_504, None),
    "xcit_tiny_12_p8_384": (6_706_504, None),
    "xcit_tiny_24_p16_224": (12_116_896, 2.32),
    "xcit_tiny_24_p16_384": (12_116_896, None),
    "xcit_tiny_24_p8_224": (12_107_128, None),
    "xcit_tiny_24_p8_384": (12_107_128, None),
}
