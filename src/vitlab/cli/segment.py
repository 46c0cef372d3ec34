"""``vitlab segment IMAGE...``: colour overlays and class masks of a trained segmenter."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from vitlab.cli.common import add_skip_bad_images_argument, add_threads_argument, fraction
from vitlab.tasks.run import DENSE_RUNTIMES

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("segment", help="segment images (SETR)",
                       description="Run a trained segmenter; writes OUTPUT/NAME.png (colour overlay), "
                                   "OUTPUT/NAME_mask.png (class indices; 16-bit for more than 256 classes) and "
                                   "OUTPUT/segments.json (each entry's 'picture' and 'mask' name its files in "
                                   "OUTPUT). NAME is the image's stem, NAME-1, NAME-2, ... where another input's "
                                   "files have that name.",
                       epilog="examples:\n  vitlab segment canvas.png --checkpoint runs/setr/model.safetensors\n"
                              "  vitlab segment canvas.png --checkpoint setr.onnx    (ONNX Runtime; a file from vitlab export)",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    # kept as typed (no type=Path, which folds the // of a URL before it can be refused)
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files, or folders of them (searched recursively)")
    p.add_argument("--checkpoint", required=True,
                   help="a SETR checkpoint, or an ONNX file written by vitlab export")
    p.add_argument("--runtime", choices=DENSE_RUNTIMES, default="auto",
                   help="auto: ONNX Runtime for an .onnx file, else PyTorch; onnx: a checkpoint is exported (validated) "
                        "and run by ONNX Runtime")
    p.add_argument("--alpha", type=fraction, default=0.5, help="overlay opacity, from 0 to 1 (default: 0.5)")
    add_threads_argument(p)
    add_skip_bad_images_argument(p)
    p.add_argument("--output", type=Path, default=Path("segments"), help="output folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace files of the same names in --output, e.g. an earlier run's (default: refuse); an "
                        "input image is never replaced")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vitlab.cli.common import printable
    from vitlab.data import expand_image_paths
    from vitlab.tasks.run import check_output_files, load_dense, segment_images

    images = [Path(p) for p in expand_image_paths(args.images)]
    # before the model is loaded: nothing is written when a file is in the way
    check_output_files(images, args.output, "segmentation", overwrite=args.overwrite)
    model = load_dense(args.checkpoint, "segmentation", args.runtime)
    results = segment_images(model, images, args.output, alpha=args.alpha, skip_bad_images=args.skip_bad_images,
                             overwrite=args.overwrite)
    for r in results:
        if "error" in r:
            print(f"{r['error']} (skipped)")
            continue
        written = ", ".join(printable(args.output / r[k]) for k in ("picture", "mask"))
        print(f"{printable(r['image'])} -> {written}: {r['pixels_per_class']}")
    if results and all("error" in r for r in results):
        log.error("error: none of the %d image(s) could be read (each is named above); nothing but "
                  "segments.json written to %s", len(results), args.output)
        return 2
    print(f"overlays and masks in {args.output}")
    return 0
