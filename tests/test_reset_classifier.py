"""``reset_classifier`` as timm users call it: the new head survives save_model / load_model (the checkpoint is
rebuilt from the model's config), pooling is positional and validated, and a headless model still runs."""

from __future__ import annotations

import pytest
import torch

import vitlab

torch.set_num_threads(1)

# one tiny model per family: name, overrides, input size, the other pooling it can switch to (None: one only)
FAMILIES = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2), 32, "avg"),
    "vit_pre_logits": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                                                    representation_size=16), 32, "avg"),
    "deit": ("deit_tiny_distilled_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=1,
                                                     num_heads=2), 32, None),
    "cait": ("cait_xxs24_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=1, depth_token_only=1,
                                    num_heads=2), 32, "avg"),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=32, window_size=4, embed_dim=16, depths=(1, 1),
                                                  num_heads=(1, 2)), 32, None),
    "swinv2": ("swinv2_tiny_window8_256", dict(img_size=32, window_size=4, embed_dim=16, depths=(1, 1),
                                               num_heads=(1, 2)), 32, None),
    "mobilevit": ("mobilevit_xxs", dict(), 64, None),
    "crossvit": ("crossvit_tiny_240", dict(img_size=48, embed_dim=(16, 32), depth=((1, 1),), num_heads=(2, 2),
                                           branch_scale=(1.0, 2 / 3)), 48, "avg"),
    "tnt": ("tnt_s_patch16_224", dict(img_size=32, embed_dim=32, inner_dim=8, depth=1, num_heads_outer=2,
                                      num_heads_inner=2), 32, "avg"),
    "t2t": ("t2t_vit_7", dict(img_size=32, token_dim=16, embed_dim=32, depth=1, num_heads=2), 32, None),
    "xcit": ("xcit_nano_12_p16_224", dict(img_size=32, embed_dim=32, depth=1, num_heads=4), 32, "avg"),
    "mixer": ("mixer_s16_224", dict(img_size=32, embed_dim=32, depth=1), 32, None),
    "beit": ("beit_base_patch16_224", dict(img_size=32, embed_dim=32, depth=1, num_heads=2), 32, "token"),
    "beit3": ("beit3_base_patch16_224", dict(img_size=32, embed_dim=32, depth=1, num_heads=2), 32, "token"),
    "cct": ("cct_7_3x1_32", dict(img_size=32, embed_dim=32, depth=1, num_heads=2), 32, "avg"),
    "resnet": ("resnet18", dict(), 32, None),
}


def _randomise_head(model):
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "head" in name:
            p.data.normal_(0, 0.5)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_reset_head_survives_save_and_load(family, tmp_path):
    name, overrides, size, other_pool = FAMILIES[family]
    torch.manual_seed(0)
    model = vitlab.create_model(name, **overrides).eval()
    model.reset_classifier(5, other_pool) if other_pool else model.reset_classifier(5)
    _randomise_head(model)  # as if fine-tuned: a zero head would hide a head dropped on reload
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = model(x)
    assert expected.shape == (2, 5)
    path = vitlab.save_model(model, tmp_path / "m.safetensors", class_names=list("abcde"))
    again = vitlab.load_model(path).eval()
    assert again.num_classes == 5 and again.class_names == list("abcde")
    if other_pool:
        assert again.global_pool == other_pool
    with torch.no_grad():
        torch.testing.assert_close(again(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["vit", "crossvit", "swin", "cct", "beit"])
def test_a_headless_model_saves_and_runs(family, tmp_path):
    name, overrides, size, _ = FAMILIES[family]
    model = vitlab.create_model(name, **overrides).eval()
    model.reset_classifier(0)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        features = model(x)
        torch.testing.assert_close(features, model.forward_head(model.forward_features(x), pre_logits=True))
    again = vitlab.load_model(vitlab.save_model(model, tmp_path / "m.safetensors")).eval()
    assert again.num_classes == 0
    with torch.no_grad():
        torch.testing.assert_close(again(x), features, rtol=0, atol=0)


def test_crossvit_built_without_a_head_returns_both_branches_features():
    name, overrides, size, _ = FAMILIES["crossvit"]
    model = vitlab.create_model(name, **overrides, num_classes=0).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 16 + 32)  # the two class tokens, concatenated (timm's pre-logits)


def test_global_pool_is_positional_and_checked():
    name, overrides, _, _ = FAMILIES["vit"]
    model = vitlab.create_model(name, **overrides)
    model.reset_classifier(3, "avg")
    assert model.global_pool == "avg" and model.cfg.global_pool == "avg"
    # ViT computes timm's "max" / "avgmax" too, and "" (unpooled tokens) without a classifier
    with pytest.raises(ValueError, match=r"global_pool must be one of 'token', 'avg', 'max', 'avgmax', 'map', '', got 'maxx'"):
        model.reset_classifier(3, "maxx")
    with pytest.raises(ValueError, match=r"global_pool='' \(unpooled tokens\) needs num_classes=0"):
        model.reset_classifier(3, "")
    cait = vitlab.create_model(*FAMILIES["cait"][:1], **FAMILIES["cait"][1])
    with pytest.raises(ValueError, match=r"CaiT.reset_classifier: global_pool must be one of 'token', 'avg', got 'max'"):
        cait.reset_classifier(3, "max")
    with pytest.raises(ValueError, match="for unpooled tokens call forward_features"):
        cait.reset_classifier(3, "")
    swin = vitlab.create_model(*FAMILIES["swin"][:1], **FAMILIES["swin"][1])
    swin.reset_classifier(3, "avg")
    with pytest.raises(ValueError, match="SwinTransformer.reset_classifier: global_pool must be one of 'avg'"):
        swin.reset_classifier(3, "max")


def test_class_names_must_match_the_head(tmp_path):
    name, overrides, _, _ = FAMILIES["vit"]
    model = vitlab.create_model(name, **overrides, num_classes=10)
    model.reset_classifier(5)
    with pytest.raises(ValueError, match=r"save_model: 10 class names for a model with 5 classes"):
        vitlab.save_model(model, tmp_path / "m.safetensors", class_names=[str(i) for i in range(10)])
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("family", ["vit", "swin", "mobilevit", "resnet"])
def test_other_channel_counts_build_save_and_load(family, tmp_path):
    """timm accepts in_chans=4 (RGB + near-infrared, say); the preprocessing gets a value per channel."""
    name, overrides, size, _ = FAMILIES[family]
    model = vitlab.create_model(name, **overrides, in_chans=4).eval()
    pre = model.preprocessing
    assert pre.input_size[0] == 4 and len(pre.mean) == len(pre.std) == 4
    assert pre.mean[3] == pytest.approx(sum(pre.mean[:3]) / 3)
    x = torch.randn(1, 4, size, size)
    again = vitlab.load_model(vitlab.save_model(model, tmp_path / "m.safetensors")).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
    assert vitlab.create_model(name, **overrides, in_chans=2).preprocessing.mean == (pytest.approx(
        sum(pre.mean[:3]) / 3),) * 2
