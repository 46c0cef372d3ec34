"""CLIP's and SigLIP's image towers under timm's names: a LayerNorm before the blocks (``pre_norm``, timm's
``norm_pre``, no patch bias), QuickGELU (``gelu="quick"``) and attention pooling from a learned query
(``global_pool="map"``, timm's ``attn_pool``).

Reference outputs: tiny timm models (tests/fixtures/make_fixtures_clip_siglip.py): ``clip`` (pre_norm, 5 classes),
``clip_quick`` (QuickGELU, 4 classes), ``siglip`` (map pooling, tanh GELU, headless) and ``siglip_gap`` (average
pooling, headless), at their size (32 px), at 48 px (timm's checkpoint_filter_fn resampling) and with
dynamic_img_size.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import vitlab
from vitlab.checkpoints import CheckpointError, save_timm_folder, timm_model_args

CS = Path(__file__).resolve().parent / "fixtures" / "clip_siglip"
IO = load_file(str(CS / "io.safetensors"))
ARCH = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)  # the fixtures' models
MODELS = {  # tag: (timm name, pre_norm, gelu, global_pool, classes)
    "clip": ("vit_base_patch16_clip_224", True, "exact", "token", 5),
    "clip_quick": ("vit_base_patch16_clip_quickgelu_224", True, "quick", "token", 4),
    "siglip": ("vit_base_patch32_siglip_256", False, "tanh", "map", 0),
    "siglip_gap": ("vit_base_patch16_siglip_gap_224", False, "exact", "avg", 0),
}
ATOL = 1e-5


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= ATOL


def _load(tag: str, **kw) -> torch.nn.Module:
    return vitlab.create_model(MODELS[tag][0], pretrained=CS / tag / "model.safetensors", **{"img_size": 32, **ARCH,
                                                                                              **kw}).eval()


@pytest.mark.parametrize("tag", sorted(MODELS))
@pytest.mark.parametrize("size", [32, 48])
def test_timm_state_dict_gives_timms_outputs_at_its_size_and_another(tag, size):
    name, pre_norm, gelu, pool, classes = MODELS[tag]
    m = _load(tag, img_size=size)
    assert (m.cfg.pre_norm, m.cfg.gelu, m.global_pool, m.num_classes) == (pre_norm, gelu, pool, classes)
    assert (m.patch_embed.proj.bias is None) == pre_norm and (m.attn_pool is not None) == (pool == "map")
    x = IO[f"input_{size}"]
    with torch.no_grad():
        _close(m(x), IO[f"{tag}_logits_{size}"])
        if size == 32:
            feats = m.forward_features(x)
            _close(feats, IO[f"{tag}_features_32"])
            _close(m.forward_head(feats, pre_logits=True), IO[f"{tag}_pre_32"])
            _, inter = m.forward_intermediates(x, indices=1, output_fmt="NCHW")
            _close(inter[0], IO[f"{tag}_inter_32"])


@pytest.mark.parametrize("tag", sorted(MODELS))
def test_dynamic_img_size_matches_timm_per_batch(tag):
    m = _load(tag, dynamic_img_size=True)
    with torch.no_grad():
        _close(m(IO["input_48"]), IO[f"{tag}_dyn_48"])
        _close(m(IO["input_32"]), IO[f"{tag}_logits_32"])


@pytest.mark.parametrize("tag", sorted(MODELS))
def test_timm_hub_folder_loads_its_architecture_and_preprocessing(tag):
    name, pre_norm, gelu, pool, classes = MODELS[tag]
    m = vitlab.load_model(CS / tag).eval()
    assert m.model_name == name and m.num_classes == classes
    assert (m.cfg.pre_norm, m.cfg.gelu, m.global_pool) == (pre_norm, gelu, pool)
    with torch.no_grad():
        _close(m(IO["input_32"]), IO[f"{tag}_logits_32"])
    pre = m.preprocessing
    assert pre.input_size == (3, 32, 32) and pre.interpolation == "bicubic"
    clip_mean = (0.48145466, 0.4578275, 0.40821073)
    assert pre.mean == pytest.approx(clip_mean if tag.startswith("clip") else (0.5, 0.5, 0.5))


def test_plain_state_dicts_say_pre_norm_and_map_the_activation_is_the_names():
    """Loaded into the plain ViT name, the files' norm_pre.* / attn_pool.* keys build the norm and the pool (no class
    token: average pooling would be the guess without attn_pool); the activation is not in the tensors."""
    clip = vitlab.create_model("vit_base_patch16_224", pretrained=CS / "clip" / "model.safetensors", img_size=32,
                               norm_eps=1e-5, **ARCH).eval()
    assert clip.cfg.pre_norm and clip.global_pool == "token"
    siglip = vitlab.create_model("vit_base_patch16_224", pretrained=CS / "siglip" / "model.safetensors", img_size=32,
                                 gelu="tanh", **ARCH).eval()
    assert (siglip.cfg.class_token, siglip.global_pool, siglip.cfg.pre_norm) == (False, "map", False)
    quick_as_exact = _load("clip_quick", gelu="exact")
    with torch.no_grad():
        _close(clip(IO["input_32"]), IO["clip_logits_32"])
        _close(siglip(IO["input_32"]), IO["siglip_logits_32"])
        assert (quick_as_exact(IO["input_32"]) - IO["clip_quick_logits_32"]).abs().max() > 1e-3
    plain = vitlab.create_model("vit_base_patch16_clip_224", pretrained=CS / "siglip_gap" / "model.safetensors",
                                img_size=32, norm_eps=1e-6, **ARCH)
    assert not plain.cfg.pre_norm and plain.patch_embed.proj.bias is not None  # no norm_pre in the file


def test_attention_pool_variants_timm_has_and_vitlab_has_not_are_named(tmp_path):
    sd = load_file(str(CS / "siglip" / "model.safetensors"))
    sd["attn_pool.pos_embed"] = torch.zeros(16, 32)
    save_file(sd, str(tmp_path / "pos.safetensors"))
    with pytest.raises(CheckpointError, match="attn_pool.pos_embed"):
        vitlab.create_model("vit_base_patch32_siglip_256", pretrained=tmp_path / "pos.safetensors", img_size=32, **ARCH)


def test_reset_classifier_keeps_or_drops_the_attention_pool_as_timm():
    m = _load("siglip")
    m.reset_classifier(3)
    assert m.attn_pool is not None and m.cfg.global_pool == "map"
    with torch.no_grad():
        assert m(IO["input_32"]).shape == (2, 3)
        _close(m.forward_head(m.forward_features(IO["input_32"]), pre_logits=True), IO["siglip_pre_32"])
    m.reset_classifier(3, "avg")  # timm: attn_pool = None
    assert m.attn_pool is None and m.cfg.global_pool == "avg" and not any(k.startswith("attn_pool.")
                                                                          for k in m.state_dict())
    with torch.no_grad():
        _close(m.forward_head(IO["siglip_features_32"], pre_logits=True), IO["siglip_features_32"].mean(dim=1))
    rebuilt = vitlab.create_model("vit_base_patch32_siglip_256", **{**ARCH, "img_size": 32, "num_classes": 3,
                                                                    "global_pool": m.cfg.global_pool,
                                                                    "fc_norm": m.cfg.fc_norm})
    assert set(rebuilt.state_dict()) == set(m.state_dict())
    with pytest.raises(ValueError, match=r"global_pool='map' needs the attention pool \(attn_pool\)"):
        m.reset_classifier(3, "map")
    with pytest.raises(ValueError, match="attn_pool"):
        _load("clip").reset_classifier(2, "map")


def test_weight_decay_and_layer_decay_groups():
    """The learned query is not decayed (as the prefix tokens; big_vision's SigLIP does not decay it), the attention
    pool is in the head's layer, the norm before the blocks in the embeddings' (timm's group_matcher)."""
    from vitlab.train.optim import param_groups

    siglip, clip = _load("siglip"), _load("clip")
    assert "attn_pool.latent" in siglip.no_weight_decay() and "attn_pool.latent" not in clip.no_weight_decay()
    layer = {}
    decayed = set()
    for m in (siglip, clip):
        for g in param_groups(m, weight_decay=0.05, layer_decay=0.75):
            layer.update({n: g["layer_id"] for n in g["names"]})
            decayed.update(n for n in g["names"] if g["weight_decay"] > 0)
    assert layer["attn_pool.latent"] == layer["attn_pool.mlp.fc1.weight"] == 3  # depth 2: the head's layer
    assert layer["norm_pre.weight"] == 0 and "attn_pool.latent" not in decayed and "attn_pool.kv.weight" in decayed


def test_rollout_reads_the_blocks_of_a_map_pooled_model():
    """No class token, the head reads attention pooling over the patch tokens: the blocks' maps are captured as for
    any ViT; the pool's (1 x N) weights are captured apart (``pool_attention``) and weight the relevance rows
    (tests/test_explain_map_pool.py checks the numbers)."""
    from vitlab.analysis import capture, explain

    m = _load("siglip")
    out = capture(m, IO["input_32"])
    assert len(out.attentions) == 2 and all(a.shape == (2, 2, 16, 16) for a in out.attentions)
    for method in ("rollout", "grad-rollout", "last-layer", "grad-cam"):
        e = explain(m, IO["input_32"], method=method)
        assert e.patch_maps.shape == (2, 4, 4) and torch.isfinite(e.patch_maps).all()
    c = explain(_load("clip"), IO["input_48"][:, :, :32, :32], method="rollout")
    assert c.patch_maps.shape == (2, 4, 4)


def test_token_masking_and_mae_reach_the_pre_norm():
    from vitlab.ssl.mae import MAE
    from vitlab.ssl.masking import RandomMasking

    torch.manual_seed(0)
    for tag, prefix in (("clip", 1), ("siglip", 0)):
        m = _load(tag).train()
        out = m.forward_features(IO["input_32"], mask=RandomMasking(0.75))
        assert out.shape == (2, prefix + 4, 32)
        mae = MAE(m, mask_ratio=0.75, decoder_dim=16, decoder_depth=1, decoder_heads=2)
        loss = mae.forward(m, IO["input_32"]).loss
        loss.backward()
        assert torch.isfinite(loss) and m.patch_embed.proj.weight.grad is not None
        if tag == "clip":
            assert m.norm_pre.weight.grad is not None and m.norm_pre.weight.grad.abs().sum() > 0


def test_segmentation_and_detection_backbones():
    for name in ("vit_base_patch16_clip_224", "vit_base_patch32_siglip_256"):
        seg = vitlab.create_model("setr_pup_vit_small_patch16", backbone=name, num_classes=3, img_size=32,
                                  backbone_args=dict(ARCH)).eval()
        with torch.no_grad():
            assert seg(torch.randn(1, 3, 32, 32))["logits"].shape == (1, 3, 32, 32)
        det = vitlab.create_model("detr_vit_small_patch16", backbone=name, backbone_args=dict(
            ARCH, img_size=32, dynamic_img_size=True), dim=32, num_heads=4, enc_depth=1, dec_depth=1, ffn_dim=64,
            num_queries=4, num_classes=2)
        out = det(torch.randn(1, 3, 32, 48))
        assert out["logits"].shape == (1, 4, 3)
        # the dense models read tokens: a SigLIP pool would hold parameters without gradients (a DDP error)
        o = seg.train()(torch.randn(1, 3, 32, 32))  # logits and the auxiliary heads' outputs
        sum(t.sum() for v in o.values() for t in (v if isinstance(v, list) else [v])).backward()
        (out["logits"].sum() + out["boxes"].sum()).backward()
        for model in (seg, det):
            idle = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
            assert not idle and not any(".attn_pool." in k for k in model.state_dict()), idle


def test_export_to_timm_states_pre_norm_activation_and_pooling(tmp_path):
    """The CLIP / SigLIP names carry their options; the plain name needs them as arguments. (timm loads these
    folders strictly to the same logits: checked by hand in the peer environment.)"""
    args = timm_model_args(_load("clip_quick"))
    assert args.model_name == "vit_base_patch16_clip_quickgelu_224"
    assert not {"pre_norm", "act_layer", "global_pool"} & set(args.kwargs)
    m = vitlab.create_model("vit_base_patch16_224", pretrained=CS / "siglip" / "model.safetensors", img_size=32,
                            gelu="tanh", **ARCH).eval()
    kw = timm_model_args(m).kwargs
    assert (kw["global_pool"], kw["class_token"], kw["act_layer"]) == ("map", False, "gelu_tanh")
    q = vitlab.create_model("vit_base_patch16_224", pre_norm=True, gelu="quick", img_size=32, **ARCH)
    kw = timm_model_args(q).kwargs
    assert kw["pre_norm"] is True and kw["act_layer"] == "quick_gelu"
    save_timm_folder(q, tmp_path / "quick")  # config.json model_args act_layer="quick_gelu", pre_norm=True
    back = vitlab.load_model(tmp_path / "quick").eval()
    assert (back.cfg.gelu, back.cfg.pre_norm) == ("quick", True)
    with torch.no_grad():
        _close(back(IO["input_32"]), q.eval()(IO["input_32"]))
    save_timm_folder(m, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architecture"] == "vit_base_patch16_224" and config["model_args"]["global_pool"] == "map"
    got, want = load_file(str(tmp_path / "out" / "model.safetensors")), load_file(str(CS / "siglip" /
                                                                                        "model.safetensors"))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    back = vitlab.load_model(tmp_path / "out").eval()
    assert back.cfg.gelu == "tanh"
    with torch.no_grad():
        _close(back(IO["input_32"]), IO["siglip_logits_32"])


@pytest.mark.parametrize("tag", ["clip_quick", "siglip"])
def test_onnx_export_equals_pytorch(tag, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from vitlab.export import OnnxModel, export_onnx

    m = _load(tag)
    export_onnx(m, tmp_path / "m.onnx", dynamic_batch=True, num_images=2, timing=False)
    torch.testing.assert_close(OnnxModel(tmp_path / "m.onnx")(IO["input_32"]), IO[f"{tag}_logits_32"],
                               atol=1e-4, rtol=1e-4)


def test_options_are_checked_by_name():
    with pytest.raises(ValueError, match="gelu must be 'exact', 'tanh' or 'quick', got 'quick_gelu'"):
        vitlab.create_model("vit_base_patch16_clip_224", gelu="quick_gelu", **ARCH)
    with pytest.raises(ValueError, match="global_pool must be one of .*'map'"):
        vitlab.create_model("vit_base_patch32_siglip_256", global_pool="attn", **ARCH)
