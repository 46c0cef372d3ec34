"""MobileViT v1, v2 and v3: light-weight convolution + transformer hybrids for phones and CPUs.

* v1: Mehta & Rastegari, "MobileViT: Light-weight, General-purpose, and Mobile-friendly Vision
  Transformer", arXiv:2110.02178 (2021).
* v2: Mehta & Rastegari, "Separable Self-attention for Mobile Vision Transformers", arXiv:2206.02680 (2022).
* v3: Wadekar & Chaurasia, "MobileViTv3: Mobile-Friendly Vision Transformer with Simple and Effective
  Fusion of Local, Global and Input Features", arXiv:2209.15159 (2022); channels and depths from the
  official code, github.com/micronDLA/MobileViTv3 @5e3f490 (MobileViTv3-v1/cvnets/models/classification/
  config/mobilevit.py, MobileViTv3-v2/cvnets/models/classification/config/mobilevit_v3.py).

What differs from ViT: no patch embedding and no position table. A MobileNetV2 network (3x3 stride-2 stem,
inverted residual stages) carries the image to strides 8, 16 and 32, where MobileViT blocks mix a local
3x3 convolution with a transformer run across 2x2 patches: the map is unfolded so that each of the 4 pixel
positions of a patch forms one sequence over all patches (``layers.patch_fold``), and folded back after.
The blocks:

* v1: full 3x3 conv -> 1x1 to width d -> transformer (pre-norm, SiLU MLP) + LayerNorm -> fold -> 1x1 back
  to C -> 3x3 fusion over concat(block INPUT, projected). Maps whose sides are not even are resized
  bilinearly to the next multiple and back (align_corners=False).
* v2: depthwise 3x3 -> 1x1 -> separable self-attention blocks with GroupNorm(1) -> fold -> 1x1 projection
  with BN and no activation; no fusion, no residual, no final expansion conv. The block input is resized
  (align_corners=True) to an even size and the output stays at that size, as cvnets and timm do
  (``patch_remainder="resize"``). Hugging Face's v2 instead unfolds with stride p, dropping the last row /
  column of an odd map, and folds zeros back there (``patch_remainder="drop"``, set for its folders).
* v3 (S, XS, XXS; built on v1): depthwise 3x3; the fusion is a 1x1 over concat(LOCAL features, projected
  global features) - local first - plus a residual from the block input; wider stages.
* v3 (0.5, 0.75, 1.0; built on v2): the v2 block whose projection reads concat(GLOBAL, LOCAL) - global
  first - plus a residual from the (resized) block input.

Input: 256 x 256, pixels in [0, 1] without mean/std shift. Module names follow timm's, so timm state dicts
load as they are; Hugging Face and the official cvnets layout are converted (checkpoints/convert_mobilevit.py).

Counting MACs: ``vitlab info`` (torch's FlopCounterMode, 256 px) gives v3-S/XS/XXS 1.83 / 0.97 / 0.33 GMACs
where the v3 paper lists 1.841 / 0.927 / 0.289 "GFLOPs". The architectures are the paper's (parameters
match, and the official configs above give these channels and depths); the convention differs. The
authors counted with cvnets' ``profile_model`` (apple/ml-cvnets @d38a116, cvnets/layers/
multi_head_attention.py), which charges q k^T and attn @ v ``seq_len * C * C`` each per sequence, i.e.
N d^2 where the products cost N^2 d, and adds linear/conv biases. At 256 px stage 3 has N = 256 patches per
pixel position, more than d (64 / 96 / 144), so the paper undercounts it; stages 4-5 (N = 64, 16) are
overcounted. For S the two nearly cancel (-0.6%); for XS (+4.6%) and XXS (+14%) stage 3 dominates.
Counted by cvnets' rules (tests/test_mobilevit.py ``cvnets_profile_macs``), vitlab's models give every
figure the paper and the micronDLA README publish to within 0.1%, the -L2 low-latency models included.
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
    ConvNormAct,
    FoldedAttention,
    InvertedResidual,
    SeparableAttentionBlock,
    call_block,
    fold_patches,
    fold_tokens,
    make_divisible,
    resize_to_patches,
    run_sequential,
    size_differs,
    unfold_patches,
    unfold_tokens,
)
from vitlab.models.base import Preprocessing, TimmSurface, check_global_pool, record_head, take_indices, zero_head
from vitlab.models.registry import ModelEntry, check_config, register_model

Version = Literal["v1", "v2", "v3"]
AttentionKind = Literal["mhsa", "separable"]


@dataclass(frozen=True, kw_only=True)
class MobileViTConfig:
    """Args:
    version: which block the MobileViT stages use (see the module docstring).
    attention: "mhsa" (multi-head self-attention: v1, v3-S/XS/XXS) or "separable" (v2, v3-0.5/0.75/1.0).
    channels: output channels of the five stages (strides 2, 4, 8, 16, 32).
    mv2_depths: inverted residual blocks in stages 1 and 2.
    transformer_dims / transformer_depths: width d and number of transformer blocks of stages 3-5.
    expand_ratio: expansion of every inverted residual.
    final_chs: channels of the 1x1 expansion before pooling (v1, v3-S/XS/XXS); 0 for none (v2).
    mlp_ratio: hidden width of the transformer MLPs relative to d (v1: 2; v2 calls it ``ffn_multiplier``).
    qkv_bias: biases on the query / key / value projections (multi-head attention only).
    kernel_size: kernel of the blocks' local convolution (``conv_kxk``) and of v1's fusion convolution; 3 in
        every released model (Hugging Face's ``conv_kernel_size``). Odd: the convolutions pad ``k // 2``.
    norm_eps: epsilon of the transformer's LayerNorms (v1, v3-S/XS/XXS) or GroupNorms (v2, v3-0.5..1.0).
    channel_order: the colour order the weights expect ("BGR" for Hugging Face MobileViT checkpoints,
        whose processor flips RGB to BGR); recorded in ``preprocessing`` and applied by vitlab's transforms.
    patch_remainder: separable-attention blocks (v2, v3-0.5..1.0) on a map whose sides are not multiples of
        the patch: "resize" the block input to the next multiple and keep that size (cvnets, timm), or
        "drop" the last rows / columns from the transformer and fold zeros back there (Hugging Face's v2).
    """

    version: Version = "v1"
    attention: AttentionKind = "mhsa"
    stem_chs: int = 16
    channels: tuple[int, ...] = (32, 64, 96, 128, 160)
    mv2_depths: tuple[int, ...] = (1, 3)
    transformer_dims: tuple[int, ...] = (144, 192, 240)
    transformer_depths: tuple[int, ...] = (2, 4, 3)
    expand_ratio: float = 4.0
    num_heads: int = 4
    mlp_ratio: float = 2.0
    qkv_bias: bool = True
    patch_size: int = 2
    kernel_size: int = 3
    norm_eps: float = 1e-5
    final_chs: int = 640
    in_chans: int = 3
    num_classes: int = 1000
    img_size: int | tuple[int, int] = 256
    drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    mean: tuple[float, ...] = field(default=(0.0, 0.0, 0.0))
    std: tuple[float, ...] = field(default=(1.0, 1.0, 1.0))
    crop_pct: float = 0.9
    channel_order: Literal["RGB", "BGR"] = "RGB"
    patch_remainder: Literal["resize", "drop"] = "resize"

    def __post_init__(self) -> None:
        check_config(self)
        if (self.version, self.attention) in (("v1", "separable"), ("v2", "mhsa")):
            raise ValueError(f"MobileViTConfig: version {self.version!r} has no {self.attention!r} attention "
                             f"(v1 uses 'mhsa', v2 'separable', v3 either)")
        if len(self.channels) != 5 or len(self.mv2_depths) != 2:
            raise ValueError(f"MobileViTConfig: channels needs 5 entries and mv2_depths 2, got {self.channels}, "
                             f"{self.mv2_depths}")
        if len(self.transformer_dims) != 3 or len(self.transformer_depths) != 3:
            raise ValueError("MobileViTConfig: transformer_dims and transformer_depths need 3 entries (stages 3-5)")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"MobileViTConfig: kernel_size must be odd (the convolutions pad k // 2), "
                             f"got {self.kernel_size}")
        if self.patch_remainder == "drop" and self.attention == "mhsa":
            raise ValueError("MobileViTConfig: patch_remainder='drop' (Hugging Face's v2 unfolding) applies to "
                             "separable attention (v2, v3-0.5..1.0) only; multi-head attention blocks resize")


def _concat(*xs: Tensor) -> Tensor:
    return torch.cat(xs, dim=1)


class MobileViTBlock(nn.Module):
    """The v1 block, or with ``v3=True`` the v3-S/XS/XXS block (depthwise local conv, 1x1 fusion over
    concat(local, global), residual). The transformer sees (B*P, N, d) token sequences."""

    def __init__(self, dim: int, transformer_dim: int, depth: int, *, v3: bool, num_heads: int,
                 mlp_ratio: float, qkv_bias: bool = True, patch_size: int, kernel_size: int = 3,
                 norm_eps: float = 1e-5, drop: float, attn_drop: float, drop_path: list[float]) -> None:
        super().__init__()
        self.v3 = v3
        self.patch = (patch_size, patch_size)
        d = transformer_dim
        norm = partial(nn.LayerNorm, eps=norm_eps)
        self.conv_kxk = ConvNormAct(dim, dim, kernel_size, groups=dim if v3 else 1)
        self.conv_1x1 = nn.Conv2d(dim, d, 1, bias=False)
        attn = partial(FoldedAttention, groups=patch_size * patch_size)
        self.transformer = nn.Sequential(*[
            Block(d, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=drop,
                  attn_drop=attn_drop, drop_path=drop_path[i], norm_layer=norm, act_layer=nn.SiLU, attn_layer=attn)
            for i in range(depth)
        ])
        self.norm = norm(d)
        self.conv_proj = ConvNormAct(d, dim, 1)
        # v1: kxk (3x3) over concat(input, global) (2C); v3: 1x1 over concat(local, global) (d + C)
        self.conv_fusion = ConvNormAct(d + dim, dim, 1) if v3 else ConvNormAct(2 * dim, dim, kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        local = self.conv_1x1(self.conv_kxk(x))  # (B, d, H, W)
        h, w = local.shape[-2:]
        y = resize_to_patches(local, self.patch, align_corners=False)
        grid = (y.shape[-2] // self.patch[0], y.shape[-1] // self.patch[1])
        t = self.norm(self.transformer(unfold_tokens(y, self.patch)))  # (B*P, N, d)
        y = fold_tokens(t, grid, self.patch)  # (B, d, H', W')
        if size_differs(y.shape[-2:], (h, w)):
            y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
        y = self.conv_proj(y)  # (B, C, H, W)
        if self.v3:
            return self.conv_fusion(_concat(local, y)) + x
        return self.conv_fusion(_concat(x, y))


class MobileViTV2Block(nn.Module):
    """The v2 block, or with ``v3=True`` the v3-0.5/0.75/1.0 block (projection over concat(global, local),
    residual). The separable-attention blocks see (B, d, P, N) patch maps."""

    def __init__(self, dim: int, transformer_dim: int, depth: int, *, v3: bool, mlp_ratio: float,
                 patch_size: int, kernel_size: int = 3, norm_eps: float = 1e-5, drop: float, attn_drop: float,
                 drop_path: list[float], patch_remainder: Literal["resize", "drop"] = "resize") -> None:
        super().__init__()
        self.v3 = v3
        self.patch = (patch_size, patch_size)
        self.patch_remainder = patch_remainder
        d = transformer_dim
        self.conv_kxk = ConvNormAct(dim, dim, kernel_size, groups=dim)
        self.conv_1x1 = nn.Conv2d(dim, d, 1, bias=False)
        self.transformer = nn.Sequential(*[
            SeparableAttentionBlock(d, mlp_ratio=mlp_ratio, drop=drop, attn_drop=attn_drop, drop_path=drop_path[i],
                                    eps=norm_eps)
            for i in range(depth)
        ])
        self.norm = nn.GroupNorm(1, d, eps=norm_eps)
        self.conv_proj = ConvNormAct(2 * d if v3 else d, dim, 1, act_layer=None)

    def forward(self, x: Tensor) -> Tensor:
        if self.patch_remainder == "resize":
            x = resize_to_patches(x, self.patch, align_corners=True)  # the output keeps this (larger) size
        local = self.conv_1x1(self.conv_kxk(x))  # (B, d, H, W)
        h, w = local.shape[-2:]
        grid = (h // self.patch[0], w // self.patch[1])
        fit = (grid[0] * self.patch[0], grid[1] * self.patch[1])
        if self.patch_remainder == "drop":  # F.unfold(stride=p) semantics: the remainder rows / columns skipped
            p = self.norm(self.transformer(unfold_patches(local[..., :fit[0], :fit[1]], self.patch)))
        else:
            p = self.norm(self.transformer(unfold_patches(local, self.patch)))  # (B, d, P, N)
        y = fold_patches(p, grid, self.patch)  # (B, d, fit_h, fit_w)
        if self.patch_remainder == "drop" and size_differs(fit, (h, w)):
            y = F.pad(y, (0, w - fit[1], 0, h - fit[0]))  # F.fold leaves zeros where no patch was
        if self.v3:
            return self.conv_proj(_concat(y, local)) + x
        return self.conv_proj(y)


class MobileViT(TimmSurface, nn.Module):
    """A MobileViT classifier (any version), or a backbone of five stages when ``num_classes == 0``."""

    num_prefix_tokens = 0
    token_attention = False  # attention runs per pixel position over patches, not over one token sequence

    def __init__(self, cfg: MobileViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        C = cfg.channels
        self.stem = ConvNormAct(cfg.in_chans, cfg.stem_chs, 3, stride=2)
        total = sum(cfg.transformer_depths)
        dpr = [cfg.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        stages: list[nn.Module] = []
        cin = cfg.stem_chs
        for i, n in enumerate(cfg.mv2_depths):
            blocks = [InvertedResidual(cin if j == 0 else C[i], C[i], stride=(2 if i > 0 and j == 0 else 1),
                                       expand_ratio=cfg.expand_ratio) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = C[i]
        k = 0
        for i in range(3):
            dim, d, depth = C[2 + i], cfg.transformer_dims[i], cfg.transformer_depths[i]
            common = dict(v3=cfg.version == "v3", mlp_ratio=cfg.mlp_ratio, patch_size=cfg.patch_size,
                          kernel_size=cfg.kernel_size, norm_eps=cfg.norm_eps, drop=cfg.proj_drop_rate,
                          attn_drop=cfg.attn_drop_rate, drop_path=dpr[k:k + depth])
            if cfg.attention == "mhsa":
                block: nn.Module = MobileViTBlock(dim, d, depth, num_heads=cfg.num_heads, qkv_bias=cfg.qkv_bias,
                                                  **common)
            else:
                block = MobileViTV2Block(dim, d, depth, patch_remainder=cfg.patch_remainder, **common)
            stages.append(nn.Sequential(InvertedResidual(cin, dim, stride=2, expand_ratio=cfg.expand_ratio), block))
            cin, k = dim, k + depth
        self.stages = nn.Sequential(*stages)
        self.final_conv = ConvNormAct(cin, cfg.final_chs, 1) if cfg.final_chs else nn.Identity()
        self.num_features = cfg.final_chs or cin
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(self.num_features, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # ----------------------------------------------------------------------------------------- surface
    @property
    def num_classes(self) -> int:
        return getattr(self.head, "out_features", 0)  # 0 for Identity (a quantised Linear has it too)

    @property
    def preprocessing(self) -> Preprocessing:
        size = self.cfg.img_size if isinstance(self.cfg.img_size, tuple) else (self.cfg.img_size,) * 2
        return Preprocessing(input_size=(self.cfg.in_chans, *size), mean=self.cfg.mean, std=self.cfg.std,
                             crop_pct=self.cfg.crop_pct, interpolation="bicubic",
                             channel_order=self.cfg.channel_order)

    def no_weight_decay(self) -> set[str]:
        return set()

    def cam_layer(self) -> nn.Module:
        """The module whose output is the last spatial map (for Grad-CAM): the final expansion, else stage 5."""
        return self.final_conv if isinstance(self.final_conv, ConvNormAct) else self.stages[-1]

    def reset_classifier(self, num_classes: int, global_pool: Literal["avg"] | None = None) -> None:
        """Replace the head by a zero-initialised layer (the pooling, 'avg', is the only one built)."""
        check_global_pool(self, global_pool, ("avg",))
        self.head = zero_head(self.num_features, num_classes)
        record_head(self, num_classes=max(num_classes, 0))

    # ------------------------------------------------------------------------------------------ forward
    def _check(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.cfg.in_chans:
            raise ValueError(f"MobileViT: expected images of shape (batch, {self.cfg.in_chans}, H, W), "
                             f"got {tuple(x.shape)}")

    def forward_features(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> the last feature map (B, num_features, H/32, W/32)."""
        self._check(x)
        return self.final_conv(run_sequential(self.stages, self.stem(x), checkpointed=self.grad_checkpointing))

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        *,
        norm: bool = False,
        output_fmt: Literal["NCHW", "NLC"] = "NCHW",
        return_prefix_tokens: bool = False,
        exclude_final_conv: bool = False,
    ) -> tuple[Tensor, list[Tensor]]:
        """forward_features' output and the outputs of the chosen stages (strides 2, 4, 8, 16, 32).

        The last stage's map is taken after the final 1x1 expansion (v1 and v3 have one), as timm's is, unless
        ``exclude_final_conv``. ``norm`` and ``return_prefix_tokens`` have nothing to act on here (no final
        norm, no prefix tokens).
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"forward_intermediates: output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        self._check(x)
        take = set(take_indices(len(self.stages), indices))
        x = self.stem(x)
        feats = []
        last = len(self.stages) - 1
        for i, stage in enumerate(self.stages):
            x = call_block(stage, x, checkpointed=self.grad_checkpointing)
            if i == last and not exclude_final_conv:
                x = self.final_conv(x)
            if i in take:
                feats.append(x.flatten(2).transpose(1, 2) if output_fmt == "NLC" else x)
        return (self.final_conv(x) if exclude_final_conv else x), feats

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.head_drop(x.mean(dim=(2, 3)))  # global average pool: (B, C, h, w) -> (B, C)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    # ------------------------------------------------------------------------------------- checkpoints
    def adapt_checkpoint(self, sd: dict[str, Tensor], *, source: str) -> dict[str, Tensor]:
        """Refuse a checkpoint of another MobileViT version with a message naming both."""
        found = checkpoint_kind(sd)
        mine = (self.cfg.version, self.cfg.attention)
        if found is not None and found != mine:
            from vitlab.checkpoints import CheckpointError

            raise CheckpointError(
                f"{source}: a MobileViT {describe_kind(*found)} checkpoint, but the model is MobileViT "
                f"{describe_kind(*mine)}; build the matching variant "
                f"({', '.join(n for n, c in MOBILEVIT_VARIANTS.items() if (c.version, c.attention) == found)})"
            )
        return sd


def describe_kind(version: str, attention: str) -> str:
    return {
        ("v1", "mhsa"): "v1 (3x3 (kxk) fusion over input and global features)",
        ("v3", "mhsa"): "v3-S/XS/XXS (1x1 fusion over local and global features, residual)",
        ("v2", "separable"): "v2 (separable attention, projection of the global features only)",
        ("v3", "separable"): "v3-0.5/0.75/1.0 (separable attention, projection over global and local, residual)",
    }.get((version, attention), f"{version}/{attention}")


def checkpoint_kind(sd: dict[str, Tensor]) -> tuple[Version, AttentionKind] | None:
    """(version, attention) of a state dict in vitlab's names, read from the first MobileViT block."""
    for i in range(2, 5):
        p = f"stages.{i}.1."
        if f"{p}conv_fusion.conv.weight" in sd:  # multi-head attention blocks
            # v3's local convolution is depthwise (one input channel per filter), v1's a full one; the fusion's
            # kernel does not tell them apart (v1 with conv_kernel_size=1 has a 1x1 fusion too)
            kxk = sd.get(f"{p}conv_kxk.conv.weight")
            if kxk is not None and kxk.shape[0] > 1:
                return ("v3", "mhsa") if kxk.shape[1] == 1 else ("v1", "mhsa")
            return ("v1", "mhsa") if sd[f"{p}conv_fusion.conv.weight"].shape[-1] != 1 else ("v3", "mhsa")
        if f"{p}conv_proj.conv.weight" in sd and f"{p}conv_1x1.weight" in sd:
            d = sd[f"{p}conv_1x1.weight"].shape[0]
            return ("v3", "separable") if sd[f"{p}conv_proj.conv.weight"].shape[1] == 2 * d else ("v2", "separable")
    return None


# ------------------------------------------------------------------------------------------- variants
def _v1(channels: tuple[int, ...], dims: tuple[int, ...], expand: float, final: int, *, v3: bool = False,
        ) -> MobileViTConfig:
    return MobileViTConfig(version="v3" if v3 else "v1", attention="mhsa", stem_chs=16, channels=channels,
                           mv2_depths=(1, 3), transformer_dims=dims, expand_ratio=expand, final_chs=final)


def _v2(multiplier: float, *, v3: bool = False) -> MobileViTConfig:
    # v2 paper section 4 / cvnets config: C = (64, 128, 256, 384, 512) x m, d = C / 2 for stages 3-5
    chs = tuple(int(c * multiplier) for c in (64, 128, 256, 384, 512))
    return MobileViTConfig(version="v3" if v3 else "v2", attention="separable", stem_chs=int(32 * multiplier),
                           channels=chs, mv2_depths=(1, 2), transformer_dims=tuple(make_divisible(c / 2) for c in chs[2:]),
                           expand_ratio=2.0, final_chs=0, crop_pct=0.888)


# v1: Mehta & Rastegari 2021, Table 4 / cvnets config (final expansion 4 x C5, at most 960).
# v3: micronDLA/MobileViTv3 @5e3f490, modes small_v3 / x_small_v3 / xx_small_v3 and width 0.5-1.0.
MOBILEVIT_VARIANTS: dict[str, MobileViTConfig] = {
    "mobilevit_xxs": _v1((16, 24, 48, 64, 80), (64, 80, 96), 2.0, 320),
    "mobilevit_xs": _v1((32, 48, 64, 80, 96), (96, 120, 144), 4.0, 384),
    "mobilevit_s": _v1((32, 64, 96, 128, 160), (144, 192, 240), 4.0, 640),
    **{f"mobilevitv2_{tag}": _v2(m) for tag, m in (("050", 0.5), ("075", 0.75), ("100", 1.0), ("125", 1.25),
                                                     ("150", 1.5), ("175", 1.75), ("200", 2.0))},
    "mobilevitv3_xxs": _v1((16, 24, 64, 80, 128), (64, 80, 96), 2.0, 512, v3=True),
    "mobilevitv3_xs": _v1((32, 48, 96, 160, 160), (96, 120, 144), 4.0, 640, v3=True),
    "mobilevitv3_s": _v1((32, 64, 128, 256, 320), (144, 192, 240), 4.0, 960, v3=True),
    **{f"mobilevitv3_{tag}": _v2(m, v3=True) for tag, m in (("050", 0.5), ("075", 0.75), ("100", 1.0))},
}

for _name, _cfg in MOBILEVIT_VARIANTS.items():
    register_model(ModelEntry(name=_name, family="mobilevit", config=_cfg, build=MobileViT,
                              description=f"MobileViT {_cfg.version} ({_cfg.attention} attention), "
                                          f"channels {_cfg.channels}"))

__all__ = ["MOBILEVIT_VARIANTS", "MobileViT", "MobileViTBlock", "MobileViTConfig", "MobileViTV2Block",
           "checkpoint_kind"]
