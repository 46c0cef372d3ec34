"""T2T-ViT: the official .pth.tar layout against an independent forward pass, Performer features kept,
the two attention scales, non-square inputs, capture and rollout over the backbone.

Fixtures come from tests/fixtures/make_fixtures_t2t.py (official key names; expected outputs from a
written-out float64 forward in that script, not from vitlab).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vitlab
from vitlab.analysis import explain
from vitlab.checkpoints import CheckpointError
from vitlab.checkpoints.io import read_pickle, unwrap_state_dict
from vitlab.layers import capture_attention
from vitlab.layers.t2t_attention import PerformerAttention
from vitlab.models.t2t import sinusoid_table

from model_helpers import input_for, make_tiny, perturb_

FIX = Path(__file__).resolve().parent / "fixtures"
TOL = {"atol": 1e-5, "rtol": 1e-5}
CASES = {"t2t_vit": (32, 48), "t2t_vit_t": (32, 32)}  # the Performer case has a non-square input


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return load_file(FIX / "t2t_io.safetensors")


def _official(name: str, **kw) -> torch.nn.Module:
    # heads are not in the file; widths, depth, T2T kind and classes are
    return vitlab.create_model(f"{name}_14", pretrained=FIX / f"{name}_official_tiny.pth.tar",
                               **{"img_size": CASES[name], "num_heads": 4, **kw}).eval()


@pytest.mark.parametrize("name", list(CASES))
def test_official_checkpoint_matches_the_independent_forward(name: str, io) -> None:
    model = _official(name)
    assert model.cfg.t2t_type == ("performer" if name == "t2t_vit" else "transformer")
    assert (model.cfg.token_dim, model.cfg.embed_dim, model.cfg.depth, model.num_classes) == (16, 32, 2, 10)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(io[f"{name}_x"]), io[f"{name}_features"], **TOL)
        torch.testing.assert_close(model(io[f"{name}_x"]), io[f"{name}_logits"], **TOL)


def test_ema_weights_module_prefix_and_performer_features_come_from_the_file() -> None:
    raw = torch.load(FIX / "t2t_vit_t_official_tiny.pth.tar", weights_only=True)
    sd = unwrap_state_dict(read_pickle(FIX / "t2t_vit_t_official_tiny.pth.tar"), "x")
    assert all(not k.startswith("module.") for k in sd)
    torch.testing.assert_close(sd["cls_token"], raw["state_dict_ema"]["module.cls_token"])  # EMA, not state_dict
    file_w = torch.load(FIX / "t2t_vit_official_tiny.pth.tar", weights_only=True)["state_dict_ema"][
        "tokens_to_token.attention1.w"]
    model = _official("t2t_vit")
    torch.testing.assert_close(model.tokens_to_token.attention1.attn.w, file_w)  # loaded, not redrawn
    fresh = vitlab.create_model("t2t_vit_7")
    assert "tokens_to_token.attention1.attn.w" in fresh.state_dict()  # a buffer saved with the model


def test_pos_embed_is_the_fixed_sinusoid_and_follows_the_grid() -> None:
    t = sinusoid_table(5, 6)
    assert torch.allclose(t[0, 3, 0], torch.tensor(3.0).sin()) and torch.allclose(t[0, 3, 1], torch.tensor(3.0).cos())
    assert torch.allclose(t[0, 2, 2], torch.tensor(2 / 10000 ** (2 / 6)).sin())
    m = make_tiny("t2t_vit_14", img_size=(48, 64))
    assert m.tokens_to_token.grid_size == (3, 4) and m.pos_embed.shape == (1, 13, 32)
    assert "pos_embed" not in dict(m.named_parameters())  # never learned


def test_checkpoint_at_another_resolution_gets_the_table_of_its_grid(io) -> None:
    big = _official("t2t_vit_t", img_size=(48, 48))
    torch.testing.assert_close(big.pos_embed, sinusoid_table(1 + 9, 32))
    with torch.no_grad():
        assert torch.isfinite(big(torch.randn(1, 3, 48, 48))).all()


def test_attention_scales() -> None:
    m = make_tiny("t2t_vit_t_14")
    assert m.tokens_to_token.attention1.attn.scale == pytest.approx(147**-0.5)  # from the INPUT width
    assert m.tokens_to_token.attention2.attn.scale == pytest.approx((16 * 9) ** -0.5)
    assert m.blocks[0].attn.scale == pytest.approx(8**-0.5)  # head width: what the published accuracy used
    alt = make_tiny("t2t_vit_t_14", qk_scale=32**-0.5).eval()  # the pretrained=True path of the released code
    assert alt.blocks[0].attn.scale == pytest.approx(32**-0.5)
    x = input_for(alt)
    with torch.no_grad():
        fast = alt(x)
        with capture_attention(alt):
            slow = alt(x)
    torch.testing.assert_close(slow, fast, **TOL)  # the fast path honours the scale too


def test_params_match_the_paper() -> None:
    # the paper / README count every nn.Parameter of the released model, including the fixed position table
    # and the Performer features (requires_grad=False there; buffers here)
    published = {"t2t_vit_7": 4.3, "t2t_vit_10": 5.9, "t2t_vit_12": 6.9, "t2t_vit_14": 21.5, "t2t_vit_19": 39.2,
                 "t2t_vit_24": 64.1, "t2t_vit_t_14": 21.5, "t2t_vit_t_19": 39.2, "t2t_vit_t_24": 64.1}
    for name, millions in published.items():
        with torch.device("meta"):
            m = vitlab.create_model(name)
        n = sum(p.numel() for p in m.parameters()) + sum(b.numel() for b in m.buffers())
        assert abs(n / 1e6 - millions) / millions < 0.01, (name, n)
    assert abs(vitlab.model_info("t2t_vit_14")["gmacs"] - 4.8) < 0.1  # README: 4.8 G
    assert abs(vitlab.model_info("t2t_vit_t_14")["gmacs"] - 6.1) < 0.1  # README: 6.1 G


def test_capture_t2t_and_backbone_attention(io) -> None:
    model = _official("t2t_vit")
    x = io["t2t_vit_x"]
    with torch.no_grad():
        fast = model(x)
        with capture_attention(model) as maps:
            slow = model(x)
    torch.testing.assert_close(slow, fast, **TOL)
    # Performer T2T layers over 8 x 12 then 4 x 6 tokens (the attention the kernel implies), then the backbone
    assert [tuple(a.shape) for a in maps] == [(2, 1, 96, 96), (2, 1, 24, 24)] + [(2, 4, 7, 7)] * 2
    for a in maps:
        torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]), atol=1e-5, rtol=0)


def test_performer_capture_matches_its_linear_path() -> None:
    torch.manual_seed(0)
    attn = PerformerAttention(12, 8).eval()
    x = torch.randn(2, 10, 12)
    with torch.no_grad():
        fast = attn(x)
        with capture_attention(attn) as maps:
            slow = attn(x)
    torch.testing.assert_close(slow, fast, atol=1e-5, rtol=1e-5)
    assert maps[0].shape == (2, 1, 10, 10)


@pytest.mark.parametrize("method", ["rollout", "grad-rollout", "last-layer", "grad-cam", "grad-input"])
def test_explain_t2t_every_method(method: str) -> None:
    model = perturb_(make_tiny("t2t_vit_7", img_size=(48, 64))).eval()
    x = input_for(model)
    e = explain(model, x, method=method)
    assert e.method == method and e.maps.shape == (2, 48, 64) and torch.isfinite(e.maps).all()
    if method != "grad-input":
        assert e.patch_maps.shape == (2, 3, 4)
    assert explain(model, x).method == "rollout"


def test_bad_inputs() -> None:
    m = make_tiny("t2t_vit_7").eval()
    with pytest.raises(ValueError, match="built for 32x32"):
        m(torch.randn(1, 3, 48, 48))
    with pytest.raises(CheckpointError, match="T2T-ViT"):
        vitlab.create_model("t2t_vit_7", pretrained=FIX / "tnt_timm_tiny.safetensors")


@pytest.mark.parametrize("name", ["crossvit_9_240", "tnt_s_patch16_224", "t2t_vit_7"])
def test_analyze_reports_what_applies(name: str, tmp_path) -> None:
    from torch.utils.data import TensorDataset

    from vitlab.analysis.analyze import analyze_model

    model = perturb_(make_tiny(name)).eval()
    c, h, w = model.preprocessing.input_size
    numbers = analyze_model(model, TensorDataset(torch.randn(4, c, h, w), torch.arange(4) % 5), tmp_path,
                            num_images=4)
    # only layers over [class, patches]: CrossViT's small branch, TNT's outer and T2T-ViT's backbone blocks, numbered
    # by the model's block (T2T-ViT's two tokens-to-token layers are not backbone blocks)
    assert numbers["attention_distance"]["layers"] == {"crossvit_9_240": [1], "tnt_s_patch16_224": [1, 2],
                                                       "t2t_vit_7": [1, 2]}[name]
    assert max(numbers["attention_distance"]["layer_mean"]) < 2 * numbers["attention_distance"]["uniform_reference"]
    kind = numbers["position_similarity"]["kind"]
    assert kind == ("sincos-1d" if name == "t2t_vit_7" else "learn")
