"""Tiny MLP-Mixer settings for the registry-wide tests: the variant's patch size on a 2x2 grid."""

FAMILY = "mixer"
HAS_ATTENTION = False  # token- and channel-mixing MLPs only


def tiny(name: str, cfg) -> dict:
    return {"embed_dim": 32, "depth": 2, "img_size": 2 * cfg.patch_size}
