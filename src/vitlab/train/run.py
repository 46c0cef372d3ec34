"""A training job from a recipe and a data source: what ``vitlab train`` and ``vitlab finetune`` run.

It builds the data splits and the model, attaches the model's own preprocessing to the data, runs
:func:`vitlab.train.fit` (under torchrun too) and evaluates the result on the test split.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from vitlab.checkpoints import CheckpointError
from vitlab.checkpoints.io import parse_json
from vitlab.data.splits import SPLIT_METHOD, changed_split_note, recorded_split_method, split_source_changes
from vitlab.models.describe import describe_model
from vitlab.models.registry import get_entry
from vitlab.train import peft
from vitlab.train.budget import Deadline
from vitlab.train.distributed import DistContext, distributed_context
from vitlab.train.evaluate import EvalResult, evaluate
from vitlab.train.hardware import processes_per_machine, training_threads
from vitlab.train.losses import ClassificationLoss
from vitlab.train.recipe import Recipe
from vitlab.train.state import load_train_state
from vitlab.train.trainer import (
    ADAPTER_FILE,
    BEST_FILE,
    EMA_BEST_FILE,
    EMA_FILE,
    METRICS_FILE,
    MODEL_FILE,
    RECIPE_FILE,
    STATE_FILE,
    atomic_text,
    check_best_metric,
    fit,
)

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
JOB_FILE = "job.json"  # what the run was asked to do: task, data source (and its classes), model
MARKER_KEY = "written_by"  # in every job.json vitlab writes: "vitlab VERSION" (run_marker)
LOCK_FILE = ".vitlab.lock"  # held by the process writing the run (run_dir_lock): its PID and host
# files a vitlab run writes that mark a folder as a run (finished, unfinished or just begun), when they are
# vitlab's own: the training state, a model with vitlab's metadata, a job.json with vitlab's marker
RUN_MARKERS = (STATE_FILE, MODEL_FILE, JOB_FILE)
JOB_KEYS = ("data", "model")  # in every job.json vitlab writes (train, finetune, pretrain, detection, segmentation)
# what a run appends to as it trains: a new run must not append to a stopped one's
TRAINING_LOGS = (METRICS_FILE, "tb")
# what `vitlab pretrain` writes besides (vitlab.ssl.tokenizer.TOKENIZER_FILE, vitlab.ssl.run.TEACHER_FILE)
PRETRAIN_OUTPUTS = ("tokenizer.safetensors", "teacher.safetensors")
# every file a run writes into its directory (the trainer's, the jobs' and the dense tasks' metrics.json)
RUN_OUTPUTS = (*RUN_MARKERS, EMA_FILE, BEST_FILE, EMA_BEST_FILE, RECIPE_FILE, METRICS_FILE, RESULTS_FILE, "metrics.json", "tb",
               *PRETRAIN_OUTPUTS, ADAPTER_FILE)
# what `fit` itself writes as it trains: a second fit into the folder would replace or append to them
FIT_OUTPUTS = (STATE_FILE, MODEL_FILE, EMA_FILE, BEST_FILE, EMA_BEST_FILE, METRICS_FILE, "tb", ADAPTER_FILE)
# `vitlab eval`'s report (its files, and its default folder beside a checkpoint: eval_SPLIT); the eval command reads them here
EVAL_REPORT_PREFIX = "eval_"
EVAL_REPORT_FILES = ("metrics.json", "per_class.csv", "confusion.csv", "confusion.png")


@dataclass(kw_only=True)
class Distill:
    teacher: str  # as resolved (an absolute path for a file or folder), so that --resume finds it from anywhere
    kind: Literal["soft", "hard"] = "soft"
    alpha: float = 0.5
    tau: float = 1.0
    model: str | None = None  # --teacher-model: the teacher's architecture, for weights that do not name it
    # the teacher's weights when the run began (weights_fingerprint): --resume refuses a teacher that changed since
    fingerprint: str | None = None
    # the teacher's earlier paths: a --resume that gave it at a new path (a moved file with the same weights)
    moved_from: list[str] = field(default_factory=list)


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
    threads: int | None = None  # --threads: intra-op CPU threads (None: the recipe's, else the cores given)
    time_budget_s: float | None = None  # --time-budget: size the schedule to end on time (fresh runs)
    # when the job began, for the budget (time.monotonic(); the CLI gives the process's start)
    started: float = field(default_factory=time.monotonic)
    compile: bool = False  # torch.compile the training forward (compile time reported apart)
    extra_overrides: dict[str, Any] = field(default_factory=dict)
    # the recipe fields the command line set (--set KEY=...): a --time-budget keeps these as given
    set_fields: frozenset[str] = frozenset()


def model_overrides(name: str, recipe: Recipe, in_chans: int | None) -> dict[str, Any]:
    """The recipe's model overrides, plus the data's channel count for a model trained from scratch."""
    template = get_entry(name).config
    fields = {f.name for f in dataclasses.fields(template)}
    out = dict(recipe.model_overrides)
    if in_chans is not None and "in_chans" in fields and "in_chans" not in out:
        out["in_chans"] = in_chans
    c = out.get("in_chans", getattr(template, "in_chans", 3))
    for key in ("mean", "std"):  # another channel count: fit_channels' values (grey: the RGB average), as create_model
        if key in fields and key not in out and len(getattr(template, key)) != c:
            from vitlab.models.base import fit_channels

            out[key] = fit_channels(tuple(getattr(template, key)), c)
    return out


def build_model(job: TrainJob, num_classes: int, in_chans: int, classes: list[str] | None = None) -> nn.Module:
    """The model to train; from ``job.pretrained``, a kept head (``zero_init_head`` false) is matched to the
    data's ``classes`` by name (:func:`vitlab.checkpoints.adapt.match_head_classes`)."""
    import vitlab

    recipe = job.recipe
    torch.manual_seed(recipe.seed)  # the same initial weights on every rank and every run
    if job.pretrained is not None and job.resume:
        return _head_scores(_resumed_model(job, num_classes), job.pretrained, recipe)
    if job.pretrained is None:
        name = job.model or recipe.model
        if name is None:
            raise ValueError("no model: give --model NAME (see `vitlab models`) or a recipe with a `model` field")
        overrides = {**model_overrides(name, recipe, in_chans), **job.extra_overrides}
        return vitlab.create_model(name, num_classes=num_classes, img_size=recipe.img_size, **overrides)
    from vitlab.models.factory import model_name_of

    name = job.model or model_name_of(job.pretrained)  # weights that do not name it: the error asks for --model
    overrides = {**recipe.model_overrides, **job.extra_overrides}
    model = vitlab.create_model(name, pretrained=job.pretrained, num_classes=num_classes, img_size=recipe.img_size,
                                **overrides)
    cfg = model.cfg
    if (getattr(cfg, "use_shared_rel_pos_bias", False) and not getattr(cfg, "use_rel_pos_bias", True)
            and not {"use_shared_rel_pos_bias", "use_rel_pos_bias"} & set(overrides)):
        # BEiT's fine-tuning: the table shared by every layer in pre-training becomes one copy per layer
        log.info("%s: its relative position table, shared by all layers in pre-training, is copied into each "
                 "layer to fine-tune (keep it shared: --set model_overrides.use_shared_rel_pos_bias=true)",
                 job.pretrained)
        model = vitlab.create_model(name, pretrained=job.pretrained, num_classes=num_classes,
                                    img_size=recipe.img_size, **overrides, use_shared_rel_pos_bias=False,
                                    use_rel_pos_bias=True)
    if recipe.zero_init_head:
        model.reset_classifier(num_classes)  # the paper's zero-initialised D x K head, also when K is unchanged
    elif classes is not None:
        from vitlab.checkpoints.adapt import match_head_classes

        match_head_classes(model, classes, source=str(job.pretrained))
    return _head_scores(model, job.pretrained, recipe)


