"""ResNet (He et al., 2015, arXiv:1512.03385), in two flavours.

* The classic ResNet-18/34/50 with batch norm, used as a convolutional teacher for distillation.
* The variant of BiT (Kolesnikov et al., 2019) and of ViT's hybrid model (Dosovitskiy et al., 2020,
  section 3.1): group norm, weight-standardised convolutions, TF 'SAME' padding; ResNet-50's first
  three stages give the stride-16 feature map that the hybrid ViT cuts into 1x1 "patches".

Both are post-activation (v1.5: the stride sits on the 3x3 convolution; ``stride_in_1x1`` moves it to the
first 1x1, as in the original v1) and share the common classifier surface. Module names follow the stem/stages/blocks layout of ResNetV2 checkpoints.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor, nn

from vitlab.layers import DropPath, MaxPool2dSame, StdConv2d, call_block, run_sequential
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

# a bottleneck block's output width over its inner width (He et al. 2015); timm and torchvision give the inner one
BOTTLENECK_EXPANSION = 4


def expansion(block: str) -> int:
    """A block kind's output width over its inner width: 4 for bottlenecks, 1 for basic blocks."""
    return BOTTLENECK_EXPANSION if block == "bottleneck" else 1


def resnet_name(block: str) -> str:
    """The registered ResNet whose blocks are ``block`` (its layers and widths are given with it)."""
    return "resnet50" if block == "bottleneck" else "resnet18"


@dataclass(frozen=True, kw_only=True)
class ResNetConfig:
    """Args:
    layers: blocks per stage.
    channels: output channels per stage (default: 64 * 2**i, times 4 for bottlenecks).
    norm: "batch" (classic ResNet) or "group" (BiT / ViT hybrid, 32 groups).
    std_conv: weight standardisation on every convolution (BiT / ViT hybrid).
    padding: "symmetric" (PyTorch) or "same" (TensorFlow, needed for JAX checkpoints).
    stem: "imagenet" (7x7 stride-2 convolution and max pool: stride 4) or "small" (one 3x3 stride-1
        convolution, for 32x32 images such as CIFAR, as in He et al. section 4.2).
    num_classes: 0 leaves the model headless (a backbone returning feature maps).
    stride_in_1x1: put a bottleneck's stride on its first 1x1 convolution (the original ResNet, "v1";
        Hugging Face's ``downsample_in_bottleneck``) instead of on its 3x3 convolution (v1.5, the default).
    first_stage_stride: stride of the first stage's first block (1 in He et al.; Hugging Face's
        ``downsample_in_first_stage`` makes it 2).
    """

    layers: tuple[int, ...] = (3, 4, 6, 3)
    block: Literal["basic", "bottleneck"] = "bottleneck"
    channels: tuple[int, ...] | None = None
    stem_chs: int = 64
    norm: Literal["batch", "group"] = "batch"
    std_conv: bool = False
    padding: Literal["symmetric", "same"] = "symmetric"
    stem: Literal["imagenet", "small"] = "imagenet"
    stride_in_1x1: bool = False
    first_stage_stride: Literal[1, 2] = 1
    in_chans: int = 3
    num_classes: int = 1000
    img_size: int | tuple[int, int] = 224
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    mean: tuple[float, ...] = field(default=IMAGENET_MEAN)
    std: tuple[float, ...] = field(default=IMAGENET_STD)
    crop_pct: float = 0.875

    def __post_init__(self) -> None:
        check_config(self)

    @property
    def stage_channels(self) -> tuple[int, ...]:
        if self.channels is not None:
            if len(self.channels) != len(self.layers):
                raise ValueError(f"ResNetConfig: channels {self.channels} and layers {self.layers} differ in length")
            return self.channels
        return tuple(64 * 2**i * expansion(self.block) for i in range(len(self.layers)))

    @property
    def reduction(self) -> int:
        """Total stride of the feature map: the stem's (4 or 1), the first stage's (1 or 2), times 2 for every
        later stage."""
        return (4 if self.stem == "imagenet" else 1) * self.first_stage_stride * 2 ** (len(self.layers) - 1)


def _conv(cfg: ResNetConfig, cin: int, cout: int, k: int, stride: int = 1) -> nn.Module:
    if cfg.std_conv:
        pad: int | str = "same" if cfg.padding == "same" else k // 2
        return StdConv2d(cin, cout, k, stride=stride, padding=pad, eps=1e-8)
    if cfg.padding == "same":
        raise ValueError("ResNetConfig: padding='same' is only supported with std_conv=True")
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False)


def _norm(cfg: ResNetConfig, ch: int) -> nn.Module:
    return nn.GroupNorm(32, ch, eps=1e-5) if cfg.norm == "group" else nn.BatchNorm2d(ch)


class Downsample(nn.Module):
    def __init__(self, cfg: ResNetConfig, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv = _conv(cfg, cin, cout, 1, stride)
        self.norm = _norm(cfg, cout)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x))


class BasicBlock(nn.Module):
    def __init__(self, cfg: ResNetConfig, cin: int, cout: int, stride: int, drop_path: float) -> None:
        super().__init__()
        self.downsample = Downsample(cfg, cin, cout, stride) if stride != 1 or cin != cout else None
        self.conv1 = _conv(cfg, cin, cout, 3, stride)
        self.norm1 = _norm(cfg, cout)
        self.conv2 = _conv(cfg, cout, cout, 3)
        self.norm2 = _norm(cfg, cout)
        self.act = nn.ReLU(inplace=True)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act(self.norm1(self.conv1(x)))
        x = self.norm2(self.conv2(x))
        return self.act(self.drop_path(x) + shortcut)


