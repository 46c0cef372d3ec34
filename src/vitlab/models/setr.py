"""SETR: Rethinking Semantic Segmentation from a Sequence-to-Sequence Perspective with Transformers
(Zheng et al., 2021, arXiv:2012.15840).

A plain ViT / DeiT encoder (any vitlab checkpoint; its position table resampled once to the
segmentation resolution) and one of the paper's three decoders, all reading the blocks' tokens before
the encoder's final norm (each head has its own LayerNorm and drops the prefix tokens):

* ``naive``: LN -> 1x1 conv to 256 + BN + ReLU -> 1x1 conv to the classes -> bilinear to the input.
* ``pup`` (progressive upsampling): four stages of 3x3 conv 256 + BN + ReLU, 2x bilinear after the
  first three; a 1x1 conv to the classes, then the fourth 2x (16x in all, the 16 px patch). On other
  patch sizes the number of 2x steps follows the patch (log2: three stages for 8 px patches), so the
  last stage again runs at half the input resolution (``pup_upsamples`` overrides it).
* ``mla`` (multi-level aggregation): taps at four depths (blocks 6/12/18/24 of 24), each LN -> 1x1
  conv 256 (no bias) + BN + ReLU, summed top-down (deepest first) and each refined by a 3x3 conv;
  per stream 2 x (3x3 conv 128 + BN + ReLU) and 4x bilinear, concatenated -> 3x3 conv to the classes.

Auxiliary heads on intermediate blocks (naive: blocks 10/15/20 of 24; PUP: 10/15/20/24; MLA: each
stream, a 1x1 conv without bias) add their cross entropy with weight 0.4 in training; the heads train at 10x the encoder's
learning rate (``lr_scales``). Block indices scale with the encoder's depth.

``forward(x)`` returns ``{"logits": (B, classes, H, W)}`` and, in training, ``"aux_logits"``: a list.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitlab.layers import resample_pos_embed
from vitlab.models.base import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, TimmSurface
from vitlab.models.dense import drop_attention_pool
from vitlab.models.registry import ModelEntry, check_config, register_model

# SETR's block choices for a 24-block encoder (1-based), scaled to other depths
_NAIVE_AUX = (10, 15, 20)
_PUP_AUX = (10, 15, 20, 24)
_MLA_TAPS = (6, 12, 18, 24)


def scaled_blocks(blocks: tuple[int, ...], depth: int) -> list[int]:
    """0-based indices of the 24-block choices ``blocks`` in an encoder of ``depth`` blocks."""
    return [max(0, min(depth - 1, math.ceil(b * depth / 24) - 1)) for b in blocks]


@dataclass(frozen=True, kw_only=True)
class SETRConfig:
    """Args:
    backbone: a registered ViT / DeiT name; ``backbone_args`` its config overrides.
    decoder: "naive", "pup" or "mla".
    num_classes: segmentation classes (the ignore index, 255 by default, is not one).
    img_size: the segmentation resolution (the encoder's position table is sized for it).
    channels: decoder width (256); ``mla_head_channels``: the MLA head's per-stream width (128).
    aux_weight: weight of each auxiliary head's loss (0.4); ``aux``: build the auxiliary heads.
    head_lr_scale: learning rate of the decoder and auxiliary heads relative to the encoder (10).
    pup_upsamples: PUP's 2x steps (= its conv stages); None: log2 of the encoder's patch size (4 for 16 px).
    """

    backbone: str = "vit_large_patch16_384"
    backbone_args: dict[str, Any] = field(default_factory=dict)
    decoder: Literal["naive", "pup", "mla"] = "naive"
    num_classes: int = 19
    img_size: int | tuple[int, int] = 768
    in_chans: int = 3
    channels: int = 256
    mla_head_channels: int = 128
    aux: bool = True
    aux_weight: float = 0.4
    head_lr_scale: float = 10.0
    pup_upsamples: int | None = None
    ignore_index: int = 255
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self) -> None:
        check_config(self)


def conv_bn_relu(cin: int, cout: int, k: int, *, bias: bool = False) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=bias), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class TokenNorm(nn.Module):
    """LayerNorm over the channels of an NCHW token map (a head's own norm on the encoder's tokens)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _up(x: Tensor, size: tuple[int, int] | None = None, scale: int | None = None, align: bool = False) -> Tensor:
    return F.interpolate(x, size=size, scale_factor=scale, mode="bilinear", align_corners=align)


class NaiveHead(nn.Module):
    def __init__(self, dim: int, channels: int, num_classes: int) -> None:
        super().__init__()
        self.norm = TokenNorm(dim)
        self.conv = conv_bn_relu(dim, channels, 1)
        self.cls = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        return _up(self.cls(self.conv(self.norm(x))), size)


class PUPHead(nn.Module):
    """``upsamples`` stages of 3x3 conv + BN + ReLU, 2x bilinear after each but the last; the classifier,
    then the last 2x (the paper: four, 16x)."""

    def __init__(self, dim: int, channels: int, num_classes: int, upsamples: int = 4) -> None:
        super().__init__()
        self.norm = TokenNorm(dim)
        self.stages = nn.ModuleList([conv_bn_relu(dim, channels, 3)] +
                                    [conv_bn_relu(channels, channels, 3) for _ in range(upsamples - 1)])
        self.cls = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        x = self.norm(x)
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i < len(self.stages) - 1:
                x = _up(x, scale=2)
        return _up(_up(self.cls(x), scale=2), size)


class PUPAuxHead(nn.Module):
    """3x3 conv + BN + ReLU, 4x up, 1x1 conv to the classes, up to the input."""

    def __init__(self, dim: int, channels: int, num_classes: int) -> None:
        super().__init__()
        self.norm = TokenNorm(dim)
        self.conv = conv_bn_relu(dim, channels, 3)
        self.cls = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        return _up(self.cls(_up(self.conv(self.norm(x)), scale=4)), size)


class MLANeck(nn.Module):
    """Four taps -> LN -> 1x1 conv (no bias) + BN + ReLU -> top-down cumulative sums -> 3x3 conv each."""

    def __init__(self, dim: int, channels: int) -> None:
        super().__init__()
        self.norms = nn.ModuleList(TokenNorm(dim) for _ in range(4))
        self.lateral = nn.ModuleList(conv_bn_relu(dim, channels, 1) for _ in range(4))
        self.smooth = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in range(4))

    def forward(self, taps: list[Tensor]) -> list[Tensor]:
        lat = [conv(norm(t)) for norm, conv, t in zip(self.norms, self.lateral, taps)]
        streams, acc = [], None
        for i in reversed(range(4)):  # deepest first: p5, p5+p4, p5+p4+p3, ...
            acc = lat[i] if acc is None else acc + lat[i]
            streams.append(self.smooth[i](acc))
        return streams[::-1]  # back in tap order


