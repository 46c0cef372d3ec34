"""Principal components of the patch-embedding filters (ViT paper, Figure 7 left).

The patch projection is a (D, C, P, P) convolution: D filters of C*P*P pixels each. Their leading
principal components are the directions the model spends most of its embedding on; the paper finds
they resemble plausible basis functions for a low-dimensional representation of each patch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True, kw_only=True)
class FilterComponents:
    """Args:
    components: (k, C, P, P) orthonormal principal directions (as flattened vectors).
    explained_variance_ratio: (k,) the fraction of the filters' variance each one carries.
    """

    components: Tensor
    explained_variance_ratio: Tensor


def patch_embedding_weight(model: nn.Module) -> Tensor:
    """The (D, C, P, P) weight of a model's pixel patch projection."""
    pe = getattr(model, "patch_embed", None)
    proj = getattr(pe, "proj", None)
    w = getattr(proj, "weight", None)
    if w is None or w.ndim != 4 or w.shape[-1] == 1:
        raise ValueError(f"{type(model).__name__} has no single linear projection of raw pixel patches "
                         "(`patch_embed.proj`, a P x P kernel with P > 1; its stem is e.g. a CNN, a convolution stack, "
                         "a soft split or two branches); embedding filters apply to models that embed raw pixel patches")
    return w.detach()


def filter_components(weight: Tensor, k: int = 28) -> FilterComponents:
    """Leading ``k`` principal components of (D, C, P, P) filters, each flattened to C*P*P."""
    D, C, P, Q = weight.shape
    x = weight.reshape(D, C * P * Q).double()  # (D, C*P*P): one filter per row
    x = x - x.mean(dim=0, keepdim=True)
    # right singular vectors of the centred data are the principal directions, already orthonormal
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    k = min(k, vh.shape[0])
    var = s**2
    ratio = var[:k] / var.sum().clamp(min=1e-30)
    return FilterComponents(components=vh[:k].float().reshape(k, C, P, Q),
                            explained_variance_ratio=ratio.float())
