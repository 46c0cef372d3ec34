"""Parameter-efficient fine-tuning: which parameters of a model train, from the recipe's fields.

* ``freeze=backbone``: linear probing, the head alone trains (DeiT's ``head_dist`` too).
* ``freeze=embed`` / ``freeze_blocks=N``: partial fine-tuning, the patch embedding (with the prefix tokens and
  the position table) and the first N blocks frozen. Blocks are counted as layer-wise learning-rate decay counts
  them (:mod:`vitlab.train.optim`: the model's ``decay_layer_id``, else ``blocks.i``), so Swin's blocks run
  through its stages and CaiT's class-attention blocks share the last trunk blocks' layers.
* ``train_norms`` / ``train_biases``: the norm layers' parameters / the biases of the frozen parts train all the
  same (``freeze=backbone`` with ``train_biases``: BitFit, Ben Zaken et al. 2021).
* ``lora_rank > 0``: LoRA (Hu et al. 2021, arXiv:2106.09685; :class:`~vitlab.layers.lora.LoRALinear`) on the
  ``lora_targets`` Linear layers: "qkv" (an attention module's input projections: ``qkv``, or ``q`` / ``k`` /
  ``v`` / ``kv`` of class attention and attention pools), "proj" (its output projection), "mlp" (``fc1`` and
  ``fc2`` of the MLPs, Mixer's token and channel MLPs too). Every pretrained weight is frozen; the adapters and the
  head train. A model without such layers (ResNet; MobileViT v2 / v3, whose attention is convolutions) is
  refused by name rather than trained with nothing adapted.

Frozen parameters have ``requires_grad`` off: no gradient, no optimiser state (``param_groups`` skips them). A
module all of whose parameters are frozen computes a fixed function, so it runs in eval mode while the rest trains
(:func:`eval_frozen_modules`): no dropout or drop-path inside it, and its BatchNorm layers (the hybrid ResNet stem,
CCT's and MobileViT's convolutions) normalise with their running statistics and do not update them, as timm's
``freeze_batch_norm_2d`` makes them do; the layers stay ``BatchNorm2d``, so the checkpoint's layout is the plain
model's. Modules that hold trainable parameters (a block with adapters, the head) keep the training mode.

What crosses commands is a plain model: ``model.safetensors`` (and the EMA, best and EMA-best files) holds the
merged weights ``W + (alpha / r) B A`` under the plain keys (:func:`plain_state_dict`), which eval, predict,
explain, export and timm load as they are; ``train_state.pt`` keeps the adapters, for an exact --resume. ``fit``
prepares the model it is given (:func:`prepare`) and gives it back merged (:func:`restore`).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vitlab.layers.lora import LoRALinear, merged_weight
from vitlab.train.recipe import Recipe, lora_target_kinds, plain

log = logging.getLogger(__name__)

PEFT_FIELDS = ("freeze", "freeze_blocks", "train_norms", "train_biases", "lora_rank", "lora_alpha", "lora_dropout",
               "lora_targets")
# the fields that decide which parameters exist and train: the saved weights and optimiser state follow them, so
# --resume refuses another value (lora_dropout only regularises: a change is recorded as any other setting's)
STRUCTURE_FIELDS = tuple(k for k in PEFT_FIELDS if k != "lora_dropout")
# objectives whose model is a classifier with a head to keep training (pre-training and dense tasks train it whole)
PEFT_OBJECTIVES = ("classification", "distillation")
# child names of an attention module (one named attn*) that LoRA's "qkv" adapts, and of an MLP (mlp*) for "mlp"
_ATTN_INPUTS = frozenset({"qkv", "q", "k", "v", "kv", "q_proj", "k_proj", "v_proj"})
_MLP_LAYERS = frozenset({"fc1", "fc2"})


@dataclasses.dataclass(frozen=True)
class PeftSettings:
    """The recipe's PEFT_FIELDS, as a prepared model records them (their defaults: :meth:`default`, the recipe's)."""

    freeze: str
    freeze_blocks: int
    train_norms: bool
    train_biases: bool
    lora_rank: int
    lora_alpha: float | None
    lora_dropout: float
    lora_targets: str

    @classmethod
    def of(cls, recipe: Recipe) -> PeftSettings:
        return cls(**{k: getattr(recipe, k) for k in PEFT_FIELDS})

    @classmethod
    def default(cls) -> PeftSettings:
        return cls.of(Recipe())

    @property
    def active(self) -> bool:
        return self.freeze != "none" or self.freeze_blocks > 0 or self.lora_rank > 0

    @property
    def alpha(self) -> float:
        return float(self.lora_alpha if self.lora_alpha is not None else self.lora_rank)

    def describe(self) -> str:
        """E.g. "LoRA rank 8 (alpha 16) on qkv, proj", "linear probe", "embedding and 4 blocks frozen"."""
        if self.lora_rank:
            what = (f"LoRA rank {self.lora_rank} (alpha {self.alpha:g}"
                    f"{f', dropout {self.lora_dropout:g}' if self.lora_dropout else ''}) on "
                    f"{', '.join(lora_target_kinds(self.lora_targets))}")
        elif self.freeze == "backbone":
            what = "linear probe (the backbone frozen)"
        elif self.freeze_blocks:
            what = f"the embedding and the first {self.freeze_blocks} block(s) frozen"
        elif self.freeze == "embed":
            what = "the embedding frozen"
        else:
            return "full fine-tuning"
        extra = [w for w, on in (("norms", self.train_norms), ("biases", self.train_biases)) if on]
        return what + (f"; {' and '.join(extra)} of the frozen parts train" if extra else "")


def prepare(model: nn.Module, recipe: Recipe, *, seed: int | None = None) -> dict[str, Any]:
    """Freeze ``model``'s parameters and add LoRA adapters (in place) as ``recipe`` asks; returns
    :func:`parameter_counts`. A model prepared already with the same settings is left as it is (the command
    prepares it before timing a --time-budget and writing job.json; fit then finds it ready); other settings are
    refused. ``seed``: the adapters' draw (default ``recipe.seed``), from a generator of their own."""
    settings = PeftSettings.of(recipe)
    done = getattr(model, "_peft_settings", None)
    if done is not None:
        if done != settings:
            raise ValueError(f"the model was prepared for {done.describe()}, the recipe asks for "
                             f"{settings.describe()}: give fit the model as built (vitlab.create_model)")
        return parameter_counts(model)
    _warn_unused(settings)
    if not settings.active:
        return parameter_counts(model)
    name = getattr(model, "model_name", type(model).__name__)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    frozen = _frozen_names(model, settings, name)
    kept = _kept_trainable(model, frozen, settings)
    for n, p in model.named_parameters():
        if n in frozen and n not in kept:
            p.requires_grad_(False)
    adapted: list[str] = []
    if settings.lora_rank:
        g = torch.Generator().manual_seed(recipe.seed if seed is None else seed)
        adapted = _add_lora(model, settings, g, name)
        # the adapted layers' own biases are their base's now, frozen by LoRALinear: kept ones train again
        renamed = {f"{q}.base.{leaf}" for q in adapted for leaf in ("weight", "bias") if f"{q}.{leaf}" in kept}
        for n, p in model.named_parameters():
            if n in renamed:
                p.requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"{settings.describe()}: nothing of {name} would train (it has no head: num_classes=0?)")
    model._peft_settings = settings
    model._peft_requires_grad = flags  # put back by restore
    counts = parameter_counts(model)
    log.info("%s: %s: %s of %s parameters train (%.3g%%)%s", name, settings.describe(),
             f"{counts['trainable_params']:,}", f"{counts['total_params']:,}", 100 * counts["trainable_fraction"],
             f"; {len(adapted)} Linear layers adapted" if adapted else "")
    return counts


