"""Swin's recorded window geometry agrees with what its attention layers actually computed, so that the
windowed rollout (vitlab.analysis.windows) reads the real model correctly; explain / analyze on Swin."""

from __future__ import annotations

import pytest
import torch

import vitlab
from vitlab.analysis import explain
from vitlab.analysis.explain_windows import capture_windowed
from vitlab.analysis.windows import window_attention_dense, window_index, window_rollout
from vitlab.layers import WindowAttention, capture_attention

from model_helpers import perturb_


def _shifted_swin(**over) -> torch.nn.Module:
    # 32 px, 2 px patches: a 16x16 map with window 4 and shift 2, then 8x8 (window 4, shift 2), then 4x4 (no shift)
    kw = dict(img_size=32, patch_size=2, embed_dim=16, depths=(2, 2, 2), num_heads=(2, 2, 2), window_size=4,
              num_classes=3)
    kw.update(over)
    return perturb_(vitlab.create_model("swin_tiny_patch4_window7_224", **kw)).eval()


def test_recorded_geometry_reproduces_every_blocks_attention_output() -> None:
    model = _shifted_swin()
    x = torch.randn(2, 3, 32, 32)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((i[0], o)))
             for m in model.modules() if isinstance(m, WindowAttention)]
    with torch.no_grad(), capture_attention(model) as maps:
        model(x)
    for h in hooks:
        h.remove()
    blocks = [m for m in model.analysis_modules() if hasattr(m, "last_geometry")]
    assert len(blocks) == len(maps) == len(seen) == 6
    assert [b.last_geometry.shift for b in blocks] == [(0, 0), (2, 2), (0, 0), (2, 2), (0, 0), (0, 0)]
    attn_layers = [m for m in model.modules() if isinstance(m, WindowAttention)]
    for block, a, (xw, yw), layer in zip(blocks, maps, seen, attn_layers):
        geom = block.last_geometry
        H, W = geom.size
        B, C = x.shape[0], xw.shape[-1]
        slots, inverse = window_index(geom)
        nwn = geom.num_windows * geom.window_area
        # tokens of the (unshifted) map, read back from the windows the layer was given
        x_map = xw.reshape(B, nwn, C)[:, inverse]  # (B, H*W, C)
        v = torch.nn.functional.linear(x_map, layer.qkv.weight[2 * C:], layer.qkv.bias[2 * C:])
        heads = layer.num_heads
        v = v.reshape(B, H * W, heads, C // heads).transpose(1, 2)  # (B, heads, HW, hd)
        dense = window_attention_dense(a, geom, renormalize=False)  # (B, heads, HW, HW)
        o = (dense @ v).transpose(1, 2).reshape(B, H * W, C)
        expected = layer.proj(o)
        got = yw.reshape(B, nwn, C)[:, inverse]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_windowed_rollout_on_swin_is_the_dense_rollout() -> None:
    model = _shifted_swin()
    x = torch.randn(1, 3, 32, 32)
    cap = capture_windowed(model, x)
    fast = window_rollout(cap.attentions, cap.steps)
    # dense: per block (mean over heads + I, renormalised), merges as equal splits; start = mean over final tokens
    r = None
    for step, a in _walk(cap):
        if a is None:  # merge: each parent's relevance split equally over its 4 children
            h, w = step.in_size
            r = r.reshape(1, h // 2, 1, w // 2, 1).expand(1, h // 2, 2, w // 2, 2).reshape(1, h * w) / 4
            continue
        A = window_attention_dense(a, step).mean(1)[0]
        A = A + torch.eye(A.shape[0])
        A = A / A.sum(-1, keepdim=True)
        r = (torch.full((1, A.shape[0]), 1.0 / A.shape[0]) if r is None else r) @ A
    torch.testing.assert_close(fast.reshape(1, -1), r, atol=1e-6, rtol=1e-5)


def _walk(cap):
    """(step, attention) from the last block back to the first; (merge, None) for merges."""
    it = iter(reversed(cap.attentions))
    out = []
    for step in reversed(cap.steps):
        out.append((step, next(it)) if hasattr(step, "window") else (step, None))
    return out


@pytest.mark.parametrize("method", ["auto", "rollout", "grad-rollout", "last-layer", "grad-cam", "grad-input"])
def test_explain_every_method_on_swin(method: str) -> None:
    model = _shifted_swin()
    x = torch.randn(2, 3, 32, 32)
    e = explain(model, x, method=method)
    assert e.maps.shape == (2, 32, 32) and torch.isfinite(e.maps).all()
    assert e.method == ("rollout" if method == "auto" else method)
