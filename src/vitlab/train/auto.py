"""The recipe chooser: a training recipe from what the data is and what the machine can do.

``vitlab train --data DIR`` without ``--recipe`` runs :func:`choose_recipe` on the data's facts (image
size, channels, number of images and classes) and the machine's (cores, threads, bfloat16 support, GPU).
It is a pure function, so that it can be checked on data sets described by hand.

How it decides, in order:

1. Resolution and patches. Small images (short side <= 64 px) train at their own size; larger ones at
   64 px on a CPU, 128 px on a GPU with less than 16 GB, 224 px on a larger GPU. The patch size gives a
   grid of about 7-8 patches per side (14 at 224 px), the layout that small-data ViT work found to
   learn fastest; the resolution is rounded to a multiple of it.
2. The time available: ``time_budget_s``, or by default 20 minutes on a CPU and 30 on a GPU, so that no
   data set gets a configuration that cannot finish on the machine at hand (the paper-scale recipes stay
   available by name).
3. Model size: the widest/deepest rung of a ladder of small ViTs (width 64 .. 384, depth 4 .. 12) that
   fits the data (parameters at most ``PARAMS_PER_IMAGE`` x images) and fits a third of the wanted
   epochs into the time (failing that, ``MIN_EPOCHS``), by an estimate of training FLOPs per image and
   the machine's FLOP rate. The wanted number of epochs falls with the data set's size (small data
   needs more passes); the run gets as many of them as the time allows.
4. Batch, learning rate and schedule: batch 128 (256 on a GPU; never more than a sixteenth of the
   data), AdamW at 2e-3 scaled by sqrt(batch / 128), cosine decay after a 5% warm-up, label smoothing
   0.1, weight decay 0.05.
5. Augmentation strength: random-resized crops whose smallest area falls with the run's length;
   horizontal flips for colour images only (small grayscale images are usually characters, which
   mirroring changes); RandAugment and stochastic depth only for long runs.
6. Precision: bfloat16 autocast on a GPU that has it; on a CPU with native bfloat16 (AVX512-BF16/AMX)
   only for models of width >= ``CPU_BF16_MIN_WIDTH``: the small models' matmuls are too small for
   bf16 to pay for autocast's casts (measured 2-3x slower than float32 for width 64 on an AMD EPYC with
   AVX512-BF16, machine shared); float32 elsewhere.

The estimate is rough (within a factor of two); ``--time-budget`` replaces it by a measurement of the
first steps (:mod:`vitlab.train.budget`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

from vitlab.train.hardware import Hardware
from vitlab.train.recipe import Recipe

log = logging.getLogger(__name__)

DEFAULT_BUDGET_CPU_S = 20 * 60
DEFAULT_BUDGET_GPU_S = 30 * 60
MIN_EPOCHS = 10
PARAMS_PER_IMAGE = 200  # a model of more than this many parameters per training image overfits
TRAIN_FLOP_FACTOR = 3.0  # forward + backward ~ 3 forwards
# Effective training FLOP rates of small ViTs (their matmuls are small, so far below the peak):
# measured about 45 GFLOP/s on one core of an AMD EPYC (the mnist recipe: 650 img/s x 72 MFLOP);
# taken lower here because a laptop or a shared machine does not reach it.
CPU_FLOPS_PER_THREAD = 25e9
GPU_FLOPS = 30e12
BF16_SPEEDUP_CPU = 1.5
# Per-image cost outside the model (augmentation, collation on the CPU), and per optimiser step (kernel
# launches, optimiser), seconds.
CPU_IMAGE_OVERHEAD_S = 2e-4
STEP_OVERHEAD_S = 2e-3

# (embed_dim, depth, num_heads, mlp_ratio), smallest first.
LADDER: tuple[tuple[int, int, int, float], ...] = (
    (64, 4, 4, 2.0),
    (64, 6, 4, 2.0),
    (128, 6, 4, 2.0),
    (192, 8, 3, 3.0),
    (192, 12, 3, 4.0),
    (256, 12, 4, 4.0),
    (384, 12, 6, 4.0),
)
BASE_MODEL = "vit_tiny_patch16_224"


@dataclass(frozen=True, kw_only=True)
class DataFacts:
    """What the chooser needs to know about a training split.

    Args:
        image_size: (H, W) of the images (native, or typical for a folder of mixed sizes).
    """

    num_images: int
    num_classes: int
    image_size: tuple[int, int]
    channels: int
    has_test: bool = False  # the source has a test set of its own (else "test" is the held-out part)


@dataclass(frozen=True, kw_only=True)
class AutoChoice:
    recipe: Recipe
    estimated_s: float
    summary: str


def vit_train_flops(*, img: int, patch: int, channels: int, embed_dim: int, depth: int, mlp_ratio: float) -> float:
    """Training FLOPs per image of a plain ViT (class token, learned positions), forward x TRAIN_FLOP_FACTOR."""
    grid = img // patch
    tokens = grid * grid + 1
    per_token = (4 + 2 * mlp_ratio) * embed_dim * embed_dim  # qkv + proj + MLP, multiply-adds
    macs = depth * (tokens * per_token + 2 * tokens * tokens * embed_dim)  # + QK^T and AV
    macs += grid * grid * channels * patch * patch * embed_dim  # patch embedding
    return 2.0 * macs * TRAIN_FLOP_FACTOR


def vit_params(*, img: int, patch: int, channels: int, embed_dim: int, depth: int, mlp_ratio: float,
               num_classes: int) -> int:
    tokens = (img // patch) ** 2 + 1
    hidden = int(embed_dim * mlp_ratio)
    block = 4 * embed_dim * embed_dim + 4 * embed_dim + 2 * embed_dim * hidden + hidden + embed_dim + 4 * embed_dim
    return (depth * block + channels * patch * patch * embed_dim + embed_dim + tokens * embed_dim + embed_dim
            + 2 * embed_dim + embed_dim * num_classes + num_classes)


CPU_BF16_MIN_WIDTH = 384


def use_bf16(hw: Hardware, embed_dim: int) -> bool:
    if hw.gpu:
        return hw.gpu_bf16
    return hw.cpu_bf16 and embed_dim >= CPU_BF16_MIN_WIDTH


def flops_per_second(hw: Hardware, bf16: bool) -> float:
    if hw.gpu:
        return GPU_FLOPS * (2.0 if bf16 else 1.0)
    return CPU_FLOPS_PER_THREAD * max(1, hw.threads) * (BF16_SPEEDUP_CPU if bf16 else 1.0)


def image_seconds(hw: Hardware, flops: float, bf16: bool, batch: int = 128) -> float:
    """Estimated seconds per training image: the model, the data pipeline (on a GPU machine the CPU
    workers prepare images while the GPU computes, so the slower of the two counts) and the step's
    fixed cost shared by the batch."""
    model = flops / flops_per_second(hw, bf16)
    if hw.gpu:
        return max(model, CPU_IMAGE_OVERHEAD_S / max(1, hw.cores - 1)) + STEP_OVERHEAD_S / batch
    return model + CPU_IMAGE_OVERHEAD_S + STEP_OVERHEAD_S / batch


def choose_resolution(data: DataFacts, hw: Hardware) -> tuple[int, int]:
    """(img_size, patch_size): see step 1 of the module docstring."""
    short = min(data.image_size)
    if short <= 64:
        target = short
    elif not hw.gpu:
        target = 64
    else:
        target = 128 if hw.gpu_memory_gb < 16 else 224
    grid = 14 if target >= 224 else (8 if target >= 32 else 7 if target >= 28 else 4)
    patch = max(1, round(target / grid))
    img = max(patch, round(target / patch) * patch)
    return img, patch


def wanted_epochs(num_images: int) -> int:
    """More passes for less data: 30 at a million images, 120 at 60,000, at most 200."""
    return int(min(200, max(20, round(30 * math.sqrt(1e6 / max(num_images, 1))))))


def choose_recipe(data: DataFacts, hw: Hardware, *, time_budget_s: float | None = None,
                  model: str | None = None, model_flops: float | None = None,
                  model_width: int | None = None) -> AutoChoice:
    """A recipe for ``data`` on ``hw`` that finishes within ``time_budget_s`` (default: 20 min CPU, 30 GPU).

    Args:
        model / model_flops / model_width: a model the user named (``--model``), its training FLOPs per
            image at its own resolution and its token width: the chooser then sizes only the schedule,
            batch, augmentation and precision for it.
    """
    if data.num_classes < 2:
        raise ValueError(f"choose_recipe: {data.num_classes} class(es); a classifier needs at least two")
    if data.num_images < 1:
        raise ValueError("choose_recipe: no training images")
    budget = time_budget_s or (DEFAULT_BUDGET_GPU_S if hw.gpu else DEFAULT_BUDGET_CPU_S)
    n = data.num_images
    want = wanted_epochs(n)
    floor = min(want, MIN_EPOCHS)
    generous = max(floor, want / 3)

    img, patch = choose_resolution(data, hw)
    overrides: dict[str, Any] = {}
    if model is None:
        fits: list[tuple[tuple[int, int, int, float], float]] = []  # (rung, epochs that fit), data-sized rungs
        for cand in LADDER:
            d, depth, heads, mlp = cand
            shape = {"img": img, "patch": patch, "channels": data.channels, "embed_dim": d, "depth": depth,
                     "mlp_ratio": mlp}
            if vit_params(**shape, num_classes=data.num_classes) <= PARAMS_PER_IMAGE * n or cand == LADDER[0]:
                fits.append((cand, budget / (n * image_seconds(hw, vit_train_flops(**shape), use_bf16(hw, d)))))
        # the largest rung that gets a third of the wanted epochs; failing that, MIN_EPOCHS; else the smallest
        rung = next((c for c, e in reversed(fits) if e >= generous), None) or \
            next((c for c, e in reversed(fits) if e >= floor), LADDER[0])
        d, depth, heads, mlp = rung
        bf16 = use_bf16(hw, d)
        flops = vit_train_flops(img=img, patch=patch, channels=data.channels, embed_dim=d, depth=depth,
                                mlp_ratio=mlp)
        overrides = {"patch_size": patch, "embed_dim": d, "depth": depth, "num_heads": heads, "mlp_ratio": mlp,
                     "crop_pct": 1.0}
        model_name = BASE_MODEL
    else:
        if model_flops is None:
            raise ValueError("choose_recipe: give model_flops with model")
        flops, model_name, img = model_flops, model, None
        bf16 = use_bf16(hw, model_width or 0)

    batch = 256 if hw.gpu else 128
    batch = max(8, min(batch, 2 ** int(math.log2(max(8, n // 16)))))
    per_image = image_seconds(hw, flops, bf16, batch)
    epochs_fit = budget / (n * per_image)
    steps_per_epoch = max(1, n // batch)
    if epochs_fit >= 1:
        epochs, max_steps = max(1, min(want, int(epochs_fit))), None
        total_steps = epochs * steps_per_epoch
    else:  # not even one pass fits: stop part-way, with the schedule ending on time
        epochs, max_steps = 1, max(1, int(epochs_fit * steps_per_epoch))
        total_steps = max_steps
    long_run = epochs >= 40
    colour = data.channels == 3
    small = min(data.image_size) <= 64
    if model is None and long_run and depth_of(overrides) >= 6:
        overrides["drop_path_rate"] = 0.1
    scale_min = (0.35 if long_run else 0.6) if colour or not small else 0.8
    recipe = Recipe(
        name="auto",
        model=model_name,
        model_overrides=overrides,
        img_size=img,
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch,
        optimizer="adamw",
        lr=round(2e-3 * math.sqrt(batch / 128), 6),
        weight_decay=0.05,
        schedule="cosine",
        warmup_steps=max(1, round(0.05 * total_steps)),
        min_lr=1e-5,
        label_smoothing=0.1,
        amp="bf16" if bf16 else "none",
        # a held-out part measures the run where the source has no test set of its own
        val_fraction=0.0 if data.has_test else 0.1,
        augment=True,
        scale=(scale_min, 1.0),
        ratio=(0.75, 4 / 3) if not small else (0.8, 1.25),
        hflip=0.5 if colour else 0.0,
        randaugment=(2, 7) if long_run and colour else None,
        eval_every_epochs=max(1, epochs // 4),
        log_every=max(1, min(50, steps_per_epoch // 4)),
    )
    estimated = total_steps * batch * per_image
    where = f"{hw.gpu}" if hw.gpu else f"{hw.threads} CPU thread{'s' if hw.threads != 1 else ''}"
    arch = (f"{model_name} with embed_dim={overrides['embed_dim']}, depth={overrides['depth']}, "
            f"patch_size={patch}" if model is None else model_name)
    summary = (f"auto recipe: {arch} at {f'{img} px' if img else 'its own resolution'}; batch {batch}, "
               f"{epochs if max_steps is None else f'{max_steps} steps of 1'} epoch(s) of {n:,} images "
               f"({total_steps:,} steps), {'bf16' if bf16 else 'float32'}, "
               f"{'flips, ' if colour else ''}crops {scale_min:g}-1; estimated {_duration(estimated)} on {where} "
               f"(budget {_duration(budget)})")
    description = (f"Chosen by vitlab.train.auto for {n:,} images of {data.image_size[0]}x{data.image_size[1]} px, "
                   f"{data.channels} channel(s), {data.num_classes} classes on {where}: {summary}")
    return AutoChoice(recipe=recipe.replace(description=description), estimated_s=estimated, summary=summary)


def depth_of(overrides: dict[str, Any]) -> int:
    return int(overrides.get("depth", 12))


def _duration(seconds: float) -> str:
    from vitlab.train.progress import format_duration

    return format_duration(seconds)


def data_facts(ds) -> DataFacts:
    """The facts of a training split (a :class:`vitlab.data.VisionDataset`): the native size, or for a folder
    of files the median size of a few headers."""
    size = ds.native_size
    if size is None:
        size = _typical_file_size(getattr(ds, "paths", []))
    return DataFacts(num_images=len(ds), num_classes=len(ds.classes), image_size=tuple(size), channels=ds.in_chans)


def facts_for_source(source: str) -> DataFacts:
    """The facts of a data source's training data (all of it: the held-out part is small)."""
    from vitlab.data import build_dataset, parse_source
    from vitlab.data.folder import folder_layout

    kind, path = parse_source(source)
    has_test = kind in ("digits", "mnist", "cifar") or (kind == "folder" and folder_layout(path)[2] is not None)
    return dataclasses.replace(data_facts(build_dataset(source, split="train", val_fraction=0.0)),
                               has_test=has_test)


def _typical_file_size(paths: list[str], sample: int = 16) -> tuple[int, int]:
    from vitlab.data.image import _open_unguarded

    step = max(1, len(paths) // sample)
    sizes = []
    for p in paths[::step][:sample]:
        try:
            with _open_unguarded(p) as img:
                w, h = img.size
                sizes.append((h, w))
        except Exception:  # noqa: BLE001 - a bad file is reported when it is decoded
            continue
    if not sizes:
        return (224, 224)
    sizes.sort(key=lambda s: s[0] * s[1])
    return sizes[len(sizes) // 2]


def with_changes(choice: AutoChoice, **changes: Any) -> AutoChoice:
    return dataclasses.replace(choice, recipe=choice.recipe.replace(**changes))
