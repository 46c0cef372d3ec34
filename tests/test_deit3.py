"""DeiT III under timm's names (``deit3_*``): a position table for the patch tokens only (timm's
``no_embed_class=True``) and LayerScale. Reference outputs: a tiny timm deit3 model
(tests/fixtures/make_fixtures_deit3.py), at its size and at 48 px (timm's checkpoint_filter_fn resampling).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vitlab
from vitlab.checkpoints import save_timm_folder, timm_model_args
from vitlab.cli.main import main

FIX = Path(__file__).resolve().parent / "fixtures"
D3 = FIX / "deit3"
NAME = "deit3_small_patch16_224"
ARCH = dict(patch_size=8, embed_dim=64, depth=2, num_heads=2)  # the fixture's model
ATOL = 1e-5
IO = load_file(str(D3 / "io.safetensors"))


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= ATOL


@pytest.mark.parametrize("size", [32, 48])
def test_timm_state_dict_gives_timms_logits_at_its_size_and_another(size):
    m = vitlab.create_model(NAME, pretrained=D3 / "timm_deit3.safetensors", img_size=size, **ARCH).eval()
    assert m.pos_embed.shape == (1, (size // 8) ** 2, 64) and m.pos_embed_prefix == 0
    with torch.no_grad():
        _close(m(IO[f"input_{size}"]), IO[f"logits_{size}"])
        if size == 32:
            _close(m.forward_features(IO["input_32"]), IO["features_32"])


def test_timm_hub_folder_loads_as_its_architecture():
    """timm's save_for_hf folder: config.json names deit3_small_patch16_224 and sets the tiny sizes."""
    m = vitlab.load_model(D3 / "hub").eval()
    assert m.model_name == NAME and m.cfg.no_embed_class and m.num_classes == 5
    again = vitlab.create_model(NAME, pretrained=D3 / "hub").eval()
    with torch.no_grad():
        _close(m(IO["input_32"]), IO["logits_32"])
        _close(again(IO["input_32"]), IO["logits_32"])
    pre = m.preprocessing
    assert pre.input_size == (3, 32, 32) and pre.crop_pct == pytest.approx(0.9)
    assert pre.mean == pytest.approx((0.485, 0.456, 0.406))


def test_names_build_timms_architecture_and_run():
    cfg = vitlab.get_entry("deit3_medium_patch16_224").config
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.qkv_bias) == (512, 12, 8, True)
    assert cfg.init_values == 1e-6 and cfg.no_embed_class
    huge = vitlab.get_entry("deit3_huge_patch14_224").config
    assert (huge.patch_size, huge.embed_dim, huge.depth) == (14, 1280, 32)
    m = vitlab.create_model("deit3_base_patch16_384", depth=1, embed_dim=32, num_heads=2, img_size=64).eval()
    assert m.pos_embed.shape == (1, 16, 32) and m(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_official_deit3_file_loads_into_the_deit3_name():
    """facebookresearch/deit models_v2 layout (gamma_1 / gamma_2), read as timm reads it, at 32 and 48 px."""
    io = load_file(str(FIX / "official_more_deit3_io.safetensors"))
    for size in (32, 48):
        m = vitlab.create_model(NAME, pretrained=FIX / "official_more_deit3.pth", img_size=size, patch_size=8,
                                embed_dim=32, depth=2, num_heads=4).eval()
        assert m.pos_embed.shape[1] == (size // 8) ** 2
        with torch.no_grad():
            _close(m(io[f"input_{size}"]), io[f"logits_{size}"])


def test_a_class_entry_moves_into_the_class_token_exactly(tmp_path):
    """A table with a (trained, non-zero) class entry, loaded into a deit3 name: the entry is added to the class
    token, which then gives the same outputs, also after resampling the grid."""
    torch.manual_seed(0)
    plain = vitlab.create_model("deit_small_patch16_224", init_values=0.1, img_size=32, num_classes=5, **ARCH)
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert plain.pos_embed.shape[1] == 17 and plain.pos_embed[0, 0].abs().sum() > 0
    torch.save(plain.state_dict(), tmp_path / "plain.pth")
    for size in (32, 48):
        ref = vitlab.create_model("deit_small_patch16_224", pretrained=tmp_path / "plain.pth", img_size=size,
                                  **ARCH).eval()
        m = vitlab.create_model(NAME, pretrained=tmp_path / "plain.pth", img_size=size, **ARCH).eval()
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            _close(m(x), ref(x))


def test_a_name_with_a_class_entry_points_to_the_deit3_names():
    from vitlab.checkpoints import CheckpointError

    with pytest.raises(CheckpointError, match=r"no_embed_class=True \(DeiT-3\); load it with a deit3_\* name"):
        vitlab.create_model("vit_small_patch16_224", pretrained=D3 / "timm_deit3.safetensors", img_size=32, **ARCH)


def test_export_writes_timms_deit3_layout(tmp_path):
    """The exported folder holds the timm file's own tensors (timm loads them strictly: timm's logits), under
    config.json's architecture deit3_small_patch16_224; vitlab reads it back to the same logits."""
    m = vitlab.create_model(NAME, pretrained=D3 / "timm_deit3.safetensors", img_size=32, **ARCH).eval()
    args = timm_model_args(m)
    assert args.model_name == NAME and "no_embed_class" not in args.kwargs
    save_timm_folder(m, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architecture"] == NAME and "no_embed_class" not in config.get("model_args", {})
    got, want = load_file(str(tmp_path / "out" / "model.safetensors")), load_file(str(D3 / "timm_deit3.safetensors"))
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    back = vitlab.load_model(tmp_path / "out").eval()
    with torch.no_grad():
        _close(back(IO["input_32"]), IO["logits_32"])


def test_export_states_no_embed_class_where_the_name_does_not():
    m = vitlab.create_model("deit_small_patch16_224", no_embed_class=True, img_size=32, **ARCH)
    assert timm_model_args(m).kwargs["no_embed_class"] is True
    m = vitlab.create_model(NAME, no_embed_class=False, img_size=32, **ARCH)
    assert timm_model_args(m).kwargs["no_embed_class"] is False


def test_no_embed_class_with_a_distillation_token_is_refused_by_name():
    with pytest.raises(ValueError, match="no_embed_class=False"):
        vitlab.create_model(NAME, distilled=True, img_size=32, **ARCH)
    with pytest.raises(ValueError, match="no_embed_class=True .*pos_embed='learn'"):
        vitlab.create_model(NAME, pos_embed="sincos", img_size=32, **ARCH)


def test_cli_lists_and_describes_the_names(capsys):
    assert main(["models", "deit3*"]) == 0
    out = capsys.readouterr().out
    assert "deit3_huge_patch14_224" in out and "deit3_small_patch16_384" in out
    assert main(["info", NAME]) == 0
    out = capsys.readouterr().out
    assert "22,059,496" in out and "crop fraction  0.9" in out  # timm's parameter count and crop


def test_a_distilled_deit3_has_no_timm_layout():
    m = vitlab.create_model(NAME, distilled=True, no_embed_class=False, img_size=32, **ARCH)
    with pytest.raises(ValueError, match="timm has no distilled DeiT III"):
        timm_model_args(m)
