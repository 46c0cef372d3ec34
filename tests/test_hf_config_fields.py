"""Hugging Face config.json fields that change the computation: vitlab honours them (transformers' outputs to
1e-5) or refuses the folder, naming the field; never a silently different model.

Fixtures: fixtures/hf_config_fields.json.gz (make_fixtures_hf_config_fields.py, transformers in the peer env):
per case the config.json, the saved file's layout and transformers' outputs. The weights are a fixed function
of each tensor's name and shape (the generator's ``fill``, imported from it), written here into a folder that
``vitlab.load_model`` reads as a user's ``save_pretrained`` folder.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import vitlab
from vitlab.checkpoints import CheckpointError

from model_helpers import perturb_

FIX = Path(__file__).resolve().parent / "fixtures"
with gzip.open(FIX / "hf_config_fields.json.gz", "rt") as _f:
    CASES = {c["name"]: c for c in json.load(_f)["cases"]}
ATOL = 1e-5
def _generator():
    """The fixture generator's module (it imports transformers only inside the functions that build the cases):
    its ``fill`` and ``make_input`` are the weights and input the expected outputs were made with."""
    spec = importlib.util.spec_from_file_location("make_fixtures_hf_config_fields",
                                                  FIX / "make_fixtures_hf_config_fields.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_GEN = _generator()
fill, make_input = _GEN.fill, _GEN.make_input


def hf_folder(tmp_path: Path, name: str, **changes: Any) -> Path:
    """The case as a save_pretrained folder; ``changes`` replace config fields (dicts are merged one level)."""
    case = CASES[name]
    config = dict(case["config"])
    for k, v in changes.items():
        config[k] = {**config[k], **v} if isinstance(v, dict) else v
    folder = Path(tempfile.mkdtemp(prefix=f"{name}_", dir=tmp_path))
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: fill(k, s, d) for k, (s, d) in case["layout"].items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    return folder


def load(tmp_path: Path, name: str, **changes: Any) -> torch.nn.Module:
    return vitlab.load_model(hf_folder(tmp_path, name, **changes)).eval()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    tol = ATOL * max(1.0, expected.abs().max().item())
    err = (actual - expected).abs().max().item()
    assert err <= tol, f"{what}: max abs difference {err:.3g} > {tol:.3g}"


# ------------------------------------------------------------------------------------------- honoured
@pytest.mark.parametrize("name", sorted(CASES))
def test_folder_gives_transformers_outputs(tmp_path, name):
    torch.manual_seed(0)
    model = load(tmp_path, name)
    case = CASES[name]
    with torch.no_grad():
        y = model(make_input(case["input_shape"]))
    expected = {k: torch.tensor(v) for k, v in case["outputs"].items()}
    if isinstance(y, dict):  # DETR
        assert_close(y["logits"], expected["logits"], f"{name} logits")
        assert_close(y["boxes"], expected["pred_boxes"], f"{name} boxes")
    else:
        key = "logits" if "logits" in expected else "pooler_output"
        assert_close(y, expected[key], f"{name} {key}")


def test_mobilevit_fields_reach_the_config(tmp_path):
    assert load(tmp_path, "mobilevit_eps").cfg.norm_eps == 0.5
    m = load(tmp_path, "mobilevit_patch4_img96")
    assert m.cfg.patch_size == 4 and m.preprocessing.input_size == (3, 96, 96)
    m = load(tmp_path, "mobilevit_noqkvbias_mlp3")
    assert m.cfg.mlp_ratio == 3.0 and m.cfg.qkv_bias is False
    m = load(tmp_path, "mobilevit_kernel5")  # a v1 file with 5x5 local / fusion convolutions, not a v3 one
    assert (m.cfg.version, m.cfg.kernel_size) == ("v1", 5)
    m = load(tmp_path, "mobilevitv2_eps_ffn3")
    assert (m.cfg.version, m.cfg.mlp_ratio, m.cfg.norm_eps) == ("v2", 3.0, 0.3)


def test_mobilevit_kernel5_file_is_named_v1_when_a_v3_model_is_asked_for(tmp_path):
    folder = hf_folder(tmp_path, "mobilevit_kernel5")
    with pytest.raises(CheckpointError, match=r"MobileViT v1 .* but the model is MobileViT v3"):
        vitlab.create_model("mobilevitv3_s", pretrained=folder)


def test_hf_swin_pads_before_the_shift_and_timm_order_stays_the_default(tmp_path):
    from vitlab.models.swin import SwinTransformer

    assert load(tmp_path, "swinv2_window6_pad").cfg.pad_before_shift is True
    hf = load(tmp_path, "swin_window6_pad")
    assert hf.cfg.pad_before_shift is True
    timm_order = SwinTransformer(dataclasses.replace(hf.cfg, pad_before_shift=False)).eval()
    timm_order.load_state_dict(hf.state_dict())
    assert vitlab.create_model("swin_tiny_patch4_window7_224").cfg.pad_before_shift is False
    x = make_input([2, 3, 32, 32])
    expected = torch.tensor(CASES["swin_window6_pad"]["outputs"]["logits"])
    with torch.no_grad():  # window 6 pads the 16x16 and 8x8 maps: the orders differ there
        assert (timm_order(x) - expected).abs().max() > 100 * ATOL * expected.abs().max()
    kw = dict(img_size=32, patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4,
              num_classes=3)  # window 4 divides both maps: the two orders are the same computation
    a = perturb_(vitlab.create_model("swin_tiny_patch4_window7_224", **kw), std=0.3).eval()
    b = vitlab.create_model("swin_tiny_patch4_window7_224", pad_before_shift=True, **kw).eval()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_window_analysis_refuses_the_pad_first_layout(tmp_path):
    from vitlab.analysis.windows import analysis_steps

    model = load(tmp_path, "swin_window6_pad")
    with torch.no_grad():
        model(make_input([1, 3, 32, 32]))
    with pytest.raises(ValueError, match="pad_before_shift"):
        analysis_steps(model)


def test_detr_fields_reach_the_config(tmp_path):
    m = load(tmp_path, "detr_decoder_heads")
    assert (m.cfg.num_heads, m.cfg.dec_num_heads) == (2, 4)
    assert m.decoder.layers[0].self_attn.num_heads == 4 and m.encoder.layers[0].attn.num_heads == 2
    assert load(tmp_path, "detr_downsample_in_bottleneck").backbone.cfg.stride_in_1x1 is True
    bb = load(tmp_path, "detr_downsample_in_first_stage").backbone.cfg
    assert bb.first_stage_stride == 2 and bb.reduction == 64


def test_headless_beit_model_pools_as_its_config_says(tmp_path):
    m = load(tmp_path, "beit_model_cls_pool")
    assert m.cfg.global_pool == "token" and m.num_classes == 0
    m = load(tmp_path, "beit_model_cls_pool", use_mean_pooling=True)
    assert m.cfg.global_pool == "avg"


# -------------------------------------------------------------------------------------------- refused
RECT = {"image_size": [32, 48], "patch_size": 4, "window_size": 8}  # 8x12 map: HF clamps both axes, vitlab one


@pytest.mark.parametrize(("name", "changes", "message"), [
    ("mobilevit_eps", {"hidden_act": "gelu"}, r"hidden_act='gelu'.*SiLU"),
    ("mobilevitv2_kernel5", {"hidden_act": "relu"}, r"hidden_act='relu'.*SiLU"),
    ("mobilevit_eps", {"output_stride": 16}, r"output_stride=16.*output_stride=32 only"),
    ("mobilevit_kernel5", {"conv_kernel_size": 4}, r"conv_kernel_size=4.*odd kernels only"),
    ("mobilevit_eps", {"patch_size": [2, 4]}, r"patch_size=\[2, 4\].*square patches only"),
    ("swin_window6_pad", RECT, r"image_size=\[32, 48\].*window_size=8.*stage 0 a 8x12 map"),
    ("swinv2_window6_pad", RECT, r"image_size=\[32, 48\].*window_size=8.*stage 0 a 8x12 map"),
    ("detr_decoder_heads", {"backbone_config": {"hidden_act": "gelu"}}, r"backbone_config.hidden_act='gelu'"),
], ids=["mobilevit_gelu", "mobilevitv2_relu", "mobilevit_output_stride", "mobilevit_even_kernel",
        "mobilevit_rect_patch", "swin_rect_clamp", "swinv2_rect_clamp", "detr_backbone_gelu"])
def test_unsupported_field_is_refused_by_name(tmp_path, name, changes, message):
    with pytest.raises(CheckpointError, match=message):
        load(tmp_path, name, **changes)
