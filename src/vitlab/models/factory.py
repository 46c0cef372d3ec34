"""``create_model``, ``load_model`` and ``model_info``: the entry points of the registry."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitlab.models.base import Preprocessing
from vitlab.models.registry import check_config, get_entry

log = logging.getLogger(__name__)


def _apply_overrides(name: str, template: Any, overrides: dict[str, Any]) -> Any:
    fields = {f.name for f in dataclasses.fields(template)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(
            f"create_model({name!r}): unknown option(s) {unknown}; {type(template).__name__} accepts: "
            f"{', '.join(sorted(fields))}"
        )
    for key, value in overrides.items():
        _check_option_type(name, key, getattr(template, key), value)
    cfg = dataclasses.replace(template, **overrides)
    check_config(cfg)  # the families' __post_init__ call it too; DETR and SETR (detr.py, setr.py) do not yet
    return cfg


def _check_option_type(name: str, key: str, default: Any, value: Any) -> None:
    """A string where the variant has a number, flag or tuple is a mistyped option (``--set
    model_overrides.depths=(2,2)`` arrives as the text "(2,2)"): say so here, not as a TypeError deep in a layer."""
    if not isinstance(value, str) or default is None or isinstance(default, str):
        return
    if isinstance(default, (tuple, list)):
        expected = f"a list like {json.dumps(list(default))}"
    elif isinstance(default, bool):
        expected = "true or false"
    elif isinstance(default, (int, float)):
        expected = f"a number like {default}"
    else:
        return
    raise TypeError(f"create_model({name!r}): option {key} expects {expected}, got the text {value!r} "
                    f"(command-line values are JSON)")


def create_model(
    name: str,
    *,
    pretrained: str | os.PathLike | bool | None = None,
    num_classes: int | None = None,
    img_size: int | tuple[int, int] | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build a registered model, optionally with weights.

    Args:
        name: a registered name (``vitlab.list_models()``), optionally with a weights tag
            (``"vit_base_patch16_224.augreg2_in21k_ft_in1k"``) for ``pretrained=True``; or, as timm accepts,
            ``"hf-hub:ORG/NAME"``: that repo's weights, built as the architecture its config.json names.
        pretrained: True for the published weights listed for the name (fetched from the hub when the
            network allows, else from the local cache), or a vitlab checkpoint, a timm state dict (.safetensors/.pth/.bin), a Hugging Face
            folder (config.json + weights), an original JAX .npz, or ``hf-hub:ORG/NAME[@REVISION]`` (a repo
            that models/pretrained.json lists for this model gets that row's preprocessing where the repo's own
            files do not state it).
        num_classes: classes of the head; a checkpoint's head of another size is replaced by a
            zero-initialised one. Default: the checkpoint's, else the variant's.
        img_size: input resolution; a checkpoint's position table is resampled to it.
        overrides: any field of the family's config (e.g. ``depth=2``, ``drop_path_rate=0.1``); and, as timm's,
            ``features_only=True`` with ``out_indices`` / ``output_fmt``: the classifier's feature maps
            (:mod:`vitlab.models.features`), head dropped.

    Example::

        model = vitlab.create_model("vit_base_patch16_224", pretrained="ViT-B_16.npz", num_classes=10)
    """
    from vitlab.checkpoints.load import hub_repo

    if not isinstance(name, str):
        raise TypeError(f"create_model: name must be a registered model name (a string, see `vitlab models`), "
                        f"got {name!r}")
    if overrides.get("features_only") or "out_indices" in overrides:
        return _create_features(name, pretrained=pretrained, num_classes=num_classes, img_size=img_size,
                                **overrides)
    overrides.pop("features_only", None)
    if hub_repo(name) is not None:
        return _create_from_hub_name(name, pretrained, num_classes=num_classes, img_size=img_size, **overrides)
    if "/" in name or ":" in name:
        raise ValueError(_not_a_model_name(name))
    name, _, tag = name.partition(".")
    entry = _get_entry(name, tag)
    fields = {f.name for f in dataclasses.fields(entry.config)}
    from vitlab.models.base import STYLE_FIELDS

    # preprocessing the family fixes rather than configures (crop_mode, interpolation, ...), as timm's
    # pretrained_cfg_overlay sets it: applied to the built model, recorded in its checkpoints
    style_given = {k: overrides.pop(k) for k in list(overrides) if k in STYLE_FIELDS and k not in fields}
    weights = None
    if pretrained is True:
        from vitlab.models.pretrained import find_weights

        weights = find_weights(name, tag or None)
        pretrained = weights.hub
    elif tag:
        raise ValueError(_tag_needs_pretrained(name, tag, pretrained))
    if pretrained is False:
        pretrained = None
    repo = hub_repo(pretrained) if pretrained is not None else None
    if repo is not None and weights is None:  # a repo the table lists for this model: its row, as pretrained=True
        from vitlab.models.pretrained import weights_of_hub

        weights = weights_of_hub(repo, name)
    weights_overrides: dict[str, Any] = {}
    weights_style: dict[str, Any] = {}
    if weights is not None:
        from vitlab.models.pretrained import weights_settings

        # the config fields the row sets, and the preprocessing the family fixes but these weights were trained
        # otherwise with (crop_mode, a family's fixed statistics); the checkpoint's own files win over both
        weights_overrides, weights_style = weights_settings(weights, fields)

    def build(source: Any) -> nn.Module:
        return _build_loaded(name, entry, source, overrides=overrides, weights_overrides=weights_overrides,
                             num_classes=num_classes, img_size=img_size)

    if pretrained is None:
        return _with_style(build(None), style_given)
    from vitlab.checkpoints import resolve

    model, source = _load_source(resolve(pretrained), entry.family, build)
    names = _class_names(source)
    if names is not None and len(names) == model.num_classes:
        model.class_names = names
    if repo is not None and weights is None and not _records_preprocessing(source):
        _warn_default_preprocessing(repo, name, model)
    _apply_preprocessing_style(source, model, given=set(overrides) | set(style_given), weights_style=weights_style)
    score = _score_function(source)
    if score != "softmax" and model.num_classes:
        model.score_function = score
    log.info("loaded %s weights from %s", source.format, source.path)
    return _with_style(model, style_given)