def parameter_counts(model: nn.Module) -> dict[str, Any]:
    """The parameters that train and all of them (adapters included), and the fraction."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable_params": trainable, "total_params": total,
            "trainable_fraction": round(trainable / total, 6) if total else 0.0}


def describe(model: nn.Module) -> dict[str, Any] | None:
    """The settings a prepared model trains with (job.json, results.json, checkpoint metadata); None: all of it."""
    settings = getattr(model, "_peft_settings", None)
    if settings is None:
        return None
    default = dataclasses.asdict(PeftSettings.default())
    out = {k: v for k, v in dataclasses.asdict(settings).items() if plain(v) != plain(default[k])}
    if settings.lora_rank:
        out["lora_alpha"] = settings.alpha
        out["lora_targets"] = ",".join(lora_target_kinds(settings.lora_targets))
    return out


def eval_frozen_modules(model: nn.Module) -> list[str]:
    """Put the outermost modules whose parameters are all frozen in eval mode (after ``model.train()``): their
    dropout, drop-path and BatchNorm then act as at inference. Returns their names."""
    out: list[str] = []

    def visit(prefix: str, module: nn.Module) -> None:
        params = list(module.parameters())
        if prefix and params and not any(p.requires_grad for p in params):
            module.eval()
            out.append(prefix)
            return
        for child_name, child in module.named_children():
            visit(f"{prefix}.{child_name}" if prefix else child_name, child)

    if getattr(model, "_peft_settings", None) is not None:
        visit("", model)
    return out


def plain_state_dict(model: nn.Module, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state_dict`` of the prepared ``model`` (or of its EMA copy) with every LoRA layer merged: ``P.weight`` =
    ``W + scaling * B A`` and ``P.bias`` under the plain model's keys, in the plain model's order; the adapters'
    own keys dropped. A model without adapters: ``state_dict`` itself."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    if not layers:
        return state_dict
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        if prefix in layers and leaf in ("lora_a", "lora_b"):
            continue
        owner, _, base = prefix.rpartition(".")
        if base == "base" and owner in layers:
            if leaf == "weight":
                m = layers[owner]
                value = merged_weight(value, state_dict[f"{owner}.lora_a"], state_dict[f"{owner}.lora_b"], m.scaling)
            out[f"{owner}.{leaf}"] = value
            continue
        out[key] = value
    return out


def restore(model: nn.Module) -> None:
    """Undo :func:`prepare` in place: each LoRA layer becomes a plain Linear of its merged weight (the weights
    ``model.safetensors`` holds), every parameter's ``requires_grad`` is put back and every module follows the
    model's own training mode again."""
    settings = getattr(model, "_peft_settings", None)
    if settings is None:
        return
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())
    flags = getattr(model, "_peft_requires_grad", {})
    for n, p in model.named_parameters():
        p.requires_grad_(flags.get(n, True))
    del model._peft_settings, model._peft_requires_grad
    model.train(model.training)


