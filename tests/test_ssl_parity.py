"""Self-supervised checkpoints against independent implementations (fixtures: make_fixtures_ssl.py).

MAE: transformers' ViTMAEForPreTraining with the same noise; the official repository's layout with and
without decoder. DINO: a training checkpoint (student / teacher, both weight-norm spellings) around timm
backbones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vitlab
from vitlab.checkpoints import CheckpointError, read_source
from vitlab.checkpoints.convert_dino import read_dino_checkpoint
from vitlab.ssl.dino import load_dino
from vitlab.ssl.mae import load_mae

FIX = Path(__file__).parent / "fixtures"
MAE_TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0)
DINO_TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)


@pytest.fixture(scope="module")
def mae_io():
    return load_file(str(FIX / "mae_io.safetensors"))


def _run(encoder, mae, io):
    encoder.eval()
    mae.decoder.eval()
    with torch.no_grad():
        return mae.forward(encoder, io["pixels"], noise=io["noise"])


def test_mae_hf_folder_reproduces_loss_and_predictions(mae_io):
    encoder, mae = load_mae(FIX / "mae_hf_tiny")
    assert mae.norm_pix_loss and mae.mask_ratio == 0.75 and mae.decoder.dim == 16
    out = _run(encoder, mae, mae_io)
    assert torch.equal(out.mask, mae_io["mask"]) and torch.equal(out.ids_restore, mae_io["ids_restore"])
    assert (out.pred - mae_io["pred"]).abs().max() < 1e-5
    assert abs(float(out.loss) - float(mae_io["loss"])) < 1e-5


def test_mae_official_layout_with_decoder(mae_io):
    encoder, mae = load_mae(FIX / "mae_official_tiny.pth", model="vit_tiny_patch16_224", decoder_heads=2,
                            model_overrides=MAE_TINY, norm_pix_loss=True)
    out = _run(encoder, mae, mae_io)
    assert (out.pred - mae_io["pred"]).abs().max() < 1e-5
    assert abs(float(out.loss) - float(mae_io["loss"])) < 1e-5


def test_mae_encoders_load_as_vit_from_every_layout():
    src = read_source(FIX / "mae_official_tiny.pth", "vit")
    assert src.format == "official"  # the detector saw the decoder keys
    full = vitlab.create_model("vit_tiny_patch16_224", pretrained=FIX / "mae_official_tiny.pth", **MAE_TINY)
    enc = vitlab.create_model("vit_tiny_patch16_224", pretrained=FIX / "mae_official_enc_tiny.pth", **MAE_TINY)
    hf = vitlab.load_model(FIX / "mae_hf_tiny")
    assert full.num_classes == enc.num_classes == hf.num_classes == 0
    x = torch.randn(1, 3, 32, 32)
    ref = full.eval()(x)
    assert torch.allclose(enc.eval()(x), ref, atol=1e-6) and torch.allclose(hf.eval()(x), ref, atol=1e-5)
    with pytest.raises(CheckpointError, match="no MAE decoder"):
        load_mae(FIX / "mae_official_enc_tiny.pth", model="vit_tiny_patch16_224", model_overrides=MAE_TINY)


def test_mae_finetunes_from_the_official_encoder():
    m = vitlab.create_model("vit_tiny_patch16_224", pretrained=FIX / "mae_official_enc_tiny.pth", num_classes=5,
                            **MAE_TINY)
    assert m.num_classes == 5 and torch.all(m.head.weight == 0)


@pytest.mark.parametrize("use", ["teacher", "student"])
def test_dino_training_checkpoint_both_networks(use):
    io = load_file(str(FIX / "dino_io.safetensors"))
    backbone, head = load_dino(FIX / "dino_official_tiny.pth", "vit_small_patch16_224", use=use, **DINO_TINY)
    backbone.eval()
    head.eval()
    with torch.no_grad():
        f = backbone.forward_head(backbone.forward_features(io["x"]), pre_logits=True)
        assert (f - io[f"{use}_features"]).abs().max() < 1e-5
        assert (head(f) - io[f"{use}_head"]).abs().max() < 1e-5


def test_dino_checkpoint_spellings_and_default_network():
    ck = read_dino_checkpoint(FIX / "dino_official_tiny.pth")
    # the student was written with weight_g / weight_v, the teacher with the parametrisation names
    for head in (ck.student_head, ck.teacher_head):
        assert "last_layer.parametrizations.weight.original0" in head and not any("weight_g" in k for k in head)
    assert ck.head_dims() == {"out_dim": 64, "bottleneck_dim": 16, "hidden_dim": 48} and ck.epoch == 1
    # as a plain ViT checkpoint, the file gives the teacher's backbone
    io = load_file(str(FIX / "dino_io.safetensors"))
    m = vitlab.create_model("vit_small_patch16_224", pretrained=FIX / "dino_official_tiny.pth", **DINO_TINY).eval()
    with torch.no_grad():
        f = m.forward_head(m.forward_features(io["x"]), pre_logits=True)
    assert (f - io["teacher_features"]).abs().max() < 1e-5
