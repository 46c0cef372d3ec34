"""The training loop: one function, :func:`fit`, that runs a recipe on one CPU or many GPUs.

What the step computes is an :class:`~vitlab.train.objective.Objective` (classification by default,
distillation, the self-supervised objectives of :mod:`vitlab.ssl`); the loop around it is the same for
all. What a step does, in order: the step's ``accum_steps`` micro-batches are taken from the loader and
given to ``objective.begin_step`` (which may count a loss's denominator over the whole global batch, so
that accumulation and DDP give one process's update), then each goes through ``objective.step`` under
autocast, loss / accum_steps, backward (DDP synchronises gradients on the last micro-batch only); then
the loss is averaged over ranks and checked for finiteness *before* the update, gradients are unscaled,
the objective's ``before_optimizer_step`` runs, gradients are clipped to the global norm (a non-finite norm
stops the run before the update), the optimiser and scheduler step, then the objective's
``after_optimizer_step`` (EMA teachers) and the model EMA. Nothing non-finite is written: each checkpoint and
validation first checks the weights, the EMA weights and the optimiser state (an update with a finite loss
may still leave them NaN or infinite), and the run stops with :class:`NonFiniteLossError` naming the step.

The run directory holds ``model.safetensors`` (a vitlab checkpoint: later commands need only this
file), ``model_ema.safetensors`` when EMA is on, ``model_best.safetensors`` (and ``model_ema_best.safetensors``)
at the best validation by ``recipe.best_metric``, ``train_state.pt`` (everything ``--resume`` needs),
``recipe.json``, ``metrics.jsonl`` and TensorBoard events under ``tb/``. Only rank 0 writes. Settings changed
on ``--resume`` are recorded with the step they took effect (``recipe.json``'s ``changes``).
Under torchrun the model is replicated (DDP), or sharded with ``recipe.fsdp`` (:mod:`vitlab.train.fsdp`:
the same files, gathered on rank 0; the optimiser state then by parameter name). The recipe's freezing and LoRA
fields (:mod:`vitlab.train.peft`) are applied to the model first; its files then hold the plain model (LoRA
merged), the training state the adapters, and the model is given back merged.

Exact resumption: the sampler's order is a function of (seed, epoch) and the resumed epoch skips the
sample indices already consumed without loading them; each sample's augmentation is seeded from (seed,
epoch, its position in the epoch's order) by :func:`~vitlab.data.create_loader`, whichever loader worker
makes it (so also with ``workers`` > 0, and the same with any number of workers); every random generator of
the main process is restored; evaluation and checkpointing run inside :func:`preserved_rng` so they never
move the training run's generators.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

from vitlab.checkpoints import CheckpointError, load_strict, save_model
from vitlab.checkpoints.io import strip_wrapper_prefixes
from vitlab.checkpoints.vitlab_format import config_to_dict, unwrap_model
from vitlab.data.errors import DatasetError
from vitlab.data.loader import seeded_sampler
from vitlab.train import peft
from vitlab.train.budget import Deadline, Replanner
from vitlab.train.distributed import DistContext, all_reduce_mean, barrier
from vitlab.train.ema import ModelEMA
from vitlab.train.evaluate import EXPECTED_BATCH, EvalResult, autocast_context, check_classification_batch, evaluate
from vitlab.train.fsdp import (
    full_model_state,
    full_optimizer_state,
    load_full_model_state,
    load_optimizer_state,
    reshard,
)
from vitlab.train.objective import (
    ClassificationObjective,
    DistillationObjective,
    Metrics,
    Objective,
    StepBatches,
    objective_for,
)
from vitlab.train.optim import build_optimizer
from vitlab.train.recipe import OPTIMIZER_SETTINGS, Recipe, changed_fields, plain
from vitlab.train.schedule import Horizon, build_scheduler
from vitlab.train.state import get_rng_state, load_train_state, preserved_rng, save_train_state, set_rng_state

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
EMA_FILE = "model_ema.safetensors"
BEST_FILE = "model_best.safetensors"  # the model at its best validation (recipe.best_metric)
EMA_BEST_FILE = "model_ema_best.safetensors"  # the EMA model at its own best validation
STATE_FILE = "train_state.pt"
ADAPTER_FILE = "adapter.safetensors"  # what a freezing / LoRA run trains, alone (vitlab.train.peft.apply_adapter)
RECIPE_FILE = "recipe.json"
METRICS_FILE = "metrics.jsonl"

Criterion = Callable[[Tensor, Any, Tensor], Tensor]


class NonFiniteLossError(RuntimeError):
    """The loss, the gradients or the weights became NaN or infinite: the run stopped, and no file of the run
    (model, EMA, best, training state) was written with non-finite values; the message names the step."""


class OutOfBatchesError(DatasetError):
    """The training data ran out of batches mid-epoch: ``skip_bad_images`` dropped so many undecodable images
    that whole batches were empty. A data error (a ``ValueError``), reported by the CLI in one line."""


class TrainingStopped(KeyboardInterrupt):
    """SIGINT or SIGTERM during ``fit``: the run finished its step, saved its state and stopped (resumable)."""


@contextlib.contextmanager
def stop_at_step_boundary(enabled: bool) -> Iterator[list[int]]:
    """While training: the first SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption) is noted in the yielded
    list instead of killing the process mid-step, so the loop can save its state at the end of the step; a
    second SIGINT stops at once. Only in the main thread of one process (DDP ranks would have to agree on the
    step); elsewhere the signals keep their default handling."""
    import signal
    import threading

    got: list[int] = []
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield got
        return

    def note(signum: int, frame: Any) -> None:
        if got and signum == signal.SIGINT:
            raise KeyboardInterrupt
        got.append(signum)
        log.warning("%s: stopping after this step (its state is saved for --resume)%s", signal.Signals(signum).name,
                    "; Ctrl-C again to stop at once" if signum == signal.SIGINT else "")

    previous = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield got
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@dataclass(kw_only=True)
class FitResult:
    output_dir: Path
    step: int
    epoch: int
    total_steps: int
    global_batch: int
    lr: float
    seconds: float  # training time of the whole run, the segments before a --resume included
    segment_seconds: float | None = None  # this call's part of ``seconds``
    val: dict[str, Any] | None = None
    # the compile in this call, part of ``seconds``: the first step's forward and backward (the backward graph
    # compiles in the first backward) less the second step's (the first's alone when it is the only one)
    compile_seconds: float | None = None
    compile_failed: str | None = None  # why torch.compile fell back to eager
    history: list[dict[str, Any]] = field(default_factory=list)
    # the best validation so far ({metric, value, step, epoch, file}; None: none kept), and the EMA model's
    best: dict[str, Any] | None = None
    best_ema: dict[str, Any] | None = None
    # where recipe.early_stopping_patience stopped the run ({step, epoch, total_steps, patience, metric, best_step})
    stopped_early: dict[str, Any] | None = None
    # recipe.class_balance as applied: {mode, power, counts, images, class_weights | pos_weight | class_probabilities}
    class_balance: dict[str, Any] | None = None
    # the parameters that trained (trainable_params, total_params, trainable_fraction) and how (peft: None for all)
    parameters: dict[str, Any] | None = None

    @property
    def model_path(self) -> Path:
        return self.output_dir / MODEL_FILE


def check_best_metric(recipe: Recipe, *, multi_label: bool) -> None:
    """``recipe.best_metric`` names a metric this run's validation reports: top1 / top5 are single-label
    metrics, mAP / F1 / exact match multi-label ones. Checked before anything is written."""
    from vitlab.train.recipe import MULTI_LABEL_METRICS, SINGLE_LABEL_METRICS

    wrong = SINGLE_LABEL_METRICS if multi_label else MULTI_LABEL_METRICS
    if recipe.best_metric in wrong:
        kind, reported = ("multi-label", MULTI_LABEL_METRICS) if multi_label else ("single-label", SINGLE_LABEL_METRICS)
        has = ", ".join((*reported, "loss"))
        raise ValueError(f"recipe {recipe.name!r}: best_metric={recipe.best_metric!r} is not reported by the "
                         f"validation of a {kind} run (it reports {has}); --set best_metric=auto picks "
                         f"{'mAP' if multi_label else 'top1'}")


def peak_lr(recipe: Recipe, global_batch: int) -> float:
    """The learning rate the schedule peaks at: the recipe's lr, scaled by global_batch / lr_base_batch where set."""
    return recipe.lr * (global_batch / recipe.lr_base_batch if recipe.lr_base_batch else 1.0)


def check_min_lr(recipe: Recipe, *, global_batch: int) -> None:
    """``recipe.min_lr`` above the peak learning rate (an lr set under the recipe's min_lr, or scaled under it by
    ``lr_base_batch``): the decay's floor is lowered to the peak, so the learning rate stays there after the warm-up,
    which is warned of. (``--set min_lr`` above lr is refused by :func:`~vitlab.train.recipe.apply_overrides`.)"""
    if recipe.schedule == "constant":  # no decay: min_lr is not used
        return
    lr = peak_lr(recipe, global_batch)
    if recipe.min_lr <= lr:
        return
    scaled = (f" (the recipe's lr {recipe.lr:g} x global batch {global_batch} / lr_base_batch {recipe.lr_base_batch})"
              if recipe.lr_base_batch else "")
    log.warning("min_lr %g is above the peak learning rate %.3g%s: the %s decay's floor is lowered to it, so the "
                "learning rate stays at %.3g after the warm-up, without a decay; --set min_lr=... below %.3g keeps "
                "one", recipe.min_lr, lr, scaled, recipe.schedule, lr, lr)


def lower_is_better(metric: str) -> bool:
    return metric.endswith("loss")


