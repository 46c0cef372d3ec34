"""DINOv2 (Oquab et al. 2023) and ViT with registers (Darcet et al. 2023) under timm's names: register tokens
(``reg_tokens``, ordered [cls, reg..., patches]) and a table for the patch tokens only (``no_embed_class``).

Reference outputs: tiny timm models (tests/fixtures/make_fixtures_dinov2.py): ``reg4`` (4 registers, no table
entries for them), ``plain`` (headless) and ``reg2`` (2 registers with table entries, timm's no_embed_class=False),
at their size (42 px), at 56 px (timm's checkpoint_filter_fn resampling) and with dynamic_img_size.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vitlab
from vitlab.checkpoints import CheckpointError, save_timm_folder, timm_model_args

D2 = Path(__file__).resolve().parent / "fixtures" / "dinov2"
IO = load_file(str(D2 / "io.safetensors"))
ARCH = dict(patch_size=14, embed_dim=32, depth=2, num_heads=2)  # the fixtures' models
REG4, PLAIN = "vit_small_patch14_reg4_dinov2", "vit_small_patch14_dinov2"
MODELS = {"reg4": (REG4, 4, True, 5), "plain": (PLAIN, 0, False, 0), "reg2": (PLAIN, 2, False, 3)}
ATOL = 1e-5


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= ATOL


@pytest.mark.parametrize("tag", sorted(MODELS))
@pytest.mark.parametrize("size", [42, 56])
def test_timm_state_dict_gives_timms_outputs_at_its_size_and_another(tag, size):
    """The register count is read off the file's reg_token (reg2 into the plain name has two)."""
    name, regs, no_embed_class, classes = MODELS[tag]
    m = vitlab.create_model(name, pretrained=D2 / tag / "model.safetensors", img_size=size, **ARCH).eval()
    assert (m.cfg.reg_tokens, m.cfg.no_embed_class, m.num_classes) == (regs, no_embed_class, classes)
    assert m.num_prefix_tokens == 1 + regs and m.pos_embed_prefix == (0 if no_embed_class else 1 + regs)
    x = IO[f"input_{size}"]
    with torch.no_grad():
        _close(m(x), IO[f"{tag}_logits_{size}"])
        if size == 42:
            feats = m.forward_features(x)
            _close(feats, IO[f"{tag}_features_42"])
            _close(m.forward_head(feats, pre_logits=True), IO[f"{tag}_pre_42"])


@pytest.mark.parametrize("tag", sorted(MODELS))
def test_dynamic_img_size_matches_timm_per_batch(tag):
    name = MODELS[tag][0]
    m = vitlab.create_model(name, pretrained=D2 / tag / "model.safetensors", img_size=42, dynamic_img_size=True,
                            **ARCH).eval()
    with torch.no_grad():
        _close(m(IO["input_56"]), IO[f"{tag}_dyn_56"])
        _close(m(IO["input_42"]), IO[f"{tag}_logits_42"])


@pytest.mark.parametrize("tag", sorted(MODELS))
def test_timm_hub_folder_loads_its_architecture_and_preprocessing(tag):
    """save_for_hf folders: config.json names the architecture; reg2's model_args add reg_tokens=2."""
    name, regs, no_embed_class, classes = MODELS[tag]
    m = vitlab.load_model(D2 / tag).eval()
    assert m.model_name == name and m.num_classes == classes
    assert (m.cfg.reg_tokens, m.cfg.no_embed_class) == (regs, no_embed_class)
    with torch.no_grad():
        _close(m(IO["input_42"]), IO[f"{tag}_logits_42"])
    pre = m.preprocessing
    assert pre.input_size == (3, 42, 42) and pre.crop_pct == pytest.approx(1.0) and pre.interpolation == "bicubic"
    assert pre.mean == pytest.approx((0.485, 0.456, 0.406)) and pre.std == pytest.approx((0.229, 0.224, 0.225))


def test_headless_load_gives_timms_pooled_features():
    """num_classes=0: the head is dropped and forward returns what timm's head reads (the class token)."""
    m = vitlab.create_model(REG4, pretrained=D2 / "reg4" / "model.safetensors", img_size=42, num_classes=0,
                            **ARCH).eval()
    with torch.no_grad():
        _close(m(IO["input_42"]), IO["reg4_pre_42"])


def test_forward_intermediates_strip_the_registers_as_timm():
    m = vitlab.create_model(REG4, pretrained=D2 / "reg4" / "model.safetensors", img_size=42, **ARCH).eval()
    with torch.no_grad():
        _, inter = m.forward_intermediates(IO["input_42"], indices=1, output_fmt="NCHW", return_prefix_tokens=True)
    tokens, prefix = inter[0]
    assert tokens.shape == (2, 32, 3, 3) and prefix.shape == (2, 5, 32)
    _close(tokens, IO["reg4_inter_42"])
    _close(prefix, IO["reg4_inter_prefix_42"])


