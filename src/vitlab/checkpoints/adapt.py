"""Fit a converted state dict to a model: resample position tables, replace a head of another size (or a missing
one) by a zero-initialised one, and load strictly with an error that lists what does not fit."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from vitlab.checkpoints.io import CheckpointError
from vitlab.data.folder import class_name
from vitlab.layers import resample_pos_embed

log = logging.getLogger(__name__)


class SourceStateDict(dict):
    """A converted state dict with its source format's rule for resampling position tables to another grid, where
    that differs from vitlab's (bicubic, antialiased): timm reads the original JAX ``.npz`` files bilinearly without
    antialiasing (the JAX code interpolates linearly), and so does vitlab, to give the same model; transformers'
    ``interpolate_pos_encoding`` (ViT, DeiT, BEiT) is bicubic without antialiasing, and vitlab reads its folders so.
    ``rel_pos_interpolation``: the rule for BEiT's relative position tables (with the class rows), read by the
    family's ``adapt_checkpoint``: "timm" (timm's ``resize_rel_pos_bias_table``) or "bilinear" (transformers'
    ``BeitRelativePositionBias``: the table as a (2H-1, 2W-1) image, bilinear, not antialiased). ``grid``: the
    patch grid (rows, cols) of the file's position table where the file records it (a vitlab checkpoint's config):
    a rectangular grid's table, which its length alone does not give (others' tables are square)."""

    def __init__(self, *args: object, pos_interpolation: str = "bicubic", pos_antialias: bool = True,
                 rel_pos_interpolation: str = "timm", grid: tuple[int, int] | None = None) -> None:
        super().__init__(*args)
        self.pos_interpolation = pos_interpolation
        self.pos_antialias = pos_antialias
        self.rel_pos_interpolation = rel_pos_interpolation
        self.grid = grid


def classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Names of the modules that make up the classification head(s)."""
    return tuple(getattr(model, "classifier_names", ("head",)))