@dataclass
class _Best:
    """The best validation so far of one model (the trained one, or its EMA): compared at each validation, and
    written (``pending``) by the next checkpoint, which follows the validation at the same step."""

    file: str
    prefix: str  # of the model's keys in the validation record: "val_" or "val_ema_"
    setting: str  # recipe.best_metric
    metric: str | None = None  # the one resolved at the first validation
    value: float | None = None
    step: int | None = None
    epoch: int | None = None
    pending: bool = False
    off: bool = False  # the metric asked for is not in the validation's summary (said once)
    stale: int = 0  # validations since the best (recipe.early_stopping_patience counts them)

    def record(self) -> dict[str, Any] | None:
        if self.value is None:
            return None
        return {"metric": self.metric, "value": self.value, "step": self.step, "epoch": self.epoch, "file": self.file}

    def state(self) -> dict[str, Any] | None:
        """The record and the setting that chose its metric, as the training state keeps them for --resume (before
        any finite value, the validations counted for early stopping alone)."""
        record = self.record()
        if record is None:
            return {"setting": self.setting, "stale": self.stale} if self.stale else None
        return {**record, "setting": self.setting, "stale": self.stale}

    def offer(self, res: dict[str, Any], *, step: int, epoch: int) -> bool:
        """Whether the validation ``res`` is strictly better than the best so far (ties keep the earlier)."""
        if self.off:
            return False
        if self.metric is None:
            have = [k[len(self.prefix):] for k in res if k.startswith(self.prefix)]
            if self.setting == "auto":  # top1 where the targets are classes, mAP (multi-label), else the loss
                self.metric = next((m for m in ("top1", "mAP", "loss") if m in have), None)
            elif self.setting in have:
                self.metric = self.setting
            if self.metric is None:
                self.off = True
                log.warning("best_metric %s: the validation reports no %s (it reports %s): no %s is written; "
                            "--set best_metric=loss keeps the lowest validation loss", self.setting, self.setting,
                            ", ".join(k for k in have if k != "samples"), self.file)
                return False
        value = res.get(self.prefix + self.metric)
        better = isinstance(value, (int, float)) and math.isfinite(value) and (  # an mAP without positives: None
            self.value is None or (value < self.value if lower_is_better(self.metric) else value > self.value))
        if not better:
            self.stale += 1
            return False
        self.value, self.step, self.epoch, self.pending, self.stale = float(value), step, epoch, True, 0
        return True

    def restore(self, saved: Any, path: Path, *, check_file: bool = True) -> None:
        """The best so far from a resumed state (absent in a state written before it was kept: none yet); another
        metric asked for now starts the comparison over."""
        if isinstance(saved, dict) and saved.get("value") is None and saved.get("setting") == self.setting:
            self.stale = int(saved.get("stale") or 0)  # validations without any finite value yet
        if not isinstance(saved, dict) or saved.get("value") is None:
            return
        # the same metric asked for: by name, or "auto" again (the saved setting; a state without one: any metric)
        same = self.setting == saved.get("metric") or (self.setting == "auto"
                                                        and saved.get("setting", "auto") == "auto")
        if not same:
            log.warning("--resume: the run kept %s by validation %s (best %.6g at step %s); best_metric is now %s: "
                        "the comparison starts over at the next validation", self.file, saved.get("metric"),
                        saved["value"], saved.get("step"), self.setting)
            return
        self.metric, self.value = saved["metric"], float(saved["value"])
        self.step, self.epoch, self.stale = saved.get("step"), saved.get("epoch"), int(saved.get("stale") or 0)
        if not check_file:
            return
        from vitlab.train.run import checkpoint_metadata

        written = (checkpoint_metadata(path.parent / self.file).get("extra") or {}).get("step")
        if written is not None and written != self.step:
            log.warning("--resume: %s holds step %s, but the run's state says its best was at step %s (the run "
                        "stopped between the two writes); it is replaced at the next better validation",
                        self.file, written, self.step)


class _Balance(NamedTuple):
    """recipe.class_balance's view of the training data: every sample's label and the images per class (per
    label for multi-label data) of ``images`` images."""

    labels: list[Any]
    counts: list[int]
    images: int

    def record(self) -> dict[str, Any]:
        return {"counts": self.counts, "images": self.images}


def _class_balance(train_set: Dataset, recipe: Recipe, *, num_classes: int, criterion: Any,
                   objective: Objective | None) -> _Balance | None:
    """The training labels and class counts that ``recipe.class_balance`` needs (None: "none"); refused where it
    cannot apply (no labels, a loss of the user's own to weigh)."""
    if recipe.class_balance == "none":
        if recipe.class_balance_power != 1.0:  # info: the auto recipe's power stays when --set turns it off
            log.info("class_balance_power=%g is not used: class_balance is none (--set class_balance=loss or sampler "
                     "uses it)", recipe.class_balance_power)
        return None
    if objective is not None and not objective.supervised:
        raise ValueError(f"class_balance={recipe.class_balance}: the {objective.name} objective is self-supervised "
                         f"(no labels to balance); set class_balance=none")
    if recipe.class_balance == "loss":
        from vitlab.train.objective import class_weights_refused, label_losses

        loss = objective.criterion if isinstance(objective, ClassificationObjective) else criterion
        if loss is not None and not label_losses(loss):
            raise ValueError(class_weights_refused(loss))
    from vitlab.data.sampler import label_counts, training_labels

    labels = training_labels(train_set)
    if len(labels) != len(train_set):  # type: ignore[arg-type]
        raise ValueError(f"class_balance: the training data's targets hold {len(labels)} labels for "
                         f"{len(train_set)} samples")  # type: ignore[arg-type]
    if recipe.class_balance == "sampler" and any(isinstance(y, tuple) for y in labels):
        raise ValueError("class_balance=sampler draws each image for its class, and this training data gives "
                         "several labels per image: use class_balance=loss (pos_weight per label)")
    return _Balance(labels, label_counts(labels, num_classes), len(labels))


def _weigh_classes(balance: _Balance, recipe: Recipe, objective: Objective, sampler: Sampler[Any],
                   device: torch.device) -> dict[str, Any]:
    """Apply recipe.class_balance from ``balance``'s counts (the run's at its start): the loss's class weights
    or the sampler's class probabilities. Returns what recipe.json records of it."""
    from vitlab.train.losses import class_weights, positive_weights

    power = recipe.class_balance_power
    if recipe.class_balance == "loss":
        if recipe.multi_label:
            weights = positive_weights(balance.counts, balance.images, power)
        else:
            weights = class_weights(balance.counts, power)
        objective.weigh_classes(weights.to(device))  # type: ignore[attr-defined]
        key = "pos_weight" if recipe.multi_label else "class_weights"
        return {**balance.record(), key: [round(w, 6) for w in weights.tolist()]}
    base = getattr(sampler, "indices", sampler)  # under the multi-scale batch sampler
    base.set_counts(balance.counts)  # type: ignore[attr-defined]
    return {**balance.record(), "class_probabilities": [round(p, 6) for p in base.probabilities.tolist()]}  # type: ignore[attr-defined]


def _build_sampler(dataset: Dataset, recipe: Recipe, ctx: DistContext, balance: _Balance | None = None
                   ) -> Sampler[int]:
    if recipe.class_balance == "sampler" and balance is not None:
        from vitlab.data.sampler import ClassBalancedSampler

        return ClassBalancedSampler(balance.labels, num_replicas=ctx.world_size, rank=ctx.rank,
                                    power=recipe.class_balance_power, num_classes=len(balance.counts),
                                    num_repeats=recipe.repeat_aug, seed=recipe.seed)
    if recipe.repeat_aug > 1:
        from vitlab.data import RepeatAugSampler

        return RepeatAugSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                num_repeats=recipe.repeat_aug, seed=recipe.seed)
    # The same permutation of (seed, epoch) on every rank; rank r takes every world_size-th index, so
    # one process with batch B*W sees the same samples per step as W processes with batch B. drop_last: no
    # padding with repeated samples, so the steps per epoch are one process's, floor(floor(N/W)/B) = floor(N/(W*B)).
    return DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                              seed=recipe.seed, drop_last=True)


