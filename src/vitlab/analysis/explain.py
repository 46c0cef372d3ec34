"""One call from images to relevance maps.

Methods for every model:

- "rollout", "grad-rollout", "last-layer": attention rollout (Abnar & Zuidema), its class-specific
  gradient-weighted form, and the last layer's class-token attention. Defined where tokens attend to
  tokens of one sequence (ViT, DeiT, CaiT); families whose attention is windowed, pooled or cross-branch
  register their own form of these methods (:func:`register_explainer`). A head that pools by attention
  (SigLIP's ``global_pool="map"``) reads a weighted mix of the tokens: the rollouts weight the tokens' rows by
  the pool's weights (mean over its heads), and "last-layer" is the pool's own attention.
- "grad-cam": Grad-CAM (Selvaraju et al. 2017) on the output of the model's ``cam_layer()`` (default: the
  last transformer block, its patch tokens laid on the grid): channels weighted by the mean gradient of
  the class score, positive part. Also for models without token-to-token attention (MLP-Mixer, XCiT's
  channel attention, Linformer, MobileViT), which name their last spatial stage in ``cam_layer()``.
- "grad-input": gradient x input, summed over colour channels, absolute value. Any differentiable classifier.

Task models (DETR, SETR) have no one class score: DETR offers its decoder cross-attention ("last-layer"), SETR
nothing. The gradient methods need autograd: they refuse to run inside ``torch.inference_mode()``.

``method="auto"`` picks the family's ``explain_default`` where it declares one (DETR: "last-layer", the
decoder's cross-attention), else rollout where the model supports it, else Grad-CAM; the chosen method is recorded
in :attr:`Explanation.method`.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from vitlab.analysis.capture import attention_blocks, capture, this_thread_only, token_layout
from vitlab.analysis.rollout import (
    HeadFusion,
    attention_rollout,
    embed_square,
    fuse_heads,
    gradient_rollout,
    relevance_to_image,
    token_relevance,
)
from vitlab.layers import PatchEmbed

Method = Literal["auto", "rollout", "grad-rollout", "last-layer", "grad-cam", "grad-input"]
METHODS: tuple[str, ...] = ("auto", "rollout", "grad-rollout", "last-layer", "grad-cam", "grad-input")
ATTENTION_METHODS: tuple[str, ...] = ("rollout", "grad-rollout", "last-layer")
GRADIENT_METHODS: tuple[str, ...] = ("grad-cam", "grad-input")
# the options each one uses (others are ignored, with a warning)
HEAD_FUSION_METHODS: tuple[str, ...] = ("rollout", "last-layer")
DISCARD_RATIO_METHODS: tuple[str, ...] = ("rollout", "grad-rollout")

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Explanation:
    """Args:
    maps: (B, H, W) relevance at image resolution (not normalised; see ``normalize_map``).
    patch_maps: (B, rows, cols) relevance on the grid the method works on (patch tokens, a feature
        map, or the pixels themselves for grad-input).
    probs: (B, K) the model's scores of the logits (:func:`class_scores`: softmax, sigmoid or raw values).
    target: (B,) the class each map explains (the prediction unless one was asked for).
    method: the method that made the maps (what "auto" resolved to).
    """

    maps: Tensor
    patch_maps: Tensor
    probs: Tensor
    target: Tensor
    method: str = ""


# fn(model, x, *, target, head_fusion, discard_ratio) -> Explanation, for one (model class, method)
Explainer = Callable[..., Explanation]
_EXPLAINERS: dict[tuple[type, str], Explainer] = {}
_loaded = False


def register_explainer(model_cls: type, method: str) -> Callable[[Explainer], Explainer]:
    """Register a family's own form of an attention method (e.g. rollout through Swin's windows).

    Modules ``vitlab/analysis/explain_*.py`` are imported on first use, so a family's explainers live in
    one file of their own. The function receives ``target`` as a (B,) tensor or None (the prediction).
    """
    if method not in ATTENTION_METHODS:
        raise ValueError(f"register_explainer: {method!r} is not one of {', '.join(ATTENTION_METHODS)}")

    def deco(fn: Explainer) -> Explainer:
        _EXPLAINERS[(model_cls, method)] = fn
        return fn

    return deco


def _load_family_explainers() -> None:
    global _loaded
    if _loaded:
        return
    import vitlab.analysis as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("explain_"):
            importlib.import_module(f"vitlab.analysis.{info.name}")
    _loaded = True


def _family_explainer(model: nn.Module, method: str) -> Explainer | None:
    _load_family_explainers()
    for cls in type(model).__mro__:
        fn = _EXPLAINERS.get((cls, method))
        if fn is not None:
            return fn
    return None


def _token_attention(model: nn.Module) -> bool:
    """Whether the model's attention is token-to-token over one sequence (generic rollout applies)."""
    return bool(getattr(model, "token_attention", False))