def _create_features(name: str, *, features_only: bool = False, out_indices: Any = None,
                     output_fmt: str | None = None, **kwargs: Any) -> nn.Module:
    """``create_model(name, features_only=True, ...)``: the classifier built as usual, wrapped as timm's feature
    extractor (:func:`vitlab.models.features.features_only_model`)."""
    from vitlab.models.features import features_only_model

    if not features_only:
        raise TypeError(f"create_model({name!r}): out_indices needs features_only=True (a feature extractor)")
    base = name.partition(".")[0]
    if not name.startswith("hf-hub:") and "/" not in name and ":" not in name:
        entry = _get_entry(base, name.partition(".")[2])
        if entry.task != "classification":
            raise ValueError(f"create_model({name!r}, features_only=True): {base} is a {entry.task} model; "
                             f"features_only takes a classifier's name (its backbone's, e.g. vit_small_patch16_224)")
    model = create_model(name, **kwargs)
    return features_only_model(name, get_entry(model.model_name), model, out_indices, output_fmt)


def _with_style(model: nn.Module, style: dict[str, Any]) -> nn.Module:
    """``model`` with the preprocessing ``style`` the caller gave over what it has (checked by Preprocessing)."""
    if style:
        from vitlab.models.base import set_preprocessing_style

        if getattr(model, "preprocessing", None) is None:
            raise TypeError(f"create_model({model.model_name!r}): {', '.join(sorted(style))}: the model has no "
                            f"image preprocessing to set")
        set_preprocessing_style(model, **{**getattr(model, "preprocessing_style", {}), **style})
    return model


def _build_entry(entry: Any, cfg: Any) -> nn.Module:
    """``entry``'s model built from ``cfg``, with the preprocessing its name's weights were evaluated with beyond
    the config (``entry.style``: timm's pretrained_cfg crop mode)."""
    model = entry.build(cfg)
    if entry.style:
        from vitlab.models.base import set_preprocessing_style

        set_preprocessing_style(model, **dict(entry.style))
    return model


def _loaded_config(name: str, entry: Any, source: Any, *, overrides: dict[str, Any],
                   weights_overrides: dict[str, Any], num_classes: int | None = None,
                   img_size: int | tuple[int, int] | None = None) -> Any:
    """The config ``name`` is built with for ``source`` (None: no weights): the weights' row
    (``weights_overrides``), then what the file's tensors and config say, then the caller's options."""
    file_overrides: dict[str, Any] = {}
    if source is not None:
        if source.format == "vitlab":
            file_overrides = _vitlab_overrides(name, source)
        else:  # a timm hub folder's config.json over what the tensors say (e.g. average pooling without fc_norm)
            file_overrides = {**source.converted.overrides, **_timm_hub_overrides(entry, source)}
    if source is not None and source.format != "vitlab" and "fc_norm" in overrides and "global_pool" not in overrides:
        # the pooling a converter reads off the norms is a guess from where the final norm sits (fc_norm or
        # norm); a caller who states fc_norm alone means the family's own pooling with it, as timm's
        # create_model(..., use_fc_norm=False) does (BEiT: averaging, the norm before it)
        file_overrides.pop("global_pool", None)
    cfg_overrides = {**weights_overrides, **file_overrides, **overrides}
    if num_classes is not None:
        cfg_overrides["num_classes"] = num_classes
    if img_size is not None:
        cfg_overrides["img_size"] = img_size
    return _apply_overrides(name, entry.config, cfg_overrides)


