"""Does ``torch.compile`` work on every family? One tiny model per family (the default export-test selection),
through the ``torch-compile`` (float32, inductor freezing) and ``torch-bf16-compile`` runtimes.

For each: whether it compiled or fell back to eager, the first call's time (the compile), the largest logit
difference against the same model run eagerly (float32, or the eager bfloat16 copy), whether a second call at
the same size reused the first graph, and whether a second batch size (a recompile) gives the same logits.
Writes benchmarks/results/compile_families.json.

    .venv/bin/python benchmarks/compile_families.py
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))

import torch
from torch._dynamo.utils import counters

from test_export import _registry_params  # noqa: E402
from vitlab.benchmark import machine_info
from vitlab.export import bundled_images, preprocess
from vitlab.export.runtimes import Compiled, build_runtime, setup_seconds

from model_helpers import make_tiny, perturb_  # noqa: E402  (tests/ is on the path)


def check(name: str) -> dict:
    torch.manual_seed(0)
    model = perturb_(make_tiny(name), std=0.05).eval()
    x = preprocess(bundled_images(4), model.preprocessing)
    row: dict = {"model": name}
    for rt in ("torch-compile", "torch-bf16-compile"):
        torch._dynamo.reset()
        ref = build_runtime("torch" if rt == "torch-compile" else "torch-bf16-full", model)(x)
        runtime = build_runtime(rt, model)
        counters.clear()
        try:
            out = runtime(x)
            again = runtime(x)  # the same size again: must reuse the graph (a cache mutated in forward would not)
            graphs = counters["stats"]["unique_graphs"]
            out3 = runtime(x[:3])
        except Exception as e:  # the runtime falls back by itself; anything escaping it is a finding
            row[rt] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            continue
        compiled = next(m for m in runtime.modules() if isinstance(m, Compiled))
        row[rt] = {"fell_back": compiled.failed, "compile_s": round(setup_seconds(runtime), 1),
                   "max_abs_diff_vs_eager": float((out - ref).abs().max()), "logit_scale": float(ref.abs().max()),
                   "batch3_max_abs_diff": float((out3 - out[:3]).abs().max()),
                   "graphs_after_two_calls": graphs, "repeat_equal": bool(torch.equal(out, again))}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    warnings.filterwarnings("ignore")
    names = [p.values[0] for p in _registry_params() if not p.marks]
    rows = [check(n) for n in names]
    out = {"machine": machine_info(), "command": " ".join(sys.argv), "rows": rows}
    (REPO / "benchmarks" / "results" / "compile_families.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