class MLAHead(nn.Module):
    def __init__(self, channels: int, head_channels: int, num_classes: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Sequential(conv_bn_relu(channels, head_channels, 3),
                                                 conv_bn_relu(head_channels, head_channels, 3)) for _ in range(4))
        self.cls = nn.Conv2d(4 * head_channels, num_classes, 3, padding=1)

    def forward(self, streams: list[Tensor], size: tuple[int, int]) -> Tensor:
        x = torch.cat([_up(h(s), scale=4, align=True) for h, s in zip(self.heads, streams)], dim=1)
        return _up(self.cls(x), size)


class MLAAuxHead(nn.Module):
    """One MLA stream (``channels`` wide) -> 1x1 conv to the classes, no bias -> up to the input, as the official
    ``VIT_MLA_AUXIHead`` with 256 input channels (its ``aux``)."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.cls = nn.Conv2d(channels, num_classes, 1, bias=False)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        return _up(self.cls(x), size)


class SETR(TimmSurface, nn.Module):
    """SETR: ``forward(images) -> {"logits": (B, classes, H, W)[, "aux_logits": [...]]}``."""

    num_prefix_tokens = 0
    classifier_names = ("decode_head", "aux_heads")
    classifier_name = "decode_head"
    task = "segmentation"

    def __init__(self, cfg: SETRConfig) -> None:
        super().__init__()
        from vitlab.models.factory import create_model

        self.cfg = cfg
        args = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.backbone_args.items()}
        self.backbone = create_model(cfg.backbone, num_classes=0, img_size=cfg.img_size, in_chans=cfg.in_chans,
                                     **args)
        if not hasattr(self.backbone, "blocks"):
            raise ValueError(f"SETRConfig: backbone {cfg.backbone!r} has no plain sequence of blocks (use a ViT/DeiT)")
        # the heads read the blocks' tokens before the final norm and normalise them themselves
        self.backbone.norm = nn.Identity()
        drop_attention_pool(self.backbone)
        if getattr(self.backbone.patch_embed, "dynamic_option", False) is True:
            self.backbone.patch_embed.dynamic_option = "backbone_args={'dynamic_img_size': True}"
        depth, dim, C, K = len(self.backbone.blocks), self.backbone.num_features, cfg.channels, cfg.num_classes
        if cfg.decoder == "naive":
            self.main_index = [depth - 1]
            self.aux_indices = scaled_blocks(_NAIVE_AUX, depth) if cfg.aux else []
            self.decode_head = NaiveHead(dim, C, K)
            self.aux_heads = nn.ModuleList(NaiveHead(dim, C, K) for _ in self.aux_indices)
        elif cfg.decoder == "pup":
            self.main_index = [depth - 1]
            self.aux_indices = scaled_blocks(_PUP_AUX, depth) if cfg.aux else []
            ups = cfg.pup_upsamples
            if ups is None:
                ups = max(1, round(math.log2(max(self.backbone.patch_embed.patch_size))))
            if ups < 1:
                raise ValueError(f"SETRConfig: pup_upsamples must be at least 1, got {ups}")
            self.decode_head = PUPHead(dim, C, K, ups)
            self.aux_heads = nn.ModuleList(PUPAuxHead(dim, C, K) for _ in self.aux_indices)
        elif cfg.decoder == "mla":
            self.main_index = scaled_blocks(_MLA_TAPS, depth)
            self.aux_indices = []
            self.neck = MLANeck(dim, C)
            self.decode_head = MLAHead(C, cfg.mla_head_channels, K)
            self.aux_heads = nn.ModuleList(MLAAuxHead(C, K) for _ in range(4 if cfg.aux else 0))
        else:
            raise ValueError(f"SETRConfig: decoder must be 'naive', 'pup' or 'mla', got {cfg.decoder!r}")
        self.num_features = dim

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    @property
    def preprocessing(self) -> Preprocessing:
        size = self.cfg.img_size if isinstance(self.cfg.img_size, tuple) else (self.cfg.img_size,) * 2
        return Preprocessing(input_size=(self.cfg.in_chans, *size), mean=self.cfg.mean, std=self.cfg.std,
                             crop_pct=1.0, interpolation="bilinear")

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}

    @property
    def onnx_fixed_size_reason(self) -> str | None:
        """Why a dynamic-size ONNX export is refused (None: it is supported)."""
        from vitlab.models.dense import backbone_fixed_size_reason

        return backbone_fixed_size_reason(self)

    @property
    def input_size_multiple(self) -> tuple[int, int]:
        return tuple(self.backbone.patch_embed.patch_size)

    def lr_scales(self) -> dict[str, float]:
        s = self.cfg.head_lr_scale
        return {"decode_head.": s, "aux_heads.": s, "neck.": s}

    def adapt_checkpoint(self, sd: dict[str, Tensor], *, source: str) -> dict[str, Tensor]:
        """A checkpoint trained at another resolution: resample the encoder's position table."""
        k = "backbone.pos_embed"
        target = self.backbone.pos_embed if hasattr(self.backbone, "pos_embed") else None
        if k in sd and target is not None and sd[k].shape != target.shape and sd[k].shape[-1] == target.shape[-1]:
            prefix = getattr(self.backbone, "pos_embed_prefix", self.backbone.num_prefix_tokens)
            side = math.isqrt(sd[k].shape[1] - prefix)
            sd = {**sd, k: resample_pos_embed(sd[k], self.backbone.patch_embed.grid_size, old_size=(side, side),
                                              num_prefix_tokens=prefix)}
        return sd

    def forward(self, x: Tensor) -> dict[str, Tensor | list[Tensor]]:
        size = (x.shape[-2], x.shape[-1])
        want = sorted(set(self.main_index) | set(self.aux_indices))
        _, maps = self.backbone.forward_intermediates(x, indices=want, norm=False, output_fmt="NCHW")
        by_index = dict(zip(want, maps))
        out: dict[str, Any] = {}
        if self.cfg.decoder == "mla":
            streams = self.neck([by_index[i] for i in self.main_index])
            out["logits"] = self.decode_head(streams, size)
            if self.training and len(self.aux_heads):
                out["aux_logits"] = [h(s, size) for h, s in zip(self.aux_heads, streams)]
        else:
            out["logits"] = self.decode_head(by_index[self.main_index[0]], size)
            if self.training and len(self.aux_heads):
                out["aux_logits"] = [h(by_index[i], size) for h, i in zip(self.aux_heads, self.aux_indices)]
        return out


