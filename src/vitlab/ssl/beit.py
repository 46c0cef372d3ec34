"""BEiT-style masked image modelling (Bao et al. 2021, arXiv:2106.08254) over any backbone with the
token-masking hook, with a tokenizer vitlab can build itself.

75 of 196 patches (38%; unilm's ``num_mask_patches``) are masked in blocks (:class:`~vitlab.ssl.masking.BlockMasking`: rectangles
of at least 16 patches on a 14 x 14 grid, aspect ratio 0.3-3.3); their patch embeddings are replaced
by a learned mask embedding before position embeddings are added, and the model predicts each masked
patch's visual token from its output token (cross entropy on masked positions only, accuracy logged).

Tokenizers (:mod:`vitlab.ssl.tokenizer`): BEiT's is the DALL-E discrete VAE (8192 tokens), an external
download that executes code when unpickled. vitlab's are (a) a k-means codebook over per-patch-normalised
pixels (:class:`KMeansTokenizer`, fitted on a sample of the training images before training: the
default, a CPU-scale stand-in that is not in the official code), (b) a discrete VAE trained by
``vitlab pretrain --method dvae`` (:mod:`vitlab.ssl.dvae`, the DALL-E kind, one token per patch) and
(c) BEiT v2's VQ-KD tokenizer (:mod:`vitlab.ssl.vqkd`), given with ``--tokenizer RUN_OR_FILE``.

:class:`BEiT2` adds BEiT v2's patch-aggregation loss (``vitlab pretrain --method beit2``).

Deviations, stated: the backbone is whatever model is trained (a vitlab ViT), not necessarily BEiT's own
family with a shared relative position bias and LayerScale. unilm masks 75 patches whatever the grid;
vitlab scales the count and the minimum block with the grid (``round(75 N / 196)`` and 16 N / 196, at
least 2) unless ``ratio`` / ``min_patches`` are given.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitlab.layers import Block, trunc_normal_linears
from vitlab.ssl.masking import BlockMasking, patch_grid, patchify
from vitlab.ssl.mpp import MaskEmbedding
from vitlab.ssl.tokenizer import Tokenizer, check_channels, check_grid, load_tokenizer, to_pixels
from vitlab.train.objective import Metrics, Objective, StepBatches


def _normalise_patches(p: Tensor, eps: float = 1e-6) -> Tensor:
    return (p - p.mean(-1, keepdim=True)) / (p.var(-1, keepdim=True) + eps).sqrt()


class KMeansTokenizer(nn.Module):
    """Visual tokens from a k-means codebook (V, P) over per-patch-normalised pixels; frozen.

    A :class:`~vitlab.ssl.tokenizer.Tokenizer` (``kind="kmeans"``): ``tokenize`` takes [0, 1] pixels; ``fit``
    and ``forward`` take any images in the same representation as each other (per-patch normalisation
    removes a level and a scale common to all channels).
    """

    kind = "kmeans"

    def __init__(self, vocab_size: int, patch: tuple[int, int], channels: int) -> None:
        super().__init__()
        self.patch = tuple(patch)
        self.channels = channels
        self.register_buffer("codebook", torch.zeros(vocab_size, patch[0] * patch[1] * channels))

    @property
    def vocab_size(self) -> int:
        return self.codebook.shape[0]

    def config(self) -> dict[str, Any]:
        return {"vocab_size": self.vocab_size, "patch": list(self.patch), "channels": self.channels}

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> KMeansTokenizer:
        return cls(int(cfg["vocab_size"]), tuple(cfg["patch"]), int(cfg["channels"]))

    def token_grid(self, size: tuple[int, int]) -> tuple[int, int]:
        return size[0] // self.patch[0], size[1] // self.patch[1]

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

    def tokenize(self, pixels: Tensor) -> Tensor:
        """[0, 1] pixels (B, C, H, W) -> token ids (B, rows, cols)."""
        return self(pixels).view(pixels.shape[0], *self.token_grid(tuple(pixels.shape[-2:])))


BEIT_MASKED = (75, 196)  # unilm run_beit_pretraining.py: num_mask_patches 75 on the 14 x 14 grid of 224 / 16


def num_masked(num_patches: int, ratio: float | None = None) -> int:
    """Patches BEiT masks on a grid of ``num_patches``: ``round(ratio * N)``, or without ``ratio`` unilm's 75 of
    196 scaled to the grid (``round(75 * N / 196)``); at least one."""
    share = ratio if ratio is not None else BEIT_MASKED[0] / BEIT_MASKED[1]
    return max(1, round(share * num_patches))


class BlockMasker:
    """BEiT's masking as a :class:`~vitlab.layers.token_mask.TokenMasker`: a block mask per sample,
    masked embeddings replaced by the mask embedding; ``mask`` (B, N) bool after a call. ``planned``: masks
    drawn beforehand (:meth:`draw`), used when their shape fits the tokens."""

    def __init__(self, mask_embedding: Tensor, ratio: float | None = None, min_patches: int | None = None,
                 planned: Tensor | None = None) -> None:
        self.mask_embedding, self.ratio, self.min_patches = mask_embedding, ratio, min_patches
        self.planned = planned
        self.used_planned = False

    def draw(self, batch: int, grid: tuple[int, int]) -> Tensor:
        """Block masks (batch, rows * cols) bool, from torch's global generator."""
        N = grid[0] * grid[1]
        num = num_masked(N, self.ratio)
        min_patches = self.min_patches or max(2, round(16 * N / 196))
        gen = BlockMasking(grid, num, min_patches=min(min_patches, num))
        return torch.stack([gen().flatten() for _ in range(batch)])

    def __call__(self, tokens: Tensor, grid: tuple[int, int]) -> tuple[Tensor, None]:
        B, N, D = tokens.shape
        planned = self.planned is not None and tuple(self.planned.shape) == (B, N)
        self.used_planned = planned
        self.mask = (self.planned if planned else self.draw(B, grid)).to(tokens.device)  # (B, N)
        w = self.mask.unsqueeze(-1).to(tokens.dtype)
        return tokens * (1 - w) + self.mask_embedding.to(tokens.dtype) * w, None


