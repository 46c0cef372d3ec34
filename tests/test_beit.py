"""BEiT / BEiT v2 / BEiT-3: parity with timm and transformers (fixtures from tests/fixtures/make_fixtures_beit.py),
the relative position bias and its class-token slots, resolution changes, the MIM head, errors."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import vitlab
from vitlab.checkpoints import CheckpointError
from vitlab.layers import capture_attention
from vitlab.layers.rel_pos_attention import RelPosAttention, class_relative_position_index, resample_class_rel_pos_table
from vitlab.ssl.beit_mim import load_beit_mim, mim_logits

FIX = Path(__file__).parent / "fixtures" / "beit"
ARCH = dict(img_size=24)  # the rest (width 32, depth 2, 4 heads, patch 8) is read off the files
B3 = dict(img_size=24, num_heads=4)  # BEiT-3 has no relative position table to read the heads from
IO = load_file(FIX / "io.safetensors")
TIMM_CASES = {"timm_beit": "beit_base_patch16_224", "timm_beit_shared": "beit_base_patch16_224",
              "timm_beitv2": "beitv2_base_patch16_224", "timm_beit3": "beit3_base_patch16_224"}


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    diff = (a - b).abs().max().item()
    assert diff < 1e-5, diff
    return diff


@pytest.mark.parametrize("case", sorted(TIMM_CASES))
def test_timm_state_dicts_give_timms_features_and_logits(case: str) -> None:
    arch = B3 if case == "timm_beit3" else ARCH  # timm_beit_shared pools the class token: read off the file
    model = vitlab.create_model(TIMM_CASES[case], pretrained=FIX / f"{case}.safetensors", **arch).eval()
    with torch.no_grad():
        _close(model.forward_features(IO["x"]), IO[f"{case}_features"])
        _close(model(IO["x"]), IO[f"{case}_logits"])
        with capture_attention(model) as maps:  # capture mode: the same logits, one map per layer
            _close(model(IO["x"]), IO[f"{case}_logits"])
    assert len(maps) == 2 and maps[0].shape == (2, 4, 10, 10)


def test_timm_layouts_are_read_off_the_file() -> None:
    shared = vitlab.create_model("beit_base_patch16_224", pretrained=FIX / "timm_beit_shared.safetensors", **ARCH)
    assert shared.rel_pos_bias is not None and shared.pos_embed is not None
    assert shared.blocks[0].attn.relative_position_bias_table is not None  # both kinds of table add up
    # a classifier with a final norm and no fc_norm: timm pooled the class token (it builds fc_norm to average)
    assert shared.global_pool == "token" and not isinstance(shared.norm, torch.nn.Identity)
    b3 = vitlab.create_model("beit3_base_patch16_224", pretrained=FIX / "timm_beit3.safetensors", **B3)
    assert b3.blocks[0].attn.q_bias is None and b3.blocks[0].attn.qkv.bias is not None  # fused bias, k included
    assert isinstance(b3.blocks[0].attn.norm, torch.nn.LayerNorm) and isinstance(b3.blocks[0].mlp.norm, torch.nn.LayerNorm)
    v1 = vitlab.create_model("beit_base_patch16_224", pretrained=FIX / "timm_beit.safetensors", **ARCH)
    assert v1.blocks[0].attn.qkv.bias is None and v1.blocks[0].attn.q_bias is not None  # no k bias
    assert v1.rel_pos_bias is None and v1.pos_embed is None


def test_class_token_table_slots() -> None:
    idx = class_relative_position_index((3, 3))
    size = 5 * 5
    assert idx.shape == (10, 10)
    assert (idx[0, 1:] == size).all() and (idx[1:, 0] == size + 1).all() and idx[0, 0] == size + 2
    assert idx[1, 1] == idx[5, 5] == 2 * 5 + 2  # offset (0, 0) sits in the table's centre
    assert idx[1:, 1:].max() < size
    attn = RelPosAttention(8, num_heads=2, grid=(3, 3))
    with torch.no_grad():
        attn.relative_position_bias_table[size:] = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    bias = attn.position_bias()  # (heads, 10, 10)
    assert bias[0, 0, 3] == 1 and bias[1, 4, 0] == 4 and bias[0, 0, 0] == 5


def test_resolution_change_resamples_tables_as_timm() -> None:
    # the 3x3-grid weights at 40px (5x5): timm's set_input_size resampled the 2 layers' tables
    model = vitlab.create_model("beit_base_patch16_224", pretrained=FIX / "timm_beit.safetensors", img_size=40).eval()
    with torch.no_grad():
        _close(model(IO["x_res"]), IO["timm_beit_res_logits"])
    table = model.blocks[0].attn.relative_position_bias_table
    assert table.shape == (9 * 9 + 3, 4)
    sd = load_file(FIX / "timm_beit.safetensors")
    torch.testing.assert_close(table[-3:], sd["blocks.0.attn.relative_position_bias_table"][-3:])  # class rows kept
    same = resample_class_rel_pos_table(sd["blocks.0.attn.relative_position_bias_table"], (3, 3), (3, 3))
    assert same is sd["blocks.0.attn.relative_position_bias_table"]


def test_shared_table_is_copied_into_every_layer_for_fine_tuning(tmp_path: Path) -> None:
    sd = load_file(FIX / "timm_beit_shared.safetensors")
    sd = {k: v for k, v in sd.items() if not k.startswith("blocks.") or "relative_position_bias_table" not in k}
    save_file(sd, tmp_path / "pretrain.safetensors")
    fine = vitlab.create_model("beit_base_patch16_224", pretrained=tmp_path / "pretrain.safetensors", **ARCH,
                               use_rel_pos_bias=True, use_shared_rel_pos_bias=False)
    assert fine.rel_pos_bias is None
    for blk in fine.blocks:
        torch.testing.assert_close(blk.attn.relative_position_bias_table, sd["rel_pos_bias.relative_position_bias_table"])
    shared = vitlab.create_model("beit_base_patch16_224", pretrained=tmp_path / "pretrain.safetensors", **ARCH).eval()
    with torch.no_grad():  # one shared table or the same table in each layer: the same function
        torch.testing.assert_close(fine.eval()(IO["x"]), shared(IO["x"]), atol=1e-6, rtol=1e-6)


def test_finetune_unshares_the_pretraining_table_unless_told(tmp_path: Path) -> None:
    """`vitlab finetune` from a pre-training file (one shared table) gives each layer its own copy, as BEiT
    fine-tunes; a recipe that sets the option keeps it shared."""
    from vitlab.train.recipe import Recipe
    from vitlab.train.run import TrainJob, build_model

    sd = load_file(FIX / "timm_beit_shared.safetensors")
    sd = {k: v for k, v in sd.items() if not k.startswith("blocks.") or "relative_position_bias_table" not in k}
    save_file(sd, tmp_path / "pretrain.safetensors")

    def job(**over):
        return TrainJob(recipe=Recipe(name="t", img_size=24, model_overrides=over), data="digits",
                        output=tmp_path / "run", pretrained=str(tmp_path / "pretrain.safetensors"),
                        model="beit_base_patch16_224")

    fine = build_model(job(), num_classes=3, in_chans=3)
    assert fine.rel_pos_bias is None and fine.num_classes == 3
    for blk in fine.blocks:
        torch.testing.assert_close(blk.attn.relative_position_bias_table, sd["rel_pos_bias.relative_position_bias_table"])
    kept = build_model(job(use_shared_rel_pos_bias=True), num_classes=3, in_chans=3)
    assert kept.rel_pos_bias is not None and kept.blocks[0].attn.relative_position_bias_table is None


def test_hf_image_classification_both_spellings(tmp_path: Path) -> None:
    model = vitlab.create_model("beit_base_patch16_224", pretrained=FIX / "hf_cls").eval()
    assert model.cfg.norm_eps == 1e-12 and model.num_classes == 10 and model.class_names[0] == "LABEL_0"
    with torch.no_grad():
        _close(model(IO["x"]), IO["hf_cls_logits"])
    other = tmp_path / "hf_v5"
    other.mkdir()
    shutil.copy(FIX / "hf_cls" / "config.json", other / "config.json")
    shutil.copy(FIX / "hf_cls_v5_spelling.safetensors", other / "model.safetensors")
    assert any(".q_proj." in k for k in load_file(other / "model.safetensors"))
    again = vitlab.load_model(other).eval()  # model_type "beit" -> the registered default, fitted by the file
    with torch.no_grad():
        _close(again(IO["x"]), IO["hf_cls_logits"])


@pytest.mark.parametrize("spelling", ["hub", "v5"])
def test_hf_mim_checkpoint_gives_transformers_token_logits(spelling: str, tmp_path: Path, caplog) -> None:
    path = FIX / "hf_mim"
    if spelling == "v5":
        path = tmp_path / "mim"
        path.mkdir()
        shutil.copy(FIX / "hf_mim" / "config.json", path / "config.json")
        shutil.copy(FIX / "hf_mim_v5_spelling.safetensors", path / "model.safetensors")
    with caplog.at_level(logging.INFO):
        backbone = vitlab.create_model("beit_base_patch16_224", pretrained=path)
    assert "lm_head" in caplog.text and "mask_token" in caplog.text  # the head keys are reported, not loaded
    assert backbone.num_classes == 0 and backbone.rel_pos_bias is not None
    mim = load_beit_mim(path)
    mim.backbone.eval()
    mask = IO["mim_mask"]
    with torch.no_grad():
        logits = mim_logits(mim, IO["x"], mask)
    assert logits.shape == (2, 9, 64)
    _close(logits, IO["hf_mim_logits"])
    _close(logits[mask], IO["hf_mim_logits"][mask])
    with torch.no_grad():  # the mask matters: without it the masked positions' logits change
        assert (mim_logits(mim, IO["x"])[mask] - IO["hf_mim_logits"][mask]).abs().max() > 1e-3


def test_mim_head_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a BEiT masked-image-modelling checkpoint"):
        load_beit_mim(FIX / "timm_beit.safetensors")
    mim = load_beit_mim(FIX / "hf_mim")
    with pytest.raises(ValueError, match="bool_masked_pos has shape"):
        mim_logits(mim, IO["x"], torch.zeros(2, 5, dtype=torch.bool))


def _torchscale_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's BEiT-3 tensors under the torchscale names that timm's own ``_convert_beit3`` reads (branch A),
    plus the text branch, text embedding and mask token it drops, and fairseq's 2 unused position rows."""
    out: dict[str, torch.Tensor] = {}
    names = {"attn.proj": "self_attn.out_proj", "attn.norm": "self_attn.inner_attn_ln", "norm1": "self_attn_layer_norm",
             "norm2": "final_layer_norm", "mlp.fc1": "ffn.fc1", "mlp.fc2": "ffn.fc2", "mlp.norm": "ffn.ffn_layernorm"}
    for k, v in sd.items():
        if k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            module, param = rest.rsplit(".", 1)
            if module == "attn.qkv":
                for name, part in zip("qkv", v.chunk(3)):
                    out[f"beit3.encoder.layers.{i}.self_attn.{name}_proj.A.{param}"] = part
                    out[f"beit3.encoder.layers.{i}.self_attn.{name}_proj.B.{param}"] = torch.randn_like(part)
            else:
                out[f"beit3.encoder.layers.{i}.{names[module]}.A.{param}"] = v
                out[f"beit3.encoder.layers.{i}.{names[module]}.B.{param}"] = torch.randn_like(v)
        elif k == "pos_embed":
            out["beit3.encoder.embed_positions.A.weight"] = torch.cat([torch.randn(2, v.shape[-1]), v[0]])
            out["beit3.encoder.embed_positions.B.weight"] = torch.randn(16, v.shape[-1])
        elif k == "cls_token":
            out["beit3.vision_embed.cls_token"] = v
        elif k.startswith("patch_embed.proj."):
            out["beit3.vision_embed.proj." + k.rsplit(".", 1)[1]] = v
        else:
            out[k] = v  # fc_norm, head
    out["beit3.vision_embed.mask_token"] = torch.randn(1, 1, sd["cls_token"].shape[-1])
    out["beit3.text_embed.weight"] = torch.randn(20, sd["cls_token"].shape[-1])
    return out


