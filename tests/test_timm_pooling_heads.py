"""Pooling kinds and new heads: what timm configurations ask for is computed exactly or refused, headless timm files
load as backbones, and a head the checkpoint does not supply starts at zero in every family.

Fixtures: tests/fixtures/timm_pooling/ (make_fixtures_timm_pooling.py, timm 1.0.31 in the peer env) for timm's
"max", "avgmax" and "" pooling; the headless TNT / CrossViT files are the committed timm fixtures of
make_fixtures_crossvit_tnt.py without their head tensors, which is what timm's ``num_classes=0`` writes (its
head is an Identity, without tensors), with timm's pre-logits as the expected output.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import vitlab
from vitlab.checkpoints.adapt import classifier_prefixes
from vitlab.models import get_entry

from model_helpers import make_tiny, perturb_, tiny_overrides

torch.set_num_threads(1)

FIX = Path(__file__).resolve().parent / "fixtures"
POOL = FIX / "timm_pooling"
TOL = {"atol": 1e-5, "rtol": 1e-5}
TINY_VIT = dict(img_size=24, patch_size=8, embed_dim=16, depth=1, num_heads=2)  # what the tensors do not say


@pytest.fixture(scope="module")
def pool_io() -> dict[str, torch.Tensor]:
    return load_file(POOL / "io.safetensors")


@pytest.fixture(scope="module")
def crossvit_tnt_io() -> dict[str, torch.Tensor]:
    return load_file(FIX / "crossvit_tnt_io.safetensors")


# ----------------------------------------------------------------------------- 1. global_pool is checked
@pytest.mark.parametrize(("name", "value", "supported"), [
    ("vit_tiny_patch16_224", "maxx", "'token', 'avg', 'max', 'avgmax', 'map', ''"),
    ("vit_tiny_patch16_224", "prr", "'token', 'avg', 'max', 'avgmax', 'map', ''"),
    ("deit_tiny_patch16_224", "MAX", "'token', 'avg', 'max', 'avgmax', 'map', ''"),
    ("cait_xxs24_224", "max", "'token', 'avg'"),
    ("cait_xxs24_224", "", "'token', 'avg'"),
    ("xcit_nano_12_p16_224", "avgmax", "'token', 'avg'"),
    ("xcit_nano_12_p16_224", "maxx", "'token', 'avg'"),
    ("tnt_s_patch16_224", "max", "'token', 'avg'"),
    ("tnt_s_patch16_224", "", "'token', 'avg'"),
    ("crossvit_9_240", "max", "'token', 'avg'"),
    ("crossvit_9_240", "avgmax", "'token', 'avg'"),
])
def test_a_pooling_the_family_does_not_compute_is_refused(name: str, value: str, supported: str) -> None:
    """It used to build a model that silently averaged the patch tokens."""
    config = type(get_entry(name).config).__name__
    with pytest.raises(ValueError, match=rf"{config}: global_pool must be one of {supported}, got {value!r}"):
        vitlab.create_model(name, global_pool=value, **tiny_overrides(name))
    with pytest.raises(ValueError, match=rf"got {value!r}"):  # the config itself, whoever builds it
        dataclasses.replace(get_entry(name).config, global_pool=value)


def test_a_pooling_is_checked_on_the_checkpoint_path_too(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"TNTConfig: global_pool must be one of 'token', 'avg', got 'max'"):
        vitlab.create_model("tnt_s_patch16_224", pretrained=FIX / "tnt_timm_tiny.safetensors", img_size=32,
                            num_heads_outer=4, global_pool="max")
    with pytest.raises(ValueError, match=r"ViTConfig: global_pool must be one of .*, got None"):
        vitlab.create_model("vit_tiny_patch16_224", global_pool=None, **TINY_VIT)


# ----------------------------------------------------------------------------- ViT: timm's max / avgmax / ""
@pytest.mark.parametrize(("case", "name", "file", "options"), [
    ("vit_max", "vit_tiny_patch16_224", "hub_max/model.safetensors", dict(global_pool="max")),
    ("vit_avgmax", "vit_tiny_patch16_224", "vit_avgmax.safetensors", dict(global_pool="avgmax", fc_norm=False)),
    ("vit_max_nocls", "vit_tiny_patch16_224", "vit_max_nocls.safetensors", dict(global_pool="max")),
    ("deit_avgmax", "deit_tiny_patch16_224", "deit_avgmax.safetensors", dict(global_pool="avgmax")),
])
def test_timm_max_and_avgmax_pooling_match_timm(case: str, name: str, file: str, options: dict, pool_io) -> None:
    model = vitlab.create_model(name, pretrained=POOL / file, **TINY_VIT, **options).eval()
    assert model.global_pool == options["global_pool"] and model.num_classes == 5
    x = pool_io["x"]
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True),
                                   pool_io[f"{case}_pre_logits"], **TOL)
        torch.testing.assert_close(model(x), pool_io[f"{case}_logits"], **TOL)


def test_timm_unpooled_backbone_returns_every_token(pool_io) -> None:
    model = vitlab.create_model("vit_tiny_patch16_224", pretrained=POOL / "vit_unpooled.safetensors",
                                global_pool="", **TINY_VIT).eval()
    assert model.num_classes == 0
    with torch.no_grad():
        y = model(pool_io["x"])
    assert y.shape == (2, 10, 16)  # (B, class token + 3 x 3 patches, D), as timm
    torch.testing.assert_close(y, pool_io["vit_unpooled_logits"], **TOL)
    with pytest.raises(ValueError, match=r"global_pool='' \(unpooled tokens\) needs num_classes=0, got num_classes=3"):
        vitlab.create_model("vit_tiny_patch16_224", pretrained=POOL / "vit_unpooled.safetensors", global_pool="",
                            num_classes=3, **TINY_VIT)


def test_timm_hub_folder_with_max_pooling_builds_what_timm_builds(pool_io) -> None:
    model = vitlab.load_model(POOL / "hub_max").eval()  # model_args: global_pool="max", depth 1, 24 px
    assert model.global_pool == "max" and not isinstance(model.fc_norm, nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(model(pool_io["x"]), pool_io["vit_max_logits"], **TOL)


def test_reset_classifier_to_unpooled_tokens_as_timm_does() -> None:
    model = vitlab.create_model("vit_tiny_patch16_224", num_classes=5, **TINY_VIT).eval()
    perturb_(model)
    x = torch.randn(1, 3, 24, 24)
    model.reset_classifier(0, "")
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.forward_features(x))
    assert model.cfg.global_pool == "" and model.cfg.num_classes == 0
    with pytest.raises(ValueError, match=r"needs num_classes=0"):
        model.reset_classifier(3)  # the unpooled model keeps "" unless told otherwise: no per-token logits
    model.reset_classifier(3, "max")
    assert model(x).shape == (1, 3)
    with pytest.raises(ValueError, match=r"reset_classifier: global_pool must be one of .*, got 'maxx'"):
        model.reset_classifier(3, "maxx")
    assert model.global_pool == "max"  # a refused call changes nothing


# ----------------------------------------------------------------------------- 2. headless TNT / CrossViT
def _headless(src: Path, dst: Path) -> Path:
    sd = {k: v for k, v in load_file(src).items() if not k.startswith("head.")}
    save_file(sd, dst)
    return dst


@pytest.mark.parametrize("family", ["tnt", "crossvit"])
def test_headless_timm_file_loads_as_a_backbone(family: str, tmp_path: Path, crossvit_tnt_io, caplog) -> None:
    """It used to load as a 1000-class model with a random head."""
    io = crossvit_tnt_io
    if family == "tnt":
        name, kw, x, expected = "tnt_s_patch16_224", dict(img_size=32, num_heads_outer=4), io["tnt_x"], \
            io["tnt_features"][:, 0]  # timm's num_classes=0 output: the class token after the final norm
    else:
        name, kw, x, expected = "crossvit_9_240", dict(img_size=48, branch_scale=(1.0, 2 / 3), num_heads=(2, 4)), \
            io["crossvit_x"], io["crossvit_pre_logits"]  # both class tokens, concatenated
    file = _headless(FIX / f"{family}_timm_tiny.safetensors", tmp_path / f"{family}_headless.safetensors")
    model = vitlab.create_model(name, pretrained=file, **kw).eval()
    assert model.num_classes == 0 and model.cfg.num_classes == 0
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, **TOL)
    with caplog.at_level(logging.INFO, logger="vitlab.checkpoints.adapt"):
        tuned = vitlab.create_model(name, pretrained=file, num_classes=3, **kw).eval()
    assert "no classifier in the checkpoint; the model's new head (3 classes) is zero-initialised" in caplog.text
    assert all(not p.any() for p in tuned.head.parameters())
    with torch.no_grad():
        assert torch.equal(tuned(x), torch.zeros(2, 3))


# ----------------------------------------------------------------------------- 4. new heads are zero at load
ONE_PER_FAMILY = ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "cait_xxs24_224", "xcit_nano_12_p16_224",
                  "tnt_s_patch16_224", "crossvit_9_240", "swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256",
                  "mobilevit_xxs", "mobilevitv2_050", "beit_base_patch16_224", "beit3_base_patch16_224",
                  "mixer_s16_224", "t2t_vit_7", "cct_2_3x2_32", "resnet18"]


def _head_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    heads = classifier_prefixes(model)
    return {k: v for k, v in model.state_dict().items() if k.split(".")[0] in heads}


def _linear_head_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    heads = classifier_prefixes(model)
    out = {}
    for name, m in model.named_modules():
        if name.split(".")[0] in heads and isinstance(m, nn.Linear):
            out.update({f"{name}.{k}": v for k, v in m.state_dict().items()})
    return out


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
@pytest.mark.parametrize("source_classes", [5, 0], ids=["other-size-head", "headless"])
def test_a_replaced_or_missing_head_is_zero_initialised_in_every_family(name: str, source_classes: int,
                                                                       tmp_path: Path) -> None:
    """README: loading "replaces a head of another size by a zero-initialised one". Swin, CaiT, XCiT, MobileViT,
    TNT, CrossViT, ... used to keep their random init (another head on every load) and BEiT its scaled one."""
    src = perturb_(make_tiny(name, num_classes=source_classes))
    path = tmp_path / "src.safetensors"
    vitlab.save_model(src, path)
    a = vitlab.create_model(name, pretrained=path, num_classes=3)
    b = vitlab.create_model(name, pretrained=path, num_classes=3)
    linear = _linear_head_tensors(a)
    assert linear  # every family's classifier is a Linear (two for CrossViT and distilled DeiT)
    assert all(not v.any() for v in linear.values()), {k: float(v.abs().max()) for k, v in linear.items()}
    assert _head_tensors(a).keys() == _head_tensors(b).keys()
    assert all(torch.equal(v, _head_tensors(b)[k]) for k, v in _head_tensors(a).items())  # the same on every load
    # the body is the checkpoint's
    body = {k: v for k, v in src.state_dict().items() if k.split(".")[0] not in classifier_prefixes(src)}
    loaded = a.state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in body.items())


def test_crossvit_and_distilled_deit_zero_every_head(tmp_path: Path) -> None:
    for name, heads in (("crossvit_9_240", ("head.0", "head.1")), ("deit_tiny_distilled_patch16_224",
                                                                   ("head", "head_dist"))):
        path = tmp_path / f"{name}.safetensors"
        vitlab.save_model(perturb_(make_tiny(name, num_classes=5)), path)
        model = vitlab.create_model(name, pretrained=path, num_classes=3)
        for head in heads:
            m = model.get_submodule(head)
            assert m.out_features == 3 and not m.weight.any() and not m.bias.any()


@pytest.mark.parametrize("name", ["cait_xxs24_224", "swin_tiny_patch4_window7_224", "beit_base_patch16_224",
                                  "crossvit_9_240"])
def test_a_fresh_model_keeps_its_family_init_and_a_matching_head_loads(name: str, tmp_path: Path) -> None:
    fresh = make_tiny(name, num_classes=5)
    assert any(v.any() for v in _linear_head_tensors(fresh).values())  # not zeroed: only loading zeroes
    path = tmp_path / "m.safetensors"
    src = perturb_(fresh)
    vitlab.save_model(src, path)
    same = vitlab.create_model(name, pretrained=path)  # a head of the model's size is the checkpoint's
    assert all(torch.equal(v, same.state_dict()[k]) for k, v in _head_tensors(src).items())


def test_a_timm_file_with_another_head_size_gets_a_zero_head(tmp_path: Path, crossvit_tnt_io) -> None:
    model = vitlab.create_model("tnt_s_patch16_224", pretrained=FIX / "tnt_timm_tiny.safetensors", img_size=32,
                                num_heads_outer=4, num_classes=4).eval()
    assert not model.head.weight.any() and not model.head.bias.any()
    with torch.no_grad():
        assert torch.equal(model(crossvit_tnt_io["tnt_x"]), torch.zeros(2, 4))


def test_headless_t2t_and_cct_files_load_as_backbones(tmp_path: Path) -> None:
    """As for TNT / CrossViT: a file without a head is a backbone, not the variant's classifier with a new head
    (T2T-ViT in the official layout, CCT in vitlab's own names)."""
    from vitlab.checkpoints.io import read_pickle, unwrap_state_dict

    from model_helpers import perturb_

    official = FIX / "t2t_vit_t_official_tiny.pth.tar"
    kw = dict(img_size=32, num_heads=4)
    full = vitlab.create_model("t2t_vit_t_14", pretrained=official, **kw).eval()
    sd = unwrap_state_dict(read_pickle(official), "x")
    cases = [("t2t_vit_t_14", kw, full, {k: v for k, v in sd.items() if not k.startswith("head.")})]
    cct = perturb_(vitlab.create_model("cct_2_3x2_32", num_classes=5)).eval()
    cases.append(("cct_2_3x2_32", {}, cct, {k: v for k, v in cct.state_dict().items() if not k.startswith("head.")}))
    x = torch.randn(2, 3, 32, 32)
    for name, args, whole, headless in cases:
        file = tmp_path / f"{name}.pth"
        torch.save(headless, file)
        model = vitlab.create_model(name, pretrained=file, **args).eval()
        assert model.num_classes == 0, name
        with torch.no_grad():
            torch.testing.assert_close(model(x), whole.forward_head(whole.forward_features(x), pre_logits=True), **TOL)
    file = tmp_path / "cct_5.pth"  # with its head: its own classes, not the variant's 10 and a zero head
    torch.save(cct.state_dict(), file)
    with torch.no_grad():
        torch.testing.assert_close(vitlab.create_model("cct_2_3x2_32", pretrained=file).eval()(x), cct(x), **TOL)
