"""Swin v1 / v2: parity with timm, Hugging Face and Microsoft's layout (fixtures made by
tests/fixtures/make_fixtures_swin.py), the details implementations get wrong, resolution changes, errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vitlab
from vitlab.analysis import explain
from vitlab.checkpoints import CheckpointError
from vitlab.layers import capture_attention
from vitlab.layers.patch_merging import PatchMerging, merge_2x2
from vitlab.layers.window_attention import (
    relative_position_index,
    resample_rel_pos_table,
    shift_attention_mask,
    window_partition,
    window_reverse,
)
from vitlab.layers.window_geometry import WindowGeometry
from vitlab.models.swin import SwinBlock, block_geometry
from vitlab.train.optim import param_groups

from model_helpers import perturb_

FIX = Path(__file__).parent / "fixtures" / "swin"
IO = load_file(FIX / "io.safetensors")
# the fixtures' architecture (see make_fixtures_swin.py)
ARCH = {"img_size": 32, "patch_size": 2, "embed_dim": 8, "depths": (2, 2, 2), "num_heads": (2, 2, 4),
        "window_size": 4, "mlp_ratio": 2.0}
V1, V2 = "swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256"
V2_ARCH = {**ARCH, "pretrained_window_sizes": (2, 4, 2)}


def _load(name: str, path: Path, **over) -> torch.nn.Module:
    arch = V2_ARCH if name.startswith("swinv2") else ARCH
    return vitlab.create_model(name, pretrained=path, **{**arch, **over}).eval()


# ------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name, tag", [(V1, "v1"), (V2, "v2")])
def test_timm_parity(name: str, tag: str) -> None:
    model = _load(name, FIX / f"timm_{tag}.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(model(IO["x"]), IO[f"timm_{tag}_logits"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.forward_features(IO["x"]), IO[f"timm_{tag}_features"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, tag", [(V1, "v1"), (V2, "v2")])
def test_the_file_fixes_width_depths_heads_and_mlp_ratio(name: str, tag: str) -> None:
    """Only what the weights cannot say (resolution, window; v2's pre-training windows) is given: width, depths,
    heads and the MLP ratio come from the file (the ratio did not: a custom-size Swin did not fit)."""
    given = {k: ARCH[k] for k in ("img_size", "window_size")}
    if tag == "v2":
        given["pretrained_window_sizes"] = V2_ARCH["pretrained_window_sizes"]
    model = vitlab.create_model(name, pretrained=FIX / f"timm_{tag}.safetensors", **given).eval()
    assert (model.cfg.embed_dim, tuple(model.cfg.depths), tuple(model.cfg.num_heads), model.cfg.mlp_ratio) == (
        ARCH["embed_dim"], ARCH["depths"], ARCH["num_heads"], ARCH["mlp_ratio"])
    with torch.no_grad():
        torch.testing.assert_close(model(IO["x"]), IO[f"timm_{tag}_logits"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, tag", [(V1, "v1"), (V2, "v2")])
def test_timm_parity_with_dynamic_padding(name: str, tag: str) -> None:
    # 36x28 input: 18x14 map, padded to windows in every block; 9x7 is odd for the patch merging
    model = _load(name, FIX / f"timm_{tag}.safetensors", dynamic_img_size=True)
    with torch.no_grad():
        torch.testing.assert_close(model(IO["x_dyn"]), IO[f"timm_{tag}_dyn_logits"], atol=1e-5, rtol=1e-5)
    blocks = model.blocks_in_order()
    assert blocks[1].last_geometry == WindowGeometry((18, 14), (20, 16), (4, 4), (2, 2))
    assert model.layers[1].downsample.last_input_size == (18, 14)


@pytest.mark.parametrize("name, tag", [(V1, "v1"), (V2, "v2")])
def test_resolution_and_window_change_matches_timm(name: str, tag: str) -> None:
    # 32px / window 4 weights into a 64px / window 8 model: v1 tables resampled as timm's checkpoint filter does
    model = _load(name, FIX / f"timm_{tag}.safetensors", img_size=64, window_size=8)
    with torch.no_grad():
        torch.testing.assert_close(model(IO["x_res"]), IO[f"timm_{tag}_res_logits"], atol=1e-5, rtol=1e-5)


def test_official_layout_parity() -> None:
    model = _load(V1, FIX / "official_v1.pth")
    with torch.no_grad():
        torch.testing.assert_close(model(IO["x"]), IO["timm_v1_logits"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, tag", [(V1, "v1"), (V2, "v2")])
def test_hf_folder_parity_and_class_names(name: str, tag: str) -> None:
    model = vitlab.load_model(FIX / f"hf_{tag}").eval()  # config.json alone fixes the architecture
    assert model.cfg.version == (1 if tag == "v1" else 2)
    assert model.class_names == [f"class_{i}" for i in range(5)]
    with torch.no_grad():
        torch.testing.assert_close(model(IO["x"]), IO[f"hf_{tag}_logits"], atol=1e-5, rtol=1e-5)


def test_hf_other_key_spelling(tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    folder.mkdir()
    shutil.copy(FIX / "hf_v1" / "config.json", folder / "config.json")
    shutil.copy(FIX / "hf_v1_other_spelling.safetensors", folder / "model.safetensors")
    keys = load_file(folder / "model.safetensors")
    assert any(".attention.q_proj." in k for k in keys) or any(".attention.self.query." in k for k in keys)
    model = vitlab.load_model(folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IO["x"]), IO["hf_v1_logits"], atol=1e-5, rtol=1e-5)


def test_checkpoint_of_another_family_or_version_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="Swin v2 checkpoint"):
        _load(V1, FIX / "timm_v2.safetensors")
    with pytest.raises(CheckpointError, match="Swin v1 checkpoint"):
        _load(V2, FIX / "timm_v1.safetensors")
    vit = vitlab.create_model("vit_tiny_patch16_224", depth=1, embed_dim=32, num_heads=2, img_size=32)
    from safetensors.torch import save_file
    save_file(vit.state_dict(), tmp_path / "vit.safetensors")
    with pytest.raises(CheckpointError, match="not a Swin checkpoint"):
        _load(V1, tmp_path / "vit.safetensors")


# ------------------------------------------------------------------------------ details and layers
def test_shift_mask_against_hand_computed_case() -> None:
    # 4x4 map, window 2, shift 1: regions per axis [0, 2), [2, 3), [3, 4) -> ids r*3 + c
    mask = shift_attention_mask((4, 4), (2, 2), (1, 1))
    assert mask.shape == (4, 4, 4)
    assert set(mask.unique().tolist()) == {0.0, -100.0}
    assert not mask[0].any()  # top-left window lies in one region
    # window (0, 1): cells (0,2),(0,3),(1,2),(1,3) -> regions 1, 2, 1, 2
    expected = torch.tensor([[0, -100, 0, -100], [-100, 0, -100, 0], [0, -100, 0, -100], [-100, 0, -100, 0.0]])
    torch.testing.assert_close(mask[1], expected)
    # window (1, 1): regions 4, 5, 7, 8 - all different
    torch.testing.assert_close(mask[3], torch.full((4, 4), -100.0).fill_diagonal_(0))


def test_relative_position_index_and_partition_round_trip() -> None:
    idx = relative_position_index((2, 3))
    assert idx.shape == (6, 6) and idx.max() == 3 * 5 - 1 and idx.min() == 0
    assert (idx.diagonal() == (2 - 1) * 5 + (3 - 1)).all()  # zero offset sits in the middle of the table
    assert idx[0, 5] == (0 - 1 + 1) * 5 + (0 - 2 + 2)  # token 0 at (0,0), token 5 at (1,2)
    x = torch.randn(2, 4, 6, 3)
    w = window_partition(x, (2, 3))
    assert w.shape == (2 * 4, 6, 3)
    torch.testing.assert_close(w[1], x[0, 0:2, 3:6].reshape(6, 3))  # second window: row-major over the map
    torch.testing.assert_close(window_reverse(w, (2, 3), (4, 6)), x)


def test_merge_order_against_hand_computed_values() -> None:
    x = torch.arange(2 * 4, dtype=torch.float32).reshape(1, 2, 4, 1)  # (B, H, W, C): value 4*row + col
    out = merge_2x2(x)
    assert out.shape == (1, 1, 2, 4)
    # order (0,0), (1,0), (0,1), (1,1): x[r, c], x[r+1, c], x[r, c+1], x[r+1, c+1]
    assert out[0, 0, 0].tolist() == [0.0, 4.0, 1.0, 5.0]
    assert out[0, 0, 1].tolist() == [2.0, 6.0, 3.0, 7.0]
    odd = merge_2x2(torch.ones(1, 3, 3, 1))  # padded with zeros at the bottom / right
    assert odd.shape == (1, 2, 2, 4) and odd[0, 1, 1].tolist() == [1.0, 0.0, 0.0, 0.0]
    v1, v2 = PatchMerging(4, norm_first=True), PatchMerging(4, norm_first=False)
    assert v1.norm.normalized_shape == (16,) and v1.reduction.bias is None
    assert v2.norm.normalized_shape == (8,) and v2.reduction.bias is None


def test_last_stage_and_small_maps_have_no_shift() -> None:
    assert block_geometry((7, 7), 7, shifted=True) == ((7, 7), (0, 0))  # "<=": a map as large as the window
    assert block_geometry((8, 8), 7, shifted=True) == ((7, 7), (3, 3))
    assert block_geometry((4, 12), 7, shifted=True) == ((4, 7), (0, 3))
    model = vitlab.create_model(V1, num_classes=3)
    shifts = [(b.window, b.shift) for b in model.blocks_in_order()]
    assert shifts[:2] == [((7, 7), (0, 0)), ((7, 7), (3, 3))]
    assert shifts[-2:] == [((7, 7), (0, 0)), ((7, 7), (0, 0))]  # stage 4: 7x7 map, window 7
    v2 = vitlab.create_model("swinv2_base_window12to16_192to256", depths=(1, 1, 2, 2))
    assert [b.shift for b in v2.blocks_in_order()][-4:] == [(0, 0)] * 4  # 16x16 map with window 16, then 8x8
    assert [b.window for b in v2.blocks_in_order()][-2:] == [(8, 8)] * 2
    assert v2.blocks_in_order()[-1].attn.pretrained_window == (6, 6)


def test_eps_and_exact_gelu() -> None:
    model = vitlab.create_model(V1, **ARCH)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(m.eps == 1e-5 for m in norms)
    gelus = [m for m in model.modules() if isinstance(m, torch.nn.GELU)]
    assert gelus and all(g.approximate == "none" for g in gelus)


@pytest.mark.parametrize("name", [V1, V2])
def test_capture_equals_fast_path_with_windows_and_shifts(name: str) -> None:
    model = perturb_(vitlab.create_model(name, num_classes=4, **ARCH)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fast = model(x)
        with capture_attention(model) as maps:
            slow = model(x)
    torch.testing.assert_close(slow, fast, atol=1e-5, rtol=1e-5)
    blocks = model.blocks_in_order()
    assert len(maps) == len(blocks)
    for a, blk in zip(maps, blocks):
        g = blk.last_geometry
        assert a.shape == (2 * g.num_windows, blk.attn.num_heads, g.window_area, g.window_area)
        torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]))
    # the shifted block's weights vanish (exp(-100)) between regions of its mask
    mask = shift_attention_mask(blocks[1].last_geometry.padded, blocks[1].window, blocks[1].shift)
    assert maps[1].view(2, -1, *maps[1].shape[1:])[:, mask.shape[0] - 1].masked_select(
        mask[-1].bool().expand(2, 2, -1, -1)).max() < 1e-30


@pytest.mark.parametrize("name", [V1, V2])
def test_forward_intermediates_shapes_and_strides(name: str) -> None:
    res = 256 if name == V2 else 224
    model = vitlab.create_model(name, depths=(1, 1, 1, 1), embed_dim=8, num_heads=(1, 1, 1, 1), num_classes=3).eval()
    x = torch.randn(1, 3, res, res)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        feats = model.forward_features(x)
    torch.testing.assert_close(final, feats)
    assert [tuple(m.shape) for m in maps] == [(1, 8 * 2**i, res // s, res // s) for i, s in enumerate((4, 8, 16, 32))]
    torch.testing.assert_close(model.norm(maps[-1].permute(0, 2, 3, 1)), feats)
    _, last = model.forward_intermediates(x, indices=1, norm=True, output_fmt="NHWC")
    torch.testing.assert_close(last[0], feats)


def test_bias_table_resampling_to_the_same_window_is_identity_and_round_trips(tmp_path: Path) -> None:
    table = torch.randn(13 * 13, 3)  # window 7
    assert resample_rel_pos_table(table, (7, 7), (7, 7)) is table
    up = resample_rel_pos_table(table, (7, 7), (12, 12))
    assert up.shape == (23 * 23, 3)
    bicubic = resample_rel_pos_table(table, (7, 7), (12, 12), mode="bicubic")
    assert bicubic.shape == (23 * 23, 3)
    # a model saved at one window and loaded at the same window gives identical outputs
    model = perturb_(vitlab.create_model(V1, num_classes=3, **ARCH)).eval()
    from safetensors.torch import save_file
    save_file(model.state_dict(), tmp_path / "timm_like.safetensors")
    again = vitlab.create_model(V1, pretrained=tmp_path / "timm_like.safetensors", **ARCH).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), atol=0, rtol=0)
        # to another window and back: the shapes come back, the model runs
        big = vitlab.create_model(V1, pretrained=tmp_path / "timm_like.safetensors", **{**ARCH, "window_size": 8,
                                                                                        "img_size": 64}).eval()
        assert big.layers[0].blocks[0].attn.relative_position_bias_table.shape == (15 * 15, 2)
        assert torch.isfinite(big(torch.randn(1, 3, 64, 64))).all()


def test_a_window_of_one_resamples_to_a_constant_table_not_nan(tmp_path: Path) -> None:
    """A Swin trained on small images has 1 x 1 maps (window 1, a one-entry table) in its last stage; loaded at a
    larger size that table must spread as a constant (it was NaN: a zero-width interpolation cell)."""
    one = torch.randn(1, 4)
    for mode in ("timm", "bicubic"):
        torch.testing.assert_close(resample_rel_pos_table(one, (1, 1), (3, 3), mode=mode), one.expand(25, 4))
    strip = torch.randn(5, 2)  # window 1 x 3: constant along the first axis only
    grid = resample_rel_pos_table(strip, (1, 3), (2, 4)).reshape(3, 7, 2)
    assert torch.isfinite(grid).all() and torch.equal(grid[0], grid[1]) and torch.equal(grid[1], grid[2])
    # 32 px, patch 4, window 7: maps 8, 4, 2, 1 -> the last stage's window is 1
    arch = {"img_size": 32, "embed_dim": 8, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 2, 2)}
    model = perturb_(vitlab.create_model(V1, num_classes=3, **arch)).eval()
    assert model.layers[3].blocks[0].attn.relative_position_bias_table.shape[0] == 1
    from safetensors.torch import save_file
    save_file(model.state_dict(), tmp_path / "small.safetensors")
    big = vitlab.create_model(V1, pretrained=tmp_path / "small.safetensors", **{**arch, "img_size": 48}).eval()
    with torch.no_grad():
        assert torch.isfinite(big(torch.randn(2, 3, 48, 48))).all()


def test_dynamic_size_pads_and_fixed_size_refuses() -> None:
    fixed = vitlab.create_model(V1, num_classes=3, **ARCH).eval()
    with pytest.raises(ValueError, match="built for 32x32"):
        fixed(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match=r"expected images of shape \(batch, 3, H, W\)"):
        fixed(torch.randn(1, 1, 32, 32))
    dyn = vitlab.create_model(V1, num_classes=3, dynamic_img_size=True, **ARCH).eval()
    dyn.load_state_dict(fixed.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(dyn(torch.zeros(1, 3, 32, 32)), fixed(torch.zeros(1, 3, 32, 32)))
        y = dyn(torch.randn(2, 3, 37, 23))  # not a multiple of the patch: padded to 38x24
    assert y.shape == (2, 3) and torch.isfinite(y).all()
    assert dyn.blocks_in_order()[0].last_geometry.size == (19, 12)
    # the padded input gives the same result as padding by hand
    x = torch.randn(1, 3, 37, 23)
    with torch.no_grad():
        torch.testing.assert_close(dyn(x), dyn(torch.nn.functional.pad(x, (0, 1, 0, 1))))


def test_masks_and_index_are_cached_not_rebuilt() -> None:
    # at another size than the built one (which has its buffer): the mask of a size is built once, then cached
    model = vitlab.create_model(V1, num_classes=3, dynamic_img_size=True, **ARCH).eval()
    blk: SwinBlock = model.blocks_in_order()[1]
    with torch.no_grad():
        model(torch.randn(1, 3, 40, 32))
        assert blk.last_geometry.padded == (20, 16) != blk._built_padded
        first = blk._masks[((20, 16), torch.device("cpu"))]
        model(torch.randn(1, 3, 40, 32))
    assert blk._mask((20, 16), torch.device("cpu")) is first
    assert blk._mask(blk._built_padded, torch.device("cpu")) is blk.shift_mask
    assert len(blk._masks) == 1
    assert "relative_position_index" not in model.state_dict()  # a buffer, recomputed, never saved
    # contiguous: a permuted bias made every add it joined strided (eager bfloat16 Swin-T ran 0.92x timm)
    assert blk.attn.position_bias().is_contiguous()


def test_the_built_size_mask_is_a_buffer_never_saved() -> None:
    """At the built size the shift mask is a non-persistent buffer (torch.compile folds it into a constant);
    other sizes build the same function of the padded size; checkpoints never hold it."""
    model = vitlab.create_model(V1, num_classes=3, dynamic_img_size=True, **ARCH).eval()
    blk: SwinBlock = model.blocks_in_order()[1]
    assert any(blk.shift)
    built = blk._mask(blk._built_padded, torch.device("cpu"))
    assert built is blk.shift_mask
    torch.testing.assert_close(built, shift_attention_mask(blk._built_padded, blk.window, blk.shift))
    assert not any(k.endswith("shift_mask") for k in model.state_dict())
    other = (blk._built_padded[0] + blk.window[0], blk._built_padded[1])
    torch.testing.assert_close(blk._mask(other, torch.device("cpu")),
                               shift_attention_mask(other, blk.window, blk.shift))
    # the buffer follows the model's dtype; the mask (0 / -100) is exact in bfloat16, and a bfloat16 model runs
    model.to(torch.bfloat16)
    assert blk.shift_mask.dtype == torch.bfloat16
    torch.testing.assert_close(blk.shift_mask.float(), built)
    assert torch.isfinite(model(torch.randn(1, 3, 32, 32, dtype=torch.bfloat16))).all()


def test_bias_gather_is_differentiable_wrt_the_table() -> None:
    model = perturb_(vitlab.create_model(V1, num_classes=3, **ARCH)).train()
    model(torch.randn(2, 3, 32, 32)).square().sum().backward()
    for blk in model.blocks_in_order():
        assert blk.attn.relative_position_bias_table.grad is not None
        assert blk.attn.relative_position_bias_table.grad.any()


def test_analysis_contract() -> None:
    model = vitlab.create_model(V1, num_classes=3, **ARCH).eval()
    assert model.token_attention is False and model.num_prefix_tokens == 0
    assert model.patch_embed.patch_size == (2, 2)
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    mods = model.analysis_modules()
    kinds = ["merge" if isinstance(m, PatchMerging) else "block" for m in mods]
    assert kinds == ["block", "block", "merge", "block", "block", "merge", "block", "block"]
    assert [m.last_input_size for m in mods if isinstance(m, PatchMerging)] == [(16, 16), (8, 8)]
    assert [m.last_geometry.size for m in mods if isinstance(m, SwinBlock)] == [(16, 16)] * 2 + [(8, 8)] * 2 + [(4, 4)] * 2


def test_grad_cam_on_the_last_stage() -> None:
    model = perturb_(vitlab.create_model(V1, num_classes=3, **ARCH)).eval()
    e = explain(model, torch.randn(1, 3, 32, 32), method="grad-cam")
    assert e.maps.shape == (1, 32, 32) and torch.isfinite(e.maps).all()


def test_no_weight_decay_and_layer_decay_know_the_stages() -> None:
    model = vitlab.create_model(V2, num_classes=3, **V2_ARCH)
    nwd = model.no_weight_decay()
    assert "layers.0.blocks.0.attn.logit_scale" in nwd and "layers.2.blocks.1.attn.cpb_mlp.0.weight" in nwd
    v1 = vitlab.create_model(V1, num_classes=3, **ARCH)
    assert "layers.1.blocks.0.attn.relative_position_bias_table" in v1.no_weight_decay()
    groups = param_groups(v1, weight_decay=0.05, layer_decay=0.5)
    lid = {n: g["layer_id"] for g in groups for n in g["names"]}
    assert lid["patch_embed.proj.weight"] == 0
    assert lid["layers.0.blocks.0.attn.qkv.weight"] == 1
    assert lid["layers.0.blocks.1.mlp.fc1.weight"] == 2
    assert lid["layers.1.downsample.reduction.weight"] == 3 == lid["layers.1.blocks.0.norm1.weight"]
    assert lid["layers.2.blocks.1.mlp.fc2.weight"] == 6
    assert lid["head.weight"] == lid["norm.weight"] == 7
    scale = {g["layer_id"]: g["lr_scale"] for g in groups}
    assert scale[7] == 1.0 and scale[0] == 0.5**7


def test_recipes_load_and_build_their_swin(tmp_path: Path) -> None:
    from vitlab.train.recipe import load_recipe
    from vitlab.train.run import TrainJob, build_model

    paper = load_recipe("swin")
    assert (paper.lr, paper.lr_base_batch, paper.global_batch, paper.weight_decay, paper.warmup_epochs) == (
        1e-3, 1024, 1024, 0.05, 20)
    assert paper.model_overrides["drop_path_rate"] == 0.2 and paper.schedule == "cosine"
    small = load_recipe("cifar10_swin")
    model = build_model(TrainJob(recipe=small, data="cifar10", output=tmp_path), num_classes=10, in_chans=3)
    assert model.cfg.depths == (2, 2, 2) and model.preprocessing.input_size == (3, 32, 32)
    assert [b.shift for b in model.blocks_in_order()] == [(0, 0), (2, 2)] * 2 + [(0, 0)] * 2
    assert sum(p.numel() for p in model.parameters()) < 600_000
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", [V1, V2])
def test_vitlab_checkpoint_round_trip_keeps_the_architecture(tmp_path: Path, name: str) -> None:
    arch = V2_ARCH if name == V2 else ARCH
    model = perturb_(vitlab.create_model(name, num_classes=3, **arch)).eval()
    vitlab.save_model(model, tmp_path / "m.safetensors", class_names=["a", "b", "c"])
    again = vitlab.load_model(tmp_path / "m.safetensors").eval()
    assert again.cfg == model.cfg and again.class_names == ["a", "b", "c"]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), atol=0, rtol=0)
