"""A pre-training job: what ``vitlab pretrain`` runs.

It builds the training split of a data source (labels are ignored; the split is the one ``train`` and
``finetune`` use with the same recipe seed, so pre-training never sees their validation or test
images), a backbone without a classifier, the method's objective and data augmentation, and runs
:func:`vitlab.train.fit`. The run directory's ``model.safetensors`` is the backbone: ``vitlab
finetune --from DIR/model.safetensors``, ``eval``, ``fewshot`` and ``explain`` read it as it is. DINO
also writes the teacher backbone (``teacher.safetensors``, the one the paper evaluates).

The tokenizer methods train a tokenizer for BEiT instead of a backbone: ``dvae`` trains a discrete VAE
with one token per patch of the recipe's (or ``--model``'s) backbone (the run's ``model.safetensors``
is then the dVAE, not a backbone), ``vqkd`` trains BEiT v2's tokenizer whose encoder is the backbone
(against ``--teacher``'s features). Both write ``tokenizer.safetensors``, which ``--method beit`` and
``--method beit2`` read with ``--tokenizer`` (the file or the run directory). A beit / beit2 run keeps a
copy of the tokenizer it uses (the fitted k-means codebook included) as its own ``tokenizer.safetensors``:
``--resume`` reads it from there.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitlab.ssl.tokenizer import TOKENIZER_FILE, save_tokenizer
from vitlab.train.distributed import distributed_context
from vitlab.train.objective import Objective
from vitlab.train.recipe import Recipe
from vitlab.train.trainer import atomic_text, fit

log = logging.getLogger(__name__)

TEACHER_FILE = "teacher.safetensors"
# what each method needs from the backbone, unless the recipe or --set says otherwise
METHOD_MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "mae": {"pos_embed": "sincos"},  # MAE's encoder has fixed 2-D sin-cos positions
    "dino": {"dynamic_img_size": True},  # local crops at their own resolution
    "mpp": {},
    "beit": {},
    "beit2": {},
    "dvae": {},
    "vqkd": {},
}
MASKED_METHODS = ("mpp", "mae", "beit", "beit2")  # objectives that corrupt or drop patch tokens
RUN_OPTIONS = ("num_local", "local_size", "tokenizer_iters")  # options of the job, not of the objective
TOKENIZER_SAMPLE = 2000  # images whose patches fit BEiT's k-means tokenizer


@dataclass(kw_only=True)
class PretrainJob:
    method: str
    recipe: Recipe
    data: str
    output: Path
    model: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the objective
    device: str | None = None
    resume: bool = False
    overwrite: bool = False
    skip_bad_images: bool = False
    progress: bool = True
    until_step: int | None = None
    threads: int | None = None  # --threads: intra-op CPU threads (None: the recipe's, else torch's)


def build_objective(method: str, model: nn.Module, options: dict[str, Any]) -> Objective:
    """The method's objective over ``model`` (for ``dvae``: the DiscreteVAE) with ``options`` (``--opt``,
    ``--tokenizer``, ``--teacher``)."""
    from vitlab.ssl import DINO, MAE, VQKD, BEiT, BEiT2, DVAEObjective, MaskedPatchPrediction
    from vitlab.ssl.dvae import DVAE_MODEL_OPTIONS

    classes = {"mae": MAE, "mpp": MaskedPatchPrediction, "dino": DINO, "beit": BEiT, "beit2": BEiT2,
               "dvae": DVAEObjective, "vqkd": VQKD}
    if method not in classes:
        raise ValueError(f"--method {method!r}: choose one of {', '.join(classes)}")
    skip = set(RUN_OPTIONS) | (set(DVAE_MODEL_OPTIONS) if method == "dvae" else set())
    opts = {k: v for k, v in options.items() if k not in skip}
    if method == "beit2" and not opts.get("tokenizer"):
        raise ValueError("--method beit2 needs --tokenizer RUN_OR_FILE (a `vitlab pretrain --method vqkd` run)")
    if method == "vqkd":
        if not opts.get("teacher"):
            raise ValueError("--method vqkd needs --teacher CKPT: a vitlab checkpoint whose features the tokenizer "
                             "learns to reconstruct (e.g. a DINO run's teacher.safetensors)")
        opts["teacher"] = load_teacher(opts["teacher"])
    try:
        return classes[method](model, **opts)
    except TypeError as e:
        raise ValueError(f"--opt for {method}: {e}") from None


def load_teacher(path: str) -> nn.Module:
    """A frozen model from a vitlab checkpoint (or Hugging Face folder), for VQ-KD's targets."""
    import vitlab
    from vitlab.checkpoints import CheckpointError

    try:
        teacher = vitlab.load_model(path)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        raise ValueError(f"--teacher {path}: {e}") from e
    return teacher.eval().requires_grad_(False)


