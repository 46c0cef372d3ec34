"""Training progress: a redrawn bar on a terminal, a log line every few seconds anywhere else.

A bar's carriage-return redraws fill a log file or a CI console with thousands of partial lines, so when
standard error is not a terminal the trainer logs one line per ``interval_s`` seconds instead: step, loss,
throughput and the estimated time left.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

log = logging.getLogger("vitlab.train")

DEFAULT_INTERVAL_S = 30.0
_ENV_INTERVAL = "VITLAB_LOG_INTERVAL"


def format_duration(seconds: float) -> str:
    """``75`` -> "1m15s", ``4000`` -> "1h06m"; for ETAs and estimates."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class LogProgress:
    """The non-terminal progress: ``update`` every step, a log line at most every ``interval_s`` seconds."""

    def __init__(self, total: int, initial: int = 0, *, interval_s: float = DEFAULT_INTERVAL_S,
                 desc: str = "train") -> None:
        self.total, self.n, self.desc = total, initial, desc
        self.interval_s = interval_s
        self.start_n = initial
        self.t_start = self.t_last = time.perf_counter()
        self.postfix: dict[str, Any] = {}
        self.postfix_step: int | None = None  # the step the postfix values are of
        self._fresh = False

    def set_postfix(self, **values: Any) -> None:
        """Values of the step that the next ``update`` counts."""
        self.postfix = values
        self._fresh = True

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._fresh:
            self.postfix_step, self._fresh = self.n, False
        now = time.perf_counter()
        if now - self.t_last >= self.interval_s or self.n >= self.total:
            self.t_last = now
            self.emit(now)

    def emit(self, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        done = self.n - self.start_n
        elapsed = now - self.t_start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.n) / rate if rate > 0 else float("nan")
        extra = "".join(f", {k.replace('img_s', 'img/s')} {v}" for k, v in self.postfix.items())
        if extra and self.postfix_step is not None and self.postfix_step != self.n:
            extra += f" (at step {self.postfix_step})"  # values are set on log steps only
        log.info("%s step %d/%d (%.0f%%)%s, %.2f steps/s, elapsed %s, ETA %s", self.desc, self.n, self.total,
                 100.0 * self.n / max(self.total, 1), extra, rate, format_duration(elapsed),
                 format_duration(eta) if eta == eta else "?")

    def close(self) -> None:
        pass


def log_interval_s() -> float:
    """Seconds between progress log lines: ``VITLAB_LOG_INTERVAL`` (a number of seconds, or a duration such as
    10s, 2m), else 30. A value that is neither raises ValueError naming the variable."""
    raw = os.environ.get(_ENV_INTERVAL)
    if raw is None or not raw.strip():
        return DEFAULT_INTERVAL_S
    try:
        seconds = float(raw)
    except ValueError:
        from vitlab.train.budget import parse_duration

        try:
            seconds = parse_duration(raw)
        except ValueError:
            seconds = float("nan")
    if not seconds >= 0:  # also NaN
        raise ValueError(f"{_ENV_INTERVAL}={raw!r}: expected the seconds between progress log lines, a number "
                         f"(e.g. 30) or a duration (e.g. 10s, 2m); unset it for the default "
                         f"({DEFAULT_INTERVAL_S:g} s)")
    return seconds


def make_progress(total: int, initial: int = 0, *, desc: str = "train", stream: Any = None,
                  interval_s: float | None = None):
    """A tqdm bar when ``stream`` (default: stderr) is a terminal, else a :class:`LogProgress`.

    Args:
        interval_s: seconds between log lines (default: :func:`log_interval_s`).
    """
    stream = sys.stderr if stream is None else stream
    if getattr(stream, "isatty", lambda: False)():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, file=stream)
    if interval_s is None:
        interval_s = log_interval_s()
    return LogProgress(total, initial, interval_s=interval_s, desc=desc)
