"""``vitlab predict``: class names and probabilities for image files, as text or JSON; for a multi-label model
(sigmoid scores) also the labels whose score reaches ``--threshold``."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from vitlab.cli.common import (
    add_class_map_argument,
    add_device_argument,
    add_image_limit_argument,
    add_model_argument,
    add_skip_bad_images_argument,
    add_threads_argument,
    add_threshold_argument,
    apply_class_map,
    check_device,
    model_args,
    multilabel_threshold,
    number_type,
    read_class_map,
    recorded_class_names,
    require_classifier,
)
from vitlab.export.runtimes import RUNTIMES

log = logging.getLogger("vitlab")

EXAMPLE = """examples:
  vitlab predict digit0.png digit1.png --checkpoint runs/digits-vit/model.safetensors
  vitlab predict photo.jpg --checkpoint runs/mine/model.safetensors --topk 3 --json
  vitlab predict ./photos --checkpoint runs/mine/model.safetensors          (every image in the folder)
  vitlab predict digit0.png --checkpoint digits.onnx          (ONNX Runtime; the file carries the preprocessing)
  vitlab predict cat.jpg --checkpoint vit_small.safetensors --model vit_small_patch16_224   (timm weights)
  vitlab predict digit0.png --checkpoint runs/digits-vit/model.safetensors --runtime torch-bf16
  vitlab predict ./photos --checkpoint runs/tags --threshold 0.3   (multi-label: the labels scoring >= 0.3)"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify image files with a checkpoint",
                       description="Classify images with a vitlab checkpoint, using its own preprocessing.",
                       epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", help="image files, or folders of them (searched recursively)")
    p.add_argument("--checkpoint", required=True, help="vitlab checkpoint, or an ONNX file written by vitlab export")
    add_model_argument(p)
    p.add_argument("--runtime", choices=["auto", *RUNTIMES], default="auto",
                   help="auto: ONNX Runtime for an .onnx file, else PyTorch float32; other runtimes report their "
                        "top-1 agreement with float32 PyTorch")
    p.add_argument("--agreement", type=_agreement_count, default=None, metavar="N|all",
                   help="with a runtime other than float32 PyTorch: how many images (the first N) also go through "
                        "the float32 model to report top-1 agreement; each costs a float32 forward (default: 256; "
                        "0: none; all: every image; eval --runtime measures it over a whole data set)")
    p.add_argument("--topk", type=int, default=5, help="classes to show per image (default: 5)")
    p.add_argument("--scores", choices=["auto", "softmax", "sigmoid", "none"], default="auto",
                   help="how logits become scores: auto (default) takes the checkpoint's (softmax; sigmoid for a "
                        "Hugging Face multi-label or single-label head, none for regression, as transformers' "
                        "pipeline does); none reports raw logits as 'score'")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_threshold_argument(p, "each image's labels (JSON: \"labels\") are listed beside its top-k scores")
    add_device_argument(p)
    add_image_limit_argument(p)
    add_threads_argument(p)
    p.add_argument("--batch-size", type=int, default=64, help="images per forward (default: 64)")
    add_skip_bad_images_argument(p)
    add_class_map_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from vitlab.data import BadImageError, eval_transform, expand_image_paths
    from vitlab.inference import prepare_image, score_kind, to_scores
    from vitlab.train.evaluate import logits_of

    if args.topk < 1 or args.batch_size < 1:
        raise ValueError(f"--topk and --batch-size must be >= 1, got {args.topk} and {args.batch_size}")
    images = expand_image_paths(args.images)
    from vitlab.export.runtimes import compile_failure, load_for_inference, runtime_device, slow_bf16_reason

    device = check_device(args)
    class_map = read_class_map(args.class_map) if args.class_map else None  # before the model: its errors first
    model, reference = load_for_inference(args.checkpoint, args.runtime, model_name=args.model,
                                          model_args=model_args(args))
    require_classifier(model, "predict", args.checkpoint)
    if reference is None and args.agreement:  # None: not given
        raise ValueError(f"--agreement needs the PyTorch checkpoint: {args.checkpoint} is an ONNX file, with no "
                         f"float32 model to compare with; give --checkpoint CKPT --runtime {model.name}")
    if model.name == "torch" and args.agreement:
        log.warning("--agreement %s: the float32 PyTorch runtime is the reference itself; agreement is reported for "
                    "the other runtimes (--runtime torch-bf16, onnx, ...)",
                    "all" if args.agreement == sys.maxsize else args.agreement)
    agreement = 256 if args.agreement is None else args.agreement
    if not model.num_classes:  # a backbone's checkpoint, or its ONNX file (features)
        tune = ("fine-tune the PyTorch checkpoint it was exported from (vitlab finetune --from CHECKPOINT --data "
                "...)" if reference is None else f"fine-tune it (vitlab finetune --from {args.checkpoint} --data ...)")
        raise ValueError(f"{args.checkpoint}: a backbone without a classifier (no classes to predict); {tune}, or "
                         f"evaluate its features with vitlab eval --protocol knn|linear")
    if class_map is not None:
        apply_class_map(model, class_map, args.class_map, recorded=recorded_class_names(model, reference))
    device = runtime_device(model.name, device)
    model = model.to(device).eval()
    if reason := slow_bf16_reason(model.name, device):
        log.warning("%s", reason)
    if reference is not None:
        reference = reference.to(device)
    transform = eval_transform(model.preprocessing)
    names = model.class_names
    scores = score_kind(model, args.scores)  # the library's vitlab.predict decodes, prepares and scores alike
    if scores != "softmax":
        log.info("scores: %s of the logits%s", scores, " (the checkpoint's)" if args.scores == "auto" else "")
    threshold = multilabel_threshold(args, scores)
    multi_label = scores == "sigmoid"  # each label scored alone: those at or above the threshold are given
    k = min(args.topk, model.num_classes)
    results = []
    agree, seen = 0, 0
    bar = None
    if len(images) > args.batch_size and sys.stderr.isatty():  # a redrawn bar is noise in a log file
        from tqdm.auto import tqdm

        bar = tqdm(total=len(images), desc="predict", unit="img", leave=False)
    for start in range(0, len(images), args.batch_size):
        batch = images[start:start + args.batch_size]
        rows: list[dict | None] = [None] * len(batch)  # the batch's entries in input order, whatever fails
        slots, paths, pixels = [], [], []
        for i, p in enumerate(batch):
            try:
                pixels.append(prepare_image(p, transform))
                paths.append(p)
                slots.append(i)
            except BadImageError as e:
                if not args.skip_bad_images:
                    raise BadImageError(f"{e} (--skip-bad-images reports such files and goes on)") from e
                log.warning("skipped %s", e)
                rows[i] = {"image": p, "error": str(e)}
        if not paths:
            results.extend(rows)
            _report(rows, args.json, bar)
            continue
        x = torch.stack(pixels).to(device)  # (B, C, H, W)
        with torch.no_grad():
            logits = logits_of(model(x)).float()
            if reference is not None and model.name != "torch" and (check := max(0, agreement - seen)):
                agree += (logits_of(reference(x[:check])).argmax(-1) == logits[:check].argmax(-1)).sum().item()
                seen += min(check, len(x))
            probs = to_scores(logits, scores)
        top = probs.topk(k, dim=-1)
        key = "score" if scores == "none" else "probability"
        failed = compile_failure(model)  # these images ran eager
        for j, (slot, p, values, indices) in enumerate(zip(slots, paths, top.values.tolist(), top.indices.tolist())):
            rows[slot] = {"image": p, "predictions": [
                {"class": names[i], "index": i, key: round(v, 6)} for v, i in zip(values, indices)],
                **({"compile_failed": failed} if failed else {})}
            if multi_label:
                rows[slot]["labels"] = [{"class": names[i], "index": i, key: round(v, 6)}
                                        for v, i in above_threshold(probs[j], threshold)]
                rows[slot]["threshold"] = threshold
        results.extend(rows)
        _report(rows, args.json, bar)
    if bar is not None:
        bar.close()
    if failed := compile_failure(model):
        log.warning("runtime %s: compile failed (%s); ran eager", model.name, failed)
    if seen:
        total = len(results) - sum("error" in r for r in results)
        which = "these images" if seen == total else f"the first {seen} of {total} images (--agreement)"
        log.info("runtime %s: top-1 agreement with float32 PyTorch on %s: %d/%d", model.name, which, agree, seen)
    if args.json:
        print(json.dumps(results, indent=2))
    if results and all("error" in r for r in results):
        log.error("error: none of the %d image(s) could be read (each is named above)", len(results))
        return 2
    return 0