def _head_scores(model: nn.Module, source: object, recipe: Recipe) -> nn.Module:
    """A fine-tuned ``model`` scoring as its head is trained: sigmoid for a multi-label recipe, else softmax."""
    if recipe.multi_label:
        model.score_function = "sigmoid"
        return model
    return _softmax_scores(model, source)


def _softmax_scores(model: nn.Module, source: object) -> nn.Module:
    """``model`` scoring with softmax: a fine-tune trains its head with softmax cross entropy, whatever score
    function (sigmoid: multi-label; none: regression) the source's head had."""
    was = getattr(model, "score_function", "softmax")
    if was != "softmax":
        log.info("%s scores with %s; the fine-tuned head is trained with softmax cross entropy, so its checkpoint "
                 "scores with softmax", source, was)
        model.score_function = "softmax"
    return model


def _resumed_model(job: TrainJob, num_classes: int) -> nn.Module:
    """--resume of a fine-tune: the model as the run built it, from the config (and preprocessing) its own
    model.safetensors records, else its training state's config; the training state supplies every weight,
    so the --from source is not read (it may have been moved or deleted since)."""
    import vitlab
    from vitlab.checkpoints.vitlab_format import config_from_dict

    own = job.output / MODEL_FILE
    meta = checkpoint_metadata(own)
    if meta.get("model") and meta.get("config"):
        name = job.model or meta["model"]
        overrides = {**job.recipe.model_overrides, **job.extra_overrides}
        model = vitlab.create_model(name, pretrained=own, num_classes=num_classes, img_size=job.recipe.img_size,
                                    **overrides)
    else:  # no model file (removed by hand): the architecture the training state records
        state = load_train_state(resumable_state(job.output), mmap=True)
        name = job.model or state["model_name"]
        model = get_entry(name).build(config_from_dict(get_entry(name).config, state["model_config"]))
        model.model_name = name
    log.info("--resume: %s built as the run built it (the weights come from its %s; %s is not read)", name,
             STATE_FILE, job.pretrained)
    return model


def check_output(job: TrainJob) -> None:
    """Without --resume or --overwrite, a run directory that already holds a run (finished or not) is refused."""
    check_run_dir(job.output, resume=job.resume, overwrite=job.overwrite)


def check_run_dir(output: Path, *, resume: bool, overwrite: bool) -> None:
    """:func:`check_output` for any job writing a run directory (classification, detection, segmentation).

    An existing folder that is not a vitlab run (:func:`is_run_dir`: no file in it that a run wrote) is used
    only when empty; with --overwrite the run is written beside its files, but never over one of them (a
    user's recipe.json, job.json, tokenizer.safetensors: any name in ``RUN_OUTPUTS``).
    (--resume into such a folder fails as it finds no training state.) A run that logged steps but stopped
    before its first checkpoint (no state to resume) is not appended to: it needs --overwrite too. The caller
    holds the folder's lock (:func:`run_dir_lock`): no other run writes it meanwhile."""
    if output.is_dir() and not resume and not is_run_dir(output):
        _check_foreign_dir(output, overwrite=overwrite)
        return
    if resume or overwrite:
        return
    state = output / STATE_FILE
    if state.exists():
        try:
            s = load_train_state(state)
            step, total = int(s["step"]), int(s.get("total_steps", 0))
        except (CheckpointError, KeyError, ValueError):
            step, total = None, None
        if step is not None and step >= total:
            raise ValueError(f"{output} holds a finished run ({step} steps); replace it with --overwrite, "
                             f"or choose another --output")
        if step is not None and s.get("stopped_early"):
            raise ValueError(f"{output} holds a run that stopped early at step {step} of {total} (recipe "
                             f"early_stopping_patience); replace it with --overwrite, train it on with --resume --set "
                             f"early_stopping_patience=N (a larger N, or none), or choose another --output")
        raise ValueError(f"{output} holds an unfinished run (step {step if step is not None else '?'}); "
                         f"continue it with --resume, or start over with --overwrite or another --output")
    if (output / MODEL_FILE).exists():
        raise ValueError(f"{output} already holds a model ({MODEL_FILE}); replace it with --overwrite, "
                         f"or choose another --output")
    logged = stopped_before_checkpoint(output)
    if logged:  # a new run would append its records to the old run's
        raise ValueError(f"{output} holds a run that stopped before its first checkpoint (it logged "
                         f"{', '.join(logged)}, but has no {STATE_FILE}): it cannot be resumed; start it over with "
                         f"--overwrite (its files are removed first), or choose another --output")


def stopped_before_checkpoint(output: Path) -> list[str]:
    """The training logs (metrics.jsonl, tb/) of a vitlab run in ``output`` that stopped before it saved its
    first training state; [] for a folder with a state, one that is not a run, or a run that never logged (a
    run refused before training: starting again simply rewrites its job.json and recipe.json)."""
    if (output / STATE_FILE).exists() or not is_run_dir(output):
        return []
    return [name for name in TRAINING_LOGS if (output / name).exists()]


def resumable_state(output: Path) -> Path:
    """The training state --resume continues from; a run without one is refused with the way to start it
    over (a run that trained some steps needs --overwrite, see :func:`check_run_dir`)."""
    path = output / STATE_FILE
    if not path.is_file():
        logged = stopped_before_checkpoint(output)
        if logged:
            raise FileNotFoundError(f"--resume: no training state at {path}: the run stopped before its first "
                                    f"checkpoint (it logged {', '.join(logged)}); start it over with --overwrite")
    return path


def check_resume_start(output: Path) -> None:
    """--resume: refused at once, before any recipe, data or model is built, where ``output`` holds no training
    state to continue from (:func:`resumable_state`)."""
    path = resumable_state(output)
    if path.is_file():
        return
    why = (f"{output} does not exist" if not output.exists() else
           f"the run in {output} stopped before its first checkpoint" if is_run_dir(output) else
           f"{output} holds no vitlab run")
    raise FileNotFoundError(f"--resume: no training state at {path} ({why}); start without --resume")


def is_run_dir(output: Path) -> bool:
    """Whether ``output`` holds a vitlab run: a job.json with vitlab's marker (every run writes one before it
    trains), or vitlab's training state; for a run written before job.json had the marker, a job.json with the
    keys every job records together with a model.safetensors with vitlab's metadata. A file of the same name
    that vitlab did not write (a user's job.json or recipe.json, another library's model.safetensors) does not
    make a folder a run: such a folder is the user's, and its files are never replaced."""
    if is_run_job(output / JOB_FILE) or _is_train_state(output / STATE_FILE):
        return True
    return _has_job_keys(output / JOB_FILE) and bool(checkpoint_metadata(output / MODEL_FILE))


def run_marker(resumed: Path | None = None) -> dict[str, Any]:
    """The entries every job.json a run writes begins with: the one that marks it as vitlab's, then the command
    line (``sys.argv``) and the Python and torch versions. ``resumed``: the run folder a --resume continues, whose
    job.json keeps the command that started the run; this one is added to its ``resumed_with`` list."""
    import platform
    import sys

    from vitlab import __version__

    command: dict[str, Any] = {"command": list(sys.argv)}
    earlier = read_job(resumed) if resumed is not None else {}
    if isinstance(earlier.get("command"), list):
        command = {"command": earlier["command"],
                   "resumed_with": [*earlier.get("resumed_with", []), list(sys.argv)]}
    return {MARKER_KEY: f"vitlab {__version__}", **command, "python": platform.python_version(),
            "torch": torch.__version__}


