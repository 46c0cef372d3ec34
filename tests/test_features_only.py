"""``create_model(NAME, features_only=True, out_indices=...)`` against timm 1.0.31's feature extractors.

Fixtures: tests/fixtures/features_only/make_fixtures_features_only.py (peer environment): tiny timm classifiers
(float16 tensors), timm's feature maps for the default and a chosen ``out_indices``, and its feature_info.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vitlab

FIX = Path(__file__).parent / "fixtures" / "features_only"
TOL = dict(atol=1e-5, rtol=1e-5)
VIT = dict(img_size=16, patch_size=4, embed_dim=8, depth=3, num_heads=2, mlp_ratio=2.0)
SWIN = dict(img_size=32, num_heads=(1, 1, 2, 2), window_size=2)
# case: (vitlab name, the options the file does not state)
CASES = {
    "vit": ("vit_tiny_patch16_224", VIT),
    "vit_reg": ("vit_small_patch14_reg4_dinov2", VIT),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", VIT),
    "beit": ("beit_base_patch16_224", dict(img_size=16, num_heads=2)),
    "cait": ("cait_xxs24_224", dict(img_size=16, patch_size=4, num_heads=2, mlp_ratio=2.0)),
    "xcit": ("xcit_nano_12_p8_224", dict(img_size=32, num_heads=2)),
    "crossvit": ("crossvit_9_240", dict(img_size=24, branch_scale=(1.0, 2 / 3), patch_size=(6, 8), num_heads=(2, 2))),
    "tnt": ("tnt_s_patch16_224", dict(img_size=16, patch_size=8, num_heads_outer=2, num_heads_inner=2,
                                      mlp_ratio=2.0)),
    "mixer": ("mixer_s16_224", dict(img_size=16)),
    "swin": ("swin_tiny_patch4_window7_224", SWIN),
    "swinv2": ("swinv2_tiny_window8_256", SWIN),
    "mobilevit": ("mobilevit_xxs", dict(img_size=32)),
    "mobilevitv2": ("mobilevitv2_050", dict(img_size=32)),
    "resnet18": ("resnet18", dict(img_size=16)),
    "resnet50": ("resnet50", dict(img_size=16)),
}
# vitlab's own module names where its modules are not named as timm's (ResNet: stem / stages, timm: act1 / layerN)
MODULES = {"act1": "stem.act", **{f"layer{i}": f"stages.{i - 1}" for i in range(1, 5)}}


# the chosen out_indices as the generator passed them (negative ones included)
CASES_CHOSEN = {"vit": (0, -2), "vit_reg": (-2,), "deit_distilled": (0, -2), "beit": (0, -2), "cait": (0, -2),
                "xcit": (0, -2), "crossvit": (0, -2), "tnt": (0, -2), "mixer": (0, -2), "swin": (1, -1),
                "swinv2": (0, 2), "mobilevit": (1, 3), "mobilevitv2": (-1,), "resnet18": (1, -1), "resnet50": (0, 2)}


@pytest.fixture(scope="module")
def expected() -> dict:
    return json.loads((FIX / "expected.json").read_text())


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return load_file(FIX / "io.safetensors")


def pattern(size: int) -> torch.Tensor:
    """The generator's input formula, (1, 3, size, size)."""
    i = torch.arange(size, dtype=torch.float64)[:, None]
    j = torch.arange(size, dtype=torch.float64)[None, :]
    out = torch.stack([torch.sin(0.37 * i * (c + 1) + 0.23 * j) * torch.cos(0.11 * j * (c + 2) - 0.05 * i)
                       for c in range(3)])
    return out[None].float()


def features(case: str, **kw) -> torch.nn.Module:
    name, options = CASES[case]
    return vitlab.create_model(name, pretrained=FIX / f"{case}.safetensors", features_only=True,
                               **{**options, **kw}).eval()


def test_fixture_size() -> None:
    assert sum(p.stat().st_size for p in FIX.iterdir()) < 700_000
    assert set(CASES) == set(json.loads((FIX / "expected.json").read_text())) - {"_versions"}


@pytest.mark.parametrize("case", list(CASES))
def test_maps_and_feature_info_match_timm(case: str, expected: dict, io: dict) -> None:
    e = expected[case]
    x = pattern(e["size"])
    for tag in ("default", "chosen"):
        model = features(case) if tag == "default" else features(case, out_indices=tuple(CASES_CHOSEN[case]))
        n = len(e["feature_info"])
        assert list(model.out_indices) == [i % n for i in e[tag]["out_indices"]], tag
        assert list(model.feature_info.out_indices) == e[tag]["out_indices"], tag  # Swin / MobileViT: as given
        with torch.no_grad():
            maps = model(x)
        assert isinstance(maps, list) and [list(m.shape) for m in maps] == e[tag]["shapes"], tag
        for k, m in zip(model.out_indices, maps):
            ref = io.get(f"{case}.{tag}.{k}", io.get(f"{case}.default.{k}"))
            torch.testing.assert_close(m, ref, **TOL, msg=lambda s, k=k, t=tag: f"{case} {t} feature {k}: {s}")
        if tag == "chosen":
            fi = model.feature_info
            assert fi.channels() == e["channels"] and fi.reduction() == e["reduction"]
            names = MODULES if case.startswith("resnet") else {}
            assert fi.module_name() == [names.get(m, m) for m in e["module_name"]]
            every = list(range(len(fi)))
            keys = ("num_chs", "reduction", "module", "index")
            assert fi.get_dicts(keys=keys, idx=every) == [{**d, "module": names.get(d["module"], d["module"])}
                                                          for d in e["feature_info"]]
            model.model.get_submodule(fi.module_name()[-1])  # the names are the model's own modules
            assert [fi[i]["num_chs"] for i in every] == [d["num_chs"] for d in e["feature_info"]]
            assert model.output_fmt == e["output_fmt"]