def segmentation_loss(out: dict[str, Any], target: Tensor, *, aux_weight: float = 0.4,
                      ignore_index: int = 255, normaliser: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Cross entropy of the main head plus ``aux_weight`` x each auxiliary head's (pixels at
    ``ignore_index`` do not count): each summed over the labelled pixels and divided by ``normaliser``, by
    default their number in ``target`` (the mean; 0 where no pixel is labelled). The trainer gives the count
    of the whole global batch, so that accumulation and DDP equal one batch."""
    if normaliser is None:
        normaliser = (target != ignore_index).sum().clamp_min(1)

    def ce(logits: Tensor) -> Tensor:
        return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum") / normaliser

    main = ce(out["logits"])
    parts = {"loss_main": main.detach()}
    total = main
    for i, a in enumerate(out.get("aux_logits", [])):
        la = ce(a)
        parts[f"loss_aux{i}"] = la.detach()
        total = total + aux_weight * la
    return total, parts


SETR_VARIANTS: dict[str, SETRConfig] = {}
for _dec in ("naive", "pup", "mla"):
    # the paper's models: ViT-L/16 (from the 384 ImageNet-21k checkpoint) at Cityscapes' 768 crops
    SETR_VARIANTS[f"setr_{_dec}_vit_large_patch16"] = SETRConfig(decoder=_dec)
    # a small ViT for CPU-sized work (not in the paper)
    SETR_VARIANTS[f"setr_{_dec}_vit_small_patch16"] = SETRConfig(backbone="vit_small_patch16_224", decoder=_dec,
                                                                 img_size=224, num_classes=21)

for _name, _cfg in SETR_VARIANTS.items():
    register_model(ModelEntry(name=_name, family="setr", config=_cfg, build=SETR, task="segmentation",
                              description=f"SETR-{_cfg.decoder} segmenter on {_cfg.backbone}, {_cfg.img_size} px"))
