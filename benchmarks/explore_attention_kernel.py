"""A hand-written AMX attention kernel for ViT's short sequences: how much of the gap it closes, measured.

Issue 13's last unmet target is ViT-S/16 at batch 16 against timm's bfloat16-weights eager path (1.19-1.22x,
1.3x asked). Attention (PyTorch's CPU flash-attention kernel) holds about a third of ``torch-bf16-compile``'s
time for 8% of the FLOPs. PyTorch 2.13 runs that kernel's matmuls through AMX-packed brgemm only for float16; for
bfloat16 it calls ``cpublas::gemm`` per 64-query block. ``probes/attention_bf16_amx.cpp`` is an attention
forward written for this case (one key block, K and V packed once per head for AMX, brgemm, a masked AVX-512
softmax, the output written in the layout the projection reads). This script builds it (g++ through
``torch.utils.cpp_extension``; nothing of it is in vitlab) and measures:

1. accuracy: largest and mean difference from a float32 reference, against SDPA's in bfloat16;
2. attention alone (B 16, 6 heads, 197 tokens, 64 dims), interleaved rounds: SDPA as ViT calls it (with the
   transpose-and-reshape after it) against the kernel's variants, and the kernel's stage costs;
3. the whole ViT-S/16 with the kernel in place of SDPA (a ``torch.library`` custom op, so inductor keeps it):
   eager bfloat16 weights and ``torch-bf16-compile``, each against itself with SDPA, batch 16 and 1.

    /work/main/.venv/bin/python benchmarks/explore_attention_kernel.py --rounds 12

Needs an x86 CPU with AMX-BF16 and AVX-512 (the extension is built with -march=native). Results go to
benchmarks/results/attention_kernel.json; numbers and conclusions in RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.cpp_extension import load

import vitlab
from vitlab.allocator import keep_freed_memory
from vitlab.benchmark import machine_info, paired_ratio, run_interleaved
from vitlab.export.runtimes import Compiled
from vitlab.layers.attention import Attention

SOURCE = REPO / "benchmarks" / "probes" / "attention_bf16_amx.cpp"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"]
KERNEL = {"fast_exp": True, "trim": True, "q_split": 64, "k_align": 32}  # the variant the model runs (set in main)
ext = None


def build(build_dir: Path):
    build_dir.mkdir(parents=True, exist_ok=True)
    return load(
        name="vitlab_probe_attention",
        sources=[str(SOURCE)],
        extra_cflags=FLAGS,
        extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir),
    )


@torch.library.custom_op("vitlab_probe::amx_attention", mutates_args=())
def amx_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """(B, H, N, D) bfloat16 in; (B, N, H, D) out, the layout the output projection reads."""
    return ext.attention(
        q, k, v, scale, 0, KERNEL["fast_exp"], KERNEL["trim"], KERNEL["q_split"], KERNEL["k_align"]
    ).transpose(1, 2)


@amx_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    b, h, n, d = q.shape
    return q.new_empty(b, n, h, d)


def kernel_attend(self: Attention, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None) -> Tensor:
    return amx_attention(q, k, v, float(self.scale)).transpose(1, 2)


def accuracy() -> dict:
    torch.manual_seed(0)
    b, h, n, d = 16, 6, 197, 64
    out = {}
    for spread in (1.0, 4.0):  # typical logits, and peaked ones (large q k^T)
        qkv = (torch.randn(b, n, 3, h, d) * spread).bfloat16()
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())

        def err(got: Tensor, ref: Tensor = ref) -> dict:
            diff = (got.float() - ref).abs()
            return {"max": diff.max().item(), "mean": diff.mean().item()}

        row = {"sdpa_bf16": err(F.scaled_dot_product_attention(q, k, v))}
        for fast in (False, True):
            row[f"kernel_fast_exp={fast}"] = err(ext.attention(q, k, v, d**-0.5, 0, fast, True, 64, 32))
        out[f"q,k,v std {spread:g}"] = row
    return out


def attention_alone(rounds: int) -> dict:
    b, h, n, d = 16, 6, 197, 64
    qkv = torch.randn(b, n, 3, h, d).bfloat16()
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    s = d**-0.5

    def kernel(stop: int, fast: bool, trim: bool, q_split: int = 64, k_align: int = 32):
        return lambda: (
            ext.attention(q, k, v, s, stop, fast, trim, q_split, k_align).transpose(1, 2).reshape(b, n, h * d)
        )

    steps = {
        "sdpa (+ transpose, reshape)": lambda: (
            F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        ),
        "kernel exp_u20": kernel(0, False, False),
        "kernel exp_u20, trimmed": kernel(0, False, True),
        "kernel poly4 exp, trimmed": kernel(0, True, True),
        "kernel poly4 exp, trimmed, 32-query blocks": kernel(0, True, True, 32),
        "kernel poly4 exp, trimmed, 128-query blocks": kernel(0, True, True, 128),
        "kernel poly4 exp, trimmed, all queries in one block": kernel(0, True, True, 1024),
        "kernel poly4 exp, trimmed, keys padded to even for P V": kernel(0, True, True, 64, 2),
        "kernel poly4 exp, trimmed, keys padded to 16 for P V": kernel(0, True, True, 64, 16),
        "stage: pack K, V": kernel(1, True, True),
        "stage: + q k^T": kernel(2, True, True),
        "stage: + softmax": kernel(3, True, True),
        "stage: + P V": kernel(4, True, True),
    }
    stats = run_interleaved(steps, repeats=rounds, min_repeat_s=0.2)
    base = stats["sdpa (+ transpose, reshape)"]
    return {
        name: {"ms": st.median * 1e3, "time_vs_sdpa": 1 / paired_ratio(st, base).median} for name, st in stats.items()
    }


def whole_model(rounds: int, batch: int) -> dict:
    torch.manual_seed(0)
    model = vitlab.create_model("vit_small_patch16_224").eval()
    torch.nn.init.normal_(model.head.weight, std=0.02)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    with_kernel = copy.deepcopy(bf16)
    for m in with_kernel.modules():
        if isinstance(m, Attention):
            m._attend = partial(kernel_attend, m)
    x = torch.randn(batch, 3, 224, 224)
    xb = x.bfloat16()
    contenders = {
        "bf16 weights, SDPA": bf16,
        "bf16 weights, kernel": with_kernel,
        "bf16 compiled, SDPA": Compiled(bf16, freeze=True),
        "bf16 compiled, kernel": Compiled(with_kernel, freeze=True),
    }
    steps = {name: partial(m, xb) for name, m in contenders.items()}
    with torch.no_grad():
        ref = model(x)
        agree = {
            name: {"max_logit_diff_vs_float32": (m(xb).float() - ref).abs().max().item()}
            for name, m in contenders.items()
        }
        stats = run_interleaved(steps, repeats=rounds, warmup=3)
    pairs = {"bf16 weights, kernel": "bf16 weights, SDPA", "bf16 compiled, kernel": "bf16 compiled, SDPA"}
    out = {}
    for name, st in stats.items():
        out[name] = agree[name] | {"images_per_s": batch / st.median}
        if name in pairs:
            out[name]["speed_vs_sdpa"] = paired_ratio(st, stats[pairs[name]]).to_dict()
    return out


def main() -> None:
    global ext
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-model", action="store_true", help="attention alone (no ViT-S runs)")
    p.add_argument("--build-dir", default="/tmp/vitlab_probe_attention")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "attention_kernel.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    keep_freed_memory()
    ext = build(Path(a.build_dir))
    result = {"machine": machine_info(), "accuracy": accuracy(), "attention_alone": attention_alone(a.rounds)}
    if a.skip_model:
        print(json.dumps(result, indent=2))
        return
    result["vit_s16"] = {f"batch {bs}": whole_model(a.rounds, bs) for bs in (16, 1)}
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
