"""Capture and relevance maps on real (tiny) models: parity with the fast path, any resolution, any variant."""

from __future__ import annotations

import pytest
import torch

import vitlab
from vitlab.analysis import attention_blocks, capture, explain, fuse_heads
from vitlab.analysis.explain import methods_for
from vitlab.layers import CapturableAttention

from model_helpers import input_for, make_tiny, perturb_

ATTENTION_MODELS = [n for n in vitlab.list_models() if vitlab.get_entry(n).family != "resnet"]


def _tiny_vit(**over) -> torch.nn.Module:
    kw = {"depth": 2, "embed_dim": 64, "num_heads": 4, "img_size": 32, "num_classes": 3, "patch_size": 8}
    kw.update(over)
    return perturb_(vitlab.create_model("vit_tiny_patch16_224", **kw)).eval()


@pytest.mark.parametrize("name", ATTENTION_MODELS)
def test_capture_equals_fast_path_for_every_registered_model(name: str) -> None:
    model = perturb_(make_tiny(name)).eval()
    x = input_for(model)
    with torch.no_grad():
        fast = model(x)
        feats = model.forward_features(x)
    out = capture(model, x)
    torch.testing.assert_close(out.logits, fast, atol=1e-5, rtol=1e-4)
    depth = len(attention_blocks(model))
    assert len(out.attentions) == depth and len(out.tokens) == depth
    n = model.num_prefix_tokens + out.layout.num_patches
    one_sequence = getattr(model, "token_attention", False)  # multi-scale families change the token count
    for a in out.attentions:
        assert a.shape[0] == x.shape[0] and (not one_sequence or a.shape[-1] in (n, out.layout.num_patches))
        torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]))
    if vitlab.get_entry(name).family in ("vit", "deit"):
        assert all(a.shape == (x.shape[0], model.cfg.num_heads, n, n) for a in out.attentions)
        torch.testing.assert_close(model.norm(out.tokens[-1]), feats, atol=1e-5, rtol=1e-4)
    assert all(m.attn_sink is None for m in model.modules() if isinstance(m, CapturableAttention))
    # every method gives a finite map on every family (CaiT: patch-only and class-attention layers)
    for method in [m for m in ("rollout", "grad-rollout", "last-layer") if m in methods_for(model)]:
        e = explain(model, x, method=method)
        assert e.maps.shape == (x.shape[0], *x.shape[-2:]) and torch.isfinite(e.maps).all()


def test_capture_tokens_match_forward_intermediates() -> None:
    model = _tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    out = capture(model, x)
    with torch.no_grad():
        _, inter = model.forward_intermediates(x)
    for t, i in zip(out.tokens, inter):
        torch.testing.assert_close(t[:, 1:], i)


