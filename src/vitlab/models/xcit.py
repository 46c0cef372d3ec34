"""XCiT: "XCiT: Cross-Covariance Image Transformers".

El-Nouby et al., 2021, arXiv:2106.09681. What differs from ViT:

* cross-covariance attention (XCA, :mod:`vitlab.layers.xca`): per head a (head_dim x head_dim) attention
  between channels, from queries and keys L2-normalised over the tokens and a learned temperature; its
  cost is linear in the number of tokens, so the model runs at high resolution;
* each block is attention -> local patch interaction (LPI: depthwise conv, GELU, BatchNorm, depthwise
  conv on the token grid) -> MLP, every branch pre-norm and scaled by a learned LayerScale vector
  initialised to ``eta`` (1.0 for 12 layers, 1e-5 for 24);
* the patch embedding is a convolutional stem of 3x3 stride-2 conv + BatchNorm layers with GELU
  between them (4 for patch 16, 3 for patch 8);
* position information is a Fourier encoding of the grid projected by a learned 1x1 convolution,
  recomputed for each input size: every input whose sides are multiples of the patch size runs;
* the class token joins only after the XCA blocks, in two CaiT-style class-attention blocks (query =
  class token). As in the released code, these blocks also pass the patch tokens through their first
  norm and LayerScale, and ``tokens_norm`` applies their second norm to every token (else only to the
  class token; the nano models).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch
from torch import Tensor, nn

from vitlab.layers import (
    ClassAttention,
    DropPath,
    LayerScale,
    Mlp,
    call_block,
    check_images,
    to_2tuple,
    trunc_normal_linears,
)
from vitlab.layers.local_patch_interaction import LPI
from vitlab.layers.pos_embed import FourierPosEmbed
from vitlab.layers.xca import XCA
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

# the poolings the family computes: the class token or the mean of the patch tokens
XCIT_POOLS = ("token", "avg")


@dataclass(frozen=True, kw_only=True)
class XCiTConfig:
    """Args:
    patch_size: 16 (four stride-2 convolutions) or 8 (three).
    eta: LayerScale initial value of every branch (paper: 1.0 for 12 layers, 1e-5 for 24).
    cls_attn_layers: class-attention blocks after the XCA blocks (paper: 2).
    tokens_norm: the class-attention blocks' second norm acts on every token (True) or the class token only.
    img_size: the default input size (preprocessing, model_info); any multiple of the patch size runs.
    """

    img_size: int | tuple[int, int] = 224
    patch_size: Literal[8, 16] = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 4
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    eta: float = 1.0
    cls_attn_layers: int = 2
    tokens_norm: bool = True
    global_pool: Literal["token", "avg"] = "token"
    norm_eps: float = 1e-6
    drop_rate: float = 0.0
    pos_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    mean: tuple[float, ...] = field(default=IMAGENET_MEAN)
    std: tuple[float, ...] = field(default=IMAGENET_STD)
    crop_pct: float = 1.0

    def __post_init__(self) -> None:
        check_global_pool(self, self.global_pool, XCIT_POOLS)
        if self.patch_size not in (8, 16):
            raise ValueError(f"XCiTConfig: patch_size must be 8 or 16 (the convolutional stem), got {self.patch_size}")
        check_config(self)
        if self.embed_dim % self.num_heads:
            raise ValueError(f"XCiTConfig: embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if self.embed_dim % 8:
            raise ValueError(f"XCiTConfig: embed_dim={self.embed_dim} must be a multiple of 8 (stem widths D/8 ... D)")
        if self.global_pool == "token" and self.cls_attn_layers < 1:
            raise ValueError("XCiTConfig: global_pool='token' needs cls_attn_layers >= 1")


class ConvPatchEmbed(nn.Module):
    """The convolutional stem: log2(P) stride-2 (3x3 conv, BatchNorm) stages, GELU between them.

    Widths D/8, D/4, D/2, D for patch 16; D/4, D/2, D for patch 8. Module names follow the released
    weights: ``proj.{0,2,4,6}`` are (conv, bn) pairs, the odd indices the activations.
    """

    def __init__(self, *, img_size: int | tuple[int, int], patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = (patch_size, patch_size)
        self.in_chans = in_chans
        self.grid_size = self.dynamic_grid(*self.img_size)
        n = {16: 4, 8: 3}[patch_size]
        widths = [in_chans] + [embed_dim // 2 ** (n - 1 - i) for i in range(n)]
        layers: list[nn.Module] = []
        for i in range(n):
            if i:
                layers.append(nn.GELU())
            layers.append(nn.Sequential(nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1, bias=False),
                                        nn.BatchNorm2d(widths[i + 1])))
        self.proj = nn.Sequential(*layers)

    def dynamic_grid(self, h: int, w: int) -> tuple[int, int]:
        return h // self.patch_size[0], w // self.patch_size[1]

    def forward(self, x: Tensor) -> Tensor:
        check_images(x, in_chans=self.in_chans, patch=self.patch_size, expected=None, what="XCiT")
        x = self.proj(x)
        if x.requires_grad:
            x = _ContiguousGrad.apply(x)
        return x.flatten(2).transpose(1, 2)  # (B, D, rows, cols) -> (B, N, D)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient. PyTorch 2.13's CPU BatchNorm backward is wrong
    for a batch of one image when the incoming gradient has channels-last strides, which is what the
    transpose to tokens gives it (input gradients 4x off in float64; batch 2 is exact). Explain's one-image
    gradient maps and batch-1 training went through it."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


class XCABlock(nn.Module):
    """x + g1 XCA(LN x); x + g3 LPI(LN x); x + g2 MLP(LN x) (norm3 before norm2, as in the released weights)."""

    def __init__(self, dim: int, *, num_heads: int, mlp_ratio: float, qkv_bias: bool, eta: float,
                 norm_layer: partial, proj_drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = XCA(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.ls1 = LayerScale(dim, init_values=eta)
        self.norm3 = norm_layer(dim)
        self.local_mp = LPI(dim)
        self.ls3 = LayerScale(dim, init_values=eta)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values=eta)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path(self.ls3(self.local_mp(self.norm3(x), grid)))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class XCiTClassAttentionBlock(nn.Module):
    """CaiT's class attention as XCiT's released code runs it, on (B, 1 + N, D) with the class token first.

    cls' = cls + g1 CA(LN1 [cls, p]); p' = p + g1 LN1(p) (the patches pass through the first branch
    unchanged by attention). Then with t = LN2 of every token (``tokens_norm``) or of the class token
    only: cls'' = t_cls + g2 MLP(t_cls), p'' = 2 t_p (the residual and the branch both carry the
    patches; kept for fidelity: the next block's keys and values read them).
    """

    def __init__(self, dim: int, *, num_heads: int, mlp_ratio: float, qkv_bias: bool, eta: float,
                 tokens_norm: bool, norm_layer: partial, proj_drop: float = 0.0, attn_drop: float = 0.0) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = ClassAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                   proj_drop=proj_drop)
        self.ls1 = LayerScale(dim, init_values=eta)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values=eta)
        self.tokens_norm = tokens_norm

    def forward(self, x: Tensor) -> Tensor:
        u = self.norm1(x)
        x = x + self.ls1(torch.cat([self.attn(u), u[:, 1:]], dim=1))  # (B, 1 + N, D)
        if self.tokens_norm:
            x = self.norm2(x)
        else:
            x = torch.cat([self.norm2(x[:, :1]), x[:, 1:]], dim=1)
        cls = x[:, :1] + self.ls2(self.mlp(x[:, :1]))
        return torch.cat([cls, 2 * x[:, 1:]], dim=1)


class XCiT(TimmSurface, nn.Module):
    """XCiT classifier; build with an :class:`XCiTConfig` or through ``vitlab.create_model``."""

    # XCA's maps are channel x channel, the class-attention maps class token -> patches: no
    # token-to-token attention over one sequence, so generic rollout does not apply (see explain_xcit)
    token_attention = False
    num_prefix_tokens = 1  # the class token, present in forward_features' output
    position_note = ("XCiT's positions are a fixed Fourier encoding of the grid, projected by a learned 1x1 "
                     "convolution and recomputed for each input size; there is no learned per-patch table")

    def __init__(self, cfg: XCiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        norm_layer = partial(nn.LayerNorm, eps=cfg.norm_eps)
        self.num_features = self.head_hidden_size = D
        self.global_pool = cfg.global_pool
        self.patch_embed = ConvPatchEmbed(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                                          embed_dim=D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = FourierPosEmbed(D)
        self.pos_drop = nn.Dropout(cfg.pos_drop_rate)
        # the paper uses one stochastic-depth rate for every block
        self.blocks = nn.ModuleList([
            XCABlock(D, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, eta=cfg.eta,
                     norm_layer=norm_layer, proj_drop=cfg.proj_drop_rate, attn_drop=cfg.attn_drop_rate,
                     drop_path=cfg.drop_path_rate)
            for _ in range(cfg.depth)
        ])
        self.cls_attn_blocks = nn.ModuleList([
            XCiTClassAttentionBlock(D, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
                                    eta=cfg.eta, tokens_norm=cfg.tokens_norm, norm_layer=norm_layer,
                                    proj_drop=cfg.proj_drop_rate, attn_drop=cfg.attn_drop_rate)
            for _ in range(cfg.cls_attn_layers)
        ])
        self.norm = norm_layer(D)
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(D, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self._init_weights()

    # ----------------------------------------------------------------------------------------- set-up
    def _init_weights(self) -> None:
        # DeiT/XCiT initialisation: truncated normal (std 0.02) for the class token and linear layers
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        trunc_normal_linears(self)

    @property
    def num_classes(self) -> int:
        return getattr(self.head, "out_features", 0)  # 0 for Identity (a quantised Linear has it too)

    @property
    def preprocessing(self) -> Preprocessing:
        h, w = self.patch_embed.img_size
        return Preprocessing(input_size=(self.cfg.in_chans, h, w), mean=self.cfg.mean, std=self.cfg.std,
                             crop_pct=self.cfg.crop_pct, interpolation="bicubic")

    def no_weight_decay(self) -> set[str]:
        """The class token, the position encoding's projection and the XCA temperatures."""
        names = {"cls_token", "pos_embed.token_projection.weight", "pos_embed.token_projection.bias"}
        return names | {n for n, _ in self.named_parameters() if n.endswith(".attn.temperature")}

    def decay_layer_id(self, name: str) -> int:
        """Layer-wise lr decay as timm's group_matcher for XCiT: the stem (convolutional patch embedding,
        position encoding, class token) 0, ``blocks.i`` i + 1, the class-attention blocks after them
        (``cls_attn_blocks.j`` L + 1 + j); the final norm and head L + C + 1."""
        top, _, rest = name.partition(".")
        if top in ("cls_token", "pos_embed", "patch_embed"):
            return 0
        if top == "blocks":
            return int(rest.split(".")[0]) + 1
        if top == "cls_attn_blocks":
            return len(self.blocks) + 1 + int(rest.split(".")[0])
        return self.num_decay_layers() + 1

    def num_decay_layers(self) -> int:
        return len(self.blocks) + len(self.cls_attn_blocks)

    def reset_classifier(self, num_classes: int, global_pool: Literal["token", "avg"] | None = None) -> None:
        """Replace the head by a zero-initialised (D x K) layer."""
        check_global_pool(self, global_pool, XCIT_POOLS)
        if global_pool is not None:
            if global_pool == "token" and not len(self.cls_attn_blocks):
                raise ValueError("reset_classifier: global_pool='token' needs class-attention blocks")
            self.global_pool = global_pool
        self.head = zero_head(self.num_features, num_classes)
        record_head(self, num_classes=max(num_classes, 0), global_pool=self.global_pool)

    def cam_layer(self) -> nn.Module:
        """Grad-CAM's layer: the last XCA block, whose (B, N, D) output patch tokens lie on the grid."""
        return self.blocks[-1]

    # ------------------------------------------------------------------------------------------ forward
    def _embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Images -> patch tokens (B, N, D) with the Fourier encoding of their grid added."""
        grid = self.patch_embed.dynamic_grid(x.shape[-2], x.shape[-1])
        x = self.patch_embed(x)
        return self.pos_drop(x + self.pos_embed(grid)), grid

    def forward_cls(self, x: Tensor) -> Tensor:
        """Patch tokens (B, N, D) -> (B, 1 + N, D) after the class-attention blocks."""
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        for blk in self.cls_attn_blocks:
            x = call_block(blk, x, checkpointed=self.grad_checkpointing)
        return x

    def forward_features(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> normalised tokens (B, 1 + N, D), class token first."""
        x, grid = self._embed(x)
        for blk in self.blocks:
            x = call_block(blk, x, grid, checkpointed=self.grad_checkpointing)
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
        """Run the model and keep the outputs of the chosen XCA blocks (see ViT's for the arguments).

        The class token joins only after these blocks, so the prefix part of each intermediate (with
        ``return_prefix_tokens``) is the learned class token itself, (B, 1, D).
        """
        if output_fmt not in ("NLC", "NCHW"):
            raise ValueError(f"forward_intermediates: output_fmt must be 'NLC' or 'NCHW', got {output_fmt!r}")
        take = set(take_indices(len(self.blocks), indices))
        B = x.shape[0]
        x, grid = self._embed(x)
        results: list = []
        for i, blk in enumerate(self.blocks):
            x = call_block(blk, x, grid, checkpointed=self.grad_checkpointing)
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
# El-Nouby et al. 2021, Table 1 (and the released checkpoints): width, heads and depth per size; eta 1.0
# for 12 layers, 1e-5 for 24. The nano models normalise only the class token in class attention.
XCIT_SIZES: dict[str, dict] = {
    "nano": dict(embed_dim=128, num_heads=4, tokens_norm=False),
    "tiny": dict(embed_dim=192, num_heads=4),
    "small": dict(embed_dim=384, num_heads=8),
    "medium": dict(embed_dim=512, num_heads=8),
    "large": dict(embed_dim=768, num_heads=16),
}
XCIT_DEPTHS: dict[int, tuple[str, ...]] = {12: ("nano", "tiny", "small"), 24: ("tiny", "small", "medium", "large")}


def _register_xcit_variants() -> None:
    for depth, sizes in XCIT_DEPTHS.items():
        for size in sizes:
            for patch in (8, 16):
                for res in (224, 384):
                    name = f"xcit_{size}_{depth}_p{patch}_{res}"
                    cfg = XCiTConfig(img_size=res, patch_size=patch, depth=depth, eta=1.0 if depth == 12 else 1e-5,
                                     **XCIT_SIZES[size])
                    register_model(ModelEntry(name=name, family="xcit", config=cfg, build=XCiT,
                                              description=f"XCiT-{size}-{depth}/{patch} at {res}px (runs at any "
                                                          f"multiple of {patch})"))


_register_xcit_variants()