def _task(model: nn.Module) -> str:
    return getattr(model, "task", "classification")


def methods_for(model: nn.Module) -> tuple[str, ...]:
    """The methods that give a meaningful map for ``model`` (besides "auto").

    Task models (DETR, SETR) have no one class score to differentiate: only the attention maps their family
    registers (DETR: each object's cross-attention as "last-layer").
    """
    attention = [m for m in ATTENTION_METHODS
                 if _token_attention(model) or _family_explainer(model, m) is not None]
    if _task(model) != "classification":
        return tuple(m for m in attention if _family_explainer(model, m) is not None)
    return (*attention, *GRADIENT_METHODS)


def _not_available(model: nn.Module, method: str, available: tuple[str, ...]) -> str:
    name = type(model).__name__
    task = _task(model)
    if task == "detection":
        return (f"explain: {method!r} does not apply to {name}, a detector: it predicts a set of objects, not "
                f"one class score; use method='last-layer' (the most confident object's decoder cross-attention, "
                f"vitlab.analysis.explain_detr.detection_attention for every object) or `vitlab detect "
                f"--attention`")
    if task != "classification":
        return (f"explain: {name} ({task}) is not supported: explain maps one class score of a classifier, and a "
                f"{task} model predicts a map per pixel")
    return (f"explain: {method!r} is not defined for {name} (it has no token-to-token attention over one "
            f"sequence); use one of: {', '.join(available)}")


