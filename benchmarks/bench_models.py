"""Throughput of vitlab's ViTs against timm and Hugging Face transformers, in one interleaved run.

For each (model, dtype, mode) the three implementations and a reference matmul are timed in rounds
(vitlab, timm, HF, matmul, then rotated), so that all of them see the same machine load; the
reported numbers are medians over rounds, the vitlab/peer ratios are medians of per-round ratios,
and the spread ((max - min) / median over rounds) is reported as the noise.

Run with the peer venv (timm, transformers); vitlab is imported from this checkout's src/:

    /tmp/peers/bin/python benchmarks/bench_models.py                      # ViT-Ti and ViT-S, < 10 min
    /tmp/peers/bin/python benchmarks/bench_models.py --models vit_base_patch16_224 --dtypes float32 \
        --modes train --repeats 7
    /tmp/peers/bin/python benchmarks/bench_models.py --models swin_tiny_patch4_window7_224 \
        swin_small_patch4_window7_224 --batch-size 8 --out benchmarks/results/bench_swin

Swin (v1 and v2) names are built in timm by the same name and in HF as Swin(v2)ForImageClassification with
the matching config (BEiT names: BeitForImageClassification; BEiT-3 and the other families: --impls vitlab timm); drop path is 0 in all three (timm's and HF's defaults are 0.1), so training steps
compare the same work.

Achieved GFLOP/s = vitlab's counted forward FLOPs per image (``vitlab.model_info`` GMACs x 2) x images/s,
x 3 for a training step; "of matmul" divides that by the GFLOP/s of an n x n matmul in the same dtype,
timed in the same rounds: an MFU-like fraction of what this CPU practically reaches.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch
from torch import Tensor, nn

import vitlab
from vitlab.allocator import keep_freed_memory
from vitlab.benchmark import (
    DTYPES,
    MODES,
    TimingStats,
    machine_info,
    make_infer_step,
    make_train_step,
    matmul_step,
    paired_ratio,
    run_interleaved,
    step_flops,
)

log = logging.getLogger("bench_models")
IMPLS = ("vitlab", "timm", "hf")
# ViT-B is left out of the default run to keep it under 10 minutes on 2 cores; add it with --models.
DEFAULT_MODELS = ("vit_tiny_patch16_224", "vit_small_patch16_224")
ALL_MODELS = ("vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224")


class LogitsOnly(nn.Module):
    """Hugging Face models return an output object; the timed steps want the logits tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(pixel_values=x).logits


def build(impl: str, name: str) -> nn.Module:
    """The same architecture from each library, randomly initialised, 1000 classes."""
    if impl == "vitlab":
        return vitlab.create_model(name)
    family = vitlab.get_entry(name).family
    if impl == "timm":
        import timm

        if family in ("swin", "swinv2"):
            return timm.create_model(name, pretrained=False, drop_path_rate=0.0)
        return timm.create_model(name, pretrained=False)
    if impl == "hf" and family in ("swin", "swinv2"):
        return LogitsOnly(_hf_swin(name))
    if impl == "hf" and family == "beit":
        return LogitsOnly(_hf_beit(name))
    if impl == "hf" and family != "vit":
        raise ValueError(f"{name}: no Hugging Face counterpart is built for the {family} family; pass --impls vitlab timm")
    if impl == "hf":
        from transformers import ViTConfig, ViTForImageClassification

        cfg = vitlab.get_entry(name).config
        hf_cfg = ViTConfig(hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
                           intermediate_size=int(cfg.embed_dim * cfg.mlp_ratio), image_size=cfg.img_size,
                           patch_size=cfg.patch_size, num_labels=cfg.num_classes, layer_norm_eps=cfg.norm_eps,
                           qkv_bias=cfg.qkv_bias, attn_implementation="sdpa")
        return LogitsOnly(ViTForImageClassification(hf_cfg))
    raise ValueError(f"unknown implementation {impl!r}")


