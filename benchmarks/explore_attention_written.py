"""ViT-S/16 in bfloat16, compiled as ``torch-bf16-compile`` compiles it, with attention written out (q k^T, a
softmax of max / exp / sum, P V) so that inductor fuses the softmax itself, against the same model calling SDPA
(issue 13's ViT-S/16 target, measured, not adopted).

Inductor rewrites ``softmax(q k^T) v`` back into SDPA; the softmax written as max / exp / sum escapes that pattern.
Each round times both compiled models back to back (two forwards each) and prints the per-round throughputs and the
median ratio (written / SDPA).

    .venv/bin/python benchmarks/explore_attention_written.py --rounds 8
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import vitlab
from vitlab.layers import attention


def written(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    a = (q * self.scale) @ k.transpose(-2, -1)
    a = a - a.amax(-1, keepdim=True)
    e = a.exp()
    return (e / e.sum(-1, keepdim=True)) @ v


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bf16 = vitlab.create_model("vit_small_patch16_224").eval().to(torch.bfloat16)
    x = torch.randn(args.batch, 3, 224, 224).to(torch.bfloat16)
    from torch._inductor import config

    def compiled(module: torch.nn.Module) -> torch.nn.Module:
        with config.patch(freezing=True), torch.no_grad():
            fn = torch.compile(module)
            fn(x)
        return fn

    sdpa = compiled(copy.deepcopy(bf16))
    original = attention.Attention._attend
    attention.Attention._attend = written
    try:
        out = compiled(copy.deepcopy(bf16))
    finally:
        attention.Attention._attend = original
    ratios = []
    for r in range(args.rounds):
        with torch.no_grad():
            t0 = time.perf_counter()
            sdpa(x), sdpa(x)
            t1 = time.perf_counter()
            out(x), out(x)
            t2 = time.perf_counter()
        ratios.append((t1 - t0) / (t2 - t1))
        print(f"round {r}: SDPA {2 * args.batch / (t1 - t0):.1f} img/s, written out {2 * args.batch / (t2 - t1):.1f} "
              f"img/s, ratio {ratios[-1]:.3f}", flush=True)
    print(f"median ratio (written out / SDPA): {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
