"""ONNX export of the dense models: DETR (logits + boxes) and SETR (per-pixel logits), validated against
PyTorch, with their task in the metadata, and run by detect / segment / eval in place of a checkpoint
(needs the optional extra vitlab[export]).

An export costs 6-18 s on two shared cores, so the default run exports twice (a dynamic-size DETR on a
ResNet through the command line, a fixed-size SETR-naive); checks that only need an exported file reuse
those (the graph export is swapped for a copy, the validation runs for real). DETR on a ViT and the PUP
and MLA decoders run with -m slow.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnx", reason="ONNX export tests need the optional extra: pip install 'vitlab[export]'")
pytest.importorskip("onnxruntime", reason="ONNX export tests need the optional extra: pip install 'vitlab[export]'")
pytest.importorskip("onnxscript", reason="ONNX export tests need the optional extra: pip install 'vitlab[export]'")

import vitlab
from dense_helpers import DETR_EXPORT, SETR_EXPORT, make_test_canvases
from vitlab.cli.main import main
from vitlab.export import ExportError, ExportValidationError, InputSizeError, OnnxModel, export_onnx, read_metadata
from vitlab.export.onnx import rebuild

from model_helpers import perturb_

DETR_VIT = {**DETR_EXPORT, "backbone_args": {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8, "img_size": 32}}
CLASSES = ["ring", "bar", "dot"]


def _detr(name: str = "detr_resnet50", **over) -> torch.nn.Module:
    torch.manual_seed(0)
    return perturb_(vitlab.create_model(name, **{**DETR_EXPORT, **over}), std=0.05).eval()


def _setr(decoder: str = "naive") -> torch.nn.Module:
    torch.manual_seed(0)
    return perturb_(vitlab.create_model(f"setr_{decoder}_vit_small_patch16", **SETR_EXPORT), std=0.05).eval()


def _images(c: int, h: int, w: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def _assert_same_outputs(onnx_model: OnnxModel, model: torch.nn.Module, x: torch.Tensor, names: tuple[str, ...]):
    with torch.no_grad():
        ref = model(x)
    out = onnx_model(x)
    assert set(out) == set(names)  # the auxiliary outputs are not exported
    for k in names:
        torch.testing.assert_close(out[k], ref[k], atol=1e-4, rtol=1e-4,
                                   msg=lambda e, k=k: f"{k} at {tuple(x.shape[-2:])}: {e}")


def _save_png(path: Path, h: int, w: int, seed: int) -> Path:
    import numpy as np
    from PIL import Image

    g = np.random.default_rng(seed)
    Image.fromarray((g.random((h, w)) * 255).astype(np.uint8)).save(path)
    return path


# ------------------------------------------------------------------------------------ DETR (default)
@pytest.fixture(scope="module")
def detr_export(tmp_path_factory):
    """A tiny grey DETR on a ResNet, saved as a checkpoint with class names and exported by the command line
    with a dynamic batch and size: (checkpoint, ONNX file, the export's JSON report)."""
    tmp = tmp_path_factory.mktemp("detr")
    ckpt = vitlab.save_model(_detr(), tmp / "detr.safetensors", class_names=CLASSES)
    path = tmp / "detr.onnx"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--output", str(path), "--dynamic-batch",
                   "--dynamic-size", "--num-images", "4", "--no-timing", "--json"])
    assert rc == 0
    return ckpt, path, json.loads(buf.getvalue()[buf.getvalue().index("{"):])


def test_detr_export_matches_pytorch_at_any_size(detr_export):
    ckpt, path, report = detr_export
    assert report["written"] and report["task"] == "detection" and report["dynamic_size"]
    assert set(report["output_diffs"]) == {"logits", "boxes"}
    assert max(report["output_diffs"].values()) < 1e-4 and report["top1_agreement"] == 1.0
    assert len(report["other_sizes"]) == 2 and all(s["max_abs_diff"] < 1e-4 for s in report["other_sizes"])
    model = vitlab.load_model(ckpt).eval()
    m = OnnxModel(path)
    assert m.dynamic_size and m.task == "detection" and m.output_names == ["logits", "boxes"]
    # sizes the export did not check: non-square, not multiples of the backbone's stride, a batch of 3
    for h, w in [(32, 32), (40, 56), (75, 33)]:
        _assert_same_outputs(m, model, _images(1, h, w, n=3, seed=h), ("logits", "boxes"))
    out = m(_images(1, 40, 56))
    assert out["logits"].shape == (2, 4, 4) and out["boxes"].shape == (2, 4, 4)  # (B, Q, C + 1), (B, Q, 4)
    assert 0 <= out["boxes"].min() and out["boxes"].max() <= 1


