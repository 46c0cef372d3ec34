"""SETR: the paper's three decoders, auxiliary heads and their blocks, head learning rate, resampled encoder."""

from __future__ import annotations

import pytest
import torch

import vitlab
from vitlab.models.dense import load_backbone
from vitlab.models.setr import scaled_blocks, segmentation_loss
from vitlab.train.optim import param_groups

TINY = {"backbone_args": {"embed_dim": 32, "depth": 4, "num_heads": 2}, "img_size": 64, "num_classes": 5,
        "channels": 16, "mla_head_channels": 8}


def test_block_choices_follow_the_paper_for_24_blocks() -> None:
    assert scaled_blocks((10, 15, 20), 24) == [9, 14, 19]  # naive aux (in_index 9/14/19)
    assert scaled_blocks((10, 15, 20, 24), 24) == [9, 14, 19, 23]  # PUP aux
    assert scaled_blocks((6, 12, 18, 24), 24) == [5, 11, 17, 23]  # MLA taps
    assert scaled_blocks((6, 12, 18, 24), 12) == [2, 5, 8, 11]
    m = vitlab.create_model("setr_mla_vit_large_patch16", aux=False)
    assert m.main_index == [5, 11, 17, 23] and m.backbone.patch_embed.grid_size == (48, 48)


@pytest.mark.parametrize("decoder,n_aux", [("naive", 3), ("pup", 4), ("mla", 4)])
def test_decoders_shapes_aux_and_loss(decoder: str, n_aux: int) -> None:
    torch.manual_seed(0)
    model = vitlab.create_model(f"setr_{decoder}_vit_small_patch16", **TINY)
    x = torch.randn(2, 3, 64, 64)
    model.train()
    out = model(x)
    assert out["logits"].shape == (2, 5, 64, 64)
    assert len(out["aux_logits"]) == n_aux and all(a.shape == (2, 5, 64, 64) for a in out["aux_logits"])
    target = torch.randint(0, 5, (2, 64, 64))
    target[:, :8] = 255  # ignored pixels
    loss, parts = segmentation_loss(out, target)
    expected = parts["loss_main"] + 0.4 * sum(parts[f"loss_aux{i}"] for i in range(n_aux))
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad
    model.eval()
    assert set(model(x)) == {"logits"}


def test_pup_upsamples_16x_in_four_2x_steps() -> None:
    model = vitlab.create_model("setr_pup_vit_small_patch16", **TINY).eval()
    head = model.decode_head
    assert len(head.stages) == 4 and [s[0].kernel_size for s in head.stages] == [(3, 3)] * 4
    assert head.cls.kernel_size == (1, 1)
    feats = torch.randn(1, 32, 4, 4)
    seen = []
    hooks = [s.register_forward_hook(lambda m, i, o: seen.append(o.shape[-1])) for s in head.stages]
    with torch.no_grad():
        head(feats, (64, 64))
    for h in hooks:
        h.remove()
    assert seen == [4, 8, 16, 32]  # 2x after each of the first three stages; the fourth 2x after the classifier


@pytest.mark.parametrize("patch,stages", [(8, 3), (4, 2), (16, 4)])
def test_pup_steps_follow_the_patch_size(patch: int, stages: int) -> None:
    # 8 px patches: three stages (1/8, 1/4, 1/2 of the input), not a full-resolution fourth one and a 2x detour
    args = {**TINY, "backbone_args": {**TINY["backbone_args"], "patch_size": patch}}
    model = vitlab.create_model("setr_pup_vit_small_patch16", **args).eval()
    seen = []
    for s in model.decode_head.stages:
        s.register_forward_hook(lambda m, i, o: seen.append(o.shape[-1]))
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64))["logits"].shape == (1, 5, 64, 64)
    assert seen == [64 // patch * 2 ** i for i in range(stages)] and seen[-1] == 32
    fixed = vitlab.create_model("setr_pup_vit_small_patch16", **args, pup_upsamples=4)
    assert len(fixed.decode_head.stages) == 4
    with pytest.raises(ValueError, match="pup_upsamples"):
        vitlab.create_model("setr_pup_vit_small_patch16", **args, pup_upsamples=0)


def test_heads_train_at_ten_times_the_encoder_lr() -> None:
    model = vitlab.create_model("setr_naive_vit_small_patch16", **TINY)
    for g in param_groups(model, weight_decay=0.0):
        heads = {n.split(".")[0] in ("decode_head", "aux_heads", "neck") for n in g["names"]}
        assert len(heads) == 1
        assert g["lr_scale"] == (10.0 if heads == {True} else 1.0)


def test_encoder_checkpoint_is_resampled_to_the_segmentation_resolution(tmp_path) -> None:
    vit = vitlab.create_model("vit_small_patch16_224", embed_dim=32, depth=4, num_heads=2, img_size=32,
                              num_classes=3)
    vitlab.save_model(vit, tmp_path / "vit.safetensors")
    model = load_backbone(vitlab.create_model("setr_naive_vit_small_patch16", **TINY), tmp_path / "vit.safetensors")
    assert model.backbone.pos_embed.shape == (1, 1 + 16, 32)
    torch.testing.assert_close(model.backbone.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)