def check_run(recipe: Recipe, objective_name: str) -> None:
    """Freezing and LoRA fine-tune a classifier (its head trains), one process or DDP: other objectives
    (pre-training, detection, segmentation train the whole model) and FSDP are refused."""
    settings = PeftSettings.of(recipe)
    if not settings.active:
        return
    if objective_name not in PEFT_OBJECTIVES:
        raise ValueError(f"{settings.describe()} (recipe freeze / freeze_blocks / lora_rank) fine-tunes a classifier, "
                         f"whose head trains; the {objective_name} objective trains the whole model: leave them at "
                         f"their defaults (freeze=none, freeze_blocks=0, lora_rank=0)")
    if recipe.fsdp:
        raise ValueError(f"{settings.describe()} with --fsdp is not supported (sharding frozen parameters and "
                         f"adapters is untested); train without --fsdp (DDP under torchrun)")


def check_same_peft(state: dict[str, Any], recipe: Recipe, path: Path) -> None:
    """--resume with the run's own trainable parameters: another freeze / LoRA setting (:data:`STRUCTURE_FIELDS`)
    is refused, since the saved weights (adapters) and optimiser state are those of the run's own. A state written
    before these fields existed trained everything."""
    from vitlab.checkpoints import CheckpointError

    saved, default = state.get("recipe", {}), Recipe()
    changed = [k for k in STRUCTURE_FIELDS if plain(saved.get(k, getattr(default, k))) != plain(getattr(recipe, k))]
    if not changed:
        return
    run = path.parent
    was = ", ".join(f"{k}={saved.get(k, getattr(default, k))!r}" for k in changed)
    now = ", ".join(f"{k}={getattr(recipe, k)!r}" for k in changed)
    raise CheckpointError(f"--resume: the run in {run} was trained with {was}; this asks for {now}. Its saved weights "
                          f"and optimiser state are those of the parameters it trained: resume with its own settings, "
                          f"or start a new run from its weights (`vitlab finetune --from {run / 'model.safetensors'} "
                          f"--output NEW --set ...`)")


# ------------------------------------------------------------------------------------------ the adapter file
ADAPTER_FORMAT = "vitlab-adapter"
_ADAPTER_KEY = "vitlab_adapter"  # the safetensors header entry holding the adapter's metadata (JSON)


