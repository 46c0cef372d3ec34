"""DETR's explanation: each object query's cross-attention over the image in the last decoder layer
(Carion et al., 2020, figure 6), and the same map as the "last-layer" method of ``vitlab.explain``
for the most confident object."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vitlab.analysis.explain import Explanation, register_explainer
from vitlab.analysis.rollout import HeadFusion, fuse_heads
from vitlab.layers import CapturableAttention, capture_attention
from vitlab.layers.attention import attention_sinks
from vitlab.models.detr import DETR


@torch.no_grad()
def detection_attention(model: DETR, x: Tensor, pixel_mask: Tensor | None = None, *,
                        head_fusion: HeadFusion = "mean") -> tuple[dict[str, Tensor], Tensor]:
    """The model's outputs and the last decoder layer's cross-attention, its heads fused by ``head_fusion``
    (mean, max or min): (B, queries, h, w) on the backbone's feature grid."""
    last = model.decoder.layers[-1].cross_attn
    maps: list[Tensor] = []
    sinks = {m: None for m in model.modules() if isinstance(m, CapturableAttention)}  # only the last one reports
    sinks[last] = maps.append
    with attention_sinks(sinks):
        out = model(x, pixel_mask)
    h, w = model._feature_size
    attn = fuse_heads(maps[-1], head_fusion)  # (B, Q, h*w)
    return out, attn.reshape(attn.shape[0], attn.shape[1], h, w)


@register_explainer(DETR, "last-layer")
def _last_layer(model: DETR, x: Tensor, target: Tensor | None = None, head_fusion: HeadFusion = "mean",
                **_: object) -> Explanation:
    """The cross-attention of the most confident object query (or of query ``target``)."""
    out, maps = detection_attention(model, x, head_fusion=head_fusion)
    probs = out["logits"].softmax(-1)[..., :-1]
    best = probs.max(-1).values.argmax(-1) if target is None else target
    patch = maps[torch.arange(x.shape[0]), best]
    full = F.interpolate(patch[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return Explanation(maps=full, patch_maps=patch, probs=probs[torch.arange(x.shape[0]), best], target=best,
                       method="last-layer")


__all__ = ["capture_attention", "detection_attention"]
