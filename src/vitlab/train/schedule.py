"""Per-step learning-rate schedules: linear warm-up, then cosine or linear decay to a floor.

A run with a deadline (``--time-budget``) may change its length while it trains; :class:`Horizon` holds
where the decay ends and re-plans it without a jump in the learning rate.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch


@dataclass
class Horizon:
    """The decay's end, and the pace at which its progress (0 at the end of warm-up, 1 at ``total_steps``)
    runs. Unplanned, progress is linear from ``warmup_steps`` to ``total_steps``. :meth:`replan` moves the end:
    from that step on, progress continues from where it is and runs linearly to 1 at the new end, so the
    learning rate is continuous and only its slope changes."""

    total_steps: int
    warmup_steps: int
    knot_step: int | None = None  # the step from which progress runs at the current pace (None: warm-up's end)
    knot_progress: float = 0.0

    def progress(self, step: int) -> float:
        start = self.warmup_steps if self.knot_step is None else self.knot_step
        frac = (step - start) / max(1, self.total_steps - start)
        return min(1.0, max(0.0, self.knot_progress + (1.0 - self.knot_progress) * frac))

    def replan(self, step: int, total_steps: int) -> None:
        """End the decay at ``total_steps`` (more than ``step``) instead, continuing from ``step``."""
        if total_steps <= step:
            raise ValueError(f"Horizon.replan: the new end {total_steps} must come after step {step}")
        if step > self.warmup_steps:
            self.knot_progress, self.knot_step = self.progress(step), step
        self.total_steps = total_steps

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def _decay(progress: float, kind: str, min_factor: float) -> float:
    if kind == "cosine":
        return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "linear":
        return min_factor + (1.0 - min_factor) * (1.0 - progress)
    raise ValueError(f"unknown schedule {kind!r}; choose cosine, linear or constant")


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, kind: Literal["cosine", "linear", "constant"],
              min_factor: float = 0.0, horizon: Horizon | None = None) -> float:
    """Multiplier of the peak learning rate used for optimiser step ``step`` (0-based).

    Warm-up climbs linearly to 1.0 at ``step == warmup_steps - 1``; the decay then reaches ``min_factor``
    at ``step == total_steps`` (``horizon``, when given, has the last word on the end and the pace).
    """
    if kind not in ("cosine", "linear", "constant"):
        raise ValueError(f"unknown schedule {kind!r}; choose cosine, linear or constant")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    horizon = horizon or Horizon(total_steps=total_steps, warmup_steps=warmup_steps)
    return _decay(horizon.progress(step), kind, min_factor)


def build_scheduler(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int,
                    kind: Literal["cosine", "linear", "constant"], peak_lr: float,
                    min_lr: float = 0.0, horizon: Horizon | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per optimiser step; each group keeps its own ``lr_scale``.

    Args:
        horizon: the decay's end, which the caller may re-plan while it runs (save and restore it with the
            run: the scheduler's own state does not hold it); default: fixed at ``total_steps``.
    """
    if min_lr > peak_lr:
        raise ValueError(f"min_lr={min_lr} is above the peak learning rate {peak_lr}")
    min_factor = min_lr / peak_lr
    horizon = horizon or Horizon(total_steps=total_steps, warmup_steps=warmup_steps)

    def fn(step: int) -> float:  # the horizon's warm-up: a resume with another length keeps the run's own
        return lr_factor(step, total_steps=horizon.total_steps, warmup_steps=horizon.warmup_steps, kind=kind,
                         min_factor=min_factor, horizon=horizon)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
