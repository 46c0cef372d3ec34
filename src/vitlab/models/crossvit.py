"""CrossViT: "Cross-Attention Multi-Scale Vision Transformer for Image Classification".

Chen, Fan and Panda, 2021, arXiv:2103.14899. Two ViT branches look at the same image at two scales:
a small-patch branch (patch 12, the "S" branch, narrow) and a large-patch branch (patch 16, the "L"
branch, twice as wide). What differs from ViT:

* Each branch sees its own copy of the input, resized inside the model (section 3.2 and the released
  code): at 240 px the small branch keeps 240 (a 20 x 20 grid) and the large one gets 224 (14 x 14).
  Each has its class token and learned position table.
* The encoder is K multi-scale blocks; each runs M = 1 ViT block on the small branch and N blocks on
  the large one, then fuses the two (section 3.3, "cross-attention fusion"): branch i's class token is
  projected to branch j's width (LN -> GELU -> Linear), attends to itself and to branch j's patch
  tokens (query = the class token only, no MLP), and is projected back (LN -> GELU -> Linear).
* The head is one LayerNorm + Linear per branch on its class token; the logits are the MEAN of the two.
* Dagger variants (CrossViT-dagger) replace the linear patch projection by three convolutions
  (7x7/4, 3x3/3 or 3x3/2, 3x3/1 or 3x3/2, with ReLU).

Resolution rule (vitlab's, so that any ``img_size`` works; timm's ``int(img_size * scale)`` breaks at
288): branch i is fed the image resized to ``p_i * round(img_size * s_i / p_i)`` pixels per side, with
``s = branch_scale`` (1, 224/240) for the 240 models and (1, 384/408) for the 408 ones. For the
published sizes this is exactly the released code's 240/224 and 408/384; at 288 it gives 288 (24 x 24)
and 272 (17 x 17). The position tables of a checkpoint are resampled to those grids on loading.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitlab.layers import (
    Block,
    PatchEmbed,
    call_block,
    check_images,
    resample_pos_embed,
    to_2tuple,
    trunc_normal_linears,
)
from vitlab.layers.cross_attention import CrossAttentionBlock
from vitlab.models.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocessing,
    TimmSurface,
    check_global_pool,
    record_head,
    take_indices,
)
from vitlab.models.registry import ModelEntry, check_config, register_model

# the poolings the family computes: the class token or the mean of the patch tokens
CROSSVIT_POOLS = ("token", "avg")


def crossvit_depth_pairs(depth: object, *, what: str) -> tuple[tuple[int, int], ...]:
    """A CrossViT depth as (small-branch blocks, large-branch blocks) per multi-scale block. timm's spelling
    [b0, b1, blocks after the fusion] is read with a third entry of 0; a non-zero one is a ValueError (vitlab's
    CrossViT has no blocks after the fusion, as no published model has). ``what`` names the value in errors."""
    form = "one [small-branch blocks, large-branch blocks] pair per multi-scale block (or timm's [b0, b1, 0])"
    if not isinstance(depth, (list, tuple)) or not all(isinstance(d, (list, tuple)) for d in depth):
        raise ValueError(f"{what}={depth!r}: expected {form}")
    pairs = []
    for d in depth:
        if len(d) == 3 and d[2]:
            raise ValueError(f"{what}={depth!r}: blocks after CrossViT's fusion (a non-zero third entry, timm's) "
                             f"have no counterpart in vitlab's CrossViT; expected {form}")
        if len(d) not in (2, 3):
            raise ValueError(f"{what}={depth!r}: expected {form}")
        pairs.append((d[0], d[1]))
    return tuple(pairs)


@dataclass(frozen=True, kw_only=True)
class CrossViTConfig:
    """Args:
    img_size: input resolution; each branch's own size follows from it (module docstring).
    branch_scale: relative resize factor of each branch before its patch embedding.
    patch_size: patch size of the (small, large) branches.
    embed_dim: widths of the two branches.
    depth: per multi-scale block, the ViT blocks of each branch (the paper's M and N); timm's
        [M, N, 0] is read as [M, N].
    num_heads: heads of each branch; a cross-attention into branch j uses branch j's heads.
    mlp_ratio: MLP width ratio of each branch's ViT blocks.
    multi_conv: the dagger patch embedding (three convolutions).
    """

    img_size: int = 240
    branch_scale: tuple[float, float] = (1.0, 224 / 240)
    patch_size: tuple[int, int] = (12, 16)
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: tuple[int, int] = (128, 256)
    depth: tuple[tuple[int, int], ...] = ((1, 3),) * 3
    num_heads: tuple[int, int] = (4, 4)
    mlp_ratio: tuple[float, float] = (3.0, 3.0)
    qkv_bias: bool = True
    multi_conv: bool = False
    global_pool: Literal["token", "avg"] = "token"
    norm_eps: float = 1e-6
    drop_rate: float = 0.0
    pos_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    mean: tuple[float, ...] = field(default=IMAGENET_MEAN)
    std: tuple[float, ...] = field(default=IMAGENET_STD)
    crop_pct: float = 0.875

    def __post_init__(self) -> None:
        object.__setattr__(self, "depth", crossvit_depth_pairs(self.depth, what="CrossViTConfig: depth"))
        check_global_pool(self, self.global_pool, CROSSVIT_POOLS)
        check_config(self)
        for d, h in zip(self.embed_dim, self.num_heads):
            if d % h:
                raise ValueError(f"CrossViTConfig: embed_dim {d} is not divisible by num_heads {h}")
        if self.multi_conv and tuple(self.patch_size) not in ((12, 16), (16, 12), (12, 12), (16, 16)):
            raise ValueError(f"CrossViTConfig: multi_conv needs patch sizes 12 or 16, got {self.patch_size}")
        if not self.depth:
            raise ValueError("CrossViTConfig: depth needs at least one multi-scale block")
        if any(max(d, default=0) < 1 for d in self.depth):
            raise ValueError(f"CrossViTConfig: each multi-scale block needs a ViT block in a branch, got depth "
                             f"{self.depth}")

    def branch_sizes(self) -> list[tuple[int, int]]:
        """The resolution each branch is fed (the rule of the module docstring), (rows, cols) per branch."""
        h, w = to_2tuple(self.img_size)
        out = []
        for s, p in zip(self.branch_scale, self.patch_size):
            bh, bw = (p * max(1, round(v * s / p)) for v in (h, w))
            out.append((bh, bw))
        return out


class ConvPatchEmbed(nn.Module):
    """CrossViT-dagger's patch embedding: three convolutions with ReLU (stride 4 x 3 x 1 or 4 x 2 x 2)."""

    def __init__(self, *, img_size: tuple[int, int], patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        second, third = ((3, 0), (1, 1)) if patch_size == 12 else ((2, 1), (2, 1))  # (stride, padding)
        self.img_size = img_size
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim // 4, kernel_size=7, stride=4, padding=3),
            nn.ReLU(inplace=True),
            nn.Conv2d(embed_dim // 4, embed_dim // 2, kernel_size=3, stride=second[0], padding=second[1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(embed_dim // 2, embed_dim, kernel_size=3, stride=third[0], padding=third[1]),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, N, D)


class MultiScaleBlock(nn.Module):
    """Each branch's ViT blocks, then cross-attention fusion of the class tokens in both directions."""

    def __init__(self, cfg: CrossViTConfig, depth: tuple[int, int], drop_path: list[float]) -> None:
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=cfg.norm_eps)
        dims, heads = cfg.embed_dim, cfg.num_heads
        self.blocks = nn.ModuleList([
            nn.Sequential(*[
                Block(dims[b], num_heads=heads[b], mlp_ratio=cfg.mlp_ratio[b], qkv_bias=cfg.qkv_bias,
                      proj_drop=cfg.proj_drop_rate, attn_drop=cfg.attn_drop_rate, drop_path=drop_path[i],
                      norm_layer=norm_layer)
                for i in range(depth[b])
            ])
            for b in range(2)
        ])
        # projs[i]: branch i's class token to branch j's width; fusion[i] works in branch j's width
        self.projs = nn.ModuleList([
            nn.Sequential(norm_layer(dims[i]), nn.GELU(), nn.Linear(dims[i], dims[1 - i])) for i in range(2)
        ])
        self.fusion = nn.ModuleList([
            CrossAttentionBlock(dims[1 - i], num_heads=heads[1 - i], qkv_bias=cfg.qkv_bias,
                                proj_drop=cfg.proj_drop_rate, attn_drop=cfg.attn_drop_rate,
                                drop_path=drop_path[-1], norm_layer=norm_layer)
            for i in range(2)
        ])
        self.revert_projs = nn.ModuleList([
            nn.Sequential(norm_layer(dims[1 - i]), nn.GELU(), nn.Linear(dims[1 - i], dims[i])) for i in range(2)
        ])

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        """xs: [(B, 1 + N0, D0), (B, 1 + N1, D1)], class token first in each."""
        ys = [blocks(x) for blocks, x in zip(self.blocks, xs)]
        out = []
        for i in range(2):
            other = ys[1 - i]
            cls = self.projs[i](ys[i][:, :1])  # (B, 1, D_other)
            cls = self.fusion[i](torch.cat([cls, other[:, 1:]], dim=1))  # attends to the other's patches
            out.append(torch.cat([self.revert_projs[i](cls), ys[i][:, 1:]], dim=1))
        return out


class CrossViT(TimmSurface, nn.Module):
    """CrossViT classifier; build with a :class:`CrossViTConfig` or through ``vitlab.create_model``."""

    token_attention = False  # two token sequences: the family's explainer (analysis/explain_crossvit.py) applies
    num_prefix_tokens = 1  # per branch
    onnx_fixed_size_reason = ("the model runs only at the size it was built for: each branch's position table "
                              "is tied to its patch grid at that size and is not resampled per input"
                              " (export another fixed size with --img-size)")

    def __init__(self, cfg: CrossViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.global_pool = cfg.global_pool
        self.num_features = self.head_hidden_size = sum(cfg.embed_dim)  # pre-logits: both class tokens
        self.branch_sizes = cfg.branch_sizes()
        norm_layer = partial(nn.LayerNorm, eps=cfg.norm_eps)
        self.patch_embed = nn.ModuleList()
        for size, p, d in zip(self.branch_sizes, cfg.patch_size, cfg.embed_dim):
            if cfg.multi_conv:
                self.patch_embed.append(ConvPatchEmbed(img_size=size, patch_size=p, in_chans=cfg.in_chans,
                                                       embed_dim=d))
            else:
                self.patch_embed.append(PatchEmbed(img_size=size, patch_size=p, in_chans=cfg.in_chans,
                                                   embed_dim=d))
        self.grids = [pe.grid_size for pe in self.patch_embed]
        self.cls_token = nn.ParameterList([nn.Parameter(torch.zeros(1, 1, d)) for d in cfg.embed_dim])
        self.pos_embed = nn.ParameterList([
            nn.Parameter(torch.zeros(1, 1 + g[0] * g[1], d)) for g, d in zip(self.grids, cfg.embed_dim)
        ])
        self.pos_drop = nn.Dropout(cfg.pos_drop_rate)
        # stochastic depth grows over the large branch's blocks; a block's fusion takes its last rate
        total = sum(max(d) for d in cfg.depth)
        rates = [cfg.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.blocks = nn.ModuleList()
        start = 0
        for d in cfg.depth:
            self.blocks.append(MultiScaleBlock(cfg, d, rates[start:start + max(d)]))
            start += max(d)
        self.norm = nn.ModuleList([norm_layer(d) for d in cfg.embed_dim])
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = self._make_heads(cfg.num_classes)
        self.cam_tap = nn.Identity()  # the small branch's tokens entering the last block (Grad-CAM)
        self._init_weights()

    # ----------------------------------------------------------------------------------------- set-up
    def _make_heads(self, num_classes: int) -> nn.ModuleList:
        return nn.ModuleList([nn.Linear(d, num_classes) if num_classes > 0 else nn.Identity()
                              for d in self.cfg.embed_dim])

    def _init_weights(self) -> None:
        for p in (*self.pos_embed, *self.cls_token):
            nn.init.trunc_normal_(p, std=0.02)
        trunc_normal_linears(self)

    @property
    def num_classes(self) -> int:
        return getattr(self.head[0], "out_features", 0)  # 0 for Identity (a quantised Linear has it too)

    @property
    def preprocessing(self) -> Preprocessing:
        h, w = to_2tuple(self.cfg.img_size)
        return Preprocessing(input_size=(self.cfg.in_chans, h, w), mean=self.cfg.mean, std=self.cfg.std,
                             crop_pct=self.cfg.crop_pct, interpolation="bicubic")

    def no_weight_decay(self) -> set[str]:
        return {f"{t}.{i}" for t in ("pos_embed", "cls_token") for i in range(2)}

    def reset_classifier(self, num_classes: int, global_pool: Literal["token", "avg"] | None = None) -> None:
        """Replace both heads by zero-initialised layers."""
        check_global_pool(self, global_pool, CROSSVIT_POOLS)
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = self._make_heads(num_classes)
        for h in self.head:
            if isinstance(h, nn.Linear):
                nn.init.zeros_(h.weight)
                nn.init.zeros_(h.bias)
        record_head(self, num_classes=max(num_classes, 0), global_pool=self.global_pool)

    def cam_layer(self) -> nn.Module:
        """Grad-CAM's map: the small-patch branch's tokens as they enter the last multi-scale block (its
        class token reads them there, and so does the other branch's class token in the fusion)."""
        return self.cam_tap

    def position_grid_table(self) -> tuple[Tensor, tuple[int, int], str]:
        """For the analysis tools: the small branch's learned table without its class-token entry."""
        return self.pos_embed[0][0, 1:], self.grids[0], "learn"

    def adapt_checkpoint(self, sd: dict[str, Tensor], *, source: str) -> dict[str, Tensor]:
        """Resample both branches' position tables to this model's grids (a checkpoint of another size)."""
        out = dict(sd)
        for i, grid in enumerate(self.grids):
            key = f"pos_embed.{i}"
            v = out.get(key)
            if v is not None and v.ndim == 3 and v.shape[1] != 1 + grid[0] * grid[1]:
                out[key] = resample_pos_embed(v, grid, num_prefix_tokens=1)
        return out

    # ------------------------------------------------------------------------------------------ forward
    def _embed(self, x: Tensor) -> list[Tensor]:
        """Images -> [(B, 1 + N_i, D_i)] per branch: resized, embedded, class token and positions added."""
        h, w = to_2tuple(self.cfg.img_size)
        check_images(x, in_chans=self.cfg.in_chans, patch=(1, 1), expected=(h, w), what="CrossViT", dynamic=False)
        xs = []
        for i, pe in enumerate(self.patch_embed):
            xi = x
            if tuple(x.shape[-2:]) != tuple(self.branch_sizes[i]):
                xi = F.interpolate(x, size=self.branch_sizes[i], mode="bicubic", align_corners=False)
            xi = pe(xi)  # (B, N_i, D_i)
            xi = torch.cat([self.cls_token[i].expand(x.shape[0], -1, -1), xi], dim=1) + self.pos_embed[i]
            xs.append(self.pos_drop(xi))
        return xs

    def _run_blocks(self, xs: list[Tensor], take: set[int] | None = None) -> tuple[list[Tensor], list[list[Tensor]]]:
        kept = []
        for i, blk in enumerate(self.blocks):
            if i == len(self.blocks) - 1:
                xs = [self.cam_tap(xs[0]), xs[1]]
            xs = call_block(blk, xs, checkpointed=self.grad_checkpointing)
            if take is not None and i in take:
                kept.append(xs)
        return xs, kept

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """Images (B, C, H, W) -> [small branch (B, 1 + N0, D0), large branch (B, 1 + N1, D1)], normalised."""
        xs, _ = self._run_blocks(self._embed(x))
        return [norm(t) for norm, t in zip(self.norm, xs)]

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        *,
        norm: bool = False,
        output_fmt: Literal["NLC", "NCHW"] = "NLC",
        return_prefix_tokens: bool = False,
        branch: int | None = None,
    ) -> tuple[list[Tensor], list[Tensor] | list[tuple[Tensor, Tensor]]]:
        """Run the model and keep the outputs of the chosen multi-scale blocks.

        Args:
            indices: None for all blocks, n for the last n, or a list of block indices.
            norm: pass each intermediate through its branch's final norm.
            output_fmt: "NLC" (B, N, D) patch tokens or "NCHW" (B, D, rows, cols) maps.
            return_prefix_tokens: return (patch_tokens, class_tokens) pairs.
            branch: 0 or 1 for that branch alone (its own grid and width); None (default) for both on
                the small branch's grid: the large branch's map is resized bilinearly to it and the
                channels are concatenated (width D0 + D1 = ``num_features``, class tokens likewise).
        Returns:
            (the output of forward_features, the intermediates).
        """
        if output_fmt not in ("NLC", "NCHW"):
            raise ValueError(f"forward_intermediates: output_fmt must be 'NLC' or 'NCHW', got {output_fmt!r}")
        if branch not in (None, 0, 1):
            raise ValueError(f"forward_intermediates: branch must be None, 0 or 1, got {branch!r}")
        take = set(take_indices(len(self.blocks), indices))
        xs, kept = self._run_blocks(self._embed(x), take)
        results: list = []
        for ys in kept:
            maps, prefixes = [], []
            for b, y in enumerate(ys):
                y = self.norm[b](y) if norm else y
                B, _, D = y.shape
                maps.append(y[:, 1:].transpose(1, 2).reshape(B, D, *self.grids[b]))  # (B, D_b, rows, cols)
                prefixes.append(y[:, :1])
            if branch is None:
                large = F.interpolate(maps[1], size=self.grids[0], mode="bilinear", align_corners=False)
                fmap, prefix = torch.cat([maps[0], large], dim=1), torch.cat(prefixes, dim=-1)
            else:
                fmap, prefix = maps[branch], prefixes[branch]
            tokens = fmap if output_fmt == "NCHW" else fmap.flatten(2).transpose(1, 2)
            results.append((tokens, prefix) if return_prefix_tokens else tokens)
        return [n(t) for n, t in zip(self.norm, xs)], results

    def forward_head(self, xs: list[Tensor], pre_logits: bool = False) -> Tensor:
        """[(B, 1 + N_i, D_i)] -> logits (B, K): the mean of the two heads; pre-logits: both tokens concatenated."""
        pooled = [t[:, 0] if self.global_pool == "token" else t[:, 1:].mean(dim=1) for t in xs]
        pooled = [self.head_drop(t) for t in pooled]
        if pre_logits or self.num_classes == 0:  # no head: the features, as timm returns them
            return torch.cat(pooled, dim=-1)
        return torch.stack([head(t) for head, t in zip(self.head, pooled)]).mean(dim=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# ------------------------------------------------------------------------------------------- variants
# The released models (IBM/CrossViT models/crossvit.py, as kept by timm): widths (small, large branch),
# large-branch blocks N per multi-scale block (3 blocks, M = 1), heads, MLP ratio. The IBM names *_224 and
# *_384 really take 240 and 408 px inputs; the names here say the true size (as timm's do).
CROSSVIT_SIZES: dict[str, dict] = {
    "tiny": dict(embed_dim=(96, 192), n=4, num_heads=(3, 3), mlp=4.0),
    "small": dict(embed_dim=(192, 384), n=4, num_heads=(6, 6), mlp=4.0),
    "base": dict(embed_dim=(384, 768), n=4, num_heads=(12, 12), mlp=4.0),
    "9": dict(embed_dim=(128, 256), n=3, num_heads=(4, 4), mlp=3.0),
    "15": dict(embed_dim=(192, 384), n=5, num_heads=(6, 6), mlp=3.0),
    "18": dict(embed_dim=(224, 448), n=6, num_heads=(7, 7), mlp=3.0),
}
CROSSVIT_VARIANTS: tuple[tuple[str, bool, int], ...] = (  # (size, dagger, resolution)
    ("tiny", False, 240), ("small", False, 240), ("base", False, 240),
    ("9", False, 240), ("15", False, 240), ("18", False, 240),
    ("9", True, 240), ("15", True, 240), ("18", True, 240),
    ("15", True, 408), ("18", True, 408),
)


def _register_crossvit_variants() -> None:
    for size, dagger, res in CROSSVIT_VARIANTS:
        s = CROSSVIT_SIZES[size]
        name = f"crossvit_{size}{'_dagger' if dagger else ''}_{res}"
        cfg = CrossViTConfig(
            img_size=res, branch_scale=(1.0, (224 if res == 240 else 384) / res), embed_dim=s["embed_dim"],
            depth=((1, s["n"]),) * 3, num_heads=s["num_heads"], mlp_ratio=(s["mlp"], s["mlp"]),
            multi_conv=dagger, crop_pct=0.875 if res == 240 else 1.0,
        )
        register_model(ModelEntry(name=name, family="crossvit", config=cfg, build=CrossViT,
                                  description=f"CrossViT-{size}{'-dagger' if dagger else ''} at {res}px"))


_register_crossvit_variants()
