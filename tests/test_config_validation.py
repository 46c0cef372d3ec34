"""Config values no model has are refused where the config is made, naming the field; and a few edge cases of
the families the configs build (an empty batch, T2T-ViT's channels, SwinV2's cosine attention in float16)."""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

import vitlab
from vitlab import CheckpointError
from vitlab.layers import window_attention
from vitlab.models.registry import get_entry

from model_helpers import make_tiny, perturb_

torch.set_num_threads(1)

TINY_VIT = {"img_size": 32, "patch_size": 16, "embed_dim": 32, "depth": 1, "num_heads": 2, "num_classes": 5}


def _one_name_per_config() -> dict[str, str]:
    names: dict[str, str] = {}
    for name in vitlab.list_models(task=None):
        names.setdefault(type(get_entry(name).config).__name__, name)
    return names


def _literal_fields() -> list[tuple[str, str, tuple]]:
    """(registered name, field, allowed values) for every Literal-annotated field of every family's config."""
    out = []
    for name in _one_name_per_config().values():
        cls = type(get_entry(name).config)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            lits = [a for a in (hint, *typing.get_args(hint)) if typing.get_origin(a) is typing.Literal]
            if lits:
                out.append((name, f.name, typing.get_args(lits[0])))
    return out


LITERAL_FIELDS = _literal_fields()


def _bogus(allowed: tuple) -> object:
    return max(a for a in allowed if isinstance(a, int)) + 1 if all(isinstance(a, int) for a in allowed) else "BOGUS"


def test_every_family_has_literal_fields_to_check() -> None:
    families = {type(get_entry(n).config).__name__ for n, _, _ in LITERAL_FIELDS}
    assert {"ViTConfig", "DeiTConfig", "MobileViTConfig", "ResNetConfig", "MixerConfig", "SwinConfig"} <= families
    assert len(LITERAL_FIELDS) >= 30


@pytest.mark.parametrize(("name", "field", "allowed"), LITERAL_FIELDS,
                         ids=[f"{type(get_entry(n).config).__name__}.{f}" for n, f, _ in LITERAL_FIELDS])
def test_an_option_outside_its_literal_is_refused(name: str, field: str, allowed: tuple) -> None:
    """A misspelled option (pos_embed="learned") used to build another model (no position embedding)."""
    config = type(get_entry(name).config).__name__
    bogus = _bogus(allowed)
    with torch.device("meta"), pytest.raises(ValueError, match=rf"{config}: {field} must be .*{bogus}"):
        vitlab.create_model(name, **{field: bogus})
    if config not in ("DETRConfig", "SETRConfig"):  # these two are checked where create_model builds them
        with pytest.raises(ValueError, match=rf"{config}: {field} must be"):  # whoever makes the config
            dataclasses.replace(get_entry(name).config, **{field: bogus})


def test_the_message_names_the_value_the_allowed_values_and_a_close_one() -> None:
    with pytest.raises(ValueError, match=r"ViTConfig: pos_embed must be one of 'learn', 'sincos', 'none', "
                                         r"got 'learned' \(did you mean 'learn'\?\)"):
        vitlab.create_model("vit_tiny_patch16_224", pos_embed="learned", **TINY_VIT)
    with pytest.raises(ValueError, match=r"ResNetConfig: block must be one of 'basic', 'bottleneck', "
                                         r"got 'Bottleneck'"):
        vitlab.create_model("resnet18", block="Bottleneck")
    # legitimate values, "none" included, still build
    for value in ("learn", "sincos", "none"):
        assert vitlab.create_model("vit_tiny_patch16_224", pos_embed=value, **TINY_VIT).cfg.pos_embed == value


def test_a_vitlab_checkpoint_with_a_misspelled_option_is_refused(tmp_path: Path) -> None:
    path = vitlab.save_model(vitlab.create_model("vit_tiny_patch16_224", **TINY_VIT), tmp_path / "m.safetensors")
    with safe_open(str(path), "pt") as f:
        header = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    meta = json.loads(header["vitlab"])
    meta["config"]["pos_embed"] = "learned"
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={**header, "vitlab": json.dumps(meta)})
    with pytest.raises(ValueError, match="pos_embed must be one of 'learn', 'sincos', 'none', got 'learned'"):
        vitlab.load_model(bad)


