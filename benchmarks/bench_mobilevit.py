"""Inference throughput of vitlab's MobileViT v1/v2/v3 against timm and Hugging Face, in one interleaved run.

For each model and setting (float32, bfloat16 autocast, float32 channels-last, each at the batch size given
and at batch 1 for latency) the implementations are timed in rotating rounds (``vitlab.benchmark.
run_interleaved``), so that all see the same machine load; ratios are medians of per-round ratios.
MobileViTv3 has no peer implementation: its row compares vitlab's v3-S with vitlab's v1-S (same stem and
stages, wider) for scale.

    /tmp/peers/bin/python benchmarks/bench_mobilevit.py --threads 1 --out benchmarks/results/bench_mobilevit
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch
from torch import Tensor, nn

import vitlab
from vitlab.benchmark import machine_info, make_infer_step, num_threads, paired_ratio, run_interleaved

log = logging.getLogger("bench_mobilevit")
MODELS = ("mobilevit_s", "mobilevitv2_100", "mobilevitv3_s")
SETTINGS = ("float32", "bfloat16", "channels_last")


class LogitsOnly(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(pixel_values=x).logits


def build(impl: str, name: str) -> nn.Module | None:
    if impl == "vitlab":
        return vitlab.create_model(name)
    if impl == "vitlab_v1_s":
        return vitlab.create_model("mobilevit_s")
    if impl == "timm":
        import timm

        return timm.create_model(name) if not name.startswith("mobilevitv3") else None
    if impl == "hf":
        from transformers import (
            MobileViTConfig,
            MobileViTForImageClassification,
            MobileViTV2Config,
            MobileViTV2ForImageClassification,
        )

        if name == "mobilevit_s":
            cfg = MobileViTConfig(hidden_sizes=[144, 192, 240], neck_hidden_sizes=[16, 32, 64, 96, 128, 160, 640],
                                  num_labels=1000, image_size=256)
            return LogitsOnly(MobileViTForImageClassification(cfg))
        if name == "mobilevitv2_100":
            return LogitsOnly(MobileViTV2ForImageClassification(MobileViTV2Config(num_labels=1000, image_size=256)))
    return None


def run(names: list[str], *, batch: int, repeats: int, min_repeat_s: float) -> list[dict]:
    rows = []
    for name in names:
        impls = ["vitlab", "timm", "hf"] if not name.startswith("mobilevitv3") else ["vitlab", "vitlab_v1_s"]
        models = {i: m for i in impls if (m := build(i, name)) is not None}
        for m in models.values():
            m.eval()
        for setting in SETTINGS:
            for b in (batch, 1):
                x = torch.rand(b, 3, 256, 256)
                dtype = "bfloat16" if setting == "bfloat16" else "float32"
                if setting == "channels_last":
                    x = x.contiguous(memory_format=torch.channels_last)
                    for m in models.values():
                        m.to(memory_format=torch.channels_last)
                steps = {i: make_infer_step(m, x, dtype=dtype) for i, m in models.items()}
                stats = run_interleaved(steps, warmup=1, repeats=repeats, min_repeat_s=min_repeat_s)
                row = {"model": name, "setting": setting, "batch": b,
                       "images_per_s": {i: b / s.median for i, s in stats.items()},
                       "spread": max(s.spread for s in stats.values())}
                for peer in impls[1:]:
                    if peer in stats:
                        r = paired_ratio(stats["vitlab"], stats[peer])
                        row[f"vitlab/{peer}"] = r.to_dict()
                rows.append(row)
                log.info("%s", json.dumps({k: v for k, v in row.items() if k != "spread"}, default=str))
                if setting == "channels_last":
                    for m in models.values():
                        m.to(memory_format=torch.contiguous_format)
    return rows


def to_markdown(rows: list[dict]) -> str:
    lines = ["| model | setting | batch | vitlab img/s | peer img/s | vitlab/peer (median, min-max) | spread |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ips = r["images_per_s"]
        for key in [k for k in r if k.startswith("vitlab/")]:
            peer = key.split("/", 1)[1]
            ratio = r[key]
            lines.append(f"| {r['model']} | {r['setting']} | {r['batch']} | {ips['vitlab']:.1f} | {peer} "
                         f"{ips[peer]:.1f} | {ratio['median']:.2f} ({ratio['min']:.2f}-{ratio['max']:.2f}) | "
                         f"{r['spread']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--min-repeat-s", type=float, default=0.3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    with num_threads(args.threads):
        rows = run(args.models, batch=args.batch, repeats=args.repeats, min_repeat_s=args.min_repeat_s)
    md = to_markdown(rows)
    print(md)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps({"machine": machine_info(), "args": vars(args) | {
            "out": str(args.out)}, "rows": rows}, indent=1, default=str))
        args.out.with_suffix(".md").write_text(md + "\n")


if __name__ == "__main__":
    main()
