"""Inference runtimes side by side: float32 / bfloat16 / int8 PyTorch, ONNX Runtime float32 / int8, and timm.

Three measurements, written to benchmarks/results/runtimes.json:

1. speed: for each model (random init, 224 px) every runtime (and timm float32 / bfloat16 autocast / bfloat16
   weights for the same architecture) is timed in interleaved rounds at batch 16 and at batch 1 (vitlab.benchmark's
   run_interleaved), with a 2048^2 matmul in float32 and bfloat16 in the same rounds as the practical peak;
2. agreement on a real test set: a small ViT trained for a few seconds on the bundled digits, each runtime's
   top-1 agreement with float32 PyTorch over the whole digits test split (359 images);
3. profile: where a ViT-S/16 forward (batch 16) spends its time, by operator, in each --profile-runtimes.

Run with the project's venv (onnx, onnxruntime, onnxscript); timm is borrowed from the peer venv:

    /work/main/.venv/bin/python benchmarks/bench_runtimes.py --peers /tmp/peers
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch

import vitlab
from vitlab.allocator import keep_freed_memory
from vitlab.benchmark import (
    TimingStats,
    machine_info,
    matmul_step,
    paired_ratio,
    registry_forward_flops,
    run_interleaved,
)
from vitlab.export.runtimes import build_runtime

TIMM_NAMES = {"vit_small_patch16_224": "vit_small_patch16_224", "deit_small_patch16_224": "deit_small_patch16_224",
              "swin_tiny_patch4_window7_224": "swin_tiny_patch4_window7_224", "mobilevit_s": "mobilevit_s"}


def speed(names: list[str], runtimes: list[str], batches: list[int], repeats: int, use_timm: bool,
          min_repeat_s: float = 0.0) -> list[dict]:
    rows = []
    for name in names:
        torch.manual_seed(0)
        model = vitlab.create_model(name).eval()
        model.model_name = name
        flops, size = registry_forward_flops(name)
        # one export per runtime; random weights give near-uniform logits, so the int8 export's own agreement
        # check is not meaningful here (force): agreement is measured on a trained model in agreement() below
        built = {rt: build_runtime(rt, model, num_images=8, force=True) for rt in runtimes}
        tm = None
        if use_timm and name in TIMM_NAMES:
            import timm

            tm = timm.create_model(TIMM_NAMES[name], pretrained=False).eval()
        for batch in batches:
            x = torch.randn(batch, *size)
            steps = {rt: (lambda r=r, x=x: r(x)) for rt, r in built.items()}
            if tm is not None:
                tm_bf16 = copy.deepcopy(tm).to(torch.bfloat16)  # timm's --model-dtype bfloat16

                def timm_step(bf16: bool, tm=tm, x=x) -> None:
                    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                        tm(x)

                def timm_full(tm=tm_bf16, x=x.to(torch.bfloat16)) -> None:
                    with torch.no_grad():
                        tm(x).float()

                steps["timm"] = lambda: timm_step(False)
                steps["timm-bf16"] = lambda: timm_step(True)
                if "torch-bf16-full" in built:
                    steps["timm-bf16-full"] = timm_full
            mm32, mmf = matmul_step(2048, dtype="float32")
            mm16, _ = matmul_step(2048, dtype="bfloat16")
            steps["matmul-fp32"], steps["matmul-bf16"] = mm32, mm16
            # two warm-up rounds: a compiled runtime pads a batch size smaller than one it has compiled the first
            # time it comes (batch 1 after batch 16) and compiles it the second time
            stats = run_interleaved(steps, warmup=2, repeats=repeats, min_repeat_s=min_repeat_s)
            faults = {k: page_faults(f) for k, f in steps.items() if not k.startswith("matmul")}
            timm_arms = [stats[k] for k in ("timm", "timm-bf16", "timm-bf16-full") if k in stats]
            if timm_arms:  # timm at its best eager setting, round by round: the fastest of its arms that round
                stats["timm-best-eager"] = TimingStats(times_s=tuple(map(min, zip(*(t.times_s for t in timm_arms)))))
            new_rows = []
            for k, st in stats.items():
                if k.startswith("matmul"):
                    new_rows.append({"model": name, "runtime": k, "batch": batch, "spread": st.spread,
                                     "gflops": mmf / st.median / 1e9, "gflops_per_round": [mmf / t / 1e9
                                                                                           for t in st.times_s]})
                    continue
                row = {"model": name, "runtime": k, "batch": batch, "images_per_s": batch / st.median,
                       "spread": st.spread, "vs_torch": paired_ratio(st, stats["torch"]).median,
                       "gflops": flops * batch / st.median / 1e9, "seconds_per_round": list(st.times_s),
                       "page_faults_per_call": faults.get(k)}
                for ref in ("timm", "timm-bf16", "timm-bf16-full", "timm-best-eager"):
                    if ref in stats:
                        r = paired_ratio(st, stats[ref])
                        row[f"vs_{ref}"] = r.median
                        row[f"vs_{ref}_range"] = [min(r.ratios), max(r.ratios)]
                # achieved GFLOP/s over the same round's matmul (float32 or bfloat16, by the runtime's compute)
                mm = stats["matmul-bf16" if "bf16" in k or k == "timm-best-eager" else "matmul-fp32"]
                row["of_matmul"] = paired_ratio(st, mm).median * flops * batch / mmf
                new_rows.append(row)
            rows += new_rows
            print(json.dumps(new_rows, indent=1), flush=True)
    return rows


def page_faults(step) -> int:
    """Minor page faults of one more call of ``step``: pages the allocator took afresh from the system."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def agreement(runtimes: list[str], steps: int) -> dict:
    from vitlab.data import build_dataset, eval_transform

    torch.manual_seed(0)
    model = vitlab.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, in_chans=1, embed_dim=96,
                                depth=4, num_heads=3, num_classes=10, crop_pct=1.0, mean=(0.5,), std=(0.5,))
    model.model_name = "vit_tiny_patch16_224"
    tf = eval_transform(model.preprocessing)
    tr = build_dataset("digits", split="train", transform=tf)
    te = build_dataset("digits", split="test", transform=tf)
    x = torch.stack([tr[i][0] for i in range(len(tr))])
    y = torch.tensor([tr[i][1] for i in range(len(tr))])
    xt = torch.stack([te[i][0] for i in range(len(te))])
    yt = torch.tensor([te[i][1] for i in range(len(te))])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    g = torch.Generator().manual_seed(0)
    model.train()
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        ref = model(xt)
    out = {"model": "ViT 4x96, patch 4, 32 px, digits", "train_steps": steps,
           "train_s": round(time.perf_counter() - t0, 1), "test_images": len(xt),
           "float32_top1": (ref.argmax(-1) == yt).float().mean().item(), "runtimes": {}}
    for rt in runtimes:
        r = build_runtime(rt, model, num_images=64, validate_images=None, min_agreement=0.9)
        o = r(xt)
        out["runtimes"][rt] = {"top1": (o.argmax(-1) == yt).float().mean().item(),
                               "agreement": (o.argmax(-1) == ref.argmax(-1)).float().mean().item(),
                               "max_abs_logit_diff": (o - ref).abs().max().item()}
    print(json.dumps(out, indent=1), flush=True)
    return out


