"""ViT-S/16 at batch 16 through OpenVINO's CPU runtime (bfloat16 on AMX by default) against vitlab's
``torch-bf16-compile`` and timm's eager bfloat16 paths, interleaved in one process (issue 13's open target,
measured, not adopted).

OpenVINO converts the PyTorch model itself (``openvino.convert_model``: SDPA becomes its fused attention op), runs
on the same two threads with its latency hint, and picks bfloat16 on a CPU with AMX. It is not a vitlab dependency:
install it beside the venv to run this (``pip install openvino``). timm comes from the peers venv.

    .venv/bin/python benchmarks/explore_openvino.py --rounds 10 --peers /tmp/peers
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import statistics
import sys
import time

import torch

import vitlab
from vitlab.export.runtimes import build_runtime


def per_second(fn, batch: int, min_s: float) -> float:
    t0 = time.perf_counter()
    n = 0
    while True:
        fn()
        n += batch
        dt = time.perf_counter() - t0
        if dt >= min_s:
            return n / dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--min-s", type=float, default=1.0, help="seconds per arm per round")
    p.add_argument("--peers", default="/tmp/peers")
    p.add_argument("--out", help="write the rounds as JSON here")
    args = p.parse_args()
    for sp in glob.glob(f"{args.peers}/lib/python3*/site-packages"):
        sys.path.append(sp)
    import openvino as ov
    import timm

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = vitlab.create_model("vit_small_patch16_224").eval()
    with torch.no_grad():  # vitlab's head starts at zero: random logits make the comparison mean something
        model.head.weight.normal_(0, 0.02)
    ref = timm.create_model("vit_small_patch16_224").eval()
    ref.load_state_dict(model.state_dict())
    ref_bf16 = timm.create_model("vit_small_patch16_224").eval().to(torch.bfloat16)
    ref_bf16.load_state_dict(model.state_dict())
    x = torch.randn(args.batch, 3, 224, 224)
    xb, xn = x.to(torch.bfloat16), x.numpy()

    compiled = build_runtime("torch-bf16-compile", model)
    core = ov.Core()
    ov_model = core.compile_model(ov.convert_model(model, example_input=x), "CPU",
                                  {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": args.threads})
    request = ov_model.create_infer_request()

    def timm_autocast():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ref(x)

    arms = {
        "timm bf16 weights": lambda: ref_bf16(xb),
        "timm bf16 autocast": timm_autocast,
        "vitlab torch-bf16-compile": lambda: compiled(x),
        "openvino (bf16, latency hint)": lambda: request.infer({0: xn}),
    }
    with torch.inference_mode():
        full = model(x)
        got = {"vitlab torch-bf16-compile": compiled(x).float(),
               "openvino (bf16, latency hint)": torch.from_numpy(request.infer({0: xn})[0].copy())}
        for fn in arms.values():
            fn(), fn()
        rounds = collections.defaultdict(list)
        for r in range(args.rounds):
            names = list(arms)
            names = names[r % len(names):] + names[:r % len(names)]
            for name in names:
                rounds[name].append(per_second(arms[name], args.batch, args.min_s))
    print(f"OpenVINO {ov.__version__}, torch {torch.__version__}, timm {timm.__version__}, batch {args.batch}, "
          f"{args.threads} threads, {args.rounds} rounds; precision {ov_model.get_property('INFERENCE_PRECISION_HINT')}")
    best = [max(a, b) for a, b in zip(rounds["timm bf16 weights"], rounds["timm bf16 autocast"])]
    for name, v in rounds.items():
        vs_best = statistics.median(a / b for a, b in zip(v, best))
        vs_auto = statistics.median(a / b for a, b in zip(v, rounds["timm bf16 autocast"]))
        vs_compiled = statistics.median(a / b for a, b in zip(v, rounds["vitlab torch-bf16-compile"]))
        print(f"{name:32s} {statistics.median(v):7.1f} img/s ({min(v):.1f}-{max(v):.1f})  vs timm best eager "
              f"{vs_best:.2f}  vs timm autocast {vs_auto:.2f}  vs torch-bf16-compile {vs_compiled:.2f}")
    for name, out in got.items():
        diff = (out - full).abs().max().item()
        agree = (out.argmax(1) == full.argmax(1)).float().mean().item()
        print(f"{name}: largest logit difference from float32 {diff:.4f} (logit scale {full.abs().max():.2f}), "
              f"top-1 agreement {agree:.0%} on {args.batch} random inputs")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rounds": rounds, "batch": args.batch, "threads": args.threads}, f, indent=1)


if __name__ == "__main__":
    main()
