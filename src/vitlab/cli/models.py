"""``vitlab models [PATTERN]``: list registered model names."""

from __future__ import annotations

import argparse
import json
import logging

from vitlab.models import get_entry, list_models

log = logging.getLogger("vitlab")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list registered models",
                       description="List registered model names, optionally matching a shell-style pattern.",
                       epilog="example:\n  vitlab models 'vit_*_patch16_224'",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pattern", nargs="?", default="*", help="shell-style pattern, e.g. 'vit_base_*'")
    p.add_argument("--family", help="only this family (vit, resnet, ...)")
    p.add_argument("--task", default="all", choices=["all", "classification", "detection", "segmentation"],
                   help="only models for this task (default: all)")
    p.add_argument("--pretrained", action="store_true",
                   help="only models with known published weights, one NAME.TAG per set "
                        "(vitlab.create_model('NAME.TAG', pretrained=True) loads it; `vitlab info NAME` gives "
                        "each set's source)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    families = sorted({get_entry(n).family for n in list_models(task=None)})
    if args.family is not None and args.family not in families:
        log.error("--family %r: no such family; one of %s", args.family, ", ".join(families))
        return 2
    names = list_models(args.pattern, family=args.family, task=None if args.task == "all" else args.task,
                        pretrained=args.pretrained)
    entry = lambda n: get_entry(n.split(".")[0])  # noqa: E731 - a NAME.TAG lists its model's entry
    if args.json:
        print(json.dumps([{"name": n, "family": entry(n).family, "description": entry(n).description}
                          for n in names], indent=2))
    else:
        width = max((len(n) for n in names), default=0)
        for n in names:
            print(f"{n:<{width}}  {entry(n).description}")
    if not names:
        where = [f"family {args.family!r}"] if args.family else []
        where += [f"task {args.task!r}"] if args.task != "all" else []
        where += ["published weights"] if args.pretrained else []
        log.error("no model matches %r%s", args.pattern, f" with {', '.join(where)}" if where else "")
        return 1
    return 0
