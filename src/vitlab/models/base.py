"""What every vitlab classifier shares: default preprocessing and the block-index helper.

The common surface (``forward_features``, ``forward_head(x, pre_logits=False)``, ``forward``,
``forward_intermediates``, ``reset_classifier``, ``no_weight_decay``, ``num_prefix_tokens``,
``preprocessing``) is what training, distillation, probing and the analysis tools rely on.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, is_dataclass, replace
from typing import Any, Literal

from torch import nn

INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True, kw_only=True)
class Preprocessing:
    """How images must be prepared for a model: resize to input_size / crop_pct, centre-crop, normalise.

    ``crop_mode``: "center" resizes the shorter side to ``size / crop_pct`` (aspect kept) before the centre crop
    (timm's default; for a non-square size, the image is scaled to cover ``size / crop_pct`` per side, as timm's
    ``ResizeKeepRatio``); "squash" resizes both sides to ``size / crop_pct`` (aspect not kept), as timm's
    ``crop_mode="squash"`` and Hugging Face's processors with a ``{"height", "width"}`` size do.
    ``channel_order`` is the colour order the weights expect: "BGR" for checkpoints trained on OpenCV-loaded
    images (e.g. Hugging Face's MobileViT, whose processor flips RGB to BGR); vitlab's transforms apply it.
    ``crop_offset``: where the centre crop starts on an odd margin: "round" is ``round(margin / 2)`` (half to
    even; timm, torchvision), "floor" is ``margin // 2`` (Hugging Face's image processors). They are one pixel
    apart where ``margin / 2`` rounds up (margin 3: 2 against 1).
    """

    input_size: tuple[int, int, int] = (3, 224, 224)  # (C, H, W)
    mean: tuple[float, ...] = INCEPTION_MEAN
    std: tuple[float, ...] = INCEPTION_STD
    crop_pct: float = 0.9
    interpolation: Literal["bicubic", "bilinear", "nearest"] = "bicubic"
    channel_order: Literal["RGB", "BGR"] = "RGB"
    crop_mode: Literal["center", "squash"] = "center"
    crop_offset: Literal["round", "floor"] = "round"

    def __post_init__(self) -> None:
        # one place for every family: a grayscale model built from RGB statistics gets their average
        channels = self.input_size[0]
        object.__setattr__(self, "mean", fit_channels(tuple(self.mean), channels))
        object.__setattr__(self, "std", fit_channels(tuple(self.std), channels))
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError(f"Preprocessing: channel_order must be 'RGB' or 'BGR', got {self.channel_order!r}")
        if self.crop_mode not in ("center", "squash"):
            raise ValueError(f"Preprocessing: crop_mode must be 'center' or 'squash', got {self.crop_mode!r}")
        if self.crop_offset not in ("round", "floor"):
            raise ValueError(f"Preprocessing: crop_offset must be 'round' or 'floor', got {self.crop_offset!r}")
        if self.interpolation not in ("bicubic", "bilinear", "nearest"):
            raise ValueError(f"Preprocessing: interpolation must be 'bicubic', 'bilinear' or 'nearest', "
                             f"got {self.interpolation!r}")
        if not self.crop_pct > 0:
            raise ValueError(f"Preprocessing: crop_pct must be positive, got {self.crop_pct!r}")

    def resize_side(self, side: int) -> int:
        """The resize target of an output side: ``side / crop_pct`` rounded down as timm does, without losing a
        pixel to float rounding when the quotient is a whole number (224 / (224 / 256) is 255.99...)."""
        return math.floor(side / self.crop_pct + 1e-6)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**fields)


# the Preprocessing fields a checkpoint's own files may set on a built model (a Hugging Face
# preprocessor_config.json, a timm hub pretrained_cfg) where the family fixes them; the input size is the model's
STYLE_FIELDS = ("mean", "std", "crop_pct", "interpolation", "channel_order", "crop_mode", "crop_offset")


def set_preprocessing_style(model: nn.Module, **fields: Any) -> None:
    """Make ``model.preprocessing`` use ``fields`` (of :data:`STYLE_FIELDS`) over what its family computes from
    its config; the input size stays the model's. Recorded in vitlab checkpoints (``preprocessing_style``) and
    restored when they load. Called with no fields, it clears them."""
    unknown = sorted(set(fields) - set(STYLE_FIELDS))
    if unknown:
        raise ValueError(f"preprocessing style: unknown field(s) {unknown}; choose from {', '.join(STYLE_FIELDS)}")
    style = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    replace(model.preprocessing, **style)  # type: ignore[attr-defined]  # checks the values
    model.preprocessing_style = style


class TimmSurface:
    """The parts of timm's model interface that training scripts written for timm call, on every family:
    ``set_grad_checkpointing``, ``get_classifier``, ``pretrained_cfg`` (``default_cfg``).

    ``grad_checkpointing`` is read by the family's block loops (:mod:`vitlab.layers.checkpointing`); setting it
    on the model sets it on every submodule that has the attribute (Swin's stages, DETR's encoder and decoder,
    SETR's backbone)."""

    grad_checkpointing: bool = False
    classifier_name: str = "head"
    class_names: list[str] | None = None  # a checkpoint's names of the classes; None where none are known
    score_function: str = "softmax"  # how logits become scores: "sigmoid" (multi-label) / "none" (regression) heads

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A family's own ``forward_intermediates`` also takes timm's ``intermediates_only`` (return the list
        alone) and ``stop_early`` (accepted; the blocks after the last one asked for run anyway). A family's
        ``preprocessing`` follows the model's ``preprocessing_style`` (:func:`set_preprocessing_style`)."""
        super().__init_subclass__(**kwargs)
        prop = cls.__dict__.get("preprocessing")
        if isinstance(prop, property) and not getattr(prop.fget, "styled", False):
            cls.preprocessing = property(_styled(prop.fget), doc=prop.__doc__)  # type: ignore[attr-defined]
        own = cls.__dict__.get("forward_intermediates")
        if own is None or getattr(own, "takes_timm_options", False):
            return

        @functools.wraps(own)
        def forward_intermediates(self, x, indices=None, *, intermediates_only: bool = False,
                                  stop_early: bool = False, **options: Any):
            final, kept = own(self, x, indices, **options)
            return kept if intermediates_only else (final, kept)

        forward_intermediates.takes_timm_options = True  # type: ignore[attr-defined]
        cls.forward_intermediates = forward_intermediates  # type: ignore[attr-defined]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the blocks' activations in the backward pass instead of keeping them (less memory, about
        one more forward per step); gradients are unchanged."""
        for m in self.modules():  # type: ignore[attr-defined]
            if isinstance(m, TimmSurface) or hasattr(type(m), "grad_checkpointing"):
                m.grad_checkpointing = bool(enable)

    def get_classifier(self) -> nn.Module:
        return getattr(self, self.classifier_name)

    def init_non_persistent_buffers(self) -> list[str]:
        """Recompute the buffers that state dicts leave out; see :func:`init_non_persistent_buffers`."""
        return init_non_persistent_buffers(self)  # type: ignore[arg-type]

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """The model's preprocessing as timm's data config reads it (``timm.data.resolve_data_config(model=m)``)."""
        pre = self.preprocessing  # type: ignore[attr-defined]
        return {"architecture": getattr(self, "model_name", None), "input_size": tuple(pre.input_size),
                "mean": tuple(pre.mean), "std": tuple(pre.std), "crop_pct": pre.crop_pct,
                "interpolation": pre.interpolation, "crop_mode": pre.crop_mode, "num_classes": self.num_classes,  # type: ignore[attr-defined]
                "classifier": self.classifier_name}

    @property
    def default_cfg(self) -> dict[str, Any]:
        return self.pretrained_cfg


def init_non_persistent_buffers(model: nn.Module) -> list[str]:
    """Recompute every buffer of ``model`` that is derived from its config and left out of state dicts
    (relative-position indices, Swin's shift masks and v2 coordinates, fixed sin-cos tables), in place, on each
    buffer's device. Needed after building on the meta device: ``to_empty()`` gives such buffers uninitialised
    memory and ``load_state_dict`` does not fill them (an index past its table's end, or silently wrong
    numbers). Returns the names of the modules that recomputed theirs.

    ``with torch.device("meta"): m = create_model(...)``; ``m.to_empty(device="cpu")``;
    ``m.load_state_dict(sd)``; ``m.init_non_persistent_buffers()``."""
    done = []
    for name, module in model.named_modules():
        hook = getattr(module, "_init_buffers", None)
        if callable(hook):
            hook()
            done.append(name)
    return done


def _styled(fget: Any) -> Any:
    @functools.wraps(fget)
    def preprocessing(self: Any) -> Preprocessing:
        pre = fget(self)
        style = self.__dict__.get("preprocessing_style")
        return replace(pre, **style) if style else pre

    preprocessing.styled = True  # type: ignore[attr-defined]
    return preprocessing


def fit_channels(values: tuple[float, ...], channels: int) -> tuple[float, ...]:
    """Per-channel normalisation values for ``channels`` inputs: a single value repeated; from RGB statistics,
    their average for one channel (grey) or two, and for channels past the third (RGB plus e.g. near-infrared
    or depth: pass ``mean=`` / ``std=`` with one value per channel for better ones)."""
    if len(values) == channels:
        return tuple(values)
    if len(values) == 1:
        return tuple(values) * channels
    if channels < 1:
        raise ValueError(f"normalisation values: expected at least one input channel, got {channels}")
    average = sum(values) / len(values)
    if len(values) == 3 and channels > 3:
        return tuple(values) + (average,) * (channels - 3)
    if len(values) == 3:
        return (average,) * channels
    raise ValueError(f"normalisation values {values} do not fit {channels} input channels: give one value or "
                     f"one per channel (mean=, std=)")


def take_indices(num_blocks: int, indices: int | list[int] | tuple[int, ...] | None) -> list[int]:
    """Absolute block indices: None -> all, int n -> last n, sequence -> those (negative from the end)."""
    if indices is None:
        return list(range(num_blocks))
    if isinstance(indices, int):
        if not 0 < indices <= num_blocks:
            raise ValueError(f"indices={indices}: the last-n count must be in 1..{num_blocks}")
        return list(range(num_blocks - indices, num_blocks))
    out = []
    for i in indices:
        j = i + num_blocks if i < 0 else i
        if not 0 <= j < num_blocks:
            raise ValueError(f"indices: block {i} is out of range for a model with {num_blocks} blocks")
        out.append(j)
    return out


def zero_head(in_features: int, num_classes: int) -> nn.Module:
    """A classifier head for ``reset_classifier``: a zero-initialised Linear (logits start at zero, as the
    ViT paper fine-tunes), or Identity for ``num_classes`` 0 (a feature extractor)."""
    if num_classes <= 0:
        return nn.Identity()
    head = nn.Linear(in_features, num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def check_global_pool(owner: Any, global_pool: str | None, allowed: tuple[str, ...]) -> None:
    """A pooling kind the family computes: one of its ``allowed`` kinds, else a ValueError naming both.

    ``owner`` is the model (``reset_classifier``'s argument, where None keeps the current pooling) or the
    family's config dataclass (its ``__post_init__``, where a value is required): a kind the family does not
    compute (timm's "max", a typo) must not build a model that silently pools otherwise.
    """
    is_config = is_dataclass(owner)
    if global_pool in allowed or (global_pool is None and not is_config):
        return
    where = type(owner).__name__ if is_config else f"{type(owner).__name__}.reset_classifier"
    hint = " (for unpooled tokens call forward_features)" if global_pool == "" else ""
    raise ValueError(f"{where}: global_pool must be one of {', '.join(map(repr, allowed))}, "
                     f"got {global_pool!r}{hint}")


def record_head(model: nn.Module, **changes: Any) -> None:
    """Keep ``model.cfg`` describing the live model after ``reset_classifier`` changed its head or pooling:
    a checkpoint is rebuilt from its config, so a stale one would reload the old head. A new head has new
    classes: the old head's ``class_names`` are dropped (set them, or pass ``class_names=`` to save_model)."""
    model.cfg = replace(model.cfg, **changes)
    if "num_classes" in changes and getattr(model, "class_names", None) is not None:
        model.class_names = None


def init_linear_jax(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for Linear layers, as in the reference JAX code."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