IMPOSSIBLE = [
    ("vit_tiny_patch16_224", "depth", -1, ">= 0"),
    ("vit_tiny_patch16_224", "num_classes", -1, ">= 0"),
    ("vit_tiny_patch16_224", "norm_eps", -1.0, "> 0"),
    ("vit_tiny_patch16_224", "norm_eps", 0.0, "> 0"),
    ("vit_tiny_patch16_224", "drop_path_rate", 2.0, r"in \[0, 1\)"),
    ("vit_tiny_patch16_224", "drop_path_rate", 1.0, r"in \[0, 1\)"),
    ("vit_tiny_patch16_224", "attn_drop_rate", -0.1, r"in \[0, 1\)"),
    ("vit_tiny_patch16_224", "drop_rate", math.nan, r"in \[0, 1\)"),
    ("vit_tiny_patch16_224", "img_size", 0, "> 0"),
    ("vit_tiny_patch16_224", "img_size", -32, "> 0"),
    ("vit_tiny_patch16_224", "img_size", (32, 0), "> 0"),
    ("vit_tiny_patch16_224", "embed_dim", 0, "> 0"),
    ("vit_tiny_patch16_224", "num_heads", 0, "> 0"),
    ("vit_tiny_patch16_224", "patch_size", 0, "> 0"),
    ("vit_tiny_patch16_224", "in_chans", 0, "> 0"),
    ("vit_tiny_patch16_224", "mlp_ratio", 0.0, "> 0"),
    ("deit_tiny_patch16_224", "embed_dim", 0, "> 0"),
    ("swin_tiny_patch4_window7_224", "depths", (2, -1, 2, 2), ">= 0"),
    ("swin_tiny_patch4_window7_224", "num_heads", (3, 0, 12, 24), "> 0"),
    ("swin_tiny_patch4_window7_224", "window_size", 0, "> 0"),
    ("crossvit_tiny_240", "embed_dim", (0, 64), "> 0"),
    ("resnet18", "layers", (2, -2, 2, 2), ">= 0"),
    ("resnet18", "stem_chs", 0, "> 0"),
    ("tnt_s_patch16_224", "num_heads_inner", 0, "> 0"),
    ("mobilevit_xxs", "expand_ratio", 0.0, "> 0"),
    ("t2t_vit_7", "token_dim", 0, "> 0"),
    ("mixer_s32_224", "tokens_mlp_ratio", -0.5, "> 0"),
    ("xcit_nano_12_p16_224", "norm_eps", -1e-6, "> 0"),
    ("cait_xxs24_224", "depth_token_only", -1, ">= 0"),
    ("cct_2_3x2_32", "kernel_size", 0, "> 0"),
    ("beit_base_patch16_224", "drop_path_rate", 1.5, r"in \[0, 1\)"),
]


@pytest.mark.parametrize(("name", "field", "value", "rule"), IMPOSSIBLE,
                         ids=[f"{n}-{f}={v}" for n, f, v, _ in IMPOSSIBLE])
def test_an_impossible_number_is_refused_naming_the_field(name: str, field: str, value: object, rule: str) -> None:
    """They used to build (depth=-1: no blocks; norm_eps=-1: NaN outputs), fail at forward (img_size=0) or
    with a bare ZeroDivisionError (num_heads=0)."""
    config = type(get_entry(name).config).__name__
    with torch.device("meta"), pytest.raises(ValueError, match=rf"{config}: {field} must be {rule}"):
        vitlab.create_model(name, **{field: value})


def test_crossvit_needs_a_block_in_each_multiscale_block() -> None:
    with pytest.raises(ValueError, match=r"CrossViTConfig: each multi-scale block needs a ViT block"):
        vitlab.create_model("crossvit_tiny_240", depth=((0, 0),))


def test_the_limits_themselves_still_build() -> None:
    """0 blocks is a model (timm builds it too; tests elsewhere use it), as is no dropout and a 0-class head."""
    m = vitlab.create_model("vit_tiny_patch16_224", **{**TINY_VIT, "depth": 0, "num_classes": 0},
                            drop_path_rate=0.0, drop_rate=0.0).eval()
    assert len(m.blocks) == 0 and m(torch.randn(1, 3, 32, 32)).shape == (1, 32)
    vitlab.create_model("vit_tiny_patch16_224", drop_path_rate=0.99, **TINY_VIT)


def test_arguments_of_the_wrong_type_are_a_type_error_naming_them() -> None:
    with pytest.raises(TypeError, match=r"create_model: name must be a registered model name .*got None"):
        vitlab.create_model(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"list_models: pattern must be a string .*got 123"):
        vitlab.list_models(123)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"model name must be a string .*got 7"):
        vitlab.model_info(7)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- an empty batch
def _one_name_per_family() -> list[str]:
    names: dict[str, str] = {}
    for name in vitlab.list_models():
        names.setdefault(get_entry(name).family, name)
    return sorted(names.values())


