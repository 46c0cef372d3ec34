"""A discrete VAE that vitlab trains itself, as BEiT's visual tokenizer (DALL-E's dVAE, Ramesh et al. 2021,
arXiv:2102.12092, section 2.1 and appendix A; BEiT, arXiv:2106.08254, section 2.2).

BEiT predicts the tokens of DALL-E's discrete VAE, an external download whose pickled classes execute
code when loaded; vitlab trains its own with ``vitlab pretrain --method dvae`` and writes it as a
tokenizer file (:mod:`vitlab.ssl.tokenizer`) that ``vitlab pretrain --method beit --tokenizer RUN``
reads. The encoder downsamples by the backbone's patch size (stride-2 convolutions, and one
convolution of the remaining odd factor), so there is exactly one token per patch at the backbone's
resolution: unlike BEiT, no second 112-px view of the image is needed.

Training (DALL-E's recipe where it applies):

* encoder: [0, 1] pixels (as ``2x - 1``) -> logits (B, V, h, w) over a vocabulary of V codes;
* Gumbel-softmax relaxation of the categorical posterior at temperature tau, annealed from 1 to 1/16
  with a cosine schedule (DALL-E: over the first 150k of 3M updates; here over ``anneal`` x the run,
  the whole run by default); ``hard=True`` uses the straight-through variant instead;
* the relaxed one-hot codes select (mix) rows of a codebook (V, E); the decoder maps them back to pixels;
* reconstruction loss, chosen by ``recon``:
  ``"logit_laplace"`` (DALL-E's): pixels are squeezed into [eps, 1 - eps] (eps 0.1) and the decoder
  predicts, per pixel, the location mu and log-scale of a Laplace distribution on logit(pixel); the
  loss is the exact negative log density on (0, 1) (it may be negative), the reconstruction is
  ``(sigmoid(mu) - eps) / (1 - 2 eps)``;
  ``"l1"`` / ``"mse"``: the decoder predicts pixels through a sigmoid, and the loss is their mean
  absolute / squared error (simpler, the choice of most re-implementations);
* KL divergence of the posterior (softmax of the logits) to the uniform prior, weighted by beta:
  DALL-E's evidence lower bound sums over pixel values and latents, so vitlab divides both terms by the
  number of pixel values: ``loss = recon + beta * KL_per_latent / (p * p * C)``. beta rises linearly
  from 0 to ``kl_weight`` over the first ``kl_warmup`` (5%) of the run. Default beta 1, the bound
  itself; DALL-E raised it to 6.6 (over 5000 updates), but with 192 pixel values per latent (256 px
  RGB to 32 x 32 tokens), where a latent's KL weighs far less against its pixels' reconstruction than
  at small patches (4 values per latent for 2 x 2 grey patches: there 6.6 keeps the posterior near
  uniform). Many re-implementations use no KL term (``kl_weight=0``): sharper reconstructions, fewer
  codes used. Measured on the digits (64 codes, 60 steps): beta 0 -> reconstruction MSE 0.029, 14% of
  the codes used; beta 1 -> 0.047, 67% used.

Tokens are the argmax of the encoder's logits. Progress metrics: ``recon_mse`` (squared error of the
reconstruction in [0, 1] pixels, whatever the loss), ``kl``, ``tau`` and ``usage`` (the fraction of the
vocabulary used by the batch's tokens).

Deviations, stated: a much smaller network than DALL-E's (a few residual blocks, ``hidden_dim`` 64);
the KL weight's unit as above; the temperature schedule spans the run unless ``anneal`` says otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitlab.models.base import Preprocessing
from vitlab.train.objective import Metrics, Objective
from vitlab.train.schedule import Horizon

LOGIT_LAPLACE_EPS = 0.1  # DALL-E's map_pixels


@dataclass(frozen=True)
class DVAEConfig:
    """Args:
    patch_size: total downsampling (one token per ``patch_size`` x ``patch_size`` pixels).
    vocab_size: codes in the codebook (BEiT/DALL-E: 8192).
    embed_dim: width of a codebook entry; hidden_dim: width of the convolutions.
    num_resblocks: residual blocks per resolution in the encoder and the decoder.
    recon: the reconstruction loss ("logit_laplace", "l1" or "mse"; see the module docstring).
    """

    img_size: tuple[int, int] = (224, 224)
    in_chans: int = 3
    patch_size: int = 16
    vocab_size: int = 8192
    embed_dim: int = 256
    hidden_dim: int = 64
    num_resblocks: int = 1
    recon: Literal["logit_laplace", "l1", "mse"] = "logit_laplace"

    def __post_init__(self) -> None:
        if self.recon not in ("logit_laplace", "l1", "mse"):
            raise ValueError(f"dVAE: recon must be 'logit_laplace', 'l1' or 'mse', got {self.recon!r}")
        h, w = self.img_size
        if self.patch_size < 1 or h % self.patch_size or w % self.patch_size:
            raise ValueError(f"dVAE: image size {h}x{w} must be a multiple of patch_size {self.patch_size}")
        if self.vocab_size < 2:
            raise ValueError(f"dVAE: vocab_size must be at least 2, got {self.vocab_size}")


# the constructor arguments that ``--opt`` may set for the model (the rest go to the objective)
DVAE_MODEL_OPTIONS = ("vocab_size", "embed_dim", "hidden_dim", "num_resblocks", "recon")


def _factors(p: int) -> list[int]:
    """Downsampling steps of a patch size: 2s first, then the remaining odd factor (16 -> [2, 2, 2, 2])."""
    out = []
    while p % 2 == 0 and p > 1:
        out.append(2)
        p //= 2
    if p > 1:
        out.append(p)
    return out


def logit_laplace_nll(mu: Tensor, log_b: Tensor, pixels: Tensor, eps: float = LOGIT_LAPLACE_EPS) -> Tensor:
    """Per value: -log density of the logit-Laplace distribution (location ``mu``, scale ``exp(log_b)``) at the
    pixels squeezed into [eps, 1 - eps]; the density is that of a Laplace variable on logit(y), on (0, 1)."""
    y = (1 - 2 * eps) * pixels + eps
    return math.log(2.0) + log_b + torch.log(y * (1 - y)) + (torch.logit(y) - mu).abs() * torch.exp(-log_b)


class ResBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.ReLU(), nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU(), nn.Conv2d(dim, dim, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


def _down(dim: int, f: int) -> nn.Module:
    return nn.Conv2d(dim, dim, 4, stride=2, padding=1) if f == 2 else nn.Conv2d(dim, dim, f, stride=f)


def _up(dim: int, f: int) -> nn.Module:
    return nn.ConvTranspose2d(dim, dim, 4, stride=2, padding=1) if f == 2 else nn.ConvTranspose2d(dim, dim, f, stride=f)


class DiscreteVAE(nn.Module):
    """Encoder (pixels -> code logits on the patch grid), codebook and decoder (codes -> pixel distribution).

    It carries the attributes the training engine needs of a model (``model_name``, ``cfg``,
    ``preprocessing``: [0, 1] pixels, mean 0 and std 1, ``num_classes`` 0), so ``vitlab pretrain
    --method dvae`` trains it with the same engine as any backbone.
    """

    model_name = "dvae"
    num_classes = 0
    num_prefix_tokens = 0

    def __init__(self, cfg: DVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        C, h = cfg.in_chans, cfg.hidden_dim
        steps = _factors(cfg.patch_size)
        enc: list[nn.Module] = [nn.Conv2d(C, h, 3, padding=1)]
        for f in steps:
            enc += [ResBlock(h) for _ in range(cfg.num_resblocks)] + [_down(h, f)]
        enc += [ResBlock(h) for _ in range(cfg.num_resblocks)] + [nn.ReLU(), nn.Conv2d(h, cfg.vocab_size, 1)]
        self.encoder = nn.Sequential(*enc)
        self.codebook = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        dec: list[nn.Module] = [nn.Conv2d(cfg.embed_dim, h, 1)]
        dec += [ResBlock(h) for _ in range(cfg.num_resblocks)]
        for f in reversed(steps):
            dec += [_up(h, f)] + [ResBlock(h) for _ in range(cfg.num_resblocks)]
        out = 2 * C if cfg.recon == "logit_laplace" else C
        dec += [nn.ReLU(), nn.Conv2d(h, out, 1)]
        self.decoder = nn.Sequential(*dec)

    @property
    def preprocessing(self) -> Preprocessing:
        c, (h, w) = self.cfg.in_chans, self.cfg.img_size
        return Preprocessing(input_size=(c, h, w), mean=(0.0,) * c, std=(1.0,) * c, crop_pct=1.0)

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    def encode(self, pixels: Tensor) -> Tensor:
        """[0, 1] pixels (B, C, H, W) -> code logits (B, V, H / p, W / p)."""
        return self.encoder(pixels * 2 - 1)

    def decode(self, codes: Tensor) -> Tensor:
        """Soft or one-hot codes (B, V, h, w) -> the decoder's output (B, 2C or C, h * p, w * p)."""
        z = torch.einsum("bvhw,ve->behw", codes, self.codebook.weight)  # (B, E, h, w)
        return self.decoder(z)

    def decode_tokens(self, tokens: Tensor) -> Tensor:
        """Token ids (B, h, w) -> reconstructed [0, 1] pixels (B, C, H, W)."""
        one_hot = F.one_hot(tokens, self.cfg.vocab_size).permute(0, 3, 1, 2)  # (B, V, h, w)
        one_hot = one_hot.to(self.codebook.weight.dtype)
        return self.reconstruction(self.decode(one_hot))

    def reconstruction(self, out: Tensor) -> Tensor:
        """The decoder's output -> [0, 1] pixels (the distribution's centre)."""
        C = self.cfg.in_chans
        if self.cfg.recon == "logit_laplace":
            eps = LOGIT_LAPLACE_EPS
            return ((torch.sigmoid(out[:, :C]) - eps) / (1 - 2 * eps)).clamp(0, 1)
        return torch.sigmoid(out)

    def recon_loss(self, out: Tensor, pixels: Tensor) -> Tensor:
        """Mean reconstruction loss per pixel value (see the module docstring)."""
        C = self.cfg.in_chans
        out, pixels = out.float(), pixels.float()
        if self.cfg.recon == "logit_laplace":
            return logit_laplace_nll(out[:, :C], out[:, C:], pixels).mean()
        rec = torch.sigmoid(out)
        return (rec - pixels).abs().mean() if self.cfg.recon == "l1" else F.mse_loss(rec, pixels)

    @torch.no_grad()
    def tokens(self, pixels: Tensor) -> Tensor:
        """[0, 1] pixels -> token ids (B, H / p, W / p): the argmax code."""
        return self.encode(pixels).argmax(1)

    def forward(self, pixels: Tensor) -> Tensor:
        """Reconstruct through the hard (argmax) codes: [0, 1] pixels -> [0, 1] pixels."""
        return self.decode_tokens(self.encode(pixels).argmax(1))

    def no_weight_decay(self) -> set[str]:
        return {"codebook.weight"}

    @classmethod
    def for_backbone(cls, backbone: nn.Module, **options: Any) -> DiscreteVAE:
        """A dVAE with one token per patch of ``backbone`` at its input size."""
        from vitlab.ssl.masking import patch_grid

        (rows, cols), (ph, pw) = patch_grid(backbone)
        if ph != pw:
            raise ValueError(f"dVAE: the backbone's patches are {ph}x{pw}; the dVAE downsamples squares only")
        c = backbone.preprocessing.input_size[0]
        return cls(DVAEConfig(img_size=(rows * ph, cols * pw), in_chans=c, patch_size=ph, **options))


