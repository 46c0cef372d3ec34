"""``--time-budget``: size a run so that its schedule ends on time.

The first few training steps are timed on a throw-away copy of the model, through the run's own data
loader (so decoding, augmentation and the optimiser are included); the run then gets as many steps as
fit the time left after the set-up already spent and the final evaluation, and its cosine decay spans
exactly those steps. The arithmetic is :func:`steps_for_budget`, a pure function.

That first measurement is short and taken while the process is still warming up (on a 2-core Xeon it read
0.307 s per step where the run then averaged 0.262), and a shared machine's speed drifts. So the run also
carries a :class:`Deadline`: ``fit`` re-times its own steps at the end of the warm-up and at set points of the
decay (more of them towards the end), and re-plans its length (:func:`replan_total_steps`) with the learning rate kept continuous
(:class:`vitlab.train.schedule.Horizon`).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from vitlab.train.recipe import Recipe

log = logging.getLogger(__name__)

# Share of the remaining time given to training steps; the rest absorbs noise in the measurement
# (a machine whose load changes, checkpoints, logging).
SAFETY = 0.92
# The same for a re-plan from the run's own steps: a longer, later measurement of a shorter remainder.
REPLAN_SAFETY = 0.95
# A forward pass costs about a third of a training step per image.
EVAL_COST = 1 / 3


def finish_reserve_s(budget_s: float) -> float:
    """Seconds of a budget kept for what follows the last step and no step time predicts: the final
    checkpoint and training state, the test loader's start, the results and the interpreter's exit. MNIST's
    10-minute run, re-planned until 1% before its end, finished 3 s late without it. 0.5% of the budget,
    between 5 and 30 s."""
    return min(30.0, max(5.0, 0.005 * budget_s))

_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600}
_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(hr|h|min|m|sec|s)")


def parse_duration(text: str) -> float:
    """"20m", "1h30m", "90s", "1.5h" -> seconds. A unit is required."""
    s = str(text).strip().lower().replace(" ", "")
    parts = _PART.findall(s)
    if not parts or "".join(n + u for n, u in parts) != s:
        raise ValueError(f"--time-budget {text!r}: expected a duration such as 20m, 1h30m or 90s")
    seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"--time-budget {text!r}: must be positive")
    return seconds


def steps_for_budget(*, budget_s: float, elapsed_s: float, step_s: float, eval_images: int, batch: int,
                     safety: float = SAFETY) -> int:
    """Optimiser steps that fit in ``budget_s`` after ``elapsed_s`` already spent, at ``step_s`` per step of
    ``batch`` images, keeping time to evaluate ``eval_images`` at the end. At least 1."""
    if step_s <= 0 or budget_s <= 0:
        raise ValueError("steps_for_budget: budget and step time must be positive")
    eval_s = eval_images * EVAL_COST * step_s / max(1, batch)
    remaining = budget_s - elapsed_s - eval_s
    return max(1, int(safety * remaining / step_s))


def process_started(max_age_s: float = 30.0) -> float:
    """When this process started, on the ``time.monotonic()`` clock, if that was at most ``max_age_s`` ago
    (a command just launched: its budget includes the interpreter's start-up and imports); else, and where
    ``/proc`` is missing, now (a long-lived process that runs a command, e.g. a notebook or a test)."""
    try:  # both on the boot clock: seconds since boot, and the process's start in clock ticks since boot
        with open("/proc/uptime") as f:
            up = float(f.read().split()[0])
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        age = up - int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat: starttime
    except (OSError, ValueError, IndexError):
        return time.monotonic()
    return time.monotonic() - age if 0 <= age <= max_age_s else time.monotonic()


@dataclass(frozen=True, kw_only=True)
class Deadline:
    """When the whole command should be done, for ``fit`` to re-plan its length against.

    Args:
        end: ``time.monotonic()`` value of the deadline.
        eval_images: images evaluated after the last step (validation and test), whose time is kept free.
        checks: where the length is re-planned, as fractions of the planned decay; 0 is the end of the
            warm-up (timed over its second half, after the first slow steps). Denser towards the end, where
            a machine that slows down (a shared host) would otherwise carry the run past its deadline: on a
            2-core VM the last tenth of a CIFAR-10 run once ran at 60% of the speed measured before it.
        clock: the clock ``end`` is on (tests give a fake one).
    """

    end: float
    eval_images: int = 0
    checks: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 0.85, 0.9, 0.94, 0.97, 0.99)
    clock: Callable[[], float] = field(default=time.monotonic, compare=False, repr=False)


def replan_total_steps(*, step: int, now: float, deadline: Deadline, step_s: float, batch: int,
                       safety: float = REPLAN_SAFETY) -> int:
    """The run's new length at ``step`` (``now`` on the monotonic clock), at ``step_s`` seconds per step of
    ``batch`` images: the steps that fit before the deadline, less the final evaluation. At least one more."""
    return step + steps_for_budget(budget_s=max(deadline.end - now, 1e-9), elapsed_s=0.0, step_s=step_s,
                                   eval_images=deadline.eval_images, batch=batch, safety=safety)


class Replanner:
    """Times a run's own steps and, at the :class:`Deadline`'s checks, gives the run's new length (``fit``
    calls :meth:`after_step` after every optimiser step). Each measurement covers the steps since the
    previous check; the first skips the first half of the warm-up, whose steps run slow."""

    def __init__(self, deadline: Deadline, *, warmup: int, total_steps: int, batch: int, step: int = 0) -> None:
        self.deadline, self.warmup, self.batch, self.clock = deadline, warmup, batch, deadline.clock
        self.pending = sorted(deadline.checks)
        self.next: int | None = None
        self._advance(step, total_steps)
        self.mark_step = max(step, self.next // 2) if self.next is not None else step
        self.mark_time: float | None = self.clock() if self.mark_step == step else None

    def _advance(self, step: int, total_steps: int) -> None:
        while self.pending:
            at = max(self.warmup, 2, self.warmup + round(self.pending[0] * (total_steps - self.warmup)))
            if step < at < total_steps:
                self.next = at
                return
            self.pending.pop(0)
        self.next = None

    def after_step(self, step: int, total_steps: int) -> tuple[int, float] | None:
        """At a check: (the new total steps, the seconds per step measured); else None."""
        if step == self.mark_step and self.mark_time is None:
            self.mark_time = self.clock()
            return None
        if step != self.next or self.mark_time is None:
            return None
        now = self.clock()
        step_s = (now - self.mark_time) / max(1, step - self.mark_step)
        new_total = replan_total_steps(step=step, now=now, deadline=self.deadline, step_s=step_s, batch=self.batch)
        self.pending.pop(0)
        self.mark_step, self.mark_time = step, now
        self._advance(step, new_total)
        return new_total, step_s

    def follow(self, step: int, total_steps: int) -> None:
        """The run goes on with ``total_steps`` (another process's plan, under DDP): place the next check
        as every process does, so that all of them stop at it together."""
        self._advance(step, total_steps)


def time_steps(step: Callable[[], None], *, steps: int = 8, warmup: int = 2, min_seconds: float = 0.0,
               max_steps: int = 200, clock: Callable[[], float] = time.perf_counter) -> float:
    """Mean seconds of ``step()`` after ``warmup`` untimed calls: at least ``steps`` calls, and more (up to
    ``max_steps``) until ``min_seconds`` have been timed. The mean, not the median: the occasional slow
    step (a busy machine, a page fault) costs the run time too."""
    for _ in range(warmup):
        step()
    times: list[float] = []
    while len(times) < steps or (sum(times) < min_seconds and len(times) < max_steps):
        t0 = clock()
        step()
        times.append(clock() - t0)
    return statistics.fmean(times)


def measure_step_seconds(model: nn.Module, recipe: Recipe, train_set: Dataset, device: torch.device, *,
                         steps: int = 8, warmup: int = 2, min_seconds: float = 0.0, objective: Any = None,
                         criterion: Any = None) -> float:
    """Seconds per optimiser step of ``recipe`` on a copy of ``model``, data loading included. Every
    random generator is left as it was, so the run itself is unchanged by the measurement.

    ``objective``: a task's objective (``objective.step(net, batch) -> (loss, logs)``: detection, segmentation);
    None: classification, with ``criterion(images, outputs, labels)`` (a distillation loss, whose teacher's forward
    is then timed too) or the recipe's label smoothing."""
    from vitlab.data import create_loader
    from vitlab.train.evaluate import autocast_context
    from vitlab.train.losses import ClassificationLoss
    from vitlab.train.optim import build_optimizer
    from vitlab.train.state import preserved_rng

    with preserved_rng():
        net = copy.deepcopy(model).to(device).train()
        optimizer = build_optimizer(net, recipe, lr=recipe.lr, quiet=True)  # fit warns about the recipe
        if objective is None:
            criterion = criterion or ClassificationLoss(label_smoothing=recipe.label_smoothing)
            if isinstance(criterion, nn.Module):
                criterion.to(device)
        else:
            objective.to(device)
        loader = create_loader(train_set, batch_size=recipe.batch_size, shuffle=True, num_workers=recipe.workers or 0,
                               seed=recipe.seed + 7919, drop_last=True, persistent_workers=False)
        accum = recipe.accum_for(1)
        batches = iter(loader)

        def next_batch() -> tuple:
            nonlocal batches
            for _ in range(len(loader) + 1):  # a whole pass without a batch (all skipped): nothing to time
                try:
                    b = next(batches)
                except StopIteration:
                    batches = iter(loader)
                    continue
                if b is not None:
                    return tuple(t.to(device) if isinstance(t, Tensor) else t for t in b)
            raise ValueError(f"--time-budget: {len(train_set)} training samples (less those skipped) fill no batch "  # type: ignore[arg-type]
                             f"of {recipe.batch_size}; lower --batch-size")

        def one_step() -> None:
            for _ in range(accum):
                batch = next_batch()
                with autocast_context(device, recipe.amp):
                    if objective is None:
                        x, y = batch
                        loss = criterion(x, net(x), y)
                    else:
                        loss, _ = objective.step(net, batch)
                (loss / accum).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        seconds = time_steps(one_step, steps=steps, warmup=warmup, min_seconds=min_seconds)
    return seconds


# the recipe fields a budget re-plans, unless the command line set them (:func:`user_set_fields`)
PLANNED_FIELDS = ("warmup_steps", "warmup_epochs", "eval_every_epochs")
# a budget's own warm-up: this share of its steps
BUDGET_WARMUP = 0.05


def user_set_fields(recipe: Recipe) -> set[str]:
    """The fields of ``PLANNED_FIELDS`` that this run's recipe sets beyond what it is built from: for a shipped
    recipe, those that differ from the shipped file; for a recipe of the user's own (a JSON file), those that
    differ from :class:`Recipe`'s defaults; for the auto recipe (which plans its own warm-up steps and
    validation), a warmup_epochs. The command line's ``--set`` keys are added by the caller
    (``TrainJob.set_fields``): a --set to the value the recipe has is not seen here."""
    from vitlab.train.recipe import list_recipes, load_recipe

    if recipe.name == "auto":
        return {"warmup_epochs"} if recipe.warmup_epochs else set()
    base = load_recipe(recipe.name) if recipe.name in list_recipes() else Recipe()
    return {k for k in PLANNED_FIELDS if getattr(recipe, k) != getattr(base, k)}


def least_budget_s(*, elapsed_s: float, step_s: float, eval_images: int, batch: int, steps: int = 1,
                   safety: float = SAFETY) -> float:
    """The shortest budget that trains ``steps`` steps after ``elapsed_s`` of set-up, with the final
    evaluation of ``eval_images`` and :func:`finish_reserve_s`'s end (which grows with the budget)."""
    need = elapsed_s + eval_images * EVAL_COST * step_s / max(1, batch) + steps * step_s / safety
    budget = need + finish_reserve_s(need)
    for _ in range(3):  # the reserve is a share of the budget itself
        budget = need + finish_reserve_s(budget)
    return budget


def fit_recipe_to_budget(recipe: Recipe, *, budget_s: float, elapsed_s: float, step_s: float, num_images: int,
                         eval_images: int, world_size: int = 1, time_budget_s: float | None = None,
                         user_fields: set[str] | None = None) -> Recipe:
    """The recipe with ``max_steps`` sized to the budget; the warm-up (5% of the steps) and validation (only
    at the end) re-planned for it, except where the run set them (``user_fields``, default
    :func:`user_set_fields`): a warm-up given is kept, in steps of the planned epochs (cut to 5% with a
    warning where it would take the whole run), and so is ``eval_every_epochs``.

    ``budget_s`` is the time for the steps and the final evaluation (``time_budget_s``, the budget as given,
    less :func:`finish_reserve_s`). A budget that the set-up (``elapsed_s``) has used up, so that no step
    fits, is refused with the least budget that trains."""
    from vitlab.train.progress import format_duration

    accum = recipe.accum_for(world_size)
    batch = recipe.batch_size * accum * world_size
    eval_s = eval_images * EVAL_COST * step_s / max(1, batch)
    if step_s > 0 and SAFETY * (budget_s - elapsed_s - eval_s) < step_s:
        given = f" {format_duration(time_budget_s)}" if time_budget_s is not None else ""
        least = least_budget_s(elapsed_s=elapsed_s, step_s=step_s, eval_images=eval_images, batch=batch)
        reserve = (f"{format_duration(time_budget_s - budget_s)} kept for the end"
                   if time_budget_s is not None else "the time kept for the end")
        raise ValueError(f"--time-budget{given} is used up before training starts: the set-up (data, model, timing "
                         f"the steps) took {format_duration(elapsed_s)}, and with the final evaluation "
                         f"({format_duration(eval_s)}) and {reserve} no step of {step_s:.3f} s fits. Give --time-budget "
                         f"{format_duration(math.ceil(least))} at least (that trains one step; each further step "
                         f"takes about {step_s:.3f} s)")
    steps = steps_for_budget(budget_s=budget_s, elapsed_s=elapsed_s, step_s=step_s, eval_images=eval_images,
                             batch=batch)
    steps_per_epoch = max(1, num_images // batch)
    epochs = max(1, -(-steps // steps_per_epoch))
    mine = user_set_fields(recipe) if user_fields is None else set(user_fields)
    budget_warmup = max(1, int(BUDGET_WARMUP * steps))
    asked = max(recipe.warmup_steps, round(recipe.warmup_epochs * steps_per_epoch))
    given = [f"{k} {getattr(recipe, k):g}" for k in ("warmup_steps", "warmup_epochs") if k in mine]
    changes, kept = [], []
    if given:
        if asked >= steps:
            log.warning("--time-budget: the warm-up set (%s: %d steps) would take the whole run of %d steps; it is "
                        "cut to %d steps (%d%% of the run)", ", ".join(given), asked, steps, budget_warmup,
                        round(100 * BUDGET_WARMUP))
            warmup = budget_warmup
        else:
            warmup = asked
            kept.append(f"{', '.join(given)} ({warmup} warm-up steps)")
    else:
        warmup = min(asked, budget_warmup)
        if warmup != asked:
            changes.append(f"warm-up {asked} -> {warmup} steps ({round(100 * BUDGET_WARMUP)}% of the run)")
    if "eval_every_epochs" in mine:
        every = recipe.eval_every_epochs
        kept.append(f"eval_every_epochs {every}")
    else:
        every = 10**6
        if recipe.eval_every_epochs < epochs:
            changes.append(f"validation only at the end (the recipe's every {recipe.eval_every_epochs} epoch(s))")
    if changes or kept:
        log.info("time budget, %d steps: %s", steps, "; ".join(
            ([f"re-planned {', '.join(changes)}"] if changes else [])
            + ([f"kept as set: {', '.join(kept)}"] if kept else [])))
    return recipe.replace(max_steps=steps, epochs=epochs, warmup_steps=warmup, warmup_epochs=0.0,
                          eval_every_epochs=every)