def _tokenizer_of(job: PretrainJob, model: nn.Module, objective: Objective) -> nn.Module | None:
    from vitlab.ssl.dvae import DVAETokenizer

    if job.method == "dvae":
        return DVAETokenizer(model)
    if job.method == "vqkd":
        return objective.tokenizer(model)
    return None


def _transform(job: PretrainJob, model: nn.Module):
    from vitlab.data import eval_transform, train_transform
    from vitlab.data.multicrop import MultiCropTransform

    recipe, pre = job.recipe, model.preprocessing
    if job.method == "dino":
        local = job.options.get("local_size") or dino_local_size(model)
        return MultiCropTransform(pre, local_size=int(local), num_local=int(job.options.get("num_local", 6)),
                                  hflip=recipe.hflip)
    if not recipe.augment:
        return eval_transform(pre)
    return train_transform(pre, scale=recipe.scale, ratio=recipe.ratio, hflip=recipe.hflip)


def dino_local_size(model: nn.Module) -> int:
    """DINO's local crop side: 3/7 of the global one (96 of 224), a whole number of patches. A backbone
    without a patch grid (a convolutional tokenizer, Swin's windows, MobileViT) gets the nearest multiple of
    8, 16 or 32 it runs at, found by trying one blank image."""
    from vitlab.ssl.masking import patch_grid

    c, h, _ = model.preprocessing.input_size
    try:
        _, patch = patch_grid(model)
    except TypeError:
        patch = None
    if patch is not None:
        return max(patch[0], round(h * 3 / 7 / patch[0]) * patch[0])
    tried = []
    for step in (8, 16, 32):
        side = max(step, round(h * 3 / 7 / step) * step)
        if side in tried:
            continue
        tried.append(side)
        if _runs_at(model, c, side):
            return side
    raise ValueError(f"--method dino: {getattr(model, 'model_name', type(model).__name__)} does not run on local "
                     f"crops of {', '.join(map(str, tried))} px; give --opt local_size=N (a size it accepts)")


@torch.no_grad()
def _runs_at(model: nn.Module, chans: int, side: int) -> bool:
    was = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        model.forward_features(torch.zeros(1, chans, side, side, device=device))
        return True
    except (RuntimeError, ValueError, AssertionError):
        return False
    finally:
        model.train(was)


def build_backbone(job: PretrainJob, in_chans: int) -> nn.Module:
    import vitlab
    from vitlab.models import get_entry
    from vitlab.train.run import model_overrides

    recipe = job.recipe
    name = job.model or recipe.model
    if name is None:
        raise ValueError("no model: give --model NAME (see `vitlab models`)")
    entry = get_entry(name)
    if job.method in MASKED_METHODS:
        with torch.device("meta"):  # the class, without memory or init cost
            probe = entry.build(entry.config)
        if "mask" not in inspect.signature(probe.forward_features).parameters:
            raise ValueError(
                f"--method {job.method} masks patch tokens, and {name} ({entry.family}) has no token-masking hook "
                f"(forward_features(x, mask=...)): use a ViT, DeiT or BEiT backbone; --method dino takes any backbone")
    # a method's model defaults apply where the family has the option (XCiT and MobileViT take any size anyway)
    fields = {f.name for f in dataclasses.fields(entry.config)}
    defaults = {k: v for k, v in METHOD_MODEL_DEFAULTS.get(job.method, {}).items() if k in fields}
    torch.manual_seed(recipe.seed)
    overrides = {**defaults, **model_overrides(name, recipe, in_chans)}
    return vitlab.create_model(name, num_classes=0, img_size=recipe.img_size, **overrides)


