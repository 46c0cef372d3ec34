"""Window attention (Swin, Liu et al. 2021, arXiv:2103.14030; v2, arXiv:2111.09883) and its geometry.

Tokens attend only within non-overlapping windows of a (H, W) token map. Every window adds a learned
bias indexed by the relative offset of the two tokens: v1 looks it up in a (2wh-1)(2ww-1) x heads
table; v2 computes it with a small MLP on log-spaced offsets ("continuous position bias") and uses
scaled cosine attention. Shifted blocks roll the map by half a window first; the shift-mask then
keeps tokens that were not neighbours before the roll from attending to each other (-100 before the
softmax, as in the reference code, not -inf).

Layout conventions are those of :mod:`vitlab.layers.window_geometry`: windows row-major over the
padded map, batch-major: (B * nW, wh * ww, C).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitlab.layers.attention import CapturableAttention, attend_explicit
from vitlab.layers.helpers import linear_with_bias

SHIFT_MASK_VALUE = -100.0  # the reference code's value between tokens of different regions


# ------------------------------------------------------------------------------------ partitioning
def window_partition(x: Tensor, window: tuple[int, int]) -> Tensor:
    """(B, H, W, C) map, H and W multiples of the window -> (B * nW, wh * ww, C) windows."""
    B, H, W, C = x.shape
    wh, ww = window
    x = x.view(B, H // wh, wh, W // ww, ww, C).permute(0, 1, 3, 2, 4, 5)  # (B, nH, nW, wh, ww, C)
    return x.reshape(-1, wh * ww, C)


def window_reverse(windows: Tensor, window: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """Inverse of :func:`window_partition`: (B * nW, wh * ww, C) -> (B, H, W, C) with (H, W) = ``size``."""
    H, W = size
    wh, ww = window
    C = windows.shape[-1]
    x = windows.view(-1, H // wh, W // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5)  # (B, nH, wh, nW, ww, C)
    return x.reshape(-1, H, W, C)


# ---------------------------------------------------------------------------- position tables / masks
def relative_position_index(window: tuple[int, int]) -> Tensor:
    """(N, N) long index into a (2wh-1)(2ww-1) table: ``(dy + wh - 1) * (2ww - 1) + (dx + ww - 1)``."""
    wh, ww = window
    ys, xs = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()  # token i of the window sits at (ys[i], xs[i])
    dy = ys[:, None] - ys[None, :] + wh - 1
    dx = xs[:, None] - xs[None, :] + ww - 1
    return dy * (2 * ww - 1) + dx


def log_spaced_coords(window: tuple[int, int], pretrained_window: tuple[int, int] | None = None) -> Tensor:
    """v2's (2wh-1, 2ww-1, 2) input of the position MLP: offsets scaled to [-8, 8] by the (pre-training)
    window, then ``sign(t) * log2(1 + |t|) / log2(8)``."""
    wh, ww = window
    ref = pretrained_window if pretrained_window is not None and pretrained_window[0] > 0 else window
    dy = torch.arange(-(wh - 1), wh, dtype=torch.float32) / max(ref[0] - 1, 1)
    dx = torch.arange(-(ww - 1), ww, dtype=torch.float32) / max(ref[1] - 1, 1)
    t = torch.stack(torch.meshgrid(dy, dx, indexing="ij"), dim=-1) * 8
    return torch.sign(t) * torch.log2(t.abs() + 1.0) / math.log2(8)


def shift_region_ids(padded: tuple[int, int], window: tuple[int, int], shift: tuple[int, int],
                     device: torch.device | str | None = None) -> Tensor:
    """(nW, N) region of every token of every window of a shifted block's (padded) map.

    The rolled map is cut into 3 x 3 regions by the slices ``[0, -w)``, ``[-w, -s)``, ``[-s, H)`` per
    axis (an axis without shift is one region: the reference code's ``slice(-0, None)`` covers it all).
    Computed from comparisons with ``arange``, so the sizes may be symbolic (an exporter tracing any size
    records the ops rather than a constant).
    """
    def axis(n: int, w: int, s: int) -> Tensor:  # (n,) region index 0, 1, 2 along one axis
        r = torch.arange(n, device=device)
        if s == 0:
            return torch.zeros_like(r)
        return (r >= n - w).to(torch.int64) + (r >= n - s).to(torch.int64)

    (Hp, Wp), (wh, ww), (sh, sw) = padded, window, shift
    ids = (axis(Hp, wh, sh)[:, None] * 3 + axis(Wp, ww, sw)[None, :]).float()  # (Hp, Wp)
    return window_partition(ids[None, :, :, None], window).squeeze(-1)  # (nW, N)


def shift_attention_mask(padded: tuple[int, int], window: tuple[int, int], shift: tuple[int, int],
                         device: torch.device | str | None = None) -> Tensor:
    """(nW, N, N) additive mask of a shifted block on a (padded) map: 0 within a region, -100 across
    (regions: :func:`shift_region_ids`; tokens of different regions were not adjacent before the roll)."""
    ids = shift_region_ids(padded, window, shift, device)
    diff = ids[:, None, :] - ids[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, SHIFT_MASK_VALUE)


def resample_rel_pos_table(table: Tensor, old_window: tuple[int, int], new_window: tuple[int, int],
                           *, mode: str = "timm") -> Tensor:
    """Resample a ((2wh-1)(2ww-1), heads) relative-position table to another window.

    Modes:
        "timm": timm's ``resize_rel_pos_bias_table`` (from BEiT): the source offsets are spread on a
            geometric progression (ratio at most 1.5) towards the new table's extent, then linearly
            interpolated (constant beyond the outermost source offset).
        "bicubic": Microsoft's ``load_pretrained``: bicubic interpolation of the table as an image.
    """
    src = (2 * old_window[0] - 1, 2 * old_window[1] - 1)
    dst = (2 * new_window[0] - 1, 2 * new_window[1] - 1)
    if src == dst:
        return table
    heads = table.shape[1]
    grid = table.float().t().reshape(1, heads, *src)
    if mode == "bicubic":
        out = F.interpolate(grid, size=dst, mode="bicubic", align_corners=False)
    elif mode == "timm":
        ys, xs = _progression(src[0], dst[0]), _progression(src[1], dst[1])
        ty = torch.arange(-(dst[0] // 2), dst[0] // 2 + 0.1, 1.0, dtype=torch.float64)
        tx = torch.arange(-(dst[1] // 2), dst[1] // 2 + 0.1, 1.0, dtype=torch.float64)
        out = _interp_rectilinear(grid[0].double(), ys, xs, ty, tx)[None].float()
    else:
        raise ValueError(f"resample_rel_pos_table: mode must be 'timm' or 'bicubic', got {mode!r}")
    return out.reshape(heads, -1).t().contiguous().to(table.dtype)


def _progression(src: int, dst: int) -> Tensor:
    """Source sample positions: offsets 0, 1, 1+q, 1+q+q^2, ... (and mirrored) with the ratio q found by
    bisection so that the progression reaches dst // 2."""
    half = src // 2
    lo, hi = 1.01, 1.5
    while hi - lo > 1e-6:
        q = (lo + hi) / 2.0
        if (1.0 - q**half) / (1.0 - q) > dst // 2:
            hi = q
        else:
            lo = q
    pos, cur = [], 1.0
    for i in range(half):
        pos.append(cur)
        cur += q ** (i + 1)
    return torch.tensor([-p for p in reversed(pos)] + [0.0] + pos, dtype=torch.float64)


def _interp_rectilinear(values: Tensor, ys: Tensor, xs: Tensor, ty: Tensor, tx: Tensor) -> Tensor:
    """Bilinear interpolation of (C, len(ys), len(xs)) samples on the grid ys x xs at ty x tx, constant
    beyond the grid's edges (and along an axis with a single sample: a window of 1, as a Swin stage whose
    map was 1 x 1 at training time has)."""
    if len(ys) == 1:  # one sample: its value everywhere (a cell of width 0 would divide by zero)
        ys, values = torch.cat([ys, ys + 1]), torch.cat([values, values], dim=1)
    if len(xs) == 1:
        xs, values = torch.cat([xs, xs + 1]), torch.cat([values, values], dim=2)
    def cell(grid: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        t = t.clamp(grid[0], grid[-1])  # beyond the outermost sample: its value (no extrapolation)
        i = torch.searchsorted(grid, t, right=True).sub(1).clamp(0, len(grid) - 2)
        w = (t - grid[i]) / (grid[i + 1] - grid[i])
        return i, w

    iy, wy = cell(ys, ty)
    ix, wx = cell(xs, tx)
    wy, wx = wy[:, None], wx[None, :]
    v00 = values[:, iy][:, :, ix]
    v01 = values[:, iy][:, :, ix + 1]
    v10 = values[:, iy + 1][:, :, ix]
    v11 = values[:, iy + 1][:, :, ix + 1]
    return (v00 * (1 - wy) * (1 - wx) + v01 * (1 - wy) * wx + v10 * wy * (1 - wx) + v11 * wy * wx)


# ------------------------------------------------------------------------------------------ attention
class _WindowAttentionBase(CapturableAttention):
    """What both versions share: the relative-position index, the bias + mask combination, the two paths."""

    window: tuple[int, int]

    def _combine(self, bias: Tensor, mask: Tensor | None, batch_windows: int) -> Tensor:
        """(heads, N, N) bias (+ (nW, N, N) mask) -> an additive attention mask for (B * nW, heads, N, N)."""
        if mask is None:
            return bias.unsqueeze(0)  # broadcast over all windows
        nw, n = mask.shape[0], mask.shape[-1]
        # the mask is 0 or -100, exact in any float dtype: in the bias's dtype, a bfloat16 model stays bfloat16
        combined = bias.unsqueeze(0) + mask.to(bias.dtype).unsqueeze(1)  # (nW, heads, N, N)
        return combined.unsqueeze(0).expand(batch_windows // nw, -1, -1, -1, -1).reshape(-1, self.num_heads, n, n)

    def _bias_gather(self, table: Tensor) -> Tensor:
        """(T, heads) table -> (heads, N, N) bias, contiguous; differentiable w.r.t. the table.

        Contiguous because the permuted view made every add it joined (and the combined shift mask, which took its
        layout) a strided, unvectorised add: 2.4x timm's add time in an eager bfloat16 Swin-T.
        """
        n = self.window[0] * self.window[1]
        return table[self.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor, scale: float | None) -> Tensor:
        # On the CPU in bfloat16 / float16, torch's fused kernel is slower than the explicit product for
        # windows this small (49-256 tokens; measured: benchmarks/RESULTS.md); float32 and CUDA use SDPA.
        explicit = q.is_cpu and q.dtype in (torch.bfloat16, torch.float16)
        if self.capturing or explicit:
            return attend_explicit(q, k, v, scale=self.scale if scale is None else scale, attn_mask=attn_mask,
                                   dropout=self.attn_drop if self.training else None, sink=self._emit)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask.to(q.dtype),
                                              dropout_p=self.attn_drop.p if self.training else 0.0, scale=scale)


class WindowAttention(_WindowAttentionBase):
    """Swin v1 window attention: ``softmax(q k^T / sqrt(d) + B[rel] + mask) v`` per window.

    Args:
        dim: token width.
        window: (wh, ww) window this module attends over (fixed: the bias index depends on it).
        num_heads: heads; ``dim`` must be divisible by it.
        qkv_bias: bias on the fused q, k, v projection.

    ``forward(x, mask)``: x (B * nW, N, C) windows, mask (nW, N, N) or None -> (B * nW, N, C). In capture
    mode it emits (B * nW, heads, N, N) softmax weights.
    """

    def __init__(self, dim: int, *, window: tuple[int, int], num_heads: int, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        self._init_heads(dim, num_heads)
        self.window = tuple(window)
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window[0] - 1) * (2 * window[1] - 1), num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(self.window), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _init_buffers(self) -> None:
        device = self.relative_position_index.device
        self.relative_position_index = relative_position_index(self.window).to(device)

    def position_bias(self) -> Tensor:
        """(heads, N, N) relative-position bias of one window."""
        return self._bias_gather(self.relative_position_bias_table)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B * nW, heads, N, hd)
        x = self._attend(q, k, v, self._combine(self.position_bias(), mask, B_), None)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B_, N, C)))


