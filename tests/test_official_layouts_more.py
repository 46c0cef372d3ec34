"""Official checkpoint layouts read as timm reads them (fixtures: tests/fixtures/make_fixtures_official_more.py).

* JAX ``.npz`` ViTs run the tanh approximation of GELU, as the original models (``flax.linen.gelu``), and their
  position table is resampled as timm's .npz reader does (bilinear, not antialiased).
* DeiT reads the official DINO and MAE layouts that ViT reads; SETR's error for an encoder file says how it
  takes one.
* DeiT III's official files (facebookresearch/deit ``models_v2.py``): LayerScale ``gamma_1`` / ``gamma_2`` and a
  position table without a class-token entry.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import vitlab
from vitlab import create_model, load_model
from vitlab.checkpoints import CheckpointError, read_source, save_model
from vitlab.models.dense import load_backbone
from vitlab.models.vit import ViTConfig

FIX = Path(__file__).resolve().parent / "fixtures"
ATOL = 1e-5
TINY = dict(embed_dim=32, depth=2, num_heads=4)
P8 = dict(TINY, patch_size=8)
DINO_TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)
MAE_TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    err = (actual - expected).abs().max().item()
    assert err <= ATOL, f"{what}: max abs difference {err:.3g} > {ATOL}"


def gelu_kinds(model: nn.Module) -> set[str]:
    return {m.approximate for m in model.modules() if isinstance(m, nn.GELU)}


# ------------------------------------------------------------------------------------------- JAX GELU
def test_npz_vit_runs_tanh_gelu_as_the_jax_models_and_keeps_it_through_a_vitlab_file(tmp_path: Path) -> None:
    ref = load_file(str(FIX / "official_more_jax_tanh.safetensors"))
    x = load_file(str(FIX / "jax_token_p16" / "io.safetensors"))["input"]
    model = create_model("vit_base_patch16_224", pretrained=FIX / "jax_token_p16" / "model.npz", img_size=48,
                         **TINY).eval()
    assert model.cfg.gelu == "tanh" and gelu_kinds(model) == {"tanh"}
    with torch.no_grad():
        assert_close(model(x), ref["jax_token_p16/logits"], "logits against timm with act_layer='gelu_tanh'")
    again = load_model(save_model(model, tmp_path / "m.safetensors")).eval()
    assert again.cfg.gelu == "tanh"
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    # timm files keep timm's exact GELU
    timm_file = create_model("vit_base_patch16_224", pretrained=FIX / "timm_token_p16" / "model.safetensors",
                             img_size=64, **TINY)
    assert timm_file.cfg.gelu == "exact" and gelu_kinds(timm_file) == {"none"}


def test_npz_hybrid_runs_tanh_gelu() -> None:
    ref = load_file(str(FIX / "official_more_jax_tanh.safetensors"))
    x = load_file(str(FIX / "jax_hybrid" / "io.safetensors"))["input"]
    model = create_model("vit_base_r50_s16_224", pretrained=FIX / "jax_hybrid" / "model.npz", img_size=32,
                         hybrid_layers=(1, 1), hybrid_channels=(128, 128), hybrid_stem_chs=32, **TINY).eval()
    assert model.cfg.gelu == "tanh"
    with torch.no_grad():
        assert_close(model(x), ref["jax_hybrid/logits"], "hybrid logits against timm with act_layer='gelu_tanh'")


@pytest.mark.parametrize("name,extra", [
    ("vit_small_patch16_224", {}),
    ("vit_small_patch16_224", {"attn_type": "linformer", "linformer_k": 8}),
    ("vit_base_r50_s16_224", {"hybrid_layers": (1, 1), "hybrid_channels": (128, 128), "hybrid_stem_chs": 32}),
    ("deit_tiny_distilled_patch16_224", {}),
])
def test_gelu_option_in_every_vit_layout(name: str, extra: dict) -> None:
    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=4, num_classes=3, **extra)
    if "hybrid_layers" in extra:
        kw.pop("patch_size")
    exact, tanh = create_model(name, **kw).eval(), create_model(name, gelu="tanh", **kw).eval()
    assert gelu_kinds(exact) == {"none"} and gelu_kinds(tanh) == {"tanh"}
    tanh.load_state_dict(exact.state_dict())  # the same tensors: the option changes the activation only
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        blk = exact.blocks[0]
        h = blk.mlp.fc1(blk.norm2(torch.randn(2, 5, 32)))
        assert torch.equal(tanh.blocks[0].mlp.act(h), nn.functional.gelu(h, approximate="tanh"))
        assert (exact.forward_features(x) - tanh.forward_features(x)).abs().max() > 0
    with pytest.raises(ValueError, match="gelu must be 'exact', 'tanh' or 'quick', got 'erf'"):
        ViTConfig(gelu="erf")


# ------------------------------------------------------------------------------ JAX resampled table
@pytest.mark.parametrize("variant", ["token", "gap"])
@pytest.mark.parametrize("size", [48, 16])
def test_npz_position_table_is_resampled_as_timm_reads_npz(variant: str, size: int) -> None:
    """timm's load_pretrained of a 32 px file at 48 px (and 16 px): bilinear, without antialiasing."""
    ref = load_file(str(FIX / "official_more_jax_resample.safetensors"))
    model = create_model("vit_base_patch16_224", pretrained=FIX / f"official_more_jax_p8_{variant}.npz",
                         img_size=size, **P8).eval()
    assert model.patch_embed.grid_size == (size // 8, size // 8)
    assert_close(model.pos_embed.detach(), ref[f"{variant}/{size}/pos_embed"], f"pos_embed at {size}px")
    with torch.no_grad():
        assert_close(model(ref[f"{variant}/{size}/input"]), ref[f"{variant}/{size}/logits"], f"logits at {size}px")


# ------------------------------------------------------------------------------------- DINO / MAE
def test_deit_reads_official_dino_and_mae_checkpoints_as_vit_does() -> None:
    dino = FIX / "dino_official_tiny.pth"
    assert read_source(dino, "deit").format == "official"
    io = load_file(str(FIX / "dino_io.safetensors"))
    for name in ("deit_small_patch16_224", "deit_small_distilled_patch16_224"):
        # the teacher's encoder; no distillation token in the file, so none in the model (as for any ViT file)
        m = create_model(name, pretrained=dino, **DINO_TINY).eval()
        assert not m.cfg.distilled and m.dist_token is None and m.num_classes == 0
        with torch.no_grad():
            f = m.forward_head(m.forward_features(io["x"]), pre_logits=True)
        assert_close(f, io["teacher_features"], f"{name}: DINO teacher features against timm")
    mae = FIX / "mae_official_tiny.pth"  # with the decoder
    vit = create_model("vit_tiny_patch16_224", pretrained=mae, **MAE_TINY).eval()
    deit = create_model("deit_tiny_patch16_224", pretrained=mae, **MAE_TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(deit(x), vit(x))


def test_setr_given_an_encoder_file_says_how_it_takes_one() -> None:
    dino = FIX / "dino_official_tiny.pth"
    tiny = dict(img_size=32, channels=8, backbone_args=dict(patch_size=8, embed_dim=32, depth=2, num_heads=4))
    with pytest.raises(CheckpointError) as err:
        create_model("setr_naive_vit_small_patch16", pretrained=dino, **tiny)
    msg = str(err.value)
    assert "vitlab.models.dense.load_backbone(model, PATH)" in msg and "--pretrained-backbone" in msg
    assert "backbone_args" in msg
    # the route it names works
    model = load_backbone(create_model("setr_naive_vit_small_patch16", **tiny), dino)
    vit = create_model("vit_small_patch16_224", pretrained=dino, **DINO_TINY)
    assert torch.equal(model.backbone.blocks[1].mlp.fc2.weight, vit.blocks[1].mlp.fc2.weight)


# ------------------------------------------------------------------------------------------ DeiT III
@pytest.mark.parametrize("name", ["vit_small_patch16_224", "deit_small_patch16_224"])
def test_deit3_official_file_matches_timm(name: str) -> None:
    io = load_file(str(FIX / "official_more_deit3_io.safetensors"))
    for size in (32, 48):  # the file's resolution, and another (timm: checkpoint_filter_fn, adapt_layer_scale)
        m = create_model(name, pretrained=FIX / "official_more_deit3.pth", img_size=size, **P8).eval()
        assert m.cfg.init_values is not None and m.num_classes == 5
        assert torch.all(m.pos_embed[0, 0] == 0)  # models_v2 adds no position to the class token
        with torch.no_grad():
            assert_close(m(io[f"input_{size}"]), io[f"logits_{size}"], f"{name} at {size}px against timm deit3")


def test_deit3_names_with_a_class_entry_in_the_table(tmp_path: Path) -> None:
    """The LayerScale names alone (a table that has the class entry is kept as it is)."""
    sd = torch.load(FIX / "official_more_deit3.pth", weights_only=True)["model"]
    sd["pos_embed"] = torch.cat([torch.zeros(1, 1, 32), sd["pos_embed"]], dim=1)
    torch.save({"model": sd}, tmp_path / "ls.pth")
    io = load_file(str(FIX / "official_more_deit3_io.safetensors"))
    m = vitlab.create_model("vit_small_patch16_224", pretrained=tmp_path / "ls.pth", img_size=32, **P8).eval()
    with torch.no_grad():
        assert_close(m(io["input_32"]), io["logits_32"], "logits")


def test_errors_name_layer_scale_and_a_missing_distillation_token(tmp_path) -> None:
    import pytest as _pytest

    from vitlab.checkpoints import CheckpointError
    from vitlab.checkpoints.adapt import load_strict

    small = dict(depth=1, embed_dim=32, num_heads=2, img_size=32)
    with_ls = vitlab.create_model("vit_small_patch16_224", init_values=0.1, **small)
    without = vitlab.create_model("vit_small_patch16_224", **small)
    with _pytest.raises(CheckpointError, match="has LayerScale .*init_values"):
        load_strict(without, with_ls.state_dict(), source="ls.pth")
    torch.save(without.state_dict(), tmp_path / "vit.pth")
    with _pytest.raises(CheckpointError, match="one prefix entry .* without a distillation token"):
        vitlab.create_model("deit_small_distilled_patch16_224", pretrained=tmp_path / "vit.pth", distilled=True,
                            **small)
