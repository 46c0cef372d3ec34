"""Fine-tuning from a checkpoint: what the model starts from.

A head kept from the checkpoint (``zero_init_head`` false) is met with the data's classes by name: the same classes
in another order have their rows reordered (every classifier, DeiT's ``head_dist`` too), other classes get a new
zero head, a checkpoint without class names keeps its rows by position, warned.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import vitlab
from vitlab.train.recipe import Recipe
from vitlab.train.run import TrainJob, build_model

TINY = {"img_size": 16, "patch_size": 8, "depth": 1, "embed_dim": 16, "num_heads": 2}


def _checkpoint(path: Path, class_names: list[str] | None) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = vitlab.create_model("deit_tiny_distilled_patch16_224", num_classes=4, **TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()  # a trained head: no zero rows
    vitlab.save_model(model, path, class_names=class_names)
    return {k: v.clone() for k, v in model.state_dict().items() if k.split(".")[0] in ("head", "head_dist")}


def _finetune(path: Path, classes: list[str], tmp_path: Path) -> torch.nn.Module:
    recipe = Recipe(name="t", img_size=16, zero_init_head=False)
    job = TrainJob(recipe=recipe, data="folder", output=tmp_path / "run", pretrained=str(path))
    return build_model(job, num_classes=len(classes), in_chans=3, classes=classes)


def test_kept_head_rows_follow_the_data_class_order(tmp_path: Path) -> None:
    # a Hugging Face id2label order against a folder's sorted names
    heads = _checkpoint(tmp_path / "ckpt.safetensors", ["dog", "cow", "eel", "ant"])
    model = _finetune(tmp_path / "ckpt.safetensors", ["ant", "cow", "dog", "eel"], tmp_path)
    order = torch.tensor([3, 1, 0, 2])
    sd = model.state_dict()
    for key in ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias"):
        torch.testing.assert_close(sd[key], heads[key][order])
    assert model.class_names == ["ant", "cow", "dog", "eel"]


def test_kept_head_for_other_classes_is_new(tmp_path: Path) -> None:
    _checkpoint(tmp_path / "ckpt.safetensors", ["dog", "cow", "eel", "ant"])
    model = _finetune(tmp_path / "ckpt.safetensors", ["ant", "bee", "dog", "eel"], tmp_path)
    for key in ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias"):
        assert not model.state_dict()[key].any(), key


def test_kept_head_without_class_names_is_kept_by_position(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    heads = _checkpoint(tmp_path / "ckpt.safetensors", None)
    with caplog.at_level(logging.WARNING):
        model = _finetune(tmp_path / "ckpt.safetensors", ["ant", "cow", "dog", "eel"], tmp_path)
    torch.testing.assert_close(model.state_dict()["head.weight"], heads["head.weight"])
    assert "by position" in caplog.text


# ------------------------------------------------------------------------------ TNT's inner maps in analysis
def test_tnt_analysis_takes_the_outer_maps_only() -> None:
    # at 64 px the 4 x 4 patch grid has 16 tokens, as many as a patch has pixels: the inner maps have the shape of
    # token maps, but are over the pixels of each patch
    from vitlab.analysis.capture import capture

    torch.manual_seed(0)
    model = vitlab.create_model("tnt_s_patch16_224", num_classes=3, img_size=64, depth=2, embed_dim=32, inner_dim=8,
                                num_heads_outer=2, num_heads_inner=2).eval()
    cap = capture(model, torch.randn(1, 3, 64, 64))
    outer = [a for a, t in zip(cap.attentions, cap.token_maps) if t]
    assert len(outer) == 2 and all(a.shape == (1, 2, 17, 17) for a in outer)


# ------------------------------------------------------------------------------ MAE's fixed table, then learned
def test_learned_table_starts_from_a_checkpoints_sincos_table(tmp_path: Path) -> None:
    # MAE pre-trains with a fixed sin-cos table (not saved); its fine-tuning trains a table that starts from it
    from vitlab.layers import sincos_2d_pos_embed
    from vitlab.train.recipe import load_recipe

    torch.manual_seed(0)
    fixed = vitlab.create_model("vit_tiny_patch16_224", num_classes=3, pos_embed="sincos", **TINY).eval()
    path = vitlab.save_model(fixed, tmp_path / "mae.safetensors")
    learned = vitlab.create_model("vit_tiny_patch16_224", pretrained=str(path), pos_embed="learn").eval()
    assert isinstance(learned.pos_embed, torch.nn.Parameter) and learned.pos_embed.requires_grad
    torch.testing.assert_close(learned.pos_embed[:, 1:], sincos_2d_pos_embed(16, (2, 2)))
    assert not learned.pos_embed[:, :1].any()  # the class token's entry: 0, as MAE's table
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(learned(x), fixed(x))
    assert load_recipe("mae_finetune").model_overrides["pos_embed"] == "learn"
