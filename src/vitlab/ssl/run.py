"""A pre-training job: what ``vitlab pretrain`` runs.

It builds the training split of a data source (labels are ignored), a backbone without a classifier, the
method's objective and data augmentation, and runs :func:`vitlab.train.fit`. The run directory's
``model.safetensors`` is the backbone: ``vitlab finetune --from DIR/model.safetensors``, ``eval``,
``fewshot`` and ``explain`` read it as it is. DINO also writes the teacher backbone
(``teacher.safetensors``, the one the paper evaluates).

What pre-training leaves out of its data, so that a later fine-tuning or evaluation on the same source is not
measured on images it was pre-trained on: a source's own test set (digits', MNIST's and CIFAR's, a folder's
``test/``) and a folder's ``val/`` are never read. A labelled image folder without a ``val/`` folder has its
validation split (and, without ``test/``, its test split) drawn from the training images by seed and
``val_fraction``: there pre-training leaves out the part that ``vitlab finetune`` (its default recipe's
``val_fraction``, 0.1) and ``vitlab eval`` hold out by default, drawn with the same split code and the run's
seed, records it (``job.json``'s ``held_out``; ``recipe.json``'s ``val_fraction``, which ``eval`` reads) and
logs it; fine-tune with the same ``--seed`` (0 unless changed) to hold out the same images. ``--set
val_fraction=0`` pre-trains on every training image, with a warning naming the overlap. The shipped
pre-training recipes' ``val_fraction`` 0 otherwise means: the whole training split. (The training sets of
digits, MNIST and CIFAR are pre-trained on whole: a validation part that fine-tuning draws from them with
``val_fraction`` was seen without labels.)

The tokenizer methods train a tokenizer for BEiT instead of a backbone: ``dvae`` trains a discrete VAE
with one token per patch of the recipe's (or ``--model``'s) backbone (the run's ``model.safetensors``
is then the dVAE, not a backbone), ``vqkd`` trains BEiT v2's tokenizer whose encoder is the backbone
(against ``--teacher``'s features). Both write ``tokenizer.safetensors``, which ``--method beit`` and
``--method beit2`` read with ``--tokenizer`` (the file or the run directory). A beit / beit2 run keeps a
copy of the tokenizer it uses (the fitted k-means codebook included) as its own ``tokenizer.safetensors``:
``--resume`` reads it from there.

Options (``--opt KEY=VALUE``, :attr:`PretrainJob.options`) are checked before anything is built: each must
be one of the method's (its objective's keyword arguments, the dVAE's model options, and the job's own:
``num_local`` / ``local_size`` for dino, ``tokenizer_iters`` for beit), of the type its annotation says
(a bool is ``true`` / ``false``, numbers are numbers). ``--resume`` is checked (method, model, data,
optimiser, the objective's saved state, and vqkd's ``--teacher`` weights against the fingerprint in
``job.json``) before the run directory is touched: a refused resume leaves it as it was.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitlab.ssl import METHODS
from vitlab.ssl.tokenizer import TOKENIZER_FILE, save_tokenizer
from vitlab.train.distributed import distributed_context
from vitlab.train.objective import Objective
from vitlab.train.recipe import Recipe, changed_fields, plain
from vitlab.train.trainer import atomic_text, fit

log = logging.getLogger(__name__)

TEACHER_FILE = "teacher.safetensors"
# what each method needs from the backbone, unless the recipe or --set says otherwise
METHOD_MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "mae": {"pos_embed": "sincos"},  # MAE's encoder has fixed 2-D sin-cos positions
    "dino": {"dynamic_img_size": True},  # local crops at their own resolution, where the family can take it
    "mpp": {},
    "beit": {},
    "beit2": {},
    "dvae": {},
    "vqkd": {},
}
# defaults a method does without when the family cannot take them (the backbone then runs at one size)
OPTIONAL_MODEL_DEFAULTS = {"dino": ("dynamic_img_size",)}
MASKED_METHODS = ("mpp", "mae", "beit", "beit2")  # objectives that corrupt or drop patch tokens
TOKEN_METHODS = ("dvae", "vqkd")  # tokenizers with one token per patch of the backbone
# options of the job, not of the objective, by the method that reads them
RUN_OPTIONS: dict[str, dict[str, Any]] = {
    "dino": {"num_local": int, "local_size": int | None},  # the multi-crop transform
    "beit": {"tokenizer_iters": int},  # the k-means tokenizer's fit
}
# files given with --tokenizer / --teacher, by the methods that read them
PATH_OPTIONS = {"tokenizer": ("beit", "beit2"), "teacher": ("vqkd",)}
DINO_GLOBAL_CROPS = 2  # what vitlab.data.multicrop.MultiCropTransform makes
DINO_LOCAL_CROPS = 8  # the paper's (and MultiCropTransform's) default number of local crops
DINO_GLOBAL_SCALE = (0.4, 1.0)  # the global crops' area range (official DINO's global_crops_scale)
TOKENIZER_SAMPLE = 2000  # images whose patches fit BEiT's k-means tokenizer
FINETUNE_RECIPE = "vit_finetune"  # `vitlab finetune`'s default: its val_fraction is what fine-tuning holds out


@dataclass(kw_only=True)
class PretrainJob:
    method: str
    recipe: Recipe
    data: str
    output: Path
    model: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # --opt, --tokenizer, --teacher (check_options)
    device: str | None = None
    resume: bool = False
    overwrite: bool = False
    skip_bad_images: bool = False
    progress: bool = True
    until_step: int | None = None
    threads: int | None = None  # --threads: intra-op CPU threads (None: the recipe's, else torch's)
    # on a labelled folder without val/ and a recipe with val_fraction 0: leave out the part fine-tuning holds out
    # (False: the user asked for val_fraction 0 itself, --set val_fraction=0)
    hold_out: bool = True


# ---------------------------------------------------------------------------------------------- options
def _objective_classes() -> dict[str, type]:
    from vitlab.ssl import DINO, MAE, VQKD, BEiT, BEiT2, DVAEObjective, MaskedPatchPrediction

    return {"mae": MAE, "mpp": MaskedPatchPrediction, "dino": DINO, "beit": BEiT, "beit2": BEiT2,
            "dvae": DVAEObjective, "vqkd": VQKD}


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"--method {method!r}: choose one of {', '.join(METHODS)}")


def method_options(method: str) -> dict[str, Any]:
    """Every option ``method`` takes, with its type annotation: the objective's keyword arguments, the dVAE's
    model options (dvae) and the job's own (:data:`RUN_OPTIONS`)."""
    from vitlab.ssl.dvae import DVAE_MODEL_OPTIONS, DVAEConfig

    _check_method(method)
    cls = _objective_classes()[method]
    hints = typing.get_type_hints(cls.__init__)
    params = inspect.signature(cls.__init__).parameters
    out = {name: hints.get(name, Any) for name, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    if method == "dvae":
        config_hints = typing.get_type_hints(DVAEConfig)
        out.update({name: config_hints[name] for name in DVAE_MODEL_OPTIONS})
    out.update(RUN_OPTIONS.get(method, {}))
    return out


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` (read from JSON or a Python literal) has the annotated type; annotations of objects a
    command line cannot give (modules) accept anything: the constructor checks them."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, list) or hint in (tuple, list):
        return isinstance(value, (tuple, list))
    return True


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(json.dumps(a) for a in args)
    if args and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return " or ".join(_describe(a) for a in rest) + " (or null: the default)"
    return {bool: "a bool (true or false)", int: "a whole number", float: "a number", str: "a text"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def _shown(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _got(value: Any) -> str:
    if isinstance(value, str):
        return f"the text {value!r}"
    return {bool: "a bool", int: "a whole number", float: "a number", type(None): "null"}.get(
        type(value), f"a {type(value).__name__}")


def check_options(method: str, options: dict[str, Any]) -> None:
    """Refuse an option ``method`` does not take (naming the methods that take it) or a value of another type
    than the option's annotation (naming the option, the value and the type). ``tokenizer`` and ``teacher``
    are the files of ``--tokenizer`` / ``--teacher``."""
    mine = method_options(method)
    own = sorted(k for k in mine if k not in PATH_OPTIONS)
    for key, value in options.items():
        if key in PATH_OPTIONS:
            takers = PATH_OPTIONS[key]
            if method not in takers:
                what = {"tokenizer": "the visual tokenizer of BEiT's targets",
                        "teacher": "the model whose features VQ-KD's tokenizer learns"}[key]
                raise ValueError(f"--{key} is {what}, read by --method {' and '.join(takers)}; --method {method} "
                                 f"takes no {key}: leave --{key} out")
            continue
        if key not in mine:
            others = [m for m in METHODS if m != method and key in method_options(m)]
            where = (f"it is an option of --method {', '.join(others)}, not of {method}" if others
                     else f"--method {method} has no such option")
            raise ValueError(f"--opt {key}: {where}; {method}'s options: {', '.join(own) or 'none'}")
        if not _matches(value, mine[key]):
            raise ValueError(f"--opt {key}={_shown(value)}: {method}'s {key} takes {_describe(mine[key])}, got "
                             f"{_got(value)}")
    if method == "dino":
        if options.get("num_global", DINO_GLOBAL_CROPS) != DINO_GLOBAL_CROPS:
            raise ValueError(f"--opt num_global={_shown(options['num_global'])}: vitlab pretrain's multi-crop "
                             f"makes {DINO_GLOBAL_CROPS} global crops (the paper's); leave num_global out")
        if options.get("num_local", 0) < 0:
            raise ValueError(f"--opt num_local={options['num_local']}: the number of local crops is 0 or more "
                             f"(0: DINO on the two global crops alone, without multi-crop)")
        if options.get("local_size") is not None and options["local_size"] < 1:
            raise ValueError(f"--opt local_size={options['local_size']}: a side in pixels, at least 1")
    if method == "mpp" and not 1 <= options.get("bits", 3) <= 8:
        raise ValueError(f"--opt bits={options['bits']}: mpp's bits per channel of the target colour lie in 1..8 "
                         f"(the paper's 3)")
    if method == "beit" and options.get("tokenizer_iters", 1) < 1:
        raise ValueError(f"--opt tokenizer_iters={options['tokenizer_iters']}: k-means needs at least 1 iteration")


def _check_job_options(job: PretrainJob) -> None:
    """The options as the user gave them (before a resumed BEiT run substitutes its own tokenizer copy)."""
    check_options(job.method, job.options)
    if job.method == "beit" and job.options.get("tokenizer") and "tokenizer_iters" in job.options:
        raise ValueError("--opt tokenizer_iters fits beit's k-means tokenizer, and --tokenizer gives a trained one: "
                         "leave one of them out")


def build_objective(method: str, model: nn.Module, options: dict[str, Any]) -> Objective:
    """The method's objective over ``model`` (for ``dvae``: the DiscreteVAE) with ``options`` (``--opt``,
    ``--tokenizer``, ``--teacher``), checked by :func:`check_options` first."""
    from vitlab.ssl.dvae import DVAE_MODEL_OPTIONS

    check_options(method, options)
    skip = set(RUN_OPTIONS.get(method, {})) | (set(DVAE_MODEL_OPTIONS) if method == "dvae" else set())
    opts = {k: v for k, v in options.items() if k not in skip}
    if method == "beit2" and not opts.get("tokenizer"):
        raise ValueError("--method beit2 needs --tokenizer RUN_OR_FILE (a `vitlab pretrain --method vqkd` run)")
    if method == "vqkd":
        if not opts.get("teacher"):
            raise ValueError("--method vqkd needs --teacher CKPT: a vitlab checkpoint whose features the tokenizer "
                             "learns to reconstruct (e.g. a DINO run's teacher.safetensors)")
        opts["teacher"] = load_teacher(opts["teacher"])
    return _objective_classes()[method](model, **opts)


def load_teacher(path: str) -> nn.Module:
    """A frozen model from a vitlab checkpoint (or Hugging Face folder), for VQ-KD's targets."""
    import vitlab
    from vitlab.checkpoints import CheckpointError

    try:
        teacher = vitlab.load_model(path)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        raise ValueError(f"--teacher {path}: {e}") from e
    return teacher.eval().requires_grad_(False)


def _tokenizer_of(job: PretrainJob, model: nn.Module, objective: Objective) -> nn.Module | None:
    from vitlab.ssl.dvae import DVAETokenizer

    if job.method == "dvae":
        return DVAETokenizer(model)
    if job.method == "vqkd":
        return objective.tokenizer(model)
    return None


# ---------------------------------------------------------------------------------------------- DINO's crops
def _transform(job: PretrainJob, model: nn.Module):
    from vitlab.data import eval_transform, train_transform
    from vitlab.data.multicrop import MultiCropTransform

    recipe, pre = job.recipe, model.preprocessing
    if job.method == "dino":
        local, num_local = dino_crops(job, model)
        # the recipe's scale, where set, replaces DINO's global-crop range (the recipe default 0.08-1 is
        # RandomResizedCrop's, not DINO's); ratio applies to every crop (its default is DINO's 3/4-4/3)
        scale = DINO_GLOBAL_SCALE if plain(recipe.scale) == plain(Recipe().scale) else tuple(recipe.scale)
        if scale != DINO_GLOBAL_SCALE or plain(recipe.ratio) != plain(Recipe().ratio):
            log.info("DINO: global crops cover %g-%g of the image, every crop of aspect ratio %g-%g (recipe scale "
                     "and ratio)", *scale, *recipe.ratio)
        return MultiCropTransform(pre, local_size=local, num_local=num_local, global_scale=scale,
                                  ratio=tuple(recipe.ratio), hflip=recipe.hflip)
    if not recipe.augment:
        return eval_transform(pre)
    return train_transform(pre, scale=recipe.scale, ratio=recipe.ratio, hflip=recipe.hflip)


def unapplied_augmentation(method: str, recipe: Recipe) -> dict[str, Any]:
    """The recipe's augmentation and label fields, set to other values than the defaults, that pre-training with
    ``method`` does not apply: RandAugment, random erasing, Mixup / CutMix and label smoothing for every method;
    for DINO (its multi-crop is the augmentation) also ``augment`` switched off. The fields that ask for nothing
    (augmentation off, other than for DINO) are left out, as fit's own check does."""
    fields = ["randaugment", "randaugment_mstd", "re_prob", "mixup_alpha", "cutmix_alpha", "mixup_prob",
              "mixup_switch_prob", "label_smoothing", *(["augment"] if method == "dino" else [])]
    augmentation = frozenset() if method == "dino" else frozenset({"randaugment", "randaugment_mstd", "re_prob"})
    return {k: getattr(recipe, k) for k in changed_fields(recipe, fields, only_with_augment=augmentation)}


def _warn_unapplied(method: str, recipe: Recipe) -> None:
    ignored = unapplied_augmentation(method, recipe)
    if ignored:
        log.warning("pretrain: recipe field(s) %s are not applied by --method %s: pre-training applies only "
                    "%s; leave them out or set them to their defaults", ", ".join(
                        f"{k}={plain(v)!r}" for k, v in ignored.items()), method,
                    "the multi-crop transform (scale, ratio, hflip)" if method == "dino"
                    else "the random resized crop and flip (scale, ratio, hflip)")


def dino_crops(job: PretrainJob, model: nn.Module) -> tuple[int, int]:
    """(local crop side, number of local crops) of a DINO job, checked against the backbone and logged."""
    c, h, w = model.preprocessing.input_size
    num_local = int(job.options.get("num_local", DINO_LOCAL_CROPS))
    name = getattr(model, "model_name", type(model).__name__)
    local = job.options.get("local_size")
    if local is not None and num_local > 0 and not _runs_at(model, c, int(local)):
        raise ValueError(f"--opt local_size={local}: {name} does not run on {local} px crops (it was built for "
                         f"{h}x{w}); leave local_size out for a size it runs at")
    local = int(local) if local is not None else dino_local_size(model)
    if num_local == 0:
        log.info("DINO: %d global crops of %d px, no local crops (num_local=0: no multi-crop)", DINO_GLOBAL_CROPS, h)
    elif local >= h:
        log.info("DINO: %d global crops and %d local crops, all of %d px: %s runs only at its input size (a fixed "
                 "position table: BEiT's relative position tables, or a model built without dynamic_img_size), so "
                 "the local crops (5-40%% of the image) are resized to it, at the cost of a global crop each",
                 DINO_GLOBAL_CROPS, num_local, h, name)
    else:
        log.info("DINO: %d global crops of %d px and %d local crops of %d px", DINO_GLOBAL_CROPS, h, num_local, local)
    return local, num_local


def dino_local_size(model: nn.Module) -> int:
    """DINO's local crop side: 3/7 of the global one (96 of 224), a whole number of patches. A backbone
    without a patch grid (a convolutional tokenizer, Swin's windows, MobileViT) gets the nearest multiple of
    8, 16 or 32 it runs at, found by trying one blank image; a backbone that runs at its input size only
    (BEiT's relative position tables, a ViT built without ``dynamic_img_size``) gets that size."""
    from vitlab.ssl.masking import patch_grid

    c, h, _ = model.preprocessing.input_size
    try:
        _, patch = patch_grid(model)
    except TypeError:
        patch = None
    tried: list[int] = []
    for step in (patch[0],) if patch is not None else (8, 16, 32):
        side = max(step, round(h * 3 / 7 / step) * step)
        if side in tried:
            continue
        tried.append(side)
        if _runs_at(model, c, side):
            return side
    if h not in tried:
        tried.append(h)
        if _runs_at(model, c, h):
            return h
    raise ValueError(f"--method dino: {getattr(model, 'model_name', type(model).__name__)} does not run on local "
                     f"crops of {', '.join(map(str, tried))} px; give --opt local_size=N (a size it accepts)")


@torch.no_grad()
def _runs_at(model: nn.Module, chans: int, side: int) -> bool:
    was = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        model.forward_features(torch.zeros(1, chans, side, side, device=device))
        return True
    except (RuntimeError, ValueError, AssertionError):
        return False
    finally:
        model.train(was)


# ---------------------------------------------------------------------------------------------- the backbone
def build_backbone(job: PretrainJob, in_chans: int) -> nn.Module:
    import vitlab
    from vitlab.models import get_entry
    from vitlab.train.run import model_overrides

    recipe = job.recipe
    name = job.model or recipe.model
    if name is None:
        raise ValueError("no model: give --model NAME (see `vitlab models`)")
    entry = get_entry(name)
    if job.method in MASKED_METHODS + TOKEN_METHODS:
        with torch.device("meta"):  # the class, without memory or init cost
            probe = entry.build(entry.config)
        if "mask" not in inspect.signature(probe.forward_features).parameters:
            need = (f"--method {job.method} masks patch tokens" if job.method in MASKED_METHODS else
                    f"--method {job.method} makes one token per patch of the backbone (its patch grid is read "
                    f"through the token-masking hook)")
            raise ValueError(
                f"{need}, and {name} ({entry.family}) has no token-masking hook (forward_features(x, mask=...)): "
                f"use a ViT, DeiT or BEiT backbone; --method dino takes any backbone")
    # a method's model defaults apply where the family has the option (XCiT and MobileViT take any size anyway)
    fields = {f.name for f in dataclasses.fields(entry.config)}
    overrides = model_overrides(name, recipe, in_chans)
    # the method's own value given as an override (the mae recipe's pos_embed='sincos', kept for a name of the
    # recipe's family) is still the method's default: a refusal of it gets the same explanation
    optional = OPTIONAL_MODEL_DEFAULTS.get(job.method, ())
    defaults = {k: v for k, v in METHOD_MODEL_DEFAULTS.get(job.method, {}).items()
                if k in fields and (k not in overrides or (k not in optional and overrides[k] == v))}
    overrides = {k: v for k, v in overrides.items() if k not in defaults}
    torch.manual_seed(recipe.seed)
    try:
        return vitlab.create_model(name, num_classes=0, img_size=recipe.img_size, **defaults, **overrides)
    except ValueError as e:
        if not defaults:
            raise
        refused = e
    # was it the method's default? build without it (an error of the user's own options is raised from here)
    torch.manual_seed(recipe.seed)
    model = vitlab.create_model(name, num_classes=0, img_size=recipe.img_size, **overrides)
    given = ", ".join(f"{k}={v!r}" for k, v in defaults.items())
    if all(k in OPTIONAL_MODEL_DEFAULTS.get(job.method, ()) for k in defaults):
        log.info("%s cannot take %s, which --method %s sets where the family allows it (%s): it is built without",
                 name, given, job.method, refused)
        return model
    fix = " ".join(f"--set model_overrides.{k}={_model_default_alternative(k)}" for k in defaults)
    raise ValueError(f"--method {job.method} builds its backbone with {given} ({_model_default_reason(job.method)}), "
                     f"which {name} cannot take: {refused}. Build it with {fix} instead") from None


def _model_default_reason(method: str) -> str:
    return {"mae": "MAE's encoder has fixed 2-D sin-cos position embeddings"}.get(method, f"{method}'s default")


def _model_default_alternative(key: str) -> str:
    return {"pos_embed": "learn"}.get(key, "VALUE")


def _fit_tokenizer(objective, train_set, model: nn.Module, job: PretrainJob) -> None:
    """BEiT's k-means codebook from the first images of the training split (eval transform: no randomness)."""
    from vitlab.data import eval_transform

    train_set.transform = eval_transform(model.preprocessing)
    n = min(TOKENIZER_SAMPLE, len(train_set))
    images = torch.stack([train_set[i][0] for i in range(n)])
    objective.fit_tokenizer(images, iters=int(job.options.get("tokenizer_iters", 20)), seed=job.recipe.seed)
    log.info("BEiT tokenizer: k-means codebook of %d tokens fitted on the patches of %d images",
             objective.head.out_features, n)


# ---------------------------------------------------------------------------------------------- the held-out part
def finetuning_split(data: str) -> str | None:
    """How fine-tuning on ``data`` draws its held-out images from those pre-training reads: ``"val"`` for a
    labelled folder with ``test/`` and no ``val/``, ``"val+test"`` for one with neither, ``"mixed"`` for a folder
    of class folders and loose images without either (pre-training reads the loose images too, fine-tuning only
    the class folders: the two splits cannot be made the same), None when nothing of the training images is
    held out by default or the source is not a labelled folder."""
    from vitlab.data.build import parse_source
    from vitlab.data.errors import DatasetError
    from vitlab.data.folder import folder_layout
    from vitlab.data.image import is_image_file

    try:
        kind, path = parse_source(data)
        if kind != "folder":
            return None
        _, val_dir, test_dir = folder_layout(path)
    except (DatasetError, OSError):
        return None  # build_dataset reports the source
    if val_dir is not None:
        return None
    if test_dir is None and any(e.is_file() and not e.name.startswith(".") and is_image_file(e.name)
                                for e in path.iterdir()):
        return "mixed"
    return "val" if test_dir is not None else "val+test"


def _hold_out(job: PretrainJob, recipe: Recipe) -> tuple[Recipe, dict[str, Any] | None]:
    """The recipe whose val_fraction leaves out what fine-tuning on the job's data holds out by default (see the
    module docstring), logged, and the record of what is left out (None: nothing fine-tuning holds out by
    default); a warning where pre-training reads those images."""
    from vitlab.data import build_dataset
    from vitlab.data.errors import DatasetError
    from vitlab.train.recipe import load_recipe
    from vitlab.train.run import read_job

    if job.resume:  # the split the run had (also when --recipe names a recipe with val_fraction 0)
        recorded = read_job(job.output).get("held_out")
        if not isinstance(recorded, dict):
            return recipe, None
        if recipe.val_fraction == 0 and job.hold_out:
            recipe = recipe.replace(val_fraction=float(recorded.get("val_fraction", 0)))
        return recipe, recorded
    split = finetuning_split(job.data)
    if split is None:
        return recipe, None
    finetune = load_recipe(FINETUNE_RECIPE)
    what = "validation and test" if split == "val+test" else "validation"
    chosen = recipe.val_fraction == 0 and job.hold_out and split != "mixed"
    if chosen:
        recipe = recipe.replace(val_fraction=finetune.val_fraction)
    if recipe.val_fraction > 0 and split != "mixed":
        try:
            n = len(build_dataset(job.data, split="val", val_fraction=recipe.val_fraction, seed=recipe.seed,
                                  unlabelled=True))
        except DatasetError:  # classes of one image each: nothing is held out (fine-tuning cannot either)
            n = 0
        if chosen:
            seed_note = ("" if recipe.seed == finetune.seed else
                         f"; fine-tune with --seed {recipe.seed} to hold out the same images (its default seed is "
                         f"{finetune.seed})")
            log.info("%s has no val/ folder: pre-training leaves out %d of its images, the %s split that `vitlab "
                     "finetune` and `vitlab eval` hold out of it by default (val_fraction %g, seed %d), so that "
                     "they are never measured on images pre-trained on (--set val_fraction=0 pre-trains on all of "
                     "them)%s", job.data, n, what, recipe.val_fraction, recipe.seed, seed_note)
        return recipe, {"split": what, "val_fraction": recipe.val_fraction, "seed": recipe.seed, "images": n}
    if recipe.val_fraction > 0:
        return recipe, None
    why = ("it holds loose images beside its class folders, which pre-training reads and fine-tuning does not, so "
           "its held-out part cannot be matched: move the loose images into a class folder or out of it, or "
           if split == "mixed" else "")
    log.warning("pre-training on every training image of %s (val_fraction 0): `vitlab finetune` and `vitlab eval` "
                "on it hold out part of these images as their %s split (val_fraction %g), and would be measured on "
                "images pre-trained on; %sgive the folder val/ and test/ folders of its own%s", job.data, what,
                finetune.val_fraction, why, "" if split == "mixed" else
                " (or leave val_fraction out: pre-training then leaves that part out)")
    return recipe, None


