"""Attention rollout through CrossViT's two branches and their class-token cross-attention.

The two branches are laid side by side in one token space of T = (1 + N0) + (1 + N1) tokens (small
branch first). A self-attention layer of branch b acts on b's block and leaves the other branch's tokens
unchanged (identity rows); a fusion layer of branch i gives the row of i's class token: attention to
itself and to branch j's patch tokens. Each layer's head-fused matrix gets the identity added for the
residual path and its rows renormalised, as in Abnar & Zuidema's rollout, and the matrices are multiplied
in execution order. The head averages both branches' logits, so the relevance of a patch is the mean of
the two class tokens' rows (with ``global_pool="avg"``, of each branch's mean patch-token row, what that
head reads); a patch's relevance is spread over its pixels (branch b's map is multiplied by its number of
patches before the two are added at image resolution).

"last-layer": each branch's class token over the OTHER branch's patches in the last fusion, the same
weighting; with ``global_pool="avg"`` (the fusions reach no patch token the head reads) each branch's last
self-attention, its patch queries' mean row over the patches. ``patch_maps`` are the image maps averaged onto
the small branch's (finer) grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vitlab.analysis.explain import Explanation, class_scores, class_targets, register_explainer
from vitlab.analysis.partial_capture import capture_tagged
from vitlab.analysis.rollout import HeadFusion, discard_lowest, fuse_heads, relevance_to_image
from vitlab.models.crossvit import CrossViT


def _tagged_modules(model: CrossViT) -> dict:
    tags = {}
    for msb in model.blocks:
        for b, seq in enumerate(msb.blocks):
            for blk in seq:
                tags[blk.attn] = ("self", b)
        for i, fusion in enumerate(msb.fusion):
            tags[fusion.attn] = ("cross", i)
    return tags


def _layer_matrix(kind: str, b: int, fused: Tensor, sizes: tuple[int, int], discard_ratio: float) -> Tensor:
    """One layer's head-fused map (B, Nq, Nk) placed in the joint (B, T, T) token space."""
    B = fused.shape[0]
    offsets = (0, sizes[0])
    T = sizes[0] + sizes[1]
    out = torch.eye(T, dtype=fused.dtype, device=fused.device).expand(B, T, T).clone()
    o = offsets[b]
    if kind == "self":
        out[:, o:o + sizes[b], o:o + sizes[b]] = discard_lowest(fused, discard_ratio, num_prefix_tokens=1)
    else:  # class token of branch b over [itself, patches of the other branch]
        j = 1 - b
        row = torch.zeros(B, T, dtype=fused.dtype, device=fused.device)
        row[:, o] = fused[:, 0, 0]
        row[:, offsets[j] + 1:offsets[j] + sizes[j]] = fused[:, 0, 1:]
        out[:, o] = row
    out = out + torch.eye(T, dtype=out.dtype, device=out.device)
    return out / out.sum(dim=-1, keepdim=True)


def _to_image(model: CrossViT, r0: Tensor, r1: Tensor, image_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Patch relevance of both branches -> (B, H, W) image map and (B, rows0, cols0) map on the small grid."""
    g0, g1 = model.grids
    maps = (relevance_to_image(r0 * r0.shape[-1], g0, image_size)
            + relevance_to_image(r1 * r1.shape[-1], g1, image_size))
    patch_maps = F.adaptive_avg_pool2d(maps[:, None], g0)[:, 0]
    return maps, patch_maps


def _explain(model: CrossViT, x: Tensor, *, method: str, target, head_fusion: HeadFusion,
             discard_ratio: float) -> Explanation:
    logits, seen = capture_tagged(model, x, _tagged_modules(model), with_grad=method == "grad-rollout")
    probs = class_scores(model, logits)
    tgt = class_targets(logits, target)
    sizes = (1 + model.grids[0][0] * model.grids[0][1], 1 + model.grids[1][0] * model.grids[1][1])
    image_size = (x.shape[-2], x.shape[-1])
    avg = model.global_pool == "avg"  # the head reads each branch's mean patch token, not the class tokens
    if method == "last-layer" and avg:
        last_self = {b: a for (kind, b), a in seen if kind == "self"}
        r0, r1 = (fuse_heads(last_self[b].detach().float(), head_fusion)[:, 1:, 1:].mean(dim=1) if b in last_self
                  else torch.full((x.shape[0], sizes[b] - 1), 1.0 / (sizes[b] - 1), device=x.device)
                  for b in (0, 1))
    elif method == "last-layer":
        last = {b: a for (kind, b), a in seen[-2:]}  # the last block's two fusions
        r0 = fuse_heads(last[1].detach().float(), head_fusion)[:, 0, 1:]  # large class token over small patches
        r1 = fuse_heads(last[0].detach().float(), head_fusion)[:, 0, 1:]  # small class token over large patches
    else:
        if method == "grad-rollout":
            grads = torch.autograd.grad(logits.gather(1, tgt[:, None]).sum(), [a for _, a in seen])
            fused = [(a.detach() * g).clamp(min=0).mean(dim=1).float() for (_, a), g in zip(seen, grads)]
        else:
            fused = [fuse_heads(a.detach().float(), head_fusion) for _, a in seen]
        joint = None
        for (kind, b), f in zip((t for t, _ in seen), fused):
            m = _layer_matrix(kind, b, f, sizes, discard_ratio)
            joint = m if joint is None else m @ joint
        o1 = sizes[0]
        if avg:  # each head reads its branch's mean patch token: the mean of those rows, per branch
            row = 0.5 * (joint[:, 1:o1].mean(dim=1) + joint[:, o1 + 1:].mean(dim=1))
        else:
            row = 0.5 * (joint[:, 0] + joint[:, o1])  # both heads' class tokens, averaged like the logits
        r0, r1 = row[:, 1:o1], row[:, o1 + 1:]
    maps, patch_maps = _to_image(model, r0, r1, image_size)
    return Explanation(maps=maps, patch_maps=patch_maps, probs=probs, target=tgt.detach(), method=method)


for _method in ("rollout", "grad-rollout", "last-layer"):
    register_explainer(CrossViT, _method)(
        lambda model, x, *, target, head_fusion, discard_ratio, _m=_method: _explain(
            model, x, method=_m, target=target, head_fusion=head_fusion, discard_ratio=discard_ratio))