def test_beit3_torchscale_layout(tmp_path: Path) -> None:
    sd = _torchscale_layout(load_file(FIX / "timm_beit3.safetensors"))
    torch.save({"model": sd}, tmp_path / "beit3_base_patch16_224_in1k.pth")
    model = vitlab.create_model("beit3_base_patch16_224", pretrained=tmp_path / "beit3_base_patch16_224_in1k.pth",
                                **B3).eval()
    with torch.no_grad():
        _close(model(IO["x"]), IO["timm_beit3_logits"])
    # torchscale's encoder normalises its output (encoder.layer_norm) before the classifier's pooling + fc_norm
    sd["beit3.encoder.layer_norm.A.weight"] = torch.full((32,), 2.0)
    sd["beit3.encoder.layer_norm.A.bias"] = torch.zeros(32)
    torch.save({"model": sd}, tmp_path / "with_norm.pth")
    normed = vitlab.create_model("beit3_base_patch16_224", pretrained=tmp_path / "with_norm.pth", **B3).eval()
    assert isinstance(normed.norm, torch.nn.LayerNorm) and isinstance(normed.fc_norm, torch.nn.LayerNorm)
    sd["beit3.encoder.layers.0.self_attn.rotary.A.weight"] = torch.zeros(3)
    torch.save({"model": sd}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match="unexpected key 'beit3.encoder.layers.0.self_attn.rotary"):
        vitlab.create_model("beit3_base_patch16_224", pretrained=tmp_path / "odd.pth", **B3)


