"""What the machine offers a training run: CPU cores, threads, memory, bfloat16 support, GPUs.

Facts only (no policy beyond thread and worker defaults); the recipe chooser (``train/auto.py``) takes
them as a :class:`Hardware` record so that it can be tested with any machine described by hand.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Hardware:
    """Args:
    cores: CPU cores this process may use (its affinity mask / cgroup, not the machine's total).
    threads: intra-op threads training will use.
    memory_gb: memory available now.
    cpu_bf16: the CPU has native bfloat16 matrix units (AVX512-BF16 or AMX), so bf16 autocast is fast.
    gpu / gpu_memory_gb / gpu_bf16: the CUDA device, if any.
    """

    cores: int = 1
    threads: int = 1
    memory_gb: float = 4.0
    cpu_bf16: bool = False
    gpu: str | None = None
    gpu_memory_gb: float = 0.0
    gpu_bf16: bool = False


def available_cores() -> int:
    """Cores this process may run on (``sched_getaffinity``: respects taskset and cgroup cpusets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def processes_per_machine(world_size: int = 1) -> int:
    """Processes of this run on this machine: torchrun's LOCAL_WORLD_SIZE (at most the world size: one left in the
    environment of a single process does not count), else the world size (one machine)."""
    env = os.environ.get("LOCAL_WORLD_SIZE", "").strip()
    return max(1, min(int(env), world_size)) if env.isdigit() else max(1, world_size)


def default_threads(processes_per_machine: int = 1) -> int:
    """Intra-op threads when none were asked for: OMP_NUM_THREADS if set, else the cores given, shared by
    the processes of this machine (torchrun's local world size)."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, available_cores() // max(1, processes_per_machine))


@contextlib.contextmanager
def training_threads(requested: int | None, processes_per_machine: int = 1) -> Iterator[int]:
    """Run a block with ``requested`` intra-op threads (``--threads`` / the recipe's ``cpu_threads``) or
    the default above; torch's previous setting is restored afterwards. Yields the number in effect."""
    n = requested if requested is not None else default_threads(processes_per_machine)
    if n < 1:
        raise ValueError(f"--threads must be >= 1, got {n}")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


def available_memory_gb() -> float:
    """MemAvailable from /proc/meminfo (Linux), else a guess of 4 GB."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 4.0


def cpu_has_bf16() -> bool:
    """Native bfloat16 arithmetic on this CPU: AVX512-BF16 or AMX-BF16 in /proc/cpuinfo's flags.

    Without them torch emulates bf16 on the CPU, which is slower than float32, so autocast stays off.
    """
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def detect(device: torch.device | None = None, *, threads: int | None = None) -> Hardware:
    """The machine as it is now (``device``: the training device; a CUDA device adds its GPU facts)."""
    gpu, gpu_mem, gpu_bf16 = None, 0.0, False
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu, gpu_mem = props.name, props.total_memory / 2**30
        gpu_bf16 = torch.cuda.is_bf16_supported()
    return Hardware(cores=available_cores(), threads=threads or torch.get_num_threads(),
                    memory_gb=available_memory_gb(), cpu_bf16=cpu_has_bf16(), gpu=gpu, gpu_memory_gb=gpu_mem,
                    gpu_bf16=gpu_bf16)


def default_workers(*, in_memory: bool, cores: int) -> int:
    """DataLoader workers: images already in memory need only augmentation, which the main process keeps
    up with on a small machine (a worker would take a core from the model); files to decode get half
    the cores, up to 8."""
    if in_memory:
        return 0 if cores < 4 else min(4, cores // 4)
    return max(1, min(8, cores // 2))
