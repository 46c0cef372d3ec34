"""TNT: "Transformer in Transformer".

Han et al., 2021, arXiv:2103.00112. ViT's 16 x 16 patches ("visual sentences") are each cut further
into 4 x 4 "visual words" (pixels) of width ``inner_dim``. What differs from ViT:

* Pixel embedding (official layout, huawei-noah/Efficient-AI-Backbones and timm's current default): the
  image is cut into 16 x 16 patches and a 7 x 7 / stride 4 convolution (padding 3, zero padding at the
  patch borders) runs over each patch, giving 4 x 4 pixels per patch; a learned pixel position table
  (inner_dim, 4, 4) is shared by all patches. The legacy layout (timm's first port, ``tnt_s_legacy``)
  runs the convolution over the whole image first and cuts the result into 4 x 4 blocks: other numbers
  at the patch borders.
* Every block first runs an inner transformer (attention among the 16 pixels of each patch, 4 heads,
  MLP 4x), then adds the pixels, flattened and projected (LN -> Linear -> LN; legacy: per-pixel LN ->
  Linear with bias), to their patch token (the class token is left alone), then runs the outer
  transformer over [class token, patches] as in ViT.
* The patch tokens start as the projection of the embedded pixels (LN -> Linear -> LN).

The attention layers are vitlab's ``Attention`` (fused qkv, no qkv bias); timm's separate ``qk`` and ``v``
projections are concatenated on loading.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch
from torch import Tensor, nn

from vitlab.layers import (
    Attention,
    DropPath,
    Mlp,
    call_block,
    check_images,
    resample_pos_embed,
    to_2tuple,
    trunc_normal_linears,
)
from vitlab.models.base import (
    INCEPTION_MEAN,
    INCEPTION_STD,
    Preprocessing,
    TimmSurface,
    check_global_pool,
    record_head,
    take_indices,
    zero_head,
)
from vitlab.models.registry import ModelEntry, check_config, register_model

# the poolings the family computes: the class token or the mean of the patch tokens
TNT_POOLS = ("token", "avg")
# what runs before the first block: layer 0 of layer-wise lr decay
_DECAY_STEM = frozenset({"pixel_embed", "pixel_pos", "norm1_proj", "proj", "norm2_proj", "cls_token", "patch_pos"})


@dataclass(frozen=True, kw_only=True)
class TNTConfig:
    """Args:
    embed_dim: width of the patch (outer) tokens.
    inner_dim: width of the pixel (inner) tokens.
    num_heads_outer / num_heads_inner: heads of the outer and inner attention.
    first_stride: stride of the pixel convolution; a patch gives ceil(patch / stride)^2 pixels.
    legacy: timm's first layout (convolution over the whole image, per-pixel projection norm).
    """

    img_size: int | tuple[int, int] = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 384
    inner_dim: int = 24
    depth: int = 12
    num_heads_outer: int = 6
    num_heads_inner: int = 4
    mlp_ratio: float = 4.0
    inner_mlp_ratio: float = 4.0
    qkv_bias: bool = False
    first_stride: int = 4
    legacy: bool = False
    global_pool: Literal["token", "avg"] = "token"
    norm_eps: float = 1e-5
    drop_rate: float = 0.0
    pos_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    mean: tuple[float, ...] = field(default=INCEPTION_MEAN)
    std: tuple[float, ...] = field(default=INCEPTION_STD)
    crop_pct: float = 0.9

    def __post_init__(self) -> None:
        check_global_pool(self, self.global_pool, TNT_POOLS)
        check_config(self)
        if self.embed_dim % self.num_heads_outer or self.inner_dim % self.num_heads_inner:
            raise ValueError(f"TNTConfig: embed_dim {self.embed_dim} / inner_dim {self.inner_dim} not divisible "
                             f"by num_heads_outer {self.num_heads_outer} / num_heads_inner {self.num_heads_inner}")


class PixelEmbed(nn.Module):
    """Image (B, C, H, W) -> pixel tokens (B * N, pixels per patch, inner_dim), pixel positions added."""

    def __init__(self, cfg: TNTConfig) -> None:
        super().__init__()
        self.img_size = to_2tuple(cfg.img_size)
        self.patch_size = to_2tuple(cfg.patch_size)
        self.in_chans = cfg.in_chans
        self.legacy = cfg.legacy
        self.grid_size = self.dynamic_grid(*self.img_size)
        self.pixel_grid = tuple(math.ceil(p / cfg.first_stride) for p in self.patch_size)  # (4, 4)
        self.num_pixels = self.pixel_grid[0] * self.pixel_grid[1]
        self.proj = nn.Conv2d(cfg.in_chans, cfg.inner_dim, kernel_size=7, padding=3, stride=cfg.first_stride)

    def dynamic_grid(self, h: int, w: int) -> tuple[int, int]:
        return h // self.patch_size[0], w // self.patch_size[1]

    def forward(self, x: Tensor, pixel_pos: Tensor) -> Tensor:
        check_images(x, in_chans=self.in_chans, patch=self.patch_size, expected=self.img_size, what="TNT", dynamic=False)
        B = x.shape[0]
        gh, gw = self.grid_size
        if self.legacy:
            x = self.proj(x)  # (B, inner, H/4, W/4), then 4 x 4 blocks of it
            ph, pw = self.pixel_grid
        else:
            ph, pw = self.patch_size  # 16 x 16 patches of the image, then the convolution per patch
        C = x.shape[1]
        # (B, C, gh*ph, gw*pw) -> (B * gh * gw, C, ph, pw), patches row-major
        x = x.reshape(B, C, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(B * gh * gw, C, ph, pw)
        if not self.legacy:
            x = self.proj(x)  # (B*N, inner, 4, 4)
        x = x + pixel_pos
        return x.flatten(2).transpose(1, 2)  # (B*N, 16, inner)


class TNTBlock(nn.Module):
    """Inner transformer on the pixels, pixels added to their patch token, outer transformer on the patches."""

    def __init__(self, cfg: TNTConfig, num_pixels: int, drop_path: float) -> None:
        super().__init__()
        norm = partial(nn.LayerNorm, eps=cfg.norm_eps)
        d_in, d_out = cfg.inner_dim, cfg.embed_dim
        # materialised attention weights: faster than the fused kernel on CPU for these short sequences
        attn = partial(Attention, qkv_bias=cfg.qkv_bias, attn_drop=cfg.attn_drop_rate, proj_drop=cfg.proj_drop_rate,
                       fused=False)
        self.norm_in = norm(d_in)
        self.attn_in = attn(d_in, num_heads=cfg.num_heads_inner)
        # its maps are over the pixels of each patch, not the image's tokens: analysis takes the outer maps only
        # (at 64 px the 4 x 4 patch grid has as many tokens as a patch has pixels); explain_tnt.py names its modules
        self.attn_in.token_map = False
        self.norm_mlp_in = norm(d_in)
        self.mlp_in = Mlp(d_in, hidden_features=int(d_in * cfg.inner_mlp_ratio), drop=cfg.proj_drop_rate)
        self.legacy = cfg.legacy
        if cfg.legacy:  # a norm per pixel, a biased projection, no second norm
            self.norm1_proj = norm(d_in)
            self.proj = nn.Linear(d_in * num_pixels, d_out, bias=True)
            self.norm2_proj = nn.Identity()
        else:
            self.norm1_proj = norm(d_in * num_pixels)
            self.proj = nn.Linear(d_in * num_pixels, d_out, bias=False)
            self.norm2_proj = norm(d_out)
        self.norm_out = norm(d_out)
        self.attn_out = attn(d_out, num_heads=cfg.num_heads_outer)
        self.norm_mlp = norm(d_out)
        self.mlp = Mlp(d_out, hidden_features=int(d_out * cfg.mlp_ratio), drop=cfg.proj_drop_rate)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, pixels: Tensor, patches: Tensor) -> tuple[Tensor, Tensor]:
        """pixels (B*N, P, d_in); patches (B, 1 + N, D) with the class token first."""
        pixels = pixels + self.drop_path(self.attn_in(self.norm_in(pixels)))
        pixels = pixels + self.drop_path(self.mlp_in(self.norm_mlp_in(pixels)))
        B, T, _ = patches.shape
        width = pixels.shape[1] * pixels.shape[2]  # given, not -1: B may be 0
        if self.legacy:
            words = self.norm1_proj(pixels).reshape(B, T - 1, width)
        else:
            words = self.norm1_proj(pixels.reshape(B, T - 1, width))
        words = self.norm2_proj(self.proj(words))  # (B, N, D)
        patches = torch.cat([patches[:, :1], patches[:, 1:] + words], dim=1)
        patches = patches + self.drop_path(self.attn_out(self.norm_out(patches)))
        patches = patches + self.drop_path(self.mlp(self.norm_mlp(patches)))
        return pixels, patches


class TNT(TimmSurface, nn.Module):
    """TNT classifier; build with a :class:`TNTConfig` or through ``vitlab.create_model``."""

    # inner (pixel) and outer (patch) attention are over different sequences; the family's explainer
    # (analysis/explain_tnt.py) rolls out the outer transformer only
    token_attention = False
    num_prefix_tokens = 1
    onnx_fixed_size_reason = ("the model runs only at the size it was built for: its patch position table is "
                              "tied to the patch grid at that size and is not resampled per input"
                              " (export another fixed size with --img-size)")

    def __init__(self, cfg: TNTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        norm = partial(nn.LayerNorm, eps=cfg.norm_eps)
        self.num_features = self.head_hidden_size = D
        self.global_pool = cfg.global_pool
        self.pixel_embed = PixelEmbed(cfg)
        grid, P = self.pixel_embed.grid_size, self.pixel_embed.num_pixels
        self.norm1_proj = norm(P * cfg.inner_dim)
        self.proj = nn.Linear(P * cfg.inner_dim, D)
        self.norm2_proj = norm(D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.patch_pos = nn.Parameter(torch.zeros(1, 1 + grid[0] * grid[1], D))
        self.pixel_pos = nn.Parameter(torch.zeros(1, cfg.inner_dim, *self.pixel_embed.pixel_grid))
        self.pos_drop = nn.Dropout(cfg.pos_drop_rate)
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList([TNTBlock(cfg, P, dpr[i]) for i in range(cfg.depth)])
        self.norm = norm(D)
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(D, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.cam_tap = nn.Identity()  # the patch tokens entering the last block (Grad-CAM)
        self._init_weights()

    # ----------------------------------------------------------------------------------------- set-up
    def _init_weights(self) -> None:
        for p in (self.cls_token, self.patch_pos, self.pixel_pos):
            nn.init.trunc_normal_(p, std=0.02)
        trunc_normal_linears(self)

    @property
    def patch_embed(self) -> PixelEmbed:
        """The module that sets the patch grid (named as in other families, for the analysis tools)."""
        return self.pixel_embed

    @property
    def num_classes(self) -> int:
        return getattr(self.head, "out_features", 0)  # 0 for Identity (a quantised Linear has it too)

    @property
    def preprocessing(self) -> Preprocessing:
        h, w = self.pixel_embed.img_size
        return Preprocessing(input_size=(self.cfg.in_chans, h, w), mean=self.cfg.mean, std=self.cfg.std,
                             crop_pct=self.cfg.crop_pct, interpolation="bicubic")

    def no_weight_decay(self) -> set[str]:
        return {"patch_pos", "pixel_pos", "cls_token"}

    def reset_classifier(self, num_classes: int, global_pool: Literal["token", "avg"] | None = None) -> None:
        """Replace the head by a zero-initialised (D x K) layer."""
        check_global_pool(self, global_pool, TNT_POOLS)
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = zero_head(self.num_features, num_classes)
        record_head(self, num_classes=max(num_classes, 0), global_pool=self.global_pool)

    def decay_layer_id(self, name: str) -> int:
        """Layer-wise lr decay (as timm's group_matcher for TNT): the pixel and patch embeddings with their
        position tables and the class token 0, ``blocks.i`` i + 1, the final norm and head L + 1."""
        top = name.split(".", 1)[0]
        if top in _DECAY_STEM:
            return 0
        if top == "blocks":
            return int(name.split(".")[1]) + 1
        return self.num_decay_layers() + 1

    def num_decay_layers(self) -> int:
        return len(self.blocks)

    def cam_layer(self) -> nn.Module:
        """Grad-CAM's map: the patch tokens entering the last block."""
        return self.cam_tap

    def position_grid_table(self) -> tuple[Tensor, tuple[int, int], str]:
        """For the analysis tools: the learned patch table without its class-token entry."""
        return self.patch_pos[0, 1:], self.pixel_embed.grid_size, "learn"

    def adapt_checkpoint(self, sd: dict[str, Tensor], *, source: str) -> dict[str, Tensor]:
        """Resample ``patch_pos`` to this model's grid; the pixel table is per patch and does not change."""
        out = dict(sd)
        v = out.get("patch_pos")
        grid = self.pixel_embed.grid_size
        if v is not None and v.ndim == 3 and v.shape[1] != 1 + grid[0] * grid[1]:
            out["patch_pos"] = resample_pos_embed(v, grid, num_prefix_tokens=1)
        return out

    # ------------------------------------------------------------------------------------------ forward
    def _embed(self, x: Tensor) -> tuple[Tensor, Tensor]:
        B = x.shape[0]
        pixels = self.pixel_embed(x, self.pixel_pos)  # (B*N, P, inner)
        n = self.pixel_embed.grid_size[0] * self.pixel_embed.grid_size[1]
        words = pixels.reshape(B, n, pixels.shape[1] * pixels.shape[2])  # (B, N, P * inner); B may be 0
        patches = self.norm2_proj(self.proj(self.norm1_proj(words)))  # (B, N, D)
        patches = torch.cat([self.cls_token.expand(B, -1, -1), patches], dim=1) + self.patch_pos
        return pixels, self.pos_drop(patches)

    def _run_blocks(self, x: Tensor, take: set[int] | None = None) -> tuple[Tensor, list[Tensor]]:
        pixels, patches = self._embed(x)
        kept = []
        for i, blk in enumerate(self.blocks):
            if i == len(self.blocks) - 1:
                patches = self.cam_tap(patches)
            pixels, patches = call_block(blk, pixels, patches, checkpointed=self.grad_checkpointing)
            if take is not None and i in take:
                kept.append(patches)
        return patches, kept

    def forward_features(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> normalised patch tokens (B, 1 + N, D), class token first."""
        return self.norm(self._run_blocks(x)[0])

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        *,
        norm: bool = False,
        output_fmt: Literal["NLC", "NCHW"] = "NLC",
        return_prefix_tokens: bool = False,
    ) -> tuple[Tensor, list[Tensor] | list[tuple[Tensor, Tensor]]]:
        """Run the model and keep the patch tokens (outer transformer) of the chosen blocks.

        Returns:
            (the output of forward_features, the intermediates).
        """
        if output_fmt not in ("NLC", "NCHW"):
            raise ValueError(f"forward_intermediates: output_fmt must be 'NLC' or 'NCHW', got {output_fmt!r}")
        take = set(take_indices(len(self.blocks), indices))
        final, kept = self._run_blocks(x, take)
        B, grid = x.shape[0], self.pixel_embed.grid_size
        results: list = []
        for y in kept:
            y = self.norm(y) if norm else y
            prefix, tokens = y[:, :1], y[:, 1:]
            if output_fmt == "NCHW":
                tokens = tokens.reshape(B, *grid, tokens.shape[-1]).permute(0, 3, 1, 2)  # (B, D, rows, cols)
            results.append((tokens, prefix) if return_prefix_tokens else tokens)
        return self.norm(final), results

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x[:, 0] if self.global_pool == "token" else x[:, 1:].mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# ------------------------------------------------------------------------------------------- variants
# TNT paper, Table 1: TNT-S (outer 384, 6 heads; inner 24) and TNT-B (outer 640, 10 heads; inner 40);
# depth 12, 16 x 16 patches of 4 x 4 pixels, inner heads 4. "legacy": timm's first port of TNT-S.
TNT_VARIANTS: dict[str, dict] = {
    "tnt_s_patch16_224": dict(embed_dim=384, inner_dim=24, num_heads_outer=6),
    "tnt_b_patch16_224": dict(embed_dim=640, inner_dim=40, num_heads_outer=10),
    "tnt_s_legacy_patch16_224": dict(embed_dim=384, inner_dim=24, num_heads_outer=6, legacy=True),
}


def _register_tnt_variants() -> None:
    for name, dims in TNT_VARIANTS.items():
        size = name.split("_")[1].upper()
        register_model(ModelEntry(name=name, family="tnt", config=TNTConfig(**dims), build=TNT,
                                  description=f"TNT-{size}{' (timm legacy layout)' if dims.get('legacy') else ''}"))


_register_tnt_variants()
