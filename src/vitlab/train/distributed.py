"""Process-group set-up for runs under ``torchrun``: one process per device, gloo on CPU, NCCL on GPU.

A rank that fails must not leave the others waiting forever: the group gets a finite timeout, the group
is destroyed in ``finally``, and exceptions propagate so the process exits non-zero (``torchrun`` then
stops the remaining workers).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600


@dataclass(frozen=True, kw_only=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str | None, local_rank: int = 0) -> torch.device:
    """``--device`` (None/"auto", "cpu", "cuda", "cuda:N") -> a device that exists here, else a ValueError.

    The one check every command uses (``vitlab.cli.common.check_device``). Plain "cuda" under torchrun is
    the process's local rank.
    """
    name = "auto" if device is None else str(device).strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name != "cuda" and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise ValueError(f"--device {device}: expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    index = local_rank if name == "cuda" else int(name[5:])
    if index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                         f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    return torch.device("cuda", index)


@contextlib.contextmanager
def distributed_context(device: str | None = None, *, timeout_s: float | None = None) -> Iterator[DistContext]:
    """Yield the run's :class:`DistContext`; under torchrun (WORLD_SIZE > 1) set up and tear down the group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        if dist.is_available() and dist.is_initialized():
            yield DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                              device=dev)
        else:
            yield DistContext(device=dev)
        return
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    timeout = float(timeout_s or os.environ.get("VITLAB_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout))
    log.debug("rank %d/%d: %s process group up on %s", rank, world, backend, dev)
    try:
        yield DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev)
        # no rank tears the group down while another may still use it (rank 0 writes the last checkpoint and
        # evaluates alone); skipped when this rank failed, as the job has then failed anyway
        dist.barrier()
    finally:
        dist.destroy_process_group()


def all_reduce_mean(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= ctx.world_size
    return value


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()
