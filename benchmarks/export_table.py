"""The export table of benchmarks/RESULTS.md: every model kind exported (fixed size, then dynamic size),
validated against PyTorch on the bundled digits, as a Markdown table.

    /work/main/.venv/bin/python benchmarks/export_table.py [NAME ...]    # default: one tiny model per kind

Each model is built tiny (tests/model_helpers.py overrides, weights perturbed so that no zero-initialised
head hides a difference) and exported with a dynamic batch.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))

import vitlab
from vitlab.export import ExportError, export_onnx
from vitlab.models import get_entry

from model_helpers import make_tiny, perturb_

DEFAULT = ["vit_tiny_patch16_224", "vit_base_r50_s16_224", "deit_tiny_distilled_patch16_224", "cait_xxs24_224",
           "resnet18"]


def row(name: str) -> str:
    model = perturb_(make_tiny(name), std=0.05).eval()
    fam = get_entry(name).family
    with tempfile.TemporaryDirectory() as tmp:
        try:
            r = export_onnx(model, Path(tmp) / "f.onnx", dynamic_batch=True, num_images=32, timing=False)
            fixed = f"yes | {r.max_abs_diff:.1e} | {100 * r.top1_agreement:.0f}%"
        except ExportError as e:
            return f"| {fam} | {name} | no: {str(e)[:120]} | | | |"
        try:
            d = export_onnx(model, Path(tmp) / "d.onnx", dynamic_batch=True, dynamic_size=True, num_images=32,
                            timing=False)
            sizes = ", ".join(f"{s.size[0]}x{s.size[1]} {s.max_abs_diff:.0e}" for s in d.other_sizes)
            dyn = f"yes (checked at {sizes})"
        except ExportError as e:
            dyn = f"no: {str(e)[:160]}"
    return f"| {fam} | {name} | {fixed} | {dyn} |"


if __name__ == "__main__":
    names = sys.argv[1:] or DEFAULT
    print(f"vitlab {vitlab.__version__}; tiny models, 32 bundled digits, ONNX Runtime CPU, float32")
    print("| family | model (tiny) | exported | max abs logit diff | top-1 agreement | dynamic size |")
    print("|---|---|---|---|---|---|")
    for n in names:
        print(row(n), flush=True)
