"""``vitlab finetune``: fine-tune a checkpoint or published weights on new data, as the ViT paper does.

The head is replaced by a zero-initialised D x K layer for the new classes and the position
embeddings are resampled to the fine-tuning resolution; the ``vit_finetune`` recipe is the default.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from vitlab.cli.train import (
    add_common_args,
    check_length_options,
    make_job,
    resolve_recipe,
    run_data,
    saved_job,
    saved_run,
    skip_bad_images_of_run,
    train_or_explain,
)
from vitlab.train.recipe import CARRY_OVER, list_recipes, plain

log = logging.getLogger(__name__)

EXAMPLE = """examples:
  vitlab finetune --from runs/digits-vit/model.safetensors --data ./my_digits --img-size 16 --steps 200
  vitlab finetune --from ViT-B_16.npz --model vit_base_patch16_384 --data ./flowers --img-size 384 \\
      --set max_steps=500 --set lr=0.003
  vitlab finetune --from hf-hub:google/vit-base-patch16-224 --model vit_base_patch16_224 --data ./pets
  vitlab finetune --from vit_base_patch16_224.augreg2_in21k_ft_in1k --data ./pets   (published weights, as
      timm's train.py --model NAME --pretrained: `vitlab models NAME --pretrained` lists the tags)
  vitlab finetune --from runs/digits-vit/model.safetensors --data ./my_digits --set lora_rank=8 --set lr=0.003
      (LoRA on qkv; --set freeze=backbone: a linear probe; --set freeze_blocks=N: the first N blocks frozen)

recipes: {recipes} or a JSON file (default vit_finetune: SGD momentum 0.9, global batch 512 through
gradient accumulation, cosine decay, no weight decay, clipping at norm 1, zero-initialised head; at the
checkpoint's own resolution unless --img-size or --recipe says otherwise)."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune a checkpoint on new data (new head, resampled positions)",
                       description="Fine-tune pretrained weights on a data set: zero-initialised head for its "
                                   "classes, position embeddings resampled to --img-size.",
                       epilog=EXAMPLE.format(recipes=", ".join(list_recipes())),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source",
                   help="vitlab checkpoint, timm/HF weights, JAX .npz, hf-hub:ORG/NAME, or a registered NAME[.TAG] for "
                        "its published weights (required; with --resume: the run's own, which need not exist any "
                        "more)")
    p.add_argument("--model", help="registered architecture (needed unless --from names it: a vitlab checkpoint or run folder, a Hugging Face or timm hub folder)")
    add_common_args(p, default_recipe="vit_finetune", output_default="finetune-MODEL")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vitlab.models.factory import model_name_of
    from vitlab.train.run import run_checkpoint

    check_length_options(args)
    if _sets(args.overrides, "model"):
        raise ValueError("--set model=...: finetune's model is the one --from holds (or --model names for weights "
                         "that do not name it); leave --set model out")
    saved = saved_run(args, args.output) if args.output is not None else None
    recorded = saved_job(args)  # with --resume: the run's job.json (its data, --from source and model)
    args.data = args.data or run_data(args, recorded)
    skip_bad_images_of_run(args, recorded)
    given = args.source
    if args.source is None:
        args.source = recorded.get("pretrained")
        if args.source is None:
            raise ValueError(f"--resume: {args.output / 'job.json'} records no --from source; give --from"
                             if args.resume and args.output is not None else
                             "--from is required: the checkpoint, weights or hf-hub:ORG/NAME to fine-tune (with "
                             "--resume and --output RUN: the run's own)")
    args.source, published = _published_weights(args.source, args.model)
    args.source, note = run_checkpoint(args.source)  # a run folder: its checkpoint (DINO's: the teacher)
    if given is not None and args.resume and recorded.get("pretrained") is not None:
        args.source = _resumed_source(args, given, recorded["pretrained"])
    if note and not args.resume:
        log.info("fine-tuning %s", note)
    # a resumed run's model is the one it records: its --from source is not read again (train.run.build_model)
    model = args.model or recorded.get("model") or published or model_name_of(args.source)
    recipe = resolve_recipe(args, "vit_finetune", saved, model=model)
    if saved is None and not args.resume:
        recipe = _checkpoint_architecture(args.source, recipe, args.overrides)
    if (saved is None and not args.resume and args.recipe is None and args.img_size is None
            and not _sets_img_size(args.overrides)):
        recipe = recipe.replace(img_size=_checkpoint_size(args.source, model, recipe.model_overrides))
    if saved is None:
        recipe = _pretraining_hold_out(args, recipe)
    return train_or_explain(make_job(args, recipe, model=model, pretrained=args.source,
                                     output_tag=f"finetune-{model}"))


def _resumed_source(args: argparse.Namespace, given: str, recorded: str) -> str:
    """--resume --from: the run's own source (job.json's ``pretrained``, kept as recorded), which the command line
    may repeat but not change, as the distillation --teacher: a resumed run takes its weights from its training
    state, so another --from would be recorded but never read."""
    if args.source == recorded:
        return recorded
    a, b = Path(args.source).expanduser(), Path(recorded).expanduser()
    if a.exists() and b.exists() and a.resolve() == b.resolve():
        return recorded
    raise ValueError(f"--resume --from {given}: the run in {args.output} fine-tunes from {recorded} (its job.json); "
                     f"a resumed run takes its weights from its training state and does not read --from: leave --from "
                     f"out to continue it, or start a new run (another --output) to fine-tune from {given}")


def _published_weights(source: str, model: str | None) -> tuple[str, str | None]:
    """``--from NAME[.TAG]``, a registered name that is no file or folder: the published weights that
    ``create_model("NAME.TAG", pretrained=True)`` loads, as timm's ``train.py --model NAME --pretrained`` does.
    Returns their hub source (whose row in models/pretrained.json sets the preprocessing) and NAME; any other
    source as it is, and None."""
    from vitlab.checkpoints.load import hub_repo
    from vitlab.models.factory import _is_registered
    from vitlab.models.pretrained import find_weights

    name, _, tag = source.partition(".")
    if hub_repo(source) is not None or Path(source).expanduser().exists() or not _is_registered(name):
        return source, None
    try:
        weights = find_weights(name, tag or None)
    except ValueError as e:
        raise ValueError(f"--from {source}: {e}") from None
    if model is not None and model != name:
        raise ValueError(f"--from {source}: the published weights of {name}; --model {model} names another model "
                         f"(leave --model out)")
    log.info("--from %s: the published weights %s (models/pretrained.json)", source, weights.hub)
    return weights.hub, name


def _vitlab_metadata(source: str) -> dict:
    """The metadata of a vitlab checkpoint (a file, or a run folder's model.safetensors) read without its tensors;
    {} for any other source."""
    from vitlab.train.run import MODEL_FILE, checkpoint_metadata

    path = Path(source).expanduser()
    if path.is_dir() and not (path / "config.json").exists():
        path = path / MODEL_FILE
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    meta = checkpoint_metadata(path)
    return meta if isinstance(meta.get("config"), dict) else {}


# model options that fine-tuning may set otherwise than the checkpoint was built with: the loader adapts the weights
# (size, channels, windows, pooling norm, position table) or they hold no weights (drop rates, head, preprocessing)
FINETUNE_OPTIONS = (*CARRY_OVER, "img_size", "num_classes", "global_pool", "fc_norm", "pos_embed", "dynamic_img_size",
                    "in_chans", "mean", "std", "window_size", "use_shared_rel_pos_bias", "use_rel_pos_bias")


def _checkpoint_architecture(source: str, recipe, overrides: list[str] | None):
    """With --from a vitlab checkpoint, the architecture it records (depth, width, heads, patch size...) wins over
    the recipe's model_overrides, which describe a model built from scratch (the digits recipe's depth 4 against a
    depth-2 checkpoint); those set aside are logged. A ``--set model_overrides.KEY=...`` that contradicts the
    checkpoint is an error naming both values. :data:`FINETUNE_OPTIONS` stay as the recipe sets them."""
    config = _vitlab_metadata(source).get("config")
    if not config:
        return recipe
    keys = [o.split("=", 1)[0].strip() for o in overrides or []]
    given = (set(recipe.model_overrides) if "model_overrides" in keys
             else {k.split(".", 1)[1] for k in keys if k.startswith("model_overrides.")})
    clash = {k: v for k, v in recipe.model_overrides.items()
             if k in config and k not in FINETUNE_OPTIONS and plain(v) != plain(config[k])}
    mine = sorted(k for k in clash if k in given)
    if mine:
        said = ", ".join(f"{k}={json.dumps(clash[k])} (the checkpoint: {json.dumps(config[k])})" for k in mine)
        raise ValueError(f"--set model_overrides: {said}: {source} holds a model built with the latter, which "
                         f"fine-tuning keeps; leave the option out, or train such a model from scratch with `vitlab "
                         f"train`")
    if clash:
        log.info("recipe %s: model_overrides %s set aside: %s records %s, whose architecture fine-tuning keeps",
                 recipe.name, ", ".join(f"{k}={json.dumps(v)}" for k, v in clash.items()), source,
                 ", ".join(f"{k}={json.dumps(config[k])}" for k in clash))
        recipe = recipe.replace(model_overrides={k: v for k, v in recipe.model_overrides.items() if k not in clash})
    return recipe


def _sets_img_size(overrides: list[str] | None) -> bool:
    return _sets(overrides, "img_size")


def _sets(overrides: list[str] | None, key: str) -> bool:
    return any(o.split("=", 1)[0].strip() == key for o in overrides or [])


def _pretraining_hold_out(args: argparse.Namespace, recipe):
    """Fine-tuning from a pre-training run on the data it pre-trained on: hold out what that run left out (its
    job.json's ``held_out``: seed and val_fraction), so that validation and test images were never pre-trained on;
    a --seed / val_fraction given otherwise is kept, with a warning naming the overlap."""
    from vitlab.train.run import read_job, same_source

    job = read_job(Path(args.source).parent) if Path(args.source).is_file() else {}
    held = job.get("held_out")
    if not isinstance(held, dict) or args.data is None or job.get("data") is None:
        return recipe
    if not same_source(args.data, job["data"], job.get("data_source")):
        return recipe
    seed, fraction = int(held.get("seed", 0)), float(held.get("val_fraction", 0))
    given_seed = args.seed is not None or _sets(args.overrides, "seed")
    given_fraction = _sets(args.overrides, "val_fraction")
    if not given_seed and not given_fraction:
        if (recipe.seed, recipe.val_fraction) != (seed, fraction):
            log.info("%s pre-trained on %s leaving out its %s split (seed %d, val_fraction %g): fine-tuning holds out "
                     "the same images", args.source, args.data, held.get("split", "held-out"), seed, fraction)
        return recipe.replace(seed=seed, val_fraction=fraction)
    if (recipe.seed, recipe.val_fraction) != (seed, fraction):
        log.warning("%s was pre-trained on %s leaving out the split of seed %d, val_fraction %g; this run holds out "
                    "seed %d, val_fraction %g, so its validation / test images include images pre-trained on",
                    args.source, args.data, seed, fraction, recipe.seed, recipe.val_fraction)
    return recipe


def _checkpoint_size(source: str, model: str, overrides: dict | None = None) -> int:
    """The resolution the checkpoint's model is built for: the default fine-tuning size when the user names
    none. (The vit_finetune recipe's 384 px is the ViT paper's, for ImageNet-size models: a checkpoint trained
    at 32 px went to a 96 x 96 grid and ran out of memory.) ``overrides``: the recipe's model_overrides (--set
    model_overrides.*), which may be needed to build the file's architecture.

    A vitlab checkpoint records its size in its metadata (its tensors are not read); a hub folder in its config;
    weights alone (a timm or JAX file) have it in their position table (grid x patch size) when the family has
    one; otherwise it is the registered model's size. No model is loaded: the file's patch size and prefix tokens
    come from its architecture built on the meta device, without weights."""
    size = _recorded_size(_vitlab_metadata(source))
    if size is not None:
        (h, w), where = size, "the checkpoint's resolution"
    else:
        h, w, where = _weights_size(source, model, overrides or {})
    log.info("fine-tuning at %s, %d px (--img-size to choose another; --recipe vit_finetune for the ViT paper's "
             "384 px)%s", where, h, "" if h == w else f" (it was built for {h}x{w})")
    return h


def _recorded_size(meta: dict) -> tuple[int, int] | None:
    """(height, width) a vitlab checkpoint's metadata records: its preprocessing's input size (C, H, W), else its
    config's img_size; None when it records neither (or for {}: no vitlab checkpoint)."""
    input_size = (meta.get("preprocessing") or {}).get("input_size")
    if isinstance(input_size, list) and len(input_size) == 3:
        return int(input_size[1]), int(input_size[2])
    img = (meta.get("config") or {}).get("img_size")
    if isinstance(img, int):
        return img, img
    if isinstance(img, list) and len(img) == 2:
        return int(img[0]), int(img[1])
    return None


def _weights_size(source: str, model: str, overrides: dict) -> tuple[int, int, str]:
    """(height, width, where from) of weights that are not a vitlab checkpoint: read and converted once, no model
    built with them (a model at the registered size would resample their position table)."""
    import contextlib
    import math

    import torch

    from vitlab.checkpoints import read_source, resolve
    from vitlab.checkpoints.load import hub_repo
    from vitlab.models.factory import source_config
    from vitlab.models.registry import get_entry

    entry = get_entry(model)
    path, family = resolve(source), entry.family
    src = read_source(path, family)
    if src.format != "vitlab" and not src.meta and src.key_prefix is not None:
        with contextlib.suppress(ValueError):  # the keys as create_model loaded them (a Lightning module's model.)
            src = read_source(path, family, strip_prefix=src.key_prefix)
    cfg = source_config(model, src, repo=hub_repo(source), **overrides)  # as create_model resolves it
    with torch.device("meta"):  # shapes only: no memory, no weights, nothing resampled
        probe = entry.build(cfg)
    h, w = probe.preprocessing.input_size[1:]
    if src.meta:  # a hub folder's config records the size
        return h, w, "the checkpoint's resolution"
    table = src.converted.state_dict.get("pos_embed")
    patch = getattr(getattr(probe, "patch_embed", None), "patch_size", None)
    prefix = getattr(probe, "pos_embed_prefix", getattr(probe, "num_prefix_tokens", 0))
    n = table.shape[1] - prefix if table is not None and table.ndim == 3 else 0
    grid = math.isqrt(max(n, 0))
    if grid > 0 and grid * grid == n and patch is not None:
        ph, pw = (patch, patch) if isinstance(patch, int) else patch
        return grid * ph, grid * pw, f"the checkpoint's resolution (its {grid}x{grid} position table x patch {ph})"
    return h, w, f"the model's registered size ({model}; the file does not record its resolution)"
