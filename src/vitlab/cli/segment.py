"""``vitlab segment IMAGE...``: colour overlays and class masks of a trained segmenter."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("segment", help="segment images (SETR)",
                       description="Run a trained segmenter; writes OUTPUT/NAME.png (colour overlay), "
                                   "OUTPUT/NAME_mask.png (class indices) and OUTPUT/segments.json.",
                       epilog="example:\n  vitlab segment canvas.png --checkpoint runs/setr/model.safetensors",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", metavar="IMAGE", type=Path)
    p.add_argument("--checkpoint", required=True, help="a SETR checkpoint")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity")
    p.add_argument("--output", type=Path, default=Path("segments"), help="output folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import vitlab
    from vitlab.tasks.run import segment_images, task_of

    model = vitlab.load_model(args.checkpoint).eval()
    if task_of(model) != "segmentation":
        raise ValueError(f"{args.checkpoint}: a {task_of(model)} model, not a segmenter")
    for r in segment_images(model, args.images, args.output, alpha=args.alpha):
        print(f"{r['image']}: {r['pixels_per_class']}")
    print(f"overlays and masks in {args.output}")
    return 0
