"""Vector-quantised knowledge distillation: BEiT v2's visual tokenizer ("BEiT v2: Masked Image Modeling
with Vector-Quantized Visual Tokenizers", Peng et al. 2022, arXiv:2208.06366, section 2.2).

The tokenizer is trained to *reconstruct a teacher's features*, not pixels:

* encoder: any vitlab ViT-like backbone (the engine's model; ViT-B/16 in the paper), its output patch
  tokens through a Linear-Tanh-Linear head down to a ``code_dim``-dimensional vector (32);
* quantiser (:class:`NormEMAQuantizer`): the vector and the codebook (``vocab_size`` x ``code_dim``,
  8192 x 32) are L2-normalised, each patch takes its nearest code; the codebook is not trained by
  gradients but by an exponential moving average (decay 0.99) of the normalised mean of the vectors
  assigned to each code, renormalised after every update; codes no vector chose keep their value.
  Optionally (the paper's default) the codebook starts from k-means (cosine, 10 iterations) of the
  first batch's vectors. The straight-through estimator passes the decoder's gradient to the encoder
  unchanged (``z + (z_q - z).detach()``), and a commitment loss ``beta * ||sg(z_q) - z||^2`` (beta 1)
  pulls the encoder towards its codes;
* decoder (:class:`VQKDDecoder`): a small transformer over the quantised patch vectors (one block in
  the paper) and a Linear-Tanh-Linear head to the teacher's width;
* target: the teacher's patch features (the paper: CLIP ViT-B/16 or DINO ViT-B/16; here **any vitlab
  checkpoint**, ``--teacher CKPT``), frozen, at the teacher's own input size and normalisation, its
  feature map resized to the encoder's patch grid when the grids differ;
* loss: ``1 - cos(decoder output, teacher feature)`` per patch, averaged, plus the commitment loss.

The EMA statistics of a step (counts and sums per code, summed over accumulation micro-batches and,
under DDP, over processes) are applied after the optimiser step, so the codebook moves once per step
and a resumed run equals an uninterrupted one. Progress metrics: ``rec_loss``, ``quant_loss``,
``usage`` (fraction of the codebook the batch used) and ``dead_codes`` (codes that no patch chose in the
last ``dead_after`` optimiser steps; the paper reports 100% usage for VQ-KD).

After training, the encoder, its head and the codebook form a :class:`VQKDTokenizer`; ``vitlab pretrain
--method vqkd`` writes it as ``tokenizer.safetensors`` for ``--method beit2 --tokenizer``.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from vitlab.layers import Block, trunc_normal_linears
from vitlab.ssl.masking import patch_grid
from vitlab.ssl.tokenizer import normalise, resize_to, to_pixels
from vitlab.train.objective import Metrics, Objective


def _task_layer(dim: int, out: int) -> nn.Sequential:
    """BEiT v2's Linear-Tanh-Linear projection (encoder -> code space, decoder -> teacher space)."""
    layer = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, out))
    trunc_normal_linears(layer)
    return layer


def _heads_for(dim: int) -> int:
    """Attention heads of width 64 where the width allows, else one head."""
    return dim // 64 if dim % 64 == 0 and dim >= 64 else 1


