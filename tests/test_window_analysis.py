"""Windowed attention in image space: propagation equals the dense definition, distances by hand, a toy
two-stage windowed model honouring the contract of vitlab.analysis.explain_windows."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from vitlab.analysis import explain
from vitlab.analysis.explain import _EXPLAINERS
from vitlab.analysis.explain_windows import capture_windowed, explain_windowed, register_windowed
from vitlab.analysis.rollout import attention_rollout, fuse_heads, gradient_rollout, token_relevance
from vitlab.analysis.windows import (
    MergeStep,
    WindowDistanceMeter,
    analysis_steps,
    drop_padded_keys,
    propagate_through_merge,
    propagate_through_window,
    stage_of_blocks,
    token_strides,
    window_attention_dense,
    window_attention_distance,
    window_gradient_rollout,
    window_index,
    window_last_layer,
    window_rollout,
)
from vitlab.layers import CapturableAttention, attend_explicit, capture_attention
from vitlab.layers.window_geometry import WindowGeometry

DT = torch.float64


def geometry(H: int, W: int, window: int, shift: int) -> WindowGeometry:
    """A block's geometry as Swin lays it: window clamped to small maps (no shift then), padded up."""
    wh, ww = min(window, H), min(window, W)
    sh = shift if H > window else 0
    sw = shift if W > window else 0
    return WindowGeometry(size=(H, W), padded=(math.ceil(H / wh) * wh, math.ceil(W / ww) * ww),
                          window=(wh, ww), shift=(sh, sw))


