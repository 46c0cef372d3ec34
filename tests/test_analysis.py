"""Pure-tensor analysis functions: rollout, attention distance, position similarity, filters, few-shot."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from vitlab.analysis import (
    attention_rollout,
    discard_lowest,
    fewshot_evaluate,
    filter_components,
    fuse_heads,
    knn_accuracy,
    linear_accuracy,
    mean_attention_distance,
    position_similarity,
    ridge_classifier,
    token_relevance,
)
from vitlab.analysis.distance import AttentionDistanceMeter

# --------------------------------------------------------------------------------------------- rollout


def _identity_attn(B: int, H: int, N: int) -> torch.Tensor:
    return torch.eye(N).expand(B, H, N, N).clone()


def test_rollout_of_identity_is_identity() -> None:
    attns = [_identity_attn(2, 3, 5) for _ in range(4)]
    for fusion in ("mean", "max", "min"):
        joint = attention_rollout(attns, head_fusion=fusion)
        torch.testing.assert_close(joint, torch.eye(5).expand(2, 5, 5))


@pytest.mark.parametrize("use_class_token", [True, False])
def test_rollout_of_uniform_attention_gives_a_uniform_map(use_class_token: bool) -> None:
    N, p = 10, 1
    attns = [torch.full((2, 4, N, N), 1.0 / N) for _ in range(3)]
    joint = attention_rollout(attns)
    torch.testing.assert_close(joint.sum(-1), torch.ones(2, N))
    rel = token_relevance(joint, num_prefix_tokens=p, use_class_token=use_class_token)
    assert rel.shape == (2, N - p)
    torch.testing.assert_close(rel, rel[:, :1].expand_as(rel))  # every patch equally relevant
    assert float(rel.min()) > 0


def test_rollout_two_layers_by_hand() -> None:
    a1 = torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8]])
    a2 = torch.tensor([[0.2, 0.4, 0.4], [0.3, 0.3, 0.4], [0.5, 0.25, 0.25]])
    joint = attention_rollout([a1[None, None], a2[None, None]])[0]
    # (A + I) renormalised is 0.5 A + 0.5 I for row-stochastic A; the rollout is hat(A2) @ hat(A1).
    h1, h2 = 0.5 * a1.numpy() + 0.5 * np.eye(3), 0.5 * a2.numpy() + 0.5 * np.eye(3)
    np.testing.assert_allclose(joint.numpy(), h2 @ h1, atol=1e-6)
    # the class token's row, worked out on paper:
    # 0.6*[.75,.125,.125] + 0.2*[.1,.8,.1] + 0.2*[.05,.05,.9] = [.48, .245, .275]
    np.testing.assert_allclose(joint[0].numpy(), [0.48, 0.245, 0.275], atol=1e-6)
    rel = token_relevance(joint[None], num_prefix_tokens=1, use_class_token=True)
    np.testing.assert_allclose(rel[0].numpy(), [0.245, 0.275], atol=1e-6)


def test_head_fusion() -> None:
    a = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(fuse_heads(a, "mean"), a.mean(1))
    torch.testing.assert_close(fuse_heads(a, "max"), a.max(1).values)
    torch.testing.assert_close(fuse_heads(a, "min"), a.min(1).values)
    with pytest.raises(ValueError, match="head_fusion"):
        fuse_heads(a, "median")


def test_discard_ratio_zeroes_the_lowest_and_keeps_the_class_column() -> None:
    torch.manual_seed(1)
    B, N, p, r = 2, 7, 1, 0.4
    a = torch.rand(B, N, N).softmax(-1)
    out = discard_lowest(a, r, num_prefix_tokens=p)
    k = int(r * N * (N - p))
    for b in range(B):
        zeroed = out[b] == 0
        assert int(zeroed.sum()) == k
        assert not zeroed[:, :p].any()  # attention to the class token survives
        kept = a[b][:, p:][~zeroed[:, p:]]
        dropped = a[b][zeroed]
        assert float(dropped.max()) <= float(kept.min())  # exactly the lowest were dropped
        torch.testing.assert_close(out[b][~zeroed], a[b][~zeroed])
    torch.testing.assert_close(discard_lowest(a, 0.0), a)
    with pytest.raises(ValueError, match="discard_ratio"):
        discard_lowest(a, 1.0)


def test_discard_ratio_changes_rollout_but_rows_stay_stochastic() -> None:
    a = [torch.rand(1, 2, 6, 6).softmax(-1) for _ in range(3)]
    j0 = attention_rollout(a)
    j9 = attention_rollout(a, discard_ratio=0.9)
    torch.testing.assert_close(j9.sum(-1), torch.ones(1, 6))
    assert not torch.allclose(j0, j9)


# ------------------------------------------------------------------------------ mean attention distance


def _analytic_mean_pairwise(grid: tuple[int, int], patch: tuple[int, int]) -> float:
    pts = [(r * patch[0], c * patch[1]) for r in range(grid[0]) for c in range(grid[1])]
    d = [math.dist(p, q) for p, q in itertools.product(pts, pts)]
    return float(np.mean(d))


@pytest.mark.parametrize("grid,patch,prefix", [((4, 4), (16, 16), 1), ((3, 5), (8, 4), 0), ((2, 3), (7, 7), 2)])
def test_mean_attention_distance_uniform_equals_mean_pairwise(grid, patch, prefix) -> None:
    N = prefix + grid[0] * grid[1]
    attn = torch.full((3, 2, N, N), 1.0 / N)
    d = mean_attention_distance(attn, grid, patch, num_prefix_tokens=prefix)
    assert d.shape == (3, 2)
    np.testing.assert_allclose(d.numpy(), _analytic_mean_pairwise(grid, patch), rtol=1e-5)


def test_mean_attention_distance_self_attention_is_zero() -> None:
    grid, p = (4, 3), 1
    N = p + 12
    attn = torch.eye(N).expand(2, 3, N, N)
    d = mean_attention_distance(attn, grid, (16, 16), num_prefix_tokens=p)
    torch.testing.assert_close(d, torch.zeros(2, 3))


def test_mean_attention_distance_neighbour_head_and_meter() -> None:
    # head 0: each patch attends to the patch to its right (last column to itself) -> known distance
    grid, patch = (2, 4), (10, 10)
    n = 8
    a = torch.zeros(1, 2, n, n)
    for i in range(n):
        r, c = divmod(i, 4)
        a[0, 0, i, r * 4 + min(c + 1, 3)] = 1.0
        a[0, 1, i, i] = 1.0
    d = mean_attention_distance(a, grid, patch, num_prefix_tokens=0)
    np.testing.assert_allclose(d[0].numpy(), [10.0 * 6 / 8, 0.0], atol=1e-6)
    meter = AttentionDistanceMeter()
    meter.update([a, a], grid, patch)
    meter.update([a.flip(1), a.flip(1)], grid, patch)
    np.testing.assert_allclose(meter.compute().numpy(), [[3.75, 3.75]] * 2, atol=1e-6)
    with pytest.raises(ValueError, match="prefix"):
        mean_attention_distance(a, (3, 3), patch, num_prefix_tokens=0)


# ----------------------------------------------------------------------------------- position similarity


def test_position_similarity_unit_diagonal_and_symmetric() -> None:
    table = torch.randn(20, 16) * 3
    sim = position_similarity(table)
    torch.testing.assert_close(sim.diagonal(), torch.ones(20))
    torch.testing.assert_close(sim, sim.T)
    assert float(sim.abs().max()) <= 1 + 1e-6


# ------------------------------------------------------------------------------------------- filters


def test_filter_components_orthonormal_and_match_sklearn_pca() -> None:
    from sklearn.decomposition import PCA

    w = torch.randn(64, 3, 4, 4) @ torch.diag(torch.linspace(0.1, 2, 4))  # anisotropic, so PCs are unique
    fc = filter_components(w, k=10)
    assert fc.components.shape == (10, 3, 4, 4)
    v = fc.components.reshape(10, -1).double()
    torch.testing.assert_close(v @ v.T, torch.eye(10, dtype=torch.float64), atol=1e-5, rtol=0)
    pca = PCA(n_components=10, svd_solver="full").fit(w.reshape(64, -1).numpy())
    np.testing.assert_allclose(np.abs(v.numpy() @ pca.components_.T).diagonal(), 1.0, atol=1e-4)  # same up to sign
    np.testing.assert_allclose(fc.explained_variance_ratio.numpy(), pca.explained_variance_ratio_, rtol=1e-4)


# ------------------------------------------------------------------------------------------- few-shot


def _separable(n_per_class: int, K: int, dim: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(K, dim, generator=torch.Generator().manual_seed(123)) * 5
    y = torch.arange(K).repeat_interleave(n_per_class)
    x = centres[y] + 0.3 * torch.randn(len(y), dim, generator=g)
    return x, y


def test_fewshot_separable_features_reach_100_percent() -> None:
    K = 5
    tx, ty = _separable(30, K, 48, seed=0)
    vx, vy = _separable(40, K, 48, seed=1)
    res = fewshot_evaluate(tx, ty, vx, vy, num_classes=K, shots=(1, 5, 25), seeds=3)
    assert [r.shots for r in res] == [1, 5, 25]
    for r in res:
        assert r.linear_mean == 1.0 and r.linear_std == 0.0
        assert r.knn_mean == 1.0
        assert len(r.linear) == 3


def test_fewshot_random_labels_stay_near_chance() -> None:
    K = 4
    g = torch.Generator().manual_seed(0)
    tx, ty = torch.randn(400, 32, generator=g), torch.randint(0, K, (400,), generator=g)
    vx, vy = torch.randn(2000, 32, generator=g), torch.randint(0, K, (2000,), generator=g)
    res = fewshot_evaluate(tx, ty, vx, vy, num_classes=K, shots=(1, 10, 25), seeds=4)
    for r in res:
        assert abs(r.linear_mean - 1 / K) < 0.06, r
        assert abs(r.knn_mean - 1 / K) < 0.06, r


def test_ridge_matches_sklearn_ridge_on_standardised_features() -> None:
    from sklearn.linear_model import Ridge

    K = 3
    g = torch.Generator().manual_seed(0)
    for n, dim in ((12, 40), (60, 8)):  # dual and primal solves
        x, y = torch.randn(n, dim, generator=g), torch.arange(n) % K
        z = torch.randn(50, dim, generator=g)
        pred = ridge_classifier(x, y, K, l2_reg=2.0)(z)
        xs = ((x - x.mean(0)) / x.std(0, unbiased=False)).numpy()
        zs = ((z - x.mean(0)) / x.std(0, unbiased=False)).numpy()
        targets = 2 * np.eye(K)[y.numpy()] - 1
        ref = Ridge(alpha=2.0, fit_intercept=True).fit(xs, targets).predict(zs).argmax(1)
        np.testing.assert_array_equal(pred.numpy(), ref)


def test_knn_votes_and_linear_accuracy() -> None:
    train_x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    train_y = torch.tensor([0, 0, 1])
    test_x = torch.tensor([[0.2, 1.0], [1.0, 0.05]])
    test_y = torch.tensor([1, 0])
    assert knn_accuracy(train_x, train_y, test_x, test_y, 2, k=1) == 1.0
    # with k=3 every query sees two votes for class 0
    assert knn_accuracy(train_x, train_y, test_x, test_y, 2, k=3) == 0.5
    assert linear_accuracy(train_x, train_y, test_x, test_y, 2) == 1.0


def test_fewshot_refuses_too_few_examples() -> None:
    x, y = torch.randn(6, 4), torch.tensor([0, 0, 0, 1, 1, 1])
    with pytest.raises(ValueError, match="fewer than 5 shots"):
        fewshot_evaluate(x, y, x, y, num_classes=2, shots=(5,), seeds=1)


def test_class_pool_takes_per_class_samples() -> None:
    from vitlab.analysis.fewshot import class_pool

    targets = [0] * 10 + [1] * 3 + [2] * 7
    idx = class_pool(targets, 4, seed=1)
    got = [targets[i] for i in idx]
    assert got.count(0) == 4 and got.count(1) == 3 and got.count(2) == 4
    assert idx == sorted(set(idx)) and class_pool(targets, 4, seed=1) == idx