class NormEMAQuantizer(nn.Module):
    """An L2-normalised codebook (V, d) updated by an EMA of the vectors assigned to each code.

    ``quantize(z)`` does not change the codebook; ``accumulate`` collects a batch's statistics and
    ``ema_update`` applies them (once per optimiser step).
    """

    def __init__(self, vocab_size: int, code_dim: int, *, decay: float = 0.99, kmeans_init: bool = True) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"NormEMAQuantizer: decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.register_buffer("codebook", F.normalize(torch.randn(vocab_size, code_dim), dim=-1))
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        self.register_buffer("last_used", torch.zeros(vocab_size, dtype=torch.long))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("pending_counts", torch.zeros(vocab_size), persistent=False)
        self.register_buffer("pending_sums", torch.zeros(vocab_size, code_dim), persistent=False)

    @property
    def vocab_size(self) -> int:
        return self.codebook.shape[0]

    @torch.no_grad()
    def kmeans_init_(self, z: Tensor, iters: int = 10) -> None:
        """Cosine k-means of the normalised vectors ``z`` (n, d) as the initial codebook (seeds drawn from the
        global generator; under DDP rank 0's result is broadcast)."""
        z = F.normalize(z.float(), dim=-1)
        V = self.vocab_size
        idx = torch.randperm(z.shape[0], device=z.device)[:V] if z.shape[0] >= V else \
            torch.randint(0, z.shape[0], (V,), device=z.device)
        means = z[idx].clone()
        for _ in range(iters):
            assign = (z @ means.t()).argmax(1)
            counts = torch.bincount(assign, minlength=V)
            sums = torch.zeros_like(means).index_add_(0, assign, z)
            means = torch.where((counts > 0).unsqueeze(1), F.normalize(sums, dim=-1), means)
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(means, src=0)
        self.codebook.copy_(means)
        self.initted.fill_(True)

    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """z (..., d) -> (normalised z, its codes' vectors, code ids (...,)); the codebook is untouched."""
        z = F.normalize(z, dim=-1)
        flat = z.reshape(-1, z.shape[-1])  # (n, d)
        # on unit vectors the nearest code by distance is the one with the largest dot product (in float32,
        # so that mixed precision does not change the tokens)
        with torch.autocast(z.device.type, enabled=False):
            ids = (flat.float() @ self.codebook.float().t()).argmax(1)  # (n,)
        z_q = self.codebook[ids].to(z.dtype).view_as(z)
        return z, z_q, ids.view(z.shape[:-1])

    @torch.no_grad()
    def accumulate(self, z: Tensor, ids: Tensor) -> None:
        """Add the statistics of normalised vectors ``z`` (..., d) with codes ``ids`` to the pending update."""
        flat, ids = z.detach().float().reshape(-1, z.shape[-1]), ids.reshape(-1)
        self.pending_counts += torch.bincount(ids, minlength=self.vocab_size).float()
        self.pending_sums.index_add_(0, ids, flat)

    @torch.no_grad()
    def ema_update(self, step: int | None = None) -> None:
        """codebook <- normalise(decay * codebook + (1 - decay) * normalise(mean of the assigned vectors)),
        for every code that was assigned at least once since the last update; then the pending sums clear."""
        counts, sums = self.pending_counts, self.pending_sums
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        used = counts > 0
        new = F.normalize(sums / counts.clamp_min(1).unsqueeze(1), dim=-1)
        new = torch.where(used.unsqueeze(1), new, self.codebook)
        self.codebook.copy_(F.normalize(self.decay * self.codebook + (1 - self.decay) * new, dim=-1))
        if step is not None:
            self.steps.fill_(step)
            self.last_used[used] = step
        counts.zero_()
        sums.zero_()

    def dead_codes(self, window: int) -> int:
        """Codes that no vector chose in the last ``window`` updates (none before ``window`` updates)."""
        return int(((self.steps - self.last_used) >= window).sum())


class VQKDDecoder(nn.Module):
    """Quantised patch vectors (B, N, d) -> predicted teacher features (B, N, D_teacher)."""

    def __init__(self, *, code_dim: int, out_dim: int, num_patches: int, dim: int, depth: int = 1,
                 num_heads: int | None = None, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.embed = nn.Linear(code_dim, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.Sequential(*[Block(dim, num_heads=num_heads or _heads_for(dim), mlp_ratio=mlp_ratio,
                                            qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)])
        self.norm = norm_layer(dim)
        self.head = _task_layer(dim, out_dim)

    def forward(self, z: Tensor) -> Tensor:
        x = self.embed(z) + self.pos_embed  # (B, N, dim)
        return self.head(self.norm(self.blocks(x)))

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}


def _fit_channels(pixels: Tensor, channels: int, who: str) -> Tensor:
    if pixels.shape[1] == channels:
        return pixels
    if pixels.shape[1] == 1:
        return pixels.expand(-1, channels, -1, -1)
    if channels == 1:
        return pixels.mean(1, keepdim=True)
    raise ValueError(f"{who}: the images have {pixels.shape[1]} channels, the model expects {channels}")


@torch.no_grad()
def teacher_features(teacher: nn.Module, pixels: Tensor, grid: tuple[int, int]) -> Tensor:
    """A frozen model's output features on a (rows, cols) grid: (B, rows * cols, D).

    The [0, 1] ``pixels`` are resized to the teacher's input size and normalised with its mean/std.
    Token outputs (B, prefix + N, D) lose their prefix tokens and are laid out on the teacher's grid;
    maps (B, H, W, D) or (B, D, H, W) are used as they are; the map is resized (bilinear) to ``grid``.
    """
    pre = teacher.preprocessing
    c, h, w = pre.input_size
    x = normalise(_fit_channels(resize_to(pixels.float(), (h, w)), c, "the teacher"), pre.mean, pre.std)
    x = x.to(next(teacher.parameters()).dtype)
    out = teacher.forward_features(x)
    if isinstance(out, (list, tuple)):
        out = out[-1]
    if out.ndim == 3:
        tokens = out[:, getattr(teacher, "num_prefix_tokens", 0):]  # (B, N, D)
        n = tokens.shape[1]
        rows = max(1, round(math.sqrt(n * h / w)))
        cols = n // rows
        if rows * cols != n:
            raise ValueError(f"teacher: {n} output tokens do not lie on a grid of the {h}x{w} input")
        fmap = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, rows, cols)  # (B, D, rows, cols)
    elif out.ndim == 4:
        D = getattr(teacher, "num_features", None)
        fmap = out if out.shape[1] == D else out.permute(0, 3, 1, 2)  # (B, D, rows, cols)
    else:
        raise ValueError(f"teacher: forward_features returned a {out.ndim}-D tensor; expected tokens or a map")
    if tuple(fmap.shape[-2:]) != tuple(grid):
        fmap = F.interpolate(fmap.float(), size=tuple(grid), mode="bilinear", align_corners=False)
    return fmap.flatten(2).transpose(1, 2).float()  # (B, rows * cols, D)


