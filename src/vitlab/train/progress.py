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

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def update(self, n: int = 1) -> None:
        self.n += n
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
        log.info("%s step %d/%d (%.0f%%)%s, %.2f steps/s, elapsed %s, ETA %s", self.desc, self.n, self.total,
                 100.0 * self.n / max(self.total, 1), extra, rate, format_duration(elapsed),
                 format_duration(eta) if eta == eta else "?")

    def close(self) -> None:
        pass


def make_progress(total: int, initial: int = 0, *, desc: str = "train", stream: Any = None,
                  interval_s: float | None = None):
    """A tqdm bar when ``stream`` (default: stderr) is a terminal, else a :class:`LogProgress`.

    Args:
        interval_s: seconds between log lines (default: ``VITLAB_LOG_INTERVAL`` or 30).
    """
    stream = sys.stderr if stream is None else stream
    if getattr(stream, "isatty", lambda: False)():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, file=stream)
    if interval_s is None:
        interval_s = float(os.environ.get(_ENV_INTERVAL, DEFAULT_INTERVAL_S))
    return LogProgress(total, initial, interval_s=interval_s, desc=desc)