def _hf_swin(name: str) -> nn.Module:
    from transformers import SwinConfig, SwinForImageClassification, Swinv2Config, Swinv2ForImageClassification

    cfg = vitlab.get_entry(name).config
    common = dict(image_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
                  depths=list(cfg.depths), num_heads=list(cfg.num_heads), window_size=cfg.windows()[0],
                  mlp_ratio=cfg.mlp_ratio, num_labels=cfg.num_classes, layer_norm_eps=cfg.norm_eps,
                  drop_path_rate=0.0, attn_implementation="sdpa")
    if cfg.version == 2:
        pretrained = list(cfg.pretrained_window_sizes or (0,) * len(cfg.depths))
        return Swinv2ForImageClassification(Swinv2Config(pretrained_window_sizes=pretrained, **common))
    return SwinForImageClassification(SwinConfig(**common))


def _hf_beit(name: str) -> nn.Module:
    from transformers import BeitConfig, BeitForImageClassification

    cfg = vitlab.get_entry(name).config
    return BeitForImageClassification(BeitConfig(
        hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
        intermediate_size=int(cfg.embed_dim * cfg.mlp_ratio), image_size=cfg.img_size, patch_size=cfg.patch_size,
        num_labels=cfg.num_classes, layer_norm_eps=cfg.norm_eps, use_relative_position_bias=cfg.use_rel_pos_bias,
        use_absolute_position_embeddings=cfg.use_abs_pos_emb, layer_scale_init_value=cfg.init_values or 0.0,
        use_mean_pooling=cfg.global_pool == "avg", drop_path_rate=0.0, attn_implementation="sdpa"))


