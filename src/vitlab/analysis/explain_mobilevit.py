"""MobileViT's own "last-layer" map: how much attention each patch of the last MobileViT stage receives.

MobileViT has no class token and runs attention per pixel position of its 2x2 patches, over the patches of
one stage (strides 8, 16, 32), so generic rollout does not apply. What the last stage's last attention says
is still readable: for multi-head attention (v1, v3-S/XS/XXS) the weights (B, P*heads, N, N) fused over
heads (``head_fusion``) and averaged over pixel positions and queries give the attention each of the N
patches receives; for separable
attention (v2, v3-0.5..1.0) the context scores (B, P, 1, N) averaged over the P positions are exactly the
weight each patch gets in the context vector. The (B, N) relevance is laid on the patch grid of that stage
(input / 64, rounded up) and upsampled to the image. Grad-CAM (``method="auto"``) remains the class-specific map.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from vitlab.analysis.capture import this_thread_only
from vitlab.analysis.explain import Explanation, class_scores, class_targets, register_explainer
from vitlab.analysis.rollout import HeadFusion, fuse_heads, relevance_to_image
from vitlab.layers import capture_attention
from vitlab.layers.attention import FoldedAttention
from vitlab.models.mobilevit import MobileViT

log = logging.getLogger(__name__)


@register_explainer(MobileViT, "last-layer")
def mobilevit_last_layer(model: MobileViT, x: Tensor, *, target: int | Tensor | None = None,
                         head_fusion: HeadFusion = "mean", **_: object) -> Explanation:
    sizes: list[tuple[int, int]] = []
    block = model.stages[-1][1]
    hook = block.register_forward_pre_hook(this_thread_only(lambda _m, args: sizes.append(tuple(args[0].shape[-2:]))))
    try:
        with torch.no_grad(), capture_attention(model) as maps:
            logits = model(x)
    finally:
        hook.remove()
    h, w = sizes[-1]
    grid = (math.ceil(h / block.patch[0]), math.ceil(w / block.patch[1]))
    last = maps[-1].float()  # (B, heads', Nq, N)
    layer = maps.layers[-1]
    B = x.shape[0]
    if isinstance(layer, FoldedAttention):  # (B, P*heads, N, N), position-major
        G, N = layer.groups, last.shape[-1]
        fused = fuse_heads(last.reshape(B * G, -1, N, N), head_fusion)  # (B*P, N, N)
        relevance = fused.reshape(B, G, N, N).mean(dim=(1, 2))  # (B, N): attention received per patch
    else:  # separable attention: one context score per patch and position, no heads
        if head_fusion != "mean":
            log.warning("head_fusion=%r is ignored: %s's separable attention has no heads", head_fusion,
                        type(model).__name__)
        relevance = last.mean(dim=(1, 2))  # (B, N): context weight per patch, averaged over positions
    return Explanation(maps=relevance_to_image(relevance, grid, (x.shape[-2], x.shape[-1])),
                       patch_maps=relevance.reshape(B, *grid), probs=class_scores(model, logits),
                       target=class_targets(logits, target), method="last-layer")