def resolve_method(model: nn.Module, method: str) -> str:
    """The method ``explain`` runs for ``method`` ("auto" resolved); refuses one not available for ``model``.

    "auto" with a windowed family's rollout may still fall back to Grad-CAM in :func:`explain`, for an input
    size at which the model refuses its window analysis.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    available = methods_for(model)
    if method == "auto":
        preferred = getattr(model, "explain_default", None)  # a family's own best map (DETR: cross-attention)
        if preferred in available:
            return preferred
        method = "rollout" if "rollout" in available else "grad-cam"
    if method not in available:
        raise ValueError(_not_available(model, method, available))
    return method


def uses_class_token(model: nn.Module) -> bool:
    """Whether the head reads the class token (True) or an average of the patch tokens (False)."""
    return getattr(model, "global_pool", "token") == "token" and getattr(model, "num_prefix_tokens", 0) > 0


def class_token_rows(model: nn.Module) -> tuple[int, ...]:
    """The prefix tokens whose heads make the prediction: (0,) for a class token; (0, 1) for a distilled DeiT,
    whose prediction averages the class-token and distillation-token heads (outside distilled training)."""
    two_heads = getattr(model, "dist_token", None) is not None and getattr(model, "head_dist", None) is not None
    if two_heads and not (getattr(model, "distilled_training", False) and model.training):
        return (0, 1)
    return (0,)


def window_analysis_refused(model: nn.Module) -> bool:
    """Whether a windowed model refuses its window analysis after the last forward (a Hugging Face-order Swin
    whose windows do not divide the maps at this input size)."""
    modules = getattr(model, "analysis_modules", None)
    if not callable(modules):
        return False
    try:
        modules()
    except ValueError:
        return True
    return False


def _warn_ignored(method: str, head_fusion: str, discard_ratio: float) -> None:
    if head_fusion != "mean" and method not in HEAD_FUSION_METHODS:
        log.warning("head_fusion=%r is ignored by %s (it applies to %s)", head_fusion, method,
                    " and ".join(HEAD_FUSION_METHODS))
    if discard_ratio != 0 and method not in DISCARD_RATIO_METHODS:
        log.warning("discard_ratio=%g is ignored by %s (it applies to %s)", discard_ratio, method,
                    " and ".join(DISCARD_RATIO_METHODS))


def _autograd_input(x: Tensor) -> Tensor:
    """``x`` usable in an autograd graph; refuses inside torch.inference_mode, where no graph is recorded."""
    if torch.is_inference_mode_enabled():
        raise ValueError("explain: the gradient methods (grad-rollout, grad-cam, grad-input) need autograd, which "
                         "torch.inference_mode() turns off; call explain outside torch.inference_mode (inside "
                         "torch.no_grad() is fine)")
    if x.is_inference():  # made under inference_mode: a normal copy can join a graph
        with torch.inference_mode(False):
            x = x.clone()
    return x


def class_scores(model: nn.Module, logits: Tensor) -> Tensor:
    """(B, K) scores of ``logits`` by the model's ``score_function`` (softmax; sigmoid for a multi-label head; the
    raw values for regression), as ``vitlab.predict`` scores them."""
    from vitlab.inference import score_kind, to_scores

    return to_scores(logits.detach().float(), score_kind(model))


def class_targets(logits: Tensor, target: int | Tensor | None) -> Tensor:
    """(B,) class indices: the prediction, or the asked-for class(es), range-checked."""
    B = logits.shape[0]
    if target is None:
        return logits.detach().argmax(dim=-1)
    tgt = torch.as_tensor(target, device=logits.device).long()
    tgt = tgt.expand(B) if tgt.ndim == 0 else tgt
    if (tgt < 0).any() or (tgt >= logits.shape[-1]).any():
        raise ValueError(f"explain: target class out of range for {logits.shape[-1]} classes")
    return tgt


def explain(
    model: nn.Module,
    x: Tensor,
    *,
    method: Method = "auto",
    target: int | Tensor | None = None,
    head_fusion: HeadFusion = "mean",
    discard_ratio: float = 0.0,
) -> Explanation:
    """Relevance maps of ``model`` for images ``x`` (B, C, H, W).

    Args:
        method: see the module docstring; "auto" picks rollout where defined (and, for windowed attention,
            possible at this input size), else Grad-CAM.
        target: class index (or (B,) indices) for the class-specific methods (grad-rollout, grad-cam,
            grad-input); default: the predicted class. Rollout and last-layer maps do not depend on it.
        head_fusion: how heads are combined by rollout and last-layer (a warning where it is ignored).
        discard_ratio: fraction of the lowest attentions dropped per layer by rollout and grad-rollout.
    """
    auto = method == "auto"
    method = resolve_method(model, method)
    _warn_ignored(method, head_fusion, discard_ratio)
    # the gradient methods differentiate whatever the caller's grad mode (inference code runs under no_grad)
    needs_grad = method in GRADIENT_METHODS or method == "grad-rollout"
    if needs_grad:
        x = _autograd_input(x)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad() if needs_grad else contextlib.nullcontext():
            if method in GRADIENT_METHODS:
                fn = _grad_cam if method == "grad-cam" else _grad_input
                return fn(model, x, target=target)
            family_fn = _family_explainer(model, method)
            if family_fn is not None:
                try:
                    return family_fn(model, x, target=target, head_fusion=head_fusion, discard_ratio=discard_ratio)
                except ValueError:
                    if not (auto and window_analysis_refused(model)):
                        raise
                # "auto": the windows cannot be analysed at this input size; Grad-CAM still applies
                with torch.enable_grad():
                    return _grad_cam(model, _autograd_input(x), target=target)
            return _token_explain(model, x, method=method, target=target, head_fusion=head_fusion,
                                  discard_ratio=discard_ratio)
    finally:
        model.train(was_training)


def _token_explain(model: nn.Module, x: Tensor, *, method: str, target: int | Tensor | None,
                   head_fusion: HeadFusion, discard_ratio: float) -> Explanation:
    out = capture(model, x, with_grad=method == "grad-rollout")
    B = x.shape[0]
    logits = out.logits
    probs = class_scores(model, logits)
    tgt = class_targets(logits, target)
    layout = out.layout
    p = layout.num_prefix_tokens
    # an attention pool (SigLIP's head) reads its weighted mix of the tokens: the rows are weighted by it
    pool = out.pool_attention  # (B, heads, N) or None
    query = pool.mean(dim=1) if pool is not None else None  # (B, N)
    if method == "rollout":
        joint = attention_rollout(out.attentions, head_fusion=head_fusion, discard_ratio=discard_ratio,
                                  num_prefix_tokens=p)
    elif method == "grad-rollout":
        score = logits.gather(1, tgt[:, None]).sum()
        grads = torch.autograd.grad(score, out.attentions)
        joint = gradient_rollout([a.detach() for a in out.attentions], [g.detach() for g in grads],
                                 discard_ratio=discard_ratio, num_prefix_tokens=p)
    elif pool is not None:  # last-layer: the pool's attention, the last before the head
        query = fuse_heads(pool[:, :, None], head_fusion)[:, 0]  # (B, heads, 1, N) -> (B, N)
        joint = torch.eye(p + layout.num_patches, device=x.device).expand(B, -1, -1)
    else:
        last = out.attentions[-1].float()
        joint = embed_square(fuse_heads(last, head_fusion), p + layout.num_patches, num_prefix_tokens=p)
    relevance = token_relevance(joint.detach(), num_prefix_tokens=p, use_class_token=uses_class_token(model),
                                class_rows=class_token_rows(model), query_weights=query)
    patch_maps = relevance.reshape(B, *layout.grid)  # (B, rows, cols)
    pe = getattr(model, "patch_embed", None)
    patch = pe.patch_size if isinstance(pe, PatchEmbed) else None
    covered = (layout.grid[0] * patch[0], layout.grid[1] * patch[1]) if patch is not None else None
    maps = relevance_to_image(relevance, layout.grid, (x.shape[-2], x.shape[-1]), covered)
    return Explanation(maps=maps, patch_maps=patch_maps, probs=probs, target=tgt.detach(), method=method)


def cam_layer(model: nn.Module) -> tuple[nn.Module, bool]:
    """The module Grad-CAM weighs, and whether its input (True) or output (False) is the map.

    ``model.cam_layer()`` where a family defines it (its output is used); else the INPUT of the last
    transformer block: the class token reads the patch tokens in the last block's attention, so the
    last block's output patch tokens never reach a class-token head and have no gradient.
    """
    own = getattr(model, "cam_layer", None)
    if callable(own):
        return own(), False
    blocks = attention_blocks(model)
    if not blocks:
        raise ValueError(f"grad-cam: {type(model).__name__} defines no cam_layer() and has no attention blocks")
    return blocks[-1], True


def _as_feature_map(model: nn.Module, out: Tensor | tuple, image_size: tuple[int, int]) -> Tensor:
    """A cam layer's output as (B, C, h, w): NCHW maps as they are, (B, h, w, C) where the model says
    ``cam_channels_last = True``, token sequences (B, N, D) without their prefix tokens on the patch grid."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    if out.ndim == 4:
        return out.permute(0, 3, 1, 2) if getattr(model, "cam_channels_last", False) else out
    if out.ndim == 3:
        layout = token_layout(model, image_size, out.shape[1])
        p = out.shape[1] - layout.num_patches
        B, _, D = out.shape
        # (B, N, D) -> (B, D, rows, cols)
        return out[:, p:].transpose(1, 2).reshape(B, D, *layout.grid)
    raise ValueError(f"grad-cam: the cam layer of {type(model).__name__} gave a {out.ndim}-D output")


