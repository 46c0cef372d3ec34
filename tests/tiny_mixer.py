"""Tiny MLP-Mixer settings for the registry-wide tests: the variant's patch size on a 2x2 grid."""

FAMILY = "mixer"
HAS_ATTENTION = False  # token- and channel-mixing MLPs only


def tiny(name: str, cfg) -> dict:
    return {"embed_dim": 32, "depth": 2, "img_size": 2 * cfg.patch_size}


# timm 1.0.31 on the meta device: parameters, and GMACs (torch FlopCounterMode, matmul + conv) at the
# name's resolution where measured; test_models checks every entry against vitlab.model_info
PUBLISHED = {
    "mixer_b16_224": (59_880_472, 12.6),
    "mixer_b32_224": (60_293_428, 3.24),
    "mixer_l16_224": (208_196_168, 44.55),
    "mixer_l32_224": (206_939_264, 11.25),
    "mixer_s16_224": (18_528_264, 3.78),
    "mixer_s32_224": (19_104_624, 1.0),
}