def is_run_job(path: Path) -> bool:
    """Whether ``path`` is a job.json written by a vitlab run (it carries :func:`run_marker`'s entry), not a file
    of the user's that has the same name."""
    data = _json_object(path)
    return isinstance(data.get(MARKER_KEY), str) and data[MARKER_KEY].startswith("vitlab ")


def _has_job_keys(path: Path) -> bool:
    """A job.json with the keys every job records (how a run's job.json looked before it had the marker)."""
    data = _json_object(path)
    return all(k in data for k in JOB_KEYS)


def _json_object(path: Path) -> dict[str, Any]:
    try:
        data = parse_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # ValueError: malformed, nested too deeply, not UTF-8
        return {}
    return data if isinstance(data, dict) else {}


def _is_train_state(path: Path) -> bool:
    """Whether ``path`` is vitlab's training state (another tool's train_state.pt is not)."""
    if not path.is_file():
        return False
    try:
        load_train_state(path, mmap=True)
    except (CheckpointError, OSError, ValueError):
        return False
    return True


def clear_run_outputs(output: Path) -> None:
    """--overwrite of a run: the files the old run wrote (``RUN_OUTPUTS``: its state, models, EMA model,
    metrics.jsonl, TensorBoard events, ...) and the reports `vitlab eval` wrote of its models in their default
    folders (:func:`eval_reports`) are removed before the new run starts, so that none of them is left beside
    the new run's or appended to. Other files, and a folder that is not a run, are left as they are."""
    import shutil

    if not (is_run_dir(output) or _written_by_fit(output)):
        return
    removed = []
    for name in RUN_OUTPUTS:
        path = output / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    for folder in eval_reports(output):
        shutil.rmtree(folder)
        removed.append(f"{folder.name}/ (a `vitlab eval` report of its model)")
    from vitlab.train.state import remove_stale_temporaries

    removed += [p.name for p in remove_stale_temporaries(output)]  # what a killed checkpoint write left
    if removed:
        log.info("--overwrite: removed the previous run's %s from %s", ", ".join(removed), output)


def eval_reports(output: Path) -> list[Path]:
    """The report folders `vitlab eval` wrote by default beside this run's models: ``eval_SPLIT/`` holding only
    eval's report files, whose metrics.json names one of the run's models (model, EMA or best .safetensors, as
    given to eval: a path from wherever it ran, whose folder is this one). A folder of the user's (other files
    in it, another checkpoint named) is not one."""
    found = []
    for folder in sorted(output.glob(f"{EVAL_REPORT_PREFIX}*")):
        if not folder.is_dir() or folder.is_symlink():
            continue
        names = {p.name for p in folder.iterdir()}
        if "metrics.json" not in names or not names <= set(EVAL_REPORT_FILES):
            continue
        checkpoint = _json_object(folder / "metrics.json").get("checkpoint")
        if isinstance(checkpoint, str) and _names_run_model(Path(checkpoint), output):
            found.append(folder)
    return found


def _names_run_model(checkpoint: Path, output: Path) -> bool:
    """Whether ``checkpoint`` (a path as eval was given it) is one of this run's models (last, EMA, best)."""
    if checkpoint.name not in (MODEL_FILE, EMA_FILE, BEST_FILE, EMA_BEST_FILE):
        return False
    if checkpoint.is_absolute():
        return os.path.realpath(checkpoint.parent) == os.path.realpath(output)
    # relative to the folder eval ran in, which is not recorded: the run's own folder name, or the folder itself
    return checkpoint.parent == Path(".") or checkpoint.parent.name == Path(os.path.realpath(output)).name


def _written_by_fit(output: Path) -> bool:
    """A folder :func:`vitlab.train.fit` trained into (called directly, not by a command: no job.json), before
    its first checkpoint too: its recipe.json with the values fit resolved."""
    resolved = _json_object(output / RECIPE_FILE).get("resolved")
    return isinstance(resolved, dict) and "total_steps" in resolved and "model" in resolved


def prepare_fit_dir(output: Path, *, resume: bool, overwrite: bool) -> None:
    """``fit``'s ``output_dir``: a folder holding a run's files (``FIT_OUTPUTS``: a notebook cell run twice) is
    refused unless ``resume`` (continue that run) or ``overwrite`` (its files are removed first, as the
    commands' --overwrite does: :func:`clear_run_outputs`). The commands check their --output before they call
    fit, and clear it for --overwrite: a fresh run reaches fit with none of these files."""
    if resume or not output.is_dir():
        return
    found = [name for name in FIT_OUTPUTS if (output / name).exists()]
    if not found:
        return
    if not overwrite:
        raise ValueError(f"fit: output_dir {output} already holds a run ({', '.join(found)}); training into it "
                         f"would replace its model and state and append to its {METRICS_FILE}. Pass overwrite=True "
                         f"to remove the old run's files first, resume=True to continue that run, or another "
                         f"output_dir")
    if not (is_run_dir(output) or _written_by_fit(output)):
        raise ValueError(f"fit: output_dir {output} holds {', '.join(found)}, which vitlab did not write; "
                         f"overwrite=True removes only a vitlab run's files: move them, or choose another output_dir")
    clear_run_outputs(output)


def _check_foreign_dir(output: Path, *, overwrite: bool) -> None:
    """An existing folder that is not a run: empty, or (with --overwrite) holding none of the run's files."""
    entries = sorted(p.name for p in output.iterdir() if p.name != LOCK_FILE)
    if not entries:
        return
    shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
    if not overwrite:
        raise ValueError(f"--output {output} is not a vitlab run and is not empty ({shown}); choose a new or "
                         f"empty folder, or pass --overwrite to write the run beside these files")
    clash = [name for name in RUN_OUTPUTS if (output / name).exists()]
    if clash:
        raise ValueError(f"--output {output} is not a vitlab run and holds {', '.join(clash)}, which the run "
                         f"would replace with its own (files it did not write are never replaced, --overwrite "
                         f"or not); move {'it' if len(clash) == 1 else 'them'} or choose another --output")


def check_resumable(output: Path, model: nn.Module, recipe: Recipe, *, data: str | None = None,
                    classes: list[str] | None = None, objective: Any = None,
                    split_from: dict[str, Any] | None = None) -> None:
    """Everything --resume needs, checked before the run directory is touched: the state exists and was
    written by the same model and optimiser, on data with the same classes, and (given ``objective``, an
    :class:`~vitlab.train.objective.Objective`) by the same objective with state of the same shapes; ``split_from``:
    what the data's held-out split is drawn from now (:func:`check_resumed_data`). (``fit``
    checks again as it loads; this is the early refusal that keeps a wrong --resume from rewriting the run's
    job.json.)"""
    from vitlab.train.trainer import (
        check_finished_unchanged,
        check_same_model,
        check_same_optimizer,
        check_same_targets,
    )

    path = resumable_state(output)
    state = load_train_state(path, mmap=True)
    check_same_targets(state, recipe, path)
    if data is not None:
        check_resumed_data(output, data, classes, split_from)
    check_same_model(state, model, path)
    if objective is not None:
        check_same_objective(state, objective, path)
    saved = state.get("recipe", {})
    split = {k: (saved[k], getattr(recipe, k)) for k in ("seed", "val_fraction") if k in saved}
    if any(a != b for a, b in split.values()):
        raise CheckpointError(f"--resume: the run in {output} held its validation images out with "
                              + ", ".join(f"{k} {a}" for k, (a, _) in split.items()) + "; this asks for "
                              + ", ".join(f"{k} {b}" for k, (_, b) in split.items())
                              + ", which would test on images it trained on: leave --seed / val_fraction as they "
                              "were, or start a new run (another --output)")
    check_same_optimizer(state, recipe, path)
    peft.check_same_peft(state, recipe, path)
    check_finished_unchanged(state, recipe, path)