def _sync_batch_norm(module: nn.Module, ctx: DistContext, *, fsdp: bool = False) -> Callable[[], None]:
    """Under DDP on GPUs: ``module``'s BatchNorm layers replaced by SyncBatchNorm (sharing their parameters and
    running statistics), so that they normalise with the global batch's statistics as one process does. Returns
    what puts the original layers back. torch's SyncBatchNorm runs on GPUs only: on the CPU (gloo), and under
    FSDP, each process keeps its own batch statistics, which is logged."""
    found = [(parent, name, child) for parent in module.modules() for name, child in parent.named_children()
             if type(child) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)]
    if not ctx.distributed or not found:
        return lambda: None
    if fsdp or ctx.device.type == "cpu":
        if ctx.is_main:
            log.warning("%d BatchNorm layer(s) normalise with each process's own part of the batch (%s): the run "
                        "equals one process with the same global batch only in distribution, and the saved running "
                        "statistics are rank 0's", len(found),
                        "under FSDP" if fsdp else "torch's SyncBatchNorm needs GPUs, not gloo on the CPU")
        return lambda: None
    for parent, name, child in found:
        setattr(parent, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
    log.debug("%d BatchNorm layer(s) synchronised across the %d processes", len(found), ctx.world_size)

    def undo() -> None:
        for parent, name, child in found:
            setattr(parent, name, child)

    return undo


def _multiscale_sampler(indices: Sampler[int], recipe: Recipe, net: nn.Module) -> Sampler[Any]:
    """MobileViT's multi-scale batches over ``indices``, with the recipe's batch size at the model's input size."""
    from vitlab.data.multiscale import MultiScaleBatchSampler

    base = tuple(net.preprocessing.input_size[1:])
    return MultiScaleBatchSampler(indices, base_size=base, base_batch=recipe.batch_size,  # type: ignore[arg-type]
                                  sizes=recipe.multi_scale or (), seed=recipe.seed)


def _make_loader(dataset: Dataset, sampler: Sampler[Any], recipe: Recipe, batch_size: int) -> DataLoader:
    from vitlab.data import create_loader

    # create_loader's private, seeded generator: creating an iterator draws a base seed from it, not
    # from the global RNG, so a resumed epoch (a new iterator mid-epoch) consumes the global generators
    # exactly as the uninterrupted run did.
    if recipe.multi_scale:
        from vitlab.data.multiscale import MultiScaleDataset

        return create_loader(MultiScaleDataset(dataset), batch_size=batch_size, shuffle=False,
                             num_workers=recipe.workers or 0, seed=recipe.seed, batch_sampler=sampler)
    return create_loader(dataset, batch_size=batch_size, shuffle=False, num_workers=recipe.workers or 0,
                         seed=recipe.seed, drop_last=True, sampler=sampler)


def _out_of_batches(train_set: Dataset, epoch: int, step: int, steps_per_epoch: int, batch_size: int = 2) -> str:
    """Why the loader ran dry: the images skipped as undecodable, counted so far (a smaller batch is suggested
    only where there is one)."""
    skipped = getattr(train_set, "num_skipped", None)
    what = (f"{skipped} of its {len(train_set)} images were undecodable and skipped (--skip-bad-images)"  # type: ignore[arg-type]
            if skipped else "undecodable images were skipped (--skip-bad-images)")
    return (f"training stopped at step {step}, in epoch {epoch + 1} (of {steps_per_epoch} steps each): the training "
            f"data ran out of batches, because {what}, which left whole batches empty; replace or remove the bad "
            f"files (each was named above){', or lower --batch-size' if batch_size > 1 else ''}")


def _non_empty(loader: DataLoader) -> Iterator[Any]:
    for batch in loader:
        if batch is not None:  # every image of the batch was undecodable and skipped
            yield batch


def _local(t: Tensor) -> Tensor:
    """A tensor's own elements: the local shard of an FSDP2 parameter or optimiser state (a DTensor), else itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _float_tensors(tensors: Any) -> list[Tensor]:
    return [_local(t).detach() for t in tensors
            if isinstance(t, Tensor) and t.is_floating_point() and _local(t).numel()]


def _saved_buffers(module: nn.Module) -> list[Tensor]:
    """The buffers a checkpoint of ``module`` holds (batch norm's running statistics); non-persistent ones (masks,
    index tables) are not written."""
    return [b for m in module.modules() for name, b in m._buffers.items()
            if b is not None and name not in m._non_persistent_buffers_set]


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The optimiser's state tensors (moments, momentum buffers)."""
    return _float_tensors(v for state in optimizer.state.values() for v in state.values())


def _nonfinite(tensors: list[Tensor], device: torch.device, *, exact: bool = False) -> Tensor:
    """1.0 if an element of ``tensors`` may be NaN or infinite, else 0.0: a float32 scalar on ``device``, computed
    without waiting for it. The screen is one fused 2-norm per tensor (NaN and inf carry through its sum of squares;
    the fastest reduction on CPUs, one kernel on GPUs); finite values above ~1e19 overflow it too, a false alarm that
    ``exact=True`` (element-wise, slower: only after an alarm) tells apart."""
    if not tensors:
        return torch.zeros((), device=device)
    if exact:
        return torch.stack([(~torch.isfinite(t)).any().to(device) for t in tensors]).any().float()
    norms = torch._foreach_norm(tensors, 2)
    return (~torch.isfinite(torch.stack([n.float().to(device) for n in norms]))).any().float()


def _nonfinite_names(named: Any, limit: int = 3) -> str:
    """The first ``limit`` names of ``(name, tensor)`` pairs holding NaN or infinite values (an error's details)."""
    bad = [name for name, t in named if isinstance(t, Tensor) and t.is_floating_point()
           and not bool(torch.isfinite(_local(t).detach()).all())]
    return ", ".join(bad[:limit]) + (f" and {len(bad) - limit} more" if len(bad) > limit else "")


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP's and torch.compile's wrappers: the one trained, saved and described."""
    return unwrap_model(model)


# Recipe fields that vitlab.train.run (the CLI) applies while building the model and the data before it calls
# fit; fit itself trains the model and the data it is given
BUILD_FIELDS = ("model", "model_overrides", "img_size", "zero_init_head", "scale", "ratio", "hflip", "randaugment",
                "randaugment_mstd", "re_prob", "val_fraction", "cache_images", "cpu_threads")
_AUGMENTATION = frozenset({"scale", "ratio", "hflip", "randaugment", "randaugment_mstd", "re_prob"})
# the runners that build the model and data from those fields, then call fit


def unapplied_fields(recipe: Recipe, net: nn.Module) -> list[str]:
    """The recipe's :data:`BUILD_FIELDS` whose values would change something fit does not do: set to other values
    than the defaults, except where the model already has them (its name, input size, config) or where the
    value asks for nothing (augmentation switched off, no validation split)."""
    cfg = getattr(net, "cfg", None)
    out = []
    for k in changed_fields(recipe, BUILD_FIELDS, only_with_augment=_AUGMENTATION):
        value = getattr(recipe, k)
        if k == "model" and value == getattr(net, "model_name", None):
            continue
        if k == "img_size" and tuple(net.preprocessing.input_size[1:]) == (value, value):
            continue
        if k == "model_overrides" and cfg is not None and all(
                plain(getattr(cfg, key, object())) == plain(v) for key, v in value.items()):
            continue
        if k == "val_fraction" and not value:
            continue
        out.append(k)
    return out


def _first_batch(batches: Iterator[Any]) -> Any:
    """The first batch, with samples the default collate cannot batch (PIL images, strings of mixed
    structure) explained."""
    try:
        return next(batches, None)
    except TypeError as e:
        if "collate" not in str(e):
            raise
        raise TypeError(f"fit: the data set's samples cannot be batched ({str(e).strip().splitlines()[-1]}); "
                        f"expected {EXPECTED_BATCH}. Convert PIL images / numpy arrays to uint8 (C, H, W) tensors "
                        f"and transform them with vitlab.data.eval_transform / train_transform(model.preprocessing) "
                        f"in the data set's __getitem__") from e


def _to_device(batch: Any, device: torch.device) -> Any:
    """Tensors of a batch (also nested in tuples/lists, e.g. multi-crop views) on ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    return batch


class _Step(nn.Module):
    """The model and the objective's trainable modules as one module, so that DDP synchronises the
    gradients of heads and decoders too; ``forward(batch)`` is ``objective.step(model, batch)``."""

    def __init__(self, model: nn.Module, objective: Objective) -> None:
        super().__init__()
        self.model = model
        self.owned = nn.ModuleDict(objective.trainable_modules())
        self.objective = objective

    def forward(self, batch: Any) -> tuple[Tensor, Metrics]:
        return self.objective.step(self.model, batch)


class _Writers:
    """metrics.jsonl and TensorBoard, on rank 0 only; TensorBoard is optional."""

    def __init__(self, out: Path, enabled: bool, start_step: int) -> None:
        self.enabled = enabled
        self.metrics = out / METRICS_FILE
        self.tb = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run drops the events logged after its checkpoint's step (as metrics.jsonl's records)
            self.tb = SummaryWriter(log_dir=str(out / "tb"), purge_step=start_step + 1 if start_step else None)
        except Exception as e:  # noqa: BLE001 - tensorboard missing or broken: metrics.jsonl still has it all
            log.warning("TensorBoard logging off (%s); metrics.jsonl still records the run", e)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record["step"]
            for k, v in record.items():
                if k not in ("step", "epoch", "kind") and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def fit(
    model: nn.Module,
    recipe: Recipe,
    *,
    train_set: Dataset,
    val_set: Dataset | None = None,
    output_dir: str | Path,
    ctx: DistContext | None = None,
    resume: bool = False,
    overwrite: bool = False,
    class_names: list[str] | None = None,
    criterion: Criterion | None = None,
    objective: Objective | None = None,
    until_step: int | None = None,
    progress: bool = True,
    compile: bool = False,
    deadline: Deadline | None = None,
    built_from_recipe: bool = False,
    record: dict[str, Any] | None = None,
) -> FitResult:
    """Train ``model`` (built with ``vitlab.create_model``; a ``torch.compile`` / DDP wrapper is looked through)
    on ``train_set`` following ``recipe``. The recipe's model and data fields (:data:`BUILD_FIELDS`: model,
    img_size, augmentation...) are what ``vitlab.train.run`` builds the model and data from; fit trains the
    model and the data it is given, and warns when those fields ask for something else. Gradients the model holds
    are dropped first, and none is left behind when the run stops mid-step.

    Args:
        train_set / val_set: map-style data sets yielding (image tensor, label), already transformed: float
            (C, H, W) images; labels int class indices, or float (K,) class probabilities (one-hot / soft
            labels). The first batch is checked, and refused with the conversion to use.
        ctx: the distributed context (``distributed_context()``); None: one process on the model's device.
        resume: continue from ``output_dir/train_state.pt``.
        overwrite: replace the run already in ``output_dir`` (its files are removed first, as the commands'
            ``--overwrite`` does); without it (or ``resume``), a folder holding a run's model, state or
            metrics is refused.
        criterion: ``loss(images, outputs, targets)``; default: cross entropy with the recipe's label
            smoothing (soft targets under Mixup). Distillation passes its own. A criterion of your own (regression,
            multi-label) takes the targets as given and is the validation loss too; validation reports top-1 /
            top-5 only where the targets are classes (indices, or rows of class probabilities).
        objective: what a step computes (:class:`~vitlab.train.objective.Objective`); default: the
            classification objective over ``criterion`` (distillation for a DistillationLoss).
            Self-supervised objectives ignore labels; ``val_set`` is then not evaluated.
        until_step: stop (with a checkpoint) after this many optimiser steps in all, as if killed there;
            the schedule still spans the whole run.
        compile: run the forward through ``torch.compile`` (falls back to eager, logged, when it fails);
            the compile time is reported apart in the result: the first step's forward and backward time
            less the second step's (``FitResult.compile_seconds``).
        deadline: when the whole command should be done (``--time-budget``): the run times its own steps at
            the end of the warm-up and at set points of the decay and re-plans its length to end on time,
            the learning rate kept continuous; ``recipe.json`` and the saved state follow the new length,
            so that ``--resume`` continues the same schedule. Supervised objectives only.
        built_from_recipe: the caller built the model and the data from the recipe's fields (the commands'
            runners do), so there is nothing to warn about.
        record: what every checkpoint's metadata (``extra``) records beside the recipe (the commands' runners: how
            the held-out split was drawn, ``split_method``).
    """
    # checked before anything is written: a DataLoader fails deep inside, (X, y) arrays pass as 2 samples
    from collections.abc import Mapping

    from torch.utils.data import DataLoader, IterableDataset

    for arg, data in (("train_set", train_set), ("val_set", val_set)):
        if data is None and arg == "val_set":
            continue
        arrays = (isinstance(data, (tuple, list)) and len(data) == 2  # (X, y); not a list of samples
                  and all(hasattr(a, "ndim") for a in data) and data[0].ndim >= 3 and data[1].ndim == 1)
        if not (arrays or isinstance(data, (DataLoader, IterableDataset, Mapping))
                or not hasattr(data, "__len__") or not hasattr(data, "__getitem__")):
            continue
        given = (f"a {type(data).__name__} of {len(data)} arrays (shapes "
                 f"{', '.join(str(tuple(a.shape)) for a in data if hasattr(a, 'shape'))})" if arrays
                 else f"a {type(data).__module__}.{type(data).__name__}")
        hint = ""
        if arrays:
            hint = ("wrap arrays in torch.utils.data.TensorDataset(images, labels): images a float (N, C, H, W) "
                    "tensor (uint8 (N, H, W, C) pixels: torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255), "
                    "labels an int64 (N,) tensor")
        elif isinstance(data, DataLoader):
            hint = ("pass its data set (loader.dataset): fit makes its own loader from the recipe's batch_size "
                    "and workers")
        elif isinstance(data, IterableDataset):
            hint = "an IterableDataset has no length or indexing: fit samples its items by index each epoch"
        raise TypeError(f"fit: {arg} must be a map-style data set (a torch Dataset with __len__ and __getitem__ "
                        f"returning (float (C, H, W) image tensor, int label)); got {given}"
                        + (f"; {hint}" if hint else ""))
    ctx = ctx or DistContext(device=next(model.parameters()).device)
    out = Path(output_dir)
    if objective is None or objective.supervised:
        check_best_metric(recipe, multi_label=recipe.multi_label)
    if progress:  # on every rank (they share the environment), so that none is left waiting
        from vitlab.train.progress import log_interval_s

        log_interval_s()  # a bad VITLAB_LOG_INTERVAL is refused before anything is written
    if ctx.is_main:
        from vitlab.train.run import prepare_fit_dir

        prepare_fit_dir(out, resume=resume, overwrite=overwrite)
    device = ctx.device
    if not recipe.fsdp:  # FSDP moves only each rank's shard to the device
        model.to(device)
    net = _unwrap(model)
    if net is not model and not isinstance(model, nn.parallel.DistributedDataParallel):
        log.info("fit: training the model inside its %s wrapper (checkpoints hold its own weights); fit(..., "
                 "compile=True) compiles the training step", type(model).__name__)
    if not hasattr(net, "model_name"):
        raise ValueError("fit: build the model with vitlab.create_model so that its checkpoint is self-describing")
    ignored = [] if built_from_recipe else unapplied_fields(recipe, net)
    if ignored:
        log.warning("fit: recipe field(s) %s are not applied by fit: they belong to building the model and the data "
                    "(vitlab.train.run / the `vitlab train` command build them from the recipe, then call fit); fit "
                    "trains the model and the data it is given as they are", ", ".join(ignored))
    # the recipe this run records (recipe.json, the training state) names the model it trains, not the recipe's
    # default one: `--recipe RUN/recipe.json` builds it again
    recipe = recipe.replace(model=net.model_name) if recipe.model != net.model_name else recipe
    if recipe.grad_checkpointing:
        net.set_grad_checkpointing()
    if objective is not None and criterion is not None:
        raise ValueError("fit: give either criterion= or objective=, not both")
    num_classes = net.num_classes
    balance = _class_balance(train_set, recipe, num_classes=num_classes, criterion=criterion, objective=objective)
    class_names = list(class_names) if class_names is not None else getattr(train_set, "classes", None)
    supervised = objective is None or objective.supervised
    if not supervised:
        class_names = None  # a self-supervised backbone knows no classes
    if deadline is not None and not supervised:
        raise ValueError("fit: a deadline re-plans the run's length, which self-supervised objectives' own "
                         "schedules (teacher momentum, masking) do not follow; give them a fixed max_steps")
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"fit: the data has {len(class_names)} classes but the model's head has {num_classes}")
    multi_label = supervised and recipe.multi_label
    if supervised and getattr(train_set, "multi_label", False) and not recipe.multi_label:
        raise ValueError("fit: the training data gives several labels per image (multi-hot targets); train with "
                         "the recipe's multi_label (--multi-label, or recipe.replace(multi_label=True))")
    if multi_label and getattr(net, "score_function", "softmax") != "sigmoid":
        # the checkpoints then score with sigmoid: predict, export and explain follow it
        log.info("multi-label: %s scores with sigmoid (was %s)", net.model_name,
                 getattr(net, "score_function", "softmax"))
        net.score_function = "sigmoid"

    # ---- data and run length
    accum = recipe.accum_for(ctx.world_size)
    base_sampler = _build_sampler(train_set, recipe, ctx, balance)
    # the unit the resumed epoch skips: sample indices, or whole batches of the multi-scale sampler
    per_micro = recipe.batch_size
    if recipe.multi_scale:
        base_sampler, per_micro = _multiscale_sampler(base_sampler, recipe, net), 1
        log.info("multi-scale sampling: %s per process (size px: batch), %d batches per epoch",
                 ", ".join(f"{s}: {b}" for s, b in base_sampler.scales), len(base_sampler))  # type: ignore[attr-defined]
    loader = _make_loader(train_set, base_sampler, recipe, recipe.batch_size)
    # skips the items (indices, or multi-scale batches) a resumed epoch consumed before; the samples after them
    # keep their positions in the epoch's order, and with them their augmentation (see vitlab.data.loader)
    sampler = seeded_sampler(loader)
    per_rank = len(base_sampler)  # type: ignore[arg-type]
    if not recipe.multi_scale:  # RepeatAugSampler pads its share to ceil(N/W): one process's steps use N // W
        per_rank = min(per_rank, len(train_set) // ctx.world_size)  # type: ignore[arg-type]
    micro_per_epoch = per_rank // per_micro
    steps_per_epoch = micro_per_epoch // accum
    if steps_per_epoch < 1:
        have = (f"{len(base_sampler)} multi-scale batches per epoch" if recipe.multi_scale  # type: ignore[arg-type]
                else f"{per_rank} samples per process")
        if recipe.global_batch is not None:
            fix = (f"the recipe's global_batch is {recipe.global_batch}: --set global_batch=N for a smaller one "
                   f"(a multiple of --batch-size), or --set global_batch=none for --batch-size alone")
        else:
            fix = "lower --batch-size or --set accum_steps=N"
        raise ValueError(f"fit: {have} cannot fill one step of batch_size {recipe.batch_size} x accum {accum}; {fix}")
    total_steps = recipe.max_steps or recipe.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    global_batch = recipe.batch_size * accum * ctx.world_size
    lr = peak_lr(recipe, global_batch)
    if ctx.is_main:
        check_min_lr(recipe, global_batch=global_batch)
    warmup = max(recipe.warmup_steps, round(recipe.warmup_epochs * steps_per_epoch))
    if warmup >= total_steps > 1 and not resume:  # e.g. --steps 20 under a recipe's 2-epoch warm-up
        # the larger of the two settings counts: the hint names the one(s) to lower and the other's value
        from_epochs = round(recipe.warmup_epochs * steps_per_epoch)
        if min(from_epochs, recipe.warmup_steps) >= total_steps:
            hint = "--set warmup_epochs=... and warmup_steps=..., both shorter than the run"
        elif from_epochs >= recipe.warmup_steps:
            hint = f"--set warmup_epochs=... shorter than the run (warmup_steps is {recipe.warmup_steps})"
        else:
            hint = f"--set warmup_steps=... shorter than the run (warmup_epochs is {recipe.warmup_epochs:g})"
        log.warning("the warm-up (%d steps) is as long as the run (%d steps): it is cut to %d steps: the "
                    "learning rate climbs to its peak (%.3g) at step %d and holds it to the end, without any decay; "
                    "give %s - the larger of the two is used - or more steps", warmup, total_steps, total_steps - 1, lr,
                    total_steps - 1, hint)
    warmup = min(warmup, max(0, total_steps - 1))

    # ---- the objective and optimisation
    objective = objective or objective_for(criterion, recipe, num_classes)
    if recipe.fsdp:
        from vitlab.train.fsdp import check_fsdp

        check_fsdp(world_size=ctx.world_size, amp=recipe.amp, compile=compile, objective=objective.name,
                   trains_extra_modules=bool(objective.trainable_modules()))
    peft.check_run(recipe, objective.name)
    parameters = {**peft.prepare(net, recipe), "peft": peft.describe(net)}  # freezing, LoRA: before the EMA copy
    objective.to(device)
    objective.setup(net, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    owned = objective.trainable_modules()
    ema = ModelEMA(net, decay=recipe.ema_decay) if recipe.ema_decay is not None else None
    if recipe.fsdp:  # before the optimiser: sharding replaces the parameters; the EMA is sharded alike
        from vitlab.train.fsdp import shard_model

        for m in (net, *([ema.module] if ema is not None else [])):
            shard_model(m, device=device, amp=recipe.amp)
    optimizer = build_optimizer(net, recipe, lr=lr, extra=owned, quiet=not ctx.is_main)
    horizon = Horizon(total_steps=total_steps, warmup_steps=warmup)  # re-planned by a deadline
    # min_lr above the peak: the floor is the peak (check_min_lr warned)
    scheduler = build_scheduler(optimizer, total_steps=total_steps, warmup_steps=warmup, kind=recipe.schedule,
                                peak_lr=lr, min_lr=min(recipe.min_lr, lr), horizon=horizon)
    scaler = torch.amp.GradScaler("cuda", enabled=recipe.amp == "fp16" and device.type == "cuda")
    if recipe.amp == "fp16" and device.type != "cuda":
        raise ValueError("amp=fp16 needs CUDA (a gradient scaler on the GPU); use --set amp=bf16 on the CPU")

    # ---- the best model by validation (recipe.best_metric): the trained one, and the EMA's by its own metric
    bests: list[_Best] = []
    if recipe.best_metric != "none":
        if val_set is not None and supervised:
            bests = [_Best(file=BEST_FILE, prefix="val_", setting=recipe.best_metric)]
            if ema is not None:
                bests.append(_Best(file=EMA_BEST_FILE, prefix="val_ema_", setting=recipe.best_metric))
        elif ctx.is_main:
            why = ("no val_set to validate on as it trains" if supervised
                   else f"the {objective.name} objective has no validation")
            log.info("best_metric %s: this run does not validate (%s): no %s is written", recipe.best_metric, why,
                     BEST_FILE)
            if recipe.early_stopping_patience is not None:
                log.warning("early_stopping_patience=%d has no effect: this run does not validate (%s), so it trains "
                            "to the end", recipe.early_stopping_patience, why)

    # ---- state: fresh or resumed
    step, seconds_before = 0, 0.0
    # settings changed on --resume: [{"from_step": N, "settings": {field: [old, new]}}], oldest first
    changes: list[dict[str, Any]] = []
    val: dict[str, Any] | None = None  # the last validation's metrics
    if resume:
        resumed = _restore(out / STATE_FILE, net=net, objective=objective, optimizer=optimizer, scheduler=scheduler,
                           horizon=horizon, scaler=scaler, ema=ema, recipe=recipe, ctx=ctx, total_steps=total_steps,
                           global_batch=global_batch, steps_per_epoch=steps_per_epoch, train_images=len(train_set))
        step, seconds_before, changes, val = resumed.step, resumed.seconds, resumed.changes, resumed.val
        total_steps = resumed.total_steps  # the run's own, where only the data's size changed
        epochs = math.ceil(total_steps / steps_per_epoch)
        for b, saved in zip(bests, resumed.best):
            b.restore(saved, out / STATE_FILE, check_file=ctx.is_main)
        warmup = horizon.warmup_steps  # the run's own, where its length changed
        if ctx.is_main:
            tidy_run_directory(out, step)
    else:
        _seed_everything(recipe.seed + 1000 * ctx.rank)
    balanced: dict[str, Any] | None = None  # recipe.class_balance as applied: counts, weights or probabilities
    if balance is not None:
        recorded = resumed.class_balance if resume else None
        if recorded is not None and (recorded["counts"], recorded["images"]) != (balance.counts, balance.images):
            if ctx.is_main:
                log.warning("--resume: the training data has other images per class than when the run began "
                            "(%s of %d images, now %s of %d); class_balance=%s keeps the run's own counts, recorded "
                            "at its start", recorded["counts"], recorded["images"], balance.counts, balance.images,
                            recipe.class_balance)
            balance = balance._replace(counts=list(recorded["counts"]), images=int(recorded["images"]))
        balanced = _weigh_classes(balance, recipe, objective, base_sampler, device)
        if ctx.is_main:
            key = next(k for k in balanced if k not in ("counts", "images"))
            log.info("class_balance=%s (power %g): %s from %.4g to %.4g (images per class %d to %d; recipe.json "
                     "records them)", recipe.class_balance, recipe.class_balance_power, key.replace("_", " "),
                     min(balanced[key]), max(balanced[key]), min(balance.counts), max(balance.counts))

    step_module = _Step(net, objective)
    undo_sync_bn = _sync_batch_norm(step_module, ctx, fsdp=recipe.fsdp)
    if ctx.distributed and not recipe.fsdp:
        model = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        model = step_module

    def write_recipe() -> None:
        atomic_text(out / RECIPE_FILE, json.dumps(
            {**recipe.to_dict(), "resolved": {"lr": lr, "global_batch": global_batch, "accum_steps": accum,
                                              "world_size": ctx.world_size, "total_steps": total_steps,
                                              "steps_per_epoch": steps_per_epoch, "warmup_steps": warmup,
                                              "objective": objective.describe(),
                                              **({"class_balance": balanced} if balanced else {}),
                                              "model": net.model_name, "model_config": config_to_dict(net.cfg),
                                              **({"not_applied_by_fit": ignored} if ignored else {})},
             **({"changes": changes} if changes else {})},
            indent=2))

    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_recipe()
    writers = _Writers(out, ctx.is_main, step)
    log.info("training %s (%s): %d steps (%d epochs x %d), global batch %d (%d x %d accum x %d processes), lr %.3g, "
             "warm-up %d", net.model_name, objective.describe(), total_steps, epochs, steps_per_epoch, global_batch, recipe.batch_size,
             accum, ctx.world_size, lr, warmup)

    checkpointed = resume  # whether the run directory holds a state to --resume from
    last_good = step  # the step of the last checkpoint written (or resumed from)
    start_step = step
    # Non-finite values never reach a file. An update whose loss was finite may still leave the weights NaN / inf
    # (too large a step); nothing is added to the steps for it: the next step's loss is then NaN or inf (checked
    # already), and the weights are checked then, to say which it was; checkpoint() and validations check the
    # weights, the EMA weights and the optimiser state first (a fused screen and one sync each), which also stops
    # a run whose last step did it, and catches weights the loss does not see.
    checked_at: int | None = None  # the step at which everything was last found finite
    last_loss: float | None = None  # the last step's loss and learning rate
    last_lr: float | None = None

    def named_params() -> list[tuple[str, Tensor]]:  # the weights and the saved buffers (running statistics)
        return [(name.removeprefix("model."), p) for name, p in
                [*step_module.named_parameters(), *step_module.named_buffers()]]

    def advice(*, loss: bool) -> str:
        """What to do after a non-finite loss, gradient or weights: from the last good checkpoint, if any."""
        if not checkpointed:
            return (f"There is no last good checkpoint yet (none was written in {out}): start the run again with "
                    f"--overwrite after " + ("lowering lr, enabling clip_grad or switching amp off" if loss
                                                   else "lowering lr or enabling clip_grad"))
        # --resume keeps the optimiser's settings (a lower lr is refused there): clip_grad / amp only
        fixes = [f for f, useful in (("--set clip_grad=1.0", recipe.clip_grad is None),
                                     ("--set amp=none", loss and recipe.amp != "none")) if useful]
        resume_fix = f"--resume {fixes[0]}" + (f" (or {fixes[1]})" if len(fixes) > 1 else "") if fixes else ""
        lower = (f"start a new run from its weights with a lower lr (`vitlab finetune --from {out / MODEL_FILE} "
                 f"--set lr=...`)")
        kept = f"The last good checkpoint in {out} (step {last_good}) is kept: "
        if loss and resume_fix:
            return f"{kept}continue it with {resume_fix}, or {lower}"
        return f"{kept}{lower}" + (f", or continue it with {resume_fix}" if resume_fix else "")

    def diverged(bad: str, names: str) -> NonFiniteLossError:
        """The error for non-finite ``bad`` (weights, EMA weights, optimiser state) after the last update."""
        return NonFiniteLossError(
            f"non-finite {bad}{names} after the update of step {step} (whose loss, {last_loss:.4g}, was finite; lr "
            f"{last_lr:.3g}): an update too large for the weights; the run stopped without writing them. "
            f"{advice(loss=False)}")

    def weights_diverged() -> bool:
        """Whether the weights hold NaN or inf (an element-wise check: after a non-finite loss only)."""
        return checked_at != step and all_reduce_mean(
            _nonfinite(_float_tensors(params), device, exact=True), ctx).item() > 0

    def check_finite() -> None:
        """Refuse weights, EMA weights or optimiser state holding NaN or inf before validating or writing them."""
        nonlocal checked_at
        if checked_at == step:
            return
        parts = {"weights": _float_tensors([*params, *_saved_buffers(net)]),
                 "EMA weights": _float_tensors([*ema.module.parameters(), *_saved_buffers(ema.module)])
                 if ema is not None else [],
                 "optimiser state": _optimizer_tensors(optimizer)}
        flags = all_reduce_mean(torch.stack([_nonfinite(ts, device) for ts in parts.values()]), ctx).tolist()
        if any(flags):  # the screen's alarm: confirmed element by element (huge finite values raise it too)
            flags = all_reduce_mean(torch.stack([_nonfinite(ts, device, exact=True) for ts in parts.values()]),
                                    ctx).tolist()
        found = [what for what, flag in zip(parts, flags, strict=True) if flag > 0]
        if found:
            bad = " and ".join(filter(None, (", ".join(found[:-1]), found[-1])))
            names = f" ({_nonfinite_names(named_params())})" if flags[0] > 0 else ""
            if step == start_step:  # before this call's first update: the model (or the state) came so
                if resume:
                    raise CheckpointError(
                        f"--resume: {out / STATE_FILE} holds non-finite {bad}{names} at step {step} (an older vitlab "
                        f"wrote them after a diverging update): the run cannot continue from it; start it again "
                        f"(--overwrite) or a new run from an earlier copy of its weights")
                raise ValueError(f"fit: the model's {bad} hold NaN or infinite values before training{names}; "
                                 f"give it finite weights")
            raise diverged(bad, names)
        checked_at = step

    def checkpoint(val: dict[str, Any] | None = None) -> None:
        nonlocal checkpointed, last_good
        check_finite()
        checkpointed, last_good = True, step
        with preserved_rng():
            rngs = [get_rng_state()]
            if ctx.distributed:
                rngs = [None] * ctx.world_size
                dist.all_gather_object(rngs, get_rng_state())
            model_sd = ema_sd = optim_sd = None
            if ctx.is_main or recipe.fsdp:  # full state dicts on the CPU; FSDP gathers them (every rank takes part)
                model_sd = full_model_state(net)
                ema_sd = full_model_state(ema.module) if ema is not None else None
                optim_sd = full_optimizer_state(net, optimizer) if recipe.fsdp else optimizer.state_dict()
            if ctx.is_main:
                # the recipe's name and every setting it trained with (--set changes included): a checkpoint travels
                # without the run folder's recipe.json
                extra = {**(record or {}), "step": step, "recipe": recipe.name, "recipe_settings": recipe.to_dict(),
                         **({"recipe_changes": changes} if changes else {}),
                         **({"peft": parameters["peft"]} if parameters["peft"] else {}),
                         **({"val": val} if val else {}), **({} if supervised else {"objective": objective.describe()})}
                # the files hold plain models (LoRA merged); the training state keeps the adapters
                plain_sd = peft.plain_state_dict(net, model_sd)
                plain_ema = peft.plain_state_dict(ema.module, ema_sd) if ema is not None else None
                save_model(net, out / MODEL_FILE, class_names=class_names, extra=extra, state_dict=plain_sd)
                if parameters["peft"]:
                    peft.save_adapter(net, model_sd, out / ADAPTER_FILE, extra={"step": step})
                if ema is not None:
                    save_model(ema.module, out / EMA_FILE, class_names=class_names, extra={**extra, "ema": True},
                               state_dict=plain_ema)
                # a better validation at this step (checkpoint follows validate): before the state that records it
                for b, module, sd in zip(bests, (net, ema.module if ema is not None else None), (plain_sd, plain_ema)):
                    if b.pending:
                        save_model(module, out / b.file, class_names=class_names, state_dict=sd, extra={
                            **extra, "epoch": b.epoch, "best": b.record(),
                            **({"ema": True} if module is not net else {})})
                        b.pending = False
                save_train_state(out / STATE_FILE, {
                    "model_name": net.model_name, "model_config": config_to_dict(net.cfg),
                    "step": step, "epoch": step // steps_per_epoch, "total_steps": total_steps,
                    "train_seconds": seconds_before + time.perf_counter() - t_start,
                    "global_batch": global_batch, "model": model_sd,
                    "optimizer": optim_sd, "scheduler": scheduler.state_dict(),
                    "horizon": horizon.state_dict(), "objective_schedule": objective.schedule.state_dict(),
                    "scaler": scaler.state_dict(), "ema": ema_sd,
                    "objective_name": objective.name, "objective": objective.state_dict(),
                    "rng": rngs, "recipe": recipe.to_dict(), "recipe_changes": changes, "val": last_val,
                    "best": bests[0].state() if bests else None,
                    "best_ema": bests[1].state() if len(bests) > 1 else None,
                    "stopped_early": stopped_early,
                    **({"class_balance": balance.record()} if balance is not None else {}),
                })
            barrier(ctx)

    # a criterion of the user's own is the validation loss too, on the targets it takes (distillation's is not)
    val_criterion = (objective.criterion if isinstance(objective, ClassificationObjective) and objective.custom
                     and not isinstance(objective, DistillationObjective) else None)

    def validate(epoch: int) -> dict[str, Any] | None:
        if val_set is None or not supervised:
            return None
        res: dict[str, Any] = {}
        with preserved_rng():
            if ctx.is_main or recipe.fsdp:  # a sharded model evaluates on every rank (each gathers its units)
                # the whole validation set on each evaluating process: the metrics are over every prediction
                r = evaluate(net, val_set, num_classes=num_classes, batch_size=max(recipe.batch_size, 256),
                             device=device, amp=recipe.amp, criterion=val_criterion, multi_label=multi_label)
                res = {f"val_{k}": v for k, v in r.summary().items()}
                if ema is not None:
                    re_ = evaluate(ema.module, val_set, num_classes=num_classes,
                                   batch_size=max(recipe.batch_size, 256), device=device, amp=recipe.amp,
                                   criterion=val_criterion, multi_label=multi_label)
                    res.update({f"val_ema_{k}": v for k, v in re_.summary().items()})
                for m in (net, *([ema.module] if ema is not None else [])):
                    reshard(m)
            if ctx.is_main:
                writers.write({"kind": "val", "step": step, "epoch": epoch, **res})
                ema_part = ""
                if ema is not None:  # top-1 where the targets are classes (mAP: multi-label), else the loss
                    ema_part = (f" (EMA {res['val_ema_top1']:.4f})" if "val_ema_top1" in res
                                else f" (EMA mAP {_number(res['val_ema_mAP'])})" if "val_ema_mAP" in res
                                else f" (EMA loss {_loss(res['val_ema_loss'])})")
                shown = (f" top-1 {res['val_top1']:.4f}" if "val_top1" in res else
                         f" mAP {_number(res['val_mAP'])} micro-F1 {res['val_micro_f1']:.4f}" if "val_mAP" in res
                         else "")
                log.info("epoch %d step %d: val loss %s%s%s", epoch + 1, step, _loss(res["val_loss"]), shown, ema_part)
                for b in bests:
                    if b.offer(res, step=step, epoch=epoch + 1):
                        log.info("%s: the best validation %s so far (%.6g at step %d)", b.file, b.metric,
                                 b.value, step)
            barrier(ctx)
        return res

    # ---- the loop
    stop = min(total_steps, until_step) if until_step is not None else total_steps
    stopped_early: dict[str, Any] | None = None

    def stalled() -> bool:
        """recipe.early_stopping_patience validations in a row without a better best_metric of the model (or of its
        EMA): rank 0 judges (it validates), every rank follows."""
        patience = recipe.early_stopping_patience
        judged = [b for b in bests if not b.off and b.metric is not None]
        flag = bool(patience and judged and all(b.stale >= patience for b in judged))
        if ctx.distributed:
            box = [flag]
            dist.broadcast_object_list(box, src=0)
            flag = box[0]
        return flag

    def stop_early(at_resume: bool = False) -> None:
        nonlocal stop, stopped_early
        stop = step
        b = bests[0]
        stopped_early = {"step": step, "epoch": step // steps_per_epoch, "total_steps": total_steps,
                         "patience": recipe.early_stopping_patience, "metric": b.metric, "best_step": b.step}
        if not ctx.is_main:
            return
        if at_resume:
            log.info("early stopping: the run stopped at step %d of %d (no better validation %s in %d validations); "
                     "--set early_stopping_patience=N with a larger N (or none) trains on", step, total_steps, b.metric,
                     b.stale)
        else:
            log.info("early stopping at step %d of %d: no better validation %s in %d validations (best %.6g at step "
                     "%s, kept in %s)", step, total_steps, b.metric, recipe.early_stopping_patience, b.value, b.step,
                     b.file)

    if resume and bests and stalled():
        stop_early(at_resume=True)
    bar = None
    if progress and ctx.is_main:
        from vitlab.train.progress import make_progress

        bar = make_progress(total_steps, step)  # a bar on a terminal, else a log line every N seconds
    history: list[dict[str, Any]] = []
    last_val = val  # what the training state keeps (--resume restores it; checkpoint's ``val`` may be None)
    t_start = time.perf_counter()
    t_log, steps_since_log = t_start, 0
    model.train()
    objective.train()
    peft.eval_frozen_modules(net)  # a frozen part is a fixed function: no dropout, BatchNorm statistics kept
    params = list(net.parameters()) + objective.parameters()
    for p in params:  # gradients the model came with (an earlier fit's refused step) are not this run's
        p.grad = None
    check_finite()  # a model (or a resumed state) that is not finite is refused before training
    forward = model  # the step module (or its DDP wrapper): objective and model in one call
    # --compile: forward + backward seconds of the first micro-batch of this call's first two steps
    compile_probe: list[float] = []
    if compile:
        from vitlab.export.runtimes import compile_model

        forward = compile_model(model)
    replanner = (Replanner(deadline, warmup=warmup, total_steps=total_steps, batch=global_batch, step=step)
                 if deadline is not None else None)

    def replan(new_total: int, step_s: float) -> None:
        nonlocal total_steps, epochs, stop, recipe
        if new_total == total_steps:
            return
        log.info("time budget: %.3f s per step over the last steps; %d steps now fit instead of %d (the learning "
                 "rate decays from here to the new end)", step_s, new_total, total_steps)
        horizon.replan(step, new_total)
        objective.replan(step, new_total)
        total_steps, epochs = new_total, math.ceil(new_total / steps_per_epoch)
        stop = min(total_steps, until_step) if until_step is not None else total_steps
        recipe = recipe.replace(max_steps=total_steps, epochs=epochs)
        if bar is not None:
            bar.total = total_steps
        if ctx.is_main:
            write_recipe()

    # the classification objectives take (image, label) batches: the first one is checked; other objectives
    # (self-supervised, dense tasks) take batches of their own forms
    checked = not isinstance(objective, ClassificationObjective)
    # a criterion of the user's own may take other targets (regression, multi-label); distillation takes labels
    standard_labels = not getattr(objective, "custom", False) or isinstance(objective, DistillationObjective)

    def sum_over_processes(counts: Tensor) -> Tensor:
        """A step's counts (loss denominators) summed over the processes."""
        if not ctx.distributed:
            return counts
        counts = counts.to(device)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        return counts.cpu()

    def drop_gradients() -> None:  # a step stopped before its update leaves none behind
        for p in params:
            p.grad = None

    with contextlib.ExitStack() as stack:
        stack.callback(peft.restore, net)  # last: the model given back plain (LoRA merged), as its checkpoint
        stack.callback(drop_gradients)
        stack.callback(undo_sync_bn)
        stack.callback(objective.end_step)
        signals = stack.enter_context(stop_at_step_boundary(not ctx.distributed))
        stack.callback(writers.close)
        if bar is not None:
            stack.callback(bar.close)
        start_epoch = step // steps_per_epoch
        for epoch in itertools.count(start_epoch):
            if step >= stop:
                break
            base_sampler.set_epoch(epoch)  # type: ignore[attr-defined]
            done_in_epoch = step - epoch * steps_per_epoch
            sampler.skip = done_in_epoch * accum * per_micro
            batches = _non_empty(loader)
            for _ in range(done_in_epoch, steps_per_epoch):
                if step >= stop:
                    break
                loss_sum = torch.zeros((), device=device)
                metric_sums: dict[str, Any] = {}
                # the step's micro-batches first (the same batches in the same order): the objective may count a
                # loss's denominator over the whole global batch before any of them runs
                micro_batches = []
                for _micro in range(accum):
                    batch = next(batches, None) if checked else _first_batch(batches)
                    if batch is None:
                        raise OutOfBatchesError(_out_of_batches(train_set, epoch, step, steps_per_epoch,
                                                                recipe.batch_size))
                    if not checked:  # what came, against what a classifier trains on, before the model sees it
                        check_classification_batch(batch, num_classes=num_classes,
                                                   in_chans=net.preprocessing.input_size[0], labels=standard_labels,
                                                   multi_label=multi_label)
                        checked = True
                    micro_batches.append(batch)
                objective.begin_step(StepBatches(micro_batches, ctx.world_size, sum_over_processes))
                for micro, batch in enumerate(micro_batches):
                    batch = _to_device(batch, device)
                    sync = micro == accum - 1
                    # DDP: no all-reduce before the last micro-batch; FSDP reduce-scatters each (sharded sums)
                    no_sync = (model.no_sync() if ctx.distributed and not sync and not recipe.fsdp
                               else contextlib.nullcontext())
                    timed = compile and micro == 0 and len(compile_probe) < 2
                    if timed:
                        _synchronize(device)
                        t_probe = time.perf_counter()
                    with no_sync:
                        with autocast_context(device, recipe.amp):
                            loss, metrics = forward(batch)
                        try:
                            scaler.scale(loss / accum).backward()
                        except Exception as e:
                            # the backward graph compiles in the first backward: when that fails, this
                            # micro-batch (the call's first) runs again eager, from zeroed gradients (not under
                            # DDP, whose reducer is left waiting for the failed backward's gradients)
                            if not (timed and not compile_probe and getattr(forward, "failed", "") is None
                                    and not ctx.distributed):
                                raise
                            forward.fall_back(e, where=" in the first backward")
                            optimizer.zero_grad(set_to_none=True)
                            with autocast_context(device, recipe.amp):
                                loss, metrics = forward(batch)
                            scaler.scale(loss / accum).backward()
                    if timed:
                        _synchronize(device)
                        compile_probe.append(time.perf_counter() - t_probe)
                    loss_sum += loss.detach().float()
                    for k, v in metrics.items():
                        v = v.detach().float() if isinstance(v, Tensor) else float(v)
                        metric_sums[k] = metric_sums.get(k, 0.0) + v / accum
                objective.end_step()
                loss_mean = all_reduce_mean(loss_sum / accum, ctx).item()
                if not math.isfinite(loss_mean):
                    if step > start_step and weights_diverged():  # the cause: the last update, not this batch
                        raise diverged("weights", f" ({_nonfinite_names(named_params())})")
                    raise NonFiniteLossError(f"non-finite loss ({loss_mean}) at step {step + 1}: the run stopped "
                                             f"before applying it. {advice(loss=True)}")
                grad_norm = None
                scaler.unscale_(optimizer)  # a no-op without fp16: the hooks and clipping see true gradients
                objective.before_optimizer_step(step)
                if recipe.clip_grad is not None:
                    grad_norm = nn.utils.clip_grad_norm_(params, recipe.clip_grad).item()
                    if not math.isfinite(grad_norm) and not scaler.is_enabled():  # fp16: the scaler skips the step
                        raise NonFiniteLossError(
                            f"non-finite gradient norm ({grad_norm}) at step {step + 1} (its loss, {loss_mean:.4g}, "
                            f"was finite): the run stopped before applying it. {advice(loss=True)}")
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                lr_now = optimizer.param_groups[-1]["lr"] / optimizer.param_groups[-1]["lr_scale"]
                last_loss, last_lr = loss_mean, lr_now
                scheduler.step()
                step += 1
                steps_since_log += 1
                objective.after_optimizer_step(step)
                if replanner is not None and (got := replanner.after_step(step, total_steps)) is not None:
                    if ctx.distributed:  # every rank runs rank 0's plan, and checks again at the same step
                        box = [got]
                        dist.broadcast_object_list(box, src=0)
                        got = box[0]
                        replanner.follow(step, got[0])
                    replan(*got)
                if ema is not None:
                    ema.update(net)
                if step % recipe.log_every == 0 or step == stop:
                    now = time.perf_counter()
                    ips = steps_since_log * global_batch / max(now - t_log, 1e-9)
                    t_log, steps_since_log = now, 0
                    shown = {k: round(float(v), 6) for k, v in _mean_over_ranks(metric_sums, ctx).items()}
                    rec = {"kind": "train", "step": step, "epoch": epoch, "loss": round(loss_mean, 6), "lr": lr_now,
                           "img_per_s": round(ips, 1), **({"grad_norm": round(grad_norm, 4)} if grad_norm else {}),
                           **shown}
                    history.append(rec)
                    writers.write(rec)
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss_mean:.4f}", **{k: f"{v:.4g}" for k, v in shown.items()},
                                        lr=f"{lr_now:.2e}", img_s=f"{ips:.0f}")
                if bar is not None:  # after the postfix: the line it logs (the last one included) shows this step's
                    bar.update(1)
                if recipe.checkpoint_every and step % recipe.checkpoint_every == 0 and step < stop:
                    checkpoint()
                if signals and step < stop:
                    checkpoint(val)
                    raise TrainingStopped(f"stopped at step {step} of {total_steps}: state saved in {out}, "
                                          f"--resume continues from there")
            epoch_done = step == (epoch + 1) * steps_per_epoch or step == total_steps
            if epoch_done and ((epoch + 1) % recipe.eval_every_epochs == 0 or step == total_steps):
                if val_set is not None and supervised:
                    check_finite()
                val = last_val = validate(epoch)
                if step < stop and bests and stalled():
                    stop_early()
            if step < stop:
                checkpoint(val)
        checkpoint(val)
    seconds = time.perf_counter() - t_start
    return FitResult(output_dir=out, step=step, epoch=step // steps_per_epoch, total_steps=total_steps,
                     global_batch=global_batch, lr=lr, seconds=seconds_before + seconds, segment_seconds=seconds,
                     val=val, history=history,
                     best=bests[0].record() if bests and ctx.is_main else None,
                     best_ema=bests[1].record() if len(bests) > 1 and ctx.is_main else None, stopped_early=stopped_early,
                     compile_seconds=_compile_seconds(forward, compile_probe),
                     compile_failed=getattr(forward, "failed", None),
                     class_balance={"mode": recipe.class_balance, "power": recipe.class_balance_power, **balanced}
                     if balanced else None, parameters=parameters)


