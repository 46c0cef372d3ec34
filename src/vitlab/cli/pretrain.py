"""``vitlab pretrain``: self-supervised pre-training of a backbone on unlabelled images.

Methods: ``mpp`` (the ViT paper's masked patch prediction), ``mae`` (masked autoencoder), ``dino``
(self-distillation), ``beit`` (blockwise masked image modelling against visual tokens: k-means, or a
tokenizer given with ``--tokenizer``), ``beit2`` (BEiT v2: against a VQ-KD tokenizer, with patch
aggregation). Tokenizers for BEiT: ``dvae`` (a discrete VAE) and ``vqkd`` (BEiT v2's vector-quantised
knowledge distillation of ``--teacher``'s features); they write ``tokenizer.safetensors``.
Labels of the data source, if any, are ignored. The run directory's
``model.safetensors`` is a backbone without a classifier that ``vitlab finetune --from``, ``eval``,
``fewshot`` and ``explain`` read directly.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from vitlab.cli.common import add_device_argument, add_threads_argument, parse_assignments
from vitlab.train.recipe import list_recipes

log = logging.getLogger("vitlab")
METHODS = ("mpp", "mae", "dino", "beit", "beit2", "dvae", "vqkd")  # vitlab.ssl.METHODS, without importing torch here

EXAMPLE = """examples:
  vitlab pretrain --method mae --model vit_small_patch16_224 --data ./unlabelled --img-size 224 --epochs 100
  vitlab pretrain --method dino --model vit_tiny_patch16_224 --data /data/cifar10 --img-size 32 \\
      --set model_overrides.patch_size=4 --opt out_dim=4096 --opt num_local=6
  vitlab pretrain --method mpp --recipe digits --data digits --steps 200
  vitlab pretrain --method dvae --recipe digits --data digits --output runs/dvae --opt vocab_size=64
  vitlab pretrain --method beit --recipe digits --data digits --tokenizer runs/dvae
  vitlab pretrain --method vqkd --recipe digits --data digits --teacher runs/dino/teacher.safetensors \
      --output runs/vqkd --opt vocab_size=256
  vitlab pretrain --method beit2 --recipe digits --data digits --tokenizer runs/vqkd
  vitlab finetune --from runs/pretrain-mae-vit_small_patch16_224/model.safetensors --data ./labelled
  vitlab pretrain --output runs/mine --resume      # continue that run exactly where it stopped