def test_capture_with_dynamic_img_size_at_other_resolutions() -> None:
    model = _tiny_vit(dynamic_img_size=True)
    for h, w in ((32, 32), (48, 40), (16, 24)):
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            fast = model(x)
        out = capture(model, x)
        torch.testing.assert_close(out.logits, fast, atol=1e-5, rtol=1e-4)
        assert out.layout.grid == (h // 8, w // 8)
        n = 1 + (h // 8) * (w // 8)
        assert out.attentions[0].shape == (2, 4, n, n)
        e = explain(model, x)
        assert e.maps.shape == (2, h, w) and e.patch_maps.shape == (2, h // 8, w // 8)


def test_capture_of_a_checkpoint_loaded_at_another_resolution(tmp_path) -> None:
    model = _tiny_vit()
    vitlab.save_model(model, tmp_path / "m.safetensors", class_names=["a", "b", "c"])
    big = vitlab.load_model(tmp_path / "m.safetensors", img_size=48).eval()
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        fast = big(x)
    out = capture(big, x)
    torch.testing.assert_close(out.logits, fast, atol=1e-5, rtol=1e-4)
    assert out.layout.grid == (6, 6)


def test_grad_rollout_differs_between_classes_and_rollout_does_not() -> None:
    model = _tiny_vit()
    x = torch.randn(1, 3, 32, 32)
    g0 = explain(model, x, method="grad-rollout", target=0)
    g1 = explain(model, x, method="grad-rollout", target=1)
    assert g0.target.tolist() == [0] and g1.target.tolist() == [1]
    assert (g0.maps - g1.maps).abs().max() > 1e-4 * g0.maps.abs().max()
    r0 = explain(model, x, method="rollout", target=0)
    r1 = explain(model, x, method="rollout", target=1)
    torch.testing.assert_close(r0.maps, r1.maps)
    assert all(p.grad is None for p in model.parameters())  # explaining does not leave gradients behind


def test_last_layer_map_is_the_class_token_row_of_the_last_attention() -> None:
    model = _tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    out = capture(model, x)
    e = explain(model, x, method="last-layer", head_fusion="max")
    expected = fuse_heads(out.attentions[-1], "max")[:, 0, 1:].reshape(2, 4, 4)
    torch.testing.assert_close(e.patch_maps, expected)
    torch.testing.assert_close(e.probs, out.logits.softmax(-1))


def test_pooled_model_without_class_token_uses_mean_over_queries() -> None:
    model = _tiny_vit(class_token=False, global_pool="avg")
    x = torch.randn(1, 3, 32, 32)
    out = capture(model, x)
    assert out.layout.num_prefix_tokens == 0
    e = explain(model, x, method="last-layer")
    torch.testing.assert_close(e.patch_maps, out.attentions[-1].mean(1).mean(1).reshape(1, 4, 4))


def test_explain_keeps_training_mode_and_rejects_bad_input() -> None:
    model = _tiny_vit().train()
    explain(model, torch.randn(1, 3, 32, 32))
    assert model.training
    with pytest.raises(ValueError, match="method"):
        explain(model, torch.randn(1, 3, 32, 32), method="saliency")
    with pytest.raises(ValueError, match="out of range"):
        explain(model, torch.randn(1, 3, 32, 32), method="grad-rollout", target=7)
    cnn = vitlab.create_model("resnet18", num_classes=3)
    with pytest.raises(ValueError, match="no attention"):
        capture(cnn, torch.randn(1, 3, 32, 32))


def test_position_table_drops_the_class_token_entry_and_names_its_kind() -> None:
    from vitlab.analysis import position_similarity, position_table

    model = _tiny_vit()
    pt = position_table(model)
    assert pt.kind == "learn" and pt.grid == (4, 4)
    torch.testing.assert_close(pt.table, model.pos_embed[0, 1:].detach())  # entry 0 is the class token's
    sincos = position_table(_tiny_vit(pos_embed="sincos"))
    assert sincos.kind == "sincos" and sincos.table.shape == (16, 64)
    sim = position_similarity(sincos.table).reshape(16, 4, 4)
    # a fixed 2-D table encodes topology: position (1, 1) is more like its neighbour than the far corner
    assert sim[5, 1, 2] > sim[5, 3, 3]
    assert position_table(_tiny_vit(pos_embed="none")) is None
    assert position_table(vitlab.create_model("resnet18", num_classes=3)) is None


def test_rollout_through_cait_class_attention_reaches_the_patches() -> None:
    from vitlab.analysis import attention_rollout, embed_square

    model = perturb_(make_tiny("cait_xxs24_224")).eval()
    x = input_for(model)
    out = capture(model, x)
    n = out.layout.num_patches
    kinds = {tuple(a.shape[-2:]) for a in out.attentions}
    assert kinds == {(n, n), (1, n + 1)}  # patch-only self-attention, then class attention
    joint = attention_rollout(out.attentions, num_prefix_tokens=1)
    torch.testing.assert_close(joint.sum(-1), torch.ones(x.shape[0], n + 1))
    assert float(joint[:, 0, 1:].sum(-1).min()) > 0.1  # the class token draws on the patches
    with pytest.raises(ValueError, match="windowed"):
        embed_square(torch.rand(1, 3, 3), 5, num_prefix_tokens=1)


def test_analyze_model_on_cait_and_a_model_without_positions(tmp_path) -> None:
    from torch.utils.data import TensorDataset

    from vitlab.analysis.analyze import analyze_model

    cait = perturb_(make_tiny("cait_xxs24_224")).eval()
    c, h, w = cait.preprocessing.input_size
    data = TensorDataset(torch.randn(6, c, h, w), torch.arange(6) % 5)
    numbers = analyze_model(cait, data, tmp_path / "cait", num_images=6, batch_size=4)
    assert numbers["attention_distance"]["layers"] == [1, 2]  # the class-attention layers have no patch queries
    assert numbers["num_images"] == 6
    nopos = _tiny_vit(pos_embed="none")
    data = TensorDataset(torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2]))
    numbers = analyze_model(nopos, data, tmp_path / "nopos", num_images=3)
    assert numbers["position_similarity"] is None
    assert "no position embeddings" in (tmp_path / "nopos" / "report.html").read_text()
    assert not (tmp_path / "nopos" / "position_similarity.png").exists()


def test_auto_method_is_rollout_for_token_attention_and_recorded() -> None:
    model = _tiny_vit()
    e = explain(model, torch.randn(1, 3, 32, 32))
    assert e.method == "rollout"
    ref = explain(model, torch.zeros(1, 3, 32, 32) + 0.0, method="rollout")
    assert ref.method == "rollout"


def test_grad_cam_on_a_linear_feature_map_is_the_class_weighted_map() -> None:
    # a head that reads the mean of an NCHW map: Grad-CAM's channel weights are the head's class row / (h*w),
    # so the map is relu(sum_c w_c * f_c) / (h*w)
    class GapNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 4, stride=4)
            self.head = torch.nn.Linear(4, 3)

        def cam_layer(self):
            return self.conv

        def forward_head(self, f, pre_logits=False):
            return self.head(f.mean(dim=(2, 3)))

        def forward(self, x):
            return self.forward_head(self.conv(x))

    torch.manual_seed(0)
    net = GapNet().eval()
    x = torch.randn(2, 3, 16, 16)
    e = explain(net, x, method="grad-cam", target=1)
    f = net.conv(x).detach()
    expected = (net.head.weight[1].detach()[None, :, None, None] * f).sum(1).clamp(min=0) / 16
    torch.testing.assert_close(e.patch_maps, expected, atol=1e-6, rtol=1e-5)
    assert e.maps.shape == (2, 16, 16) and e.method == "grad-cam"
    with pytest.raises(ValueError, match="not defined for GapNet"):
        explain(net, x, method="rollout")
    assert explain(net, x).method == "grad-cam"  # auto falls back to Grad-CAM


def test_grad_input_of_a_linear_model_is_weight_times_input() -> None:
    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 2))
    x = torch.randn(1, 3, 4, 4)
    e = explain(lin, x, method="grad-input", target=0)
    w = lin[1].weight[0].detach().reshape(3, 4, 4)
    torch.testing.assert_close(e.maps[0], (w * x[0]).sum(0).abs())


@pytest.mark.parametrize("method", ["grad-cam", "grad-input"])
def test_gradient_methods_work_on_every_vit_and_depend_on_the_class(method: str) -> None:
    model = _tiny_vit()
    x = torch.randn(1, 3, 32, 32)
    a = explain(model, x, method=method, target=0).maps
    b = explain(model, x, method=method, target=1).maps
    assert a.shape == (1, 32, 32) and torch.isfinite(a).all()
    assert not torch.allclose(a, b)
