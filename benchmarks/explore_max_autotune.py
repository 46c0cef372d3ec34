"""Inductor's max-autotune against the default compile for ViT-S/16 in bfloat16 (issue 13): does autotuning the
GEMMs (oneDNN against inductor's own C++ GEMM template) find anything past ``torch-bf16-compile``?

    /work/main/.venv/bin/python benchmarks/explore_max_autotune.py --batch 16 --rounds 10

Both arms compile the bfloat16 copy with freezing; printed: compile time, largest logit difference from float32,
and the autotuned arm's speed relative to the default, round by round. Numbers in RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch
from torch._inductor import config as inductor_config

import vitlab
from vitlab.allocator import keep_freed_memory
from vitlab.benchmark import paired_ratio, run_interleaved

AUTOTUNE = {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    keep_freed_memory()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = vitlab.create_model("vit_small_patch16_224").eval()
    torch.nn.init.normal_(model.head.weight, std=0.02)  # a zero head would make every logit equal
    bf16 = copy.deepcopy(model).to(torch.bfloat16).eval()
    x = torch.randn(a.batch, 3, 224, 224)
    arms = {"default": {"freezing": True}, "max-autotune": {"freezing": True, **AUTOTUNE}}
    compiled = {}
    with torch.no_grad():
        ref = model(x)
        for name, options in arms.items():
            c = torch.compile(copy.deepcopy(bf16))
            t0 = time.perf_counter()
            with inductor_config.patch(**options):
                out = c(x.bfloat16())
            print(f"{name}: compile {time.perf_counter() - t0:.1f} s, largest logit difference from float32 "
                  f"{(out.float() - ref).abs().max().item():.5f}")
            compiled[name] = c

    def step(name: str):
        def f() -> None:
            with torch.no_grad(), inductor_config.patch(**arms[name]):
                compiled[name](x.bfloat16())
        return f

    stats = run_interleaved({name: step(name) for name in arms}, repeats=a.rounds, min_repeat_s=0.3)
    r = paired_ratio(stats["max-autotune"], stats["default"])
    print(f"max-autotune / default throughput: median {r.median:.3f}, per round "
          f"{', '.join(f'{v:.3f}' for v in r.ratios)}")
    print(", ".join(f"{name} {a.batch / s.median:.1f} img/s" for name, s in stats.items()))


if __name__ == "__main__":
    main()
