"""CaiT: "Going deeper with Image Transformers".

Touvron et al., 2021, arXiv:2103.17239. Two changes to ViT let it train much deeper:

* LayerScale (section 2.1): every residual branch is multiplied by a learned per-channel vector
  initialised to a small epsilon that shrinks with depth (0.1 up to 18 layers, 1e-5 up to 24,
  1e-6 beyond), so each block starts close to the identity.
* Class attention (section 3): the class token is not part of the self-attention stage. The patch
  tokens go through ``depth`` self-attention blocks (with talking-heads attention, section 2.2, and
  a position table for the patches only); then ``depth_token_only`` class-attention blocks insert the
  class token, which attends to the frozen patch tokens. The head reads the class token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch
from torch import Tensor, nn

from vitlab.layers import (
    Block,
    PatchEmbed,
    call_block,
    resample_pos_embed,
    run_sequential,
    size_differs,
    trunc_normal_linears,
)
from vitlab.layers.class_attention import ClassAttentionBlock
from vitlab.layers.talking_heads import TalkingHeadsAttention
from vitlab.models.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocessing,
    TimmSurface,
    check_global_pool,
    record_head,
    take_indices,
    zero_head,
)
from vitlab.models.registry import ModelEntry, check_config, register_model


def layer_scale_init(depth: int) -> float:
    """The paper's LayerScale epsilon for a network of ``depth`` self-attention blocks (section 2.1)."""
    if depth <= 18:
        return 0.1
    if depth <= 24:
        return 1e-5
    return 1e-6


# the poolings the family computes: the class token or the mean of the patch tokens
CAIT_POOLS = ("token", "avg")


