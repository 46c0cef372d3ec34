"""DeiT and CaiT: parity with timm and Hugging Face fixtures, and the parts that make each family distinct.

Fixtures come from tests/fixtures/make_fixtures_deit_cait.py (timm 1.0 / transformers 5 in the peer env).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vitlab
from vitlab.checkpoints import save_model
from vitlab.layers import capture_attention
from vitlab.layers.talking_heads import TalkingHeadsAttention
from vitlab.models.base import IMAGENET_MEAN, IMAGENET_STD
from vitlab.models.cait import layer_scale_init
from vitlab.models.factory import create_model, load_model

FIX = Path(__file__).resolve().parent / "fixtures"
TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 4}
TOL = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return load_file(FIX / "deit_cait_io.safetensors")


def timm_deit(**kw) -> torch.nn.Module:
    return create_model("deit_tiny_distilled_patch16_224", pretrained=FIX / "deit_timm_tiny_distilled.safetensors",
                        **{**TINY, **kw})


def timm_cait(**kw) -> torch.nn.Module:
    # depth, width, heads and class-attention depth come from the file itself
    return create_model("cait_xxs24_224", pretrained=FIX / "cait_timm_tiny.safetensors",
                        **{"img_size": 32, "patch_size": 8, **kw})


# ------------------------------------------------------------------------------------------ parity
def test_timm_distilled_deit_matches_timm(io) -> None:
    model = timm_deit().eval()
    assert model.cfg.distilled and model.num_prefix_tokens == 2 and model.num_classes == 10
    with torch.no_grad():
        torch.testing.assert_close(model(io["x"]), io["deit_timm_logits"], **TOL)
    model.train()  # no dropout in this config: training mode differs only in returning both heads
    model.set_distilled_training(True)
    with torch.no_grad():
        cls, dist = model(io["x"])
    torch.testing.assert_close(cls, io["deit_timm_cls_logits"], **TOL)
    torch.testing.assert_close(dist, io["deit_timm_dist_logits"], **TOL)


def test_timm_cait_matches_timm(io) -> None:
    model = timm_cait().eval()
    assert (model.cfg.depth, model.cfg.depth_token_only, model.cfg.embed_dim, model.cfg.num_heads) == (2, 2, 48, 4)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(io["x"]), io["cait_timm_features"], **TOL)
        torch.testing.assert_close(model(io["x"]), io["cait_timm_logits"], **TOL)


def test_hf_deit_with_teacher_matches_transformers(io) -> None:
    model = load_model(FIX / "deit_hf_teacher_tiny").eval()  # model_type "deit" -> the deit family
    assert model.cfg.distilled and model.cfg.dist_head and model.cfg.norm_eps == 1e-12
    with torch.no_grad():
        torch.testing.assert_close(model(io["x"]), io["deit_hf_teacher_logits"], **TOL)
    model.train()
    model.set_distilled_training(True)
    with torch.no_grad():
        cls, dist = model(io["x"])
    torch.testing.assert_close(cls, io["deit_hf_teacher_cls_logits"], **TOL)
    torch.testing.assert_close(dist, io["deit_hf_teacher_dist_logits"], **TOL)


def test_hf_deit_single_head_matches_transformers(io) -> None:
    # DeiTForImageClassification: the distillation token is in the encoder, only the class head is read
    model = load_model(FIX / "deit_hf_plain_tiny").eval()
    assert model.cfg.distilled and not model.cfg.dist_head and model.classifier_names == ("head",)
    with torch.no_grad():
        torch.testing.assert_close(model(io["x"]), io["deit_hf_plain_logits"], **TOL)


def test_hf_deit_through_a_registered_name(io) -> None:
    model = create_model("deit_small_distilled_patch16_224", pretrained=FIX / "deit_hf_teacher_tiny").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(io["x"]), io["deit_hf_teacher_logits"], **TOL)


@pytest.mark.parametrize("build", [timm_deit, timm_cait], ids=["deit", "cait"])
def test_capture_mode_equals_fast_mode_on_fixtures(build, io) -> None:
    model = build().eval()
    with torch.no_grad():
        fast = model(io["x"])
        with capture_attention(model) as maps:
            slow = model(io["x"])
    torch.testing.assert_close(slow, fast, **TOL)
    n = 4 * 4 + 2  # a 4x4 grid of patches; DeiT adds 2 prefix tokens
    if build is timm_deit:
        assert [tuple(a.shape) for a in maps] == [(3, 4, n, n)] * 2
    else:  # 2 talking-heads layers over the patches, then 2 class-attention layers (one query)
        assert [tuple(a.shape) for a in maps] == [(3, 4, 16, 16)] * 2 + [(3, 4, 1, 17)] * 2


def test_talking_heads_mixes_heads_before_and_after_softmax() -> None:
    torch.manual_seed(0)
    attn = TalkingHeadsAttention(8, num_heads=2).eval()
    x = torch.randn(1, 5, 8)
    with torch.no_grad():
        q, k, v = attn.qkv(x).reshape(1, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
        logits = torch.einsum("bhnd,bhmd->bhnm", q, k) * 4**-0.5
        mixed = torch.einsum("gh,bhnm->bgnm", attn.proj_l.weight, logits) + attn.proj_l.bias[:, None, None]
        w = torch.einsum("gh,bhnm->bgnm", attn.proj_w.weight, mixed.softmax(-1)) + attn.proj_w.bias[:, None, None]
        ref = attn.proj(torch.einsum("bhnm,bhmd->bnhd", w, v).reshape(1, 5, 8))
        torch.testing.assert_close(attn(x), ref, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------ DeiT
def test_deit_distillation_token_layout_and_heads() -> None:
    model = create_model("deit_tiny_distilled_patch16_224", num_classes=5, img_size=32, depth=1)
    assert model.pos_embed.shape == (1, 2 + 4, 192)  # class + distillation entries, then the 2x2 grid
    assert model.dist_token.shape == (1, 1, 192)
    assert model.classifier_names == ("head", "head_dist")
    assert {"pos_embed", "cls_token", "dist_token"} <= model.no_weight_decay()
    x = torch.randn(2, 3, 32, 32)
    model.train()
    assert isinstance(model(x), torch.Tensor)  # distilled training is off by default: averaged logits
    model.set_distilled_training(True)
    assert isinstance(model(x), tuple)
    model.eval()
    assert isinstance(model(x), torch.Tensor)  # inference always averages
    model.reset_classifier(3)
    assert model.head.out_features == model.head_dist.out_features == 3
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, global_pool="avg")


def test_deit_inference_averages_the_two_heads() -> None:
    model = create_model("deit_tiny_distilled_patch16_224", num_classes=4, img_size=32, depth=1).eval()
    with torch.no_grad():
        for head in (model.head, model.head_dist):
            head.weight.normal_()
            head.bias.normal_()
        x = torch.randn(2, 3, 32, 32)
        feats = model.forward_features(x)
        expected = (model.head(feats[:, 0]) + model.head_dist(feats[:, 1])) / 2
        torch.testing.assert_close(model(x), expected)
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True), (feats[:, 0] + feats[:, 1]) / 2)


def test_plain_deit_has_no_distillation_token() -> None:
    model = create_model("deit_tiny_patch16_224", img_size=32, depth=1)
    assert model.num_prefix_tokens == 1 and model.dist_token is None and model.pos_embed.shape[1] == 5
    with pytest.raises(ValueError, match="no distillation token head"):
        model.set_distilled_training(True)


def test_deit_preprocessing_is_imagenet() -> None:
    p224 = vitlab.create_model("deit_base_patch16_224", depth=1).preprocessing
    assert (p224.mean, p224.std, p224.crop_pct, p224.input_size) == (IMAGENET_MEAN, IMAGENET_STD, 0.9, (3, 224, 224))
    assert vitlab.model_info("deit_base_distilled_patch16_384")["preprocessing"]["crop_pct"] == 1.0


def test_deit_checkpoint_heads_replaced_and_pos_embed_resampled(io) -> None:
    model = timm_deit(num_classes=3, img_size=48).eval()
    assert model.pos_embed.shape == (1, 2 + 36, 48)
    ref = load_file(FIX / "deit_timm_tiny_distilled.safetensors")
    torch.testing.assert_close(model.pos_embed[:, :2], ref["pos_embed"][:, :2])  # prefix entries kept as is
    with torch.no_grad():
        y = model(torch.randn(2, 3, 48, 48))
    assert y.shape == (2, 3) and torch.count_nonzero(y) == 0  # both heads replaced by zero ones


def test_deit_roundtrips_through_vitlab_format(tmp_path, io) -> None:
    model = timm_deit().eval()
    path = save_model(model, tmp_path / "deit.safetensors")
    again = load_model(path).eval()
    assert again.cfg == model.cfg
    with torch.no_grad():
        torch.testing.assert_close(again(io["x"]), io["deit_timm_logits"], **TOL)


def test_distilled_config_rejects_what_the_token_layout_cannot_do() -> None:
    with pytest.raises(ValueError, match="distilled=True needs"):
        create_model("deit_tiny_distilled_patch16_224", global_pool="avg", class_token=True)


# ------------------------------------------------------------------------------------------ CaiT
def test_layer_scale_init_follows_the_paper() -> None:
    assert [layer_scale_init(d) for d in (12, 18, 24, 36, 48)] == [0.1, 0.1, 1e-5, 1e-6, 1e-6]
    for name, eps in (("cait_xxs24_224", 1e-5), ("cait_s36_384", 1e-6), ("cait_m48_448", 1e-6)):
        assert vitlab.get_entry(name).config.layer_scale == eps
    model = create_model("cait_xxs24_224", img_size=32, depth=2, embed_dim=32)  # depth 2 -> 0.1
    gammas = [m.gamma for n, m in model.named_modules() if n.endswith(("ls1", "ls2"))]
    assert len(gammas) == 2 * (2 + 2) and all(torch.all(g == 0.1) for g in gammas)


def test_cait_class_token_joins_late_and_patches_stay_frozen(io) -> None:
    model = timm_cait().eval()
    assert model.pos_embed.shape == (1, 16, 48)  # no position entry for the class token
    x = io["x"]
    with torch.no_grad():
        before = model.forward_features(x)
        model.cls_token.add_(1.0)
        after = model.forward_features(x)
        patches = model.norm(model.blocks(model._embed(x)[0]))
    torch.testing.assert_close(after[:, 1:], before[:, 1:], atol=0, rtol=0)  # the class token never reaches them
    torch.testing.assert_close(after[:, 1:], patches)
    assert not torch.allclose(after[:, 0], before[:, 0])


def test_cait_intermediates_and_reset(io) -> None:
    model = timm_cait().eval()
    with torch.no_grad():
        final, inter = model.forward_intermediates(io["x"], indices=[0, 1], output_fmt="NCHW",
                                                   return_prefix_tokens=True)
        torch.testing.assert_close(final, io["cait_timm_features"], **TOL)
    (t0, p0), (t1, p1) = inter
    assert t0.shape == t1.shape == (3, 48, 4, 4)
    # the class token has not joined yet: each intermediate's prefix is the learned token itself
    torch.testing.assert_close(p0, model.cls_token.expand(3, -1, -1))
    torch.testing.assert_close(p1, p0)
    model.reset_classifier(7)
    with torch.no_grad():
        assert torch.count_nonzero(model(io["x"])) == 0


@pytest.mark.parametrize("build", [timm_deit, timm_cait], ids=["deit", "cait"])
def test_dynamic_img_size_equals_loading_at_that_size(build) -> None:
    dynamic = build(dynamic_img_size=True).eval()
    fixed = build(img_size=48).eval()  # the checkpoint's table resampled once at load time
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(dynamic(x), fixed(x), **TOL)
