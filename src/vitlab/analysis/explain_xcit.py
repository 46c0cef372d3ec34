"""XCiT's own attention explanation: the last class-attention map.

XCiT's XCA layers attend between channels (head_dim x head_dim per head), so rollout over tokens is
undefined for it; its class-attention blocks, however, are token maps: the class token's query against
the class token and every patch, (B, heads, 1, 1 + N). "last-layer" reads the last of them (the paper's
Figure 4 draws these maps), heads fused, class-token entry dropped. With ``global_pool="avg"`` the head
reads the mean patch token, which class attention never updates, so the map is refused. "auto" falls back to
Grad-CAM (on the last XCA block's patch tokens), since rollout is not registered.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vitlab.analysis.capture import token_layout
from vitlab.analysis.explain import Explanation, class_scores, class_targets, register_explainer
from vitlab.analysis.rollout import HeadFusion, fuse_heads, relevance_to_image
from vitlab.layers import ClassAttention, capture_attention
from vitlab.models.xcit import XCiT


@register_explainer(XCiT, "last-layer")
def xcit_last_class_attention(model: nn.Module, x: Tensor, *, target: int | Tensor | None,
                              head_fusion: HeadFusion = "mean", discard_ratio: float = 0.0) -> Explanation:
    if getattr(model, "global_pool", "token") != "token":
        raise ValueError(f"explain: 'last-layer' (the class token's class attention) does not apply to this XCiT with "
                         f"global_pool={model.global_pool!r}: its head reads the mean of the patch tokens, never the "
                         f"class token; use grad-cam or grad-input")
    with torch.no_grad(), capture_attention(model) as maps:
        logits = model(x)
    ca = [a for a, layer in zip(maps, maps.layers) if isinstance(layer, ClassAttention)]
    if not ca:
        raise ValueError("explain: this XCiT has no class-attention blocks (cls_attn_layers=0); use grad-cam")
    layout = token_layout(model, (x.shape[-2], x.shape[-1]))
    relevance = fuse_heads(ca[-1].float(), head_fusion)[:, 0, 1:]  # (B, N): class token -> patches
    B = x.shape[0]
    return Explanation(maps=relevance_to_image(relevance, layout.grid, (x.shape[-2], x.shape[-1])),
                       patch_maps=relevance.reshape(B, *layout.grid), probs=class_scores(model, logits),
                       target=class_targets(logits, target), method="last-layer")
