"""``vitlab predict``: class names and probabilities for image files, as text or JSON."""

from __future__ import annotations

import argparse
import json

from vitlab.cli.common import add_device_argument, add_image_limit_argument, check_device

EXAMPLE = """examples:
  vitlab predict digit0.png digit1.png --checkpoint runs/digits-vit/model.safetensors
  vitlab predict photo.jpg --checkpoint runs/mine/model.safetensors --topk 3 --json"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify image files with a checkpoint",
                       description="Classify images with a vitlab checkpoint, using its own preprocessing.",
                       epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--checkpoint", required=True, help="vitlab checkpoint")
    p.add_argument("--topk", type=int, default=5, help="classes to show per image")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_device_argument(p)
    add_image_limit_argument(p)
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    import vitlab
    from vitlab.data import eval_transform, load_image
    from vitlab.train.evaluate import logits_of

    if args.topk < 1:
        raise ValueError("--topk must be >= 1")
    device = check_device(args)
    model = vitlab.load_model(args.checkpoint).to(device).eval()
    transform = eval_transform(model.preprocessing)
    names = getattr(model, "class_names", None) or [str(i) for i in range(model.num_classes)]
    k = min(args.topk, model.num_classes)
    results = []
    for start in range(0, len(args.images), args.batch_size):
        paths = args.images[start:start + args.batch_size]
        x = torch.stack([transform(load_image(p, min_size=transform.min_source_size)) for p in paths]).to(device)  # (B, C, H, W)
        with torch.no_grad():
            probs = logits_of(model(x)).float().softmax(dim=-1)
        top = probs.topk(k, dim=-1)
        for p, values, indices in zip(paths, top.values.tolist(), top.indices.tolist()):
            results.append({"image": p, "predictions": [
                {"class": names[i], "index": i, "probability": round(v, 6)} for v, i in zip(values, indices)]})
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            best = r["predictions"][0]
            others = ", ".join(f"{q['class']} {100 * q['probability']:.1f}%" for q in r["predictions"][1:])
            print(f"{r['image']}: {best['class']} ({100 * best['probability']:.1f}%)" + (f"  [{others}]" if others else ""))
    return 0