def check_same_objective(state: dict[str, Any], objective: Any, path: Path) -> None:
    """The saved state was written by ``objective``'s kind, and its owned modules (heads, decoders, teachers,
    tokenizers) have the tensors, of the same shapes, that this run's objective builds."""
    was = state.get("objective_name", "classification")
    if was != objective.name:
        raise CheckpointError(f"--resume: {path} was trained with the {was!r} objective, this run asks for "
                              f"{objective.name!r}; resume with the run's own method, or start a new run (another "
                              f"--output)")
    saved = state.get("objective", {})
    mine = objective.state_dict()
    problems = [f"{name} (saved: {'yes' if name in saved else 'no'}, built: {'yes' if name in mine else 'no'})"
                for name in sorted(set(saved) ^ set(mine))]
    for name in sorted(set(saved) & set(mine)):
        a, b = saved[name], mine[name]
        for key in sorted(set(a) | set(b)):
            sa = tuple(a[key].shape) if key in a else None
            sb = tuple(b[key].shape) if key in b else None
            if sa != sb:
                problems.append(f"{name}.{key} (saved: {sa if sa is not None else 'none'}, built: "
                                f"{sb if sb is not None else 'none'})")
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise CheckpointError(f"--resume: the {objective.name} objective this run builds does not match the one "
                              f"saved in {path}: {shown}. Resume with the run's own options (leave --opt out), or "
                              f"start a new run (another --output)")


def check_resumed_data(output: Path, data: str, classes: list[str] | None,
                       split_from: dict[str, Any] | None = None) -> None:
    """--resume on data whose class names are not the run's is refused (the trained head would go on
    under other labels); another data source with the same classes (a moved or grown copy) is allowed,
    with a warning, or a note where its training files are those the run recorded (``split_from``, what the
    data's held-out split is drawn from now, equal to job.json's: a moved copy)."""
    from vitlab.checkpoints.adapt import same_class_names

    job = read_job(output)
    recorded = job.get("data")
    names = job.get("classes")
    if names is None:  # a run written before job.json recorded its classes: the checkpoint's
        names = checkpoint_class_names(output / MODEL_FILE)
    # compared as eval compares them: a run made on a macOS (NFD) copy of the folder resumes on an NFC one
    if classes is not None and names is not None and not same_class_names(names, classes):
        raise ValueError(f"--resume: the run in {output} was trained on {recorded or 'its data'} with classes "
                         f"{_names(names)}, but {data} has classes {_names(classes)}; resume with the run's "
                         f"own data (leave --data out), or start a new run (another --output)")
    if recorded is None or same_source(data, recorded, job.get("data_source")):
        return
    was = job.get("split_from")
    if isinstance(was, dict) and split_from is not None and split_source_changes(was, split_from) is None:
        log.info("--resume: the run in %s was trained on %s, this run continues on %s, which holds the training files "
                 "the run recorded (the same names in each class): it goes on as on its own data if their contents "
                 "are unchanged", output, recorded, data)
        return
    log.warning("--resume: the run in %s was trained on %s, this run continues on %s (the same classes); "
                "it will not match an uninterrupted run", output, recorded, data)


def check_split_source(output: Path, data: str, recorded: dict[str, Any] | None, now: dict[str, Any],
                       method: str) -> None:
    """--resume: warn where the training files that the run's held-out split is drawn from differ from those
    recorded when the run began (job.json's ``split_from``); users add data deliberately, so it is not refused."""
    if not isinstance(recorded, dict):
        return
    if (changes := split_source_changes(recorded, now)) is not None:
        log.warning("--resume: the files of %s that the run in %s held its validation images out of have changed "
                    "since it began (%s), %s; to validate on images it never trained on, resume on the files as "
                    "they were (--data: the run's folder as it was), or start a new run (another --output) on these",
                    data, output, changes, changed_split_note(method))


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(map(str, names[:limit]))
    return f"[{shown}{f', ... ({len(names)} in all)' if len(names) > limit else ''}]"


def read_job(output: Path) -> dict[str, Any]:
    """The run's job.json (what it was asked to do), or {} when it has none."""
    from vitlab.checkpoints.io import parse_json

    path = output / JOB_FILE
    try:
        job = parse_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except ValueError as e:  # malformed, nested too deeply, not UTF-8
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return job if isinstance(job, dict) else {}


def run_checkpoint(source: str | os.PathLike) -> tuple[str, str | None]:
    """A vitlab run folder given where a checkpoint file is expected, as the file it stands for: a DINO
    pre-training run's teacher.safetensors (the network DINO's paper evaluates and fine-tunes; the official
    eval_knn.py / eval_linear.py read checkpoint_key "teacher"), any other run's model.safetensors; with a note
    saying which (None for any other source, which is returned as it is: a file, a hub folder, a hub name)."""
    from vitlab.ssl.run import TEACHER_FILE

    folder = Path(source).expanduser()
    if not folder.is_dir() or (folder / "config.json").exists() or not (folder / MODEL_FILE).is_file():
        return str(source), None
    teacher = folder / TEACHER_FILE
    if teacher.is_file() and read_job(folder).get("method") == "dino":
        return str(teacher), (f"{folder}: DINO's teacher {teacher} (the network the paper evaluates); give "
                              f"{folder / MODEL_FILE} for the student")
    return str(folder / MODEL_FILE), None


def checkpoint_class_names(path: Path) -> list[str] | None:
    """The class names in a vitlab checkpoint's metadata (None when absent)."""
    names = checkpoint_metadata(path).get("class_names")
    return list(names) if names else None