def _grad_cam(model: nn.Module, x: Tensor, *, target: int | Tensor | None) -> Explanation:
    seen: list[Tensor] = []
    layer, use_input = cam_layer(model)
    # only this thread's forward: another thread running the model would hand over a tensor of another graph
    if use_input:
        hook = layer.register_forward_pre_hook(this_thread_only(lambda _m, args: seen.append(args[0])))
    else:
        hook = layer.register_forward_hook(this_thread_only(lambda _m, _i, out: seen.append(out)))
    try:
        with torch.enable_grad():
            # an input that requires grad: the graph reaches the cam layer also when the weights are frozen
            # (requires_grad_(False), as for a linear probe)
            logits = model(x.detach().requires_grad_(True))
            tgt = class_targets(logits, target)
            score = logits.gather(1, tgt[:, None]).sum()
            raw = seen[-1][0] if isinstance(seen[-1], (tuple, list)) else seen[-1]
            (grad,) = torch.autograd.grad(score, raw)
    finally:
        hook.remove()
    image_size = (x.shape[-2], x.shape[-1])
    fmap = _as_feature_map(model, raw.detach(), image_size)
    gmap = _as_feature_map(model, grad, image_size)
    weights = gmap.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1): channel importance
    cam = (weights * fmap).sum(dim=1).clamp(min=0)  # (B, h, w)
    maps = _cam_to_image(model, cam, image_size)
    probs = class_scores(model, logits)
    return Explanation(maps=maps, patch_maps=cam, probs=probs, target=tgt.detach(), method="grad-cam")


