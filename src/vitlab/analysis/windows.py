"""Windowed attention (Swin) in image space: rollout through windows, shifts and patch merging; distances.

A windowed block attends inside (wh, ww) windows of a cyclically shifted, padded token map
(:class:`~vitlab.layers.window_geometry.WindowGeometry` records how); a patch merging halves the map.
The analysis tools of a plain ViT read one (N, N) token-to-token matrix per layer; here each block's
matrix is block-diagonal in window order, and tokens move between the windows of consecutive blocks.

- :func:`window_attention_dense` places a block's window attention on the unpadded, unshifted map as a
  dense (H*W, H*W) matrix: the definition the other functions are checked against, for small maps.
- :func:`propagate_through_window` and :func:`propagate_through_merge` move a relevance row vector from
  a block's (or merge's) output to its input window by window, never building a dense matrix, so that
  rollout scales to 56x56 maps: per block ``r_in = r_out @ A_hat``, ``A_hat`` the rows of (attention + I)
  renormalised (Abnar & Zuidema 2020), per merge the relevance of a merged token split equally over the
  children it was made from.
- :func:`window_rollout`, :func:`window_gradient_rollout` (Chefer-style weighting by the gradient of the
  class score) and :func:`window_last_layer` start from the uniform average over the final tokens, which
  is what a globally pooled head reads, and return relevance on the first-stage token grid.
- :func:`window_attention_distance`: mean attention distance in input pixels between the true positions
  of query and key tokens (the shift undone, padding left out), per head; :class:`WindowDistanceMeter`
  accumulates it per block over batches and summarises it per stage.

Padded tokens are not image positions: attention to them is dropped and the rows renormalised; their
rows (as queries) are dropped.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from vitlab.analysis.rollout import HeadFusion, fuse_heads
from vitlab.layers.helpers import to_2tuple
from vitlab.layers.window_geometry import WindowGeometry

__all__ = [
    "MergeStep", "Step", "WindowDistanceMeter", "analysis_steps", "drop_padded_keys", "first_grid",
    "propagate_through_merge", "propagate_through_window", "stage_distances", "stage_of_blocks",
    "token_strides", "window_attention_dense", "window_attention_distance", "window_attention_distance_per_image",
    "window_gradient_rollout", "window_index", "window_last_layer", "window_rollout",
]


@dataclass(frozen=True)
class MergeStep:
    """A patch merging: (H, W) in, ((H + 1) // 2, (W + 1) // 2) out (odd sizes padded bottom/right).

    Merged token (i, j) is made from the children (2i, 2j), (2i+1, 2j), (2i, 2j+1), (2i+1, 2j+1) that exist.
    """

    in_size: tuple[int, int]

    @property
    def out_size(self) -> tuple[int, int]:
        return ((self.in_size[0] + 1) // 2, (self.in_size[1] + 1) // 2)


Step = WindowGeometry | MergeStep
Start = Literal["mean"] | Tensor


def analysis_steps(model: nn.Module) -> list[Step]:
    """What the last forward of ``model`` did between the patch embedding and the pooled head.

    Reads ``model.analysis_modules()`` (blocks and patch mergings in execution order): a block's
    ``last_geometry`` becomes its :class:`WindowGeometry`, a merging's ``last_input_size`` a :class:`MergeStep`.
    """
    modules = getattr(model, "analysis_modules", None)
    if not callable(modules):
        raise ValueError(f"{type(model).__name__} has no analysis_modules(): it does not describe its windows")
    steps: list[Step] = []
    for i, m in enumerate(modules()):
        if hasattr(m, "last_geometry"):
            geom = m.last_geometry
            if not isinstance(geom, WindowGeometry):
                raise ValueError(f"{type(model).__name__}: analysis module {i} ({type(m).__name__}) has no "
                                 "recorded window geometry; run a forward pass first")
            steps.append(geom)
        elif hasattr(m, "last_input_size"):
            size = m.last_input_size
            if size is None:
                raise ValueError(f"{type(model).__name__}: analysis module {i} ({type(m).__name__}) has no "
                                 "recorded input size; run a forward pass first")
            steps.append(MergeStep(in_size=(int(size[0]), int(size[1]))))
        else:
            raise ValueError(f"{type(model).__name__}: analysis module {i} ({type(m).__name__}) is neither a "
                             "windowed block (last_geometry) nor a patch merging (last_input_size)")
    if not steps:
        raise ValueError(f"{type(model).__name__}.analysis_modules() is empty")
    return steps


def _size_in(step: Step) -> tuple[int, int]:
    return tuple(step.size) if isinstance(step, WindowGeometry) else tuple(step.in_size)


def _size_out(step: Step) -> tuple[int, int]:
    return tuple(step.size) if isinstance(step, WindowGeometry) else step.out_size


def first_grid(steps: Sequence[Step]) -> tuple[int, int]:
    """(H0, W0): the first-stage token grid the relevance maps are drawn on."""
    return _size_in(steps[0])


def _check_chain(steps: Sequence[Step]) -> None:
    for i in range(1, len(steps)):
        if _size_in(steps[i]) != _size_out(steps[i - 1]):
            raise ValueError(f"analysis steps do not chain: step {i - 1} gives a {_size_out(steps[i - 1])} map, "
                             f"step {i} takes {_size_in(steps[i])}")


# ------------------------------------------------------------------------------------------------ indices


def _check_geometry(geom: WindowGeometry) -> None:
    (H, W), (Hp, Wp), (wh, ww) = geom.size, geom.padded, geom.window
    ok = (H > 0 and W > 0 and wh > 0 and ww > 0 and Hp % wh == 0 and Wp % ww == 0
          and H <= Hp < H + wh and W <= Wp < W + ww)
    if not ok:
        raise ValueError(f"inconsistent {geom}: padded must be size rounded up to a multiple of window")


def _key(geom: WindowGeometry) -> tuple[tuple[int, int], ...]:
    """The geometry as a hashable tuple of int pairs (a model may record lists or tensors' ints)."""
    return tuple((int(p[0]), int(p[1])) for p in (geom.size, geom.padded, geom.window, geom.shift))


@functools.lru_cache(maxsize=128)
def _window_index_cpu(key: tuple[tuple[int, int], ...]) -> tuple[Tensor, Tensor]:
    (H, W), (Hp, Wp), (wh, ww), (sh, sw) = key
    # padded-map row pi < H holds the shifted map's row pi, i.e. the input's row (pi + sh) % H
    rows = torch.arange(Hp)
    cols = torch.arange(Wp)
    src_r = torch.where(rows < H, (rows + sh) % H, -1)
    src_c = torch.where(cols < W, (cols + sw) % W, -1)
    real = (src_r >= 0)[:, None] & (src_c >= 0)[None, :]  # (Hp, Wp)
    flat = torch.where(real, src_r[:, None] * W + src_c[None, :], -1)  # (Hp, Wp)
    # (Hp, Wp) -> (Hp/wh, wh, Wp/ww, ww) -> (Hp/wh, Wp/ww, wh, ww) -> (nW * N): windows row-major, then tokens
    slots = flat.reshape(Hp // wh, wh, Wp // ww, ww).permute(0, 2, 1, 3).reshape(-1)
    inverse = torch.empty(H * W, dtype=torch.long)
    is_real = slots >= 0
    inverse[slots[is_real]] = torch.nonzero(is_real).squeeze(1)
    return slots, inverse


def window_index(geom: WindowGeometry, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Where each token of the unpadded, unshifted (H, W) map sits in the block's windows.

    Returns:
        slots: (nW * N,) long: for window slot s (window s // N, token s % N, both row-major), the flat
            position i * W + j of the input token there, or -1 for padding.
        inverse: (H * W,) long: the window slot of each input token (slots[inverse] == arange(H * W)).
    """
    _check_geometry(geom)
    slots, inverse = _window_index_cpu(_key(geom))
    return slots.to(device), inverse.to(device)


def _check_window_attention(attn: Tensor, geom: WindowGeometry, ndim: int, what: str) -> int:
    """The batch size B of (B * nW, [heads,] N, N) window attention, after checking its shape."""
    nW, N = geom.num_windows, geom.window_area
    if attn.ndim != ndim or attn.shape[-1] != N or attn.shape[-2] != N or attn.shape[0] % nW != 0:
        want = "(B*nW, heads, N, N)" if ndim == 4 else "(B*nW, N, N)"
        raise ValueError(f"{what}: expected {want} with nW={nW}, N={N} for {geom}, got {tuple(attn.shape)}")
    return attn.shape[0] // nW


def _real_keys(geom: WindowGeometry, device: torch.device) -> Tensor:
    """(nW, 1, N) bool: which keys of each window are input tokens (not padding)."""
    slots, _ = window_index(geom, device)
    return (slots >= 0).reshape(geom.num_windows, 1, geom.window_area)


def drop_padded_keys(attn: Tensor, geom: WindowGeometry) -> Tensor:
    """(B*nW, heads, N, N) or (B*nW, N, N) attention with the padded keys' columns zeroed and every row
    renormalised to the input tokens. Without padding, the rows are unchanged."""
    heads = attn.ndim == 4
    B = _check_window_attention(attn, geom, 4 if heads else 3, "drop_padded_keys")
    if geom.padded == geom.size:
        return attn
    keys = _real_keys(geom, attn.device)  # (nW, 1, N)
    shape = attn.shape
    a = attn.reshape(B, geom.num_windows, *shape[1:])
    a = a * (keys[:, None] if heads else keys)  # (B, nW, [heads,] N, N)
    a = a / a.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(a.dtype).tiny)
    return a.reshape(shape)


# ------------------------------------------------------------------------------------------------ dense


def window_attention_dense(attn: Tensor, geom: WindowGeometry, *, renormalize: bool = True) -> Tensor:
    """One block's window attention as token-to-token matrices on the unpadded, unshifted (H, W) map.

    Args:
        attn: (B*nW, heads, N, N) window attention, windows laid out as ``geom`` says.
        renormalize: renormalise each row to the input tokens after dropping the padded keys (softmax
            weights); False keeps the values as they are (e.g. gradient-weighted attention).
    Returns:
        (B, heads, H*W, H*W): entry [b, h, q, k] is how much input token q attends to input token k
        (flat positions i * W + j); zero between tokens in different windows. Memory grows as (H*W)^2:
        for tests and small maps; the rollout functions never build it.
    """
    B = _check_window_attention(attn, geom, 4, "window_attention_dense")
    heads, nW, N = attn.shape[1], geom.num_windows, geom.window_area
    HW = geom.size[0] * geom.size[1]
    slots, _ = window_index(geom, attn.device)
    pos = slots.reshape(nW, N)
    real = pos >= 0
    a = attn.reshape(B, nW, heads, N, N).permute(0, 2, 1, 3, 4)  # (B, heads, nW, N, N)
    a = a * real[:, None, :]  # padded keys dropped
    if renormalize:
        a = a / a.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(a.dtype).tiny)
    pairs = real[:, :, None] & real[:, None, :]  # (nW, N, N): both tokens real
    flat = (pos[:, :, None] * HW + pos[:, None, :])[pairs]  # (P,) positions in the (HW*HW) matrix
    dense = a.new_zeros(B, heads, HW * HW)
    dense[:, :, flat] = a[:, :, pairs]  # each (query, key) pair of input tokens occurs in one window only
    return dense.reshape(B, heads, HW, HW)


# ------------------------------------------------------------------------------------------------ propagation


def _discard_lowest_real(a: Tensor, geom: WindowGeometry, ratio: float) -> Tensor:
    """Zero the ``ratio`` fraction of lowest (query, key) entries among the input-token pairs of each
    image's windows, ``a`` (B, nW, N, N); the windowed analogue of :func:`vitlab.analysis.rollout.discard_lowest`."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {ratio}")
    if ratio == 0.0:
        return a
    nW, N = geom.num_windows, geom.window_area
    slots, _ = window_index(geom, a.device)
    real = (slots >= 0).reshape(nW, N)
    pairs = (real[:, :, None] & real[:, None, :]).reshape(-1)  # (nW*N*N,)
    k = int(int(pairs.sum()) * ratio)
    if k == 0:
        return a
    flat = a.reshape(a.shape[0], nW * N * N)
    ranked = flat.masked_fill(~pairs, float("inf"))  # pairs with padding are never among the lowest
    idx = ranked.topk(k, dim=-1, largest=False).indices  # (B, k)
    return flat.scatter(1, idx, 0.0).reshape(a.shape)


def propagate_through_window(
    r: Tensor,
    fused: Tensor,
    geom: WindowGeometry,
    *,
    discard_ratio: float = 0.0,
    add_identity: bool = True,
) -> Tensor:
    """Move relevance from a windowed block's output tokens to its input tokens: ``r_in = r_out @ A_hat``.

    ``A_hat`` is the block's dense token-to-token matrix (see :func:`window_attention_dense`, no
    renormalisation) with the identity added for the residual path and the rows renormalised; it is
    applied window by window: r is gathered into the windows (shift and padding as the block laid
    them), multiplied by each window's (N, N) matrix and scattered back.

    Args:
        r: (B, H*W) relevance of the block's output tokens (row-major on the unshifted map).
        fused: (B*nW, N, N) head-fused window attention; the columns of padded keys are ignored (zeroed),
            the rows are used as they are (apply :func:`drop_padded_keys` first to renormalise softmax rows).
        discard_ratio: zero this fraction of the lowest entries among input-token pairs per image first.
        add_identity: add I and renormalise the rows (rollout); False applies the matrix as it is
            (last-layer maps).
    Returns:
        (B, H*W) relevance of the block's input tokens.
    """
    B = _check_window_attention(fused, geom, 3, "propagate_through_window")
    HW = geom.size[0] * geom.size[1]
    if r.ndim != 2 or r.shape != (B, HW):
        raise ValueError(f"propagate_through_window: r must be (B, H*W) = ({B}, {HW}) for {geom}, "
                         f"got {tuple(r.shape)}")
    dtype = torch.promote_types(torch.promote_types(r.dtype, fused.dtype), torch.float32)
    nW, N = geom.num_windows, geom.window_area
    slots, inverse = window_index(geom, r.device)
    real = slots >= 0
    a = fused.to(dtype).reshape(B, nW, N, N) * real.reshape(1, nW, 1, N)  # padded keys dropped
    a = _discard_lowest_real(a, geom, discard_ratio)
    if add_identity:
        a = a + torch.eye(N, dtype=dtype, device=a.device)
        a = a / a.sum(dim=-1, keepdim=True)
    # gather: r_win[b, s] = r[b, slots[s]], zero where the slot is padding
    r_pad = torch.cat([r.to(dtype), r.new_zeros(B, 1, dtype=dtype)], dim=1)  # (B, HW + 1)
    r_win = r_pad[:, torch.where(real, slots, HW)].reshape(B * nW, 1, N)
    out = torch.bmm(r_win, a.reshape(B * nW, N, N))  # (B*nW, 1, N): row vector times each window's matrix
    return out.reshape(B, nW * N)[:, inverse]  # (B, HW): back to the unshifted, unpadded map


@functools.lru_cache(maxsize=64)
def _merge_index_cpu(in_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    H, W = in_size
    w = (W + 1) // 2
    rows = torch.arange(H) // 2
    cols = torch.arange(W) // 2
    parent = (rows[:, None] * w + cols[None, :]).reshape(-1)  # (H*W,) merged token of each child
    n_rows = torch.bincount(rows)  # children per merged row: 2, or 1 in a padded last row
    n_cols = torch.bincount(cols)
    count = (n_rows[rows][:, None] * n_cols[cols][None, :]).reshape(-1)  # (H*W,) existing siblings
    return parent, count


def propagate_through_merge(r: Tensor, in_size: tuple[int, int]) -> Tensor:
    """Move relevance from a patch merging's output (B, h*w) to its input (B, H*W), h = ceil(H / 2).

    Each merged token's relevance is split equally over the children it was made from that exist
    (children in the padding of an odd-sized map are dropped), so the total is kept.
    """
    H, W = to_2tuple(in_size)
    if H < 1 or W < 1:
        raise ValueError(f"propagate_through_merge: in_size must be positive, got {in_size}")
    h, w = (H + 1) // 2, (W + 1) // 2
    if r.ndim != 2 or r.shape[1] != h * w:
        raise ValueError(f"propagate_through_merge: r must be (B, {h * w}) for an input of {H}x{W}, "
                         f"got {tuple(r.shape)}")
    parent, count = _merge_index_cpu((H, W))
    return r[:, parent.to(r.device)] / count.to(device=r.device, dtype=r.dtype if r.is_floating_point() else None)


def _start_vector(start: Start, B: int, size: tuple[int, int], dtype: torch.dtype, device: torch.device) -> Tensor:
    n = size[0] * size[1]
    if isinstance(start, str):
        if start != "mean":
            raise ValueError(f"start must be 'mean' or a (B, {n}) tensor, got {start!r}")
        return torch.full((B, n), 1.0 / n, dtype=dtype, device=device)
    r = start.reshape(start.shape[0], -1).to(device=device, dtype=dtype)
    if r.shape != (B, n):
        raise ValueError(f"start must be (B, {n}) or (B, {size[0]}, {size[1]}) relevance over the final "
                         f"tokens, got {tuple(start.shape)}")
    return r


def _propagate(
    fused: list[Tensor | None],
    steps: Sequence[Step],
    *,
    start: Start,
    discard_ratio: float,
    add_identity: bool,
) -> Tensor:
    """Relevance on the first-stage grid (B, H0, W0) from per-block fused attention (None: the block is
    passed through as the identity), the steps walked from the last to the first."""
    steps = list(steps)
    _check_chain(steps)
    blocks = [s for s in steps if isinstance(s, WindowGeometry)]
    if len(fused) != len(blocks):
        raise ValueError(f"window rollout: {len(fused)} attention maps for {len(blocks)} windowed blocks")
    present = [f for f in fused if f is not None]
    if not present:
        raise ValueError("window rollout needs at least one attention map")
    B = present[0].shape[0] // blocks[fused.index(present[0])].num_windows
    dtype = torch.promote_types(present[0].dtype, torch.float32)
    r = _start_vector(start, B, _size_out(steps[-1]), dtype, present[0].device)
    i = len(blocks)
    for step in reversed(steps):
        if isinstance(step, MergeStep):
            r = propagate_through_merge(r, step.in_size)
            continue
        i -= 1
        if fused[i] is not None:
            r = propagate_through_window(r, fused[i], step, discard_ratio=discard_ratio, add_identity=add_identity)
    H0, W0 = first_grid(steps)
    return r.reshape(B, H0, W0)


def _check_attentions(attentions: Sequence[Tensor], steps: Sequence[Step], what: str) -> list[WindowGeometry]:
    blocks = [s for s in steps if isinstance(s, WindowGeometry)]
    if len(attentions) != len(blocks):
        raise ValueError(f"{what}: {len(attentions)} attention maps for {len(blocks)} windowed blocks")
    for a, g in zip(attentions, blocks):
        _check_window_attention(a, g, 4, what)
    return blocks


def window_rollout(
    attentions: Sequence[Tensor],
    steps: Sequence[Step],
    *,
    head_fusion: HeadFusion = "mean",
    discard_ratio: float = 0.0,
    start: Start = "mean",
) -> Tensor:
    """Attention rollout through windows, shifts and patch merging.

    Args:
        attentions: one (B*nW, heads, N, N) window attention per block, in execution order.
        steps: the blocks' :class:`WindowGeometry` and the mergings' :class:`MergeStep` in execution
            order (:func:`analysis_steps`).
        head_fusion: mean, max or min over heads, after each head's rows are renormalised to the input
            tokens (padded keys dropped).
        discard_ratio: per block, zero this fraction of the lowest attention entries (input-token pairs)
            before adding the identity.
        start: relevance of the final tokens: "mean" (uniform, what global average pooling reads) or a
            (B, h*w) tensor.
    Returns:
        (B, H0, W0) relevance of the first-stage tokens; equal to the mean row of the product of the
        blocks' dense matrices (attention + I, rows renormalised) and the mergings' split matrices.
    """
    blocks = _check_attentions(attentions, steps, "window_rollout")
    fused = [fuse_heads(drop_padded_keys(a, g), head_fusion) for a, g in zip(attentions, blocks)]
    return _propagate(fused, steps, start=start, discard_ratio=discard_ratio, add_identity=True)


def window_gradient_rollout(
    attentions: Sequence[Tensor],
    gradients: Sequence[Tensor],
    steps: Sequence[Step],
    *,
    discard_ratio: float = 0.0,
    start: Start = "mean",
) -> Tensor:
    """Gradient-weighted rollout: per block (attention * d score / d attention), positive part, mean over
    heads (Chefer et al. 2021), padded keys dropped, then the same propagation as :func:`window_rollout`.

    Returns (B, H0, W0) relevance of the first-stage tokens for the class whose score gave ``gradients``.
    """
    _check_attentions(attentions, steps, "window_gradient_rollout")
    if len(gradients) != len(attentions):
        raise ValueError(f"window_gradient_rollout: {len(attentions)} attention maps but {len(gradients)} gradients")
    for a, g in zip(attentions, gradients):
        if a.shape != g.shape:
            raise ValueError(f"window_gradient_rollout: gradient of shape {tuple(g.shape)} for attention "
                             f"of shape {tuple(a.shape)}")
    fused = [(a * g).clamp(min=0).mean(dim=1) for a, g in zip(attentions, gradients)]
    return _propagate(fused, steps, start=start, discard_ratio=discard_ratio, add_identity=True)


def window_last_layer(
    attentions: Sequence[Tensor],
    steps: Sequence[Step],
    *,
    head_fusion: HeadFusion = "mean",
    start: Start = "mean",
) -> Tensor:
    """The last block's attention alone (heads fused, no identity), read by the pooled head and carried
    back to the first-stage grid through the mergings only; (B, H0, W0)."""
    blocks = _check_attentions(attentions, steps, "window_last_layer")
    fused: list[Tensor | None] = [None] * len(blocks)
    fused[-1] = fuse_heads(drop_padded_keys(attentions[-1], blocks[-1]), head_fusion)
    return _propagate(fused, steps, start=start, discard_ratio=0.0, add_identity=False)


# ------------------------------------------------------------------------------------------------ distance


def token_strides(steps: Sequence[Step], patch_size: int | tuple[int, int]) -> list[tuple[int, int]]:
    """Pixels between neighbouring tokens at each windowed block: the patch size, doubled by each merging."""
    sy, sx = to_2tuple(patch_size)
    out = []
    for s in steps:
        if isinstance(s, MergeStep):
            sy, sx = 2 * sy, 2 * sx
        else:
            out.append((sy, sx))
    return out


def stage_of_blocks(steps: Sequence[Step]) -> list[int]:
    """The stage (0-based: mergings seen before it) of each windowed block."""
    stage, out = 0, []
    for s in steps:
        if isinstance(s, MergeStep):
            stage += 1
        else:
            out.append(stage)
    return out


def window_attention_distance_per_image(
    attn: Tensor, geom: WindowGeometry, token_stride_px: int | tuple[int, int]
) -> Tensor:
    """Per-image, per-head mean attention distance of one windowed block, (B, heads), in input pixels.

    The distance between a query and a key is measured between their true positions on the input map
    (the cyclic shift undone: tokens that the shift brought into one window from opposite edges are far
    apart), weighted by the attention, padded keys dropped and the rows renormalised, then averaged over
    the H*W input-token queries (padded queries left out).
    """
    B = _check_window_attention(attn, geom, 4, "window_attention_distance")
    sy, sx = to_2tuple(token_stride_px)
    W = geom.size[1]
    heads, nW, N = attn.shape[1], geom.num_windows, geom.window_area
    slots, _ = window_index(geom, attn.device)
    pos = slots.reshape(nW, N)
    real = pos >= 0
    y = (pos.clamp(min=0) // W).double() * sy  # (nW, N): true pixel rows (token corners; offsets cancel)
    x = (pos.clamp(min=0) % W).double() * sx
    d = torch.sqrt((y[:, :, None] - y[:, None, :]) ** 2 + (x[:, :, None] - x[:, None, :]) ** 2)  # (nW, N, N)
    a = attn.double().reshape(B, nW, heads, N, N) * real[None, :, None, None, :]  # padded keys dropped
    a = a / a.sum(dim=-1, keepdim=True).clamp(min=1e-300)
    per_query = (a * d[None, :, None]).sum(dim=-1)  # (B, nW, heads, N)
    per_query = per_query * real[None, :, None, :]  # padded queries dropped
    total = per_query.sum(dim=(1, 3))  # (B, heads)
    out = total / int(real.sum())
    return out if attn.dtype == torch.float64 else out.float()


def window_attention_distance(attn: Tensor, geom: WindowGeometry, token_stride_px: int | tuple[int, int]) -> Tensor:
    """(heads,) mean attention distance in input pixels of one windowed block, averaged over the batch
    and the queries (see :func:`window_attention_distance_per_image`)."""
    return window_attention_distance_per_image(attn, geom, token_stride_px).mean(dim=0)


def stage_distances(per_block: Sequence[Tensor], stage_of_block: Sequence[int]) -> list[Tensor]:
    """Per stage, the (heads,) distances of its blocks averaged over the blocks (stages in order)."""
    if len(per_block) != len(stage_of_block):
        raise ValueError(f"stage_distances: {len(per_block)} blocks but {len(stage_of_block)} stage labels")
    out = []
    for s in sorted(set(stage_of_block)):
        out.append(torch.stack([d for d, t in zip(per_block, stage_of_block) if t == s]).mean(dim=0))
    return out


class WindowDistanceMeter:
    """Accumulates each windowed block's per-head mean attention distance (pixels) over batches."""

    def __init__(self) -> None:
        self._sum: list[Tensor] | None = None
        self._count = 0
        self.stages: list[int] = []  # stage of each block
        self.strides: list[tuple[int, int]] = []  # pixels between tokens at each block
        self.steps: list[Step] = []  # the last batch's steps

    def update(self, attentions: Sequence[Tensor], steps: Sequence[Step], patch_size: int | tuple[int, int]) -> None:
        """Add a batch: one (B*nW, heads, N, N) attention per block and the forward's steps."""
        blocks = _check_attentions(attentions, steps, "WindowDistanceMeter")
        strides = token_strides(steps, patch_size)
        per_block = [window_attention_distance_per_image(a, g, s).double().sum(dim=0)
                     for a, g, s in zip(attentions, blocks, strides)]
        if self._sum is not None and [t.shape for t in per_block] != [t.shape for t in self._sum]:
            raise ValueError("WindowDistanceMeter: the blocks or heads changed between batches")
        self._sum = per_block if self._sum is None else [a + b for a, b in zip(self._sum, per_block)]
        self._count += attentions[0].shape[0] // blocks[0].num_windows
        self.stages = stage_of_blocks(steps)
        self.strides = strides
        self.steps = list(steps)

    @property
    def count(self) -> int:
        return self._count

    def compute(self) -> list[Tensor]:
        """One (heads,) tensor per block: distances in pixels averaged over all images seen."""
        if self._sum is None:
            raise ValueError("WindowDistanceMeter: no images seen")
        return [(s / self._count).float() for s in self._sum]

    def compute_stages(self) -> list[Tensor]:
        """One (heads,) tensor per stage: the block distances averaged over the stage's blocks."""
        return stage_distances(self.compute(), self.stages)