@pytest.mark.parametrize("name", _one_name_per_family())
def test_an_empty_batch_gives_empty_logits(name: str) -> None:
    """T2T-ViT and TNT used to fail with a reshape error (a -1 dimension cannot be inferred from 0 elements)."""
    model = make_tiny(name).eval()
    x = torch.randn(0, *model.preprocessing.input_size)
    with torch.no_grad():
        assert model(x).shape == (0, 5)
        if get_entry(name).family in ("t2t", "tnt"):
            _, kept = model.forward_intermediates(x, indices=1, output_fmt="NCHW")
            assert kept[0].shape[0] == 0 and kept[0].ndim == 4


# ------------------------------------------------------------------------------- T2T-ViT and in_chans
def test_t2t_refuses_another_channel_count_saying_why(tmp_path: Path) -> None:
    """T2T-ViT reads the image through Unfold + LayerNorm + Linear: the RGB-to-grey filter adaptation of the
    convolutional families does not apply. The error used to blame 'another architecture or size'."""
    kw = {"img_size": 32, "token_dim": 16, "embed_dim": 32, "depth": 1, "num_heads": 4, "num_classes": 5}
    path = vitlab.save_model(vitlab.create_model("t2t_vit_7", **kw), tmp_path / "t2t.safetensors")
    for channels in (1, 4):
        with pytest.raises(CheckpointError) as err:
            vitlab.create_model("t2t_vit_7", pretrained=path, in_chans=channels)
        msg = str(err.value)
        assert f"in_chans={channels}" in msg and "not supported for T2T-ViT" in msg and "Unfold" in msg
        assert "another architecture" not in msg
    assert vitlab.create_model("t2t_vit_7", pretrained=path).cfg.in_chans == 3  # RGB still loads


# ------------------------------------------------------------------------------ SwinV2 in float16
SWINV2 = {"img_size": 72, "embed_dim": 16, "depths": (1, 1), "num_heads": (1, 2), "window_size": 4, "num_classes": 5}


def _swinv2() -> torch.nn.Module:
    torch.manual_seed(0)
    return perturb_(vitlab.create_model("swinv2_tiny_window8_256", **SWINV2)).eval()  # 18 x 18 grid: padded


def test_swinv2_float16_is_finite_where_windows_are_padded() -> None:
    """Padded tokens' keys are exactly 0 and F.normalize's default eps (1e-12) is 0 in float16: 0 / 0 gave
    all-NaN logits."""
    model = _swinv2()
    x = torch.randn(2, 3, 72, 72)
    with torch.no_grad():
        ref = model(x)
        half = model.half()(x.half()).float()
    assert torch.isfinite(half).all()
    torch.testing.assert_close(half, ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swinv2_float32_and_bfloat16_are_unchanged(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """The eps is 1e-12 wherever the dtype holds it: the same numbers, bit for bit, as F.normalize's default."""
    model = _swinv2().to(dtype)
    x = torch.randn(2, 3, 72, 72, dtype=dtype)
    with torch.no_grad():
        got = model(x)
        normalize = F.normalize
        monkeypatch.setattr(window_attention.F, "normalize", lambda t, dim, eps=None: normalize(t, dim=dim))
        before = model(x)
    assert torch.equal(got, before)


@pytest.mark.parametrize(("name", "kw", "field"), [("setr_naive_vit_small_patch16", {"decoder": "pupp"}, "decoder"),
                                                   ("setr_naive_vit_small_patch16", {"channels": 0}, "channels"),
                                                   ("detr_resnet50", {"num_heads": 0}, "num_heads"),
                                                   ("detr_resnet50", {"dropout": 1.0}, "dropout"),
                                                   ("detr_resnet50", {"dropout": -0.1}, "dropout"),
                                                   ("detr_resnet50", {"dec_depth": 0}, "dec_depth"),
                                                   ("detr_resnet50", {"enc_depth": -1}, "enc_depth"),
                                                   ("detr_resnet50", {"num_queries": 0}, "num_queries"),
                                                   ("detr_resnet50", {"max_size": 0}, "max_size"),
                                                   ("setr_pup_vit_small_patch16", {"pup_upsamples": -1},
                                                    "pup_upsamples"),
                                                   ("setr_naive_vit_small_patch16", {"aux_weight": -0.4},
                                                    "aux_weight")])
def test_dense_configs_are_checked_too(name, kw, field):
    """DETR and SETR configs rebuilt from saved files (not through create_model) are checked as well."""
    from vitlab.models.registry import get_entry

    with pytest.raises(ValueError, match=field):
        dataclasses.replace(get_entry(name).config, **kw)