def source_config(name: str, source: Any, *, repo: str | None = None, **overrides: Any) -> Any:
    """The config ``create_model(name, pretrained=...)`` builds for the read ``source``
    (:func:`vitlab.checkpoints.read_source`) with ``overrides``, without building the model; ``repo``: the
    ``hf-hub:`` repo it came from (its models/pretrained.json row applies)."""
    from vitlab.models.base import STYLE_FIELDS
    from vitlab.models.pretrained import weights_of_hub, weights_settings

    entry = _get_entry(name, "")
    row = weights_of_hub(repo, name) if repo is not None else None
    fields = {f.name for f in dataclasses.fields(entry.config)}
    overrides = {k: v for k, v in overrides.items() if k in fields or k not in STYLE_FIELDS}  # no style: no model
    weights_overrides = weights_settings(row, fields)[0] if row is not None else {}
    return _loaded_config(name, entry, source, overrides=overrides, weights_overrides=weights_overrides)


def _build_loaded(name: str, entry: Any, source: Any, *, overrides: dict[str, Any],
                  weights_overrides: dict[str, Any], num_classes: int | None,
                  img_size: int | tuple[int, int] | None) -> nn.Module:
    """The model ``name`` built with what ``source`` (None: no weights), the weights' row and the caller set,
    with the source's weights loaded strictly."""
    try:
        cfg = _loaded_config(name, entry, source, overrides=overrides, weights_overrides=weights_overrides,
                             num_classes=num_classes, img_size=img_size)
        model = _build_entry(entry, cfg)
        model.model_name = name
        if source is not None:
            from vitlab.checkpoints import CheckpointError, adapt_state_dict, load_strict

            label = str(source.path)
            prefix = source.key_prefix
            if prefix is not None and all(k.startswith(prefix) for k in source.converted.state_dict) and not (
                    set(source.converted.state_dict) & set(model.state_dict())):
                # none fits as it is (create_model tries them without the prefix): say so before adapting them
                raise CheckpointError(f"{label}: none of its keys is one of {name}'s")
            sd = source.converted.state_dict
            # the checkpoint's own classes (num_classes not given: predict, eval, export, a teacher): a head of
            # another shape means another width, which load_strict reports; it is never replaced
            sd = (adapt_state_dict(sd, model, source=label) if num_classes is not None
                  else _adapted_keeping_heads(sd, model, label))
            load_strict(model, sd, source=label)
    except ValueError as e:  # a file of another family fails anywhere here: sizes, tables, keys
        if source is not None:
            from vitlab.checkpoints.load import refuse_other_family

            refuse_other_family(source, entry.family, name, e)
        raise
    return model


def _adapted_keeping_heads(sd: dict[str, Any], model: nn.Module, label: str) -> dict[str, Any]:
    """``adapt_state_dict`` (position tables, channels), except that classifier tensors of another shape than the
    model's stay as they are, so that :func:`load_strict` names them with every other misfit: no new head."""
    import copy

    from vitlab.checkpoints import adapt_state_dict
    from vitlab.checkpoints.adapt import classifier_prefixes

    target = model.state_dict()
    heads = classifier_prefixes(model)
    misfit = {k: v for k, v in sd.items()
              if k.split(".")[0] in heads and k in target and v.shape != target[k].shape}
    if not misfit:
        return adapt_state_dict(sd, model, source=label)
    stand_in = copy.copy(sd)  # the model's own head tensors in their place: adapt_state_dict keeps them
    stand_in.update({k: target[k] for k in misfit})
    out = adapt_state_dict(stand_in, model, source=label)
    out.update(misfit)
    return out


# how many leading components (``model.``, ``net.backbone.``) loading removes at most to make the keys fit
_MAX_STRIPPED = 3


