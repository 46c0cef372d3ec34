"""Checkpoint options that vitlab read wrongly or refused although it has them: timm's Swin window spellings in hub
folders (an (h, w) pair is one window for every stage; a per-stage list), Hugging Face ViT / DeiT folders with the
tanh GELU. Fixtures: tests/fixtures/make_fixtures_hf_gelu.py (transformers, peer env)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vitlab
from vitlab.checkpoints import CheckpointError, save_timm_folder

HF_GELU = Path(__file__).resolve().parent / "fixtures" / "hf_gelu"
SWIN = dict(img_size=64, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), num_classes=3)


def _swin(name: str = "swin_tiny_patch4_window7_224", **kw: object) -> torch.nn.Module:
    torch.manual_seed(0)
    model = vitlab.create_model(name, **{**SWIN, **kw}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _set_model_args(folder: Path, **args: object) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["model_args"].update(args)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256"])
def test_timm_hub_window_pair_is_one_window_for_every_stage(tmp_path, name):
    """timm's resolve_stage_window_sizes: window_size=[4, 4] is one 4x4 window (it was refused as 'one entry per
    stage'), also written as a per-stage list of pairs."""
    model = _swin(name, window_size=4)
    x = torch.randn(2, 3, 64, 64)
    save_timm_folder(model, tmp_path / "hub")
    for spelling in ([4, 4], [[4, 4]] * 4, [4, [4, 4], 4, 4]):
        _set_model_args(tmp_path / "hub", window_size=spelling)
        back = vitlab.load_model(tmp_path / "hub")
        assert back.cfg.windows() == (4, 4, 4, 4), spelling
        torch.testing.assert_close(_logits(back, x), _logits(model, x), atol=0, rtol=0)


def test_timm_hub_non_square_window_is_refused_not_read_per_stage(tmp_path):
    """A 2-stage Swin v2 with window_size=[4, 2]: timm builds one 4x2 window; vitlab read a 4x4 then a 2x2 window
    (its log-CPB has no table to mismatch: different logits, no word). Now a refusal naming the file."""
    model = _swin("swinv2_tiny_window8_256", window_size=4, depths=(1, 1), num_heads=(1, 2))
    save_timm_folder(model, tmp_path / "hub")
    _set_model_args(tmp_path / "hub", window_size=[4, 2])
    with pytest.raises(CheckpointError, match=r"config\.json: timm model_args window_size=\[4, 2\]: a 4x2 window"):
        vitlab.load_model(tmp_path / "hub")


@pytest.mark.parametrize("depths, heads", [((1, 1, 1, 1), (1, 1, 2, 2)), ((1, 1), (1, 2))], ids=["4-stage", "2-stage"])
def test_per_stage_windows_export_to_timm_as_pairs_and_read_back(tmp_path, depths, heads):
    """timm (1.0) takes one window per stage; the export wrote none (refused). A flat 2-entry list would be one
    (h, w) window in timm, so the export writes pairs; checked in timm by hand (logits equal to 2.4e-7)."""
    windows = (4, 2, 2, 2)[:len(depths)]
    model = _swin(window_size=windows, depths=depths, num_heads=heads)
    save_timm_folder(model, tmp_path / "hub")
    args = json.loads((tmp_path / "hub" / "config.json").read_text())["model_args"]
    assert args["window_size"] == [[w, w] for w in windows]
    back = vitlab.load_model(tmp_path / "hub")
    assert back.cfg.windows() == windows
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(_logits(back, x), _logits(model, x), atol=0, rtol=0)


def pattern(c: int, h: int, w: int) -> torch.Tensor:
    """The generator's input (make_fixtures_hf_gelu.pattern)."""
    k = torch.arange(2 * c * h * w, dtype=torch.float64)
    return (torch.sin(k * 1.618033988) * torch.cos(k * 0.1 + 0.3)).float().reshape(2, c, h, w)


@pytest.mark.parametrize("case", ["vit_gelu_new", "deit_gelu_pytorch_tanh"])
def test_hf_tanh_gelu_folders_give_transformers_logits(case):
    """hidden_act 'gelu_new' / 'gelu_pytorch_tanh' were refused ('vitlab's ViT uses exact gelu'); vitlab's
    gelu='tanh' is that function."""
    model = vitlab.load_model(HF_GELU / case)
    assert model.cfg.gelu == "tanh"
    expected = load_file(HF_GELU / "io.safetensors")[f"{case}_logits"]
    torch.testing.assert_close(_logits(model, pattern(3, 32, 32)), expected, atol=1e-5, rtol=0)
    exact = vitlab.load_model(HF_GELU / case, gelu="exact")  # the other GELU is measurably different here
    assert (_logits(exact, pattern(3, 32, 32)) - expected).abs().max() > 1e-5


def test_hf_unknown_activation_names_what_vitlab_has(tmp_path):
    folder = tmp_path / "relu"
    folder.mkdir()
    for f in (HF_GELU / "vit_gelu_new").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["hidden_act"] = "relu"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises((CheckpointError, ValueError), match=r"hidden_act='relu'.*'gelu' / 'gelu_new'"):
        vitlab.load_model(folder)
