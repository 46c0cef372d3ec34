"""XCiT: parity with timm (also at another, non-square size), the official checkpoint layout, published
sizes, channel attention in capture mode, the class-attention explanation and clear errors.

Fixtures come from tests/fixtures/make_fixtures_xcit.py (timm 1.0.31 in the peer env).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tiny_xcit
import vitlab
from vitlab.analysis import capture, explain, fuse_heads
from vitlab.analysis.explain import methods_for
from vitlab.checkpoints import CheckpointError, read_source
from vitlab.layers import capture_attention
from vitlab.layers.xca import XCA

FIX = Path(__file__).parent / "fixtures"
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return load_file(FIX / "xcit_io.safetensors")


def timm_p16() -> torch.nn.Module:
    return vitlab.create_model("xcit_tiny_12_p16_224", pretrained=FIX / "xcit_timm_tiny_p16.safetensors").eval()


def test_timm_checkpoint_matches_timm_at_any_size(io) -> None:
    model = timm_p16()
    assert (model.cfg.embed_dim, model.cfg.depth, model.cfg.num_heads, model.cfg.mlp_ratio) == (32, 2, 4, 2.0)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(io["x32"]), io["p16_features_32"], **TOL)
        torch.testing.assert_close(model(io["x32"]), io["p16_logits_32"], **TOL)
        # the Fourier encoding is recomputed for the grid: a 48x64 input runs with no resampling
        torch.testing.assert_close(model(io["x48"]), io["p16_logits_48"], **TOL)


def test_official_layout_is_detected_and_matches_timm(io) -> None:
    src = read_source(FIX / "xcit_official_tiny_p8.pth", "xcit")
    assert src.format == "official"
    assert "pos_embed.token_projection.weight" in src.converted.state_dict
    assert "cls_attn_blocks.0.attn.q.weight" in src.converted.state_dict
    # the nano models normalise only the class token in class attention (tokens_norm=False)
    model = vitlab.create_model("xcit_nano_12_p8_224", pretrained=FIX / "xcit_official_tiny_p8.pth", eta=1e-5).eval()
    assert model.cfg.patch_size == 8 and not model.cfg.tokens_norm
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(io["x32"]), io["p8_features_32"], **TOL)
        torch.testing.assert_close(model(io["x32"]), io["p8_logits_32"], **TOL)


def test_registry_and_published_sizes_match_timm() -> None:
    names = vitlab.list_models("xcit_*")
    assert len(names) == 28
    # timm 1.0.31 on the meta device (params, GMACs at the name's resolution); all 28 agree, see RESULTS.md
    for name, params, gmacs in (("xcit_nano_12_p16_224", 3_053_224, 0.55), ("xcit_tiny_12_p16_224", 6_716_272, 1.23),
                                ("xcit_tiny_24_p16_224", 12_116_896, 2.32), ("xcit_small_12_p8_384", 26_213_032, 54.71),
                                ("xcit_medium_24_p16_224", 84_395_752, 16.08),
                                ("xcit_large_24_p8_384", 188_932_648, 414.21)):
        # checked against vitlab.model_info by test_models.test_model_info_at_default_size, which computes it
        assert tiny_xcit.PUBLISHED[name] == (params, gmacs), name
    assert sorted(tiny_xcit.PUBLISHED) == names
    assert vitlab.get_entry("xcit_small_24_p16_224").config.eta == 1e-5
    assert vitlab.get_entry("xcit_small_12_p16_224").config.eta == 1.0


def test_xca_is_linear_in_tokens_and_captures_channel_maps() -> None:
    torch.manual_seed(0)
    attn = XCA(32, num_heads=4).eval()
    with torch.no_grad():
        attn.temperature.uniform_(0.5, 2.0)
    x = torch.randn(2, 50, 32)
    with torch.no_grad(), capture_attention(attn) as maps:
        slow = attn(x)
    fast = attn(x)
    torch.testing.assert_close(slow, fast, atol=1e-6, rtol=1e-5)
    assert maps[0].shape == (2, 4, 8, 8) and maps.token_maps == [False]  # head_dim x head_dim, not tokens
    # by hand: channels of q and k normalised over tokens, softmax(q k^T * temperature) over channels
    q, k, v = attn.qkv(x).reshape(2, 50, 3, 4, 8).permute(2, 0, 3, 4, 1)
    a = (torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(k, dim=-1).transpose(-2, -1))
    a = (a * attn.temperature).softmax(-1)
    torch.testing.assert_close(maps[0], a.detach(), atol=1e-6, rtol=1e-5)


def test_explain_last_layer_is_the_last_class_attention_map(io) -> None:
    model = timm_p16()
    assert methods_for(model) == ("last-layer", "grad-cam", "grad-input")
    x = io["x48"]
    out = capture(model, x)
    assert out.token_maps == (False, False, True, True)  # 2 XCA layers, then 2 class-attention layers
    assert out.attentions[-1].shape == (1, 4, 1, 1 + 12)
    e = explain(model, x, method="last-layer")
    torch.testing.assert_close(e.patch_maps, fuse_heads(out.attentions[-1], "mean")[:, 0, 1:].reshape(1, 3, 4))
    assert e.maps.shape == (1, 48, 64)
    assert explain(model, x).method == "grad-cam"  # rollout is undefined through channel attention
    with pytest.raises(ValueError, match="not defined for XCiT"):
        explain(model, x, method="rollout")


def test_bad_input_and_other_families_are_refused() -> None:
    model = timm_p16()
    with pytest.raises(ValueError, match="not divisible by the patch size 16x16"):
        model(torch.randn(1, 3, 40, 40))
    with pytest.raises(CheckpointError, match="not an XCiT checkpoint"):
        vitlab.create_model("xcit_tiny_12_p16_224", pretrained=FIX / "mixer_timm_tiny.safetensors")
    with pytest.raises(CheckpointError, match="another architecture"):
        vitlab.create_model("vit_tiny_patch16_224", pretrained=FIX / "xcit_timm_tiny_p16.safetensors")


def test_intermediates_and_no_weight_decay(io) -> None:
    model = timm_p16()
    with torch.no_grad():
        final, inter = model.forward_intermediates(io["x48"], output_fmt="NCHW", return_prefix_tokens=True)
    torch.testing.assert_close(final[:, 0], model.forward_features(io["x48"])[:, 0])
    assert len(inter) == 2 and inter[0][0].shape == (1, 32, 3, 4) and inter[0][1].shape == (1, 1, 32)
    assert {"cls_token", "blocks.0.attn.temperature"} <= model.no_weight_decay()


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_one_image_input_gradient_is_right(mode):
    """PyTorch 2.13's CPU BatchNorm backward is wrong at batch 1 for the channels-last gradient that the stem's
    transpose to tokens hands it; explain's one-image gradient maps went through it."""
    torch.manual_seed(0)
    model = vitlab.create_model("xcit_nano_12_p16_224", img_size=32, embed_dim=32, depth=1, num_heads=4,
                                num_classes=3).double()
    for m in model.modules():  # non-trivial statistics and affine parameters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
            m.weight.data.normal_()
            m.bias.data.normal_()
    model.head.weight.data.normal_()
    model.train(mode == "train")
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(model(x)[0, 1], x)
    if mode == "eval":  # a row of a batch of two is right (checked against float64 references)
        x2 = torch.cat([x.detach(), torch.randn_like(x)]).requires_grad_(True)
        (grad2,) = torch.autograd.grad(model(x2)[0, 1], x2)
        torch.testing.assert_close(grad, grad2[:1], rtol=1e-9, atol=1e-12)
    else:  # a batch of one is its own statistics: against finite differences along the gradient
        eps, d = 1e-6, grad / grad.norm()
        with torch.no_grad():
            slope = (model(x + eps * d)[0, 1] - model(x - eps * d)[0, 1]) / (2 * eps)
        assert slope.item() == pytest.approx(grad.norm().item(), rel=1e-5)
