"""Optimisers with the usual parameter grouping: no weight decay on norms, biases, position embeddings
and prefix tokens, and optional layer-wise learning-rate decay for fine-tuning.

Layer-wise decay numbers the embeddings 0 and the blocks 1..L (L: ``num_layers_for_decay``); a parameter
of layer i gets ``layer_decay ** (L + 1 - i)``. Everything after the blocks (final norm, head) is layer
L + 1, scale 1.0, as in MAE's and BEiT's ``param_groups_lrd``. Class-attention blocks follow timm (the
models' ``decay_layer_id``): XCiT's get layers of their own after the trunk, CaiT's share the last trunk
blocks' layers.

Where the groups differ from timm's (``param_groups_weight_decay`` / ``param_groups_layer_decay`` with the
model's ``no_weight_decay()``):

* the final norm: layer L + 1 (scale 1.0); timm's group_matchers merge it into the last block (scale
  ``layer_decay``).
* XCiT's attention temperatures (``blocks.i.attn.temperature``, shape (heads, 1, 1)): no weight decay, as the
  official XCA module declares in its own ``no_weight_decay()``; timm decays them (as, in effect, does the
  official ``main.py``: timm 0.4's ``create_optimizer`` reads only the top-level model's list).
* SigLIP's attention-pool query (``attn_pool.latent``): no weight decay, as in big_vision; timm decays it.

Where they differ from the official pre-training code: MAE's ``main_pretrain.py`` groups with timm 0.3's
``add_weight_decay`` without a skip list, so it decays the class token and the decoder's mask token, which
vitlab (the model's ``no_weight_decay()``, the decoder's ``mask_token``) does not; official DINO decays the class
token and position table likewise. Kept: changing it would make the optimiser state of runs started before
unreadable by ``--resume``.

Settings of the optimiser not chosen (momentum under AdamW, betas under SGD: ``OPTIMIZER_SETTINGS``) changed
from their defaults have no effect; :func:`build_optimizer` warns about them.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from torch import nn

from vitlab.train.recipe import OPTIMIZER_SETTINGS, Recipe, unused_optimizer_settings

log = logging.getLogger(__name__)

# Parameters before the first block (patch embedding, prefix tokens, position table) share layer 0; the
# convolutional / unfolding stems of T2T-ViT (tokens_to_token) and CCT (tokenizer) are patch embeddings too, and
# CLIP's norm on the embedded tokens (norm_pre) belongs to them, as in timm's group_matcher. SigLIP's attention
# pool (attn_pool) comes after the blocks: layer L + 1, with the head.
# A family whose stem has other names, or with blocks outside ``blocks``, numbers its own layers
# (``decay_layer_id``: TNT, Swin, BEiT, CaiT, XCiT).
_EMBED_PREFIXES = ("patch_embed", "cls_token", "dist_token", "reg_token", "pos_embed", "pos_drop",
                   "tokens_to_token", "tokenizer", "norm_pre.")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def _skip_decay(name: str, param: nn.Parameter, skip: set[str]) -> bool:
    # ndim <= 1: biases, norm scales and shifts, LayerScale gammas; ``skip``: the model's own list
    # (position embeddings, class/distillation tokens), matched as a name or a module prefix.
    return param.ndim <= 1 or name in skip or any(name.startswith(s + ".") for s in skip)


def num_layers_for_decay(model: nn.Module) -> int:
    """Blocks counted by layer-wise decay: the model's own count (``num_decay_layers()``, e.g. Swin's blocks
    over all stages) or the length of its ``blocks`` sequence."""
    own = getattr(model, "num_decay_layers", None)
    if own is not None:
        return int(own())
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(
            f"layer_decay: {getattr(model, 'model_name', type(model).__name__)} has no `blocks` sequence; "
            f"layer-wise learning-rate decay needs a transformer with blocks (set layer_decay to none)"
        )
    return len(blocks)


def layer_id(name: str, num_layers: int) -> int:
    """ViT layer of a parameter: embeddings -> 0, ``blocks.i`` -> i + 1, everything after -> L + 1 (the
    final norm too: timm would put it in layer L, with the last block)."""
    if name.startswith(_EMBED_PREFIXES):
        return 0
    m = _BLOCK.match(name)
    if m:
        return int(m.group(1)) + 1
    return num_layers + 1


def param_groups(model: nn.Module, *, weight_decay: float, layer_decay: float | None = None) -> list[dict[str, Any]]:
    """Parameter groups with ``weight_decay`` and an ``lr_scale`` each (1.0 without layer decay)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    num_layers = num_layers_for_decay(model) if layer_decay is not None else 0
    prefix_scales: dict[str, float] = model.lr_scales() if hasattr(model, "lr_scales") else {}
    groups: dict[tuple[int, bool, float], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = _skip_decay(name, p, skip)
        lid = 0
        if layer_decay is not None:  # a hierarchical model (Swin) numbers its own parameters' layers
            lid = model.decay_layer_id(name) if hasattr(model, "decay_layer_id") else layer_id(name, num_layers)
        # a model's own multipliers by name prefix (e.g. DETR's backbone at 0.1, SETR's heads at 10)
        extra = next((s for prefix, s in prefix_scales.items() if name.startswith(prefix)), 1.0)
        key = (lid, no_decay, extra)
        if key not in groups:
            scale = layer_decay ** (num_layers + 1 - lid) if layer_decay is not None else 1.0
            groups[key] = {"params": [], "names": [], "weight_decay": 0.0 if no_decay else weight_decay,
                           "lr_scale": scale * extra, "layer_id": lid}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def owned_param_groups(modules: dict[str, nn.Module], *, weight_decay: float) -> list[dict[str, Any]]:
    """Groups for an objective's own modules (heads, decoders): no decay on 1-D parameters and on the
    names a module lists in ``no_weight_decay()``; the full learning rate (they sit above every block)."""
    decay: dict[str, Any] = {"params": [], "names": [], "weight_decay": weight_decay, "lr_scale": 1.0}
    plain: dict[str, Any] = {"params": [], "names": [], "weight_decay": 0.0, "lr_scale": 1.0}
    for prefix, module in modules.items():
        skip = set(module.no_weight_decay()) if hasattr(module, "no_weight_decay") else set()
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            g = plain if _skip_decay(name, p, skip) else decay
            g["params"].append(p)
            g["names"].append(f"{prefix}.{name}")
    return [g for g in (plain, decay) if g["params"]]


def build_optimizer(model: nn.Module, recipe: Recipe, *, lr: float, extra: dict[str, nn.Module] | None = None,
                    quiet: bool = False) -> torch.optim.Optimizer:
    """The recipe's optimiser over ``param_groups``; each group's lr is ``lr * lr_scale``.

    ``extra``: modules an objective trains besides the model (heads, decoders), in groups of their own. Settings of
    another optimiser changed from their defaults are warned about (``quiet``: not, for a probe of the run's steps).
    """
    unused = unused_optimizer_settings(recipe)
    if unused and not quiet:
        said = ", ".join(f"{k}={getattr(recipe, k)!r} (used by {' / '.join(OPTIMIZER_SETTINGS[k])})" for k in unused)
        log.warning("recipe %s: optimizer %s does not use %s; %s no effect on this run (choose the optimizer that "
                    "uses %s with --set optimizer=..., or leave %s at the default)", recipe.name, recipe.optimizer,
                    said, "it has" if len(unused) == 1 else "they have", "it" if len(unused) == 1 else "them",
                    "it" if len(unused) == 1 else "them")
    groups = param_groups(model, weight_decay=recipe.weight_decay, layer_decay=recipe.layer_decay)
    if extra:
        groups += owned_param_groups(extra, weight_decay=recipe.weight_decay)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    if recipe.optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=lr, betas=recipe.betas, eps=recipe.eps)
    elif recipe.optimizer == "adam":
        # torch's Adam adds weight decay to the gradient (L2); choose adamw for decoupled decay
        opt = torch.optim.Adam(groups, lr=lr, betas=recipe.betas, eps=recipe.eps)
    elif recipe.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=recipe.momentum, nesterov=recipe.nesterov)
    else:  # pragma: no cover - Recipe validates the name
        raise ValueError(f"unknown optimizer {recipe.optimizer!r}")
    n_decay = sum(len(g["params"]) for g in groups if g["weight_decay"] > 0)
    n_all = sum(len(g["params"]) for g in groups)
    log.debug("%s: %d parameter tensors, %d with weight decay, %d groups", recipe.optimizer, n_all, n_decay, len(groups))
    return opt
