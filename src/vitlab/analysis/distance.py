"""Mean attention distance (ViT paper, section 4.5 and Figure 7 right).

For each head, the distance in pixels between a query patch's centre and every key patch's centre,
weighted by the attention between them and averaged over query patches; the paper calls it the
analogue of a CNN's receptive field size. Prefix tokens (class token, ...) have no position: they are
left out as queries and as keys, and the weights over the patch keys are renormalised so that each
query's distance stays a weighted average.
"""

from __future__ import annotations

import torch
from torch import Tensor


def patch_centre_distances(grid: tuple[int, int], patch_size: tuple[int, int]) -> Tensor:
    """(rows*cols, rows*cols) Euclidean distances in pixels between patch centres, row-major order."""
    rows, cols = grid
    r, c = torch.meshgrid(torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64),
                          indexing="ij")
    # the +0.5 offsets cancel in differences; only the patch size matters
    pos = torch.stack([r.flatten() * patch_size[0], c.flatten() * patch_size[1]], dim=1)  # (N, 2)
    return torch.cdist(pos, pos)


def mean_attention_distance(
    attn: Tensor, grid: tuple[int, int], patch_size: tuple[int, int], *, num_prefix_tokens: int = 1
) -> Tensor:
    """Per-image, per-head mean attention distance of one layer.

    Args:
        attn: (B, heads, N, N) attention weights, N = prefix + rows*cols.
    Returns:
        (B, heads) distances in pixels, averaged over query patches.
    """
    p = num_prefix_tokens
    n = grid[0] * grid[1]
    if attn.shape[-1] != p + n or attn.shape[-2] != p + n:
        raise ValueError(f"mean_attention_distance: attention of {attn.shape[-1]} tokens does not match "
                         f"{p} prefix + {grid[0]}x{grid[1]} patches")
    a = attn[:, :, p:, p:].double()  # (B, heads, n, n): patch queries to patch keys
    a = a / a.sum(dim=-1, keepdim=True).clamp(min=1e-12)
    d = patch_centre_distances(grid, patch_size).to(a.device)  # (n, n)
    per_query = (a * d).sum(dim=-1)  # (B, heads, n)
    return per_query.mean(dim=-1).float()


class AttentionDistanceMeter:
    """Accumulates the mean attention distance of every layer and head over batches of images."""

    def __init__(self) -> None:
        self._sum: Tensor | None = None  # (layers, heads)
        self._count = 0
        self.layers: list[int] = []  # indices of the attention layers measured

    def update(self, attentions: list[Tensor], grid: tuple[int, int], patch_size: tuple[int, int], *,
               max_prefix: int | None = None) -> None:
        """Add a batch's per-layer (B, heads, N, N) maps.

        Each layer's prefix count is what its token count exceeds the grid by (CaiT's self-attention
        layers have none); layers whose queries are not the patches (class attention) are left out
        and :attr:`layers` lists the ones kept. ``max_prefix`` (the model's prefix-token count) also leaves
        out layers over longer sequences of other tokens (TNT's pixels, T2T-ViT's soft-split tokens).
        """
        n = grid[0] * grid[1]
        longest = None if max_prefix is None else n + max_prefix
        kept = [i for i, a in enumerate(attentions)
                if a.shape[-2] == a.shape[-1] >= n and (longest is None or a.shape[-1] <= longest)]
        if not kept:
            raise ValueError("AttentionDistanceMeter: no layer attends among the patch tokens")
        per_layer = torch.stack([
            mean_attention_distance(attentions[i], grid, patch_size,
                                    num_prefix_tokens=attentions[i].shape[-1] - n).sum(dim=0)
            for i in kept
        ])  # (layers, heads)
        self.layers = kept
        self._sum = per_layer if self._sum is None else self._sum + per_layer
        self._count += attentions[kept[0]].shape[0]

    @property
    def count(self) -> int:
        return self._count

    def compute(self) -> Tensor:
        """(layers, heads) distances in pixels averaged over all images seen."""
        if self._sum is None:
            raise ValueError("AttentionDistanceMeter: no images seen")
        return self._sum / self._count
