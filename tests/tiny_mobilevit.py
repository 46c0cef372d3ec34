"""Tiny MobileViT settings for the registry-wide tests: the variant's version and attention kind stay,
widths and depths shrink (a final expansion conv is kept where the variant has one)."""

from __future__ import annotations

from typing import Any

FAMILY = "mobilevit"


def tiny(name: str, cfg: Any) -> dict[str, Any]:
    return dict(stem_chs=8, channels=(8, 8, 16, 16, 24), mv2_depths=(1, 1), transformer_dims=(8, 16, 16),
                transformer_depths=(1, 2, 1), expand_ratio=2.0, final_chs=32 if cfg.final_chs else 0,
                img_size=64)


# timm 1.0.31 on the meta device: parameters, and GMACs (torch FlopCounterMode, matmul + conv + SDPA) at 256 px;
# test_models checks every entry against vitlab.model_info. MobileViTv3 has no second implementation to
# count it: test_mobilevit checks v3 against the paper's figures under the paper's own counting convention.
PUBLISHED = {
    "mobilevit_xxs": (1_272_024, 0.41),
    "mobilevit_xs": (2_317_848, 1.03),
    "mobilevit_s": (5_578_632, 2.0),
    "mobilevitv2_050": (1_370_593, 0.46),
    "mobilevitv2_075": (2_866_009, 1.03),
    "mobilevitv2_100": (4_901_841, 1.81),
    "mobilevitv2_125": (7_478_089, 2.82),
    "mobilevitv2_150": (10_594_753, 4.04),
    "mobilevitv2_175": (14_251_833, 5.49),
    "mobilevitv2_200": (18_449_329, 7.16),
}