class DVAETokenizer(nn.Module):
    """A trained :class:`DiscreteVAE` as a :class:`~vitlab.ssl.tokenizer.Tokenizer` (frozen)."""

    kind = "dvae"

    def __init__(self, dvae: DiscreteVAE) -> None:
        super().__init__()
        self.dvae = dvae

    @property
    def vocab_size(self) -> int:
        return self.dvae.cfg.vocab_size

    @property
    def channels(self) -> int:
        """Channels of the images the dVAE was trained on (and reads)."""
        return self.dvae.cfg.in_chans

    def config(self) -> dict[str, Any]:
        from vitlab.checkpoints.vitlab_format import config_to_dict

        return config_to_dict(self.dvae.cfg)

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> DVAETokenizer:
        from vitlab.checkpoints.vitlab_format import config_from_dict

        return cls(DiscreteVAE(config_from_dict(DVAEConfig(), cfg)))

    def token_grid(self, size: tuple[int, int]) -> tuple[int, int]:
        p = self.dvae.cfg.patch_size
        return size[0] // p, size[1] // p

    @torch.no_grad()
    def tokenize(self, pixels: Tensor) -> Tensor:
        """[0, 1] pixels (B, C, H, W) -> token ids (B, H / p, W / p)."""
        p = self.dvae.cfg.patch_size
        if pixels.shape[-2] % p or pixels.shape[-1] % p:
            raise ValueError(f"dVAE tokenizer: image size {tuple(pixels.shape[-2:])} is not a multiple of its "
                             f"patch size {p}")
        with torch.autocast(pixels.device.type, enabled=False):  # tokens do not depend on mixed precision
            return self.dvae.tokens(pixels.to(self.dvae.codebook.weight.dtype))

    def forward(self, pixels: Tensor) -> Tensor:
        return self.tokenize(pixels)