def _fit_tokenizer(objective, train_set, model: nn.Module, job: PretrainJob) -> None:
    """BEiT's k-means codebook from the first images of the training split (eval transform: no randomness)."""
    from vitlab.data import eval_transform

    train_set.transform = eval_transform(model.preprocessing)
    n = min(TOKENIZER_SAMPLE, len(train_set))
    images = torch.stack([train_set[i][0] for i in range(n)])
    objective.fit_tokenizer(images, iters=int(job.options.get("tokenizer_iters", 20)), seed=job.recipe.seed)
    log.info("BEiT tokenizer: k-means codebook of %d tokens fitted on the patches of %d images",
             objective.head.out_features, n)


def run_pretraining(job: PretrainJob) -> dict[str, Any]:
    from vitlab.checkpoints import save_model
    from vitlab.data import build_dataset
    from vitlab.train.run import check_output

    recipe = job.recipe
    with distributed_context(job.device) as ctx:
        if not ctx.is_main:
            logging.getLogger("vitlab").setLevel(logging.WARNING)
        threads = job.threads if job.threads is not None else recipe.cpu_threads  # --threads, else the recipe's
        if ctx.device.type == "cpu" and threads is not None:
            torch.set_num_threads(threads)
        if ctx.is_main:
            check_output(job)
            job.output.mkdir(parents=True, exist_ok=True)
            atomic_text(job.output / "job.json", json.dumps({
                "method": job.method, "data": job.data, "model": job.model or recipe.model, "options": job.options,
                "skip_bad_images": job.skip_bad_images}, indent=2))
        train_set = build_dataset(job.data, split="train", val_fraction=recipe.val_fraction, seed=recipe.seed,
                                  skip_bad_images=job.skip_bad_images, unlabelled=True)
        model = build_backbone(job, train_set.in_chans).to(ctx.device)
        if job.method == "dvae":  # one token per patch of the backbone, which is not trained itself
            from vitlab.ssl.dvae import DVAE_MODEL_OPTIONS, DiscreteVAE

            dvae_opts = {k: v for k, v in job.options.items() if k in DVAE_MODEL_OPTIONS}
            try:
                model = DiscreteVAE.for_backbone(model, **dvae_opts).to(ctx.device)
            except (TypeError, ValueError) as e:
                raise ValueError(f"--opt for dvae: {e}") from None
        options = dict(job.options)
        own_tokenizer = job.output / TOKENIZER_FILE
        if job.method in ("beit", "beit2") and job.resume and own_tokenizer.is_file():
            options["tokenizer"] = str(own_tokenizer)  # the run's own copy (the original may have moved)
        objective = build_objective(job.method, model, options)
        if job.method == "beit" and not options.get("tokenizer") and not job.resume:
            _fit_tokenizer(objective, train_set, model, job)  # (a resumed run reads its tokenizer from the state)
        if ctx.is_main and job.method in ("beit", "beit2") and not job.resume:
            # the run directory keeps the tokenizer its targets come from: resumable and reusable as --tokenizer
            save_tokenizer(objective.tokenizer, own_tokenizer,
                           extra={"source": options.get("tokenizer") or f"k-means on {job.data}"})
        train_set.transform = _transform(job, model)
        result = fit(model, recipe, train_set=train_set, output_dir=job.output, ctx=ctx, resume=job.resume,
                     objective=objective, until_step=job.until_step, progress=job.progress)
        last = result.history[-1] if result.history else {}
        summary: dict[str, Any] = {"method": job.method, "model": model.model_name, "recipe": recipe.name,
                                   "data": job.data, "steps": result.step, "global_batch": result.global_batch,
                                   "train_seconds": round(result.seconds, 1), "last": last,
                                   "checkpoint": str(result.model_path)}
        tokenizer = _tokenizer_of(job, model, objective)
        if ctx.is_main and tokenizer is not None:
            save_tokenizer(tokenizer, job.output / TOKENIZER_FILE, extra={"step": result.step, "data": job.data})
            summary["tokenizer"] = str(job.output / TOKENIZER_FILE)
        if ctx.is_main and job.method == "dino":
            save_model(objective.teacher, job.output / TEACHER_FILE,
                       extra={"step": result.step, "objective": "dino teacher"})
            summary["teacher"] = str(job.output / TEACHER_FILE)
        if ctx.is_main:
            atomic_text(job.output / "results.json", json.dumps(summary, indent=2))
        return summary
