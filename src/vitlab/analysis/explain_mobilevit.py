"""MobileViT's own "last-layer" map: how much attention each patch of the last MobileViT stage receives.

MobileViT has no class token and runs attention per pixel position of its 2x2 patches, over the patches of
one stage (strides 8, 16, 32), so generic rollout does not apply. What the last stage's last attention says
is still readable: for multi-head attention (v1, v3-S/XS/XXS) the weights (B, P*heads, N, N) averaged
over heads, pixel positions and queries give the attention each of the N patches receives; for separable
attention (v2, v3-0.5..1.0) the context scores (B, P, 1, N) averaged over the P positions are exactly the
weight each patch gets in the context vector. The (B, N) relevance is laid on the patch grid of that stage
(input / 64, rounded up) and upsampled to the image. Grad-CAM (``method="auto"``) remains the class-specific map.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vitlab.analysis.explain import Explanation, class_targets, register_explainer
from vitlab.analysis.rollout import relevance_to_image
from vitlab.layers import capture_attention
from vitlab.models.mobilevit import MobileViT


@register_explainer(MobileViT, "last-layer")
def mobilevit_last_layer(model: MobileViT, x: Tensor, *, target: int | Tensor | None = None,
                         **_: object) -> Explanation:
    sizes: list[tuple[int, int]] = []
    block = model.stages[-1][1]
    hook = block.register_forward_pre_hook(lambda _m, args: sizes.append(tuple(args[0].shape[-2:])))
    try:
        with torch.no_grad(), capture_attention(model) as maps:
            logits = model(x)
    finally:
        hook.remove()
    h, w = sizes[-1]
    grid = (math.ceil(h / block.patch[0]), math.ceil(w / block.patch[1]))
    last = maps[-1].float()  # (B, heads', Nq, N)
    relevance = last.mean(dim=(1, 2))  # (B, N): attention received per patch, averaged over heads and queries
    B = x.shape[0]
    return Explanation(maps=relevance_to_image(relevance, grid, (x.shape[-2], x.shape[-1])),
                       patch_maps=relevance.reshape(B, *grid), probs=logits.float().softmax(dim=-1),
                       target=class_targets(logits, target), method="last-layer")