def profile(batch: int, runtime: str) -> dict:
    """Where a ViT-S/16 forward (batch ``batch``) spends its time, by operator, in ``runtime``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    torch.manual_seed(0)
    model = vitlab.create_model("vit_small_patch16_224").eval()
    model.model_name = "vit_small_patch16_224"
    rt = build_runtime(runtime, model)
    x = torch.randn(batch, 3, 224, 224)
    rt(x)
    rt(x)
    with prof(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(3):
            rt(x)
    rows = []
    total = sum(e.self_cpu_time_total for e in p.key_averages())
    for e in sorted(p.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]:
        rows.append({"op": e.key, "self_ms": e.self_cpu_time_total / 3e3, "share": e.self_cpu_time_total / total,
                     "calls": e.count // 3})
    print(runtime, json.dumps(rows, indent=1), flush=True)
    return {"batch": batch, "runtime": runtime, "total_ms_per_forward": total / 3e3, "top_ops": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peers", default="/tmp/peers", help="peer venv to borrow timm from")
    ap.add_argument("--models", nargs="+", default=["vit_small_patch16_224", "deit_small_patch16_224"])
    ap.add_argument("--runtimes", default="torch,torch-bf16,torch-bf16-full,torch-int8,onnx,onnx-int8")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 1])
    ap.add_argument("--min-repeat-s", type=float, default=0.0, help="a repeat averages calls for this long")
    ap.add_argument("--profile-runtimes", default="torch-bf16", help="runtimes to profile ViT-S/16 in")
    ap.add_argument("--note", default="", help="what the machine was doing, recorded in the JSON")
    ap.add_argument("--agreement-steps", type=int, default=200)
    ap.add_argument("--skip", nargs="*", default=[], choices=["speed", "agreement", "profile"])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "runtimes.json"))
    ap.add_argument("--allocator", choices=["keep", "system"], default="keep",
                    help="keep: glibc keeps freed memory, as `vitlab eval/predict/benchmark` set it (every arm, "
                         "timm's too, shares the process); system: glibc's defaults")
    args = ap.parse_args()
    if args.allocator == "keep" and not keep_freed_memory():
        raise SystemExit("--allocator keep: glibc's mallopt is not available here, or VITLAB_ALLOCATOR/MALLOC_* "
                         "is set")
    use_timm = False
    for sp in glob.glob(f"{args.peers}/lib/python3*/site-packages"):
        sys.path.append(sp)  # after our own: torch and numpy stay the project's
        use_timm = True
    runtimes = args.runtimes.split(",")
    result = {"machine": machine_info(), "command": " ".join(sys.argv), "note": args.note}  # machine: allocator
    if "agreement" not in args.skip:
        result["agreement"] = agreement(runtimes, args.agreement_steps)
    if "speed" not in args.skip:
        result["speed"] = speed(args.models, runtimes, args.batches, args.repeats, use_timm, args.min_repeat_s)
    if "profile" not in args.skip:
        result["profile_vit_s"] = [profile(16, rt) for rt in args.profile_runtimes.split(",")]
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