class Bottleneck(nn.Module):
    def __init__(self, cfg: ResNetConfig, cin: int, cout: int, stride: int, drop_path: float) -> None:
        super().__init__()
        mid = cout // BOTTLENECK_EXPANSION
        self.downsample = Downsample(cfg, cin, cout, stride) if stride != 1 or cin != cout else None
        self.conv1 = _conv(cfg, cin, mid, 1, stride if cfg.stride_in_1x1 else 1)
        self.norm1 = _norm(cfg, mid)
        self.conv2 = _conv(cfg, mid, mid, 3, 1 if cfg.stride_in_1x1 else stride)
        self.norm2 = _norm(cfg, mid)
        self.conv3 = _conv(cfg, mid, cout, 1)
        self.norm3 = _norm(cfg, cout)
        self.act = nn.ReLU(inplace=True)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act(self.norm1(self.conv1(x)))
        x = self.act(self.norm2(self.conv2(x)))
        x = self.norm3(self.conv3(x))
        return self.act(self.drop_path(x) + shortcut)


class Stage(nn.Module):
    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x)


class ResNet(TimmSurface, nn.Module):
    """A ResNet classifier, or a headless backbone when ``num_classes == 0``."""

    num_prefix_tokens = 0

    def __init__(self, cfg: ResNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        stem: OrderedDict[str, nn.Module] = OrderedDict()
        small = cfg.stem == "small"
        stem["conv"] = _conv(cfg, cfg.in_chans, cfg.stem_chs, 3 if small else 7, 1 if small else 2)
        stem["norm"] = _norm(cfg, cfg.stem_chs)
        stem["act"] = nn.ReLU(inplace=True)
        if not small:
            stem["pool"] = MaxPool2dSame(3, 2) if cfg.padding == "same" else nn.MaxPool2d(3, 2, padding=1)
        self.stem = nn.Sequential(stem)
        block_cls = Bottleneck if cfg.block == "bottleneck" else BasicBlock
        total = sum(cfg.layers)
        dpr = [cfg.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        stages, cin, k = [], cfg.stem_chs, 0
        for i, (n, cout) in enumerate(zip(cfg.layers, cfg.stage_channels)):
            blocks = []
            for j in range(n):
                stride = 1 if j > 0 else (2 if i > 0 else cfg.first_stage_stride)
                blocks.append(block_cls(cfg, cin, cout, stride, dpr[k]))
                cin, k = cout, k + 1
            stages.append(Stage(blocks))
        self.stages = nn.Sequential(*stages)
        self.num_features = cin
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(cin, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():  # zero-init the last norm of each residual branch (Goyal et al., 2017)
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.norm3.weight)
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.norm2.weight)

    @property
    def num_classes(self) -> int:
        return getattr(self.head, "out_features", 0)  # 0 for Identity (a quantised Linear has it too)

    @property
    def preprocessing(self) -> Preprocessing:
        size = self.cfg.img_size if isinstance(self.cfg.img_size, tuple) else (self.cfg.img_size,) * 2
        return Preprocessing(input_size=(self.cfg.in_chans, *size), mean=self.cfg.mean,
                             std=self.cfg.std,
                             crop_pct=self.cfg.crop_pct, interpolation="bilinear")

    def no_weight_decay(self) -> set[str]:
        return set()

    def forward_features(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.cfg.in_chans:
            raise ValueError(f"ResNet: expected images of shape (batch, {self.cfg.in_chans}, H, W), "
                             f"got {tuple(x.shape)}")
        return run_sequential(self.stages, self.stem(x), checkpointed=self.grad_checkpointing)  # (B, C, H/r, W/r)

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        *,
        norm: bool = False,
        output_fmt: Literal["NCHW", "NLC"] = "NCHW",
        return_prefix_tokens: bool = False,
    ) -> tuple[Tensor, list[Tensor]]:
        """Final feature map and the chosen features, counted as timm's ResNet counts them: 0 is the stem's
        activation (before its max pool; stride 2, or 1 for the small stem), 1.. the stages' outputs."""
        take = set(take_indices(len(self.stages) + 1, indices))
        feats = []

        def keep(y: Tensor) -> None:
            feats.append(y.flatten(2).transpose(1, 2) if output_fmt == "NLC" else y)

        x = self.stem.act(self.stem.norm(self.stem.conv(x)))
        if 0 in take:
            keep(x)
        if hasattr(self.stem, "pool"):
            x = self.stem.pool(x)
        for i, stage in enumerate(self.stages, start=1):
            x = call_block(stage, x, checkpointed=self.grad_checkpointing)
            if i in take:
                keep(x)
        return x, feats

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.head_drop(x.mean(dim=(2, 3)))  # global average pool: (B, C, H, W) -> (B, C)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def cam_layer(self) -> nn.Module:
        """Grad-CAM's layer: the last stage, whose output is the final (B, C, H/r, W/r) feature map."""
        return self.stages[-1]

    def reset_classifier(self, num_classes: int, global_pool: Literal["avg"] | None = None) -> None:
        """Replace the head by a zero-initialised layer (the pooling, 'avg', is the only one built)."""
        check_global_pool(self, global_pool, ("avg",))
        self.head = zero_head(self.num_features, num_classes)
        record_head(self, num_classes=max(num_classes, 0))


# He et al. 2015, Table 1.
RESNET_VARIANTS: dict[str, ResNetConfig] = {
    "resnet18": ResNetConfig(layers=(2, 2, 2, 2), block="basic"),
    "resnet34": ResNetConfig(layers=(3, 4, 6, 3), block="basic"),
    "resnet50": ResNetConfig(layers=(3, 4, 6, 3), block="bottleneck"),
}

for _name, _cfg in RESNET_VARIANTS.items():
    register_model(ModelEntry(name=_name, family="resnet", config=_cfg, build=ResNet,
                              description=f"ResNet, layers {_cfg.layers}, {_cfg.block} blocks"))