def cosine_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean of 1 - cos(pred, target) over all vectors (..., D)."""
    return (1 - F.cosine_similarity(pred.float(), target.float(), dim=-1)).mean()


class VQKDTokenizer(nn.Module):
    """A trained VQ-KD encoder, head and codebook as a :class:`~vitlab.ssl.tokenizer.Tokenizer` (frozen).

    Images are resized to the encoder's input size and normalised with its mean/std, so the token grid
    is the encoder's patch grid whatever the input size.
    """

    kind = "vqkd"

    def __init__(self, encoder: nn.Module, head: nn.Module, quantizer: NormEMAQuantizer) -> None:
        super().__init__()
        self.encoder, self.head, self.quantizer = encoder, head, quantizer
        self._grid: tuple[int, int] | None = None

    @property
    def vocab_size(self) -> int:
        return self.quantizer.vocab_size

    def config(self) -> dict[str, Any]:
        from vitlab.checkpoints.vitlab_format import config_to_dict

        return {"encoder": {"model": self.encoder.model_name, "config": config_to_dict(self.encoder.cfg)},
                "vocab_size": self.vocab_size, "code_dim": self.quantizer.codebook.shape[1],
                "decay": self.quantizer.decay}

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> VQKDTokenizer:
        import vitlab

        def tup(v: Any) -> Any:
            return tuple(tup(x) for x in v) if isinstance(v, list) else v

        enc = cfg["encoder"]
        encoder = vitlab.create_model(enc["model"], **{k: tup(v) for k, v in enc["config"].items()})
        dim = encoder.num_features
        return cls(encoder, _task_layer(dim, int(cfg["code_dim"])),
                   NormEMAQuantizer(int(cfg["vocab_size"]), int(cfg["code_dim"]), decay=float(cfg.get("decay", 0.99))))

    def token_grid(self, size: tuple[int, int]) -> tuple[int, int]:
        if self._grid is None:
            self._grid = patch_grid(self.encoder)[0]
        return self._grid

    def encode(self, images: Tensor) -> Tensor:
        """The encoder's normalised input (B, C, H, W) -> code-space vectors (B, N, d), before normalisation."""
        tokens = self.encoder.forward_features(images)[:, self.encoder.num_prefix_tokens:]  # (B, N, D)
        with torch.autocast(images.device.type, enabled=False):
            return self.head(tokens.float())

    @torch.no_grad()
    def tokenize(self, pixels: Tensor) -> Tensor:
        """[0, 1] pixels (B, C, H, W) -> token ids (B, rows, cols) on the encoder's patch grid."""
        pre = self.encoder.preprocessing
        c, h, w = pre.input_size
        x = normalise(_fit_channels(resize_to(pixels.float(), (h, w)), c, "the VQ-KD tokenizer"), pre.mean, pre.std)
        with torch.autocast(x.device.type, enabled=False):  # tokens do not depend on mixed precision
            _, _, ids = self.quantizer.quantize(self.encode(x))
        rows, cols = self.token_grid((h, w))
        return ids.view(-1, rows, cols)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.tokenize(pixels)


