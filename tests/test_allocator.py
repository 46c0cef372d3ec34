"""vitlab.allocator: glibc keeps freed memory for reuse in the commands that run many forwards, and leaves the
allocator alone where the user has chosen one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vitlab import allocator
from vitlab.cli import main as cli_main

glibc = pytest.mark.skipif(allocator._glibc() is None, reason="glibc's mallopt is not available here")

# A 64 MiB tensor, allocated, freed and allocated again: over glibc's largest mmap threshold (32 MiB), so by
# default each allocation is a fresh mapping whose pages fault in when written.
PROBE = """
import json, resource, sys, torch
from vitlab.allocator import keep_freed_memory
from vitlab.benchmark import machine_info
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
recorded = machine_info()["allocator"]
def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1])
faults, released = [], []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.ones(16 * 1024 * 1024)  # 64 MiB, every page written
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    held = resident()
    del t
    released.append(held - resident())
print(json.dumps({"applied": applied, "recorded": recorded, "faults": faults, "released": released}))
"""


def _probe(mode: str, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if k != allocator.OPT_OUT} | env
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env=environ, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc
def test_kept_memory_is_reused_without_page_faults() -> None:
    pages = 64 * 1024 * 1024 // os.sysconf("SC_PAGE_SIZE")
    system = _probe("system")
    # glibc's default: each freed 64 MiB block goes back to the system, and the next one faults in afresh
    assert min(system["released"]) > 0.9 * pages
    assert min(system["faults"][1:]) > 0.9 * pages
    assert system["recorded"] == "glibc defaults"  # benchmark records say which allocator ran
    kept = _probe("keep")
    assert kept["applied"] is True
    assert kept["recorded"] == "glibc, freed memory kept (vitlab.allocator)"
    assert max(kept["released"]) < 0.01 * pages  # freed memory stays in the process
    assert kept["faults"][0] > 0.9 * pages  # the first touch still faults in
    # Later allocations reuse those pages. One of them may extend the heap once more: torch's aligned allocation
    # asks a little more than the first block left free when something small was placed after it (strace).
    assert min(kept["faults"][1:]) < 0.01 * pages


@glibc
def test_the_users_choice_is_left_alone() -> None:
    out = _probe("keep", **{allocator.OPT_OUT: "system"})
    assert out["applied"] is False
    assert out["recorded"] == "the user's (VITLAB_ALLOCATOR=system)"
    out = _probe("keep", MALLOC_TRIM_THRESHOLD_="131072")
    assert out["applied"] is False


@pytest.mark.parametrize("env, reason", [
    ({"VITLAB_ALLOCATOR": "System"}, "VITLAB_ALLOCATOR=system"),
    ({"MALLOC_MMAP_MAX_": "0"}, "MALLOC_MMAP_MAX_ is set"),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}, "GLIBC_TUNABLES sets glibc.malloc"),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "jemalloc is preloaded"),
    ({"GLIBC_TUNABLES": "glibc.rtld.nns=2"}, None),
])
def test_user_choice_reads_the_environment(monkeypatch: pytest.MonkeyPatch, env: dict, reason: str | None) -> None:
    for name in (allocator.OPT_OUT, "GLIBC_TUNABLES", "LD_PRELOAD", *allocator._GLIBC_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert allocator.user_choice() == reason


def test_only_inference_commands_tune_the_allocator(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    calls = []
    monkeypatch.setattr(cli_main, "keep_freed_memory", lambda: calls.append(1))
    missing = str(tmp_path / "missing.safetensors")
    assert cli_main.main(["predict", missing, "--checkpoint", missing]) == 2
    assert calls == [1]
    assert cli_main.main(["train", "--recipe", str(tmp_path / "missing.json")]) == 2
    assert calls == [1]
