"""Self-supervised pre-training objectives over any backbone with the common surface.

One file per objective; each is a :class:`vitlab.train.objective.Objective` that owns its heads, masks,
teachers and loss and reaches the backbone only through ``forward_features`` / ``forward_head`` and the
token-masking hook of :mod:`vitlab.layers.token_mask`:

* :mod:`~vitlab.ssl.mpp`: the ViT paper's masked patch prediction (3-bit mean colours);
* :mod:`~vitlab.ssl.mae`: masked autoencoders (He et al. 2021);
* :mod:`~vitlab.ssl.dino`: self-distillation with no labels (Caron et al. 2021);
* :mod:`~vitlab.ssl.beit`: BEiT-style masked image modelling (blockwise masks, k-means visual tokens);
* :mod:`~vitlab.ssl.masking`: the mask generators (MAE's random masking by sorted noise, BEiT's blockwise).
"""

from vitlab.ssl.beit import BEiT, KMeansTokenizer
from vitlab.ssl.dino import DINO, DINOHead, DINOLoss
from vitlab.ssl.mae import MAE, MAEDecoder
from vitlab.ssl.masking import BlockMasking, RandomMasking, patch_grid, patchify
from vitlab.ssl.mpp import MaskedPatchPrediction

METHODS = ("mpp", "mae", "dino", "beit")

__all__ = [
    "BEiT", "DINO", "DINOHead", "KMeansTokenizer", "DINOLoss", "MAE", "MAEDecoder", "METHODS", "BlockMasking", "MaskedPatchPrediction",
    "RandomMasking", "patch_grid", "patchify",
]