def partition(x: Tensor, geom: WindowGeometry) -> Tensor:
    """(B, H, W, C) -> (B*nW, N, C) by roll (-sh, -sw), pad bottom/right, windows row-major."""
    B, H, W, C = x.shape
    (Hp, Wp), (wh, ww), (sh, sw) = geom.padded, geom.window, geom.shift
    x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
    x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))
    x = x.reshape(B, Hp // wh, wh, Wp // ww, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B * geom.num_windows, wh * ww, C)


def reverse(windows: Tensor, geom: WindowGeometry, B: int) -> Tensor:
    """(B*nW, N, C) -> (B, H, W, C): the inverse of :func:`partition`."""
    (H, W), (Hp, Wp), (wh, ww), (sh, sw) = geom.size, geom.padded, geom.window, geom.shift
    C = windows.shape[-1]
    x = windows.reshape(B, Hp // wh, Wp // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
    return torch.roll(x[:, :H, :W], shifts=(sh, sw), dims=(1, 2))


def random_attention(B: int, heads: int, geom: WindowGeometry, *, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B * geom.num_windows, heads, geom.window_area, geom.window_area, generator=g, dtype=DT)
    return (2 * logits).softmax(dim=-1)


def renorm_plus_identity(a: Tensor) -> Tensor:
    a = a + torch.eye(a.shape[-1], dtype=a.dtype)
    return a / a.sum(dim=-1, keepdim=True)


def merge_matrix(in_size: tuple[int, int]) -> Tensor:
    """(h*w, H*W): merged token -> its existing children, equal shares."""
    H, W = in_size
    h, w = (H + 1) // 2, (W + 1) // 2
    m = torch.zeros(h * w, H * W, dtype=DT)
    for i in range(h):
        for j in range(w):
            kids = [(a, b) for a in (2 * i, 2 * i + 1) for b in (2 * j, 2 * j + 1) if a < H and b < W]
            for a, b in kids:
                m[i * w + j, a * W + b] = 1.0 / len(kids)
    return m


def dense_relevance(layers: list[Tensor | None], steps, *, add_identity: bool = True) -> Tensor:
    """Mean row of the product of the per-step dense matrices (blocks: (B, HW, HW), None = identity)."""
    mats = []
    i = 0
    for s in steps:
        if isinstance(s, MergeStep):
            mats.append(merge_matrix(s.in_size))
        else:
            a = layers[i]
            i += 1
            if a is not None:
                mats.append(renorm_plus_identity(a) if add_identity else a)
    joint = mats[0]
    for m in mats[1:]:
        joint = m @ joint  # later steps act on the output of earlier ones
    return joint.mean(dim=-2)  # (B, H0*W0): the mean over the final tokens, what the pooled head reads


GEOMETRIES = [
    geometry(8, 8, 4, 0),  # plain
    geometry(8, 8, 4, 2),  # shifted
    geometry(6, 6, 4, 0),  # padded
    geometry(6, 6, 4, 2),  # padded and shifted
    WindowGeometry(size=(5, 7), padded=(6, 9), window=(2, 3), shift=(1, 2)),  # rectangular windows
    geometry(3, 3, 7, 3),  # window clamped to the map
]


# ------------------------------------------------------------------------------------------------ pure functions


@pytest.mark.parametrize("geom", GEOMETRIES, ids=str)
def test_window_index_matches_roll_pad_partition(geom: WindowGeometry) -> None:
    H, W = geom.size
    ids = torch.arange(H * W, dtype=DT).reshape(1, H, W, 1) + 1  # 0 marks the padding
    windows = partition(ids, geom).reshape(-1).long() - 1
    slots, inverse = window_index(geom)
    assert torch.equal(slots, windows)
    assert torch.equal(slots[inverse], torch.arange(H * W))
    back = reverse(partition(ids, geom), geom, 1)
    assert torch.equal(back, ids)  # the test's own partition is the inverse of its reverse
    as_lists = WindowGeometry(size=list(geom.size), padded=list(geom.padded), window=list(geom.window),
                              shift=list(geom.shift))  # a model may record lists: still one cached index
    assert torch.equal(window_index(as_lists)[0], slots)


@pytest.mark.parametrize("geom", GEOMETRIES, ids=str)
def test_dense_matrix_matches_a_loop_over_windows(geom: WindowGeometry) -> None:
    B, heads = 2, 3
    attn = random_attention(B, heads, geom)
    dense = window_attention_dense(attn, geom)
    H, W = geom.size
    slots, _ = window_index(geom)
    nW, N = geom.num_windows, geom.window_area
    expected = torch.zeros(B, heads, H * W, H * W, dtype=DT)
    for b in range(B):
        for w in range(nW):
            pos = slots[w * N:(w + 1) * N].tolist()
            a = attn[b * nW + w]  # (heads, N, N)
            real = [k for k in range(N) if pos[k] >= 0]
            for q in real:
                row = a[:, q, real]
                expected[b, :, pos[q], [pos[k] for k in real]] = row / row.sum(-1, keepdim=True)
    torch.testing.assert_close(dense, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(dense.sum(-1), torch.ones(B, heads, H * W, dtype=DT))


@pytest.mark.parametrize("geom", GEOMETRIES, ids=str)
@pytest.mark.parametrize("add_identity", [True, False])
def test_propagate_through_window_equals_dense(geom: WindowGeometry, add_identity: bool) -> None:
    B = 2
    fused = drop_padded_keys(random_attention(B, 1, geom), geom)[:, 0]  # (B*nW, N, N)
    H, W = geom.size
    r = torch.rand(B, H * W, dtype=DT, generator=torch.Generator().manual_seed(1))
    got = propagate_through_window(r, fused, geom, add_identity=add_identity)
    dense = window_attention_dense(fused[:, None], geom)[:, 0]  # (B, HW, HW)
    a = renorm_plus_identity(dense) if add_identity else dense
    expected = (r[:, None] @ a)[:, 0]
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    if add_identity:  # row-stochastic: the total relevance is kept
        torch.testing.assert_close(got.sum(-1), r.sum(-1))


@pytest.mark.parametrize("size", [(6, 6), (7, 5), (3, 1), (1, 1), (4, 9)])
def test_propagate_through_merge_equals_the_split_matrix(size: tuple[int, int]) -> None:
    H, W = size
    n = ((H + 1) // 2) * ((W + 1) // 2)
    r = torch.rand(3, n, dtype=DT)
    got = propagate_through_merge(r, size)
    torch.testing.assert_close(got, r @ merge_matrix(size), atol=1e-15, rtol=0)
    torch.testing.assert_close(got.sum(-1), r.sum(-1))
    with pytest.raises(ValueError, match="propagate_through_merge"):
        propagate_through_merge(torch.rand(3, n + 1), size)


def test_merge_of_an_odd_map_by_hand() -> None:
    # 3x3 -> 2x2: token (0,0) has 4 children, (0,1) and (1,0) two, (1,1) only the corner (2,2)
    r = torch.tensor([[4.0, 2.0, 6.0, 1.0]], dtype=DT)
    got = propagate_through_merge(r, (3, 3)).reshape(3, 3)
    expected = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [3.0, 3.0, 1.0]], dtype=DT)
    torch.testing.assert_close(got, expected)


# a 3-stage chain: shifted, padded (6x6 map, window 4), an even and an odd merge, a clamped last window
STEPS = [
    geometry(6, 6, 4, 0), geometry(6, 6, 4, 2), MergeStep((6, 6)),
    geometry(3, 3, 2, 0), geometry(3, 3, 2, 1), MergeStep((3, 3)),
    geometry(2, 2, 4, 2),
]
HEADS = [2, 2, 3, 3, 4]


def _attentions(B: int, seed: int = 0) -> list[Tensor]:
    blocks = [s for s in STEPS if isinstance(s, WindowGeometry)]
    return [random_attention(B, h, g, seed=seed + i) for i, (h, g) in enumerate(zip(HEADS, blocks))]


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
def test_window_rollout_equals_dense_rollout(fusion: str) -> None:
    B = 2
    attns = _attentions(B)
    blocks = [s for s in STEPS if isinstance(s, WindowGeometry)]
    got = window_rollout(attns, STEPS, head_fusion=fusion)
    assert got.shape == (B, 6, 6) and got.dtype == DT
    dense = [fuse_heads(window_attention_dense(a, g), fusion) for a, g in zip(attns, blocks)]
    expected = dense_relevance(dense, STEPS).reshape(B, 6, 6)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(got.sum(dim=(1, 2)), torch.ones(B, dtype=DT))  # rows stay stochastic
    # in float32 the same to 1e-6
    got32 = window_rollout([a.float() for a in attns], STEPS, head_fusion=fusion)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), expected, atol=1e-6, rtol=0)


