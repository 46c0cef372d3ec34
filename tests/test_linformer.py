"""Linformer attention as a ViT option: parity with the PyPI ``linformer`` package at module level, the
reduction to standard attention, the sharing modes, the sequence-length rule, and what the analysis
tools do with n x k maps.

The fixture comes from tests/fixtures/make_fixtures_linformer.py (linformer 0.2.3 in the peer env).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vitlab
from vitlab.analysis import capture, explain
from vitlab.analysis.explain import methods_for
from vitlab.layers import Attention, capture_attention
from vitlab.layers.linformer import LinformerAttention, resample_projection

FIX = Path(__file__).parent / "fixtures"
TOL = dict(atol=1e-5, rtol=1e-5)


def tiny_vit(**over) -> torch.nn.Module:
    kw = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=4, num_classes=3, attn_type="linformer",
              linformer_k=8)
    return vitlab.create_model("vit_tiny_patch16_224", **{**kw, **over})


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return load_file(FIX / "linformer_io.safetensors")


@pytest.mark.parametrize("mode", ["headwise", "kv"])
def test_module_parity_with_the_linformer_package(io, mode: str) -> None:
    ref = {k[len(mode) + 1:]: v for k, v in io.items() if k.startswith(mode + ".")}
    attn = LinformerAttention(32, seq_len=17, k=8, num_heads=4, sharing=mode, qkv_bias=False).eval()
    # the package projects AFTER its bias-free to_k / to_v, with (seq_len, k) matrices: E = proj_k^T
    v_weight = ref["to_k.weight"] if mode == "kv" else ref["to_v.weight"]  # share_kv also ties W_V to W_K
    sd = {"qkv.weight": torch.cat([ref["to_q.weight"], ref["to_k.weight"], v_weight]),
          "proj.weight": ref["to_out.weight"], "proj.bias": ref["to_out.bias"], "proj_e": ref["proj_k"].T}
    if mode == "headwise":
        sd["proj_f"] = ref["proj_v"].T
    attn.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(attn(io["x"]), ref["y"], **TOL)
        torch.testing.assert_close(attn(io["x_short"]), ref["y_short"], **TOL)  # shorter: E[:, :n'], as the package
        with capture_attention(attn) as maps:
            slow = attn(io["x"])
    torch.testing.assert_close(slow, ref["y"], **TOL)
    assert maps[0].shape == (2, 4, 17, 8) and maps.token_maps == [False]


def test_reduces_to_standard_attention_when_k_equals_n_and_projections_are_identity() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 17, 32)
    std = Attention(32, num_heads=4).eval()
    for mode in ("none", "headwise", "kv"):
        lin = LinformerAttention(32, seq_len=17, k=17, num_heads=4, sharing=mode).eval()
        sd = {k: v for k, v in std.state_dict().items()}
        for name, p in lin.named_parameters():
            if name.startswith("proj_"):
                sd[name] = torch.eye(17).expand_as(p).clone()
        lin.load_state_dict(sd)
        with torch.no_grad():
            torch.testing.assert_close(lin(x), std(x), atol=1e-6, rtol=1e-5)


def test_sharing_modes_own_the_paper_parameters() -> None:
    counts = {}
    for mode in ("none", "headwise", "kv", "layerwise"):
        m = tiny_vit(linformer_sharing=mode)
        proj = {n: tuple(p.shape) for n, p in m.named_parameters() if "proj_e" in n or "proj_f" in n
                or n == "linformer_proj"}
        counts[mode] = proj
        assert not m.token_attention
        assert m(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    n = 1 + 16
    assert counts["none"]["blocks.0.attn.proj_e"] == (4, 8, n)  # one E and F per head and layer
    assert set(counts["headwise"]) == {f"blocks.{i}.attn.proj_{x}" for i in (0, 1) for x in "ef"}
    assert set(counts["kv"]) == {"blocks.0.attn.proj_e", "blocks.1.attn.proj_e"}
    assert counts["layerwise"] == {"linformer_proj": (8, n)}
    m = tiny_vit(linformer_sharing="layerwise")
    assert all(b.attn.projections()[0] is m.linformer_proj for b in m.blocks)
    assert list(m.state_dict()).count("linformer_proj") == 1


def test_sequence_length_rule_and_resolution_change(tmp_path) -> None:
    attn = LinformerAttention(32, seq_len=17, k=8, num_heads=4)
    with pytest.raises(ValueError, match="longer than the 17"):
        attn(torch.randn(1, 18, 32))
    with pytest.raises(ValueError, match="dynamic_img_size is not supported"):
        tiny_vit(dynamic_img_size=True)
    # a checkpoint at 32 px (4x4 grid) loads at 48 px (6x6): the projections' patch columns are resampled
    m = tiny_vit()
    vitlab.save_model(m, tmp_path / "lin.safetensors")
    big = vitlab.load_model(tmp_path / "lin.safetensors", img_size=48)
    assert big.blocks[0].attn.proj_e.shape == (8, 37)
    assert torch.isfinite(big(torch.randn(1, 3, 48, 48))).all()
    e = torch.rand(8, 17)
    torch.testing.assert_close(resample_projection(e, (4, 4), old_grid=(4, 4)), e)
    r = resample_projection(e, (8, 8), old_grid=(4, 4))
    torch.testing.assert_close(r[:, :1], e[:, :1])  # the class token's column is kept
    torch.testing.assert_close(r[:, 1:].sum(-1), e[:, 1:].sum(-1), atol=1e-5, rtol=1e-4)  # mass kept


def test_capture_equals_fast_and_explain_falls_back_to_grad_cam() -> None:
    torch.manual_seed(0)
    m = tiny_vit(linformer_sharing="none").eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fast = m(x)
    out = capture(m, x)
    torch.testing.assert_close(out.logits, fast, atol=1e-5, rtol=1e-4)
    assert [a.shape for a in out.attentions] == [(2, 4, 17, 8)] * 2 and out.token_maps == (False, False)
    assert methods_for(m) == ("grad-cam", "grad-input")
    e = explain(m, x)
    assert e.method == "grad-cam" and e.maps.shape == (2, 32, 32) and torch.isfinite(e.maps).all()
    with pytest.raises(ValueError, match="not defined"):
        explain(m, x, method="rollout")


def test_analyze_reports_positions_but_not_attention_distance(tmp_path) -> None:
    from torch.utils.data import TensorDataset

    from vitlab.analysis.analyze import analyze_model

    m = tiny_vit().eval()
    data = TensorDataset(torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2]))
    numbers = analyze_model(m, data, tmp_path, num_images=3)
    assert numbers["attention_distance"] is None
    assert "Linformer" in numbers["attention_distance_not_applicable"]
    assert numbers["position_similarity"]["kind"] == "learn"  # the learned table is still there


@pytest.mark.parametrize("mode", ["none", "headwise", "kv", "layerwise"])
def test_backward_reaches_every_parameter_and_checkpoints_round_trip(tmp_path, mode: str) -> None:
    m = tiny_vit(linformer_sharing=mode).train()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    m(torch.randn(2, 3, 32, 32)).square().sum().backward()
    assert not [n for n, p in m.named_parameters() if p.grad is None or not p.grad.any()]
    vitlab.save_model(m.eval(), tmp_path / "m.safetensors")
    again = vitlab.load_model(tmp_path / "m.safetensors").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x), m(x))
    assert again.cfg.linformer_sharing == mode and not again.token_attention
