"""Training-step throughput (forward + backward) of vitlab's CCT against vit-pytorch's, in one interleaved run.

Both random-init, in training mode with the paper's regularisation (attention dropout 0.1, stochastic depth
0.1) unless a contender says otherwise, one process, one thread; contenders are timed in rotating rounds
(``vitlab.benchmark.run_interleaved``) so that all see the same machine load, and ratios are medians of
per-round ratios. A step is forward, cross-entropy, backward (no optimiser update: the same for both).

Contenders per group:
  vitlab              the registered model as built (channels-last tokenizer; attention dropout through the
                      explicit product on the CPU)
  vitlab_nchw         channels_last=False
  vitlab_no_attn_drop attn_drop_rate=0 (SDPA's fused kernel)
  vit_pytorch         vit_pytorch.cct.CCT with the same settings
  vit_pytorch_no_attn_drop

vit-pytorch is not in the peer environment; install it beside it (pure Python) and run:

    /tmp/peers/bin/python -m pip install --no-deps --target /tmp/vitpt_cct vit-pytorch==1.26.11
    PYTHONPATH=/tmp/vitpt_cct OMP_NUM_THREADS=1 /tmp/peers/bin/python benchmarks/bench_cct.py \
        --out benchmarks/results/bench_cct
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch
import torch.nn.functional as F
from torch import nn

import vitlab
from vitlab.benchmark import machine_info, paired_ratio, run_interleaved

log = logging.getLogger("bench_cct")
# group -> (registered name, overrides): the paper's CCT-7/3x1, and the small one an automatic recipe builds
GROUPS: dict[str, tuple[str, dict[str, Any]]] = {
    "cct_7_3x1_32": ("cct_7_3x1_32", {}),
    "cct_w128_d4_3x2_32": ("cct_4_3x2_32", {"embed_dim": 128, "depth": 4, "num_heads": 2, "mlp_ratio": 2.0}),
}


def vitlab_model(name: str, over: dict[str, Any], **extra: Any) -> nn.Module:
    return vitlab.create_model(name, **over, **extra)


def peer_model(name: str, over: dict[str, Any], *, attn_drop: float) -> nn.Module:
    from vit_pytorch.cct import CCT

    cfg = dataclasses.replace(vitlab.get_entry(name).config, **over)
    return CCT(img_size=cfg.img_size, embedding_dim=cfg.embed_dim, n_input_channels=cfg.in_chans,
               n_conv_layers=cfg.num_conv_layers, kernel_size=cfg.kernel_size, stride=cfg.conv_stride,
               padding=cfg.conv_padding, num_layers=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
               num_classes=cfg.num_classes, positional_embedding="learnable", dropout_rate=0.0,
               attention_dropout=attn_drop, stochastic_depth_rate=0.1)


def fwd_bwd_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    model.train()

    def step() -> None:
        F.cross_entropy(model(x), y).backward()
        for p in model.parameters():
            p.grad = None

    return step


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", nargs="+", choices=list(GROUPS), default=list(GROUPS))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {"machine": machine_info(), "threads": args.threads, "batch_size": args.batch_size,
                              "torch": torch.__version__, "groups": {}}
    lines = [f"CCT forward+backward, batch {args.batch_size}, {args.threads} thread(s), torch {torch.__version__}", "",
             "| model | contender | img/s | vs vit_pytorch (same dropout) | spread |", "|---|---|---|---|---|"]
    for group in args.groups:
        name, over = GROUPS[group]
        torch.manual_seed(0)
        models = {
            "vitlab": vitlab_model(name, over),
            "vitlab_nchw": vitlab_model(name, over, channels_last=False),
            "vitlab_no_attn_drop": vitlab_model(name, over, attn_drop_rate=0.0),
            "vit_pytorch": peer_model(name, over, attn_drop=0.1),
            "vit_pytorch_no_attn_drop": peer_model(name, over, attn_drop=0.0),
        }
        c, h, w = models["vitlab"].preprocessing.input_size
        g = torch.Generator().manual_seed(0)
        x = torch.randn(args.batch_size, c, h, w, generator=g)
        y = torch.randint(0, models["vitlab"].num_classes, (args.batch_size,), generator=g)
        stats = run_interleaved({k: fwd_bwd_step(m, x, y) for k, m in models.items()}, warmup=1,
                                repeats=args.repeats, min_repeat_s=0.0)
        rows = {}
        for k, s in stats.items():
            peer = "vit_pytorch_no_attn_drop" if k.endswith("no_attn_drop") else "vit_pytorch"
            ratio = paired_ratio(s, stats[peer]).median
            rows[k] = {"img_per_s": args.batch_size / s.median, "ratio_vs_vit_pytorch": ratio, **s.to_dict()}
            lines.append(f"| {group} | {k} | {args.batch_size / s.median:.1f} | {ratio:.2f} | {s.spread:.2f} |")
            log.info("%s %s: %.1f img/s, %.2fx vit-pytorch", group, k, args.batch_size / s.median, ratio)
        report["groups"][group] = rows
    print("\n".join(lines))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
        args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