def _number(v: float | None) -> str:
    """A metric for a log line: 4 decimals, or n/a (an mAP without any positive label)."""
    return "n/a" if v is None else f"{v:.4f}"


def _loss(v: float | None) -> str:
    """A validation loss for a log line: 4 decimals, or "not finite" (None: its summary's NaN or inf)."""
    return "not finite" if v is None else f"{v:.4f}"


def _mean_over_ranks(metrics: dict[str, Any], ctx: DistContext) -> dict[str, Any]:
    """A step's metrics averaged over the processes (the global batch's, as one process logs them); every rank
    calls this at the same steps with the same names."""
    if not ctx.distributed or not metrics:
        return metrics
    names = sorted(metrics)
    values = torch.stack([torch.as_tensor(metrics[k], dtype=torch.float32).to(ctx.device) for k in names])
    return dict(zip(names, all_reduce_mean(values, ctx).tolist(), strict=True))


def _compile_seconds(forward: Any, probe: list[float]) -> float | None:
    """The compile's share of the training time: the first step's forward and backward less the second's
    (None: nothing compiled, or the compile failed)."""
    if getattr(forward, "compile_s", None) is None or getattr(forward, "failed", None) or not probe:
        return None
    return max(probe[0] - (probe[1] if len(probe) > 1 else 0.0), 0.0)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Resumed(NamedTuple):
    step: int  # the step reached
    seconds: float  # the training seconds spent to reach it (0 for states written before they were recorded)
    changes: list[dict[str, Any]]  # the run's recorded setting changes, this resume's last
    val: dict[str, Any] | None  # the last validation's metrics
    best: tuple[Any, Any]  # the saved best validations (the model's, the EMA's; None where not kept)
    total_steps: int  # the run's length from here: the one asked for, or the run's own (data of another size)
    class_balance: dict[str, Any] | None = None  # the class counts recorded at the run's start (class_balance)


