"""Capture and roll out chosen attention layers only, for families that mix several kinds of attention.

TNT runs an inner (pixel) transformer beside its outer (patch) one, T2T-ViT runs attention over the
soft-split tokens of its tokens-to-token module before the backbone: generic rollout must not see those
maps, since they are over other sequences. :func:`capture_tagged` records the maps of the modules asked
for, each with a tag, in execution order; :func:`explain_token_layers` is the ViT explainer restricted
to layers that attend over one (prefix + patches) sequence.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping

import torch
from torch import Tensor, nn

from vitlab.analysis.capture import TokenLayout, this_thread_only
from vitlab.analysis.rollout import (
    HeadFusion,
    attention_rollout,
    embed_square,
    fuse_heads,
    gradient_rollout,
    relevance_to_image,
    token_relevance,
)
from vitlab.layers import CapturableAttention
from vitlab.layers.attention import attention_sinks

log = logging.getLogger(__name__)


def capture_tagged(model: nn.Module, x: Tensor, modules: Mapping[CapturableAttention, Hashable], *,
                   with_grad: bool = False) -> tuple[Tensor, list[tuple[Hashable, Tensor]]]:
    """Run ``model`` on ``x``; return its logits and the (tag, weights) of the given modules, in call order."""
    seen: list[tuple[Hashable, Tensor]] = []
    # the other attention modules report nowhere during this forward (an enclosing capture of the user's does not
    # get the explainer's forward), and every sink is given back afterwards
    sinks = {m: None for m in model.modules() if isinstance(m, CapturableAttention)}
    sinks.update({m: (lambda a, tag=tag: seen.append((tag, a))) for m, tag in modules.items()})
    with attention_sinks(sinks), torch.set_grad_enabled(with_grad):
        if with_grad and not x.requires_grad:
            x = x.detach().requires_grad_(True)  # the maps join a graph even with frozen parameters
        logits = model(x)
    return logits, seen


def explain_token_layers(model: nn.Module, x: Tensor, modules: list[CapturableAttention], layout: TokenLayout, *,
                         method: str, target, head_fusion: HeadFusion, discard_ratio: float,
                         use_class_token: bool = True, pool_logits: nn.Module | None = None):
    """Rollout, gradient rollout or last-layer map over ``modules``, whose maps are all over the sequence
    ``layout`` describes (prefix tokens, then the patch grid).

    ``pool_logits``: a module whose output (B, N, 1) is the head's softmax logits over the N patch tokens
    (CCT's sequence pooling): the rows of the joint attention are weighted by that softmax; the
    "last-layer" map is then the pooling weights themselves (the last attention before the head).
    """
    from vitlab.analysis.explain import Explanation, class_targets

    pooled: list[Tensor] = []
    hook = (pool_logits.register_forward_hook(this_thread_only(lambda _m, _i, out: pooled.append(out.detach())))
            if pool_logits is not None else None)
    try:
        logits, seen = capture_tagged(model, x, {m: i for i, m in enumerate(modules)},
                                      with_grad=method == "grad-rollout")
    finally:
        if hook is not None:
            hook.remove()
    query = pooled[-1].squeeze(-1).float().softmax(dim=1)[:, layout.num_prefix_tokens:] if pooled else None
    maps = [a for _, a in seen]
    probs = logits.detach().float().softmax(dim=-1)
    tgt = class_targets(logits, target)
    p = layout.num_prefix_tokens
    if method == "rollout":
        joint = attention_rollout(maps, head_fusion=head_fusion, discard_ratio=discard_ratio, num_prefix_tokens=p)
    elif method == "grad-rollout":
        grads = torch.autograd.grad(logits.gather(1, tgt[:, None]).sum(), maps)
        joint = gradient_rollout([a.detach() for a in maps], [g.detach() for g in grads],
                                 discard_ratio=discard_ratio, num_prefix_tokens=p)
    elif query is not None:  # last-layer: the head's own attention over the tokens
        if head_fusion != "mean":
            log.warning("head_fusion=%r is ignored: the last-layer map of %s is its sequence pooling's weights, "
                        "which have no heads", head_fusion, type(model).__name__)
        joint = torch.eye(p + layout.num_patches, device=query.device).expand(x.shape[0], -1, -1)
    else:
        joint = embed_square(fuse_heads(maps[-1].float(), head_fusion), p + layout.num_patches, num_prefix_tokens=p)
    relevance = token_relevance(joint.detach(), num_prefix_tokens=p, use_class_token=use_class_token,
                                query_weights=query)
    B = x.shape[0]
    return Explanation(maps=relevance_to_image(relevance, layout.grid, (x.shape[-2], x.shape[-1])),
                       patch_maps=relevance.reshape(B, *layout.grid), probs=probs, target=tgt.detach(),
                       method=method)
