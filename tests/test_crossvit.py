"""CrossViT: parity with timm (both stems), the official key layout, resolution changes, fusion capture.

Fixtures come from tests/fixtures/make_fixtures_crossvit_tnt.py (timm 1.0.31 in the peer env).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tiny_crossvit
import vitlab
from vitlab.analysis import explain
from vitlab.checkpoints import CheckpointError
from vitlab.layers import capture_attention
from vitlab.models.crossvit import CrossViTConfig

from model_helpers import input_for, make_tiny, perturb_

FIX = Path(__file__).resolve().parent / "fixtures"
TOL = {"atol": 1e-5, "rtol": 1e-5}
# the fixture's architecture: heads are not in the file, the rest the converter reads
TINY = {"img_size": 48, "branch_scale": (1.0, 2 / 3), "num_heads": (2, 4)}


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return load_file(FIX / "crossvit_tnt_io.safetensors")


def _timm(tag: str = "crossvit", **kw) -> torch.nn.Module:
    return vitlab.create_model("crossvit_9_240", pretrained=FIX / f"{tag}_timm_tiny.safetensors",
                               **{**TINY, **kw}).eval()


@pytest.mark.parametrize("tag", ["crossvit", "crossvit_dagger"])
def test_timm_crossvit_matches_timm(tag: str, io) -> None:
    model = _timm(tag)
    assert model.cfg.embed_dim == (16, 32) and model.cfg.depth == ((1, 2), (1, 2))
    assert model.cfg.multi_conv == (tag == "crossvit_dagger") and model.num_classes == 10
    x = io["crossvit_x"]
    with torch.no_grad():
        f0, f1 = model.forward_features(x)
        torch.testing.assert_close(f0, io[f"{tag}_features_0"], **TOL)
        torch.testing.assert_close(f1, io[f"{tag}_features_1"], **TOL)
        torch.testing.assert_close(model.forward_head([f0, f1], pre_logits=True), io[f"{tag}_pre_logits"], **TOL)
        torch.testing.assert_close(model(x), io[f"{tag}_logits"], **TOL)


def test_official_ibm_layout_is_detected_and_matches(io, tmp_path) -> None:
    sd = load_file(FIX / "crossvit_timm_tiny.safetensors")
    official = {(f"{k[:-2]}.{k[-1]}" if k.startswith(("pos_embed_", "cls_token_")) else k): v
                for k, v in sd.items()}
    assert "pos_embed.0" in official and "cls_token.1" in official
    torch.save({"model": official, "epoch": 3}, tmp_path / "crossvit_9_224.pth")
    model = vitlab.create_model("crossvit_9_240", pretrained=tmp_path / "crossvit_9_224.pth", **TINY).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(io["crossvit_x"]), io["crossvit_logits"], **TOL)


def test_params_and_gmacs_equal_timm() -> None:
    # timm 1.0.31, torch FlopCounterMode at the default size (see benchmarks/RESULTS.md)
    expected = {"crossvit_9_240": (8_553_296, 1.84), "crossvit_9_dagger_240": (8_776_592, 1.98),
                "crossvit_tiny_240": (7_014_800, 1.56), "crossvit_18_240": (43_271_408, 9.03),
                "crossvit_15_dagger_408": (28_500_080, 21.4)}
    # test_models.test_model_info_at_default_size checks every tiny_crossvit.PUBLISHED entry against
    # vitlab.model_info (computed there anyway); here: the table holds these figures and every name
    for name, (params, gmacs) in expected.items():
        assert tiny_crossvit.PUBLISHED[name] == (params, gmacs), name
    assert sorted(tiny_crossvit.PUBLISHED) == vitlab.list_models("crossvit_*")


def test_branch_sizes_follow_the_rule_and_288_works() -> None:
    assert CrossViTConfig(img_size=240).branch_sizes() == [(240, 240), (224, 224)]
    assert CrossViTConfig(img_size=408, branch_scale=(1.0, 384 / 408)).branch_sizes() == [(408, 408), (384, 384)]
    assert CrossViTConfig(img_size=288).branch_sizes() == [(288, 288), (272, 272)]  # 24 x 24 and 17 x 17
    m = make_tiny("crossvit_9_240", img_size=96).eval()
    assert m.grids == [(8, 8), (6, 6)]
    with torch.no_grad():
        assert m(torch.randn(1, 3, 96, 96)).shape == (1, 5)


def test_checkpoint_loaded_at_another_resolution_resamples_both_tables(io) -> None:
    small = _timm()
    big = _timm(img_size=72)  # branches 72 (6 x 6) and 48 (3 x 3)
    assert big.grids == [(6, 6), (3, 3)]
    from vitlab.layers import resample_pos_embed

    for b, grid in enumerate(big.grids):
        ref = resample_pos_embed(small.pos_embed[b].detach(), grid, num_prefix_tokens=1)
        torch.testing.assert_close(big.pos_embed[b].detach(), ref)
    with torch.no_grad():
        y = big(torch.randn(1, 3, 72, 72))
    assert torch.isfinite(y).all()


def test_wrong_input_size_and_other_family_checkpoint_are_clear_errors() -> None:
    m = make_tiny("crossvit_9_240").eval()
    with pytest.raises(ValueError, match="built for 48x48"):
        m(torch.randn(1, 3, 40, 40))
    with pytest.raises(CheckpointError, match="CrossViT"):
        vitlab.create_model("crossvit_9_240", pretrained=FIX / "tnt_timm_tiny.safetensors")


def test_fusion_capture_is_class_token_over_the_other_branch(io) -> None:
    model = _timm()
    x = io["crossvit_x"]
    with torch.no_grad():
        fast = model(x)
        with capture_attention(model) as maps:
            slow = model(x)
    torch.testing.assert_close(slow, fast, **TOL)
    # per multi-scale block: small branch 1 block, large branch 2 blocks, then the two fusions
    shapes = [tuple(a.shape) for a in maps[:5]]
    assert shapes == [(2, 2, 17, 17), (2, 4, 5, 5), (2, 4, 5, 5), (2, 4, 1, 5), (2, 2, 1, 17)]
    assert len(maps) == 10


@pytest.mark.parametrize("method", ["rollout", "grad-rollout", "last-layer", "grad-cam", "grad-input"])
def test_explain_crossvit_every_method(method: str) -> None:
    model = perturb_(make_tiny("crossvit_9_dagger_240")).eval()
    x = input_for(model)
    e = explain(model, x, method=method)
    assert e.method == method and e.maps.shape == (2, 48, 48) and torch.isfinite(e.maps).all()
    assert e.maps.abs().sum() > 0
    if method in ("rollout", "last-layer"):
        assert e.patch_maps.shape == (2, 4, 4)  # the small branch's grid
    assert explain(model, x).method == "rollout"


def test_forward_intermediates_per_branch() -> None:
    model = perturb_(make_tiny("crossvit_9_240", depth=((1, 1), (1, 2)))).eval()
    x = input_for(model)
    with torch.no_grad():
        _, both = model.forward_intermediates(x, output_fmt="NCHW")
        _, small = model.forward_intermediates(x, output_fmt="NCHW", branch=0)
        _, large = model.forward_intermediates(x, indices=[-1], output_fmt="NLC", branch=1)
    assert [t.shape for t in both] == [(2, 48, 4, 4)] * 2
    assert small[0].shape == (2, 16, 4, 4) and large[0].shape == (2, 9, 32)
    torch.testing.assert_close(both[1][:, :16], small[1])


@pytest.mark.parametrize("name", ["crossvit_15_dagger_408", "tnt_s_legacy_patch16_224", "t2t_vit_t_14"])
def test_vitlab_checkpoint_round_trip_and_resolution_change(name: str, tmp_path) -> None:
    model = perturb_(make_tiny(name)).eval()
    vitlab.save_model(model, tmp_path / "m.safetensors")
    back = vitlab.load_model(tmp_path / "m.safetensors").eval()
    x = input_for(model)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x))
    big = vitlab.load_model(tmp_path / "m.safetensors", img_size=64).eval()
    with torch.no_grad():
        assert torch.isfinite(big(torch.randn(1, 3, 64, 64))).all()
