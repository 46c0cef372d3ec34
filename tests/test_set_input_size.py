"""``model.set_input_size(...)``, timm's in-place resize: the same object afterwards runs at the new size with the
weights carried, and gives timm's logits after timm's own ``set_input_size`` on the same weights.

The reference logits in ``fixtures/set_input_size/io.safetensors`` were computed by timm 1.0.31
(``fixtures/set_input_size/make_fixtures_set_input_size.py``); this file never imports a peer library.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import vitlab
from vitlab.models.base import TimmSurface, set_preprocessing_style

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "set_input_size"
ATOL = 1e-5
VIT = dict(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=5)
SWIN = dict(img_size=32, patch_size=4, window_size=4, embed_dim=8, depths=(2, 2), num_heads=(1, 2), num_classes=5)
# fixture case -> (registered name, overrides giving the generator's timm model)
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "vit": ("vit_base_patch16_224", VIT),
    "deit_distilled": ("deit_base_distilled_patch16_224", VIT),
    "vit_reg": ("vit_base_patch16_224", dict(VIT, reg_tokens=2, no_embed_class=True)),
    "beit": ("beit_base_patch16_224", dict(VIT, init_values=0.1)),
    "beit_shared": ("beit_base_patch16_224", dict(VIT, init_values=0.1, use_abs_pos_emb=True, use_rel_pos_bias=False,
                                                  use_shared_rel_pos_bias=True)),
    "swin": ("swin_tiny_patch4_window7_224", SWIN),
    "swinv2": ("swinv2_tiny_window8_256", dict(SWIN, pretrained_window_sizes=None)),
}
# (case, entry, set_input_size arguments), as in the generator
ENTRIES = [
    ("vit", "s48", dict(img_size=48)), ("vit", "s32x48", dict(img_size=(32, 48))), ("vit", "p4", dict(patch_size=4)),
    ("vit", "s48p12", dict(img_size=48, patch_size=12)),
    ("deit_distilled", "s48", dict(img_size=48)), ("vit_reg", "s48", dict(img_size=48)),
    ("beit", "s48", dict(img_size=48)), ("beit", "p4", dict(patch_size=4)), ("beit_shared", "s48", dict(img_size=48)),
    ("swin", "s64", dict(img_size=64)), ("swin", "s48w3", dict(img_size=48, window_size=3)),
    ("swin", "s64w5", dict(img_size=64, window_size=5)), ("swin", "s64r4", dict(img_size=64, window_ratio=4)),
    ("swinv2", "s64", dict(img_size=64)), ("swinv2", "s48w3", dict(img_size=48, window_size=3)),
]


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / "io.safetensors"))


def images(h: int, w: int) -> torch.Tensor:
    """The generator's deterministic (2, 3, h, w) input."""
    i = torch.arange(2 * 3 * h * w, dtype=torch.float64)
    return (torch.sin(i * 0.731) + 0.5 * torch.cos(i * 0.0137)).reshape(2, 3, h, w).float()


def load(case: str, **extra: Any) -> nn.Module:
    name, overrides = MODELS[case]
    return vitlab.create_model(name, pretrained=FIXTURES / f"{case}.safetensors", **{**overrides, **extra}).eval()


def tiny_vit(**extra: Any) -> nn.Module:
    torch.manual_seed(0)
    return vitlab.create_model("vit_base_patch16_224", **{**VIT, **extra})


@pytest.mark.parametrize("case,entry,args", ENTRIES, ids=[f"{c}-{e}" for c, e, _ in ENTRIES])
def test_logits_match_timm_after_its_set_input_size(io: dict[str, torch.Tensor], case: str, entry: str,
                                                    args: dict[str, Any]) -> None:
    """Position tables (class / distillation / register entries kept), BEiT's relative tables (timm's
    geometric-progression resize, class rows kept), Swin's windows (timm's scaling with the grid, an explicit
    window, a window that does not divide the map, a window ratio), v2's continuous bias, FlexiViT's patch kernel."""
    model = load(case)
    model.set_input_size(**args)
    _, h, w = model.preprocessing.input_size
    x = images(h, w)
    assert x.double().sum().item() == pytest.approx(io[f"{case}/{entry}/input_sum"].item(), abs=1e-6)
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, io[f"{case}/{entry}/logits"], rtol=0, atol=ATOL)


