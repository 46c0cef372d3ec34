"""Loading checkpoints to fine-tune them: a DeiT name's distillation token against the file's, Hugging Face BEiT
folders at another resolution (transformers' bilinear relative tables), vitlab files of a rectangular grid at
another size, and CrossViT's depth in timm's spelling.

Fixtures: deit_timm_tiny_distilled.safetensors and crossvit_timm_tiny.safetensors (timm, see their generators);
hf_beit_resize/ (transformers, make_fixtures_hf_beit_resize.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vitlab
from vitlab.checkpoints import CheckpointError, timm_model_args, to_timm_state_dict
from vitlab.checkpoints.adapt import adapt_state_dict
from vitlab.checkpoints.timm_hub import timm_hub_overrides
from vitlab.layers import resample_pos_embed
from vitlab.layers.rel_pos_attention import resample_class_rel_pos_table
from vitlab.models.crossvit import CrossViTConfig

FIX = Path(__file__).resolve().parent / "fixtures"
TOL = {"atol": 1e-5, "rtol": 1e-5}
DEIT_TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 4}  # the timm fixture's
DISTILLED_FILE = FIX / "deit_timm_tiny_distilled.safetensors"


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------- DeiT distillation token
@pytest.fixture
def plain_file(tmp_path: Path) -> Path:
    """A timm-layout DeiT/ViT state dict without a distillation token (vitlab keeps timm's names)."""
    path = tmp_path / "plain.pth"
    torch.save(vitlab.create_model("deit_tiny_patch16_224", num_classes=3, **DEIT_TINY).state_dict(), path)
    return path


@pytest.mark.parametrize("extra", [{}, {"distilled": True}])
def test_distilled_name_refuses_a_file_without_distillation_token(plain_file: Path, extra: dict) -> None:
    # before: the file's distilled=False won over the name, and a non-distilled model was built under it
    with pytest.raises(CheckpointError) as err:
        vitlab.create_model("deit_tiny_distilled_patch16_224", pretrained=plain_file, num_classes=3,
                            **DEIT_TINY, **extra)
    msg = str(err.value)
    assert msg.startswith(str(plain_file)) and "model without a distillation token" in msg
    assert "load it with deit_tiny_patch16_224" in msg
    with pytest.raises(CheckpointError, match="without a distillation token"):  # the same through load_model
        vitlab.load_model(plain_file, model_name="deit_tiny_distilled_patch16_224", **DEIT_TINY)
    # the name that fits loads it
    assert not vitlab.create_model("deit_tiny_patch16_224", pretrained=plain_file, **DEIT_TINY).cfg.distilled


@pytest.mark.parametrize("extra", [{}, {"distilled": False}, {"img_size": 48}])
def test_plain_name_refuses_a_distilled_timm_file(extra: dict) -> None:
    # before: a distilled model under the plain name, or (distilled=False) "65 grid positions, not a square grid"
    with pytest.raises(CheckpointError) as err:
        vitlab.create_model("deit_tiny_patch16_224", pretrained=DISTILLED_FILE, **{**DEIT_TINY, **extra})
    msg = str(err.value)
    assert "the file is a distilled DeiT (a distillation token" in msg and "head_dist" in msg
    assert "load it with deit_tiny_distilled_patch16_224" in msg and "grid positions" not in msg


def test_distilled_timm_file_still_loads_under_a_distilled_name() -> None:
    io = load_file(FIX / "deit_cait_io.safetensors")
    model = vitlab.create_model("deit_tiny_distilled_patch16_224", pretrained=DISTILLED_FILE, **DEIT_TINY).eval()
    assert model.cfg.distilled and model.cfg.dist_head
    with torch.no_grad():
        torch.testing.assert_close(model(io["x"]), io["deit_timm_logits"], **TOL)
    model.set_distilled_training(True)  # what finetune --teacher needs


# ------------------------------------------------------------------ Hugging Face BEiT at another resolution
@pytest.mark.parametrize("name", ["beit", "data2vec"])
@pytest.mark.parametrize("size", [16, 24, 40])
def test_hf_beit_folder_at_another_size_matches_transformers(name: str, size: int) -> None:
    # transformers resizes the relative tables bilinearly (BeitRelativePositionBias); timm's rule differs by ~1e-3
    io = load_file(FIX / "hf_beit_resize" / "io.safetensors")
    model = vitlab.load_model(FIX / "hf_beit_resize" / name, img_size=size).eval()
    assert model.cfg.use_shared_rel_pos_bias == (name == "data2vec")
    with torch.no_grad():
        torch.testing.assert_close(model(io[f"x_{size}"]), io[f"{name}_logits_{size}"], **TOL)


def test_timm_beit_file_keeps_timm_resampling(tmp_path: Path) -> None:
    # the same folder's tensors as a timm state dict: resampled by timm's rule, not transformers'
    folder = vitlab.load_model(FIX / "hf_beit_resize" / "beit", img_size=40)
    path = tmp_path / "beit_timm.pth"
    torch.save(vitlab.load_model(FIX / "hf_beit_resize" / "beit").state_dict(), path)
    timm_like = vitlab.create_model("beit_base_patch16_224", pretrained=path, img_size=40, num_heads=4)
    key = "blocks.0.attn.relative_position_bias_table"
    old = load_file(FIX / "hf_beit_resize" / "beit" / "model.safetensors")[
        "beit.encoder.layer.0.attention.attention.relative_position_bias.relative_position_bias_table"]
    assert torch.equal(timm_like.state_dict()[key], resample_class_rel_pos_table(old, (3, 3), (5, 5)))
    assert not torch.allclose(folder.state_dict()[key], timm_like.state_dict()[key], atol=1e-4)


# ------------------------------------------------------------------- vitlab files of a rectangular grid
@pytest.mark.parametrize("file_size, size", [((32, 48), 48), ((32, 48), (48, 64)), ((16, 64), 32)])
def test_vitlab_file_of_a_rectangular_grid_at_another_size(tmp_path: Path, file_size, size) -> None:
    model = vitlab.create_model("vit_tiny_patch16_224", img_size=file_size, patch_size=4, depth=1, num_classes=3)
    grid = (file_size[0] // 4, file_size[1] // 4)  # 8x12; 4x16 has as many entries as a square 8x8 grid
    path = vitlab.save_model(model, tmp_path / "rect.safetensors", class_names=["a", "b", "c"])
    for load in (lambda: vitlab.create_model("vit_tiny_patch16_224", pretrained=path, img_size=size, num_classes=3),
                 lambda: vitlab.load_model(path, img_size=size)):
        got = load()
        new_grid = tuple(s // 4 for s in ((size, size) if isinstance(size, int) else size))
        assert got.patch_embed.grid_size == new_grid
        want = resample_pos_embed(model.pos_embed.detach(), new_grid, old_size=grid, num_prefix_tokens=1)
        torch.testing.assert_close(got.pos_embed.detach(), want, atol=0, rtol=0)


def test_a_rectangular_table_without_a_recorded_grid_is_still_refused() -> None:
    # a file that does not record its grid (a timm state dict): its length alone does not give the grid
    model = vitlab.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=1, num_classes=3)
    sd = dict(model.state_dict(), pos_embed=torch.zeros(1, 97, model.pos_embed.shape[-1]))
    with pytest.raises(CheckpointError, match="rect.pth: pos_embed has 96 grid positions, which is not a square"):
        adapt_state_dict(sd, model, source="rect.pth")


# ------------------------------------------------------------------------- CrossViT depth, timm's spelling
CROSSVIT_TINY = {"img_size": 48, "branch_scale": (1.0, 2 / 3), "num_heads": (2, 4)}


def test_crossvit_depth_in_timms_spelling_exports_to_timm() -> None:
    timm_sd = load_file(FIX / "crossvit_timm_tiny.safetensors")
    model = vitlab.create_model("crossvit_9_240", pretrained=FIX / "crossvit_timm_tiny.safetensors",
                                depth=[[1, 2, 0], [1, 2, 0]], **CROSSVIT_TINY)
    assert model.cfg.depth == ((1, 2), (1, 2))
    assert timm_model_args(model).kwargs["depth"] == [[1, 2, 0], [1, 2, 0]]
    out = to_timm_state_dict(model)  # before: "too many values to unpack (expected 2)"
    assert set(out) == set(timm_sd)
    for k, v in timm_sd.items():
        assert torch.equal(out[k], v), k


def test_crossvit_blocks_after_the_fusion_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"CrossViTConfig: depth=\[\[1, 1, 2\]\]: blocks after CrossViT's fusion"):
        vitlab.create_model("crossvit_tiny_240", depth=[[1, 1, 2]], num_classes=3)
    with pytest.raises(ValueError, match="CrossViTConfig: depth=.*pair per multi-scale block"):
        CrossViTConfig(depth=((1, 1, 0, 0),))
    # a timm hub folder's model_args: the same rule
    with pytest.raises(ValueError, match=r"timm model_args depth=\[\[1, 1, 1\]\]: blocks after CrossViT's fusion"):
        timm_hub_overrides({"model_args": {"depth": [[1, 1, 1]]}}, "crossvit", CrossViTConfig())
    assert timm_hub_overrides({"model_args": {"depth": [[1, 3, 0]]}}, "crossvit", CrossViTConfig())["depth"] == (
        (1, 3),)
