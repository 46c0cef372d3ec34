"""``vitlab make-canvases``: detection and segmentation canvases of MNIST digits (COCO + mask PNGs)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_MNIST = "/work/shared/data/mnist"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-canvases", help="write digit canvases for detection / segmentation",
                       description="Several MNIST digits per canvas at random scales and positions; boxes and "
                                   "per-pixel masks from the digits' own pixels. Deterministic for a seed. Writes "
                                   "OUTPUT/{train,val}/images, annotations.json (COCO) and masks/ (class = digit + 1).",
                       epilog="example:\n  vitlab make-canvases --mnist data/mnist --seed 0 --output data/canvases",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mnist", default=DEFAULT_MNIST, help="folder with MNIST's IDX files")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--train", type=int, default=2000, help="training canvases")
    p.add_argument("--val", type=int, default=200, help="held-out canvases (from MNIST's test digits)")
    p.add_argument("--size", type=int, default=96, help="canvas side in pixels")
    p.add_argument("--digits", type=int, nargs=2, default=(1, 4), metavar=("MIN", "MAX"), help="digits per canvas")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder (default: refuse)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vitlab.data.dense import make_canvases

    if not Path(args.mnist).exists():
        raise ValueError(f"--mnist {args.mnist}: no such folder{' (the default)' if args.mnist == DEFAULT_MNIST else ''}; "
                         "give the folder with MNIST's IDX files (train-/t10k-images-idx3-ubyte[.gz] and labels)")
    summary = make_canvases(args.output, mnist=args.mnist, seed=args.seed, n_train=args.train, n_val=args.val,
                            size=args.size, digits=tuple(args.digits), overwrite=args.overwrite)
    print(json.dumps(summary))
    return 0
