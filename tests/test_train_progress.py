"""Progress reporting: a bar on a terminal, periodic log lines (no carriage returns) everywhere else."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys

from vitlab.train.progress import LogProgress, format_duration, make_progress


def test_format_duration():
    assert [format_duration(s) for s in (0, 59.4, 75, 3600, 4000)] == ["0s", "59s", "1m15s", "1h00m", "1h06m"]


def test_log_progress_lines_every_interval(caplog):
    p = make_progress(10, 0, stream=io.StringIO(), interval_s=0)
    assert isinstance(p, LogProgress)
    with caplog.at_level(logging.INFO, logger="vitlab.train"):
        for _ in range(3):
            p.set_postfix(loss="0.5000", img_s="120")
            p.update(1)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and lines[-1].startswith("train step 3/10 (30%), loss 0.5000, img/s 120")
    assert "ETA" in lines[-1]
    quiet = make_progress(10, 0, stream=io.StringIO(), interval_s=3600)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vitlab.train"):
        for _ in range(9):
            quiet.update(1)
        assert caplog.records == []
        quiet.update(1)  # the last step always reports
    assert "step 10/10" in caplog.records[-1].getMessage()


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar():
    bar = make_progress(5, 0, stream=_Tty())
    assert not isinstance(bar, LogProgress)
    bar.close()


def test_cli_output_captured_has_no_carriage_returns(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", VITLAB_LOG_INTERVAL="0",
               PYTHONPATH=os.pathsep.join([str(os.path.join(os.path.dirname(__file__), "..", "src")),
                                           os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-m", "vitlab.cli.main", "train", "--output", str(tmp_path / "run"),
                          "--steps", "3", "--batch-size", "32", "--set", "model_overrides.depth=1",
                          "--set", "model_overrides.embed_dim=16", "--set", "model_overrides.num_heads=2"],
                         capture_output=True, text=True, env=env, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout + res.stderr
    assert "\r" not in out
    steps = [ln for ln in res.stderr.splitlines() if ln.startswith("train step ")]
    assert [ln.split()[2] for ln in steps] == ["1/3", "2/3", "3/3"]
    assert all("steps/s" in ln and "ETA" in ln for ln in steps)