def checkpoint_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """A vitlab checkpoint's metadata, read without its tensors ({} for a missing or foreign file)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = parse_json((f.metadata() or {}).get("vitlab", "{}"))
    except (OSError, ValueError, SafetensorError):  # no file, not safetensors, or unreadable metadata
        return {}
    return meta if isinstance(meta, dict) else {}


def source_identity(data: str | os.PathLike) -> str:
    """A data source as a comparable string: its kind and resolved path ("folder:/abs/path"), or the text
    as given when it names no readable source."""
    from vitlab.data.build import parse_source
    from vitlab.data.errors import DatasetError

    try:
        kind, path = parse_source(data)
    except (DatasetError, OSError):
        return str(data)
    return kind if path is None else f"{kind}:{os.path.realpath(path)}"


def same_source(data: str | os.PathLike, recorded: str, recorded_identity: str | None = None) -> bool:
    """Whether ``data`` is the source a run recorded (``job.json``'s ``data``, as given then, and its
    ``data_source`` identity when it has one: a relative path then resolves from anywhere)."""
    mine = source_identity(data)
    return mine == recorded_identity or mine == source_identity(recorded)


def run_training(job: TrainJob) -> dict[str, Any]:
    """Build data and model, train, evaluate on the test split; returns the results (rank 0: also written).

    Nothing is written to the run directory before the data, the model and (with --resume) the saved
    state have been checked.
    """
    recipe = job.recipe
    if job.progress:
        from vitlab.train.progress import log_interval_s

        log_interval_s()  # a bad VITLAB_LOG_INTERVAL is refused before the run directory is touched
    if job.resume:
        check_resume_start(job.output)
    with distributed_context(job.device) as ctx:
        if not ctx.is_main:
            logging.getLogger("vitlab").setLevel(logging.WARNING)
        local = processes_per_machine(ctx.world_size)
        with training_threads(job.threads if job.threads is not None else recipe.cpu_threads, local) as threads, \
                run_dir_lock(job.output, enabled=ctx.is_main):
            log.info("%d CPU thread(s) per process", threads)
            return _run(job, ctx)


def _run(job: TrainJob, ctx: DistContext) -> dict[str, Any]:
    """run_training inside its process group and thread setting."""
    from vitlab.data import build_dataset, eval_transform, train_transform
    from vitlab.data.checks import check_classification_data

    recipe = job.recipe
    if recipe.fsdp:
        from vitlab.train.fsdp import check_fsdp

        check_fsdp(world_size=ctx.world_size, amp=recipe.amp, compile=job.compile,
                   time_budget=job.time_budget_s is not None and not job.resume)
    if ctx.is_main:
        check_output(job)
    check_best_metric(recipe, multi_label=recipe.multi_label)
    if recipe.multi_label and job.distill is not None:
        raise ValueError("--teacher: distillation trains single-label classifiers (the teacher's softmax or its top "
                         "class); it is not supported with --multi-label (recipe multi_label): leave --teacher out")
    if job.resume and ctx.is_main:  # before the data is read as the other kind of targets
        from vitlab.train.trainer import check_same_targets

        path = job.output / STATE_FILE
        if path.is_file():  # else check_resumable says what is missing
            check_same_targets(load_train_state(path, mmap=True), recipe, path)
    split_method = _split_method(job)
    common = {"val_fraction": recipe.val_fraction, "seed": recipe.seed, "skip_bad_images": job.skip_bad_images,
              "split_method": split_method}
    build = build_dataset
    if recipe.multi_label:  # several labels per image, from the folder's label file
        from vitlab.data.multilabel import build_multilabel_dataset as build
    train_set = build(job.data, split="train", **common)
    split_from = getattr(train_set, "split_from", None)  # None: nothing drawn out of the training files
    split_now = split_from  # kept for check_resumed_data: split_from becomes the run's record on --resume
    if job.resume:
        recorded_from = read_job(job.output).get("split_from")
        if split_from is not None and recipe.val_fraction > 0:
            check_split_source(job.output, job.data, recorded_from, split_from, split_method)
        split_from = recorded_from  # what the run's split was first drawn from (unknown for an older run)
    if recipe.multi_label:
        check_multilabel_data(train_set)
    else:
        check_classification_data(train_set)
    if ctx.is_main and not job.resume:
        _warn_imbalance(train_set, recipe)
    # a source's own val/ folder is always validated on; val_fraction only holds out part of train where none is
    validate = recipe.val_fraction > 0 or has_own_val_split(job.data)
    val_set = build(job.data, split="val", **common) if validate else None
    test_set = build(job.data, split="test", **common) if ctx.is_main else None
    if _same_images(val_set, test_set):  # a source without a test set: "test" is the held-out part itself
        test_set = val_set  # decoded and cached once; its final validation is the test result
    model = build_model(job, num_classes=len(train_set.classes), in_chans=train_set.in_chans,
                        classes=list(train_set.classes))
    log.info("model: %s", describe_model(model))
    if model.preprocessing.input_size[0] == 1 and train_set.in_chans == 3:
        log.warning("%s takes 1-channel (grayscale) images: the colour images of %s are converted to grayscale "
                    "for it (their colour is lost to the model)", job.pretrained or model.model_name, job.data)
    if job.resume:
        check_resumable(job.output, model, recipe, data=job.data, classes=train_set.classes, split_from=split_now)
    # freezing and LoRA (recipe fields; fit finds the model ready): before the budget's timing and job.json
    peft.check_run(recipe, "distillation" if job.distill is not None else "classification")
    parameters = {**peft.prepare(model, recipe), "peft": peft.describe(model)}
    criterion = _distillation(job, ctx, model, train_set.classes) if job.distill is not None else None
    changes = compile_changes(job) if job.resume and ctx.is_main else []
    pre = model.preprocessing
    if recipe.augment:
        crop = pre
        if recipe.multi_scale:  # crops at the largest size: every batch's resize is then a down-sampling
            c, h, w = pre.input_size
            side = max(max(recipe.multi_scale), h, w)
            crop = dataclasses.replace(pre, input_size=(c, side, side))
        train_set.transform = train_transform(
            crop, scale=recipe.scale, ratio=recipe.ratio, hflip=recipe.hflip, randaugment=recipe.randaugment,
            randaugment_mstd=recipe.randaugment_mstd, re_prob=recipe.re_prob)
    else:
        train_set.transform = eval_transform(pre)
    for ds in (val_set, test_set):
        if ds is not None:
            ds.transform = eval_transform(pre)
    local = processes_per_machine(ctx.world_size)
    # under DDP rank 0 alone validates (FSDP: every rank): the others do not keep the validation images in memory
    validating = val_set if ctx.is_main or recipe.fsdp else None
    recipe = _prepare_data(recipe, [train_set, validating, test_set], processes=local)
    if job.skip_bad_images:  # images found undecodable while decoding into memory: checked before training
        check_readable(train_set, [val_set, test_set], batch_size=recipe.batch_size)
    if ctx.is_main:
        if job.overwrite and not job.resume:
            clear_run_outputs(job.output)
        job.output.mkdir(parents=True, exist_ok=True)
        atomic_text(job.output / JOB_FILE, json.dumps({
            **run_marker(job.output if job.resume else None), "task": "classification", "data": job.data, "data_source": source_identity(job.data),
            "classes": list(train_set.classes), **({"multi_label": True} if recipe.multi_label else {}),
            "model": job.model or recipe.model, "pretrained": job.pretrained,
            "skip_bad_images": job.skip_bad_images, "split_method": split_method,
            **({"split_from": split_from} if split_from is not None else {}),
            "distill": _distill_record(job.distill), "compile": job.compile,
            **({"compile_changes": changes} if changes else {}), **parameters}, indent=2))
    recipe = _check_precision(recipe, ctx.device)
    deadline = None
    if job.time_budget_s is not None and not job.resume:
        timed = criterion
        if timed is None and recipe.multi_label:  # the steps timed with the loss the run trains with
            from vitlab.train.losses import MultiLabelLoss

            timed = MultiLabelLoss(label_smoothing=recipe.label_smoothing)
        recipe, deadline = _fit_to_budget(job, ctx, recipe, model, train_set, val_set, test_set, timed)
    result = fit(model, recipe, built_from_recipe=True, train_set=train_set, val_set=val_set, output_dir=job.output, ctx=ctx,
                 resume=job.resume, class_names=train_set.classes, criterion=criterion,
                 until_step=job.until_step, progress=job.progress, compile=job.compile, deadline=deadline,
                 record={"split_method": split_method})
    summary: dict[str, Any] = {"model": model.model_name, "recipe": recipe.name, "data": job.data,
                               "steps": result.step, "global_batch": result.global_batch,
                               "train_seconds": round(result.seconds, 1), "val": result.val,
                               "checkpoint": str(result.model_path), **(result.parameters or {})}
    # the model at its best validation (recipe.best_metric); the test below scores the last model
    if result.best is not None:
        summary["best"] = {**result.best, "file": str(job.output / result.best["file"])}
    if result.best_ema is not None:
        summary["best_ema"] = {**result.best_ema, "file": str(job.output / result.best_ema["file"])}
    if job.compile:
        summary["compile_seconds"] = None if result.compile_seconds is None else round(result.compile_seconds, 1)
        summary["compile_failed"] = result.compile_failed
    if result.stopped_early is not None:
        summary["stopped_early"] = result.stopped_early
    if result.class_balance is not None:  # the class weights or sampling probabilities the run trained with
        summary["class_balance"] = result.class_balance
    if ctx.is_main and test_set is not None and (result.step >= result.total_steps or result.stopped_early):
        if hasattr(model, "set_distilled_training"):
            model.set_distilled_training(False)
        if recipe.fsdp:  # the sharded model cannot run on one rank: its checkpoint, loaded without FSDP, can
            import vitlab

            model = vitlab.load_model(job.output / MODEL_FILE).to(ctx.device)
        reuse = test_set is val_set and result.val is not None and ("val_top1" in result.val
                                                                     or "val_mAP" in result.val)
        if reuse:  # the fit's last validation ran on these images with this final model (and EMA model)
            summary["test"] = {k[len("val_"):]: v for k, v in result.val.items()
                               if k.startswith("val_") and not k.startswith("val_ema_")}
        else:
            summary["test"] = _test(model, test_set, recipe, ctx, "model")
        if recipe.ema_decay is not None:
            if reuse and ("val_ema_top1" in result.val or "val_ema_mAP" in result.val):
                summary["test_ema"] = {k[len("val_ema_"):]: v for k, v in result.val.items()
                                       if k.startswith("val_ema_")}
            else:
                import vitlab

                ema_model = vitlab.load_model(job.output / EMA_FILE).to(ctx.device)
                summary["test_ema"] = _test(ema_model, test_set, recipe, ctx, "EMA model")
    if job.skip_bad_images:  # distinct files, counted across worker processes and epochs
        summary["skipped_images"] = len({f for ds in (train_set, val_set, test_set) if ds is not None
                                         for f in ds.skipped()})
        for ds in {id(d): d for d in (train_set, val_set, test_set) if d is not None}.values():
            if not getattr(ds, "cached", False):  # decoded during the run: what it skipped is known only now
                report_skipped(ds, training=ds is train_set)
    if ctx.is_main and "test" in summary:
        atomic_text(job.output / "results.json", json.dumps(summary, indent=2))
    return summary


def _distill_record(d: Distill | None) -> dict[str, Any] | None:
    """job.json's ``distill``: the teacher and its options (``moved_from`` only where the teacher moved)."""
    if d is None:
        return None
    record = dataclasses.asdict(d)
    if not record["moved_from"]:
        del record["moved_from"]
    return record


