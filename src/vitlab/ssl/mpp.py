"""Masked patch prediction, the ViT paper's self-supervised objective (Dosovitskiy et al. 2020,
arXiv:2010.11929, section 4.6 and appendix B.1.2).

Half of the patch embeddings of every image are corrupted: of those, 80% are replaced by a learned
mask embedding, 10% by the embedding of another (random) patch of the same image and 10% are kept
as they are. For every corrupted patch the model predicts, from its output token, the patch's 3-bit
mean colour: the mean of each channel (in [0, 1] pixels) quantised to 8 levels, 8^C classes (512 for
RGB, 8 for grayscale). The paper reports +2% ImageNet accuracy over training from scratch for
ViT-B/16 pre-trained this way on JFT.

Corruption happens through the backbone's token-masking hook on the patch embeddings, before position
embeddings are added (the replaced token keeps its position). The number of corrupted patches is exact
(``round(ratio * N)``, chosen by sorted noise); the 80/10/10 split is drawn per corrupted patch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitlab.train.objective import Metrics, Objective


class MaskEmbedding(nn.Module):
    """One learned D-vector that replaces masked patch embeddings."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        nn.init.normal_(self.weight, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"weight"}


class PatchCorruption:
    """The MPP corruption as a :class:`~vitlab.layers.token_mask.TokenMasker` (keeps every token).

    After a call: ``corrupted`` (B, N) bool and its parts ``replaced`` (mask embedding), ``swapped``
    (another patch's embedding, from ``source``) and ``kept``, plus ``grid``.
    """

    def __init__(self, mask_embedding: Tensor, *, ratio: float = 0.5, mask_prob: float = 0.8,
                 random_prob: float = 0.1) -> None:
        if not 0.0 < ratio <= 1.0 or mask_prob < 0 or random_prob < 0 or mask_prob + random_prob > 1:
            raise ValueError(f"PatchCorruption: need 0 < ratio <= 1 and mask_prob + random_prob <= 1, got "
                             f"ratio={ratio}, mask_prob={mask_prob}, random_prob={random_prob}")
        self.mask_embedding = mask_embedding
        self.ratio, self.mask_prob, self.random_prob = ratio, mask_prob, random_prob

    def __call__(self, tokens: Tensor, grid: tuple[int, int]) -> tuple[Tensor, None]:
        B, N, D = tokens.shape
        device = tokens.device
        n = max(1, round(self.ratio * N))
        order = torch.argsort(torch.rand(B, N, device=device), dim=1)[:, :n]
        corrupted = torch.zeros(B, N, dtype=torch.bool, device=device).scatter_(1, order, True)
        u = torch.rand(B, N, device=device)
        replaced = corrupted & (u < self.mask_prob)
        swapped = corrupted & (u >= self.mask_prob) & (u < self.mask_prob + self.random_prob)
        # another patch of the same image, uniformly among the N - 1 others
        src = torch.randint(0, max(N - 1, 1), (B, N), device=device)
        src = src + (src >= torch.arange(N, device=device)).long() if N > 1 else src
        other = torch.gather(tokens, 1, src.unsqueeze(-1).expand(-1, -1, D))
        out = torch.where(swapped.unsqueeze(-1), other, tokens)
        out = torch.where(replaced.unsqueeze(-1), self.mask_embedding.to(out.dtype).expand(B, N, D), out)
        self.corrupted, self.replaced, self.swapped = corrupted, replaced, swapped
        self.kept = corrupted & ~replaced & ~swapped
        self.source, self.grid = src, tuple(grid)
        return out, None


def mean_colour_targets(images: Tensor, patch: tuple[int, int], *, mean: tuple[float, ...], std: tuple[float, ...],
                        bits: int = 3) -> Tensor:
    """Class of each patch's mean colour: (B, N) in [0, 2^(bits*C)), first channel most significant.

    ``images`` are normalised with ``mean``/``std``; the mean colour is taken in [0, 1] pixels.
    """
    C = images.shape[1]
    m = torch.tensor(mean, device=images.device, dtype=torch.float32).view(1, C, 1, 1)
    s = torch.tensor(std, device=images.device, dtype=torch.float32).view(1, C, 1, 1)
    pixels = (images.float() * s + m).clamp(0, 1)
    means = F.avg_pool2d(pixels, kernel_size=patch, stride=patch)  # (B, C, h, w)
    levels = 2**bits
    q = (means * levels).floor().clamp(0, levels - 1).long().flatten(2)  # (B, C, N)
    weights = torch.tensor([levels ** (C - 1 - c) for c in range(C)], device=images.device).view(1, C, 1)
    return (q * weights).sum(1)  # (B, N)


class MaskedPatchPrediction(Objective):
    """Masked patch prediction over ``model``; owns the mask embedding and the colour head.

    Args:
        ratio: fraction of patches corrupted (0.5); mask_prob / random_prob: the 80% / 10% split
            (the rest, 10%, is kept).
        bits: bits per channel of the target colour (3).
    """

    name = "mpp"

    def __init__(self, model: nn.Module, *, ratio: float = 0.5, mask_prob: float = 0.8, random_prob: float = 0.1,
                 bits: int = 3) -> None:
        if not 0.0 < ratio <= 1.0 or mask_prob < 0 or random_prob < 0 or mask_prob + random_prob > 1:
            raise ValueError(f"mpp: ratio={ratio!r} is the share of patches corrupted, in (0, 1] (the paper's 0.5); "
                             f"mask_prob={mask_prob!r} and random_prob={random_prob!r} the shares of those masked and "
                             f"swapped, at least 0 and at most 1 together (0.8 and 0.1)")
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
            raise ValueError(f"mpp: bits={bits!r} is the number of bits per channel of the target colour, a whole "
                             f"number from 1 to 8 (the paper's 3; 2^(bits x channels) classes)")
        pre = model.preprocessing
        self.channels = pre.input_size[0]
        self.mean, self.std = tuple(pre.mean), tuple(pre.std)
        self.ratio, self.mask_prob, self.random_prob, self.bits = ratio, mask_prob, random_prob, bits
        self.num_prefix_tokens = model.num_prefix_tokens
        device = next(model.parameters()).device
        self.mask_embedding = MaskEmbedding(model.num_features).to(device)
        self.head = nn.Linear(model.num_features, 2 ** (bits * self.channels)).to(device)
        nn.init.zeros_(self.head.bias)

    def modules(self) -> dict[str, nn.Module]:
        return {"mask_embedding": self.mask_embedding, "head": self.head}

    def describe(self) -> str:
        return f"mpp ({self.ratio:g} corrupted, {self.head.out_features} colours)"

    def step(self, model: nn.Module, batch: Any) -> tuple[Tensor, Metrics]:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        corruption = PatchCorruption(self.mask_embedding.weight, ratio=self.ratio, mask_prob=self.mask_prob,
                                     random_prob=self.random_prob)
        tokens = model.forward_features(images, mask=corruption)[:, self.num_prefix_tokens:]  # (B, N, D)
        rows, cols = corruption.grid
        patch = (images.shape[-2] // rows, images.shape[-1] // cols)
        targets = mean_colour_targets(images, patch, mean=self.mean, std=self.std, bits=self.bits)
        sel = corruption.corrupted
        logits = self.head(tokens[sel])  # (M, colours)
        loss = F.cross_entropy(logits.float(), targets[sel])
        acc = (logits.argmax(-1) == targets[sel]).float().mean()
        return loss, {"masked_acc": acc.detach()}
