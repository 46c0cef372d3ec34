"""A training job from a recipe and a data source: what ``vitlab train`` and ``vitlab finetune`` run.

It builds the data splits and the model, attaches the model's own preprocessing to the data, runs
:func:`vitlab.train.fit` (under torchrun too) and evaluates the result on the test split.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from vitlab.checkpoints import CheckpointError
from vitlab.models.registry import get_entry
from vitlab.train.distributed import DistContext, distributed_context
from vitlab.train.evaluate import EvalResult, evaluate
from vitlab.train.losses import ClassificationLoss
from vitlab.train.recipe import Recipe
from vitlab.train.state import load_train_state
from vitlab.train.trainer import EMA_FILE, STATE_FILE, atomic_text, fit

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"


@dataclass(kw_only=True)
class Distill:
    teacher: str
    kind: Literal["soft", "hard"] = "soft"
    alpha: float = 0.5
    tau: float = 1.0


@dataclass(kw_only=True)
class TrainJob:
    recipe: Recipe
    data: str
    output: Path
    model: str | None = None
    pretrained: str | None = None  # fine-tuning: a checkpoint or published weights
    device: str | None = None
    resume: bool = False
    overwrite: bool = False
    skip_bad_images: bool = False
    distill: Distill | None = None
    progress: bool = True
    until_step: int | None = None
    compile: bool = False  # torch.compile the training forward (compile time reported apart)
    extra_overrides: dict[str, Any] = field(default_factory=dict)


def _model_overrides(name: str, recipe: Recipe, in_chans: int | None) -> dict[str, Any]:
    """The recipe's model overrides, plus the data's channel count for a model trained from scratch."""
    template = get_entry(name).config
    fields = {f.name for f in dataclasses.fields(template)}
    out = dict(recipe.model_overrides)
    if in_chans is not None and "in_chans" in fields and "in_chans" not in out:
        out["in_chans"] = in_chans
    c = out.get("in_chans", getattr(template, "in_chans", 3))
    for key in ("mean", "std"):  # a 1-channel model needs 1-value normalisation
        if key in fields and key not in out and len(getattr(template, key)) != c:
            out[key] = tuple(getattr(template, key)[:1]) * c
    return out


def build_model(job: TrainJob, num_classes: int, in_chans: int) -> nn.Module:
    import vitlab

    recipe = job.recipe
    torch.manual_seed(recipe.seed)  # the same initial weights on every rank and every run
    if job.pretrained is None:
        name = job.model or recipe.model
        if name is None:
            raise ValueError("no model: give --model NAME (see `vitlab models`) or a recipe with a `model` field")
        overrides = {**_model_overrides(name, recipe, in_chans), **job.extra_overrides}
        return vitlab.create_model(name, num_classes=num_classes, img_size=recipe.img_size, **overrides)
    name = job.model or pretrained_model_name(job.pretrained)
    overrides = {**recipe.model_overrides, **job.extra_overrides}
    model = vitlab.create_model(name, pretrained=job.pretrained, num_classes=num_classes, img_size=recipe.img_size,
                                **overrides)
    if recipe.zero_init_head:
        model.reset_classifier(num_classes)  # the paper's zero-initialised D x K head, also when K is unchanged
    return model


def pretrained_model_name(source: str) -> str:
    """The registered name recorded in a vitlab checkpoint; other formats need --model."""
    from vitlab.checkpoints import read_vitlab, resolve

    p = resolve(source)
    weights = p / "model.safetensors" if p.is_dir() else p
    got = read_vitlab(weights) if weights.name.endswith(".safetensors") and weights.exists() else None
    if got is None:
        raise ValueError(f"--from {source}: not a vitlab checkpoint, so the architecture is unknown; "
                         f"add --model NAME (e.g. --model vit_base_patch16_224)")
    return got[1]["model"]


def _check_output(job: TrainJob) -> None:
    state = job.output / STATE_FILE
    if job.resume or job.overwrite or not state.exists():
        return
    try:
        s = load_train_state(state)
        unfinished = int(s["step"]) < int(s.get("total_steps", 0))
    except (CheckpointError, KeyError, ValueError):
        unfinished = True
    if unfinished:
        raise ValueError(f"{job.output} holds an unfinished run (step {s.get('step', '?')}); "
                         f"continue it with --resume, or start over with --overwrite or another --output")
    log.warning("%s holds a finished run; it is replaced", job.output)


def run_training(job: TrainJob) -> dict[str, Any]:
    """Build data and model, train, evaluate on the test split; returns the results (rank 0: also written)."""
    from vitlab.data import build_dataset, eval_transform, train_transform

    recipe = job.recipe
    with distributed_context(job.device) as ctx:
        if not ctx.is_main:
            logging.getLogger("vitlab").setLevel(logging.WARNING)
        if ctx.device.type == "cpu" and recipe.cpu_threads is not None:
            torch.set_num_threads(recipe.cpu_threads)
        if ctx.is_main:
            _check_output(job)
        if ctx.is_main:
            job.output.mkdir(parents=True, exist_ok=True)
            atomic_text(job.output / "job.json", json.dumps({
                "data": job.data, "model": job.model or recipe.model, "pretrained": job.pretrained,
                "skip_bad_images": job.skip_bad_images}, indent=2))
        common = {"val_fraction": recipe.val_fraction, "seed": recipe.seed, "skip_bad_images": job.skip_bad_images}
        train_set = build_dataset(job.data, split="train", **common)
        val_set = build_dataset(job.data, split="val", **common) if recipe.val_fraction > 0 else None
        test_set = build_dataset(job.data, split="test", **common) if ctx.is_main else None
        model = build_model(job, num_classes=len(train_set.classes), in_chans=train_set.in_chans)
        pre = model.preprocessing
        if recipe.augment:
            train_set.transform = train_transform(
                pre, scale=recipe.scale, ratio=recipe.ratio, hflip=recipe.hflip, randaugment=recipe.randaugment,
                randaugment_mstd=recipe.randaugment_mstd, re_prob=recipe.re_prob)
        else:
            train_set.transform = eval_transform(pre)
        for ds in (val_set, test_set):
            if ds is not None:
                ds.transform = eval_transform(pre)
        criterion = _distillation(job, ctx, model, train_set.classes) if job.distill is not None else None
        result = fit(model, recipe, train_set=train_set, val_set=val_set, output_dir=job.output, ctx=ctx,
                     resume=job.resume, class_names=train_set.classes, criterion=criterion,
                     until_step=job.until_step, progress=job.progress, compile=job.compile)
        summary: dict[str, Any] = {"model": model.model_name, "recipe": recipe.name, "data": job.data,
                                   "steps": result.step, "global_batch": result.global_batch,
                                   "train_seconds": round(result.seconds, 1), "val": result.val,
                                   "checkpoint": str(result.model_path)}
        if job.compile:
            summary["compile_seconds"] = None if result.compile_seconds is None else round(result.compile_seconds, 1)
            summary["compile_failed"] = result.compile_failed
        if ctx.is_main and test_set is not None and result.step >= result.total_steps:
            if hasattr(model, "set_distilled_training"):
                model.set_distilled_training(False)
            summary["test"] = _test(model, test_set, recipe, ctx, "model")
            if recipe.ema_decay is not None:
                import vitlab

                ema_model = vitlab.load_model(job.output / EMA_FILE).to(ctx.device)
                summary["test_ema"] = _test(ema_model, test_set, recipe, ctx, "EMA model")
            if job.skip_bad_images:
                summary["skipped_images"] = train_set.num_skipped + (val_set.num_skipped if val_set else 0)
            atomic_text(job.output / "results.json", json.dumps(summary, indent=2))
        return summary


def _test(model: nn.Module, test_set, recipe: Recipe, ctx: DistContext, label: str) -> dict[str, Any]:
    r: EvalResult = evaluate(model, test_set, num_classes=len(test_set.classes), device=ctx.device, amp=recipe.amp,
                             batch_size=max(256, recipe.batch_size))
    log.debug("test accuracy (%s, %d images): top-1 %.4f, top-5 %.4f", label, r.num_samples, r.top1, r.top5)
    return r.summary()


def _distillation(job: TrainJob, ctx: DistContext, student: nn.Module, classes: list[str]):
    import vitlab
    from vitlab.train.distill import DistillationLoss, adapt_teacher, check_teacher_classes

    d = job.distill
    teacher = vitlab.load_model(d.teacher)
    check_teacher_classes(teacher, classes)
    teacher = adapt_teacher(teacher, student.preprocessing).to(ctx.device)
    base = ClassificationLoss(label_smoothing=job.recipe.label_smoothing)
    log.info("distilling from %s (%s, alpha %.2f, tau %.2f)", d.teacher, d.kind, d.alpha, d.tau)
    return DistillationLoss(base, teacher, kind=d.kind, alpha=d.alpha, tau=d.tau)