def _restore(path: Path, *, net: nn.Module, objective: Objective, optimizer, scheduler, horizon: Horizon, scaler, ema,
             recipe: Recipe, ctx: DistContext, total_steps: int, global_batch: int,
             steps_per_epoch: int = 1, train_images: int | None = None) -> _Resumed:
    """Load everything ``--resume`` needs from ``path`` into the run's objects.

    Settings that differ from the saved recipe (other than logistics) are appended to the run's changes, as
    ``{"from_step": step + 1, "settings": {field: [old, new]}}``.

    Another length (``total_steps`` not the saved one) re-plans the decay from the step reached, as a deadline
    does (:meth:`Horizon.replan`): the learning rate goes on from its saved value and reaches min_lr at the new
    end. A length that ends at or before the step reached is refused. An epoch-based run resumed with its own
    length settings on data of another size (other steps per epoch; ``train_images``: how many images the data
    has now) keeps its planned length in steps and its schedule, with a warning: the returned ``total_steps``."""
    state = load_train_state(path)
    saved_total = int(state.get("total_steps") or total_steps)
    check_same_model(state, net, path)
    check_same_optimizer(state, recipe, path)
    check_same_targets(state, recipe, path)
    check_same_global_batch(state, recipe, path, global_batch=global_batch, world_size=ctx.world_size)
    peft.check_same_peft(state, recipe, path)
    step = int(state["step"])
    planned_spe = _planned_steps_per_epoch(state, saved_total)
    data_now = (f"the training data now gives {steps_per_epoch} steps per epoch"
                f"{f' ({train_images} images, global batch {global_batch})' if train_images is not None else ''}")
    if (total_steps != saved_total and not recipe.max_steps and planned_spe is not None
            and planned_spe != steps_per_epoch and _same_length_settings(state, recipe)):
        # the length was not asked for: only the data's size changed it. A changed folder is warned about, not
        # refused (check_split_source), and the run goes on as it was planned, in steps
        log.warning("--resume on training data of another size: %s, %d when the run planned its %d epochs (%d "
                    "steps); the run keeps its length of %d steps (%.3g epochs of the data now) and its "
                    "learning-rate schedule, and will not match an uninterrupted run; for another length give "
                    "--steps N (N past %d, the step reached)", data_now, planned_spe, recipe.epochs, saved_total,
                    saved_total, saved_total / steps_per_epoch, step)
        total_steps = saved_total
    if total_steps != saved_total and total_steps <= step:
        asked = f"max_steps {recipe.max_steps}" if recipe.max_steps else f"epochs {recipe.epochs}"
        longer = (f"--steps {step + 1} or more" if recipe.max_steps else
                  f"--epochs {step // steps_per_epoch + 1} or more, or --steps {step + 1} or more")
        why = (f" ({data_now}, {planned_spe} when the run was planned)"
               if planned_spe is not None and planned_spe != steps_per_epoch else "")
        raise CheckpointError(
            f"--resume: the run in {path.parent} already reached step {step} (of {saved_total}); the length asked "
            f"for now, {total_steps} steps ({asked}){why}, does not go past it and would train nothing. Continue "
            f"the run's own length (its {saved_total} steps: leave out the --epochs / --steps / recipe that changed "
            f"it), give a longer one ({longer}), or start a new run from its weights (`vitlab finetune --from "
            f"{path.parent / MODEL_FILE} --output NEW ...`)")
    # states written while fit did not yet unwrap a compiled model carry "_orig_mod." on every key
    state["model"] = strip_wrapper_prefixes(state["model"])
    if state.get("ema") is not None:
        state["ema"] = strip_wrapper_prefixes(state["ema"])
    if recipe.fsdp:
        load_full_model_state(net, state["model"])
    else:
        load_strict(net, state["model"], source=str(path))
    if state.get("objective_name", "classification") != objective.name:
        hint = ("; give the run's --teacher (and --distill / --alpha / --tau)"
                if state.get("objective_name") == "distillation" else "")
        raise CheckpointError(f"--resume: {path} was trained with the {state.get('objective_name')!r} "
                              f"objective, this run asks for {objective.name!r}{hint}")
    objective.load_state_dict(state.get("objective", {}))
    load_optimizer_state(net, optimizer, state["optimizer"])  # by index (one process, DDP) or by name (FSDP)
    scheduler.load_state_dict(state["scheduler"])
    if "horizon" in state:  # a re-planned run's pace
        horizon.load_state_dict({k: state["horizon"][k] for k in ("knot_step", "knot_progress")})
    scaler.load_state_dict(state["scaler"])
    if ema is not None:
        if state.get("ema") is None:
            raise CheckpointError(f"{path}: the run had no EMA; resume with the same recipe")
        if recipe.fsdp:
            load_full_model_state(ema.module, state["ema"])
        else:
            ema.module.load_state_dict(state["ema"])
    saved_recipe = state.get("recipe", {})
    same_warmup = all(k in saved_recipe and saved_recipe[k] == getattr(recipe, k)
                      for k in ("warmup_steps", "warmup_epochs"))
    if total_steps != saved_total:  # the saved plan (its warm-up too), then re-planned from here to the new end
        warmup = state.get("horizon", {}).get("warmup_steps")
        if warmup is None:  # a state written before it recorded its horizon: the warm-up its recipe gave
            r = saved_recipe
            warmup = min(max(int(r.get("warmup_steps", 0)), round(float(r.get("warmup_epochs", 0.0)) * steps_per_epoch)),
                         max(0, saved_total - 1))
        horizon.warmup_steps, horizon.total_steps = int(warmup), saved_total
        horizon.replan(step, total_steps)
    elif same_warmup and state.get("horizon", {}).get("warmup_steps") is not None:
        # the run's own warm-up, in steps: warmup_epochs on data of another size would give another
        horizon.warmup_steps, horizon.total_steps = int(state["horizon"]["warmup_steps"]), saved_total
    if "objective_schedule" in state:  # the objective's own schedules (DINO's momentum, the dVAE's temperature)
        objective.schedule.load_state_dict(state["objective_schedule"])
    else:  # a state written before it was recorded: the saved length, never re-planned
        objective.schedule = Horizon(total_steps=saved_total, warmup_steps=0)
    if total_steps != saved_total:
        objective.replan(step, total_steps)
    changed = changed_settings(recipe, saved_recipe)
    changes = list(state.get("recipe_changes") or [])
    if changed:
        changes.append({"from_step": step + 1,
                        "settings": {k: [saved_recipe.get(k), recipe.to_dict()[k]] for k in changed}})
    kept = (f"; recipe.json and the checkpoints keep the settings now in force and record this change (\"changes\": "
            f"from step {step + 1})") if changed else ""
    if total_steps != saved_total:
        group = optimizer.param_groups[-1]
        lr_now = group["lr"] / group.get("lr_scale", 1.0)
        min_lr = min(recipe.min_lr, scheduler.base_lrs[-1] / group.get("lr_scale", 1.0))
        others = [k for k in changed if k not in ("epochs", "max_steps")]
        if recipe.schedule == "constant":
            how = "which stays constant"
        elif horizon.progress(step) >= 1.0 and step > horizon.warmup_steps:  # a finished run, made longer
            how = (f"which stays at min_lr: the run had ended its decay; to train the new steps on a schedule of "
                   f"their own, start a new run from its weights (`vitlab finetune --from {path.parent / MODEL_FILE} "
                   f"--output NEW ...`)")
        else:
            how = f"decaying to min_lr ({min_lr:.3g}) at the new end (re-planned from here, as --time-budget does)"
        log.warning("resuming with another length (%d -> %d steps, at step %d%s): the optimiser continues from its "
                    "saved state and the learning rate from its value here (%.3g), %s; the run will not match an "
                    "uninterrupted one%s", saved_total, total_steps, step,
                    f"; also changed: {', '.join(others)}" if others else "", lr_now, how, kept)
    elif changed:
        log.warning("resuming with a changed recipe (%s): the optimiser and schedule continue from their saved state, "
                    "and the run will not match an uninterrupted one%s", ", ".join(changed), kept)
    rngs = state["rng"]
    if len(rngs) == ctx.world_size:
        set_rng_state(rngs[ctx.rank])
    else:
        log.warning("resuming on %d processes from a run on %d: random streams are re-seeded",
                    ctx.world_size, len(rngs))
        _seed_everything(recipe.seed + 1000 * ctx.rank + step)
    log.info("resumed %s at step %d of %d", path.parent, step, total_steps)
    return _Resumed(step, float(state.get("train_seconds", 0.0)), changes, _last_validation(state, path),
                    (state.get("best"), state.get("best_ema")), total_steps, state.get("class_balance"))


