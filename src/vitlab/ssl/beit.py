"""BEiT-style masked image modelling (Bao et al. 2021, arXiv:2106.08254) over any backbone with the
token-masking hook, with a tokenizer vitlab can build itself.

About 40% of the patches are masked in blocks (:class:`~vitlab.ssl.masking.BlockMasking`: rectangles
of at least 16 patches on a 14 x 14 grid, aspect ratio 0.3-3.3); their patch embeddings are replaced
by a learned mask embedding before position embeddings are added, and the model predicts each masked
patch's visual token from its output token (cross entropy on masked positions only, accuracy logged).

Deviations, stated: BEiT's tokenizer is the DALL-E discrete VAE (8192 tokens), an external download
that executes code when unpickled; here the tokenizer is a k-means codebook over per-patch-normalised
pixels (:class:`KMeansTokenizer`, fitted on a sample of the training images; the reference notes list
it as the practical CPU-scale stand-in, not in the official code). The backbone is whatever model is
trained (a vitlab ViT), not BEiT's own family with a shared relative position bias and LayerScale;
that family, BEiT v2's VQ-KD tokenizer and BEiT-3 are not implemented. The minimum block scales with
the grid (16 patches of 196, so at least 2 on small grids) unless given.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitlab.ssl.masking import BlockMasking, patch_grid, patchify
from vitlab.ssl.mpp import MaskEmbedding
from vitlab.train.objective import Metrics, Objective


def _normalise_patches(p: Tensor, eps: float = 1e-6) -> Tensor:
    return (p - p.mean(-1, keepdim=True)) / (p.var(-1, keepdim=True) + eps).sqrt()


class KMeansTokenizer(nn.Module):
    """Visual tokens from a k-means codebook (V, P) over per-patch-normalised pixels; frozen."""

    def __init__(self, vocab_size: int, patch: tuple[int, int], channels: int) -> None:
        super().__init__()
        self.patch = tuple(patch)
        self.register_buffer("codebook", torch.zeros(vocab_size, patch[0] * patch[1] * channels))

    @torch.no_grad()
    def fit(self, images: Tensor, *, iters: int = 20, seed: int = 0) -> KMeansTokenizer:
        """Lloyd's k-means on the patches of ``images`` (n, C, H, W); seeded, on its own generator."""
        x = _normalise_patches(patchify(images.float(), self.patch).flatten(0, 1))  # (n * N, P)
        g = torch.Generator().manual_seed(seed)
        V = self.codebook.shape[0]
        centres = x[torch.randperm(x.shape[0], generator=g)[:V]].clone()
        if centres.shape[0] < V:
            raise ValueError(f"KMeansTokenizer: {x.shape[0]} patches cannot seed a vocabulary of {V}")
        for _ in range(iters):
            assign = torch.cdist(x, centres).argmin(1)
            sums = torch.zeros_like(centres).index_add_(0, assign, x)
            counts = torch.bincount(assign, minlength=V).unsqueeze(1)
            empty = counts.squeeze(1) == 0
            centres = torch.where(empty.unsqueeze(1), centres, sums / counts.clamp_min(1))
        self.codebook.copy_(centres)
        return self

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """Token ids (B, N) of the images' patches."""
        p = _normalise_patches(patchify(images.float(), self.patch))  # (B, N, P)
        return torch.cdist(p, self.codebook.unsqueeze(0).expand(p.shape[0], -1, -1)).argmin(-1)


class BlockMasker:
    """BEiT's masking as a :class:`~vitlab.layers.token_mask.TokenMasker`: a block mask per sample,
    masked embeddings replaced by the mask embedding; ``mask`` (B, N) bool after a call."""

    def __init__(self, mask_embedding: Tensor, ratio: float = 0.4, min_patches: int | None = None) -> None:
        self.mask_embedding, self.ratio, self.min_patches = mask_embedding, ratio, min_patches

    def __call__(self, tokens: Tensor, grid: tuple[int, int]) -> tuple[Tensor, None]:
        B, N, D = tokens.shape
        num = max(1, round(self.ratio * N))
        min_patches = self.min_patches or max(2, round(16 * N / 196))
        gen = BlockMasking(grid, num, min_patches=min(min_patches, num))
        self.mask = torch.stack([gen().flatten() for _ in range(B)]).to(tokens.device)  # (B, N)
        w = self.mask.unsqueeze(-1).to(tokens.dtype)
        return tokens * (1 - w) + self.mask_embedding.to(tokens.dtype) * w, None


class BEiT(Objective):
    """Masked image modelling against visual tokens of a frozen ``tokenizer`` (default: a k-means codebook
    fitted by :meth:`fit_tokenizer` before training)."""

    name = "beit"

    def __init__(self, model: nn.Module, *, vocab_size: int = 512, ratio: float = 0.4,
                 min_patches: int | None = None, tokenizer: nn.Module | None = None) -> None:
        _, patch = patch_grid(model)
        device = next(model.parameters()).device
        self.ratio, self.min_patches = ratio, min_patches
        self.num_prefix_tokens = model.num_prefix_tokens
        self.tokenizer = (tokenizer or KMeansTokenizer(vocab_size, patch, model.preprocessing.input_size[0]))
        self.tokenizer.to(device).eval().requires_grad_(False)
        self.mask_embedding = MaskEmbedding(model.num_features).to(device)
        self.head = nn.Linear(model.num_features, vocab_size).to(device)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def fit_tokenizer(self, images: Tensor, **kw: Any) -> BEiT:
        self.tokenizer.fit(images, **kw)
        return self

    def modules(self) -> dict[str, nn.Module]:
        return {"mask_embedding": self.mask_embedding, "head": self.head, "tokenizer": self.tokenizer}

    def describe(self) -> str:
        return f"beit (blockwise {self.ratio:g}, {self.head.out_features} k-means tokens)"

    def step(self, model: nn.Module, batch: Any) -> tuple[Tensor, Metrics]:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        targets = self.tokenizer(images)  # (B, N)
        masker = BlockMasker(self.mask_embedding.weight, self.ratio, self.min_patches)
        tokens = model.forward_features(images, mask=masker)[:, self.num_prefix_tokens:]  # (B, N, D)
        logits = self.head(tokens[masker.mask])  # (M, V): masked positions only
        loss = F.cross_entropy(logits.float(), targets[masker.mask])
        acc = (logits.argmax(-1) == targets[masker.mask]).float().mean()
        return loss, {"mlm_acc": acc.detach()}