# ---------------------------------------------------------------------------------------------- resume
def _check_resumed_method(job: PretrainJob) -> None:
    """--resume with another method than the run's: refused before its options are read as this method's. The
    training state is the authority (a job.json that an earlier refused --resume rewrote may name another)."""
    from vitlab.train.run import JOB_FILE, read_job
    from vitlab.train.state import load_train_state
    from vitlab.train.trainer import STATE_FILE

    recorded = read_job(job.output).get("method")
    state_file = job.output / STATE_FILE
    trained = load_train_state(state_file, mmap=True).get("objective_name") if state_file.is_file() else None
    if trained is not None and trained != job.method:
        note = (f"; its {JOB_FILE} names {recorded}, rewritten by an earlier --resume that was refused"
                if recorded == job.method else "")
        raise ValueError(f"--resume: the run in {job.output} was pre-trained with --method {trained} (its "
                         f"{STATE_FILE}){note}; this asks for --method {job.method}: resume with --method {trained}, "
                         f"or start a new run (another --output)")
    if trained is None and recorded is not None and recorded != job.method:
        raise ValueError(f"--resume: the run in {job.output} pre-trains with --method {recorded} (its {JOB_FILE}); "
                         f"this asks for --method {job.method}: leave --method out to continue it, or start a new "
                         f"run (another --output)")