def _cam_to_image(model: nn.Module, cam: Tensor, image_size: tuple[int, int]) -> Tensor:
    """(B, h, w) Grad-CAM -> (B, H, W). A windowed model (Swin) pads the image to whole patches and each
    patch merging pads odd maps, so its last-stage cells cover ph * 2^k pixels past the image's edge: the map
    is placed on those pixels (upsampled to the padded extent, cropped); other maps are stretched over the image."""
    B, h, w = cam.shape
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if callable(getattr(model, "analysis_modules", None)) and patch is not None:
        from vitlab.analysis.explain_windows import windowed_map_to_image
        from vitlab.layers.helpers import to_2tuple

        ph, pw = to_2tuple(patch)
        gh, gw = -(-image_size[0] // ph), -(-image_size[1] // pw)  # first-stage grid (ceil)
        scale = 1
        while (gh, gw) != (h, w) and (gh > h or gw > w):  # each merging halves the grid, rounding up
            gh, gw, scale = -(-gh // 2), -(-gw // 2), scale * 2
        if (gh, gw) == (h, w):
            return windowed_map_to_image(cam, (ph * scale, pw * scale), image_size)
    return relevance_to_image(cam.reshape(B, h * w), (h, w), image_size)


def _grad_input(model: nn.Module, x: Tensor, *, target: int | Tensor | None) -> Explanation:
    with torch.enable_grad():
        xi = x.detach().clone().requires_grad_(True)
        logits = model(xi)
        tgt = class_targets(logits, target)
        score = logits.gather(1, tgt[:, None]).sum()
        (grad,) = torch.autograd.grad(score, xi)
    maps = (grad * xi).detach().sum(dim=1).abs()  # (B, H, W)
    probs = class_scores(model, logits)
    return Explanation(maps=maps, patch_maps=maps, probs=probs, target=tgt.detach(), method="grad-input")
