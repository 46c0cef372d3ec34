"""The command-line jobs of the dense tasks: train / evaluate DETR and SETR on a data folder, and run a
trained model on images (boxes, colour overlays, DETR's per-object cross-attention).

A data folder holds ``train/`` and ``val/`` (its split folders named as for classification, whatever the
case: ``valid/`` ...), each with ``images/`` and either ``annotations.json`` (COCO format: detection; or
Roboflow's layout, the images beside ``_annotations.coco.json``) or ``masks/`` (VOC-style PNGs of class
indices: segmentation), as ``vitlab make-canvases`` writes them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vitlab.checkpoints.io import atomic_write, check_outputs_free, parse_json
from vitlab.data.dense import CocoDetection, DenseTransform, MaskFolder, check_mask_classes, train_categories
from vitlab.data.errors import BadImageError, DatasetError
from vitlab.data.folder import SPLIT_DIR_NAMES

log = logging.getLogger(__name__)

TASKS = ("detection", "segmentation")


def task_of(model: nn.Module) -> str:
    return getattr(model, "task", "classification")


def transform_for(model: nn.Module, *, train: bool, hflip: float = 0.5,
                  keep_mask_size: bool | None = None) -> DenseTransform:
    """DETR: shorter side to the model's size (multi-scale in training), the longer at most its ``max_size``
    (a square size with a squash preprocessing style), SETR: the square size it is built for.

    ``train``: the training augmentations. ``keep_mask_size`` (default: not ``train``): a mask keeps its own
    size, for evaluation: the predictions are scored at the size of the user's masks
    (:func:`~vitlab.tasks.segmentation.evaluate_segmentation` upsamples the logits to it); a training set, also
    one without augmentation, gives False (its loss is taken at the model's size).

    A fixed-size ONNX export (``model.input_hw`` set, :class:`~vitlab.export.OnnxModel`) takes images of
    exactly its size: a detector's images are then resized to it without keeping their aspect (its boxes
    are normalised, so they map back to the original pixels all the same)."""
    pp = model.preprocessing
    c, h, _ = pp.input_size
    if task_of(model) == "segmentation" or getattr(model, "input_hw", None) is not None:
        return DenseTransform(size=h, square=True, train=train, hflip=hflip, mean=pp.mean, std=pp.std, channels=c,
                              resize_mask=train if keep_mask_size is None else not keep_mask_size)
    if pp.crop_mode == "squash" and pp.input_size[1] == pp.input_size[2]:  # a processor's {"height", "width"}
        return DenseTransform(size=h, square=True, train=train, hflip=hflip, mean=pp.mean, std=pp.std, channels=c)
    # the longer side's cap: the model's (a Hugging Face processor's longest_edge), else DETR's 1333 for 800
    max_size = getattr(model, "max_size", None) or int(h * 5 / 3)
    sizes = sorted({max(16, int(h * f) // 16 * 16) for f in (0.75, 0.875, 1.0)}) if train else h
    return DenseTransform(size=sizes, max_size=max_size, train=train, hflip=hflip,
                          crop_prob=0.5 if train else 0.0,
                          mean=pp.mean, std=pp.std, channels=c)


# the COCO JSON of a split folder: vitlab's (beside images/) or Roboflow's COCO export (beside the images)
COCO_JSON_NAMES = ("annotations.json", "_annotations.coco.json")
DETECTION_LAYOUTS = ("SPLIT/images/ with SPLIT/annotations.json (as `vitlab make-canvases` writes it), or the "
                     "images beside SPLIT/_annotations.coco.json (Roboflow's COCO export)")


def split_dir(root: str | os.PathLike, split: str) -> Path:
    """The folder of ``split`` under ``root``, named as for classification whatever its case (``val``:
    val/, valid/, validation/, dev/); an error lists the folders there when there is none."""
    root = Path(root)
    names = SPLIT_DIR_NAMES.get(split, (split,))
    if not root.is_dir():
        raise DatasetError(f"{root}: data folder not found")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    hits = [n for n in folders if n.lower() in names]
    if len(hits) > 1:
        raise DatasetError(f"{root}: {' and '.join(hits)} both name the {split} split; keep one of them")
    if not hits:
        raise DatasetError(f"{root}: no {split} split folder ({', '.join(n + '/' for n in names)} whatever the "
                           f"case); folders there: {', '.join(n + '/' for n in folders[:20]) or 'none'}")
    return root / hits[0]


def coco_split_files(root: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """(images folder, COCO JSON) of a detection split (:data:`DETECTION_LAYOUTS`); an error lists the JSON
    files and folders found."""
    base = split_dir(root, split)
    for name in COCO_JSON_NAMES:
        if (base / name).is_file():
            return (base / "images" if (base / "images").is_dir() else base), base / name
    found = sorted(str(p.relative_to(base)) for p in [*base.glob("*.json"), *base.glob("*/*.json")])
    folders = sorted(p.name + "/" for p in base.iterdir() if p.is_dir())
    raise DatasetError(f"{base}: no COCO annotation file ({' or '.join(COCO_JSON_NAMES)}); JSON files there: "
                       f"{', '.join(found[:10]) or 'none'}; folders: {', '.join(folders[:10]) or 'none'}; accepted "
                       f"layouts: {DETECTION_LAYOUTS}")


def open_split(root: str | os.PathLike, split: str, task: str, transform: DenseTransform | None,
               num_classes: int | None = None, *, categories: list[dict[str, Any]] | None = None,
               categories_from: str = "the model", ignore_index: int = 255, skip_bad_images: bool = False):
    """``root/split`` (:func:`split_dir`) as a detection or segmentation data set; a detection split takes the
    label of each category from ``categories`` (the training set's or the checkpoint's) when given."""
    if task == "detection":
        images, annotations = coco_split_files(root, split)
        return CocoDetection(images, annotations, transform=transform,
                             categories=categories, categories_from=categories_from, skip_bad_images=skip_bad_images)
    base = split_dir(root, split)
    return MaskFolder(base / "images", base / "masks", transform=transform, num_classes=num_classes,
                      ignore_index=ignore_index, skip_bad_images=skip_bad_images)


def recorded_categories(checkpoint: str | os.PathLike) -> list[dict[str, Any]] | None:
    """A detector's COCO categories (id and name per label) as its run recorded them: the checkpoint's
    metadata, else the run's job.json beside it when it names the same classes; None when not recorded."""
    from vitlab.train.run import checkpoint_metadata, read_job

    meta = checkpoint_metadata(checkpoint)
    categories = (meta.get("extra") or {}).get("categories")
    if categories:
        return categories
    job = read_job(Path(checkpoint).parent)
    if job.get("categories") and job.get("classes") == meta.get("class_names"):
        return job["categories"]
    return None


