"""A published BEiT masked-image-modelling checkpoint as (backbone, mask token, lm head).

BEiT's pre-training model (Bao et al. 2021, arXiv:2106.08254, section 2.3) is the backbone with a
learned mask embedding that replaces the embeddings of masked patches before the class token and
position information are added, and a linear "lm head" over the visual-token vocabulary read from the
final-norm outputs. Checkpoints come as Hugging Face ``BeitForMaskedImageModeling`` folders
(``beit.embeddings.mask_token``, ``lm_head``, the model's ``layernorm``) or unilm / timm-named files
(``mask_token``, ``lm_head``, ``norm``). The backbone loads through ``vitlab.create_model`` (its converter
leaves the head out); :func:`load_beit_mim` also returns the head, and :func:`mim_logits` computes the
token logits, which equal transformers' ``BeitForMaskedImageModeling(...).logits``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from vitlab.checkpoints.io import CheckpointError, read_pickle, read_safetensors, unwrap_state_dict
from vitlab.checkpoints.load import HF_WEIGHT_FILES, resolve
from vitlab.checkpoints.vitlab_format import read_vitlab


@dataclass
class BeitMim:
    """Args:
    backbone: the BEiT model (``num_classes=0``), on the common surface.
    mask_token: (D,) the learned mask embedding.
    lm_head: tokens (..., D) -> logits (..., V): an extra norm (only where the checkpoint has one besides the
        backbone's final norm, else Identity) and the Linear.
    """

    backbone: nn.Module
    mask_token: nn.Parameter
    lm_head: nn.Sequential


def split_mim_head(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """The MIM-head tensors of a state dict in either layout: ``mask_token`` (D,), ``fc.weight`` / ``fc.bias``
    and, for a Hugging Face model whose backbone has its own final norm, ``norm.weight`` / ``norm.bias``."""
    out: dict[str, Tensor] = {}
    hf = any(k.startswith("beit.") for k in sd)
    mask = sd.get("beit.embeddings.mask_token" if hf else "mask_token")
    if mask is None or "lm_head.weight" not in sd:
        raise ValueError("no mask token and lm_head: not a BEiT masked-image-modelling checkpoint "
                         "(BeitForMaskedImageModeling, or a BEiT pre-training file)")
    out["mask_token"] = mask.reshape(-1)
    out["fc.weight"] = sd["lm_head.weight"]
    if "lm_head.bias" in sd:
        out["fc.bias"] = sd["lm_head.bias"]
    if hf and "beit.layernorm.weight" in sd and "layernorm.weight" in sd:  # two norms: the second is the head's
        out["norm.weight"], out["norm.bias"] = sd["layernorm.weight"], sd["layernorm.bias"]
    return out


def _read_tensors(path: str | os.PathLike) -> dict[str, Tensor]:
    p = resolve(path)
    if p.is_dir():
        weights = next((p / f for f in HF_WEIGHT_FILES if (p / f).exists()), None)
        if weights is None:
            raise CheckpointError(f"{p}: folder has none of {', '.join(HF_WEIGHT_FILES)}")
        p = weights
    if p.name.endswith(".safetensors"):
        got = read_vitlab(p)
        if got is not None:
            raise CheckpointError(f"{p}: a vitlab checkpoint holds a backbone only, no BEiT MIM head")
        return read_safetensors(p)[0]
    return unwrap_state_dict(read_pickle(p), p)


def load_beit_mim(path: str | os.PathLike, *, model: str = "beit_base_patch16_224", **overrides: Any) -> BeitMim:
    """Backbone, mask token and lm head of a BEiT MIM checkpoint (a HF folder or a unilm / timm-named file).

    ``model`` names the registered variant to build (the file fixes widths, depth and tables); ``overrides``
    go to ``vitlab.create_model`` (e.g. ``img_size``).
    """
    import vitlab

    parts = split_mim_head(_read_tensors(path))
    backbone = vitlab.create_model(model, pretrained=path, num_classes=0, **overrides)
    vocab, dim = parts["fc.weight"].shape
    if dim != backbone.num_features or parts["mask_token"].numel() != dim:
        raise CheckpointError(f"{path}: lm_head is ({vocab}, {dim}) and the mask token has "
                              f"{parts['mask_token'].numel()} values; the backbone's width is {backbone.num_features}")
    norm = nn.Identity()
    if "norm.weight" in parts:
        norm = nn.LayerNorm(dim, eps=backbone.cfg.norm_eps)
        norm.load_state_dict({"weight": parts["norm.weight"], "bias": parts["norm.bias"]})
    fc = nn.Linear(dim, vocab, bias="fc.bias" in parts)
    fc.load_state_dict({k[len("fc."):]: v for k, v in parts.items() if k.startswith("fc.")})
    return BeitMim(backbone=backbone, mask_token=nn.Parameter(parts["mask_token"].clone()),
                   lm_head=nn.Sequential(norm, fc))


class FixedMask:
    """A :class:`~vitlab.layers.token_mask.TokenMasker` that replaces the embeddings at ``bool_masked_pos``
    (B, N) by ``mask_token`` (D,): BEiT's ``x * (1 - w) + mask_token * w``."""

    def __init__(self, mask_token: Tensor, bool_masked_pos: Tensor) -> None:
        self.mask_token, self.mask = mask_token, bool_masked_pos

    def __call__(self, tokens: Tensor, grid: tuple[int, int]) -> tuple[Tensor, None]:
        if self.mask.shape != tokens.shape[:2]:
            raise ValueError(f"bool_masked_pos has shape {tuple(self.mask.shape)}; the images give "
                             f"{tuple(tokens.shape[:2])} (batch, patches) on a {grid[0]}x{grid[1]} grid")
        w = self.mask.to(tokens.device, tokens.dtype).unsqueeze(-1)  # (B, N, 1)
        return tokens * (1 - w) + self.mask_token.to(tokens.dtype) * w, None


def mim_logits(mim: BeitMim, images: Tensor, bool_masked_pos: Tensor | None = None) -> Tensor:
    """Visual-token logits (B, N, V) for every patch, with the patches at ``bool_masked_pos`` (B, N) masked
    (None: none); ``logits[bool_masked_pos]`` are the masked positions the BEiT loss reads."""
    mask = FixedMask(mim.mask_token, bool_masked_pos) if bool_masked_pos is not None else None
    tokens = mim.backbone.forward_features(images, mask=mask)  # (B, 1 + N, D)
    return mim.lm_head(tokens[:, mim.backbone.num_prefix_tokens:])