def _warn_changed_options(job: PretrainJob, *, same_teacher: bool = False) -> None:
    """--resume with other options than job.json's: a warning. ``same_teacher``: the teacher file's weights are
    the run's (its recorded fingerprint), so a teacher that moved is no change."""
    from vitlab.train.run import read_job

    def plain(d: dict[str, Any]) -> dict[str, Any]:
        return json.loads(json.dumps(d, default=str))

    recorded, asked = plain(read_job(job.output).get("options", {})), plain(job.options)
    if same_teacher and recorded.get("teacher") != asked.get("teacher"):
        log.info("--resume: the teacher moved (%s -> %s); its weights are the run's (the same fingerprint)",
                 recorded.get("teacher"), asked.get("teacher"))
    changed = [f"{k} {recorded.get(k)!r} -> {asked.get(k)!r}" for k in sorted(set(recorded) | set(asked))
               if recorded.get(k) != asked.get(k) and not (same_teacher and k == "teacher")]
    if changed:
        log.warning("--resume with other options than the run's (%s): it goes on from the saved state, and will not "
                    "match an uninterrupted run", ", ".join(changed))


def _teacher_fingerprint(job: PretrainJob, objective: Objective) -> str | None:
    """The fingerprint of the external teacher whose weights the objective reads and does not save (vqkd's
    ``--teacher``; None for the other methods: DINO's teacher and BEiT's tokenizer are in the training state).
    On --resume, a teacher whose weights are not those recorded in job.json (the file replaced meanwhile) is
    refused; the same weights at another path are accepted."""
    from vitlab.checkpoints import CheckpointError
    from vitlab.train.run import JOB_FILE, _modified, _short, read_job, weights_fingerprint

    teacher = getattr(objective, "teacher", None)
    if teacher is None or "teacher" not in objective.unsaved:
        return None
    fingerprint = weights_fingerprint(teacher)
    recorded = read_job(job.output).get("teacher_fingerprint") if job.resume else None
    if recorded is not None and recorded != fingerprint:
        path = job.options.get("teacher")
        raise CheckpointError(
            f"--resume: the teacher {path} is not the one this run learned from: its weights changed since the run "
            f"began (fingerprint {_short(recorded)} in {job.output / JOB_FILE}, {_short(fingerprint)} "
            f"now{_modified(str(path))}); put the run's teacher back at {path} (or give --teacher with its file), "
            f"or start a new run (another --output)")
    return fingerprint


