"""``vitlab fewshot --checkpoint CKPT --data SOURCE``: linear few-shot and k-NN accuracy of frozen features."""

from __future__ import annotations

import argparse
import json
import logging

from vitlab.cli.common import (
    add_device_argument,
    add_image_limit_argument,
    add_model_argument,
    add_threads_argument,
    check_device,
    load_checkpoint,
    non_negative_int,
    positive_float,
    positive_int,
    refuse_torchrun,
    require_classifier,
)

log = logging.getLogger(__name__)

EXAMPLE = """example:
  vitlab fewshot --checkpoint runs/demo/model.safetensors --data digits --shots 1,5,10,25 --seeds 5
  vitlab fewshot --checkpoint model.safetensors --data path/to/mnist --shots 1,5,10 --json

Support images come from the train split (a random pool of --pool per class), accuracy is measured
on the test split; each shot count is drawn --seeds times and reported as mean +- standard deviation
(ViT paper, section 4.1).
"""


def _shots(text: str) -> tuple[int, ...]:
    try:
        shots = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--shots: expected comma-separated integers, got {text!r}") from e
    if not shots or min(shots) < 1:
        raise argparse.ArgumentTypeError(f"--shots: expected positive integers, got {text!r}")
    return shots


def same_images(data: str, train_split: str, test_split: str) -> bool:
    """Whether the two splits of ``data`` hold the same images: the same name, or val and test of a folder
    without test/ (whose "test" is its val part)."""
    if train_split == test_split:
        return True
    if {train_split, test_split} != {"val", "test"}:
        return False
    from vitlab.data.build import parse_source
    from vitlab.data.errors import DatasetError
    from vitlab.data.folder import folder_layout

    try:
        kind, path = parse_source(data)
        return kind == "folder" and folder_layout(path)[2] is None
    except (DatasetError, OSError):
        return False  # build_dataset reports the source


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fewshot", help="linear few-shot and k-NN accuracy of a checkpoint's features",
                       description="Closed-form regularised least squares from frozen pre-logit features to "
                                   "{-1, 1}^K targets with a few examples per class, plus cosine k-NN.",
                       epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a vitlab checkpoint (model.safetensors), or timm / Hugging Face / JAX weights with --model")
    add_model_argument(p)
    p.add_argument("--data", required=True, metavar="SOURCE", help="data source (e.g. digits, a folder, mnist)")
    p.add_argument("--shots", type=_shots, default=(1, 5, 10, 25), help="examples per class, comma-separated")
    p.add_argument("--seeds", type=positive_int, default=5, metavar="N", help="random support draws per shot count")
    p.add_argument("--l2-reg", type=positive_float, default=1.0,
                   help="ridge regularisation, > 0 (features are standardised)")
    p.add_argument("--knn-k", type=positive_int, default=5, help="neighbours for k-NN (capped at the shot count)")
    p.add_argument("--train-split", default="train", choices=("train", "val", "test"))
    p.add_argument("--test-split", default="test", choices=("train", "val", "test"))
    p.add_argument("--pool", type=non_negative_int, default=None, metavar="N",
                   help="embed only N random training images per class (default: max shots x seeds, so that "
                        "a large training set is not embedded whole; 0: all)")
    p.add_argument("--max-test", type=positive_int, default=None, metavar="N",
                   help="evaluate on at most N test images")
    p.add_argument("--batch-size", type=positive_int, default=256)
    add_device_argument(p)
    add_image_limit_argument(p)
    add_threads_argument(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vitlab.analysis.analyze import collate_present, spread_images
    from vitlab.analysis.fewshot import extract_features, fewshot_evaluate
    from vitlab.cli.eval import run_split, run_split_method
    from vitlab.data import build_dataset, eval_transform

    refuse_torchrun("fewshot")
    if args.seeds < 1:
        raise ValueError("--seeds must be at least 1")
    if same_images(args.data, args.train_split, args.test_split):
        same = "the same split" if args.train_split == args.test_split else \
            f"the same images ({args.data} has no test/ folder: its 'test' split is the 'val' part)"
        raise ValueError(f"--train-split {args.train_split} --test-split {args.test_split}: {same}; the support "
                         f"images would be scored as test images. Give two different splits (default: train, test)")
    device = check_device(args)
    model = require_classifier(load_checkpoint(args), "fewshot", args.checkpoint).to(device).eval()
    transform = eval_transform(model.preprocessing)
    # the split the checkpoint's run held out, so that test images are not its training images
    seed, val_fraction = run_split(args.checkpoint, args.data, args.test_split)
    split = {"seed": seed, "val_fraction": val_fraction, "transform": transform,
             "split_method": run_split_method(args.checkpoint, args.data)}
    train = build_dataset(args.data, split=args.train_split, **split)
    test = build_dataset(args.data, split=args.test_split, **split)
    num_classes = len(train.classes)
    class_names = list(train.classes)
    if num_classes < 2:
        raise ValueError(f"{args.data} has {num_classes} class ({', '.join(class_names)}): few-shot accuracy needs "
                         f"at least 2 classes (with one, every image is right)")
    pool = max(args.shots) * args.seeds if args.pool is None else args.pool
    if pool > 0 and hasattr(train, "targets"):
        from torch.utils.data import Subset

        from vitlab.analysis.fewshot import class_pool

        train = Subset(train, class_pool(train.targets, pool))
    train_x, train_y = extract_features(model, train, batch_size=args.batch_size, device=device,
                                        collate_fn=collate_present)
    if args.max_test is not None:
        test = spread_images(test, args.max_test)  # evenly spaced, so a class-sorted split keeps every class
    test_x, test_y = extract_features(model, test, batch_size=args.batch_size, device=device,
                                      collate_fn=collate_present)
    log.info("features: %d train, %d test, dimension %d", len(train_y), len(test_y), train_x.shape[1])
    import torch

    counts = torch.bincount(train_y, minlength=num_classes)
    fewest = int(counts.min())
    smallest = class_names[int(counts.argmin())]
    shots = tuple(s for s in args.shots if s <= fewest)
    if not shots:
        fix = f"use --shots {fewest} or fewer" if fewest else "every class needs at least one"
        raise ValueError(f"--shots {','.join(map(str, args.shots))}: class {smallest!r} has {fewest} training "
                         f"image(s) in {args.data} ({args.train_split} split); {fix}")
    if len(shots) < len(args.shots):
        log.warning("--shots %s skipped: class %r has %d training images", ",".join(
            str(s) for s in args.shots if s > fewest), smallest, fewest)
    results = fewshot_evaluate(train_x, train_y, test_x, test_y, num_classes=num_classes, shots=shots,
                               seeds=args.seeds, l2_reg=args.l2_reg, knn_k=args.knn_k)
    if args.json:
        print(json.dumps({
            "checkpoint": str(args.checkpoint), "model": getattr(model, "model_name", None), "data": args.data,
            "train_split": args.train_split, "test_split": args.test_split, "num_classes": num_classes,
            "num_train": len(train_y), "num_test": len(test_y), "feature_dim": int(train_x.shape[1]),
            "pool_per_class": pool, "seeds": args.seeds, "l2_reg": args.l2_reg, "results": [r.to_dict() for r in results],
        }, indent=2))
        return 0
    print(f"{getattr(model, 'model_name', 'model')} on {args.data}: {num_classes} classes, "
          f"{len(test_y)} test images, {args.seeds} seeds")
    print(f"{'shots':>5}  {'linear':>17}  {'k-NN':>17}  k")
    for r in results:
        print(f"{r.shots:>5}  {r.linear_mean:>8.2%} ± {r.linear_std:>6.2%}  {r.knn_mean:>8.2%} ± {r.knn_std:>6.2%}  "
              f"{r.knn_k}")
    return 0
