"""Tiny CrossViT settings for the registry-wide tests: both branches, patch sizes and dagger stem kept."""

FAMILY = "crossvit"


def tiny(name, cfg) -> dict:
    # 48 px: a 4 x 4 grid for the small branch, 3 x 3 for the large one (48 * 224/240 -> 48 by the size rule)
    return {"embed_dim": (16, 32), "depth": ((1, 1),), "num_heads": (2, 2), "img_size": 48}


# timm 1.0.31 on the meta device: parameters, and GMACs (torch FlopCounterMode, matmul + conv) at the
# name's resolution where measured; test_models checks every entry against vitlab.model_info
PUBLISHED = {
    "crossvit_15_240": (27_528_464, None),
    "crossvit_15_dagger_240": (28_209_008, None),
    "crossvit_15_dagger_408": (28_500_080, 21.4),
    "crossvit_18_240": (43_271_408, 9.03),
    "crossvit_18_dagger_240": (44_266_976, None),
    "crossvit_18_dagger_408": (44_606_560, 32.41),
    "crossvit_9_240": (8_553_296, 1.84),
    "crossvit_9_dagger_240": (8_776_592, 1.98),
    "crossvit_base_240": (105_025_232, None),
    "crossvit_small_240": (26_856_272, None),
    "crossvit_tiny_240": (7_014_800, 1.56),
}