CLASSES_JSON_FORMS = ('a list of names ["background", "cat", ...], an id2label object {"0": "background", '
                      '"1": "cat", ...}, or a list of objects [{"id": 0, "name": "background"}, ...]; the index '
                      'or id of a class is its value in the masks, 0..K-1')


def _segmentation_classes(root: Path) -> list[str] | None:
    """The class names of ``root/classes.json`` (:data:`CLASSES_JSON_FORMS`), index = mask value; None
    without the file. Anything else is refused naming the file."""
    p = root / "classes.json"
    if not p.is_file():
        return None
    try:
        data = parse_json(p.read_text(encoding="utf-8"))
    except ValueError as e:  # bad JSON, or bytes that are not UTF-8
        raise DatasetError(f"{p}: not valid JSON ({e})") from None

    def refuse(why: str) -> DatasetError:
        return DatasetError(f"{p}: {why}; expected {CLASSES_JSON_FORMS}")

    if isinstance(data, dict):  # Hugging Face's id2label
        try:
            by_id = {int(k): v for k, v in data.items()}
        except ValueError:
            raise refuse(f"the keys of an id2label object must be class ids, got {list(data)[:5]}") from None
    elif isinstance(data, list) and data and all(isinstance(c, dict) for c in data):  # COCO / ADE style
        if any("name" not in c for c in data):
            raise refuse("every object needs a 'name'")
        if all("id" in c for c in data):
            try:
                by_id = {int(c["id"]): c["name"] for c in data}
            except (TypeError, ValueError):
                raise refuse("an 'id' is not an integer") from None
            if len(by_id) < len(data):
                raise refuse("an 'id' appears twice")
        elif any("id" in c for c in data):
            raise refuse("some objects have an 'id', others not")
        else:
            by_id = dict(enumerate(c["name"] for c in data))
    elif isinstance(data, list):
        by_id = dict(enumerate(data))
    else:
        raise refuse(f"got a JSON {type(data).__name__}")
    if not by_id:
        raise refuse("no classes")
    if sorted(by_id) != list(range(len(by_id))):
        raise refuse(f"the class ids are {sorted(by_id)[:10]}, not 0..{len(by_id) - 1}")
    names = [by_id[i] for i in range(len(by_id))]
    if bad := [n for n in names if not isinstance(n, str) or not n.strip()]:
        raise refuse(f"class names must be non-empty strings, got {bad[0]!r}")
    if twice := sorted({n for n in names if names.count(n) > 1}):
        raise refuse(f"class name(s) {twice} appear more than once")
    return names