def test_window_gradient_rollout_equals_dense() -> None:
    B = 2
    attns = _attentions(B)
    grads = [torch.randn(a.shape, dtype=DT, generator=torch.Generator().manual_seed(10 + i))
             for i, a in enumerate(attns)]
    blocks = [s for s in STEPS if isinstance(s, WindowGeometry)]
    got = window_gradient_rollout(attns, grads, STEPS)
    dense = [window_attention_dense(a * g, geom, renormalize=False).clamp(min=0).mean(1)
             for a, g, geom in zip(attns, grads, blocks)]
    expected = dense_relevance(dense, STEPS).reshape(B, 6, 6)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    other = window_gradient_rollout(attns, [-g for g in grads], STEPS)
    assert (other - got).abs().max() > 1e-3


def test_window_last_layer_equals_dense() -> None:
    B = 2
    attns = _attentions(B)
    blocks = [s for s in STEPS if isinstance(s, WindowGeometry)]
    got = window_last_layer(attns, STEPS, head_fusion="max")
    layers: list[Tensor | None] = [None] * len(blocks)
    layers[-1] = fuse_heads(window_attention_dense(attns[-1], blocks[-1]), "max")
    expected = dense_relevance(layers, STEPS, add_identity=False).reshape(B, 6, 6)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