@pytest.mark.parametrize("case", sorted(MODELS))
def test_own_size_is_the_identity(io: dict[str, torch.Tensor], case: str) -> None:
    model = load(case)
    x = images(*model.preprocessing.input_size[1:])
    with torch.no_grad():
        before = model(x)
    torch.testing.assert_close(before, io[f"{case}/own/logits"], rtol=0, atol=ATOL)  # the fixture's model
    model.set_input_size(img_size=model.cfg.img_size)
    model.set_input_size()
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_in_place_keeps_object_placement_modes_flags_hooks_and_names() -> None:
    model = tiny_vit(num_classes=3).double().train()
    model.model_name, model.class_names, model.score_function = "mine", ["a", "b", "c"], "sigmoid"
    set_preprocessing_style(model, mean=(0.1, 0.2, 0.3), crop_pct=1.0)
    model.set_grad_checkpointing(True)
    model.blocks[1].eval()  # a mixed mode, as a user may leave it
    model.patch_embed.requires_grad_(False)
    model.pos_embed.requires_grad_(False)
    kept_weight, cls = model.blocks[0].attn.qkv.weight, model.cls_token
    seen: list[str] = []
    model.register_forward_hook(lambda *_: seen.append("model"))
    model.blocks[0].register_forward_hook(lambda *_: seen.append("block"))
    model.blocks[0].attn.register_forward_pre_hook(lambda *_: seen.append("attn"))
    ident = id(model)

    model.set_input_size(img_size=48)

    assert id(model) == ident
    assert model.cfg.img_size == 48 and model.patch_embed.grid_size == (6, 6)
    assert model.preprocessing.input_size == (3, 48, 48)
    assert model.preprocessing.mean == (0.1, 0.2, 0.3) and model.preprocessing.crop_pct == 1.0
    assert (model.model_name, model.class_names, model.score_function) == ("mine", ["a", "b", "c"], "sigmoid")
    assert model.pos_embed.shape == (1, 1 + 36, 16)
    assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in model.parameters())
    assert model.training and model.blocks[0].training and not model.blocks[1].training
    assert model.grad_checkpointing
    assert not model.pos_embed.requires_grad and not model.patch_embed.proj.weight.requires_grad
    assert model.blocks[0].attn.qkv.weight.requires_grad
    assert model.blocks[0].attn.qkv.weight is kept_weight and model.cls_token is cls  # an optimizer's stay valid
    model.eval()
    out = model(torch.randn(1, 3, 48, 48, dtype=torch.float64))
    assert out.shape == (1, 3) and seen == ["attn", "block", "model"]
    with pytest.raises(ValueError, match="built for 48x48"):  # the old size, as any other, is refused
        model(torch.randn(1, 3, 32, 32, dtype=torch.float64))


def test_the_new_size_equals_a_model_built_at_it_from_the_weights(tmp_path: Path) -> None:
    """The same numbers as ``create_model(img_size=...)`` loading the model's checkpoint (the documented rule)."""
    model = tiny_vit(reg_tokens=1).eval()
    vitlab.save_model(model, tmp_path / "m.safetensors")
    built = vitlab.create_model("vit_base_patch16_224", pretrained=tmp_path / "m.safetensors", img_size=(48, 64)).eval()
    model.set_input_size(img_size=(48, 64))
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        assert torch.equal(model(x), built(x))
    # from the 6x8 grid (a table that is not square), as a checkpoint that records its grid loads
    vitlab.save_model(model, tmp_path / "r.safetensors")
    built = vitlab.create_model("vit_base_patch16_224", pretrained=tmp_path / "r.safetensors", img_size=40).eval()
    model.set_input_size(img_size=40)
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        assert torch.equal(model(x), built(x))


def test_beit_rectangular_grid_resizes_from_its_own_grid() -> None:
    """A BEiT on a 4x6 grid (its tables are not a square grid's) resizes from that grid, by vitlab's rule."""
    from vitlab.layers.rel_pos_attention import resample_class_rel_pos_table

    model = load("beit")
    model.set_input_size(img_size=(32, 48))
    table = model.blocks[0].attn.relative_position_bias_table.detach().clone()  # (7 * 11 + 3, heads)
    model.set_input_size(img_size=48)
    assert model.patch_embed.grid_size == (6, 6)
    expected = resample_class_rel_pos_table(table, (4, 6), (6, 6))
    assert torch.equal(model.blocks[0].attn.relative_position_bias_table.detach(), expected)
    assert model(images(48, 48)).shape == (2, 5)


