"""Capture a model's attention weights and token states in one forward pass.

The layers' capture mode (:func:`vitlab.layers.capture_attention`) computes the softmax weights
explicitly only while the context is open, so the model's default fused path is untouched; forward
hooks on the blocks (the modules that own an attention layer) record the token states, and one on an
attention pool (SigLIP's head) its weights over the tokens. The result
also carries what the analysis tools need to place tokens on the image: the patch grid, the patch
size in pixels and the number of prefix tokens.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vitlab.layers import AttentionPoolLatent, CapturableAttention, capture_attention


@dataclass(frozen=True, kw_only=True)
class TokenLayout:
    """Where the tokens of a sequence sit on the image.

    Args:
        grid: (rows, cols) of patch tokens.
        patch_size: (height, width) in input pixels that one patch token covers.
        num_prefix_tokens: leading tokens that are not on the grid (class, distillation, ...).
    """

    grid: tuple[int, int]
    patch_size: tuple[int, int]
    num_prefix_tokens: int

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclass(frozen=True, kw_only=True)
class Captured:
    """What one captured forward pass saw.

    Args:
        logits: (B, K) model output, equal to ``model(x)`` up to float rounding.
        attentions: one (B, heads, N, N) tensor per attention layer, in execution order.
        token_maps: per attention map, whether it is token-to-token (False for XCiT's channel
            attention and Linformer's projected keys; see ``CapturableAttention.token_map``).
        tokens: one (B, N, D) tensor per block: the block's output tokens.
        layout: the patch grid of this input.
        layers: per attention map, the attention module that made it.
        pool_attention: (B, heads, N) the weights of the model's attention pool (SigLIP's ``global_pool="map"``)
            over the N tokens it pooled, for the pool's last call; None if no pool ran.
    """

    logits: Tensor
    attentions: list[Tensor]
    tokens: list[Tensor]
    layout: TokenLayout
    token_maps: tuple[bool, ...] = ()
    layers: tuple[nn.Module, ...] = ()
    pool_attention: Tensor | None = None


def this_thread_only(fn: Callable[..., None]) -> Callable[..., None]:
    """A module hook that acts only in the thread that made it: forward hooks fire in every thread, and
    another thread running the same model (a service answering predictions) must not feed a capture, as
    :func:`~vitlab.layers.capture_attention` does for the attention maps."""
    owner = threading.get_ident()

    def hook(*args: object) -> None:
        if threading.get_ident() == owner:
            fn(*args)

    return hook


def attention_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules that own an attention layer (the transformer blocks), in registration order.

    Defined structurally, not by class name, so that every family whose attention derives from
    :class:`CapturableAttention` is covered.
    """
    blocks: list[nn.Module] = []
    for module in model.modules():
        if any(isinstance(child, CapturableAttention) for child in module.children()):
            blocks.append(module)
    return blocks


def token_layout(model: nn.Module, image_size: tuple[int, int], num_tokens: int | None = None) -> TokenLayout:
    """The patch grid of ``model`` for an input of ``image_size`` (H, W).

    Uses the patch embedding's ``dynamic_grid`` when the model has one; otherwise infers the grid from
    ``num_tokens`` and the image's aspect ratio.
    """
    prefix = int(getattr(model, "num_prefix_tokens", 0))
    pe = getattr(model, "patch_embed", None)
    h, w = image_size
    if pe is not None and hasattr(pe, "dynamic_grid"):
        grid = tuple(pe.dynamic_grid(h, w))
        patch = tuple(pe.patch_size)
        return TokenLayout(grid=(int(grid[0]), int(grid[1])), patch_size=(int(patch[0]), int(patch[1])),
                           num_prefix_tokens=prefix)
    if num_tokens is None:
        raise ValueError(f"token_layout: {type(model).__name__} has no patch_embed.dynamic_grid; "
                         "pass the number of tokens to infer the grid")
    n = num_tokens - prefix
    # rows/cols = h/w and rows*cols = n  =>  rows = sqrt(n * h / w)
    rows = max(1, round(math.sqrt(n * h / w)))
    cols = n // rows
    if rows * cols != n:
        raise ValueError(f"token_layout: cannot lay {n} patch tokens on a grid for a {h}x{w} image")
    return TokenLayout(grid=(rows, cols), patch_size=(h // rows, w // cols), num_prefix_tokens=prefix)


def capture(model: nn.Module, x: Tensor, *, with_grad: bool = False) -> Captured:
    """Run ``model`` on ``x`` (B, C, H, W) and keep every attention map and block output.

    Args:
        with_grad: keep the autograd graph, so that gradients of the logits with respect to the
            attention maps can be taken (gradient-weighted rollout); otherwise runs under no_grad.
    Example::

        out = vitlab.analysis.capture(model, images)
        out.attentions[-1]  # (B, heads, N, N) of the last layer
    """
    blocks = attention_blocks(model)
    if not blocks:
        raise ValueError(f"capture: {type(model).__name__} has no attention layers to capture")
    tokens: list[Tensor] = []
    hooks = [b.register_forward_hook(this_thread_only(lambda _m, _i, out: tokens.append(out))) for b in blocks]
    pooled: list[Tensor] = []

    def keep_pool(pool: AttentionPoolLatent, inputs: tuple, _out: object) -> None:
        with torch.no_grad():
            pooled.append(pool.attention_weights(inputs[0]).detach())

    hooks += [m.register_forward_hook(this_thread_only(keep_pool)) for m in model.modules()
              if isinstance(m, AttentionPoolLatent)]
    try:
        with torch.set_grad_enabled(with_grad), capture_attention(model) as maps:
            if with_grad and not x.requires_grad:
                # makes the maps part of a graph even when the model's parameters are frozen
                x = x.detach().requires_grad_(True)
            logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    first_token_map = next((a for a, t in zip(maps, maps.token_maps) if t), None)
    layout = token_layout(model, (x.shape[-2], x.shape[-1]),
                          first_token_map.shape[-1] if first_token_map is not None else None)
    return Captured(logits=logits, attentions=list(maps), tokens=tokens, layout=layout,
                    token_maps=tuple(maps.token_maps), layers=tuple(maps.layers),
                    pool_attention=pooled[-1] if pooled else None)
