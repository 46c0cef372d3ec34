"""Activation checkpointing (``model.set_grad_checkpointing()``, recipe ``grad_checkpointing``): memory and time of
one training step (forward, backward) with and without it, per model and batch.

Each configuration runs in a fresh process (peak resident memory is per process), alternating plain and
checkpointed runs; the step is timed after one warm-up step. Writes benchmarks/results/grad_checkpointing.json.

    .venv/bin/python benchmarks/bench_grad_checkpointing.py --models vit_small_patch16_224 swin_tiny_patch4_window7_224 \\
        --batches 16 48 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import resource, sys, time, torch
sys.path.insert(0, {src!r})
import vitlab
torch.manual_seed(0)
torch.set_num_threads({threads})
model = vitlab.create_model({name!r}).train()
if {checkpointing}:
    model.set_grad_checkpointing()
x = torch.randn({batch}, 3, *model.preprocessing.input_size[1:])
def step():
    model.zero_grad(set_to_none=True)
    model(x).float().square().mean().backward()
step()  # warm-up (allocator, kernels)
t = time.perf_counter()
step()
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def run_one(name: str, batch: int, checkpointing: bool, threads: int) -> tuple[float, float]:
    code = CHILD.format(src=str(REPO / "src"), name=name, batch=batch, checkpointing=checkpointing, threads=threads)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    seconds, peak_mib = (float(v) for v in out.stdout.split()[-2:])
    return seconds, peak_mib


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vit_small_patch16_224", "swin_tiny_patch4_window7_224"])
    p.add_argument("--batches", nargs="+", type=int, default=[16, 48])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "grad_checkpointing.json"))
    args = p.parse_args()
    rows = []
    for name in args.models:
        for batch in args.batches:
            runs = {False: [], True: []}
            for _ in range(args.repeats):
                for ck in (False, True):  # alternating: a slow phase of the machine hits both
                    runs[ck].append(run_one(name, batch, ck, args.threads))
            plain_s = min(s for s, _ in runs[False])
            ck_s = min(s for s, _ in runs[True])
            plain_mib = max(m for _, m in runs[False])
            ck_mib = max(m for _, m in runs[True])
            row = {"model": name, "batch": batch, "plain_step_s": round(plain_s, 2), "checkpointed_step_s": round(ck_s, 2),
                   "time_ratio": round(ck_s / plain_s, 2), "plain_peak_mib": round(plain_mib),
                   "checkpointed_peak_mib": round(ck_mib), "memory_ratio": round(ck_mib / plain_mib, 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                          "date": time.strftime("%Y-%m-%d %H:%M"), "threads": args.threads,
                                          "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