class WindowAttentionV2(_WindowAttentionBase):
    """Swin v2 window attention: scaled cosine attention plus a continuous position bias.

    ``softmax(cos(q, k) * exp(min(s_h, log 100)) + 16 * sigmoid(MLP(coords))[rel] + mask) v``; the q and
    v projections have biases, k has none.

    Args:
        pretrained_window: the window of pre-training, which scales the MLP's coordinates (0 or None: this window).
    """

    max_logit_scale = math.log(100.0)

    def __init__(self, dim: int, *, window: tuple[int, int], num_heads: int, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0,
                 pretrained_window: tuple[int, int] | None = None, cpb_hidden: int = 512) -> None:
        super().__init__()
        self._init_heads(dim, num_heads)
        self.window = tuple(window)
        self.pretrained_window = tuple(pretrained_window) if pretrained_window else (0, 0)
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, cpb_hidden), nn.ReLU(inplace=True),
                                     nn.Linear(cpb_hidden, num_heads, bias=False))
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.register_buffer("relative_position_index", relative_position_index(self.window), persistent=False)
        self.register_buffer("relative_coords_table",
                             log_spaced_coords(self.window, self.pretrained_window), persistent=False)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _init_buffers(self) -> None:
        device = self.relative_position_index.device
        self.relative_position_index = relative_position_index(self.window).to(device)
        self.relative_coords_table = log_spaced_coords(self.window, self.pretrained_window).to(device)

    def position_bias(self) -> Tensor:
        """(heads, N, N) continuous position bias of one window, in (0, 16)."""
        table = self.cpb_mlp(self.relative_coords_table.to(self.logit_scale.dtype)).view(-1, self.num_heads)
        return 16 * torch.sigmoid(self._bias_gather(table))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        B_, N, C = x.shape
        bias = None
        if self.q_bias is not None:
            bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = linear_with_bias(self.qkv, x, bias)
        qkv = qkv.reshape(B_, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        logit_scale = self.logit_scale.clamp(max=self.max_logit_scale).exp()  # (heads, 1, 1)
        # padded tokens' keys are 0: an eps the dtype can hold (1e-12 is 0 in float16, and 0 / 0 is NaN);
        # float32 and bfloat16 keep 1e-12
        eps = max(1e-12, torch.finfo(q.dtype).tiny)
        q = F.normalize(q, dim=-1, eps=eps) * logit_scale
        k = F.normalize(k, dim=-1, eps=eps)
        x = self._attend(q, k, v, self._combine(self.position_bias(), mask, B_), 1.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B_, N, C)))
