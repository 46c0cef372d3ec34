"""``vitlab finetune``: fine-tune a checkpoint or published weights on new data, as the ViT paper does.

The head is replaced by a zero-initialised D x K layer for the new classes and the position
embeddings are resampled to the fine-tuning resolution; the ``vit_finetune`` recipe is the default.
"""

from __future__ import annotations

import argparse
import logging

from vitlab.cli.train import (
    add_common_args,
    check_length_options,
    make_job,
    resolve_recipe,
    saved_run,
    train_or_explain,
)
from vitlab.train.recipe import list_recipes

log = logging.getLogger(__name__)

EXAMPLE = """examples:
  vitlab finetune --from runs/digits-vit/model.safetensors --data ./my_digits --img-size 16 --steps 200
  vitlab finetune --from ViT-B_16.npz --model vit_base_patch16_384 --data ./flowers --img-size 384 \\
      --set max_steps=500 --set lr=0.003
  vitlab finetune --from hf-hub:google/vit-base-patch16-224 --model vit_base_patch16_224 --data ./pets

recipes: {recipes} or a JSON file (default vit_finetune: SGD momentum 0.9, global batch 512 through
gradient accumulation, cosine decay, no weight decay, clipping at norm 1, zero-initialised head; at the
checkpoint's own resolution unless --img-size or --recipe says otherwise)."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune a checkpoint on new data (new head, resampled positions)",
                       description="Fine-tune pretrained weights on a data set: zero-initialised head for its "
                                   "classes, position embeddings resampled to --img-size.",
                       epilog=EXAMPLE.format(recipes=", ".join(list_recipes())),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", required=True,
                   help="vitlab checkpoint, timm/HF weights, JAX .npz or hf-hub:ORG/NAME")
    p.add_argument("--model", help="registered architecture (needed unless --from names it: a vitlab checkpoint or run folder, a Hugging Face or timm hub folder)")
    add_common_args(p, default_recipe="vit_finetune")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vitlab.models.factory import model_name_of

    check_length_options(args)
    saved = saved_run(args, args.output) if args.output is not None else None
    if saved is not None:
        args.data = args.data or saved["job"].get("data")
    model = args.model or model_name_of(args.source)
    recipe = resolve_recipe(args, "vit_finetune", saved, model=model)
    if saved is None and args.recipe is None and args.img_size is None and not _sets_img_size(args.overrides):
        recipe = recipe.replace(img_size=_checkpoint_size(args.source, model))
    return train_or_explain(make_job(args, recipe, model=model, pretrained=args.source,
                                     output_tag=f"finetune-{model}"))


def _sets_img_size(overrides: list[str] | None) -> bool:
    return any(o.split("=", 1)[0].strip() == "img_size" for o in overrides or [])


def _checkpoint_size(source: str, model: str) -> int:
    """The resolution the checkpoint's model is built for: the default fine-tuning size when the user names
    none. (The vit_finetune recipe's 384 px is the ViT paper's, for ImageNet-size models: a checkpoint trained
    at 32 px went to a 96 x 96 grid and ran out of memory.)"""
    import vitlab

    h, w = vitlab.load_model(source, model_name=model).preprocessing.input_size[1:]
    log.info("fine-tuning at the checkpoint's resolution, %d px (--img-size to choose another; --recipe "
             "vit_finetune for the ViT paper's 384 px)%s", h, "" if h == w else f" (it was built for {h}x{w})")
    return h
