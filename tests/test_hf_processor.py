"""A Hugging Face folder's preprocessor_config.json and problem_type, and a timm hub config's crop mode.

The pixel fixtures are transformers' own processors' outputs (tests/fixtures/make_fixtures_hf_processor.py): vitlab's
eval transform, set from the processor's file, must give the same input up to the resize kernels' rounding
(transformers resizes uint8 images; vitlab floats). Before vitlab read the file, the mean difference was 0.2-0.8.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
import torch

import vitlab
from vitlab.checkpoints.hf_processor import processor_style
from vitlab.data import eval_transform, load_image
from vitlab.models.base import Preprocessing

FIX = Path(__file__).parent / "fixtures"
PROC = FIX / "hf_processor"
CASES = json.loads(gzip.open(PROC / "cases.json.gz", "rt").read())
DEIT_HF = FIX / "deit_hf_plain_tiny"  # a transformers DeiTForImageClassification folder, 32 px, 10 labels


@pytest.mark.parametrize("name", sorted(CASES["cases"]))
def test_eval_transform_from_a_processor_file_gives_the_processors_pixels(name: str) -> None:
    case = CASES["cases"][name]
    style, notes = processor_style(case["config"], tuple(case["input_size"]))
    assert notes == []
    transform = eval_transform(Preprocessing(input_size=(3, *case["input_size"]), **style))
    for image, expected in zip(CASES["images"], case["pixel_values"]):
        diff = (transform(load_image(PROC / image)) - torch.tensor(expected, dtype=torch.float32)).abs()
        assert diff.mean() < 0.01 and diff.max() < 0.15, (name, image, diff.mean().item(), diff.max().item())


def test_processor_fields_vitlab_cannot_follow_are_named() -> None:
    config = {"image_processor_type": "ViTImageProcessor", "resample": 1, "do_resize": True,
              "size": {"shortest_edge": 40, "longest_edge": 80}}
    style, notes = processor_style(config, (32, 32))
    assert style["interpolation"] == "bicubic" and style["crop_mode"] == "center"
    assert any("lanczos" in n for n in notes) and any("longest_edge 80" in n for n in notes)
    assert any("keeps the aspect ratio" in n for n in notes)
    # the old feature-extractor spelling: an integer size is the shortest edge for MobileViT, both sides for ViT
    mobile, _ = processor_style({"feature_extractor_type": "MobileViTFeatureExtractor", "size": 288, "crop_size": 256,
                                 "do_center_crop": True, "resample": 2}, (256, 256))
    assert mobile == {"interpolation": "bilinear", "crop_mode": "center", "crop_pct": 256 / 288, "mean": (0.0,),
                      "std": (1.0,), "channel_order": "BGR", "crop_offset": "floor"}
    vit, _ = processor_style({"feature_extractor_type": "ViTFeatureExtractor", "size": 224, "resample": 2,
                              "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}, (224, 224))
    assert vit["crop_mode"] == "squash" and vit["crop_pct"] == 1.0


def _hf_folder(tmp_path: Path, processor: dict | None = None, **config: object) -> Path:
    folder = tmp_path / "hf"
    shutil.copytree(DEIT_HF, folder)
    if config:
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(config)
        (folder / "config.json").write_text(json.dumps(cfg))
    if processor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    return folder


def test_a_folders_processor_sets_the_models_preprocessing_and_survives_save(tmp_path: Path) -> None:
    case = CASES["cases"]["vit_squash_bilinear"]
    default = vitlab.load_model(_hf_folder(tmp_path / "a")).preprocessing
    model = vitlab.load_model(_hf_folder(tmp_path / "b", case["config"]))
    pre = model.preprocessing
    assert (pre.crop_mode, pre.crop_pct, pre.interpolation) == ("squash", 1.0, "bilinear")
    assert pre.mean == (0.2, 0.3, 0.4) and pre.std == (0.3, 0.2, 0.25) and pre.input_size == default.input_size
    assert (default.crop_mode, default.interpolation) == ("center", "bicubic")  # no processor file: the family's
    expected = torch.tensor(case["pixel_values"][0], dtype=torch.float32)
    assert (eval_transform(pre)(load_image(PROC / CASES["images"][0])) - expected).abs().mean() < 0.01
    saved = vitlab.save_model(model, tmp_path / "model.safetensors")
    assert vitlab.load_model(saved).preprocessing == pre  # a vitlab file keeps the folder's preprocessing
    assert model.pretrained_cfg["crop_mode"] == "squash"


def test_explicit_preprocessing_arguments_win_over_the_processor_file(tmp_path: Path) -> None:
    folder = _hf_folder(tmp_path, CASES["cases"]["deit_squash_crop"]["config"])
    model = vitlab.load_model(folder, crop_pct=0.95, mean=(0.1, 0.1, 0.1))
    pre = model.preprocessing
    assert pre.crop_pct == 0.95 and pre.mean == (0.1, 0.1, 0.1)
    assert pre.crop_mode == "squash" and pre.interpolation == "bicubic"  # the rest from the file


def test_timm_hub_crop_mode_is_applied(tmp_path: Path) -> None:
    folder = tmp_path / "hub"
    shutil.copytree(FIX / "interop" / "timm_hub", folder)
    config = json.loads((folder / "config.json").read_text())
    config["pretrained_cfg"].update(crop_mode="squash", interpolation="bilinear")
    (folder / "config.json").write_text(json.dumps(config))
    pre = vitlab.load_model(folder).preprocessing
    assert (pre.crop_mode, pre.interpolation, pre.crop_pct) == ("squash", "bilinear", 0.95)


def test_squash_resizes_both_sides_and_center_keeps_the_aspect() -> None:
    image = torch.zeros(3, 20, 40, dtype=torch.uint8)
    image[:, :, :10] = 255  # a white band on the left quarter
    squash = eval_transform(Preprocessing(input_size=(3, 16, 16), crop_pct=1.0, crop_mode="squash", mean=(0,),
                                          std=(1,)))(image)
    center = eval_transform(Preprocessing(input_size=(3, 16, 16), crop_pct=1.0, mean=(0,), std=(1,)))(image)
    assert squash[0, :, :4].min() > 0.9 and squash[0, :, 4:].max() < 0.6  # the band kept, a quarter of the width
    assert center[0].max() < 0.6  # the centre crop cuts the band away


def test_resize_side_does_not_lose_a_pixel_to_float_rounding() -> None:
    assert Preprocessing(input_size=(3, 256, 256), crop_pct=256 / 288).resize_side(256) == 288
    assert Preprocessing(crop_pct=0.9).resize_side(224) == 248  # timm's floor otherwise
    with pytest.raises(ValueError, match="crop_mode must be 'center' or 'squash'"):
        Preprocessing(crop_mode="border")


# ------------------------------------------------------------------------------- scores: problem_type
def _predict_json(capsys: pytest.CaptureFixture, *args: str) -> list[dict]:
    from vitlab.cli.main import main

    assert main(["predict", *args, "--json", "--threads", "1"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(("config", "expected"), [
    ({"problem_type": "multi_label_classification"}, "sigmoid"),
    ({"problem_type": "regression"}, "none"),
    ({}, "softmax"),
])
def test_predict_scores_follow_the_hf_problem_type(config: dict, expected: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    folder = _hf_folder(tmp_path, **config)
    model = vitlab.load_model(folder).eval()
    assert getattr(model, "score_function", "softmax") == expected
    image = PROC / CASES["images"][0]
    with torch.no_grad():
        logits = model(eval_transform(model.preprocessing)(load_image(image))[None])[0]
    scores = {"sigmoid": logits.sigmoid(), "none": logits, "softmax": logits.softmax(-1)}[expected]
    out = _predict_json(capsys, str(image), "--checkpoint", str(folder), "--topk", "3")
    key = "score" if expected == "none" else "probability"
    got = [(p["index"], p[key]) for p in out[0]["predictions"]]
    top = scores.topk(3)
    assert [i for i, _ in got] == top.indices.tolist()
    assert [v for _, v in got] == pytest.approx(top.values.tolist(), abs=1e-5)
    saved = vitlab.save_model(model, tmp_path / "m.safetensors")  # kept in vitlab's own file
    assert getattr(vitlab.load_model(saved), "score_function", "softmax") == expected


def test_predict_scores_option_overrides_the_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = _hf_folder(tmp_path, problem_type="multi_label_classification")
    out = _predict_json(capsys, str(PROC / CASES["images"][0]), "--checkpoint", str(folder), "--scores", "softmax",
                        "--topk", "10")
    assert sum(p["probability"] for p in out[0]["predictions"]) == pytest.approx(1.0, abs=1e-4)


def test_a_single_label_head_gets_a_sigmoid(tmp_path: Path) -> None:
    from vitlab.checkpoints import read_source, resolve
    from vitlab.models.factory import _score_function

    folder = _hf_folder(tmp_path, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    assert _score_function(read_source(resolve(folder), "deit")) == "sigmoid"


def test_predict_with_a_backbone_says_it_has_no_classes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from vitlab.cli.main import main

    backbone = vitlab.save_model(vitlab.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=1,
                                                     num_classes=0), tmp_path / "b.safetensors")
    assert main(["predict", str(PROC / CASES["images"][0]), "--checkpoint", str(backbone)]) != 0
    assert "a backbone without a classifier" in caplog.text and "--protocol knn" in caplog.text
