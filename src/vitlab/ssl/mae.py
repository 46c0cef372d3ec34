"""Masked autoencoders: "Masked Autoencoders Are Scalable Vision Learners" (He et al. 2021, arXiv:2111.06377).

Per sample a random 75% of the patches is removed (:class:`~vitlab.ssl.masking.RandomMasking`: sorted
uniform noise); the encoder, the backbone itself, sees only the visible patches with their position
embeddings, the class token appended after masking (the backbone's token-masking hook does exactly
this). A light decoder embeds the encoded tokens to its own width, appends one learned mask token per
removed patch, unshuffles them back into grid order, adds fixed 2-D sin-cos positions (zero for the
class token), runs its blocks and predicts the ``p * p * C`` pixels of every patch. The loss is the
mean squared error on removed patches only, against targets normalised per patch (mean and unbiased
variance over the patch's pixels, eps 1e-6) when ``norm_pix_loss``.

Decoder width/depth: 512 / 8 (16 heads) at ViT-B scale in the paper; smaller for small models.
Recipe (paper): AdamW betas (0.9, 0.95), weight decay 0.05, lr = 1.5e-4 x batch / 256, per-iteration
cosine after warm-up (the ``mae`` recipe). The encoder of the paper has fixed sin-cos position tables:
``vitlab pretrain --method mae`` builds the backbone with ``pos_embed="sincos"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from vitlab.layers import Block, sincos_2d_pos_embed
from vitlab.ssl.masking import RandomMasking, patch_grid, patchify
from vitlab.train.objective import Metrics, Objective


class MAEDecoder(nn.Module):
    """MAE's decoder: encoder tokens (B, prefix + K, D) + restore indices -> pixels (B, N, p*p*C)."""

    def __init__(self, *, embed_dim: int, patch_dim: int, grid: tuple[int, int], num_prefix_tokens: int = 1,
                 dim: int = 512, depth: int = 8, num_heads: int = 16, mlp_ratio: float = 4.0,
                 norm_eps: float = 1e-6, qkv_bias: bool = True) -> None:
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        self.grid, self.num_prefix_tokens, self.dim = tuple(grid), num_prefix_tokens, dim
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                                            norm_layer=norm_layer) for _ in range(depth)])
        self.norm = norm_layer(dim)
        self.pred = nn.Linear(dim, patch_dim)
        self.register_buffer("pos_embed", self._table(self.grid), persistent=False)
        self._init_weights()

    def _init_buffers(self) -> None:
        self.pos_embed = self._table(self.grid).to(self.pos_embed.device)

    def _table(self, grid: tuple[int, int]) -> Tensor:
        # fixed 2-D sin-cos, zero rows for the prefix tokens: (1, prefix + N, dim)
        pe = sincos_2d_pos_embed(self.dim, grid)
        return torch.cat([torch.zeros(1, self.num_prefix_tokens, self.dim), pe], dim=1)

    def _init_weights(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}

    def forward(self, latent: Tensor, ids_restore: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        p = self.num_prefix_tokens
        x = self.embed(latent)  # (B, prefix + K, dim)
        B, N = ids_restore.shape
        fill = self.mask_token.expand(B, N - (x.shape[1] - p), -1)
        patches = torch.cat([x[:, p:], fill], dim=1)  # (B, N, dim) in shuffled order
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, self.dim))  # grid order
        x = torch.cat([x[:, :p], patches], dim=1)  # (B, prefix + N, dim)
        grid = tuple(grid or self.grid)
        pos = self.pos_embed if grid == self.grid else self._table(grid).to(x.device)
        x = self.blocks(x + pos.to(x.dtype))
        return self.pred(self.norm(x))[:, p:]  # (B, N, p*p*C)


def mae_loss(pred: Tensor, target: Tensor, mask: Tensor, *, norm_pix_loss: bool = True, eps: float = 1e-6) -> Tensor:
    """Mean over removed patches of the per-patch MSE; targets (B, N, P) normalised per patch if asked."""
    target = target.float()
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as in the reference code
        target = (target - mean) / (var + eps) ** 0.5
    loss = ((pred.float() - target) ** 2).mean(dim=-1)  # (B, N)
    return (loss * mask).sum() / mask.sum()


@dataclass
class MAEOutput:
    loss: Tensor
    pred: Tensor  # (B, N, p*p*C)
    mask: Tensor  # (B, N), 1 = removed
    ids_restore: Tensor