def _load_source(path: Any, family: str, build: Callable[[Any], nn.Module]) -> tuple[nn.Module, Any]:
    """``build(read_source(path))``; when that fails and every key of the file starts with the same component
    (``model.``: a PyTorch Lightning module holding the network as ``self.model``), the keys without it are tried
    (a layout that needs the component loads on the first try and is left alone). An error that remains says
    that every key had the component."""
    from vitlab.checkpoints import CheckpointError, read_source

    strip: str | None = None
    first: ValueError | None = None
    while True:
        source = None
        try:
            source = read_source(path, family, strip_prefix=strip)
            model = build(source)
        except ValueError as e:
            prefix = source.key_prefix if source is not None else getattr(e, "key_prefix", None)
            if first is None:
                first = e
            if prefix is None or (strip or "").count(".") >= _MAX_STRIPPED:
                if strip is None:
                    raise
                detail = str(e).strip().replace("\n", "\n    ")
                raise CheckpointError(f"{first}\n  Every key of {path} starts with {strip!r} (a wrapper's attribute, "
                                      f"e.g. a PyTorch Lightning module's self.{strip.split('.')[0]}?); without it "
                                      f"the keys do not fit either:\n    {detail}") from first
            strip = (strip or "") + prefix
            continue
        if strip is not None:
            log.info("%s: every key started with %r (a wrapper's attribute name); loaded them without it", path,
                     strip)
        return model, source


def _get_entry(name: str, tag: str) -> Any:
    """The registry entry of ``name``; an unknown ``name.tag`` suggests names with that tag only (a suggestion
    without it would load other weights)."""
    try:
        return get_entry(name)
    except ValueError:
        if not tag:
            raise
    import difflib

    from vitlab.models.registry import list_models

    close = difflib.get_close_matches(f"{name}.{tag}", list_models(pretrained=True, task=None), n=3)
    hint = (f"; did you mean {', '.join(close)}?" if close else
            "; `vitlab models PATTERN --pretrained` lists the published weights as NAME.TAG")
    raise ValueError(f"unknown model {name!r} (in {name}.{tag}){hint}")


def _tag_needs_pretrained(name: str, tag: str, pretrained: Any) -> str:
    """A ``NAME.TAG`` without pretrained=True (also ``--model NAME.TAG`` on the command line): how to get those
    weights, in Python and on the command line."""
    from vitlab.models.pretrained import find_weights

    full = f"{name}.{tag}"
    try:
        row = find_weights(name, tag)
    except ValueError as e:
        text = f"{full!r}: {e}"
    else:
        text = (f"{full!r} names published weights, which only pretrained=True loads: create_model({full!r}, "
                f"pretrained=True) in Python; on the command line `vitlab finetune --from {full}`, and "
                f"`--checkpoint {row.hub}` for predict, eval and the other commands that take --checkpoint")
    if pretrained is not None:
        text += f". To load {str(pretrained)!r}, name the architecture alone: {name} (--model {name})"
    return text


def _not_a_model_name(name: str) -> str:
    """A hub repo id (or a path) given as the model name: the spellings that load it. (timm, too, refuses a repo id
    without its prefix: loading the registry's model of the same basename would load other weights.)"""
    import re

    from vitlab.models.pretrained import weights_of_hub

    repo = name.rpartition(":")[2]
    text = f"create_model({name!r}): not a registered model name"
    if re.fullmatch(r"[\w.-]+/[\w.-]+(@[\w./-]+)?", repo):
        text += (f"; a Hugging Face hub repo is named with the hf-hub: prefix: create_model('hf-hub:{repo}') "
                 f"(built as the architecture its config.json names)")
        row = weights_of_hub(repo)
        if row is not None:
            text += (f", or create_model('{row.model}.{row.tag}', pretrained=True), as models/pretrained.json lists "
                     f"the repo")
    return text + "; a file: create_model(NAME, pretrained=PATH)"


def _create_from_hub_name(name: str, pretrained: Any, **kwargs: Any) -> nn.Module:
    """``create_model("hf-hub:ORG/NAME")``, as timm reads it: the repo's weights, built as the architecture its
    config.json names (or the model models/pretrained.json lists the repo for)."""
    from vitlab.checkpoints.load import HF_HUB_PREFIX, hub_repo

    if pretrained not in (None, True):
        raise ValueError(f"create_model({name!r}, pretrained={pretrained!r}): a hub repo as the name loads its own "
                         f"weights; give one source: create_model({name!r}), or create_model(MODEL, "
                         f"pretrained={pretrained!r}) (MODEL alone builds the architecture without weights)")
    source = HF_HUB_PREFIX + hub_repo(name)
    return create_model(model_name_of(source), pretrained=source, **kwargs)


