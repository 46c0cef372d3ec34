"""The pre-norm transformer encoder block of ViT: x + MSA(LN(x)); x + MLP(LN(x))."""

from __future__ import annotations

from functools import partial
from typing import Any

from torch import Tensor, nn

from vitlab.layers.attention import Attention
from vitlab.layers.drop_path import DropPath
from vitlab.layers.layer_scale import LayerScale
from vitlab.layers.mlp import Mlp


class Block(nn.Module):
    """One encoder block.

    Args:
        init_values: LayerScale initial value; ``None`` disables LayerScale (plain ViT).
        drop_path: stochastic-depth probability of both residual branches.
        mlp_norm: a norm inside the MLP before its second Linear (BEiT-3's sub-LN).

    ``forward(x, **attn_kwargs)``: keyword arguments (e.g. BEiT's shared relative position bias as
    ``attn_mask``) are handed to the attention layer, which must accept them.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values: float | None = None,
        drop_path: float = 0.0,
        norm_layer: type[nn.Module] | partial = partial(nn.LayerNorm, eps=1e-6),
        act_layer: type[nn.Module] = nn.GELU,
        attn_layer: type[nn.Module] = Attention,
        mlp_norm: bool = False,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = attn_layer(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                               proj_drop=proj_drop)
        self.ls1 = LayerScale(dim, init_values=init_values) if init_values is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop,
                       norm_layer=norm_layer if mlp_norm else None)
        self.ls2 = LayerScale(dim, init_values=init_values) if init_values is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, **attn_kwargs: Any) -> Tensor:
        # One expression per branch, as in timm: a temporary kept alive into the MLP (the attention output
        # held in a local) changed glibc's heap pattern enough that every bfloat16 ViT-S forward at batch 16
        # took ~12,000 fresh page faults (0.82x timm's speed, 1.0x once the pattern matched).
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), **attn_kwargs)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x