class MAE(Objective):
    """The MAE objective over ``model`` (a backbone with the token-masking hook).

    Args:
        mask_ratio: fraction of patches removed (0.75); at least one patch must be removed and one kept on
            the backbone's grid.
        decoder_dim / decoder_depth / decoder_heads / decoder_mlp_ratio: the decoder (512 / 8 / 16 / 4).
        norm_pix_loss: normalise each target patch (the paper's best setting).
        decoder_qkv_bias: biases on the decoder's query/key/value projections (the official code's; Hugging
            Face's ``qkv_bias=False`` has none).
    """

    name = "mae"

    def __init__(self, model: nn.Module, *, mask_ratio: float = 0.75, decoder_dim: int = 512,
                 decoder_depth: int = 8, decoder_heads: int = 16, decoder_mlp_ratio: float = 4.0,
                 norm_pix_loss: bool = True, norm_eps: float = 1e-6, decoder_qkv_bias: bool = True) -> None:
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        grid, patch = patch_grid(model)
        self.patch = patch
        channels = model.preprocessing.input_size[0]
        n = grid[0] * grid[1]
        if isinstance(mask_ratio, bool) or not 0 < mask_ratio < 1 or not 0 < int(n * (1 - mask_ratio)) < n:
            raise ValueError(f"MAE: mask_ratio={mask_ratio!r} must remove at least one of the {n} patches of the "
                             f"{grid[0]}x{grid[1]} grid and keep at least one (the loss is over removed patches, the "
                             f"encoder sees the kept ones); give a ratio between 0 and 1 (the paper's is 0.75)")
        if decoder_dim % 4:
            raise ValueError(f"MAE: decoder_dim={decoder_dim} must be divisible by 4 (2-D sin-cos positions)")
        self.decoder = MAEDecoder(embed_dim=model.num_features, patch_dim=patch[0] * patch[1] * channels, grid=grid,
                                  num_prefix_tokens=model.num_prefix_tokens, dim=decoder_dim, depth=decoder_depth,
                                  num_heads=decoder_heads, mlp_ratio=decoder_mlp_ratio, norm_eps=norm_eps,
                                  qkv_bias=decoder_qkv_bias)
        self.decoder.to(next(model.parameters()).device)

    def modules(self) -> dict[str, nn.Module]:
        return {"decoder": self.decoder}

    def describe(self) -> str:
        return f"mae (mask {self.mask_ratio:g}, decoder {self.decoder.dim} x {len(self.decoder.blocks)})"

    def forward(self, model: nn.Module, images: Tensor, *, noise: Tensor | None = None) -> MAEOutput:
        masking = RandomMasking(self.mask_ratio, noise=noise)
        latent = model.forward_features(images, mask=masking)  # (B, prefix + K, D)
        pred = self.decoder(latent, masking.ids_restore, masking.grid)
        target = patchify(images, self.patch)
        loss = mae_loss(pred, target, masking.mask, norm_pix_loss=self.norm_pix_loss)
        return MAEOutput(loss=loss, pred=pred, mask=masking.mask, ids_restore=masking.ids_restore)

    def step(self, model: nn.Module, batch: Any) -> tuple[Tensor, Metrics]:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        out = self.forward(model, images)
        return out.loss, {"recon": out.loss.detach()}


def load_mae(path: Any, *, model: str | None = None, decoder_heads: int | None = None,
             model_overrides: dict[str, Any] | None = None, **options: Any) -> tuple[nn.Module, MAE]:
    """An MAE pre-training checkpoint as (encoder, MAE objective with the file's decoder).

    Args:
        path: a Hugging Face ``ViTMAEForPreTraining`` folder, or an official full checkpoint
            (``{"model": ...}`` with ``decoder_*`` keys).
        model: the registered name to build (needed for official files; a HF folder describes itself).
        decoder_heads: heads of the decoder's attention (official files do not record it; default
            width / 32, i.e. 16 at width 512).
        model_overrides: config fields of the encoder (official files: the size of a tiny variant).
        options: MAE options (mask_ratio, norm_pix_loss), which win over the file's. A HF config supplies
            its own. An official file gives those of its training arguments where it holds them (``args`` of
            a ``main_pretrain.py`` checkpoint); otherwise ``norm_pix_loss=False``: the ``mae_visualize_*``
            releases, the official files with a decoder, were trained with pixels as targets (the official
            demo notebook says so; ``models_mae.py`` defaults to it), and mask ratio 0.75.
    """
    import vitlab
    from vitlab.checkpoints import resolve
    from vitlab.checkpoints.convert_mae import read_mae_decoder

    p = resolve(path)
    weights = read_mae_decoder(p)
    if p.is_dir() and model is None:
        encoder = vitlab.load_model(p, **(model_overrides or {}))
    else:
        encoder = vitlab.create_model(model or "vit_base_patch16_224", pretrained=p, **(model_overrides or {}))
    opts = {**(weights.options or {}), **options}
    heads = decoder_heads or weights.num_heads or max(1, weights.dim // 32)
    mae = MAE(encoder, decoder_dim=weights.dim, decoder_depth=weights.depth, decoder_heads=heads,
              decoder_mlp_ratio=weights.mlp_ratio, decoder_qkv_bias=weights.qkv_bias, **opts)
    from vitlab.checkpoints import load_strict

    load_strict(mae.decoder, weights.state_dict, source=f"{p} (MAE decoder)")
    if weights.pos_embed is not None:
        table = mae.decoder.pos_embed
        if weights.pos_embed.shape != table.shape or not torch.allclose(weights.pos_embed.float(), table, atol=1e-4):
            from vitlab.checkpoints import CheckpointError

            raise CheckpointError(f"{p}: the decoder's position table is not the fixed 2-D sin-cos table "
                                  f"{tuple(table.shape)} that vitlab computes")
    return encoder, mae
