"""Options that several subcommands share, declared and checked in one place.

``--device`` is validated by :func:`check_device` for every command that has the option, in
``vitlab.cli.main`` before the command does any work: ``--device cuda`` on a machine without CUDA is the
same one-line error (exit status 2) for ``train``, ``eval``, ``explain`` and the rest.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vitlab.train.distributed import resolve_device

log = logging.getLogger("vitlab")


def add_model_argument(p: argparse.ArgumentParser, *, with_model: bool = True) -> None:
    if with_model:
        p.add_argument("--model", help="registered architecture of weights that do not name it (timm, Hugging Face "
                                       "or JAX files); not needed for vitlab checkpoints")
    p.add_argument("--model-arg", dest="model_args", action="append", default=[], metavar="KEY=VALUE",
                   help="a model option the weights cannot tell (JSON value), for timm or official files, e.g. "
                        "global_pool=\"avg\" with fc_norm=false; repeatable (vitlab checkpoints record theirs)")


def parse_assignments(items: list[str], option: str) -> dict[str, Any]:
    """``KEY=VALUE`` options (``--model-arg``, benchmark's ``--set``) as config overrides: the value read as JSON
    (``false``, ``"avg"``, ``[1, 2]``), else as a Python literal (``False``, ``'avg'``, ``(1, 2)``), else kept as
    text; lists become the tuples the config dataclasses hold."""
    import ast

    from vitlab.checkpoints.io import parse_json

    out: dict[str, Any] = {}
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"{option} {item!r}: expected KEY=VALUE, e.g. global_pool=\"avg\"")
        try:
            value = parse_json(text)
        except ValueError:  # not JSON (nested too deeply included): a Python literal, else text
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text
        out[key.strip()] = tuple(value) if isinstance(value, list) else value
    return out


def model_args(args: argparse.Namespace) -> dict[str, Any]:
    """``--model-arg KEY=VALUE`` options as config overrides."""
    return parse_assignments(getattr(args, "model_args", None) or [], "--model-arg")


def load_checkpoint(args: argparse.Namespace) -> torch.nn.Module:
    """``--checkpoint``'s model: a vitlab checkpoint names its architecture, other weights need ``--model``
    (and ``--model-arg`` for what their tensors do not show)."""
    import vitlab

    return vitlab.load_model(args.checkpoint, model_name=args.model, **model_args(args))


def require_classifier(model: torch.nn.Module, command: str, source: str) -> torch.nn.Module:
    """``model`` if it is a classifier; a detector or segmenter is one clear error naming what runs it."""
    task = getattr(model, "task", "classification")
    if task != "classification":
        other = {"detection": "`vitlab detect` (with --attention for each object's attention map)",
                 "segmentation": "`vitlab segment`"}.get(task, "its own command")
        raise ValueError(f"{source}: a {task} model; `vitlab {command}` works on classifiers. Run it with {other}, "
                         f"and `vitlab eval` for its metrics")
    return model


def add_device_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", metavar="DEVICE",
                   help="auto (cuda when available, else cpu), cpu, cuda or cuda:N")


def _pixels(text: str) -> int | None:
    if text.strip().lower() in ("none", "off"):
        return None
    try:
        value = int(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of pixels or none, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of pixels, got {text!r}")
    return value


def add_image_limit_argument(p: argparse.ArgumentParser) -> None:
    from vitlab.data.image import DEFAULT_MAX_IMAGE_PIXELS

    p.add_argument("--max-image-pixels", type=_pixels, default=argparse.SUPPRESS, metavar="N",
                   help=f"refuse images of more than N pixels as decompression bombs (default "
                        f"{DEFAULT_MAX_IMAGE_PIXELS:,}, or VITLAB_MAX_IMAGE_PIXELS; none: no limit); larger "
                        f"photos below it are decoded at the size the model needs")


def threads_type(text: str) -> int:
    """argparse type of every --threads: a whole number, at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of threads, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1 thread, got {text!r}")
    return value


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    """``--threads N`` for a command that only runs models (eval, predict, explain, ...): torch's intra-op
    CPU threads for the whole command, set by :func:`apply_threads`. (train and benchmark have their own.)"""
    p.add_argument("--threads", type=threads_type, default=None, metavar="N",
                   help="CPU threads for the model (default: torch's, which follows OMP_NUM_THREADS)")
    p.set_defaults(apply_threads=True)


def number_type(parse: Callable[[str], Any], ok: Callable[[Any], bool], expected: str,
                name: str) -> Callable[[str], Any]:
    """An argparse type: ``parse(text)`` where ``ok`` holds, else an error saying what was ``expected`` (argparse
    names the option in it)."""
    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    convert.__name__ = name
    return convert


# nan fails every comparison below: refused
positive_int = number_type(int, lambda v: v >= 1, "an integer >= 1", "positive_int")
non_negative_int = number_type(int, lambda v: v >= 0, "an integer >= 0", "non_negative_int")
positive_float = number_type(float, lambda v: 0 < v < math.inf, "a finite number > 0", "positive_float")
non_negative_float = number_type(float, lambda v: 0 <= v < math.inf, "a finite number >= 0", "non_negative_float")
fraction = number_type(float, lambda v: 0 <= v <= 1, "a fraction from 0 to 1", "fraction")


def add_threshold_argument(p: argparse.ArgumentParser, what: str) -> None:
    """``--threshold``: the sigmoid score from which a multi-label model gives a label (default 0.5)."""
    p.add_argument("--threshold", type=fraction, default=None, metavar="T",
                   help=f"multi-label models (sigmoid scores): a label is given where its score is >= T; {what} "
                        f"(default: 0.5)")


def multilabel_threshold(args: argparse.Namespace, score_function: str) -> float:
    """``--threshold``, or 0.5; given for a model that does not score with sigmoid, it is ignored with a warning."""
    from vitlab.train.multilabel import DEFAULT_THRESHOLD

    given = getattr(args, "threshold", None)
    if given is not None and score_function != "sigmoid":
        log.warning("--threshold %g: the model scores with %s, not sigmoid (multi-label); ignored", given,
                    score_function)
    return DEFAULT_THRESHOLD if given is None else float(given)


def add_skip_bad_images_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--skip-bad-images", action="store_true",
                   help="report an undecodable file and go on (JSON: an entry with \"error\") instead of stopping")