class BEiT(Objective):
    """Masked image modelling against visual tokens of a frozen ``tokenizer``: a
    :class:`~vitlab.ssl.tokenizer.Tokenizer` module, the path of a tokenizer file or run directory
    (``vitlab pretrain --method dvae|vqkd``), or None for a k-means codebook (``vocab_size`` tokens,
    default 512) fitted by :meth:`fit_tokenizer` before training. The tokenizer sees the backbone's
    input as [0, 1] pixels, must read its number of channels and give one token per patch.

    ``ratio`` is the share of patches masked, in (0, 1): ``round(ratio * N)`` patches, at least one (a ratio
    below ``0.5 / N`` still masks one patch); left out, unilm's 75 of 196 patches, scaled to the grid. Blocks are smaller than the grid in both directions,
    so the patch grid must be at least 2 x 2."""

    name = "beit"

    def __init__(self, model: nn.Module, *, vocab_size: int | None = None, ratio: float | None = None,
                 min_patches: int | None = None, tokenizer: nn.Module | str | None = None) -> None:
        grid, patch = patch_grid(model)
        device = next(model.parameters()).device
        pre = model.preprocessing
        if ratio is not None and (isinstance(ratio, bool) or not 0 < ratio < 1):
            raise ValueError(f"{self.name}: ratio={ratio!r} is the share of patches masked; give a value between 0 "
                             f"and 1 (exclusive; BEiT masks 75 of 196 patches, 0.38), or leave it out")
        if min(grid) < 2:
            who = getattr(model, "model_name", type(model).__name__)
            raise ValueError(f"{self.name}: blockwise masking needs a patch grid of at least 2x2 (its blocks are "
                             f"smaller than the grid), and {who} has a {grid[0]}x{grid[1]} grid at "
                             f"{pre.input_size[1]}x{pre.input_size[2]} px: nothing would ever be masked. Use smaller "
                             f"patches (--set model_overrides.patch_size=N) or larger images (--img-size)")
        if min_patches is not None and (isinstance(min_patches, bool) or min_patches < 1):
            raise ValueError(f"{self.name}: min_patches={min_patches!r} must be at least 1 (or left out)")
        self.mean, self.std = pre.mean, pre.std
        self.ratio, self.min_patches = ratio, min_patches
        self.patch = patch
        self._planned: list[Tensor] = []  # the step's masks, drawn by begin_step, one per micro-batch
        self._normaliser: float | None = None
        self.num_prefix_tokens = model.num_prefix_tokens
        source = None
        if isinstance(tokenizer, (str, os.PathLike)):
            source = tokenizer
            tokenizer = load_tokenizer(tokenizer, device=device)
        if tokenizer is None:
            tokenizer = KMeansTokenizer(vocab_size or 512, patch, pre.input_size[0])
        elif not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"{self.name}: {type(tokenizer).__name__} is not a Tokenizer (tokenize, token_grid, "
                            f"vocab_size, kind, config)")
        elif vocab_size is not None and vocab_size != tokenizer.vocab_size:
            raise ValueError(f"{self.name}: vocab_size={vocab_size} but the {tokenizer.kind} tokenizer has "
                             f"{tokenizer.vocab_size} tokens; leave vocab_size out with a tokenizer")
        check_channels(tokenizer, pre.input_size[0], self.name, source)
        check_grid(tokenizer, tuple(pre.input_size[1:]), grid, self.name)
        self.tokenizer = tokenizer.to(device).eval().requires_grad_(False)
        self.mask_embedding = MaskEmbedding(model.num_features).to(device)
        self.head = nn.Linear(model.num_features, tokenizer.vocab_size).to(device)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def fit_tokenizer(self, images: Tensor, **kw: Any) -> BEiT:
        """Fit the k-means tokenizer on ``images`` (normalised as the backbone's input)."""
        if not isinstance(self.tokenizer, KMeansTokenizer):
            raise TypeError(f"{self.name}: only the k-means tokenizer is fitted here; the {self.tokenizer.kind} "
                            f"tokenizer was trained by its own run")
        self.tokenizer.fit(to_pixels(images.float(), self.mean, self.std), **kw)
        return self

    def modules(self) -> dict[str, nn.Module]:
        return {"mask_embedding": self.mask_embedding, "head": self.head, "tokenizer": self.tokenizer}

    def describe(self) -> str:
        share = f"{self.ratio:g}" if self.ratio is not None else "75/196"
        return f"{self.name} (blockwise {share}, {self.head.out_features} {self.tokenizer.kind} tokens)"

    def targets(self, images: Tensor) -> Tensor:
        """Token ids (B, N) of the backbone's input ``images``."""
        return self.tokenizer.tokenize(to_pixels(images.float(), self.mean, self.std)).flatten(1)

    def masker(self) -> BlockMasker:
        """The masker of the next ``step``: with the masks ``begin_step`` drew for it, if any."""
        return BlockMasker(self.mask_embedding.weight, self.ratio, self.min_patches,
                           planned=self._planned.pop(0) if self._planned else None)

    def begin_step(self, batches: StepBatches) -> None:
        """Draw every micro-batch's masks now (in the order the steps would), so that the masked-token mean is
        over the masked patches of the whole global batch: accumulation and DDP equal one batch."""
        drawer = BlockMasker(self.mask_embedding.weight, self.ratio, self.min_patches)
        planned = []
        for batch in batches.micro_batches:
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            grid = (images.shape[-2] // self.patch[0], images.shape[-1] // self.patch[1])
            planned.append(drawer.draw(images.shape[0], grid))
        self._planned = planned
        (self._normaliser,) = batches.normaliser([float(sum(int(m.sum()) for m in planned))])

    def end_step(self) -> None:
        self._planned, self._normaliser = [], None

    def _masked_ce(self, logits: Tensor, targets: Tensor, masker: BlockMasker) -> Tensor:
        """Cross entropy over the masked tokens: their mean, or under the trainer their sum over the masked
        patches of the step's global batch."""
        if self._normaliser is None or not masker.used_planned:
            return F.cross_entropy(logits.float(), targets)
        return F.cross_entropy(logits.float(), targets, reduction="sum") / self._normaliser

    def step(self, model: nn.Module, batch: Any) -> tuple[Tensor, Metrics]:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        targets = self.targets(images)  # (B, N)
        masker = self.masker()
        tokens = model.forward_features(images, mask=masker)[:, self.num_prefix_tokens:]  # (B, N, D)
        logits = self.head(tokens[masker.mask])  # (M, V): masked positions only
        loss = self._masked_ce(logits, targets[masker.mask], masker)
        acc = (logits.argmax(-1) == targets[masker.mask]).float().mean()
        return loss, {"mlm_acc": acc.detach()}


class PatchAggregation(nn.Module):
    """BEiT v2's shallow head: a few blocks over [prefix tokens of the last layer, patch tokens of an
    earlier layer], then a LayerNorm; its patch outputs go through the shared MIM head."""

    def __init__(self, dim: int, *, depth: int = 2, num_heads: int | None = None, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        heads = num_heads or (dim // 64 if dim % 64 == 0 and dim >= 64 else 1)
        self.blocks = nn.Sequential(*[Block(dim, num_heads=heads, mlp_ratio=mlp_ratio, qkv_bias=True,
                                            norm_layer=norm_layer) for _ in range(depth)])
        self.norm = norm_layer(dim)
        trunc_normal_linears(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.blocks(x))


class BEiT2(BEiT):
    """BEiT v2 masked image modelling (Peng et al. 2022, arXiv:2208.06366, section 2.3): BEiT's blockwise
    masking and masked-token cross entropy against a VQ-KD tokenizer's codes, plus the patch-aggregation
    loss: the last layer's class token(s) joined with the patch tokens of block ``early_layers`` (9 of 12
    for ViT-B, 21 of 24 for ViT-L; default: depth - 3) pass through ``aggregation_depth`` (2) new blocks,
    and the shared MIM head predicts the masked tokens from them too; loss = CE(last layer) + CE(aggregated).
    The aggregation head is discarded after pre-training, so the class token must gather the image's
    information to serve it.

    The backbone needs a class token and ``forward_intermediates(..., mask=...)`` (the masking hook of
    :mod:`vitlab.layers.token_mask` on the intermediate-feature path).
    """

    name = "beit2"

    def __init__(self, model: nn.Module, *, tokenizer: nn.Module | str, vocab_size: int | None = None,
                 ratio: float | None = None, min_patches: int | None = None, early_layers: int | None = None,
                 aggregation_depth: int = 2, aggregation_heads: int | None = None) -> None:
        if tokenizer is None:
            raise ValueError("beit2: give a tokenizer (--tokenizer RUN_OR_FILE of a `vitlab pretrain --method vqkd` "
                             "run)")
        if model.num_prefix_tokens < 1:
            raise ValueError("beit2: the patch aggregation reads the class token; this backbone has none")
        super().__init__(model, vocab_size=vocab_size, ratio=ratio, min_patches=min_patches, tokenizer=tokenizer)
        depth = self._depth(model)
        self.early_layers = early_layers if early_layers is not None else max(1, depth - 3)
        if not 1 <= self.early_layers <= depth:
            raise ValueError(f"beit2: early_layers must lie in 1..{depth} (the backbone's blocks), got {early_layers}")
        device = next(model.parameters()).device
        self.aggregation = PatchAggregation(model.num_features, depth=aggregation_depth,
                                            num_heads=aggregation_heads).to(device)

    @staticmethod
    @torch.no_grad()
    def _depth(model: nn.Module) -> int:
        c, h, w = model.preprocessing.input_size
        x = torch.zeros(1, c, h, w, device=next(model.parameters()).device)
        was = model.training
        model.eval()
        try:
            _, inter = model.forward_intermediates(x, None, mask=lambda t, g: (t, None))
        except TypeError as e:
            raise TypeError(f"beit2: {getattr(model, 'model_name', type(model).__name__)} has no masking hook on "
                            f"forward_intermediates(x, indices, mask=...); the patch aggregation needs it") from e
        finally:
            model.train(was)
        return len(inter)

    def modules(self) -> dict[str, nn.Module]:
        return {**super().modules(), "aggregation": self.aggregation}

    def describe(self) -> str:
        return super().describe() + f", patch aggregation from block {self.early_layers}"

    def step(self, model: nn.Module, batch: Any) -> tuple[Tensor, Metrics]:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        targets = self.targets(images)  # (B, N)
        masker = self.masker()
        p = self.num_prefix_tokens
        final, inter = model.forward_intermediates(images, [self.early_layers - 1], mask=masker,
                                                   return_prefix_tokens=True)
        early_patches = inter[0][0]  # (B, N, D): patch tokens after block early_layers, before the final norm
        agg = self.aggregation(torch.cat([final[:, :p], early_patches], dim=1))[:, p:]  # (B, N, D)
        m = masker.mask
        t = targets[m]
        logits = self.head(final[:, p:][m])  # (M, V): masked positions only
        logits_agg = self.head(agg[m])
        loss_mim = self._masked_ce(logits, t, masker)
        loss_agg = self._masked_ce(logits_agg, t, masker)
        acc = (logits.argmax(-1) == t).float().mean()
        acc_agg = (logits_agg.argmax(-1) == t).float().mean()
        return loss_mim + loss_agg, {"mlm_acc": acc.detach(), "agg_acc": acc_agg.detach(),
                                     "loss_mim": loss_mim.detach(), "loss_agg": loss_agg.detach()}
