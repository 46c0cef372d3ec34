"""What a training step computes: the engine's one interface to every objective.

:func:`vitlab.train.fit` owns the loop (accumulation, AMP, clipping, the optimiser, schedule, EMA of the
model, checkpoints and exact resume, DDP). What the step computes from a batch is an :class:`Objective`:

* ``step(model, batch) -> (loss, metrics)``: the scalar loss to minimise and the values to log
  (detached tensors or floats: masked accuracy, reconstruction loss, teacher entropy, ...).
* ``modules()``: the modules the objective owns besides the model, by name: trainable ones (heads,
  decoders: their parameters join the optimiser and are synchronised under DDP) and frozen ones
  (EMA teachers, tokenizers, distillation teachers). Their state goes into the training state, except
  the names listed in ``unsaved`` (e.g. a distillation teacher that is re-read from its own file).
* ``before_optimizer_step(step)``: after gradients are final (unscaled, not yet clipped), before the
  update: e.g. DINO drops the last layer's gradients in the first epoch and clips per parameter.
* ``after_optimizer_step(step)``: after each update: EMA teachers, momentum schedules.
  ``step`` is the number of optimiser steps taken so far (1 after the first update).
* ``progress(step)``: where a schedule over the whole run stands (0 at the start, 1 at its end), for the
  objective's own schedules (DINO's teacher momentum, the dVAE's temperature). A run whose length changes
  (``--time-budget``, ``--resume`` with another length) re-plans it (``replan``) so that they go on from where
  they are instead of jumping.
* ``begin_step(batches)`` / ``end_step()``: around the micro-batches of one optimiser step, with all of
  them (:class:`StepBatches`). A loss that is a mean over a count that depends on the batch (target
  boxes, labelled pixels, masked patches) counts its denominator over the whole global batch here, so
  that accumulation and DDP give the update of one process with that batch (:meth:`StepBatches.normaliser`).

Random draws inside ``step`` (masks, noise) must come from torch's global generator, which the trainer
saves and restores, so that resumed runs equal uninterrupted ones.

Objectives are plain objects rather than ``nn.Module``s, so that ``modules()`` can keep its name and a
frozen teacher never becomes a submodule that someone trains by accident.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from vitlab.train.schedule import Horizon

Metrics = dict[str, Tensor | float]


def _same(t: Tensor) -> Tensor:
    return t


@dataclass(frozen=True)
class StepBatches:
    """The micro-batches of one optimiser step on this process, in the order ``step`` receives them (as the
    loader gave them, before they are moved to the device), with what is needed to count over the processes.

    The trainer divides each micro-batch's loss by their number (``accum``) and DDP averages gradients over
    the ``world_size`` processes. A loss ``sum / N`` whose count ``N`` depends on the batch is the one of a
    single process with the whole global batch when each micro-batch divides its own sum by
    ``normaliser(...)``: ``max(N_global, minimum) / (accum * world_size)``."""

    micro_batches: list[Any]
    world_size: int = 1
    sum_over_processes: Callable[[Tensor], Tensor] = _same  # an all-reduce (sum) under DDP

    @property
    def accum(self) -> int:
        return len(self.micro_batches)

    def normaliser(self, counts: list[float], minimum: float | list[float] = 1.0) -> list[float]:
        """This process's counts over its micro-batches (one per loss term) -> each term's divisor for a
        micro-batch's sum: the count over all micro-batches and processes (at least ``minimum``, one or one per
        term), divided by ``accum * world_size``."""
        total = self.sum_over_processes(torch.tensor(counts, dtype=torch.float64)).tolist()
        least = minimum if isinstance(minimum, list) else [minimum] * len(total)
        return [max(n, m) / (self.accum * self.world_size) for n, m in zip(total, least, strict=True)]


class Objective:
    """Base class: classification-free defaults for every hook; subclasses implement :meth:`step`."""

    name: str = "objective"
    supervised: bool = False  # labels matter: the engine checks class counts and validates on labelled data
    unsaved: frozenset[str] = frozenset()  # owned modules kept out of the training state

    # ---------------------------------------------------------------------------------- ownership
    def modules(self) -> dict[str, nn.Module]:
        """Modules owned besides the model (trainable and frozen), by name."""
        return {}

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {k: m for k, m in self.modules().items() if any(p.requires_grad for p in m.parameters())}

    def parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the owned modules (the optimiser and gradient clipping see them)."""
        return [p for m in self.trainable_modules().values() for p in m.parameters() if p.requires_grad]

    def to(self, device: torch.device | str) -> Objective:
        for m in self.modules().values():
            m.to(device)
        return self

    def train(self, mode: bool = True) -> Objective:
        """Trainable modules follow ``mode``; frozen ones (teachers, tokenizers) stay in eval mode."""
        trainable = self.trainable_modules()
        for k, m in self.modules().items():
            m.train(mode and k in trainable)
        return self

    def state_dict(self) -> dict[str, Any]:
        return {k: {n: t.detach().cpu() for n, t in m.state_dict().items()}
                for k, m in self.modules().items() if k not in self.unsaved}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = {k: m for k, m in self.modules().items() if k not in self.unsaved}
        if set(state) != set(mine):
            raise ValueError(f"{self.name}: the saved objective state holds {sorted(state)}, this objective "
                             f"owns {sorted(mine)}")
        for k, m in mine.items():
            m.load_state_dict(state[k], strict=True)

    # ---------------------------------------------------------------------------------- the step
    def setup(self, model: nn.Module, *, steps_per_epoch: int, total_steps: int) -> None:
        """Called once by the engine before the optimiser is built (and before a resume loads state):
        the model being trained and the run length, for schedules that depend on it (:meth:`progress`).
        Subclasses that override it call ``super().setup``."""
        self.steps_per_epoch = steps_per_epoch
        self.schedule = Horizon(total_steps=total_steps, warmup_steps=0)

    @property
    def total_steps(self) -> int:
        """The run's length in optimiser steps, as last planned (:meth:`replan`)."""
        return self.schedule.total_steps

    def progress(self, step: int) -> float:
        """The run's progress at optimiser step ``step``, 0 to 1, continuous when the length is re-planned."""
        return self.schedule.progress(step)

    def replan(self, step: int, total_steps: int) -> None:
        """The run now ends at ``total_steps``: schedules go on from their value at ``step`` to their end there."""
        self.schedule.replan(step, total_steps)

    def step(self, model: nn.Module, batch: Any) -> tuple[Tensor, Metrics]:
        raise NotImplementedError

    def begin_step(self, batches: StepBatches) -> None:
        """Before the first micro-batch of an optimiser step: all of its micro-batches (e.g. to count a loss's
        denominator over the global batch). Default: nothing."""

    def end_step(self) -> None:
        """After the last micro-batch of the step (also when the run stops): forget what ``begin_step`` kept,
        so that ``step`` called on its own normalises by its batch again."""

    def before_optimizer_step(self, step: int) -> None:
        """Gradients are final; ``step`` optimiser steps were taken before this one."""

    def after_optimizer_step(self, step: int) -> None:
        """The optimiser has taken its ``step``-th step."""

    def describe(self) -> str:
        return self.name


