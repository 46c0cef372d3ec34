"""``vitlab benchmark``: vitlab's own throughput, achieved GFLOP/s and the fraction of a matmul's GFLOP/s.

Comparisons against other libraries live in ``benchmarks/bench_models.py``; this command measures
vitlab alone and needs nothing beyond vitlab's own dependencies.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from vitlab.benchmark import DTYPES, MODES, benchmark_models, num_threads
from vitlab.cli.common import (
    add_device_argument,
    add_model_argument,
    check_device,
    load_checkpoint,
    non_negative_float,
    non_negative_int,
    parse_assignments,
    positive_int,
    threads_type,
)
from vitlab.export.runtimes import RUNTIMES

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "benchmark", help="measure a model's throughput (images/s) and achieved GFLOP/s on this machine",
        description="Time inference or training steps of vitlab models on random images. Each model is "
                    "interleaved with a large matmul timed in the same rounds; the model's achieved GFLOP/s "
                    "over the matmul's is an MFU-like fraction of the machine's practical peak.",
        epilog="example:\n  vitlab benchmark --models vit_tiny_patch16_224 vit_small_patch16_224 "
               "--mode train --dtype bfloat16\n"
               "  vitlab benchmark --models vit_base_patch16_224 --set depth=2 --repeats 1 --json\n"
               "  vitlab benchmark --checkpoint runs/mine/model.safetensors --data ./images "
               "--runtime torch,torch-bf16-compile,onnx,onnx-int8   (speed and agreement of your model)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=None, metavar="NAME",
                   help="registered model names, randomly initialised (default: vit_tiny_patch16_224)")
    p.add_argument("--checkpoint", help="a trained model instead of --models: its inference runtimes (--runtime, "
                                        "default torch) with agreement on --data that means something")
    add_model_argument(p)
    p.add_argument("--batch-size", type=int, default=16, help="images per step (default: 16)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="float32, or bfloat16 autocast (default: float32)")
    p.add_argument("--mode", choices=MODES, default="infer",
                   help="infer: eval forward without autograd; train: forward + backward + AdamW step "
                        "(default: infer)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds; the median is reported (default: 5)")
    p.add_argument("--warmup", type=non_negative_int, default=1, help="untimed calls before timing (default: 1)")
    p.add_argument("--min-repeat-s", type=non_negative_float, default=0.5,
                   help="each repeat averages enough steps to last about this long (default: 0.5)")
    p.add_argument("--matmul-size", type=positive_int, default=2048, help="size n of the n x n reference matmul")
    p.add_argument("--threads", type=threads_type, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="model config override, repeatable, e.g. --set depth=2 --set img_size=64")
    add_device_argument(p)
    p.add_argument("--runtime", metavar="LIST",
                   help=f"compare inference runtimes side by side, comma-separated from: {', '.join(RUNTIMES)} "
                        "(images/s, batch-1 latency, top-1 agreement with float32 PyTorch on real images; "
                        "--dtype/--mode do not apply)")
    p.add_argument("--data", help="with --runtime: data source for the agreement images (default: bundled digits)")
    p.add_argument("--json", action="store_true", help="print the full results as JSON")
    p.set_defaults(func=run)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["depth=2", "img_size=64", "global_pool='avg'"]`` -> {"depth": 2, "img_size": 64, "global_pool": "avg"}
    (the same reading as ``--model-arg``: :func:`vitlab.cli.common.parse_assignments`)."""
    return parse_assignments(items, "--set")


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.repeats < 1:
        raise ValueError("--batch-size and --repeats must be >= 1")
    if check_device(args).type != "cpu" and args.device != "auto":
        raise ValueError(f"--device {args.device}: vitlab benchmark measures the CPU only; use --device cpu")
    overrides = parse_overrides(args.overrides)
    if args.checkpoint is not None:
        if args.models:
            raise ValueError("give --models (registered names, random weights) or --checkpoint, not both")
        if overrides:
            raise ValueError("--set changes a registered model's config; a --checkpoint's model is fixed by its file")
        if args.mode != "infer" or args.dtype != "float32":
            raise ValueError("--checkpoint measures inference runtimes (--runtime); --mode and --dtype do not apply")
        from vitlab.export import is_onnx_file

        if is_onnx_file(args.checkpoint):
            raise ValueError(f"--checkpoint {args.checkpoint}: an ONNX file has no float32 PyTorch reference to "
                             f"compare with; give the checkpoint it was exported from (--runtime onnx exports it)")
        args.runtime = args.runtime or "torch"
        return run_runtimes(args, overrides, [load_checkpoint(args)])
    if args.model is not None:
        raise ValueError("--model names the architecture of --checkpoint's weights; for random weights use --models")
    args.models = args.models or ["vit_tiny_patch16_224"]
    if args.runtime:
        if args.mode != "infer" or args.dtype != "float32":
            raise ValueError("--runtime measures inference runtimes; --mode and --dtype do not apply (a bfloat16 "
                             "runtime is --runtime torch-bf16; training steps: leave --runtime out)")
        return run_runtimes(args, overrides, args.models)
    if args.data is not None:
        raise ValueError("--data gives the agreement images of --runtime; without --runtime the benchmark times "
                         "training or inference steps on random images, which no data changes")
    with num_threads(args.threads):
        report = benchmark_models(
            args.models, batch_size=args.batch_size, dtype=args.dtype, mode=args.mode, warmup=args.warmup,
            repeats=args.repeats, min_repeat_s=args.min_repeat_s, matmul_size=args.matmul_size,
            overrides=overrides)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    m = report["machine"]
    print(f"{m['cpu']}, {m['torch_threads']} thread(s), torch {m['torch']}, {m['allocator']}; batch {args.batch_size}, "
          f"{args.dtype}, {args.mode}, median of {args.repeats}")
    header = f"{'model':<28} {'img/s':>9} {'GFLOP/s':>9} {'matmul GFLOP/s':>15} {'of matmul':>10} {'spread':>7}"
    print(header)
    for r in report["results"]:
        print(f"{r['model']:<28} {r['images_per_s']:>9.1f} {r['achieved_gflops']:>9.1f} "
              f"{r['matmul_gflops']:>15.1f} {100 * r['fraction_of_matmul']:>9.0f}% "
              f"{100 * r['timing']['spread']:>6.0f}%")
    return 0


