"""TNT: parity with timm (official and legacy layouts), the official key names, capture, rollout, resolution.

Fixtures come from tests/fixtures/make_fixtures_crossvit_tnt.py (timm 1.0.31 in the peer env).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tiny_tnt
import vitlab
from vitlab.analysis import explain
from vitlab.checkpoints import CheckpointError
from vitlab.layers import capture_attention

from model_helpers import input_for, make_tiny, perturb_

FIX = Path(__file__).resolve().parent / "fixtures"
TOL = {"atol": 1e-5, "rtol": 1e-5}
TINY = {"img_size": 32, "num_heads_outer": 4}  # heads are not in the file; the rest is


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return load_file(FIX / "crossvit_tnt_io.safetensors")


def _timm(tag: str = "tnt", **kw) -> torch.nn.Module:
    return vitlab.create_model("tnt_s_patch16_224", pretrained=FIX / f"{tag}_timm_tiny.safetensors",
                               **{**TINY, **kw}).eval()


@pytest.mark.parametrize("tag", ["tnt", "tnt_legacy"])
def test_timm_tnt_matches_timm(tag: str, io) -> None:
    model = _timm(tag)
    assert model.cfg.legacy == (tag == "tnt_legacy")
    assert (model.cfg.embed_dim, model.cfg.inner_dim, model.cfg.depth, model.num_classes) == (32, 8, 2, 10)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(io["tnt_x"]), io[f"{tag}_features"], **TOL)
        torch.testing.assert_close(model(io["tnt_x"]), io[f"{tag}_logits"], **TOL)


def test_official_huawei_names_are_detected_and_match(io, tmp_path) -> None:
    # the names timm's checkpoint_filter_fn renames, applied backwards to the timm fixture
    sd = load_file(FIX / "tnt_timm_tiny.safetensors")
    back = (("patch_pos", "outer_pos"), ("pixel_pos", "inner_pos"), ("pixel_embed", "patch_embed"),
            ("norm1_proj", "proj_norm1"), ("norm2_proj", "proj_norm2"), ("norm_in", "inner_norm1"),
            ("attn_in", "inner_attn"), ("norm_mlp_in", "inner_norm2"), ("mlp_in", "inner_mlp"),
            ("norm_out", "outer_norm1"), ("attn_out", "outer_attn"), ("norm_mlp", "outer_norm2"))
    official = {}
    for k, v in sd.items():
        for src, dst in back:
            k = k.replace(src, dst)
        k = k.replace(".mlp.", ".outer_mlp.") if k.startswith("blocks.") else k
        official[k] = v
    official["inner_pos"] = sd["pixel_pos"].flatten(2).transpose(1, 2)  # (1, C, 4, 4) -> (1, 16, C)
    official["outer_tokens"] = torch.zeros(1)
    torch.save({"state_dict": official}, tmp_path / "tnt_s_81.5.pth.tar")
    model = vitlab.create_model("tnt_s_patch16_224", pretrained=tmp_path / "tnt_s_81.5.pth.tar", **TINY).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(io["tnt_x"]), io["tnt_logits"], **TOL)


def test_params_and_gmacs_equal_timm() -> None:
    # timm 1.0.31, torch FlopCounterMode at 224 px (see benchmarks/RESULTS.md)
    expected = {"tnt_s_patch16_224": (23_768_584, 5.22), "tnt_b_patch16_224": (65_428_680, 14.05),
                "tnt_s_legacy_patch16_224": (23_755_336, 5.22)}
    # checked against vitlab.model_info by test_models.test_model_info_at_default_size, which computes it
    assert tiny_tnt.PUBLISHED == expected


def test_inner_and_outer_attention_are_captured(io) -> None:
    model = _timm()
    x = io["tnt_x"]
    with torch.no_grad():
        fast = model(x)
        with capture_attention(model) as maps:
            slow = model(x)
    torch.testing.assert_close(slow, fast, **TOL)
    # per block: inner attention over the 16 pixels of each of the 2 x 4 patches, then outer over 1 + 4 tokens
    assert [tuple(a.shape) for a in maps] == [(8, 4, 16, 16), (2, 4, 5, 5)] * 2


@pytest.mark.parametrize("method", ["rollout", "grad-rollout", "last-layer", "grad-cam", "grad-input"])
def test_explain_tnt_every_method(method: str) -> None:
    model = perturb_(make_tiny("tnt_s_patch16_224", img_size=48)).eval()
    x = input_for(model)
    e = explain(model, x, method=method)
    assert e.method == method and e.maps.shape == (2, 48, 48) and torch.isfinite(e.maps).all()
    if method != "grad-input":
        assert e.patch_maps.shape == (2, 3, 3)
    assert explain(model, x).method == "rollout"


def test_outer_rollout_uses_only_outer_attention() -> None:
    from vitlab.analysis import attention_rollout
    from vitlab.analysis.partial_capture import capture_tagged

    model = perturb_(make_tiny("tnt_s_patch16_224")).eval()
    x = input_for(model)
    _, seen = capture_tagged(model, x, {b.attn_out: i for i, b in enumerate(model.blocks)})
    joint = attention_rollout([a for _, a in seen])
    e = explain(model, x, method="rollout")
    torch.testing.assert_close(e.patch_maps.flatten(1), joint[:, 0, 1:])


def test_checkpoint_at_another_resolution_and_bad_inputs(io) -> None:
    big = _timm(img_size=48)
    small = _timm()
    from vitlab.layers import resample_pos_embed

    torch.testing.assert_close(big.patch_pos.detach(),
                               resample_pos_embed(small.patch_pos.detach(), (3, 3), num_prefix_tokens=1))
    torch.testing.assert_close(big.pixel_pos, small.pixel_pos)
    with pytest.raises(ValueError, match="built for 32x32"):
        small(torch.randn(1, 3, 48, 48))
    with pytest.raises(CheckpointError, match="TNT"):
        vitlab.create_model("tnt_s_patch16_224", pretrained=FIX / "crossvit_timm_tiny.safetensors")
