"""BEiT (v1, v2) and BEiT-3's vision encoder: ViTs pre-trained by masked image modelling.

BEiT: Bao et al. 2021, "BEiT: BERT Pre-Training of Image Transformers", arXiv:2106.08254.
BEiT v2: Peng et al. 2022, "BEiT v2: Masked Image Modeling with Vector-Quantized Visual Tokenizers",
arXiv:2208.06366 (the same backbone; a new tokenizer and pre-training). BEiT-3: Wang et al. 2022, "Image as
a Foreign Language: BEiT Pretraining for All Vision and Vision-Language Tasks", arXiv:2208.10442.

What differs from ViT (v1/v2): no absolute position table by default; instead a learned relative
position bias over the whole patch grid plus three class-token entries (:mod:`vitlab.layers.rel_pos_attention`),
one table shared by all layers in pre-training (``use_shared_rel_pos_bias``) and one per layer after
fine-tuning (``use_rel_pos_bias``); q and v projections have biases, k has none; LayerScale on both
residual branches (0.1 at Base, 1e-5 at Large); the classifier averages the patch tokens and normalises
after pooling (``fc_norm``). Initialisation rescales each block's output projections by 1/sqrt(2 * layer).

BEiT-3's vision encoder, in timm's layout (branch "A" of the Multiway Transformer; the vision-language
pre-training itself is not implemented): a learned absolute table with a class-token entry, a fused qkv
bias, Magneto's sub-LN (a LayerNorm on the attention output before its projection and one inside the MLP
before its second Linear), LayerNorm eps 1e-5, no LayerScale, average pooling with ``fc_norm``. The
original torchscale checkpoints also normalise the tokens before pooling (``final_norm``).

Masking hook (:mod:`vitlab.layers.token_mask`): BEiT replaces masked patch embeddings by a mask token
before the class token and position information are added, which is what ``forward_features(x,
mask=...)`` does; masks that drop tokens (MAE) keep each kept token's biases (the tables' rows and columns of those tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitlab.layers import (
    Block,
    PatchEmbed,
    TokenMasker,
    call_block,
    keep_tokens,
    resample_pos_embed,
    size_differs,
    trunc_normal_linears,
)
from vitlab.layers.rel_pos_attention import (
    CLASS_SLOTS,
    RelativePositionBias,
    RelPosAttention,
    gather_bias,
    resample_class_rel_pos_table,
    table_grid,
)
from vitlab.models.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
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

_EMBED_PREFIXES = ("patch_embed", "cls_token", "pos_embed", "rel_pos_bias")


@dataclass(frozen=True, kw_only=True)
class BeitConfig:
    """Args:
    qkv_bias: projection biases (their layout: ``qkv_bias_layout``).
    qkv_bias_layout: "qv" (BEiT: q and v biases, none on k) or "qkv" (BEiT-3: one fused bias).
    global_pool: "avg" (patch tokens averaged, BEiT's fine-tuning) or "token" (the class token).
    fc_norm: normalise after pooling (None: with "avg" pooling).
    final_norm: normalise the tokens after the blocks (None: when there is no ``fc_norm``; the original
        BEiT-3 checkpoints have both).
    init_values: LayerScale initial value (None: no LayerScale).
    use_abs_pos_emb: a learned absolute position table (with a class-token entry).
    use_rel_pos_bias: a relative position table per layer (fine-tuned BEiT).
    use_shared_rel_pos_bias: one relative position table for all layers (BEiT pre-training).
    sub_ln: BEiT-3's extra LayerNorms inside attention and MLP.
    head_init_scale: the head's initial weights are trunc-normal(0.02) times this (BEiT's fine-tuning).
    """

    img_size: int | tuple[int, int] = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qkv_bias_layout: Literal["qv", "qkv"] = "qv"
    global_pool: Literal["avg", "token"] = "avg"
    fc_norm: bool | None = None
    final_norm: bool | None = None
    init_values: float | None = 0.1
    use_abs_pos_emb: bool = False
    use_rel_pos_bias: bool = True
    use_shared_rel_pos_bias: bool = False
    sub_ln: bool = False
    norm_eps: float = 1e-6
    drop_rate: float = 0.0
    pos_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    head_init_scale: float = 0.001
    dynamic_img_size: bool = False  # only without relative position tables (BEiT-3): the absolute table is resampled
    pos_antialias: bool = True  # that resampling antialiased (timm) or not (transformers: Hugging Face folders)
    mean: tuple[float, ...] = field(default=INCEPTION_MEAN)
    std: tuple[float, ...] = field(default=INCEPTION_STD)
    crop_pct: float | None = None

    def __post_init__(self) -> None:
        if self.global_pool not in ("avg", "token"):
            raise ValueError(f"BeitConfig: global_pool must be 'avg' or 'token', got {self.global_pool!r}")
        if self.qkv_bias_layout not in ("qv", "qkv"):
            raise ValueError(f"BeitConfig: qkv_bias_layout must be 'qv' or 'qkv', got {self.qkv_bias_layout!r}")
        check_config(self)
        if self.embed_dim % self.num_heads:
            raise ValueError(f"BeitConfig: embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if self.dynamic_img_size and (self.use_rel_pos_bias or self.use_shared_rel_pos_bias):
            raise ValueError("BeitConfig: dynamic_img_size is not supported with relative position tables (they are "
                             "tied to the patch grid, as in timm); build the model with img_size= instead: a "
                             "checkpoint's tables are then resampled to that grid")

    @property
    def uses_fc_norm(self) -> bool:
        return self.global_pool == "avg" if self.fc_norm is None else self.fc_norm

    @property
    def uses_final_norm(self) -> bool:
        return not self.uses_fc_norm if self.final_norm is None else self.final_norm


class Beit(TimmSurface, nn.Module):
    """BEiT / BEiT v2 / BEiT-3 vision encoder classifier; build with a :class:`BeitConfig` or through
    ``vitlab.create_model``."""

    token_attention = True  # global attention over [class, patches]: rollout applies
    num_prefix_tokens = 1

    def __init__(self, cfg: BeitConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        norm_layer = partial(nn.LayerNorm, eps=cfg.norm_eps)
        self.num_features = self.head_hidden_size = D
        self.global_pool = cfg.global_pool
        self.dynamic_img_size = cfg.dynamic_img_size
        self.patch_embed = PatchEmbed(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                                      embed_dim=D, strict_img_size=not cfg.dynamic_img_size)
        self.patch_embed.dynamic_option = not (cfg.use_rel_pos_bias or cfg.use_shared_rel_pos_bias)
        grid = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid[0] * grid[1], D)) if cfg.use_abs_pos_emb else None
        self.pos_embed_prefix = 1  # the absolute table has a class-token entry
        self.pos_drop = nn.Dropout(cfg.pos_drop_rate)
        self.rel_pos_bias = (RelativePositionBias(grid=grid, num_heads=cfg.num_heads)
                             if cfg.use_shared_rel_pos_bias else None)
        attn_layer = partial(RelPosAttention, qkv_bias_layout=cfg.qkv_bias_layout,
                             grid=grid if cfg.use_rel_pos_bias else None,
                             inner_norm=norm_layer if cfg.sub_ln else None)
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # grows with depth
        self.blocks = nn.ModuleList([
            Block(D, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
                  proj_drop=cfg.proj_drop_rate, attn_drop=cfg.attn_drop_rate, init_values=cfg.init_values,
                  drop_path=dpr[i], norm_layer=norm_layer, attn_layer=attn_layer, mlp_norm=cfg.sub_ln)
            for i in range(cfg.depth)
        ])
        self.norm = norm_layer(D) if cfg.uses_final_norm else nn.Identity()
        self.fc_norm = norm_layer(D) if cfg.uses_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(D, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self._init_weights()

    # ----------------------------------------------------------------------------------------- set-up
    def _init_weights(self) -> None:
        trunc_normal_linears(self)
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        with torch.no_grad():  # BEiT: the residual branches' output projections shrink with depth
            for i, blk in enumerate(self.blocks):
                blk.attn.proj.weight.div_(math.sqrt(2.0 * (i + 1)))
                blk.mlp.fc2.weight.div_(math.sqrt(2.0 * (i + 1)))
            if isinstance(self.head, nn.Linear):
                self.head.weight.mul_(self.cfg.head_init_scale)
                self.head.bias.mul_(self.cfg.head_init_scale)

    @property
    def num_classes(self) -> int:
        return getattr(self.head, "out_features", 0)  # 0 for Identity (a quantised Linear has it too)

    @property
    def preprocessing(self) -> Preprocessing:
        h, w = self.patch_embed.img_size
        crop = self.cfg.crop_pct if self.cfg.crop_pct is not None else (0.9 if max(h, w) <= 224 else 1.0)
        return Preprocessing(input_size=(self.cfg.in_chans, h, w), mean=self.cfg.mean, std=self.cfg.std,
                             crop_pct=crop, interpolation="bicubic")

    def no_weight_decay(self) -> set[str]:
        """Position table, class token and the relative position tables (as timm)."""
        names = {n for n, _ in self.named_parameters()}
        return {n for n in names if n in ("pos_embed", "cls_token") or n.endswith("relative_position_bias_table")}

    def reset_classifier(self, num_classes: int, global_pool: Literal["avg", "token"] | None = None) -> None:
        """Replace the head by a zero-initialised (D x K) layer (the pooling's norm stays as built)."""
        check_global_pool(self, global_pool, ("avg", "token"))
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = zero_head(self.num_features, num_classes)
        record_head(self, num_classes=max(num_classes, 0), global_pool=self.global_pool)

    def decay_layer_id(self, name: str) -> int:
        """Layer-wise lr decay: embeddings and the shared position table 0, ``blocks.i`` i + 1, the rest L + 1."""
        if name.startswith(_EMBED_PREFIXES):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.num_decay_layers() + 1

    def num_decay_layers(self) -> int:
        return len(self.blocks)

    # ------------------------------------------------------------------------------------------ forward
    def _embed(self, x: Tensor, mask: TokenMasker | None = None) -> tuple[Tensor, tuple[int, int], Tensor | None]:
        """Patch tokens (masked if asked), class token in front, absolute positions: (B, 1 + N, D), or
        (B, 1 + K, D) when the mask kept K patches; then also their (B, 1 + K) indices among the 1 + N tokens."""
        h, w = x.shape[-2:]
        x = self.patch_embed(x)  # validates the input: (B, C, H, W) -> (B, N, D)
        grid = self.patch_embed.dynamic_grid(h, w)
        keep = None
        if mask is not None:
            x, keep = mask(x, grid)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + N, D)
        if self.pos_embed is not None:
            pos = self.pos_embed
            if self.dynamic_img_size and size_differs(grid, self.patch_embed.grid_size):
                pos = resample_pos_embed(pos, grid, old_size=self.patch_embed.grid_size, num_prefix_tokens=1,
                                         antialias=self.cfg.pos_antialias)
            x = x + pos
        index = None
        if keep is not None:  # each kept patch carries its own position; the class token stays in front
            x = torch.cat([x[:, :1], keep_tokens(x[:, 1:], keep)], dim=1)  # (B, 1 + K, D)
            index = torch.cat([torch.zeros_like(keep[:, :1]), keep + 1], dim=1)  # (B, 1 + K) among 1 + N tokens
        return self.pos_drop(x), grid, index

    @property
    def onnx_fixed_size_reason(self) -> str | None:
        """Why a dynamic-size ONNX graph is refused (read by the exporter), or None (BEiT-3: no tables)."""
        if not self.has_rel_pos_tables:
            return None
        return ("its relative position tables are built for one patch grid, as in timm (export another fixed size "
                "with --img-size: the tables are resampled to it)")

    @property
    def has_rel_pos_tables(self) -> bool:
        return self.cfg.use_rel_pos_bias or self.cfg.use_shared_rel_pos_bias

    def _blocks(self, x: Tensor, index: Tensor | None, take: set[int] | None = None) -> tuple[Tensor, list[Tensor]]:
        shared = self.rel_pos_bias() if self.rel_pos_bias is not None else None  # (heads, 1 + N, 1 + N)
        if shared is not None and index is not None:
            shared = gather_bias(shared, index)  # (B, heads, 1 + K, 1 + K)
        kw = {"token_index": index} if index is not None and self.cfg.use_rel_pos_bias else {}
        kept: list[Tensor] = []
        for i, blk in enumerate(self.blocks):
            x = call_block(blk, x, attn_mask=shared, checkpointed=self.grad_checkpointing, **kw)
            if take is not None and i in take:
                kept.append(x)
        return x, kept

    def forward_features(self, x: Tensor, *, mask: TokenMasker | None = None) -> Tensor:
        """Images (B, C, H, W) -> tokens (B, 1 + N, D), normalised if the model has a final norm.

        ``mask``: the masked-image-modelling hook (:mod:`vitlab.layers.token_mask`).
        """
        x, _, index = self._embed(x, mask)
        x, _ = self._blocks(x, index)
        return self.norm(x)

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        *,
        norm: bool = False,
        output_fmt: Literal["NLC", "NCHW"] = "NLC",
        return_prefix_tokens: bool = False,
        mask: TokenMasker | None = None,
    ) -> tuple[Tensor, list[Tensor] | list[tuple[Tensor, Tensor]]]:
        """Run the model and keep the outputs of the chosen blocks.

        Args:
            indices: None for all blocks, n for the last n, or a list of block indices.
            norm: pass each intermediate through ``self.norm`` (as timm); with average pooling and no final
                norm that is an Identity, so the intermediates stay un-normalised (the pooling norm ``fc_norm``
                is not applied to tokens).
            output_fmt: "NLC" (B, N, D) patch tokens or "NCHW" (B, D, rows, cols) maps.
            return_prefix_tokens: return (patch_tokens, class_token) pairs.
            mask: the token-masking hook, as in ``forward_features`` (BEiT v2's patch aggregation reads a
                masked forward's intermediate tokens); "NCHW" needs a masker that keeps every token.
        Returns:
            (the output of forward_features, the intermediates).
        """
        if output_fmt not in ("NLC", "NCHW"):
            raise ValueError(f"forward_intermediates: output_fmt must be 'NLC' or 'NCHW', got {output_fmt!r}")
        take = set(take_indices(len(self.blocks), indices))
        B = x.shape[0]
        x, grid, index = self._embed(x, mask)
        if output_fmt == "NCHW" and x.shape[1] != 1 + grid[0] * grid[1]:
            raise ValueError("forward_intermediates: output_fmt='NCHW' needs every token; the mask dropped some")
        x, outs = self._blocks(x, index, take)
        results: list = []
        for y in outs:
            y = self.norm(y) if norm else y
            prefix, tokens = y[:, :1], y[:, 1:]
            if output_fmt == "NCHW":
                tokens = tokens.reshape(B, grid[0], grid[1], -1).permute(0, 3, 1, 2)  # (B, D, rows, cols)
            results.append((tokens, prefix) if return_prefix_tokens else tokens)
        return self.norm(x), results

    def pool(self, x: Tensor) -> Tensor:
        return x[:, 0] if self.global_pool == "token" else x[:, 1:].mean(dim=1)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Tokens (B, 1 + N, D) -> logits (B, K), or the features the head reads if ``pre_logits``."""
        x = self.head_drop(self.fc_norm(self.pool(x)))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    # ------------------------------------------------------------------------------------- checkpoints
    def adapt_checkpoint(self, sd: dict[str, Tensor], *, source: str) -> dict[str, Tensor]:
        """Fit grid-dependent tables to this model: relative position tables of another grid are resampled
        (timm's ``resize_rel_pos_bias_table``, class-token rows kept; a Hugging Face folder's bilinearly, as
        transformers does: ``rel_pos_interpolation`` of :class:`~vitlab.checkpoints.adapt.SourceStateDict`); a
        shared (pre-training) table is copied into every layer when the model has per-layer tables and the file none
        (BEiT's fine-tuning set-up)."""
        bilinear = getattr(sd, "rel_pos_interpolation", "timm") == "bilinear"
        target = self.state_dict()
        out = {k: v for k, v in sd.items() if not k.endswith("relative_position_index")}
        shared_key = "rel_pos_bias.relative_position_bias_table"
        per_layer = [f"blocks.{i}.attn.relative_position_bias_table" for i in range(len(self.blocks))]
        if shared_key in out and shared_key not in target and per_layer[0] in target and per_layer[0] not in out:
            table = out.pop(shared_key)
            out.update({k: table.clone() for k in per_layer})
        recorded = getattr(sd, "grid", None)  # the file's (or, in set_input_size, the model's) grid, if known
        for k, v in list(out.items()):
            if k.endswith("relative_position_bias_table") and k in target and v.shape != target[k].shape:
                fits = recorded is not None and (2 * recorded[0] - 1) * (2 * recorded[1] - 1) + 3 == v.shape[0]
                old = tuple(recorded) if fits else table_grid(v.shape[0])
                if old is None or v.shape[1] != target[k].shape[1]:
                    raise ValueError(f"{source}: {k} has shape {tuple(v.shape)}; expected a square grid's "
                                     f"((2g-1)^2 + 3, {target[k].shape[1]}) table")
                resample = _resample_bilinear if bilinear else resample_class_rel_pos_table
                out[k] = resample(v, old, self.patch_embed.grid_size)
        return out


def _resample_bilinear(table: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> Tensor:
    """A ((2H-1)(2W-1) + 3, heads) table for another grid as transformers' ``BeitRelativePositionBias`` resizes it:
    the grid part as a (2H-1, 2W-1) image, bilinear (align_corners=False, not antialiased), the class rows kept."""
    if tuple(old_grid) == tuple(new_grid):
        return table
    grid_part, cls_part = table[:-CLASS_SLOTS], table[-CLASS_SLOTS:]
    heads = table.shape[1]
    src = (2 * old_grid[0] - 1, 2 * old_grid[1] - 1)
    dst = (2 * new_grid[0] - 1, 2 * new_grid[1] - 1)
    image = grid_part.float().t().reshape(1, heads, *src)  # (S, heads) -> (1, heads, 2H-1, 2W-1)
    image = F.interpolate(image, size=dst, mode="bilinear", align_corners=False)
    return torch.cat([image.reshape(heads, -1).t().to(table.dtype), cls_part])  # (1, heads, h, w) -> (h * w, heads)


# ------------------------------------------------------------------------------------------- variants
# BEiT Table/appendix and the released checkpoints (timm's names and defaults): Base 768/12/12 with
# LayerScale 0.1, Large 1024/24/16 with 1e-5; v2 uses 1e-5 at both sizes and ImageNet statistics.
BEIT_SIZES: dict[str, dict] = {
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
}
_V2 = dict(init_values=1e-5, mean=IMAGENET_MEAN, std=IMAGENET_STD)
# name: (size, resolution, fields)
BEIT_VARIANTS: dict[str, tuple[str, int, dict]] = {
    "beit_base_patch16_224": ("base", 224, dict(init_values=0.1)),
    "beit_base_patch16_384": ("base", 384, dict(init_values=0.1)),
    "beit_large_patch16_224": ("large", 224, dict(init_values=1e-5)),
    "beit_large_patch16_384": ("large", 384, dict(init_values=1e-5)),
    "beit_large_patch16_512": ("large", 512, dict(init_values=1e-5)),
    "beitv2_base_patch16_224": ("base", 224, dict(_V2)),
    "beitv2_large_patch16_224": ("large", 224, dict(_V2, crop_pct=0.95)),
}
# BEiT-3 (paper Table 1; timm's layout): Base, Large, and the giant 1408/40/16 with MLP 6144.
_BEIT3 = dict(qkv_bias_layout="qkv", init_values=None, use_abs_pos_emb=True, use_rel_pos_bias=False, sub_ln=True,
              norm_eps=1e-5, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=1.0)
BEIT3_VARIANTS: dict[str, tuple[int, int, dict]] = {  # name: (patch, resolution, fields)
    "beit3_base_patch16_224": (16, 224, dict(embed_dim=768, depth=12, num_heads=12)),
    "beit3_large_patch16_224": (16, 224, dict(embed_dim=1024, depth=24, num_heads=16)),
    "beit3_giant_patch14_224": (14, 224, dict(embed_dim=1408, depth=40, num_heads=16, mlp_ratio=4.3637)),
    "beit3_giant_patch14_336": (14, 336, dict(embed_dim=1408, depth=40, num_heads=16, mlp_ratio=4.3637)),
}


def _register_beit_variants() -> None:
    for name, (size, res, fields) in BEIT_VARIANTS.items():
        cfg = BeitConfig(img_size=res, **BEIT_SIZES[size], **fields)
        version = "v2 " if name.startswith("beitv2") else ""
        register_model(ModelEntry(name=name, family="beit", config=cfg, build=Beit,
                                  description=f"BEiT {version}{size} /16 at {res}px (relative position bias per layer)"))
    for name, (patch, res, fields) in BEIT3_VARIANTS.items():
        cfg = BeitConfig(img_size=res, patch_size=patch, **_BEIT3, **fields)
        register_model(ModelEntry(name=name, family="beit3", config=cfg, build=Beit,
                                  description=f"BEiT-3 vision encoder {name.split('_')[1]} /{patch} at {res}px"))


_register_beit_variants()
