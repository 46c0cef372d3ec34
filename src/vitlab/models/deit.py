"""DeiT: "Training data-efficient image transformers & distillation through attention".

Touvron et al., 2020, arXiv:2012.12877. The architecture is ViT's (Tiny/Small/Base, Table 1); what
DeiT changes is the training: ImageNet-1k only, strong augmentation and, in the distilled variants,
a second prefix token. The *distillation token* travels through the encoder beside the class token,
has its own entry in the position table and its own linear head, and is trained to reproduce a
teacher's predictions (section 4). At test time the two heads' logits are averaged ("DeiT⚗").

DeiT III ("DeiT III: Revenge of the ViT", Touvron et al., 2022, arXiv:2204.07118) keeps the ViT and changes
the recipe again; its models add LayerScale and a position table for the patch tokens only, the class token
being prepended after the table is added (timm's ``no_embed_class=True``, ViT's option; official ``models_v2.py``).

The distillation objectives themselves live apart from the architecture in ``vitlab.train.distill``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from vitlab.layers import resample_pos_embed, size_differs
from vitlab.models.base import IMAGENET_MEAN, IMAGENET_STD
from vitlab.models.registry import ModelEntry, register_model
from vitlab.models.vit import VIT_SIZES, VisionTransformer, ViTConfig, ViTPool

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class DeiTConfig(ViTConfig):
    """ViT's config plus the distillation token.

    Args:
        distilled: add the distillation token (second prefix token, own position entry).
        dist_head: with ``distilled``, give the distillation token its own head and average the two
            heads at inference (the paper). False: only the class token's head is used while the
            distillation token still takes part in attention, as in Hugging Face's
            ``DeiTForImageClassification``.
    ``no_embed_class`` (DeiT III's table for the patch tokens only) is ViT's option.
    """

    distilled: bool = False
    dist_head: bool = True
    mean: tuple[float, ...] = field(default=IMAGENET_MEAN)
    std: tuple[float, ...] = field(default=IMAGENET_STD)
    crop_pct: float | None = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.distilled:
            problems = []
            if not self.class_token or self.global_pool != "token":
                problems.append("a class token read by the head (class_token=True, global_pool='token')")
            if self.pos_embed != "learn":
                problems.append("a learned position table (pos_embed='learn')")
            if self.representation_size:
                problems.append("no pre-logits layer (representation_size=None)")
            if self.hybrid_layers is not None:
                problems.append("a plain patch embedding (hybrid_layers=None)")
            if self.no_embed_class:
                problems.append("table entries for the prefix tokens (no_embed_class=False; timm has no distilled "
                                "DeiT III either)")
            if self.reg_tokens:
                problems.append("no register tokens (reg_tokens=0)")
            if problems:
                raise ValueError("DeiTConfig: distilled=True needs " + "; ".join(problems))


class DeiT(VisionTransformer):
    """ViT with an optional distillation token and head; build through ``vitlab.create_model``.

    With ``cfg.distilled``, ``forward`` returns ``(head(cls), head_dist(dist))`` while the model is in
    training mode and :meth:`set_distilled_training` is on (the distillation loss needs both);
    otherwise the average of the two (the paper's inference rule).
    """

    def __init__(self, cfg: DeiTConfig) -> None:
        super().__init__(cfg)
        self.cfg: DeiTConfig = cfg
        self.distilled_training = False
        if not cfg.distilled:
            self.dist_token = None
            self.head_dist = None
            self.classifier_names = ("head",)
            return
        D = cfg.embed_dim
        self.num_prefix_tokens = 2
        self.pos_embed_prefix = 2
        self.dist_token = nn.Parameter(torch.zeros(1, 1, D))
        grid = self.patch_embed.grid_size
        # The table covers both prefix tokens and the grid: (1, 2 + rows*cols, D), replacing ViT's 1 + N one.
        self.pos_embed = nn.Parameter(torch.zeros(1, 2 + grid[0] * grid[1], D))
        self.classifier_names = ("head", "head_dist") if cfg.dist_head else ("head",)
        self.head_dist = self._new_head(cfg.num_classes) if cfg.dist_head else None
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.dist_token, std=0.02)

    def _new_head(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        head = nn.Linear(self.head_hidden_size, num_classes)
        nn.init.zeros_(head.weight)  # zero-initialised, like ViT's head (logits start at zero)
        nn.init.zeros_(head.bias)
        return head

    def set_distilled_training(self, enable: bool = True) -> None:
        """Return both heads' logits separately in training mode (for a distillation-token loss)."""
        if enable and not (self.cfg.distilled and self.cfg.dist_head):
            raise ValueError("set_distilled_training: this model has no distillation token head")
        self.distilled_training = enable

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | ({"dist_token"} if self.dist_token is not None else set())

    def reset_classifier(self, num_classes: int, global_pool: ViTPool | None = None, *,
                         keep_pre_logits: bool = False) -> None:
        """Replace the head (and the distillation head) by zero-initialised ones for ``num_classes``."""
        if self.cfg.distilled and global_pool not in (None, "token"):
            raise ValueError("reset_classifier: a distilled DeiT reads its class and distillation tokens; "
                             "global_pool must stay 'token'")
        super().reset_classifier(num_classes, global_pool=global_pool, keep_pre_logits=keep_pre_logits)
        if self.cfg.distilled and self.cfg.dist_head:
            self.head_dist = self._new_head(num_classes)

    # ------------------------------------------------------------------------------------------ forward
    def _pos_embed(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        if self.dist_token is None:
            return super()._pos_embed(x, grid)
        pos = self.pos_embed
        if self.dynamic_img_size and size_differs(grid, self.patch_embed.grid_size):
            pos = resample_pos_embed(pos, grid, old_size=self.patch_embed.grid_size, num_prefix_tokens=2,
                                     antialias=self.cfg.pos_antialias)
        B = x.shape[0]
        # (B, N, D) -> (B, 2 + N, D): class token, distillation token, patches; then the table is added
        x = torch.cat([self.cls_token.expand(B, -1, -1), self.dist_token.expand(B, -1, -1), x], dim=1)
        return self.pos_drop(x + pos)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Tokens (B, 2 + N, D) -> averaged logits (B, K), or (cls, dist) logits in distilled training.

        ``pre_logits`` returns the average of the two tokens' features (what the heads read).
        """
        if self.dist_token is None or not self.cfg.dist_head:
            return super().forward_head(x, pre_logits=pre_logits)
        x_cls, x_dist = self.head_drop(x[:, 0]), self.head_drop(x[:, 1])
        if pre_logits:
            return (x_cls + x_dist) / 2
        y_cls, y_dist = self.head(x_cls), self.head_dist(x_dist)
        if self.distilled_training and self.training:
            return y_cls, y_dist
        return (y_cls + y_dist) / 2


# ------------------------------------------------------------------------------------------- variants
# DeiT, Table 1: DeiT-Ti/S/B share ViT's widths (tiny/small/base); all use 16x16 patches. Evaluation
# crops are those of the published weights' timm config (as pretrained.json): 0.9 at 224px, the full image
# at 384px (fine-tuned at that resolution, section 6). The official repository evaluates at 224px with
# 0.875 (its --eval-crop-ratio); pass crop_pct=0.875 for that.
DEIT_VARIANTS: tuple[tuple[str, int], ...] = (
    ("tiny", 224), ("small", 224), ("base", 224), ("base", 384),
)


def _register_deit_variants() -> None:
    for size, res in DEIT_VARIANTS:
        for distilled in (False, True):
            tag = "_distilled" if distilled else ""
            name = f"deit_{size}{tag}_patch16_{res}"
            cfg = DeiTConfig(img_size=res, patch_size=16, distilled=distilled,
                             crop_pct=0.9 if res == 224 else 1.0, **VIT_SIZES[size])
            desc = f"DeiT-{'Ti' if size == 'tiny' else size[0].upper()}/16 at {res}px"
            register_model(ModelEntry(name=name, family="deit", config=cfg, build=DeiT,
                                      description=desc + (" with distillation token" if distilled else "")))


# DeiT III (Touvron et al. 2022, Table 1 and section 4): ViT-S/M/B/L/H with LayerScale (1e-6) and a table for
# the patch tokens only, under timm's names. Medium: width 512, 8 heads. Evaluation crops as the timm configs of
# the ImageNet-1k weights (timm's default tag): 0.9 at 224px, 1.0 at 384px.
DEIT3_SIZES: dict[str, dict[str, int]] = {**VIT_SIZES, "medium": dict(embed_dim=512, depth=12, num_heads=8)}
DEIT3_VARIANTS: tuple[tuple[str, int, int], ...] = (
    ("small", 16, 224), ("small", 16, 384), ("medium", 16, 224), ("base", 16, 224), ("base", 16, 384),
    ("large", 16, 224), ("large", 16, 384), ("huge", 14, 224),
)


def _register_deit3_variants() -> None:
    for size, patch, res in DEIT3_VARIANTS:
        cfg = DeiTConfig(img_size=res, patch_size=patch, init_values=1e-6, no_embed_class=True,
                         crop_pct=0.9 if res == 224 else 1.0, **DEIT3_SIZES[size])
        register_model(ModelEntry(name=f"deit3_{size}_patch{patch}_{res}", family="deit", config=cfg, build=DeiT,
                                  description=f"DeiT III {size[0].upper()}/{patch} at {res}px (LayerScale, "
                                              f"no class-token position)"))


_register_deit_variants()
_register_deit3_variants()
