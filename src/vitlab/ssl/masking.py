"""Mask generators for masked image modelling, and the helpers every masked objective shares.

* :class:`RandomMasking` (MAE): per sample, sort uniform noise; the ``int(N * (1 - ratio))`` patches
  with the smallest noise are kept, in that order; ``ids_restore`` puts the sequence back in place and
  ``mask`` is 1 on removed patches (0 = kept), in grid order.
* :class:`BlockMasking` (BEiT, arXiv:2106.08254, algorithm 1): rectangles of at least ``min_patches``
  patches with log-uniform aspect ratio in [0.3, 1/0.3] are added until about ``num_masked`` patches are
  masked.

All draws come from torch's global generator (or an explicit ``generator``), which the training engine
saves and restores for exact resumption.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class RandomMasking:
    """The MAE mask as a :class:`~vitlab.layers.token_mask.TokenMasker`: keeps a random subset of patches.

    After a call, ``mask`` (B, N) float (1 = removed), ``ids_restore`` (B, N), ``ids_keep`` (B, K),
    ``noise`` and ``grid`` describe what was done. ``noise`` (B, N) may be given (parity tests).
    """

    def __init__(self, ratio: float = 0.75, *, noise: Tensor | None = None) -> None:
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"RandomMasking: ratio must lie in [0, 1), got {ratio}")
        self.ratio = ratio
        self.given_noise = noise

    def __call__(self, tokens: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        B, N = tokens.shape[:2]
        noise = self.given_noise
        if noise is None:
            noise = torch.rand(B, N, device=tokens.device)
        elif noise.shape != (B, N):
            raise ValueError(f"RandomMasking: noise must be (batch, patches) = {(B, N)}, got {tuple(noise.shape)}")
        keep = int(N * (1 - self.ratio))
        ids_shuffle = torch.argsort(noise.to(tokens.device), dim=1)  # ascending: small noise is kept
        self.ids_restore = torch.argsort(ids_shuffle, dim=1)
        self.ids_keep = ids_shuffle[:, :keep]
        mask = torch.ones(B, N, device=tokens.device)
        mask[:, :keep] = 0
        self.mask = torch.gather(mask, 1, self.ids_restore)  # back to grid order: (B, N)
        self.noise, self.grid = noise, tuple(grid)
        return tokens, self.ids_keep


class _GridProbe:
    def __call__(self, tokens: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        self.grid = tuple(grid)
        return tokens, torch.zeros(tokens.shape[0], 1, dtype=torch.long, device=tokens.device)


@torch.no_grad()
def patch_grid(model: nn.Module, size: tuple[int, int] | None = None) -> tuple[tuple[int, int], tuple[int, int]]:
    """(grid, patch size) of ``model`` at ``size`` (default: its preprocessing's), asked through the
    masking hook: one forward of a blank image with a single token kept."""
    c, h, w = model.preprocessing.input_size
    h, w = size or (h, w)
    device = next(model.parameters()).device
    probe = _GridProbe()
    was = model.training
    model.eval()
    try:
        model.forward_features(torch.zeros(1, c, h, w, device=device), mask=probe)
    except TypeError as e:
        raise TypeError(f"{getattr(model, 'model_name', type(model).__name__)} has no token-masking hook "
                        f"(forward_features(x, mask=...)); masked objectives need a ViT-like backbone") from e
    finally:
        model.train(was)
    rows, cols = probe.grid
    return (rows, cols), (h // rows, w // cols)


def patchify(x: Tensor, patch: tuple[int, int]) -> Tensor:
    """Images (B, C, H, W) -> patches (B, N, ph * pw * C), pixels of a patch row-major, channels last
    (MAE's and transformers' order)."""
    B, C, H, W = x.shape
    ph, pw = patch
    x = x.reshape(B, C, H // ph, ph, W // pw, pw)  # (B, C, h, ph, w, pw)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, h, w, ph, pw, C)
    return x.reshape(B, (H // ph) * (W // pw), ph * pw * C)


class BlockMasking:
    """BEiT's blockwise mask on a (rows, cols) grid: boolean (rows, cols) per call.

    Args:
        num_masked: target number of masked patches (BEiT: 75 of 196, about 40%).
        min_patches: smallest block (16); max_patches: largest (None: the remaining budget).
        aspect: aspect-ratio range, drawn log-uniformly (0.3 .. 1/0.3).
    """

    def __init__(self, grid: tuple[int, int], num_masked: int, *, min_patches: int = 16,
                 max_patches: int | None = None, aspect: tuple[float, float] = (0.3, 1 / 0.3),
                 attempts: int = 10) -> None:
        self.rows, self.cols = grid
        if not 0 < num_masked <= self.rows * self.cols:
            raise ValueError(f"BlockMasking: num_masked must lie in 1..{self.rows * self.cols}, got {num_masked}")
        self.num_masked = num_masked
        self.min_patches = min_patches
        self.max_patches = max_patches or num_masked
        self.log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
        self.attempts = attempts

    def _rand(self, generator: torch.Generator | None) -> float:
        return float(torch.rand((), generator=generator))

    def _block(self, mask: Tensor, budget: int, generator: torch.Generator | None) -> int:
        """Try to add one block of at most ``budget`` new patches; returns how many were added."""
        for _ in range(self.attempts):
            area = self.min_patches + self._rand(generator) * (budget - self.min_patches)
            ratio = math.exp(self.log_aspect[0] + self._rand(generator) * (self.log_aspect[1] - self.log_aspect[0]))
            h = round(math.sqrt(area * ratio))
            w = round(math.sqrt(area / ratio))
            if 0 < h < self.rows and 0 < w < self.cols:
                top = int(torch.randint(0, self.rows - h + 1, (), generator=generator))
                left = int(torch.randint(0, self.cols - w + 1, (), generator=generator))
                region = mask[top:top + h, left:left + w]
                new = h * w - int(region.sum())
                if 0 < new <= budget:
                    region.fill_(True)
                    return new
        return 0

    def __call__(self, generator: torch.Generator | None = None) -> Tensor:
        mask = torch.zeros(self.rows, self.cols, dtype=torch.bool)
        count = 0
        while count < self.num_masked:
            budget = min(self.num_masked - count, self.max_patches)
            added = self._block(mask, budget, generator)
            if added == 0:
                break
            count += added
        return mask
