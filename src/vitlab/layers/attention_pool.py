"""Multi-head attention pooling from a learned latent query (MAP), the head of SigLIP's image tower.

Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training", arXiv:2303.15343 (big_vision's ``MAPHead``): one
learned query attends over the tokens, then a residual MLP on the pooled vector (LayerNorm before it). The module
and parameter names are timm's ``AttentionPoolLatent`` (``latent``, ``q``, ``kv``, ``proj``, ``norm``, ``mlp``), so
timm's files load unchanged.

Not a :class:`~vitlab.layers.CapturableAttention`: its (1 x N) weights are not token-to-token maps.
:meth:`AttentionPoolLatent.attention_weights` recomputes them for the analysis tools (explain weights the rollout's
rows by them, as the head reads that mix of the tokens).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitlab.layers.mlp import Mlp


class AttentionPoolLatent(nn.Module):
    """Tokens (B, N, D) -> one pooled vector (B, D).

    Args:
        dim: token width (also the query's and the output's).
        num_heads: attention heads; ``dim`` must be divisible by it.
        mlp_ratio: hidden width of the MLP after the attention, as a multiple of ``dim``.
        norm_layer: the norm before that MLP.
        act_layer: the MLP's activation.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        act_layer: type[nn.Module] | Callable[[], nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"AttentionPoolLatent: dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))  # (1, 1, D): the learned query
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.norm = norm_layer(dim)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer)
        nn.init.trunc_normal_(self.latent, std=dim**-0.5)

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The latent query (B, heads, 1, hd) and the tokens' keys and values (B, heads, N, hd): what forward attends
        with, and what :meth:`attention_weights` reads, from one place."""
        B, N, _ = x.shape
        q = self.q(self.latent).expand(B, -1, -1)  # (B, 1, D)
        q = q.reshape(B, 1, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, 1, hd)
        # (B, N, 2*D) -> (2, B, heads, N, hd)
        k, v = self.kv(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def forward(self, x: Tensor) -> Tensor:
        B, _, C = x.shape
        q, k, v = self._qkv(x)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, 1, hd)
        x = self.proj(x.transpose(1, 2).reshape(B, 1, C))  # (B, 1, D)
        x = x + self.mlp(self.norm(x))
        return x[:, 0]  # (B, D)

    def attention_weights(self, x: Tensor) -> Tensor:
        """The softmax weights (B, heads, N) the latent query puts on the N tokens of ``x`` (B, N, D) in forward."""
        q, k, _ = self._qkv(x)
        logits = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5  # (B, heads, 1, N), sdpa's default scale
        return logits.float().softmax(dim=-1)[:, :, 0]  # (B, heads, N)