@pytest.mark.parametrize("case", ["vit", "vit_reg", "deit_distilled"])
def test_state_dict_layout_is_timms(case: str, expected: dict) -> None:
    """Where vitlab's classifier keys are timm's, the feature model's are timm's feature model's: the head, the
    final norm and the blocks after the last one taken are gone, the rest under ``model.``."""
    model = features(case, out_indices=CASES_CHOSEN[case])
    assert sorted(model.state_dict()) == expected[case]["state_dict_keys"]


def test_pretrained_weights_load_as_for_the_classifier(io: dict) -> None:
    name, options = CASES["vit"]
    classifier = vitlab.create_model(name, pretrained=FIX / "vit.safetensors", **options).eval()
    feats = features("vit")
    for k, v in feats.model.state_dict().items():
        torch.testing.assert_close(v, classifier.state_dict()[k], rtol=0, atol=0)
    assert "model.head.weight" not in feats.state_dict()
    with torch.no_grad():
        _, inter = classifier.forward_intermediates(pattern(16), [0, 1, 2], output_fmt="NCHW")
    torch.testing.assert_close(inter[2], io["vit.default.2"], **TOL)


def test_output_formats() -> None:
    swin = vitlab.create_model("swin_tiny_patch4_window7_224", features_only=True, embed_dim=4, patch_size=2,
                               depths=(1, 1, 1, 1), **SWIN).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        nhwc = swin(x)
        swin.output_fmt = "NCHW"
        nchw = swin(x)
    assert [tuple(m.shape) for m in nhwc] == [(1, 16, 16, 4), (1, 8, 8, 8), (1, 4, 4, 16), (1, 2, 2, 32)]
    for a, b in zip(nhwc, nchw):
        torch.testing.assert_close(a.permute(0, 3, 1, 2), b)
    vit = vitlab.create_model("vit_tiny_patch16_224", features_only=True, output_fmt="NLC", out_indices=1, **VIT)
    assert [tuple(m.shape) for m in vit(torch.randn(2, 3, 16, 16))] == [(2, 16, 8)]


@pytest.mark.parametrize("name, options, n", [
    ("t2t_vit_7", dict(embed_dim=16, depth=4, num_heads=2, token_dim=8), 4),
    ("cct_2_3x2_32", dict(embed_dim=16, num_heads=2, depth=2), 2),
    ("mobilevitv3_xxs", dict(img_size=64), 5),
    ("resnet18", dict(layers=(1, 1, 1, 1), img_size=64, stem="small"), 5),
])
def test_families_without_timm(name: str, options: dict, n: int) -> None:
    """T2T-ViT, CCT, MobileViTv3 and vitlab's small-stem ResNet (no max pool): through their forward_intermediates, with
    feature_info from the meta-device probe agreeing with the maps."""
    model = vitlab.create_model(name, features_only=True, out_indices=tuple(range(-n, 0)), **options).eval()
    size = model.preprocessing.input_size
    with torch.no_grad():
        maps = model(torch.randn(1, *size))
    assert len(maps) == n == len(model.feature_info)
    assert [m.shape[1] for m in maps] == model.feature_info.channels()
    assert [round(size[1] / m.shape[2]) for m in maps] == model.feature_info.reduction()


def test_errors() -> None:
    with pytest.raises(ValueError, match=r"out_indices entry 3 is out of range: the model has 3 features"):
        vitlab.create_model("vit_tiny_patch16_224", features_only=True, out_indices=(0, 3), **VIT)
    with pytest.raises(ValueError, match=r"out_indices=4 \(the last n\) is out of range: the model has 3 features"):
        vitlab.create_model("vit_tiny_patch16_224", features_only=True, out_indices=4, **VIT)
    with pytest.raises(ValueError, match=r"out_indices entry -5 is out of range: the model has 4 features"):
        vitlab.create_model("swin_tiny_patch4_window7_224", features_only=True, out_indices=(-5,), **SWIN)
    with pytest.raises(ValueError, match=r"detr_resnet50 is a detection model; features_only"):
        vitlab.create_model("detr_resnet50", features_only=True)
    with pytest.raises(ValueError, match=r"setr_naive_vit_small_patch16 is a segmentation model"):
        vitlab.create_model("setr_naive_vit_small_patch16", features_only=True)
    with pytest.raises(ValueError, match=r"output_fmt must be one of 'NCHW', 'NLC' for the vit family, got 'NHWC'"):
        vitlab.create_model("vit_tiny_patch16_224", features_only=True, output_fmt="NHWC", **VIT)
    with pytest.raises(TypeError, match=r"out_indices needs features_only=True"):
        vitlab.create_model("vit_tiny_patch16_224", out_indices=(1,), **VIT)


def test_plain_create_model_unchanged() -> None:
    model = vitlab.create_model("vit_tiny_patch16_224", features_only=False, **VIT)
    assert model.num_classes == 1000 and len(model.blocks) == 3


def test_save_model_refuses_an_extractor_naming_what_to_save(tmp_path):
    from vitlab.checkpoints.vitlab_format import save_model

    fx = vitlab.create_model("vit_tiny_patch16_224", features_only=True, img_size=32, patch_size=8, depth=2,
                             embed_dim=16, num_heads=2)
    with pytest.raises(ValueError, match="features_only extractor.*create_model without features_only"):
        save_model(fx, tmp_path / "fx.safetensors")
    assert not (tmp_path / "fx.safetensors").exists()
