"""``vitlab detect IMAGE...``: boxes, labels and scores of a trained detector, drawn and as JSON."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from vitlab.cli.common import add_skip_bad_images_argument, add_threads_argument, fraction
from vitlab.tasks.run import DENSE_RUNTIMES

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("detect", help="detect objects in images (DETR)",
                       description="Run a trained detector; writes OUTPUT/NAME.png with boxes, labels and scores, "
                                   "and OUTPUT/detections.json (boxes xyxy in the image's pixels; each entry's "
                                   "'picture' (and 'attention') names its files in OUTPUT). NAME is the image's "
                                   "stem, NAME-1, NAME-2, ... where another input's files have that name.",
                       epilog="examples:\n  vitlab detect canvas.png --checkpoint runs/detr/model.safetensors\n"
                              "  vitlab detect canvas.png --checkpoint detr.onnx    (ONNX Runtime; a file from vitlab export)",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    # kept as typed (no type=Path, which folds the // of a URL before it can be refused)
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files, or folders of them (searched recursively)")
    p.add_argument("--checkpoint", required=True,
                   help="a DETR checkpoint (vitlab, Hugging Face folder), or an ONNX file written by vitlab export")
    p.add_argument("--runtime", choices=DENSE_RUNTIMES, default="auto",
                   help="auto: ONNX Runtime for an .onnx file, else PyTorch; onnx: a checkpoint is exported (validated) "
                        "and run by ONNX Runtime")
    p.add_argument("--threshold", type=fraction, default=0.5, help="lowest score kept, from 0 to 1 (default: 0.5)")
    p.add_argument("--attention", action="store_true", help="also each object's decoder cross-attention")
    add_threads_argument(p)
    add_skip_bad_images_argument(p)
    p.add_argument("--output", type=Path, default=Path("detections"), help="output folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace files of the same names in --output, e.g. an earlier run's (default: refuse); an "
                        "input image is never replaced")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vitlab.cli.common import printable
    from vitlab.data import expand_image_paths
    from vitlab.tasks.run import check_output_files, detect_images, load_dense

    if args.attention and (args.runtime == "onnx" or str(args.checkpoint).lower().endswith(".onnx")):
        raise ValueError("--attention reads the decoder's cross-attention inside the PyTorch model; an ONNX file "
                         "exports only logits and boxes: give the checkpoint and --runtime torch")
    images = [Path(p) for p in expand_image_paths(args.images)]
    # before the model is loaded: nothing is written when a file is in the way
    check_output_files(images, args.output, "detection", attention=args.attention, overwrite=args.overwrite)
    model = load_dense(args.checkpoint, "detection", args.runtime)
    results = detect_images(model, images, args.output, threshold=args.threshold, attention=args.attention,
                            skip_bad_images=args.skip_bad_images, overwrite=args.overwrite)
    for r in results:
        if "error" in r:
            print(f"{r['error']} (skipped)")
            continue
        objs = ", ".join(f"{o['label']} {o['score']:.2f}" for o in r["objects"]) or "nothing"
        written = ", ".join(printable(args.output / r[k]) for k in ("picture", "attention") if k in r)
        print(f"{printable(r['image'])} -> {written}: {objs}")
    if results and all("error" in r for r in results):
        log.error("error: none of the %d image(s) could be read (each is named above); nothing but "
                  "detections.json written to %s", len(results), args.output)
        return 2
    print(f"pictures and detections.json in {args.output}")
    return 0
