"""``vitlab explain IMAGE... --checkpoint CKPT``: attention rollout maps with the model's prediction."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from vitlab.cli.common import (
    add_device_argument,
    add_image_limit_argument,
    add_model_argument,
    add_threads_argument,
    check_device,
    load_checkpoint,
    printable,
    require_classifier,
)

log = logging.getLogger(__name__)

EXAMPLE = """example:
  vitlab explain cat.png dog.jpg --checkpoint runs/demo/model.safetensors --output explain/
  vitlab explain cat.png --checkpoint model.safetensors --method grad-rollout --class dog

Writes one PNG per image: the image as the model sees it, the relevance map and the overlay,
titled with the predicted class and its probability.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    from vitlab.analysis import METHODS

    p = sub.add_parser("explain", help="attention rollout maps for images",
                       description="Relevance maps of a checkpoint's prediction: attention rollout "
                                   "(Abnar & Zuidema 2020), gradient-weighted rollout for a chosen class, or "
                                   "the last layer's attention.",
                       epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, or folders of them (searched recursively)")
    p.add_argument("--checkpoint", required=True,
                   help="a vitlab checkpoint (model.safetensors), or timm / Hugging Face / JAX weights with --model")
    add_model_argument(p)
    p.add_argument("--method", choices=METHODS, default="auto",
                   help="how the map is computed (auto: attention rollout where the model's attention allows "
                        "it at this input size, else Grad-CAM on the last feature map)")
    p.add_argument("--class", dest="target", default=None, metavar="NAME",
                   help="class to explain with grad-rollout, grad-cam or grad-input (name or index; default: "
                        "the predicted class)")
    p.add_argument("--head-fusion", choices=("mean", "max", "min"), default="mean",
                   help="how the heads of a layer are combined (rollout and last-layer only; grad-rollout averages "
                        "its gradient-weighted heads; ignored with a warning where a map has no heads)")
    p.add_argument("--discard-ratio", type=float, default=0.0, metavar="R",
                   help="fraction of the lowest attentions dropped in each layer, 0 keeps all (rollout and "
                        "grad-rollout only)")
    p.add_argument("--output", default="explain", metavar="DIR", help="folder for the PNGs")
    p.add_argument("--overwrite", action="store_true",
                   help="replace PNGs of the same names in --output (an input image is never replaced)")
    p.add_argument("--skip-bad-images", action="store_true", help="report an undecodable file and go on")
    add_device_argument(p)
    add_image_limit_argument(p)
    add_threads_argument(p)
    p.set_defaults(func=run)


def resolve_class(target: str | None, class_names: list[str]) -> int | None:
    """A class given by name (exact, then case-insensitive) or by index."""
    if target is None:
        return None
    if target in class_names:
        return class_names.index(target)
    lowered = [c.lower() for c in class_names]
    if target.lower() in lowered:
        return lowered.index(target.lower())
    if target.lstrip("-").isdigit() and 0 <= int(target) < len(class_names):
        return int(target)
    raise ValueError(f"--class {target!r} is not one of the model's classes: {', '.join(class_names)}")


def model_class_names(model: torch.nn.Module) -> list[str]:
    names = getattr(model, "class_names", None)
    return list(names) if names else [str(i) for i in range(model.num_classes)]


def prepare_image(path: str, transform) -> torch.Tensor:
    """Decode a file to the normalised (C, H, W) tensor the model expects (channels converted too)."""
    from vitlab.data import load_image

    return transform(load_image(path, min_size=transform.min_source_size))


def run(args: argparse.Namespace) -> int:
    from vitlab.analysis import explain, normalize_map
    from vitlab.analysis.figures import explain_figure, to_display
    from vitlab.checkpoints.io import check_outputs_free
    from vitlab.data import BadImageError, eval_transform, expand_image_paths, unique_stems

    if not 0 <= args.discard_ratio < 1:
        raise ValueError(f"--discard-ratio {args.discard_ratio}: expected a fraction in [0, 1) (0 keeps every "
                         f"attention)")
    images = expand_image_paths(args.images)
    device = check_device(args)
    model = load_checkpoint(args).to(device).eval()
    if getattr(model, "task", "classification") == "detection":
        # DETR: each detected object's decoder cross-attention over the image (the paper's figure)
        from vitlab.tasks.run import detect_images

        if args.method not in (None, "auto") or args.target is not None:
            log.warning("a detector is explained by each object's decoder cross-attention: --method and --class do "
                        "not apply (vitlab detect --attention --threshold T sets which objects are drawn)")
        results = detect_images(model.cpu(), [Path(p) for p in images], Path(args.output), attention=True,
                                skip_bad_images=args.skip_bad_images, overwrite=args.overwrite)
        for r in results:
            if "error" in r:
                print(f"{r['error']} (skipped)")
            else:
                written = ", ".join(printable(Path(args.output) / r[k]) for k in ("picture", "attention") if k in r)
                print(f"{printable(r['image'])} -> {written}: {len(r['objects'])} objects")
        if results and all("error" in r for r in results):
            log.error("error: none of the %d image(s) could be read (each is named above)", len(results))
            return 2
        return 0
    require_classifier(model, "explain", args.checkpoint)  # a segmenter has no per-class map here
    names = model_class_names(model)
    target = resolve_class(args.target, names)
    from vitlab.analysis.explain import methods_for, resolve_method

    headless = model.num_classes == 0  # a self-supervised backbone: only class-agnostic attention maps
    if headless:
        agnostic = [m for m in ("last-layer", "rollout") if m in methods_for(model)]  # DINO's class-token maps first
        if not agnostic:
            raise ValueError(f"{args.checkpoint} has no classifier (a pre-trained backbone), and "
                             f"{type(model).__name__} has no attention map that does without one: its explain methods "
                             f"({', '.join(methods_for(model))}) all explain a class score. Use a checkpoint with a "
                             f"classification head (fine-tune this one first)")
        if args.method not in ("auto", *agnostic):
            raise ValueError(f"--method {args.method}: {args.checkpoint} has no classifier (a pre-trained backbone); "
                             f"use {' or '.join(agnostic)}, or fine-tune it first")
        method = agnostic[0] if args.method == "auto" else args.method
    else:
        method = resolve_method(model, args.method)
    # "auto" is passed on: explain falls back to Grad-CAM where the windows cannot be analysed at an image's size
    asked = "auto" if args.method == "auto" and not headless else method
    if target is not None and method in ("rollout", "last-layer"):
        log.warning("--class does not change %s maps; use grad-rollout, grad-cam or grad-input", method)
    from vitlab.inference import score_kind

    kind = score_kind(model)  # the scores shown: the model's score function, as predict's
    pre = model.preprocessing
    transform = eval_transform(pre)
    out_dir = Path(args.output)
    stems = unique_stems(images)
    names_of = {method, "grad-cam"} if asked == "auto" else {method}  # auto may fall back to Grad-CAM
    check_outputs_free([out_dir / f"{stem}_{m}.png" for stem in stems for m in sorted(names_of)], inputs=images,
                       output=out_dir, overwrite=args.overwrite)
    # out_dir is made by the first figure written: a run that fails on its input leaves no empty folder
    skipped = 0
    for path, stem in zip(images, stems):
        try:
            x = prepare_image(path, transform).unsqueeze(0).to(device)  # (1, C, H, W)
        except BadImageError as e:
            if not args.skip_bad_images:
                raise BadImageError(f"{e} (--skip-bad-images reports such files and goes on)") from e
            log.warning("skipped %s", e)
            skipped += 1
            continue
        e = explain(model, x, method=asked, target=target, head_fusion=args.head_fusion,
                    discard_ratio=args.discard_ratio)
        out_name = f"{stem}_{e.method}.png"
        if headless:
            image = to_display(x[0], pre.mean, pre.std)
            out = explain_figure(image, normalize_map(e.maps)[0], out_dir / out_name,
                                 title=f"{Path(path).name}  [{e.method}, backbone without classifier]")
            log.info("%s -> %s", path, out)
            print(printable(out))
            continue
        pred = int(e.probs[0].argmax())
        title = f"{Path(path).name}: {names[pred]} ({_score_text(e.probs[0, pred], kind)})  [{e.method}"
        explained = ""
        if e.method not in ("rollout", "last-layer"):
            t = int(e.target[0])
            title += f" for {names[t]} ({_score_text(e.probs[0, t], kind)})"
            if target is not None:
                explained = f"; explained {names[t]}, {_score_text(e.probs[0, t], kind)}"
        title += "]"
        image = to_display(x[0], pre.mean, pre.std)
        if pre.channel_order == "BGR" and image.shape[0] == 3:
            image = image.flip(0)  # shown in RGB
        out = explain_figure(image, normalize_map(e.maps)[0], out_dir / out_name, title=title)
        how = e.method + (" chosen by --method auto" if args.method == "auto" else "")
        log.info("%s -> %s (method %s; predicted %s, %s%s)", path, out, how, names[pred],
                 _score_text(e.probs[0, pred], kind), explained)
        print(printable(out))
    if images and skipped == len(images):  # as predict / detect / segment: a script must not take it for success
        log.error("error: none of the %d image(s) could be read (each is named above); nothing written", skipped)
        return 2
    return 0


def _score_text(score: torch.Tensor, kind: str) -> str:
    """A class's score as shown: a probability (softmax; sigmoid: of that class alone), or the raw value."""
    if kind == "none":
        return f"value {float(score):.4g}"
    return f"{float(score):.1%}" + (" sigmoid" if kind == "sigmoid" else "")