def new_head_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The head tensors a loaded model gets where the checkpoint has no head of its size: the model's own, with the
    weights and biases of every Linear classifier layer (``head``; DeiT's ``head_dist``; CrossViT's ``head.0`` and
    ``head.1``) set to zero, as the ViT paper fine-tunes. Every family thus starts from zero logits, the same on
    every load; a freshly built model keeps its family's own initialisation (random, BEiT's scaled-down one).
    Dense-prediction heads (a segmentation decoder, DETR's class embedding) keep the model's initialisation."""
    heads = classifier_prefixes(model)
    target = model.state_dict()
    out = {k: target[k] for k in target if k.split(".")[0] in heads}
    if getattr(model, "task", "classification") != "classification":
        return out
    for name, m in model.named_modules():
        if name.split(".")[0] in heads and isinstance(m, nn.Linear):
            for key in (f"{name}.weight", f"{name}.bias"):
                if key in out:
                    out[key] = torch.zeros_like(out[key])
    return out


def match_class_names(names: Sequence[str], classes: Sequence[str]) -> list[int | None]:
    """The index in ``names`` (a head's classes, in its row order) of each of ``classes``: by exact name, else
    case-insensitively ("Cat" for "cat"); None for a class the head does not name. Names are compared as
    :func:`vitlab.data.folder.class_name` reads folder names: "café" spelt with a combining accent (NFD, macOS
    folder names) or left undecoded by a non-UTF-8 locale is "café". The rule by which ``vitlab eval`` meets a
    data set's classes and fine-tuning reorders a kept head."""
    index = {class_name(n): i for i, n in enumerate(names)}
    folded = {class_name(n).casefold(): i for i, n in enumerate(names)}
    return [index.get(class_name(c), folded.get(class_name(c).casefold())) for c in classes]


def same_class_names(a: Sequence[str], b: Sequence[str]) -> bool:
    """Whether two class lists are the same names in the same order, compared as :func:`match_class_names` does."""
    return len(a) == len(b) and all(class_name(x) == class_name(y) for x, y in zip(a, b))


def match_head_classes(model: nn.Module, classes: Sequence[str], *, source: str) -> None:
    """Fit a head kept from a checkpoint (``model.class_names``, its rows' classes) to the data's ``classes``.

    The same classes in another order (a Hugging Face id2label against a folder's sorted names): the rows of every
    classifier (weight and bias; DeiT's ``head_dist``, CrossViT's two heads) are permuted to the data's order.
    Other classes: the head is new, zero-initialised as for a head of another size (:func:`new_head_tensors`).
    A checkpoint that does not name its classes: the rows are kept by position, with a warning. A head that is
    already new (all zeros) has nothing to match. ``model.class_names`` becomes ``classes``."""
    classes = list(classes)
    heads = _classifier_layers(model, len(classes))
    if not heads or all(not t.any() for m in heads for t in (m.weight, m.bias) if t is not None):
        model.class_names = classes
        return
    names = list(getattr(model, "class_names", None) or [])
    if not names:
        log.warning("%s does not name its classes: its head's rows are kept by position for the data's classes "
                    "%s...", source, classes[:3])
    elif not same_class_names(names, classes):
        found = match_class_names(names, classes)
        with torch.no_grad():
            if None not in found and sorted(found) == list(range(len(names))):
                order = torch.tensor(found)
                for m in heads:
                    m.weight.copy_(m.weight[order])
                    if m.bias is not None:
                        m.bias.copy_(m.bias[order])
                log.info("%s: the head's rows (classes %s...) reordered to the data's classes %s...", source,
                         names[:3], classes[:3])
            else:
                for m in heads:
                    m.weight.zero_()
                    if m.bias is not None:
                        m.bias.zero_()
                log.info("%s: its head is for other classes (%s...) than the data's (%s...): the head is new, "
                         "zero-initialised", source, names[:3], classes[:3])
    model.class_names = classes


def _classifier_layers(model: nn.Module, num_classes: int) -> list[nn.Linear]:
    """The Linear classifier layers of ``model`` (:func:`classifier_prefixes`) with one row per class."""
    if getattr(model, "task", "classification") != "classification":
        return []
    heads = classifier_prefixes(model)
    return [m for name, m in model.named_modules()
            if name.split(".")[0] in heads and isinstance(m, nn.Linear) and m.out_features == num_classes]


def adapt_state_dict(sd: dict[str, Tensor], model: nn.Module, *, source: str) -> dict[str, Tensor]:
    """Resample ``*pos_embed`` tables to the model's grid and replace heads whose shape differs (or that the
    checkpoint lacks) by zero-initialised ones (:func:`new_head_tensors`)."""
    check_distillation(sd, model, source=source)
    target = model.state_dict()
    rule = (getattr(sd, "pos_interpolation", "bicubic"), getattr(sd, "pos_antialias", True))
    out = copy.copy(sd) if isinstance(sd, SourceStateDict) else dict(sd)  # a copy that keeps the source's rules
    family_adapt = getattr(model, "adapt_checkpoint", None)
    if family_adapt is not None:
        # a family's own tables that depend on resolution or window (e.g. Swin's relative-position bias)
        out = family_adapt(out, source=source)
    recorded = getattr(sd, "grid", None)
    grid = tuple(getattr(getattr(model, "patch_embed", None), "grid_size", ()))
    # a table as long as the model's for another grid of as many patches (a vitlab file's 4x16 for 8x8)
    relaid = recorded is not None and len(grid) == 2 and recorded != grid and math.prod(recorded) == math.prod(grid)
    for k, v in list(out.items()):
        # a table of another width is no resolution change: leave it to load_strict, which lists every misfit
        if (k.endswith("pos_embed") and k in target and v.ndim == target[k].ndim == 3
                and v.shape[-1] == target[k].shape[-1] and (v.shape != target[k].shape or (relaid and k == "pos_embed"))):
            out[k] = _resample_to(v, target[k], model, k, source, rule, recorded)
    _swap_pooling_norm(out, target, source)
    _adapt_input_channels(out, model, source)
    heads = classifier_prefixes(model)
    if not any(k.split(".")[0] in heads for k in out):
        own = [k for k in target if k.split(".")[0] in heads]
        if own:  # a backbone without a classifier (self-supervised, num_classes=0): the model's head is new
            out.update(new_head_tensors(model))
            log.info("%s: no classifier in the checkpoint; the model's new head (%d classes) is zero-initialised",
                     source, getattr(model, "num_classes", 0))
    dropped = [
        k for k in out
        if k.split(".")[0] in heads and (k not in target or out[k].shape != target[k].shape)
    ]
    if dropped:
        # a head for other classes (or none asked for): the model's new head, zero-initialised
        for k in dropped:
            del out[k]
        for k in [k for k in out if k.startswith("pre_logits.") and k not in target]:
            del out[k]  # the paper drops the pre-logits layer with the pre-training head
        out.update(new_head_tensors(model))
        log.info("%s: classifier head replaced by a zero-initialised one (%s)", source, ", ".join(sorted(dropped)))
    return out


def _adapt_input_channels(out: dict[str, Tensor], model: nn.Module, source: str) -> None:
    """RGB weights for a model of another channel count (``in_chans=1`` for grey images, 4 for RGB + infrared):
    the first convolution's filters summed over colour for one channel, else repeated over the channels and
    scaled by 3 / channels, as timm's adapt_input_conv does. For a plain convolution a grey image on one channel
    then gives the response of that image repeated to RGB; not for a weight-standardised one (the R50 hybrid's
    stem), which standardises the summed filter (timm's gap too). T2T-ViT reads the image without a convolution
    and is refused."""
    channels = getattr(getattr(model, "cfg", None), "in_chans", 3)
    key = "tokens_to_token.attention1.norm1.weight"  # T2T-ViT: Unfold (C * 7 * 7 values) -> LayerNorm -> Linear
    v = out.get(key)
    if v is not None and hasattr(model, "tokens_to_token") and v.shape != model.get_parameter(key).shape:
        raise CheckpointError(
            f"{source}: in_chans={channels} differs from the checkpoint's input channels ({key}: checkpoint "
            f"{tuple(v.shape)}, model {tuple(model.get_parameter(key).shape)}): adapting weights to another channel "
            f"count is not supported for T2T-ViT, whose tokenizer reads the image through Unfold + LayerNorm + "
            f"Linear, not a convolution; build it with the checkpoint's in_chans (3 for RGB weights), or train it "
            f"from scratch with in_chans={channels}")
    if channels == 3:
        return
    for name, m in model.named_modules():  # every convolution that reads the image (CrossViT has two)
        key = f"{name}.weight"
        v = out.get(key)
        if (not isinstance(m, nn.Conv2d) or m.in_channels != channels or v is None or v.ndim != 4
                or v.shape[1] != 3 or v.shape[0] != m.out_channels):
            continue
        if channels == 1:
            out[key] = v.sum(dim=1, keepdim=True)
        else:
            out[key] = v.repeat(1, math.ceil(channels / 3), 1, 1)[:, :channels] * (3 / channels)
        log.info("%s: %s's RGB filters adapted to %d input channel(s)", source, key, channels)


def _swap_pooling_norm(out: dict[str, Tensor], target: dict[str, Tensor], source: str) -> None:
    """A change of pooling between checkpoint and model moves the final LayerNorm: class-token pooling normalises
    every token (``norm``), average pooling normalises the pooled vector (``fc_norm``). MAE's fine-tuning recipe
    (main_finetune.py) drops the pre-training's ``norm`` and starts ``fc_norm`` afresh (weight 1, bias 0), and so
    does this, in either direction; any other mismatch is left to :func:`load_strict`."""
    for old, new in (("norm.", "fc_norm."), ("fc_norm.", "norm.")):
        have = [k for k in out if k.startswith(old)]
        wanted = [k for k in target if k.startswith(new)]
        if (have and wanted and not any(k in target for k in have) and not any(k in out for k in wanted)
                and {k[len(old):] for k in have} == {k[len(new):] for k in wanted}):
            for k in have:
                del out[k]
            out.update({k: target[k] for k in wanted})
            log.info("%s: the model pools %s, the checkpoint did not: its final %s is dropped and the model's "
                     "new %s kept (weight 1, bias 0), as MAE's fine-tuning does", source,
                     "the patch tokens" if new == "fc_norm." else "the class token", old[:-1], new[:-1])
            return


def _resample_to(v: Tensor, t: Tensor, model: nn.Module, key: str, source: str,
                 rule: tuple[str, bool] = ("bicubic", True), recorded: tuple[int, int] | None = None) -> Tensor:
    prefix = getattr(model, "pos_embed_prefix", getattr(model, "num_prefix_tokens", 0))
    if v.ndim != 3 or t.ndim != 3 or v.shape[-1] != t.shape[-1]:
        raise CheckpointError(
            f"{source}: {key} has shape {tuple(v.shape)}, the model needs {tuple(t.shape)}; "
            f"these differ in width, not only in grid size"
        )
    new_grid = model.patch_embed.grid_size
    n_old = v.shape[1] - prefix
    side = math.isqrt(max(n_old, 0))
    # a vitlab file records its grid (``recorded``: 4x16 and 8x8 tables have the same length); others' are square
    old_grid = recorded
    if old_grid is None or old_grid[0] * old_grid[1] != n_old:
        old_grid = (side, side) if side * side == n_old else None
    if old_grid is None:
        n = v.shape[1]
        if prefix and (math.isqrt(n) ** 2 == n or n == new_grid[0] * new_grid[1]):
            # timm's no_embed_class=True (DeiT-3's layout) adds the table to the patch tokens only
            raise CheckpointError(
                f"{source}: {key} has {n} entries, a position table for the patch grid alone, without the "
                f"class-token entry that {getattr(model, 'model_name', type(model).__name__)} keeps in its table "
                f"({prefix} prefix entr{'y' if prefix == 1 else 'ies'} + the grid): the layout of timm's "
                f"no_embed_class=True (DeiT-3); load it with a deit3_* name (or, with register tokens, a "
                f"vit_*_reg4_dinov2 name; or any ViT / DeiT name with no_embed_class=True), which keeps that layout"
            )
        if prefix > 1 and math.isqrt(n - 1) ** 2 == n - 1:  # one prefix entry in the file, more in the model
            regs = int(getattr(getattr(model, "cfg", None), "reg_tokens", 0) or 0)
            what, fix = (("class and register tokens", "model without register tokens (reg_tokens=0)") if regs else
                         ("class and distillation tokens", "non-distilled model (e.g. distilled=False)"))
            raise CheckpointError(
                f"{source}: {key} has one prefix entry (a class token) before a {math.isqrt(n - 1)}x"
                f"{math.isqrt(n - 1)} grid, and {getattr(model, 'model_name', type(model).__name__)} keeps "
                f"{prefix} ({what}): the file is a model without {'them' if regs else 'a distillation token'}; "
                f"build a {fix} to load it")
        raise CheckpointError(f"{source}: {key} has {n_old} grid positions, which is not a square grid")
    log.info("%s: resampling %s from %dx%d to %dx%d (%s%s)", source, key, *old_grid, *new_grid, rule[0],
             ", antialiased" if rule[1] else "")
    return resample_pos_embed(v, new_grid, old_size=old_grid, num_prefix_tokens=prefix, interpolation=rule[0],
                              antialias=rule[1])


def check_distillation(sd: Mapping[str, Tensor], model: nn.Module, *, source: str) -> None:
    """Refuse a file with a distillation token (``dist_token``) for a DeiT without one, and the converse: the model
    name (``deit_*_distilled_*``) or ``distilled=`` says which model is built, and timm refuses both loads too."""
    wanted = getattr(getattr(model, "cfg", None), "distilled", None)
    has = "dist_token" in sd
    if not isinstance(wanted, bool) or has == wanted:
        return
    name = getattr(model, "model_name", type(model).__name__)
    fit = _distillation_fit(name, has)
    if has:
        head = ", its head head_dist" if any(k.startswith("head_dist.") for k in sd) else ""
        raise CheckpointError(
            f"{source}: the file is a distilled DeiT (a distillation token: dist_token, a second prefix entry in "
            f"pos_embed{head}), and {name} has no distillation token (distilled=False); load it with {fit}")
    raise CheckpointError(
        f"{source}: no dist_token in the file, whose pos_embed has one prefix entry (the class token); {name} has "
        f"a distillation token (distilled=True): the file is a model without a distillation token; load it with "
        f"{fit}")


def _distillation_fit(name: str, distilled: bool) -> str:
    """The names (or option) that build a DeiT with (``distilled``) or without a distillation token, for an error."""
    from vitlab.models.registry import get_entry

    option = f"distilled={distilled}"
    try:
        own = get_entry(name).config.distilled
    except (ValueError, KeyError, AttributeError):
        own = None
    if own == distilled:  # the name fits: distilled= was given against it
        return f"{name} without distilled={not distilled}"
    other = (name.replace("_patch", "_distilled_patch", 1) if distilled and "_distilled_" not in name
             else name.replace("_distilled_patch", "_patch", 1))
    try:
        fits = other != name and get_entry(other).config.distilled == distilled
    except (ValueError, KeyError, AttributeError):
        fits = False
    if fits:
        return f"{other} (or {name} with {option})"
    if distilled and name.startswith("deit3_"):
        return "a deit_*_distilled_* name (timm has no distilled DeiT III either)"
    return f"{'a deit_*_distilled_* name' if distilled else 'a DeiT name without _distilled'} (or {option})"


def load_strict(model: nn.Module, sd: dict[str, Tensor], *, source: str) -> None:
    """Load ``sd`` into ``model``; anything that does not fit is one clear error."""
    target = model.state_dict()
    missing = sorted(set(target) - set(sd))
    unexpected = sorted(set(sd) - set(target))
    shapes = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(target[k].shape)}"
        for k in set(sd) & set(target) if sd[k].shape != target[k].shape
    )
    if missing or unexpected or shapes:
        parts = [f"{source} does not fit {getattr(model, 'model_name', type(model).__name__)}:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shapes that differ", shapes)):
            if items:
                shown = ", ".join(items[:12]) + (f", ... ({len(items)} in all)" if len(items) > 12 else "")
                parts.append(f"  {title}: {shown}")
        if any(".ls1.gamma" in k or ".ls2.gamma" in k for k in unexpected):
            parts.append("  The file has LayerScale (ls1/ls2 gamma): build the model with init_values=<a number>, "
                         "as the file's model was (its values are then read from the file).")
        parts.append("  Is it a checkpoint of another architecture or size?")
        raise CheckpointError("\n".join(parts))
    model.load_state_dict(sd, strict=True)