class ClassificationObjective(Objective):
    """Cross entropy on (images, labels), optionally under Mixup/CutMix, or any ``criterion(images,
    outputs, targets)`` (the form distillation losses take)."""

    name = "classification"
    supervised = True

    def __init__(self, criterion: Callable[[Tensor, Any, Tensor], Tensor] | None = None, *,
                 label_smoothing: float = 0.0, mixup: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
                 multi_label: bool = False) -> None:
        from vitlab.train.losses import ClassificationLoss, MultiLabelLoss

        self.custom = criterion is not None
        self.multi_label = multi_label  # multi-hot targets: binary cross entropy by default, mAP / F1 metrics
        self.criterion = criterion or (MultiLabelLoss if multi_label else ClassificationLoss)(
            label_smoothing=label_smoothing)
        self.mixup = mixup
        # Mixup smooths the targets it makes: the loss (or a distillation loss's base) must not smooth them again
        for loss in (self.criterion, getattr(self.criterion, "base_module", None)):
            if isinstance(loss, ClassificationLoss):
                loss.mixed_targets = mixup is not None

    def setup(self, model: nn.Module, *, steps_per_epoch: int, total_steps: int) -> None:
        super().setup(model, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
        if self.custom and hasattr(model, "set_distilled_training"):
            model.set_distilled_training(True)  # a custom criterion reads both heads of a distilled DeiT

    def modules(self) -> dict[str, nn.Module]:
        return {"criterion": self.criterion} if isinstance(self.criterion, nn.Module) else {}

    def describe(self) -> str:
        return f"{self.name} (multi-label)" if self.multi_label else self.name

    def weigh_classes(self, weights: Tensor) -> None:
        """Per-class weights (``recipe.class_balance = "loss"``) for the loss on the labels: vitlab's cross entropy
        (binary cross entropy's ``pos_weight`` for multi-label), also as a distillation loss's label term."""
        losses = label_losses(self.criterion)
        if not losses:
            raise ValueError(class_weights_refused(self.criterion))
        for loss in losses:
            loss.class_weights = weights

    def step(self, model: nn.Module, batch: Any) -> tuple[Tensor, Metrics]:
        x, y = batch
        if self.mixup is not None:
            x, y = self.mixup(x, y)
        loss = self.criterion(x, model(x), y)
        return loss, {}


class DistillationObjective(ClassificationObjective):
    """A :class:`~vitlab.train.distill.DistillationLoss` as the criterion: the frozen teacher is owned
    (moved with the objective) but not saved; a distillation-token student trains both heads."""

    name = "distillation"
    unsaved = frozenset({"criterion"})  # the teacher is re-read from its own checkpoint on resume

    def __init__(self, criterion: nn.Module, *, mixup=None) -> None:
        super().__init__(criterion, mixup=mixup)

    def train(self, mode: bool = True) -> Objective:
        self.criterion.train(mode)  # DistillationLoss keeps its teacher in eval mode itself
        return self

    def step(self, model: nn.Module, batch: Any) -> tuple[Tensor, Metrics]:
        loss, _ = super().step(model, batch)
        return loss, dict(getattr(self.criterion, "last_parts", {}))


def label_losses(criterion: Any) -> list[Any]:
    """The :class:`~vitlab.train.losses.ClassificationLoss` instances that make ``criterion``'s loss on the labels:
    the criterion itself, or a distillation loss's label term; none for a criterion of the user's own."""
    from vitlab.train.losses import ClassificationLoss

    return [loss for loss in {id(x): x for x in (criterion, getattr(criterion, "base_module", None))}.values()
            if isinstance(loss, ClassificationLoss)]


def class_weights_refused(criterion: Any) -> str:
    return (f"class_balance=loss weighs vitlab's cross entropy by class; the criterion given to fit "
            f"({type(criterion).__name__}) is not one (nor a distillation loss over one): weigh the classes in it "
            f"yourself, or use class_balance=sampler")


def objective_for(criterion: Callable | None, recipe: Any, num_classes: int) -> Objective:
    """The classification objective ``fit`` runs by default: cross entropy (or ``criterion``; distillation
    for a DistillationLoss) with the recipe's label smoothing and Mixup/CutMix; with ``recipe.multi_label``,
    binary cross entropy on multi-hot targets (:class:`~vitlab.train.losses.MultiLabelLoss`), Mixup/CutMix mixing
    the multi-hot rows by their lambda."""
    from vitlab.train.distill import DistillationLoss

    multi_label = bool(getattr(recipe, "multi_label", False))
    if multi_label and isinstance(criterion, DistillationLoss):
        raise ValueError("distillation (--teacher) trains single-label classifiers (the teacher's softmax or its "
                         "top class); it is not supported with multi_label (--multi-label): leave --teacher out")
    mixup = None
    if recipe.uses_mixup:
        from vitlab.data import Mixup

        mixup = Mixup(num_classes=num_classes, mixup_alpha=recipe.mixup_alpha, cutmix_alpha=recipe.cutmix_alpha,
                      prob=recipe.mixup_prob, switch_prob=recipe.mixup_switch_prob,
                      label_smoothing=recipe.label_smoothing)
    if isinstance(criterion, DistillationLoss):
        return DistillationObjective(criterion, mixup=mixup)
    return ClassificationObjective(criterion, label_smoothing=recipe.label_smoothing, mixup=mixup,
                                   multi_label=multi_label)


__all__ = ["ClassificationObjective", "DistillationObjective", "Metrics", "Objective", "StepBatches", "objective_for"]
