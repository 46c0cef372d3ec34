"""Compare the operator lists of vitlab's and timm's (and optionally HF's) ViT under torch.profiler.

Where throughput differs, this shows whether the implementations run different aten ops (or the same
ops a different number of times) or the same ops at different speeds. Run with the peer venv:

    /tmp/peers/bin/python benchmarks/profile_ops.py --model vit_tiny_patch16_224 --mode train --dtype float32

Prints, per implementation, the top ops by self CPU time, then every op whose call count differs
between the first implementation and each other one, and writes the whole comparison as JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch
from bench_models import IMPLS, build
from torch.profiler import ProfilerActivity, profile

import vitlab
from vitlab.benchmark import DTYPES, MODES, make_infer_step, make_train_step


def make_step(impl: str, name: str, mode: str, dtype: str, batch: int):
    info = vitlab.model_info(name)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, *info["preprocessing"]["input_size"], generator=g)
    targets = torch.randint(0, info["num_classes"], (batch,), generator=g)
    torch.manual_seed(0)
    model = build(impl, name)
    step = (make_infer_step(model, images, dtype=dtype) if mode == "infer"
            else make_train_step(model, images, targets, dtype=dtype))
    step()  # warm-up outside the trace
    return step


def profile_interleaved(steps: dict, rounds: int) -> dict[str, dict[str, dict]]:
    """Profile one step of each implementation per round, alternating, and average the op tables.

    Alternating matters on a shared machine: profiling A fully, then B, makes any load change look like
    a per-op slowdown of whichever ran in the busier minute.
    """
    acc: dict[str, dict[str, dict]] = {i: {} for i in steps}
    names = list(steps)
    for r in range(rounds):
        for impl in names[r % len(names):] + names[: r % len(names)]:  # rotate who goes first
            step = steps[impl]
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step()
            for e in prof.key_averages():
                o = acc[impl].setdefault(e.key, {"count": 0, "self_cpu_ms": 0.0, "cpu_ms": 0.0})
                o["count"] += e.count
                o["self_cpu_ms"] += e.self_cpu_time_total / 1e3
                o["cpu_ms"] += e.cpu_time_total / 1e3
    for ops in acc.values():
        for o in ops.values():
            o["count"] //= rounds
            o["self_cpu_ms"] /= rounds
            o["cpu_ms"] /= rounds
    return acc


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--mode", choices=MODES, default="train")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=["vitlab", "timm"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3, help="profiled steps per implementation, alternating")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    steps = {i: make_step(i, args.model, args.mode, args.dtype, args.batch_size) for i in args.impls}
    res = profile_interleaved(steps, args.rounds)
    for impl, ops in res.items():
        total = sum(o["self_cpu_ms"] for o in ops.values())
        print(f"\n## {impl}: {args.model} {args.mode} {args.dtype}, self CPU total {total:.1f} ms/step")
        print(f"{'op':<48} {'calls':>6} {'self ms':>9}")
        for k, o in sorted(ops.items(), key=lambda kv: -kv[1]["self_cpu_ms"])[: args.top]:
            print(f"{k:<48} {o['count']:>6} {o['self_cpu_ms']:>9.2f}")
    base = args.impls[0]
    diff: dict[str, dict] = {}
    for peer in args.impls[1:]:
        names = sorted(set(res[base]) | set(res[peer]))
        d = {}
        for n in names:
            a, b = res[base].get(n, {}), res[peer].get(n, {})
            if a.get("count", 0) != b.get("count", 0):
                d[n] = {i: {"count": o.get("count", 0), "self_cpu_ms": round(o.get("self_cpu_ms", 0.0), 3)}
                        for i, o in ((base, a), (peer, b))}
        diff[f"{base}-vs-{peer}"] = d
        print(f"\n## {base} vs {peer}: {len(d)} op(s) whose call count per step differs")
        for n, v in d.items():
            print(f"{n:<56} {base}: {v[base]['count']} ({v[base]['self_cpu_ms']:.2f} ms)  "
                  f"{peer}: {v[peer]['count']} ({v[peer]['self_cpu_ms']:.2f} ms)")
        same = [n for n in names if n not in d and n in res[base]]
        ta = sum(res[base][n]["self_cpu_ms"] for n in same)
        tb = sum(res[peer][n]["self_cpu_ms"] for n in same)
        print(f"ops with equal counts: {len(same)}; their self CPU ms/step {base} {ta:.1f} vs {peer} {tb:.1f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                        "ops": res, "count_differences": diff}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
