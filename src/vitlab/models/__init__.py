"""Model families. Importing this package registers every family's named variants."""

from vitlab.models import (  # noqa: F401  (registration side effect)
    beit,
    cait,
    cct,
    crossvit,
    deit,
    detr,
    mixer,
    mobilevit,
    resnet,
    setr,
    swin,
    t2t,
    tnt,
    vit,
    xcit,
)
from vitlab.models.base import Preprocessing, init_non_persistent_buffers
from vitlab.models.registry import ModelEntry, get_entry, list_models, register_model
from vitlab.models.resnet import ResNet, ResNetConfig
from vitlab.models.vit import VisionTransformer, ViTConfig

__all__ = [
    "ModelEntry", "Preprocessing", "ResNet", "ResNetConfig", "ViTConfig", "VisionTransformer", "get_entry",
    "init_non_persistent_buffers", "list_models", "register_model",
]