def save_adapter(model: nn.Module, state_dict: dict[str, Tensor], path: str | Path,
                 extra: dict[str, Any] | None = None) -> Path:
    """Write what a prepared ``model`` trains (the LoRA adapters, the head, norms / biases kept trainable) from its
    ``state_dict``, atomically: a file of kilobytes to megabytes beside the run's full checkpoint, which
    :func:`apply_adapter` puts back onto the model it was trained from."""
    import json

    from safetensors.torch import save_file

    from vitlab.checkpoints.io import atomic_write
    from vitlab.checkpoints.vitlab_format import config_to_dict

    names = {n for n, p in model.named_parameters() if p.requires_grad}
    sd = {k: v.detach().contiguous().cpu() for k, v in state_dict.items() if k in names}
    meta = {"format": ADAPTER_FORMAT, "model": model.model_name, "config": config_to_dict(model.cfg),
            "peft": dataclasses.asdict(model._peft_settings), **(extra or {})}
    return atomic_write(path, lambda tmp: save_file(sd, tmp, metadata={_ADAPTER_KEY: json.dumps(meta)}))


def apply_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Put the adapter file a run wrote (``adapter.safetensors``) onto ``model``, the plain model the run was
    trained from (built with the run's number of classes), and merge it: ``model`` then holds the weights of the
    run's ``model.safetensors`` at the same step. Returns ``model``."""
    from vitlab.checkpoints import CheckpointError
    from vitlab.checkpoints.io import parse_json, read_safetensors

    path = Path(path)
    sd, header = read_safetensors(path)
    meta = parse_json(header[_ADAPTER_KEY]) if _ADAPTER_KEY in header else None
    if not isinstance(meta, dict) or meta.get("format") != ADAPTER_FORMAT or not isinstance(meta.get("peft"), dict):
        raise CheckpointError(f"{path}: not a vitlab adapter file (a run's adapter.safetensors); a full checkpoint "
                              f"loads with vitlab.load_model")
    name = getattr(model, "model_name", type(model).__name__)
    if meta.get("model") != name:
        raise CheckpointError(f"{path}: an adapter of {meta.get('model')}, not of {name}")
    prepare(model, Recipe(**{k: v for k, v in meta["peft"].items() if k in PEFT_FIELDS}))
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    wrong = sorted(k for k in sd if k in params and tuple(sd[k].shape) != tuple(params[k].shape))
    if set(sd) != expected or wrong:
        restore(model)
        said = "; ".join(part for part in (
            f"missing {sorted(expected - set(sd))[:3]}" if expected - set(sd) else "",
            f"unexpected {sorted(set(sd) - expected)[:3]}" if set(sd) - expected else "",
            ", ".join(f"{k}: {tuple(sd[k].shape)} in the file, {tuple(params[k].shape)} in the model"
                      for k in wrong[:3])) if part)
        raise CheckpointError(f"{path} does not fit {name} as built ({said}): build the model the run was trained "
                              f"from, with the run's number of classes")
    with torch.no_grad():
        for k, v in sd.items():
            params[k].copy_(v)
    restore(model)
    return model


# ------------------------------------------------------------------------------------------ which parameters
def _warn_unused(s: PeftSettings) -> None:
    default = PeftSettings.default()
    if not s.lora_rank:
        unused = [k for k in ("lora_alpha", "lora_dropout", "lora_targets") if getattr(s, k) != getattr(default, k)]
        if unused:
            log.warning("%s set without lora_rank: no effect (LoRA is off; --set lora_rank=8 turns it on)",
                        ", ".join(unused))
    if not s.active and (s.train_norms or s.train_biases):
        log.warning("train_norms / train_biases: no effect, nothing is frozen (--set freeze=backbone, freeze_blocks=N "
                    "or lora_rank=R freezes parts of the model)")


def _frozen_names(model: nn.Module, s: PeftSettings, name: str) -> set[str]:
    """Names of the parameters the settings freeze (before any norm / bias is kept trainable)."""
    from vitlab.checkpoints.adapt import classifier_prefixes

    names = [n for n, _ in model.named_parameters()]
    if s.freeze == "backbone" or s.lora_rank:
        heads = set(classifier_prefixes(model))
        return {n for n in names if n.split(".")[0] not in heads}
    what = f"freeze_blocks={s.freeze_blocks}" if s.freeze_blocks else "freeze=embed"
    layers, layer_of = _layer_numbering(model, what, name)
    if s.freeze_blocks > layers:
        raise ValueError(f"{what}: {name} has {layers} blocks; give at most {layers} (freeze=backbone freezes "
                         f"everything but the head)")
    frozen = {n for n in names if layer_of(n) <= s.freeze_blocks}
    if not s.freeze_blocks and not frozen:
        raise ValueError(f"freeze=embed: {name} has no patch embedding before its blocks (nothing named patch_embed, "
                         f"cls_token, pos_embed...); give freeze_blocks=N or freeze=backbone")
    return frozen


def _layer_numbering(model: nn.Module, what: str, name: str):
    """(number of blocks, parameter name -> layer: 0 the embedding, 1..L the blocks), as layer decay numbers them."""
    from vitlab.train.optim import layer_id, num_layers_for_decay

    try:
        layers = num_layers_for_decay(model)
    except ValueError:
        lora = " or lora_rank" if any(_lora_candidates(model).values()) else ""
        raise ValueError(f"{what}: {name} has no sequence of transformer blocks to count (partial fine-tuning "
                         f"freezes the embedding and the first N blocks); give freeze=backbone (linear probe){lora}"
                         ) from None
    own = getattr(model, "decay_layer_id", None)
    return layers, (own if own is not None else (lambda n: layer_id(n, layers)))


def _kept_trainable(model: nn.Module, frozen: set[str], s: PeftSettings) -> set[str]:
    """The frozen parameters that train all the same: norm layers' (train_norms), biases (train_biases)."""
    kept: set[str] = set()
    if s.train_norms:
        for mod_name, module in model.named_modules():
            if "norm" in type(module).__name__.lower():
                kept |= {f"{mod_name}.{n}" if mod_name else n for n, _ in module.named_parameters(recurse=False)}
    if s.train_biases:
        kept |= {n for n in frozen if n.rpartition(".")[2].endswith("bias")}
    return kept & frozen


def _lora_kind(parent: str, child: str) -> str | None:
    """The lora_targets kind of Linear ``child`` of module ``parent`` (qualified name), or None."""
    local = parent.rpartition(".")[2]
    if local.startswith("attn"):
        return "qkv" if child in _ATTN_INPUTS else "proj" if child == "proj" else None
    if local.startswith("mlp") and child in _MLP_LAYERS:
        return "mlp"
    return None


def _lora_candidates(model: nn.Module) -> dict[str, list[str]]:
    """The Linear layers LoRA can adapt, by kind ("qkv", "proj", "mlp" -> qualified names), the head left out."""
    from vitlab.checkpoints.adapt import classifier_prefixes

    heads = set(classifier_prefixes(model))
    found: dict[str, list[str]] = {k: [] for k in ("qkv", "proj", "mlp")}
    for parent_name, parent in model.named_modules():
        if parent_name.split(".")[0] in heads:
            continue
        for child_name, child in parent.named_children():
            kind = _lora_kind(parent_name, child_name)
            if kind is not None and type(child) is nn.Linear:
                found[kind].append(f"{parent_name}.{child_name}")
    return found


def _countable(model: nn.Module) -> bool:
    """Whether ``model`` has blocks that freeze_blocks can count (as layer decay numbers them)."""
    from vitlab.train.optim import num_layers_for_decay

    try:
        num_layers_for_decay(model)
    except ValueError:
        return False
    return True


def _add_lora(model: nn.Module, s: PeftSettings, generator: torch.Generator, name: str) -> list[str]:
    """Replace the targeted Linear layers by LoRALinear (in ``named_modules`` order: the draws of A follow it)."""
    kinds = lora_target_kinds(s.lora_targets)
    found = _lora_candidates(model)
    missing = [k for k in kinds if not found[k]]
    has = [k for k in found if found[k]]
    if missing and (len(kinds) < 3 or not has):  # "all" adapts what there is
        what = {"qkv": "attention input projections (an attention module's qkv, or q / k / v)",
                "proj": "attention output projections", "mlp": "MLP layers (fc1 / fc2)"}
        raise ValueError(f"lora_targets={s.lora_targets}: {name} ({_family(model)}) has no nn.Linear "
                         f"{' or '.join(what[k] for k in missing)} for LoRA to adapt"
                         + (f"; it has {', '.join(has)}: --set lora_targets={','.join(has)}" if has else
                            " (its layers are convolutions, or its attention computes with them)")
                         + "; or fine-tune it with --set freeze=backbone (linear probe)"
                         + (" / freeze_blocks=N" if _countable(model) else ""))
    # one pass in the model's own order, whatever the order of the kinds asked for
    wanted = {q for k in kinds for q in found[k]}
    adapted = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            q = f"{parent_name}.{child_name}"
            if q in wanted and type(child) is nn.Linear:
                setattr(parent, child_name, LoRALinear(child, rank=s.lora_rank, alpha=s.alpha, dropout=s.lora_dropout,
                                                        generator=generator))
                adapted.append(q)
    return adapted


def _family(model: nn.Module) -> str:
    from vitlab.models.registry import get_entry

    try:
        return f"family {get_entry(model.model_name).family}"
    except (AttributeError, ValueError):
        return type(model).__name__