class VQKD(Objective):
    """Trains a VQ-KD tokenizer whose encoder is the engine's model (see the module docstring).

    Args:
        teacher: a frozen model whose patch features are the targets (``vitlab.load_model(CKPT)``).
        vocab_size / code_dim: codebook size (8192 x 32 in the paper).
        decay: EMA decay of the codebook (0.99); beta: commitment weight (1.0).
        kmeans_init: start the codebook from k-means of the first batch's vectors.
        decoder_dim / decoder_depth / decoder_heads: the decoder transformer (default: the encoder's width,
            one block, heads of width 64).
        dead_after: a code is dead when no patch chose it in this many optimiser steps.
    """

    name = "vqkd"
    unsaved = frozenset({"teacher"})  # re-read from its own checkpoint (--teacher) on resume

    def __init__(self, model: nn.Module, *, teacher: nn.Module, vocab_size: int = 8192, code_dim: int = 32,
                 decay: float = 0.99, beta: float = 1.0, kmeans_init: bool = True, decoder_dim: int | None = None,
                 decoder_depth: int = 1, decoder_heads: int | None = None, dead_after: int = 100) -> None:
        device = next(model.parameters()).device
        self.grid, _ = patch_grid(model)
        self.beta, self.dead_after = beta, dead_after
        self.num_prefix_tokens = model.num_prefix_tokens
        self.teacher = teacher.to(device).eval().requires_grad_(False)
        c, h, w = model.preprocessing.input_size
        probe = torch.zeros(1, c, h, w, device=device)
        teacher_dim = teacher_features(self.teacher, probe, self.grid).shape[-1]
        dim = model.num_features
        self.head = _task_layer(dim, code_dim).to(device)
        self.quantizer = NormEMAQuantizer(vocab_size, code_dim, decay=decay, kmeans_init=kmeans_init).to(device)
        self.decoder = VQKDDecoder(code_dim=code_dim, out_dim=teacher_dim, num_patches=self.grid[0] * self.grid[1],
                                   dim=decoder_dim or dim, depth=decoder_depth, num_heads=decoder_heads).to(device)

    def modules(self) -> dict[str, nn.Module]:
        return {"head": self.head, "quantizer": self.quantizer, "decoder": self.decoder, "teacher": self.teacher}

    def describe(self) -> str:
        V, d = self.quantizer.codebook.shape
        return f"vqkd ({V} x {d} codebook, teacher {getattr(self.teacher, 'model_name', type(self.teacher).__name__)})"

    def tokenizer(self, model: nn.Module) -> VQKDTokenizer:
        """The trained tokenizer: ``model`` (the encoder), the head and the codebook (shared, not copied)."""
        return VQKDTokenizer(model, self.head, self.quantizer)

    def step(self, model: nn.Module, batch: Any) -> tuple[Tensor, Metrics]:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        pre = model.preprocessing
        target = teacher_features(self.teacher, to_pixels(images.float(), pre.mean, pre.std), self.grid)  # (B, N, Dt)
        tokens = model.forward_features(images)[:, self.num_prefix_tokens:]  # (B, N, D)
        with torch.autocast(images.device.type, enabled=False):
            z = self.head(tokens.float())  # (B, N, d)
            if not bool(self.quantizer.initted):
                self.quantizer.kmeans_init_(z.detach().reshape(-1, z.shape[-1]))
            z, z_q, ids = self.quantizer.quantize(z)
            quant_loss = self.beta * F.mse_loss(z_q.detach(), z)
            z_st = z + (z_q - z).detach()  # straight-through: the decoder's gradient reaches z unchanged
            rec_loss = cosine_loss(self.decoder(z_st), target)
        self.quantizer.accumulate(z, ids)
        usage = ids.unique().numel() / self.quantizer.vocab_size
        metrics = {"rec_loss": rec_loss.detach(), "quant_loss": quant_loss.detach(), "usage": usage,
                   "dead_codes": float(self.quantizer.dead_codes(self.dead_after))}
        return rec_loss + quant_loss, metrics

    def after_optimizer_step(self, step: int) -> None:
        self.quantizer.ema_update(step)


__all__ = ["NormEMAQuantizer", "VQKD", "VQKDDecoder", "VQKDTokenizer", "cosine_loss", "teacher_features"]