# recipe fields that do not change what a run computes: how the (checked, unchanged) global batch is split over
# processes and micro-batches is logistics too; the model is checked itself (check_same_model), and older runs
# recorded the recipe's default
RESUME_LOGISTICS = frozenset({"workers", "cache_images", "cpu_threads", "log_every", "checkpoint_every",
                              "eval_every_epochs", "description", "best_metric", "early_stopping_patience", "fsdp",
                              "batch_size", "accum_steps", "global_batch", "model"})


def changed_settings(recipe: Recipe, saved_recipe: dict[str, Any]) -> list[str]:
    """The recipe fields a resumed run changes (sorted), logistics aside; fields an older vitlab did not record are
    not changes of the run's."""
    return sorted(k for k, v in recipe.to_dict().items()
                  if k not in RESUME_LOGISTICS and k in saved_recipe and saved_recipe[k] != v)


def check_finished_unchanged(state: dict[str, Any], recipe: Recipe, path: Path) -> None:
    """A run that has trained all its steps, resumed with other settings and no longer length, would train nothing
    with them and only rewrite its records as if it had: refused, naming them."""
    step, total = int(state["step"]), state.get("total_steps")
    saved = state.get("recipe", {})
    if total is None or step < int(total) or state.get("stopped_early"):
        return
    changed = [k for k in changed_settings(recipe, saved) if k not in ("epochs", "max_steps")]
    longer = any(k in saved and saved[k] != getattr(recipe, k) for k in ("epochs", "max_steps"))
    if changed and not longer:
        raise CheckpointError(
            f"--resume: the run in {path.parent} has trained all its steps ({step} of {total}), so "
            f"{', '.join(f'{k}={getattr(recipe, k)!r}' for k in changed)} would train nothing and only rewrite its "
            f"records as if it had: leave them out, give more steps (--steps / --epochs) to train on with them, or "
            f"start a new run from its weights (vitlab finetune --from {path.parent / MODEL_FILE} --output NEW ...)")


