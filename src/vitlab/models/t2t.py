"""T2T-ViT: "Tokens-to-Token ViT: Training Vision Transformers from Scratch on ImageNet".

Yuan et al., 2021, arXiv:2101.11986. ViT's one-shot patch embedding is replaced by a progressive
tokenisation (section 3.1, the T2T module), and the backbone is a deep-narrow ViT:

* Soft split: overlapping patches by unfolding the image with kernel 7, stride 4, padding 2 (3*7*7 = 147
  values per token, 56 x 56 tokens at 224 px); a T2T layer (below) maps them to ``token_dim`` = 64; the
  tokens are laid back on their grid (re-structurisation) and unfolded again with kernel 3, stride 2,
  padding 1 (64*3*3 = 576); a second T2T layer; a third split (3/2/1) and a linear projection to the
  backbone width give a 14 x 14 grid at 224 px (an effective stride of 16).
* T2T layers: LN -> single-head attention from the input width down to 64 whose residual is the value
  projection (the input has another width) -> x + MLP(LN(x)) with MLP ratio 1. T2T-ViT uses Performer
  attention (random features, ``layers/t2t_attention.py``), T2T-ViT_t softmax attention scaled by
  1/sqrt(input width).
* Backbone: class token, a FIXED 1-D sinusoid position table over [class, patches] (as in "Attention is
  all you need"; regenerated for another grid, never learned), ViT blocks without qkv bias, LN eps 1e-5.

Attention scale of the backbone: ``qk_scale=None`` (the default) is 1/sqrt(head width). The released
``t2t_vit_*`` functions set 1/sqrt(embed width) only when called with ``pretrained=True`` (a path whose
download URL is empty); training and evaluation (``main.py``, ``--pretrained`` off by default, README's
``--eval_checkpoint``) build the models without it, so the published accuracies were measured with the
head-width scale (yitu-opensource/T2T-ViT issue #62 asks about this and is unanswered).

Non-square inputs work: each re-structurisation uses the grid the previous split produced (the released
code assumes a square image).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitlab.layers import Block, Mlp, call_block, check_images, sinusoid_1d_pos_embed, to_2tuple, trunc_normal_linears
from vitlab.layers.t2t_attention import PerformerAttention, TokenAttention
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

# (kernel, stride, padding) of the three soft splits
SOFT_SPLITS: tuple[tuple[int, int, int], ...] = ((7, 4, 2), (3, 2, 1), (3, 2, 1))
sinusoid_table = sinusoid_1d_pos_embed  # the fixed table, under the name this module has always exported


@dataclass(frozen=True, kw_only=True)
class T2TConfig:
    """Args:
    t2t_type: "performer" (T2T-ViT) or "transformer" (T2T-ViT_t) attention in the T2T layers.
    token_dim: width of the T2T layers (64 in the paper).
    qk_scale: backbone attention scale; None: 1/sqrt(head width) (module docstring).
    """

    img_size: int | tuple[int, int] = 224
    in_chans: int = 3
    num_classes: int = 1000
    t2t_type: Literal["performer", "transformer"] = "performer"
    token_dim: int = 64
    embed_dim: int = 384
    depth: int = 14
    num_heads: int = 6
    mlp_ratio: float = 3.0
    qkv_bias: bool = False
    qk_scale: float | None = None
    kernel_ratio: float = 0.5
    norm_eps: float = 1e-5
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    t2t_drop_rate: float = 0.0  # the released Performer layers use 0.1 (training only)
    mean: tuple[float, ...] = field(default=IMAGENET_MEAN)
    std: tuple[float, ...] = field(default=IMAGENET_STD)
    crop_pct: float = 0.9

    def __post_init__(self) -> None:
        check_config(self)
        if self.embed_dim % self.num_heads:
            raise ValueError(f"T2TConfig: embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if self.t2t_type not in ("performer", "transformer"):
            raise ValueError(f"T2TConfig: t2t_type must be 'performer' or 'transformer', got {self.t2t_type!r}")


def split_grid(h: int, w: int, kernel: int, stride: int, padding: int) -> tuple[int, int]:
    return tuple((v + 2 * padding - kernel) // stride + 1 for v in (h, w))  # type: ignore[return-value]


class T2TLayer(nn.Module):
    """x <- attn(LN(x)) (its residual is v); x <- x + MLP(LN(x)). Width ``dim`` in, ``token_dim`` out."""

    def __init__(self, dim: int, cfg: T2TConfig) -> None:
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-5)
        d = cfg.token_dim
        self.norm1 = norm(dim)
        if cfg.t2t_type == "performer":
            self.attn: nn.Module = PerformerAttention(dim, d, kernel_ratio=cfg.kernel_ratio, drop=cfg.t2t_drop_rate)
        else:
            self.attn = TokenAttention(dim, d, attn_drop=cfg.attn_drop_rate, proj_drop=cfg.drop_rate)
        self.norm2 = norm(d)
        self.mlp = Mlp(d, hidden_features=d, drop=cfg.t2t_drop_rate if cfg.t2t_type == "performer" else cfg.drop_rate)

    def forward(self, x: Tensor) -> Tensor:
        x = self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TokensToToken(nn.Module):
    """Images (B, C, H, W) -> tokens (B, N, D) on a grid of stride 16 by three soft splits and two T2T layers."""

    def __init__(self, cfg: T2TConfig) -> None:
        super().__init__()
        self.img_size = to_2tuple(cfg.img_size)
        self.in_chans = cfg.in_chans
        self.patch_size = (16, 16)  # the effective stride, for the analysis tools
        k0, k1 = SOFT_SPLITS[0][0], SOFT_SPLITS[1][0]
        self.attention1 = T2TLayer(cfg.in_chans * k0 * k0, cfg)
        self.attention2 = T2TLayer(cfg.token_dim * k1 * k1, cfg)
        self.project = nn.Linear(cfg.token_dim * SOFT_SPLITS[2][0] ** 2, cfg.embed_dim)
        self.grid_size = self.dynamic_grid(*self.img_size)

    def dynamic_grid(self, h: int, w: int) -> tuple[int, int]:
        for k, s, p in SOFT_SPLITS:
            h, w = split_grid(h, w, k, s, p)
        return h, w

    def forward(self, x: Tensor) -> Tensor:
        check_images(x, in_chans=self.in_chans, patch=(1, 1), expected=self.img_size, what="T2T-ViT", dynamic=False)
        B = x.shape[0]
        grid = tuple(x.shape[-2:])
        for i, (k, s, p) in enumerate(SOFT_SPLITS):
            if i > 0:  # re-structurise: tokens (B, N, C) back onto their grid (B, C, h, w)
                x = x.transpose(1, 2).reshape(B, x.shape[-1], *grid)  # sizes given: B may be 0
            grid = split_grid(*grid, k, s, p)
            x = F.unfold(x, kernel_size=k, stride=s, padding=p).transpose(1, 2)  # (B, N, C*k*k)
            if i < 2:
                x = (self.attention1, self.attention2)[i](x)
        return self.project(x)


class T2TViT(TimmSurface, nn.Module):
    """T2T-ViT classifier; build with a :class:`T2TConfig` or through ``vitlab.create_model``."""

    # the T2T layers attend over the soft-split tokens, another sequence than the backbone's: the family's
    # explainer (analysis/explain_t2t.py) rolls out the backbone blocks only
    token_attention = False
    num_prefix_tokens = 1
    onnx_fixed_size_reason = ("the model runs only at the size it was built for: its fixed 1-D sinusoid position "
                              "table has one row per token of the soft split at that size"
                              " (export another fixed size with --img-size)")

    def __init__(self, cfg: T2TConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        self.num_features = self.head_hidden_size = D
        self.tokens_to_token = TokensToToken(cfg)
        grid = self.tokens_to_token.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.register_buffer("pos_embed", sinusoid_table(1 + grid[0] * grid[1], D))  # fixed, kept in checkpoints
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList([
            Block(D, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, proj_drop=cfg.drop_rate,
                  attn_drop=cfg.attn_drop_rate, drop_path=dpr[i], norm_layer=partial(nn.LayerNorm, eps=cfg.norm_eps))
            for i in range(cfg.depth)
        ])
        if cfg.qk_scale is not None:
            for blk in self.blocks:
                blk.attn.scale = cfg.qk_scale
        self.norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.head = nn.Linear(D, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self._init_weights()

    # ----------------------------------------------------------------------------------------- set-up
    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        trunc_normal_linears(self)

    @property
    def patch_embed(self) -> TokensToToken:
        """The module that sets the token grid (named as in other families, for the analysis tools)."""
        return self.tokens_to_token

    @property
    def num_classes(self) -> int:
        return getattr(self.head, "out_features", 0)  # 0 for Identity (a quantised Linear has it too)

    @property
    def preprocessing(self) -> Preprocessing:
        h, w = self.tokens_to_token.img_size
        return Preprocessing(input_size=(self.cfg.in_chans, h, w), mean=self.cfg.mean, std=self.cfg.std,
                             crop_pct=self.cfg.crop_pct, interpolation="bicubic")

    def no_weight_decay(self) -> set[str]:
        return {"cls_token"}

    def reset_classifier(self, num_classes: int, global_pool: Literal["token"] | None = None) -> None:
        """Replace the head by a zero-initialised layer (the pooling, 'token', is the only one built)."""
        check_global_pool(self, global_pool, ("token",))
        self.head = zero_head(self.num_features, num_classes)
        record_head(self, num_classes=max(num_classes, 0))

    def position_grid_table(self) -> tuple[Tensor, tuple[int, int], str]:
        """For the analysis tools: the fixed 1-D sinusoid table without its class-token entry."""
        return self.pos_embed[0, 1:], self.tokens_to_token.grid_size, "sincos-1d"

    def adapt_checkpoint(self, sd: dict[str, Tensor], *, source: str) -> dict[str, Tensor]:
        """The position table is fixed: a checkpoint's table for another grid is replaced by this model's."""
        out = dict(sd)
        v = out.get("pos_embed")
        if v is not None and v.shape != self.pos_embed.shape:
            out["pos_embed"] = self.pos_embed.detach().clone()
        return out

    # ------------------------------------------------------------------------------------------ forward
    def _embed(self, x: Tensor) -> Tensor:
        x = self.tokens_to_token(x)  # (B, N, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + self.pos_embed.to(x.dtype))

    def forward_features(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> normalised tokens (B, 1 + N, D), class token first."""
        x = self._embed(x)
        for blk in self.blocks:
            x = call_block(blk, x, checkpointed=self.grad_checkpointing)
        return self.norm(x)

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        *,
        norm: bool = False,
        output_fmt: Literal["NLC", "NCHW"] = "NLC",
        return_prefix_tokens: bool = False,
    ) -> tuple[Tensor, list[Tensor] | list[tuple[Tensor, Tensor]]]:
        """Run the model and keep the outputs of the chosen backbone blocks.

        Returns:
            (the output of forward_features, the intermediates).
        """
        if output_fmt not in ("NLC", "NCHW"):
            raise ValueError(f"forward_intermediates: output_fmt must be 'NLC' or 'NCHW', got {output_fmt!r}")
        take = set(take_indices(len(self.blocks), indices))
        B = x.shape[0]
        grid = self.tokens_to_token.dynamic_grid(x.shape[-2], x.shape[-1])
        x = self._embed(x)
        results: list = []
        for i, blk in enumerate(self.blocks):
            x = call_block(blk, x, checkpointed=self.grad_checkpointing)
            if i in take:
                y = self.norm(x) if norm else x
                prefix, tokens = y[:, :1], y[:, 1:]
                if output_fmt == "NCHW":
                    tokens = tokens.reshape(B, *grid, tokens.shape[-1]).permute(0, 3, 1, 2)  # (B, D, rows, cols)
                results.append((tokens, prefix) if return_prefix_tokens else tokens)
        return self.norm(x), results

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# ------------------------------------------------------------------------------------------- variants
# T2T-ViT paper, Table 2 and the released models/t2t_vit.py: backbone width, depth, heads, MLP ratio.
T2T_SIZES: dict[int, dict] = {
    7: dict(embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.0),
    10: dict(embed_dim=256, depth=10, num_heads=4, mlp_ratio=2.0),
    12: dict(embed_dim=256, depth=12, num_heads=4, mlp_ratio=2.0),
    14: dict(embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0),
    19: dict(embed_dim=448, depth=19, num_heads=7, mlp_ratio=3.0),
    24: dict(embed_dim=512, depth=24, num_heads=8, mlp_ratio=3.0),
}
T2T_TRANSFORMER_DEPTHS = (14, 19, 24)


def _register_t2t_variants() -> None:
    for n, dims in T2T_SIZES.items():
        register_model(ModelEntry(name=f"t2t_vit_{n}", family="t2t", config=T2TConfig(**dims), build=T2TViT,
                                  description=f"T2T-ViT-{n} (Performer T2T layers)"))
    for n in T2T_TRANSFORMER_DEPTHS:
        register_model(ModelEntry(name=f"t2t_vit_t_{n}", family="t2t",
                                  config=T2TConfig(t2t_type="transformer", **T2T_SIZES[n]), build=T2TViT,
                                  description=f"T2T-ViT_t-{n} (transformer T2T layers)"))


_register_t2t_variants()
