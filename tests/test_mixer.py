"""MLP-Mixer: parity with timm and with a numpy forward over the original JAX layout, fixed input size,
Grad-CAM as its explanation, and clear errors for checkpoints that do not fit.

Fixtures come from tests/fixtures/make_fixtures_mixer.py (timm 1.0.31 and numpy, in the peer env).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tiny_mixer
import vitlab
from vitlab.analysis import explain
from vitlab.analysis.explain import methods_for
from vitlab.checkpoints import CheckpointError

FIX = Path(__file__).parent / "fixtures"
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return load_file(FIX / "mixer_io.safetensors")


def test_timm_checkpoint_matches_timm(io) -> None:
    model = vitlab.create_model("mixer_s16_224", pretrained=FIX / "mixer_timm_tiny.safetensors").eval()
    assert model.cfg.gelu == "exact" and model.cfg.img_size == 32 and model.cfg.patch_size == 8
    assert model.blocks[0].mlp_tokens.fc1.out_features == 16  # D_S = D / 2
    assert model.blocks[0].mlp_channels.fc1.out_features == 128  # D_C = 4 D
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(io["x"]), io["timm_features"], **TOL)
        torch.testing.assert_close(model(io["x"]), io["timm_logits"], **TOL)


def test_jax_npz_matches_an_independent_numpy_forward(io) -> None:
    model = vitlab.create_model("mixer_b16_224", pretrained=FIX / "mixer_jax_tiny.npz").eval()
    assert model.cfg.gelu == "tanh"  # flax.linen.gelu is the tanh approximation
    with torch.no_grad():
        torch.testing.assert_close(model(io["x"]), io["jax_numpy_logits"], **TOL)
    # the exact GELU moves the outputs beyond the tolerance: the converter's choice matters
    exact = vitlab.create_model("mixer_b16_224", pretrained=FIX / "mixer_jax_tiny.npz", gelu="exact").eval()
    with torch.no_grad():
        assert (exact(io["x"]) - io["jax_numpy_logits"]).abs().max() > 1e-4


def test_published_sizes_match_timm() -> None:
    # timm 1.0.31 on the meta device (params, GMACs at 224)
    expected = {"mixer_s32_224": (19_104_624, 1.0), "mixer_s16_224": (18_528_264, 3.78),
                "mixer_b32_224": (60_293_428, 3.24), "mixer_b16_224": (59_880_472, 12.6),
                "mixer_l32_224": (206_939_264, 11.25), "mixer_l16_224": (208_196_168, 44.55)}
    assert vitlab.list_models("mixer_*") == sorted(expected)
    # checked against vitlab.model_info by test_models.test_model_info_at_default_size, which computes it
    assert tiny_mixer.PUBLISHED == expected


def test_fixed_input_size_is_a_clear_error() -> None:
    model = vitlab.create_model("mixer_s16_224", img_size=32, embed_dim=32, depth=1).eval()
    with pytest.raises(ValueError, match=r"built for 32x32.*fixed to 4 patches"):
        model(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match=r"\(batch, 3, H, W\)"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(CheckpointError, match=r"token-mixing MLPs are for 16 patches.*img_size \(32\)"):
        vitlab.create_model("mixer_s16_224", pretrained=FIX / "mixer_timm_tiny.safetensors", img_size=48)


def test_checkpoint_of_another_family_is_refused() -> None:
    with pytest.raises(CheckpointError, match="not an MLP-Mixer checkpoint"):
        vitlab.create_model("mixer_b16_224", pretrained=FIX / "timm_token_p16" / "model.safetensors")
    with pytest.raises(CheckpointError, match="not an MLP-Mixer checkpoint"):
        vitlab.create_model("mixer_b16_224", pretrained=FIX / "jax_token_p16" / "model.npz")


def test_explain_falls_back_to_grad_cam_on_the_last_mixer_layer(io) -> None:
    model = vitlab.create_model("mixer_s16_224", pretrained=FIX / "mixer_timm_tiny.safetensors").eval()
    assert methods_for(model) == ("grad-cam", "grad-input")
    e = explain(model, io["x"])
    assert e.method == "grad-cam" and e.maps.shape == (2, 32, 32) and e.patch_maps.shape == (2, 4, 4)
    assert torch.isfinite(e.maps).all() and e.maps.abs().sum() > 0
    with pytest.raises(ValueError, match="not defined for MlpMixer"):
        explain(model, io["x"], method="rollout")


def test_intermediates_on_the_grid(io) -> None:
    model = vitlab.create_model("mixer_s16_224", pretrained=FIX / "mixer_timm_tiny.safetensors").eval()
    with torch.no_grad():
        final, inter = model.forward_intermediates(io["x"], indices=1, output_fmt="NCHW")
    torch.testing.assert_close(final, io["timm_features"], **TOL)
    assert inter[0].shape == (2, 32, 4, 4)