def _records_preprocessing(source: Any) -> bool:
    """Whether ``source``'s files state how its images are prepared."""
    if source.format == "vitlab" or source.meta.get("hf_processor") is not None:
        return True
    return bool((source.meta.get("timm_config") or {}).get("pretrained_cfg"))


def _warn_default_preprocessing(repo: str, name: str, model: nn.Module) -> None:
    from vitlab.models.pretrained import weights_of_hub

    other = weights_of_hub(repo)
    listed = (f"; models/pretrained.json lists it for {other.model}, not {name}" if other is not None else
              "; models/pretrained.json does not list it")
    pre = getattr(model, "preprocessing", None)
    if pre is None:
        return
    log.warning("hf-hub:%s: the repo states no preprocessing (no preprocessor_config.json, no timm pretrained_cfg)%s: "
                "using %s's default preprocessing (mean %s, std %s, %s, crop_pct %s); check it against the weights' "
                "model card", repo, listed, name, tuple(pre.mean), tuple(pre.std), pre.interpolation, pre.crop_pct)


def _timm_hub_overrides(entry: Any, source: Any) -> dict[str, Any]:
    """The config fields a timm hub folder's config.json sets (``model_args``, ``pretrained_cfg``); {} otherwise."""
    config = source.meta.get("timm_config")
    if not config:
        return {}
    from vitlab.checkpoints import CheckpointError
    from vitlab.checkpoints.timm_hub import timm_hub_overrides

    try:
        return timm_hub_overrides(config, entry.family, entry.config)
    except ValueError as e:
        raise CheckpointError(f"{_timm_config_file(source)}: {e}") from e


def _apply_preprocessing_style(source: Any, model: nn.Module, *, given: set[str],
                               weights_style: dict[str, Any]) -> None:
    """The preprocessing a checkpoint's files record beyond its config: a vitlab file's ``preprocessing_style``, a
    Hugging Face folder's preprocessor_config.json, a timm hub config's interpolation and crop mode. Fields the
    caller gave (``overrides``) win; what vitlab cannot follow is a warning."""
    from vitlab.checkpoints import CheckpointError
    from vitlab.models.base import STYLE_FIELDS, set_preprocessing_style

    pre = getattr(model, "preprocessing", None)
    if pre is None:
        return
    style: dict[str, Any] = {}
    notes: list[str] = []
    where = str(source.path)
    if source.format == "vitlab":
        # the file's preprocessing decides the fields a name's style sets (a file written before the name had
        # one), then its recorded style
        recorded = source.meta.get("preprocessing") or {}
        style = {k: _tuplify(recorded[k]) for k in getattr(model, "preprocessing_style", {}) if k in recorded}
        style.update(source.meta.get("preprocessing_style") or {})
    elif source.meta.get("hf_processor") is not None and getattr(model, "task", "classification") == "classification":
        from vitlab.checkpoints.hf_processor import processor_style

        where = str(source.path.parent / "preprocessor_config.json")
        style, notes = processor_style(source.meta["hf_processor"], tuple(pre.input_size[1:]))
    elif source.meta.get("hf_processor") is not None and getattr(model, "task", None) == "detection":
        where = str(source.path.parent / "preprocessor_config.json")
        style, notes = _detection_processor_style(source.meta["hf_processor"], model, given)
    elif source.meta.get("timm_config"):
        from vitlab.checkpoints.timm_hub import timm_hub_style

        where = str(_timm_config_file(source))
        style, notes = timm_hub_style(source.meta["timm_config"])
        if source.meta.get("timm_file"):  # a timm export records vitlab's whole preprocessing: all of it
            recorded = source.meta["timm_file"].get("preprocessing") or {}
            style.update({k: _tuplify(recorded[k]) for k in STYLE_FIELDS if k in recorded})
    style = {**weights_style, **style}
    style = {k: v for k, v in style.items() if k in STYLE_FIELDS and k not in given
             and (source.format == "vitlab" or _differs(v, getattr(pre, k)))}
    for note in notes:
        log.warning("%s: %s", where, note)
    if style:
        try:
            set_preprocessing_style(model, **{**getattr(model, "preprocessing_style", {}), **style})
        except ValueError as e:
            raise CheckpointError(f"{where}: {e}") from e
        if source.format != "vitlab":
            log.info("%s: preprocessing %s", where, ", ".join(f"{k}={v}" for k, v in sorted(style.items())))


