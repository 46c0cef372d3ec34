"""vitlab's ONNX files in OpenVINO: one tiny model of every family (the rows of export_table.py) exported with a
dynamic batch (and dynamic size where vitlab allows it), run by OpenVINO's CPU plugin in float32 and by ONNX Runtime
on the same random inputs, at the export size and, for dynamic-size files, 32 px larger; prints the largest output
difference per row.

OpenVINO is not a vitlab dependency: install it beside the venv to run this (``pip install openvino``).

    .venv/bin/python benchmarks/openvino_onnx_check.py [ROW ...]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import onnxruntime as ort  # noqa: E402
import openvino as ov  # noqa: E402
import torch  # noqa: E402
from export_table import ROWS, build  # noqa: E402

from vitlab.export import export_onnx  # noqa: E402
from vitlab.export.runtime import read_metadata  # noqa: E402


def check(label: str, name: str, over: dict, core: ov.Core) -> str:
    model = build(name, over)
    path = Path(tempfile.mkdtemp()) / "model.onnx"
    try:
        export_onnx(model, path, dynamic_batch=True, dynamic_size=True, timing=False, num_images=4)
    except Exception:  # refused for this family (the README says why): fixed size
        export_onnx(model, path, dynamic_batch=True, timing=False, num_images=4)
    graph = core.read_model(str(path))
    dims = [d.get_length() if d.is_static else None for d in graph.inputs[0].get_partial_shape()]
    compiled = core.compile_model(graph, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    h, w = read_metadata(path)["preprocessing"]["input_size"][1:]
    sizes = [(h, w)] + ([(h + 32, w + 32)] if dims[2] is None else [])
    out = []
    for hh, ww in sizes:
        x = torch.randn(3, dims[1], hh, ww).numpy()
        ref = session.run(None, {session.get_inputs()[0].name: x})
        got = compiled.create_infer_request().infer({0: x})
        diff = max(float(np.abs(np.asarray(got[i]) - r).max()) for i, r in enumerate(ref))
        scale = max(float(np.abs(r).max()) for r in ref)
        out.append(f"{hh}x{ww}: {diff:.1e} (scale {scale:.2f})")
    return f"| {label} | {'yes' if dims[2] is None else 'no'} | {' / '.join(out)} |"


def main() -> None:
    torch.set_num_threads(1)
    core = ov.Core()
    only = sys.argv[1:]
    print(f"OpenVINO {ov.__version__}, onnxruntime {ort.__version__}\n")
    print("| family | dynamic size | largest difference, OpenVINO vs ONNX Runtime |\n|---|---|---|")
    for label, name, over in ROWS:
        if not only or any(o in label for o in only):
            print(check(label, name, over, core), flush=True)


if __name__ == "__main__":
    main()
