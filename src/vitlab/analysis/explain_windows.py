"""Relevance maps for windowed-attention models (Swin): "rollout", "grad-rollout" and "last-layer" carried
through windows, cyclic shifts and patch merging to the first-stage token grid (:mod:`vitlab.analysis.windows`).

Works for any model that describes its windows:

- ``model.analysis_modules()`` lists its windowed blocks and patch mergings in execution order; after a
  forward, every block holds ``last_geometry`` (a :class:`~vitlab.layers.window_geometry.WindowGeometry`)
  and every merging ``last_input_size`` (H, W);
- its window attentions are :class:`~vitlab.layers.CapturableAttention` modules, one call per block,
  emitting (B*nW, heads, N, N) weights;
- ``model.patch_embed.patch_size`` is (ph, pw) input pixels per first-stage token;
- the head reads the average of the final tokens (global average pooling).

A family opts in with ``register_windowed(ModelClass)``; ``vitlab.analysis.explain`` then dispatches the
three attention methods here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitlab.analysis.explain import ATTENTION_METHODS, Explanation, class_scores, class_targets, register_explainer
from vitlab.analysis.rollout import HeadFusion, relevance_to_image
from vitlab.analysis.windows import (
    Step,
    analysis_steps,
    first_grid,
    window_gradient_rollout,
    window_last_layer,
    window_rollout,
)
from vitlab.layers import capture_attention
from vitlab.layers.helpers import to_2tuple
from vitlab.layers.window_geometry import WindowGeometry

__all__ = ["WindowCaptured", "capture_windowed", "explain_windowed", "is_windowed", "register_windowed",
           "windowed_map_to_image"]


def is_windowed(model: nn.Module) -> bool:
    """Whether ``model`` describes its windowed attention (has ``analysis_modules()``)."""
    return callable(getattr(model, "analysis_modules", None))


@dataclass(frozen=True, kw_only=True)
class WindowCaptured:
    """What one captured forward of a windowed model saw.

    Args:
        logits: (B, K) model output.
        attentions: one (B*nW, heads, N, N) window attention per block, in execution order.
        steps: the blocks' window geometries and the mergings' input sizes, in execution order.
        grid: (H0, W0) first-stage token grid.
        patch_size: (ph, pw) input pixels per first-stage token.
    """

    logits: Tensor
    attentions: list[Tensor]
    steps: list[Step]
    grid: tuple[int, int]
    patch_size: tuple[int, int]


def capture_windowed(model: nn.Module, x: Tensor, *, with_grad: bool = False) -> WindowCaptured:
    """Run ``model`` on ``x`` (B, C, H, W) keeping every window attention and the windows' geometry.

    Args:
        with_grad: keep the autograd graph so that gradients of the logits with respect to the
            attention maps can be taken (gradient-weighted rollout); otherwise runs under no_grad.
    """
    if not is_windowed(model):
        raise ValueError(f"{type(model).__name__} has no analysis_modules(): not a windowed-attention model")
    pe = getattr(model, "patch_embed", None)
    if getattr(pe, "patch_size", None) is None:
        raise ValueError(f"{type(model).__name__} has no patch_embed.patch_size: cannot place tokens on the image")
    with torch.set_grad_enabled(with_grad), capture_attention(model) as maps:
        if with_grad and not x.requires_grad:
            # makes the maps part of a graph even when the model's parameters are frozen
            x = x.detach().requires_grad_(True)
        logits = model(x)
    steps = analysis_steps(model)
    blocks = sum(isinstance(s, WindowGeometry) for s in steps)
    if len(maps) != blocks:
        raise ValueError(f"capture_windowed: {type(model).__name__} emitted {len(maps)} attention maps for "
                         f"{blocks} windowed blocks")
    return WindowCaptured(logits=logits, attentions=list(maps), steps=steps, grid=first_grid(steps),
                          patch_size=to_2tuple(pe.patch_size))


def windowed_map_to_image(relevance: Tensor, patch_size: tuple[int, int], image_size: tuple[int, int]) -> Tensor:
    """(B, H0, W0) token relevance -> (B, H, W) at image resolution.

    The grid covers H0 * ph >= H pixels when the patch embedding padded the image: the map is upsampled
    to the grid's pixel extent and cropped to the image, so tokens stay over the pixels they saw.
    """
    B, H0, W0 = relevance.shape
    ph, pw = patch_size
    H, W = image_size
    if H0 * ph >= H and W0 * pw >= W:
        m = relevance[:, None].float()  # (B, 1, H0, W0)
        m = F.interpolate(m, size=(H0 * ph, W0 * pw), mode="bilinear", align_corners=False)
        return m[:, 0, :H, :W]
    return relevance_to_image(relevance.reshape(B, H0 * W0), (H0, W0), image_size)


def explain_windowed(
    model: nn.Module,
    x: Tensor,
    *,
    method: str,
    target: int | Tensor | None = None,
    head_fusion: HeadFusion = "mean",
    discard_ratio: float = 0.0,
) -> Explanation:
    """Relevance maps of a windowed-attention model for images ``x`` (B, C, H, W).

    Args:
        method: "rollout" (attention rollout through windows and mergings), "grad-rollout" (attention
            weighted by the gradient of the target class score, positive part, mean over heads) or
            "last-layer" (the last block's attention, carried back through the mergings only).
        target: class index or (B,) indices for grad-rollout; default: the prediction.
    Returns:
        :class:`~vitlab.analysis.explain.Explanation` with ``patch_maps`` on the first-stage token grid.
    """
    if method not in ATTENTION_METHODS:
        raise ValueError(f"explain_windowed: method must be one of {', '.join(ATTENTION_METHODS)}, got {method!r}")
    cap = capture_windowed(model, x, with_grad=method == "grad-rollout")
    logits = cap.logits
    probs = class_scores(model, logits)
    tgt = class_targets(logits, target)
    if method == "rollout":
        rel = window_rollout([a.detach() for a in cap.attentions], cap.steps, head_fusion=head_fusion,
                             discard_ratio=discard_ratio)
    elif method == "grad-rollout":
        score = logits.gather(1, tgt[:, None]).sum()
        grads = torch.autograd.grad(score, cap.attentions)
        rel = window_gradient_rollout([a.detach() for a in cap.attentions], [g.detach() for g in grads],
                                      cap.steps, discard_ratio=discard_ratio)
    else:
        rel = window_last_layer([a.detach() for a in cap.attentions], cap.steps, head_fusion=head_fusion)
    rel = rel.float()  # (B, H0, W0)
    maps = windowed_map_to_image(rel, cap.patch_size, (x.shape[-2], x.shape[-1]))
    return Explanation(maps=maps, patch_maps=rel, probs=probs, target=tgt.detach(), method=method)


def register_windowed(model_cls: type) -> None:
    """Make ``vitlab.analysis.explain`` use the windowed forms of rollout, grad-rollout and last-layer
    for ``model_cls`` (and its subclasses), e.g. ``register_windowed(SwinTransformer)``."""
    for method in ATTENTION_METHODS:
        register_explainer(model_cls, method)(functools.partial(explain_windowed, method=method))