@dataclass
class DenseJob:
    task: str
    model: str
    data: Path
    output: Path
    recipe: Any
    pretrained_backbone: str | None = None
    resume: bool = False
    device: str | None = None
    progress: bool = True
    threads: int | None = None  # --threads (None: the recipe's cpu_threads, else the cores given)
    overwrite: bool = False
    skip_bad_images: bool = False  # undecodable images (or masks) skipped and counted
    time_budget_s: float | None = None  # --time-budget: the run's length sized to end on time (fresh runs)
    # when the job began, for the budget (time.monotonic(); the CLI gives the process's start)
    started: float = field(default_factory=time.monotonic)
    compile: bool = False  # torch.compile the training step (falls back to eager)


def run_dense_training(job: DenseJob) -> dict[str, Any]:
    """Train on ``job.data/train``, evaluate on ``job.data/val``; writes the run folder and metrics.json.

    Under torchrun every process trains on its share of each batch (DDP, as for classification; DETR's box
    losses are normalised by the boxes of all processes); rank 0 writes the run and evaluates. Nothing is
    written before the options, the data and the run directory have been checked.
    """
    from vitlab.train.distributed import distributed_context
    from vitlab.train.hardware import processes_per_machine, training_threads

    recipe = job.recipe
    from vitlab.train.run import run_dir_lock

    with distributed_context(job.device) as ctx, run_dir_lock(job.output, enabled=ctx.is_main):
        if not ctx.is_main:
            logging.getLogger("vitlab").setLevel(logging.WARNING)
        local = processes_per_machine(ctx.world_size)
        with training_threads(job.threads if job.threads is not None else recipe.cpu_threads, local) as threads:
            log.info("%d CPU thread(s) per process", threads)
            return _run_dense(job, ctx)


