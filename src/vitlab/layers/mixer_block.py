"""The MLP-Mixer block (Tolstikhin et al., 2021, arXiv:2105.01601, section 2).

Two MLPs, no attention: token mixing runs one MLP across the patch axis (the same for every channel),
channel mixing runs one across the channel axis (the same for every patch). Both are pre-norm residual
branches: x + T(LN(x)^T)^T, then x + C(LN(x)).
"""

from __future__ import annotations

from functools import partial

from torch import Tensor, nn

from vitlab.layers.drop_path import DropPath
from vitlab.layers.mlp import Mlp


class MixerBlock(nn.Module):
    """One Mixer layer on (B, N, D) tokens.

    Args:
        dim: channel width D.
        num_tokens: N; the token-mixing MLP's weights are (hidden, N), so N is fixed at construction.
        tokens_hidden: hidden width of the token-mixing MLP (D_S; the paper's models use D / 2).
        channels_hidden: hidden width of the channel-mixing MLP (D_C; 4 D).
        act_layer: the MLPs' GELU (exact, or the tanh approximation of the original JAX code).
    """

    def __init__(
        self,
        dim: int,
        *,
        num_tokens: int,
        tokens_hidden: int,
        channels_hidden: int,
        act_layer: type[nn.Module] | partial = nn.GELU,
        norm_layer: type[nn.Module] | partial = partial(nn.LayerNorm, eps=1e-6),
        drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.mlp_tokens = Mlp(num_tokens, hidden_features=tokens_hidden, act_layer=act_layer, drop=drop)
        self.norm2 = norm_layer(dim)
        self.mlp_channels = Mlp(dim, hidden_features=channels_hidden, act_layer=act_layer, drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        # token mixing: (B, N, D) -> (B, D, N), an MLP over N, back to (B, N, D)
        x = x + self.drop_path(self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2))
        return x + self.drop_path(self.mlp_channels(self.norm2(x)))
