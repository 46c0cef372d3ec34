"""Multi-head self-attention with an SDPA fast path and an explicit capture mode.

The fast path calls ``F.scaled_dot_product_attention`` and never materialises the attention matrix.
Capture mode computes ``softmax(q k^T / sqrt(d))`` explicitly, hands the weights to whoever asked for
them and produces the same output; it is switched on per module by :func:`capture_attention`, so a
model's default forward stays untouched.

The sinks live per thread, not on the modules: a capture sees only the forwards of the thread that opened
it (a server answering predictions on the same model in other threads is not captured), and a capture
opened inside another (``explain`` inside a user's ``capture_attention`` block) takes the maps until it
closes, then hands the modules back to the outer one. While no capture is open anywhere, the modules read
one module-level counter and take the fast path (what export, tracing and ``torch.compile`` see).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

AttentionSink = Callable[[Tensor], None]


class _ThreadSinks(threading.local):
    """This thread's sinks, by attention module."""

    def __init__(self) -> None:
        self.sinks: dict[nn.Module, AttentionSink] = {}


_SINKS = _ThreadSinks()
_NUM_SINKS = [0]  # sinks set in all threads together; 0 keeps every module on its fast path without a lookup
_COUNT_LOCK = threading.Lock()


def _set_sink(module: nn.Module, sink: AttentionSink | None) -> None:
    """Set (or, with None, remove) this thread's sink for ``module``."""
    sinks = _SINKS.sinks
    had = module in sinks
    if sink is None:
        sinks.pop(module, None)
    else:
        sinks[module] = sink
    change = (sink is not None) - had
    if change:
        with _COUNT_LOCK:
            _NUM_SINKS[0] += change


@contextmanager
def attention_sinks(sinks: Mapping[nn.Module, AttentionSink]) -> Iterator[None]:
    """Within this block, each given attention module hands its weights to its sink, in this thread only;
    on exit the modules get back the sinks they had before (an enclosing capture's, or none)."""
    previous = {m: _SINKS.sinks.get(m) for m in sinks}
    for m, sink in sinks.items():
        _set_sink(m, sink)
    try:
        yield
    finally:
        for m, sink in previous.items():
            _set_sink(m, sink)


