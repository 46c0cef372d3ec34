"""Position-embedding similarity (ViT paper, Figure 7 centre).

The cosine similarity of every patch position's embedding with every other; drawn as a grid of small
grids, tile (r, c) showing how similar position (r, c) is to each position. A learned table that has
discovered the 2-D image topology shows a bright blob around each tile's own position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True, kw_only=True)
class PositionTable:
    """Args:
    table: (rows*cols, D) one embedding per patch position, prefix entries removed.
    grid: (rows, cols).
    kind: "learn" (learned, what the paper draws) or "sincos" (fixed, shown for comparison).
    """

    table: Tensor
    grid: tuple[int, int]
    kind: str


def position_table(model: nn.Module) -> PositionTable | None:
    """The model's per-patch position embeddings, or None if it has none (``pos_embed="none"``, CNNs)."""
    own = getattr(model, "position_grid_table", None)
    if callable(own):  # a family whose tables are not ViT's (CrossViT's two, TNT's patch_pos, T2T-ViT's)
        got = own()
        if got is None:
            return None
        table, grid, kind = got
        return PositionTable(table=table.detach().float(), grid=(int(grid[0]), int(grid[1])), kind=kind)
    cfg = getattr(model, "cfg", None)
    kind = getattr(cfg, "pos_embed", None)
    pe = getattr(model, "patch_embed", None)
    if pe is None or not hasattr(pe, "grid_size"):
        return None
    grid = tuple(int(g) for g in pe.grid_size)
    if not hasattr(cfg, "pos_embed"):
        # a family without a pos_embed option (CaiT, BEiT with use_abs_pos_emb, BEiT-3): a stored table is learned
        kind = "learn" if _learned_table(model, grid) is not None else None
    if kind not in ("learn", "sincos"):
        return None
    if kind == "learn" and getattr(model, "pos_embed", None) is not None:
        prefix = int(getattr(model, "pos_embed_prefix", model.num_prefix_tokens))
        table = model.pos_embed.detach()[0, prefix:]  # (rows*cols, D): the class token's entry dropped
    elif kind == "sincos" and hasattr(model, "pos_embed_fixed"):
        table = model.pos_embed_fixed.detach()[0]
    else:
        return None
    if table.shape[0] != grid[0] * grid[1]:
        raise ValueError(f"position_table: {table.shape[0]} entries do not fill the {grid[0]}x{grid[1]} grid")
    return PositionTable(table=table.float(), grid=grid, kind=kind)


def _learned_table(model: nn.Module, grid: tuple[int, ...]) -> Tensor | None:
    """``model.pos_embed`` where it is a learned (1, prefix + rows*cols, D) table whose prefix entries are
    ``pos_embed_prefix`` (else at most the model's prefix tokens); None otherwise."""
    table = getattr(model, "pos_embed", None)
    if not isinstance(table, nn.Parameter) or table.ndim != 3 or table.shape[0] != 1:
        return None
    extra = table.shape[1] - grid[0] * grid[1]  # the table's prefix entries
    prefix = getattr(model, "pos_embed_prefix", None)
    if prefix is not None and extra != int(prefix):
        return None
    if not 0 <= extra <= int(getattr(model, "num_prefix_tokens", 0)):
        return None
    return table


def position_similarity(table: Tensor) -> Tensor:
    """(N, D) embeddings -> (N, N) cosine similarities."""
    t = F.normalize(table.float(), dim=-1)
    return t @ t.T


def position_similarity_summary(sim: Tensor, grid: tuple[int, int]) -> dict[str, float]:
    """Numbers behind the figure: mean similarity of grid neighbours vs. of all other positions.

    A table that encodes 2-D distance has neighbours (same row or column, one step away) clearly more
    similar than positions at large.
    """
    rows, cols = grid
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    r, c = r.flatten(), c.flatten()
    manhattan = (r[:, None] - r[None, :]).abs() + (c[:, None] - c[None, :]).abs()  # (N, N)
    off = manhattan > 0
    neighbours = manhattan == 1
    out = {"mean_offdiag": float(sim[off].mean()) if off.any() else float("nan"),
           "mean_neighbours": float(sim[neighbours].mean()) if neighbours.any() else float("nan")}
    far = manhattan >= max(1, (rows + cols) // 2)
    out["mean_far"] = float(sim[far].mean()) if far.any() else float("nan")
    return out