def test_detr_metadata_round_trip(detr_export):
    import onnx

    _, path, _ = detr_export
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props["task"] == "detection" and json.loads(props["output_names"]) == ["logits", "boxes"]
    assert "no object" in json.loads(props["outputs"])["logits"]
    assert "normalised (cx, cy, w, h)" in json.loads(props["outputs"])["boxes"]
    assert json.loads(props["class_names"]) == CLASSES and json.loads(props["input_size"]) == [1, 32, 32]
    meta = read_metadata(path)
    assert meta["task"] == "detection" and meta["num_classes"] == 3
    assert "every pixel as real" in meta["input"]["padding_mask"]
    m = OnnxModel(path)
    assert m.class_names == CLASSES and m.num_classes == 3 and m.model_name == "detr_resnet50"


def test_exported_detr_refuses_a_padding_mask(detr_export):
    m = OnnxModel(detr_export[1])
    x = _images(1, 32, 32)
    mask = torch.ones(2, 32, 32, dtype=torch.bool)
    torch.testing.assert_close(m(x, mask)["logits"], m(x)["logits"])  # all real: the same as no mask
    mask[1, :, 20:] = False
    with pytest.raises(InputSizeError, match="takes the image only"):
        m(x, mask)


def _detect(image: Path, checkpoint: Path, output: Path) -> list[dict]:
    """`vitlab detect IMAGE --checkpoint CHECKPOINT --threshold 0`'s objects."""
    assert main(["detect", str(image), "--checkpoint", str(checkpoint), "--threshold", "0",
                 "--output", str(output)]) == 0
    return json.loads((output / "detections.json").read_text())[0]["objects"]


def test_detect_with_the_onnx_file(detr_export, tmp_path, capsys, caplog):
    """`vitlab detect` with the .onnx file gives the checkpoint's detections (a non-square image: the
    dynamic-size file keeps DETR's aspect-preserving resize)."""
    ckpt, path, _ = detr_export
    image = _save_png(tmp_path / "canvas.png", 30, 47, seed=1)
    results = {name: _detect(image, source, tmp_path / name) for name, source in (("torch", ckpt), ("onnx", path))}
    assert len(results["onnx"]) == 4 and (tmp_path / "onnx" / "canvas.png").is_file()
    for a, b in zip(results["torch"], results["onnx"]):
        assert a["label"] == b["label"] and a["label"] in CLASSES
        assert a["score"] == pytest.approx(b["score"], abs=1e-3)
        assert a["box_xyxy"] == pytest.approx(b["box_xyxy"], abs=0.02)
    assert main(["detect", str(image), "--checkpoint", str(path), "--runtime", "torch",
                 "--output", str(tmp_path / "x")]) == 2
    capsys.readouterr()
    assert main(["predict", str(image), "--checkpoint", str(path)]) == 2  # a classifier's command
    assert "a detection model; `vitlab predict` works on classifiers. Run it with `vitlab detect`" in (
        caplog.text + capsys.readouterr().err)


def test_detect_with_an_onnx_file_keeps_the_models_longer_side_cap(tmp_path):
    """A DETR whose longer side is capped below DETR's 5/3 (a Hugging Face processor's longest_edge): the
    dynamic-size file records the cap and `vitlab detect` with it resizes as the checkpoint does."""
    model = _detr()
    model.set_resize(32, 40)  # 5/3 would give 53 for a 1:3 image
    ckpt = vitlab.save_model(model, tmp_path / "capped.safetensors", class_names=CLASSES)
    path = tmp_path / "capped.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--output", str(path), "--dynamic-size", "--num-images", "2",
                 "--no-timing"]) == 0
    assert OnnxModel(path).max_size == 40
    image = _save_png(tmp_path / "wide.png", 20, 60, seed=2)
    results = {name: _detect(image, source, tmp_path / name) for name, source in (("torch", ckpt), ("onnx", path))}
    for a, b in zip(results["torch"], results["onnx"], strict=True):
        assert a["score"] == pytest.approx(b["score"], abs=1e-3)
        assert a["box_xyxy"] == pytest.approx(b["box_xyxy"], abs=0.02)


