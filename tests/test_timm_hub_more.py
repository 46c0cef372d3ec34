"""timm hub folders as timm's own ``save_for_hf`` writes them for families with one pooling, and of models
vitlab has no name for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import vitlab
from vitlab.checkpoints import CheckpointError

from model_helpers import perturb_


@pytest.mark.parametrize(("name", "args"), [
    ("swin_tiny_patch4_window7_224", dict(img_size=32, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4)),
    ("mixer_s16_224", dict(img_size=32, embed_dim=16, depth=1)),
    ("mobilevit_xxs", dict(img_size=64)),
])
def test_timm_save_for_hf_folder_of_an_average_pooling_family_loads(name: str, args: dict, tmp_path: Path) -> None:
    # timm 1.0.31's save_for_hf writes model_args {in_chans, num_classes, global_pool: "avg", img_size} for them all
    model = perturb_(vitlab.create_model(name, num_classes=5, **args)).eval()
    folder = tmp_path / "hub"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    model_args = {"in_chans": 3, "num_classes": 5, "global_pool": "avg", "img_size": [args["img_size"]] * 2,
                  **{k: v for k, v in args.items() if k != "img_size"}}
    (folder / "config.json").write_text(json.dumps({"architecture": name, "num_classes": 5,
                                                    "model_args": model_args, "pretrained_cfg": {}}))
    loaded = vitlab.load_model(folder).eval()
    x = torch.randn(2, 3, args["img_size"], args["img_size"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    model_args["global_pool"] = "max"  # a pooling the family does not compute is still refused
    (folder / "config.json").write_text(json.dumps({"architecture": name, "model_args": model_args}))
    with pytest.raises(CheckpointError, match="global_pool='max'"):
        vitlab.load_model(folder)


def test_timm_hub_folder_of_an_unregistered_architecture_says_so(tmp_path: Path) -> None:
    folder = tmp_path / "hub"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_giant_patch14_dinov2.lvd142m",
                                                    "model_args": {}}))
    save_file({"x": torch.zeros(1)}, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"timm architecture 'vit_giant_patch14_dinov2.lvd142m' is not a vitlab "
                                              r"model name .* model_name=NAME"):
        vitlab.load_model(folder)


def test_swin_tables_of_another_window_are_resampled_with_a_warning(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    args = dict(img_size=64, embed_dim=16, depths=(2, 2), num_heads=(1, 2))
    src = perturb_(vitlab.create_model("swin_tiny_patch4_window7_224", window_size=4, **args))
    path = tmp_path / "w4.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    with caplog.at_level("WARNING"):
        vitlab.create_model("swin_tiny_patch4_window7_224", pretrained=path, window_size=8, **args)
    assert "window 4x4 resampled to this model's window 8x8 (4 block(s))" in caplog.text
    assert "window_size=4" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # the file's own window: nothing resampled, nothing said
        same = vitlab.create_model("swin_tiny_patch4_window7_224", pretrained=path, window_size=4, **args)
    assert "resampled" not in caplog.text
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(same.eval()(x), src.eval()(x))


def test_stating_fc_norm_alone_keeps_the_familys_pooling(tmp_path: Path) -> None:
    """timm's BEiT built with use_fc_norm=False averages with the final norm before pooling: its file has
    ``norm`` and no ``fc_norm``, which the converter alone reads as class-token pooling. A caller who states
    fc_norm=False (as they built it in timm) gets BEiT's averaging, not the converter's guess."""
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=4)
    model = perturb_(vitlab.create_model("beit_base_patch16_224", fc_norm=False, global_pool="avg", **args)).eval()
    path = tmp_path / "beit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    x = torch.randn(2, 3, 32, 32)
    loaded = vitlab.create_model("beit_base_patch16_224", pretrained=path, fc_norm=False, **args).eval()
    assert loaded.cfg.global_pool == "avg"
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    guessed = vitlab.create_model("beit_base_patch16_224", pretrained=path, **args)  # the file alone: token
    assert guessed.cfg.global_pool == "token"


def test_a_vitlab_file_of_another_variant_says_what_it_builds(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    small = vitlab.save_model(vitlab.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=1),
                              tmp_path / "tiny.safetensors")
    with caplog.at_level("INFO"):
        model = vitlab.create_model("vit_large_patch16_224", pretrained=small)
    assert model.cfg.embed_dim == 192 and len(model.blocks) == 1  # the file's config, as the README example has it
    assert "holds a vit_tiny_patch16_224; built with its recorded config under the name vit_large_patch16_224" \
        in caplog.text
