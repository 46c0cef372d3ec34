"""Explanations of attention-pooled ViTs (SigLIP's ``global_pool="map"``): the head reads the pool's weighted mix of
the patch tokens, so the rollouts weight the tokens' rows by the pool's attention and "last-layer" is that attention;
and ``pretrain --method mae`` on a name whose learned table has no class entry (DINOv2 with registers, DeiT III)
explains why the recipe's sin-cos table is refused."""

from __future__ import annotations

import logging

import pytest
import torch

import vitlab
from vitlab.analysis import capture, explain
from vitlab.analysis.rollout import attention_rollout, gradient_rollout
from vitlab.cli.main import main

torch.set_num_threads(1)


def _siglip(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    args = dict(depth=2, embed_dim=64, num_heads=2, img_size=32, num_classes=10, **kw)
    return vitlab.create_model("vit_base_patch16_siglip_224", **args).eval()


def _pool_attention(model, x: torch.Tensor) -> torch.Tensor:
    """(B, heads, patches): softmax(q(latent) . k(patch tokens) / sqrt(head_dim)), from the pool's parameters."""
    pool = model.attn_pool
    with torch.no_grad():
        tokens = model.forward_features(x)[:, model.num_prefix_tokens:]  # (B, N, D): the pool reads the patches
        B, N, D = tokens.shape
        h, hd = pool.num_heads, D // pool.num_heads
        q = (pool.latent[0, 0] @ pool.q.weight.T + pool.q.bias).reshape(h, hd)  # (heads, hd)
        k = (tokens @ pool.kv.weight[:D].T + pool.kv.bias[:D]).reshape(B, N, h, hd)  # keys: first D outputs
        return (torch.einsum("hd,bnhd->bhn", q, k) / hd**0.5).softmax(dim=-1)


def _sharpen(model) -> None:
    with torch.no_grad():
        model.attn_pool.latent.mul_(50.0)  # the pool attends almost only to one or two patches


def test_rollout_follows_the_attention_pool():
    """The tester's case: 4 patches, the pool's weights far from uniform; the map was the plain mean of the rows."""
    m = _siglip()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    before = explain(m, x, method="rollout").patch_maps
    _sharpen(m)
    after = explain(m, x, method="rollout").patch_maps
    assert not torch.allclose(before, after, atol=1e-3)  # the pool changed, and so does the map
    w = _pool_attention(m, x).mean(dim=1)  # (B, N): what the pool weighs, averaged over its heads
    assert (w - 0.25).abs().amax() > 0.2  # far from average pooling's 0.25 per patch
    joint = attention_rollout(capture(m, x).attentions, num_prefix_tokens=0)  # (B, N, N)
    want = torch.einsum("bq,bqk->bk", w, joint)
    torch.testing.assert_close(after.flatten(1), want, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(after.flatten(1), joint.mean(dim=1), atol=1e-3)
    assert explain(m, x, method="auto").method == "rollout"


def test_grad_rollout_weights_its_rows_by_the_pool():
    m = _siglip()
    _sharpen(m)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    e = explain(m, x, method="grad-rollout", target=3)
    out = capture(m, x, with_grad=True)
    grads = torch.autograd.grad(out.logits[:, 3].sum(), out.attentions)
    joint = gradient_rollout([a.detach() for a in out.attentions], [g.detach() for g in grads], num_prefix_tokens=0)
    want = torch.einsum("bq,bqk->bk", _pool_attention(m, x).mean(dim=1), joint)
    torch.testing.assert_close(e.patch_maps.flatten(1), want, atol=1e-5, rtol=1e-4)


def test_last_layer_is_the_pools_attention_fused_over_its_heads():
    m = _siglip()
    _sharpen(m)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    att = _pool_attention(m, x)  # (B, heads, N)
    for fusion, want in (("mean", att.mean(dim=1)), ("max", att.amax(dim=1))):
        e = explain(m, x, method="last-layer", head_fusion=fusion)
        torch.testing.assert_close(e.patch_maps.flatten(1), want, atol=1e-6, rtol=1e-5)


def test_prefix_tokens_take_no_part_in_the_pool():
    """A class token and registers precede the patches; the pool (as timm's) reads the patches only."""
    m = _siglip(class_token=True, reg_tokens=2)
    _sharpen(m)
    assert m.num_prefix_tokens == 3
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    out = capture(m, x)
    assert out.pool_attention is not None and out.pool_attention.shape == (1, 2, 4)
    joint = attention_rollout(out.attentions, num_prefix_tokens=3)  # (B, 7, 7)
    want = torch.einsum("bq,bqk->bk", _pool_attention(m, x).mean(dim=1), joint[:, 3:, 3:])
    torch.testing.assert_close(explain(m, x, method="rollout").patch_maps.flatten(1), want, atol=1e-5, rtol=1e-4)


def test_capturing_the_pool_leaves_the_output_unchanged():
    m = _siglip()
    _sharpen(m)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        fast = m(x)
    out = capture(m, x)
    torch.testing.assert_close(out.logits, fast, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.pool_attention, _pool_attention(m, x), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(explain(m, x, method="rollout").probs, fast.softmax(dim=-1), atol=1e-5, rtol=1e-5)
    # average pooling has no pool to capture and keeps the mean of the patch rows
    gap = vitlab.create_model("vit_base_patch16_siglip_gap_224", depth=1, embed_dim=32, num_heads=2, img_size=32,
                              num_classes=3).eval()
    assert capture(gap, x).pool_attention is None


# ------------------------------------------------------------------------------------------- MAE's refusal
@pytest.mark.parametrize("name", ["vit_small_patch14_reg4_dinov2", "deit3_small_patch16_224"])
def test_mae_on_a_table_without_class_entry_says_why_and_what_to_pass(name, tmp_path, caplog):
    base = ["pretrain", "--method", "mae", "--model", name, "--steps", "1", "--threads", "1", "--workers", "0",
            "--img-size", "16", "--batch-size", "8", "--no-progress", "--set", "global_batch=none",
            "--set", "model_overrides.depth=1", "--set", "model_overrides.embed_dim=32",
            "--set", "model_overrides.num_heads=2", "--set", "model_overrides.patch_size=4",
            "--opt", "decoder_dim=16", "--opt", "decoder_depth=1", "--opt", "decoder_heads=1"]
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main([*base, "--output", str(tmp_path / "a")]) == 2
    assert ("--method mae builds its backbone with pos_embed='sincos' (MAE's encoder has fixed 2-D sin-cos position "
            f"embeddings), which {name} cannot take: ") in caplog.text
    assert "no_embed_class=True" in caplog.text
    assert "Build it with --set model_overrides.pos_embed=learn instead" in caplog.text
    if name.startswith("vit_"):  # the fix it names works
        assert main([*base, "--set", "model_overrides.pos_embed=learn", "--output", str(tmp_path / "b")]) == 0


def test_maps_of_a_floored_grid_cover_only_the_pixels_its_patches_see():
    """drop_remainder (SigLIP so400m/14 at 384 px: 27 x 27 patches over 378 px): the map was stretched over the whole
    image, shifted by up to the remainder; it covers the patches' pixels, the rest 0."""
    from vitlab.analysis import explain
    from vitlab.analysis.rollout import relevance_to_image

    torch.manual_seed(0)
    m = vitlab.create_model("vit_base_patch16_siglip_224", img_size=36, patch_size=8, drop_remainder=True, depth=2,
                            embed_dim=32, num_heads=2, num_classes=3).eval()
    out = explain(m, torch.randn(1, 3, 36, 36), method="rollout")
    assert out.maps.shape == (1, 36, 36) and out.patch_maps.shape == (1, 4, 4)
    torch.testing.assert_close(out.maps[:, :32, :32], relevance_to_image(out.patch_maps.reshape(1, 16), (4, 4),
                                                                          (32, 32)))
    assert out.maps[:, 32:].abs().max() == 0 and out.maps[:, :, 32:].abs().max() == 0
