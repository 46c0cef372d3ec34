"""MLP-Mixer: "MLP-Mixer: An all-MLP Architecture for Vision".

Tolstikhin et al., 2021, arXiv:2105.01601. What differs from ViT:

* no attention at all: each layer is a token-mixing MLP (across patches, shared over channels) and a
  channel-mixing MLP (across channels, shared over patches), each a pre-norm residual branch;
* no class token and no position embedding (token mixing is position-aware by construction); the head
  reads the average of the patch tokens after a final LayerNorm;
* the input size is FIXED: the token-mixing weights are (hidden, number of patches), so a model runs at
  the size it was built for, and a checkpoint loads only into a model of the same grid (there is no
  meaningful way to resample an MLP over positions);
* the original JAX code uses the tanh approximation of GELU (``flax.linen.gelu``), timm the exact one;
  ``gelu`` is a config field that the checkpoint converters set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

from torch import Tensor, nn

from vitlab.layers import PatchEmbed, call_block, check_images, run_sequential
from vitlab.layers.mixer_block import MixerBlock
from vitlab.models.base import (
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


@dataclass(frozen=True, kw_only=True)
class MixerConfig:
    """Args:
    depth: number of Mixer layers.
    tokens_mlp_ratio: token-mixing hidden width D_S as a fraction of ``embed_dim`` (paper: 0.5).
    channels_mlp_ratio: channel-mixing hidden width D_C as a multiple of ``embed_dim`` (paper: 4).
    gelu: "exact" (timm's ``nn.GELU``) or "tanh" (the approximation of the original JAX models).
    drop_path_rate: stochastic-depth rate of every block (the same in all, as timm's MlpMixer; not the
        linear increase with depth of ViT/DeiT).
    """

    img_size: int | tuple[int, int] = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    tokens_mlp_ratio: float = 0.5
    channels_mlp_ratio: float = 4.0
    gelu: Literal["exact", "tanh"] = "exact"
    norm_eps: float = 1e-6
    drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    mean: tuple[float, ...] = field(default=INCEPTION_MEAN)
    std: tuple[float, ...] = field(default=INCEPTION_STD)
    crop_pct: float = 0.875
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"  # the miil weights were trained with bilinear

    def __post_init__(self) -> None:
        if self.gelu not in ("exact", "tanh"):
            raise ValueError(f"MixerConfig: gelu must be 'exact' or 'tanh', got {self.gelu!r}")
        check_config(self)


class MlpMixer(TimmSurface, nn.Module):
    """MLP-Mixer classifier; build with a :class:`MixerConfig` or through ``vitlab.create_model``."""

    token_attention = False  # no attention: rollout is undefined, explain falls back to Grad-CAM
    num_prefix_tokens = 0
    onnx_fixed_size_reason = ("the token-mixing MLPs have one weight per patch of the built size (N = H/P x W/P "
                              "tokens); another input size has another token count, and no other size can be "
                              "exported either (--img-size is refused: the weights fix the size). Export it at its "
                              "own size and resize images to it (its preprocessing does), or train a model at the "
                              "size you need")
    global_pool = "avg"
    position_note = "MLP-Mixer has no position embeddings: its token-mixing MLPs are tied to the patch positions"

    def __init__(self, cfg: MixerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        norm_layer = partial(nn.LayerNorm, eps=cfg.norm_eps)
        act_layer = nn.GELU if cfg.gelu == "exact" else partial(nn.GELU, approximate="tanh")
        self.num_features = self.head_hidden_size = D
        self.patch_embed = PatchEmbed(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                                      embed_dim=D)
        n = self.patch_embed.num_patches
        dpr = [cfg.drop_path_rate] * cfg.depth  # the same rate in every block, as timm's MlpMixer
        self.blocks = nn.Sequential(*[
            MixerBlock(D, num_tokens=n, tokens_hidden=int(cfg.tokens_mlp_ratio * D),
                       channels_hidden=int(cfg.channels_mlp_ratio * D), act_layer=act_layer,
                       norm_layer=norm_layer, drop=cfg.proj_drop_rate, drop_path=dpr[i])
            for i in range(cfg.depth)
        ])
        self.norm = norm_layer(D)
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(D, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self._init_weights()

    # ----------------------------------------------------------------------------------------- set-up
    def _init_weights(self) -> None:
        # the reference JAX initialisation: Xavier-uniform Dense kernels, LeCun-normal stem, tiny MLP
        # biases, zero head
        self.apply(init_linear_jax)
        w = self.patch_embed.proj.weight
        nn.init.trunc_normal_(w, std=math.sqrt(1.0 / w[0].numel()))
        nn.init.zeros_(self.patch_embed.proj.bias)
        for blk in self.blocks:
            for mlp in (blk.mlp_tokens, blk.mlp_channels):
                nn.init.normal_(mlp.fc1.bias, std=1e-6)
                nn.init.normal_(mlp.fc2.bias, std=1e-6)
        if isinstance(self.head, nn.Linear):
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    @property
    def num_classes(self) -> int:
        return getattr(self.head, "out_features", 0)  # 0 for Identity (a quantised Linear has it too)

    @property
    def preprocessing(self) -> Preprocessing:
        h, w = self.patch_embed.img_size
        return Preprocessing(input_size=(self.cfg.in_chans, h, w), mean=self.cfg.mean, std=self.cfg.std,
                             crop_pct=self.cfg.crop_pct, interpolation=self.cfg.interpolation)

    def no_weight_decay(self) -> set[str]:
        return set()  # no position table, no prefix tokens

    def reset_classifier(self, num_classes: int, global_pool: Literal["avg"] | None = None) -> None:
        """Replace the head by a zero-initialised layer (the pooling, 'avg', is the only one built)."""
        check_global_pool(self, global_pool, ("avg",))
        self.head = zero_head(self.num_features, num_classes)
        record_head(self, num_classes=max(num_classes, 0))

    def cam_layer(self) -> nn.Module:
        """Grad-CAM's layer: the last Mixer layer, whose (B, N, D) output tokens lie on the patch grid."""
        return self.blocks[-1]

    def adapt_checkpoint(self, sd: dict[str, Tensor], *, source: str) -> dict[str, Tensor]:
        """Refuse a checkpoint made for another grid with a message that says why (fixed input size)."""
        from vitlab.checkpoints.io import CheckpointError

        w = sd.get("blocks.0.mlp_tokens.fc1.weight")
        n = self.patch_embed.num_patches
        if w is not None and w.ndim == 2 and w.shape[1] != n:
            side = math.isqrt(int(w.shape[1]))
            raise CheckpointError(
                f"{source}: its token-mixing MLPs are for {w.shape[1]} patches ({side}x{side} grid), this model "
                f"has {n} ({self.patch_embed.grid_size[0]}x{self.patch_embed.grid_size[1]}); MLP-Mixer's input "
                f"size is fixed by its weights: build the model at the checkpoint's img_size "
                f"({side * self.patch_embed.patch_size[0]})"
            )
        return sd

    # ------------------------------------------------------------------------------------------ forward
    def _embed(self, x: Tensor) -> Tensor:
        h, w = self.patch_embed.img_size
        if x.ndim == 4 and x.shape[1] == self.cfg.in_chans and tuple(x.shape[-2:]) != (h, w):
            raise ValueError(
                f"MlpMixer: input image is {x.shape[-2]}x{x.shape[-1]} but this model was built for {h}x{w}; "
                f"its token-mixing MLPs are fixed to {self.patch_embed.num_patches} patches. Resize the input "
                f"(or, without pretrained weights, create the model with img_size=({x.shape[-2]}, {x.shape[-1]}))"
            )
        check_images(x, in_chans=self.cfg.in_chans, patch=self.patch_embed.patch_size, expected=(h, w),
                     what="MlpMixer", dynamic=False)
        return self.patch_embed(x)  # (B, N, D)

    def forward_features(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> normalised tokens (B, N, D)."""
        return self.norm(run_sequential(self.blocks, self._embed(x), checkpointed=self.grad_checkpointing))

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        *,
        norm: bool = False,
        output_fmt: Literal["NLC", "NCHW"] = "NLC",
        return_prefix_tokens: bool = False,
    ) -> tuple[Tensor, list[Tensor] | list[tuple[Tensor, Tensor]]]:
        """Run the model and keep the outputs of the chosen Mixer layers (see ViT's for the arguments).

        Mixer has no prefix tokens; with ``return_prefix_tokens`` each prefix part is (B, 0, D).
        """
        if output_fmt not in ("NLC", "NCHW"):
            raise ValueError(f"forward_intermediates: output_fmt must be 'NLC' or 'NCHW', got {output_fmt!r}")
        take = set(take_indices(len(self.blocks), indices))
        B = x.shape[0]
        rows, cols = self.patch_embed.grid_size
        x = self._embed(x)
        results: list = []
        for i, blk in enumerate(self.blocks):
            x = call_block(blk, x, checkpointed=self.grad_checkpointing)
            if i in take:
                y = self.norm(x) if norm else x
                if output_fmt == "NCHW":
                    y = y.reshape(B, rows, cols, -1).permute(0, 3, 1, 2)  # (B, D, rows, cols)
                results.append((y, x[:, :0]) if return_prefix_tokens else y)
        return self.norm(x), results

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Tokens (B, N, D) -> logits (B, K), or the averaged features if ``pre_logits``."""
        x = self.head_drop(x.mean(dim=1))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# ------------------------------------------------------------------------------------------- variants
# Tolstikhin et al. 2021, Table 1: width D, layers, token-mixing D_S = D/2, channel-mixing D_C = 4D.
MIXER_SIZES: dict[str, dict[str, int]] = {
    "s": dict(embed_dim=512, depth=8),
    "b": dict(embed_dim=768, depth=12),
    "l": dict(embed_dim=1024, depth=24),
}
MIXER_PATCH_SIZES = (32, 16)


def _register_mixer_variants() -> None:
    for size, dims in MIXER_SIZES.items():
        for patch in MIXER_PATCH_SIZES:
            name = f"mixer_{size}{patch}_224"
            cfg = MixerConfig(img_size=224, patch_size=patch, **dims)
            register_model(ModelEntry(name=name, family="mixer", config=cfg, build=MlpMixer,
                                      description=f"Mixer-{size.upper()}/{patch} at 224px (fixed input size)"))


_register_mixer_variants()

__all__ = ["MixerConfig", "MlpMixer"]