def _detection_processor_style(config: dict[str, Any], model: nn.Module,
                               given: set[str]) -> tuple[dict[str, Any], list[str]]:
    """A Hugging Face DETR processor (``DetrImageProcessor``) on a vitlab detector: its ``size`` sets the model's
    resize (``shortest_edge`` / ``longest_edge``; a square ``{"height", "width"}``: squash), and the returned style
    its normalisation (``image_mean`` / ``image_std`` with ``do_rescale`` / ``rescale_factor`` / ``do_normalize``,
    as vitlab scales pixels to [0, 1] before normalising); notes on what vitlab does otherwise."""
    from vitlab.checkpoints.hf_processor import normalisation

    notes: list[str] = []
    style: dict[str, Any] = {}
    size = config.get("size")
    if isinstance(size, (int, float)):  # the processor's legacy integer size: the shortest edge, 1333 at most
        size = {"shortest_edge": int(size), "longest_edge": int(config.get("max_size") or 1333)}
    if config.get("do_resize", True) is False:
        notes.append("do_resize is false: vitlab resizes images to the model's input size")
    elif isinstance(size, dict) and "img_size" not in given and hasattr(model, "set_resize"):
        if "shortest_edge" in size:
            longest = size.get("longest_edge")
            model.set_resize(int(size["shortest_edge"]), None if longest is None else int(longest))
        elif "height" in size and "width" in size and int(size["height"]) == int(size["width"]):
            model.set_resize(int(size["height"]))
            style["crop_mode"] = "squash"
        else:
            notes.append(f"size {size!r} is not a size vitlab's detection transform reads (shortest_edge / "
                         f"longest_edge, or a square height / width); using the model's resize")
    if config.get("resample", 2) not in (2, "bilinear"):
        notes.append(f"resample {config['resample']!r}: vitlab resizes detection images bilinearly")
    norm = normalisation(config)  # the same mean / std a classifier's processor gives
    channels = model.preprocessing.input_size[0]
    for key, values in norm.items():  # one value for every channel
        style[key] = tuple(values) * channels if len(values) == 1 else tuple(values)
    return style, notes


SCORE_FUNCTIONS = ("softmax", "sigmoid", "none")


def _score_function(source: Any) -> str:
    """How a checkpoint's logits become scores: a vitlab file's (or a single-file timm export's)
    ``score_function``; for a Hugging Face config, as transformers' image-classification pipeline decides (sigmoid
    for ``problem_type`` multi_label_classification or a single label, none for regression, else softmax); for a
    timm hub folder, its config's ``problem_type`` (written by ``vitlab export --format timm``)."""
    if source.format == "vitlab":
        score = source.meta.get("score_function", "softmax")
        return score if score in SCORE_FUNCTIONS else "softmax"
    if "timm_file" in source.meta:  # save_timm's file: the score function in its safetensors metadata
        from vitlab.checkpoints.load import safetensors_header

        score = safetensors_header(source.path).get("score_function", "softmax")
        return score if score in SCORE_FUNCTIONS else "softmax"
    if "timm_config" in source.meta:
        problem = (source.meta.get("timm_config") or {}).get("problem_type")
        return {"multi_label_classification": "sigmoid", "regression": "none"}.get(problem, "softmax")
    config = source.meta.get("config") or {}
    if source.format != "hf" or not config:
        return "softmax"
    problem = config.get("problem_type")
    labels = config.get("num_labels", len(config.get("id2label") or {}) or None)
    if problem == "regression":
        return "none"
    if problem == "multi_label_classification" or labels == 1:
        return "sigmoid"
    return "softmax"


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) != len(b) or any(abs(float(x) - float(y)) > 1e-9 for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) > 1e-9
    return a != b


def _class_names(source: Any) -> list[str] | None:
    """Class names a checkpoint carries: vitlab metadata, a Hugging Face config's id2label, or a timm hub
    config's label_names."""
    if source.format == "vitlab":
        names = source.meta.get("class_names")
        return list(names) if names else None
    if source.meta.get("timm_config"):
        from vitlab.checkpoints.timm_hub import timm_hub_class_names

        return timm_hub_class_names(source.meta["timm_config"])
    id2label = (source.meta.get("config") or {}).get("id2label")
    if source.format == "hf" and id2label:
        try:
            return [str(id2label[k]) for k in sorted(id2label, key=int)]
        except (ValueError, TypeError):
            return None
    return None


def _vitlab_overrides(name: str, source: Any) -> dict[str, Any]:
    """A vitlab checkpoint carries its whole config; it must be of the same family as ``name``."""
    meta = source.meta
    saved_entry = get_entry(meta["model"]) if _is_registered(meta["model"]) else None
    entry = get_entry(name)
    if saved_entry is not None and saved_entry.family != entry.family:
        from vitlab.checkpoints import CheckpointError

        raise CheckpointError(
            f"{source.path}: a checkpoint of {meta['model']} ({saved_entry.family}), not of the "
            f"{entry.family} family that {name} belongs to"
        )
    if meta["model"] != name:  # same family, another variant: the file's config (sizes included) is what is built
        log.info("%s holds a %s; built with its recorded config under the name %s", source.path, meta["model"], name)
    return {k: _tuplify(v) for k, v in meta["config"].items()}


