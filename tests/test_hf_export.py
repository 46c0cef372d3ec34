"""Hugging Face folders written by vitlab (``save_hf_folder``, ``vitlab export --format hf``): transformers loads
them as ViTForImageClassification / DeiTForImageClassificationWithTeacher / SwinForImageClassification /
Swinv2ForImageClassification / BeitForImageClassification / MobileViT(V2)ForImageClassification /
ResNetForImageClassification with vitlab's outputs, its processor prepares images as vitlab does, and vitlab reads
them back with the same outputs.

Fixtures: tests/fixtures/hf_export/make_fixtures_hf_export.py (transformers 5.25 in the peer environment loaded the
folders vitlab wrote and recorded its logits and pixel values). The folders transformers wrote itself for the import
tests, read by vitlab and exported again, give back transformers' own tensors and names.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vitlab
from vitlab.checkpoints.to_hf import hf_config, hf_processor_config, save_hf_folder, to_hf_state_dict
from vitlab.cli.main import main
from vitlab.data.transforms import eval_transform

FIX = Path(__file__).parent / "fixtures" / "hf_export"
CASES = ["vit", "vit_squash", "deit_distilled", "vit_sigmoid", "swin", "swinv2", "beit", "beit_token", "mobilevit",
         "mobilevitv2", "resnet_basic", "resnet_bottleneck"]


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return load_file(FIX / "io.safetensors")


@pytest.fixture(scope="module")
def expected() -> dict:
    return json.loads((FIX / "expected.json").read_text())


@pytest.mark.parametrize("case", CASES)
def test_transformers_computes_vitlabs_logits_from_the_exported_folder(case: str, io: dict, expected: dict) -> None:
    model = vitlab.load_model(FIX / f"{case}.safetensors").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(io[f"{case}.pixels"]), io[f"{case}.logits"], atol=2e-5, rtol=1e-5)
    e = expected[case]
    config = hf_config(model)
    assert [config["architectures"][0], config["model_type"]] == [e["class"], e["model_type"]]
    assert config["id2label"] == e["id2label"] and config.get("problem_type") == e["problem_type"]
    assert hf_processor_config(model)[0]["image_processor_type"] == e["processor"]


@pytest.mark.parametrize("case", CASES)
def test_the_processor_prepares_images_as_vitlab(case: str, io: dict) -> None:
    """The same resize, crop, scale and channel order, up to where an odd margin's crop starts (transformers:
    margin // 2; vitlab and timm: round(margin / 2)), which the export names in its notes. The 40 x 52 picture has
    odd margins at crop_pct 0.9 (resized to 35 x 45 for a 32 x 32 crop, 71 x 92 for 64 x 64), even ones at 0.8
    (40 x 52) and 0.875 (36 x 46)."""
    model = vitlab.load_model(FIX / f"{case}.safetensors")
    pre = model.preprocessing
    pixels = io[f"{case}.pixels"][0]
    floor = eval_transform(dataclasses.replace(pre, crop_offset="floor"))(io["image"].numpy())
    assert (floor - pixels).abs().mean() < 0.01  # Pillow's uint8 rounding between resize passes
    config, notes = hf_processor_config(model)
    ours = eval_transform(pre)(io["image"].numpy())
    odd = not torch.equal(ours, floor)  # vitlab's own crop starts elsewhere: an odd margin
    assert odd == (pre.crop_mode == "center" and pre.resize_side(pre.input_size[1]) in (35, 71))
    # one pixel apart: 0.04 on MobileViT's unnormalised [0, 1] pixels, 0.13 and more on normalised ones
    assert ((ours - pixels).abs().mean() > 0.02) == odd
    crops = config.get("do_center_crop") or config["image_processor_type"] == "ConvNextImageProcessor"
    assert any("margin // 2" in n for n in notes) == bool(crops)
    # at the models' own sizes a margin of 3 (35 to 32) or 7 (71 to 64) moves every image's crop, and the note says so
    # (40 x 52 has its odd margins along the shorter side); even margins, or 5, start where vitlab's does
    assert any("is cropped one pixel off" in n for n in notes) == odd


@pytest.mark.parametrize("case", CASES)
def test_vitlab_reads_its_hf_folder_back_with_the_same_outputs(case: str, tmp_path: Path) -> None:
    model = vitlab.load_model(FIX / f"{case}.safetensors").eval()
    save_hf_folder(model, tmp_path / "hf")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors",
                                                                   "preprocessor_config.json"]
    back = vitlab.load_model(tmp_path / "hf").eval()
    x = torch.randn(2, *model.preprocessing.input_size)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), atol=1e-6, rtol=1e-6)
    assert back.class_names == model.class_names and back.score_function == model.score_function
    pre, again = model.preprocessing, back.preprocessing
    assert (again.input_size, again.crop_mode, again.interpolation, again.mean, again.std, again.channel_order) == \
        (pre.input_size, pre.crop_mode, pre.interpolation, pre.mean, pre.std, pre.channel_order)
    side = pre.input_size[1]
    assert again.resize_side(side) == pre.resize_side(side)  # the same resize before the crop


def test_the_weights_are_transformers_names_split_from_the_fused_projection() -> None:
    model = vitlab.load_model(FIX / "deit_distilled.safetensors")
    sd = to_hf_state_dict(model)
    qkv = model.state_dict()["blocks.1.attn.qkv.weight"]
    parts = [sd[f"deit.encoder.layer.1.attention.attention.{p}.weight"] for p in ("query", "key", "value")]
    assert torch.equal(torch.cat(parts), qkv)
    assert {"cls_classifier.weight", "distillation_classifier.weight", "deit.embeddings.distillation_token"} <= set(sd)


@pytest.mark.parametrize("name, options, words", [
    ("vit_tiny_patch16_224", {"global_pool": "avg"}, ["global_pool='avg'", "classifies the class token"]),
    ("vit_tiny_patch16_224", {"init_values": 1e-5}, ["init_values=1e-05", "LayerScale"]),
    ("vit_small_patch14_reg4_dinov2", {"num_classes": 10}, ["reg_tokens=4"]),
    ("vit_tiny_patch16_224", {"attn_type": "linformer"}, ["Linformer"]),
    ("xcit_nano_12_p16_224", {}, ["XCiT", "--format timm", "MobileViT (v1, v2) and ResNet"]),
    ("beit3_base_patch16_224", {}, ["BEiT-3", "--format timm"]),
    ("swin_tiny_patch4_window7_224", {"img_size": 32, "window_size": 4, "patch_size": 2},
     ["stage(s) [3] have maps smaller than the window", "full window"]),
    ("swin_tiny_patch4_window7_224", {"window_size": (7, 7, 7, 4)}, ["one window for every stage"]),
    ("swin_tiny_patch4_window7_224", {"img_size": 256}, ["stage(s) [0, 1, 2, 3] pad", "transformers pads before it"]),
    ("swin_tiny_patch4_window7_224", {"norm_eps": 1e-6}, ["eps 1e-06", "embed_norm_eps=1e-05"]),
    ("vit_tiny_patch16_224", {"num_classes": 0}, ["no classifier"]),
    # Swin v2
    ("swinv2_tiny_window8_256", {"pretrained_window_sizes": (1, 4, 4, 4)}, ["pretrained_window_sizes=[1, 4, 4, 4]",
                                                                            "divides by zero"]),
    ("swinv2_tiny_window8_256", {"img_size": 224}, ["stage(s) [1, 2] pad", "transformers pads before it"]),
    ("swinv2_tiny_window8_256", {"window_size": (8, 8, 8, 4)}, ["one window for every stage"]),
    # BEiT
    ("beit_base_patch16_224", {"sub_ln": True}, ["sub_ln=True", "transformers' BEiT has none"]),
    ("beit_base_patch16_224", {"qkv_bias_layout": "qkv"}, ["qkv_bias_layout='qkv'", "q and v biases only"]),
    ("beit_base_patch16_224", {"fc_norm": False}, ["global_pool='avg', fc_norm=False, final_norm=True",
                                                   "use_mean_pooling"]),
    ("beit_base_patch16_224", {"global_pool": "token", "fc_norm": True, "final_norm": False},
     ["global_pool='token', fc_norm=True, final_norm=False"]),
    ("beit_base_patch16_224", {"img_size": (224, 160)}, ["14x10 patch grid is not square", "axes swapped"]),
    # MobileViT
    ("mobilevitv3_xs", {}, ["MobileViT v3", "v1 and v2 classes only", "--format onnx"]),
    ("mobilevit_xxs", {"transformer_depths": (2, 2, 2)}, ["transformer_depths=(2, 2, 2)", "builds (2, 4, 3)"]),
    ("mobilevit_xxs", {"mv2_depths": (1, 2)}, ["mv2_depths=(1, 2)", "builds (1, 3)"]),
    ("mobilevit_xxs", {"final_chs": 0}, ["final_chs=0", "1x1 expansion"]),
    ("mobilevit_xxs", {"expand_ratio": 2.15}, ["stages.1.1 expands 24 channels to 48", "= 56"]),
    ("mobilevitv2_100", {"mv2_depths": (1, 3)}, ["mv2_depths=(1, 3)", "builds (1, 2)"]),
    ("mobilevitv2_100", {"channels": (64, 128, 256, 384, 520)}, ["widths (32, 64, 128, 256, 384, 520)",
                                                                 "width_multiplier=1.01562"]),
    ("mobilevitv2_100", {"transformer_dims": (128, 192, 252)}, ["transformer_dims=(128, 192, 252)", "multiples of 8"]),
    ("mobilevitv2_100", {"mlp_ratio": 1.5}, ["mlp_ratio=1.5", "integer ffn_multiplier"]),
    ("mobilevitv2_100", {"mlp_ratio": 3.0, "transformer_dims": (136, 192, 256)}, ["MLP widths [408, 576, 768]",
                                                                                 "multiple of 16"]),
    ("mobilevitv2_100", {"img_size": 224}, ["stage(s) [4] have maps that are not multiples of the patch (2)",
                                            "patch_remainder='drop'"]),
    # ResNet
    ("resnet50", {"norm": "group"}, ["norm='group'", "batch norm"]),
    ("resnet50", {"norm": "group", "std_conv": True, "padding": "same"}, ["norm='group'"]),
    ("resnet18", {"std_conv": True}, ["std_conv=True", "weight standardisation"]),
    ("resnet18", {"stem": "small"}, ["stem='small'", "7x7 stride-2 stem"]),
])
def test_what_transformers_cannot_build_is_refused_before_anything_is_written(name, options, words, tmp_path):
    with torch.device("meta"):
        model = vitlab.create_model(name, **options)
    with pytest.raises(ValueError) as e:
        save_hf_folder(model, tmp_path / "hf")
    assert all(w in str(e.value) for w in words), str(e.value)
    assert not (tmp_path / "hf").exists()


def test_export_format_hf_on_the_command_line(tmp_path: Path, capsys) -> None:
    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(FIX / "vit.safetensors"), "--format", "hf", "--output", str(out)]) == 0
    said = capsys.readouterr().out
    assert "AutoModelForImageClassification.from_pretrained" in said and "margin // 2" in said
    assert json.loads((out / "config.json").read_text())["id2label"] == {"0": "cat", "1": "dog", "2": "ship"}
    assert main(["export", "--checkpoint", str(FIX / "vit.safetensors"), "--format", "hf", "--output", str(out)]) != 0
    assert main(["export", "--checkpoint", str(FIX / "vit.safetensors"), "--format", "hf", "--output", str(out),
                 "--overwrite"]) == 0


def test_processors_and_configs_for_the_edge_cases(tmp_path: Path) -> None:
    """What a tester met: a quick-GELU ViT read back, 1-channel and RGBA-safe processors, a non-square input not
    padded with black, nearest resampling noted, one-output heads, a Swin whose padded stages have no shift."""
    tiny = dict(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=3)
    quick = vitlab.create_model("vit_tiny_patch16_224", gelu="quick", **tiny).eval()
    save_hf_folder(quick, tmp_path / "quick")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vitlab.load_model(tmp_path / "quick").eval()(x), quick(x), rtol=0, atol=1e-6)
    assert hf_processor_config(quick)[0]["do_convert_rgb"] is True  # grey / RGBA images to RGB, as vitlab
    grey, notes = hf_processor_config(vitlab.create_model("vit_tiny_patch16_224", **{**tiny, "in_chans": 1}))
    assert grey["do_convert_rgb"] is False and any("pipeline('image-classification')" in n for n in notes)
    wide, notes = hf_processor_config(vitlab.create_model("vit_tiny_patch16_224", **{**tiny, "img_size": (32, 48)}))
    assert wide["image_processor_type"] == "DeiTImageProcessor" and wide["size"] == {"height": 35, "width": 53}
    assert wide["crop_size"] == {"height": 32, "width": 48} and any("squashes every image" in n for n in notes)
    nearest = vitlab.create_model("vit_tiny_patch16_224", **tiny)
    from vitlab.models.base import set_preprocessing_style

    set_preprocessing_style(nearest, interpolation="nearest")
    assert any("backend='pil'" in n for n in hf_processor_config(nearest)[1])
    assert hf_config(vitlab.create_model("vit_tiny_patch16_224", **{**tiny, "num_classes": 1}))["problem_type"] == \
        "single_label_classification"  # transformers would score one output with sigmoid
    # maps 20 and 10 for a window of 6, padded after the shift: with one block per stage nothing is shifted, so
    # padding before or after the shift is the same; with two in stage 0 it is not
    swin = dict(img_size=40, patch_size=2, embed_dim=8, num_heads=(1, 2), window_size=6, num_classes=3)
    assert hf_config(vitlab.create_model("swin_tiny_patch4_window7_224", depths=(1, 1), **swin))["model_type"] == "swin"
    with pytest.raises(ValueError, match=r"stage\(s\) \[0\] pad"):
        hf_config(vitlab.create_model("swin_tiny_patch4_window7_224", depths=(2, 1), **swin))


def test_the_processor_each_new_family_gets(tmp_path: Path) -> None:
    """MobileViTImageProcessor (never normalises) for vitlab's MobileViT statistics, flipping only a BGR model's
    channels; the generic processor for an RGB model with a mean / std; a BGR model with one refused. ResNet:
    ConvNextImageProcessor (as the hub's ResNet folders) where its int(size / crop_pct) is vitlab's resize."""
    from vitlab.models.base import IMAGENET_MEAN, IMAGENET_STD, set_preprocessing_style

    with torch.device("meta"):
        rgb, bgr = vitlab.create_model("mobilevit_xxs"), vitlab.create_model("mobilevit_xxs", channel_order="BGR")
        normalised = vitlab.create_model("mobilevitv2_050", mean=IMAGENET_MEAN, std=IMAGENET_STD)
        normalised_bgr = vitlab.create_model("mobilevit_xxs", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                             channel_order="BGR")
        vit_bgr = vitlab.create_model("vit_tiny_patch16_224")
    for model, flip in ((rgb, False), (bgr, True)):
        config = hf_processor_config(model)[0]
        assert config["image_processor_type"] == "MobileViTImageProcessor"
        assert (config["do_flip_channel_order"], config["do_normalize"]) == (flip, False)
        assert (config["size"], config["crop_size"]) == ({"shortest_edge": 284}, {"height": 256, "width": 256})
    config = hf_processor_config(normalised)[0]
    assert config["image_processor_type"] == "BitImageProcessor" and config["image_mean"] == list(IMAGENET_MEAN)
    # said not to flip: vitlab reads a MobileViT folder as BGR unless its processor says otherwise
    assert config["do_flip_channel_order"] is False
    tiny = vitlab.create_model("mobilevitv2_050", img_size=64, stem_chs=16, channels=(16, 16, 32, 48, 64),
                               transformer_dims=(16, 24, 32), transformer_depths=(1, 1, 1), num_classes=3,
                               mean=IMAGENET_MEAN, std=IMAGENET_STD)
    save_hf_folder(tiny, tmp_path / "hf")
    again = vitlab.load_model(tmp_path / "hf").preprocessing
    assert (again.channel_order, again.mean, again.std) == ("RGB", IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(ValueError, match="does not normalise"):
        hf_processor_config(normalised_bgr)
    set_preprocessing_style(vit_bgr, channel_order="BGR", mean=(0.0,) * 3, std=(1.0,) * 3)
    assert hf_processor_config(vit_bgr)[0]["do_flip_channel_order"] is True  # any family: the flipping processor

    def resnet(**options):
        with torch.device("meta"):
            return hf_processor_config(vitlab.create_model("resnet50", **options))[0]

    assert {k: resnet()[k] for k in ("image_processor_type", "size", "crop_pct")} == {
        "image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": 224}, "crop_pct": 0.875}
    assert resnet(img_size=384)["image_processor_type"] == "BitImageProcessor"  # ConvNext squashes from 384 px on
    assert resnet(img_size=(224, 192))["image_processor_type"] == "DeiTImageProcessor"
    # 224 / 0.56 is 399.99...: ConvNext's int() would resize to 399, vitlab to 400
    assert (resnet(crop_pct=0.56)["image_processor_type"], resnet(crop_pct=0.56)["size"]) == (
        "BitImageProcessor", {"shortest_edge": 400})


def test_notes_of_the_new_families(tmp_path: Path) -> None:
    """Swin v2: transformers' doubled shift mask, noted where the weights' logit scales can make it matter;
    MobileViT v2: the remainder of odd maps, resized by vitlab by default; BEiT: an absolute table transformers
    resamples at every other size."""
    import math

    swin = vitlab.create_model("swinv2_tiny_window8_256", img_size=32, patch_size=2, embed_dim=8, depths=(2, 1),
                               num_heads=(1, 2), window_size=4, num_classes=3)
    assert not any("mask twice" in n for n in save_hf_folder(swin, tmp_path / "swin").notes)  # log(10) at init
    with torch.no_grad():
        swin.layers[0].blocks[1].attn.logit_scale[0] = math.log(50.0)
    notes = save_hf_folder(swin, tmp_path / "swin", overwrite=True).notes
    assert any("mask twice" in n and "up to 50.0" in n for n in notes)

    tiny_v2 = dict(img_size=64, stem_chs=16, channels=(16, 16, 32, 48, 64), transformer_dims=(16, 24, 32),
                   transformer_depths=(1, 1, 1), num_classes=3)
    for remainder, noted in (("resize", True), ("drop", False)):
        model = vitlab.create_model("mobilevitv2_050", patch_remainder=remainder, **tiny_v2)
        notes = save_hf_folder(model, tmp_path / remainder).notes
        assert any("leaves the remainder out" in n for n in notes) == noted

    beit = dict(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=3, use_abs_pos_emb=True,
                use_rel_pos_bias=False)
    for dynamic in (False, True):
        notes = save_hf_folder(vitlab.create_model("beit_base_patch16_224", dynamic_img_size=dynamic, **beit),
                               tmp_path / f"beit{dynamic}").notes
        assert any("resamples the position table, bicubic without antialiasing; vitlab's resamples it antialiased"
                   in n for n in notes) == dynamic


def test_export_format_hf_of_a_new_family_on_the_command_line(tmp_path: Path, capsys, caplog) -> None:
    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(FIX / "mobilevit.safetensors"), "--format", "hf", "--output",
                 str(out), "--json"]) == 0
    said = json.loads(capsys.readouterr().out)
    assert (said["architecture"], said["model_type"]) == ("MobileViTForImageClassification", "mobilevit")
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert processor["do_flip_channel_order"] is True  # the fixture reads BGR, as transformers' own v1 weights
    assert main(["export", "--model", "mobilevitv3_xs", "--format", "hf", "--output", str(tmp_path / "v3")]) != 0
    assert "MobileViT v3" in caplog.text and not (tmp_path / "v3").exists()


# folders transformers wrote itself (save_pretrained), committed with the import tests
_TRANSFORMERS_FOLDERS = ["hf_parity_more/swin", "swin/hf_v2", "hf_parity_more/swinv2", "beit/hf_cls",
                         "hf_parity_more/beit", "beit/hf_data2vec_cls", "mobilevit/hf_v1/hf", "mobilevit/hf_v2/hf",
                         "hf_parity_more/mvit2", "resnet/hf_basic", "resnet/hf_bottleneck"]
# config fields the export writes otherwise, and why: dropout and stochastic depth are training settings (the
# export writes 0); data2vec-vision's classifier is BEiT's, written as beit
_TRAINING_FIELDS = {"classifier_dropout_prob", "hidden_dropout_prob", "drop_path_rate"}


@pytest.mark.parametrize("folder", _TRANSFORMERS_FOLDERS)
def test_a_transformers_folder_read_and_written_back_has_transformers_own_tensors(folder: str, tmp_path: Path) -> None:
    """Independent of the fixtures above: what transformers saved, read by vitlab and exported again, is the same
    tensors under the same names (data2vec-vision's prefix written as beit's), with the same architecture fields."""
    from vitlab.layers import make_divisible

    source = FIX.parent / folder
    save_hf_folder(vitlab.load_model(source), tmp_path / "hf")
    ours, theirs = load_file(tmp_path / "hf" / "model.safetensors"), load_file(source / "model.safetensors")
    theirs = {k.replace("data2vec_vision.", "beit."): v for k, v in theirs.items()}
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k].to(theirs[k].dtype), theirs[k]) for k in ours)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    original = json.loads((source / "config.json").read_text())
    differ = {k for k in config if k in original and config[k] != original[k]} - _TRAINING_FIELDS - {"id2label",
                                                                                                       "label2id"}
    if original["model_type"] == "data2vec-vision":
        assert (config["model_type"], original["architectures"]) == ("beit", ["Data2VecVisionForImageClassification"])
        differ -= {"model_type", "architectures"}
    if "pretrained_window_sizes" in differ:  # transformers keeps its 4-stage default for a 2-stage model
        assert original["pretrained_window_sizes"][:len(config["depths"])] == config["pretrained_window_sizes"]
        differ.remove("pretrained_window_sizes")
    if "base_attn_unit_dims" in differ:  # other bases that give the same widths at this width multiplier
        m = config["width_multiplier"]
        assert [make_divisible(b * m, 8) for b in config["base_attn_unit_dims"]] == \
            [make_divisible(b * m, 8) for b in original["base_attn_unit_dims"]]
        differ.remove("base_attn_unit_dims")
    assert not differ, {k: (config[k], original[k]) for k in differ}