def test_rollout_from_a_given_start_and_bad_input() -> None:
    attns = _attentions(1)
    start = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=DT)  # the top-left final token only
    got = window_rollout(attns, STEPS, start=start)
    blocks = [s for s in STEPS if isinstance(s, WindowGeometry)]
    dense = iter(fuse_heads(window_attention_dense(a, g), "mean") for a, g in zip(attns, blocks))
    joint = None
    for s in STEPS:
        m = merge_matrix(s.in_size) if isinstance(s, MergeStep) else renorm_plus_identity(next(dense))
        joint = m if joint is None else m @ joint  # (B, 4, 36) at the end
    torch.testing.assert_close(got.reshape(1, 36), joint[:, 0], atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="attention maps for 5 windowed blocks"):
        window_rollout(attns[:-1], STEPS)
    with pytest.raises(ValueError, match="start must be"):
        window_rollout(attns, STEPS, start=torch.ones(1, 5))
    with pytest.raises(ValueError, match="do not chain"):
        window_rollout(attns, [*STEPS[:2], MergeStep((8, 8)), *STEPS[3:]])
    with pytest.raises(ValueError, match=r"expected \(B\*nW, heads, N, N\)"):
        window_rollout([attns[2], *attns[1:]], STEPS)  # a stage-2 map where stage 1 is expected
    with pytest.raises(ValueError, match="discard_ratio"):
        window_rollout(attns, STEPS, discard_ratio=1.0)
    with pytest.raises(ValueError, match="inconsistent"):
        window_index(WindowGeometry(size=(6, 6), padded=(12, 12), window=(4, 4), shift=(0, 0)))


@pytest.mark.parametrize("discard", [0.0, 0.3])
def test_one_window_over_the_whole_map_is_plain_vit_rollout(discard: float) -> None:
    # a single unshifted window covering the map is ordinary token-to-token attention
    g1 = WindowGeometry(size=(4, 5), padded=(4, 5), window=(4, 5), shift=(0, 0))
    attns = [random_attention(2, 3, g1, seed=s) for s in range(3)]
    got = window_rollout(attns, [g1, g1, g1], discard_ratio=discard)
    joint = attention_rollout(attns, discard_ratio=discard, num_prefix_tokens=0)
    expected = token_relevance(joint, num_prefix_tokens=0, use_class_token=False).reshape(2, 4, 5)
    torch.testing.assert_close(got, expected.to(got.dtype), atol=1e-6, rtol=0)
    grads = [torch.randn_like(a) for a in attns]
    got_g = window_gradient_rollout(attns, grads, [g1, g1, g1], discard_ratio=discard)
    joint_g = gradient_rollout(attns, grads, discard_ratio=discard, num_prefix_tokens=0)
    expected_g = token_relevance(joint_g, num_prefix_tokens=0, use_class_token=False).reshape(2, 4, 5)
    torch.testing.assert_close(got_g, expected_g.to(got_g.dtype), atol=1e-6, rtol=0)


def test_discard_zeroes_the_lowest_input_token_pairs() -> None:
    g = geometry(6, 6, 4, 2)  # padded: pairs with padding are not candidates
    fused = drop_padded_keys(random_attention(1, 1, g), g)[:, 0]
    r = torch.rand(1, 36, dtype=DT)
    got = propagate_through_window(r, fused, g, discard_ratio=0.5)
    dense = window_attention_dense(fused[:, None], g)[:, 0]  # (1, 36, 36)
    real = torch.zeros(36, 36, dtype=torch.bool)
    for w in range(g.num_windows):
        pos = [p for p in window_index(g)[0][w * 16:(w + 1) * 16].tolist() if p >= 0]
        real[torch.tensor(pos)[:, None], torch.tensor(pos)[None, :]] = True
    vals = dense[0][real]
    k = int(real.sum()) // 2
    cut = vals.sort().values[k - 1]
    kept = torch.where(real & (dense[0] > cut), dense[0], torch.zeros_like(dense[0]))
    expected = (r[:, None] @ renorm_plus_identity(kept[None]))[:, 0]
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