def _is_registered(name: str) -> bool:
    try:
        get_entry(name)
        return True
    except ValueError:
        return False


def _tuplify(v: Any) -> Any:
    return tuple(_tuplify(x) for x in v) if isinstance(v, list) else v


def load_model(path: str | os.PathLike, *, model_name: str | None = None, num_classes: int | None = None,
               img_size: int | tuple[int, int] | None = None, **overrides: Any) -> nn.Module:
    """Load a self-describing checkpoint (vitlab's own, or a Hugging Face or timm hub folder) without naming the
    model.

    ``model_name``: the registered architecture, for weights that do not name it (timm, JAX or official files):
    the same as ``create_model(model_name, pretrained=path)``.
    """
    name = model_name if model_name is not None else model_name_of(path)
    return create_model(name, pretrained=path, num_classes=num_classes, img_size=img_size, **overrides)


def onnx_file_message(p: Any) -> str:
    return (f"{p} is an ONNX file: it runs with `vitlab predict`, `eval`, `detect` and `segment`; this needs the "
            f"PyTorch checkpoint it was exported from")


def model_name_of(path: str | os.PathLike) -> str:
    """The registered name that builds a self-describing checkpoint: the model a vitlab checkpoint (or run folder)
    records, the timm model a hub folder's config.json names, or the family of a Hugging Face folder's ``model_type`` (whose
    config then sets the size); an ``hf-hub:`` repo without config.json: the model models/pretrained.json lists it
    for. Weights that do not name their architecture are a CheckpointError saying so."""
    from vitlab.checkpoints import CheckpointError, read_vitlab, resolve
    from vitlab.checkpoints.io import read_json
    from vitlab.checkpoints.load import hub_repo

    p = resolve(path)
    repo = hub_repo(path)
    if repo is not None and not (p / "config.json").exists():  # weights alone, as timm caches a repo
        from vitlab.models.pretrained import weights_of_hub

        row = weights_of_hub(repo)
        if row is not None:
            return row.model
    if p.name.lower().endswith(".onnx"):
        raise CheckpointError(onnx_file_message(p))
    if p.is_dir() and not (p / "config.json").exists() and (p / "model.safetensors").is_file():
        p = p / "model.safetensors"  # a vitlab run folder (its weights load from the folder too)
    if p.is_dir() or not p.name.endswith(".safetensors"):
        cfg_path = p / "config.json" if p.is_dir() else None
        if cfg_path is None or not cfg_path.exists():
            raise CheckpointError(f"{p}: neither a vitlab checkpoint nor a folder with config.json; for other "
                                  f"weights name the architecture: --model NAME on the command line, "
                                  f"vitlab.load_model({str(p)!r}, model_name=NAME) in Python")
        cfg = read_json(cfg_path)
        arch = cfg.get("architecture")  # a timm hub folder: config.json names the timm model, weights in timm's keys
        if isinstance(arch, str) and _is_registered(arch.partition(".")[0]):
            return arch.partition(".")[0]
        if isinstance(arch, str) and "model_type" not in cfg:  # a timm hub folder of a model vitlab has no name for
            if _timm_resnet_variant(arch):
                raise CheckpointError(f"{cfg_path}: timm architecture {arch!r} is a ResNet variant that vitlab's ResNet "
                                      f"does not build (vitlab's is the plain v1.5 resnet18 / 34 / 50): loaded as one "
                                      f"it would compute something else")
            raise CheckpointError(f"{cfg_path}: timm architecture {arch!r} is not a vitlab model name (`vitlab models` "
                                  f"lists them); if it is a variant of one, name it: --model NAME on the command "
                                  f"line, vitlab.load_model({str(p)!r}, model_name=NAME) in Python")
        from vitlab.checkpoints.converters import hf_model_name, hf_model_types

        model_type = cfg.get("model_type")
        family_default = hf_model_types()  # each family's converter module registers the model_types it reads
        if model_type not in family_default:
            raise CheckpointError(f"{cfg_path}: model_type {model_type!r} is not one vitlab reads "
                                  f"(known: {', '.join(family_default)})")
        return hf_model_name(model_type, cfg)
    got = read_vitlab(p)
    if got is None and (name := _timm_file_model_name(p)) is not None:
        return name
    if got is None:
        raise CheckpointError(
            f"{p}: not a vitlab checkpoint (no vitlab metadata), so the architecture is unknown; name it: "
            f"--model NAME on the command line, vitlab.load_model({str(p)!r}, model_name=NAME) in Python"
        )
    name = got[1].get("model")
    if not isinstance(name, str) or not _is_registered(name):
        tokenizer = p.with_name("tokenizer.safetensors")
        hint = (f"; it is a tokenizer's training state: use {tokenizer} as `vitlab pretrain --method beit|beit2 "
                f"--tokenizer`" if tokenizer.is_file() else "")
        raise CheckpointError(f"{p}: its metadata names the model {name!r}, which is not a registered vitlab "
                              f"model (see `vitlab models`){hint}")
    return name


