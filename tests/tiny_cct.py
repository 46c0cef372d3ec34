"""Tiny CCT settings for the registry-wide tests: the variant's tokenizer (kernel, number of convolution
blocks) and position kind kept; width 32, 2 blocks, 2 heads, 16-channel intermediate convolutions, 32 px (a 224
or 384 px variant's 7x2 tokenizer then gives a 2 x 2 grid)."""

FAMILY = "cct"


def tiny(name: str, cfg) -> dict:
    return {"embed_dim": 32, "depth": 2, "num_heads": 2, "conv_channels": 16, "img_size": 32}


# Parameters of vit-pytorch 1.26.11's CCT (an independent implementation with the official module layout) built
# with each name's settings (tests/fixtures/make_fixtures_cct.py's recipe; learned positions). The "_sine" names
# are those counts less the sinusoid table, which vit-pytorch and the official code keep as a frozen parameter and
# vitlab recomputes (a buffer). The paper's Table 1 / the official README round the same counts: CCT-2/3x2 0.28 M,
# CCT-7/3x1 3.76 M, CCT-14/7x2 22.36 M at 224 px (truncated) and 22.51 M at 384 px (tests/test_cct.py).
PUBLISHED = {
    "cct_2_3x2_32": (283_723, None),
    "cct_2_3x2_32_sine": (275_531, None),
    "cct_4_3x2_32": (482_123, None),
    "cct_4_3x2_32_sine": (473_931, None),
    "cct_6_3x1_32": (3_233_803, None),
    "cct_6_3x1_32_sine": (3_168_267, None),
    "cct_6_3x2_32": (3_326_923, None),
    "cct_6_3x2_32_sine": (3_310_539, None),
    "cct_7_3x1_32": (3_760_139, None),
    "cct_7_3x1_32_sine": (3_694_603, None),
    "cct_7_3x2_32": (3_853_259, None),
    "cct_7_3x2_32_sine": (3_836_875, None),
    "cct_7_3x1_32_c100": (3_783_269, None),
    "cct_7_3x1_32_sine_c100": (3_717_733, None),
    "cct_7_7x2_224": (4_573_735, None),
    "cct_7_7x2_224_sine": (4_523_559, None),
    "cct_14_7x2_224": (22_367_273, None),
    "cct_14_7x2_384": (22_513_193, None),
    "cct_14_7x2_384_fl": (22_167_463, None),
}