def bench_group(name: str, dtype: str, mode: str, impls: list[str], args: argparse.Namespace) -> dict[str, Any]:
    info = vitlab.model_info(name)
    c, h, w = info["preprocessing"]["input_size"]
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, c, h, w, generator=g)
    targets = torch.randint(0, max(info["num_classes"], 1), (args.batch_size,), generator=g)  # headless: unused
    params = {}
    mm, mm_flops = matmul_step(args.matmul_size, dtype=dtype)
    load_before = _loadavg()
    t0 = time.perf_counter()
    # The model built first can run a few percent faster or slower than the one built after it (measured: ViT-S
    # 0.93x timm built first, 1.02x built second), so with --build-orders both every round is timed once with the
    # implementations built in the given order and once with fresh models built in the reverse order.
    orders = [impls] if args.build_orders == "given" else [impls, impls[::-1]]
    parts = []
    for order in orders:
        steps = {}
        for impl in order:
            torch.manual_seed(0)
            model = build(impl, name)
            params[impl] = sum(p.numel() for p in model.parameters())
            steps[impl] = (make_infer_step(model, images, dtype=dtype) if mode == "infer"
                           else make_train_step(model, images, targets, dtype=dtype))
        steps["matmul"] = mm
        parts.append(run_interleaved(steps, warmup=args.warmup, repeats=args.repeats,
                                     min_repeat_s=args.min_repeat_s))
        del steps, model
        gc.collect()
    stats = {k: TimingStats(times_s=sum((p[k].times_s for p in parts), ()),
                            calls_per_repeat=parts[0][k].calls_per_repeat,
                            cpu_times_s=sum((p[k].cpu_times_s for p in parts), ())) for k in parts[0]}
    wall = time.perf_counter() - t0
    matmul_gflops = mm_flops / stats["matmul"].median / 1e9
    flops = step_flops(info["gmacs"] * 2e9, args.batch_size, mode)
    out: dict[str, Any] = {
        "model": name, "dtype": dtype, "mode": mode, "batch_size": args.batch_size, "gmacs": info["gmacs"],
        "params": params, "matmul_gflops": matmul_gflops, "matmul_timing": stats["matmul"].to_dict(),
        "loadavg_before": load_before, "loadavg_after": _loadavg(), "wall_s": wall, "impls": {},
    }
    for impl in impls:
        s = stats[impl]
        achieved = flops / s.median / 1e9
        out["impls"][impl] = {"images_per_s": args.batch_size / s.median, "achieved_gflops": achieved,
                              "fraction_of_matmul": achieved / matmul_gflops, "timing": s.to_dict()}
    if "vitlab" in impls:
        out["ratios"] = {f"vitlab/{p}": paired_ratio(stats["vitlab"], stats[p]).to_dict()
                         for p in impls if p != "vitlab"}
        out["ratios_cpu_time"] = {f"vitlab/{p}": paired_ratio(stats["vitlab"], stats[p], cpu=True).to_dict()
                                  for p in impls if p != "vitlab"}
    log.info("%s %s %s (%.0f s): %s; matmul %.0f GFLOP/s", name, dtype, mode, wall,
             ", ".join(f"{i} {out['impls'][i]['images_per_s']:.1f} img/s" for i in impls), matmul_gflops)
    return out


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def markdown(report: dict[str, Any]) -> str:
    impls = report["settings"]["impls"]
    peers = [p for p in impls if p != "vitlab"] if "vitlab" in impls else []
    head = ["model", "dtype", "mode"] + [f"{i} img/s" for i in impls]
    head += [f"vitlab/{p} (per-round min-max)" for p in peers] + [f"vitlab/{p} CPU-time" for p in peers]
    head += ["vitlab GFLOP/s", "matmul GFLOP/s", "vitlab of matmul", "spread (max over impls)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in report["groups"]:
        short = g["model"].replace("_patch16_224", "").replace("vit_", "ViT-").replace("_patch4_window7_224", "")
        row = [short, g["dtype"], g["mode"]]
        row += [f"{g['impls'][i]['images_per_s']:.1f}" for i in impls]
        for p in peers:
            r = g["ratios"][f"vitlab/{p}"]
            row.append(f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f})")
        row += [f"{g['ratios_cpu_time'][f'vitlab/{p}']['median']:.2f}" for p in peers]
        v = g["impls"].get("vitlab")
        row += [f"{v['achieved_gflops']:.0f}" if v else "-", f"{g['matmul_gflops']:.0f}",
                f"{100 * v['fraction_of_matmul']:.0f}%" if v else "-",
                f"{100 * max(g['impls'][i]['timing']['spread'] for i in impls):.0f}%"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=4, help="timed rounds per group (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per implementation and group")
    p.add_argument("--min-repeat-s", type=float, default=0.3,
                   help="a repeat averages enough steps to last about this long (small models)")
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--build-orders", choices=["both", "given"], default="both",
                   help="both: --repeats rounds with the models built in --impls order, then as many with fresh "
                        "models built in the reverse order (the first-built model's speed differs); given: one order")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_models",
                   help="writes OUT.json and OUT.md")
    p.add_argument("--allocator", choices=["system", "keep"], default="system",
                   help="system: glibc's defaults (a Python user's process); keep: glibc keeps freed memory, as "
                        "`vitlab eval/predict/benchmark` set it. Every implementation shares the process's setting")
    args = p.parse_args()
    if args.allocator == "keep" and not keep_freed_memory():
        raise SystemExit("--allocator keep: glibc's mallopt is not available here, or VITLAB_ALLOCATOR/MALLOC_* is set")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    start = time.time()
    machine = machine_info()
    import timm
    import transformers

    report: dict[str, Any] = {
        "machine": machine,
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "transformers": transformers.__version__},
        "command": " ".join([Path(sys.executable).as_posix(), *sys.argv]),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "groups": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        for dtype in args.dtypes:
            for mode in args.modes:
                report["groups"].append(bench_group(name, dtype, mode, args.impls, args))
                gc.collect()
                # written after every group, so an interrupted run keeps what it measured
                report["wall_s"] = time.time() - start
                report["machine"]["loadavg_end"] = _loadavg()
                args.out.with_suffix(".json").write_text(json.dumps(report, indent=2))
                args.out.with_suffix(".md").write_text(markdown(report) + "\n")
    print(markdown(report))
    log.info("total %.0f s; wrote %s.{json,md}", report["wall_s"], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