def _timm_resnet_variant(arch: str) -> bool:
    """Whether a timm architecture is a ResNet of another build than vitlab's plain one (a hub folder of one is
    refused by name: the anti-aliased ones hold the plain ResNet's tensors). timm's plain ``resnet<depth>`` is not:
    vitlab reads it as its ResNet sized from the tensors (``--model resnet50``)."""
    base = arch.partition(".")[0]
    return (base.startswith(("seresnet", "ecaresnet", "skresnet", "resnext", "wide_resnet", "gcresnet",
                             "legacy_seresnet", "seresnext"))
            or (base.startswith("resnet") and re.fullmatch(r"resnet\d+", base) is None))


def _timm_file_model_name(p: Path) -> str | None:
    """The registered name of a file that ``vitlab export --format timm`` wrote: the vitlab model it records, else
    its timm model where vitlab has that name; None for any other file (a CheckpointError when neither is
    registered)."""
    from vitlab.checkpoints import CheckpointError
    from vitlab.checkpoints.load import safetensors_header, timm_file_meta

    meta = timm_file_meta(safetensors_header(p), p)
    if meta is None:
        return None
    own, timm_name = meta["timm_file"].get("vitlab_model"), meta["timm_config"]["architecture"]
    names = [n for n in (own, str(timm_name).partition(".")[0]) if isinstance(n, str) and _is_registered(n)]
    if len(names) == 2 and names[0] != names[1]:
        mine, timms = (_timm_file_config(n, meta["timm_config"]) for n in names)
        if timms is not None and mine != timms:  # the vitlab name misses what timm's implies (DeiT's distillation)
            return names[1]
    if names:
        return names[0]
    raise CheckpointError(f"{p}: a timm export of {own or timm_name!r} (timm model {timm_name!r}), which is not a "
                          f"registered vitlab model (see `vitlab models`); if it is a variant of one, name it: --model "
                          f"NAME on the command line, vitlab.load_model({str(p)!r}, model_name=NAME) in Python")


def _timm_file_config(name: str, timm_config: dict[str, Any]) -> Any:
    """The config ``name`` builds with a timm export's arguments (None where they do not apply to it)."""
    from vitlab.checkpoints.timm_hub import timm_hub_overrides

    entry = get_entry(name)
    try:
        return _apply_overrides(name, entry.config, timm_hub_overrides(timm_config, entry.family, entry.config))
    except (TypeError, ValueError):
        return None


def _timm_config_file(source: Any) -> Path:
    """Where a source's timm config comes from: a hub folder's config.json, or a timm export's own metadata."""
    return source.path if source.meta.get("timm_file") else source.path.parent / "config.json"


def model_info(name: str, **overrides: Any) -> dict[str, Any]:
    """Parameters, GMACs at the default input size, and default preprocessing of a registered model."""
    from torch.utils.flop_counter import FlopCounterMode

    from vitlab.models.pretrained import pretrained_weights

    entry = get_entry(name)
    cfg = _apply_overrides(name, entry.config, overrides)
    with torch.device("meta"):  # no memory and no init cost, even for ViT-H
        model = _build_entry(entry, cfg)
        pre: Preprocessing = model.preprocessing
        x = torch.empty(1, *pre.input_size)
        with FlopCounterMode(display=False) as counter:
            model(x)
    params = sum(p.numel() for p in model.parameters())
    return {
        "name": name,
        "family": entry.family,
        "description": entry.description,
        "params": params,
        "params_m": round(params / 1e6, 2),
        "gmacs": round(counter.get_total_flops() / 2 / 1e9, 2),
        "num_classes": model.num_classes,
        "preprocessing": pre.to_dict(),
        "pretrained": [dataclasses.asdict(w) for w in pretrained_weights(name)],
        "config": dataclasses.asdict(cfg),
    }