def run_pretraining(job: PretrainJob) -> dict[str, Any]:
    """Check the options (and, with --resume, the run), build data, backbone and objective, pre-train; returns
    the summary (rank 0: also written to results.json). Nothing is written to the run directory before
    everything that can be checked without training has been."""
    from vitlab.checkpoints import save_model
    from vitlab.data import build_dataset
    from vitlab.data.splits import SPLIT_METHOD, recorded_split_method
    from vitlab.train.run import (
        JOB_FILE,
        check_output,
        check_resumable,
        check_resume_start,
        clear_run_outputs,
        read_job,
        run_dir_lock,
        run_marker,
        source_identity,
    )

    _check_method(job.method)
    if job.resume:
        check_resume_start(job.output)
    with distributed_context(job.device) as ctx, run_dir_lock(job.output, enabled=ctx.is_main):
        if not ctx.is_main:
            logging.getLogger("vitlab").setLevel(logging.WARNING)
        threads = job.threads if job.threads is not None else job.recipe.cpu_threads  # --threads, else the recipe's
        if ctx.device.type == "cpu" and threads is not None:
            torch.set_num_threads(threads)
        if job.resume:
            _check_resumed_method(job)
        _check_job_options(job)
        if ctx.is_main:
            check_output(job)
        recipe, held_out = _hold_out(job, job.recipe)
        # how the held-out part is drawn: a resumed run's own way (runs recorded without one: the old draw)
        split_method = recorded_split_method(read_job(job.output)) if job.resume else SPLIT_METHOD
        train_set = build_dataset(job.data, split="train", val_fraction=recipe.val_fraction, seed=recipe.seed,
                                  skip_bad_images=job.skip_bad_images, unlabelled=True, split_method=split_method)
        model = build_backbone(dataclasses.replace(job, recipe=recipe), train_set.in_chans).to(ctx.device)
        if job.method == "dvae":  # one token per patch of the backbone, which is not trained itself
            from vitlab.ssl.dvae import DVAE_MODEL_OPTIONS, DiscreteVAE

            dvae_opts = {k: v for k, v in job.options.items() if k in DVAE_MODEL_OPTIONS}
            try:
                model = DiscreteVAE.for_backbone(model, **dvae_opts).to(ctx.device)
            except ValueError as e:
                raise ValueError(f"--opt for dvae: {e}") from None
        options = dict(job.options)
        own_tokenizer = job.output / TOKENIZER_FILE
        if job.method in ("beit", "beit2") and job.resume and own_tokenizer.is_file():
            options["tokenizer"] = str(own_tokenizer)  # the run's own copy (the original may have moved)
        objective = build_objective(job.method, model, options)
        if ctx.is_main:
            _warn_unapplied(job.method, recipe)
        transform = _transform(dataclasses.replace(job, recipe=recipe), model)
        teacher_fingerprint = _teacher_fingerprint(job, objective)  # vqkd's --teacher; refused if replaced
        if job.resume:  # everything fit() will load, checked before the run directory is touched
            check_resumable(job.output, model, recipe, data=job.data, objective=objective)
            _warn_changed_options(job, same_teacher=teacher_fingerprint is not None and
                                  read_job(job.output).get("teacher_fingerprint") == teacher_fingerprint)
        if ctx.is_main:
            if job.overwrite and not job.resume:  # the old run's outputs (its tokenizer / teacher were read above)
                clear_run_outputs(job.output)
            job.output.mkdir(parents=True, exist_ok=True)
            record = json.dumps({
                **run_marker(job.output if job.resume else None), "method": job.method, "data": job.data, "data_source": source_identity(job.data),
                "model": job.model or recipe.model, "options": job.options, "skip_bad_images": job.skip_bad_images,
                **({"teacher_fingerprint": teacher_fingerprint} if teacher_fingerprint else {}),
                "split_method": split_method, **({"held_out": held_out} if held_out else {})}, indent=2, default=str)
            path = job.output / JOB_FILE
            if not (path.is_file() and path.read_text(encoding="utf-8") == record):  # a resumed run's record stays as it was
                atomic_text(path, record)
        if job.method == "beit" and not options.get("tokenizer") and not job.resume:
            _fit_tokenizer(objective, train_set, model, job)  # (a resumed run reads its tokenizer from the state)
        if ctx.is_main and job.method in ("beit", "beit2") and not job.resume:
            # the run directory keeps the tokenizer its targets come from: resumable and reusable as --tokenizer
            save_tokenizer(objective.tokenizer, own_tokenizer,
                           extra={"source": options.get("tokenizer") or f"k-means on {job.data}"})
        train_set.transform = transform
        result = fit(model, recipe, built_from_recipe=True, train_set=train_set, output_dir=job.output, ctx=ctx, resume=job.resume,
                     objective=objective, until_step=job.until_step, progress=job.progress)
        last = result.history[-1] if result.history else {}
        summary: dict[str, Any] = {"method": job.method, "model": model.model_name, "recipe": recipe.name,
                                   "data": job.data, "steps": result.step, "global_batch": result.global_batch,
                                   "train_seconds": round(result.seconds, 1), "last": last,
                                   "checkpoint": str(result.model_path)}
        tokenizer = _tokenizer_of(job, model, objective)
        if ctx.is_main and tokenizer is not None:
            save_tokenizer(tokenizer, job.output / TOKENIZER_FILE, extra={"step": result.step, "data": job.data})
            summary["tokenizer"] = str(job.output / TOKENIZER_FILE)
        if ctx.is_main and job.method == "dino":
            save_model(objective.teacher, job.output / TEACHER_FILE,
                       extra={"step": result.step, "objective": "dino teacher"})
            summary["teacher"] = str(job.output / TEACHER_FILE)
        if ctx.is_main:
            atomic_text(job.output / "results.json", json.dumps(summary, indent=2))
        return summary
