"""timm's ViT names whose architecture vitlab has: each builds with timm's parameter count and defaults. DeiT III's
names (``deit3_*``: timm's VisionTransformer without a class-token position, with LayerScale) are DeiT's; DINOv2's
(``vit_*_patch14_dinov2``, ``vit_*_patch14_reg4_dinov2``: LayerScale, registers) are ViT's, and so are CLIP's and
SigLIP's image towers (``vit_*_clip_*``: a norm before the blocks; ``vit_*_siglip_*``: attention pooling).

The expected numbers come from timm itself (tests/fixtures/make_fixtures_timm_vit_names.py, run with the
peer environment); models are built on the meta device, so the giant ones cost nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import vitlab
from vitlab.models.registry import get_entry, list_models
from vitlab.models.vit import TIMM_VIT_LAYOUTS

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "timm_vit_names.json").read_text())["models"]


def test_every_timm_layout_is_registered_and_in_the_fixture():
    assert set(TIMM_VIT_LAYOUTS) <= set(list_models("vit_*"))
    assert set(TIMM_VIT_LAYOUTS) <= set(FIXTURE)


def test_every_timm_deit3_name_is_registered():
    """The fixture lists every name timm.list_models("deit3_*") gives; vitlab registers exactly those."""
    timm_names = {n for n in FIXTURE if n.startswith("deit3_")}
    assert len(timm_names) == 8
    assert set(list_models("deit3_*")) == timm_names


def test_dinov2_names_are_registered_with_timms_architecture():
    """DINOv2 S/B/L, with and without 4 registers (timm's reg_tokens=4, no_embed_class=True), at 518px, headless;
    the giant ones (a SwiGLU MLP) are not vitlab's."""
    names = {n for n in FIXTURE if n.endswith("_dinov2")}
    assert len(names) == 6 and names <= set(list_models("vit_*"))
    assert not list_models("vit_giant_patch14*dinov2")
    for name in names:
        cfg = get_entry(name).config
        assert (cfg.img_size, cfg.patch_size, cfg.init_values, cfg.num_classes) == (518, 14, 1e-5, 0)
        reg = "_reg4_" in name
        assert (cfg.reg_tokens, cfg.no_embed_class) == ((4, True) if reg else (0, False))
    with torch.device("meta"):
        m = vitlab.create_model("vit_small_patch14_reg4_dinov2")
    assert m.reg_token.shape == (1, 4, 384) and m.pos_embed.shape == (1, 37 * 37, 384) and m.num_prefix_tokens == 5


def test_clip_and_siglip_names_are_registered_with_timms_architecture():
    """Every ViT CLIP / SigLIP image tower timm has (the fixture lists them all): CLIP's with a norm before the blocks
    (eps 1e-5, no patch bias) and QuickGELU where the name says so; SigLIP's without a class token, pooled by
    attention ("map") or averaged ("_gap"), the tanh GELU where timm's name has it."""
    clip = {n for n in FIXTURE if "_clip_" in n}
    siglip = {n for n in FIXTURE if "_siglip_" in n}
    assert len(clip) == 26 and len(siglip) == 34
    assert clip == set(list_models("vit_*_clip_*")) and siglip == set(list_models("vit_*_siglip_*"))
    for name in clip:
        cfg = get_entry(name).config
        assert (cfg.pre_norm, cfg.norm_eps, cfg.class_token, cfg.global_pool) == (True, 1e-5, True, "token")
        assert cfg.gelu == ("quick" if "_quickgelu_" in name else "exact")
    tanh = {"vit_base_patch32_siglip_256", "vit_large_patch16_siglip_512", "vit_so400m_patch16_siglip_256",
            "vit_giantopt_patch16_siglip_384"}
    for name in siglip:
        cfg = get_entry(name).config
        assert (cfg.pre_norm, cfg.class_token, cfg.num_classes) == (False, False, 0)
        assert cfg.global_pool == ("avg" if "_gap_" in name else "map")
        if name in tanh or name.replace("_siglip_gap_", "_siglip_") in tanh:
            assert cfg.gelu == "tanh"
    assert get_entry("vit_base_patch16_siglip_224").config.gelu == "exact"
    with torch.device("meta"):
        m = vitlab.create_model("vit_base_patch16_clip_quickgelu_224")
    assert m.patch_embed.proj.bias is None and m.norm_pre.weight.shape == (768,) and m.attn_pool is None
    with torch.device("meta"):
        m = vitlab.create_model("vit_so400m_patch14_siglip_378")
    assert m.attn_pool.mlp.fc1.out_features == 4304 and m.num_prefix_tokens == 0


@pytest.mark.parametrize("name", ["vit_so400m_patch14_siglip_384", "vit_so400m_patch14_siglip_gap_384"])
def test_so400m_at_384_px_has_timms_27x27_grid_and_takes_384_px_images(name):
    """384 is not a multiple of 14: timm (and big_vision's VALID convolution) cut 27 x 27 patches and leave the last
    6 pixel rows / columns unused; the model takes 384 px images (its preprocessing's size) and refuses others."""
    assert name in list_models("vit_so400m_patch14_siglip*_384")
    with torch.device("meta"):
        m = vitlab.create_model(name)
        assert m.patch_embed.grid_size == (27, 27) and m.pos_embed.shape == (1, 729, 1152)
        assert m.preprocessing.input_size == (3, 384, 384)
        assert m(torch.empty(1, 3, 384, 384)).shape == (1, 1152)
        with pytest.raises(ValueError, match="built for 384x384"):
            m(torch.empty(1, 3, 378, 378))


@pytest.mark.parametrize("name", sorted(FIXTURE))
def test_timm_name_builds_with_timms_parameter_count(name):
    expected = FIXTURE[name]
    with torch.device("meta"):
        model = vitlab.create_model(name)
    assert model.num_classes == expected["num_classes"]
    assert sum(p.numel() for p in model.parameters()) == expected["params"]
    pre = model.preprocessing
    assert list(pre.input_size) == expected["input_size"]
    assert list(pre.mean) == pytest.approx(expected["mean"]) and list(pre.std) == pytest.approx(expected["std"])
    assert pre.crop_pct == pytest.approx(expected["crop_pct"])
    assert get_entry(name).family == ("deit" if name.startswith("deit3_") else "vit")
