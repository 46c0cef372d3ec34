"""What the dense-prediction models (DETR, SETR) share: loading a pretrained backbone into them."""

from __future__ import annotations

import os

from torch import nn


def load_backbone(model: nn.Module, source: str | os.PathLike) -> nn.Module:
    """Load a classifier checkpoint (vitlab, timm, Hugging Face, JAX - whatever ``create_model`` reads)
    into ``model.backbone``: its head is dropped and its position table resampled to the model's
    resolution. Returns ``model``."""
    from vitlab.checkpoints import load_strict
    from vitlab.models.factory import create_model

    cfg = model.cfg
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.backbone_args.items()}
    if hasattr(cfg, "in_chans"):
        args.setdefault("in_chans", cfg.in_chans)  # as the dense model built its backbone (grey canvases: 1)
    if hasattr(model.backbone, "patch_embed"):
        args.setdefault("img_size", tuple(model.backbone.patch_embed.img_size))
    pretrained = create_model(cfg.backbone, pretrained=source, num_classes=0, **args)
    target = model.backbone.state_dict()
    # batch-norm counters where the backbone has none (frozen batch norm), a final norm the dense model does not
    # use (SETR) and an attention pool (SigLIP's "map"; :func:`drop_attention_pool`)
    sd = {k: v for k, v in pretrained.state_dict().items()
          if k in target or not (k.endswith("num_batches_tracked") or k.startswith(("norm.", "fc_norm.", "attn_pool.")))}
    load_strict(model.backbone, sd, source=str(source))
    return model


def drop_attention_pool(backbone: nn.Module) -> None:
    """A dense model reads the backbone's tokens, never its pooled output: an attention pool (``global_pool="map"``)
    would hold parameters without gradients (an error under DDP), so the backbone pools by averaging instead."""
    if getattr(backbone, "attn_pool", None) is not None:
        backbone.reset_classifier(0, "avg")


def backbone_fixed_size_reason(model: nn.Module) -> str | None:
    """Why a dense model (DETR, SETR) cannot be exported to a dynamic-size ONNX graph: its backbone's
    reason (e.g. a Linformer ViT), or None. The rest of both models is size-independent: DETR's sine
    encodings are computed from the feature map, SETR upsamples to the input's size."""
    reason = getattr(model.backbone, "onnx_fixed_size_reason", None)
    return f"its backbone ({model.cfg.backbone}): {reason}" if reason else None