def above_threshold(scores, threshold: float) -> list[tuple[float, int]]:
    """(score, index) of each label whose score is >= ``threshold``, best first (ties: lower index first)."""
    picked = [(float(v), i) for i, v in enumerate(scores.tolist()) if v >= threshold]
    return sorted(picked, key=lambda vi: (-vi[0], vi[1]))


_agreement_count = number_type(lambda text: sys.maxsize if text == "all" else int(text), lambda n: n >= 0,
                               "a number of images >= 0 or 'all'", "agreement_count")


def _score_text(q: dict) -> str:
    return f"{100 * q['probability']:.1f}%" if "probability" in q else f"score {q['score']:.4g}"


def _report(batch: list[dict], as_json: bool, bar) -> None:
    """One batch's results: printed as they come in text mode (a long folder shows its progress and a stopped
    run keeps what it printed), gathered for the end in JSON mode; the progress bar moves either way."""
    if bar is not None:
        bar.update(len(batch))
    if as_json:
        return
    for r in batch:
        if "error" in r:
            line = f"{r['error']} (skipped)"  # the message starts with the file's path
        elif "labels" in r:  # multi-label: the labels at or above the threshold, then the top-k scores
            given = ", ".join(f"{q['class']} ({_score_text(q)})" for q in r["labels"]) or "no label"
            top = ", ".join(f"{q['class']} {_score_text(q)}" for q in r["predictions"])
            line = f"{r['image']}: {given} [>= {r['threshold']:g}]  [top: {top}]"
        else:
            best = r["predictions"][0]
            others = ", ".join(f"{q['class']} {_score_text(q)}" for q in r["predictions"][1:])
            line = f"{r['image']}: {best['class']} ({_score_text(best)})" + (f"  [{others}]" if others else "")
        if bar is not None:
            bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)
