"""Inference speed of DETR-R50 (vitlab vs Hugging Face ``DetrForObjectDetection``, the same random weights
loaded through vitlab's converter) and of SETR-naive (ViT-L/16 and a small ViT), in interleaved rounds.

    /tmp/peers/bin/python benchmarks/bench_detr.py --rounds 5 [--size 800] [--threads 2]

Both DETRs use a ResNet-50 from a config (no download). Reports median seconds per image and the
median of per-round vitlab/HF ratios (< 1: vitlab is faster).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch

import vitlab


def timed(fn, x) -> float:
    t = time.perf_counter()
    with torch.inference_mode():
        fn(x)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--size", type=int, default=800)
    ap.add_argument("--setr-size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig

    cfg = DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False,
                     backbone_config=ResNetConfig(out_features=["stage4"]), num_labels=91)
    hf = DetrForObjectDetection(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = vitlab.load_model(d).eval()
    x = torch.randn(1, 3, args.size, args.size)
    with torch.inference_mode():
        diff = (ours(x)["logits"] - hf(pixel_values=x).logits).abs().max().item()
    setr = {n: vitlab.create_model(n, img_size=args.setr_size).eval()
            for n in ("setr_naive_vit_small_patch16", "setr_naive_vit_large_patch16")}
    xs = torch.randn(1, 3, args.setr_size, args.setr_size)
    runs = {"vitlab detr": lambda: timed(ours, x), "hf detr": lambda: timed(lambda v: hf(pixel_values=v), x),
            **{n: (lambda m=m: timed(m, xs)) for n, m in setr.items()}}
    for fn in runs.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in runs}
    ratios = []
    names = list(runs)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            times[k].append(runs[k]())
        ratios.append(times["vitlab detr"][-1] / times["hf detr"][-1])
    print(f"threads {args.threads}, DETR {args.size}x{args.size}, SETR {args.setr_size}x{args.setr_size}, "
          f"{args.rounds} rounds; max |logit diff| vitlab vs HF = {diff:.2e}")
    for k, v in times.items():
        print(f"{k:32s} {statistics.median(v):8.3f} s/image (spread {(max(v) - min(v)) / statistics.median(v):.2f})")
    print(f"vitlab/HF DETR ratio (median of rounds): {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
