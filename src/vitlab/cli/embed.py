"""``vitlab embed``: image files to an embedding file, one row per image (the model's pre-logits features, as timm's
``forward_head(forward_features(x), pre_logits=True)``), with the images' paths in the same order, the model, and
what the numbers are, in a format numpy (``.npz``) or safetensors (``.safetensors``) reads without vitlab."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from vitlab.cli.common import (
    add_device_argument,
    add_image_limit_argument,
    add_model_argument,
    add_threads_argument,
    check_device,
    model_args,
    positive_int,
)
from vitlab.export.runtimes import RUNTIMES

log = logging.getLogger("vitlab")

# suffix -> what writes it; both read back without vitlab (numpy alone; safetensors' safe_open)
FORMATS = {".npz": "numpy's np.load", ".safetensors": "safetensors' safe_open"}

EXAMPLE = """examples:
  vitlab embed ./photos --checkpoint runs/mine/model.safetensors --output photos.npz
  vitlab embed ./photos --checkpoint runs/mine/model.safetensors --output photos.npz --normalize
      (unit rows: a dot product is the cosine similarity)
  vitlab embed a.jpg b.jpg --checkpoint vit_small.safetensors --model vit_small_patch16_224 --output ab.safetensors
      (timm weights: name the model; a classifier's head is left out, its pre-logits features kept)
  vitlab embed ./photos --checkpoint backbone.onnx --output photos.npz
      (ONNX Runtime on a backbone exported without a classifier: metadata task "features")

reading the file without vitlab:
  import numpy as np
  f = np.load("photos.npz")
  e, paths = f["embeddings"], f["paths"]     # (N, D) float32 and (N,) str, in the same order
  best = np.argsort(-(e @ e[0]))[:5]          # with --normalize: the 5 images most like the first (itself first)
  print(paths[best], str(f["features"]))      # os.path.join(str(f["root"]), path) opens a file from where it ran
  # .safetensors: safe_open(FILE, "np").get_tensor("embeddings"); its metadata()["paths"] is a JSON list"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="image files to an embedding file (.npz or .safetensors)",
                       description="Embed images with a checkpoint, using its own preprocessing: one row per image "
                                   "of the model's pre-logits features (what its classifier head reads; timm's "
                                   "forward_head(forward_features(x), pre_logits=True)), written with the images' "
                                   "paths, the model's name and the embedding's meaning.",
                       epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+",
                   help="image files, or folders of them (searched recursively, hidden files skipped); with one "
                        "folder, the paths recorded are relative to it (its path is the file's 'root'), otherwise "
                        "as given")
    p.add_argument("--checkpoint", required=True,
                   help="vitlab checkpoint (or weights with --model), or an ONNX file of a backbone without a "
                        "classifier (an exported classifier has only its logits)")
    add_model_argument(p)
    p.add_argument("--output", required=True, type=Path, metavar="FILE",
                   help="the embedding file: .npz (arrays embeddings, paths, root, model, features, normalized, "
                        "skipped, ...) or .safetensors (tensor embeddings; the rest as metadata, lists as JSON; "
                        "its header holds at most 100 MB of paths: .npz for millions of images); written "
                        "atomically")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists (default: refuse)")
    p.add_argument("--normalize", action="store_true",
                   help="L2-normalize each embedding (unit rows: dot products are cosine similarities)")
    p.add_argument("--runtime", choices=["auto", *RUNTIMES], default="auto",
                   help="auto: ONNX Runtime for an .onnx file, else PyTorch float32; the others run the model "
                        "without its head (onnx: exported on the fly as a backbone)")
    p.add_argument("--batch-size", type=positive_int, default=64,
                   help="images per forward; images are decoded one batch at a time (default: 64)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="leave an undecodable file out (a warning, and the output's 'skipped' list with the reason) "
                        "and go on, instead of stopping")
    add_device_argument(p)
    add_image_limit_argument(p)
    add_threads_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from vitlab.data import BadImageError, eval_transform
    from vitlab.export.runtimes import compile_failure, runtime_device, slow_bf16_reason
    from vitlab.inference import embed_batches, load_for_embedding

    output = check_output(args)
    files, recorded, root = image_paths(args.images)
    device = check_device(args)
    model, meaning = load_for_embedding(args.checkpoint, args.runtime, model_name=args.model,
                                        model_args=model_args(args), normalized=args.normalize)
    device = runtime_device(model.name, device)
    model = model.to(device)
    if reason := slow_bf16_reason(model.name, device):
        log.warning("%s", reason)
    skipped: list[tuple[int, str]] = []

    def skip(i: int, error: Exception) -> None:
        log.warning("skipped %s", error)
        skipped.append((i, str(error)))

    bar = None
    if len(files) > args.batch_size and sys.stderr.isatty():  # a redrawn bar is noise in a log file
        from tqdm.auto import tqdm

        bar = tqdm(total=len(files), desc="embed", unit="img", leave=False)
    kept: list[int] = []
    rows = []
    batches = embed_batches(model, files, eval_transform(model.preprocessing), batch_size=args.batch_size,
                            device=device, normalize=args.normalize, on_bad=skip if args.skip_bad_images else None)
    try:
        for indices, features in batches:
            kept += indices
            rows.append(features)
            if bar is not None:
                bar.update(indices[-1] + 1 - bar.n)
    except BadImageError as e:
        raise BadImageError(f"{e} (--skip-bad-images leaves such files out and goes on)") from e
    finally:
        if bar is not None:
            bar.close()
    if failed := compile_failure(model):
        log.warning("runtime %s: compile failed (%s); ran eager", model.name, failed)
    if not rows:
        log.error("error: none of the %d image(s) could be read (each is named above); nothing written", len(files))
        return 2
    embeddings = torch.cat(rows).numpy()  # (N, D) float32
    record = {
        "paths": [recorded[i] for i in kept], "root": root, "model": model.model_name, "features": meaning,
        "normalized": bool(args.normalize), "skipped": [recorded[i] for i, _ in skipped],
        "skipped_errors": [why for _, why in skipped], "checkpoint": str(args.checkpoint), "runtime": model.name,
    }
    write_embeddings(output, embeddings, record)
    log.info("%s: %d embeddings of %d dimensions (%s, %s)%s", output, *embeddings.shape, model.model_name,
             "normalized" if args.normalize else "not normalized",
             f"; {len(skipped)} unreadable image(s) skipped, listed in the file" if skipped else "")
    return 0


def check_output(args: argparse.Namespace) -> Path:
    """``--output``: a file named ``*.npz`` or ``*.safetensors``, not there yet (or ``--overwrite``), and never the
    checkpoint read (not with --overwrite either)."""
    output = args.output
    if output.suffix.lower() not in FORMATS:
        raise ValueError(f"--output {output}: unknown suffix {output.suffix or '(none)'!r}; the accepted ones are "
                         f"{', '.join(f'{s} (read with {how})' for s, how in FORMATS.items())}")
    if output.is_dir():
        raise ValueError(f"--output {output} is a folder; give a file name ending in {' or '.join(FORMATS)}")
    source = Path(args.checkpoint)
    if output.exists() and source.exists() and os.path.samefile(output, source):
        raise ValueError(f"--output {output} is the checkpoint read (--checkpoint {args.checkpoint}); give another "
                         f"file name (--overwrite never replaces the checkpoint)")
    if os.path.lexists(output) and not args.overwrite:
        raise ValueError(f"--output {output} exists; pass --overwrite to replace it")
    return output


def image_paths(given: list[str]) -> tuple[list[str], list[str], str]:
    """(the files to read, the paths to record for them, the root the recorded paths are relative to): with one
    folder given, the paths inside it and the folder as given; otherwise the paths as read and "" (relative to the
    working folder, or absolute, as given). ``os.path.join(root, recorded)`` reaches each file from where the command
    ran."""
    from vitlab.data import expand_image_paths

    files = expand_image_paths(given)
    if len(given) == 1 and Path(given[0]).is_dir():
        return files, [os.path.relpath(f, given[0]) for f in files], given[0]
    return files, files, ""


def write_embeddings(path: Path, embeddings: Any, record: dict[str, Any]) -> None:
    """Write ``embeddings`` (N, D) float32 and ``record`` (paths, model, meaning...) atomically: ``.npz`` as numpy
    arrays (strings as str arrays, ``normalized`` as a bool), ``.safetensors`` as the tensor ``embeddings`` with the
    record as metadata (lists as JSON, ``normalized`` as "true" / "false")."""
    import numpy as np

    from vitlab import __version__
    from vitlab.checkpoints.io import atomic_write

    record = {**record, "vitlab_version": __version__}
    if path.suffix.lower() == ".npz":
        arrays = {k: np.array(v, dtype=bool if isinstance(v, bool) else str) for k, v in record.items()}

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, embeddings=embeddings, **arrays)
    else:
        from safetensors.numpy import save_file

        meta = {k: json.dumps(v) if isinstance(v, list) else str(v).lower() if isinstance(v, bool) else str(v)
                for k, v in record.items()}

        def write(tmp: str) -> None:
            save_file({"embeddings": np.ascontiguousarray(embeddings)}, tmp, metadata=meta)
    atomic_write(path, write)