@pytest.mark.parametrize("size", [42, 56])
def test_prefix_entries_move_into_the_tokens_of_a_no_embed_class_model(size):
    """reg2's table has entries for the class token and both registers; the reg4 name (no_embed_class) adds them to
    cls_token / reg_token and drops them: timm's outputs, also after resampling the grid."""
    m = vitlab.create_model(REG4, pretrained=D2 / "reg2" / "model.safetensors", img_size=size, **ARCH).eval()
    assert m.cfg.reg_tokens == 2 and m.pos_embed.shape == (1, (size // 14) ** 2, 32)
    with torch.no_grad():
        _close(m(IO[f"input_{size}"]), IO[f"reg2_logits_{size}"])


def test_a_patch_only_table_into_a_name_with_prefix_entries_is_named(tmp_path):
    """The reg4 file's table, on a 4x4 grid (its 3x3 one, 9 = 5 prefix entries + 2x2, would be ambiguous)."""
    from safetensors.torch import save_file

    from vitlab.layers import resample_pos_embed

    sd = load_file(str(D2 / "reg4" / "model.safetensors"))
    sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], (4, 4), num_prefix_tokens=0).contiguous()  # (1, 16, D)
    save_file(sd, str(tmp_path / "reg4_56.safetensors"))
    with pytest.raises(CheckpointError, match=r"no_embed_class=True .*vit_\*_reg4_dinov2"):
        vitlab.create_model(PLAIN, pretrained=tmp_path / "reg4_56.safetensors", img_size=56, **ARCH)


def test_avg_pooling_reads_the_patch_tokens_only():
    """timm's pool_include_prefix=False: registers (and the class token) take no part in average pooling."""
    m = vitlab.create_model(REG4, pretrained=D2 / "reg4" / "model.safetensors", img_size=42, num_classes=0,
                            global_pool="avg", fc_norm=False, **ARCH).eval()
    with torch.no_grad():
        _close(m(IO["input_42"]), IO["reg4_features_42"][:, 5:].mean(dim=1))


