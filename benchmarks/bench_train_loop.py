"""Training throughput: a plain timm-style loop against vitlab's training engine (``vitlab.train.fit``).

Both train the *same* vitlab model (so only the loop differs) with the same batch, data, AdamW
(lr 1e-3, weight decay 0.05, no decay on biases/norms/position table/class token), cosine schedule,
cross entropy and precision, reading from an in-memory data set through a DataLoader (workers 0).

The timm-style loop is what timm's ``train.py`` does per step: fetch, autocast forward + loss,
zero_grad, backward, optimizer step, scheduler ``step_update``, ``loss.item()`` for the running
average; optimiser and schedule come from ``timm.optim.create_optimizer_v2`` and
``timm.scheduler.CosineLRScheduler``. The engine additionally checks the loss for finiteness, keeps
a history, and writes its checkpoint files when the run ends.

Throughput is measured per step (wall time from one step's end to the next, data fetch included),
dropping the first ``--skip`` steps of each run; runs alternate (timm, engine, engine, timm, ...) over
``--rounds`` rounds, and the ratio is the median of per-round ratios. The engine's end-to-end time
(set-up + steps + final checkpoint) is reported separately.

    /tmp/peers/bin/python benchmarks/bench_train_loop.py                 # ViT-Ti, float32, ~2-4 min
    /tmp/peers/bin/python benchmarks/bench_train_loop.py --model vit_small_patch16_224 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import vitlab
from vitlab.benchmark import autocast, machine_info

log = logging.getLogger("bench_train_loop")
LR, WD = 1e-3, 0.05


class RandomImages(Dataset):
    """``n`` fixed random images with labels, as already-transformed (C, H, W) tensors."""

    def __init__(self, n: int, size: tuple[int, int, int], num_classes: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, *size, generator=g)
        self.y = torch.randint(0, num_classes, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], int(self.y[i])


def run_timm_style(name: str, ds: Dataset, *, batch: int, steps: int, dtype: str) -> list[float]:
    """Seconds of each step of a timm train.py-style loop."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    torch.manual_seed(0)
    model = vitlab.create_model(name)
    # timm groups parameters itself: no weight decay on 1-D params and the model's no_weight_decay() names
    opt = create_optimizer_v2(model, opt="adamw", lr=LR, weight_decay=WD)
    sched = CosineLRScheduler(opt, t_initial=steps, warmup_t=0)
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=0, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    model.train()
    times, losses = [], []
    t = time.perf_counter()
    for num_updates, (x, y) in enumerate(loader, start=1):
        with autocast(dtype):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step_update(num_updates=num_updates)
        losses.append(loss.item())  # timm's AverageMeter update
        now = time.perf_counter()
        times.append(now - t)
        t = now
        if num_updates >= steps:
            break
    return times


def run_engine(name: str, ds: Dataset, *, batch: int, steps: int, dtype: str) -> tuple[list[float], float]:
    """Seconds of each step of ``vitlab.train.fit`` (from its per-step log), and its end-to-end seconds."""
    from vitlab.train import Recipe, fit

    torch.manual_seed(0)
    model = vitlab.create_model(name)
    recipe = Recipe(name="bench", batch_size=batch, max_steps=steps, epochs=1, lr=LR, weight_decay=WD,
                    optimizer="adamw", schedule="cosine", amp="bf16" if dtype == "bfloat16" else "none",
                    log_every=1, checkpoint_every=0, eval_every_epochs=1000, workers=0, augment=False)
    with tempfile.TemporaryDirectory(prefix="bench_engine_") as out:
        t0 = time.perf_counter()
        res = fit(model, recipe, train_set=ds, output_dir=out, progress=False)
        total = time.perf_counter() - t0
    # img_per_s of a log record covers the steps since the previous record: here exactly one step
    times = [res.global_batch / r["img_per_s"] for r in res.history if r.get("kind", "train") == "train"]
    return times, total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=8, help="optimiser steps per run")
    p.add_argument("--skip", type=int, default=2, help="first steps of each run left out (warm-up)")
    p.add_argument("--rounds", type=int, default=4, help="runs of each loop, alternating")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_train_loop.json")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("vitlab").setLevel(logging.WARNING)  # the engine's own progress lines
    torch.set_num_threads(args.threads)
    if args.skip >= args.steps:
        p.error("--skip must be smaller than --steps")
    try:
        import vitlab.train
        has_engine = hasattr(vitlab.train, "fit")
    except ImportError:
        has_engine = False
    info = vitlab.model_info(args.model)
    ds = RandomImages(args.batch_size * args.steps, tuple(info["preprocessing"]["input_size"]), info["num_classes"])
    runs: dict[str, list[dict[str, Any]]] = {"timm_style": [], "engine": []}
    order = ["timm_style", "engine"] if has_engine else ["timm_style"]
    for r in range(args.rounds):
        for impl in (order if r % 2 == 0 else order[::-1]):
            if impl == "timm_style":
                times, total = run_timm_style(args.model, ds, batch=args.batch_size, steps=args.steps,
                                              dtype=args.dtype), None
            else:
                times, total = run_engine(args.model, ds, batch=args.batch_size, steps=args.steps, dtype=args.dtype)
            steady = times[args.skip:]
            rec = {"step_times_s": times, "median_step_s": statistics.median(steady),
                   "images_per_s": args.batch_size / statistics.median(steady), "end_to_end_s": total}
            runs[impl].append(rec)
            log.info("round %d %-10s %.2f img/s (median of steps %d..%d)%s", r + 1, impl, rec["images_per_s"],
                     args.skip + 1, args.steps, f", end-to-end {total:.1f} s" if total else "")
    summary: dict[str, Any] = {
        impl: {"images_per_s_median": statistics.median(x["images_per_s"] for x in rs)}
        for impl, rs in runs.items() if rs
    }
    if has_engine:
        per_round = [e["images_per_s"] / t["images_per_s"] for t, e in zip(runs["timm_style"], runs["engine"])]
        summary["engine/timm_style"] = {"median": statistics.median(per_round), "min": min(per_round),
                                        "max": max(per_round), "per_round": per_round}
        e2e = [args.batch_size * (args.steps) / e["end_to_end_s"] for e in runs["engine"]]
        summary["engine"]["end_to_end_images_per_s_median"] = statistics.median(e2e)
    else:
        summary["engine"] = "TODO: vitlab.train.fit not available in this checkout"
    report = {"machine": machine_info(), "command": " ".join([Path(sys.executable).as_posix(), *sys.argv]),
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "summary": summary, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
