"""Building blocks and ViT options: patch embedding, position tables, attention, heads, resolutions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vitlab
from vitlab.layers import (
    Attention,
    DropPath,
    PatchEmbed,
    attend_explicit,
    capture_attention,
    resample_pos_embed,
    sincos_2d_pos_embed,
    trunc_normal_linears,
)

from model_helpers import perturb_

TINY = dict(embed_dim=64, depth=2, num_heads=4)


def test_patch_embed_non_square_and_errors() -> None:
    pe = PatchEmbed(img_size=(32, 48), patch_size=16, in_chans=3, embed_dim=8)
    assert pe.grid_size == (2, 3)
    assert pe(torch.randn(1, 3, 32, 48)).shape == (1, 6, 8)
    with pytest.raises(ValueError, match=r"input image is 32x32 but this model was built for 32x48"):
        pe(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"expected images of shape \(batch, 3, H, W\), got \(1, 1, 32, 48\)"):
        pe(torch.randn(1, 1, 32, 48))
    with pytest.raises(ValueError, match=r"img_size 40x48 is not a multiple of the patch size 16x16; build the model at a multiple of it \(e.g. img_size 32x48\)"):
        PatchEmbed(img_size=(40, 48), patch_size=16)
    dyn = PatchEmbed(img_size=32, patch_size=16, strict_img_size=False)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        dyn(torch.randn(1, 3, 40, 32))


def test_patch_embed_drop_remainder_floors_the_grid_as_timm() -> None:
    """drop_remainder (ViT's): an img_size that is not a multiple of the patch gives timm's floor grid, and an input
    of exactly that size is taken with its last rows / columns unused; other sizes follow the usual rules."""
    pe = PatchEmbed(img_size=(36, 44), patch_size=8, embed_dim=8, drop_remainder=True)
    assert pe.grid_size == (4, 5) and pe.has_remainder
    x = torch.randn(1, 3, 36, 44)
    assert torch.equal(pe(x), pe.proj(x[..., :32, :40]).flatten(2).transpose(1, 2))  # (1, 20, 8): remainder unused
    with pytest.raises(ValueError, match="input image is 32x40 but this model was built for 36x44"):
        pe(x[..., :32, :40])
    dyn = PatchEmbed(img_size=36, patch_size=8, embed_dim=8, strict_img_size=False, drop_remainder=True)
    assert dyn(torch.randn(1, 3, 36, 36)).shape == (1, 16, 8) and dyn(torch.randn(1, 3, 48, 40)).shape == (1, 30, 8)
    with pytest.raises(ValueError, match="input image 44x36 is not divisible by the patch size 8x8"):
        dyn(torch.randn(1, 3, 44, 36))
    dyn.set_input_size(40)
    assert dyn.grid_size == (5, 5) and not dyn.has_remainder
    # ViT builds it when asked (a size typed by mistake stays an error: no pixels dropped silently)
    with pytest.raises(ValueError, match=r"img_size 36x36 is not a multiple of the patch size 8: build the model at a "
                                         r"multiple \(e.g. 32x32\), or pass drop_remainder=True"):
        vitlab.create_model("vit_tiny_patch16_224", img_size=36, patch_size=8, **TINY)
    model = vitlab.create_model("vit_tiny_patch16_224", img_size=36, patch_size=8, drop_remainder=True, **TINY)
    assert model.patch_embed.grid_size == (4, 4) and model.pos_embed.shape == (1, 17, 64)
    assert model(torch.randn(1, 3, 36, 36)).shape == (1, 1000)


def test_model_rejects_wrong_size_and_channels_clearly() -> None:
    model = vitlab.create_model("vit_tiny_patch16_224", img_size=32, **TINY)
    with pytest.raises(ValueError, match="built for 32x32"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"\(batch, 3, H, W\)"):
        model(torch.randn(1, 1, 32, 32))


def test_resample_same_grid_is_identity_and_round_trip_is_close() -> None:
    pos = torch.randn(1, 1 + 14 * 14, 32)
    assert torch.equal(resample_pos_embed(pos, (14, 14), num_prefix_tokens=1), pos)
    # a smooth table (as learned ones are) survives up- then down-sampling nearly unchanged
    coarse = torch.randn(1, 32, 4, 4)
    grid = torch.nn.functional.interpolate(coarse, size=(14, 14), mode="bilinear", align_corners=True)
    smooth = torch.cat([torch.randn(1, 1, 32), grid.flatten(2).transpose(1, 2)], dim=1)  # (1, 1 + 196, 32)
    up = resample_pos_embed(smooth, (28, 28), num_prefix_tokens=1)
    assert up.shape == (1, 1 + 28 * 28, 32)
    back = resample_pos_embed(up, (14, 14), num_prefix_tokens=1)
    assert torch.equal(back[:, :1], smooth[:, :1])  # prefix tokens are kept as they are
    assert (back - smooth).abs().max() < 0.05 * smooth.abs().max()


def test_resample_non_square_and_dtype() -> None:
    pos = torch.randn(1, 2 + 4 * 6, 16, dtype=torch.bfloat16)
    out = resample_pos_embed(pos, (8, 3), old_size=(4, 6), num_prefix_tokens=2)
    assert out.shape == (1, 2 + 24, 16) and out.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="does not match"):
        resample_pos_embed(pos, (8, 3), old_size=(5, 5), num_prefix_tokens=2)


def test_sincos_table_properties() -> None:
    pe = sincos_2d_pos_embed(64, (3, 5))
    assert pe.shape == (1, 15, 64)
    assert torch.allclose(pe.square().sum(-1), torch.full((1, 15), 32.0))  # sin^2 + cos^2 per frequency pair
    assert len({tuple(r.tolist()) for r in pe[0]}) == 15  # every position distinct


def test_attention_capture_equals_sdpa_with_mask() -> None:
    q, k, v = (torch.randn(2, 4, 10, 8) for _ in range(3))
    mask = torch.rand(10, 10) > 0.3
    mask.fill_diagonal_(True)
    seen = []
    out = attend_explicit(q, k, v, scale=8**-0.5, attn_mask=mask, sink=seen.append)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert seen[0].shape == (2, 4, 10, 10)
    assert (seen[0][..., ~mask] == 0).all()


def test_attention_layer_capture_and_errors() -> None:
    attn = perturb_(Attention(32, num_heads=4)).eval()
    x = torch.randn(3, 7, 32)
    with capture_attention(attn) as maps:
        slow = attn(x)
    torch.testing.assert_close(slow, attn(x), atol=1e-5, rtol=1e-5)
    assert maps[0].shape == (3, 4, 7, 7)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        Attention(30, num_heads=4)


def test_drop_path_is_identity_in_eval_and_unbiased_in_training() -> None:
    dp = DropPath(0.3)
    x = torch.ones(20000, 4)
    assert torch.equal(dp.eval()(x), x)
    y = dp.train()(x)
    kept = (y[:, 0] != 0).float().mean()
    assert abs(kept - 0.7) < 0.02
    assert abs(y.mean() - 1.0) < 0.03  # rescaled by 1/keep
    assert ((y == 0) | ((y - 1 / 0.7).abs() < 1e-6)).all()
    assert (y == y[:, :1]).all()  # one draw per sample, shared by all its features


@pytest.mark.parametrize("pos", ["learn", "sincos", "none"])
@pytest.mark.parametrize("pool", ["token", "avg"])
def test_position_and_pooling_options(pos: str, pool: str) -> None:
    model = perturb_(vitlab.create_model("vit_tiny_patch16_224", img_size=32, num_classes=3, pos_embed=pos,
                                         global_pool=pool, **TINY)).eval()
    params = dict(model.named_parameters())
    assert ("pos_embed" in params) == (pos == "learn")
    x = torch.randn(2, 3, 32, 32)
    y = model(x)
    assert y.shape == (2, 3)
    feats = model.forward_features(x)
    pooled = model.forward_head(feats, pre_logits=True)
    expected = feats[:, 0] if pool == "token" else model.fc_norm(feats[:, 1:].mean(1))
    torch.testing.assert_close(pooled, expected)


def test_without_position_embeddings_the_model_is_permutation_invariant() -> None:
    # Appendix D.4's "no positional embedding": patches become a bag; GAP output ignores their order.
    model = perturb_(vitlab.create_model("vit_tiny_patch16_224", img_size=32, num_classes=3, pos_embed="none",
                                         class_token=False, global_pool="avg", **TINY)).eval()
    x = torch.randn(1, 3, 32, 32)
    swapped = x.clone()
    swapped[..., :16, :16], swapped[..., 16:, 16:] = x[..., 16:, 16:], x[..., :16, :16]
    torch.testing.assert_close(model(x), model(swapped), atol=1e-5, rtol=1e-5)


def test_pre_logits_head_and_reset_classifier() -> None:
    model = perturb_(vitlab.create_model("vit_tiny_patch16_224", img_size=32, num_classes=3,
                                         representation_size=48, **TINY)).eval()
    feats = model.forward_features(torch.randn(2, 3, 32, 32))
    pre = model.forward_head(feats, pre_logits=True)
    assert pre.shape == (2, 48) and pre.abs().max() <= 1  # tanh
    torch.testing.assert_close(pre, torch.tanh(model.pre_logits.fc(feats[:, 0])))
    model.reset_classifier(10)  # the paper removes the pre-logits layer and zero-inits a D x K head
    assert model.head.weight.shape == (10, 64) and not model.head.weight.any()
    assert model.forward_head(feats, pre_logits=True).shape == (2, 64)


def test_img_size_at_creation_and_dynamic_size_agree() -> None:
    torch.manual_seed(0)
    base = perturb_(vitlab.create_model("vit_tiny_patch16_224", img_size=32, num_classes=3, **TINY)).eval()
    dyn = vitlab.create_model("vit_tiny_patch16_224", img_size=32, num_classes=3, dynamic_img_size=True, **TINY)
    dyn.load_state_dict(base.state_dict())
    dyn.eval()
    big = vitlab.create_model("vit_tiny_patch16_224", img_size=(48, 64), num_classes=3, **TINY).eval()
    sd = dict(base.state_dict())
    sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], (3, 4), num_prefix_tokens=1)
    big.load_state_dict(sd)
    x = torch.randn(2, 3, 48, 64)
    torch.testing.assert_close(dyn(x), big(x), atol=1e-5, rtol=1e-5)
    x32 = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(dyn(x32), base(x32))
    with pytest.raises(ValueError, match="built for 32x32"):
        base(x)


def test_layer_scale_option() -> None:
    model = vitlab.create_model("vit_tiny_patch16_224", img_size=32, init_values=1e-5, **TINY)
    gammas = [p for n, p in model.named_parameters() if n.endswith("gamma")]
    assert len(gammas) == 4 and all(torch.allclose(g, torch.full_like(g, 1e-5)) for g in gammas)


def test_create_model_errors() -> None:
    with pytest.raises(ValueError, match="unknown model 'vit_base_patch16_22'; did you mean"):
        vitlab.create_model("vit_base_patch16_22")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['widht'\]"):
        vitlab.create_model("vit_tiny_patch16_224", widht=3)
    with pytest.raises(ValueError, match="global_pool='token' needs class_token=True"):
        vitlab.create_model("vit_tiny_patch16_224", class_token=False)
    # text where the variant has a tuple, number or flag (a --set value that is not JSON), named with the option
    with pytest.raises(TypeError, match=r"option depths expects a list like \[2, 2, 6, 2\], got the text '\(2,2\)'"):
        vitlab.create_model("swin_tiny_patch4_window7_224", depths="(2,2)")
    with pytest.raises(TypeError, match=r"option depth expects a number like 12, got the text 'two'"):
        vitlab.create_model("vit_tiny_patch16_224", depth="two")
    with pytest.raises(TypeError, match="option class_token expects true or false"):
        vitlab.create_model("vit_tiny_patch16_224", class_token="yes")


def test_preprocessing_fits_the_channel_count() -> None:
    gray = vitlab.create_model("vit_tiny_patch16_224", in_chans=1, img_size=32, **TINY)
    assert gray.preprocessing.input_size == (1, 32, 32)
    assert gray.preprocessing.mean == (0.5,) and gray.preprocessing.std == (0.5,)
    deit = vitlab.create_model("deit_tiny_patch16_224", in_chans=1, img_size=32, **TINY)
    assert deit.preprocessing.mean == pytest.approx(((0.485 + 0.456 + 0.406) / 3,))


def test_resnet_small_stem_keeps_resolution_for_cifar_sized_images() -> None:
    net = vitlab.create_model("resnet18", num_classes=10, stem="small", stem_chs=16, channels=(16, 32, 64, 128))
    feats = net.forward_features(torch.randn(2, 3, 32, 32))
    assert feats.shape == (2, 128, 4, 4)  # stride 8 in all (stride 1 stem) instead of 32
    assert net.cfg.reduction == 8
    assert vitlab.create_model("resnet18").forward_features(torch.randn(1, 3, 64, 64)).shape[-1] == 2


@pytest.mark.parametrize("name,size,dynamic", [("tnt_s_patch16_224", 32, False), ("t2t_vit_7", 32, False),
                                               ("crossvit_tiny_240", 48, False), ("vit_tiny_patch16_224", 32, True)])
def test_a_wrong_input_size_suggests_only_options_the_family_has(name, size, dynamic) -> None:
    import vitlab

    from model_helpers import tiny_overrides

    model = vitlab.create_model(name, **{**tiny_overrides(name), "img_size": size}).eval()
    with pytest.raises(ValueError, match=f"built for {size}x{size}") as e:
        model(torch.randn(1, 3, size + 16, size + 16))
    assert ("dynamic_img_size" in str(e.value)) == dynamic


def test_attention_dropout_on_cpu_takes_the_explicit_product(monkeypatch) -> None:
    """Training with attention dropout on the CPU skips SDPA (its unfused fallback is slower than the explicit
    product there); without dropout, or in eval mode, SDPA runs. The outputs do not depend on the path."""
    import torch.nn.functional as F

    from vitlab.layers import Attention

    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    x = torch.randn(2, 5, 16)
    drop = Attention(16, num_heads=2, attn_drop=0.1).train()
    drop(x)
    assert calls == []
    drop.eval()(x)
    Attention(16, num_heads=2).train()(x)
    assert len(calls) == 2
    torch.manual_seed(0)
    a = drop.train()(x)
    drop.fused = False
    torch.manual_seed(0)
    torch.testing.assert_close(drop(x), a)


def test_trunc_normal_linears_initialises_every_linear_but_the_skipped_one() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Sequential(nn.Linear(512, 256, bias=False)), nn.Linear(256, 8))
    for p in net.parameters():
        nn.init.constant_(p, 1.0)
    head = net[3]
    trunc_normal_linears(net, skip=head)
    first, inner = net[0], net[2][0]
    assert torch.equal(first.bias, torch.zeros(512))
    for w in (first.weight, inner.weight):
        assert abs(w.std().item() - 0.02) < 0.001 and abs(w.mean().item()) < 0.001
    assert torch.equal(head.weight, torch.ones(8, 256)) and torch.equal(head.bias, torch.ones(8))  # skipped