def apply_threads(args: argparse.Namespace) -> None:
    """Set torch's intra-op threads from ``--threads`` for the commands declared with add_threads_argument."""
    if getattr(args, "apply_threads", False) and args.threads is not None:
        torch.set_num_threads(args.threads)


def apply_image_limit(args: argparse.Namespace) -> None:
    """Set the decoder's pixel limit from ``--max-image-pixels`` when the command has it and it was given."""
    limit = getattr(args, "max_image_pixels", "keep")
    if limit != "keep":
        from vitlab.data.image import set_max_image_pixels

        set_max_image_pixels(limit)


def check_device(args: argparse.Namespace) -> torch.device | None:
    """The device ``args.device`` names (None when the command has no ``--device``); ValueError if unusable."""
    if not hasattr(args, "device"):
        return None
    return resolve_device(args.device)


def refuse_torchrun(command: str) -> None:
    """``vitlab COMMAND`` runs in one process: under torchrun (WORLD_SIZE > 1) every process would evaluate all
    of the data and write the same files, so it is refused (a ValueError, exit status 2)."""
    world = os.environ.get("WORLD_SIZE", "1").strip()
    if world.isdigit() and int(world) > 1:
        raise ValueError(f"`vitlab {command}` runs in one process: run it without torchrun (here each of the "
                         f"{world} processes would evaluate all of the data and write the same files)")


