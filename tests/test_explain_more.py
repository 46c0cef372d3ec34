"""explain / analyze / fewshot on the families' edge cases: pooling, padding, prefix tokens, task models,
grad modes, options that do not apply, and the CLI's argument checks."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import TensorDataset

import vitlab
from vitlab.analysis import attention_rollout, capture, explain
from vitlab.analysis.analyze import analyze_model
from vitlab.analysis.explain import methods_for
from vitlab.analysis.pos_similarity import position_similarity, position_similarity_summary
from vitlab.cli.main import main

from model_helpers import input_for, make_tiny, perturb_


def _same_weights(name: str, **kw) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same perturbed weights with the class-token head and with the average-pooling head."""
    torch.manual_seed(0)
    tok = perturb_(make_tiny(name, global_pool="token", **kw), std=0.3).eval()
    avg = make_tiny(name, global_pool="avg", **kw).eval()
    avg.load_state_dict(tok.state_dict())
    return tok, avg


# ---- 1: average pooling reads the patch tokens, not the class tokens
@pytest.mark.parametrize("method", ["rollout", "grad-rollout", "last-layer"])
def test_crossvit_avg_pooling_explains_the_patch_tokens_it_reads(method: str) -> None:
    tok, avg = _same_weights("crossvit_tiny_240")
    x = input_for(tok, batch=1)
    a, b = explain(tok, x, method=method).maps, explain(avg, x, method=method).maps
    # the class tokens' rows: the same map as the token head's, and no gradient at all once no head reads them
    assert torch.isfinite(b).all() and b.sum() > 0 and not torch.allclose(a, b, atol=1e-6)


def test_xcit_avg_pooling_refuses_the_class_attention_map() -> None:
    _, avg = _same_weights("xcit_nano_12_p16_224")
    with pytest.raises(ValueError, match="global_pool='avg'.*grad-cam"):
        explain(avg, input_for(avg, batch=1), method="last-layer")
    assert explain(avg, input_for(avg, batch=1)).method == "grad-cam"


# ---- 2: Grad-CAM on a padded Swin sits on the pixels its tokens saw
def test_swin_grad_cam_is_placed_on_the_padded_extent() -> None:
    torch.manual_seed(0)
    m = vitlab.create_model("swin_tiny_patch4_window7_224", num_classes=5, img_size=64, embed_dim=16, depths=(1, 1),
                            num_heads=(1, 2), window_size=4, dynamic_img_size=True).eval()
    perturb_(m, std=0.3)
    e = explain(m, torch.randn(1, 3, 33, 33), method="grad-cam")  # 9x9 tokens of 4 px, then 5x5 of 8 px = 40 px
    assert e.patch_maps.shape == (1, 5, 5)
    placed = F.interpolate(e.patch_maps[:, None], size=(40, 40), mode="bilinear", align_corners=False)[:, 0, :33, :33]
    torch.testing.assert_close(e.maps, placed)
    # a fixed-size Swin whose patch merging pads (40 px: 10 -> 5 -> 3 tokens of 16 px = 48 px)
    s = perturb_(vitlab.create_model("swin_tiny_patch4_window7_224", num_classes=5, img_size=40, embed_dim=8,
                                     depths=(1, 1, 1), num_heads=(1, 1, 1), window_size=2), std=0.3).eval()
    e = explain(s, torch.randn(1, 3, 40, 40), method="grad-cam")
    assert e.patch_maps.shape == (1, 3, 3)
    placed = F.interpolate(e.patch_maps[:, None], size=(48, 48), mode="bilinear", align_corners=False)[:, 0, :40, :40]
    torch.testing.assert_close(e.maps, placed)


# ---- 3: learned position tables of families without a pos_embed option
@pytest.mark.parametrize("name, prefix", [("cait_xxs24_224", 0), ("beit3_base_patch16_224", 1)])
def test_analyze_shows_the_learned_position_table_of(name: str, prefix: int, tmp_path) -> None:
    model = perturb_(make_tiny(name)).eval()
    x = input_for(model, batch=2)
    numbers = analyze_model(model, TensorDataset(x, torch.arange(2)), tmp_path, num_images=2, num_components=2)
    pos = numbers["position_similarity"]
    assert pos is not None and pos["kind"] == "learn"
    grid = tuple(model.patch_embed.grid_size)
    expected = position_similarity_summary(position_similarity(model.pos_embed.detach()[0, prefix:]), grid)
    assert pos["grid"] == list(grid) and pos["mean_neighbours"] == pytest.approx(expected["mean_neighbours"])
    assert (tmp_path / "position_similarity.png").exists()


