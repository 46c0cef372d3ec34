"""One call from images to relevance maps: rollout, gradient-weighted rollout or last-layer attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from vitlab.analysis.capture import capture
from vitlab.analysis.rollout import (
    HeadFusion,
    attention_rollout,
    embed_square,
    fuse_heads,
    gradient_rollout,
    relevance_to_image,
    token_relevance,
)

Method = Literal["rollout", "grad-rollout", "last-layer"]
METHODS: tuple[str, ...] = ("rollout", "grad-rollout", "last-layer")


@dataclass(frozen=True, kw_only=True)
class Explanation:
    """Args:
    maps: (B, H, W) relevance at image resolution (not normalised; see ``normalize_map``).
    patch_maps: (B, rows, cols) relevance on the patch grid.
    probs: (B, K) softmax of the logits.
    target: (B,) the class each map explains (the prediction unless one was asked for).
    """

    maps: Tensor
    patch_maps: Tensor
    probs: Tensor
    target: Tensor


def uses_class_token(model: nn.Module) -> bool:
    """Whether the head reads the class token (True) or an average of the patch tokens (False)."""
    return getattr(model, "global_pool", "token") == "token" and getattr(model, "num_prefix_tokens", 0) > 0


def explain(
    model: nn.Module,
    x: Tensor,
    *,
    method: Method = "rollout",
    target: int | Tensor | None = None,
    head_fusion: HeadFusion = "mean",
    discard_ratio: float = 0.0,
) -> Explanation:
    """Relevance maps of ``model`` for images ``x`` (B, C, H, W).

    Args:
        method: "rollout" (Abnar & Zuidema), "grad-rollout" (class-specific) or "last-layer"
            (the last layer's attention of the class token, fused over heads).
        target: class index (or (B,) indices) for grad-rollout; default: the predicted class.
            Plain rollout and last-layer maps do not depend on it.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    was_training = model.training
    model.eval()
    try:
        out = capture(model, x, with_grad=method == "grad-rollout")
    finally:
        model.train(was_training)
    B = x.shape[0]
    logits = out.logits
    probs = logits.detach().float().softmax(dim=-1)
    if target is None:
        tgt = probs.argmax(dim=-1)
    else:
        tgt = torch.as_tensor(target, device=logits.device).long()
        tgt = tgt.expand(B) if tgt.ndim == 0 else tgt
        if (tgt < 0).any() or (tgt >= logits.shape[-1]).any():
            raise ValueError(f"explain: target class out of range for {logits.shape[-1]} classes")
    layout = out.layout
    p = layout.num_prefix_tokens
    if method == "rollout":
        joint = attention_rollout(out.attentions, head_fusion=head_fusion, discard_ratio=discard_ratio,
                                  num_prefix_tokens=p)
    elif method == "grad-rollout":
        score = logits.gather(1, tgt[:, None]).sum()
        grads = torch.autograd.grad(score, out.attentions)
        joint = gradient_rollout([a.detach() for a in out.attentions], [g.detach() for g in grads],
                                 discard_ratio=discard_ratio, num_prefix_tokens=p)
    else:
        last = out.attentions[-1].float()
        joint = embed_square(fuse_heads(last, head_fusion), p + layout.num_patches, num_prefix_tokens=p)
    relevance = token_relevance(joint.detach(), num_prefix_tokens=p, use_class_token=uses_class_token(model))
    patch_maps = relevance.reshape(B, *layout.grid)  # (B, rows, cols)
    maps = relevance_to_image(relevance, layout.grid, (x.shape[-2], x.shape[-1]))
    return Explanation(maps=maps, patch_maps=patch_maps, probs=probs, target=tgt.detach())