def printable(path: str | os.PathLike) -> str:
    """``path`` as stdout can print it: a file name that is not UTF-8 keeps its bytes where the stream takes
    them (surrogateescape), else they are shown as escapes."""
    from vitlab.analysis.figures import display_text

    text = str(path)
    try:
        text.encode(sys.stdout.encoding or "utf-8", sys.stdout.errors or "strict")
    except (UnicodeEncodeError, LookupError):
        return display_text(text)
    return text


def add_class_map_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--class-map", type=str, metavar="FILE",
                   help="a text file of the head's class names, one per line in the order of its outputs (timm's "
                        "--class-map .txt; blank lines are skipped): names for weights that record none (a timm "
                        "state dict), or in place of the checkpoint's own")


def read_class_map(path: str) -> list[str]:
    """The class names of a ``--class-map`` text file: one per line (surrounding spaces stripped, blank lines
    skipped), line i naming the head's i-th output, as timm reads a ``.txt`` class map. A pickled map (timm's
    ``.pkl``) is refused: unpickling a file can run code."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix in (".pkl", ".pickle"):
        raise ValueError(f"--class-map {path}: a pickle file is not read (unpickling can run code); write its "
                         f"class names to a .txt file, one per line in index order")
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = [(number, line.strip()) for number, line in enumerate(f, 1) if line.strip()]
    except FileNotFoundError:
        raise ValueError(f"--class-map {path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"--class-map {path}: a folder, not a text file of class names") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"--class-map {path}: not UTF-8 text ({e.reason} at byte {e.start}); expected class "
                         f"names, one per line") from None
    if not lines:
        raise ValueError(f"--class-map {path}: no class names in it (expected one per line)")
    seen: dict[str, int] = {}
    for number, name in lines:
        if name in seen:
            raise ValueError(f"--class-map {path}: class {name!r} is named twice (lines {seen[name]} and "
                             f"{number}); each of the head's outputs needs its own name")
        seen[name] = number
    return [name for _, name in lines]


def recorded_class_names(model: torch.nn.Module, reference: torch.nn.Module | None = None) -> list[str]:
    """The class names a checkpoint records ([] for one that names none, such as a timm state dict, whose
    runtime shows stand-ins "0".."N-1"): ``reference``'s (the PyTorch model of a runtime), else those in the
    metadata of the ONNX file ``model`` runs."""
    described = reference if reference is not None else getattr(model, "inner", model)
    meta = getattr(described, "meta", None)
    names = meta.get("class_names") if isinstance(meta, dict) else getattr(described, "class_names", None)
    return list(names or [])


def apply_class_map(model: torch.nn.Module, names: list[str], path: str, *, recorded: list[str]) -> None:
    """``model.class_names`` becomes the ``--class-map`` file's ``names``; their number must be the head's.
    ``recorded``: the checkpoint's own names (replaced with a warning where they differ)."""
    if len(names) != model.num_classes:
        raise ValueError(f"--class-map {path}: {len(names)} class names, but the checkpoint's head has "
                         f"{model.num_classes} outputs; the file needs one name per output, in their order")
    if recorded and recorded != names:
        log.warning("--class-map %s: its names replace the checkpoint's own (%s... become %s...)", path,
                    recorded[:3], names[:3])
    model.class_names = list(names)


def recorded_data(run_dir: str | os.PathLike, job: dict[str, Any] | None = None) -> str | None:
    """The data source a run recorded (its job.json, or ``job`` as read from it), as readable from here: its
    ``data`` as given, or, for a relative path given from another folder, the absolute ``data_source`` (what
    ``eval`` and ``train --resume`` use without --data); None when neither names a source readable from here."""
    from vitlab.train.run import read_job, source_identity

    job = read_job(Path(run_dir)) if job is None else job
    recorded, identity = job.get("data"), job.get("data_source")
    if recorded is not None and (identity is None or source_identity(recorded) == identity):
        return str(recorded)
    if identity is not None and source_identity(identity) == identity:  # a path recorded relative to elsewhere
        path = str(identity).partition(":")[2]  # "folder:/abs/path": the path alone where it reads the same
        return path if path and source_identity(path) == identity else str(identity)
    return None
