"""``vitlab make-canvases``: detection and segmentation canvases of MNIST digits (COCO + mask PNGs)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from vitlab.cli.common import non_negative_int, positive_int

log = logging.getLogger(__name__)

def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-canvases", help="write digit canvases for detection / segmentation",
                       description="Several MNIST digits per canvas at random scales and positions; boxes and "
                                   "per-pixel masks from the digits' own pixels. Deterministic for a seed. Writes "
                                   "OUTPUT/{train,val}/images, annotations.json (COCO) and masks/ (class = digit + 1).",
                       epilog="example:\n  vitlab make-canvases --mnist path/to/mnist --seed 0 --output data/canvases",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mnist", required=True, metavar="FOLDER",
                   help="the MNIST folder, laid out as `--data mnist:FOLDER` reads it: MNIST's four IDX files "
                        "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                        "t10k-labels-idx1-ubyte (each raw or .gz) in FOLDER"),
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--train", type=positive_int, default=2000, help="training canvases")
    p.add_argument("--val", type=positive_int, default=200, help="held-out canvases (from MNIST's test digits)")
    p.add_argument("--size", type=positive_int, default=96, help="canvas side in pixels")
    p.add_argument("--digits", type=non_negative_int, nargs=2, default=(1, 4), metavar=("MIN", "MAX"),
                   help="digits per canvas, drawn from MIN to MAX (fewer where no free place is found)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder (default: refuse)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vitlab.data.dense import make_canvases

    low, high = args.digits
    if high < 1 or low > high:
        raise ValueError(f"--digits {low} {high}: expected MIN <= MAX and MAX >= 1 (digits per canvas)")
    if not Path(args.mnist).exists():
        raise ValueError(f"--mnist {args.mnist}: no such folder; "
                         "give the folder with MNIST's IDX files (train-/t10k-images-idx3-ubyte[.gz] and labels)")
    summary = make_canvases(args.output, mnist=args.mnist, seed=args.seed, n_train=args.train, n_val=args.val,
                            size=args.size, digits=tuple(args.digits), overwrite=args.overwrite)
    _warn_if_crowded(Path(summary["output"]), args.size, low, high)
    print(json.dumps(summary))
    return 0


def _warn_if_crowded(root: Path, size: int, low: int, high: int) -> None:
    """A warning when canvases hold fewer than --digits MIN digits: no free place was found for the rest."""
    from vitlab.checkpoints.io import parse_json

    counts: list[int] = []
    for split in ("train", "val"):
        path = root / split / "annotations.json"
        try:
            coco = parse_json(path.read_text(encoding="utf-8"))
        except ValueError as e:  # malformed, nested too deeply, not UTF-8
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        per_image = dict.fromkeys((im["id"] for im in coco["images"]), 0)
        for a in coco["annotations"]:
            per_image[a["image_id"]] += 1
        counts += per_image.values()
    short = sum(c < low for c in counts)
    if short:
        log.warning("--digits %d %d: %d of %d canvases hold fewer than %d digits, no free place being found for "
                    "the rest (at most %d, %.1f on average, fit on a %d px canvas); give a larger --size or fewer "
                    "--digits", low, high, short, len(counts), low, max(counts), sum(counts) / len(counts), size)