@dataclass(frozen=True, kw_only=True)
class CaiTConfig:
    """Args:
    depth: self-attention blocks over the patch tokens.
    depth_token_only: class-attention blocks (the paper uses 2).
    init_values: LayerScale initial value; None: the paper's rule from ``depth`` (:func:`layer_scale_init`).
    mlp_ratio_token_only: MLP width ratio inside the class-attention blocks.
    drop_path_rate: stochastic depth, uniform over the self-attention blocks (as in the paper).
    dynamic_img_size: accept any input size, resampling the position table per batch.
    """

    img_size: int | tuple[int, int] = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 384
    depth: int = 24
    num_heads: int = 8
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    depth_token_only: int = 2
    mlp_ratio_token_only: float = 4.0
    init_values: float | None = None
    global_pool: Literal["token", "avg"] = "token"
    norm_eps: float = 1e-6
    drop_rate: float = 0.0
    pos_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    dynamic_img_size: bool = False
    mean: tuple[float, ...] = field(default=IMAGENET_MEAN)
    std: tuple[float, ...] = field(default=IMAGENET_STD)
    crop_pct: float = 1.0

    def __post_init__(self) -> None:
        check_global_pool(self, self.global_pool, CAIT_POOLS)
        check_config(self)
        if self.embed_dim % self.num_heads:
            raise ValueError(f"CaiTConfig: embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if self.depth_token_only < 1 and self.global_pool == "token":
            raise ValueError("CaiTConfig: global_pool='token' needs at least one class-attention block "
                             "(depth_token_only >= 1)")

    @property
    def layer_scale(self) -> float:
        return self.init_values if self.init_values is not None else layer_scale_init(self.depth)


class CaiT(TimmSurface, nn.Module):
    """CaiT classifier; build with a :class:`CaiTConfig` or through ``vitlab.create_model``."""

    token_attention = True  # tokens attend to tokens of one sequence: rollout applies

    num_prefix_tokens = 1  # the class token, present in forward_features' output
    pos_embed_prefix = 0  # ... but not in the position table, which covers the patches only

    def __init__(self, cfg: CaiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        norm_layer = partial(nn.LayerNorm, eps=cfg.norm_eps)
        self.num_features = self.head_hidden_size = D
        self.global_pool = cfg.global_pool
        self.dynamic_img_size = cfg.dynamic_img_size
        self.patch_embed = PatchEmbed(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                                      embed_dim=D, strict_img_size=not cfg.dynamic_img_size)
        grid = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], D))
        self.pos_drop = nn.Dropout(cfg.pos_drop_rate)
        eps = cfg.layer_scale
        self.blocks = nn.Sequential(*[
            Block(D, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
                  proj_drop=cfg.proj_drop_rate, attn_drop=cfg.attn_drop_rate, init_values=eps,
                  drop_path=cfg.drop_path_rate, norm_layer=norm_layer, attn_layer=TalkingHeadsAttention)
            for _ in range(cfg.depth)
        ])
        self.blocks_token_only = nn.ModuleList([
            ClassAttentionBlock(D, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio_token_only,
                                qkv_bias=cfg.qkv_bias, init_values=eps, norm_layer=norm_layer)
            for _ in range(cfg.depth_token_only)
        ])
        self.norm = norm_layer(D)
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(D, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self._init_weights()

    # ----------------------------------------------------------------------------------------- set-up
    def _init_weights(self) -> None:
        # DeiT/CaiT initialisation: truncated normal (std 0.02) for tables and linear layers
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        trunc_normal_linears(self)

    @property
    def num_classes(self) -> int:
        return getattr(self.head, "out_features", 0)  # 0 for Identity (a quantised Linear has it too)

    @property
    def preprocessing(self) -> Preprocessing:
        h, w = self.patch_embed.img_size
        return Preprocessing(input_size=(self.cfg.in_chans, h, w), mean=self.cfg.mean,
                             std=self.cfg.std,
                             crop_pct=self.cfg.crop_pct, interpolation="bicubic")

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def decay_layer_id(self, name: str) -> int:
        """Layer-wise lr decay as timm's group_matcher for CaiT: embeddings and class token 0, ``blocks.i``
        i + 1, and the C class-attention blocks overlap the last trunk blocks (``blocks_token_only.j``
        j + L - C + 1, at least 1); the final norm and head L + 1."""
        top, _, rest = name.partition(".")
        if top in ("cls_token", "pos_embed", "patch_embed"):
            return 0
        depth = len(self.blocks)
        if top == "blocks":
            return int(rest.split(".")[0]) + 1
        if top == "blocks_token_only":
            return max(1, int(rest.split(".")[0]) + depth - len(self.blocks_token_only) + 1)
        return depth + 1

    def reset_classifier(self, num_classes: int, global_pool: Literal["token", "avg"] | None = None) -> None:
        """Replace the head by a zero-initialised (D x K) layer."""
        check_global_pool(self, global_pool, CAIT_POOLS)
        if global_pool is not None:
            if global_pool == "token" and len(self.blocks_token_only) == 0:
                raise ValueError("reset_classifier: global_pool='token' needs class-attention blocks")
            self.global_pool = global_pool
        self.head = zero_head(self.num_features, num_classes)
        record_head(self, num_classes=max(num_classes, 0), global_pool=self.global_pool)

    # ------------------------------------------------------------------------------------------ forward
    def _embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Images -> patch tokens (B, N, D) with positions added (no class token yet)."""
        grid = self.patch_embed.dynamic_grid(x.shape[-2], x.shape[-1])
        x = self.patch_embed(x)
        pos = self.pos_embed
        if self.dynamic_img_size and size_differs(grid, self.patch_embed.grid_size):
            pos = resample_pos_embed(pos, grid, old_size=self.patch_embed.grid_size, num_prefix_tokens=0)
        return self.pos_drop(x + pos), grid

    def forward_cls(self, x: Tensor) -> Tensor:
        """Patch tokens (B, N, D) -> (B, 1 + N, D): the class token after the class-attention blocks, first."""
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        for blk in self.blocks_token_only:
            cls = call_block(blk, x, cls, checkpointed=self.grad_checkpointing)
        return torch.cat([cls, x], dim=1)

    def forward_features(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> normalised tokens (B, 1 + N, D), class token first."""
        x, _ = self._embed(x)
        x = run_sequential(self.blocks, x, checkpointed=self.grad_checkpointing)
        return self.norm(self.forward_cls(x))

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        *,
        norm: bool = False,
        output_fmt: Literal["NLC", "NCHW"] = "NLC",
        return_prefix_tokens: bool = False,
    ) -> tuple[Tensor, list[Tensor] | list[tuple[Tensor, Tensor]]]:
        """Run the model and keep the outputs of the chosen self-attention blocks.

        The class token joins only after these blocks and is not updated by them, so the prefix part
        of each intermediate (with ``return_prefix_tokens``) is the class token as it stands at that
        point: the learned token itself, (B, 1, D).

        Returns:
            (the output of forward_features, the intermediates).
        """
        if output_fmt not in ("NLC", "NCHW"):
            raise ValueError(f"forward_intermediates: output_fmt must be 'NLC' or 'NCHW', got {output_fmt!r}")
        take = set(take_indices(len(self.blocks), indices))
        B = x.shape[0]
        x, grid = self._embed(x)
        results: list = []
        for i, blk in enumerate(self.blocks):
            x = call_block(blk, x, checkpointed=self.grad_checkpointing)
            if i in take:
                tokens = self.norm(x) if norm else x
                if output_fmt == "NCHW":
                    tokens = tokens.reshape(B, grid[0], grid[1], -1).permute(0, 3, 1, 2)  # (B, D, rows, cols)
                if return_prefix_tokens:
                    cls = self.cls_token.expand(B, -1, -1)
                    results.append((tokens, self.norm(cls) if norm else cls))
                else:
                    results.append(tokens)
        return self.norm(self.forward_cls(x)), results

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Tokens (B, 1 + N, D) -> logits (B, K), or the pooled features if ``pre_logits``."""
        x = x[:, 0] if self.global_pool == "token" else x[:, self.num_prefix_tokens:].mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# ------------------------------------------------------------------------------------------- variants
# CaiT, Table 2 (and the released checkpoints): width and heads per size, depth in the name; every model
# has 2 class-attention blocks and 16x16 patches. Resolutions are those of the published weights.
CAIT_SIZES: dict[str, dict[str, int]] = {
    "xxs": {"embed_dim": 192, "num_heads": 4},
    "xs": {"embed_dim": 288, "num_heads": 6},
    "s": {"embed_dim": 384, "num_heads": 8},
    "m": {"embed_dim": 768, "num_heads": 16},
}
CAIT_VARIANTS: tuple[tuple[str, int, tuple[int, ...]], ...] = (
    ("xxs", 24, (224, 384)),
    ("xxs", 36, (224, 384)),
    ("xs", 24, (384,)),
    ("s", 24, (224, 384)),
    ("s", 36, (384,)),
    ("m", 36, (384,)),
    ("m", 48, (448,)),
)


def _register_cait_variants() -> None:
    for size, depth, resolutions in CAIT_VARIANTS:
        for res in resolutions:
            name = f"cait_{size}{depth}_{res}"
            cfg = CaiTConfig(img_size=res, patch_size=16, depth=depth, **CAIT_SIZES[size])
            register_model(ModelEntry(name=name, family="cait", config=cfg, build=CaiT,
                                      description=f"CaiT-{size.upper()}{depth} at {res}px"))


_register_cait_variants()
