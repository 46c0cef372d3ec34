"""``vitlab eval``: accuracy of a checkpoint on a labelled data split, with the checkpoint's own preprocessing.

Writes ``metrics.json``, ``per_class.csv``, ``confusion.csv`` and ``confusion.png`` to the output folder. A
multi-label checkpoint (sigmoid scores) on multi-label data: loss, mAP, micro / macro F1 and exact match at
``--threshold``, with each label's AP, precision, recall, F1 and support in ``metrics.json`` and ``per_class.csv``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import re
from pathlib import Path

from vitlab.checkpoints.adapt import match_class_names, same_class_names
from vitlab.checkpoints.io import atomic_write, parse_json
from vitlab.cli.common import (
    add_class_map_argument,
    add_device_argument,
    add_image_limit_argument,
    add_model_argument,
    add_threads_argument,
    add_threshold_argument,
    apply_class_map,
    check_device,
    model_args,
    multilabel_threshold,
    non_negative_int,
    positive_float,
    positive_int,
    read_class_map,
    recorded_class_names,
    refuse_torchrun,
)
from vitlab.export.runtimes import RUNTIMES
from vitlab.train.run import EVAL_REPORT_FILES, EVAL_REPORT_PREFIX

log = logging.getLogger("vitlab")

EXAMPLE = """examples:
  vitlab eval --checkpoint runs/digits-vit/model.safetensors --data digits
  vitlab eval --checkpoint runs/mine/model.safetensors --data ./images --split val --output runs/mine/eval_val
  vitlab eval --checkpoint digits.onnx --data digits                     (ONNX Runtime)
  vitlab eval --checkpoint runs/digits-vit/model.safetensors --runtime onnx-int8   (reports agreement with float32)"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="top-1/top-5, per-class accuracy and confusion matrix of a checkpoint",
                       description="Evaluate a vitlab checkpoint on a data split with its own preprocessing.",
                       epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="vitlab checkpoint (model.safetensors of a run), or an ONNX file written by vitlab export")
    add_model_argument(p)
    p.add_argument("--runtime", choices=["auto", *RUNTIMES], default="auto",
                   help="auto: ONNX Runtime for an .onnx file, else PyTorch float32; runtimes other than float32 "
                        "PyTorch also report their top-1 agreement with it")
    p.add_argument("--compile", action="store_true", help="same as --runtime torch-compile")
    p.add_argument("--data", help="data source (default: the one the checkpoint's run trained on, from its "
                                  "job.json; an ONNX file or a checkpoint without its run folder needs --data)")
    p.add_argument("--class-match", choices=["auto", "name", "index"], default="auto",
                   help="how the data's classes meet the checkpoint's: by name (the data may hold a subset of "
                        "them, in any order), or by index (the i-th class folder is the head's i-th class); auto: "
                        "by name where the checkpoint names its classes, else by index")
    p.add_argument("--class-order", choices=["sorted", "natural"],
                   help="by index: how the data's class folders are numbered; sorted: as text (1, 10, 2; Cat, "
                        "Dog, bird), as vitlab, torchvision and Hugging Face number them; natural: numbers by value, "
                        "letters case-insensitively (1, 2, 10; bird, Cat, Dog), as timm's training does (default: "
                        "sorted, with a warning where a checkpoint that names no classes would see another order)")
    add_class_map_argument(p)
    p.add_argument("--split", choices=["train", "val", "test"], default="test",
                   help="which split (default: test; on data without a test set, the held-out part of the training "
                        "images, as the run held it out)")
    p.add_argument("--val-fraction", type=float, help="held-out share when the source has no val set (default: "
                   "the checkpoint's run's on the data it trained on, else 0.1)")
    p.add_argument("--seed", type=int, help="seed of the held-out split (default: the checkpoint's run's on the "
                   "data it trained on, else 0)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=non_negative_int, default=0, help="data loading processes (default: 0)")
    add_device_argument(p)
    add_image_limit_argument(p)
    add_threads_argument(p)
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none", help="autocast precision")
    p.add_argument("--skip-bad-images", action="store_true", help="skip and count undecodable images")
    p.add_argument("--output", type=Path, help="report folder (default: beside the checkpoint, eval_SPLIT, where "
                                               "an earlier report is replaced)")
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace report files ({', '.join(REPORT_FILES)}) that exist in --output (default: refuse)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    add_threshold_argument(p, "micro / macro F1, exact match and each label's precision and recall are measured there")
    p.add_argument("--protocol", choices=["auto", "classifier", "knn", "linear"], default="auto",
                   help="classifier: the checkpoint's own head; knn: weighted k-NN on the pre-logit features of "
                        "the training split; linear: a linear probe (non-affine BatchNorm + linear, MAE's) trained "
                        "on those features; auto: classifier, or knn for a backbone without one")
    p.add_argument("--probe-epochs", type=positive_int,
                   help=f"--protocol linear: probe epochs over the cached features (default: {PROBE_EPOCHS})")
    p.add_argument("--knn-k", type=positive_int, help=f"--protocol knn: neighbours that vote (default: {KNN_K}; "
                   "at most the training images)")
    p.add_argument("--knn-t", type=positive_float, help=f"--protocol knn: vote temperature (default: {KNN_T}, DINO's)")
    p.set_defaults(func=run)


KNN_K, KNN_T, PROBE_EPOCHS = 20, 0.07, 90  # DINO's k-NN (k 20, T 0.07); MAE's probe epochs
# what a report holds, and its default folder beside the checkpoint (train --overwrite removes such folders)
REPORT_FILES = EVAL_REPORT_FILES


def report_folder(args: argparse.Namespace, split: str, files: tuple[str, ...] = REPORT_FILES) -> Path:
    """The report folder, checked before the evaluation: in a folder given with --output, existing report
    ``files`` are refused unless --overwrite. The default folder beside the checkpoint is that checkpoint's own
    (``eval_SPLIT`` for a run's model.safetensors, ``eval_SPLIT_STEM`` for another file, such as
    model_ema.safetensors or a downloaded file beside others), replaced by its next report; one holding another
    checkpoint's report or files eval does not write is refused unless --overwrite. A symbolic link there (the
    folder itself or a report file) is never written through: refused, or with --overwrite replaced."""
    from vitlab.checkpoints.io import check_outputs_free

    if args.output is None:
        checkpoint = Path(args.checkpoint)
        stem = checkpoint.name if checkpoint.is_dir() else checkpoint.stem
        folder = checkpoint.parent / f"{EVAL_REPORT_PREFIX}{split}{'' if stem == 'model' else '_' + stem}"
        if folder.is_symlink():  # a downloaded run's link would send the report anywhere
            if not args.overwrite:
                raise ValueError(f"{folder}, the default report folder of {args.checkpoint}: a symbolic link, which "
                                 f"eval does not write through; pass --overwrite to replace the link with a folder, "
                                 f"or --output FOLDER")
            folder.unlink()
        if folder.is_dir() and not args.overwrite:
            theirs = sorted(p.name for p in folder.iterdir() if p.name not in EVAL_REPORT_FILES)
            # report files that are links (dangling too) or not plain files are not eval's either
            links = sorted(p.name for p in folder.iterdir()
                           if p.name in EVAL_REPORT_FILES and (p.is_symlink() or not p.is_file()))
            recorded = None if theirs or links else _read_recipe(folder / "metrics.json").get("checkpoint")
            # the name, not the path: a report records the path as typed, from wherever eval ran
            if theirs or links or (recorded is not None and Path(str(recorded)).name != checkpoint.name) or (
                    recorded is None and (folder / "metrics.json").exists()):
                why = (f"it holds {', '.join(theirs[:3])}, which eval does not write" if theirs else
                       f"its {', '.join(links)}: symbolic link(s) or not files, which eval does not write through"
                       if links else
                       f"its report is of {recorded}" if recorded else "its metrics.json is not an eval report")
                raise ValueError(f"{folder}, the default report folder of {args.checkpoint}: {why}; pass --overwrite "
                                 f"to replace its report files, or --output FOLDER")
        return folder
    metrics = args.output / "metrics.json"
    earlier = ("an earlier `vitlab eval` report there?" if metrics.is_file() and not metrics.is_symlink()
               and "checkpoint" in _read_recipe(metrics) else "")
    check_outputs_free([args.output / f for f in files], output=args.output, overwrite=args.overwrite,
                       earlier=earlier)
    return args.output


def protocol_options(args: argparse.Namespace, protocol: str) -> None:
    """Warn about --knn-k / --knn-t / --probe-epochs given for a protocol that does not use them; fill in the
    defaults of those it uses."""
    unused = {"knn": ["probe_epochs"], "linear": ["knn_k", "knn_t"]}.get(protocol, ["knn_k", "knn_t", "probe_epochs"])
    given = ["--" + k.replace("_", "-") for k in unused if getattr(args, k, None) is not None]
    if given:
        log.warning("%s: not used by --protocol %s (ignored)", " / ".join(given), protocol)
    for key, default in (("knn_k", KNN_K), ("knn_t", KNN_T), ("probe_epochs", PROBE_EPOCHS)):
        if getattr(args, key, None) is None:
            setattr(args, key, default)


def _finetune_hint(checkpoint: str, data: str) -> str:
    """How to get a model for the data's classes: fine-tune the checkpoint; an ONNX file cannot be fine-tuned,
    the PyTorch checkpoint it was exported from can (then export again)."""
    from vitlab.export.runtime import is_onnx_file

    if is_onnx_file(checkpoint):
        return (f"fine-tune the PyTorch checkpoint {checkpoint} was exported from (an ONNX file cannot be "
                f"fine-tuned: vitlab finetune --from CHECKPOINT --data {data}), then export it again")
    return f"fine-tune it for this data first (vitlab finetune --from {checkpoint} --data {data})"


def natural_key(name: str) -> list:
    """timm's sort key for class folders (``timm.utils.misc.natural_key``): lower-cased, digit runs compared as
    numbers, so "2" comes before "10" and "bird" before "Cat"."""
    return [int(part) if part.isdecimal() else part for part in re.split(r"(\d+)", name.lower())]


def _shown(names: list[str], start: int, count: int = 4) -> str:
    return ", ".join(map(repr, names[start:start + count])) + (", ..." if len(names) > start + count else "")


def class_mapping(model, classes: list[str], checkpoint: str, data: str, how: str = "auto", *,
                  named: bool | None = None, order: str | None = None) -> list[int]:
    """The head's class index of each of the data's classes (``classes``, in the data set's label order).

    By name (``how`` "name", or "auto" when the checkpoint names its classes): the data may hold any subset of
    the checkpoint's classes, in any order (a folder sorts "10" before "2"); a class the checkpoint does not have
    is an error. Names "0".."N-1" (digits, MNIST, or an ONNX file's stand-ins) count as names in "auto" where the
    data holds some of them only (fewer classes than the head), else as positions. By index ("index"; "auto"
    without names, or where no name is shared and the counts agree, with a warning): the data's i-th class is the
    head's i-th, and the counts must agree.

    Args:
        named: True: ``model.class_names`` are real names (recorded, or from --class-map), matched by name in
            "auto" even where they read "0".."N-1"; False: stand-ins "0".."N-1" of a checkpoint that names no
            classes (a timm state dict); None: judged from the names as above.
        order: by index, how the data's classes are numbered: "sorted" (their order in ``classes``, as vitlab
            numbers folders) or "natural" (timm's: :func:`natural_key`); None: "sorted", with a warning for a
            checkpoint without names where timm's order differs.
    """
    names = list(getattr(model, "class_names", None) or [])
    if how == "name" and not names:
        raise ValueError(f"--class-match name: the checkpoint {checkpoint} does not name its classes; use "
                         f"--class-match index")
    found = match_class_names(names, classes)
    missing = [c for c, i in zip(classes, found) if i is None]
    index_like = names == [str(i) for i in range(len(names))] if named is None else not named
    by_name = how == "name" or (how == "auto" and bool(names) and (
        not index_like or (not missing and len(classes) < len(names))))  # a subset of "0".."N-1": by name
    if by_name and how == "auto" and len(missing) == len(classes) == model.num_classes:
        by_name = False  # no name in common (a checkpoint's own spelling, "digit 3" for "3"): by position, warned
    if by_name:
        if missing:
            shown = ", ".join(map(repr, missing[:5])) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ValueError(
                f"{data} has class(es) {shown} that the checkpoint {checkpoint} does not know (its classes: "
                f"{', '.join(map(repr, names[:5]))}{', ...' if len(names) > 5 else ''}); "
                f"{_finetune_hint(checkpoint, data)}, or match classes by position with --class-match index")
        if order is not None:
            log.warning("--class-order %s: classes are matched by name here (ignored; --class-match index "
                        "matches them by position)", order)
        mapping = [i for i in found if i is not None]
        if mapping != list(range(len(classes))):
            log.info("%s: %d of the checkpoint's %d classes, matched by name", data, len(classes), len(names))
        return mapping
    if len(classes) != model.num_classes:
        raise ValueError(
            f"{data} has {len(classes)} classes but the checkpoint {checkpoint} has a head for "
            f"{model.num_classes}; {_finetune_hint(checkpoint, data)}"
        )
    natural = sorted(classes, key=natural_key)
    numbered = natural if order == "natural" else list(classes)
    nameless = named is False or not names
    if nameless:
        first = next((i for i, (a, b) in enumerate(zip(classes, natural)) if a != b), None)
        if order is None and first is not None:
            log.warning(
                "%s names no classes of its own: the i-th class folder of %s, sorted as text, is taken as its "
                "head's i-th output (from the %s output on: %s), but timm's training numbers folders in natural "
                "order (%s there); if it was trained with timm, give --class-order natural (or --class-map FILE "
                "with its classes in the head's order)", checkpoint, data, _ordinal(first + 1),
                _shown(classes, first), _shown(natural, first))
        elif order is None:
            log.info("%s names no classes of its own: the i-th class of %s is its head's i-th output (--class-map "
                     "FILE names them)", checkpoint, data)
    elif not same_class_names(names, numbered):
        log.warning("the data's class names differ from the checkpoint's (%s... vs %s...); labels are matched by "
                    "index (--class-match index)", numbered[:3], names[:3])
    position = {c: i for i, c in enumerate(numbered)}
    return [position[c] for c in classes]


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


class RemappedLabels:
    """A labelled data set whose labels are mapped to the head's class indices (``mapping[label]``); skipped
    (None) samples pass through."""

    def __init__(self, dataset, mapping: list[int]) -> None:
        self.dataset, self.mapping = dataset, list(mapping)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        if item is None:
            return None
        x, y = item
        return x, self.mapping[int(y)]


def default_data(checkpoint: str) -> str:
    """--data left out: the source the checkpoint's run trained on (its job.json), or an error."""
    from vitlab.cli.common import recorded_data
    from vitlab.train.run import read_job

    job = read_job(Path(checkpoint).parent)
    recorded, data = job.get("data"), recorded_data(Path(checkpoint).parent, job)
    if data is not None:
        log.info("--data: %s, the data the run of %s trained on", data, checkpoint)
        return data
    raise ValueError(f"--data is required: {checkpoint} has no run record (job.json) beside it naming its data"
                     + (f" that is readable from here ({recorded})" if recorded else ""))


DEFAULT_SEED, DEFAULT_VAL_FRACTION = 0, 0.1  # build_dataset's, for a checkpoint without a run record


def seeded_split(data: str, split: str) -> bool:
    """Whether ``split`` of ``data`` is drawn by seed and val_fraction from the training data (so that
    another seed or fraction than the run's puts its training images in it), as vitlab.data.build makes it."""
    from vitlab.data.build import parse_source
    from vitlab.data.errors import DatasetError
    from vitlab.data.folder import folder_layout

    try:
        kind, path = parse_source(data)
        if kind != "folder":  # digits, MNIST and CIFAR have a fixed test set; val and train are drawn
            return split != "test"
        _, val_dir, test_dir = folder_layout(path)
    except (DatasetError, OSError):
        return False  # build_dataset reports the source
    # a val/ folder fixes val and train; "test" without test/ is the held-out part
    return val_dir is None and (split != "test" or test_dir is None)


def run_data_match(job: dict, data: str) -> str | None:
    """How ``data`` is the data of the run that recorded ``job`` (its job.json): "source" (the source it names),
    "copy" (another folder whose training files are those the run's split was drawn from: the same names, relative
    to the folder, per class, as job.json's ``split_from`` records them, e.g. the run's folder moved or copied), or
    None (other data, or a run that recorded no data)."""
    from vitlab.data.splits import MULTI_LABEL_CLASS, folder_split_source
    from vitlab.train.run import same_source

    if job.get("data") is None:
        return None
    if same_source(data, job["data"], job.get("data_source")):
        return "source"
    recorded = job.get("split_from")
    if not isinstance(recorded, dict) or not isinstance(recorded.get("classes"), dict):
        return None
    multi_label = list(recorded["classes"]) == [MULTI_LABEL_CLASS]
    return "copy" if folder_split_source(data, multi_label=multi_label) == recorded else None


def trained_elsewhere(checkpoint: str, data: str) -> bool:
    """Whether the checkpoint's run record (job.json beside it) names other data than ``data`` (neither its source
    nor a copy of it: :func:`run_data_match`)."""
    from vitlab.train.run import read_job

    job = read_job(Path(checkpoint).parent)
    return job.get("data") is not None and run_data_match(job, data) is None


def run_split(checkpoint: str, data: str, split: str, *, seed: int | None = None,
              val_fraction: float | None = None, measured: bool = True, options: str = "") -> tuple[int, float]:
    """The seed and val_fraction for ``split`` of ``data``: those the checkpoint's run held out with (its
    job.json and recipe.json beside it) when it trained on ``data``, unless given (not None).

    Args:
        measured: the command measures the model on the split, so it must be held out: where the run is
            unknown and the split is drawn from the training data, a warning says it may hold the
            checkpoint's training images, and a run that held nothing out is an error.
        options: the command's options that set the split, named in those messages.
    """
    from vitlab.train.run import read_job

    given = (DEFAULT_SEED if seed is None else seed, DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction)
    if (seed is not None and val_fraction is not None) or not seeded_split(data, split):
        return given
    run_dir = Path(checkpoint).parent
    job, recipe = read_job(run_dir), _read_recipe(run_dir / "recipe.json")
    recorded = job.get("data")
    if recorded is None or "seed" not in recipe or "val_fraction" not in recipe:
        if measured:
            log.warning("%s has no run record beside it (job.json, recipe.json): if it was trained on %s, the %r "
                        "split made here (seed %d, val_fraction %g) may hold its training images%s", checkpoint,
                        data, split, *given, f"; give the run's {options}" if options else "")
        return given
    match = run_data_match(job, data)
    if match is None:
        log.info("%s was trained on %s, not %s: split %r drawn with seed %d, val_fraction %g", checkpoint, recorded,
                 data, split, *given)
        return given
    if match == "copy":
        log.info("%s is recognised as a copy of %s, the data %s was trained on, by its files (those the run's "
                 "split was drawn from)", data, recorded, checkpoint)
    run_seed, run_fraction = int(recipe["seed"]), float(recipe["val_fraction"])
    if run_fraction == 0 and split != "train" and val_fraction is None:
        if not measured:
            return given
        raise ValueError(f"{checkpoint}: its run trained on every image of {data} (val_fraction 0), so it has "
                         f"no held-out {split!r} split there; evaluate on other data"
                         + (f", or give {options} to split it anyway (into images it trained on)" if options
                            else ""))
    chosen = (run_seed if seed is None else seed, run_fraction if val_fraction is None else val_fraction)
    if chosen == (run_seed, run_fraction):
        log.info("%s split of %s as the run of %s held it out (seed %d, val_fraction %g)", split, data,
                 checkpoint, *chosen)
    elif measured and split != "train":
        log.warning("the run of %s held %s out with seed %d, val_fraction %g: the %s split made with seed %d, "
                    "val_fraction %g holds images it trained on", checkpoint, data, run_seed, run_fraction, split,
                    *chosen)
    return chosen


def run_split_method(checkpoint: str, data: str) -> str:
    """How the checkpoint's run drew its held-out split of ``data`` (job.json's ``split_method``; a run recorded
    without one used the old randperm draw); the current method for other data or a checkpoint without a run."""
    from vitlab.data.splits import SPLIT_METHOD, recorded_split_method
    from vitlab.train.run import read_job

    job = read_job(Path(checkpoint).parent)
    if not job:  # a checkpoint away from its run folder: what it records (one trained before split_method: randperm)
        return _checkpoint_split_method(checkpoint)
    if run_data_match(job, data) is None:
        return SPLIT_METHOD
    return recorded_split_method(job)


def _checkpoint_split_method(checkpoint: str) -> str:
    """The split method a vitlab checkpoint's metadata records (``extra.split_method``); one written by a run before
    the runs recorded it (its ``recipe_settings`` without it) drew randperm; any other file: the current method."""
    from vitlab.data.splits import LEGACY_SPLIT_METHOD, SPLIT_METHOD, check_split_method
    from vitlab.train.run import checkpoint_metadata

    path = Path(checkpoint)
    if not (path.is_file() and path.name.endswith(".safetensors")):
        return SPLIT_METHOD
    extra = checkpoint_metadata(path).get("extra")
    if not isinstance(extra, dict) or "recipe_settings" not in extra:
        return SPLIT_METHOD
    return check_split_method(str(extra.get("split_method", LEGACY_SPLIT_METHOD)))


def check_run_split_source(checkpoint: str, data: str, ds, seed: int, val_fraction: float) -> None:
    """Warn where ``ds``, a split held out as the checkpoint's run held it out, was drawn from other training files
    than the run's (job.json's ``split_from``: files added, removed or replaced since)."""
    from vitlab.data.splits import changed_split_note, split_source_changes
    from vitlab.train.run import read_job, same_source

    now = getattr(ds, "split_from", None)
    if now is None or val_fraction <= 0:
        return
    run_dir = Path(checkpoint).parent
    job, recipe = read_job(run_dir), _read_recipe(run_dir / "recipe.json")
    recorded = job.get("split_from")
    if (not isinstance(recorded, dict) or job.get("data") is None  # (a copy of it: the recorded files)
            or not same_source(data, job["data"], job.get("data_source"))
            or (recipe.get("seed"), recipe.get("val_fraction")) != (seed, val_fraction)):
        return
    if (changes := split_source_changes(recorded, now)) is not None:
        note = changed_split_note(run_split_method(checkpoint, data))
        log.warning("the training files of %s that the run of %s held its split out of have changed since it "
                    "trained (%s), %s; to score only images it never trained on, give --data the run's folder as it "
                    "was, or images it never saw (e.g. in a test/ folder beside train/)", data,
                    checkpoint, changes, note)


def _read_recipe(path: Path) -> dict:
    try:
        recipe = parse_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return recipe if isinstance(recipe, dict) else {}


def write_report(path: Path, text: str) -> None:
    """``text`` (UTF-8; a name's bytes that the locale left undecoded as they came) written by replacing ``path``:
    a symbolic link there is replaced, never written through."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8", errors="surrogateescape",
                                                       newline=""))


def _csv_text(rows: list[list]) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue()


# --batch-size's default (256) is a classifier's: detection / segmentation images are large, and at that default
# a dense model evaluates DENSE_BATCH_SIZE at a time (an explicit --batch-size is taken as given)
CLASSIFIER_BATCH_SIZE, DENSE_BATCH_SIZE = 256, 8


def dense_split(data: str, split: str) -> str:
    """The folder split a dense evaluation scores: the one named; "test" (the default) needs DATA/test/, a
    detection / segmentation folder having no held-out part to stand in for it."""
    from vitlab.data.errors import DatasetError
    from vitlab.tasks.run import split_dir

    if split == "test":  # Test/, testing/, eval/ as well (the split names of classification)
        try:
            split_dir(data, "test")
        except DatasetError as e:
            raise ValueError(f"--split test: {e}; give --split val to evaluate on the val split, or add test/ "
                             f"(images/ with annotations.json or masks/)") from None
    return split


def _run_dense(args: argparse.Namespace, model) -> int:
    """A DETR / SETR checkpoint: COCO AP / AP50 / AP75 or mean IoU / pixel accuracy on DATA/SPLIT, with
    --batch-size, --device, --amp and --skip-bad-images as for a classifier."""
    import torch

    from vitlab.export.runtime import OnnxModel
    from vitlab.tasks.run import evaluate_folder, format_metrics, recorded_categories

    if args.protocol in ("knn", "linear"):
        scored = "COCO AP" if model.task == "detection" else "mean IoU"
        raise ValueError(f"--protocol {args.protocol} probes a classifier's features (classification only); a "
                         f"{model.task} model is scored with its own head ({scored}): leave --protocol out")
    protocol_options(args, "classifier")
    split = dense_split(args.data, args.split)
    device = torch.device("cpu") if isinstance(model, OnnxModel) else check_device(args)  # ONNX Runtime: the CPU
    out = report_folder(args, split, ("metrics.json",))
    batch_size = DENSE_BATCH_SIZE if args.batch_size == CLASSIFIER_BATCH_SIZE else args.batch_size
    if batch_size != args.batch_size:
        log.info("%s model: %d images per batch (--batch-size sets another number)", model.task, batch_size)
    metrics = evaluate_folder(model, args.data, split, categories=recorded_categories(args.checkpoint),
                              categories_from=f"the checkpoint {args.checkpoint}", batch_size=batch_size,
                              device=device, amp=args.amp, skip_bad_images=args.skip_bad_images)
    out.mkdir(parents=True, exist_ok=True)
    report = {"checkpoint": str(args.checkpoint), "data": args.data, "split": split,
              **({"amp": args.amp} if args.amp != "none" else {}), **metrics}
    write_report(out / "metrics.json", json.dumps(report, indent=2))
    # --json prints what metrics.json holds, as for classifiers
    print(json.dumps(report, indent=2) if args.json else f"{model.task} on {args.data}/{split}: "
          f"{format_metrics(model.task, metrics)}")
    if args.skip_bad_images and not args.json:
        print(f"skipped {metrics['skipped_images']} undecodable image(s) in total")
    return 0


def run(args: argparse.Namespace) -> int:
    from vitlab.data import build_dataset, eval_transform
    from vitlab.export.runtimes import (
        compile_failure,
        load_for_inference,
        runtime_device,
        setup_seconds,
        slow_bf16_reason,
    )
    from vitlab.train.evaluate import evaluate

    refuse_torchrun("eval")
    from vitlab.train.run import run_checkpoint

    # a run folder: its checkpoint file, beside which eval finds the run's job.json and writes its report
    args.checkpoint, note = run_checkpoint(args.checkpoint)
    if note:
        log.info("evaluating %s", note)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    runtime = "torch-compile" if args.compile else args.runtime
    if args.compile and args.runtime not in ("auto", "torch", "torch-compile"):
        raise ValueError(f"--compile and --runtime {args.runtime} exclude each other")
    if args.amp != "none" and runtime not in ("auto", "torch"):
        raise ValueError(f"--amp {args.amp} applies to the plain PyTorch runtime; use --runtime torch-bf16 "
                         f"for bfloat16 inference with agreement")
    device = check_device(args)
    class_map = read_class_map(args.class_map) if args.class_map else None  # before the model: its errors first
    model, reference = load_for_inference(args.checkpoint, runtime, model_name=args.model,
                                          model_args=model_args(args))
    if args.amp != "none" and model.name != "torch":  # an .onnx file with the auto runtime
        raise ValueError(f"--amp {args.amp} applies to PyTorch; {args.checkpoint} runs with ONNX Runtime (its "
                         f"precision is the file's: `vitlab export --int8` for int8)")
    if args.data is None:  # after the checks of the options and the file: their errors come first
        args.data = default_data(args.checkpoint)
    task = model.task
    if task != "classification":
        _unused_class_options(args, f"a {task} model is scored against its checkpoint's categories")
        if runtime not in ("auto", "torch", "onnx"):
            raise ValueError(f"--runtime {runtime}: a {task} model evaluates with PyTorch (auto, torch) or ONNX "
                             f"Runtime (onnx, or an .onnx file)")
        return _run_dense(args, model.inner if runtime == "onnx" or reference is None else reference.cpu())
    device = runtime_device(model.name, device)
    model = model.to(device).eval()
    if reason := slow_bf16_reason(model.name, device):
        log.warning("%s", reason)
    recorded = recorded_class_names(model, reference)
    if class_map is not None and args.protocol in ("auto", "classifier") and model.num_classes:
        apply_class_map(model, class_map, args.class_map, recorded=recorded)  # before the data: its count first
    args.given_split = (args.seed, args.val_fraction)  # the probes' training split is drawn from these too
    args.whole = (model.num_classes > 0 and args.protocol in ("auto", "classifier") and args.split != "train"
                  and args.given_split == (None, None) and seeded_split(args.data, args.split)
                  and trained_elsewhere(args.checkpoint, args.data))
    if args.whole:  # nothing of it was trained on: no part needs holding out (nor a seed or fraction to draw it)
        log.info("%s is not the data %s was trained on: every image of it is scored (--seed / --val-fraction "
                 "hold a part out instead)", args.data, args.checkpoint)
        args.seed, args.val_fraction = DEFAULT_SEED, DEFAULT_VAL_FRACTION
    else:
        args.seed, args.val_fraction = run_split(args.checkpoint, args.data, args.split, seed=args.seed,
                                                 val_fraction=args.val_fraction, options="--seed / --val-fraction")
    score_function = getattr(model, "score_function", "softmax")
    threshold = multilabel_threshold(args, score_function)
    if args.protocol in ("auto", "classifier") and _scores_label_sets(args, model):
        return _run_multilabel(args, model, reference, device, threshold)
    ds = build_dataset(args.data, split="train" if args.whole else args.split,
                       val_fraction=0.0 if args.whole else args.val_fraction, seed=args.seed,
                       transform=eval_transform(model.preprocessing), skip_bad_images=args.skip_bad_images,
                       split_method=run_split_method(args.checkpoint, args.data))
    if not args.whole:
        check_run_split_source(args.checkpoint, args.data, ds, args.seed, args.val_fraction)
    protocol = args.protocol
    if protocol == "auto":
        protocol = "knn" if model.num_classes == 0 else "classifier"  # a backbone: DINO's k-NN protocol
    protocol_options(args, protocol)
    if protocol == "classifier" and model.num_classes == 0:
        raise ValueError(f"--protocol classifier: {args.checkpoint} is a backbone without a classifier; "
                         "use --protocol knn or linear, or fine-tune it first")
    if protocol in ("knn", "linear"):
        _unused_class_options(args, f"--protocol {protocol} learns the data's own classes")
        if reference is None and getattr(model.inner, "features", False):  # a backbone's ONNX file: its features
            return feature_report(model.inner, ds, args, device, protocol)
        if reference is None:
            raise ValueError(f"--protocol {protocol}: evaluate the vitlab checkpoint (features of the backbone), "
                             f"not an exported classifier ({args.checkpoint} gives its logits only)")
        return feature_report(reference.to(device), ds, args, device, protocol)
    # --class-map names are names; a checkpoint's own "0".."N-1" are judged as before; none: stand-ins
    named = True if class_map is not None else (None if recorded else False)
    mapping = class_mapping(model, ds.classes, args.checkpoint, args.data, args.class_match, named=named,
                            order=args.class_order)
    scored = RemappedLabels(ds, mapping)
    head_names = list(getattr(model, "class_names", None) or []) or (
        list(ds.classes) if mapping == list(range(model.num_classes)) else [str(i) for i in range(model.num_classes)])
    out = report_folder(args, args.split)
    r = evaluate(model, scored, num_classes=model.num_classes, batch_size=args.batch_size, device=device,
                 amp=args.amp, workers=args.workers, class_names=head_names, progress=not args.json)
    warn_nonfinite(r, args.checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    per_class = {name: r.per_class[j] for name, j in zip(ds.classes, mapping)}  # the data's classes
    metrics = {"checkpoint": str(args.checkpoint), "runtime": model.name, "data": args.data,
               "split": "all" if args.whole else args.split,
               **r.summary(), "per_class": {k: None if math.isnan(v) else v for k, v in per_class.items()}}
    if mapping != list(range(model.num_classes)):
        metrics["class_match"] = {name: head_names[j] for name, j in zip(ds.classes, mapping)}
    if args.class_order is not None:
        metrics["class_order"] = args.class_order
    if class_map is not None:
        metrics["class_map"] = str(args.class_map)
    if model.name != "torch":
        metrics["setup_s"] = round(setup_seconds(model), 3)  # export / quantisation / compile time
    if "compile" in model.name:  # why the compiled runtime ran eager (None: it compiled)
        metrics["compile_failed"] = compile_failure(model)
    if reference is not None and model.name != "torch":
        ref = evaluate(reference.to(device), scored, num_classes=model.num_classes, batch_size=args.batch_size,
                       device=device, workers=args.workers, class_names=head_names, progress=False)
        metrics["float32_top1"] = round(ref.top1, 6)
        metrics["top1_agreement_with_float32"] = round((ref.predictions == r.predictions).float().mean().item(), 6)
    if args.skip_bad_images:
        metrics["skipped_images"] = ds.num_skipped
    support = r.confusion.sum(dim=1).tolist()
    # rows: the data's classes; columns: those and any other class of the head that was predicted
    cols = list(mapping) + [j for j in range(model.num_classes)
                            if j not in mapping and r.confusion[:, j].sum().item() > 0]
    confusion = r.confusion[mapping][:, cols]
    col_names = [ds.classes[mapping.index(j)] if j in mapping else head_names[j] for j in cols]
    # the slow figure first, metrics.json last: an interrupt while drawing leaves the earlier report whole (each
    # file is replaced atomically; together they are replaced within milliseconds)
    title = f"{Path(args.checkpoint).name} on {args.data} [{metrics['split']}]: top-1 {100 * r.top1:.2f}%"
    atomic_write(out / "confusion.png", lambda tmp: save_confusion_png(confusion, col_names, Path(tmp), title=title,
                                                                        row_names=list(ds.classes)))
    # UTF-8 under any locale; a name's bytes that a non-UTF-8 locale left undecoded are written as they came
    write_report(out / "per_class.csv", _csv_text(
        [["class", "support", "accuracy"]]
        + [[name, support[j], "" if math.isnan(r.per_class[j]) else f"{r.per_class[j]:.6f}"]
           for name, j in zip(ds.classes, mapping)]))
    write_report(out / "confusion.csv", _csv_text(
        [["true \\ predicted", *col_names]] + [[name, *row] for name, row in zip(ds.classes, confusion.tolist())]))
    write_report(out / "metrics.json", json.dumps(metrics, indent=2))
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(f"{args.data} [{metrics['split']}], {r.num_samples} images: top-1 {100 * r.top1:.2f}%  "
              f"top-5 {100 * r.top5:.2f}%  loss {r.loss:.4f}"
              + ("" if r.balanced_accuracy is None else f"  balanced accuracy {100 * r.balanced_accuracy:.2f}%")
              + ("" if model.name == "torch" else f"  ({model.name})")
              + (f"  (compile failed: {metrics['compile_failed']}; ran eager)" if metrics.get("compile_failed")
                 else ""))
        if "top1_agreement_with_float32" in metrics:
            print(f"  {model.name} vs float32 PyTorch: top-1 agreement "
                  f"{100 * metrics['top1_agreement_with_float32']:.2f}% (float32 top-1 "
                  f"{100 * metrics['float32_top1']:.2f}%), set-up {metrics['setup_s']:.1f} s")
        width = max(len(c) for c in ds.classes)
        for name, acc in per_class.items():
            print(f"  {name:<{width}}  " + ("   n/a (no image)" if math.isnan(acc) else f"{100 * acc:6.2f}%"))
        if args.skip_bad_images:
            print(f"skipped {ds.num_skipped} undecodable image(s) in total")
        print(f"report: {out}/ (metrics.json, per_class.csv, confusion.csv, confusion.png)")
    return 0


def warn_nonfinite(r, checkpoint: str) -> None:
    """Logits that are NaN or infinite for some images: their loss is not finite (null in metrics.json) and their
    predictions mean nothing, which is said."""
    if r.nonfinite:
        log.warning("%s gave NaN or infinite logits for %d of its %d images: the loss is not finite (null in "
                    "metrics.json) and those images' predictions mean nothing (weights that diverged in training?)",
                    checkpoint, r.nonfinite, r.num_samples)


def _scores_label_sets(args: argparse.Namespace, model) -> bool:
    """Whether ``model`` is scored as a multi-label classifier on ``args.data``: a sigmoid head whose run trained
    with --multi-label (its job.json), or, for a checkpoint without that record (a Hugging Face multi-label head), on
    data whose label file gives some image other than one label. A sigmoid head on class folders or one label per
    image (a single-output binary head, a fit criterion of the user's) is scored by top-1 as before."""
    if getattr(model, "score_function", "softmax") != "sigmoid" or not model.num_classes:
        return False
    from vitlab.data.errors import DatasetError
    from vitlab.data.multilabel import build_multilabel_dataset
    from vitlab.train.run import read_job

    try:
        if read_job(Path(args.checkpoint).parent).get("multi_label"):
            return True
    except ValueError:  # a damaged job.json: the data decides
        pass
    try:
        ds = build_multilabel_dataset(args.data, split="train", val_fraction=0.0)
    except (DatasetError, ValueError):
        return False
    return any(len(t) != 1 for t in ds.targets)


class MultiHotForHead:
    """A multi-label data set whose (K_data,) multi-hot targets become the head's (K,) rows (``mapping``: the
    head's index of each data label); skipped (None) samples pass through."""

    def __init__(self, dataset, mapping: list[int], num_classes: int) -> None:
        import torch

        self.dataset, self.num_classes = dataset, num_classes
        self.index = torch.tensor(mapping, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        if item is None:
            return None
        x, y = item
        out = y.new_zeros(self.num_classes)
        out[self.index] = y
        return x, out


def label_mapping(model, labels: list[str], checkpoint: str, data: str) -> list[int]:
    """The head's index of each of the data's labels: by name where the checkpoint names its labels (the data may
    hold a subset of them), else by position (the counts must agree)."""
    names = list(getattr(model, "class_names", None) or [])
    if names and names != [str(i) for i in range(len(names))]:
        found = match_class_names(names, labels)
        missing = [c for c, i in zip(labels, found) if i is None]
        if missing:
            raise ValueError(f"{data} has label(s) {', '.join(map(repr, missing[:5]))} that the checkpoint "
                             f"{checkpoint} does not know (its labels: {', '.join(map(repr, names[:8]))}"
                             f"{', ...' if len(names) > 8 else ''}); {_finetune_hint(checkpoint, data)}")
        return [i for i in found if i is not None]
    if len(labels) != model.num_classes:
        raise ValueError(f"{data} has {len(labels)} labels but the checkpoint {checkpoint} has a head for "
                         f"{model.num_classes}; {_finetune_hint(checkpoint, data)}")
    return list(range(len(labels)))


def _run_multilabel(args: argparse.Namespace, model, reference, device, threshold: float) -> int:
    """A multi-label checkpoint (sigmoid scores) on multi-label data (:mod:`vitlab.data.multilabel`): loss, mAP,
    F1 and exact match at ``threshold``, per label in metrics.json and per_class.csv."""
    from vitlab.data import eval_transform
    from vitlab.data.multilabel import build_multilabel_dataset
    from vitlab.export.runtimes import setup_seconds
    from vitlab.train.evaluate import evaluate

    if args.class_order is not None or args.class_match != "auto":
        log.warning("--class-match / --class-order: a multi-label model's labels are matched by name (or by position "
                    "where the checkpoint names none); ignored")
    if getattr(args, "class_map", None):
        log.warning("--class-map: not used for multi-label data (ignored)")
    ds = build_multilabel_dataset(args.data, split="train" if args.whole else args.split,
                                  val_fraction=0.0 if args.whole else args.val_fraction, seed=args.seed,
                                  transform=eval_transform(model.preprocessing), skip_bad_images=args.skip_bad_images,
                                  split_method=run_split_method(args.checkpoint, args.data))
    if not args.whole:
        check_run_split_source(args.checkpoint, args.data, ds, args.seed, args.val_fraction)
    mapping = label_mapping(model, ds.classes, args.checkpoint, args.data)
    head_names = list(getattr(model, "class_names", None) or []) or [str(i) for i in range(model.num_classes)]
    if head_names == [str(i) for i in range(model.num_classes)] and mapping == list(range(model.num_classes)):
        head_names = list(ds.classes)
    scored = MultiHotForHead(ds, mapping, model.num_classes)
    out = report_folder(args, args.split, ("metrics.json", "per_class.csv"))
    r = evaluate(model, scored, num_classes=model.num_classes, batch_size=args.batch_size, device=device,
                 amp=args.amp, workers=args.workers, class_names=head_names, progress=not args.json,
                 multi_label=True, threshold=threshold)
    warn_nonfinite(r, args.checkpoint)
    ml = r.multilabel
    assert ml is not None
    out.mkdir(parents=True, exist_ok=True)
    metrics = {"checkpoint": str(args.checkpoint), "runtime": model.name, "data": args.data,
               "split": "all" if args.whole else args.split, "multi_label": True, **r.summary(),
               "per_label": ml.per_label(head_names)}
    if mapping != list(range(model.num_classes)):
        metrics["label_match"] = {name: head_names[j] for name, j in zip(ds.classes, mapping)}
    if model.name != "torch":
        metrics["setup_s"] = round(setup_seconds(model), 3)
    if reference is not None and model.name != "torch":
        ref = evaluate(reference.to(device), scored, num_classes=model.num_classes, batch_size=args.batch_size,
                       device=device, workers=args.workers, class_names=head_names, progress=False,
                       multi_label=True, threshold=threshold)
        metrics["float32_mAP"] = ref.summary()["mAP"]
        metrics["label_agreement_with_float32"] = round((ref.predictions == r.predictions).float().mean().item(), 6)
    if args.skip_bad_images:
        metrics["skipped_images"] = ds.num_skipped
    write_report(out / "per_class.csv", _csv_text(
        [["label", "support", "ap", "precision", "recall", "f1"]]
        + [[name, v["support"], "" if v["ap"] is None else f"{v['ap']:.6f}", f"{v['precision']:.6f}",
            f"{v['recall']:.6f}", f"{v['f1']:.6f}"] for name, v in metrics["per_label"].items()]))
    write_report(out / "metrics.json", json.dumps(metrics, indent=2))  # last, as the single-label report
    if args.json:
        print(json.dumps(metrics, indent=2))
        return 0
    left = (f" ({ml.labels_without_positives} label(s) without a positive image left out)"
            if ml.labels_without_positives else "")
    shown = "n/a" if math.isnan(ml.mAP) else f"{100 * ml.mAP:.2f}%"
    print(f"{args.data} [{metrics['split']}], {r.num_samples} images: mAP {shown}{left}  micro-F1 "
          f"{100 * ml.micro_f1:.2f}%  macro-F1 {100 * ml.macro_f1:.2f}%  exact match {100 * ml.exact_match:.2f}% "
          f"(threshold {threshold:g})  loss {r.loss:.4f}" + ("" if model.name == "torch" else f"  ({model.name})"))
    if "float32_mAP" in metrics:
        print(f"  {model.name} vs float32 PyTorch: label agreement {100 * metrics['label_agreement_with_float32']:.2f}%"
              f" (float32 mAP {metrics['float32_mAP']})")
    width = max(len(c) for c in head_names)
    print(f"  {'label':<{width}}  support      AP  precision  recall      F1")
    for name, v in metrics["per_label"].items():
        ap = "   n/a" if v["ap"] is None else f"{100 * v['ap']:6.2f}"
        print(f"  {name:<{width}}  {v['support']:7d}  {ap}  {100 * v['precision']:9.2f}  {100 * v['recall']:6.2f}  "
              f"{100 * v['f1']:6.2f}")
    if args.skip_bad_images:
        print(f"skipped {ds.num_skipped} undecodable image(s) in total")
    print(f"report: {out}/ (metrics.json, per_class.csv)")
    return 0


def _unused_class_options(args: argparse.Namespace, why: str) -> None:
    given = [o for o, k in (("--class-map", "class_map"), ("--class-order", "class_order")) if getattr(args, k, None)]
    if given:
        log.warning("%s: not used (%s; ignored)", " / ".join(given), why)


def feature_report(model, test_set, args: argparse.Namespace, device, protocol: str) -> int:
    """k-NN (--knn-k, --knn-t) or a linear probe from the training split's pre-logit features to the evaluated
    split's."""
    import torch

    from vitlab.analysis.fewshot import extract_features
    from vitlab.data import build_dataset, collate_skip_none, eval_transform
    from vitlab.ssl.knn import knn_neighbours, weighted_knn
    from vitlab.ssl.probe import train_linear_probe

    out = report_folder(args, args.split, ("metrics.json",))
    # the run's own training split (on a fixed test set, the evaluated split says nothing of it)
    seed, fraction = getattr(args, "given_split", (args.seed, args.val_fraction))
    seed, fraction = run_split(args.checkpoint, args.data, "train", seed=seed, val_fraction=fraction, measured=False)
    train = build_dataset(args.data, split="train", val_fraction=fraction, seed=seed,
                          transform=eval_transform(model.preprocessing), skip_bad_images=args.skip_bad_images,
                          split_method=run_split_method(args.checkpoint, args.data))
    what = (f"k-NN evaluation (k={args.knn_k}, T={args.knn_t:g})" if protocol == "knn"
            else f"linear probe ({args.probe_epochs} epochs)")
    log.info("%s: %s on its features, from %d training images", args.checkpoint, what, len(train))
    # --skip-bad-images: undecodable images come as None and are dropped from the batches
    tx, ty = extract_features(model, train, batch_size=args.batch_size, device=device, collate_fn=collate_skip_none)
    vx, vy = extract_features(model, test_set, batch_size=args.batch_size, device=device,
                              collate_fn=collate_skip_none)
    metrics = {"checkpoint": str(args.checkpoint), "data": args.data, "split": args.split, "protocol": protocol}
    if protocol == "knn":
        k = knn_neighbours(args.knn_k, len(ty))
        if k != args.knn_k:
            log.warning("--knn-k %d: only %d training images, so k-NN votes with k=%d", args.knn_k, len(ty), k)
            what = f"k-NN evaluation (k={k}, T={args.knn_t:g})"
        pred = weighted_knn(tx, ty, vx, len(train.classes), k=k, temperature=args.knn_t)
        metrics.update(k=k, temperature=args.knn_t)
    else:
        probe = train_linear_probe(tx, ty, len(train.classes), epochs=args.probe_epochs, seed=args.seed)
        with torch.no_grad():
            pred = probe(vx).argmax(-1)
        metrics.update(epochs=args.probe_epochs)
    top1 = float((pred == vy).float().mean())
    metrics.update(train_images=len(ty), samples=len(vy), top1=top1)
    out.mkdir(parents=True, exist_ok=True)
    write_report(out / "metrics.json", json.dumps(metrics, indent=2))
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(f"{args.data} [{args.split}], {len(vy)} images: {what} top-1 {100 * top1:.2f}% "
              f"({len(ty)} training images)")
    return 0


def displayable(text: str) -> str:
    """``text`` that fonts and UTF-8 files take: bytes a non-UTF-8 locale left undecoded in a path or a folder
    name (Python's surrogate escapes, e.g. under LC_ALL=C) read as UTF-8, else shown as U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def save_confusion_png(confusion, classes: list[str], path: Path, *, title: str,
                       row_names: list[str] | None = None) -> None:
    """The confusion matrix as a figure: rows are the true classes (``row_names``, default ``classes``), columns
    the predicted ones (``classes``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes, title = [displayable(c) for c in classes], displayable(title)
    rows = [displayable(c) for c in (row_names if row_names is not None else classes)]
    k = max(len(classes), len(rows))
    size = min(4 + 0.35 * k, 30)
    fig, ax = plt.subplots(figsize=(size, size))
    try:
        im = ax.imshow(confusion.numpy(), cmap="Blues")
        fig.colorbar(im, ax=ax, fraction=0.046)
        if k <= 40:
            ax.set_xticks(range(len(classes)), classes, rotation=90)
            ax.set_yticks(range(len(rows)), rows)
        if k <= 20:
            peak = confusion.max().item() or 1
            for i in range(len(rows)):
                for j in range(len(classes)):
                    v = confusion[i, j].item()
                    ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
                            color="white" if v > peak / 2 else "black")
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
