"""DETR: parity with Hugging Face and the official layout (committed fixtures), structure, masks, capture."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vitlab
from vitlab.layers import CrossAttention, FrozenBatchNorm2d, capture_attention
from vitlab.tasks import SetCriterion
from vitlab.train.optim import param_groups

from model_helpers import perturb_

FIX = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return load_file(FIX / "detr_io.safetensors")


def _targets(io):
    return [{"labels": io["t0_labels"], "boxes": io["t0_boxes"]}, {"labels": io["t1_labels"], "boxes": io["t1_boxes"]}]


def test_hf_folder_loads_with_identical_outputs_matching_and_loss(io) -> None:
    model = vitlab.load_model(FIX / "detr_hf_tiny").eval()
    assert model.cfg.num_heads == 4 and model.num_classes == 3 and model.cfg.num_queries == 6
    with torch.no_grad():
        out = model(io["x"], io["pixel_mask"])
    torch.testing.assert_close(out["logits"], io["logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out["boxes"], io["boxes"], atol=1e-5, rtol=0)
    crit = SetCriterion(3, aux=False)
    matches = crit.matcher(out["logits"], out["boxes"], _targets(io))
    for i, (src, tgt) in enumerate(matches):
        assert src.tolist() == io[f"match{i}_src"].tolist() and tgt.tolist() == io[f"match{i}_tgt"].tolist()
    total, parts = crit(out, _targets(io))
    for k in ("loss_ce", "loss_bbox", "loss_giou"):
        assert parts[k].item() == pytest.approx(io[k].item(), abs=1e-5)
    assert parts["cardinality_error"].item() == pytest.approx(io["loss_cardinality_error"].item())
    assert total.item() == pytest.approx(io["loss"].item(), abs=1e-5)


def test_official_layout_loads_to_the_same_outputs(io) -> None:
    model = vitlab.create_model("detr_resnet50", pretrained=FIX / "detr_official_tiny.pth", num_heads=4).eval()
    with torch.no_grad():
        out = model(io["x"], io["pixel_mask"])
    torch.testing.assert_close(out["logits"], io["logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out["boxes"], io["boxes"], atol=1e-5, rtol=0)


def _tiny(**over) -> torch.nn.Module:
    kw = dict(backbone_args={"layers": (1, 1, 1, 1), "channels": (16, 16, 32, 32), "stem_chs": 8}, dim=32,
              num_heads=4, enc_depth=2, dec_depth=2, ffn_dim=64, num_queries=5, num_classes=3)
    kw.update(over)
    return vitlab.create_model("detr_resnet50", **kw)


def test_structure_frozen_stem_and_backbone_lr() -> None:
    model = _tiny()
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.modules())
    assert not any(p.requires_grad for p in model.backbone.stem.parameters())
    assert not any(p.requires_grad for p in model.backbone.stages[0].parameters())
    assert all(p.requires_grad for p in model.backbone.stages[1].parameters())
    groups = param_groups(model, weight_decay=1e-4)
    for g in groups:
        assert g["lr_scale"] == (0.1 if all(n.startswith("backbone.") for n in g["names"]) else 1.0)
        assert len({n.startswith("backbone.") for n in g["names"]}) == 1
    out = model(torch.randn(2, 3, 64, 64))
    assert out["logits"].shape == (2, 5, 4) and out["boxes"].shape == (2, 5, 4)
    assert out["aux_logits"].shape == (1, 2, 5, 4)
    assert ((out["boxes"] > 0) & (out["boxes"] < 1)).all()
    # the paper's size: DETR-R50 has 41.3 M parameters (Table 1), counted as trained (stem and layer1 frozen)
    with torch.device("meta"):
        full = vitlab.create_model("detr_resnet50")
    assert sum(p.numel() for p in full.parameters() if p.requires_grad) == 41_302_368


def test_padding_is_never_attended_and_capture_equals_fast() -> None:
    torch.manual_seed(0)
    model = _tiny().eval()
    x = torch.randn(1, 3, 64, 64)
    mask = torch.ones(1, 64, 64, dtype=torch.bool)
    mask[:, :, 32:] = False
    with torch.no_grad():
        fast = model(x, mask)
        with capture_attention(model) as maps:
            slow = model(x, mask)
    torch.testing.assert_close(slow["logits"], fast["logits"], atol=1e-5, rtol=1e-5)
    n_attn = sum(isinstance(m, CrossAttention) for m in model.modules())
    assert len(maps) == n_attn == 2 + 2 * 2
    h, w = model._feature_size
    cross = maps[-1]  # the last decoder layer's cross-attention: (B, heads, queries, h*w)
    assert cross.shape == (1, 4, 5, h * w)
    padded = ~torch.nn.functional.interpolate(mask[None].float(), size=(h, w)).bool()[0].flatten(1)
    assert cross[..., padded[0]].abs().max() == 0


def test_vit_backbone_through_forward_intermediates() -> None:
    model = vitlab.create_model("detr_vit_small_patch16", backbone_args={
        "embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 32, "dynamic_img_size": True}, dim=32, num_heads=4,
        enc_depth=1, dec_depth=2, ffn_dim=64, num_queries=4, num_classes=2)
    out = model(torch.randn(2, 3, 48, 32))
    assert out["logits"].shape == (2, 4, 3)
    out["logits"].sum().backward()
    assert model.backbone.blocks[0].attn.qkv.weight.grad is not None


def test_explain_shows_each_objects_cross_attention() -> None:
    from vitlab.analysis import explain
    from vitlab.analysis.explain_detr import detection_attention

    torch.manual_seed(0)
    model = _tiny().eval()
    x = torch.randn(2, 3, 64, 64)
    out, maps = detection_attention(model, x)
    h, w = model._feature_size
    assert maps.shape == (2, 5, h, w)
    torch.testing.assert_close(maps.sum((-2, -1)), torch.ones(2, 5))
    with torch.no_grad():
        torch.testing.assert_close(out["logits"], model(x)["logits"])
    e = explain(model, x, method="last-layer")
    assert e.maps.shape == (2, 64, 64) and torch.isfinite(e.maps).all()
    auto = explain(model, x)  # "auto" is the cross-attention for DETR, not a gradient map
    assert auto.method == "last-layer"
    torch.testing.assert_close(auto.maps, e.maps)


@pytest.mark.parametrize("freeze_stem", [True, False])
def test_a_grey_classifier_loads_as_the_backbone_of_a_grey_detr(tmp_path, freeze_stem) -> None:
    from vitlab.models.dense import load_backbone

    # the dense model gives its in_chans to the backbone; loading a checkpoint must build it the same way, and
    # keep the batch-norm statistics (and counters) where the backbone trains its batch norms (freeze_stem=False)
    resnet = vitlab.create_model("resnet50", layers=(1, 1, 1, 1), channels=(16, 16, 32, 32), stem_chs=8, in_chans=1,
                                 num_classes=10)
    with torch.no_grad():
        resnet.train()(torch.randn(4, 1, 32, 32))  # non-default running statistics
    vitlab.save_model(resnet, tmp_path / "resnet.safetensors")
    model = load_backbone(_tiny(in_chans=1, freeze_stem=freeze_stem), tmp_path / "resnet.safetensors")
    torch.testing.assert_close(model.backbone.stem.conv.weight, resnet.stem.conv.weight)
    src = resnet.state_dict()
    for k, v in model.backbone.state_dict().items():
        if k.endswith("running_mean"):
            torch.testing.assert_close(v, src[k])


def test_vit_backbone_takes_sides_that_are_not_multiples_of_its_patch() -> None:
    """DETR's own resize keeps the aspect ratio (a 640 x 480 photo becomes 224 x 298): a ViT backbone's input is
    zero-padded to its patch multiple (it was a ValueError), the padding marked in the pixel mask as batch
    padding is: the same outputs as the image padded by hand."""
    torch.manual_seed(0)
    model = vitlab.create_model("detr_vit_small_patch16", num_classes=3, dec_depth=1, enc_depth=1,
                                backbone_args={"dynamic_img_size": True, "depth": 1, "embed_dim": 64,
                                               "num_heads": 2}).eval()
    perturb_(model, std=0.3)
    x = torch.randn(2, 3, 40, 54)
    with torch.no_grad():
        out = model(x)
        padded = torch.nn.functional.pad(x, (0, 10, 0, 8))
        mask = torch.zeros(2, 48, 64, dtype=torch.bool)
        mask[:, :40, :54] = True
        same = model(padded, mask)
    assert out["boxes"].shape == (2, 100, 4) and torch.isfinite(out["boxes"]).all()
    torch.testing.assert_close(out["logits"], same["logits"])
    torch.testing.assert_close(out["boxes"], same["boxes"])