def test_uniform_attention_gives_a_uniform_map() -> None:
    # even merges keep a uniform map uniform (odd ones give border tokens, which see less, a smaller share)
    steps = [geometry(8, 8, 4, 0), geometry(8, 8, 4, 2), MergeStep((8, 8)), geometry(4, 4, 3, 0),
             geometry(4, 4, 3, 1), MergeStep((4, 4)), geometry(2, 2, 2, 0)]
    blocks = [s for s in steps if isinstance(s, WindowGeometry)]
    attns = [torch.full((g.num_windows, 2, g.window_area, g.window_area), 1.0 / g.window_area, dtype=DT)
             for g in blocks]  # 4x4 maps with window 3 are padded to 6x6: the padded keys are dropped
    for fn in (lambda: window_rollout(attns, steps), lambda: window_last_layer(attns, steps),
               lambda: window_gradient_rollout(attns, [torch.ones_like(a) for a in attns], steps)):
        got = fn()
        torch.testing.assert_close(got, torch.full((1, 8, 8), 1 / 64, dtype=DT), atol=1e-15, rtol=0)


# ------------------------------------------------------------------------------------------------ distance


@pytest.mark.parametrize("geom", GEOMETRIES, ids=str)
def test_identity_attention_has_distance_zero(geom: WindowGeometry) -> None:
    N = geom.window_area
    eye = torch.eye(N, dtype=DT).expand(2 * geom.num_windows, 3, N, N)
    torch.testing.assert_close(window_attention_distance(eye, geom, 16), torch.zeros(3, dtype=DT))


def test_uniform_attention_in_one_window_by_hand() -> None:
    # 2x2 tokens of 4 px, one window: every query sees distances 0, 4, 4, 4*sqrt(2) -> mean 2 + sqrt(2)
    g = WindowGeometry(size=(2, 2), padded=(2, 2), window=(2, 2), shift=(0, 0))
    uniform = torch.full((3, 2, 4, 4), 0.25, dtype=DT)
    torch.testing.assert_close(window_attention_distance(uniform, g, 4),
                               torch.full((2,), 2 + math.sqrt(2), dtype=DT), atol=1e-12, rtol=0)
    # rectangular tokens 4 px tall, 8 px wide: distances 0, 4, 8, sqrt(80)
    torch.testing.assert_close(window_attention_distance(uniform.float(), g, (4, 8)),
                               torch.full((2,), (12 + math.sqrt(80)) / 4), atol=1e-6, rtol=0)


def test_distance_undoes_the_shift_and_drops_padding() -> None:
    # 1x4 map, windows of 2, shift 1: windows hold tokens (1, 2) and (3, 0). Uniform attention: 0.5 token
    # on average in the first, 1.5 in the second (3 apart, brought together by the roll) -> 1.0 token
    g = WindowGeometry(size=(1, 4), padded=(1, 4), window=(1, 2), shift=(0, 1))
    uniform = torch.full((2, 1, 2, 2), 0.5, dtype=DT)
    torch.testing.assert_close(window_attention_distance(uniform, g, 10), torch.tensor([10.0], dtype=DT))
    # 1x3 map padded to 1x4: windows (0, 1) and (2, pad). The padded key is dropped, its query left out:
    # (0.5 + 0.5 + 0) / 3 tokens
    g = WindowGeometry(size=(1, 3), padded=(1, 4), window=(1, 2), shift=(0, 0))
    torch.testing.assert_close(window_attention_distance(uniform, g, 6), torch.tensor([2.0], dtype=DT))