def _planned_steps_per_epoch(state: dict[str, Any], saved_total: int) -> int | None:
    """The steps per epoch an epoch-based run planned its length with (its saved total over its epochs); None
    for a run whose length was given in steps (or re-planned by a deadline, which records max_steps)."""
    r = state.get("recipe", {})
    epochs = r.get("epochs")
    if r.get("max_steps") or not isinstance(epochs, int) or epochs < 1 or saved_total % epochs:
        return None
    return saved_total // epochs


def _same_length_settings(state: dict[str, Any], recipe: Recipe) -> bool:
    """Whether the resumed run asks for the saved run's own length (its epochs and max_steps, as recorded)."""
    r = state.get("recipe", {})
    return "epochs" in r and "max_steps" in r and r["epochs"] == recipe.epochs and r["max_steps"] == recipe.max_steps


def _last_validation(state: dict[str, Any], path: Path) -> dict[str, Any] | None:
    """The validation metrics the saved state kept; for a state written before it kept them, those of the run's
    model.safetensors when it was written at the same step."""
    if "val" in state:
        return state["val"]
    from vitlab.train.run import checkpoint_metadata

    extra = checkpoint_metadata(path.parent / MODEL_FILE).get("extra") or {}
    return extra.get("val") if extra.get("step") == state.get("step") else None


