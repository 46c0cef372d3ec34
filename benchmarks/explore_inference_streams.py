"""Inference in streams on a CPU: one batch split over Python threads with one intra-op thread each, against the
same batch on all threads of one OpenMP team (issue 13's ViT-S/16 target, measured, not adopted).

Each round times both arms back to back (two forwards each) on vitlab's ViT-S/16 in bfloat16 (weights and
activations), eager or compiled as ``torch-bf16-compile`` compiles it (inductor, freezing); the streams arm runs
each half of the batch in its own thread, on a graph compiled in such a thread (so with one thread). Prints the
per-round throughputs and the median ratio, and checks that both arms give the same logits.

    .venv/bin/python benchmarks/explore_inference_streams.py --mode compile --rounds 8
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import torch

import vitlab


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["eager", "compile"], default="compile")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2, help="the one team's threads, and the number of streams")
    args = p.parse_args()
    torch.manual_seed(0)
    model = vitlab.create_model("vit_small_patch16_224").eval()
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    x = torch.randn(args.batch, 3, 224, 224).to(torch.bfloat16)
    torch.set_num_threads(args.threads)
    pool = ThreadPoolExecutor(args.threads, initializer=lambda: torch.set_num_threads(1))

    def compiled(module: torch.nn.Module, sample: torch.Tensor) -> torch.nn.Module:
        from torch._inductor import config

        with config.patch(freezing=True), torch.no_grad():
            fn = torch.compile(module)
            fn(sample)
        return fn

    team = compiled(bf16, x) if args.mode == "compile" else bf16
    chunks = x.chunk(args.threads)
    stream = pool.submit(compiled, copy.deepcopy(bf16), chunks[0]).result() if args.mode == "compile" else bf16

    def one(chunk: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return stream(chunk)

    def run_team() -> torch.Tensor:
        with torch.no_grad():
            return team(x)

    def run_streams() -> torch.Tensor:
        return torch.cat([f.result() for f in [pool.submit(one, c) for c in chunks]])

    diff = (run_team().float() - run_streams().float()).abs().max().item()
    print(f"largest logit difference between the arms: {diff:.3g}")
    ratios = []
    for r in range(args.rounds):
        t0 = time.perf_counter()
        run_team(), run_team()
        t_team = (time.perf_counter() - t0) / 2
        t0 = time.perf_counter()
        run_streams(), run_streams()
        t_streams = (time.perf_counter() - t0) / 2
        ratios.append(t_team / t_streams)
        print(f"round {r}: one team of {args.threads} {args.batch / t_team:.1f} img/s, {args.threads} streams "
              f"{args.batch / t_streams:.1f} img/s, ratio {t_team / t_streams:.2f}", flush=True)
    print(f"median ratio (streams / team): {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