def test_export_to_timm_states_the_registers(tmp_path):
    """The reg4 name carries reg_tokens=4 / no_embed_class itself; reg2 in the plain name needs reg_tokens=2.
    (timm loads both folders strictly to the same logits: checked by hand in the peer environment.)"""
    m = vitlab.create_model(REG4, pretrained=D2 / "reg4" / "model.safetensors", img_size=42, **ARCH).eval()
    args = timm_model_args(m)
    assert args.model_name == REG4 and "reg_tokens" not in args.kwargs and "no_embed_class" not in args.kwargs
    r2 = vitlab.load_model(D2 / "reg2").eval()
    args = timm_model_args(r2)
    assert args.model_name == PLAIN and args.kwargs["reg_tokens"] == 2
    m3 = vitlab.create_model(PLAIN, reg_tokens=3, no_embed_class=True, img_size=42, **ARCH)
    assert timm_model_args(m3).kwargs["reg_tokens"] == 3 and timm_model_args(m3).kwargs["no_embed_class"] is True
    save_timm_folder(r2, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architecture"] == PLAIN and config["model_args"]["reg_tokens"] == 2
    got, want = load_file(str(tmp_path / "out" / "model.safetensors")), load_file(str(D2 / "reg2" / "model.safetensors"))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    back = vitlab.load_model(tmp_path / "out").eval()
    with torch.no_grad():
        _close(back(IO["input_42"]), IO["reg2_logits_42"])


def test_onnx_export_of_a_register_model_equals_pytorch(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from vitlab.export import OnnxModel, export_onnx

    m = vitlab.create_model(REG4, pretrained=D2 / "reg4" / "model.safetensors", img_size=42, **ARCH).eval()
    export_onnx(m, tmp_path / "r.onnx", dynamic_batch=True, num_images=2, timing=False)
    with torch.no_grad():
        torch.testing.assert_close(OnnxModel(tmp_path / "r.onnx")(IO["input_42"]), IO["reg4_logits_42"],
                                   atol=1e-4, rtol=1e-4)


def test_rollout_on_a_register_model_maps_the_patch_grid():
    from vitlab.analysis import explain

    torch.manual_seed(0)
    m = vitlab.create_model(REG4, img_size=56, num_classes=3, **ARCH).eval()
    for method in ("rollout", "grad-rollout", "last-layer"):
        e = explain(m, torch.randn(2, 3, 56, 56), method=method)
        assert e.patch_maps.shape == (2, 4, 4) and e.maps.shape == (2, 56, 56)
        assert torch.isfinite(e.patch_maps).all()


def test_token_masking_keeps_the_registers_and_mae_trains():
    from vitlab.ssl.mae import MAE
    from vitlab.ssl.masking import RandomMasking

    torch.manual_seed(0)
    m = vitlab.create_model(REG4, img_size=56, **ARCH)
    out = m.forward_features(torch.randn(2, 3, 56, 56), mask=RandomMasking(0.75))
    assert out.shape == (2, 5 + 4, 32)  # class + 4 registers + the 4 kept of 16 patches
    mae = MAE(m, mask_ratio=0.75, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    loss = mae.forward(m, torch.randn(2, 3, 56, 56)).loss
    loss.backward()
    assert torch.isfinite(loss) and m.reg_token.grad is not None


def test_segmentation_and_detection_backbones_drop_the_registers():
    seg = vitlab.create_model("setr_pup_vit_small_patch16", backbone=REG4, num_classes=3, img_size=56,
                              backbone_args=dict(ARCH)).eval()
    assert seg.backbone.num_prefix_tokens == 5
    with torch.no_grad():
        assert seg(torch.randn(1, 3, 56, 56))["logits"].shape == (1, 3, 56, 56)
    det = vitlab.create_model("detr_vit_small_patch16", backbone=REG4, backbone_args=dict(
        ARCH, img_size=56, dynamic_img_size=True), dim=32, num_heads=4, enc_depth=1, dec_depth=1, ffn_dim=64,
        num_queries=4, num_classes=2)
    assert det(torch.randn(1, 3, 42, 56))["logits"].shape == (1, 4, 3)


def test_register_options_are_checked_by_name():
    with pytest.raises(ValueError, match="reg_tokens must be a whole number >= 0"):
        vitlab.create_model(PLAIN, reg_tokens=-1, **ARCH)
    with pytest.raises(ValueError, match=r"no_embed_class=True .*pos_embed='learn'"):
        vitlab.create_model(REG4, pos_embed="sincos", **ARCH)
    with pytest.raises(ValueError, match=r"no register tokens \(reg_tokens=0\)"):
        vitlab.create_model("deit_small_distilled_patch16_224", reg_tokens=2, img_size=32, patch_size=8, embed_dim=32,
                            depth=1, num_heads=2)
    m = vitlab.create_model(REG4, img_size=42, **ARCH)
    assert "reg_token" in m.no_weight_decay()


@pytest.mark.parametrize("tag,regs", [("hf_plain", 0), ("hf_reg", 4)])
@pytest.mark.parametrize("size", [42, 112])
def test_hugging_face_dinov2_folder_gives_transformers_outputs(tag, regs, size):
    """Dinov2Model / Dinov2WithRegistersModel folders: last_hidden_state is forward_features, pooler_output the
    headless forward; at the config's size and at another (transformers interpolates per forward: bicubic, and
    antialiased for the register model only)."""
    m = vitlab.load_model(D2 / tag).eval()
    assert m.cfg.reg_tokens == regs and m.cfg.no_embed_class == bool(regs) and m.num_classes == 0
    assert m.cfg.dynamic_img_size and m.cfg.pos_antialias == bool(regs)
    x = IO[f"input_{size}"]
    with torch.no_grad():
        _close(m.forward_features(x), IO[f"{tag}_last_{size}"])
        _close(m(x), IO[f"{tag}_pooler_{size}"])
    built = vitlab.create_model(m.model_name, pretrained=D2 / tag, img_size=size).eval()  # table resampled at load
    with torch.no_grad():
        _close(built.forward_features(x), IO[f"{tag}_last_{size}"])


def test_hugging_face_dinov2_classifier_is_refused_by_name(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "cls").mkdir()
    config = json.loads((D2 / "hf_plain" / "config.json").read_text())
    (tmp_path / "cls" / "config.json").write_text(json.dumps(config))
    sd = {f"dinov2.{k}": v for k, v in load_file(str(D2 / "hf_plain" / "model.safetensors")).items()}
    sd.update({"classifier.weight": torch.zeros(3, 64), "classifier.bias": torch.zeros(3)})
    save_file(sd, str(tmp_path / "cls" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="Dinov2ForImageClassification"):
        vitlab.load_model(tmp_path / "cls")


def test_hub_model_args_with_registers_the_weights_lack_are_named(tmp_path):
    import shutil

    shutil.copytree(D2 / "plain", tmp_path / "hub")
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    config["model_args"]["reg_tokens"] = 4
    (tmp_path / "hub" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"keeps 5 \(class and register tokens\).*reg_tokens=0"):
        vitlab.load_model(tmp_path / "hub")


def test_a_square_table_is_read_as_a_grid_not_as_prefix_entries(tmp_path):
    """A reg4 (no_embed_class) table of 3x3 patches has as many entries as 2x2 plus the 5 prefix tokens: it was
    split into tokens and an unresampled 2x2 table. It is the file's grid, resampled; the tokens stay."""
    from safetensors.torch import save_file

    from vitlab.layers import resample_pos_embed

    kw = dict(patch_size=16, depth=1, embed_dim=32, num_heads=2)
    torch.manual_seed(0)
    big = vitlab.create_model("vit_small_patch14_reg4_dinov2", img_size=48, **kw)
    sd = {k: v.detach().clone() for k, v in big.state_dict().items()}
    save_file(sd, str(tmp_path / "w.safetensors"))
    small = vitlab.create_model("vit_small_patch14_reg4_dinov2", img_size=32, pretrained=tmp_path / "w.safetensors",
                                **kw)
    torch.testing.assert_close(small.cls_token, sd["cls_token"], atol=0, rtol=0)
    torch.testing.assert_close(small.reg_token, sd["reg_token"], atol=0, rtol=0)
    expected = resample_pos_embed(sd["pos_embed"], (2, 2), old_size=(3, 3), num_prefix_tokens=0)
    torch.testing.assert_close(small.pos_embed.detach(), expected)