def test_pretraining_keys_are_dropped_and_reported(tmp_path: Path, caplog) -> None:
    sd = load_file(FIX / "timm_beit_shared.safetensors")
    sd.update({"mask_token": torch.zeros(1, 1, 32), "lm_head.weight": torch.zeros(64, 32), "lm_head.bias": torch.zeros(64)})
    save_file(sd, tmp_path / "unilm_pretrain.safetensors")
    with caplog.at_level(logging.INFO):
        model = vitlab.create_model("beit_base_patch16_224", pretrained=tmp_path / "unilm_pretrain.safetensors", **ARCH)
    assert "3 pre-training key(s)" in caplog.text
    assert model.num_classes == 10
    mim = load_beit_mim(tmp_path / "unilm_pretrain.safetensors", img_size=24)
    assert mim.lm_head[1].out_features == 64 and isinstance(mim.lm_head[0], torch.nn.Identity)


def test_dynamic_size_is_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="tied to the patch grid"):
        vitlab.create_model("beit_base_patch16_224", dynamic_img_size=True)
    assert "one patch grid" in vitlab.create_model("beit_base_patch16_224", img_size=32, depth=1).onnx_fixed_size_reason
    model = vitlab.create_model("beit_base_patch16_224", img_size=32, embed_dim=32, depth=1, num_heads=4)
    with pytest.raises(ValueError, match="built for 32x32"):
        model(torch.randn(1, 3, 48, 48))