def run_runtimes(args: argparse.Namespace, overrides: dict[str, Any], models: list) -> int:
    from vitlab.benchmark import benchmark_runtimes
    from vitlab.export.runtimes import parse_runtimes

    runtimes = parse_runtimes(args.runtime)
    with num_threads(args.threads):
        report = benchmark_runtimes(models, runtimes, batch_size=args.batch_size, repeats=args.repeats,
                                    warmup=args.warmup, min_repeat_s=args.min_repeat_s, overrides=overrides,
                                    agreement_images=args.data, matmul_size=args.matmul_size)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    m = report["machine"]
    print(f"{m['cpu']}, {m['torch_threads']} thread(s), torch {m['torch']}, {m['allocator']}; batch {args.batch_size}, "
          f"median of {args.repeats} interleaved rounds; agreement = top-1 agreement with float32 PyTorch")
    print(f"{'model':<28} {'runtime':<18} {'img/s':>8} {'vs first':>8} {'GFLOP/s':>8} {'of matmul':>9} "
          f"{'batch-1 ms':>10} {'agreement':>9} {'max diff':>9} {'set-up s':>8}")
    for r in report["results"]:
        agree = "n/a" if r["top1_agreement"] is None else f"{100 * r['top1_agreement']:.1f}%"
        print(f"{r['model']:<28} {r['runtime']:<18} {r['images_per_s']:>8.1f} {r['speedup_vs_first']:>7.2f}x "
              f"{r['achieved_gflops']:>8.1f} {100 * r['fraction_of_matmul']:>8.0f}% "
              f"{r['latency_ms_batch1']:>10.1f} {agree:>9} {r['max_abs_logit_diff']:>9.2g} "
              f"{r['setup_s']:>8.1f}" + (f"  (compile failed: {r['compile_failed']}; ran eager)"
                                          if r["compile_failed"] else ""))
    if report["results"]:
        mm = {r["matmul_dtype"]: r["matmul_gflops"] for r in report["results"]}
        print("of matmul: achieved GFLOP/s over a " + " and a ".join(
            f"{args.matmul_size}^2 {d} matmul's ({g:.0f} GFLOP/s)" for d, g in sorted(mm.items()))
              + " in the same rounds" + (" (bf16 runtimes against bfloat16)" if len(mm) > 1 else ""))
        print(f"agreement images: {report['results'][0]['agreement_images']}")
        kinds = {r["agreement_kind"] for r in report["results"]} - {"top-1 agreement"}
        if kinds:
            print(f"agreement of a detector / segmenter: {', '.join(sorted(kinds))} (argmax class per query / pixel)")
    if any(r["top1_agreement"] is None for r in report["results"]):
        print("agreement n/a: a randomly initialised model's logits are all 0 (zero-initialised head); measure "
              "agreement on a trained checkpoint with `vitlab eval --checkpoint CKPT --data DATA --runtime R`")
    return 0