def compile_changes(job: Any) -> list[dict[str, Any]]:
    """--resume of ``job`` (a TrainJob, a dense task's DenseJob): job.json's ``compile_changes`` with this resume's,
    where it turns --compile on or off (a compiled
    forward rounds otherwise than an eager one, so the run will not match an uninterrupted one bitwise; warned).
    A run recorded before job.json kept ``compile``: the command line that last ran it says."""
    recorded = read_job(job.output)
    changes = [c for c in recorded.get("compile_changes") or [] if isinstance(c, dict)]
    was = recorded.get("compile")
    if not isinstance(was, bool):
        lines = [c for c in (recorded.get("command"), *(recorded.get("resumed_with") or [])) if isinstance(c, list)]
        if not lines:
            return changes
        was = "--compile" in lines[-1]
    if was == job.compile:
        return changes
    step = int(load_train_state(job.output / STATE_FILE, mmap=True)["step"])
    log.warning("--resume %s: the run's %d steps so far ran %s, the rest run %s; a compiled forward rounds otherwise "
                "than an eager one, so the result will not match an uninterrupted run bitwise (job.json records it: "
                "compile_changes)", "with --compile" if job.compile else "without --compile", step,
                "compiled" if was else "eager", "compiled" if job.compile else "eager")
    return [*changes, {"from_step": step + 1, "compile": [was, job.compile]}]


