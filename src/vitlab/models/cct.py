"""CCT: "Escaping the Big Data Paradigm with Compact Transformers".

Hassani et al., 2021, arXiv:2104.05704 (official code: SHI-Labs/Compact-Transformers). Compact
transformers that train from scratch on small data sets (CIFAR-10 at 32 px, Flowers-102). What differs
from ViT:

* Convolutional tokenizer instead of patches: n blocks of Conv(k x k, stride s, padding p, no bias) ->
  ReLU -> MaxPool(3, stride 2, padding 1); the intermediate blocks have 64 channels, the last one
  ``embed_dim``; the feature map's positions are the tokens. "CCT-7/3x1" is 7 encoder layers and one
  3 x 3 convolution block: at 32 px a 16 x 16 grid of overlapping receptive fields. The defaults follow
  the released code: s = max(1, k // 2 - 1), p = max(1, k // 2).
* Sequence pooling instead of a class token: the head reads sum_i softmax(w . x_i) x_i over the final
  tokens, w a Linear(D, 1) (section 3.2, "SeqPool"). ``global_pool="token"`` is the released code's
  ``seq_pool=False`` (a class token with its own entry in the position table), "avg" the token mean.
* Position embeddings: learned (the default; initialised N(0, 0.2^2), truncated at +-2), the fixed 1-D
  sinusoid table ("_sine" variants) or none (the convolutions carry position).
* The encoder block is not quite ViT's pre-norm block: the second LayerNorm sits on the residual stream,
  x <- x + MSA(LN1(x)); x <- LN2(x); x <- x + MLP(x) (the released TransformerEncoderLayer; its ``norm1``
  is vitlab's ``norm2``). No bias on qkv, exact GELU, LayerNorm eps 1e-5, then a final LayerNorm.
* Regularisation as released: attention dropout 0.1 and stochastic depth 0.1 (linear in depth, from 0 at
  the first block) by default, no other dropout.

Another input size: the tokenizer takes any size; a learned table is resampled at load time (and per batch
with ``dynamic_img_size``) on its 2-D grid, the sinusoid table is recomputed for the new length.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitlab.layers import (
    Attention,
    DropPath,
    Mlp,
    call_block,
    check_images,
    resample_pos_embed,
    run_sequential,
    sinusoid_1d_pos_embed,
    size_differs,
    to_2tuple,
)
from vitlab.models.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocessing,
    TimmSurface,
    record_head,
    take_indices,
    zero_head,
)
from vitlab.models.registry import ModelEntry, check_config, register_model

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True, kw_only=True)
class CCTConfig:
    """Args:
    num_conv_layers: convolution blocks of the tokenizer (the "x1" / "x2" of "3x1").
    kernel_size: their kernel; ``stride`` / ``padding`` None: the released defaults (module docstring).
    conv_channels: width of the intermediate convolution blocks (64 in every published variant).
    max_pool: the 3 x 3, stride-2 max pool after each convolution (all published variants use it).
    pos_embed: "learn", "sine" (fixed 1-D sinusoid over the token sequence) or "none".
    global_pool: "seq" (sequence pooling, the paper's), "token" (a class token) or "avg".
    dynamic_img_size: accept any input size, resampling a learned table per batch.
    channels_last: run the tokenizer's convolutions in channels-last memory format (faster on the CPU; the
        flattened tokens then need no transpose copy). Same numbers either way.
    """

    img_size: int | tuple[int, int] = 32
    in_chans: int = 3
    num_classes: int = 10
    embed_dim: int = 256
    depth: int = 7
    num_heads: int = 4
    mlp_ratio: float = 2.0
    num_conv_layers: int = 1
    kernel_size: int = 3
    stride: int | None = None
    padding: int | None = None
    conv_channels: int = 64
    max_pool: bool = True
    qkv_bias: bool = False
    pos_embed: Literal["learn", "sine", "none"] = "learn"
    global_pool: Literal["seq", "token", "avg"] = "seq"
    norm_eps: float = 1e-5
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.1
    drop_path_rate: float = 0.1
    dynamic_img_size: bool = False
    channels_last: bool = True
    mean: tuple[float, ...] = field(default=CIFAR10_MEAN)
    std: tuple[float, ...] = field(default=CIFAR10_STD)
    crop_pct: float = 1.0

    def __post_init__(self) -> None:
        check_config(self)
        if self.embed_dim % self.num_heads:
            raise ValueError(f"CCTConfig: embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if self.pos_embed not in ("learn", "sine", "none"):
            raise ValueError(f"CCTConfig: pos_embed must be 'learn', 'sine' or 'none', got {self.pos_embed!r}")
        if self.global_pool not in ("seq", "token", "avg"):
            raise ValueError(f"CCTConfig: global_pool must be 'seq', 'token' or 'avg', got {self.global_pool!r}")
        if self.num_conv_layers < 1:
            raise ValueError(f"CCTConfig: num_conv_layers must be at least 1, got {self.num_conv_layers}")

    @property
    def conv_stride(self) -> int:
        return self.stride if self.stride is not None else max(1, self.kernel_size // 2 - 1)

    @property
    def conv_padding(self) -> int:
        return self.padding if self.padding is not None else max(1, self.kernel_size // 2)


class ConvBlock(nn.Module):
    """Conv (no bias) -> ReLU -> optional MaxPool(3, 2, 1): one block of the tokenizer."""

    def __init__(self, cin: int, cout: int, k: int, s: int, p: int, *, max_pool: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size=k, stride=s, padding=p, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if max_pool else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.act(self.conv(x)))


class ConvTokenizer(nn.Module):
    """Images (B, C, H, W) -> tokens (B, N, D): ``num_conv_layers`` x (conv -> ReLU -> max pool), flattened."""

    def __init__(self, cfg: CCTConfig) -> None:
        super().__init__()
        self.in_chans = cfg.in_chans
        self.img_size = to_2tuple(cfg.img_size)
        self.strict_img_size = not cfg.dynamic_img_size
        self.channels_last = cfg.channels_last
        k, s, p = cfg.kernel_size, cfg.conv_stride, cfg.conv_padding
        self._convs = [(k, s, p)] * cfg.num_conv_layers
        self.max_pool = cfg.max_pool
        widths = [cfg.in_chans] + [cfg.conv_channels] * (cfg.num_conv_layers - 1) + [cfg.embed_dim]
        self.layers = nn.ModuleList(
            ConvBlock(widths[i], widths[i + 1], k, s, p, max_pool=cfg.max_pool) for i in range(cfg.num_conv_layers)
        )
        self.grid_size = self.dynamic_grid(*self.img_size)
        if min(self.grid_size) < 1:
            raise ValueError(f"CCTConfig: img_size={cfg.img_size} leaves no tokens after {cfg.num_conv_layers} "
                             f"convolution block(s) of kernel {k}, stride {s}")
        # input pixels per token at the built size: the grid step the analysis and export tools use
        self.patch_size = (self.img_size[0] // self.grid_size[0], self.img_size[1] // self.grid_size[1])

    def dynamic_grid(self, h: int, w: int) -> tuple[int, int]:
        for k, s, p in self._convs:
            h, w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
            if self.max_pool:
                h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1  # kernel 3, stride 2, padding 1
        return h, w

    def forward(self, x: Tensor) -> Tensor:
        check_images(x, in_chans=self.in_chans, patch=(1, 1),
                     expected=self.img_size if self.strict_img_size else None, what="CCT")
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for layer in self.layers:
            x = layer(x)
        # (B, D, h, w) -> (B, h*w, D); a view of a channels-last map, no copy
        return x.flatten(2).transpose(1, 2)


class CCTBlock(nn.Module):
    """x <- x + MSA(LN1(x)); x <- LN2(x); x <- x + MLP(x) (the second norm on the residual stream)."""

    def __init__(self, dim: int, cfg: CCTConfig, drop_path: float) -> None:
        super().__init__()
        norm = partial(nn.LayerNorm, eps=cfg.norm_eps)
        self.norm1 = norm(dim)
        self.attn = Attention(dim, num_heads=cfg.num_heads, qkv_bias=cfg.qkv_bias, attn_drop=cfg.attn_drop_rate,
                              proj_drop=cfg.drop_rate)
        self.norm2 = norm(dim)
        self.mlp = Mlp(dim, hidden_features=int(dim * cfg.mlp_ratio), drop=cfg.drop_rate)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm2(x + self.drop_path(self.attn(self.norm1(x))))
        return x + self.drop_path(self.mlp(x))


class CCT(TimmSurface, nn.Module):
    """Compact Convolutional Transformer; build with a :class:`CCTConfig` or through ``vitlab.create_model``."""

    token_attention = True  # one sequence of tokens attends to itself: rollout applies (explain_cct.py)

    def __init__(self, cfg: CCTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        self.num_features = self.head_hidden_size = D
        self.global_pool = cfg.global_pool
        self.dynamic_img_size = cfg.dynamic_img_size
        self.num_prefix_tokens = self.pos_embed_prefix = 1 if cfg.global_pool == "token" else 0
        self.tokenizer = ConvTokenizer(cfg)
        grid = self.tokenizer.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if self.num_prefix_tokens else None
        n = self.num_prefix_tokens + grid[0] * grid[1]
        self.pos_embed = nn.Parameter(torch.zeros(1, n, D)) if cfg.pos_embed == "learn" else None
        if cfg.pos_embed == "sine":  # fixed: recomputed rather than stored (the released code stores it)
            self.register_buffer("pos_embed_fixed", sinusoid_1d_pos_embed(n, D), persistent=False)
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # grows with depth
        self.blocks = nn.Sequential(*[CCTBlock(D, cfg, dpr[i]) for i in range(cfg.depth)])
        self.norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.attn_pool = nn.Linear(D, 1) if cfg.global_pool == "seq" else None
        self.head = nn.Linear(D, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self._init_weights()

    # ----------------------------------------------------------------------------------------- set-up
    def _init_weights(self) -> None:
        # the released code: truncated normal 0.02 on every Linear (zero bias), He-normal convolutions,
        # N(0, 0.2^2) learned positions, a zero class token
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.2)

    @property
    def patch_embed(self) -> ConvTokenizer:
        """The module that sets the token grid (named as in other families, for the analysis tools)."""
        return self.tokenizer

    @property
    def num_classes(self) -> int:
        return getattr(self.head, "out_features", 0)  # 0 for Identity (a quantised Linear has it too)

    @property
    def preprocessing(self) -> Preprocessing:
        h, w = self.tokenizer.img_size
        return Preprocessing(input_size=(self.cfg.in_chans, h, w), mean=self.cfg.mean, std=self.cfg.std,
                             crop_pct=self.cfg.crop_pct, interpolation="bicubic")

    @property
    def input_size_multiple(self) -> tuple[int, int]:
        """Any size works; the step between sizes that add a whole row/column of tokens."""
        return self.tokenizer.patch_size

    onnx_fixed_size_reason = None  # the tokenizer takes any size; positions are resampled or recomputed

    def no_weight_decay(self) -> set[str]:
        """Parameter names that should not be weight-decayed (position table and class token)."""
        names = {n for n, _ in self.named_parameters(recurse=False)}
        return {n for n in ("pos_embed", "cls_token") if n in names}

    def reset_classifier(self, num_classes: int, global_pool: Literal["seq", "avg"] | None = None) -> None:
        """Replace the head by a zero-initialised (D x K) layer; ``global_pool`` switches between "seq"
        (a new attention-pool layer where the model had none) and "avg" (a class token cannot be added)."""
        if global_pool is not None and global_pool != self.global_pool:
            if global_pool not in ("seq", "avg") or self.global_pool == "token":
                raise ValueError(f"reset_classifier: cannot switch global_pool from {self.global_pool!r} to "
                                 f"{global_pool!r} (only between 'seq' and 'avg'; a class token is built in)")
            self.global_pool = global_pool
            self.attn_pool = nn.Linear(self.num_features, 1) if global_pool == "seq" else None
            if self.attn_pool is not None:
                nn.init.trunc_normal_(self.attn_pool.weight, std=0.02)
                nn.init.zeros_(self.attn_pool.bias)
        self.head = zero_head(self.num_features, num_classes)
        record_head(self, num_classes=max(num_classes, 0), global_pool=self.global_pool)

    def position_grid_table(self) -> tuple[Tensor, tuple[int, int], str] | None:
        """For the analysis tools: the per-token position table on its grid, the class entry dropped."""
        p = self.pos_embed_prefix
        if self.pos_embed is not None:
            return self.pos_embed[0, p:], self.tokenizer.grid_size, "learn"
        if self.cfg.pos_embed == "sine":
            return self.pos_embed_fixed[0, p:], self.tokenizer.grid_size, "sincos-1d"
        return None

    def _init_buffers(self) -> None:
        if self.cfg.pos_embed == "sine":
            grid, device = self.tokenizer.grid_size, self.pos_embed_fixed.device
            n = self.pos_embed_prefix + grid[0] * grid[1]
            self.pos_embed_fixed = sinusoid_1d_pos_embed(n, self.num_features).to(device)

    # ------------------------------------------------------------------------------------------ forward
    def _positions(self, grid: tuple[int, int], x: Tensor) -> Tensor | None:
        """The (1, prefix + rows*cols, D) position table for a token grid."""
        built = self.tokenizer.grid_size
        if self.pos_embed is not None:
            if self.dynamic_img_size and size_differs(grid, built):
                return resample_pos_embed(self.pos_embed, grid, old_size=built, num_prefix_tokens=self.pos_embed_prefix)
            return self.pos_embed
        if self.cfg.pos_embed == "sine":
            if size_differs(grid, built):
                n = self.pos_embed_prefix + grid[0] * grid[1]
                return sinusoid_1d_pos_embed(n, self.num_features).to(x.device, x.dtype)
            return self.pos_embed_fixed.to(x.dtype)
        return None

    def _embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        grid = self.tokenizer.dynamic_grid(x.shape[-2], x.shape[-1])
        x = self.tokenizer(x)  # validates the input: (B, C, H, W) -> (B, N, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + N, D)
        pos = self._positions(grid, x)
        if pos is not None:
            x = x + pos
        return self.pos_drop(x), grid

    def forward_features(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> normalised tokens (B, prefix + N, D)."""
        x, _ = self._embed(x)
        return self.norm(run_sequential(self.blocks, x, checkpointed=self.grad_checkpointing))

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        *,
        norm: bool = False,
        output_fmt: Literal["NLC", "NCHW"] = "NLC",
        return_prefix_tokens: bool = False,
    ) -> tuple[Tensor, list[Tensor] | list[tuple[Tensor, Tensor]]]:
        """Run the model and keep the outputs of the chosen blocks.

        Args:
            indices: None for all blocks, n for the last n, or a list of block indices.
            norm: pass each intermediate through the final norm.
            output_fmt: "NLC" (B, N, D) tokens or "NCHW" (B, D, rows, cols) maps.
            return_prefix_tokens: return (tokens, prefix_tokens) pairs (the prefix is empty without a class token).
        Returns:
            (the output of forward_features, the intermediates).
        """
        if output_fmt not in ("NLC", "NCHW"):
            raise ValueError(f"forward_intermediates: output_fmt must be 'NLC' or 'NCHW', got {output_fmt!r}")
        take = set(take_indices(len(self.blocks), indices))
        B = x.shape[0]
        x, grid = self._embed(x)
        p = self.num_prefix_tokens
        results: list = []
        for i, blk in enumerate(self.blocks):
            x = call_block(blk, x, checkpointed=self.grad_checkpointing)
            if i in take:
                y = self.norm(x) if norm else x
                prefix, tokens = y[:, :p], y[:, p:]
                if output_fmt == "NCHW":
                    tokens = tokens.reshape(B, grid[0], grid[1], -1).permute(0, 3, 1, 2)  # (B, D, rows, cols)
                results.append((tokens, prefix) if return_prefix_tokens else tokens)
        return self.norm(x), results

    def pool_weights(self, x: Tensor) -> Tensor:
        """Sequence pooling's weights over the tokens, (B, N) summing to 1, for normalised tokens (B, N, D)."""
        if self.attn_pool is None:
            raise ValueError(f"pool_weights: the model pools with global_pool={self.global_pool!r}, not 'seq'")
        return F.softmax(self.attn_pool(x).squeeze(-1), dim=1)

    def pool(self, x: Tensor) -> Tensor:
        if self.global_pool == "seq":
            return torch.einsum("bn,bnd->bd", self.pool_weights(x), x)  # (B, D)
        if self.global_pool == "token":
            return x[:, 0]
        return x[:, self.num_prefix_tokens:].mean(dim=1)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Tokens (B, prefix + N, D) -> logits (B, K), or the pooled features if ``pre_logits``."""
        x = self.pool(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# ------------------------------------------------------------------------------------------- variants
# Hassani et al. 2021, Table 1 / the released src/cct.py: layers, heads, MLP ratio, width per size.
CCT_SIZES: dict[int, dict] = {
    2: dict(depth=2, num_heads=2, mlp_ratio=1.0, embed_dim=128),
    4: dict(depth=4, num_heads=2, mlp_ratio=1.0, embed_dim=128),
    6: dict(depth=6, num_heads=4, mlp_ratio=2.0, embed_dim=256),
    7: dict(depth=7, num_heads=4, mlp_ratio=2.0, embed_dim=256),
    14: dict(depth=14, num_heads=6, mlp_ratio=3.0, embed_dim=384),
}
_CIFAR = dict(mean=CIFAR10_MEAN, std=CIFAR10_STD, crop_pct=1.0)
_IMAGENET = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.9)
# The released registered names: (size, kernel, conv layers, resolution, classes, sine variant published)
CCT_VARIANTS: dict[str, tuple[int, int, int, int, int, bool]] = {
    "cct_2_3x2_32": (2, 3, 2, 32, 10, True),
    "cct_4_3x2_32": (4, 3, 2, 32, 10, True),
    "cct_6_3x1_32": (6, 3, 1, 32, 10, True),
    "cct_6_3x2_32": (6, 3, 2, 32, 10, True),
    "cct_7_3x1_32": (7, 3, 1, 32, 10, True),
    "cct_7_3x2_32": (7, 3, 2, 32, 10, True),
    "cct_7_3x1_32_c100": (7, 3, 1, 32, 100, True),
    "cct_7_7x2_224": (7, 7, 2, 224, 102, True),  # Flowers-102
    "cct_14_7x2_224": (14, 7, 2, 224, 1000, False),
    "cct_14_7x2_384": (14, 7, 2, 384, 1000, False),
    "cct_14_7x2_384_fl": (14, 7, 2, 384, 102, False),
}


def _register_cct_variants() -> None:
    for name, (size, k, n_conv, res, classes, sine) in CCT_VARIANTS.items():
        data = _CIFAR if res == 32 else _IMAGENET
        base = dict(**CCT_SIZES[size], kernel_size=k, num_conv_layers=n_conv, img_size=res, num_classes=classes,
                    **data)
        label = f"CCT-{size}/{k}x{n_conv} at {res}px, {classes} classes"
        register_model(ModelEntry(name=name, family="cct", config=CCTConfig(**base), build=CCT,
                                  description=label + ", learned positions"))
        if sine:
            # the released name puts "_sine" before a "_c100" suffix
            sine_name = name.replace("_c100", "_sine_c100") if name.endswith("_c100") else name + "_sine"
            register_model(ModelEntry(name=sine_name, family="cct", config=CCTConfig(**base, pos_embed="sine"),
                                      build=CCT, description=label + ", sinusoid positions"))


_register_cct_variants()