def test_dynamic_model_keeps_taking_any_size() -> None:
    model = tiny_vit(dynamic_img_size=True).eval()
    model.set_input_size(img_size=64)
    assert model.preprocessing.input_size == (3, 64, 64) and model.pos_embed.shape[1] == 1 + 64
    assert model(torch.randn(1, 3, 32, 48)).shape == (1, 5)


def test_swin_windows_scale_from_the_model_as_built() -> None:
    """timm's rule: without window_size / window_ratio each stage's window is its built window scaled by the patch
    grid (w * grid // built grid), from the built model, not the last resize (36 px, then 60 px: 4 * 15 // 8 = 7,
    where scaling the 36 px model's window would give 4 * 15 // 9 = 6); an explicit window is the new reference."""
    model = vitlab.create_model("swin_tiny_patch4_window7_224", **SWIN).eval()
    model.set_input_size(img_size=36)
    assert model.cfg.window_size == 4
    model.set_input_size(img_size=60)
    assert model.cfg.window_size == 7
    model.set_input_size(img_size=64, window_size=((2, 2), (4, 4)))  # one per stage ((2, 4) would be one (h, w))
    assert model.cfg.window_size == (2, 4) and model.layers[0].blocks[0].window == (2, 2)
    model.set_input_size(img_size=128)
    assert model.cfg.window_size == (4, 8)
    assert model(torch.randn(1, 3, 128, 128)).shape == (1, 5)


def test_swin_resize_gives_no_advice_to_rebuild(caplog: pytest.LogCaptureFixture) -> None:
    """Loading a file of other windows warns how to rebuild the file's model; a resize asked for does not."""
    model = vitlab.create_model("swin_tiny_patch4_window7_224", **SWIN)
    with caplog.at_level("INFO", logger="vitlab"):
        model.set_input_size(img_size=64)
    assert not [r for r in caplog.records if r.levelname == "WARNING"], caplog.text
    assert "resampled to the new windows (4x4 -> 8x8)" in caplog.text


def test_swin_keeps_grad_checkpointing_of_its_stages() -> None:
    model = vitlab.create_model("swin_tiny_patch4_window7_224", **SWIN)
    model.set_grad_checkpointing(True)
    model.set_input_size(img_size=64)
    assert all(stage.grad_checkpointing for stage in model.layers)


def test_linformer_shared_projection_stays_the_models() -> None:
    """Attributes that held the rebuilt model's tensors (a layer's reference to the shared projection) point at
    the model's own after the move."""
    model = tiny_vit(attn_type="linformer", linformer_k=8, linformer_sharing="layerwise").eval()
    model.set_input_size(img_size=48)
    assert model.linformer_proj.shape == (8, 1 + 36)
    assert all(blk.attn._shared[0] is model.linformer_proj for blk in model.blocks)
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 5)


def test_random_state_is_left_alone() -> None:
    model = tiny_vit()
    torch.manual_seed(1)
    model.set_input_size(img_size=48)
    after = torch.rand(3)
    torch.manual_seed(1)
    assert torch.equal(torch.rand(3), after)


@pytest.mark.parametrize("kwargs,match", [
    (dict(img_size=36), r"img_size=36.*img_size 36x36 is not a multiple of the patch size 8"),
    (dict(img_size=0), r"img_size must be a positive int"),
    (dict(img_size=(32, 48, 2)), r"img_size must be"),
    (dict(patch_size=(4, 8)), r"patch_size must be a positive int \(square patches\)"),
    (dict(patch_size=5), r"img_size 32x32 is not a multiple of the patch size 5"),
    (dict(window_size=4), r"unknown option\(s\) window_size for vit_base_patch16_224; it takes img_size, patch_size"),
    (dict(strict_img_size=False), r"unknown option\(s\) strict_img_size"),
])
def test_vit_errors_name_the_argument(kwargs: dict[str, Any], match: str) -> None:
    model = tiny_vit()
    model.model_name = "vit_base_patch16_224"
    with pytest.raises(ValueError, match=match):
        model.set_input_size(**kwargs)
    assert model.cfg.img_size == 32 and model(torch.randn(1, 3, 32, 32)).shape == (1, 5)  # left as it was


