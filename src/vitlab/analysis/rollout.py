"""Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers", arXiv:2005.00928).

Each layer's attention is fused over heads, the identity is added for the residual path and the rows
are renormalised; the per-layer matrices are multiplied from the first layer to the last, which
tracks how much of each input token reaches each output token. The row of the class token (or, for a
model that pools by averaging, the mean of the patch-token rows) over the patch tokens is the map the
ViT paper draws in its Figure 6.

The gradient-weighted variant (as popularised by Chefer et al. 2021 and jacobgil/vit-explain) weights
every head's attention by the gradient of the chosen class score before fusing, keeps the positive
part and averages over heads, so that different classes give different maps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

HeadFusion = Literal["mean", "max", "min"]


def fuse_heads(attn: Tensor, head_fusion: HeadFusion = "mean") -> Tensor:
    """(B, heads, N, N) -> (B, N, N) by the mean, max or min over heads."""
    if head_fusion == "mean":
        return attn.mean(dim=1)
    if head_fusion == "max":
        return attn.amax(dim=1)
    if head_fusion == "min":
        return attn.amin(dim=1)
    raise ValueError(f"head_fusion must be 'mean', 'max' or 'min', got {head_fusion!r}")


def discard_lowest(attn: Tensor, ratio: float, *, num_prefix_tokens: int = 1) -> Tensor:
    """Zero the ``ratio`` fraction of lowest entries of each (N, N) matrix of ``attn`` (B, N, N).

    The columns of the prefix tokens are never discarded: attention to the class token is where much of
    the mass sits in later layers, and dropping it would leave rows that no longer describe the model.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {ratio}")
    if ratio == 0.0:
        return attn
    B, N, _ = attn.shape
    p = num_prefix_tokens
    candidates = N * (N - p)
    k = int(candidates * ratio)
    if k == 0:
        return attn
    ranked = attn.clone()
    ranked[:, :, :p] = float("inf")  # prefix columns are never among the lowest
    idx = ranked.reshape(B, N * N).topk(k, dim=-1, largest=False).indices  # (B, k) flat positions
    out = attn.reshape(B, N * N).clone()
    out.scatter_(1, idx, 0.0)
    return out.reshape(B, N, N)


def embed_square(fused: Tensor, num_tokens: int, *, num_prefix_tokens: int) -> Tensor:
    """Place one layer's head-fused (B, Nq, Nk) attention in the model's full (B, T, T) token space.

    Not every layer attends over all T = prefix + patches tokens: CaiT's self-attention layers see the
    patches only (the class token joins later), its class-attention layers have the class token as the
    only query. Tokens a layer does not update pass through it unchanged, so their rows are identity
    rows; with this, one rollout covers every family whose tokens share one sequence.
    """
    B, nq, nk = fused.shape
    T, p = num_tokens, num_prefix_tokens
    if nq == nk == T:
        return fused
    out = torch.eye(T, dtype=fused.dtype, device=fused.device).expand(B, T, T).clone()
    if nk == T and nq < T:  # class attention: the first nq tokens query everything
        out[:, :nq] = fused
    elif nq == nk == T - p:  # self-attention among the patch tokens only
        out[:, p:, p:] = fused
    else:
        raise ValueError(f"attention of {nq} queries x {nk} keys does not map onto {T} tokens "
                         f"({p} prefix); windowed or pooled attention is not supported by rollout")
    return out


def _add_identity_and_normalise(a: Tensor) -> Tensor:
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    a = a + eye
    return a / a.sum(dim=-1, keepdim=True)


def rollout_fused(fused: list[Tensor], *, discard_ratio: float = 0.0, num_prefix_tokens: int = 1) -> Tensor:
    """Roll out already head-fused (B, N, N) matrices, first layer first; returns (B, N, N)."""
    if not fused:
        raise ValueError("rollout needs at least one attention layer")
    joint = None
    for a in fused:
        a = discard_lowest(a.float(), discard_ratio, num_prefix_tokens=num_prefix_tokens)
        a = _add_identity_and_normalise(a)
        # later layers act on the output of earlier ones: joint_l = A_l @ joint_{l-1}
        joint = a if joint is None else a @ joint
    return joint


