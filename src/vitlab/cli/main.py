"""The ``vitlab`` command. Each subcommand is a module in this package exposing
``add_parser(subparsers)`` (which sets ``func``) and its ``run(args) -> int``."""

from __future__ import annotations

import argparse
import codecs
import errno
import importlib
import logging
import os
import sys

from vitlab import __version__
from vitlab.allocator import OPT_OUT, keep_freed_memory
from vitlab.checkpoints.io import CheckpointError
from vitlab.cli.common import apply_image_limit, apply_threads, check_device

# Subcommand modules, in the order `vitlab --help` lists them.
SUBCOMMANDS = (
    "models", "info", "train", "pretrain", "finetune", "eval", "predict", "embed", "fewshot", "explain", "analyze",
    "benchmark", "export", "detect", "segment", "make_canvases",
)
# Commands that run a model forward many times: glibc is told to keep freed memory for reuse (vitlab.allocator),
# which halves a conv-heavy model's CPU forward. Training commands keep glibc's defaults: there the gain was small
# (0.9x the time) and the peak memory grew (MobileViT-XXS: +27%).
KEEP_FREED_MEMORY = ("eval", "predict", "embed", "benchmark", "export")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitlab", formatter_class=HelpFormatter,
        description="Vision transformers: build, train, fine-tune, evaluate, explain.",
        epilog="Run `vitlab COMMAND --help` for a command's options and an example.\n\n"
               "Exit status: 0 success; 1 `models` matched nothing, or training stopped on a non-finite loss; 2 bad "
               "input or a refused / failed command (one `error:` line on stderr); 130 interrupted.\n\n"
               f"{', '.join(KEEP_FREED_MEMORY)} tell glibc to keep freed memory for reuse instead of returning it to "
               "the system after every forward (faster CPU inference, peak memory kept until exit); "
               f"{OPT_OUT}=system leaves the allocator alone.",
    )
    parser.add_argument("--version", action="version", version=f"vitlab {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"vitlab.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"vitlab.cli.{name}":
                continue  # not built yet
            raise
        module.add_parser(sub)
    return parser


def setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(message)s" if verbose == 0 else "%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    from vitlab.train.budget import process_started

    started = process_started()  # a --time-budget is the whole command's: start-up and imports included
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = ["train"]  # the main job: `vitlab` alone trains the default model on the bundled digits
    args = parser.parse_args(argv)
    args.started = started
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    setup_logging(args.verbose, args.quiet)
    tolerant_stdout()
    try:
        check_device(args)  # every command's --device, checked the same way before any work
        apply_image_limit(args)
        apply_threads(args)
        if args.command in KEEP_FREED_MEMORY:
            keep_freed_memory()
        return int(args.func(args) or 0)
    except (CheckpointError, FileNotFoundError, ValueError, TypeError) as e:
        logging.getLogger("vitlab").error("error: %s", one_line(e))
        return 2
    except ImportError as e:  # an optional extra that is not installed: the error says which, as `export` does
        if not is_missing_extra(e):
            raise
        logging.getLogger("vitlab").error("error: %s", one_line(e))
        return 2
    except KeyboardInterrupt as e:  # a training run stopped by a signal says where it saved its state
        logging.getLogger("vitlab").error("interrupted%s", f": {e}" if str(e) else "")
        return 130
    except BrokenPipeError:  # the reader went away (`vitlab predict ./photos | head`): stop quietly, as a Unix tool
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's own flush at exit would raise again
        return 141
    except OSError as e:  # an --output that is a file, a folder without write permission, a full disk
        logging.getLogger("vitlab").error("error: %s", os_error_message(e))
        return 2
    except (MemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        logging.getLogger("vitlab").error(
            "error: out of memory (%s); lower --batch-size or --img-size (a model's activations grow with "
            "both)", one_line(e).split("\n")[0][:200])
        return 2


def _stdout_errors(e: UnicodeError) -> tuple[str | bytes, int]:
    if not isinstance(e, UnicodeEncodeError):
        raise e
    try:  # bytes of a file name that the locale could not decode go out as they came
        return codecs.lookup_error("surrogateescape")(e)
    except UnicodeError:  # a character the locale cannot encode ("café" under LC_ALL=C): a backslash escape
        return codecs.lookup_error("backslashreplace")(e)


def tolerant_stdout() -> None:
    """Make printing a class or file name that stdout's encoding cannot hold (a non-UTF-8 locale) write an escape
    instead of failing the command after its work is done."""
    try:
        codecs.lookup_error("vitlab.stdout")
    except LookupError:
        codecs.register_error("vitlab.stdout", _stdout_errors)
    if sys.stdout is not sys.__stdout__:  # a caller's stream (a test's capture, a notebook's): left as it is
        return
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None and getattr(sys.stdout, "errors", None) in ("strict", "surrogateescape"):
        reconfigure(errors="vitlab.stdout")


def os_error_message(e: OSError) -> str:
    """``[Errno 17] File exists: 'runs/x'`` as ``runs/x: file exists``, naming what was expected."""
    what = e.strerror or one_line(e)
    name = e.filename
    if name is None:
        return what
    hints = {errno.EEXIST: " (a folder is needed there)", errno.ENOTDIR: " (a path through a file: a folder was "
             "expected)", errno.EACCES: " (no permission)", errno.ENOSPC: ""}
    return f"{name}: {what[:1].lower() + what[1:]}{hints.get(e.errno or 0, '')}"


def is_missing_extra(e: ImportError) -> bool:
    """Whether ``e`` says that an optional extra is missing: :class:`~vitlab.export.ExportUnavailableError`
    (``vitlab[export]``), or an ImportError whose message names the extra to install (``pip install 'vitlab[...]'``)."""
    from vitlab.export.runtime import ExportUnavailableError

    return isinstance(e, ExportUnavailableError) or "pip install 'vitlab[" in str(e)


def is_out_of_memory(e: BaseException) -> bool:
    text = str(e)
    return isinstance(e, MemoryError) or "can't allocate memory" in text or "out of memory" in text.lower()


def one_line(e: BaseException) -> str:
    """An error's message; one raised in a DataLoader worker comes back wrapped in the worker's traceback,
    of which only its own last line (``module.Class: message``) is kept."""
    text = str(e)
    if text.startswith("Caught ") and "DataLoader worker" in text.split("\n", 1)[0]:
        last = text.rstrip().splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return text


if __name__ == "__main__":
    sys.exit(main())