def test_strides_stages_and_meter() -> None:
    assert token_strides(STEPS, 4) == [(4, 4), (4, 4), (8, 8), (8, 8), (16, 16)]
    assert stage_of_blocks(STEPS) == [0, 0, 1, 1, 2]
    meter = WindowDistanceMeter()
    a1, a2 = _attentions(2, seed=0), _attentions(3, seed=5)
    meter.update(a1, STEPS, (4, 4))
    meter.update(a2, STEPS, (4, 4))
    assert meter.count == 5
    blocks = [s for s in STEPS if isinstance(s, WindowGeometry)]
    strides = token_strides(STEPS, 4)
    per_block = meter.compute()
    for i, (g, s) in enumerate(zip(blocks, strides)):
        both = torch.cat([window_attention_distance(a1[i], g, s)[None].expand(2, -1),
                          window_attention_distance(a2[i], g, s)[None].expand(3, -1)])
        torch.testing.assert_close(per_block[i].double(), both.mean(0), atol=1e-5, rtol=0)
        assert per_block[i].shape == (HEADS[i],)
    stages = meter.compute_stages()
    assert [s.shape[0] for s in stages] == [2, 3, 4]
    torch.testing.assert_close(stages[0], (per_block[0] + per_block[1]) / 2)


# ------------------------------------------------------------------------------------------------ toy model


