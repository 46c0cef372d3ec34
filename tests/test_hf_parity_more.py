"""Hugging Face folders on which vitlab used to differ silently from transformers: MobileViTV2 on odd maps, ViT /
DeiT / BEiT position tables resampled at another size, Swin's embedding / merging LayerNorm eps; and the cases it
now names: BEiT's rectangular relative position tables (a warning), rectangular ViT patches (refused).
Fixtures: tests/fixtures/make_fixtures_hf_parity_more.py (transformers, peer env)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vitlab
from vitlab.checkpoints import CheckpointError, save_model, timm_model_args

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "hf_parity_more"
ATOL = 1e-5


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / "io.safetensors")


def pattern(c: int, h: int, w: int) -> torch.Tensor:
    """The generator's input (make_fixtures_hf_parity_more.pattern)."""
    k = torch.arange(2 * c * h * w, dtype=torch.float64)
    return (torch.sin(k * 1.618033988) * torch.cos(k * 0.1 + 0.3)).float().reshape(2, c, h, w)


def _logits(model: torch.nn.Module, h: int, w: int) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(pattern(model.cfg.in_chans, h, w))


# ----------------------------------------------------------------------------------------- MobileViT v2
@pytest.mark.parametrize("hw", [(224, 224), (96, 96), (64, 96), (256, 256)], ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_hf_mobilevitv2_odd_maps_give_transformers_logits(io, hw):
    """transformers unfolds with stride 2 (the last row / column of an odd map skips the transformer and is zero
    after folding) where cvnets / timm resize; 224 px ends on a 7x7 map, 96 px on 3x3, 64x96 on 2x3."""
    model = vitlab.load_model(FIXTURES / "mvit2")
    torch.testing.assert_close(_logits(model, *hw), io[f"mvit2_logits_{hw[0]}x{hw[1]}"], atol=ATOL, rtol=0)
    assert model.cfg.patch_remainder == "drop"


def test_patch_remainder_drop_survives_save_load_and_timm_export_refuses_it(tmp_path):
    model = vitlab.load_model(FIXTURES / "mvit2")
    path = save_model(model, tmp_path / "m.safetensors")
    back = vitlab.load_model(path)
    assert back.cfg.patch_remainder == "drop"
    torch.testing.assert_close(_logits(back, 96, 96), _logits(model, 96, 96), atol=0, rtol=0)
    # timm resizes odd maps: refused where the model's own size gives one; at a multiple of 64 the same model
    with pytest.raises(ValueError, match=r"patch_remainder='drop'.*at 96x96 its feature maps have an odd side"):
        timm_model_args(vitlab.create_model("mobilevitv2_050", patch_remainder="drop", img_size=96))
    found = timm_model_args(vitlab.create_model("mobilevitv2_050", patch_remainder="drop", img_size=128))
    assert any(n.startswith("patch_remainder='drop': the same model at 128x128") for n in found.notes)


@pytest.mark.slow  # a dynamic-size export traces for about a minute
def test_patch_remainder_drop_exports_to_onnx_at_odd_sizes(tmp_path):
    """The dynamic-size graph crops and zero-pads symbolically: right at odd sizes it was not traced at."""
    pytest.importorskip("onnxruntime")
    from vitlab.export import OnnxModel, export_onnx

    model = vitlab.load_model(FIXTURES / "mvit2", img_size=64).eval()
    report = export_onnx(model, tmp_path / "m.onnx", dynamic_size=True, num_images=2, timing=False)
    assert report.written and report.max_abs_diff < 1e-4
    onnx = OnnxModel(tmp_path / "m.onnx")
    for hw in [(96, 96), (64, 96), (104, 72)]:
        x = pattern(3, *hw)
        with torch.no_grad():
            ref = model(x)
        torch.testing.assert_close(onnx(x), ref, atol=1e-4, rtol=1e-4)


def test_hf_mobilevit_v1_keeps_resizing_and_drop_is_refused_for_it():
    """HF's v1 interpolates odd maps as cvnets / timm do: its folders are unaffected."""
    v1 = vitlab.load_model(Path(__file__).resolve().parent / "fixtures" / "mobilevit" / "hf_v1" / "hf")
    assert v1.cfg.patch_remainder == "resize"
    with pytest.raises(ValueError, match="patch_remainder='drop'.*separable attention"):
        vitlab.create_model("mobilevit_xxs", patch_remainder="drop")


# --------------------------------------------------------------------------- ViT / DeiT / BEiT at another size
@pytest.mark.parametrize(("case", "hw"), [("vit", (40, 56)), ("vit", (64, 64)), ("deit", (48, 48)),
                                          ("beit", (48, 40))])
def test_hf_position_table_resampled_as_transformers_does(io, case, hw):
    """Loaded at another size, the table is resampled as transformers' interpolate_pos_encoding does (bicubic,
    no antialiasing; vitlab's own rule antialiases, 1e-4..1e-3 away)."""
    model = vitlab.load_model(FIXTURES / case, img_size=hw)
    out = _logits(model, *hw)
    torch.testing.assert_close(out[0] if isinstance(out, tuple) else out, io[f"{case}_logits_{hw[0]}x{hw[1]}"],
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize(("case", "hw"), [("vit", (40, 56)), ("deit", (48, 48)), ("beit", (48, 40))])
def test_hf_position_table_resampled_per_batch_as_transformers_does(io, case, hw):
    """With dynamic_img_size the table is resampled per batch by the same rule (a Hugging Face folder's model
    records pos_antialias=False): interpolate_pos_encoding=True's numbers at any size."""
    model = vitlab.load_model(FIXTURES / case, dynamic_img_size=True)
    assert model.cfg.pos_antialias is False
    out = _logits(model, *hw)
    torch.testing.assert_close(out[0] if isinstance(out, tuple) else out, io[f"{case}_logits_{hw[0]}x{hw[1]}"],
                               atol=ATOL, rtol=0)
    assert vitlab.create_model("vit_tiny_patch16_224").cfg.pos_antialias is True  # timm's rule for everything else


# ---------------------------------------------------------------------------------------------------- Swin
@pytest.mark.parametrize("case", ["swin", "swinv2"])
def test_hf_swin_layer_norm_eps_only_in_blocks_and_final_norm(io, case):
    """transformers' patch-embedding and patch-merging norms are nn.LayerNorm (eps 1e-5) whatever layer_norm_eps."""
    model = vitlab.load_model(FIXTURES / case)
    torch.testing.assert_close(_logits(model, 16, 16), io[f"{case}_logits_16x16"], atol=ATOL, rtol=0)
    assert model.cfg.norm_eps == 1e-3 and model.cfg.embed_norm_eps == 1e-5
    assert model.patch_embed.norm.eps == 1e-5 and model.layers[1].downsample.norm.eps == 1e-5


# ---------------------------------------------------------------------------------------- named differences
def test_hf_beit_rectangular_relative_tables_warn(caplog):
    with caplog.at_level(logging.WARNING):
        vitlab.load_model(FIXTURES / "beit_rect")
    warned = [r for r in caplog.records if "relative position tables" in r.getMessage()]
    assert len(warned) == 1
    assert "image_size=[16, 24]" in warned[0].getMessage() and "transformers" in warned[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        vitlab.load_model(FIXTURES / "beit", img_size=(48, 40))  # no relative tables: nothing to say
    assert not [r for r in caplog.records if "relative position tables" in r.getMessage()]


def test_hf_vit_rectangular_patch_refused_by_name(tmp_path):
    folder = tmp_path / "vit"
    shutil.copytree(FIXTURES / "vit", folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "patch_size": [8, 4]}))
    with pytest.raises((CheckpointError, ValueError), match=r"patch_size=\[8, 4\].*square patches"):
        vitlab.load_model(folder)


def test_patch_remainder_drop_any_size_path_equals_eager():
    """The graph a dynamic-size export traces (crop and zero-pad always present) computes the eager numbers."""
    from vitlab.layers import tracing_any_size

    model = vitlab.load_model(FIXTURES / "mvit2", img_size=64).eval()
    for hw in [(64, 64), (96, 96), (64, 96)]:
        x = pattern(3, *hw)
        with torch.no_grad():
            ref = model(x)
            with tracing_any_size():
                out = model(x)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("config", "name"), [
    ({"model_type": "mobilevitv2", "width_multiplier": 0.5}, "mobilevitv2_050"),
    ({"model_type": "mobilevitv2", "width_multiplier": 1.75}, "mobilevitv2_175"),
    ({"model_type": "mobilevitv2", "width_multiplier": 0.0625}, "mobilevitv2_100"),  # no such variant: sized by the file
    ({"model_type": "mobilevit", "hidden_sizes": [64, 80, 96]}, "mobilevit_xxs"),
    ({"model_type": "mobilevit", "hidden_sizes": [96, 120, 144]}, "mobilevit_xs"),
    ({"model_type": "mobilevit"}, "mobilevit_s"),
])
def test_hf_mobilevit_folders_build_as_the_variant_they_are(tmp_path, config, name):
    """An HF MobileViTV2 at width 0.5 was built as mobilevitv2_100 with its widths changed: the same numbers, but
    timm (whose MobileViT takes no width arguments) export refused it as another model."""
    from vitlab.models.factory import model_name_of

    (tmp_path / "config.json").write_text(json.dumps(config))
    assert model_name_of(tmp_path) == name
