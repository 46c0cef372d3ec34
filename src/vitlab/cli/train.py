"""``vitlab train``: train a registered model on a data source following a recipe.

With no arguments it runs the main job: a small ViT on the bundled digits (the ``digits`` recipe),
then reports test accuracy; the checkpoint lands in ``runs/digits-vit/model.safetensors``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from vitlab.cli.common import add_device_argument, add_image_limit_argument, threads_type
from vitlab.train.recipe import apply_overrides, list_recipes, load_recipe

log = logging.getLogger("vitlab")

EXAMPLE = """examples:
  vitlab train                                   # the main job: small ViT on the bundled digits
  vitlab train --data ./my_images                # recipe chosen from the data and this machine (printed)
  vitlab train --data ./my_images --time-budget 20m   # the best model that trains in 20 minutes
  vitlab train --model vit_small_patch16_224 --data ./images --recipe deit --epochs 30 --batch-size 64 \\
      --set lr=1e-3 --set model_overrides.drop_path_rate=0.1 --output runs/mine
  vitlab train --model vit_tiny_patch16_224 --data /data/mnist --img-size 28 --set model_overrides.patch_size=4
  vitlab train --model xcit_nano_12_p16_224 --img-size 32 --set model_overrides.depth=2   # another family on digits
      (a recipe's model_overrides are for its own model: another family gets only the drop rates and crop_pct)
  torchrun --nproc_per_node 4 -m vitlab.cli.main train --model vit_base_patch16_224 --data ./images --device cuda
  torchrun --nproc_per_node 8 -m vitlab.cli.main train --model vit_huge_patch14_224 --data ./images --device cuda \
      --fsdp --set amp=bf16                      # sharded (FSDP): each GPU holds 1/8 of the model and optimiser
  vitlab train --output runs/mine --resume        # continue that run exactly where it stopped
  vitlab train --data ./tagged --multi-label      # several labels per image (metadata.jsonl lists, tags, 0/1 columns)

data sources: digits (bundled), an image folder (class sub-folders, or train/ val/ [test/]),
an MNIST IDX folder, a CIFAR python-batch folder.
recipes: {recipes} or a JSON file; every field can be changed with --set key=value."""


def add_common_args(p: argparse.ArgumentParser, *, default_recipe: str | None,
                    output_default: str | None = None) -> None:
    p.add_argument("--data", help="data source (default: digits; with --resume: the run's own)")
    auto = default_recipe is None  # `vitlab train` has the auto recipe; finetune's default is a named one
    p.add_argument("--recipe", help=f"shipped recipe name{', a JSON file, or auto' if auto else ' or a JSON file'} "
                   f"(default: "
                   f"{default_recipe or 'digits for the bundled digits, else auto: chosen from the data and the machine'}"
                   f"; with --resume: the run's own)")
    p.add_argument("--time-budget", type=_duration, metavar="DURATION",
                   help="train for this long in all (e.g. 20m, 1h30m): the first steps are timed and the schedule "
                        "sized to end on time, then the model is evaluated"
                        + ("; with the auto recipe the model size is chosen for it too" if auto else ""))
    p.add_argument("--epochs", type=int, help="override the recipe's epochs")
    p.add_argument("--steps", type=int, help="override the run length in optimiser steps (recipe max_steps)")
    p.add_argument("--batch-size", type=int, help="per-process batch of one micro-step")
    p.add_argument("--img-size", type=int, help="training resolution")
    p.add_argument("--output", type=Path, help="run directory (default: "
                   + ("runs/digits-vit for the bundled digits recipe, else runs/RECIPE-MODEL)" if auto
                      else f"runs/{output_default})" if output_default else "runs/RECIPE-MODEL)"))
    p.add_argument("--resume", action="store_true", help="continue the run in --output exactly where it stopped")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --output (the files it wrote are "
                   "removed first)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field (repeatable), e.g. --set lr=3e-4 --set model_overrides.depth=6")
    p.add_argument("--skip-bad-images", action="store_true", help="skip and count undecodable images")
    p.add_argument("--multi-label", action="store_true",
                   help="several labels per image, from the folder's label file (a metadata.jsonl list, a column of "
                        "tags separated by spaces or one of | ; ,, or one 0/1 column per label): binary cross "
                        "entropy, mAP / F1 metrics, sigmoid scores (recipe field multi_label; with --resume: the "
                        "run's)")
    p.add_argument("--workers", type=int, help="data loader worker processes, also those that decode a small data "
                                               "set into memory before training (default: from the data and cores; "
                                               "0: all in this process)")
    p.add_argument("--threads", type=threads_type, help="CPU threads per process (default: the cores given, or "
                   "OMP_NUM_THREADS; overrides the recipe's cpu_threads)")
    add_device_argument(p)
    add_image_limit_argument(p)
    p.add_argument("--seed", type=int, help="override the recipe's seed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training forward (compile time reported apart; falls back to eager)")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun (2+ processes): shard parameters, gradients and optimiser state across "
                        "the processes (FSDP) instead of replicating them (DDP), for models too large for one "
                        "device; checkpoints are written in the plain format (recipe field fsdp)")
    g = p.add_argument_group("distillation (DeiT)")
    g.add_argument("--teacher", help="teacher checkpoint (enables distillation)")
    g.add_argument("--teacher-model", metavar="NAME",
                   help="the teacher's registered architecture, for weights that do not name it (a timm, JAX or "
                        "bare-weights file); --model names the student")
    g.add_argument("--distill", choices=["soft", "hard"], help="distillation kind (default: hard; with --resume: "
                                                                 "the run's)")
    g.add_argument("--tau", type=float, help="soft distillation temperature (default: 1.0)")
    g.add_argument("--alpha", type=float, help="weight of the distillation term (default: 0.5)")


def _duration(text: str) -> float:
    from vitlab.train.budget import parse_duration

    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (no arguments: a small ViT on the bundled digits)",
                       description="Train a registered model on a data source following a recipe.",
                       epilog=EXAMPLE.format(recipes=", ".join(list_recipes())),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="registered model name (default: the recipe's model)")
    p.add_argument("--task", choices=["classification", "detection", "segmentation"],
                   help="classification (default; with --resume: the run's own), detection (DETR) or segmentation "
                        "(SETR): --data is then a folder with train/ and val/ (images/ + annotations.json or "
                        "masks/, as `vitlab make-canvases` writes)")
    p.add_argument("--pretrained-backbone", help="detection/segmentation: a classifier checkpoint for the backbone")
    add_common_args(p, default_recipe=None)
    p.set_defaults(func=run)


def saved_run(args: argparse.Namespace, output: Path) -> dict | None:
    """With --resume and no --recipe: the recipe, model and data recorded in the run directory."""
    from vitlab.checkpoints.io import parse_json
    from vitlab.train.run import read_job

    path = output / "recipe.json"
    if not args.resume or args.recipe is not None:
        return None
    if not path.is_file():
        return _recipe_from_state(output)
    try:
        saved = parse_json(path.read_text(encoding="utf-8"))
    except ValueError as e:  # malformed, nested too deeply, not UTF-8
        raise ValueError(f"{path}: not valid JSON ({e}); --resume continues the run's own recipe: repair the "
                         f"file") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: not a recipe (a JSON object of recipe fields); --resume continues the run's "
                         f"own recipe: repair the file")
    # "changes": the settings changed on an earlier --resume (the fields hold those in force now)
    return {"recipe": {k: v for k, v in saved.items() if k not in ("resolved", "changes")}, "job": read_job(output)}


def _recipe_from_state(output: Path) -> dict | None:
    """--resume of a run whose recipe.json is gone: the recipe its training state holds (the settings in force at
    its last checkpoint, which recipe.json recorded too), with a warning; None where there is no such state."""
    from vitlab.checkpoints import CheckpointError
    from vitlab.train.run import read_job
    from vitlab.train.state import load_train_state
    from vitlab.train.trainer import STATE_FILE

    state_path = output / STATE_FILE
    if not state_path.is_file():
        return None
    try:
        recipe = load_train_state(state_path, mmap=True).get("recipe")
    except (CheckpointError, OSError, ValueError):
        return None  # the resume's own checks say what is wrong with the state
    if not isinstance(recipe, dict) or not recipe:
        return None
    log.warning("--resume: %s is missing; the run's recipe is taken from its %s (the settings in force at its last "
                "checkpoint), and recipe.json is written again", output / "recipe.json", STATE_FILE)
    return {"recipe": recipe, "job": read_job(output)}


def saved_job(args: argparse.Namespace) -> dict:
    """With --resume: the run's job.json (task, data, model), also when --recipe is given; else {}."""
    from vitlab.train.run import read_job

    return read_job(args.output) if args.resume and args.output is not None else {}


def run_data(args: argparse.Namespace, job: dict) -> str | None:
    """With --resume and no --data: the run's data source, as `vitlab eval` finds it (readable from here)."""
    from vitlab.cli.common import recorded_data
    from vitlab.data.build import parse_source
    from vitlab.data.errors import DatasetError

    if not job:
        return None
    data = recorded_data(args.output, job) or job.get("data")
    if data is None:
        return None
    try:
        parse_source(data)
    except DatasetError as e:  # the folder moved or removed since the run began
        raise ValueError(f"--resume: the data the run in {args.output} was trained on, {job.get('data')} (its "
                         f"job.json), cannot be read any more ({e}); if it moved, continue the run on it with "
                         f"--data NEWPATH (its classes and files are checked against the run's record)") from None
    return data


def skip_bad_images_of_run(args: argparse.Namespace, job: dict) -> None:
    """--resume of a run started with --skip-bad-images (job.json's ``skip_bad_images``): it goes on skipping
    undecodable images, as the run did, without the option repeated."""
    if args.resume and job.get("skip_bad_images") is True and not args.skip_bad_images:
        args.skip_bad_images = True
        log.info("--resume: undecodable images are skipped, as the run did (--skip-bad-images, in its job.json)")


def check_recipe_outside(args: argparse.Namespace, output: Path) -> None:
    """--recipe naming the recipe.json the run writes into --output of a folder that is not a vitlab run
    (:func:`vitlab.train.run.is_run_dir`: the file is the user's own, also when copied from a run) is refused:
    the run would replace it with its resolved recipe."""
    from vitlab.train.run import is_run_dir
    from vitlab.train.trainer import RECIPE_FILE

    if args.recipe is None:
        return
    path = Path(args.recipe).expanduser()
    target = output / RECIPE_FILE
    if path.is_file() and target.is_file() and path.resolve() == target.resolve() and not is_run_dir(output):
        raise ValueError(f"--recipe {args.recipe} is the file the run writes its resolved recipe to "
                         f"({target}): it would be replaced; copy it outside --output {output}, or choose "
                         f"another --output")


def resolve_recipe(args: argparse.Namespace, default: str, saved: dict | None = None, base=None, *,
                   model: str | None = None):
    """The recipe with the command line's changes: ``base`` (the auto recipe) when given, else the run's saved
    recipe, else the named one; for ``model`` of another family than a named recipe's own model, only the
    recipe's model options that carry over are kept (``Recipe.for_model``); then --set applies."""
    from vitlab.train.recipe import recipe_from_dict

    if base is not None:
        recipe = base
    elif saved is not None:
        recipe = recipe_from_dict(saved["recipe"], source="the run's recipe.json")
    else:
        recipe = load_recipe(args.recipe or default)
        if model is not None:
            recipe = recipe.for_model(model)
    changes = {k: v for k, v in (("epochs", args.epochs), ("max_steps", args.steps), ("batch_size", args.batch_size),
                                  ("img_size", args.img_size), ("workers", args.workers), ("seed", args.seed),
                                  ("fsdp", True if getattr(args, "fsdp", False) else None),
                                  ("multi_label", True if getattr(args, "multi_label", False) else None))
               if v is not None}
    recipe = recipe.replace(**changes) if changes else recipe
    recipe = apply_overrides(recipe, args.overrides)
    if saved is not None and base is None and args.resume:
        check_resumed_length(args, saved["recipe"], recipe)
    return recipe


def check_resumed_length(args: argparse.Namespace, saved: dict, recipe) -> None:
    """--resume --epochs N (or --set epochs=N) on a run whose length is max_steps (--steps, or a time budget's
    plan): max_steps wins over epochs, so the epochs would change nothing; refused, as a fresh run given both is."""
    asked = args.epochs is not None or any(o.split("=", 1)[0].strip() == "epochs" for o in args.overrides or [])
    if not asked or recipe.max_steps is None or recipe.epochs == saved.get("epochs"):
        return
    raise ValueError(f"--resume --epochs {recipe.epochs}: the run in {args.output} is {recipe.max_steps} steps long "
                     f"(max_steps: from --steps, a time budget's plan or its recipe), which wins over epochs: the epochs "
                     f"would change nothing; give --steps N for another length")


def make_job(args: argparse.Namespace, recipe, *, model: str | None, pretrained: str | None, output_tag: str):
    import time

    from vitlab.train.run import TrainJob

    output = args.output or Path("runs") / output_tag
    check_recipe_outside(args, output)
    if args.data is None:
        args.data = "digits"
    distill = resolve_distill(args)
    return TrainJob(recipe=recipe, data=args.data, output=output, model=model, pretrained=pretrained,
                    device=None if args.device == "auto" else args.device, resume=args.resume,
                    overwrite=args.overwrite, skip_bad_images=args.skip_bad_images, distill=distill,
                    progress=not args.no_progress, threads=args.threads,
                    time_budget_s=None if args.resume else args.time_budget, compile=getattr(args, "compile", False),
                    started=getattr(args, "started", None) or time.monotonic(),  # set by main: the command's start
                    set_fields=frozenset(o.partition("=")[0].strip() for o in args.overrides))


DISTILL_DEFAULTS = {"kind": "hard", "alpha": 0.5, "tau": 1.0}


def resolve_distill(args: argparse.Namespace):
    """--teacher and its options; with --resume, the run's own (job.json), which the command line may repeat but
    not change: the objective's state and the steps so far were made with that teacher."""
    from vitlab.train.run import Distill

    given = {"kind": args.distill, "alpha": args.alpha, "tau": args.tau}
    teacher_model = getattr(args, "teacher_model", None)
    recorded = saved_job(args).get("distill") if args.resume else None
    if recorded:
        asked = {"teacher": args.teacher, "model": teacher_model, **given}
        teacher, moved_from = recorded["teacher"], list(recorded.get("moved_from") or [])
        if (args.teacher is not None and recorded.get("fingerprint")
                and teacher_identity(args.teacher) != teacher_identity(teacher)):
            # the teacher is its weights: at another path (a moved file) it is the run's own where they are those
            # the run recorded (train.run._distillation compares them as it loads the teacher)
            moved_from.append(teacher)
            teacher = teacher_identity(args.teacher)
            del asked["teacher"]
            log.info("--resume --teacher %s: the run distilled from %s; the teacher at the new path goes on where its "
                     "weights are those the run began with (checked as it loads)", args.teacher, recorded["teacher"])
        changed = [f"{k} {recorded.get(k)!r} -> {v!r}" for k, v in asked.items()
                   if v is not None and (teacher_identity(v) if k == "teacher" else v)
                   != (teacher_identity(recorded[k]) if k == "teacher" else recorded.get(k))]
        if changed:
            shown = {k: v for k, v in recorded.items() if k not in ("fingerprint", "moved_from")}
            raise ValueError(f"--resume: the run in {args.output} distils with {shown}; this asks for "
                             f"{', '.join(changed)}; leave the distillation options out to continue it, or start a "
                             f"new run (another --output)")
        return Distill(teacher=teacher, **{k: recorded[k] for k in ("kind", "alpha", "tau")},
                       model=recorded.get("model"), fingerprint=recorded.get("fingerprint"), moved_from=moved_from)
    if args.teacher is not None and args.tau is not None and (args.distill or DISTILL_DEFAULTS["kind"]) == "hard":
        raise ValueError("--tau is the soft distillation's temperature; hard distillation (--distill hard, the "
                         "default) does not use it: leave --tau out, or give --distill soft")
    if args.teacher is None:
        if any(v is not None for v in (*given.values(), teacher_model)):
            raise ValueError("--distill / --alpha / --tau / --teacher-model set the distillation from a --teacher; "
                             "give --teacher")
        return None
    return Distill(teacher=teacher_identity(args.teacher), model=teacher_model,
                   **{k: DISTILL_DEFAULTS[k] if v is None else v for k, v in given.items()})


def teacher_identity(teacher: str) -> str:
    """--teacher as recorded and compared: the absolute path of an existing file or folder (a run resumed from
    another directory finds it, and the same teacher typed otherwise is the same), else the text as given (a
    hub name, or a path that is not there any more)."""
    path = Path(teacher).expanduser()
    return str(path.resolve()) if path.exists() else teacher


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
    report_skipped(summary)
    test = summary.get("test")
    if test is None:
        log.info("stopped at step %d; checkpoint: %s%s", summary["steps"], summary["checkpoint"], _best(summary))
        return
    if "mAP" in test:  # multi-label
        line = (f"test mAP {_percent(test['mAP'])} (micro-F1 {100 * test['micro_f1']:.2f}%, exact match "
                f"{100 * test['exact_match']:.2f}% at threshold {test['threshold']:g}) on {test['samples']} images")
        if "test_ema" in summary:
            line += f"; EMA weights mAP {_percent(summary['test_ema'].get('mAP'))}"
    else:
        line = (f"test accuracy {100 * test['top1']:.2f}% (top-5 {100 * test['top5']:.2f}%) on {test['samples']} "
                f"images")
        if "test_ema" in summary:
            line += f"; EMA weights {100 * summary['test_ema']['top1']:.2f}%"
    log.info("%s after %d steps in %.1f s; checkpoint: %s%s", line, summary["steps"], summary["train_seconds"],
             summary["checkpoint"], _best(summary))
    report_compile(summary)


def _best(summary: dict) -> str:
    """The best validation's part of the final line (the test above scores the last model)."""
    parts = [f"{what} (val {b['metric']} {b['value']:.4f} at step {b['step']}): {b['file']}"
             for what, b in (("best", summary.get("best")), ("EMA best", summary.get("best_ema"))) if b]
    return "".join(f"; {p}" for p in parts)


def _percent(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def report_skipped(summary: dict) -> None:
    if "skipped_images" in summary:
        log.info("skipped %d undecodable image(s) in total (--skip-bad-images; each was named above)",
                 summary["skipped_images"])


def report_compile(summary: dict) -> None:
    if "compile_seconds" in summary:
        if summary.get("compile_failed"):
            log.info("torch.compile failed (%s): trained eager", summary["compile_failed"])
        else:
            log.info("torch.compile: %s s of the training time was the compile", summary["compile_seconds"])


def auto_recipe(args: argparse.Namespace):
    """The recipe vitlab.train.auto chooses for the data and this machine (printed in one line)."""
    from vitlab.cli.common import check_device
    from vitlab.train.auto import TRAIN_FLOP_FACTOR, choose_recipe, facts_for_source
    from vitlab.train.hardware import default_threads, detect

    facts = multilabel_facts(args.data) if getattr(args, "multi_label", False) else facts_for_source(args.data)
    hw = detect(check_device(args), threads=args.threads or default_threads())
    model_flops = model_width = None
    if args.model is not None:
        from vitlab.benchmark import registry_forward_flops
        from vitlab.models.registry import get_entry

        built = built_model_options(args)  # the model the run builds: its --set model_overrides and --img-size
        model_flops = registry_forward_flops(args.model, **{"in_chans": facts.channels, **built})[0] * TRAIN_FLOP_FACTOR
        model_width = built.get("embed_dim", getattr(get_entry(args.model).config, "embed_dim", None))
    choice = choose_recipe(facts, hw, time_budget_s=args.time_budget, model=args.model, model_flops=model_flops,
                           model_width=model_width)
    log.info("%s", choice.summary)
    return choice.recipe


def built_model_options(args: argparse.Namespace) -> dict:
    """The options the auto recipe's run builds ``--model`` with, as :func:`resolve_recipe` applies them: --img-size
    and --set (img_size, model_overrides...). The auto recipe itself sets none of the model's architecture."""
    from vitlab.train.recipe import Recipe

    model_keys = [a for a in args.overrides or [] if a.partition("=")[0].strip().startswith(("img_size",
                                                                                          "model_overrides"))]
    # the model's keys only: the others are checked against the recipe the auto chooser then picks (its own lr)
    probe = apply_overrides(Recipe(name="auto", img_size=args.img_size), model_keys)
    options = dict(probe.model_overrides)
    if probe.img_size is not None:
        options["img_size"] = probe.img_size
    return options


def multilabel_facts(source: str):
    """vitlab.train.auto's facts of a multi-label source (its images per label: the positives)."""
    import dataclasses

    from vitlab.data.build import parse_source
    from vitlab.data.folder import folder_layout
    from vitlab.data.multilabel import build_multilabel_dataset
    from vitlab.train.auto import data_facts

    ds = build_multilabel_dataset(source, split="train", val_fraction=0.0)
    _, val_dir, test_dir = folder_layout(parse_source(source)[1])  # type: ignore[arg-type]
    return dataclasses.replace(data_facts(ds), has_test=test_dir is not None, has_val=val_dir is not None)


def report_changes(chosen, recipe) -> None:
    """The fields of the auto recipe that --img-size, --steps, --set ... changed, after its one-line summary
    (which describes the recipe as chosen)."""
    mine, theirs = chosen.to_dict(), recipe.to_dict()
    changed = [f"{k} {mine.get(k)!r} -> {v!r}" for k, v in theirs.items() if mine.get(k) != v and k != "description"]
    if changed:
        log.info("auto recipe changed by the command line: %s", ", ".join(changed))


def check_length_options(args: argparse.Namespace) -> None:
    sets_length = [k for k in ("max_steps", "epochs")
                   if any(o.split("=", 1)[0].strip() == k for o in getattr(args, "overrides", None) or [])]
    if getattr(args, "time_budget", None) is not None and (args.steps is not None or args.epochs is not None
                                                           or sets_length):
        raise ValueError("--time-budget sizes the run itself; give it without --steps / --epochs / --set "
                         "max_steps / --set epochs")
    if args.steps is not None and args.epochs is not None:
        raise ValueError("--steps and --epochs both set the run's length (--steps would win); give one of them")
    if getattr(args, "time_budget", None) is not None and args.resume:
        raise ValueError("--time-budget with --resume: a resumed run continues on the length it planned (a budgeted "
                         "run's re-planned length is saved with it); leave --time-budget out, or give --steps N "
                         "for another length")


def run_dense(args: argparse.Namespace) -> int:
    """``--task detection|segmentation``: DETR / SETR on a data folder, then the held-out metrics."""
    import time

    from vitlab.tasks.run import DenseJob, format_metrics, run_dense_training
    from vitlab.train import NonFiniteLossError

    if getattr(args, "fsdp", False):
        raise ValueError(f"--fsdp supports classification only, not --task {args.task} (which runs with DDP "
                         f"under torchrun)")
    if getattr(args, "multi_label", False):
        raise ValueError(f"--multi-label trains classifiers (several labels per image), not --task {args.task}")
    distill = [f"--{k}" for k in ("teacher", "distill", "tau", "alpha") if getattr(args, k, None) is not None]
    if distill:
        raise ValueError(f"{' / '.join(distill)}: distillation (DeiT's) trains classifiers only, not --task "
                         f"{args.task}; leave {'it' if len(distill) == 1 else 'them'} out")
    check_length_options(args)
    if not args.no_progress:
        from vitlab.train.progress import log_interval_s

        log_interval_s()  # a bad VITLAB_LOG_INTERVAL is refused before the run directory is touched
    saved = saved_run(args, args.output) if args.output is not None else None
    job = saved_job(args)  # `vitlab train --output DIR --resume` alone continues that run as it was
    args.model = args.model or job.get("model")
    args.data = args.data or run_data(args, job)
    skip_bad_images_of_run(args, job)
    if args.data is None:
        raise ValueError(f"--task {args.task} needs --data DIR (train/ and val/ folders; see `vitlab make-canvases`)")
    default = "detr_canvases" if args.task == "detection" else "setr_canvases"
    recipe = resolve_recipe(args, default, saved)
    if saved is None and args.recipe is None:
        recipe = fit_canvas_recipe(recipe, Path(args.data), args.task)
    model = args.model or recipe.model
    if model is None:
        raise ValueError(f"no model: give --model NAME (see `vitlab models --task {args.task}`)")
    output = args.output or Path("runs") / f"{recipe.name}-{model}"
    check_recipe_outside(args, output)
    try:
        summary = run_dense_training(DenseJob(
            task=args.task, model=model, data=Path(args.data), output=output, recipe=recipe,
            pretrained_backbone=args.pretrained_backbone, resume=args.resume,
            device=None if args.device == "auto" else args.device, progress=not args.no_progress,
            threads=args.threads, overwrite=args.overwrite, skip_bad_images=args.skip_bad_images,
            time_budget_s=None if args.resume else args.time_budget, compile=args.compile,
            started=getattr(args, "started", None) or time.monotonic()))  # set by main: the command's start
    except NonFiniteLossError as e:  # one error line, as for classification (train_or_explain)
        log.error("error: %s", e)
        return 1
    if summary["val"]:  # (empty on the other processes of a torchrun job: rank 0 evaluates)
        log.info("val %s after %.1f s; checkpoint: %s", format_metrics(args.task, summary["val"]),
                 summary["train_seconds"], summary["checkpoint"])
    report_dense_extras(summary)
    return 0


def report_dense_extras(summary: dict) -> None:
    """--skip-bad-images' total and --compile's time, as :func:`report` says them for classification."""
    report_skipped(summary)
    report_compile(summary)


def fit_canvas_recipe(recipe, data: Path, task: str):
    """The default dense recipes are the digit canvases' (grey, 11 classes): on other data, the channel count
    comes from the images (colour data was averaged to grey) and, for segmentation, the classes from the data's
    classes.json (or the refusal that asks for them), not the canvases' 11."""
    from vitlab.data.folder import guess_channels
    from vitlab.data.image import expand_image_paths

    images = data / "train" / "images"
    try:
        paths = expand_image_paths([images])
    except (FileNotFoundError, ValueError):
        return recipe  # the data set's own check names what is missing
    over = dict(recipe.model_overrides)
    changed = []
    if guess_channels(paths, [0] * len(paths)) == 3 and over.get("in_chans") == 1:
        for key in ("in_chans", "mean", "std"):
            over.pop(key, None)
        changed.append("3 channels (the model's own normalisation)")
    if task == "segmentation" and "num_classes" in over and not (data / "classes.json").is_file():
        over.pop("num_classes")
        changed.append("the classes from the data")
    if not changed:
        return recipe
    log.info("recipe %s (made for the digit canvases) adapted to %s: %s", recipe.name, data, ", ".join(changed))
    return recipe.replace(model_overrides=over)


def resolve_task(args: argparse.Namespace) -> str:
    """--task, else (with --resume) the task the run recorded, else classification; a --task other than the
    resumed run's is refused."""
    recorded = saved_job(args).get("task")
    if args.task is not None and recorded is not None and args.task != recorded:
        raise ValueError(f"--resume --task {args.task}: the run in {args.output} is a {recorded} run; leave "
                         f"--task out to continue it, or choose another --output")
    return args.task or recorded or "classification"


def run(args: argparse.Namespace) -> int:
    if args.resume and args.output is not None:  # before the recipe, data and model are built
        from vitlab.train.run import check_resume_start

        check_resume_start(Path(args.output))
    args.task = resolve_task(args)
    if args.task != "classification":
        return run_dense(args)
    check_length_options(args)
    saved = saved_run(args, args.output) if args.output is not None else None
    job = saved_job(args)  # `vitlab train --output DIR --resume` alone continues that run as it was
    args.model = args.model or job.get("model")
    args.data = args.data or run_data(args, job)
    skip_bad_images_of_run(args, job)
    base = None
    if saved is None and (args.recipe == "auto" or (args.recipe is None and args.data not in (None, "digits"))):
        base = auto_recipe(args)
    recipe = resolve_recipe(args, "digits", saved, base, model=args.model)
    if base is not None:
        report_changes(base, recipe)
    model = args.model or recipe.model
    if model is None:
        raise ValueError("no model: give --model NAME (see `vitlab models`)")
    tag = "digits-vit" if recipe.name == "digits" and args.model is None else f"{recipe.name}-{model}"
    return train_or_explain(make_job(args, recipe, model=model, pretrained=None, output_tag=tag))