def _split_method(job: TrainJob) -> str:
    """How the run holds images out of the training files: a resumed run as it did (a run recorded before
    ``split_method``: the old randperm draw); fine-tuning from a run's checkpoint on that run's data with its seed
    and fraction (a pre-training run's job.json ``held_out``, a training run's recipe.json) as that run drew it,
    so that the held-out part is the one it left out; else the current method."""
    if job.resume:
        return recorded_split_method(read_job(job.output))
    source = Path(str(job.pretrained)) if job.pretrained is not None else None
    if source is None or not source.is_file():
        return SPLIT_METHOD
    try:
        pre = read_job(source.parent)
    except ValueError:
        return SPLIT_METHOD
    if pre.get("data") is None or not same_source(job.data, pre["data"], pre.get("data_source")):
        return SPLIT_METHOD
    held = pre.get("held_out")  # a pre-training run's record; a training run's seed and fraction: its recipe.json
    if not isinstance(held, dict):
        try:
            held = parse_json((source.parent / "recipe.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            held = None
    if isinstance(held, dict) and (held.get("seed"), held.get("val_fraction")) == (job.recipe.seed,
                                                                                   job.recipe.val_fraction):
        return recorded_split_method(pre)
    return SPLIT_METHOD


def has_own_val_split(data: str) -> bool:
    """Whether the data source has a validation set of its own (an image folder's val/), which a run validates
    on whatever its val_fraction (that only holds out part of the training data where there is none)."""
    from vitlab.data.build import parse_source
    from vitlab.data.folder import folder_layout

    kind, path = parse_source(data)
    return kind == "folder" and folder_layout(path)[1] is not None


def report_skipped(ds, *, training: bool) -> list[str]:
    """Log, per class, the images of ``ds`` skipped as undecodable (``--skip-bad-images``); returns the classes
    of which no image was readable."""
    per_class = ds.skipped_per_class()
    if not per_class:
        return []
    total = sum(k for k, _ in per_class.values())
    log.warning("%s: %d of %d images undecodable, skipped (--skip-bad-images): %s", ds.source, total, len(ds),
                ", ".join(f"{name} {k} of {n}" for name, (k, n) in per_class.items()))
    dead = [name for name, (k, n) in per_class.items() if k == n]
    if dead and training:
        log.warning("%s: no readable training image of class(es) %s: the model learns nothing of %s",
                    ds.source, ", ".join(dead), "it" if len(dead) == 1 else "them")
    return dead


def check_readable(train_set, held_out: list, *, batch_size: int) -> None:
    """With --skip-bad-images, after the images were decoded into memory: report what each split skips, per
    class, and refuse a training split in which a class has no readable image (a model would be trained with
    a class it never sees) or whose readable images do not fill one batch."""
    from vitlab.data.errors import DatasetError

    for ds in {id(d): d for d in held_out if d is not None and d is not train_set}.values():
        if getattr(ds, "cached", False):
            report_skipped(ds, training=False)
    if not getattr(train_set, "cached", False):
        return  # decoded as the run goes: its bad images are reported at the end
    dead = report_skipped(train_set, training=False)
    if dead:
        counts = train_set.skipped_per_class()
        raise DatasetError(f"{train_set.source}: class(es) {', '.join(repr(c) for c in dead)} have no readable "
                           f"training image (" + ", ".join(f"{c}: all {counts[c][1]} undecodable" for c in dead)
                           + "; --skip-bad-images skipped them): replace those files with images, or remove the "
                           "class folder(s)")
    readable = len(train_set) - train_set.num_skipped
    if readable < batch_size:
        raise DatasetError(f"{train_set.source}: only {readable} of {len(train_set)} training images are readable "
                           f"({train_set.num_skipped} undecodable, skipped by --skip-bad-images), fewer than one "
                           f"batch of {batch_size}; replace the bad files, or lower --batch-size")


def _same_images(a, b) -> bool:
    """Two splits that are the same files with the same labels (a folder without test/ answers "test" with
    its held-out part)."""
    if a is None or b is None or getattr(a, "paths", None) is None or getattr(b, "paths", None) is None:
        return False
    return a.paths == b.paths and a.targets == b.targets


def _warn_imbalance(train_set: Any, recipe: Recipe) -> None:
    """A recipe of the user's own on strongly imbalanced classes without class_balance: said, with what helps (the
    auto recipe balances such data itself and says so)."""
    from vitlab.data.sampler import label_counts, training_labels
    from vitlab.train.auto import imbalanced

    if recipe.name == "auto" or recipe.class_balance != "none":
        return
    try:
        counts = label_counts(training_labels(train_set), len(train_set.classes))
    except (TypeError, ValueError):  # no labels to count without decoding: nothing to say
        return
    if not imbalanced(counts):
        return
    lo, hi = min(counts), max(counts)
    fix = ("--set class_balance=loss weighs each label's positives (binary cross entropy's pos_weight)"
           if recipe.multi_label else
           "--set class_balance=sampler --set class_balance_power=0.5 draws the small classes more often (what the "
           "auto recipe does for such data; README, \"Imbalanced classes\")")
    log.warning("imbalanced %s: the largest has %d images, the smallest %d%s; small %s can score far below the mean: "
                "%s, and `vitlab eval` reports each one's accuracy", "labels" if recipe.multi_label else "classes",
                hi, lo, f" ({hi / lo:.0f}x)" if lo else "", "labels" if recipe.multi_label else "classes", fix)


def _fit_to_budget(job: TrainJob, ctx: DistContext, recipe: Recipe, model: nn.Module, train_set, val_set,
                   test_set, criterion=None) -> tuple[Recipe, Deadline]:
    """Time the first steps (with the run's ``criterion``: a distillation teacher's forward counts) and give the
    run the number of steps that ends its schedule on time; the deadline lets the run re-time its own steps and
    correct that number as it goes."""
    from vitlab.train.budget import finish_reserve_s, fit_recipe_to_budget, measure_step_seconds, user_set_fields
    from vitlab.train.progress import format_duration

    # a first estimate, timed for 0.5% of the budget (at least 8 steps); the run re-times its own steps at the
    # end of its warm-up and corrects the plan (the Deadline), so these steps need not be many
    step_s = measure_step_seconds(model, recipe, train_set, ctx.device, min_seconds=0.005 * job.time_budget_s,
                                  criterion=criterion)
    if ctx.distributed:  # every rank runs the same number of steps: rank 0's
        import torch.distributed as dist

        box = [step_s]
        dist.broadcast_object_list(box, src=0)
        step_s = box[0]
    eval_sets = [val_set] + ([test_set] if test_set is not val_set else [])
    eval_images = sum(len(ds) for ds in eval_sets if ds is not None) * (2 if recipe.ema_decay else 1)
    elapsed = time.monotonic() - job.started
    budget = job.time_budget_s - finish_reserve_s(job.time_budget_s)  # the steps and the evaluation end by then
    fitted = fit_recipe_to_budget(recipe, budget_s=budget, elapsed_s=elapsed, step_s=step_s,
                                  num_images=len(train_set) * (recipe.repeat_aug or 1), eval_images=eval_images,
                                  world_size=ctx.world_size, time_budget_s=job.time_budget_s,
                                  user_fields=user_set_fields(recipe) | job.set_fields)
    log.info("time budget %s: %.3f s per step measured, %s already spent -> %d steps (%d epoch(s)); the cosine "
             "decay ends on time and the model is evaluated at the end", format_duration(job.time_budget_s), step_s,
             format_duration(elapsed), fitted.max_steps, fitted.epochs)
    return fitted, Deadline(end=job.started + budget, eval_images=eval_images)


def _check_precision(recipe: Recipe, device: torch.device) -> Recipe:
    """amp=bf16 on a CPU without native bfloat16 (AVX512-BF16 / AMX) would be emulated, slower than float32:
    it runs in float32 instead, with a warning."""
    from vitlab.train.hardware import cpu_has_bf16

    if recipe.amp == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        log.warning("amp=bf16: this CPU has no native bfloat16 (AVX512-BF16 or AMX); training in float32")
        return recipe.replace(amp="none")
    return recipe


def _prepare_data(recipe: Recipe, datasets: list, *, processes: int = 1) -> Recipe:
    """Decode small image folders into memory once (``cache_images``) and choose the loader's workers.

    ``processes``: this run's processes on this machine (torchrun's local world size). Each holds its own copy
    of the images, so each gets that share of the memory budget, and of the cores for decoding and loading.
    """
    from vitlab.data.cache import MEMORY_SHARE, cache_decoded
    from vitlab.data.dataset import ImageFileDataset
    from vitlab.train.hardware import available_cores, available_memory_gb, default_workers

    cores = max(1, available_cores() // processes)
    in_memory = True
    budget = int(MEMORY_SHARE * available_memory_gb() * 2**30 / processes)
    for ds in {id(d): d for d in datasets}.values():  # a split given twice is cached once
        if isinstance(ds, ImageFileDataset):
            if recipe.cache_images is False:
                in_memory = False
                continue
            # --workers (recipe workers) given: decode with that many (0: in this process); else the main process
            # only collects and every core decodes
            workers = recipe.workers if recipe.workers is not None else min(8, cores) if cores > 1 else 0
            try:
                cached = cache_decoded(ds, max_bytes=budget, workers=workers)
            except (OSError, RuntimeError) as e:
                if not workers or not _shm_full(e):
                    raise
                raise ValueError(f"{ds.source}: decoding the images into memory in {workers} worker process(es) ran "
                                 f"out of shared memory (/dev/shm, which passes the images from the workers: "
                                 f"{str(e).strip().splitlines()[-1][:200]}); --workers 0 decodes in this process "
                                 f"without it, --set cache_images=false decodes every epoch instead (or give the "
                                 f"container a larger /dev/shm, e.g. docker --shm-size)") from e
            budget -= ds.cache_nbytes
            if not cached and recipe.cache_images:
                share = f" (its share for one of the {processes} processes on this machine, each of which holds a copy)"
                raise ValueError(f"cache_images=true: {ds.source} does not fit in memory{share if processes > 1 else ''}; "
                                 f"set it to false or none")
            in_memory = in_memory and cached
    if recipe.workers is None:
        recipe = recipe.replace(workers=default_workers(in_memory=in_memory, cores=cores))
        log.info("data loader: %d worker process(es) (%s)", recipe.workers,
                 "images in memory" if in_memory else "decoding files")
    return recipe


def _shm_full(e: BaseException) -> bool:
    """Whether ``e`` (raised by a DataLoader whose workers pass tensors through /dev/shm) says that is full."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return True
    text = str(e)
    return "No space left on device" in text or "shared memory" in text or "/dev/shm" in text


def _test(model: nn.Module, test_set, recipe: Recipe, ctx: DistContext, label: str) -> dict[str, Any]:
    r: EvalResult = evaluate(model, test_set, num_classes=len(test_set.classes), device=ctx.device, amp=recipe.amp,
                             batch_size=max(256, recipe.batch_size), multi_label=recipe.multi_label)
    log.debug("test (%s, %d images): %s", label, r.num_samples, r.summary())
    if r.nonfinite:  # the loss is then null in results.json
        log.warning("test (%s): NaN or infinite logits for %d of the %d images: the test loss is not finite and "
                    "those images' predictions mean nothing", label, r.nonfinite, r.num_samples)
    return r.summary()


def check_multilabel_data(ds) -> None:
    """A multi-label training split: labels without any positive image are named in a warning (the model learns
    only to answer no for them)."""
    counts = ds.class_counts()
    if none := [name for name, n in zip(ds.classes, counts) if n == 0]:
        log.warning("%s: label(s) %s have no positive training image", ds.source, ", ".join(none[:10]))


def _distillation(job: TrainJob, ctx: DistContext, student: nn.Module, classes: list[str]):
    """The distillation loss from ``job.distill``'s teacher; records the teacher's fingerprint in
    ``job.distill`` (job.json), and on --resume refuses a teacher whose weights are not those the run began
    with (a teacher file replaced meanwhile)."""
    import vitlab
    from vitlab.checkpoints import CheckpointNotFoundError
    from vitlab.train.distill import DistillationLoss, adapt_teacher, check_teacher_classes

    d = job.distill
    was = (read_job(job.output).get("distill") or {}).get("teacher") if job.resume else None
    moved = was is not None and was != d.teacher  # --resume --teacher NEWPATH
    try:
        teacher = vitlab.load_model(d.teacher, model_name=d.model)
    except CheckpointNotFoundError:
        if job.resume and not moved:
            raise CheckpointNotFoundError(
                f"--resume: the run's teacher {d.teacher} (recorded in {job.output / JOB_FILE}) is not there any "
                f"more: no such file or folder; if it moved, give its new path with --teacher NEWPATH (its weights "
                f"are checked against those the run began with)") from None
        raise CheckpointNotFoundError(f"--teacher {d.teacher}: no such file or folder") from None
    except CheckpointError as e:
        if d.model is None and "--model NAME" in str(e):  # --model names the student: the teacher's is its own
            raise CheckpointError(f"--teacher {str(e).replace('--model NAME', '--teacher-model NAME')}") from None
        raise
    fingerprint = weights_fingerprint(teacher)
    if moved and d.fingerprint is not None and d.fingerprint != fingerprint:
        raise CheckpointError(
            f"--resume --teacher {d.teacher}: not the teacher this run distilled from ({was}, recorded in "
            f"{job.output / JOB_FILE}): its weights differ from those the run began with (fingerprint "
            f"{_short(d.fingerprint)} recorded, {_short(fingerprint)} here); give the run's own teacher, or start a "
            f"new run (another --output)")
    if moved and d.fingerprint is not None:
        log.info("--resume: the teacher at %s has the weights the run began with (it was at %s); job.json records "
                 "the new path", d.teacher, was)
    if job.resume and d.fingerprint is not None and d.fingerprint != fingerprint:
        raise CheckpointError(
            f"--resume: the teacher {d.teacher} is not the one this run distilled from: its weights changed since "
            f"the run began (fingerprint {_short(d.fingerprint)} in {job.output / JOB_FILE}, {_short(fingerprint)} "
            f"now{_modified(d.teacher)}); put the run's teacher back at {d.teacher}, or start a new run (another "
            f"--output)")
    job.distill = dataclasses.replace(d, fingerprint=fingerprint)
    check_teacher_classes(teacher, classes)
    teacher = adapt_teacher(teacher, student.preprocessing).to(ctx.device)
    base = ClassificationLoss(label_smoothing=job.recipe.label_smoothing)
    log.info("distilling from %s (%s, alpha %.2f, tau %.2f)", d.teacher, d.kind, d.alpha, d.tau)
    return DistillationLoss(base, teacher, kind=d.kind, alpha=d.alpha, tau=d.tau)


def weights_fingerprint(module: nn.Module) -> str:
    """``"sha256:HEX"`` of a module's state (each tensor's name, dtype, shape and bytes): the same weights give
    the same value whatever file, format or path they were read from."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return f"sha256:{h.hexdigest()}"


def _short(fingerprint: str) -> str:
    return fingerprint.split(":", 1)[-1][:12]


def _modified(path: str) -> str:
    """When the file at ``path`` was last modified (what replaced the teacher), as a clause of the refusal."""
    try:
        mtime = os.stat(path).st_mtime
    except OSError:
        return ""
    return f"; {path} was modified at {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(mtime))}"


# ---------------------------------------------------------------------------------------------- the run's lock
class RunDirInUseError(ValueError):
    """Another running vitlab process holds the run directory (:func:`run_dir_lock`)."""


@contextlib.contextmanager
def run_dir_lock(output: Path, *, enabled: bool = True) -> Iterator[None]:
    """Hold the run directory ``output`` for the block: an exclusive ``fcntl.flock`` on ``output/.vitlab.lock``
    (which records this process's PID and host), taken before the folder is checked, released (the file
    removed) at the end; the system releases it if the process dies. Another run into the same folder
    meanwhile is refused with :class:`RunDirInUseError` naming the holder; a lock left by a process that no
    longer runs is taken over, with a log line. Under torchrun only the main process (``enabled``) takes it:
    it alone writes the run directory. A folder created here and left empty is removed again.

    Where the system has no ``fcntl`` (Windows), the folder is not locked: a warning says that two runs into
    it are not kept apart."""
    if not enabled:
        yield
        return
    try:
        import fcntl  # noqa: F401
    except ImportError:
        log.warning("%s: this system has no fcntl (Windows?): the run folder is not locked, so make sure no other "
                    "vitlab run writes into it meanwhile", output)
        yield
        return
    lock = _RunLock(Path(output))
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


class _RunLock:
    def __init__(self, output: Path) -> None:
        self.output = output
        self.path = output / LOCK_FILE
        self.fd: int | None = None
        self.created: list[Path] = []

    def acquire(self) -> None:
        import fcntl
        import socket

        self.created = [p for p in (self.output, *self.output.parents) if not p.exists()]  # deepest first
        self.output.mkdir(parents=True, exist_ok=True)
        host = socket.gethostname()
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _lock_holder(fd)
                os.close(fd)
                if holder is not None and holder[1] == host and not _pid_alive(holder[0]):
                    # its PID is gone, a child it left (a data-loader worker) still holds the file: leave them it
                    log.warning("%s: the run of PID %d that locked it is not running any more; taking the folder "
                                "over", self.output, holder[0])
                    self.path.unlink(missing_ok=True)
                    continue
                who = f"PID {holder[0]} on {holder[1]}" if holder is not None else "another process"
                raise RunDirInUseError(f"--output {self.output} is in use by another vitlab run ({who}, which holds "
                                       f"{self.path}); wait for it to finish, or choose another --output") from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the holder we waited for removed the file as it let go: lock the new one
        previous = _lock_holder(fd)
        if previous is not None and previous[1] != host:
            os.close(fd)
            raise RunDirInUseError(f"--output {self.output} is locked by a vitlab run on another machine (PID "
                                   f"{previous[0]} on {previous[1]}, {self.path}); if that run has ended, delete "
                                   f"{self.path}, else choose another --output")
        if previous is not None:
            log.info("%s: took over the lock left by PID %d, which is not running any more (a run killed before it "
                     "let the folder go)", self.output, previous[0])
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {host}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        import fcntl

        if self.fd is None:
            return
        try:
            if _same_file(self.fd, self.path):
                self.path.unlink()  # before letting go: a waiting process then finds the file gone and retries
        except OSError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)  # also for data-loader workers that share the open file
        os.close(self.fd)
        self.fd = None
        for p in self.created:  # the folders made for the lock, when the run wrote nothing into them
            try:
                p.rmdir()
            except OSError:
                break


def _lock_holder(fd: int) -> tuple[int, str] | None:
    """(PID, host) recorded in an open lock file, or None when it is empty or unreadable."""
    try:
        pid, host = os.pread(fd, 4096, 0).decode().split()
        return int(pid), host
    except (OSError, ValueError):
        return None


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
