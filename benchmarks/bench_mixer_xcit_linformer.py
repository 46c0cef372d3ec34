"""Inference throughput of vitlab's XCiT and MLP-Mixer against timm, and how XCiT's and Linformer's cost
grows with resolution against a plain ViT, each measured interleaved in one process.

Run with the peer venv (timm); vitlab is imported from this checkout's src/:

    /tmp/peers/bin/python benchmarks/bench_mixer_xcit_linformer.py               # both parts, ~10 min
    /tmp/peers/bin/python benchmarks/bench_mixer_xcit_linformer.py --parts timm  # only the timm comparison

Part "timm": xcit_tiny_12_p16_224 and mixer_b16_224, float32 and bfloat16 (CPU autocast), inference,
vitlab and timm alternating in rounds (rotated), median of per-round throughput ratios.
Part "resolution": ViT-Ti/16 (softmax attention), the same ViT with Linformer attention (k = --linformer-k,
sharing "headwise") and XCiT-T12/16 at 224, 448 and 672 px (196, 784, 1764 patches), float32, batch 1, the
three models interleaved at each resolution; throughput relative to 224 px and counted GMACs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch

import vitlab
from vitlab.benchmark import machine_info, make_infer_step, paired_ratio, run_interleaved

log = logging.getLogger("bench_mixer_xcit_linformer")
TIMM_MODELS = ("xcit_tiny_12_p16_224", "mixer_b16_224")
RESOLUTIONS = (224, 448, 672)


def part_timm(args: argparse.Namespace) -> list[dict[str, Any]]:
    import timm

    rows = []
    for name in args.models:
        for dtype in ("float32", "bfloat16"):
            torch.manual_seed(0)
            images = torch.randn(args.batch_size, 3, 224, 224)
            steps = {"vitlab": make_infer_step(vitlab.create_model(name), images, dtype=dtype),
                     "timm": make_infer_step(timm.create_model(name), images, dtype=dtype)}
            stats = run_interleaved(steps, warmup=1, repeats=args.repeats, min_repeat_s=args.min_repeat_s)
            r = paired_ratio(stats["vitlab"], stats["timm"])
            row = {"model": name, "dtype": dtype, "batch_size": args.batch_size,
                   "vitlab_img_s": args.batch_size / stats["vitlab"].median,
                   "timm_img_s": args.batch_size / stats["timm"].median,
                   "ratio": r.to_dict(), "ratio_cpu": paired_ratio(stats["vitlab"], stats["timm"], cpu=True).to_dict(),
                   "spread": max(stats[k].spread for k in stats)}
            log.info("%s %s: vitlab %.1f img/s, timm %.1f img/s, ratio %.2f (%.2f-%.2f)", name, dtype,
                     row["vitlab_img_s"], row["timm_img_s"], r.median, min(r.ratios), max(r.ratios))
            rows.append(row)
    return rows


def resolution_models(res: int, k: int) -> dict[str, tuple[str, dict[str, Any]]]:
    return {
        "ViT-Ti/16": ("vit_tiny_patch16_224", {"img_size": res}),
        f"ViT-Ti/16 Linformer k={k}": ("vit_tiny_patch16_224", {"img_size": res, "attn_type": "linformer",
                                                               "linformer_k": k}),
        "XCiT-T12/16": ("xcit_tiny_12_p16_224", {"img_size": res}),
    }


def part_resolution(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for res in RESOLUTIONS:
        images = torch.randn(1, 3, res, res)
        steps, gmacs = {}, {}
        for label, (name, over) in resolution_models(res, args.linformer_k).items():
            torch.manual_seed(0)
            steps[label] = make_infer_step(vitlab.create_model(name, **over), images, dtype="float32")
            gmacs[label] = vitlab.model_info(name, **over)["gmacs"]
        stats = run_interleaved(steps, warmup=1, repeats=args.repeats, min_repeat_s=args.min_repeat_s)
        for label in steps:
            rows.append({"model": label, "img_size": res, "patches": (res // 16) ** 2,
                         "img_s": 1 / stats[label].median, "gmacs": gmacs[label], "spread": stats[label].spread})
            log.info("%s at %d: %.2f img/s (%.2f GMACs)", label, res, rows[-1]["img_s"], gmacs[label])
    return rows


def markdown(report: dict[str, Any]) -> str:
    out = []
    if report.get("timm"):
        out += ["| model | dtype | vitlab img/s | timm img/s | vitlab/timm (per-round min-max) | CPU-time ratio | spread |",
                "|---|---|---|---|---|---|---|"]
        for r in report["timm"]:
            q = r["ratio"]
            out.append(f"| {r['model']} | {r['dtype']} | {r['vitlab_img_s']:.1f} | {r['timm_img_s']:.1f} | "
                       f"{q['median']:.2f} ({q['min']:.2f}-{q['max']:.2f}) | {r['ratio_cpu']['median']:.2f} | "
                       f"{100 * r['spread']:.0f}% |")
        out.append("")
    if report.get("resolution"):
        base = {r["model"]: r for r in report["resolution"] if r["img_size"] == RESOLUTIONS[0]}
        out += ["| model | px | patches | GMACs | GMACs / 224's | img/s | time / 224's | spread |",
                "|---|---|---|---|---|---|---|---|"]
        for r in report["resolution"]:
            b = base[r["model"]]
            out.append(f"| {r['model']} | {r['img_size']} | {r['patches']} | {r['gmacs']:.2f} | "
                       f"{r['gmacs'] / b['gmacs']:.1f}x | {r['img_s']:.2f} | {b['img_s'] / r['img_s']:.1f}x | "
                       f"{100 * r['spread']:.0f}% |")
    return "\n".join(out) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=("timm", "resolution"), default=["timm", "resolution"])
    p.add_argument("--models", nargs="+", choices=TIMM_MODELS, default=list(TIMM_MODELS),
                   help="models of the timm comparison")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--min-repeat-s", type=float, default=0.3)
    p.add_argument("--linformer-k", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_mixer_xcit_linformer")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    import timm

    start = time.time()
    report: dict[str, Any] = {"machine": machine_info(), "versions": {"torch": torch.__version__,
                                                                      "timm": timm.__version__},
                              "command": " ".join([Path(sys.executable).as_posix(), *sys.argv]),
                              "settings": {k: str(v) for k, v in vars(args).items()}}
    if "timm" in args.parts:
        report["timm"] = part_timm(args)
    if "resolution" in args.parts:
        report["resolution"] = part_resolution(args)
    report["wall_s"] = time.time() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
