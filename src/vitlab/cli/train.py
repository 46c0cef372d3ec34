"""``vitlab train``: train a registered model on a data source following a recipe.

With no arguments it runs the main job: a small ViT on the bundled digits (the ``digits`` recipe),
then reports test accuracy; the checkpoint lands in ``runs/digits-vit/model.safetensors``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from vitlab.train.recipe import apply_overrides, list_recipes, load_recipe

log = logging.getLogger("vitlab")

EXAMPLE = """examples:
  vitlab train                                   # the main job: small ViT on the bundled digits
  vitlab train --model vit_small_patch16_224 --data ./images --recipe deit --epochs 30 --batch-size 64 \\
      --set lr=1e-3 --set model_overrides.drop_path_rate=0.1 --output runs/mine
  vitlab train --model vit_tiny_patch16_224 --data /data/mnist --img-size 28 --set model_overrides.patch_size=4
  torchrun --nproc_per_node 4 -m vitlab.cli.main train --model vit_base_patch16_224 --data ./images --device cuda
  vitlab train --output runs/mine --resume        # continue that run exactly where it stopped

data sources: digits (bundled), an image folder (class sub-folders, or train/ val/ [test/]),
an MNIST IDX folder, a CIFAR python-batch folder.
recipes: {recipes} or a JSON file; every field can be changed with --set key=value."""


def add_common_args(p: argparse.ArgumentParser, *, default_recipe: str | None) -> None:
    p.add_argument("--data", help="data source (default: digits; with --resume: the run's own)")
    p.add_argument("--recipe", help=f"shipped recipe name or JSON file (default: "
                   f"{default_recipe or 'digits for --data digits, else deit'}; with --resume: the run's own)")
    p.add_argument("--epochs", type=int, help="override the recipe's epochs")
    p.add_argument("--steps", type=int, help="override the run length in optimiser steps (recipe max_steps)")
    p.add_argument("--batch-size", type=int, help="per-process batch of one micro-step")
    p.add_argument("--img-size", type=int, help="training resolution")
    p.add_argument("--output", type=Path, help="run directory (default: runs/RECIPE-MODEL)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output exactly where it stopped")
    p.add_argument("--overwrite", action="store_true", help="replace an unfinished run in --output")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field (repeatable), e.g. --set lr=3e-4 --set model_overrides.depth=6")
    p.add_argument("--skip-bad-images", action="store_true", help="skip and count undecodable images")
    p.add_argument("--workers", type=int, help="data loader worker processes")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto", help="device")
    p.add_argument("--seed", type=int, help="override the recipe's seed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training forward (compile time reported apart; falls back to eager)")
    g = p.add_argument_group("distillation (DeiT)")
    g.add_argument("--teacher", help="teacher checkpoint (enables distillation)")
    g.add_argument("--distill", choices=["soft", "hard"], default="hard", help="distillation kind")
    g.add_argument("--tau", type=float, default=1.0, help="soft distillation temperature")
    g.add_argument("--alpha", type=float, default=0.5, help="weight of the distillation term")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (no arguments: a small ViT on the bundled digits)",
                       description="Train a registered model on a data source following a recipe.",
                       epilog=EXAMPLE.format(recipes=", ".join(list_recipes())),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="registered model name (default: the recipe's model)")
    add_common_args(p, default_recipe=None)
    p.set_defaults(func=run)


def saved_run(args: argparse.Namespace, output: Path) -> dict | None:
    """With --resume and no --recipe: the recipe, model and data recorded in the run directory."""
    import json

    if not args.resume or args.recipe is not None or not (output / "recipe.json").is_file():
        return None
    saved = json.loads((output / "recipe.json").read_text())
    job = json.loads((output / "job.json").read_text()) if (output / "job.json").is_file() else {}
    return {"recipe": {k: v for k, v in saved.items() if k != "resolved"}, "job": job}


def resolve_recipe(args: argparse.Namespace, default: str, saved: dict | None = None):
    from vitlab.train.recipe import recipe_from_dict

    if saved is not None:
        recipe = recipe_from_dict(saved["recipe"], source="the run's recipe.json")
    else:
        recipe = load_recipe(args.recipe or default)
    changes = {k: v for k, v in (("epochs", args.epochs), ("max_steps", args.steps), ("batch_size", args.batch_size),
                                  ("img_size", args.img_size), ("workers", args.workers), ("seed", args.seed))
               if v is not None}
    recipe = recipe.replace(**changes) if changes else recipe
    return apply_overrides(recipe, args.overrides)


def make_job(args: argparse.Namespace, recipe, *, model: str | None, pretrained: str | None, output_tag: str):
    from vitlab.train.run import Distill, TrainJob

    output = args.output or Path("runs") / output_tag
    if args.data is None:
        args.data = "digits"
    distill = Distill(teacher=args.teacher, kind=args.distill, alpha=args.alpha, tau=args.tau) if args.teacher else None
    return TrainJob(recipe=recipe, data=args.data, output=output, model=model, pretrained=pretrained,
                    device=None if args.device == "auto" else args.device, resume=args.resume,
                    overwrite=args.overwrite, skip_bad_images=args.skip_bad_images, distill=distill,
                    progress=not args.no_progress, compile=getattr(args, "compile", False))


def train_or_explain(job) -> int:
    """Run the job; a non-finite loss is reported as one clear error line (exit status 1), not a traceback."""
    from vitlab.train import NonFiniteLossError
    from vitlab.train.run import run_training

    try:
        summary = run_training(job)
    except NonFiniteLossError as e:
        log.error("error: %s", e)
        return 1
    report(summary)
    return 0


def report(summary: dict) -> None:
    test = summary.get("test")
    if test is None:
        log.info("stopped at step %d; checkpoint: %s", summary["steps"], summary["checkpoint"])
        return
    line = f"test accuracy {100 * test['top1']:.2f}% (top-5 {100 * test['top5']:.2f}%) on {test['samples']} images"
    if "test_ema" in summary:
        line += f"; EMA weights {100 * summary['test_ema']['top1']:.2f}%"
    log.info("%s after %d steps in %.1f s; checkpoint: %s", line, summary["steps"], summary["train_seconds"],
             summary["checkpoint"])
    if "compile_seconds" in summary:
        if summary.get("compile_failed"):
            log.info("torch.compile failed (%s): trained eager", summary["compile_failed"])
        else:
            log.info("torch.compile: %s s of the training time was the compile", summary["compile_seconds"])


def run(args: argparse.Namespace) -> int:
    saved = saved_run(args, args.output) if args.output is not None else None
    if saved is not None:  # `vitlab train --output DIR --resume` alone continues that run as it was
        args.model = args.model or saved["job"].get("model")
        args.data = args.data or saved["job"].get("data")
    default = "digits" if args.data in (None, "digits") else "deit"
    recipe = resolve_recipe(args, default, saved)
    model = args.model or recipe.model
    if model is None:
        raise ValueError("no model: give --model NAME (see `vitlab models`)")
    tag = "digits-vit" if recipe.name == "digits" and args.model is None else f"{recipe.name}-{model}"
    return train_or_explain(make_job(args, recipe, model=model, pretrained=None, output_tag=tag))