def test_token_dropping_masks_keep_each_tokens_biases() -> None:
    # MAE-style masking (keep K patches): the result equals attention over all tokens where the dropped ones
    # are masked out as keys, with the kept tokens' own relative-position biases
    model = vitlab.create_model("beit_base_patch16_224", pretrained=FIX / "timm_beit_shared.safetensors", **ARCH).eval()
    keep = torch.tensor([[0, 4, 8], [7, 1, 2]])

    def drop(tokens, grid):
        return tokens, keep

    with torch.no_grad():
        out = model.forward_features(IO["x"], mask=drop)  # (2, 1 + 3, D)
        x, _, _ = model._embed(IO["x"])
        allowed = torch.zeros(2, 10, dtype=torch.bool)
        allowed[:, 0] = True
        allowed.scatter_(1, keep + 1, True)
        bias = model.rel_pos_bias()
        full = model.blocks[0].attn
        key_mask = torch.where(allowed[:, None, None, :], 0.0, float("-inf"))  # (2, 1, 1, 10)
        ref = x
        for blk in model.blocks:  # each layer adds its own table inside the attention
            ref = blk(ref, attn_mask=bias.unsqueeze(0) + key_mask)
        ref = model.norm(ref)
    rows = torch.cat([torch.zeros(2, 1, dtype=torch.long), keep + 1], 1)
    torch.testing.assert_close(out, torch.stack([ref[b, rows[b]] for b in range(2)]), atol=1e-5, rtol=1e-5)
    assert full.relative_position_bias_table is not None  # the layer's own table took part too
    b3 = vitlab.create_model("beit3_base_patch16_224", img_size=32, embed_dim=32, depth=1, num_heads=4)
    assert b3.forward_features(torch.randn(1, 3, 32, 32), mask=lambda t, g: (t, torch.tensor([[0, 3]]))).shape == (1, 3, 32)


