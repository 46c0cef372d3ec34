"""Self-supervised pre-training objectives over any backbone with the common surface.

One file per objective; each is a :class:`vitlab.train.objective.Objective` that owns its heads, masks,
teachers and loss and reaches the backbone only through ``forward_features`` / ``forward_head`` and the
token-masking hook of :mod:`vitlab.layers.token_mask`:

* :mod:`~vitlab.ssl.mpp`: the ViT paper's masked patch prediction (3-bit mean colours);
* :mod:`~vitlab.ssl.mae`: masked autoencoders (He et al. 2021);
* :mod:`~vitlab.ssl.dino`: self-distillation with no labels (Caron et al. 2021);
* :mod:`~vitlab.ssl.beit`: BEiT masked image modelling (blockwise masks, visual tokens) and BEiT v2's
  patch aggregation;
* :mod:`~vitlab.ssl.tokenizer`: the visual-tokenizer protocol and file format; the tokenizers are a
  k-means codebook (:mod:`~vitlab.ssl.beit`), a discrete VAE (:mod:`~vitlab.ssl.dvae`) and BEiT v2's
  vector-quantised knowledge distillation (:mod:`~vitlab.ssl.vqkd`);
* :mod:`~vitlab.ssl.masking`: the mask generators (MAE's random masking by sorted noise, BEiT's blockwise).
"""

from vitlab.ssl.beit import BEiT, BEiT2, KMeansTokenizer
from vitlab.ssl.dino import DINO, DINOHead, DINOLoss
from vitlab.ssl.dvae import DiscreteVAE, DVAEObjective, DVAETokenizer
from vitlab.ssl.mae import MAE, MAEDecoder
from vitlab.ssl.masking import BlockMasking, RandomMasking, patch_grid, patchify
from vitlab.ssl.mpp import MaskedPatchPrediction
from vitlab.ssl.tokenizer import Tokenizer, load_tokenizer, save_tokenizer
from vitlab.ssl.vqkd import VQKD, NormEMAQuantizer, VQKDTokenizer

METHODS = ("mpp", "mae", "dino", "beit", "beit2", "dvae", "vqkd")

__all__ = [
    "BEiT", "BEiT2", "DINO", "DINOHead", "DINOLoss", "DVAEObjective", "DVAETokenizer", "DiscreteVAE",
    "KMeansTokenizer", "MAE", "MAEDecoder", "METHODS", "BlockMasking", "MaskedPatchPrediction", "NormEMAQuantizer",
    "RandomMasking", "Tokenizer", "VQKD", "VQKDTokenizer", "load_tokenizer", "patch_grid", "patchify",
    "save_tokenizer",
]
