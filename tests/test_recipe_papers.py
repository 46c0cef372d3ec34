"""Training pieces against their references: the ViT pre-training recipe's decoupled weight decay (the paper's
Flax Adam), layer-wise lr decay of CaiT / XCiT against timm's param_groups_layer_decay
(tests/fixtures/layer_decay_make_timm.py), MLP-Mixer's stochastic depth (timm: one rate for every block),
the Swin recipe's final lr."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import vitlab
from vitlab.layers.drop_path import DropPath
from vitlab.train.optim import build_optimizer, param_groups
from vitlab.train.recipe import load_recipe

FIXTURES = Path(__file__).parent / "fixtures"


def test_vit_pretrain_weight_decay_is_decoupled() -> None:
    """The ViT paper's Flax Adam decays as ``w -= lr * wd * w`` outside the adaptive step (AdamW); torch Adam's
    weight_decay would add wd * w to the gradient, and a zero-gradient step would then move w by about lr."""
    torch.manual_seed(0)
    recipe = load_recipe("vit_pretrain")
    assert recipe.weight_decay == 0.1
    model = vitlab.create_model("vit_base_patch16_224", num_classes=10, img_size=32, depth=1, embed_dim=32,
                                num_heads=2)
    opt = build_optimizer(model, recipe, lr=recipe.lr)
    with torch.no_grad():
        model.head.weight.fill_(0.5)
    norm_before = model.norm.weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    expected = 0.5 - recipe.lr * recipe.weight_decay * 0.5
    torch.testing.assert_close(model.head.weight.detach(), torch.full_like(model.head.weight, expected),
                               rtol=0, atol=1e-7)
    assert torch.equal(model.norm.weight.detach(), norm_before)  # no decay on norms


# ------------------------------------------------------------------------------------------ layer-wise decay

LAYER_DECAY = json.loads((FIXTURES / "layer_decay_timm.json").read_text())


def _vitlab_name(timm_name: str) -> str:
    """timm's LayerScale parameters (CaiT ``gamma_1``, XCiT ``gamma1``) are vitlab's ``ls1.gamma``."""
    return re.sub(r"\.gamma_?(\d)$", r".ls\1.gamma", timm_name)


@pytest.mark.parametrize("family", ["cait", "xcit"])
def test_class_attention_layer_decay_matches_timm(family: str) -> None:
    ref = LAYER_DECAY["models"][family]
    decay = LAYER_DECAY["layer_decay"]
    model = vitlab.create_model(ref["name"], **ref["kwargs"])
    groups = param_groups(model, weight_decay=0.05, layer_decay=decay)
    got = {n: g["lr_scale"] for g in groups for n in g["names"]}
    want = {_vitlab_name(n): s for n, s in ref["lr_scale"].items()}
    assert set(got) == set(want)
    # vitlab keeps MAE/BEiT's convention for the final norm (with the head, scale 1); timm merges it into the
    # last block
    norm = {n for n in got if n.startswith("norm.")}
    assert norm and all(got[n] == 1.0 and want[n] == decay for n in norm)
    diff = {n: (got[n], want[n]) for n in got if n not in norm and got[n] != pytest.approx(want[n])}
    assert not diff, diff
    # the class-attention blocks are not at the head's scale
    cls_blocks = [n for n in got if n.startswith(("blocks_token_only.", "cls_attn_blocks."))]
    assert cls_blocks and all(got[n] < 1.0 for n in cls_blocks)


# ------------------------------------------------------------------------------------------ stochastic depth


def test_mixer_drop_path_is_the_same_in_every_block() -> None:
    model = vitlab.create_model("mixer_s16_224", num_classes=10, img_size=32, depth=4, drop_path_rate=0.3)
    rates = [blk.drop_path.drop_prob if isinstance(blk.drop_path, DropPath) else 0.0 for blk in model.blocks]
    assert rates == [0.3] * 4


# ------------------------------------------------------------------------------------------ schedules


def test_swin_recipe_ends_at_the_reference_min_lr() -> None:
    """Swin's main.py scales BASE_LR and MIN_LR (5e-4, 5e-6 in config.py) by total_batch / 512; vitlab scales
    only the peak lr, so the recipe states the batch-1024 values."""
    recipe = load_recipe("swin")
    assert recipe.global_batch == 1024
    assert recipe.lr * recipe.global_batch / recipe.lr_base_batch == pytest.approx(5e-4 * 1024 / 512)
    assert recipe.min_lr == pytest.approx(5e-6 * 1024 / 512)