class ToyWindowAttention(CapturableAttention):
    """Window attention with an explicit softmax (emits its (B*nW, heads, N, N) weights)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self._init_heads(dim, num_heads)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        Bw, N, C = x.shape
        q, k, v = self.qkv(x).reshape(Bw, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if mask is not None:  # (nW, N, N) -> (Bw, 1, N, N)
            mask = mask.repeat(Bw // mask.shape[0], 1, 1)[:, None]
        out = attend_explicit(q, k, v, scale=self.scale, attn_mask=mask, sink=self._emit)
        return self.proj(out.transpose(1, 2).reshape(Bw, N, C))


def shift_mask(geom: WindowGeometry) -> Tensor | None:
    """(nW, N, N) additive mask: -100 between tokens of different regions of the rolled map."""
    if geom.shift == (0, 0):
        return None
    (Hp, Wp), (wh, ww), (sh, sw) = geom.padded, geom.window, geom.shift
    label = torch.zeros(1, Hp, Wp, 1)
    n = 0
    for rs in (slice(0, Hp - wh), slice(Hp - wh, Hp - sh), slice(Hp - sh, Hp)):
        for cs in (slice(0, Wp - ww), slice(Wp - ww, Wp - sw), slice(Wp - sw, Wp)):
            label[:, rs, cs] = n
            n += 1
    win = label.reshape(1, Hp // wh, wh, Wp // ww, ww).permute(0, 1, 3, 2, 4).reshape(-1, wh * ww)
    return (win[:, :, None] != win[:, None, :]).float() * -100.0


class ToyBlock(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, shift: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = ToyWindowAttention(dim, heads)
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.window, self.shift = window, shift
        self.last_geometry: WindowGeometry | None = None

    def forward(self, x: Tensor) -> Tensor:  # (B, H, W, C)
        B, H, W, _ = x.shape
        geom = geometry(H, W, self.window, self.shift)
        self.last_geometry = geom
        y = partition(self.norm(x), geom)  # (B*nW, N, C)
        x = x + reverse(self.attn(y, shift_mask(geom)), geom, B)
        return x + self.mlp(x)


class ToyMerge(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.last_input_size: tuple[int, int] | None = None

    def forward(self, x: Tensor) -> Tensor:  # (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C)
        _, H, W, _ = x.shape
        self.last_input_size = (H, W)
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class ToyPatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int) -> None:
        super().__init__()
        self.patch_size = (patch, patch)
        self.proj = nn.Conv2d(3, dim, patch, patch)

    def forward(self, x: Tensor) -> Tensor:
        p = self.patch_size[0]
        x = F.pad(x, (0, -x.shape[-1] % p, 0, -x.shape[-2] % p))  # images padded bottom/right to the patch
        return self.proj(x).permute(0, 2, 3, 1)  # (B, H, W, C)


class ToyWindowModel(nn.Module):
    """Two stages of windowed blocks (the second shifted) with a patch merging between them, pooled head."""

    num_prefix_tokens = 0

    def __init__(self, *, dim: int = 8, patch: int = 4, windows: tuple[int, int] = (4, 3),
                 heads: tuple[int, int] = (2, 4), num_classes: int = 3) -> None:
        super().__init__()
        self.patch_embed = ToyPatchEmbed(dim, patch)
        layers: list[nn.Module] = [ToyBlock(dim, heads[0], windows[0], 0),
                                   ToyBlock(dim, heads[0], windows[0], windows[0] // 2), ToyMerge(dim)]
        layers += [ToyBlock(2 * dim, heads[1], windows[1], 0), ToyBlock(2 * dim, heads[1], windows[1], windows[1] // 2)]
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(2 * dim)
        self.head = nn.Linear(2 * dim, num_classes)
        self.num_classes = num_classes

    def analysis_modules(self) -> list[nn.Module]:
        return list(self.layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x).mean(dim=(1, 2)))


def _toy(seed: int = 0, **kw) -> ToyWindowModel:
    torch.manual_seed(seed)
    model = ToyWindowModel(**kw).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))  # away from LayerNorm's ones/zeros: non-trivial attention
    return model


@pytest.fixture
def registered_toy():
    register_windowed(ToyWindowModel)
    yield ToyWindowModel
    for key in [k for k in _EXPLAINERS if k[0] is ToyWindowModel]:
        del _EXPLAINERS[key]


@pytest.mark.parametrize("image", [(28, 28), (24, 20)])
def test_toy_model_rollout_equals_dense(image: tuple[int, int]) -> None:
    # 28 px: 7x7 map, window 4 padded to 8 and shifted by 2, an odd merge to 4x4, window 3 padded to 6;
    # 24x20 px: 6x5 map, odd merge to 3x3, window 3 clamped and unshifted
    model = _toy()
    x = torch.randn(2, 3, *image)
    cap = capture_windowed(model, x)
    with torch.no_grad():
        torch.testing.assert_close(cap.logits, model(x))
    steps = cap.steps
    assert steps == analysis_steps(model) and isinstance(steps[2], MergeStep)
    assert cap.grid == (image[0] // 4, image[1] // 4) and cap.patch_size == (4, 4)
    blocks = [s for s in steps if isinstance(s, WindowGeometry)]
    if image == (28, 28):
        assert blocks[1] == WindowGeometry(size=(7, 7), padded=(8, 8), window=(4, 4), shift=(2, 2))
        assert blocks[3] == WindowGeometry(size=(4, 4), padded=(6, 6), window=(3, 3), shift=(1, 1))
    got = window_rollout(cap.attentions, steps)
    dense = [fuse_heads(window_attention_dense(a.double(), g), "mean") for a, g in zip(cap.attentions, blocks)]
    expected = dense_relevance(dense, steps).reshape(got.shape)
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=0)


def test_toy_dense_matrix_reproduces_the_attention_output() -> None:
    # the attention part of a block = dense matrix @ values, on the unshifted map (no padding here)
    model = _toy()
    block = model.layers[1]  # shifted, 8x8 map with window 4: no padding
    x = torch.randn(1, 8, 8, 8)
    with torch.no_grad(), capture_attention(block) as maps:
        y = block.norm(x)
        block(x)
    geom = block.last_geometry
    dense = window_attention_dense(maps[0].double(), geom)  # (1, heads, 64, 64)
    attn = block.attn
    v = attn.qkv(y.reshape(1, 64, 8))[..., 16:].reshape(1, 64, attn.num_heads, attn.head_dim).transpose(1, 2)
    mixed = (dense.float() @ v).transpose(1, 2).reshape(1, 64, 8)  # (1, HW, C)
    out = attn.proj(mixed).reshape(1, 8, 8, 8)
    with torch.no_grad():
        expected = reverse(attn(partition(y, geom), shift_mask(geom)), geom, 1)
    torch.testing.assert_close(out.detach(), expected, atol=1e-5, rtol=1e-5)


def test_explain_windowed_every_method_on_the_toy(registered_toy) -> None:
    model = _toy()
    x = torch.randn(2, 3, 28, 28)
    for method in ("rollout", "grad-rollout", "last-layer"):
        e = explain_windowed(model, x, method=method)
        assert e.maps.shape == (2, 28, 28) and e.patch_maps.shape == (2, 7, 7)
        assert torch.isfinite(e.maps).all() and e.method == method
        via = explain(model, x, method=method)  # dispatched through the registry
        torch.testing.assert_close(via.maps, e.maps)
    assert explain(model, x).method == "rollout"  # "auto" picks the windowed rollout
    # a 26 px image is padded to 28 px: the 7x7 grid's map is cropped to the image, not squeezed into it
    e = explain(model, torch.randn(1, 3, 26, 26), method="rollout")
    assert e.maps.shape == (1, 26, 26) and e.patch_maps.shape == (1, 7, 7)
    full = torch.nn.functional.interpolate(e.patch_maps[:, None], size=(28, 28), mode="bilinear")[:, 0]
    torch.testing.assert_close(e.maps, full[:, :26, :26])
    assert all(p.grad is None for p in model.parameters())


def test_grad_rollout_differs_between_classes_and_rollout_does_not(registered_toy) -> None:
    model = _toy()
    x = torch.randn(1, 3, 28, 28)
    g0 = explain(model, x, method="grad-rollout", target=0)
    g1 = explain(model, x, method="grad-rollout", target=1)
    assert g0.target.tolist() == [0] and g1.target.tolist() == [1]
    assert (g0.patch_maps - g1.patch_maps).abs().max() > 1e-4 * g0.patch_maps.abs().max()
    r0 = explain(model, x, method="rollout", target=0)
    r1 = explain(model, x, method="rollout", target=1)
    torch.testing.assert_close(r0.maps, r1.maps)


def test_analyze_model_reports_distances_per_stage(tmp_path) -> None:
    import json

    from vitlab.analysis.analyze import analyze_model

    model = _toy()
    data = TensorDataset(torch.randn(5, 3, 28, 28), torch.tensor([0, 1, 2, 0, 1]))
    numbers = analyze_model(model, data, tmp_path, num_images=5, batch_size=2)
    ad = numbers["attention_distance"]
    assert ad["layers"] == [1, 2, 3, 4] and ad["stage_of_layer"] == [1, 1, 2, 2]
    assert [len(p) for p in ad["pixels"]] == [2, 2, 4, 4] and [len(p) for p in ad["stage_pixels"]] == [2, 4]
    assert ad["stage_grid"] == [[7, 7], [4, 4]] and ad["stage_token_stride"] == [[4, 4], [8, 8]]
    assert ad["stage_window"] == [[4, 4], [3, 3]]
    # no head reaches beyond its window's diagonal (wrapped pairs of shifted windows are masked)
    for k, stage in enumerate(ad["stage_pixels"]):
        (wh, ww), (sy, sx) = ad["stage_window"][k], ad["stage_token_stride"][k]
        assert all(0 < d < math.hypot((wh - 1) * sy, (ww - 1) * sx) for d in stage)
        assert 0 < ad["stage_window_uniform_reference"][k] < math.hypot((wh - 1) * sy, (ww - 1) * sx)
    torch.testing.assert_close(torch.tensor(ad["stage_window_uniform_reference"][0]),
                               window_attention_distance(torch.full((4, 1, 16, 16), 1 / 16), geometry(7, 7, 4, 0), 4)[0])
    # per-block numbers equal the meter on the same images
    meter = WindowDistanceMeter()
    for i in (0, 2, 4):
        xb = torch.stack([data[j][0] for j in range(i, min(i + 2, 5))])
        cap = capture_windowed(model, xb)
        meter.update(cap.attentions, cap.steps, cap.patch_size)
    for got, want in zip(ad["pixels"], meter.compute()):
        torch.testing.assert_close(torch.tensor(got), want)
    saved = json.loads((tmp_path / "analysis.json").read_text())
    assert saved["attention_distance"]["stage_mean"] == ad["stage_mean"]
    assert (tmp_path / "attention_distance.png").exists() and (tmp_path / "report.html").exists()
