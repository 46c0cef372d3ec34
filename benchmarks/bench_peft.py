"""Full fine-tuning vs LoRA vs partial fine-tuning vs linear probing: time and memory of a training step.

Each mode trains ``vit_small_patch16_224`` (random weights: nothing is downloaded; the cost of a step does not
depend on the values) at 224 px with a 10-class head, AdamW over vitlab's parameter groups
(``vitlab.train.build_optimizer``), the model prepared by ``vitlab.train.peft`` as ``fit`` prepares it (frozen
parameters without gradients or optimiser state; frozen modules in eval mode). A step is forward + cross entropy +
backward + ``optimizer.step()`` + ``zero_grad(set_to_none=True)``, as the trainer's.

* step time: every mode in this process, interleaved round by round (the order rotated each round), after one
  untimed warm-up step each; the median over rounds.
* memory: each mode again in a fresh subprocess (``--child MODE``): the peak resident set size over the
  process's life (``ru_maxrss``: torch, the model, the optimiser and the steps' activations) and that peak less
  the RSS before the first step (coarse: the allocator keeps freed memory); plus exact byte counts: the weight
  gradients, the optimiser state after a step, and the tensors autograd saves from the forward for the backward
  (activations, each storage once: ``torch.autograd.graph.saved_tensors_hooks``).

    /work/main/.venv/bin/python benchmarks/bench_peft.py --threads 2 --batch 16 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import vitlab
from vitlab.train import Recipe, build_optimizer, peft

MODES: dict[str, dict] = {
    "full": {},
    "partial (freeze_blocks=8)": {"freeze_blocks": 8},
    "LoRA r=8 qkv": {"lora_rank": 8, "lora_targets": "qkv"},
    "LoRA r=8 all": {"lora_rank": 8, "lora_targets": "all"},
    "linear probe": {"freeze": "backbone"},
}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def build(mode: str, model_name: str, batch: int):
    torch.manual_seed(0)
    model = vitlab.create_model(model_name, num_classes=10)
    recipe = Recipe(optimizer="adamw", lr=1e-4, weight_decay=0.05, **MODES[mode])
    counts = peft.prepare(model, recipe)
    model.train()
    peft.eval_frozen_modules(model)
    opt = build_optimizer(model, recipe, lr=recipe.lr, quiet=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 224, 224, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    return model, opt, x, y, counts


def step(model, opt, x, y) -> None:
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def state_bytes(model, opt, x, y) -> tuple[int, int]:
    """Bytes of the weight gradients (before the step clears them) and of the optimiser state after a step."""
    F.cross_entropy(model(x), y).backward()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    opt.step()
    opt.zero_grad(set_to_none=True)
    moments = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                  if isinstance(t, torch.Tensor))
    return grads, moments


def saved_for_backward_bytes(model, x, y) -> int:
    """Bytes of the tensors autograd keeps from the forward for the backward (activations; each storage once,
    the parameters themselves not counted)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def child(mode: str, args) -> dict:
    torch.set_num_threads(args.threads)
    model, opt, x, y, counts = build(mode, args.model, args.batch)
    before = rss_mb()
    grads, moments = state_bytes(model, opt, x, y)
    saved = saved_for_backward_bytes(model, x, y)
    for _ in range(args.memory_steps - 1):
        step(model, opt, x, y)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, **counts, "rss_before_steps_mb": round(before, 1), "peak_rss_mb": round(peak, 1),
            "peak_over_before_mb": round(peak - before, 1), "weight_grads_mb": round(grads / 2**20, 1),
            "optimizer_state_mb": round(moments / 2**20, 1), "saved_for_backward_mb": round(saved / 2**20, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--memory-steps", type=int, default=3)
    ap.add_argument("--modes", nargs="*", default=list(MODES))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help="write the results here (.json)")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    load = [round(v, 2) for v in __import__("os").getloadavg()]
    memory = {}
    for mode in args.modes:  # one fresh process each: ru_maxrss is a process's lifetime peak
        cmd = [sys.executable, __file__, "--child", mode, "--model", args.model, "--batch", str(args.batch),
               "--threads", str(args.threads), "--memory-steps", str(args.memory_steps)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        memory[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(memory[mode]), flush=True)
    torch.set_num_threads(args.threads)
    built = {mode: build(mode, args.model, args.batch) for mode in args.modes}
    times: dict[str, list[float]] = {mode: [] for mode in args.modes}
    for model, opt, x, y, _ in built.values():
        step(model, opt, x, y)  # warm-up
    for r in range(args.rounds):
        order = args.modes[r % len(args.modes):] + args.modes[:r % len(args.modes)]
        for mode in order:
            model, opt, x, y, _ = built[mode]
            t = time.perf_counter()
            step(model, opt, x, y)
            times[mode].append(time.perf_counter() - t)
        print(f"round {r + 1}: " + ", ".join(f"{m} {times[m][-1]:.2f}s" for m in args.modes), flush=True)
    rows = []
    full = statistics.median(times[args.modes[0]])
    for mode in args.modes:
        med = statistics.median(times[mode])
        rows.append({**memory[mode], "step_s_median": round(med, 3), "step_s_min": round(min(times[mode]), 3),
                     "step_s_max": round(max(times[mode]), 3), "vs_first": round(med / full, 2),
                     "img_per_s": round(args.batch / med, 2)})
    result = {"model": args.model, "batch": args.batch, "threads": args.threads, "rounds": args.rounds,
              "load_before": load, "load_after": [round(v, 2) for v in __import__("os").getloadavg()],
              "torch": torch.__version__, "rows": rows}
    print("| mode | trainable params | fraction | step s (median, min-max) | vs full | img/s | weight grads MB | "
          "optimizer state MB | saved for backward MB | peak RSS MB | peak - RSS before steps MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['trainable_params']:,} | {100 * r['trainable_fraction']:.2f}% | "
              f"{r['step_s_median']:.2f} ({r['step_s_min']:.2f}-{r['step_s_max']:.2f}) | {r['vs_first']:.2f} | "
              f"{r['img_per_s']:.1f} | {r['weight_grads_mb']:.1f} | {r['optimizer_state_mb']:.1f} | "
              f"{r['saved_for_backward_mb']:.0f} | "
              f"{r['peak_rss_mb']:.0f} | {r['peak_over_before_mb']:.0f} |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
