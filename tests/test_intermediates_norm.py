"""``forward_intermediates(norm=True)`` passes the intermediates through ``model.norm`` only, as timm: a model that
pools with ``fc_norm`` (average-pooled ViT, BEiT with mean pooling, BEiT-3) has an Identity there, so its
intermediates are not normalised. Reference values from timm: tests/fixtures/make_intermediates_norm.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vitlab

FIX = Path(__file__).parent / "fixtures"
IO = load_file(FIX / "intermediates_norm_io.safetensors")
ARCH = dict(img_size=24, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=5)
CASES = {"vit_avg": "vit_small_patch16_224", "vit_token": "vit_small_patch16_224",
         "beit": "beit_base_patch16_224", "beit3": "beit3_base_patch16_224"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_intermediates_norm_matches_timm(case: str) -> None:
    model = vitlab.create_model(CASES[case], pretrained=FIX / f"intermediates_norm_{case}.safetensors", **ARCH).eval()
    assert isinstance(model.norm, torch.nn.Identity) == (case != "vit_token")
    with torch.no_grad():
        _, normed = model.forward_intermediates(IO["x"], indices=[0], norm=True, output_fmt="NCHW",
                                                return_prefix_tokens=True)
        _, raw = model.forward_intermediates(IO["x"], indices=[0], norm=False, output_fmt="NCHW")
    tokens, prefix = normed[0]
    torch.testing.assert_close(tokens, IO[f"{case}_norm"], atol=1e-5, rtol=0)
    torch.testing.assert_close(prefix, IO[f"{case}_prefix"], atol=1e-5, rtol=0)
    torch.testing.assert_close(raw[0], IO[f"{case}_raw"], atol=1e-5, rtol=0)