--opt sets the method's own options (JSON or Python values: true / false, numbers, "text"; each checked
against the method's options and their types): mae: mask_ratio, decoder_dim, decoder_depth,
decoder_heads, norm_pix_loss, decoder_qkv_bias; mpp: ratio, mask_prob, random_prob, bits; dino: out_dim, hidden_dim,
bottleneck_dim, teacher_temp, student_temp, momentum, center_momentum, freeze_last_layer_epochs,
clip_per_param, num_local, local_size; beit: vocab_size, ratio, min_patches, tokenizer_iters
(without --tokenizer: a k-means tokenizer over patch pixels, not the DALL-E dVAE); beit2: ratio,
min_patches, early_layers, aggregation_depth, aggregation_heads; dvae: vocab_size, embed_dim,
hidden_dim, num_resblocks, recon (logit_laplace, l1, mse), tau_start, tau_end, anneal, kl_weight,
kl_warmup, hard; vqkd: vocab_size, code_dim, decay, beta, kmeans_init, decoder_dim, decoder_depth,
decoder_heads, dead_after. num_local 0 runs DINO on its two global crops alone; a backbone that runs at one size
only (BEiT) gets local crops at that size.
On a labelled folder without val/, pre-training leaves out the split `finetune` and `eval` hold out of it by
default (val_fraction 0.1, the run's seed; recorded in job.json); --set val_fraction=0 uses every image.
recipes: {recipes} (default: the method's own) or a JSON file; --set changes any field."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="self-supervised pre-training (mpp, mae, dino, beit, beit2) and BEiT "
                                        "tokenizers (dvae, vqkd) on unlabelled images",
                       description="Pre-train a backbone with a self-supervised objective; labels are ignored.",
                       epilog=EXAMPLE.format(recipes=", ".join(list_recipes())),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=list(METHODS), help="the objective (with --resume: the run's own)")
    p.add_argument("--model", help="registered model name (default: the recipe's model)")
    p.add_argument("--data", help="data source (default: digits)")
    p.add_argument("--recipe", help="shipped recipe name or JSON file (default: the method's recipe)")
    p.add_argument("--epochs", type=int, help="override the recipe's epochs")
    p.add_argument("--steps", type=int, help="run length in optimiser steps (recipe max_steps)")
    p.add_argument("--batch-size", type=int, help="per-process batch of one micro-step")
    p.add_argument("--img-size", type=int, help="training resolution")
    p.add_argument("--output", type=Path, help="run directory (default: runs/pretrain-METHOD-MODEL)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output exactly where it stopped")
    p.add_argument("--overwrite", action="store_true", help="replace an unfinished run in --output")
    add_threads_argument(p)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field (repeatable)")
    p.add_argument("--opt", dest="options", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the method (repeatable; JSON or Python value, e.g. --opt mask_ratio=0.6, "
                        "--opt norm_pix_loss=false)")
    p.add_argument("--tokenizer", metavar="RUN_OR_FILE",
                   help="beit, beit2: the visual tokenizer (tokenizer.safetensors of a dvae or vqkd run, or its "
                        "directory); beit without it fits a k-means codebook")
    p.add_argument("--teacher", metavar="CKPT", help="vqkd: the vitlab checkpoint whose features are the targets")
    p.add_argument("--skip-bad-images", action="store_true", help="skip and count undecodable images")
    p.add_argument("--workers", type=int, help="data loader worker processes")
    add_device_argument(p)
    p.add_argument("--seed", type=int, help="override the recipe's seed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def parse_options(items: list[str]) -> dict:
    """``--opt KEY=VALUE`` items, read as every KEY=VALUE option is (JSON, else a Python literal: ``false`` and
    ``False`` alike); their names and types are checked against the method by vitlab.ssl.run.check_options."""
    return parse_assignments(items, "--opt")


def _sets(overrides: list[str] | None, key: str) -> bool:
    """Whether ``--set`` changes recipe field ``key``."""
    return any(o.split("=", 1)[0].strip() == key for o in overrides or [])


def run(args: argparse.Namespace) -> int:
    from vitlab.cli.train import resolve_recipe, run_data, saved_job, saved_run, skip_bad_images_of_run
    from vitlab.ssl.run import PretrainJob, run_pretraining
    from vitlab.train import NonFiniteLossError

    saved = saved_run(args, args.output) if args.output is not None else None
    options = parse_options(args.options)
    for key in ("tokenizer", "teacher"):  # kept as absolute paths, so that --resume works from anywhere
        value = getattr(args, key)
        if value is not None:
            options[key] = str(Path(value).expanduser().absolute())
    if saved is not None:
        job_saved = saved["job"]
        args.method = args.method or job_saved.get("method")
        args.model = args.model or job_saved.get("model")
        args.data = args.data or run_data(args, job_saved)
        options = {**job_saved.get("options", {}), **options}
    skip_bad_images_of_run(args, saved_job(args))
    if args.method is None:
        raise ValueError(f"--method: choose one of {', '.join(METHODS)}")
    # default: the method's own recipe; its model options are for its own model (Recipe.for_model)
    recipe = resolve_recipe(args, args.method, saved, model=args.model if saved is None else None)
    model = args.model or recipe.model
    output = args.output or Path("runs") / f"pretrain-{args.method}-{model}"
    job = PretrainJob(method=args.method, recipe=recipe, data=args.data or "digits", output=output, model=model,
                      options=options, device=None if args.device == "auto" else args.device, resume=args.resume,
                      overwrite=args.overwrite, skip_bad_images=args.skip_bad_images, progress=not args.no_progress,
                      threads=args.threads, hold_out=not _sets(args.overrides, "val_fraction"))
    try:
        summary = run_pretraining(job)
    except NonFiniteLossError as e:
        log.error("error: %s", e)
        return 1
    last = {k: v for k, v in summary["last"].items() if k not in ("kind", "epoch", "step", "lr")}
    made = f"tokenizer: {summary['tokenizer']}" if "tokenizer" in summary else f"backbone: {summary['checkpoint']}"
    log.info("%s pre-training: %d steps in %.1f s (%s); %s", summary["method"], summary["steps"],
             summary["train_seconds"], ", ".join(f"{k} {v:.4g}" for k, v in last.items()), made)
    return 0
