"""Training recipes: every hyper-parameter of a run as one frozen dataclass, stored as JSON data.

The shipped recipes live in ``vitlab/train/recipes/*.json``; a user's recipe is any JSON file with a
subset of the fields. ``--set key=value`` on the command line overrides any field, typed by that
field's declared type, so ``--set lr=3e-4 --set betas=0.9,0.95 --set model_overrides.depth=6`` all work.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from vitlab.checkpoints.io import parse_json

RECIPE_DIR = "recipes"
# recipe.best_metric's values: "auto", "none", or a key of the validation summary (EvalResult.summary: top1 / top5 /
# balanced_accuracy for classes, mAP / F1 / exact match for multi-label, the loss for any targets)
# the validation metrics a run can keep its best checkpoint by: a single-label run's, a multi-label run's, both's
SINGLE_LABEL_METRICS = ("top1", "top5", "balanced_accuracy")
MULTI_LABEL_METRICS = ("mAP", "micro_f1", "macro_f1", "exact_match")
BEST_METRICS = ("auto", "none", *SINGLE_LABEL_METRICS, "loss", *MULTI_LABEL_METRICS)
log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """Args:
    model / model_overrides: default model name and config overrides (e.g. ``drop_path_rate`` for
        stochastic depth); the command line's ``--model`` wins over ``model``.
    img_size: training resolution (None: the data set's native size, or the model's own).
    batch_size: per process and per micro-step; the global batch is batch_size * accum_steps * world size.
    global_batch: if set, accum_steps is derived from it (global_batch / (batch_size * world size)), so a
        paper's batch (4096, 512) is reached on any hardware; it must divide evenly. ``--set accum_steps``
        without ``--set global_batch`` drops it (:func:`apply_overrides`).
    max_steps: the run's length in optimiser steps (None: epochs x steps per epoch); the schedule spans it.
    lr_base_batch: if set, the effective learning rate is lr * global_batch / lr_base_batch (DeiT's rule).
    warmup_steps / warmup_epochs: linear warm-up length; the larger of the two (epochs converted) is used.
    schedule: decay after warm-up down to min_lr: "cosine", "linear" or "constant". A min_lr above the (scaled)
        lr: the decay's floor is the lr, warned of (``--set min_lr`` above lr is refused).
    betas / eps: AdamW's and Adam's; momentum / nesterov: SGD's. One set to another value than its default
        under an optimizer that does not use it has no effect, with a warning (:data:`OPTIMIZER_SETTINGS`).
    layer_decay: layer-wise learning-rate decay for fine-tuning (ViT: lr * layer_decay ** (L + 1 - layer)).
    ema_decay: keep an exponential moving average of the weights (None: off).
    amp: "bf16" autocast (CPU or CUDA), "fp16" autocast with a gradient scaler (CUDA only), or "none".
    grad_checkpointing: recompute the blocks' activations in the backward pass instead of keeping them
        (``model.set_grad_checkpointing()``): activation memory of about one block per stage, for about a
        third more compute per step; the same weights.
    augment: random resized crop / flip / RandAugment / erasing on training images (False: eval transform).
    randaugment: (number of ops, magnitude) or None; randaugment_mstd is the magnitude noise.
    repeat_aug: DeiT's repeated augmentation (its RASampler): an epoch still has as many samples as the data
        set, made of len / repeat_aug distinct images (a new random subset each epoch), each drawn repeat_aug
        times with its own augmentation, the copies spread over the processes (1: off).
    multi_scale: MobileViT's multi-scale sampler (``vitlab.data.multiscale``): the square training sizes
        (e.g. [160, 192, 256, 288, 320]); each batch is drawn at one of them with batch_size scaled by
        (input size / size)^2, so that batches hold as many pixels as at the model's input size; the
        training crops are made at the largest size. None: off (every batch at the input size).
    workers: DataLoader worker processes (None: chosen from the data and the cores, see
        ``train.hardware.default_workers``).
    cache_images: decode an image folder once into memory (None: when the decoded images fit in a
        quarter of the available memory).
    cpu_threads: intra-op threads of each process on the CPU (None: the cores the process is given,
        or OMP_NUM_THREADS; ``--threads`` wins). Shipped recipes leave it unset.
    checkpoint_every: also checkpoint every N optimiser steps (0: only at epoch ends and at the end).
    fsdp: under torchrun, shard parameters, gradients and optimiser state across the processes (FSDP)
        instead of replicating them (DDP); see :mod:`vitlab.train.fsdp` for what it supports.
    multi_label: several labels per image (``--multi-label``): float multi-hot targets, binary cross entropy
        with logits (label smoothing as timm's BinaryCrossEntropy), mAP / F1 metrics, sigmoid scores.
    best_metric: the validation metric that picks ``model_best.safetensors`` (and the EMA's
        ``model_ema_best.safetensors`` by its own): "auto" (top1 for classification, mAP for multi-label, the
        loss where the targets are not classes), a key of the validation summary (``BEST_METRICS``: losses are
        minimised, the others maximised), or "none" (no best model kept).
    early_stopping_patience: stop training after this many validations in a row without a better
        ``best_metric`` (of the model, or of its EMA where EMA is on); the last and the best models are kept as
        in a run that ends, and results.json says where it stopped. None: train to the end.
    class_balance: what to do about imbalanced classes, from the training data's images per class n_c
        (counted at the run's start; ``--resume`` keeps those counts): "none" (every image alike), "loss" (the
        cross entropy weighs a target of class c by w_c proportional to n_c^-class_balance_power, scaled so that
        the mean weight over the training images is 1, so that lr keeps its meaning; soft targets (label
        smoothing, Mixup/CutMix) weigh each class's share; distillation weighs its label term; multi-label: binary
        cross entropy's ``pos_weight`` per label, (negatives / positives)^class_balance_power), or "sampler"
        (each training image drawn at random with replacement, class c with probability proportional to
        n_c^(1 - class_balance_power), an epoch as many steps as without it; single-label only).
    class_balance_power: in (0, 1]: 1 is inverse frequency (the "sampler" then draws every class equally often),
        0.5 its square root (a softer correction).
    freeze / freeze_blocks / train_norms / train_biases / lora_*: parameter-efficient fine-tuning, applied by fit
        (:mod:`vitlab.train.peft`). freeze: "backbone" trains the head alone (linear probing), "embed" freezes the
        patch embedding, prefix tokens and position table; freeze_blocks=N also freezes the first N blocks (partial
        fine-tuning; layers as layer_decay numbers them). train_norms / train_biases: the norm layers' / the bias
        parameters of frozen parts still train (freeze=backbone with train_biases: BitFit). lora_rank > 0: LoRA
        (Hu et al. 2021) of that rank on the lora_targets Linear layers ("qkv", "proj", "mlp", comma-separated,
        or "all"), scaled by lora_alpha / lora_rank (lora_alpha None: the rank, a scale of 1), dropout
        lora_dropout on the adapters' input; every pretrained weight is frozen, the head trains. Checkpoints hold
        the merged weights (a plain model); the training state keeps the adapters for --resume.
    """

    name: str = "custom"
    description: str = ""
    model: str | None = None
    model_overrides: dict[str, Any] = field(default_factory=dict)
    img_size: int | None = None
    zero_init_head: bool = False
    # length and batch
    epochs: int = 10
    max_steps: int | None = None
    batch_size: int = 64
    accum_steps: int = 1
    global_batch: int | None = None
    # optimiser
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1e-3
    lr_base_batch: int | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.05
    layer_decay: float | None = None
    clip_grad: float | None = None
    # schedule
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    # targets
    multi_label: bool = False
    # regularisation
    label_smoothing: float = 0.0
    ema_decay: float | None = None
    # precision
    amp: Literal["none", "bf16", "fp16"] = "none"
    grad_checkpointing: bool = False
    # data and augmentation
    val_fraction: float = 0.1
    augment: bool = True
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (0.75, 4.0 / 3.0)
    hflip: float = 0.5
    randaugment: tuple[int, int] | None = None
    randaugment_mstd: float = 0.0
    re_prob: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    repeat_aug: int = 1
    multi_scale: tuple[int, ...] | None = None
    # logistics
    seed: int = 0
    workers: int | None = None
    cache_images: bool | None = None
    cpu_threads: int | None = None
    eval_every_epochs: int = 1
    checkpoint_every: int = 0
    log_every: int = 10
    fsdp: bool = False
    best_metric: str = "auto"
    early_stopping_patience: int | None = None
    # imbalanced classes
    class_balance: Literal["none", "loss", "sampler"] = "none"
    class_balance_power: float = 1.0
    # parameter-efficient fine-tuning (vitlab.train.peft)
    freeze: Literal["none", "embed", "backbone"] = "none"
    freeze_blocks: int = 0
    train_norms: bool = False
    train_biases: bool = False
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    lora_targets: str = "qkv"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # inf passes the checks below (lr > 0) and NaN gives a vaguer message
            value = getattr(self, f.name)
            if any(isinstance(v, float) and not math.isfinite(v)
                   for v in (value if isinstance(value, (tuple, list)) else (value,))):
                hint = "; null for no clipping" if f.name == "clip_grad" else ""
                raise ValueError(f"recipe {self.name!r}: {f.name}={value!r} is not finite: give a finite number{hint}")
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.img_size is None or self.img_size >= 1, "img_size must be a positive number of pixels, or null"),
            (self.accum_steps >= 1, "accum_steps must be >= 1"),
            (self.global_batch is None or self.global_batch >= 1, "global_batch must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.repeat_aug >= 1, "repeat_aug must be >= 1"),
            (self.multi_scale is None or (len(self.multi_scale) > 0 and all(s >= 1 for s in self.multi_scale)),
             "multi_scale must be a non-empty list of positive sizes, or null"),
            (self.workers is None or self.workers >= 0, "workers must be >= 0"),
            (self.cpu_threads is None or self.cpu_threads >= 1, "cpu_threads must be >= 1"),
            (0.0 <= self.label_smoothing < 1.0, "label_smoothing must be in [0, 1)"),
            (self.ema_decay is None or 0.0 < self.ema_decay < 1.0, "ema_decay must be in (0, 1)"),
            (self.layer_decay is None or 0.0 < self.layer_decay <= 1.0, "layer_decay must be in (0, 1]"),
            (self.clip_grad is None or self.clip_grad > 0, "clip_grad must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.min_lr >= 0, "min_lr must be >= 0"),
            (self.warmup_steps >= 0 and self.warmup_epochs >= 0, "warmup_steps and warmup_epochs must be >= 0"),
            (0.0 <= self.momentum < 1.0, "momentum must be in [0, 1)"),
            (all(0.0 <= b < 1.0 for b in self.betas) and len(self.betas) == 2, "betas must be two values in [0, 1)"),
            (self.eps > 0, "eps must be > 0"),
            (0.0 <= self.val_fraction < 1.0, "val_fraction must be in [0, 1)"),
            (len(self.scale) == 2 and 0.0 < self.scale[0] <= self.scale[1] <= 1.0,
             "scale must be (min, max) crop areas with 0 < min <= max <= 1"),
            (len(self.ratio) == 2 and 0.0 < self.ratio[0] <= self.ratio[1], "ratio must be (min, max) with 0 < min <= max"),
            (0.0 <= self.hflip <= 1.0, "hflip must be a probability in [0, 1]"),
            (0.0 <= self.re_prob <= 1.0, "re_prob must be a probability in [0, 1]"),
            (0.0 <= self.mixup_prob <= 1.0, "mixup_prob must be a probability in [0, 1]"),
            (0.0 <= self.mixup_switch_prob <= 1.0, "mixup_switch_prob must be a probability in [0, 1]"),
            (self.mixup_alpha >= 0 and self.cutmix_alpha >= 0, "mixup_alpha and cutmix_alpha must be >= 0"),
            (self.randaugment is None or (len(self.randaugment) == 2 and self.randaugment[0] >= 0
                                          and self.randaugment[1] >= 0), "randaugment must be (ops, magnitude) >= 0"),
            (self.randaugment_mstd >= 0, "randaugment_mstd must be >= 0"),
            (self.eval_every_epochs >= 1, "eval_every_epochs must be >= 1"),
            (self.checkpoint_every >= 0, "checkpoint_every must be >= 0 (0: only at epoch ends)"),
            (self.log_every >= 1, "log_every must be >= 1"),
            (not (self.optimizer == "sgd" and self.nesterov and self.momentum <= 0),
             "nesterov=true needs a momentum above 0 (SGD's Nesterov momentum)"),
            (self.early_stopping_patience is None or self.early_stopping_patience >= 1,
             "early_stopping_patience must be >= 1 (validations without a better best_metric), or none"),
            (self.early_stopping_patience is None or self.best_metric != "none",
             "early_stopping_patience needs a best_metric to compare (it is 'none')"),
            (0.0 < self.class_balance_power <= 1.0,
             "class_balance_power must be in (0, 1] (1: inverse class frequency, 0.5: its square root)"),
            (not (self.class_balance == "sampler" and self.multi_label),
             "class_balance=sampler draws each image for its class, and a multi-label image has several: use "
             "class_balance=loss (binary cross entropy's pos_weight per label) for multi-label data"),
        ]
        checks += _peft_checks(self)
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"recipe {self.name!r}: {msg}")
        if self.best_metric not in BEST_METRICS:
            raise ValueError(f"recipe {self.name!r}: best_metric={self.best_metric!r} is not a validation metric; "
                             f"choose from {', '.join(BEST_METRICS)}")
        for name, allowed in (("optimizer", ("adamw", "adam", "sgd")), ("schedule", ("cosine", "linear", "constant")),
                              ("amp", ("none", "bf16", "fp16")), ("class_balance", ("none", "loss", "sampler"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"recipe {self.name!r}: {name}={getattr(self, name)!r}; choose from {allowed}")

    @property
    def uses_mixup(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def accum_for(self, world_size: int) -> int:
        """Micro-steps per optimiser step on ``world_size`` processes."""
        if self.global_batch is None:
            return self.accum_steps
        per_step = self.batch_size * world_size
        if self.global_batch % per_step:
            raise ValueError(
                f"recipe {self.name!r}: global_batch={self.global_batch} is not a multiple of batch_size x "
                f"processes = {self.batch_size} x {world_size}; change --batch-size or --set global_batch=..."
            )
        return self.global_batch // per_step

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples -> lists

    def replace(self, **changes: Any) -> Recipe:
        return dataclasses.replace(self, **changes)

    def for_model(self, name: str) -> Recipe:
        """This recipe for model ``name``. ``model_overrides`` describe the recipe's own ``model``. A model of
        another family gets all of them when its config has every one of those fields with a value of the same
        kind and accepts the values (e.g. CaiT or DeiT under the digits recipe's ViT options); otherwise only the
        training-behaviour options its config also has (``CARRY_OVER``: drop rates, ``crop_pct``) are kept and
        the architecture options (patch size, width, depth, heads) are dropped, since there they mean something
        else or do not exist (CrossViT's per-branch tuples, TNT's two head counts, XCiT's 8/16 stems)."""
        from vitlab.models.registry import get_entry, list_models

        if self.model is None or not self.model_overrides or self.model not in list_models():
            return self
        try:
            entry, own = get_entry(name.split(".", 1)[0]), get_entry(self.model)
        except ValueError:
            return self  # an unknown name: create_model reports it
        if entry.family == own.family or _fits(entry.config, self.model_overrides):
            return self
        fields = {f.name for f in dataclasses.fields(entry.config)}
        kept = {k: v for k, v in self.model_overrides.items() if k in CARRY_OVER and k in fields}
        dropped = sorted(set(self.model_overrides) - set(kept))
        log.info("recipe %s: model_overrides %s are for %s (family %s), not applied to %s (family %s); "
                 "set options of %s with --set model_overrides.KEY=VALUE (see `vitlab info %s`)",
                 self.name, dropped, self.model, own.family, name, entry.family, name, name)
        return dataclasses.replace(self, model_overrides=kept)


LORA_TARGETS = ("qkv", "proj", "mlp")  # lora_targets' names ("all": every one)


def lora_target_kinds(spec: str) -> tuple[str, ...]:
    """``lora_targets`` ("qkv", "qkv,proj", "all") as kinds of :data:`LORA_TARGETS`, in that order; a ValueError
    naming the unknown ones."""
    given = [t.strip().lower() for t in str(spec).split(",") if t.strip()]
    unknown = [t for t in given if t not in (*LORA_TARGETS, "all")]
    if unknown or not given:
        raise ValueError(f"lora_targets={spec!r}: {'unknown ' + ', '.join(map(repr, unknown)) if unknown else 'empty'}; "
                         f"give some of {', '.join(LORA_TARGETS)} separated by commas (e.g. qkv,proj), or all")
    return LORA_TARGETS if "all" in given else tuple(t for t in LORA_TARGETS if t in given)


def _peft_checks(r: Recipe) -> list[tuple[bool, str]]:
    """The parameter-efficient fine-tuning fields' checks (Recipe.__post_init__)."""
    try:
        lora_target_kinds(r.lora_targets)
        targets = ""
    except ValueError as e:
        targets = str(e)
    return [
        (r.freeze in ("none", "embed", "backbone"), f"freeze={r.freeze!r}; choose from none, embed, backbone"),
        (r.freeze_blocks >= 0, "freeze_blocks must be >= 0 (the first N blocks frozen, with the patch embedding)"),
        (not (r.freeze == "backbone" and r.freeze_blocks), f"freeze_blocks={r.freeze_blocks} with freeze=backbone: "
         "the backbone, every block included, is frozen already; give one of them"),
        (r.lora_rank >= 0, "lora_rank must be >= 0 (0: no LoRA)"),
        (not (r.lora_rank and (r.freeze == "embed" or r.freeze_blocks)), f"lora_rank={r.lora_rank} with "
         f"{'freeze=embed' if r.freeze == 'embed' else f'freeze_blocks={r.freeze_blocks}'}: LoRA freezes every "
         "pretrained weight already (the adapters and the head train); leave freeze / freeze_blocks out"),
        (r.lora_alpha is None or r.lora_alpha > 0, "lora_alpha must be > 0, or null (the rank: a scale of 1)"),
        (0.0 <= r.lora_dropout < 1.0, "lora_dropout must be in [0, 1)"),
        (not targets, targets),
    ]


def _fits(config: Any, overrides: dict[str, Any]) -> bool:
    """Whether ``config`` has every field of ``overrides``, each of the same kind (number, sequence, text, flag)
    as the config's own value, and validates with them."""
    def kind(v: Any) -> str:
        return ("flag" if isinstance(v, bool) else "number" if isinstance(v, (int, float))
                else "sequence" if isinstance(v, (list, tuple)) else type(v).__name__)

    fields = {f.name for f in dataclasses.fields(config)}
    if any(k not in fields or kind(v) != kind(getattr(config, k)) for k, v in overrides.items()):
        return False
    try:
        dataclasses.replace(config, **overrides)
    except (TypeError, ValueError):
        return False
    return True


# Model options a recipe written for one family passes on to a model of another family (Recipe.for_model).
CARRY_OVER = ("drop_rate", "pos_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate", "crop_pct")


def plain(v: Any) -> Any:
    """A recipe value compared as a setting: (0.08, 1.0) and [0.08, 1.0] are the same."""
    return tuple(plain(x) for x in v) if isinstance(v, (list, tuple)) else v


def changed_fields(recipe: Recipe, fields, *, only_with_augment=frozenset()) -> list[str]:
    """The ``fields`` of ``recipe`` set to other values than the defaults; those in ``only_with_augment`` only when
    augmentation is on (off, they ask for nothing)."""
    default = Recipe()
    return [k for k in fields if plain(getattr(recipe, k)) != plain(getattr(default, k))
            and (recipe.augment or k not in only_with_augment)]


# The optimiser settings and the optimisers that use them; the others ignore them.
OPTIMIZER_SETTINGS: dict[str, tuple[str, ...]] = {"betas": ("adamw", "adam"), "eps": ("adamw", "adam"),
                                                  "momentum": ("sgd",), "nesterov": ("sgd",)}


def unused_optimizer_settings(recipe: Recipe) -> list[str]:
    """The :data:`OPTIMIZER_SETTINGS` of ``recipe`` set to other values than the defaults that its optimizer does
    not use (e.g. momentum under adamw, betas under sgd)."""
    return [k for k in changed_fields(recipe, OPTIMIZER_SETTINGS) if recipe.optimizer not in OPTIMIZER_SETTINGS[k]]


def recipe_fields() -> dict[str, Any]:
    """Field name -> declared type of every recipe field."""
    hints = typing.get_type_hints(Recipe)
    return {f.name: hints[f.name] for f in dataclasses.fields(Recipe)}


def list_recipes() -> list[str]:
    root = resources.files("vitlab.train") / RECIPE_DIR
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".json"))


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A shipped recipe by name (``vit_pretrain``, ``vit_finetune``, ``digits``, ``deit``) or a JSON file."""
    s = str(name_or_path)
    path = Path(s)
    if s.endswith(".json") or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"recipe file {s!r} does not exist")
        text, source = path.read_text(encoding="utf-8"), str(path)
    else:
        res = resources.files("vitlab.train") / RECIPE_DIR / f"{s}.json"
        if not res.is_file():
            raise ValueError(f"unknown recipe {s!r}; shipped recipes: {', '.join(list_recipes())}, or give a .json file")
        text, source = res.read_text(encoding="utf-8"), f"recipe {s}"
    try:
        data = parse_json(text)
    except ValueError as e:  # malformed, nested too deeply, an integer of too many digits
        raise ValueError(f"{source}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise TypeError(f"{source}: a recipe is a JSON object of field -> value")
    data.setdefault("name", path.stem if source == str(path) else s)
    # a run's recipe.json also records what it resolved on its machine (lr, global batch, accumulation): the
    # recipe reused elsewhere resolves them again
    data.pop("resolved", None)
    changes = data.pop("changes", None)
    if changes:
        _warn_changes(changes, source)
    return recipe_from_dict(data, source=source)


def _warn_changes(changes: Any, source: str) -> None:
    """A run's recipe.json whose settings were changed on --resume holds the final ones: a run from it does not
    reproduce that run."""
    try:
        said = "; ".join(f"from step {c['from_step']}: " + ", ".join(f"{k} {old!r} -> {new!r}"
                                                                    for k, (old, new) in c["settings"].items())
                         for c in changes)
        first = int(changes[0]["from_step"]) - 1
    except (KeyError, TypeError, ValueError, IndexError):
        said, first = repr(changes), None
    log.warning("%s: the run it records changed settings on --resume (%s); this run uses the final settings from "
                "its first step, so it does not reproduce that run%s", source, said,
                f" (whose first {first} steps used the earlier ones)" if first else "")


def recipe_from_dict(data: dict[str, Any], *, source: str = "recipe") -> Recipe:
    types_ = recipe_fields()
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ValueError(f"{source}: unknown recipe key(s) {unknown}; valid keys: {', '.join(sorted(types_))}")
    return Recipe(**{k: _coerce(v, types_[k], k) for k, v in data.items()})


def apply_overrides(recipe: Recipe, assignments: list[str] | None) -> Recipe:
    """Apply ``key=value`` strings; ``model_overrides.KEY=VALUE`` sets one model option (value parsed as JSON)."""
    if not assignments:
        return recipe
    types_ = recipe_fields()
    changes: dict[str, Any] = {}
    model_overrides = dict(recipe.model_overrides)
    for item in assignments:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value")
        key, raw = (s.strip() for s in item.split("=", 1))
        if key.startswith("model_overrides."):
            model_overrides[key.split(".", 1)[1]] = _parse_json_or_str(raw)
            changes["model_overrides"] = model_overrides
            continue
        if key not in types_:
            raise ValueError(f"--set {key}=...: unknown recipe key {key!r}; valid keys: {', '.join(sorted(types_))}")
        changes[key] = _parse(raw, types_[key], key)
    after = _accumulation(recipe, dataclasses.replace(recipe, **changes), set(changes))
    # a min_lr given above the lr is refused; an lr given under the recipe's min_lr is fit's to warn of (the decay's
    # floor is then lowered to the lr), as is one that lr_base_batch scales (known once the global batch is)
    if ("min_lr" in changes and after.lr_base_batch is None and after.schedule != "constant"
            and after.min_lr > after.lr):
        raise ValueError(f"--set min_lr={after.min_lr:g} is above lr={after.lr:g}: the {after.schedule} schedule "
                         f"decays the learning rate from lr down to min_lr; give a min_lr of at most {after.lr:g} "
                         f"(0: down to zero), or a higher lr")
    return after


def _accumulation(before: Recipe, after: Recipe, given: set[str]) -> Recipe:
    """``--set accum_steps`` wins over the recipe's global_batch (from which accum_steps is otherwise derived):
    without ``--set global_batch`` the recipe's is dropped, logged; both given must agree on this run's processes
    (torchrun's WORLD_SIZE)."""
    if "accum_steps" not in given or after.global_batch is None:
        return after
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    batch = after.batch_size * after.accum_steps * world
    if "global_batch" in given:
        if after.global_batch != batch:
            raise ValueError(f"--set accum_steps={after.accum_steps} and --set global_batch={after.global_batch} "
                             f"disagree: batch_size x accum_steps x processes = {after.batch_size} x "
                             f"{after.accum_steps} x {world} = {batch}; give one of them")
        return after
    log.info("--set accum_steps=%d: recipe %s's global_batch %d is set aside; the global batch is now %d "
             "(batch_size %d x %d accum x %d processes)", after.accum_steps, before.name, before.global_batch, batch,
             after.batch_size, after.accum_steps, world)
    return dataclasses.replace(after, global_batch=None)


# ------------------------------------------------------------------------------------------ typing
def _parse_json_or_str(raw: str) -> Any:
    try:
        return parse_json(raw)
    except ValueError:  # not JSON (nested too deeply included): the text itself
        return raw


def _parse(raw: str, tp: Any, key: str) -> Any:
    """A command-line string -> a value of the field's type."""
    if _is_optional(tp) and raw.lower() in ("none", "null", ""):
        return None
    base = _strip_optional(tp)
    origin = typing.get_origin(base)
    if base is bool:
        low = raw.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--set {key}={raw}: expected true or false")
    if origin is tuple:
        try:
            parts = parse_json(raw) if raw.startswith("[") else [p for p in raw.strip("()").split(",") if p.strip()]
        except ValueError as e:  # malformed, nested too deeply
            raise ValueError(f"--set {key}=...: not a JSON list ({e})") from None
        return _coerce(parts, base, key)
    if origin is dict:
        value = _parse_json_or_str(raw)
        return _coerce(value, base, key)
    if origin is Literal or base in (int, float, str):
        return _coerce(raw, base, key)
    return _coerce(_parse_json_or_str(raw), base, key)


def _coerce(v: Any, tp: Any, key: str) -> Any:
    """A JSON value -> the field's type, or a clear error."""
    if v is None:
        if _is_optional(tp):
            return None
        raise ValueError(f"recipe key {key!r} cannot be null")
    base = _strip_optional(tp)
    origin = typing.get_origin(base)
    try:
        if origin is Literal:
            allowed = typing.get_args(base)
            if v not in allowed:
                raise ValueError(f"choose from {allowed}")
            return v
        if origin is tuple:
            args = typing.get_args(base)
            if len(args) == 2 and args[1] is Ellipsis:  # tuple[int, ...]: any length
                if not isinstance(v, (list, tuple)):
                    raise ValueError("expected a list of values")
                return tuple(_coerce(x, args[0], key) for x in v)
            if not isinstance(v, (list, tuple)) or len(v) != len(args):
                raise ValueError(f"expected {len(args)} values")
            return tuple(_coerce(x, a, key) for x, a in zip(v, args))
        if origin is dict:
            if not isinstance(v, dict):
                raise ValueError("expected a JSON object")
            return dict(v)
        if base is bool:
            if not isinstance(v, bool):
                raise ValueError("expected true or false")
            return v
        if base is int:
            if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
                raise ValueError("expected an integer")
            return int(float(v)) if isinstance(v, str) and "e" in v.lower() else int(v)
        if base is float:
            if isinstance(v, bool):
                raise ValueError("expected a number")
            return float(v)
        if base is str:
            return str(v)
    except (TypeError, ValueError) as e:
        raise ValueError(f"recipe key {key!r}: cannot use {v!r} ({e})") from None
    return v


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _strip_optional(tp: Any) -> Any:
    if _is_optional(tp):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp
