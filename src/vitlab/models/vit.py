"""Vision Transformer: "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale".

Dosovitskiy et al., 2020, arXiv:2010.11929. An image is cut into P x P patches, each linearly embedded;
a learned class token is prepended, learned 1-D position embeddings are added, and a stack of pre-norm
transformer blocks follows. The classifier reads the class token (or the average of the patch
tokens), optionally through the pre-training "pre-logits" layer (Dense + tanh).

Registers ("Vision Transformers Need Registers", Darcet et al. 2023, arXiv:2309.16588): ``reg_tokens`` learned
tokens after the class token, which take part in attention and are discarded at the output (DINOv2, Oquab et al.
2023, arXiv:2304.07193, is this ViT with LayerScale; its register models add four).

CLIP's image tower (Radford et al. 2021, arXiv:2103.00020) adds a LayerNorm on the tokens before the blocks
(``pre_norm``; its patch projection has no bias) and, in OpenAI's models, QuickGELU (``gelu="quick"``). SigLIP's
(Zhai et al. 2023, arXiv:2303.15343) has no class token and pools with multi-head attention from a learned query
(``global_pool="map"``, :class:`~vitlab.layers.AttentionPoolLatent`).

The hybrid model (section 3.1) takes its "patches" from a ResNet feature map instead of raw pixels:
ResNet-50 with group norm and weight standardisation, cut after stage 3 (stride 16) or 4 (stride 32).
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch
from torch import Tensor, nn

from vitlab.layers import (
    Attention,
    AttentionPoolLatent,
    Block,
    PatchEmbed,
    TokenMasker,
    call_block,
    check_image_size,
    check_images,
    keep_tokens,
    resample_pos_embed,
    run_sequential,
    sincos_2d_pos_embed,
    size_differs,
    to_2tuple,
)
from vitlab.layers.linformer import LinformerAttention, init_projection, resample_projection
from vitlab.models.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INCEPTION_MEAN,
    INCEPTION_STD,
    Preprocessing,
    TimmSurface,
    check_global_pool,
    init_linear_jax,
    record_head,
    take_indices,
    zero_head,
)
from vitlab.models.registry import ModelEntry, check_config, register_model
from vitlab.models.resnet import ResNet, ResNetConfig

# Poolings ViT computes, with timm's names and semantics (vision_transformer.global_pool_nlc): "token" reads
# the class token; "avg", "max" and "avgmax" (the mean of the two) reduce the patch tokens, prefix tokens
# excluded; "map" attends from a learned query over the patch tokens (timm's attn_pool, SigLIP's head); "" pools
# nothing (the head sees every token; only without a classifier, num_classes=0).
VIT_POOLS = ("token", "avg", "max", "avgmax", "map", "")
ViTPool = Literal["token", "avg", "max", "avgmax", "map", ""]
# OpenAI's CLIP normalisation (timm's OPENAI_CLIP_MEAN / OPENAI_CLIP_STD)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ViTConfig:
    """Args:
    global_pool: "token" reads the class token, "avg" averages the patch tokens (paper, Appendix D.3);
        as in timm, "max" takes their per-channel maximum, "avgmax" the mean of "avg" and "max", "map" attends
        over the patch tokens from a learned query (``attn_pool``, SigLIP), and "" (with num_classes=0) returns
        every token unpooled: ``forward`` gives (B, prefix + N, D).
    pos_embed: "learn" (1-D learned, the paper's default), "sincos" (fixed 2-D) or "none" (Appendix D.4).
    reg_tokens: register tokens (Darcet et al. 2023), placed after the class token: [cls, reg..., patches].
    drop_remainder: an img_size that is not a multiple of the patch builds the floored grid, its last pixel rows /
        columns unused, as timm and big_vision build it (SigLIP so400m/14 at 384 px: 27 x 27 patches); otherwise
        such a size is an error.
    no_embed_class: the learned table covers the patch tokens only (DeiT III, DINOv2 with registers; timm's option
        of that name): it is added before the class and register tokens are prepended. Otherwise it has an entry
        for each of them too, as timm's.
    representation_size: width of the pre-logits layer (Dense + tanh) used in pre-training; None: none.
    pre_norm: a LayerNorm on the tokens before the first block (CLIP's ``ln_pre``, timm's ``norm_pre``); as in timm,
        the patch projection then has no bias.
    fc_norm: put the final LayerNorm after pooling instead of before (None: for "avg", "max" and "avgmax").
    init_values: LayerScale initial value (None: no LayerScale).
    gelu: the MLP's GELU: "exact" (timm's ``nn.GELU``), "tanh" (the approximation of the original JAX models,
        ``flax.linen.gelu``; the ``.npz`` converter sets it) or "quick" (``x * sigmoid(1.702 x)``, OpenAI CLIP's
        QuickGELU, timm's ``act_layer="quick_gelu"``).
    hybrid_layers: blocks per ResNet stage of the hybrid stem (None: plain patch embedding).
    dynamic_img_size: accept any input size, resampling the position table per batch.
    pos_antialias: that resampling antialiased (bicubic, as timm) or not (transformers' ``interpolate_pos_encoding``:
        Hugging Face folders load with False).
    crop_pct, interpolation: evaluation crop (None: 0.9 up to 224px, else 1.0) and resize of the default
        preprocessing, those of the published weights (the MIIL ViT was trained with bilinear resizes).
    attn_type: "softmax" (the paper's attention) or "linformer" (Wang et al. 2020, arXiv:2006.04768: keys and
        values projected along the sequence to ``linformer_k``; :mod:`vitlab.layers.linformer`).
    linformer_k: the projected length k.
    linformer_sharing: "none" (E, F per head and layer), "headwise" (per layer), "kv" (E = F per layer) or
        "layerwise" (one E = F for the whole model).
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
    class_token: bool = True
    reg_tokens: int = 0
    no_embed_class: bool = False
    drop_remainder: bool = False
    global_pool: ViTPool = "token"
    pos_embed: Literal["learn", "sincos", "none"] = "learn"
    pre_norm: bool = False
    representation_size: int | None = None
    fc_norm: bool | None = None
    init_values: float | None = None
    gelu: Literal["exact", "tanh", "quick"] = "exact"
    norm_eps: float = 1e-6
    drop_rate: float = 0.0
    pos_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    dynamic_img_size: bool = False
    pos_antialias: bool = True
    hybrid_layers: tuple[int, ...] | None = None
    hybrid_channels: tuple[int, ...] | None = None
    hybrid_stem_chs: int = 64
    mean: tuple[float, ...] = field(default=INCEPTION_MEAN)
    std: tuple[float, ...] = field(default=INCEPTION_STD)
    crop_pct: float | None = None
    interpolation: Literal["bicubic", "bilinear", "nearest"] = "bicubic"
    attn_type: Literal["softmax", "linformer"] = "softmax"
    linformer_k: int = 256
    linformer_sharing: Literal["none", "headwise", "kv", "layerwise"] = "headwise"

    def __post_init__(self) -> None:
        check_global_pool(self, self.global_pool, VIT_POOLS)
        if self.global_pool == "" and self.num_classes > 0:
            raise ValueError(f"{type(self).__name__}: global_pool='' (unpooled tokens) needs num_classes=0, got "
                             f"num_classes={self.num_classes}; pool with 'token', 'avg', 'max', 'avgmax' or 'map' "
                             f"for a classifier")
        if self.interpolation not in ("bicubic", "bilinear", "nearest"):
            raise ValueError(f"{type(self).__name__}: interpolation must be 'bicubic', 'bilinear' or 'nearest', "
                             f"got {self.interpolation!r}")
        if self.gelu not in ("exact", "tanh", "quick"):
            raise ValueError(f"{type(self).__name__}: gelu must be 'exact', 'tanh' or 'quick', got {self.gelu!r}")
        if self.attn_type == "linformer" and self.dynamic_img_size:
            raise ValueError("ViTConfig: Linformer projections are tied to the sequence length; dynamic_img_size "
                             "is not supported with attn_type='linformer' (build the model at its img_size)")
        if self.global_pool == "token" and not self.class_token:
            raise ValueError("ViTConfig: global_pool='token' needs class_token=True")
        if isinstance(self.reg_tokens, bool) or not isinstance(self.reg_tokens, int) or self.reg_tokens < 0:
            raise ValueError(f"{type(self).__name__}: reg_tokens must be a whole number >= 0, got {self.reg_tokens!r}")
        check_config(self)
        h, w = (self.img_size, self.img_size) if isinstance(self.img_size, int) else self.img_size
        if (h % self.patch_size or w % self.patch_size) and not self.drop_remainder and self.hybrid_layers is None:
            fit = f"{h // self.patch_size * self.patch_size}x{w // self.patch_size * self.patch_size}"
            raise ValueError(f"{type(self).__name__}: img_size {h}x{w} is not a multiple of the patch size "
                             f"{self.patch_size}: build the model at a multiple (e.g. {fit}), or pass "
                             f"drop_remainder=True for timm's floored grid, the last pixels unused")
        if self.no_embed_class and self.pos_embed != "learn":
            raise ValueError(f"{type(self).__name__}: no_embed_class=True is an option of the learned position table "
                             f"(pos_embed='learn'), got pos_embed={self.pos_embed!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"ViTConfig: embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")


class HybridEmbed(nn.Module):
    """Patch embedding from a CNN feature map: ResNet stages, then a 1x1 projection to ``embed_dim``."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        assert cfg.hybrid_layers is not None
        self.backbone = ResNet(ResNetConfig(
            layers=cfg.hybrid_layers, block="bottleneck", channels=cfg.hybrid_channels, stem_chs=cfg.hybrid_stem_chs,
            norm="group", std_conv=True, padding="same", in_chans=cfg.in_chans, num_classes=0,
        ))
        self.in_chans = cfg.in_chans
        self.reduction = self.backbone.cfg.reduction
        self.patch_size = (self.reduction, self.reduction)
        self.img_size = to_2tuple(cfg.img_size)
        self.strict_img_size = not cfg.dynamic_img_size
        self.grid_size = (self.img_size[0] // self.reduction, self.img_size[1] // self.reduction)
        check_image_size(*self.img_size, self.patch_size, None, "HybridEmbed")
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(self.backbone.num_features, cfg.embed_dim, kernel_size=1)

    def dynamic_grid(self, h: int, w: int) -> tuple[int, int]:
        return h // self.reduction, w // self.reduction

    def forward(self, x: Tensor) -> Tensor:
        check_images(x, in_chans=self.in_chans, patch=self.patch_size,
                     expected=self.img_size if self.strict_img_size else None, what="HybridEmbed")
        x = self.proj(self.backbone.forward_features(x))  # (B, D, H/r, W/r)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: the GELU approximation of OpenAI's CLIP (timm's ``quick_gelu``)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


def vit_activation(gelu: str) -> type[nn.Module] | partial:
    """The MLP activation of a ``ViTConfig.gelu``."""
    return {"exact": nn.GELU, "tanh": partial(nn.GELU, approximate="tanh"), "quick": QuickGELU}[gelu]


class VisionTransformer(TimmSurface, nn.Module):
    """ViT classifier; build with a :class:`ViTConfig` or through ``vitlab.create_model``."""

    token_attention = True  # tokens attend to tokens of one sequence: rollout applies

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        norm_layer = partial(nn.LayerNorm, eps=cfg.norm_eps)
        self.num_features = D
        self.global_pool = cfg.global_pool
        self.dynamic_img_size = cfg.dynamic_img_size
        self.num_prefix_tokens = (1 if cfg.class_token else 0) + cfg.reg_tokens  # class, then registers
        use_fc_norm = cfg.global_pool in ("avg", "max", "avgmax") if cfg.fc_norm is None else cfg.fc_norm

        if cfg.hybrid_layers is not None:
            self.patch_embed: PatchEmbed | HybridEmbed = HybridEmbed(cfg)
        else:
            self.patch_embed = PatchEmbed(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                                          embed_dim=D, strict_img_size=not cfg.dynamic_img_size,
                                          bias=not cfg.pre_norm,  # CLIP's projection has no bias (timm ties it)
                                          drop_remainder=cfg.drop_remainder)
            self.patch_embed.dynamic_option = cfg.attn_type != "linformer"
        grid = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.reg_tokens, D)) if cfg.reg_tokens else None  # (1, R, D)
        # The learned table has an entry for each prefix token (as in the paper), unless no_embed_class; the
        # sin-cos one has none.
        learned_prefix = cfg.pos_embed == "learn" and not cfg.no_embed_class
        self.pos_embed_prefix = self.num_prefix_tokens if learned_prefix else 0
        if cfg.pos_embed == "learn":
            self.pos_embed = nn.Parameter(torch.zeros(1, self.pos_embed_prefix + grid[0] * grid[1], D))
        else:
            self.pos_embed = None
            if cfg.pos_embed == "sincos":
                self.register_buffer("pos_embed_fixed", sincos_2d_pos_embed(D, grid), persistent=False)
        self.pos_drop = nn.Dropout(cfg.pos_drop_rate)
        self.norm_pre = norm_layer(D) if cfg.pre_norm else nn.Identity()

        attn_layer = self._linformer_layer(grid) if cfg.attn_type == "linformer" else Attention
        act_layer = vit_activation(cfg.gelu)
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # grows with depth
        self.blocks = nn.Sequential(*[
            Block(D, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
                  proj_drop=cfg.proj_drop_rate, attn_drop=cfg.attn_drop_rate, init_values=cfg.init_values,
                  drop_path=dpr[i], norm_layer=norm_layer, act_layer=act_layer, attn_layer=attn_layer)
            for i in range(cfg.depth)
        ])
        self.norm = norm_layer(D) if not use_fc_norm else nn.Identity()
        # "map": attention pooling with its own norm and MLP (the model's), as timm's attn_pool
        self.attn_pool = AttentionPoolLatent(D, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True,
                                             norm_layer=norm_layer, act_layer=act_layer) \
            if cfg.global_pool == "map" else None
        self.fc_norm = norm_layer(D) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(cfg.drop_rate)
        if cfg.representation_size:
            self.pre_logits = nn.Sequential(OrderedDict(
                fc=nn.Linear(D, cfg.representation_size), act=nn.Tanh()))
            self.head_hidden_size = cfg.representation_size
        else:
            self.pre_logits = nn.Identity()
            self.head_hidden_size = D
        self.head = nn.Linear(self.head_hidden_size, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self._init_weights()

    # ----------------------------------------------------------------------------------------- set-up
    def _linformer_layer(self, grid: tuple[int, int]) -> partial:
        """Linformer attention for this model's sequence length (prefix + patches)."""
        cfg = self.cfg
        n = self.num_prefix_tokens + grid[0] * grid[1]
        # n x k maps: no token-to-token attention, so rollout does not apply (explain uses Grad-CAM)
        self.token_attention = False
        shared = None
        if cfg.linformer_sharing == "layerwise":
            self.linformer_proj = nn.Parameter(init_projection(torch.empty(cfg.linformer_k, n)))
            shared = self.linformer_proj
        return partial(LinformerAttention, seq_len=n, k=cfg.linformer_k, sharing=cfg.linformer_sharing,
                       shared=shared)

    def adapt_checkpoint(self, sd: dict[str, Tensor], *, source: str) -> dict[str, Tensor]:
        """Move Linformer projections saved for another patch grid to this model's (see resample_projection).

        A model that learns its position table (``pos_embed="learn"``) from a checkpoint without one (a fixed
        sin-cos table, MAE's, is not saved): the table starts from the 2-D sin-cos values at the model's grid,
        0 for the prefix tokens, and is trained, as MAE's fine-tuning loads them into timm's learned table.

        A table with entries for the prefix tokens (1, prefix + H*W, D), loaded into a model without them
        (``no_embed_class``): each entry is added to its token (``cls_token``, ``reg_token``), whose input is then
        the same, and dropped from the table, as timm's checkpoint_filter_fn does. The same outputs at any
        resolution: the entries are not on the grid that resampling changes."""
        out = dict(sd)
        self._move_prefix_entries(out, source, getattr(sd, "grid", None))
        if (self.pos_embed is not None and "pos_embed" not in sd and "patch_embed.proj.weight" in sd
                and self.num_features % 4 == 0):
            out.pop("pos_embed_fixed", None)  # a copy of the fixed table, if a converter kept one
            table = sincos_2d_pos_embed(self.num_features, self.patch_embed.grid_size)  # (1, N, D)
            prefix = table.new_zeros(1, self.pos_embed_prefix, table.shape[-1])
            out["pos_embed"] = torch.cat([prefix, table], dim=1).to(self.pos_embed.dtype)  # (1, prefix + N, D)
            log.info("%s has no position table (a fixed sin-cos one is not saved): the model's learned table "
                     "starts from the 2-D sin-cos values, as MAE's fine-tuning does", source)
        if self.cfg.attn_type != "linformer":
            return out
        p, grid = self.num_prefix_tokens, self.patch_embed.grid_size
        for key, v in sd.items():
            if key == "linformer_proj" or key.endswith((".attn.proj_e", ".attn.proj_f")):
                side = math.isqrt(v.shape[-1] - p)
                if side * side == v.shape[-1] - p and v.shape[-1] != p + grid[0] * grid[1]:
                    out[key] = resample_projection(v, grid, old_grid=(side, side), num_prefix_tokens=p)
        return out

    def _move_prefix_entries(self, out: dict[str, Tensor], source: str, recorded: tuple[int, int] | None) -> None:
        pos, p = out.get("pos_embed"), self.num_prefix_tokens
        if not self.cfg.no_embed_class or pos is None or pos.ndim != 3 or p == 0:
            return
        tokens = [(k, out.get(k)) for k, t in (("cls_token", self.cls_token), ("reg_token", self.reg_token))
                  if t is not None]
        if any(v is None or v.ndim != 3 for _, v in tokens) or sum(int(v.shape[1]) for _, v in tokens) != p:
            return  # the tokens do not fit: load_strict names them
        n, grid = int(pos.shape[1]), self.patch_embed.grid_size
        own = grid[0] * grid[1]

        def square(k: int) -> bool:
            return k > 0 and math.isqrt(k) ** 2 == k

        # the model's own grid plus the prefix entries, or (another resolution) a square grid plus them; a table
        # that is itself the file's recorded grid, or a square one, has none (3x3 is also 2x2 plus 5 prefix
        # entries: read as the grid it is, as timm reads it)
        if recorded is not None and recorded[0] * recorded[1] == n:
            return
        if n == own or square(n) or not (n == p + own or square(n - p)):
            return
        start = 0
        for key, v in tokens:
            k = int(v.shape[1])
            out[key] = v + pos[:, start:start + k].to(v.dtype)  # (1, k, D): the tokens with their positions
            start += k
        out["pos_embed"] = pos[:, p:]  # (1, H*W, D)
        log.info("%s: its position table has entries for the %d prefix token(s), which %s's table (patch tokens "
                 "only, no_embed_class) has not: they are added to the tokens (the same outputs)", source, p,
                 getattr(self, "model_name", type(self).__name__))

    def _init_weights(self) -> None:
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        self.apply(init_linear_jax)
        if isinstance(self.patch_embed, PatchEmbed):  # LeCun normal on the patch projection, as in JAX
            w = self.patch_embed.proj.weight
            nn.init.trunc_normal_(w, std=math.sqrt(1.0 / w[0].numel()))
            if self.patch_embed.proj.bias is not None:
                nn.init.zeros_(self.patch_embed.proj.bias)
        for blk in self.blocks:  # MLP biases: small normal noise, as in the reference JAX code
            nn.init.normal_(blk.mlp.fc1.bias, std=1e-6)
            nn.init.normal_(blk.mlp.fc2.bias, std=1e-6)
        if isinstance(self.head, nn.Linear):
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    @property
    def onnx_fixed_size_reason(self) -> str | None:
        """Why a dynamic-size ONNX export is refused (None: it is supported)."""
        if self.cfg.attn_type == "linformer":
            return ("Linformer's key/value projections (k x n) are sized for the sequence length n of the built "
                    "resolution; another input size has another n (export another fixed size with --img-size)")
        pe = self.patch_embed
        if isinstance(pe, PatchEmbed) and pe.has_remainder:
            (h, w), (ph, pw) = pe.img_size, pe.patch_size
            return (f"its img_size {h}x{w} is not a multiple of the patch {ph}x{pw} (the last {h % ph} row(s) / "
                    f"{w % pw} column(s) are ignored, as in timm), and other input sizes must be multiples of the "
                    f"patch; export it at its fixed size, or at a multiple (--img-size {h // ph * ph})")
        return None

    @property
    def num_classes(self) -> int:
        return getattr(self.head, "out_features", 0)  # 0 for Identity (a quantised Linear has it too)

    @property
    def preprocessing(self) -> Preprocessing:
        h, w = self.patch_embed.img_size
        crop = self.cfg.crop_pct if self.cfg.crop_pct is not None else (0.9 if max(h, w) <= 224 else 1.0)
        return Preprocessing(input_size=(self.cfg.in_chans, h, w), mean=self.cfg.mean,
                             std=self.cfg.std,
                             crop_pct=crop, interpolation=self.cfg.interpolation)

    def no_weight_decay(self) -> set[str]:
        """Parameter names that should not be weight-decayed (position table, prefix tokens and the attention
        pool's learned query, which big_vision's SigLIP does not decay either; timm decays it)."""
        names = {n for n, _ in self.named_parameters(recurse=False)}
        skip = {n for n in ("pos_embed", "cls_token", "reg_token") if n in names}  # a gap model has no class token
        return skip | ({"attn_pool.latent"} if self.attn_pool is not None else set())

    def reset_classifier(self, num_classes: int, global_pool: ViTPool | None = None, *,
                         keep_pre_logits: bool = False) -> None:
        """Replace the head by a zero-initialised (D x K) layer, as the paper does for fine-tuning.

        The pre-logits layer is removed too (the paper fine-tunes without it) unless ``keep_pre_logits``.
        ``reset_classifier(0, "")`` makes ``forward`` return the unpooled tokens, as in timm. As timm, another
        pooling than "map" drops the attention pool (``attn_pool``) and "map" keeps it; it cannot be added.
        """
        check_global_pool(self, global_pool, VIT_POOLS)
        pool = self.global_pool if global_pool is None else global_pool
        if pool == "token" and self.cls_token is None:
            raise ValueError("reset_classifier: global_pool='token' needs a model with a class token")
        if pool == "" and num_classes > 0:
            raise ValueError(f"reset_classifier: global_pool='' (unpooled tokens) needs num_classes=0, got "
                             f"{num_classes}; pass global_pool='token', 'avg', 'max', 'avgmax' or 'map' for a "
                             f"classifier")
        if pool == "map" and self.attn_pool is None:
            raise ValueError(f"reset_classifier: global_pool='map' needs the attention pool (attn_pool) that a model "
                             f"built with global_pool='map' has; this one pools with {self.global_pool!r} (build it "
                             f"with global_pool='map' to train a new one)")
        if pool != "map":
            self.attn_pool = None  # timm drops it too
        self.global_pool = pool
        if not keep_pre_logits and not isinstance(self.pre_logits, nn.Identity):
            self.pre_logits = nn.Identity()
            self.head_hidden_size = self.num_features
        self.head = zero_head(self.head_hidden_size, num_classes)
        # the norm stays where it was built (fc_norm fixed), whatever the new pooling
        record_head(self, num_classes=max(num_classes, 0), global_pool=self.global_pool,
                    fc_norm=not isinstance(self.fc_norm, nn.Identity),
                    representation_size=None if isinstance(self.pre_logits, nn.Identity) else self.head_hidden_size)

    def _init_buffers(self) -> None:
        if self.cfg.pos_embed == "sincos":
            device = self.pos_embed_fixed.device
            self.pos_embed_fixed = sincos_2d_pos_embed(self.num_features, self.patch_embed.grid_size).to(device)

    # ------------------------------------------------------------------------------------------ forward
    def _pos_embed(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        """Prepend prefix tokens and add position embeddings; x: (B, N, D) patch tokens on ``grid``."""
        if self.pos_embed is not None:
            pos = self.pos_embed
            if self.dynamic_img_size and size_differs(grid, self.patch_embed.grid_size):
                pos = resample_pos_embed(pos, grid, old_size=self.patch_embed.grid_size,
                                         num_prefix_tokens=self.pos_embed_prefix, antialias=self.cfg.pos_antialias)
        elif self.cfg.pos_embed == "sincos":
            pos = self.pos_embed_fixed
            if size_differs(grid, self.patch_embed.grid_size):
                pos = sincos_2d_pos_embed(self.num_features, grid).to(x.device, x.dtype)
        else:
            pos = None
        if pos is not None and self.pos_embed_prefix == 0:
            x = x + pos
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if prefix:
            x = torch.cat([*prefix, x], dim=1)  # (B, prefix + N, D): class, registers, patches
        if pos is not None and self.pos_embed_prefix > 0:
            x = x + pos
        return self.pos_drop(x)

    def _embed(self, x: Tensor, mask: TokenMasker | None = None) -> tuple[Tensor, tuple[int, int]]:
        h, w = x.shape[-2:]
        x = self.patch_embed(x)  # validates the input: (B, C, H, W) -> (B, N, D)
        grid = self.patch_embed.dynamic_grid(h, w)
        keep = None
        if mask is not None:
            x, keep = mask(x, grid)
        x = self._pos_embed(x, grid)  # (B, prefix + N, D)
        if keep is not None:  # each kept patch carries its own position; prefix tokens go in front after
            p = self.num_prefix_tokens
            x = torch.cat([x[:, :p], keep_tokens(x[:, p:], keep)], dim=1)  # (B, prefix + K, D)
        return self.norm_pre(x), grid

    def forward_features(self, x: Tensor, *, mask: TokenMasker | None = None) -> Tensor:
        """Images (B, C, H, W) -> normalised tokens (B, prefix + N, D).

        ``mask``: the masked-image-modelling hook (:mod:`vitlab.layers.token_mask`): it may replace
        patch embeddings and choose the K patches kept; the output is then (B, prefix + K, D).
        """
        x, _ = self._embed(x, mask)
        x = run_sequential(self.blocks, x, checkpointed=self.grad_checkpointing)
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
            norm: pass each intermediate through ``self.norm`` (as timm); a model that pools with ``fc_norm``
                has an Identity there, so its intermediates stay un-normalised (the pooling norm is not applied
                to tokens).
            output_fmt: "NLC" (B, N, D) patch tokens or "NCHW" (B, D, rows, cols) maps.
            return_prefix_tokens: return (patch_tokens, prefix_tokens) pairs.
            mask: the token-masking hook, as in ``forward_features`` (BEiT v2's patch aggregation reads a
                masked forward's intermediate tokens); "NCHW" needs a masker that keeps every token.
        Returns:
            (the output of forward_features, the intermediates).
        """
        if output_fmt not in ("NLC", "NCHW"):
            raise ValueError(f"forward_intermediates: output_fmt must be 'NLC' or 'NCHW', got {output_fmt!r}")
        take = set(take_indices(len(self.blocks), indices))
        B = x.shape[0]
        x, grid = self._embed(x, mask)
        if output_fmt == "NCHW" and x.shape[1] != self.num_prefix_tokens + grid[0] * grid[1]:
            raise ValueError("forward_intermediates: output_fmt='NCHW' needs every token; the mask dropped some")
        outs = []
        for i, blk in enumerate(self.blocks):
            x = call_block(blk, x, checkpointed=self.grad_checkpointing)
            if i in take:
                outs.append(self.norm(x) if norm else x)
        p = self.num_prefix_tokens
        results: list = []
        for y in outs:
            prefix, tokens = y[:, :p], y[:, p:]
            if output_fmt == "NCHW":
                tokens = tokens.reshape(B, grid[0], grid[1], -1).permute(0, 3, 1, 2)  # (B, D, rows, cols)
            results.append((tokens, prefix) if return_prefix_tokens else tokens)
        return self.norm(x), results

    def pool(self, x: Tensor) -> Tensor:
        """Tokens (B, prefix + N, D) -> (B, D) by ``global_pool``; "" returns them as they are."""
        if self.global_pool == "":
            return x
        if self.global_pool == "token":
            return x[:, 0]
        patches = x[:, self.num_prefix_tokens:]  # (B, N, D): prefix tokens take no part, as in timm
        if self.global_pool == "map":
            return self.attn_pool(patches)
        if self.global_pool == "avg":
            return patches.mean(dim=1)
        if self.global_pool == "max":
            return patches.amax(dim=1)
        if self.global_pool == "avgmax":
            return 0.5 * (patches.amax(dim=1) + patches.mean(dim=1))
        raise ValueError(f"{type(self).__name__}: global_pool {self.global_pool!r} is not one of {VIT_POOLS}")

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Tokens (B, prefix + N, D) -> logits (B, K), or the features the head reads if ``pre_logits``
        (with ``global_pool=""``: every token, (B, prefix + N, D))."""
        x = self.head_drop(self.fc_norm(self.pool(x)))
        x = self.pre_logits(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# ------------------------------------------------------------------------------------------- variants
# Widths, depths and heads: Dosovitskiy et al. 2020, Table 1 (Base, Large, Huge); Touvron et al. 2020
# (DeiT), Table 1 (Tiny, Small). MLP width is 4x the token width throughout.
VIT_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16),
}
VIT_PATCH_SIZES = (8, 14, 16, 32)
VIT_RESOLUTIONS = (224, 384)
# Hybrids (section 3.1): ResNet-50 cut after stage 3 (stride 16) or kept whole (stride 32).
VIT_HYBRIDS: dict[str, tuple[str, tuple[int, ...]]] = {
    "r50_s16": ("base", (3, 4, 9)),
    "r50_s32": ("large", (3, 4, 6, 3)),
}


# Further published layouts of the same blocks, under timm's names so that a timm user's name works
# unchanged (tests/fixtures/timm_vit_names.json holds timm's parameter count for each). "gap": no class
# token, patch tokens averaged after the final norm (timm's class_token=False, global_pool="avg",
# fc_norm=False); "ls": LayerScale. Heads, preprocessing and crop are those of the published weights.
_GAP = dict(class_token=False, global_pool="avg", fc_norm=False)
_IMAGENET = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD)
_MEDIUM = dict(embed_dim=512, depth=12, num_heads=8, qkv_bias=False, init_values=1e-6, crop_pct=0.95)
_PLUS = dict(embed_dim=896, depth=12, num_heads=14, init_values=1e-5, crop_pct=0.95)
_GIANT = dict(embed_dim=1408, depth=40, num_heads=16, mlp_ratio=48 / 11)
# name: (patch, resolution, config fields, description)
TIMM_VIT_LAYOUTS: dict[str, tuple[int, int, dict, str]] = {
    "vit_base_patch16_gap_224": (16, 224, dict(embed_dim=768, depth=12, num_heads=16, **_GAP),
                                 "ViT-B/16 with 16 heads, average pooling, no class token"),
    "vit_medium_patch16_gap_240": (16, 240, dict(**_MEDIUM, **_GAP, num_classes=11821),
                                   "ViT-M/16 (width 512), LayerScale, average pooling, ImageNet-12k head"),
    "vit_medium_patch16_gap_256": (16, 256, dict(**_MEDIUM, **_GAP), "ViT-M/16 (width 512), average pooling"),
    "vit_medium_patch16_gap_384": (16, 384, dict(**_MEDIUM, **_GAP),
                                   "ViT-M/16 (width 512), average pooling, at 384px"),
    "vit_betwixt_patch16_gap_256": (16, 256, dict(embed_dim=640, depth=12, num_heads=10, qkv_bias=False,
                                                  init_values=1e-6, crop_pct=0.95, **_GAP),
                                    "ViT between S and B (width 640), LayerScale, average pooling"),
    "vit_huge_patch14_gap_224": (14, 224, dict(**VIT_SIZES["huge"], **_GAP, **_IMAGENET, num_classes=0),
                                 "ViT-H/14, average pooling, headless (I-JEPA)"),
    "vit_huge_patch16_gap_448": (16, 448, dict(**VIT_SIZES["huge"], **_GAP, **_IMAGENET, num_classes=0,
                                               crop_pct=1.0), "ViT-H/16 at 448px, average pooling, headless"),
    "vit_giant_patch16_gap_224": (16, 224, dict(**_GIANT, **_GAP, **_IMAGENET, num_classes=0),
                                  "ViT-g/16 (width 1408, depth 40), average pooling, headless"),
    "vit_giant_patch14_224": (14, 224, dict(**_GIANT), "ViT-g/14 (width 1408, depth 40, MLP 6144)"),
    "vit_gigantic_patch14_224": (14, 224, dict(embed_dim=1664, depth=48, num_heads=16, mlp_ratio=64 / 13),
                                 "ViT-G/14 (width 1664, depth 48, MLP 8192)"),
    "vit_base_patch16_224_miil": (16, 224, dict(**VIT_SIZES["base"], qkv_bias=False, num_classes=11221,
                                                mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), crop_pct=0.875,
                                                interpolation="bilinear"),
                                  "ViT-B/16 without qkv bias, ImageNet-21k-P head (MIIL)"),
    "vit_base_patch16_plus_240": (16, 240, dict(**_PLUS), "ViT-B+/16 (width 896, 14 heads), LayerScale"),
    "vit_base_patch32_plus_256": (32, 256, dict(**_PLUS), "ViT-B+/32 (width 896, 14 heads), LayerScale"),
    # DINOv2 (Oquab et al. 2023) and DINOv2 with 4 registers (Darcet et al. 2023): S/B/L at 518px with LayerScale,
    # headless; the register models' table covers the patch tokens only. (ViT-g's SwiGLU MLP is not in vitlab.)
    **{f"vit_{size}_patch14{tag}_dinov2": (14, 518, dict(**VIT_SIZES[size], init_values=1e-5, **_IMAGENET,
                                                         num_classes=0, crop_pct=1.0, **extra),
                                           f"DINOv2 ViT-{size[0].upper()}/14{desc}, LayerScale, headless")
       for size in ("small", "base", "large")
       for tag, extra, desc in (("", {}, ""),
                                ("_reg4", dict(reg_tokens=4, no_embed_class=True), " with 4 registers"))},
}

# CLIP's image towers (Radford et al. 2021) under timm's names: a norm before the blocks, eps 1e-5, OpenAI's
# normalisation; "_quickgelu" names use QuickGELU (OpenAI's, MetaCLIP's and DFN's weights). The head is the
# projection into the joint embedding, or an ImageNet classifier where timm's default weights are fine-tuned.
_CLIP_WIDTHS: dict[str, dict] = {
    "xsmall": dict(embed_dim=256, depth=10, num_heads=4), "medium": dict(embed_dim=512, depth=12, num_heads=8),
    "betwixt": dict(embed_dim=640, depth=12, num_heads=10), "base": VIT_SIZES["base"],
    "large": VIT_SIZES["large"], "huge": VIT_SIZES["huge"], "giant": _GIANT,
    "gigantic": dict(embed_dim=1664, depth=48, num_heads=16, mlp_ratio=64 / 13),
}
# (size, patch, resolution, quick_gelu, num_classes, crop_pct) of timm's default weights for each name
_CLIP_ROWS = [
    ("xsmall", 16, 224, False, 512, 0.9), ("medium", 16, 224, False, 512, 0.9), ("medium", 32, 224, False, 512, 0.9),
    ("betwixt", 32, 224, False, 512, 0.9),
    ("base", 16, 224, False, 1000, 0.95), ("base", 16, 384, False, 1000, 1.0), ("base", 16, 224, True, 512, 1.0),
    ("base", 32, 224, False, 1000, 0.9), ("base", 32, 256, False, 512, 1.0), ("base", 32, 384, False, 1000, 1.0),
    ("base", 32, 448, False, 1000, 1.0), ("base", 32, 224, True, 512, 0.9),
    ("large", 14, 224, False, 1000, 1.0), ("large", 14, 336, False, 1000, 1.0), ("large", 14, 224, True, 768, 1.0),
    ("large", 14, 336, True, 768, 1.0),
    ("huge", 14, 224, False, 1000, 1.0), ("huge", 14, 336, False, 1000, 1.0), ("huge", 14, 378, False, 1024, 1.0),
    ("huge", 14, 224, True, 1024, 1.0), ("huge", 14, 378, True, 1024, 1.0),
    ("giant", 14, 224, False, 1024, 1.0),
    ("gigantic", 14, 224, False, 1280, 1.0), ("gigantic", 14, 378, False, 1280, 1.0),
    ("gigantic", 14, 224, True, 1280, 1.0),
]
_CLIP = dict(pre_norm=True, norm_eps=1e-5, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
_CLIP_INCEPTION = ("vit_large_patch14_clip_224", "vit_large_patch14_clip_336")  # LAION's fine-tuned: mean/std 0.5


def _clip_layouts() -> dict[str, tuple[int, int, dict, str]]:
    out = {}
    for size, patch, res, quick, classes, crop in _CLIP_ROWS:
        name = f"vit_{size}_patch{patch}_clip{'_quickgelu' if quick else ''}_{res}"
        norm = dict(mean=INCEPTION_MEAN, std=INCEPTION_STD) if name in _CLIP_INCEPTION else {}
        out[name] = (patch, res, {**_CLIP_WIDTHS[size], **_CLIP, **norm, "num_classes": classes, "crop_pct": crop,
                                  **({"gelu": "quick"} if quick else {})},
                     f"CLIP image tower ViT-{size}/{patch}{' (QuickGELU)' if quick else ''} at {res}px")
    out["vit_base_patch16_plus_clip_240"] = (
        16, 240, dict(embed_dim=896, depth=12, num_heads=14, **_CLIP, num_classes=640, crop_pct=1.0),
        "CLIP image tower ViT-B+/16 (width 896, 14 heads) at 240px")
    return out


# SigLIP's image towers (Zhai et al. 2023), headless: no class token, attention pooling ("map"), or the patch
# tokens averaged (timm's "_gap" names, PaliGemma's encoders); some use the tanh GELU (timm's names say which).
_SIGLIP_WIDTHS: dict[str, dict] = {
    "base": VIT_SIZES["base"], "large": VIT_SIZES["large"],
    "so400m": dict(embed_dim=1152, depth=27, num_heads=16, mlp_ratio=3.7362),  # "shape-optimised" 400M
    "giantopt": dict(embed_dim=1536, depth=40, num_heads=16),
}
# (size, patch, map resolutions, gap resolutions, tanh-GELU resolutions)
_SIGLIP_ROWS = [
    ("base", 16, (224, 256, 384, 512), (224, 256, 384, 512), ()), ("base", 32, (256,), (256,), (256,)),
    ("large", 16, (256, 384, 512), (256, 384, 512), (512,)),
    # at 384 px: 27 x 27 patches of 14 px, the last 6 pixel rows / columns unused (timm's and big_vision's grid)
    ("so400m", 14, (224, 378, 384), (224, 378, 384, 448, 896), ()),
    ("so400m", 16, (256, 384, 512), (256, 384, 512), (256, 384, 512)),
    ("giantopt", 16, (256, 384), (256, 384), (256, 384)),
]
# names whose default weights timm evaluates squashed (crop_mode "squash": both sides resized, aspect not kept)
_SQUASHED = ("vit_medium_patch16_gap_384", "vit_base_patch16_clip_384", "vit_large_patch14_clip_336",
             "vit_huge_patch14_clip_336", "vit_gigantic_patch14_clip_378")
_SIGLIP_FULL_CROP = ("vit_so400m_patch14_siglip_gap_384", "vit_so400m_patch14_siglip_gap_448",
                     "vit_so400m_patch14_siglip_gap_896")  # timm's: no crop


def _siglip_layouts() -> dict[str, tuple[int, int, dict, str]]:
    out = {}
    for size, patch, maps, gaps, tanh in _SIGLIP_ROWS:
        for gap, resolutions in ((False, maps), (True, gaps)):
            for res in resolutions:
                name = f"vit_{size}_patch{patch}_siglip{'_gap' if gap else ''}_{res}"
                pool = dict(global_pool="avg", fc_norm=False) if gap else dict(global_pool="map")
                out[name] = (patch, res, {**_SIGLIP_WIDTHS[size], "class_token": False, **pool, "num_classes": 0,
                                          "crop_pct": 1.0 if name in _SIGLIP_FULL_CROP else 0.9,
                                          **({"drop_remainder": True} if res % patch else {}),
                                          **({"gelu": "tanh"} if res in tanh else {})},
                             f"SigLIP image tower ViT-{size}/{patch}, {'average' if gap else 'attention'} pooling, "
                             f"at {res}px, headless")
    return out


TIMM_VIT_LAYOUTS.update(_clip_layouts())
TIMM_VIT_LAYOUTS.update(_siglip_layouts())


def _register_vit_variants() -> None:
    for size, dims in VIT_SIZES.items():
        for patch in VIT_PATCH_SIZES:
            for res in VIT_RESOLUTIONS:
                if res % patch:
                    continue  # e.g. 384 is not a multiple of 14
                name = f"vit_{size}_patch{patch}_{res}"
                cfg = ViTConfig(img_size=res, patch_size=patch, **dims)
                register_model(ModelEntry(name=name, family="vit", config=cfg, build=VisionTransformer,
                                          description=f"ViT-{size[0].upper()}/{patch} at {res}px"))
    for tag, (size, layers) in VIT_HYBRIDS.items():
        for res in VIT_RESOLUTIONS:
            name = f"vit_{size}_{tag}_{res}"
            cfg = ViTConfig(img_size=res, patch_size=1, hybrid_layers=layers, **VIT_SIZES[size])
            register_model(ModelEntry(name=name, family="vit", config=cfg, build=VisionTransformer,
                                      description=f"R50+ViT-{size[0].upper()} hybrid, stride "
                                                  f"{4 * 2 ** (len(layers) - 1)}, at {res}px"))
    for name, (patch, res, fields, description) in TIMM_VIT_LAYOUTS.items():
        cfg = ViTConfig(img_size=res, patch_size=patch, **fields)
        register_model(ModelEntry(name=name, family="vit", config=cfg, build=VisionTransformer,
                                  description=description,
                                  style=(("crop_mode", "squash"),) if name in _SQUASHED else ()))


_register_vit_variants()
