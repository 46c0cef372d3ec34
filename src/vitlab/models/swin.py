"""Swin Transformer v1 and v2: hierarchical vision transformers with shifted windows.

v1: Liu et al. 2021, "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows",
arXiv:2103.14030. v2: Liu et al. 2022, "Swin Transformer V2: Scaling Up Capacity and Resolution",
arXiv:2111.09883.

What differs from ViT: 4 x 4 patches (stride 4) normalised after embedding, no class token and no
absolute position table; four stages whose blocks attend inside M x M windows (with a relative
position bias), every second block on windows shifted by M/2 (cyclic roll + mask); between stages a
2 x 2 patch merging halves the map and doubles the width (strides 4, 8, 16, 32); final LayerNorm,
global average pooling, linear head. A stage whose map is no larger than the window uses the whole
map as its window and no shift (so the last stage of every released model has no shifted windows).

v2 changes the block to post-normalisation (``x + norm(attn(x))``), the attention to scaled cosine
attention with a learned, clamped per-head temperature, the bias to a continuous one (an MLP on
log-spaced offsets, which transfers to other windows through ``pretrained_window_sizes``), and the
patch merging to reduce before it normalises.

Module names follow timm (``layers.i.downsample`` at the START of stage i > 0, ``layers.i.blocks.j``),
except the head, which is a plain ``head`` Linear as everywhere in vitlab. Token maps stay (B, H, W, C)
inside the model; ``forward_features`` returns that normalised map.

Geometry (window, shift) of each block is fixed when the model is built, from ``img_size``, as timm
does. With ``dynamic_img_size=True`` inputs of other sizes are accepted: the image is padded to a
multiple of the patch size and every block pads its (rolled) map at the bottom / right to a multiple
of its window (the shift mask is then built for that padded size, cached per size). The padding and
the mask are expressed in traceable operations, so a dynamic-size ONNX export computes them per input
(``vitlab.layers.tracing_any_size``).

Where a window does not divide the map, the order of roll and pad matters: timm (and vitlab by default)
rolls the map, then pads it; Hugging Face's ``SwinLayer`` / ``Swinv2Layer`` (and the Swin detection
code they follow) pad first and roll the padded map, so the padding cells move to the top / left with
the shift. ``pad_before_shift=True`` computes the latter; the Hugging Face converter sets it. Both
agree wherever the windows divide the map (every released classifier at its own resolution).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitlab.layers import (
    DropPath,
    Mlp,
    PatchEmbed,
    is_tracing_any_size,
    run_sequential,
    to_2tuple,
    trunc_normal_linears,
)
from vitlab.layers.patch_merging import PatchMerging
from vitlab.layers.window_attention import (
    WindowAttention,
    WindowAttentionV2,
    resample_rel_pos_table,
    shift_attention_mask,
    window_partition,
    window_reverse,
)
from vitlab.layers.window_geometry import WindowGeometry
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

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class SwinConfig:
    """Args:
    version: 1 (arXiv:2103.14030) or 2 (arXiv:2111.09883).
    window_size: window per stage (an int for all stages), clamped to maps no larger than it.
    pretrained_window_sizes: v2 only: the window each stage was pre-trained with (0: its own window);
        it scales the coordinates of the continuous position bias.
    dynamic_img_size: accept any input size (padding as described in the module docstring).
    rel_pos_resample: how ``adapt_checkpoint`` resamples v1 bias tables to another window: "timm"
        (timm's checkpoint filter, the BEiT geometric-progression interpolation) or "bicubic" (Microsoft's).
    pad_before_shift: on maps that the window does not divide, pad to a multiple of the window before the
        cyclic shift and roll the padded map (Hugging Face's order) instead of rolling, then padding (timm's);
        the shift mask is built on the padded size either way. Set for Hugging Face checkpoints.
    embed_norm_eps: epsilon of the patch-embedding and patch-merging LayerNorms; None: ``norm_eps``.
        transformers builds those with nn.LayerNorm's 1e-5 whatever its ``layer_norm_eps``.
    """

    version: Literal[1, 2] = 1
    img_size: int | tuple[int, int] = 224
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int | tuple[int, ...] = 7
    pretrained_window_sizes: tuple[int, ...] | None = None
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    norm_eps: float = 1e-5
    drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    dynamic_img_size: bool = False
    rel_pos_resample: Literal["timm", "bicubic"] = "timm"
    pad_before_shift: bool = False
    embed_norm_eps: float | None = None
    mean: tuple[float, ...] = field(default=IMAGENET_MEAN)
    std: tuple[float, ...] = field(default=IMAGENET_STD)
    crop_pct: float | None = None

    def __post_init__(self) -> None:
        for name in ("depths", "num_heads", "window_size", "pretrained_window_sizes", "img_size", "mean", "std"):
            value = getattr(self, name)
            if isinstance(value, list):  # from JSON (recipes, saved configs)
                object.__setattr__(self, name, tuple(value))
        check_config(self)
        n = len(self.depths)
        if len(self.num_heads) != n:
            raise ValueError(f"SwinConfig: depths {self.depths} and num_heads {self.num_heads} differ in length")
        if not isinstance(self.window_size, int) and len(self.window_size) != n:
            raise ValueError(f"SwinConfig: window_size {self.window_size} needs one entry per stage ({n})")
        if self.pretrained_window_sizes is not None and len(self.pretrained_window_sizes) != n:
            raise ValueError(f"SwinConfig: pretrained_window_sizes needs one entry per stage ({n})")
        if self.embed_norm_eps is not None and not self.embed_norm_eps > 0:
            raise ValueError(f"SwinConfig: embed_norm_eps must be > 0 (or None), got {self.embed_norm_eps!r}")
        if self.version not in (1, 2):
            raise ValueError(f"SwinConfig: version must be 1 or 2, got {self.version!r}")
        for i, h in enumerate(self.num_heads):
            if (self.embed_dim * 2**i) % h:
                raise ValueError(f"SwinConfig: stage {i} width {self.embed_dim * 2**i} is not divisible by {h} heads")

    def windows(self) -> tuple[int, ...]:
        return (self.window_size,) * len(self.depths) if isinstance(self.window_size, int) else tuple(self.window_size)


def block_geometry(size: tuple[int, int], window: int, shifted: bool) -> tuple[tuple[int, int], tuple[int, int]]:
    """(window, shift) of a block on a map of ``size``: per axis, a map no larger than the window is one
    window and has no shift (the reference code's ``<=``)."""
    win = tuple(s if s <= window else window for s in size)
    shift = tuple(0 if (not shifted or s <= w) else w // 2 for s, w in zip(size, win))
    return win, shift  # type: ignore[return-value]


class SwinPatchEmbed(PatchEmbed):
    """Stride-P convolution + LayerNorm, returning the (B, H/P, W/P, C) map. With ``pad`` it pads the image
    at the bottom / right to a multiple of P instead of refusing it."""

    def __init__(self, *, norm_layer: partial, pad: bool, **kw) -> None:
        super().__init__(flatten=False, **kw)
        self.pad = pad
        self.norm = norm_layer(self.proj.out_channels)

    def forward(self, x: Tensor) -> Tensor:
        if self.pad and x.ndim == 4:
            ph, pw = self.patch_size
            H, W = x.shape[-2:]  # padded up to multiples of the patch (ceil-divisions: see SwinBlock)
            x = F.pad(x, (0, (W + pw - 1) // pw * pw - W, 0, (H + ph - 1) // ph * ph - H))
        return self.norm(super().forward(x).permute(0, 2, 3, 1))  # (B, C, h, w) -> (B, h, w, C)


class SwinBlock(nn.Module):
    """One (shifted-)window transformer block on a (B, H, W, C) map.

    v1 is pre-norm: ``x + attn(norm1(x))``; v2 post-norm on the branch: ``x + norm1(attn(x))``.
    Records ``last_geometry`` (a :class:`WindowGeometry`) on every forward.
    ``pad_before_shift``: see :class:`SwinConfig`.
    """

    def __init__(self, dim: int, *, num_heads: int, size: tuple[int, int], window: int, shifted: bool,
                 version: int, mlp_ratio: float, qkv_bias: bool, proj_drop: float, attn_drop: float,
                 drop_path: float, norm_layer: partial, pretrained_window: int = 0,
                 pad_before_shift: bool = False) -> None:
        super().__init__()
        self.version = version
        self.pad_before_shift = pad_before_shift
        self.window, self.shift = block_geometry(size, window, shifted)
        self.norm1 = norm_layer(dim)
        if version == 1:
            self.attn: WindowAttention | WindowAttentionV2 = WindowAttention(
                dim, window=self.window, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                proj_drop=proj_drop)
        else:
            self.attn = WindowAttentionV2(
                dim, window=self.window, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                proj_drop=proj_drop, pretrained_window=to_2tuple(pretrained_window))
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path2 = DropPath(drop_path)
        self.last_geometry: WindowGeometry | None = None
        self._masks: dict[tuple, Tensor] = {}
        # The mask at the built size is a (non-persistent) buffer, so that torch.compile with freezing folds it,
        # and the bias it joins, into one constant: computed in the graph, it cost compiled Swin-T 1.2x at batch
        # 16. Other sizes use the cache below.
        (wh, ww), (H, W) = self.window, size
        self._built_padded = ((H + wh - 1) // wh * wh, (W + ww - 1) // ww * ww)
        self.register_buffer("shift_mask", shift_attention_mask(self._built_padded, self.window, self.shift)
                             if any(self.shift) else None, persistent=False)

    def _init_buffers(self) -> None:
        self._masks.clear()
        if self.shift_mask is not None:
            device = self.shift_mask.device
            self.shift_mask = shift_attention_mask(self._built_padded, self.window, self.shift).to(device)

    def _mask(self, padded: tuple[int, int], device: torch.device) -> Tensor | None:
        if not any(self.shift):
            return None
        # symbolic sizes: the mask's ops go into the graph (no cache keyed by them). At the built size: the
        # buffer. Other sizes under torch.compile: in the graph too, since a cache that the first compiled call
        # fills fails dynamo's guard on the next call, a full recompile.
        if is_tracing_any_size():
            return shift_attention_mask(padded, self.window, self.shift, device)
        if padded == self._built_padded and self.shift_mask is not None:
            return self.shift_mask
        if torch.compiler.is_compiling():
            return shift_attention_mask(padded, self.window, self.shift, device)
        key = (padded, device)
        mask = self._masks.get(key)
        if mask is None:
            if len(self._masks) >= 8:  # dynamic sizes: keep a few
                self._masks.clear()
            mask = self._masks[key] = shift_attention_mask(padded, self.window, self.shift, device)
        return mask

    def _window_attention(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape
        (wh, ww), (sh, sw) = self.window, self.shift
        # while an exporter traces any size, H and W are symbolic: pad and crop unconditionally (by zero
        # at sizes that fit, an exact identity) instead of branching on the traced size
        any_size = is_tracing_any_size()
        # timm's order rolls the (H, W) map, then pads; Hugging Face's pads, then rolls the (Hp, Wp) map
        roll_first = bool(sh or sw) and not self.pad_before_shift
        roll_padded = bool(sh or sw) and self.pad_before_shift
        if roll_first:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        # windows per axis, the last one padded; written as ceil-divisions (not (-H) % wh) so that symbolic
        # sizes stay short expressions the tracer can reason about
        Hp, Wp = (H + wh - 1) // wh * wh, (W + ww - 1) // ww * ww
        padded = any_size or Hp != H or Wp != W
        if padded:
            x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))
        if roll_padded:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))  # (B, Hp, Wp, C)
        if not any_size:
            self.last_geometry = WindowGeometry((H, W), (Hp, Wp), self.window, self.shift)
        windows = self.attn(window_partition(x, self.window), self._mask((Hp, Wp), x.device))
        x = window_reverse(windows, self.window, (Hp, Wp))
        if roll_padded:
            x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
        if any_size:  # gathered, not sliced: a view of the padded map would make the tracer fix its strides
            x = x.index_select(1, torch.arange(H, device=x.device)).index_select(2, torch.arange(W, device=x.device))
        elif padded:
            x = x[:, :H, :W]
        if roll_first:
            x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
        return x

    def rolls_padding(self) -> bool:
        """Whether the last forward rolled padding cells into the map (``pad_before_shift`` on a map the window
        does not divide): a layout that ``WindowGeometry``, which describes timm's order, cannot express."""
        g = self.last_geometry
        return self.pad_before_shift and g is not None and any(g.shift) and tuple(g.padded) != tuple(g.size)

    def forward(self, x: Tensor) -> Tensor:
        if self.version == 1:
            x = x + self.drop_path1(self._window_attention(self.norm1(x)))
            return x + self.drop_path2(self.mlp(self.norm2(x)))
        x = x + self.drop_path1(self.norm1(self._window_attention(x)))
        return x + self.drop_path2(self.norm2(self.mlp(x)))


class SwinStage(nn.Module):
    grad_checkpointing = False  # set by the model's set_grad_checkpointing
    """Patch merging (stages after the first), then the blocks, alternately without and with shift."""

    def __init__(self, dim: int, out_dim: int, *, size: tuple[int, int], depth: int, downsample: bool,
                 window: int, drop_path: list[float], version: int, norm_layer: partial,
                 merge_norm_layer: partial | None = None, pretrained_window: int = 0, **block_kw) -> None:
        super().__init__()
        self.downsample = (PatchMerging(dim, out_dim=out_dim, norm_first=version == 1,
                                        norm_layer=merge_norm_layer or norm_layer)
                           if downsample else nn.Identity())
        self.size = ((size[0] + 1) // 2, (size[1] + 1) // 2) if downsample else size  # the blocks' map
        self.blocks = nn.Sequential(*[
            SwinBlock(out_dim, size=self.size, window=window, shifted=i % 2 == 1, version=version,
                      drop_path=drop_path[i], norm_layer=norm_layer, pretrained_window=pretrained_window, **block_kw)
            for i in range(depth)
        ])

    def forward(self, x: Tensor) -> Tensor:
        return run_sequential(self.blocks, self.downsample(x), checkpointed=self.grad_checkpointing)


class SwinTransformer(TimmSurface, nn.Module):
    """Swin v1 / v2 classifier; build with a :class:`SwinConfig` or through ``vitlab.create_model``."""

    token_attention = False  # attention is per window: the generic token rollout does not apply
    cam_channels_last = True  # cam_layer() outputs (B, H, W, C)
    num_prefix_tokens = 0

    def __init__(self, cfg: SwinConfig) -> None:
        super().__init__()
        self.cfg = cfg
        norm_layer = partial(nn.LayerNorm, eps=cfg.norm_eps)
        # the patch-embedding and patch-merging norms
        embed_norm = partial(nn.LayerNorm, eps=cfg.norm_eps if cfg.embed_norm_eps is None else cfg.embed_norm_eps)
        n = len(cfg.depths)
        dims = [cfg.embed_dim * 2**i for i in range(n)]
        self.num_features = self.head_hidden_size = dims[-1]
        self.dynamic_img_size = cfg.dynamic_img_size
        self.patch_embed = SwinPatchEmbed(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                                          embed_dim=cfg.embed_dim, strict_img_size=not cfg.dynamic_img_size,
                                          norm_layer=embed_norm, pad=cfg.dynamic_img_size)
        total = sum(cfg.depths)  # drop-path rate grows linearly over all blocks
        rates = [cfg.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        dpr = [rates[sum(cfg.depths[:i]):sum(cfg.depths[:i + 1])] for i in range(n)]
        pretrained = cfg.pretrained_window_sizes or (0,) * n
        size = tuple(self.patch_embed.grid_size)
        stages = []
        for i in range(n):
            stage = SwinStage(
                dims[max(i - 1, 0)], dims[i], size=size, depth=cfg.depths[i], downsample=i > 0,
                window=cfg.windows()[i], drop_path=dpr[i], version=cfg.version, norm_layer=norm_layer,
                merge_norm_layer=embed_norm,
                pretrained_window=pretrained[i], num_heads=cfg.num_heads[i], mlp_ratio=cfg.mlp_ratio,
                qkv_bias=cfg.qkv_bias, proj_drop=cfg.proj_drop_rate, attn_drop=cfg.attn_drop_rate,
                pad_before_shift=cfg.pad_before_shift)
            size = stage.size
            stages.append(stage)
        self.layers = nn.Sequential(*stages)
        self.norm = norm_layer(self.num_features)
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(self.num_features, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self._init_weights()

    # ----------------------------------------------------------------------------------------- set-up
    def _init_weights(self) -> None:
        trunc_normal_linears(self, skip=self.head)
        if self.cfg.version == 2:  # post-norm branches start at zero (the reference code's res-post-norm init)
            for stage in self.layers:
                for blk in stage.blocks:
                    for norm in (blk.norm1, blk.norm2):
                        nn.init.zeros_(norm.weight)
                        nn.init.zeros_(norm.bias)
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    @property
    def num_classes(self) -> int:
        return getattr(self.head, "out_features", 0)  # 0 for Identity (a quantised Linear has it too)

    @property
    def preprocessing(self) -> Preprocessing:
        h, w = self.patch_embed.img_size
        crop = self.cfg.crop_pct if self.cfg.crop_pct is not None else (0.9 if max(h, w) <= 256 else 1.0)
        return Preprocessing(input_size=(self.cfg.in_chans, h, w), mean=self.cfg.mean, std=self.cfg.std,
                             crop_pct=crop, interpolation="bicubic")

    def no_weight_decay(self) -> set[str]:
        """The relative-position tables, v2's position MLP and temperatures (as timm)."""
        keys = ("relative_position_bias_table", "cpb_mlp", "logit_scale")
        return {n for n, _ in self.named_parameters() if any(k in n for k in keys)}

    def reset_classifier(self, num_classes: int, global_pool: Literal["avg"] | None = None) -> None:
        """Replace the head by a zero-initialised layer (the pooling, 'avg', is the only one built)."""
        check_global_pool(self, global_pool, ("avg",))
        self.head = zero_head(self.num_features, num_classes)
        record_head(self, num_classes=max(num_classes, 0))

    input_size_options = ("window_size", "window_ratio", "always_partition")

    def _input_size_changes(self, img_size: int | tuple[int, int] | None, patch_size: int | None, *,
                            window_size: int | Sequence[int | Sequence[int]] | None = None,
                            window_ratio: int | Sequence[int] | None = None, always_partition: bool | None = None,
                            ) -> tuple[dict[str, Any], dict[str, Tensor] | None, dict[str, Any]]:
        """timm's rule for the windows: ``window_size`` (an int or (h, w) for every stage, or one per stage), else
        ``window_ratio`` (the patch grid, before the stages' downsampling, divided by it), else each stage's window
        scaled with the patch grid (``w * new_grid // reference_grid``; the reference is the windows and grid
        of the model as built, or of the last explicit window). Windows are square; a stage's window is clamped
        to a map no larger than it, as at construction (timm's ``always_partition=False``)."""
        if always_partition:
            raise ValueError("set_input_size: always_partition=True is not supported: vitlab's Swin clamps a "
                             "window to a map no larger than it (the reference code's rule; always_partition=False)")
        changes, state, attrs = super()._input_size_changes(img_size, patch_size)
        cfg, n = self.cfg, len(self.cfg.depths)
        img = to_2tuple(changes.get("img_size", cfg.img_size))
        patch = changes.get("patch_size", cfg.patch_size)
        grid = (img[0] // patch, img[1] // patch)
        if window_size is not None:
            spec = window_size
            if not isinstance(spec, (list, tuple)) or (len(spec) == 2 and not isinstance(spec[0], (list, tuple))):
                spec = (spec,) * n  # one window (an int or (h, w)) for every stage, as timm reads it
            if len(spec) != n:
                raise ValueError(f"set_input_size: window_size {window_size!r} needs one entry per stage ({n})")
            windows = [_pair(w, "window_size") for w in spec]
            reference = (tuple(windows), grid)
        elif window_ratio is not None:
            ratios = (window_ratio,) * n if not isinstance(window_ratio, (list, tuple)) else tuple(window_ratio)
            if len(ratios) != n or not all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in ratios):
                raise ValueError(f"set_input_size: window_ratio must be a positive int or one per stage ({n}), "
                                 f"got {window_ratio!r}")
            windows = [tuple(max(1, g // r) for g in grid) for r in ratios]
            reference = (tuple(windows), grid)
        else:
            reference = self.__dict__.get("window_reference") or (
                tuple((w, w) for w in cfg.windows()), tuple(self.patch_embed.grid_size))
            ref_windows, ref_grid = reference
            windows = [tuple(max(1, w * g // r) for w, g, r in zip(ws, grid, ref_grid)) for ws in ref_windows]
        if any(h != w for h, w in windows):
            raise ValueError(f"set_input_size: window_size: vitlab's Swin has square windows; this gives "
                             f"{[tuple(w) for w in windows]} (for a grid of {grid[0]}x{grid[1]} patches): pass "
                             f"window_size= with square windows")
        sides = tuple(h for h, _ in windows)
        new_window = sides[0] if len(set(sides)) == 1 and isinstance(cfg.window_size, int) else sides
        if new_window != cfg.window_size:
            changes["window_size"] = new_window
        return changes, state, {**attrs, "window_reference": reference}

    def blocks_in_order(self) -> list[SwinBlock]:
        return [blk for stage in self.layers for blk in stage.blocks]

    def analysis_modules(self) -> list[nn.Module]:
        """The windowed blocks and patch-merging modules, in execution order.

        Refused (ValueError) after a forward in which a ``pad_before_shift`` block rolled padding into its map:
        the window analysis maps tokens in timm's roll-then-pad order and would misplace them."""
        odd = [i for i, blk in enumerate(self.blocks_in_order()) if blk.rolls_padding()]
        if odd:
            raise ValueError(
                f"SwinTransformer: window analysis is not available for pad_before_shift=True (Hugging Face's "
                f"pad-then-roll order) when a window does not divide the map: block(s) {odd} padded a shifted map "
                f"at this input size; use an input size whose maps the windows divide")
        out: list[nn.Module] = []
        for stage in self.layers:
            if isinstance(stage.downsample, PatchMerging):
                out.append(stage.downsample)
            out.extend(stage.blocks)
        return out

    def cam_layer(self) -> nn.Module:
        """The last stage: its output is the last spatial map, (B, H, W, C)."""
        return self.layers[-1]

    def decay_layer_id(self, name: str) -> int:
        """Layer of a parameter for layer-wise lr decay: patch embedding 0, blocks 1..L in execution order
        (a stage's patch merging with its first block), final norm and head L + 1."""
        if name.startswith("patch_embed."):
            return 0
        parts = name.split(".")
        if parts[0] == "layers":
            stage = int(parts[1])
            first = sum(self.cfg.depths[:stage])
            return first + 1 + (int(parts[3]) if parts[2] == "blocks" else 0)
        return self.num_decay_layers() + 1

    def num_decay_layers(self) -> int:
        return sum(self.cfg.depths)

    # ------------------------------------------------------------------------------------------ forward
    def forward_features(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> the normalised last-stage map (B, H/32, W/32, C_last) (channels last)."""
        return self.norm(self.layers(self.patch_embed(x)))

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        *,
        norm: bool = False,
        output_fmt: Literal["NCHW", "NHWC", "NLC"] = "NCHW",
        return_prefix_tokens: bool = False,
    ) -> tuple[Tensor, list[Tensor] | list[tuple[Tensor, Tensor]]]:
        """Run the model and keep the outputs of the chosen stages (indices count stages, not blocks).

        With the defaults: the four stage maps (B, C_i, H/s, W/s) at strides 4, 8, 16, 32 (x patch/4).
        ``norm`` applies the final norm to the last stage only (it is sized for it). There are no prefix
        tokens: with ``return_prefix_tokens`` each entry is (map, an empty (B, 0, C) tensor).

        Returns:
            (the output of forward_features, the intermediates).
        """
        if output_fmt not in ("NCHW", "NHWC", "NLC"):
            raise ValueError(f"forward_intermediates: output_fmt must be 'NCHW', 'NHWC' or 'NLC', got {output_fmt!r}")
        take = set(take_indices(len(self.layers), indices))
        x = self.patch_embed(x)
        results: list = []
        last = len(self.layers) - 1
        for i, stage in enumerate(self.layers):
            x = stage(x)
            if i in take:
                y = self.norm(x) if norm and i == last else x
                if output_fmt == "NCHW":
                    y = y.permute(0, 3, 1, 2)
                elif output_fmt == "NLC":
                    y = y.flatten(1, 2)
                results.append((y, y.new_zeros(y.shape[0], 0, x.shape[-1])) if return_prefix_tokens else y)
        return self.norm(x), results

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(B, H, W, C) map -> logits (B, K), or the pooled features if ``pre_logits``."""
        x = self.head_drop(x.mean(dim=(1, 2)))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    # ------------------------------------------------------------------------------------- checkpoints
    def adapt_checkpoint(self, sd: dict[str, Tensor], *, source: str) -> dict[str, Tensor]:
        """Fit window-dependent tensors to this model: v1 bias tables are resampled to each block's window;
        index, mask and v2 coordinate tables are recomputed by the model, so dropped."""
        out = {}
        target = self.state_dict()
        resampled: dict[tuple[tuple[int, int], tuple[int, int]], int] = {}  # (file's window, model's) -> blocks
        stage_of = {id(blk.attn): i for i, stage in enumerate(self.layers) for blk in stage.blocks}
        file_windows: dict[int, int] = {}  # stage -> the file's window, where it differs from this model's
        stage_pair: dict[int, tuple[tuple[int, int], tuple[int, int]]] = {}
        for k, v in sd.items():
            if k.endswith(("relative_position_index", "relative_coords_table", "attn_mask")):
                continue
            if k.endswith("relative_position_bias_table") and k in target and v.shape != target[k].shape:
                attn = self.get_submodule(k.rsplit(".", 1)[0])
                side = int(round(v.shape[0] ** 0.5))
                if side * side != v.shape[0] or v.shape[1] != target[k].shape[1]:
                    raise ValueError(f"{source}: {k} has shape {tuple(v.shape)}; expected a square "
                                     f"((2w-1)^2, {target[k].shape[1]}) table")
                old = ((side + 1) // 2, (side + 1) // 2)
                v = resample_rel_pos_table(v, old, attn.window, mode=self.cfg.rel_pos_resample)
                pair = (old, tuple(attn.window))
                resampled[pair] = resampled.get(pair, 0) + 1
                file_windows[stage_of[id(attn)]] = old[0]
                stage_pair[stage_of[id(attn)]] = pair
            out[k] = v
        if resampled and getattr(sd, "intended_resize", False):  # set_input_size: the windows asked for
            log.info("%s: relative-position bias tables resampled to the new windows (%s)", source,
                     ", ".join(f"{o[0]}x{o[1]} -> {w[0]}x{w[1]}" for o, w in resampled))
        elif resampled:  # the file's model attended within other windows
            clamped, advice = self._window_advice(file_windows)
            for (old, new), blocks in resampled.items():
                why = next((clamped[i] for i, p in sorted(stage_pair.items()) if p == (old, new) and i in clamped), "")
                log.warning("%s: relative-position bias tables of window %dx%d resampled to this model's window %dx%d "
                            "(%d block(s))%s; to load the checkpoint's model as it was, build it with %s",
                            source, *old, *new, blocks, why, advice)
        return out

    def _window_advice(self, file_windows: dict[int, int]) -> tuple[dict[int, str], str]:
        """How to build a model whose blocks attend within the file's windows (stage -> window): the file's
        ``window_size``, and a larger ``img_size`` where a stage's map is smaller than the file's window (the
        model clamps its window to the map, whatever ``window_size`` says). Returns (stage -> why its window was
        clamped, the advice)."""
        cfg, patch, sizes = self.cfg, self.cfg.patch_size, [stage.size for stage in self.layers]
        img = list(to_2tuple(cfg.img_size))
        clamped: dict[int, str] = {}
        for i, w in file_windows.items():
            for ax in (0, 1):
                if sizes[i][ax] < w:  # e.g. swin_tiny at 192 px: the last stage's 6x6 map < window 7
                    img[ax] = max(img[ax], w * patch * 2**i)
                    clamped[i] = (f"; at img_size={cfg.img_size} the map of layers.{i} is {sizes[i][0]}x{sizes[i][1]}, "
                                  f"smaller than the checkpoint's window {w}x{w}, so its window is clamped to the map")
        grids, grid = [], [s // patch for s in img]  # each stage's map at the advised size, as SwinStage halves it
        for i in range(len(self.layers)):
            grid = grid if i == 0 else [(g + 1) // 2 for g in grid]
            grids.append(tuple(grid))
        # every stage must attend within the file's window: the resampled ones' and the others' (this model's)
        targets = [(file_windows[i],) * 2 if i in file_windows else tuple(stage.blocks[0].attn.window)
                   for i, stage in enumerate(self.layers)]

        def fits(windows: tuple[int, ...]) -> bool:
            return all(block_geometry(g, w, shifted=False)[0] == t for g, w, t in zip(grids, windows, targets))

        n = len(targets)
        uniform = [cfg.windows()] + [(w,) * n for w in dict.fromkeys(file_windows[i] for i in sorted(file_windows))]
        windows = next((ws for ws in uniform if fits(ws)), None)
        if windows is None:  # one window per stage: this model's where it fits, else the file's
            windows = tuple(w if block_geometry(g, w, shifted=False)[0] == t else max(t)
                            for g, w, t in zip(grids, cfg.windows(), targets))
        advice = []
        if tuple(img) != to_2tuple(cfg.img_size):
            advice.append(f"img_size={img[0] if img[0] == img[1] else tuple(img)}")
        if windows != cfg.windows():
            advice.append(f"window_size={windows[0] if windows == (windows[0],) * n else windows}")
        return clamped, " and ".join(advice)


def _pair(value: object, what: str) -> tuple[int, int]:
    """A positive int or an (h, w) pair of them, as a pair; else a ValueError naming ``what``."""
    pair = tuple(value) if isinstance(value, (list, tuple)) else (value, value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f"set_input_size: {what} must be a positive int or an (h, w) pair of them, got {value!r}")
    return pair  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------- variants
# Swin v1, Table 1 of the paper (and the released checkpoints): C, depths, heads; window 7 at 224, 12 at 384.
SWIN_SIZES: dict[str, dict] = {
    "tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "large": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
}
SWIN_VARIANTS: tuple[tuple[str, int, int], ...] = (  # (size, window, resolution)
    ("tiny", 7, 224), ("small", 7, 224), ("base", 7, 224), ("base", 12, 384), ("large", 7, 224), ("large", 12, 384),
)
# Swin v2 (MODELHUB of the reference repository): (size, window, resolution, pretrained windows per stage)
SWINV2_VARIANTS: tuple[tuple[str, str, int, int, tuple[int, ...] | None], ...] = (
    ("tiny", "window8_256", 8, 256, None), ("tiny", "window16_256", 16, 256, None),
    ("small", "window8_256", 8, 256, None), ("small", "window16_256", 16, 256, None),
    ("base", "window8_256", 8, 256, None), ("base", "window16_256", 16, 256, None),
    ("base", "window12_192", 12, 192, None),
    ("base", "window12to16_192to256", 16, 256, (12, 12, 12, 6)),
    ("base", "window12to24_192to384", 24, 384, (12, 12, 12, 6)),
    ("large", "window12_192", 12, 192, None),
    ("large", "window12to16_192to256", 16, 256, (12, 12, 12, 6)),
    ("large", "window12to24_192to384", 24, 384, (12, 12, 12, 6)),
)


def _register_swin_variants() -> None:
    for size, window, res in SWIN_VARIANTS:
        name = f"swin_{size}_patch4_window{window}_{res}"
        cfg = SwinConfig(img_size=res, window_size=window, **SWIN_SIZES[size])
        register_model(ModelEntry(name=name, family="swin", config=cfg, build=SwinTransformer,
                                  description=f"Swin-{size[0].upper()} window {window} at {res}px"))
    for size, tag, window, res, pretrained in SWINV2_VARIANTS:
        name = f"swinv2_{size}_{tag}"
        # the 192 px models are the ImageNet-22k pre-training checkpoints: a 21,841-class head, as timm registers
        classes = 21841 if tag == "window12_192" else 1000
        cfg = SwinConfig(version=2, img_size=res, window_size=window, pretrained_window_sizes=pretrained,
                         num_classes=classes, **SWIN_SIZES[size])
        register_model(ModelEntry(name=name, family="swinv2", config=cfg, build=SwinTransformer,
                                  description=f"SwinV2-{size[0].upper()} window {window} at {res}px"
                                              + (f" (from window {pretrained[0]})" if pretrained else "")))


_register_swin_variants()
