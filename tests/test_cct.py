"""CCT: parity with vit-pytorch's independent CCT and the official checkpoint layout, the paper's sizes, the
tokenizer's grid, sequence pooling, other input sizes, model_overrides, explanations and the CIFAR recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vitlab
from vitlab.analysis.explain import explain
from vitlab.checkpoints import CheckpointError
from vitlab.checkpoints.convert_cct import convert_official_cct
from vitlab.layers import sinusoid_1d_pos_embed
from vitlab.models.cct import CCT, CCTConfig

torch.set_num_threads(1)
FIX = Path(__file__).parent / "fixtures"
IO = load_file(str(FIX / "cct_io.safetensors"))
TINY = dict(embed_dim=32, depth=2, num_heads=2, conv_channels=16)
# fixture -> (io key, options the file cannot tell: heads, conv stride/padding, input size)
CASES = {
    "cct_vitpytorch_learn.safetensors": ("learn", dict(num_heads=2, img_size=(24, 32))),
    "cct_official_learn.pth": ("learn", dict(num_heads=2, img_size=(24, 32))),
    "cct_vitpytorch_sine.safetensors": ("sine", dict(num_heads=2, img_size=16, stride=1, padding=2)),
    "cct_official_token.pth": ("token", dict(num_heads=4, img_size=16)),
}


def _load(fixture: str, **extra) -> CCT:
    key, over = CASES[fixture]
    return vitlab.create_model("cct_7_3x1_32", pretrained=str(FIX / fixture), **{**over, **extra}).eval()


# ------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("fixture", list(CASES))
def test_matches_vit_pytorch_logits(fixture: str) -> None:
    key, _ = CASES[fixture]
    model = _load(fixture)
    with torch.no_grad():
        out = model(IO[f"{key}_input"])
    torch.testing.assert_close(out, IO[f"{key}_logits"], atol=1e-5, rtol=1e-5)


def test_official_layout_is_vit_pytorchs_and_sets_the_architecture() -> None:
    sd = torch.load(FIX / "cct_official_learn.pth", weights_only=True)
    assert sd.keys() == load_file(str(FIX / "cct_vitpytorch_learn.safetensors")).keys()
    over = convert_official_cct(sd, {}).overrides
    assert over == {"embed_dim": 32, "depth": 2, "num_conv_layers": 2, "kernel_size": 3, "in_chans": 3,
                    "qkv_bias": False, "conv_channels": 64, "mlp_ratio": 2.0, "pos_embed": "learn",
                    "global_pool": "seq", "num_classes": 5}
    sine = convert_official_cct(load_file(str(FIX / "cct_vitpytorch_sine.safetensors")), {})
    assert sine.overrides["pos_embed"] == "sine" and "pos_embed" not in sine.state_dict  # recomputed, not loaded
    token = convert_official_cct(torch.load(FIX / "cct_official_token.pth", weights_only=True), {}).overrides
    assert token["global_pool"] == "token" and token["in_chans"] == 3


def test_vitlab_names_round_trip_as_a_plain_state_dict(tmp_path: Path) -> None:
    model = _load("cct_official_learn.pth")
    torch.save(model.state_dict(), tmp_path / "plain.pth")
    again = vitlab.create_model("cct_7_3x1_32", pretrained=str(tmp_path / "plain.pth"), num_classes=5,
                                **{**TINY, **CASES["cct_official_learn.pth"][1], "conv_channels": 64,
                                   "num_conv_layers": 2}).eval()
    x = IO["learn_input"]
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), atol=0, rtol=0)


def test_foreign_state_dict_is_refused() -> None:
    with pytest.raises(CheckpointError, match="not a CCT state dict"):
        vitlab.create_model("cct_7_3x1_32", pretrained=str(FIX / "t2t_vit_official_tiny.pth.tar"))


# ------------------------------------------------------------------------------------ architecture
def test_parameter_counts_as_the_paper_rounds_them() -> None:
    # Hassani et al. 2021, Table 1 and the official README (rounded down to 0.01 M)
    for name, millions in (("cct_2_3x2_32", 0.28), ("cct_7_3x1_32", 3.76), ("cct_14_7x2_224", 22.36),
                           ("cct_14_7x2_384", 22.51)):
        with torch.device("meta"):
            params = sum(p.numel() for p in vitlab.create_model(name).parameters())
        assert int(params / 1e4) / 100 == millions, (name, params)


def test_registered_names_are_the_official_ones() -> None:
    names = set(vitlab.list_models(family="cct"))
    official = {f"cct_{v}" for v in ("2_3x2_32", "4_3x2_32", "6_3x1_32", "6_3x2_32", "7_3x1_32", "7_3x2_32",
                                     "7_7x2_224")}
    official |= {n + "_sine" for n in official} | {"cct_7_3x1_32_c100", "cct_7_3x1_32_sine_c100",
                                                   "cct_14_7x2_224", "cct_14_7x2_384", "cct_14_7x2_384_fl"}
    assert names == official
    cfg = vitlab.get_entry("cct_7_7x2_224").config
    assert (cfg.conv_stride, cfg.conv_padding, cfg.num_classes) == (2, 3, 102)
    cfg = vitlab.get_entry("cct_7_3x1_32").config
    assert (cfg.conv_stride, cfg.conv_padding, cfg.attn_drop_rate, cfg.drop_path_rate) == (1, 1, 0.1, 0.1)


@pytest.mark.parametrize(("kernel", "convs", "size"), [(3, 1, 32), (3, 2, 32), (7, 2, 224), (3, 2, 28), (7, 2, 33),
                                                       (5, 3, 30)])
def test_grid_formula_matches_the_tokenizer(kernel: int, convs: int, size: int) -> None:
    model = vitlab.create_model("cct_7_3x1_32", kernel_size=kernel, num_conv_layers=convs, img_size=size, **TINY)
    h, w = model.tokenizer.grid_size
    tokens = model.tokenizer(torch.zeros(1, 3, size, size))
    assert tokens.shape == (1, h * w, 32)
    expected = {(3, 1, 32): 16, (3, 2, 32): 8, (7, 2, 224): 14}.get((kernel, convs, size))
    assert expected is None or h == w == expected


def test_sequence_pooling_is_a_softmax_weighted_sum() -> None:
    model = vitlab.create_model("cct_7_3x1_32", **TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)
        w = torch.softmax(model.attn_pool(tokens)[..., 0], dim=1)  # (B, N)
        pooled = (w[..., None] * tokens).sum(dim=1)
        torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), pooled)
        torch.testing.assert_close(model(x), model.head(pooled))
    assert torch.allclose(model.pool_weights(tokens).sum(dim=1), torch.ones(2))


def test_channels_last_changes_nothing_but_speed() -> None:
    a = vitlab.create_model("cct_7_3x2_32", **TINY).eval()
    b = vitlab.create_model("cct_7_3x2_32", **TINY, channels_last=False).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), atol=1e-5, rtol=1e-5)


def test_model_overrides_build_what_an_automatic_recipe_asks_for() -> None:
    model = vitlab.create_model("cct_7_3x1_32", embed_dim=128, depth=4, num_heads=2, num_conv_layers=2,
                                img_size=28, in_chans=1, num_classes=10, mlp_ratio=2.0, drop_path_rate=0.05)
    assert model.tokenizer.grid_size == (7, 7) and len(model.blocks) == 4
    assert model.preprocessing.input_size == (1, 28, 28) and len(model.preprocessing.mean) == 1
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    from vitlab.models.describe import describe_model

    model.model_name = "cct_7_3x1_32"
    text = describe_model(model)
    assert text.startswith("cct_7_3x1_32 with embed_dim=128, depth=4, num_heads=2, num_conv_layers=2")
    assert "at 28 px, 1 channel, 10 classes" in text


def test_other_input_sizes() -> None:
    # learned table (class-token entry kept): resampled on loading at another size, and per batch with
    # dynamic_img_size (the identity at the built size)
    base = _load("cct_official_token.pth")
    big = _load("cct_official_token.pth", img_size=24)
    assert big.pos_embed.shape[1] == 1 + 12 * 12 and base.pos_embed.shape[1] == 1 + 8 * 8
    dyn = _load("cct_official_token.pth", dynamic_img_size=True)
    x, big_x = IO["token_input"], torch.randn(1, 3, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(dyn(x), base(x), atol=0, rtol=0)
        torch.testing.assert_close(dyn(big_x), big(big_x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="built for 16x16"):
        base(big_x)
    # a non-square table cannot be laid on its grid from its length alone: a clear error
    with pytest.raises(CheckpointError, match="not a square grid"):
        _load("cct_official_learn.pth", img_size=32)
    # sine: recomputed for the new length, equal to a model built at that size
    sine_dyn = _load("cct_vitpytorch_sine.safetensors", dynamic_img_size=True)
    sine_big = _load("cct_vitpytorch_sine.safetensors", img_size=24)
    torch.testing.assert_close(sine_big.pos_embed_fixed, sinusoid_1d_pos_embed(12 * 12, 16))
    xs = torch.randn(1, 1, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(sine_dyn(xs), sine_big(xs), atol=1e-6, rtol=1e-6)


def test_reset_classifier_and_pool_switch() -> None:
    model = vitlab.create_model("cct_7_3x1_32", **TINY)
    model.reset_classifier(3, global_pool="avg")
    assert model.attn_pool is None and model.num_classes == 3
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), torch.zeros(1, 3))  # zero-initialised head
        tokens = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), tokens.mean(dim=1))
    model.reset_classifier(3, global_pool="seq")
    assert model.attn_pool is not None
    token = vitlab.create_model("cct_7_3x1_32", **TINY, global_pool="token")
    with pytest.raises(ValueError, match="cannot switch global_pool"):
        token.reset_classifier(3, global_pool="avg")
    assert token.no_weight_decay() == {"pos_embed", "cls_token"}
    with pytest.raises(ValueError, match="global_pool must be"):
        CCTConfig(global_pool="mean")


def test_forward_intermediates() -> None:
    model = vitlab.create_model("cct_7_3x2_32", **TINY, global_pool="token").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, output_fmt="NCHW", return_prefix_tokens=True)
        torch.testing.assert_close(final, model.forward_features(x))
    assert len(inter) == 2 and inter[0][0].shape == (2, 32, 8, 8) and inter[0][1].shape == (2, 1, 32)


# ------------------------------------------------------------------------------------------ explain
def test_explanations_read_through_sequence_pooling() -> None:
    model = vitlab.create_model("cct_7_3x2_32", **TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        w = model.pool_weights(model.forward_features(x))  # (B, 64)
    last = explain(model, x, method="last-layer")
    torch.testing.assert_close(last.patch_maps.flatten(1), w)  # the head's attention over the tokens
    roll = explain(model, x, method="rollout")
    assert roll.method == "rollout" and roll.maps.shape == (2, 32, 32)
    # rollout rows weighted by w, not averaged: the two differ
    from vitlab.analysis.capture import capture
    from vitlab.analysis.rollout import attention_rollout

    joint = attention_rollout(capture(model, x).attentions, num_prefix_tokens=0)
    torch.testing.assert_close(roll.patch_maps.flatten(1), torch.einsum("bq,bqk->bk", w, joint))
    assert not torch.allclose(roll.patch_maps.flatten(1), joint.mean(dim=1))


# ------------------------------------------------------------------------------------------- recipe
def test_cifar_recipe_trains_a_few_steps(tmp_path: Path) -> None:
    from vitlab.cli.main import main
    from vitlab.train.recipe import load_recipe

    recipe = load_recipe("cct_cifar10")
    assert (recipe.lr, recipe.weight_decay, recipe.label_smoothing, recipe.randaugment) == (5.5e-4, 0.06, 0.1, (2, 9))
    assert recipe.model == "cct_7_3x1_32" and (recipe.mixup_alpha, recipe.cutmix_alpha) == (0.8, 1.0)
    sets = [a for k, v in dict(embed_dim=32, depth=1, num_heads=2).items()
            for a in ("--set", f"model_overrides.{k}={json.dumps(v)}")]
    assert main(["train", "--data", "digits", "--recipe", "cct_cifar10", "--img-size", "16", "--steps", "3",
                 "--batch-size", "16", "--no-progress", "--output", str(tmp_path / "run"), *sets]) == 0
    model = vitlab.load_model(tmp_path / "run" / "model.safetensors")
    assert isinstance(model, CCT) and model.cfg.embed_dim == 32 and model.cfg.pos_embed == "learn"
