"""``vitlab analyze --checkpoint CKPT --data SOURCE``: the ViT paper's Figure 7 for any checkpoint."""

from __future__ import annotations

import argparse
import logging
import shlex
from pathlib import Path

from vitlab.cli.common import (
    add_device_argument,
    add_image_limit_argument,
    add_model_argument,
    add_threads_argument,
    check_device,
    load_checkpoint,
    positive_int,
    require_classifier,
)

log = logging.getLogger(__name__)

EXAMPLE = """example:
  vitlab analyze --checkpoint runs/demo/model.safetensors --data digits --output analysis/

Writes attention_distance.png, position_similarity.png, embedding_filters.png, analysis.json (the
numbers) and report.html (figures and tables together) to the output folder.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="attention distance, position similarity and filter figures",
                       description="Mean attention distance per head and layer, position-embedding similarity "
                                   "and the principal components of the embedding filters (ViT paper, Fig. 7), "
                                   "with an HTML report of the figures and the numbers behind them.",
                       epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a vitlab checkpoint (model.safetensors), or timm / Hugging Face / JAX weights with --model")
    add_model_argument(p)
    p.add_argument("--data", required=True, metavar="SOURCE", help="data source (e.g. digits, a folder, mnist)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="which split's images to use")
    p.add_argument("--num-images", type=int, default=256, metavar="N", help="images for the attention distance")
    p.add_argument("--components", type=positive_int, default=28, help="principal components of the filters to draw")
    p.add_argument("--batch-size", type=int, default=32, help="images per captured forward pass (all maps are kept)")
    p.add_argument("--output", default="analysis", metavar="DIR", help="folder for the figures and report")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the report, numbers and figures of an earlier analysis in --output")
    add_device_argument(p)
    add_image_limit_argument(p)
    add_threads_argument(p)
    p.set_defaults(func=run)


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run, with every option spelled out."""
    parts = ["vitlab", "analyze", "--checkpoint", str(args.checkpoint), "--data", str(args.data),
             "--split", args.split, "--num-images", str(args.num_images), "--components", str(args.components),
             "--output", str(args.output)]
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    from vitlab.analysis.analyze import NUMBERS_JSON, OUTPUT_FILES, POSITION_KINDS, REPORT_HTML, analyze_model
    from vitlab.checkpoints.io import check_outputs_free
    from vitlab.cli.eval import run_split, run_split_method
    from vitlab.data import build_dataset, eval_transform

    if args.num_images < 1:
        raise ValueError("--num-images must be at least 1")
    out = Path(args.output)
    check_outputs_free([out / f for f in OUTPUT_FILES], output=out, overwrite=args.overwrite,
                       earlier="an earlier analysis there?" if (out / NUMBERS_JSON).is_file() else "")
    device = check_device(args)
    model = require_classifier(load_checkpoint(args), "analyze", args.checkpoint)
    # the run's own split (its images feed attention statistics, not a score: overlap with training is harmless)
    seed, val_fraction = run_split(args.checkpoint, args.data, args.split, measured=False)
    dataset = build_dataset(args.data, split=args.split, seed=seed, val_fraction=val_fraction,
                            transform=eval_transform(model.preprocessing),
                            split_method=run_split_method(args.checkpoint, args.data))
    name = getattr(model, "model_name", type(model).__name__)
    model_desc = f"{name} from {args.checkpoint}"
    data_desc = f"{args.data} ({args.split} split, {len(dataset)} images, classes: {', '.join(map(str, dataset.classes))})"
    numbers = analyze_model(model, dataset, args.output, num_images=args.num_images, batch_size=args.batch_size,
                            num_components=args.components, device=device, model_desc=model_desc,
                            data_desc=data_desc, command=command_line(args))
    dist = numbers["attention_distance"]
    if dist is None:
        log.info("mean attention distance does not apply: %s", numbers["attention_distance_not_applicable"])
    else:
        branches = dist.get("branch_of_layer") or [None] * len(dist["layers"])
        for i, b, m, s in zip(dist["layers"], branches, dist["layer_mean"], dist["layer_spread"]):
            where = f"layer {i}" + (f" (branch {b})" if b is not None else "")
            log.info("%s: mean attention distance %.2f px, spread over heads %.2f px", where, m, s)
        log.info("(uniform attention would give %.2f px)", dist["uniform_reference"])
    pos = numbers["position_similarity"]
    if pos is None:
        reason = numbers["position_similarity_not_applicable"]
        log.info("position similarity does not apply: %s", reason.removeprefix("Does not apply: "))
    else:
        log.info("position similarity (%s table, %s grid): grid neighbours %.3f, all other positions %.3f",
                 POSITION_KINDS.get(pos["kind"], pos["kind"]), "x".join(map(str, pos["grid"])), pos["mean_neighbours"], pos["mean_offdiag"])
    filters = numbers["embedding_filters"]
    if filters is None:
        log.info("embedding filters do not apply: %s", numbers["embedding_filters_not_applicable"])
    else:
        log.info("embedding filters: %d principal components, the first explains %.1f%% of the variance",
                 filters["num_components"], 100 * filters["explained_variance_ratio"][0])
    print(Path(args.output) / REPORT_HTML)
    return 0
