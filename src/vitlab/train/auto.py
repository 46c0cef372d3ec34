"""The recipe chooser: a training recipe from what the data is and what the machine can do.

``vitlab train --data DIR`` without ``--recipe`` runs :func:`choose_recipe` on the data's facts (image
size, channels, number of images and classes) and the machine's (cores, threads, bfloat16 support, GPU).
It is a pure function, so that it can be checked on data sets described by hand.

How it decides, in order:

1. Resolution and tokens. Small images (short side <= 64 px) train at their own size; larger ones at
   64 px on a CPU, 128 px on a GPU with less than 16 GB, 224 px on a larger GPU. Up to 64 px the model is
   a Compact Convolutional Transformer (CCT, Hassani et al. 2021: a convolutional tokenizer and sequence
   pooling, the small-data ViT levers that paid most per CPU second on CIFAR-10, see
   benchmarks/RESULTS.md), with as many conv + max-pool blocks as give a token grid of about 8 per side;
   above 64 px a plain ViT whose patch size gives a grid of about 7-8 patches per side (14 at 224 px),
   the resolution rounded to a multiple of it.
2. The time available: ``time_budget_s``, or by default 20 minutes on a CPU and 30 on a GPU, so that no
   data set gets a configuration that cannot finish on the machine at hand (the paper-scale recipes stay
   available by name).
3. Model size: the widest/deepest rung of a ladder of small models (CCT-2 .. CCT-14, or ViTs of width
   64 .. 384 and depth 4 .. 12) that
   fits the data (parameters at most ``PARAMS_PER_IMAGE`` x images) and fits a third of the wanted
   epochs into the time (failing that, ``MIN_EPOCHS``), by an estimate of training FLOPs per image and
   the machine's FLOP rate. The wanted number of epochs falls with the data set's size (small data
   needs more passes); the run gets as many of them as the time allows.
4. Batch, learning rate and schedule: batch 64 (256 on a GPU; never more than a sixteenth of the
   data, nor more than its training images), AdamW at 2e-3 scaled by sqrt(batch / 128), cosine decay after
   a 5% warm-up, label smoothing 0.1, weight decay 0.05. Everything is sized by the images the run trains
   on: where the source has no val/ or test/ set of its own, 10% of each class is held out to measure it.
5. Augmentation strength: random-resized crops whose smallest area falls with the run's length;
   horizontal flips for colour images only (small grayscale images are usually characters, which
   mirroring changes; RGB files whose sampled pixels are all grey count as grey); RandAugment, stochastic
   depth and attention dropout only for long runs. Pictures beyond 3:2 (or 2:3) are squashed whole to the
   square input (crop_mode "squash") and cropped in training with their own aspect. Strongly imbalanced classes
   (the largest ``IMBALANCE_RATIO`` x the smallest) train with class-balanced sampling at power 0.5 (each class
   drawn in proportion to the square root of its images: ``AUTO_CLASS_BALANCE``), with a warning; imbalanced
   multi-label data gets the warning alone.
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

# CCT rungs (embed_dim, depth, num_heads, mlp_ratio): a half-width CCT-2 for tiny data sets, then the
# published sizes CCT-2, -4, -6, -7, -14.
CCT_LADDER: tuple[tuple[int, int, int, float], ...] = (
    (64, 2, 2, 1.0),
    (128, 2, 2, 1.0),
    (128, 4, 2, 1.0),
    (256, 6, 4, 2.0),
    (256, 7, 4, 2.0),
    (384, 14, 6, 3.0),
)
CCT_BASE_MODEL = "cct_7_3x2_32"
CCT_MAX_SIZE = 64  # resolutions up to this train a CCT, larger ones a ViT
# The tokenizer's first convolution has 32 channels, half the published CCTs' 64: on CIFAR-10, for the same 45
# minutes (three 1-thread runs side by side, seed 0), CCT-2 reached 78.64% with 32 channels (10,989 steps)
# against 76.90% with 64 (8,265 steps), and 78.56% with 32 channels and MLP ratio 2 (9,866 steps).
# benchmarks/RESULTS.md, "the tokenizer's width".
CCT_CONV_CHANNELS = 32
# A CCT's convolutions and 64-token sequences run nearer the CPU's peak than a tiny ViT's small matmuls:
# measured 47 vs 29 effective GFLOP/s in training steps on one core of an Intel Xeon (CCT-2/3x2 with 64 tokenizer
# channels against the width-64, depth-6 ViT with 4 px patches at 32 px, batch 128, channels-last): 1.6x. With
# 32 channels the convolutions are a smaller share: a step is 1.23x faster on 2 threads for 1.41x fewer FLOPs,
# so 1.6 x 1.23 / 1.41 = 1.4. A CCT's FLOPs count this much less in the time estimate; ``--time-budget``
# measures the real speed anyway.
CCT_CPU_EFFICIENCY = 1.4


@dataclass(frozen=True, kw_only=True)
class DataFacts:
    """What the chooser needs to know about a training split.

    Args:
        image_size: (H, W) of the images (native, or typical for a folder of mixed sizes).
    """

    num_images: int  # all the training data, before any part of it is held out for validation
    num_classes: int
    image_size: tuple[int, int]
    channels: int
    has_test: bool = False  # the source has a test set of its own (else "test" is the held-out part)
    has_val: bool = False  # the source has a validation set of its own (an image folder's val/)
    class_counts: tuple[int, ...] | None = None  # images per class (None: taken as even), for the held-out part
    grey_rgb: bool = False  # 3-channel files whose sampled pixels all have R == G == B (grey pictures saved as RGB)
    # several labels per image: class_counts are each label's positive images, and the held-out part is one
    # seeded draw over the images (vitlab.data.multilabel.random_split), not one per class
    multi_label: bool = False


def held_out_images(data: DataFacts, val_fraction: float) -> int:
    """How many of ``data``'s images a hold-out of ``val_fraction`` takes: per class, as
    :func:`vitlab.data.splits.stratified_split` draws it (round(fraction x n), at least one of a class of two
    or more, never all of it)."""
    if val_fraction <= 0:
        return 0
    if data.multi_label:
        from vitlab.data.splits import held_out_count

        return held_out_count(data.num_images, val_fraction)
    counts = data.class_counts
    if counts is None:
        q, r = divmod(data.num_images, max(1, data.num_classes))
        counts = tuple(q + (1 if i < r else 0) for i in range(data.num_classes))
    return sum(min(max(round(val_fraction * n), 1), n - 1) if n >= 2 else 0 for n in counts)


@dataclass(frozen=True, kw_only=True)
class AutoChoice:
    recipe: Recipe
    estimated_s: float
    summary: str


def encoder_macs(*, tokens: int, embed_dim: int, depth: int, mlp_ratio: float) -> float:
    """Multiply-adds of ``depth`` transformer blocks on ``tokens`` tokens: qkv, projection and MLP per token,
    plus q k^T and attn v."""
    per_token = (4 + 2 * mlp_ratio) * embed_dim * embed_dim
    return depth * (tokens * per_token + 2 * tokens * tokens * embed_dim)


def vit_train_flops(*, img: int, patch: int, channels: int, embed_dim: int, depth: int, mlp_ratio: float) -> float:
    """Training FLOPs per image of a plain ViT (class token, learned positions), forward x TRAIN_FLOP_FACTOR."""
    grid = img // patch
    tokens = grid * grid + 1
    macs = encoder_macs(tokens=tokens, embed_dim=embed_dim, depth=depth, mlp_ratio=mlp_ratio)
    macs += grid * grid * channels * patch * patch * embed_dim  # patch embedding
    return 2.0 * macs * TRAIN_FLOP_FACTOR


def cct_grid(img: int, num_conv: int) -> int:
    """Tokens per side after ``num_conv`` blocks of (3x3 conv, stride 1) -> max pool (3, stride 2, padding 1)."""
    for _ in range(num_conv):
        img = (img - 1) // 2 + 1
    return img


def cct_conv_layers(img: int) -> int:
    """The number of tokenizer blocks whose grid is nearest 8 per side (1 to 3)."""
    return min((1, 2, 3), key=lambda n: (abs(cct_grid(img, n) - 8), n))


def cct_train_flops(*, img: int, channels: int, embed_dim: int, depth: int, mlp_ratio: float, num_conv: int,
                    conv_channels: int = CCT_CONV_CHANNELS, kernel: int = 3) -> float:
    """Training FLOPs per image of a CCT (conv tokenizer, no class token, sequence pooling)."""
    macs, side, cin = 0.0, img, channels
    for i in range(num_conv):
        cout = embed_dim if i == num_conv - 1 else conv_channels
        macs += side * side * cin * cout * kernel * kernel
        side, cin = (side - 1) // 2 + 1, cout
    tokens = side * side
    macs += encoder_macs(tokens=tokens, embed_dim=embed_dim, depth=depth, mlp_ratio=mlp_ratio)
    macs += tokens * embed_dim  # sequence pooling
    return 2.0 * macs * TRAIN_FLOP_FACTOR


def model_params(name: str, overrides: dict[str, Any], *, img: int, channels: int, num_classes: int) -> int:
    """The parameter count of the model the recipe builds (built on the meta device: no memory, no init)."""
    import torch

    from vitlab.models.factory import create_model

    with torch.device("meta"):
        model = create_model(name, num_classes=num_classes, img_size=img, in_chans=channels, **overrides)
    return sum(p.numel() for p in model.parameters())


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
    if data.num_classes < (1 if data.multi_label else 2):
        raise ValueError(f"choose_recipe: {data.num_classes} class(es); a classifier needs at least two "
                         f"(a multi-label one at least one label)")
    if data.num_images < 1:
        raise ValueError("choose_recipe: no training images")
    budget = time_budget_s or (DEFAULT_BUDGET_GPU_S if hw.gpu else DEFAULT_BUDGET_CPU_S)
    # a held-out part measures the run where the source has no held-out set of its own (val/ or test/); the run
    # trains on the rest, which sizes everything below (epochs, model, batch)
    val_fraction = 0.0 if data.has_test or data.has_val else 0.1
    held = held_out_images(data, val_fraction)
    n = max(1, data.num_images - held)
    want = wanted_epochs(n)
    floor = min(want, MIN_EPOCHS)
    generous = max(floor, want / 3)

    img, patch = choose_resolution(data, hw)
    overrides: dict[str, Any] = {}
    if model is None:
        cct = img <= CCT_MAX_SIZE
        candidates = cct_candidates(img, data, hw) if cct else vit_candidates(img, patch, data)
        fits: list[tuple[Candidate, float]] = []  # (rung, epochs that fit), data-sized rungs
        for i, cand in enumerate(candidates):
            if cand.params <= PARAMS_PER_IMAGE * n or i == 0:
                fits.append((cand, budget / (n * image_seconds(hw, cand.cost_flops, use_bf16(hw, cand.width)))))
        # the largest rung that gets a third of the wanted epochs; failing that, MIN_EPOCHS; else the smallest
        chosen = next((c for c, e in reversed(fits) if e >= generous), None) or \
            next((c for c, e in reversed(fits) if e >= floor), candidates[0])
        overrides = dict(chosen.overrides)
        bf16 = use_bf16(hw, chosen.width)
        flops = chosen.cost_flops
        model_name = CCT_BASE_MODEL if cct else BASE_MODEL
    else:
        if model_flops is None:
            raise ValueError("choose_recipe: give model_flops with model")
        flops, model_name, img = model_flops, model, None
        bf16 = use_bf16(hw, model_width or 0)

    # on a CPU, 64: a small model runs about as many images per second as at 128, and a short run gets twice
    # the updates (CIFAR-10, CCT-2, 17 epochs: 79.2% against 78.7% at 128; benchmarks/RESULTS.md)
    batch = 256 if hw.gpu else 64
    batch = max(8, min(batch, 2 ** int(math.log2(max(8, n // 16)))))
    batch = max(1, min(batch, n))  # a tiny data set: one batch of all its training images
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
    colour = data.channels == 3 and not data.grey_rgb  # grey pictures stored as RGB get grey's choices
    small = min(data.image_size) <= 64
    h, w = data.image_size
    aspect = w / h
    squash = max(aspect, 1 / aspect) > ASPECT_LIMIT  # the whole picture to the square, in training and evaluation
    ratio = (0.75, 4 / 3) if not small else (0.8, 1.25)
    if squash:  # crops shaped as the pictures are (which the square input then squashes), not square ones
        ratio = (ratio[0] * aspect, ratio[1] * aspect)
        overrides["crop_mode"] = "squash"
    if model is None and model_name == CCT_BASE_MODEL:  # CCT's regularisers only pay in long runs
        overrides["drop_path_rate"] = overrides["attn_drop_rate"] = 0.1 if long_run else 0.0
    elif model is None and long_run and depth_of(overrides) >= 6:
        overrides["drop_path_rate"] = 0.1
    # crops: strong only in long runs; small images in short runs keep most of the picture (CIFAR-10, 5 epochs:
    # 71.1% with crops of 80-100% of the area against 69.9% with 60-100%)
    scale_min = 0.35 if long_run and (colour or not small) else (0.8 if small else 0.6)
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
        val_fraction=val_fraction,
        augment=True,
        scale=(scale_min, 1.0),
        ratio=ratio,
        hflip=0.5 if colour else 0.0,
        randaugment=(2, 7) if long_run and colour else None,
        eval_every_epochs=max(1, epochs // 4),
        log_every=max(1, min(50, steps_per_epoch // 4)),
        **(AUTO_CLASS_BALANCE if imbalanced(data.class_counts) and not data.multi_label else {}),
    )
    estimated = total_steps * batch * per_image
    for warning in data_warnings(data):
        log.warning("auto recipe: %s", warning)
    where = f"{hw.gpu}" if hw.gpu else f"{hw.threads} CPU thread{'s' if hw.threads != 1 else ''}"
    if model is None and model_name == CCT_BASE_MODEL:
        g = cct_grid(img, overrides["num_conv_layers"])
        arch = (f"{model_name} with embed_dim={overrides['embed_dim']}, depth={overrides['depth']}, "
                f"num_conv_layers={overrides['num_conv_layers']} ({g}x{g} tokens)")
    elif model is None:
        arch = (f"{model_name} with embed_dim={overrides['embed_dim']}, depth={overrides['depth']}, "
                f"patch_size={patch}")
    else:
        arch = model_name
    summary = (f"auto recipe: {arch} at {f'{img} px' if img else 'its own resolution'}; batch {batch}, "
               f"{epochs if max_steps is None else f'{max_steps} steps of 1'} epoch(s) of {n:,} images "
               f"({total_steps:,} steps{f'; {held:,} more held out for validation' if held else ''}), {'bf16' if bf16 else 'float32'}, "
               f"{'flips, ' if colour else 'grey pictures stored as RGB: no flips, ' if data.grey_rgb else ''}"
               f"crops {scale_min:g}-1{f' of aspect {ratio[0]:.2g}-{ratio[1]:.2g}, whole pictures squashed to the square' if squash else ''}"
               f"{'; class-balanced sampling (power 0.5)' if recipe.class_balance != 'none' else ''}; estimated {_duration(estimated)} on {where} "
               f"(budget {_duration(budget)})")
    description = (f"Chosen by vitlab.train.auto for {n:,} training images of {data.image_size[0]}x{data.image_size[1]} px, "
                   f"{data.channels} channel(s), {data.num_classes} {'labels' if data.multi_label else 'classes'} on {where}: "
                   f"{summary}")
    return AutoChoice(recipe=recipe.replace(description=description), estimated_s=estimated, summary=summary)


@dataclass(frozen=True)
class Candidate:
    """One rung of a ladder: the model overrides, its parameters and its training FLOPs per image as the
    time estimate counts them (``cost_flops``)."""

    overrides: dict[str, Any]
    params: int
    cost_flops: float
    width: int


def vit_candidates(img: int, patch: int, data: DataFacts) -> list[Candidate]:
    out = []
    for d, depth, heads, mlp in LADDER:
        shape = {"img": img, "patch": patch, "channels": data.channels, "embed_dim": d, "depth": depth,
                 "mlp_ratio": mlp}
        out.append(Candidate(
            overrides={"patch_size": patch, "embed_dim": d, "depth": depth, "num_heads": heads, "mlp_ratio": mlp,
                       "crop_pct": 1.0},
            params=vit_params(**shape, num_classes=data.num_classes), cost_flops=vit_train_flops(**shape), width=d))
    return out


def cct_candidates(img: int, data: DataFacts, hw: Hardware) -> list[Candidate]:
    num_conv = cct_conv_layers(img)
    out = []
    for d, depth, heads, mlp in CCT_LADDER:
        o = {"embed_dim": d, "depth": depth, "num_heads": heads, "mlp_ratio": mlp, "num_conv_layers": num_conv,
             "kernel_size": 3, "conv_channels": CCT_CONV_CHANNELS, "crop_pct": 1.0}
        flops = cct_train_flops(img=img, channels=data.channels, embed_dim=d, depth=depth, mlp_ratio=mlp,
                                num_conv=num_conv)
        out.append(Candidate(
            overrides=o, params=model_params(CCT_BASE_MODEL, o, img=img, channels=data.channels,
                                             num_classes=data.num_classes),
            cost_flops=flops if hw.gpu else flops / CCT_CPU_EFFICIENCY, width=d))
    return out


def depth_of(overrides: dict[str, Any]) -> int:
    return int(overrides.get("depth", 12))


# beyond this aspect ratio (either way) the square centre crop would drop a third or more of each picture: the
# whole picture is squashed to the square instead (photos of 4:3 and 3:2 are cropped as ImageNet's are)
ASPECT_LIMIT = 1.5
# the largest class this many times the smallest: the small classes' accuracy is worth a look of its own
IMBALANCE_RATIO = 10
# what single-label data past IMBALANCE_RATIO trains with: class-balanced sampling, class c drawn in proportion to
# sqrt(n_c). On long-tailed CIFAR-10 (imbalance 100, a balanced test split, the auto recipe's CCT for 4 minutes on one
# thread, seeds 0 and 1) it raised the balanced accuracy from 34.5% to 48.3% and the worst class's from 0% to 14.8%,
# for 1.7 points less accuracy over the training data's class mix (73.9% -> 72.2%); at imbalance 10 (seed 0): 48.4% ->
# 55.5% balanced, 64.0% -> 62.6% over the mix. Inverse-frequency sampling (power 1) gained as much balanced accuracy
# but lost 11 points of the mix, and the class-weighted loss gained less (41-42%) (benchmarks/RESULTS.md,
# "Imbalanced classes").
AUTO_CLASS_BALANCE = {"class_balance": "sampler", "class_balance_power": 0.5}


def imbalanced(counts: list[int] | None) -> bool:
    """Whether the largest class (of ``counts``, images per class) has at least ``IMBALANCE_RATIO`` times the images
    of the smallest."""
    return bool(counts) and max(counts) >= IMBALANCE_RATIO * max(min(counts), 1) and max(counts) > min(counts)


def data_warnings(data: DataFacts) -> list[str]:
    """What the user should know about the data: strongly imbalanced classes, and what the auto recipe does for
    them."""
    out = []
    counts = data.class_counts
    if imbalanced(counts):
        lo, hi = min(counts), max(counts)
        times = f" ({hi / lo:.0f}x)" if lo else ""
        if data.multi_label:
            out.append(f"imbalanced labels: the most frequent is on {hi:,} images, the rarest on {lo:,}{times}; rare "
                       f"labels can score far below the mean: --set class_balance=loss weighs each label's positives "
                       f"(binary cross entropy's pos_weight), and `vitlab eval` reports each label's AP, precision "
                       f"and recall (per_class.csv)")
            return out
        out.append(f"imbalanced classes: the largest has {hi:,} images, the smallest {lo:,}{times}; the auto recipe "
                   f"trains with class-balanced sampling (class_balance=sampler, class_balance_power=0.5: each class "
                   f"drawn in proportion to the square root of its images), which trades some accuracy on the large "
                   f"classes for the small ones' (--set class_balance=none: the data's own mix; =loss: a "
                   f"class-weighted loss instead); `vitlab eval` reports each class's accuracy and the balanced "
                   f"accuracy (per_class.csv, metrics.json)")
    return out


def _duration(seconds: float) -> str:
    from vitlab.train.progress import format_duration

    return format_duration(seconds)


def data_facts(ds) -> DataFacts:
    """The facts of a training split (a :class:`vitlab.data.VisionDataset`): the native size, or for a folder
    of files the median size of a few headers."""
    size = ds.native_size
    if size is None:
        size = _typical_file_size(getattr(ds, "paths", []))
    grey_rgb = ds.in_chans == 3 and _grey_as_rgb(getattr(ds, "paths", []), getattr(ds, "targets", []))
    return DataFacts(num_images=len(ds), num_classes=len(ds.classes), image_size=tuple(size), channels=ds.in_chans,
                     class_counts=tuple(ds.class_counts()), grey_rgb=grey_rgb,
                     multi_label=bool(getattr(ds, "multi_label", False)))


def facts_for_source(source: str) -> DataFacts:
    """The facts of a data source's training data (all of it, with its images per class: the chooser works out
    the part it holds out), and whether the source has its own val and test sets."""
    from vitlab.data import build_dataset, parse_source
    from vitlab.data.folder import folder_layout

    kind, path = parse_source(source)
    layout = folder_layout(path) if kind == "folder" else (None, None, None)
    has_test = kind in ("digits", "mnist", "cifar") or layout[2] is not None
    return dataclasses.replace(data_facts(build_dataset(source, split="train", val_fraction=0.0)),
                               has_test=has_test, has_val=layout[1] is not None)


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


GREY_TOLERANCE = 2  # levels of R/G/B difference a grey JPEG may show after chroma rounding


def _grey_as_rgb(paths: list[str], targets: list[int], sample: int = 16) -> bool:
    """Whether ``sample`` files spread over the classes all decode to R == G == B (grey pictures saved as RGB;
    a few levels of difference allowed for JPEG). False when none can be read."""
    from PIL import ImageChops

    from vitlab.data.image import _open_unguarded

    by_class: dict[int, list[str]] = {}
    for p, t in zip(paths, targets):
        by_class.setdefault(t, []).append(p)
    classes = sorted(by_class)[::max(1, math.ceil(len(by_class) / sample))]
    picks: list[str] = []
    for k in range(sample):  # round robin over the classes, each class's files taken spread out
        for c in classes:
            files = by_class[c]
            n = min(len(files), sample)
            if k < n:
                picks.append(files[k * len(files) // n])
    seen = 0
    for p in picks[:sample]:
        try:
            with _open_unguarded(p) as img:
                if img.width * img.height > 50_000_000:
                    continue
                img.draft("RGB", (256, 256))  # JPEG: decode reduced
                r, g, b = img.convert("RGB").split()
        except Exception:  # noqa: BLE001 - a bad file is reported when it is decoded
            continue
        if max(ImageChops.difference(r, g).getextrema()[1],
               ImageChops.difference(g, b).getextrema()[1]) > GREY_TOLERANCE:
            return False
        seen += 1
    return seen > 0


def with_changes(choice: AutoChoice, **changes: Any) -> AutoChoice:
    return dataclasses.replace(choice, recipe=choice.recipe.replace(**changes))