@pytest.mark.parametrize("kwargs,match", [
    (dict(always_partition=True), r"always_partition=True is not supported"),
    (dict(window_size=(2, 2, 2)), r"window_size \(2, 2, 2\) needs one entry per stage \(2\)"),
    (dict(window_size=0), r"window_size must be a positive int"),
    (dict(window_ratio=0), r"window_ratio must be a positive int"),
    (dict(img_size=(32, 64)), r"window_size: vitlab's Swin has square windows"),
    (dict(img_size=30), r"img_size 30x30 is not a multiple of the patch size 4x4"),
    (dict(shift_size=1), r"unknown option\(s\) shift_size"),
])
def test_swin_errors_name_the_argument(kwargs: dict[str, Any], match: str) -> None:
    model = vitlab.create_model("swin_tiny_patch4_window7_224", **SWIN)
    with pytest.raises(ValueError, match=match):
        model.set_input_size(**kwargs)
    assert model.cfg.img_size == 32


def test_families_without_a_resizable_input_are_refused() -> None:
    mixer = vitlab.create_model("mixer_b16_224", img_size=32, depth=1, embed_dim=16)
    mixer.model_name = "mixer_b16_224"
    with pytest.raises(ValueError, match=r"for mixer_b16_224: .*token-mixing MLPs"):
        mixer.set_input_size(img_size=64)
    hybrid = vitlab.create_model("vit_base_r50_s16_224", img_size=32, depth=1, embed_dim=16, num_heads=2,
                                 hybrid_layers=(1,), hybrid_channels=(128,), hybrid_stem_chs=32)
    with pytest.raises(ValueError, match=r"patch_size is supported for models whose patch embedding is one "
                                         r"convolution.*HybridEmbed"):
        hybrid.set_input_size(patch_size=8)

    @dataclass(frozen=True)
    class Cfg:
        width: int = 4

    class Sizeless(TimmSurface, nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cfg = Cfg()

    with pytest.raises(ValueError, match=r"Sizeless \(Sizeless\) has no input size to change: its config has no "
                                         r"img_size"):
        Sizeless().set_input_size(img_size=64)


def test_export_rebuild_is_the_models_helper() -> None:
    """One implementation (vitlab.models.base.rebuild); the export's keeps ExportError and now carries the
    preprocessing style too."""
    from vitlab.export.onnx import ExportError
    from vitlab.export.onnx import rebuild as export_rebuild
    from vitlab.models.base import rebuild

    model = tiny_vit()
    set_preprocessing_style(model, mean=(0.1, 0.2, 0.3))
    for helper in (rebuild, export_rebuild):
        copy = helper(model, img_size=48)
        assert copy is not model and copy.preprocessing.input_size == (3, 48, 48)
        assert copy.preprocessing.mean == (0.1, 0.2, 0.3)
    with pytest.raises(ExportError, match=r"config has no field\(s\) \['nope'\]"):
        export_rebuild(model, nope=1)


def test_a_model_on_the_meta_device_changes_size_there():
    """As timm's: a model built on the meta device (shapes only, filled later) takes a new size and stays there."""
    with torch.device("meta"):
        vit = vitlab.create_model("vit_tiny_patch16_224", patch_size=4, embed_dim=16, depth=2, num_heads=2,
                                  img_size=32)
        swin = vitlab.create_model("swin_tiny_patch4_window7_224", embed_dim=16, depths=(1, 1, 1, 1),
                                   num_heads=(1, 1, 1, 1), img_size=64, window_size=2)
    vit.set_input_size(img_size=48, patch_size=8)
    assert vit.pos_embed.is_meta and tuple(vit.pos_embed.shape) == (1, 37, 16)
    assert tuple(vit.patch_embed.proj.weight.shape) == (16, 3, 8, 8)
    swin.set_input_size(img_size=128, window_size=4)
    assert swin.preprocessing.input_size == (3, 128, 128) and all(p.is_meta for p in swin.parameters())
