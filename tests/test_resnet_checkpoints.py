"""ResNet files users have: timm / torchvision classifiers and Hugging Face ``ResNetForImageClassification`` folders,
read with identical outputs, and written back in timm's layout.

Fixtures: tests/fixtures/resnet/make_fixtures_resnet.py (peer environment: timm 1.0.31, transformers).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vitlab
from vitlab.checkpoints import CheckpointError, save_timm, save_timm_folder, timm_model_args, to_timm_state_dict
from vitlab.models.factory import load_model

FIX = Path(__file__).parent / "fixtures" / "resnet"
TOL = dict(atol=2e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return load_file(FIX / "io.safetensors")


@pytest.mark.parametrize("case, name", [("timm_basic", "resnet18"), ("timm_bottleneck", "resnet50")])
def test_timm_and_torchvision_files_give_timms_logits(case: str, name: str, io: dict) -> None:
    path = FIX / f"{case}.safetensors"
    for model in (vitlab.create_model(name, pretrained=path), load_model(path, model_name=name)):
        model.eval()
        assert model.num_classes == 5
        with torch.no_grad():
            torch.testing.assert_close(model(io["x"]), io[case], **TOL)


def test_a_file_without_batch_counters_loads() -> None:
    """torchvision files saved before PyTorch 0.4.1 have no ``num_batches_tracked``."""
    sd = {k: v for k, v in load_file(FIX / "timm_basic.safetensors").items() if not k.endswith("num_batches_tracked")}
    from vitlab.checkpoints.convert_resnet import convert_timm_resnet

    converted = convert_timm_resnet(sd, {})
    model = vitlab.create_model("resnet18", **{k: v for k, v in converted.overrides.items() if k != "block"})
    model.load_state_dict(converted.state_dict, strict=True)
    assert int(model.stem.norm.num_batches_tracked) == 0


@pytest.mark.parametrize("case, stride_in_1x1, first_stride", [("hf_bottleneck", True, 1), ("hf_basic", False, 2)])
def test_hugging_face_folders_give_transformers_logits(case: str, stride_in_1x1: bool, first_stride: int,
                                                        io: dict) -> None:
    model = load_model(FIX / case).eval()
    assert model.cfg.stride_in_1x1 is stride_in_1x1 and model.cfg.first_stage_stride == first_stride
    assert model.num_classes == 3 and model.class_names == ["LABEL_0", "LABEL_1", "LABEL_2"]
    with torch.no_grad():
        torch.testing.assert_close(model(io["x"]), io[case], **TOL)


def test_other_timm_resnets_are_refused_by_name(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    keys = json.loads((FIX / "timm_deep_stem_keys.json").read_text())
    save_file({k: torch.zeros(1) for k in keys}, str(tmp_path / "resnet50d.safetensors"))
    with pytest.raises(CheckpointError, match=r"a deep stem \(timm's resnet\*c / \*d / \*s.*plain v1.5 ResNet"):
        vitlab.create_model("resnet50", pretrained=tmp_path / "resnet50d.safetensors")


@pytest.mark.parametrize("case, name", [("timm_basic", "resnet18"), ("timm_bottleneck", "resnet50")])
def test_written_back_in_timms_layout_tensor_for_tensor(case: str, name: str, tmp_path: Path) -> None:
    """timm's file -> vitlab -> timm's layout gives the file back (names, shapes, values), and the create_model call
    vitlab writes builds timm's architecture (its arguments are those the fixture generator passed)."""
    source = load_file(FIX / f"{case}.safetensors")
    model = vitlab.create_model(name, pretrained=FIX / f"{case}.safetensors")
    back = to_timm_state_dict(model)
    assert sorted(back) == sorted(source)
    for k, v in source.items():
        torch.testing.assert_close(back[k].to(v.dtype), v, rtol=0, atol=0)
    args = timm_model_args(model)
    assert (args.model_name, args.kwargs) == (name, {"channels": [4, 8, 8, 16], "layers": list(model.cfg.layers),
                                                     "num_classes": 5})
    save_timm(model, tmp_path / "back.safetensors")
    save_timm_folder(model, tmp_path / "hub")  # a timm hub folder: config.json's model_args carry timm's widths
    x = torch.randn(1, 3, 32, 32)
    for again in (vitlab.create_model(name, pretrained=tmp_path / "back.safetensors"), load_model(tmp_path / "hub")):
        with torch.no_grad():
            torch.testing.assert_close(again.eval()(x), model.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("option, message", [
    (dict(stem="small"), r"stem='small'"),
    (dict(stem_chs=32), r"stem_chs=32: timm's ResNet gives its 7x7 stem 64 channels"),
    (dict(stride_in_1x1=True), r"stride_in_1x1=True: timm's ResNet strides on the bottleneck's 3x3"),
    (dict(norm="group"), r"norm='group'"),
])
def test_resnets_timm_cannot_build_are_refused(option: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        timm_model_args(vitlab.create_model("resnet50", layers=(1, 1, 1, 1), **option))


def test_a_bottleneck_resnet18_is_written_as_timms_resnet50() -> None:
    """timm's block kind comes with the name: vitlab's resnet18 built with bottleneck blocks is timm's resnet50 with
    its layers."""
    args = timm_model_args(vitlab.create_model("resnet18", block="bottleneck"))
    assert args.model_name == "resnet50" and args.kwargs == {"layers": [2, 2, 2, 2]}


@pytest.mark.parametrize("variant, words", [
    ("resnext50_32x4d", "grouped 3x3 convolutions (ResNeXt"),
    ("wide_resnet50_2", "bottlenecks 2x narrower than their output, not 4x (timm's wide_resnet"),
    ("resnet50_gn", "norms without running statistics (group norm"),
    ("skresnet18", "selective-kernel convolutions (timm's skresnet"),
])
def test_timm_resnet_variants_with_the_plain_names_are_refused_by_name(variant: str, words: str,
                                                                        tmp_path: Path) -> None:
    from safetensors.torch import save_file

    shapes = json.loads((FIX / "timm_variant_shapes.json").read_text())[variant]
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(tmp_path / f"{variant}.safetensors"))
    with pytest.raises(CheckpointError, match=re.escape(words)):
        vitlab.create_model("resnet50", pretrained=tmp_path / f"{variant}.safetensors")


def test_timm_hub_folders_of_resnets(tmp_path: Path) -> None:
    """A ResNet's timm hub folder says its input size is not fixed (timm's loader would pass img_size, which timm's
    ResNet does not take); a hub folder of a timm ResNet variant is refused by name, timm's plain deeper ResNets are
    read as vitlab's ResNet sized from the tensors."""
    model = vitlab.create_model("resnet18", pretrained=FIX / "timm_basic.safetensors")
    save_timm_folder(model, tmp_path / "hub")
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert config["pretrained_cfg"]["fixed_input_size"] is False
    for arch, refused in (("resnetaa50", True), ("resnet50d.gluon_in1k", True), ("resnetv2_50", True),
                          ("resnet26", False)):
        config["architecture"] = arch
        (tmp_path / "hub" / "config.json").write_text(json.dumps(config))
        with pytest.raises(CheckpointError) as e:
            load_model(tmp_path / "hub")
        assert ("is a ResNet variant that vitlab's ResNet does not build" in str(e.value)) is refused, str(e.value)
    loaded = load_model(tmp_path / "hub", model_name="resnet18")  # named (basic blocks), sized from the tensors
    assert loaded.cfg.block == "basic" and loaded.cfg.layers == (1, 1, 1, 1)
