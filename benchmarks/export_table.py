"""The export table of benchmarks/RESULTS.md: one tiny model of every family exported (fixed size, then
dynamic size), validated against PyTorch on the bundled digits, as a Markdown table.

    /work/main/.venv/bin/python benchmarks/export_table.py [ROW ...]    # default: every row of ROWS

Each model is built tiny (tests/model_helpers.py overrides plus the row's own, weights perturbed so that no
zero-initialised head hides a difference) and exported with a dynamic batch. The dynamic-size column says
"yes" only when the graph agreed with PyTorch at the model's size and at two other sizes (export_onnx
checks them), else the reason the export refused it. For DETR the difference is that of the logits and
the boxes (the larger) and the agreement is the argmax class per query; for SETR the per-pixel logits
and the argmax class per pixel.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))

import vitlab
from dense_helpers import DETR_EXPORT, SETR_EXPORT
from vitlab.export import ExportError, export_onnx

from model_helpers import make_tiny, perturb_

# Swin: a 64 px image, window 4: a 16 x 16 then 8 x 8 map, so both stages have shifted windows (masked)
SWIN_SHIFTED = {"img_size": 64, "window_size": 4}
# the dense models of tests/test_export_dense.py: grey, 32 px, three classes; DETR also on a ViT
DETR_VIT = {**DETR_EXPORT, "backbone_args": {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8, "img_size": 32}}

# (row label, registered name, overrides of the tiny model)
ROWS: list[tuple[str, str, dict]] = [
    ("vit", "vit_tiny_patch16_224", {}),
    ("vit (hybrid R50 stem)", "vit_base_r50_s16_224", {}),
    ("vit (Linformer attention)", "vit_tiny_patch16_224", {"attn_type": "linformer", "linformer_k": 4}),
    ("deit (distilled)", "deit_tiny_distilled_patch16_224", {}),
    ("cait", "cait_xxs24_224", {}),
    ("swin", "swin_tiny_patch4_window7_224", SWIN_SHIFTED),
    ("swinv2", "swinv2_tiny_window8_256", SWIN_SHIFTED),
    ("mobilevit v1", "mobilevit_xxs", {}),
    ("mobilevit v2", "mobilevitv2_050", {}),
    ("mobilevit v3 (v1-based)", "mobilevitv3_xxs", {}),
    ("mobilevit v3 (v2-based)", "mobilevitv3_050", {}),
    ("crossvit", "crossvit_tiny_240", {}),
    ("t2t", "t2t_vit_7", {}),
    ("tnt", "tnt_s_patch16_224", {}),
    ("xcit", "xcit_nano_12_p16_224", {}),
    ("mixer", "mixer_s16_224", {}),
    ("resnet", "resnet18", {}),
    ("beit (v1 / v2: relative position tables)", "beit_base_patch16_224", {}),
    ("beit3 (vision encoder)", "beit3_base_patch16_224", {}),
    ("cct (learned positions)", "cct_7_3x1_32", {}),
    ("cct (sinusoid positions)", "cct_7_3x2_32_sine", {}),
    ("cct (class token, no positions)", "cct_7_3x1_32", {"global_pool": "token", "pos_embed": "none"}),
    ("detr (ResNet backbone)", "detr_resnet50", DETR_EXPORT),
    ("detr (ViT backbone)", "detr_vit_small_patch16", DETR_VIT),
    ("setr naive", "setr_naive_vit_small_patch16", SETR_EXPORT),
    ("setr pup", "setr_pup_vit_small_patch16", SETR_EXPORT),
    ("setr mla", "setr_mla_vit_small_patch16", SETR_EXPORT),
]


def build(name: str, over: dict):
    if name.startswith(("detr", "setr")):
        return perturb_(vitlab.create_model(name, **over), std=0.05).eval()
    return perturb_(make_tiny(name, **over), std=0.05).eval()


def _short(e: Exception) -> str:
    text = str(e)
    return (text.split(": ", 1)[1] if ": " in text else text).replace("|", "/")[:260]


def row(label: str, name: str, over: dict) -> str:
    model = build(name, over)
    c, h, w = model.preprocessing.input_size
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        try:
            r = export_onnx(model, Path(tmp) / "f.onnx", dynamic_batch=True, num_images=32, timing=False)
            agreement = "" if r.task == "classification" else f" ({r.agreement})"
            fixed = f"yes ({h}x{w}) | {r.max_abs_diff:.1e} | {100 * r.top1_agreement:.0f}%{agreement}"
        except ExportError as e:
            return f"| {label} | {name} | no: {_short(e)} | | | no |"
        try:
            d = export_onnx(model, Path(tmp) / "d.onnx", dynamic_batch=True, dynamic_size=True, num_images=32,
                            timing=False)
            sizes = ", ".join(f"{s.size[0]}x{s.size[1]}: {s.max_abs_diff:.0e}" for s in d.other_sizes)
            dyn = f"yes (at {h}x{w}: {d.max_abs_diff:.0e}, {sizes})"
        except ExportError as e:
            dyn = f"no: {_short(e)}"
        took = time.perf_counter() - t0
    return f"| {label} | {name} | {fixed} | {dyn} |  <!-- {took:.0f} s -->"


if __name__ == "__main__":
    wanted = set(sys.argv[1:])
    rows = [r for r in ROWS if not wanted or r[0] in wanted or r[1] in wanted]
    print(f"vitlab {vitlab.__version__}; tiny models, 32 bundled digits, ONNX Runtime CPU, float32")
    print("| family | model (tiny) | exported | max abs logit diff | top-1 agreement | dynamic size |")
    print("|---|---|---|---|---|---|")
    for label, name, over in rows:
        print(row(label, name, over), flush=True)