# ---- 4: a backbone without a classifier, in a family without attention maps
@pytest.mark.parametrize("method", ["auto", "grad-cam", "rollout"])
def test_explain_cli_headless_mixer_gives_one_clear_message(method: str, tmp_path, caplog) -> None:
    model = vitlab.create_model("mixer_s32_224", num_classes=0, img_size=64, depth=1, embed_dim=32).eval()
    ckpt = tmp_path / "backbone.safetensors"
    vitlab.save_model(model, ckpt)
    img = tmp_path / "x.png"
    Image.new("RGB", (64, 64), (120, 30, 200)).save(img)
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        rc = main(["explain", str(img), "--checkpoint", str(ckpt), "--method", method, "--output", str(tmp_path / "o"),
                   "--threads", "1"])
    assert rc != 0
    assert "no classifier" in caplog.text and "classification head" in caplog.text
    assert "use one of" not in caplog.text and "use rollout or last-layer" not in caplog.text


def test_explain_cli_headless_vit_draws_its_class_token_attention(tmp_path, caplog) -> None:
    model = make_tiny("vit_small_patch16_224", num_classes=0).eval()
    ckpt = tmp_path / "backbone.safetensors"
    vitlab.save_model(model, ckpt)
    img = tmp_path / "x.png"
    Image.new("RGB", (40, 40), (120, 30, 200)).save(img)
    out = tmp_path / "o"
    assert main(["explain", str(img), "--checkpoint", str(ckpt), "--output", str(out), "--threads", "1"]) == 0
    assert [p.name for p in out.iterdir()] == ["x_last-layer.png"]
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(["explain", str(img), "--checkpoint", str(ckpt), "--method", "grad-cam", "--output", str(out)]) != 0
    assert "no classifier" in caplog.text and "use last-layer or rollout" in caplog.text


# ---- 5: options that a map does not use: honoured where heads exist, else a warning
def test_mobilevit_last_layer_fuses_heads() -> None:
    model = perturb_(make_tiny("mobilevit_xxs", img_size=128)).eval()  # a 2x2 grid of patches in the last stage
    x = input_for(model, batch=1)
    mean = explain(model, x, method="last-layer", head_fusion="mean").maps
    assert not torch.allclose(explain(model, x, method="last-layer", head_fusion="max").maps, mean)


def test_options_that_do_not_apply_are_warned_about(caplog) -> None:
    vit = perturb_(make_tiny("vit_small_patch16_224")).eval()
    cct = perturb_(make_tiny("cct_2_3x2_32")).eval()
    v2 = perturb_(make_tiny("mobilevitv2_050")).eval()
    with caplog.at_level(logging.WARNING, logger="vitlab"):
        explain(vit, input_for(vit, batch=1), method="last-layer", discard_ratio=0.5)
        assert "discard_ratio=0.5 is ignored by last-layer" in caplog.text
        caplog.clear()
        explain(vit, input_for(vit, batch=1), method="grad-rollout", head_fusion="max")
        assert "head_fusion='max' is ignored by grad-rollout" in caplog.text
        caplog.clear()
        explain(cct, input_for(cct, batch=1), method="last-layer", head_fusion="max")
        assert "head_fusion='max' is ignored" in caplog.text and "sequence pooling" in caplog.text
        caplog.clear()
        explain(v2, input_for(v2, batch=1), method="last-layer", head_fusion="min")
        assert "head_fusion='min' is ignored" in caplog.text and "separable" in caplog.text
        caplog.clear()
        explain(vit, input_for(vit, batch=1), method="rollout", head_fusion="max", discard_ratio=0.5)
        assert "ignored" not in caplog.text


