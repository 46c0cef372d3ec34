"""Registry-wide invariants: every registered name, built tiny, honours the common model surface."""

from __future__ import annotations

import pytest
import torch

import vitlab
from vitlab.layers import CapturableAttention, capture_attention

from model_helpers import has_attention, input_for, make_tiny, perturb_, published_size, tiny_overrides

ALL = vitlab.list_models()
ATTENTION = [n for n in ALL if has_attention(n)]


def test_registry_has_the_paper_variants() -> None:
    for name in ("vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224", "vit_base_patch32_384",
                 "vit_large_patch16_224", "vit_huge_patch14_224", "vit_base_patch8_224", "vit_base_r50_s16_384"):
        assert name in ALL
    assert vitlab.list_models("vit_huge_*") == ["vit_huge_patch14_224", "vit_huge_patch14_clip_224",
                                                "vit_huge_patch14_clip_336", "vit_huge_patch14_clip_378",
                                                "vit_huge_patch14_clip_quickgelu_224",
                                                "vit_huge_patch14_clip_quickgelu_378", "vit_huge_patch14_gap_224",
                                                "vit_huge_patch16_224", "vit_huge_patch16_384",
                                                "vit_huge_patch16_gap_448", "vit_huge_patch32_224",
                                                "vit_huge_patch32_384", "vit_huge_patch8_224", "vit_huge_patch8_384"]


@pytest.mark.parametrize("name", ALL)
def test_forward_shape_finite_and_backward_reaches_every_parameter(name: str) -> None:
    model = perturb_(make_tiny(name, num_classes=5))
    model.train()
    x = input_for(model)
    y = model(x)
    if isinstance(y, tuple):  # distilled students may return (cls, dist) in training
        y = sum(y) / len(y)
    assert y.shape == (2, 5)
    assert torch.isfinite(y).all()
    y.square().sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not no_grad, f"{name}: parameters without gradient: {no_grad}"


@pytest.mark.parametrize("name", ATTENTION)
def test_capture_mode_equals_fast_mode(name: str) -> None:
    model = perturb_(make_tiny(name)).eval()
    x = input_for(model)
    with torch.no_grad():
        fast = model.forward_features(x)
        with capture_attention(model) as maps:
            slow = model.forward_features(x)
        again = model.forward_features(x)
    torch.testing.assert_close(slow, fast, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, fast, atol=0, rtol=0)  # capture leaves the fast path untouched
    n_attn = sum(isinstance(m, CapturableAttention) for m in model.modules())
    assert len(maps) == n_attn > 0
    for a in maps:
        assert a.ndim == 4 and a.shape[0] % 2 == 0  # (B * groups, ...) for attention inside windows/patches
        torch.testing.assert_close(a.sum(-1), torch.ones_like(a.sum(-1)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ALL)
def test_forward_intermediates_agree_with_forward_features(name: str) -> None:
    model = perturb_(make_tiny(name)).eval()
    x = input_for(model)
    with torch.no_grad():
        feats = model.forward_features(x)
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, feats, atol=1e-6, rtol=1e-6)
        assert len(inter) >= 1
        if name in ATTENTION and hasattr(model, "blocks"):
            _, last = model.forward_intermediates(x, indices=1, output_fmt="NCHW", return_prefix_tokens=True)
            tokens, prefix = last[0]
            assert tokens.ndim == 4 and tokens.shape[1] == model.num_features
            assert prefix.shape[1] == model.num_prefix_tokens


@pytest.mark.parametrize("name", ALL)
def test_reset_classifier_installs_zero_head(name: str) -> None:
    model = perturb_(make_tiny(name, num_classes=5)).eval()
    model.reset_classifier(7)
    assert model.num_classes == 7
    with torch.no_grad():
        y = model(input_for(model))
    assert y.shape == (2, 7)
    assert torch.count_nonzero(y) == 0  # zero-initialised D x K layer, as in the paper's fine-tuning


@pytest.mark.parametrize("name", ALL)
def test_no_weight_decay_names_exist(name: str) -> None:
    model = make_tiny(name)
    params = dict(model.named_parameters())
    for n in model.no_weight_decay():
        assert n in params, f"{name}: no_weight_decay() names {n!r}, which is not a parameter"


@pytest.mark.parametrize("name", ALL)
def test_model_info_at_default_size(name: str) -> None:
    info = vitlab.model_info(name)
    assert info["params"] > 0 and info["gmacs"] > 0
    assert info["preprocessing"]["input_size"][0] == 3
    published = published_size(name)  # the reference implementation's figures, where the family lists them
    if published is not None:
        params, gmacs = published
        assert info["params"] == params, (name, info["params"], params)
        assert gmacs is None or round(info["gmacs"], 2) == gmacs, (name, info["gmacs"], gmacs)


def test_model_info_matches_published_figures() -> None:
    # timm lists ViT-B/16 at 86.6 M params / 17.6 GMACs and ViT-L/16 at 304.3 M / 61.6 GMACs
    b = vitlab.model_info("vit_base_patch16_224")
    assert b["params"] == 86_567_656 and abs(b["gmacs"] - 17.6) < 0.1
    large = vitlab.model_info("vit_large_patch16_224")
    assert abs(large["params_m"] - 304.3) < 0.1 and abs(large["gmacs"] - 61.6) < 0.1


def test_tiny_overrides_keep_variant_identity() -> None:
    assert tiny_overrides("vit_base_patch14_224")["img_size"] == 28
    m = make_tiny("vit_base_patch32_384")
    assert m.patch_embed.patch_size == (32, 32)


@pytest.mark.parametrize(("name", "over", "option"), [
    ("vit_tiny_patch16_224", {}, "or pass dynamic_img_size=True"),
    ("vit_tiny_patch16_224", {"attn_type": "linformer", "linformer_k": 4}, None),
    ("beit_base_patch16_224", {}, None),  # relative position tables are tied to the grid
    ("beit3_base_patch16_224", {}, "or pass dynamic_img_size=True"),
    ("setr_naive_vit_small_patch16", {"backbone_args": {"depth": 1}}, "or pass backbone_args={'dynamic_img_size': True}"),
])
def test_a_size_error_suggests_only_an_option_the_model_has(name, over, option):
    tiny = {} if name.startswith("setr") else {"depth": 1, "embed_dim": 32, "num_heads": 2}
    model = vitlab.create_model(name, img_size=32, **tiny, **over).eval()
    with pytest.raises(ValueError, match="built for 32x32") as e:
        model(torch.randn(1, 3, 48, 48))
    said = str(e.value)
    if option is None:
        assert "dynamic_img_size" not in said and said.endswith("or create the model with img_size=(48, 48)")
        return
    assert said.endswith(option)
    option_kw = {"backbone_args": {"depth": 1, "dynamic_img_size": True}} if name.startswith("setr") else \
        {"dynamic_img_size": True}
    following = vitlab.create_model(name, img_size=32, **tiny, **{**over, **option_kw}).eval()
    with torch.no_grad():
        following(torch.randn(1, 3, 48, 48))  # the advice works


@pytest.mark.parametrize("name", ["mixer_s32_224", "resnet18"])
def test_capture_attention_on_a_model_without_attention_says_so(name):
    model = make_tiny(name)
    with pytest.raises(ValueError, match="has no attention layers"):
        with capture_attention(model):
            pass