def attention_rollout(
    attentions: list[Tensor],
    *,
    head_fusion: HeadFusion = "mean",
    discard_ratio: float = 0.0,
    num_prefix_tokens: int = 1,
) -> Tensor:
    """Rollout of per-layer (B, heads, Nq, Nk) attention; returns the joint attention (B, T, T).

    Layers over a subset of the tokens are placed in the full token space with :func:`embed_square`;
    T is the largest key count among the layers.
    """
    T = max(a.shape[-1] for a in attentions)
    fused = [embed_square(fuse_heads(a, head_fusion), T, num_prefix_tokens=num_prefix_tokens) for a in attentions]
    return rollout_fused(fused, discard_ratio=discard_ratio, num_prefix_tokens=num_prefix_tokens)


def gradient_rollout(
    attentions: list[Tensor],
    gradients: list[Tensor],
    *,
    discard_ratio: float = 0.0,
    num_prefix_tokens: int = 1,
) -> Tensor:
    """Rollout of (attention * d score / d attention), positive part, mean over heads; (B, N, N)."""
    if len(attentions) != len(gradients):
        raise ValueError(f"gradient_rollout: {len(attentions)} attention maps but {len(gradients)} gradients")
    T = max(a.shape[-1] for a in attentions)
    fused = [embed_square((a * g).clamp(min=0).mean(dim=1), T, num_prefix_tokens=num_prefix_tokens)
             for a, g in zip(attentions, gradients)]
    return rollout_fused(fused, discard_ratio=discard_ratio, num_prefix_tokens=num_prefix_tokens)


def token_relevance(joint: Tensor, *, num_prefix_tokens: int, use_class_token: bool,
                    query_weights: Tensor | None = None, class_rows: Sequence[int] = (0,)) -> Tensor:
    """Relevance of each patch token, (B, num_patches), read off a (B, N, N) token-to-token matrix.

    With a class token that the head reads, its row; otherwise (average pooling, no class token) the
    mean of the patch tokens' rows, since the head reads their mean. ``class_rows``: the prefix tokens whose
    heads are averaged into the prediction (a distilled DeiT: (0, 1), class and distillation token), whose
    rows are averaged likewise. ``query_weights`` (B, num_patches), or (B, N) over every token: the head reads
    that weighted sum of the tokens instead (CCT's sequence pooling, SigLIP's attention pool), so the rows are
    weighted by it.
    """
    p = num_prefix_tokens
    if query_weights is not None:
        N = joint.shape[1]
        if query_weights.shape[1] not in (N - p, N):
            raise ValueError(f"token_relevance: query_weights over {query_weights.shape[1]} tokens, expected "
                             f"{N - p} patch tokens or all {N} tokens")
        rows = joint[:, N - query_weights.shape[1]:, p:]  # (B, Nq, num_patches)
        return torch.einsum("bq,bqk->bk", query_weights.to(joint.dtype), rows)  # (B, num_patches)
    if use_class_token:
        if p == 0:
            raise ValueError("token_relevance: use_class_token needs a prefix token")
        rows = list(class_rows)
        if not rows or min(rows) < 0 or max(rows) >= p:
            raise ValueError(f"token_relevance: class_rows {tuple(class_rows)} are not among the {p} prefix tokens")
        return joint[:, rows, p:].mean(dim=1)
    return joint[:, p:, p:].mean(dim=1)


def relevance_to_image(relevance: Tensor, grid: tuple[int, int], image_size: tuple[int, int],
                       covered: tuple[int, int] | None = None) -> Tensor:
    """(B, rows*cols) patch relevance -> (B, H, W) map, bilinearly upsampled to the image. ``covered``: the (h, w)
    the patches cover where it is less than the image (a grid floored as timm's, ``drop_remainder``): the map is
    upsampled to it and the uncovered last rows / columns are 0."""
    B = relevance.shape[0]
    m = relevance.reshape(B, 1, grid[0], grid[1]).float()  # (B, 1, rows, cols)
    h, w = tuple(covered) if covered is not None else tuple(image_size)
    m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
    if (h, w) != tuple(image_size):
        m = F.pad(m, (0, image_size[1] - w, 0, image_size[0] - h))
    return m[:, 0]  # (B, H, W)


def normalize_map(m: Tensor) -> Tensor:
    """Scale each (H, W) map of (B, H, W) to [0, 1]; a constant map becomes all zeros."""
    lo = m.flatten(1).amin(dim=1)[:, None, None]
    hi = m.flatten(1).amax(dim=1)[:, None, None]
    return (m - lo) / (hi - lo).clamp(min=1e-12)
