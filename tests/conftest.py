"""Shared test settings: one torch thread per test worker (pytest-xdist runs two), fixed seeds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
# Training runs choose their threads from OMP_NUM_THREADS (else the cores given): one per test worker too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# The CLI's eval/predict/benchmark/export tune glibc for the whole process (vitlab.allocator); the test process
# runs thousands of tests, so it keeps glibc's defaults. tests/test_allocator.py checks the tuning in subprocesses.
os.environ["VITLAB_ALLOCATOR"] = "system"

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"{SHARED_DATA} is not present")
    return SHARED_DATA