class CapturableAttention(nn.Module):
    """Base of every attention module that can report its softmax weights.

    Subclasses call :meth:`_emit` with the (batch, heads, queries, keys) weights whenever
    ``self.attn_sink`` is set for the calling thread; :func:`capture_attention` (or :func:`attention_sinks`)
    sets it and restores the previous one. Assigning ``module.attn_sink = fn`` / ``None`` sets or clears
    the calling thread's sink without restoring an enclosing capture's (prefer the context managers).
    A kind whose weights are not queries over key TOKENS of the sequence (XCiT's channel attention,
    Linformer's projected keys) sets ``token_map = False``, so that analysis tools do not read them as
    token-to-token attention.
    """

    token_map: bool = True

    def _init_heads(self, dim: int, num_heads: int) -> None:
        """Set num_heads, head_dim and the 1/sqrt(head_dim) scale, refusing widths heads do not divide."""
        if dim % num_heads != 0:
            raise ValueError(f"{type(self).__name__}: dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5

    @property
    def attn_sink(self) -> AttentionSink | None:
        """The calling thread's sink for this module (None: fast path, nothing reported)."""
        if not _NUM_SINKS[0]:  # no capture open in any thread: no per-thread lookup on the fast path
            return None
        return _SINKS.sinks.get(self)

    @attn_sink.setter
    def attn_sink(self, sink: AttentionSink | None) -> None:
        _set_sink(self, sink)

    @property
    def capturing(self) -> bool:
        return self.attn_sink is not None

    def _emit(self, attn: Tensor) -> None:
        sink = self.attn_sink
        if sink is not None:
            sink(attn)


class AttentionMaps(list):
    """The captured maps in execution order; ``token_maps[i]`` says whether map i is token-to-token
    (its layer's ``token_map``) and ``layers[i]`` which module emitted it."""

    def __init__(self) -> None:
        super().__init__()
        self.token_maps: list[bool] = []
        self.layers: list[nn.Module] = []

    def sink_for(self, module: CapturableAttention) -> AttentionSink:
        def sink(attn: Tensor) -> None:
            self.append(attn)
            self.token_maps.append(bool(module.token_map))
            self.layers.append(module)

        return sink


@contextmanager
def capture_attention(model: nn.Module) -> Iterator[AttentionMaps]:
    """Collect the attention weights of every attention layer of ``model`` during the block.

    Yields a list that fills, in execution order, with one (batch, heads, queries, keys) tensor per
    attention call (see :class:`AttentionMaps` for which are token maps). Outputs are the same as
    without capture (up to float rounding).

    Only forwards run by the calling thread are captured. Captures nest: an inner capture of the same
    modules collects their maps until it closes, then the outer one goes on collecting.

    Example::

        with capture_attention(model) as maps:
            logits = model(x)
        # maps[i]: layer i's attention weights
    """
    maps = AttentionMaps()
    modules = [m for m in model.modules() if isinstance(m, CapturableAttention)]
    if not modules:  # an empty list would read as "no attention was computed"
        raise ValueError(f"capture_attention: {type(model).__name__} has no attention layers (e.g. MLP-Mixer mixes "
                         f"tokens with MLPs); explain(model, x, method='grad-cam') works on any model")
    with attention_sinks({m: maps.sink_for(m) for m in modules}):
        yield maps


class Attention(CapturableAttention):
    """Multi-head self-attention with a fused qkv projection.

    Args:
        dim: token width.
        num_heads: number of heads; ``dim`` must be divisible by it.
        qkv_bias: bias on the fused q, k, v projection (the paper uses one).
        attn_drop: dropout on the attention weights (training only).
        proj_drop: dropout after the output projection.
        fused: use ``scaled_dot_product_attention``; False materialises the weights on every call, which
            is faster on CPU for very short sequences (TNT's 16 pixels per patch) and in bfloat16 there.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        fused: bool = True,
    ) -> None:
        super().__init__()
        self._init_heads(dim, num_heads)
        self.fused = fused
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        B, N, C = x.shape
        # (B, N, 3*C) -> (3, B, heads, N, head_dim)
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = self._attend(q, k, v, attn_mask)
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, heads, N, hd) -> (B, N, C)
        return self.proj_drop(self.proj(x))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None) -> Tensor:
        """The two paths on (B, heads, N, hd) q, k, v: SDPA, or the explicit product in capture mode
        (and when ``fused`` is off); subclasses that only change the projections or the mask reuse it."""
        # On the CPU, SDPA with attention dropout falls back to its unfused math path, which does more than the
        # explicit product (scales q and k separately, scans the mask for -inf rows): explicit is faster there.
        cpu_dropout = self.training and self.attn_drop.p > 0 and q.device.type == "cpu"
        if self.capturing or not self.fused or cpu_dropout:
            return attend_explicit(q, k, v, scale=self.scale, attn_mask=attn_mask, dropout=self.attn_drop,
                                   sink=self._emit if self.capturing else None)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop.p if self.training else 0.0, scale=self.scale
        )


def attend_explicit(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float,
    attn_mask: Tensor | None = None,
    dropout: nn.Module | None = None,
    sink: AttentionSink | None = None,
) -> Tensor:
    """``softmax(q k^T * scale) v`` with the weights materialised; shapes (B, heads, N, hd)."""
    # scale 1.0 (Swin v2, whose q carries its logit scale already): no pass over q that changes nothing
    attn = (q if scale == 1.0 else q * scale) @ k.transpose(-2, -1)  # (B, heads, Nq, Nk)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn = attn.masked_fill(~attn_mask, float("-inf"))
        else:
            attn = attn + attn_mask
    attn = attn.softmax(dim=-1)
    if sink is not None:
        sink(attn)
    if dropout is not None:
        attn = dropout(attn)
    return attn @ v


class FoldedAttention(Attention):
    """:class:`Attention` over ``groups`` sequences per image folded into the batch ((B*G, N, C) in,
    image-major), as MobileViT v1 runs one sequence per pixel position of its 2x2 patches.

    Computes exactly what :class:`Attention` computes; capture mode reports the weights per image as
    (B, G*heads, N, N): each (sequence, head) pair appears as one head.
    """

    def __init__(self, dim: int, *, groups: int, **kwargs) -> None:
        super().__init__(dim, **kwargs)
        self.groups = groups

    def _emit(self, attn: Tensor) -> None:
        sink = self.attn_sink
        if sink is not None:
            BG, h, N, M = attn.shape
            sink(attn.reshape(BG // self.groups, self.groups * h, N, M))  # (B, G*heads, N, N)
