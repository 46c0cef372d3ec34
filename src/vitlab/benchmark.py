"""Throughput measurement: timed steps, interleaved repeats, matmul reference and FLOP accounting.

Everything here works on any ``nn.Module`` that maps images to logits, so the same timing code measures
vitlab and, in ``benchmarks/``, other libraries' models. Nothing here imports a peer library.

Timings on a shared machine drift while they are taken, so :func:`run_interleaved` never times one
contender's repeats back to back: it runs one repeat of every contender per round (A, B, C, A, B, C,
...), rotating the starting contender each round, and keeps every repeat so that the spread can be
reported next to the median. Ratios between two contenders are best taken per round
(:func:`paired_ratio`), since both saw nearly the same machine load.

Example::

    steps = {"vit": make_infer_step(model, images, dtype="float32"), "matmul": matmul_step(2048)[0]}
    stats = run_interleaved(steps, warmup=1, repeats=5)
    images_per_s = 16 / stats["vit"].median
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitlab import allocator

log = logging.getLogger(__name__)

DType = Literal["float32", "bfloat16"]
Mode = Literal["infer", "train"]
DTYPES: tuple[str, ...] = ("float32", "bfloat16")
MODES: tuple[str, ...] = ("infer", "train")
# A training step costs about three forward passes: the forward, plus backward's two matmuls per
# forward matmul (gradient w.r.t. the input and w.r.t. the weight).
TRAIN_FLOP_FACTOR = 3.0

Step = Callable[[], Any]


@dataclass(frozen=True, kw_only=True)
class TimingStats:
    """Seconds per call of one contender, one entry per timed repeat (each repeat may average several calls)."""

    times_s: tuple[float, ...]
    calls_per_repeat: int = 1
    # CPU seconds of this process per call (all threads, spin-waits included): on a shared machine it
    # moves far less than wall time when other processes take the cores, so it cross-checks ratios.
    cpu_times_s: tuple[float, ...] = ()

    @property
    def median(self) -> float:
        return statistics.median(self.times_s)

    @property
    def min(self) -> float:
        return min(self.times_s)

    @property
    def max(self) -> float:
        return max(self.times_s)

    @property
    def spread(self) -> float:
        """(max - min) / median: the relative range of the repeats, the noise we report."""
        return (self.max - self.min) / self.median if self.median > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"median_s": self.median, "min_s": self.min, "max_s": self.max, "spread": round(self.spread, 4),
                "calls_per_repeat": self.calls_per_repeat, "times_s": list(self.times_s),
                "cpu_median_s": statistics.median(self.cpu_times_s) if self.cpu_times_s else None,
                "cpu_times_s": list(self.cpu_times_s)}


@dataclass(frozen=True, kw_only=True)
class RatioStats:
    """Per-round ratios a/b of two contenders' throughput (b's seconds / a's seconds)."""

    ratios: tuple[float, ...] = field(default=())

    @property
    def median(self) -> float:
        return statistics.median(self.ratios)

    def to_dict(self) -> dict[str, Any]:
        return {"median": self.median, "min": min(self.ratios), "max": max(self.ratios),
                "per_round": list(self.ratios)}


def paired_ratio(a: TimingStats, b: TimingStats, *, cpu: bool = False) -> RatioStats:
    """Throughput of ``a`` over that of ``b``, round by round (both timed by the same :func:`run_interleaved`).

    ``cpu=True`` compares CPU seconds instead of wall seconds.
    """
    ta, tb = (a.cpu_times_s, b.cpu_times_s) if cpu else (a.times_s, b.times_s)
    return RatioStats(ratios=tuple(y / x for x, y in zip(ta, tb, strict=True)))


# --------------------------------------------------------------------------------------------- steps
def autocast(dtype: str) -> Any:
    """The context a step's forward runs in: nothing for float32, CPU autocast for bfloat16."""
    if dtype == "float32":
        return nullcontext()
    if dtype == "bfloat16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")


def make_infer_step(model: nn.Module, images: Tensor, *, dtype: str) -> Step:
    """One inference forward (eval mode, no autograd); ``model`` is put in eval mode."""
    model.eval()

    def step() -> None:
        with torch.no_grad(), autocast(dtype):
            model(images)

    return step


