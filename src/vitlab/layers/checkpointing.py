"""Activation (gradient) checkpointing of a model's repeated blocks: their activations are recomputed in the
backward pass instead of kept, trading about one extra forward for memory (``model.set_grad_checkpointing()``,
as in timm). Random draws (dropout, drop-path) repeat exactly in the recomputation, so gradients equal those
without checkpointing; BatchNorm's running statistics are updated once per forward, not again when recomputed.
Attention captured in the forward is recomputed the same way (explicit weights, whatever thread autograd
recomputes in) and not reported a second time."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vitlab.layers.attention import CapturableAttention, attention_sinks


def call_block(block: nn.Module, *args: Any, checkpointed: bool = False, **kwargs: Any) -> Any:
    """``block(*args, **kwargs)``, checkpointed when asked and gradients are being recorded."""
    if not (checkpointed and torch.is_grad_enabled()):
        return block(*args, **kwargs)
    return checkpoint(block, *args, use_reentrant=False, context_fn=lambda: (nullcontext(), _recomputed(block)),
                      **kwargs)


def _discard(_attn: Tensor) -> None:
    pass


def _recomputed(block: nn.Module) -> AbstractContextManager[None]:
    """The context of the recomputation, made at forward time in the forward's thread: running statistics
    kept, and the attention modules captured in this forward take the same explicit path again, even where
    autograd recomputes in a thread of its own (CUDA), their maps discarded (the forward reported them)."""
    capturing = {m: _discard for m in block.modules() if isinstance(m, CapturableAttention) and m.capturing}
    return _recomputing(block, capturing)


@contextmanager
def _recomputing(block: nn.Module, capturing: dict[nn.Module, Callable[[Tensor], None]]) -> Iterator[None]:
    with attention_sinks(capturing), _statistics_kept(block):
        yield


def run_sequential(blocks: Iterable[nn.Module], x: Tensor, *, checkpointed: bool = False) -> Tensor:
    """Blocks applied in turn (an ``nn.Sequential``'s forward), each checkpointed when asked."""
    if not (checkpointed and torch.is_grad_enabled()) and isinstance(blocks, nn.Module):
        return blocks(x)
    for block in blocks:
        x = call_block(block, x, checkpointed=checkpointed)
    return x


@contextmanager
def _statistics_kept(block: nn.Module) -> Iterator[None]:
    """Around the recomputation: BatchNorm layers in training mode update their running statistics in every
    forward; the recomputed one must not count the batch a second time."""
    norms = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.training and m.track_running_stats]
    saved = [[b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked)] for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, values in zip(norms, saved):
                for buffer, value in zip((m.running_mean, m.running_var, m.num_batches_tracked), values):
                    buffer.copy_(value)