@pytest.fixture
def reuse_export(monkeypatch):
    """Swap the graph export for a copy of an already exported file of the same model (the validation,
    quantisation and metadata steps still run)."""
    def use(path: Path) -> None:
        def copy(graph, x, dst, **kwargs):
            shutil.copy(path, dst)
            return "copy of an earlier export"

        monkeypatch.setattr("vitlab.export.onnx.export_graph", copy)
    return use


def test_boxes_beyond_tolerance_are_refused(detr_export, reuse_export, tmp_path, monkeypatch):
    """The boxes are checked as well as the logits: a file whose boxes alone disagree is not written."""
    ckpt, path, _ = detr_export
    reuse_export(path)
    real = OnnxModel.run_outputs
    monkeypatch.setattr(OnnxModel, "run_outputs", lambda self, x: {**real(self, x), "boxes": real(self, x)["boxes"] + 0.01})
    out = tmp_path / "bad.onnx"
    with pytest.raises(ExportValidationError, match=r"refusing to write .*float32 ONNX boxes differ .* tolerance") as e:
        export_onnx(vitlab.load_model(ckpt), out, dynamic_batch=True, dynamic_size=True, num_images=4, timing=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert e.value.report.output_diffs["logits"] < 1e-4 and e.value.report.output_diffs["boxes"] > 5e-3
    assert "max |boxes diff|" in e.value.report.format()


def test_detr_int8_reports_query_agreement(detr_export, reuse_export, tmp_path):
    ckpt, path, _ = detr_export
    reuse_export(path)
    report = export_onnx(vitlab.load_model(ckpt), tmp_path / "q.onnx", dynamic_batch=True, dynamic_size=True,
                         int8=True, num_images=16, timing=False, min_agreement=0.5)
    assert report.written and report.int8_top1_agreement is not None and report.int8_top1_agreement >= 0.5
    assert set(report.int8_output_diffs) == {"logits", "boxes"} and report.int8_output_diffs["boxes"] > 0
    assert "int8 ONNX vs float32 PyTorch: per-query class agreement" in report.format()
    assert read_metadata(tmp_path / "q.onnx")["int8"] is True


# ------------------------------------------------------------------------------------ SETR (default)
@pytest.fixture(scope="module")
def canvases(tmp_path_factory) -> Path:
    return make_test_canvases(tmp_path_factory.mktemp("canvases"), train=2)


def test_setr_fixed_size_export_segment_and_eval(tmp_path, canvases, capsys):
    """SETR-naive at a fixed size: ONNX Runtime gives PyTorch's per-pixel logits at the input resolution,
    another size is refused, and segment / eval with the .onnx file give the checkpoint's masks and mIoU."""
    classes = json.loads((canvases / "classes.json").read_text())
    torch.manual_seed(0)
    model = perturb_(vitlab.create_model("setr_naive_vit_small_patch16", **{**SETR_EXPORT, "num_classes": len(classes)}),
                     std=0.05).eval()
    ckpt = vitlab.save_model(model, tmp_path / "setr.safetensors", class_names=classes)
    path = tmp_path / "setr.onnx"
    report = export_onnx(vitlab.load_model(ckpt), path, dynamic_batch=True, num_images=4, timing=False)
    assert report.written and report.task == "segmentation" and report.max_abs_diff < 1e-4
    assert report.agreement == "per-pixel class agreement" and report.top1_agreement == 1.0
    m = OnnxModel(path)
    assert m.task == "segmentation" and m.input_hw == (32, 32) and m.num_classes == len(classes)
    _assert_same_outputs(m, model, _images(1, 32, 32, n=3), ("logits",))
    assert m(_images(1, 32, 32))["logits"].shape == (2, len(classes), 32, 32)
    with pytest.raises(InputSizeError, match=r"exported for 32x32 images and got 48x40.*--dynamic-size"):
        m(_images(1, 48, 40))
    assert [o["name"] for o in read_metadata(path)["outputs"]] == ["logits"]

    image = canvases / "val" / "images" / "00001.png"
    for name, source in (("torch", ckpt), ("onnx", path)):
        assert main(["segment", str(image), "--checkpoint", str(source), "--output", str(tmp_path / name)]) == 0
    import numpy as np
    from PIL import Image

    masks = [np.array(Image.open(tmp_path / n / "00001_mask.png")) for n in ("torch", "onnx")]
    assert (masks[0] == masks[1]).all()
    capsys.readouterr()
    metrics = []
    for source in (ckpt, path):
        assert main(["eval", "--checkpoint", str(source), "--data", str(canvases), "--split", "val", "--json",
                     "--output", str(tmp_path / "eval"), "--overwrite"]) == 0
        metrics.append(json.loads(capsys.readouterr().out))
    assert metrics[1]["mIoU"] == pytest.approx(metrics[0]["mIoU"], abs=1e-6)
    assert metrics[1]["pixel_acc"] == pytest.approx(metrics[0]["pixel_acc"], abs=1e-6)


# ------------------------------------------------------------------------------------------ refusals
def test_dynamic_size_refused_for_a_fixed_size_backbone(tmp_path):
    """A backbone that cannot change size (a Linformer ViT) makes DETR / SETR refuse --dynamic-size up
    front, with the backbone's reason; nothing is written."""
    lin = {"attn_type": "linformer", "linformer_k": 4}
    detr = vitlab.create_model("detr_vit_small_patch16", **{**DETR_VIT, "backbone_args": {**DETR_VIT["backbone_args"], **lin}})
    setr = vitlab.create_model("setr_naive_vit_small_patch16",
                               **{**SETR_EXPORT, "backbone_args": {**SETR_EXPORT["backbone_args"], **lin}})
    for model in (detr, setr):
        with pytest.raises(ExportError, match=r"--dynamic-size is not supported for (DETR|SETR): its backbone "
                                              r"\(vit_small_patch16_224\): Linformer's key/value projections"):
            export_onnx(model.eval(), tmp_path / "x.onnx", dynamic_size=True, num_images=2, timing=False)
    assert list(tmp_path.iterdir()) == []
    assert _detr().onnx_fixed_size_reason is None and _setr().onnx_fixed_size_reason is None


# ------------------------------------------------------------------------------- the rest (slow)
@pytest.mark.slow
@pytest.mark.parametrize(("kind", "over"), [("detr-vit", DETR_VIT), ("setr-naive", "naive"), ("setr-pup", "pup"),
                                            ("setr-mla", "mla")])
def test_dense_dynamic_size_export_matches_pytorch(kind, over, tmp_path):
    """DETR on a ViT backbone (through forward_intermediates; its position table resampled per size) and
    SETR with each decoder: one dynamic-size export, checked here at sizes the export did not check."""
    model = _detr("detr_vit_small_patch16", **over) if kind.startswith("detr") else _setr(over)
    names = ("logits", "boxes") if kind.startswith("detr") else ("logits",)
    report = export_onnx(model, tmp_path / "d.onnx", dynamic_batch=True, dynamic_size=True, num_images=4,
                         timing=False)
    assert report.written and report.max_abs_diff < 1e-4 and report.top1_agreement == 1.0
    assert len(report.other_sizes) == 2 and all(s.max_abs_diff < 1e-4 for s in report.other_sizes)
    # the export rebuilt the ViT with dynamic_img_size: PyTorch's reference at other sizes is that model
    dyn = rebuild(model, backbone_args={**model.cfg.backbone_args, "dynamic_img_size": True})
    m = OnnxModel(tmp_path / "d.onnx")
    for h, w in [(32, 32), (56, 40), (24, 72)]:
        _assert_same_outputs(m, dyn, _images(1, h, w, seed=h), names)