def make_train_step(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    *,
    dtype: str,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
) -> Step:
    """One optimisation step: forward, cross-entropy, backward, AdamW update (``model`` goes to train mode).

    A detector or segmenter (named outputs) is stepped on a stand-in loss, the sum of every output's mean, which
    back-propagates through the whole model as its task loss would (DETR's box matching is not timed).
    The optimiser is built here with torch's defaults (foreach on), so every library is stepped the same way.
    """
    from vitlab.train.evaluate import logits_of

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

    def step() -> None:
        with autocast(dtype):
            out = model(images)
            loss = _sum_of_means(out) if isinstance(out, dict) else F.cross_entropy(logits_of(out), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _sum_of_means(out: Any) -> Tensor:
    """Sum of the means of every floating tensor in a (nested) dict / list / tuple of outputs."""
    if isinstance(out, Tensor):
        return out.float().mean() if out.is_floating_point() else out.new_zeros((), dtype=torch.float32)
    items = out.values() if isinstance(out, dict) else out
    return sum((_sum_of_means(v) for v in items), torch.zeros(()))


def matmul_step(n: int = 2048, *, dtype: str = "float32") -> tuple[Step, float]:
    """An (n x n) @ (n x n) matmul in ``dtype`` and its FLOP count: the machine's practical peak."""
    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(torch_dtype)
    b = torch.randn(n, n, generator=g).to(torch_dtype)
    out = torch.empty(n, n, dtype=torch_dtype)

    def step() -> None:
        torch.mm(a, b, out=out)

    return step, 2.0 * n**3


# ------------------------------------------------------------------------------------------- timing
def _time_calls(fn: Step, calls: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per call."""
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls, (time.process_time() - c0) / calls


def run_interleaved(
    steps: dict[str, Step],
    *,
    warmup: int = 1,
    repeats: int = 5,
    min_repeat_s: float = 0.5,
) -> dict[str, TimingStats]:
    """Time every step in rounds: one repeat of each contender per round, rotating who goes first.

    Args:
        warmup: untimed calls of each step before timing (allocator, oneDNN kernel selection).
        repeats: timed rounds; each contender's median over them is its result.
        min_repeat_s: a repeat averages as many calls as needed to last about this long (measured on the
            last warm-up call), so fast steps are not dominated by timer and scheduler jitter.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(steps)
    calls: dict[str, int] = {}
    for name in names:
        t = 0.0
        for _ in range(max(warmup, 1)):  # at least one untimed call, to size the repeats
            t0 = time.perf_counter()
            steps[name]()
            t = time.perf_counter() - t0
        calls[name] = max(1, int(min_repeat_s / max(t, 1e-9) + 0.5))
        log.debug("%s: %.4f s per call, %d call(s) per repeat", name, t, calls[name])
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate: no contender always follows another
        for name in order:
            wall, cpu_s = _time_calls(steps[name], calls[name])
            times[name].append(wall)
            cpu[name].append(cpu_s)
    return {n: TimingStats(times_s=tuple(times[n]), calls_per_repeat=calls[n], cpu_times_s=tuple(cpu[n]))
            for n in names}


# -------------------------------------------------------------------------------------------- FLOPs
def forward_flops(model: nn.Module, input_size: tuple[int, ...]) -> float:
    """FLOPs of one forward pass on one image, counted by torch's FlopCounterMode (matmuls, convs). On the meta
    device attention decomposes into counted matmuls; on the CPU its fused kernel is not counted, so count
    real models with :func:`model_forward_flops` (a meta twin) or :func:`registry_forward_flops`."""
    from torch.utils.flop_counter import FlopCounterMode

    params = list(model.parameters())
    x = torch.empty(1, *input_size, device=params[0].device)
    # parameters stop requiring grad while counting, instead of no_grad: the counter's module tracker hooks
    # every module input that requires grad, and a parameter passed straight to a submodule under no_grad (DETR's
    # query embedding) has no grad function to hook, which torch asserts on
    flags = [p.requires_grad for p in params]
    # in eval mode: a freshly built model is in training mode, where BatchNorm refuses a batch of one image
    # whose last map is 1 x 1 (a ResNet or MobileViT at 32 px); the FLOPs are the same
    training = model.training
    try:
        for p in params:
            p.requires_grad_(False)
        model.eval()
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(training)
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
    return float(counter.get_total_flops())


def check_overrides(names: list[Any], overrides: dict[str, Any]) -> None:
    """Raise before any timing when a registered name is unknown or ``overrides`` do not fit its config (an
    option one of several models lacks would otherwise fail only after the others were timed)."""
    from vitlab.models.factory import _apply_overrides
    from vitlab.models.registry import get_entry

    for name in names:
        if isinstance(name, str):
            entry = get_entry(name)
            with torch.device("meta"):  # the config's own checks and the build's, free of memory
                entry.build(_apply_overrides(name, entry.config, overrides))


def registry_forward_flops(name: str, **overrides: Any) -> tuple[float, tuple[int, ...]]:
    """FLOPs per image of a registered model (built on the meta device, so free), and its input size."""
    from vitlab.models.factory import _apply_overrides
    from vitlab.models.registry import get_entry

    entry = get_entry(name)
    with torch.device("meta"):
        model = entry.build(_apply_overrides(name, entry.config, overrides))
        size = tuple(model.preprocessing.input_size)
        return forward_flops(model, size), size


def model_forward_flops(model: nn.Module, input_size: tuple[int, ...]) -> float:
    """FLOPs per image of a built model (a loaded checkpoint), counted on a meta-device twin built from its
    config: on the CPU, torch's fused attention kernel is not seen by FlopCounterMode, on the meta device it
    decomposes into matmuls that are. A model that is not a registered vitlab model is counted as it runs."""
    from vitlab.models.registry import get_entry

    name, cfg = getattr(model, "model_name", None), getattr(model, "cfg", None)
    try:
        entry = get_entry(name) if isinstance(name, str) and cfg is not None else None
    except ValueError:
        entry = None
    if entry is None or not isinstance(cfg, type(entry.config)):
        return forward_flops(model, input_size)
    with torch.device("meta"):
        return forward_flops(entry.build(cfg), input_size)


def step_flops(forward_flops_per_image: float, batch_size: int, mode: str) -> float:
    return forward_flops_per_image * batch_size * (TRAIN_FLOP_FACTOR if mode == "train" else 1.0)


# ---------------------------------------------------------------------------------------- machine
def cpu_model_name() -> str:
    """The CPU's model name as /proc/cpuinfo (what ``lscpu`` shows) gives it, else platform's guess."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    return {
        "cpu": cpu_model_name(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "loadavg": _loadavg(),
        "allocator": allocator.describe(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):  # AttributeError: no os.getloadavg (Windows)
        return None


@contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads (None: leave torch's setting)."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ---------------------------------------------------------------------------------- vitlab models
def benchmark_models(
    names: list[str],
    *,
    batch_size: int = 16,
    dtype: str = "float32",
    mode: str = "infer",
    warmup: int = 1,
    repeats: int = 5,
    min_repeat_s: float = 0.5,
    matmul_size: int = 2048,
    overrides: dict[str, Any] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Throughput of vitlab models, each interleaved with a reference matmul timed in the same rounds.

    Returns a JSON-ready dict: ``machine``, ``settings`` and one ``results`` entry per model with
    images/s, achieved GFLOP/s, the matmul's GFLOP/s and their ratio (an MFU-like fraction of the
    machine's practical peak), and the raw repeat times.
    """
    from vitlab.models.factory import create_model

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    overrides = dict(overrides or {})
    check_overrides(list(names), overrides)
    results = []
    for name in names:
        torch.manual_seed(seed)
        fwd_flops, size = registry_forward_flops(name, **overrides)
        model = create_model(name, **overrides)
        images = torch.randn(batch_size, *size)
        if mode == "infer":
            step = make_infer_step(model, images, dtype=dtype)
        else:
            targets = torch.randint(0, max(model.num_classes, 1), (batch_size,))
            step = make_train_step(model, images, targets, dtype=dtype)
        mm, mm_flops = matmul_step(matmul_size, dtype=dtype)
        stats = run_interleaved({"model": step, "matmul": mm}, warmup=warmup, repeats=repeats,
                                min_repeat_s=min_repeat_s)
        flops = step_flops(fwd_flops, batch_size, mode)
        achieved = flops / stats["model"].median / 1e9
        peak = mm_flops / stats["matmul"].median / 1e9
        results.append({
            "model": name,
            "mode": mode,
            "dtype": dtype,
            "batch_size": batch_size,
            "images_per_s": batch_size / stats["model"].median,
            "gflops_per_image_fwd": fwd_flops / 1e9,
            "achieved_gflops": achieved,
            "matmul_gflops": peak,
            "fraction_of_matmul": achieved / peak,
            "timing": stats["model"].to_dict(),
            "matmul_timing": stats["matmul"].to_dict(),
        })
        log.info("%s %s %s: %.1f img/s, %.1f GFLOP/s (%.0f%% of matmul %.1f GFLOP/s), spread %.0f%%",
                 name, mode, dtype, results[-1]["images_per_s"], achieved, 100 * achieved / peak, peak,
                 100 * stats["model"].spread)
        del model, step
    return {
        "machine": machine_info(),
        "settings": {"batch_size": batch_size, "dtype": dtype, "mode": mode, "warmup": warmup,
                     "repeats": repeats, "min_repeat_s": min_repeat_s, "matmul_size": matmul_size,
                     "overrides": overrides},
        "results": results,
    }


# ------------------------------------------------------------------------------------------ runtimes
def benchmark_runtimes(
    models: list[str | nn.Module],
    runtimes: list[str],
    *,
    batch_size: int = 16,
    repeats: int = 5,
    warmup: int = 1,
    min_repeat_s: float = 0.5,
    overrides: dict[str, Any] | None = None,
    agreement_images: Any = None,
    num_agreement_images: int = 64,
    matmul_size: int = 2048,
    seed: int = 0,
) -> dict[str, Any]:
    """Inference runtimes of each model side by side (``vitlab.export.runtimes``): images/s at
    ``batch_size`` and latency at batch 1, all runtimes timed in the same interleaved rounds, and each
    runtime's agreement and max |logit difference| with float32 PyTorch on real images
    (``agreement_images``: a data source, else the bundled digits, at the model's preprocessing): top-1 for a
    classifier, the argmax class per query of a detector and per pixel of a segmenter.

    ``models`` are registered names (randomly initialised, with ``overrides``) or models (a loaded
    checkpoint: its own weights, so agreement means something).

    Achieved GFLOP/s (the model's forward FLOPs, whatever the runtime computes in) is set against an n x n
    matmul timed in the same rounds, in the runtime's compute dtype: bfloat16 for the ``bf16`` runtimes,
    float32 for the rest (int8 runtimes included: there is no int8 reference, so theirs can pass 100%).
    ``fraction_of_matmul`` is the median over rounds of the two, so a machine that speeds up or slows down
    between rounds moves both. Set-up time (export, quantisation, torch.compile's compile on the first call)
    is reported apart.
    """
    from vitlab.export.onnx import TASK_OUTPUTS, _resolve_images, preprocess
    from vitlab.export.runtimes import build_runtime, compile_failure, setup_seconds, slow_bf16_reason
    from vitlab.models.factory import create_model
    from vitlab.train.evaluate import logits_of

    overrides = dict(overrides or {})
    if overrides and any(isinstance(m, nn.Module) for m in models):
        raise ValueError("overrides apply to registered names, not to a loaded model")
    check_overrides(list(models), overrides)
    for rt in runtimes:
        if reason := slow_bf16_reason(rt, torch.device("cpu")):
            log.warning("%s", reason)
    results = []
    for entry in models:
        torch.manual_seed(seed)
        if isinstance(entry, nn.Module):
            model = entry.eval()
            name = getattr(model, "model_name", type(model).__name__)
        else:
            name = entry
            model = create_model(name, **overrides).eval()
            model.model_name = name
        task = getattr(model, "task", "classification")
        class_dim = TASK_OUTPUTS[task].class_dim if task in TASK_OUTPUTS else -1
        raw, source = _resolve_images(agreement_images, num_agreement_images)
        x_real = preprocess(raw, model.preprocessing, task)
        c, h, w = model.preprocessing.input_size
        g = torch.Generator().manual_seed(seed)
        x_batch = torch.randn(batch_size, c, h, w, generator=g)
        x_one = x_batch[:1]
        with torch.no_grad():
            ref = logits_of(model(x_real)).float()
        built = {}
        for rt in runtimes:
            built[rt] = build_runtime(rt, model, validate_images=agreement_images,
                                      num_images=min(num_agreement_images, 16))
            built[rt](x_one)  # first call: compiles torch-compile, warms the others
        steps_b = {rt: (lambda r=r, xb=x_batch: r(xb)) for rt, r in built.items()}
        steps_1 = {rt: (lambda r=r, x1=x_one: r(x1)) for rt, r in built.items()}
        compute = {rt: "bfloat16" if "bf16" in rt else "float32" for rt in runtimes}
        matmul_flops = 0.0
        for dtype in sorted(set(compute.values())):
            steps_b[f"matmul-{dtype}"], matmul_flops = matmul_step(matmul_size, dtype=dtype)
        flops_per_image = (model_forward_flops(model, (c, h, w)) if isinstance(entry, nn.Module)
                           else registry_forward_flops(name, **overrides)[0])
        stats_b = run_interleaved(steps_b, warmup=warmup, repeats=repeats, min_repeat_s=min_repeat_s)
        stats_1 = run_interleaved(steps_1, warmup=warmup, repeats=repeats, min_repeat_s=min_repeat_s)
        base = stats_b[runtimes[0]] if "torch" not in stats_b else stats_b["torch"]
        # a randomly initialised classifier has a zero head (as in timm): every logit is 0, every argmax class 0,
        # and "agreement" would be 100% whatever the runtime computes
        constant = bool((ref == ref.flatten()[0]).all())
        for rt, r in built.items():
            out = r(x_real)
            matmul = stats_b[f"matmul-{compute[rt]}"]
            results.append({
                "model": name, "runtime": rt, "batch_size": batch_size,
                "images_per_s": batch_size / stats_b[rt].median,
                "gflops_per_image_fwd": flops_per_image / 1e9,
                "achieved_gflops": flops_per_image * batch_size / stats_b[rt].median / 1e9,
                "matmul_dtype": compute[rt], "matmul_gflops": matmul_flops / matmul.median / 1e9,
                "fraction_of_matmul": paired_ratio(stats_b[rt], matmul).median * flops_per_image * batch_size
                / matmul_flops,
                "latency_ms_batch1": 1000 * stats_1[rt].median,
                "speedup_vs_first": paired_ratio(stats_b[rt], base).median,
                "top1_agreement": None if constant else (out.argmax(class_dim) == ref.argmax(class_dim)).float()
                .mean().item(),
                "max_abs_logit_diff": (out - ref).abs().max().item(),
                "agreement_kind": TASK_OUTPUTS[task].agreement if task in TASK_OUTPUTS else "top-1 agreement",
                "agreement_images": f"{len(x_real)} ({source})",
                "setup_s": setup_seconds(r),
                "compile_failed": compile_failure(r),
                "timing": stats_b[rt].to_dict(), "timing_batch1": stats_1[rt].to_dict(),
                "matmul_timing": matmul.to_dict(),
            })
            log.info("%s %s: %.1f img/s, batch-1 %.1f ms, agreement %s", name, rt, results[-1]["images_per_s"],
                     results[-1]["latency_ms_batch1"], "n/a" if constant else f"{results[-1]['top1_agreement']:.3f}")
        del built
    return {
        "machine": machine_info(),
        "settings": {"batch_size": batch_size, "runtimes": runtimes, "repeats": repeats, "warmup": warmup,
                     "min_repeat_s": min_repeat_s, "matmul_size": matmul_size, "overrides": overrides},
        "results": results,
    }