# recipe fields that the saved optimiser and scheduler state carries (param groups' lr, betas, eps, momentum,
# nesterov, weight_decay; the scheduler's base lrs): a resumed run keeps the saved values whatever it is given
OPTIMIZER_FIELDS = ("lr", "lr_base_batch", "layer_decay", "weight_decay", "betas", "eps", "momentum", "nesterov")


def check_same_optimizer(state: dict[str, Any], recipe: Recipe, path: Path) -> None:
    """--resume continues the saved optimiser and schedule: another optimizer, or another value of a field the
    restored state would override (``OPTIMIZER_FIELDS``), is refused rather than recorded and ignored."""
    saved = state.get("recipe", {})
    was = saved.get("optimizer")
    if was != recipe.optimizer:
        raise CheckpointError(f"--resume: {path} was trained with optimizer {was!r}, this run "
                              f"asks for {recipe.optimizer!r}; its optimizer state cannot be reused")
    mine = recipe.to_dict()
    # the fields this optimizer uses (an adamw run's momentum is not in its state)
    unused = {k for k, users in OPTIMIZER_SETTINGS.items() if recipe.optimizer not in users}
    changed = [k for k in OPTIMIZER_FIELDS if k not in unused and k in saved and saved[k] != mine[k]]
    if changed:
        run = path.parent
        raise CheckpointError(f"--resume: the run in {run} was trained with "
                              f"{', '.join(f'{k} {saved[k]!r}' for k in changed)}; this asks for "
                              f"{', '.join(f'{k} {mine[k]!r}' for k in changed)}. A resumed run continues its saved "
                              f"optimiser and schedule, which would override {' / '.join(changed)}: leave "
                              f"{'it' if len(changed) == 1 else 'them'} as the run had, or start a new run from its "
                              f"weights to change {'it' if len(changed) == 1 else 'them'} "
                              f"(`vitlab finetune --from {run / MODEL_FILE} --output NEW ...`)")


def check_same_targets(state: dict[str, Any], recipe: Recipe, path: Path) -> None:
    """--resume keeps the run's kind of targets: a multi-label run (binary cross entropy, sigmoid scores) does not
    go on as a single-label one, nor the reverse."""
    was = bool(state.get("recipe", {}).get("multi_label", False))
    if was != recipe.multi_label:
        kinds = {True: "multi-label (multi_label true, --multi-label)", False: "single-label (multi_label false)"}
        raise CheckpointError(f"--resume: the run in {path.parent} was trained {kinds[was]}; this run asks for "
                              f"{kinds[recipe.multi_label]}; resume with the run's own setting, or start a new run "
                              f"(another --output)")


def check_same_global_batch(state: dict[str, Any], recipe: Recipe, path: Path, *, global_batch: int,
                            world_size: int) -> None:
    """--resume with another number of processes: the run's steps (warm-up, epochs, the place in the data) are
    steps of its global batch, so batch_size x accum x processes must give the saved one."""
    saved = state.get("global_batch")
    if saved is None or saved == global_batch:
        return
    accum = global_batch // (recipe.batch_size * world_size)
    procs = len(state.get("rng") or []) or "?"
    ways = []
    if saved % (accum * world_size) == 0:
        ways.append(f"--batch-size {saved // (accum * world_size)}")
    if recipe.global_batch is None and saved % (recipe.batch_size * world_size) == 0:
        ways.append(f"--set accum_steps={saved // (recipe.batch_size * world_size)}")
    ways.append(f"the run's {procs} process(es)")
    raise CheckpointError(
        f"--resume: the run in {path.parent} was trained with global batch {saved} (on {procs} process(es)); this "
        f"run's is {global_batch} ({recipe.batch_size} x {accum} accum x {world_size} process(es)). Its warm-up, "
        f"schedule and place in the data are counted in steps of {saved}: resume with batch_size x accum x "
        f"processes = {saved} ({' or '.join(ways)}), or start a new run from its weights "
        f"(`vitlab finetune --from {path.parent / MODEL_FILE} --output NEW ...`)")


def check_same_model(state: dict[str, Any], net: nn.Module, path: Path) -> None:
    name, cfg = state.get("model_name"), state.get("model_config")
    mine = config_to_dict(net.cfg)
    missing = sorted(set(mine) - set(cfg or {})) if name == net.model_name else []
    if missing:
        # a run written by an older vitlab, whose config had fewer fields: those added since take the registered
        # model's values, as loading its model.safetensors does (the model it trained)
        from vitlab.checkpoints.vitlab_format import config_from_dict
        from vitlab.models.registry import get_entry

        try:
            cfg = config_to_dict(config_from_dict(get_entry(name).config, cfg or {}))
        except Exception:  # noqa: S110 - an unknown field or model: the comparison below says what differs
            pass
    if name != net.model_name or cfg != mine:
        diff = sorted(k for k in set(cfg or {}) | set(mine) if (cfg or {}).get(k) != mine.get(k))
        values = "; ".join(f"{k}: {(cfg or {}).get(k)!r} -> {mine.get(k)!r}" for k in diff)
        older = (f" The run was written by an older vitlab (its config lacks {', '.join(missing)}), whose defaults "
                 f"differed: resume with the run's values (--set model_overrides.FIELD=VALUE), or continue it with "
                 f"the older vitlab" if missing else "")
        raise CheckpointError(
            f"--resume: {path} is a checkpoint of {name!r}, but this run builds {net.model_name!r}"
            + (f" (config differs in: {values})" if diff else "")
            + "; resume with the same --model / recipe, or choose another --output." + older
        )


def tidy_run_directory(out: Path, step: int) -> None:
    """On resume from ``step``: remove temporary files of a killed checkpoint write and the metrics records
    logged after that checkpoint (the resumed run logs them again)."""
    from vitlab.train.state import remove_stale_temporaries, truncate_metrics

    for p in remove_stale_temporaries(out):
        log.info("removed %s, left by an interrupted checkpoint write", p.name)
    dropped = truncate_metrics(out / METRICS_FILE, step)
    if dropped:
        log.info("%s: dropped %d record(s) logged after step %d, where the run resumes", METRICS_FILE, dropped, step)


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def atomic_text(path: Path, text: str) -> None:
    from vitlab.checkpoints import atomic_write

    def write(tmp: str) -> None:
        Path(tmp).write_text(text, encoding="utf-8")

    atomic_write(path, write)


__all__ = ["EvalResult", "FitResult", "NonFiniteLossError", "fit"]
