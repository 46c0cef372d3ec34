"""Figures of the analysis tools, drawn with matplotlib's Agg canvas (no display, no pyplot state).

Every function writes one PNG of exactly ``size`` = (width, height) pixels and returns its path.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

DPI = 100


def _figure(size: tuple[int, int]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def display_text(text: str) -> str:
    """``text`` that matplotlib can draw and a UTF-8 stream can print: a file name that is not valid UTF-8 (its
    bytes kept as surrogates by os.fsdecode) shows those bytes as ``\\xff`` escapes."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _save(fig, path: str | Path) -> Path:
    from vitlab.checkpoints.io import atomic_write

    # renamed into place: a symbolic link at ``path`` is replaced, never written through; no bbox_inches="tight":
    # it would change the pixel size
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=DPI, format="png"))


def _to_hwc(image: Tensor) -> np.ndarray:
    """(C, H, W) in [0, 1] -> (H, W, 3) or (H, W) numpy for imshow."""
    img = image.detach().float().clamp(0, 1).cpu()
    if img.shape[0] == 1:
        return img[0].numpy()
    if img.shape[0] != 3:
        return img.mean(dim=0).numpy()
    return img.permute(1, 2, 0).numpy()  # (H, W, 3)


def explain_figure(image: Tensor, relevance: Tensor, path: str | Path, *, title: str = "",
                   size: tuple[int, int] = (900, 340)) -> Path:
    """Image | relevance map | overlay. ``image`` (C, H, W) in [0, 1]; ``relevance`` (H, W) in [0, 1]."""
    fig = _figure(size)
    img = _to_hwc(image)
    rel = relevance.detach().float().cpu().numpy()
    gray = img.ndim == 2
    panels = (("image", None), ("relevance", rel), ("overlay", rel))
    for i, (name, m) in enumerate(panels):
        ax = fig.add_subplot(1, 3, i + 1)
        if name != "relevance":
            ax.imshow(img, cmap="gray" if gray else None, vmin=0, vmax=1, interpolation="nearest")
        if m is not None:
            ax.imshow(m, cmap="jet", vmin=0, vmax=1, alpha=0.5 if name == "overlay" else 1.0,
                      interpolation="bilinear")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(display_text(title), fontsize=11)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.03, top=0.80, wspace=0.05)
    return _save(fig, path)


def attention_distance_figure(distances: Tensor, path: str | Path, *, layers: list[int] | None = None,
                              title: str = "", size: tuple[int, int] = (640, 480)) -> Path:
    """Mean attention distance against depth, one point per head (the paper's Figure 7, right).

    ``distances``: (layers, heads) in pixels; ``layers``: the 1-based depth of each row (default 1..L).
    """
    d = distances.detach().float().cpu().numpy()
    heads = d.shape[1]
    depth = np.asarray(layers if layers is not None else range(1, d.shape[0] + 1))
    fig = _figure(size)
    ax = fig.add_subplot(1, 1, 1)
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    for h in range(heads):
        ax.scatter(depth, d[:, h], s=18, color=cmap(h % 20), label=f"head {h + 1}")
    ax.set_xlabel("network depth (layer)")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.set_xticks(depth)
    ax.set_ylim(0, float(np.nanmax(d)) * 1.08 + 1e-6)  # headroom so the top points are not clipped
    ax.grid(alpha=0.3)
    if heads <= 16:
        ax.legend(fontsize=7, ncol=2, loc="best")
    ax.set_title(display_text(title or "mean attention distance"), fontsize=10)
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.12, top=0.9)
    return _save(fig, path)


def _mosaic(tiles: np.ndarray, cols: int, pad: int, fill: float) -> np.ndarray:
    """(n, h, w[, 3]) tiles -> one image of ceil(n/cols) x cols tiles with ``pad`` pixels between them."""
    n, h, w = tiles.shape[:3]
    rows = math.ceil(n / cols)
    shape = (rows * (h + pad) - pad, cols * (w + pad) - pad) + tiles.shape[3:]
    out = np.full(shape, fill, dtype=np.float32)
    for i in range(n):
        r, c = divmod(i, cols)
        out[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = tiles[i]
    return out


def position_similarity_figure(sim: Tensor, grid: tuple[int, int], path: str | Path, *, title: str = "",
                               size: tuple[int, int] = (640, 560)) -> Path:
    """The paper's grid of grids: tile (r, c) is the cosine similarity of position (r, c) with all others.

    ``sim``: (rows*cols, rows*cols).
    """
    rows, cols = grid
    tiles = sim.detach().float().cpu().numpy().reshape(rows * cols, rows, cols)
    mosaic = _mosaic(tiles, cols, pad=1, fill=np.nan)  # NaN gaps render as the background
    fig = _figure(size)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(mosaic, cmap="viridis", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_xticks([(c + 0.5) * (cols + 1) - 1 for c in range(cols)], [str(c + 1) for c in range(cols)], fontsize=6)
    ax.set_yticks([(r + 0.5) * (rows + 1) - 1 for r in range(rows)], [str(r + 1) for r in range(rows)], fontsize=6)
    ax.set_xlabel("input patch column")
    ax.set_ylabel("input patch row")
    fig.subplots_adjust(left=0.1, right=0.86, bottom=0.1, top=0.92)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03, label="cosine similarity")
    ax.set_title(display_text(title or "position embedding similarity"), fontsize=10)
    return _save(fig, path)


def filters_figure(components: Tensor, path: str | Path, *, title: str = "",
                   size: tuple[int, int] = (640, 420)) -> Path:
    """Principal components of the embedding filters, each scaled to [0, 1] and drawn as RGB or gray.

    ``components``: (k, C, P, P).
    """
    k, C = components.shape[:2]
    c = components.detach().float().cpu()
    lo = c.flatten(1).amin(dim=1)[:, None, None, None]
    hi = c.flatten(1).amax(dim=1)[:, None, None, None]
    c = (c - lo) / (hi - lo).clamp(min=1e-12)  # each component to [0, 1] on its own scale
    if C == 3:
        tiles = c.permute(0, 2, 3, 1).numpy()  # (k, P, P, 3)
        fill = 1.0
    else:
        tiles = c.mean(dim=1).numpy()  # gray; non-RGB inputs show the channel mean
        fill = np.nan
    ncols = min(7, k)
    mosaic = _mosaic(tiles, ncols, pad=1, fill=fill)
    fig = _figure(size)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(mosaic, cmap=None if C == 3 else "gray", interpolation="nearest")
    ax.axis("off")
    ax.set_title(display_text(title or f"embedding filters: first {k} principal components"), fontsize=10)
    return _save(fig, path)


def to_display(image: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """Undo the model's normalisation: (C, H, W) normalised -> [0, 1]."""
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (image.detach().float().cpu() * s + m).clamp(0, 1)
