"""Tiny Swin v2 settings for the registry-wide tests (see tiny_swin.py)."""

from __future__ import annotations

from tiny_swin import tiny  # noqa: F401  (same shape for both versions)

FAMILY = "swinv2"

# timm 1.0.31 on the meta device (tests/fixtures/README.md: the peer environment): parameters and GMACs at the
# default input size; checked by test_models' model_info test for every name
PUBLISHED = {
    "swinv2_base_window12_192": (109_280_841, 11.88),
    "swinv2_base_window12to16_192to256": (87_918_816, 21.97),
    "swinv2_base_window12to24_192to384": (87_918_816, 55.15),
    "swinv2_base_window16_256": (87_918_816, 21.97),
    "swinv2_base_window8_256": (87_918_816, 20.33),
    "swinv2_large_window12_192": (228_772_549, 26.13),
    "swinv2_large_window12to16_192to256": (196_739_932, 47.74),
    "swinv2_large_window12to24_192to384": (196_739_932, 115.99),
    "swinv2_small_window16_256": (49_728_418, 12.78),
    "swinv2_small_window8_256": (49_728_418, 11.55),
    "swinv2_tiny_window16_256": (28_347_154, 6.66),
    "swinv2_tiny_window8_256": (28_347_154, 5.94),
}
