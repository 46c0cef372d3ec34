"""What every vitlab classifier shares: default preprocessing and the block-index helper.

The common surface (``forward_features``, ``forward_head(x, pre_logits=False)``, ``forward``,
``forward_intermediates``, ``reset_classifier``, ``no_weight_decay``, ``num_prefix_tokens``,
``preprocessing``) is what training, distillation, probing and the analysis tools rely on.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, fields, is_dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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

    # options of set_input_size besides img_size and patch_size (Swin: window_size, window_ratio, always_partition)
    input_size_options: tuple[str, ...] = ()

    def set_input_size(self, img_size: int | tuple[int, int] | None = None, patch_size: int | None = None,
                       **options: Any) -> None:
        """Change the input size in place, as timm's ``set_input_size``: the model is rebuilt from its config with
        the new ``img_size`` (and ``patch_size``, family options), its weights carried as a checkpoint is loaded
        at another size (position tables and relative-position tables resampled by the model's own rule,
        :func:`vitlab.checkpoints.adapt_state_dict`), and the result moved into this object. Kept: the device and
        dtype of the weights, each module's train / eval mode, ``requires_grad``, hooks, ``model_name``,
        ``class_names``, ``score_function``, the preprocessing style and gradient checkpointing; parameters whose
        shape is unchanged stay the same objects. The old size is then refused as any other (unless
        ``dynamic_img_size``). ``patch_size``: the patch projection is resampled by FlexiViT's pseudo-inverse
        (timm's ``resample_patch_embed``), where the patch embedding is a plain convolution. Swin's options and
        window rule: :meth:`vitlab.models.swin.SwinTransformer._input_size_changes`. A family whose weights fix
        the size (MLP-Mixer's token-mixing MLPs) is refused, the model left as it was.

        Example: ``m = vitlab.create_model("vit_base_patch16_224", pretrained=True); m.set_input_size(img_size=384)``
        """
        name = getattr(self, "model_name", None) or type(self).__name__
        unknown = sorted(set(options) - set(self.input_size_options))
        if unknown:
            takes = ", ".join(("img_size", "patch_size", *self.input_size_options))
            raise ValueError(f"set_input_size: unknown option(s) {', '.join(unknown)} for {name}; it takes {takes}")
        cfg = getattr(self, "cfg", None)
        if not is_dataclass(cfg) or "img_size" not in {f.name for f in fields(cfg)}:
            raise ValueError(f"set_input_size: {name} ({type(self).__name__}) has no input size to change: its "
                             f"config has no img_size (the model takes the size of its input, or has none to set)")
        if img_size is not None:
            img_size = _check_size(img_size)
        if patch_size is not None:
            patch_size = _check_patch(patch_size)
        changes, state, attrs = self._input_size_changes(img_size, patch_size, **options)
        try:
            new = rebuild_with(self, changes, state_dict=state, source=f"{name}'s weights")  # type: ignore[arg-type]
        except ValueError as e:
            what = ", ".join(f"{k}={v!r}" for k, v in changes.items())
            raise ValueError(f"set_input_size({what}) for {name}: {e}") from e
        checkpointing = self.grad_checkpointing
        first = next(iter(self.parameters()), None)  # type: ignore[attr-defined]
        _graft(self, new, first)  # type: ignore[arg-type]
        _remap_references(self, new)  # type: ignore[arg-type]
        if checkpointing:
            self.set_grad_checkpointing(True)
        for k, v in attrs.items():
            setattr(self, k, v)

    def _input_size_changes(self, img_size: int | tuple[int, int] | None, patch_size: int | None,
                            **options: Any) -> tuple[dict[str, Any], dict[str, Tensor] | None, dict[str, Any]]:
        """(config changes, the weights to carry if not ``state_dict()``, attributes to set afterwards) of
        :meth:`set_input_size`; families with options override it."""
        changes: dict[str, Any] = {}
        state = None
        if img_size is not None:
            changes["img_size"] = img_size
        if patch_size is not None and patch_size != getattr(self.cfg, "patch_size", None):  # type: ignore[attr-defined]
            state = resampled_patch_state(self, patch_size)  # type: ignore[arg-type]
            changes["patch_size"] = patch_size
        return changes, state, {}

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


def _check_size(img_size: Any) -> int | tuple[int, int]:
    """An img_size argument: an int or an (h, w) pair of positive ints."""
    size = tuple(img_size) if isinstance(img_size, (list, tuple)) else img_size
    pair = (size, size) if isinstance(size, int) else size
    if (not isinstance(pair, tuple) or len(pair) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair)):
        raise ValueError(f"set_input_size: img_size must be a positive int or an (h, w) pair of them, got {img_size!r}")
    return size  # type: ignore[return-value]


def _check_patch(patch_size: Any) -> int:
    """A patch_size argument: vitlab's patches are square (an int, or an (h, w) pair of equal ints)."""
    if isinstance(patch_size, (list, tuple)) and len(patch_size) == 2 and patch_size[0] == patch_size[1]:
        patch_size = patch_size[0]
    if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size < 1:
        raise ValueError(f"set_input_size: patch_size must be a positive int (square patches), got {patch_size!r}")
    return patch_size


def resample_patch_kernel(weight: Tensor, new_size: tuple[int, int]) -> Tensor:
    """A (D, C, p, p) patch projection for another patch size by FlexiViT's pseudo-inverse resize (Beyer et al.
    2023, arXiv:2212.08013; timm's ``resample_patch_embed``): the kernel w' minimising the difference between
    <x, w> and <resize(x), w'> over patches x, with the bicubic, antialiased resize; float32 throughout."""
    old = tuple(weight.shape[-2:])
    if old == tuple(new_size):
        return weight
    n_old, n_new = old[0] * old[1], new_size[0] * new_size[1]
    basis = torch.eye(n_old, dtype=torch.float32, device=weight.device).reshape(n_old, 1, *old)
    resize = F.interpolate(basis, size=new_size, mode="bicubic", antialias=True, align_corners=False)
    resize = resize.squeeze(1).permute(1, 2, 0).reshape(n_new, n_old)  # (p'^2, p^2): resize as a matrix
    kernel = weight.float().reshape(*weight.shape[:2], n_old) @ torch.linalg.pinv(resize)  # (D, C, p'^2)
    return kernel.reshape(*weight.shape[:2], *new_size).to(weight.dtype)


def resampled_patch_state(model: nn.Module, patch_size: int) -> dict[str, Tensor]:
    """``model.state_dict()`` with the patch projection resampled to ``patch_size`` (:func:`resample_patch_kernel`),
    for a model whose patch embedding is one convolution with kernel = stride = patch; else a ValueError."""
    from vitlab.layers import PatchEmbed

    name = getattr(model, "model_name", None) or type(model).__name__
    pe = getattr(model, "patch_embed", None)
    proj = getattr(pe, "proj", None)
    if (not isinstance(pe, PatchEmbed) or not isinstance(proj, nn.Conv2d)
            or tuple(proj.kernel_size) != tuple(proj.stride) or "patch_size" not in model.cfg.__dataclass_fields__):
        raise ValueError(f"set_input_size: patch_size is supported for models whose patch embedding is one "
                         f"convolution (ViT, DeiT, BEiT, Swin); {name} ({type(model).__name__}) has "
                         f"{type(pe).__name__ if pe is not None else 'no patch_embed'}")
    sd = dict(model.state_dict())
    key = "patch_embed.proj.weight"
    sd[key] = resample_patch_kernel(sd[key], (patch_size, patch_size))
    return sd


def rebuild(model: nn.Module, **changes: Any) -> nn.Module:
    """A copy of ``model`` built from its config with ``changes``, carrying its weights (see :func:`rebuild_with`)."""
    return rebuild_with(model, changes)


def rebuild_with(model: nn.Module, changes: dict[str, Any], *, state_dict: dict[str, Tensor] | None = None,
                 source: str = "the model being rebuilt") -> nn.Module:
    """A new model (CPU, float32, eval mode) built from ``model.cfg`` with ``changes``, carrying ``model``'s weights
    (or ``state_dict``) as a checkpoint is loaded: position tables and relative-position tables resampled to the
    new grid / window by the model's rules (its grid and ``pos_antialias`` passed to
    :func:`vitlab.checkpoints.adapt_state_dict`). ``model_name``, ``class_names``, ``score_function`` and the
    preprocessing style are carried. The global random state is left as it was. ValueError: no config, or no
    such field in it."""
    from vitlab.checkpoints.adapt import SourceStateDict, adapt_state_dict, load_strict

    cfg = getattr(model, "cfg", None)
    if cfg is None or not is_dataclass(cfg):
        raise ValueError(f"{type(model).__name__} has no config (model.cfg) to rebuild it with {changes}")
    unknown = sorted(set(changes) - {f.name for f in fields(cfg)})
    if unknown:
        raise ValueError(f"{type(model).__name__}'s config has no field(s) {unknown}")
    new_cfg = replace(cfg, **changes)
    weights = model.state_dict() if state_dict is None else state_dict
    # a model on the meta device (shapes only, as timm's set_input_size takes it): the new one is too, nothing to carry
    on_meta = any(t.is_meta for t in weights.values())
    with torch.random.fork_rng(devices=[]), torch.device("meta" if on_meta else "cpu"):
        new = type(model)(new_cfg)  # its random initialisation is overwritten (or never made, on meta)
    if not on_meta:
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        sd = SourceStateDict(weights, pos_antialias=getattr(cfg, "pos_antialias", True),
                             grid=tuple(grid) if grid is not None and len(grid) == 2 else None)
        sd.intended_resize = True  # type: ignore[attr-defined]  # asked for: no advice to rebuild as the file was
        sd = adapt_state_dict(sd, new, source=source)
        load_strict(new, sd, source=source)
    for attr in ("model_name", "class_names", "score_function", "preprocessing_style"):
        if attr in vars(model):
            setattr(new, attr, getattr(model, attr))
    return new.eval()


# nn.Module's own bookkeeping (hooks, mode, registries): kept from the model being changed, or rebuilt by _graft
_MODULE_STATE = frozenset(nn.Module().__dict__)
_KEPT_ATTRS = frozenset({"grad_checkpointing", "model_name", "class_names", "score_function", "preprocessing_style"})


def _graft(old: nn.Module, new: nn.Module, like: Tensor | None) -> None:
    """Move ``new``'s structure, tensors and attributes into ``old`` (same module path, same type: kept as the
    same object), keeping ``old``'s hooks and modes. A tensor of unchanged shape is copied into ``old``'s (the
    same Parameter); another takes the device, dtype and ``requires_grad`` of the one it replaces (else of
    ``like``)."""

    def place(t: Tensor, ref: Tensor | None) -> Tensor:
        ref = ref if ref is not None else like
        if ref is None:
            return t.detach()
        dtype = ref.dtype if t.is_floating_point() and ref.is_floating_point() else t.dtype
        return t.detach().to(device=ref.device, dtype=dtype)

    params: dict[str, nn.Parameter | None] = {}
    for key, p in new._parameters.items():
        q = old._parameters.get(key)
        if p is None:
            params[key] = None
            continue
        if q is not None and q.shape == p.shape:
            with torch.no_grad():
                q.copy_(p)
            params[key] = q
        else:
            grad = q.requires_grad if q is not None else p.requires_grad
            params[key] = nn.Parameter(place(p, q), requires_grad=grad)
    buffers: dict[str, Tensor | None] = {}
    for key, b in new._buffers.items():
        c = old._buffers.get(key)
        if b is None:
            buffers[key] = None
        elif c is not None and c.shape == b.shape and c.dtype.is_floating_point == b.dtype.is_floating_point:
            c.copy_(b)
            buffers[key] = c
        else:
            buffers[key] = place(b, c)
    children: dict[str, nn.Module | None] = {}
    for key, child in new._modules.items():
        mine = old._modules.get(key)
        if child is not None and mine is not None and type(mine) is type(child):
            _graft(mine, child, like)
            children[key] = mine
        elif child is not None:  # a module the old structure has not: the new one, placed as the model
            if like is not None:
                child.to(device=like.device)
                if like.is_floating_point():
                    child.to(dtype=like.dtype)
            children[key] = child.train(old.training)
        else:
            children[key] = None
    for key, value in new.__dict__.items():
        if key not in _MODULE_STATE and key not in _KEPT_ATTRS:
            old.__dict__[key] = value
    old.__dict__["_parameters"] = params
    old.__dict__["_buffers"] = buffers
    old.__dict__["_non_persistent_buffers_set"] = set(new._non_persistent_buffers_set)
    old.__dict__["_modules"] = children


def _remap_references(model: nn.Module, new: nn.Module) -> None:
    """After :func:`_graft`: plain attributes that held ``new``'s modules or tensors (e.g. a Linformer layer's
    reference to the model's shared projection) point at the objects that replaced them."""
    swap: dict[int, Any] = {}
    _pair_objects(model, new, swap)

    def fix(value: Any) -> Any:
        if isinstance(value, (nn.Module, Tensor)):
            return swap.get(id(value), value)
        if isinstance(value, tuple) and not hasattr(value, "_fields"):
            return tuple(fix(v) for v in value)
        if isinstance(value, list):
            return [fix(v) for v in value]
        return value

    for module in model.modules():
        for key, value in list(module.__dict__.items()):
            if key not in _MODULE_STATE:
                module.__dict__[key] = fix(value)


def _pair_objects(old: nn.Module, new: nn.Module, swap: dict[int, Any]) -> None:
    """``swap``: id of each of ``new``'s modules and tensors -> the object at the same path in ``old``."""
    for key, obj in [*new.named_modules(), *new.named_parameters(remove_duplicate=False),
                     *new.named_buffers(remove_duplicate=False)]:
        try:
            mine = old.get_submodule(key) if isinstance(obj, nn.Module) else (
                old.get_parameter(key) if isinstance(obj, nn.Parameter) else old.get_buffer(key))
        except AttributeError:
            continue
        if mine is not obj:
            swap[id(obj)] = mine


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