def _run_dense(job: DenseJob, ctx: Any) -> dict[str, Any]:
    import vitlab
    from vitlab.checkpoints import save_model
    from vitlab.models.dense import load_backbone
    from vitlab.tasks.detection import DetectionObjective, evaluate_detection
    from vitlab.tasks.segmentation import SegmentationObjective, evaluate_segmentation
    from vitlab.train import fit
    from vitlab.train.distributed import barrier
    from vitlab.train.run import (
        JOB_FILE,
        check_resumable,
        check_run_dir,
        clear_run_outputs,
        compile_changes,
        run_marker,
        source_identity,
    )
    from vitlab.train.trainer import atomic_text

    if job.task not in TASKS:
        raise ValueError(f"--task must be one of {TASKS}, got {job.task!r}")
    if vitlab.get_entry(job.model).task != job.task:
        raise ValueError(f"--model {job.model} is a {vitlab.get_entry(job.model).task} model, not a {job.task} one "
                         f"(see `vitlab models --task {job.task}`)")
    recipe = job.recipe
    overrides = dict(recipe.model_overrides)
    if recipe.img_size is not None:
        overrides["img_size"] = recipe.img_size
    categories = None
    if job.task == "detection":
        train_images, train_json = coco_split_files(job.data, "train")
        probe = CocoDetection(train_images, train_json)
        classes = probe.classes
        categories = train_categories(train_json)
    else:
        classes = _segmentation_classes(job.data) or [str(i) for i in range(int(overrides.get("num_classes", 0)))]
        if not classes:  # the model's default (21, VOC's) would train, then fail to save its class names
            raise ValueError(f"{job.data}: segmentation needs its classes: {job.data / 'classes.json'} (a JSON list "
                             f"of names, the index being the mask value) or --set model_overrides.num_classes=N")
    overrides["num_classes"] = len(classes) if classes else overrides.get("num_classes")
    if ctx.is_main:
        check_run_dir(job.output, resume=job.resume, overwrite=job.overwrite)
    torch.manual_seed(recipe.seed)  # the same initial weights on every rank and every run
    model = vitlab.create_model(job.model, **overrides)
    if job.resume:
        check_resumable(job.output, model, recipe, data=str(job.data), classes=classes or None)
    if job.pretrained_backbone and not job.resume:
        load_backbone(model, job.pretrained_backbone)
    ignore = ignore_index_of(model) if job.task == "segmentation" else 255  # masks' unlabelled value
    train_set = open_split(job.data, "train", job.task,
                           transform_for(model, train=recipe.augment, hflip=recipe.hflip, keep_mask_size=False),
                           model.num_classes, ignore_index=ignore, skip_bad_images=job.skip_bad_images)
    # val labels follow train's categories (by id), also where val/annotations.json lists fewer of them
    val_set = open_split(job.data, "val", job.task, transform_for(model, train=False), model.num_classes,
                         categories=categories, categories_from=f"the training set ({split_dir(job.data, 'train')})",
                         ignore_index=ignore, skip_bad_images=job.skip_bad_images)
    check_dense_files(train_set, val_set, classes=classes)
    changes = compile_changes(job) if job.resume and ctx.is_main else []  # --compile switched: warned of
    if ctx.is_main:  # what --resume continues: task, data, model (with the data's classes, to check them)
        if job.overwrite and not job.resume:
            clear_run_outputs(job.output)
        job.output.mkdir(parents=True, exist_ok=True)
        atomic_text(job.output / JOB_FILE, json.dumps({
            **run_marker(job.output if job.resume else None),
            "task": job.task, "data": str(job.data), "data_source": source_identity(job.data), "classes": classes,
            **({"categories": categories} if categories is not None else {}), "model": job.model,
            "pretrained_backbone": job.pretrained_backbone, "skip_bad_images": job.skip_bad_images,
            "compile": job.compile, **({"compile_changes": changes} if changes else {})}, indent=2))
    objective = DetectionObjective(model.num_classes) if job.task == "detection" else \
        SegmentationObjective(ignore_index=model.cfg.ignore_index, aux_weight=model.cfg.aux_weight)
    if job.time_budget_s is not None and not job.resume:
        recipe = _fit_dense_to_budget(job, ctx, recipe, model, objective, train_set, val_set)
    try:
        result = fit(model.to(ctx.device), recipe, built_from_recipe=True, train_set=train_set, output_dir=job.output, resume=job.resume,
                     objective=objective, progress=job.progress, ctx=ctx, compile=job.compile)
    except (BadImageError, DatasetError) as e:  # a file the checks before training could not see (a truncated one)
        raise type(e)(f"{e}; {_where_training_stopped(job.output)}") from e
    model = model.cpu()
    summary: dict[str, Any] = {"task": job.task, "model": job.model, "val": {}, "train_seconds": round(result.seconds, 1),
                               "checkpoint": str(job.output / "model.safetensors")}
    if job.compile:
        summary["compile_seconds"] = None if result.compile_seconds is None else round(result.compile_seconds, 1)
        summary["compile_failed"] = result.compile_failed
    if not ctx.is_main:  # rank 0 writes the model and evaluates; the others wait for it
        barrier(ctx)
        return summary
    save_model(model, job.output / "model.safetensors", class_names=classes,
               extra={"task": job.task, "steps": result.step,
                      **({"categories": categories} if categories is not None else {})})
    try:
        if job.task == "detection":
            metrics = evaluate_detection(model, val_set)
        else:
            metrics = evaluate_segmentation(model, val_set, num_classes=model.num_classes,
                                            ignore_index=model.cfg.ignore_index)
    except (BadImageError, DatasetError) as e:
        raise type(e)(f"{e}; the training finished and its model is saved ({job.output / 'model.safetensors'}), "
                      f"the evaluation on {split_dir(job.data, 'val')} stopped there: fix or remove the file, then "
                      f"`vitlab train --output {job.output} --resume` evaluates it (without training again)") from e
    summary["val"] = metrics
    if job.skip_bad_images:  # distinct files, counted across worker processes and epochs
        summary["skipped_images"] = len({f for ds in (train_set, val_set) for f in ds.skipped()})
    (job.output / "metrics.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    barrier(ctx)
    return summary


# training masks decoded before training to see which classes they hold (the val masks are all decoded)
TRAIN_MASKS_SAMPLED = 64


def check_dense_files(train_set: CocoDetection | MaskFolder, val_set: CocoDetection | MaskFolder, *,
                      classes: list[str] | None = None) -> None:
    """Before training: every file of both splits opens, a COCO image has its JSON size, a mask has its image's
    size and a mode of class indices, all from the file headers; val's masks are also decoded for their
    classes (small files, else reached only after the whole training), and up to :data:`TRAIN_MASKS_SAMPLED` of
    train's, spread over it: a class of ``classes`` none of them holds is an error where the masks look like
    binary masks saved 0/255 (:func:`~vitlab.data.dense.check_mask_classes`), else a warning. The error names
    the file."""
    t0 = time.perf_counter()
    if isinstance(val_set, MaskFolder):
        values = train_set.check_files(sample=TRAIN_MASKS_SAMPLED) | val_set.check_files(classes=True)
        if classes:
            check_mask_classes(values, classes, ignore_index=val_set.ignore_index)
    else:
        train_set.check_files()
        val_set.check_files()
    log.debug("checked the files of %d training and %d val samples in %.1f s", len(train_set), len(val_set),
              time.perf_counter() - t0)


def _where_training_stopped(output: Path) -> str:
    """What a run stopped by a bad file left behind, and how to go on."""
    from vitlab.checkpoints import CheckpointError
    from vitlab.train.state import load_train_state
    from vitlab.train.trainer import STATE_FILE

    try:
        step = int(load_train_state(output / STATE_FILE, mmap=True)["step"])
    except (CheckpointError, FileNotFoundError, KeyError, ValueError):
        return "the training stopped before its first checkpoint: fix or remove the file, then start again with --overwrite"
    return (f"the training stopped; its state after step {step} is saved in {output}: fix or remove the file, then "
            f"`vitlab train --output {output} --resume` continues from there")


def _fit_dense_to_budget(job: DenseJob, ctx: Any, recipe: Any, model: nn.Module, objective: Any, train_set,
                         val_set) -> Any:
    """--time-budget: time the first steps of ``objective`` on a copy of the model and give the recipe the
    number of steps that ends training and the val evaluation on time (:mod:`vitlab.train.budget`'s planning,
    as for classification; the length is planned once, the dense objectives are not re-timed during the run)."""
    from vitlab.train.budget import finish_reserve_s, fit_recipe_to_budget
    from vitlab.train.progress import format_duration

    step_s = _dense_step_seconds(model, objective, recipe, train_set, ctx.device,
                                 min_seconds=0.005 * job.time_budget_s)
    if ctx.distributed:  # every rank runs the same number of steps: rank 0's
        import torch.distributed as dist

        box = [step_s]
        dist.broadcast_object_list(box, src=0)
        step_s = box[0]
    elapsed = time.monotonic() - job.started
    budget = job.time_budget_s - finish_reserve_s(job.time_budget_s)
    fitted = fit_recipe_to_budget(recipe, budget_s=budget, elapsed_s=elapsed, step_s=step_s,
                                  num_images=len(train_set), eval_images=len(val_set), world_size=ctx.world_size)
    log.info("time budget %s: %.3f s per step measured, %s already spent -> %d steps (%d epoch(s)), then the val "
             "evaluation", format_duration(job.time_budget_s), step_s, format_duration(elapsed), fitted.max_steps,
             fitted.epochs)
    return fitted


def _dense_step_seconds(model: nn.Module, objective: Any, recipe: Any, train_set, device: torch.device, *,
                        min_seconds: float = 0.0) -> float:
    """Seconds per optimiser step of ``objective`` on a copy of ``model``, data loading included; every random
    generator is left as it was (:func:`vitlab.train.budget.measure_step_seconds`)."""
    from vitlab.train.budget import measure_step_seconds

    return measure_step_seconds(model, recipe, train_set, device, min_seconds=min_seconds, objective=objective)


def ignore_index_of(model: nn.Module) -> int:
    """A segmenter's ignore index: its config's, or the one recorded in an ONNX file's metadata."""
    cfg = getattr(model, "cfg", None)
    if cfg is not None:
        return cfg.ignore_index
    return int(getattr(model, "config", {}).get("ignore_index", 255))


def evaluate_folder(model: nn.Module, data: str | os.PathLike, split: str = "val", *,
                    categories: list[dict[str, Any]] | None = None, categories_from: str = "the model",
                    batch_size: int = 8, device: torch.device | str = "cpu", amp: str = "none",
                    skip_bad_images: bool = False) -> dict[str, Any]:
    """COCO AP or mean IoU of a loaded dense model (or an exported ONNX one) on ``data/split``.

    A detector's labels are the model's: ``categories`` (COCO id and name per label, as its run recorded
    them), else its class names; the split's categories are matched to them, never renumbered per file. A
    detector with neither (an official DETR ``.pth``) is read by :func:`unnamed_detector_categories`.
    A segmenter is scored at the size of each mask. ``amp``: autocast ("bf16", "fp16"); ``skip_bad_images``:
    undecodable images are left out and counted (``skipped_images``)."""
    from vitlab.export.runtime import OnnxModel
    from vitlab.tasks.detection import evaluate_detection
    from vitlab.tasks.segmentation import evaluate_segmentation

    task = task_of(model)
    names = getattr(model, "class_names", None)
    if task == "detection" and categories is None and names and len(names) == model.num_classes:
        categories = [{"name": str(n)} for n in names]  # matched by name: a checkpoint that records no ids
    elif task == "detection" and categories is None and not names:
        categories = unnamed_detector_categories(model.num_classes, coco_split_files(data, split)[1])
        categories_from = "the model's labels read as category ids"
    ds = open_split(data, split, task, transform_for(model, train=False), model.num_classes,
                    categories=categories, categories_from=categories_from,
                    ignore_index=ignore_index_of(model) if task == "segmentation" else 255,
                    skip_bad_images=skip_bad_images)
    if task == "detection":
        # an exported detector takes no padding mask: images one by one, each at its own size
        metrics = evaluate_detection(model, ds, batch_size=1 if isinstance(model, OnnxModel) else batch_size,
                                     device=device, amp=amp)
    else:  # masks saved 0/255 would score the object as ignored: refused as before training
        class_names = [str(n) for n in names] if names else [str(i) for i in range(model.num_classes)]
        check_mask_classes(ds.check_files(classes=True), class_names, ignore_index=ds.ignore_index)
        metrics = evaluate_segmentation(model, ds, num_classes=model.num_classes,
                                        ignore_index=ignore_index_of(model), batch_size=batch_size, device=device,
                                        amp=amp)
    if skip_bad_images:
        metrics["skipped_images"] = ds.num_skipped
    return metrics


def unnamed_detector_categories(num_classes: int, annotations: Path) -> list[dict[str, Any]] | None:
    """The categories (label order) of a detector that names no classes, scored on the COCO file
    ``annotations``: None (the file's categories in id order, as vitlab numbers them in training) or, where the
    model's labels reach past the file's largest category id, the label as the category id itself
    (official facebookresearch/detr: num_classes = largest id + 1, 91 for COCO). Which was used is logged;
    where both are plausible, a warning says so."""
    own = train_categories(annotations)
    if not own:
        return None  # the data set's own check reports the file
    ids = [int(c["id"]) for c in own]
    if ids == list(range(len(ids))):
        return None  # label i is category id i either way
    if min(ids) < 0 or num_classes <= max(ids):
        log.info("%s: the model names no classes; label i is the i-th of the file's %d categories in id order "
                 "(its %d labels do not reach category id %d)", annotations, len(ids), num_classes, max(ids))
        return None
    names = {int(c["id"]): c["name"] for c in own if "name" in c}
    categories = [{"id": i, **({"name": names[i]} if i in names else {})} for i in range(num_classes)]
    if num_classes == max(ids) + 1:
        log.info("%s: the model names no classes and has %d labels, the largest category id + 1: its labels are "
                 "read as the category ids (official DETR's convention)", annotations, num_classes)
    else:
        log.warning("%s: the model names no classes; its %d labels are read as category ids (official DETR's "
                    "convention; the largest id here is %d), but they could also number its training data's "
                    "categories in id order: ambiguous without the model's class names (a vitlab checkpoint "
                    "records them)", annotations, num_classes, max(ids))
    return categories


DENSE_RUNTIMES = ("auto", "torch", "onnx")


def load_dense(path: str | os.PathLike, task: str, runtime: str = "auto") -> nn.Module:
    """The ``task`` model of a checkpoint or an exported ONNX file, for detect / segment / eval.

    ``runtime``: "auto" (ONNX Runtime for an ``.onnx`` file, else PyTorch), "torch", or "onnx" (an ``.onnx``
    file, or a checkpoint exported on the fly: validated, any size, then run by ONNX Runtime)."""
    import vitlab
    from vitlab.export.runtime import OnnxModel, is_onnx_file

    if runtime not in DENSE_RUNTIMES:
        raise ValueError(f"--runtime must be one of {', '.join(DENSE_RUNTIMES)} for a {task} model, got {runtime!r}")
    if is_onnx_file(path):
        if runtime == "torch":
            raise ValueError(f"{path} is an ONNX file: use --runtime onnx (or leave --runtime out), not torch")
        model: nn.Module = OnnxModel(path)
    else:
        model = vitlab.load_model(path).eval()
        if runtime == "onnx" and task_of(model) == task:
            from vitlab.export.runtimes import onnx_from_model

            # any size where the family allows it, so that DETR keeps its aspect-preserving resize
            model = onnx_from_model(model, int8=False, dynamic_batch=True,
                                     dynamic_size=getattr(model, "onnx_fixed_size_reason", None) is None)
    if task_of(model) != task:
        raise ValueError(f"{path}: a {task_of(model)} model, not a {task} one")
    return model


def format_metrics(task: str, m: dict[str, Any]) -> str:
    if task == "detection":
        return f"AP {m['AP']:.4f}  AP50 {m['AP50']:.4f}  AP75 {m['AP75']:.4f}"
    if m["mIoU"] is None:  # every pixel of the masks had the ignore index
        return "mIoU n/a  pixel accuracy n/a (no labelled pixels)"
    return f"mIoU {m['mIoU']:.4f}  pixel accuracy {m['pixel_acc']:.4f}"


def _prepare(model: nn.Module, path: Path) -> tuple[Tensor, Tensor, dict[str, Any]]:
    from vitlab.data.image import load_image

    image = load_image(path)
    s = transform_for(model, train=False)({"image": image})
    return s["image"], image, s


def _names(model: nn.Module) -> list[str]:
    return list(getattr(model, "class_names", None) or [str(i) for i in range(model.num_classes)])


RESULTS_FILES = {"detection": "detections.json", "segmentation": "segments.json"}
_COMMANDS = {"detection": "vitlab detect", "segmentation": "vitlab segment"}


def _suffixes(task: str, attention: bool) -> tuple[str, ...]:
    """The pictures written per image: ``NAME + suffix + ".png"``."""
    if task == "segmentation":
        return ("", "_mask")
    return ("", "_attention") if attention else ("",)


def output_stems(paths: list[Path], task: str, *, attention: bool = False) -> list[str]:
    """The NAME of each image's pictures: its stem, with -1, -2, ... where one of its pictures would take a
    name another's has (x.png twice; a.png beside a_mask.png for segment)."""
    from vitlab.data import unique_stems

    return unique_stems(paths, _suffixes(task, attention))


def output_files(paths: list[Path], output: Path, task: str, *, attention: bool = False) -> list[Path]:
    """The files :func:`detect_images` (``task`` "detection") or :func:`segment_images` writes for ``paths``;
    each name once (a name given twice would be one image's results written over another's)."""
    suffixes = _suffixes(task, attention)
    pictures = [output / f"{stem}{suffix}.png" for stem in output_stems(paths, task, attention=attention)
                for suffix in suffixes]
    planned = [*pictures, output / RESULTS_FILES[task]]
    if twice := sorted(str(f) for f, n in Counter(planned).items() if n > 1):
        raise ValueError(f"internal error: {', '.join(twice)} would be written for two inputs (a bug in vitlab's "
                         f"output names); nothing was written")
    return planned


def check_output_files(paths: list[Path], output: Path, task: str, *, attention: bool = False,
                       overwrite: bool = False) -> None:
    """Before anything is written: refuse an output file that is one of the input images (always: a folder of
    images given as its own ``output``), and one that exists unless ``overwrite``. The error lists them."""
    earlier = f"the results of an earlier `{_COMMANDS[task]}` there?" if (output / RESULTS_FILES[task]).is_file() else ""
    check_outputs_free(output_files(paths, output, task, attention=attention), inputs=paths, output=output,
                       overwrite=overwrite, earlier=earlier)


@torch.no_grad()
def detect_images(model: nn.Module, paths: list[Path], output: Path, *, threshold: float = 0.5,
                  attention: bool = False, skip_bad_images: bool = False,
                  overwrite: bool = True) -> list[dict[str, Any]]:
    """Draw boxes, labels and scores on each image (``output/NAME.png``) and write ``detections.json``;
    with ``attention``, also each detected object's decoder cross-attention (``NAME_attention.png``, where an
    object was found). NAME: :func:`output_stems`; each entry names its files, relative to ``output``
    (``picture``, ``attention``).

    ``skip_bad_images``: an undecodable file gets an entry with its ``error`` and the rest go on; otherwise it
    stops the run, and ``detections.json`` still holds the images done before it. ``overwrite=False`` refuses
    files that exist in ``output`` (``vitlab detect`` without --overwrite); an input image is never written over
    (:func:`check_output_files`)."""
    check_output_files(paths, output, "detection", attention=attention, overwrite=overwrite)
    names = _names(model)
    output.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    with _written_at_the_end(results, output / "detections.json"):
        for path, stem in zip(paths, output_stems(paths, "detection", attention=attention)):
            if (prepared := _prepare_or_skip(model, path, results, skip_bad_images)) is not None:
                results.append(_detect_one(model, path, stem, prepared, output, names, threshold, attention))
    return results


def _detect_one(model: nn.Module, path: Path, stem: str, prepared: tuple, output: Path, names: list[str],
                threshold: float, attention: bool) -> dict[str, Any]:
    """One image of :func:`detect_images`: its picture (and attention) written, its entry returned."""
    from PIL import Image, ImageDraw

    from vitlab.tasks.metrics import detections_from_outputs

    x, image, _ = prepared
    H, W = image.shape[-2:]
    if attention:
        from vitlab.analysis.explain_detr import detection_attention

        out, maps = detection_attention(model, x[None])
    else:
        out = model(x[None])
    (det,) = detections_from_outputs(out["logits"], out["boxes"], [(H, W)], threshold=threshold)
    pic = Image.fromarray(_rgb(image)).convert("RGB")
    draw = ImageDraw.Draw(pic)
    objects = []
    for box, label, score in zip(det["boxes"].tolist(), det["labels"].tolist(), det["scores"].tolist()):
        draw.rectangle(box, outline=(255, 64, 64), width=max(1, round(min(H, W) / 150)))
        draw.text((box[0] + 2, box[1] + 1), f"{names[label]} {score:.2f}", fill=(255, 255, 0))
        objects.append({"label": names[label], "class_index": label, "score": round(score, 4),
                        "box_xyxy": [round(v, 2) for v in box]})
    _save_image(pic, output / f"{stem}.png")
    files = {"picture": f"{stem}.png"}
    if attention and objects:
        keep = (out["logits"][0].softmax(-1)[:, :-1].max(-1).values >= threshold).nonzero().flatten()
        titles = [f"{o['label']} {o['score']:.2f}" for o in objects]
        atomic_write(output / f"{stem}_attention.png",
                     lambda tmp: _save_attention(pic, maps[0, keep], Path(tmp), titles))
        files["attention"] = f"{stem}_attention.png"
    return {"image": str(path), **files, "width": W, "height": H, "objects": objects}


@contextlib.contextmanager
def _written_at_the_end(results: list[dict[str, Any]], path: Path):
    """``results`` written to ``path`` when the loop ends, also when an image stops it: what was done is kept."""
    try:
        yield
    finally:
        text = json.dumps(results, indent=2)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _save_image(image, path: Path) -> None:
    """A PIL image written as PNG by replacing ``path``: a symbolic link there is replaced, never written
    through (each output file of detect / segment is written so)."""
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def _prepare_or_skip(model: nn.Module, path: Path, results: list[dict[str, Any]], skip: bool):
    from vitlab.data import BadImageError

    try:
        return _prepare(model, path)
    except BadImageError as e:
        if not skip:
            raise BadImageError(f"{e} (--skip-bad-images reports such files and goes on)") from e
        log.warning("skipped %s", e)
        results.append({"image": str(path), "error": str(e)})
        return None


def _rgb(image: Tensor):
    import numpy as np

    a = image.permute(1, 2, 0).numpy()
    return np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a


def _save_attention(pic, maps: Tensor, path: Path, titles: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(maps)
    fig, axes = plt.subplots(1, n + 1, figsize=(3 * (n + 1), 3), squeeze=False)
    axes[0, 0].imshow(pic)
    axes[0, 0].set_title("detections")
    for i in range(n):
        m = torch.nn.functional.interpolate(maps[i][None, None], size=(pic.height, pic.width), mode="bilinear")[0, 0]
        axes[0, i + 1].imshow(pic)
        axes[0, i + 1].imshow(m.numpy(), alpha=0.6, cmap="jet")
        axes[0, i + 1].set_title(titles[i] if i < len(titles) else "")
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


PALETTE = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
           (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
           (0, 0, 128), (128, 128, 128)]


@torch.no_grad()
def segment_images(model: nn.Module, paths: list[Path], output: Path, *, alpha: float = 0.5,
                   skip_bad_images: bool = False, overwrite: bool = True) -> list[dict[str, Any]]:
    """A colour overlay (``NAME.png``) and the class-index mask (``NAME_mask.png``: 8-bit grey, 16-bit for a
    model of more than 256 classes) per image, and ``segments.json``, whose entries name them (``picture``,
    ``mask``, relative to ``output``); NAME, ``skip_bad_images`` and ``overwrite`` as in :func:`detect_images`."""
    import numpy as np
    from PIL import Image

    check_output_files(paths, output, "segmentation", overwrite=overwrite)
    output.mkdir(parents=True, exist_ok=True)
    names = _names(model)
    colours = np.array([PALETTE[i % len(PALETTE)] for i in range(model.num_classes)], dtype=np.float32)
    mask_dtype = np.uint8 if model.num_classes <= 256 else np.uint16  # class 299 must not be written as 43
    results: list[dict[str, Any]] = []
    with _written_at_the_end(results, output / "segments.json"):
        for path, stem in zip(paths, output_stems(paths, "segmentation")):
            if (prepared := _prepare_or_skip(model, path, results, skip_bad_images)) is None:
                continue
            x, image, _ = prepared
            H, W = image.shape[-2:]
            logits = model(x[None])["logits"]
            pred = torch.nn.functional.interpolate(logits, size=(H, W), mode="bilinear").argmax(1)[0].numpy()
            overlay = (1 - alpha) * _rgb(image).astype(np.float32) + alpha * colours[pred]
            overlay = np.where((pred == 0)[..., None], _rgb(image), overlay)  # class 0 (background) left as is
            _save_image(Image.fromarray(overlay.clip(0, 255).astype(np.uint8)), output / f"{stem}.png")
            _save_image(Image.fromarray(pred.astype(mask_dtype)), output / f"{stem}_mask.png")  # mode L or I;16
            present = {names[c]: int((pred == c).sum()) for c in np.unique(pred).tolist()}
            results.append({"image": str(path), "picture": f"{stem}.png", "mask": f"{stem}_mask.png",
                            "pixels_per_class": present})
    return results


__all__ = ["COCO_JSON_NAMES", "DENSE_RUNTIMES", "DenseJob", "check_dense_files", "check_output_files",
           "coco_split_files", "detect_images", "evaluate_folder", "format_metrics", "ignore_index_of", "load_dense",
           "output_files", "output_stems", "recorded_categories", "run_dense_training", "segment_images", "split_dir",
           "task_of", "transform_for", "unnamed_detector_categories"]