@pytest.mark.parametrize("name", ["beit_base_patch16_224", "beit3_base_patch16_224"])
def test_explain_methods_and_save_load_round_trip(name: str, tmp_path: Path) -> None:
    from vitlab.analysis.explain import explain, methods_for

    model = vitlab.create_model(name, img_size=32, embed_dim=32, depth=2, num_heads=4, num_classes=3).eval()
    assert {"rollout", "grad-rollout", "last-layer", "grad-cam"} <= set(methods_for(model))
    x = torch.randn(2, 3, 32, 32)
    for method in ("rollout", "grad-rollout", "last-layer"):
        out = explain(model, x, method=method)
        assert out.method == method and out.maps.shape == (2, 32, 32) and out.patch_maps.shape == (2, 2, 2)
        assert torch.isfinite(out.maps).all()
    vitlab.save_model(model, tmp_path / "m.safetensors", class_names=["a", "b", "c"])
    again = vitlab.load_model(tmp_path / "m.safetensors").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), atol=0, rtol=0)


def test_onnx_export_fixed_size_and_refused_dynamic_size(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from vitlab.export import ExportError, OnnxModel, export_onnx

    model = vitlab.create_model("beit_base_patch16_224", pretrained=FIX / "timm_beit.safetensors", **ARCH).eval()
    with pytest.raises(ExportError, match="built for one patch grid"):
        export_onnx(model, tmp_path / "d.onnx", dynamic_size=True, num_images=2, timing=False)
    report = export_onnx(model, tmp_path / "f.onnx", img_size=40, num_images=4, timing=False)  # tables resampled
    assert report.written and report.max_abs_diff < 1e-4
    assert OnnxModel(tmp_path / "f.onnx").input_hw == (40, 40)
    torch.testing.assert_close(OnnxModel(tmp_path / "f.onnx")(IO["x_res"][:1]), IO["timm_beit_res_logits"][:1],
                               atol=1e-4, rtol=1e-4)


def test_hf_bare_beit_model_keeps_its_own_final_norm(tmp_path: Path) -> None:
    # a BeitModel (no "beit." prefix) with use_mean_pooling=False: its top-level "layernorm" is the backbone's
    # final norm, not a MIM head's; built from hf_cls by moving the pooler's norm there
    sd = load_file(FIX / "hf_cls" / "model.safetensors")
    bare = {k[len("beit."):]: v for k, v in sd.items() if k.startswith("beit.")}
    bare = {("layernorm." + k.rsplit(".", 1)[1] if k.startswith("pooler.layernorm.") else k): v for k, v in bare.items()}
    folder = tmp_path / "bare"
    folder.mkdir()
    save_file(bare, folder / "model.safetensors")
    import json

    cfg = json.loads((FIX / "hf_cls" / "config.json").read_text())
    cfg.update(use_mean_pooling=False, architectures=["BeitModel"])
    (folder / "config.json").write_text(json.dumps(cfg))
    model = vitlab.load_model(folder).eval()
    assert model.num_classes == 0 and isinstance(model.norm, torch.nn.LayerNorm)
    cls = vitlab.create_model("beit_base_patch16_224", pretrained=FIX / "hf_cls").eval()
    with torch.no_grad():
        blocks_out = cls.forward_features(IO["x"])  # no final norm in the classifier: fc_norm after pooling
        torch.testing.assert_close(model.forward_features(IO["x"]), cls.fc_norm(blocks_out), atol=1e-6, rtol=1e-6)


def test_beit3_dynamic_size_resamples_the_absolute_table_as_at_build_time() -> None:
    fixed = vitlab.create_model("beit3_base_patch16_224", pretrained=FIX / "timm_beit3.safetensors", **B3).eval()
    assert fixed.onnx_fixed_size_reason is None  # no relative position tables
    dyn = vitlab.create_model("beit3_base_patch16_224", pretrained=FIX / "timm_beit3.safetensors", **B3,
                              dynamic_img_size=True).eval()
    big = vitlab.create_model("beit3_base_patch16_224", pretrained=FIX / "timm_beit3.safetensors", num_heads=4,
                              img_size=40).eval()  # the checkpoint's table resampled when loading
    with torch.no_grad():
        torch.testing.assert_close(dyn(IO["x"]), IO["timm_beit3_logits"], atol=1e-5, rtol=0)
        torch.testing.assert_close(dyn(IO["x_res"]), big(IO["x_res"]), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_beit3_onnx_dynamic_size(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from vitlab.export import OnnxModel, export_onnx

    model = vitlab.create_model("beit3_base_patch16_224", pretrained=FIX / "timm_beit3.safetensors", **B3).eval()
    report = export_onnx(model, tmp_path / "d.onnx", dynamic_batch=True, dynamic_size=True, num_images=4, timing=False)
    assert len(report.other_sizes) == 2 and all(s.max_abs_diff < 1e-4 for s in report.other_sizes)
    big = vitlab.create_model("beit3_base_patch16_224", pretrained=FIX / "timm_beit3.safetensors", num_heads=4,
                              img_size=40).eval()
    with torch.no_grad():
        torch.testing.assert_close(OnnxModel(tmp_path / "d.onnx")(IO["x_res"]), big(IO["x_res"]), atol=1e-4, rtol=1e-4)


def test_forward_intermediates_take_the_masking_hook() -> None:
    from vitlab.ssl.beit_mim import FixedMask

    model = vitlab.create_model("beit_base_patch16_224", pretrained=FIX / "timm_beit.safetensors", **ARCH).eval()
    token = torch.randn(32)
    masker = FixedMask(token, IO["mim_mask"])
    with torch.no_grad():
        final, inter = model.forward_intermediates(IO["x"], [1], mask=masker)
        torch.testing.assert_close(final, model.forward_features(IO["x"], mask=masker), atol=0, rtol=0)
        unmasked, _ = model.forward_intermediates(IO["x"], [1])
    assert (final - unmasked).abs().max() > 1e-3 and inter[0].shape == (2, 9, 32)


def test_hf_data2vec_vision_gives_transformers_logits() -> None:
    """data2vec-vision is BEiT's architecture under ``data2vec_vision.``: its folder loads by model_type."""
    io = load_file(str(FIX / "io_hf_more.safetensors"))
    model = vitlab.load_model(FIX / "hf_data2vec_cls").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(io["x"]), io["data2vec_logits"], atol=1e-5, rtol=0)


def test_hf_semantic_segmentation_backbone_gives_transformers_hidden_states(caplog) -> None:
    """BeitForSemanticSegmentation: the backbone's blocks equal transformers' hidden states; the FPN necks and the
    UperNet / auxiliary heads are dropped, and the log says so."""
    io = load_file(str(FIX / "io_hf_more.safetensors"))
    with caplog.at_level(logging.INFO):
        model = vitlab.load_model(FIX / "hf_seg").eval()
    assert "FPN necks and the UperNet / auxiliary heads dropped" in caplog.text
    assert model.num_classes == 0 and len(model.blocks) == 4
    with torch.no_grad():
        _, inter = model.forward_intermediates(io["x"], return_prefix_tokens=True)
    for i, (patches, cls) in enumerate(inter):
        hidden = io[f"seg_hidden_{i}"]  # (B, 1 + N, D), class token first
        torch.testing.assert_close(cls.reshape(hidden[:, :1].shape), hidden[:, :1], atol=1e-5, rtol=0)
        torch.testing.assert_close(patches, hidden[:, 1:], atol=1e-5, rtol=0)