# ---- 6, 7: fewshot's numeric options
def test_ridge_classifier_refuses_a_non_positive_l2_reg() -> None:
    from vitlab.analysis.fewshot import ridge_classifier

    x, y = torch.randn(6, 10), torch.tensor([0, 1, 2, 0, 1, 2])
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="l2_reg must be > 0"):
            ridge_classifier(x, y, 3, l2_reg=bad)


@pytest.mark.parametrize("option, value, says", [
    ("--l2-reg", "0", "number > 0"), ("--l2-reg", "-1", "number > 0"),
    ("--max-test", "0", "integer >= 1"), ("--max-test", "-5", "integer >= 1"), ("--pool", "-3", "integer >= 0"),
])
def test_fewshot_cli_refuses_out_of_range_options(option: str, value: str, says: str, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["fewshot", "--checkpoint", "model.safetensors", "--data", "digits", f"{option}={value}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and says in err


# ---- 8: Hugging Face-order Swin where the windows do not divide the maps
def _swin_pad_before_shift() -> torch.nn.Module:
    torch.manual_seed(0)
    m = vitlab.create_model("swin_tiny_patch4_window7_224", num_classes=5, img_size=(36, 52), embed_dim=16,
                            depths=(2, 2), num_heads=(1, 2), window_size=4, pad_before_shift=True).eval()
    return perturb_(m, std=0.3)


def test_auto_falls_back_to_grad_cam_where_hf_swin_windows_cannot_be_analysed(tmp_path) -> None:
    m = _swin_pad_before_shift()
    x = torch.randn(1, 3, 36, 52)
    e = explain(m, x)
    assert e.method == "grad-cam" and e.maps.shape == (1, 36, 52)
    torch.testing.assert_close(e.maps, explain(m, x, method="grad-cam").maps)
    with pytest.raises(ValueError, match="pad_before_shift"):  # asked for by name: the refusal stands
        explain(m, x, method="rollout")
    numbers = analyze_model(m, TensorDataset(torch.randn(2, 3, 36, 52), torch.arange(2)), tmp_path, num_images=2,
                            num_components=2)
    assert numbers["attention_distance"] is None
    assert "pad_before_shift" in numbers["attention_distance_not_applicable"]
    assert numbers["num_images"] == 2 and numbers["embedding_filters"] is not None
    assert "Not measured" in (tmp_path / "report.html").read_text()


def test_explain_cli_auto_falls_back_to_grad_cam_for_hf_swin(tmp_path) -> None:
    ckpt = tmp_path / "swin.safetensors"
    vitlab.save_model(_swin_pad_before_shift(), ckpt, class_names=list("abcde"))
    img = tmp_path / "wide.png"
    Image.new("RGB", (80, 50), (10, 200, 90)).save(img)
    assert main(["explain", str(img), "--checkpoint", str(ckpt), "--output", str(tmp_path / "o"), "--threads", "1"]) == 0
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["wide_grad-cam.png"]


# ---- 9: a distilled DeiT predicts with both prefix tokens' heads
def test_distilled_deit_maps_average_the_class_and_distillation_rows() -> None:
    m = perturb_(vitlab.create_model("deit_tiny_distilled_patch16_224", num_classes=5, img_size=32, patch_size=8,
                                     embed_dim=32, num_heads=2, depth=2), std=0.3).eval()
    x = input_for(m, batch=2)
    c = capture(m, x)
    joint = attention_rollout(c.attentions, num_prefix_tokens=2)
    got = explain(m, x, method="rollout").patch_maps.reshape(2, -1)
    torch.testing.assert_close(got, 0.5 * (joint[:, 0, 2:] + joint[:, 1, 2:]))
    last = c.attentions[-1].mean(dim=1)
    got = explain(m, x, method="last-layer").patch_maps.reshape(2, -1)
    torch.testing.assert_close(got, 0.5 * (last[:, 0, 2:] + last[:, 1, 2:]))


# ---- 10: gradient methods and inference mode
def test_gradient_methods_refuse_inference_mode_and_accept_inference_tensors() -> None:
    m = perturb_(make_tiny("vit_small_patch16_224")).eval()
    x = input_for(m, batch=1)
    for method in ("grad-cam", "grad-input", "grad-rollout"):
        with torch.inference_mode(), pytest.raises(ValueError, match="outside torch.inference_mode"):
            explain(m, x, method=method)
    with torch.inference_mode():
        xi = x.clone()
        assert explain(m, xi, method="rollout").maps.shape == (1, *x.shape[-2:])
    for method in ("grad-cam", "grad-input", "grad-rollout"):
        torch.testing.assert_close(explain(m, xi, method=method).maps, explain(m, x, method=method).maps)


# ---- 11: attention-distance layers are the model's blocks
@pytest.mark.parametrize("name, extra", [
    ("t2t_vit_7", {}),
    ("crossvit_tiny_240", {"depth": ((1, 1, 0), (1, 1, 0))}),
])
def test_attention_distance_layers_are_numbered_by_block(name: str, extra: dict, tmp_path) -> None:
    model = perturb_(make_tiny(name, **extra)).eval()
    numbers = analyze_model(model, TensorDataset(input_for(model), torch.arange(2)), tmp_path, num_images=2,
                            num_components=2)
    assert len(model.blocks) == 2 and numbers["attention_distance"]["layers"] == [1, 2]


def test_crossvit_branches_on_one_grid_are_told_apart(tmp_path) -> None:
    model = perturb_(make_tiny("crossvit_tiny_240", branch_scale=(1.0, 1.0), patch_size=(12, 12))).eval()
    numbers = analyze_model(model, TensorDataset(input_for(model), torch.arange(2)), tmp_path, num_images=2,
                            num_components=2)
    ad = numbers["attention_distance"]
    assert ad["layers"] == [1, 1] and ad["branch_of_layer"] == [1, 2]


# ---- 12: task models
def test_task_models_offer_only_what_works_and_refuse_the_rest_clearly() -> None:
    torch.manual_seed(0)
    detr = vitlab.create_model("detr_vit_small_patch16", num_classes=3, num_queries=5, dim=32, num_heads=2,
                               enc_depth=1, dec_depth=1, ffn_dim=64, img_size=64,
                               backbone_args=dict(embed_dim=32, depth=1, num_heads=2, img_size=64, patch_size=16,
                                                  dynamic_img_size=True)).eval()
    setr = vitlab.create_model("setr_naive_vit_small_patch16", num_classes=3, img_size=64,
                               backbone_args=dict(embed_dim=32, depth=2, num_heads=2, patch_size=16)).eval()
    x = torch.randn(1, 3, 64, 64)
    assert methods_for(detr) == ("last-layer",) and methods_for(setr) == ()
    assert explain(detr, x).method == "last-layer"
    for method in ("grad-cam", "grad-input", "rollout"):
        with pytest.raises(ValueError, match="detector.*last-layer.*detect --attention"):
            explain(detr, x, method=method)
    for method in ("auto", "grad-cam", "grad-input"):
        with pytest.raises(ValueError, match="SETR.*not supported"):
            explain(setr, x, method=method)


def test_detr_last_layer_fuses_heads_as_asked() -> None:
    from vitlab.analysis.explain_detr import detection_attention
    from vitlab.layers import capture_attention

    torch.manual_seed(0)
    detr = vitlab.create_model("detr_resnet50", num_classes=3, num_queries=5, dim=32, num_heads=4, enc_depth=1,
                               dec_depth=1, ffn_dim=64, img_size=64,
                               backbone_args={"layers": (1, 1, 1, 1), "channels": (16, 16, 32, 32), "stem_chs": 8})
    detr = perturb_(detr.eval())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), capture_attention(detr) as maps:
        detr(x)
    last = maps[-1]  # the last decoder layer's cross-attention: (1, heads, queries, h*w)
    for fusion, reduce in (("mean", last.mean(1)), ("max", last.amax(1)), ("min", last.amin(1))):
        _, fused = detection_attention(detr, x, head_fusion=fusion)
        torch.testing.assert_close(fused.flatten(2), reduce)
    a = explain(detr, x, method="last-layer", head_fusion="max").patch_maps
    b = explain(detr, x, method="last-layer").patch_maps
    assert not torch.allclose(a, b)
