"""DINO checkpoints (Caron et al. 2021, facebookresearch/dino).

* Backbone releases (``dino_deitsmall16_pretrain.pth``, ...) and timm's ``.dino`` weights are plain
  timm ViT state dicts without a head: the timm converter reads them.
* Training checkpoints: ``{"student": ..., "teacher": ..., "optimizer": ..., "epoch": ...,
  "dino_loss": ...}``. The student was wrapped in DDP (``module.backbone.*``, ``module.head.*``), the
  teacher not (``backbone.*``, ``head.*``). As a ``vit`` checkpoint the *teacher*'s backbone is read
  (the network the paper evaluates). The projection head's last layer is weight-normalised: the keys
  are ``last_layer.weight_g`` / ``weight_v`` (``torch.nn.utils.weight_norm``, the released files) or
  ``last_layer.parametrizations.weight.original0`` / ``original1`` (the parametrisation API); both
  are read by :func:`read_dino_checkpoint`, which returns backbones and heads of both networks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from vitlab.checkpoints.io import CheckpointError

_PREFIXES = ("module.backbone.", "backbone.")


def is_official_dino(sd: dict[str, Any]) -> bool:
    return any(k.startswith(_PREFIXES) for k in sd) and any(".attn.qkv." in k for k in sd)


def _strip(sd: dict[str, Tensor], prefixes: tuple[str, ...]) -> dict[str, Tensor]:
    out = {}
    for k, v in sd.items():
        for p in prefixes:
            if k.startswith(p):
                out[k[len(p):]] = v
                break
    return out


def dino_backbone(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """The backbone part of one network's state dict (``[module.]backbone.*``) in timm names."""
    return _strip(sd, _PREFIXES)


def dino_head(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """The projection head part (``[module.]head.*``) in :class:`vitlab.ssl.dino.DINOHead`'s names."""
    out = {}
    for k, v in _strip(sd, ("module.head.", "head.")).items():
        k = k.replace("last_layer.weight_g", "last_layer.parametrizations.weight.original0")
        k = k.replace("last_layer.weight_v", "last_layer.parametrizations.weight.original1")
        out[k] = v
    return out


@dataclass
class DINOCheckpoint:
    student_backbone: dict[str, Tensor]
    student_head: dict[str, Tensor]
    teacher_backbone: dict[str, Tensor]
    teacher_head: dict[str, Tensor]
    epoch: int | None = None

    def head_dims(self) -> dict[str, int]:
        """out_dim, hidden_dim, bottleneck_dim of the projection head (from the teacher's weights)."""
        h = self.teacher_head
        v = h["last_layer.parametrizations.weight.original1"]
        return {"out_dim": int(v.shape[0]), "bottleneck_dim": int(v.shape[1]),
                "hidden_dim": int(h["mlp.0.weight"].shape[0])}


def read_dino_checkpoint(path: str | Path) -> DINOCheckpoint:
    """Both networks of a DINO training checkpoint (student and teacher, backbone and head)."""
    from vitlab.checkpoints.io import read_pickle

    path = Path(path)
    obj = read_pickle(path)
    if not isinstance(obj, dict) or "student" not in obj or "teacher" not in obj:
        raise CheckpointError(f"{path}: not a DINO training checkpoint (expected 'student' and 'teacher' entries)")
    nets = {}
    for name in ("student", "teacher"):
        sd = {k: v for k, v in obj[name].items() if isinstance(v, Tensor)}
        backbone, head = dino_backbone(sd), dino_head(sd)
        if not backbone or not head:
            raise CheckpointError(f"{path}: '{name}' has no backbone.* / head.* weights")
        nets[name] = (backbone, head)
    epoch = obj.get("epoch")
    return DINOCheckpoint(nets["student"][0], nets["student"][1], nets["teacher"][0], nets["teacher"][1],
                          int(epoch) if isinstance(epoch, int) else None)