class _Clock(nn.Module):
    """Optimiser steps taken, kept in the objective's state so that schedules resume exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("step", torch.zeros((), dtype=torch.long))


def gumbel_temperature(step: float, anneal_steps: float, start: float = 1.0, end: float = 1 / 16) -> float:
    """Cosine from ``start`` (step 0) to ``end`` (step ``anneal_steps`` and after); steps or fractions of a run."""
    t = min(step / anneal_steps, 1.0) if anneal_steps > 0 else 1.0
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))


class DVAEObjective(Objective):
    """Trains the :class:`DiscreteVAE` that is the engine's model (see the module docstring).

    Args:
        tau_start / tau_end: Gumbel-softmax temperature at the start and after annealing (1, 1/16).
        anneal: fraction of the run over which tau is annealed (cosine).
        kl_weight: beta (1: the bound; DALL-E's 6.6, see above).
        kl_warmup: fraction of the run over which beta rises from 0.
        hard: straight-through Gumbel-softmax (one-hot forward, relaxed gradients) instead of the relaxation.
    """

    name = "dvae"

    def __init__(self, model: DiscreteVAE, *, tau_start: float = 1.0, tau_end: float = 1 / 16, anneal: float = 1.0,
                 kl_weight: float = 1.0, kl_warmup: float = 0.05, hard: bool = False) -> None:
        if not isinstance(model, DiscreteVAE):
            raise TypeError("dvae: the objective trains a DiscreteVAE (DiscreteVAE.for_backbone(backbone))")
        if not 0 < tau_end <= tau_start:
            raise ValueError(f"dvae: need 0 < tau_end <= tau_start, got {tau_start}, {tau_end}")
        self.tau_start, self.tau_end, self.anneal = tau_start, tau_end, anneal
        self.kl_weight, self.kl_warmup, self.hard = kl_weight, kl_warmup, hard
        self.clock = _Clock().to(next(model.parameters()).device)
        self.schedule = Horizon(total_steps=1, warmup_steps=0)  # until setup

    def modules(self) -> dict[str, nn.Module]:
        return {"clock": self.clock}

    def describe(self) -> str:
        cfg = getattr(self, "_cfg", None)
        return "dvae" + (f" ({cfg.vocab_size} codes, {cfg.recon} loss)" if cfg else "")

    def setup(self, model: nn.Module, *, steps_per_epoch: int, total_steps: int) -> None:
        super().setup(model, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
        self._cfg = model.cfg

    def temperature(self, step: int) -> float:
        """tau at ``step``: the cosine over the first ``anneal`` of the run's progress (re-planned with its length)."""
        return gumbel_temperature(self.progress(step), self.anneal, self.tau_start, self.tau_end)

    def beta(self, step: int) -> float:
        warm = self.kl_warmup
        return self.kl_weight * (min(self.progress(step) / warm, 1.0) if warm > 0 else 1.0)

    def step(self, model: nn.Module, batch: Any) -> tuple[Tensor, Metrics]:
        pixels = batch[0] if isinstance(batch, (tuple, list)) else batch  # [0, 1]: the dVAE's preprocessing
        cfg = model.cfg
        step = int(self.clock.step)
        tau = self.temperature(step)
        logits = model.encode(pixels)  # (B, V, h, w)
        codes = F.gumbel_softmax(logits.float(), tau=tau, hard=self.hard, dim=1)  # draws from the global generator
        out = model.decode(codes.to(logits.dtype))
        recon = model.recon_loss(out, pixels)
        log_q = F.log_softmax(logits.float(), dim=1)
        kl = (log_q.exp() * (log_q + math.log(cfg.vocab_size))).sum(1).mean()  # KL(q || uniform) per latent
        loss = recon + self.beta(step) * kl / (cfg.patch_size ** 2 * cfg.in_chans)
        with torch.no_grad():
            mse = F.mse_loss(model.reconstruction(out.float()), pixels.float())
            usage = logits.argmax(1).unique().numel() / cfg.vocab_size
        return loss, {"recon_mse": mse, "kl": kl.detach(), "tau": tau, "usage": usage}

    def after_optimizer_step(self, step: int) -> None:
        self.clock.step.fill_(step)


__all__ = ["DVAEConfig", "DVAEObjective", "DVAETokenizer", "DiscreteVAE", "gumbel_temperature", "logit_laplace_nll"]
