"""The one hook through which masked-image objectives (MPP, MAE, BEiT) reach into a backbone.

A model that supports masking takes ``forward_features(x, mask=masker)``. Right after the patch
embedding, *before* position embeddings and prefix tokens, the model calls::

    tokens, keep = masker(tokens, grid)

with the patch embeddings ``tokens`` (B, N, D) in row-major grid order and ``grid`` = (rows, cols).
The masker returns

* ``tokens`` (B, N, D): the embeddings the encoder should see, e.g. some replaced by a learned mask
  embedding (BEiT, the ViT paper's masked patch prediction); return them unchanged to only drop;
* ``keep`` (B, K) long or None: the patch positions the encoder keeps, per sample, in the order given
  (MAE). The model adds each kept token's own position embedding, drops the others and *then* puts the
  prefix tokens (class token, with their position entries) in front, so the output is
  (B, prefix + K, D). None keeps all N.

The masker owns its parameters (mask embeddings) and records what it did (noise, masks, restore
indices) for the objective to read afterwards; the model never stores it. Nothing else about the
model is needed, so objectives do not reach into a backbone's attributes.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class TokenMasker(Protocol):
    def __call__(self, tokens: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor | None]: ...


def keep_tokens(x: Tensor, keep: Tensor) -> Tensor:
    """Gather tokens ``x`` (B, N, D) at positions ``keep`` (B, K) -> (B, K, D)."""
    if keep.ndim != 2 or keep.shape[0] != x.shape[0]:
        raise ValueError(f"token mask: keep must be (batch, kept) indices, got {tuple(keep.shape)} for tokens "
                         f"{tuple(x.shape)}")
    return torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
