"""ONNX export of models over 2 GB: the weights in one external data file beside the .onnx (model.onnx +
model.onnx.data). No test needs a 2 GB model: the size limit is lowered so that a tiny ViT goes that way."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnx", reason="ONNX export tests need the optional extra: pip install 'vitlab[export]'")
pytest.importorskip("onnxruntime", reason="ONNX export tests need the optional extra: pip install 'vitlab[export]'")
pytest.importorskip("onnxscript", reason="ONNX export tests need the optional extra: pip install 'vitlab[export]'")

import onnx
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

import vitlab
import vitlab.export.onnx as export_module
from vitlab.cli.main import main
from vitlab.export import (
    ExportError,
    ExportValidationError,
    OnnxModel,
    bundled_images,
    export_onnx,
    preprocess,
    read_metadata,
)
from vitlab.export.runtime import graph_tensors

from model_helpers import train_tiny_digits_vit

# the tiny model below: float32 tensors of about 106 kB in the exported graph, 36 kB once quantised to int8
FLOAT_BYTES, INT8_BYTES = 106_000, 36_000
CLASSES = [f"digit {i}" for i in range(10)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny ViT trained for a few seconds on the bundled digits (its classes mean something)."""
    return train_tiny_digits_vit(tmp_path_factory.mktemp("ext") / "model.safetensors", CLASSES)


@pytest.fixture
def limit(monkeypatch):
    """Lower the single-file limit to ``n`` bytes (no graph margin)."""
    def set_limit(n: int) -> None:
        monkeypatch.setattr(export_module, "MAX_PROTO_BYTES", n)
        monkeypatch.setattr(export_module, "GRAPH_MARGIN_BYTES", 0, raising=False)
    return set_limit


def _locations(path: Path) -> set[str]:
    proto = onnx.load(str(path), load_external_data=False)
    return {ExternalDataInfo(t).location for t in graph_tensors(proto.graph) if uses_external_data(t)}


def _inline_bytes(path: Path) -> int:
    proto = onnx.load(str(path), load_external_data=False)
    return sum(t.ByteSize() for t in graph_tensors(proto.graph) if not uses_external_data(t))


def test_the_limit_is_protobufs_with_a_stated_margin():
    """2 GiB (protobuf's limit), less room for the graph: 2.0-2.08 GB of weights are one file, more are two."""
    assert export_module.MAX_PROTO_BYTES == 2**31 - 1
    assert 0 < export_module.GRAPH_MARGIN_BYTES <= 128 * 2**20
    assert not export_module.needs_external_data(2_050_000_000)
    assert export_module.needs_external_data(2**31 - export_module.GRAPH_MARGIN_BYTES)


def test_two_files_same_outputs_and_metadata(tmp_path, checkpoint, limit):
    """Over the limit: model.onnx + model.onnx.data; the .onnx holds no weights and references the data file by
    its relative name; ONNX Runtime gives PyTorch's logits (at other sizes too); the metadata reads back."""
    limit(FLOAT_BYTES // 2)
    model = vitlab.load_model(checkpoint)
    path = tmp_path / "m.onnx"
    report = export_onnx(model, path, dynamic_batch=True, dynamic_size=True, num_images=16, timing=False)
    data = tmp_path / "m.onnx.data"
    assert report.written and report.data_path == str(data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]  # no temporary left
    assert _locations(path) == {"m.onnx.data"}
    assert report.data_bytes == data.stat().st_size > 100_000 and _inline_bytes(path) < 0.1 * report.data_bytes
    assert report.max_abs_diff < 1e-4 and report.top1_agreement == 1.0 and len(report.other_sizes) == 2
    assert "m.onnx + m.onnx.data" in report.format() and report.to_dict()["data_path"] == str(data)

    onnx_model = OnnxModel(path)
    any_size = export_module._any_size_model(model)  # the PyTorch model at other sizes
    for size in (16, 24):
        x = preprocess(bundled_images(5), vitlab.Preprocessing(input_size=(1, size, size), crop_pct=1.0, mean=(0.5,),
                                                               std=(0.5,)))
        with torch.no_grad():
            ref = any_size(x)
        torch.testing.assert_close(onnx_model(x), ref, atol=1e-4, rtol=1e-4)
    meta = read_metadata(path)
    assert meta["model"] == "vit_tiny_patch16_224" and meta["class_names"] == CLASSES
    assert vitlab.Preprocessing.from_dict(meta["preprocessing"]) == model.preprocessing
    assert meta["input"]["dynamic_size"] and meta["input"]["size_multiple"] == [4, 4]


def test_cli_export_names_both_files_and_predict_reads_them(tmp_path, checkpoint, limit, capsys):
    from PIL import Image

    from vitlab.data.sources import read_digits

    limit(FLOAT_BYTES // 2)
    out = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--output", str(out), "--num-images", "8", "--no-timing",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["path"] == str(out) and report["data_path"] == str(tmp_path / "m.onnx.data")
    images, _, _ = read_digits()
    paths = []
    for i in range(6):
        p = tmp_path / f"d{i}.png"
        Image.fromarray(images[i * 7, 0].numpy()).save(p)
        paths.append(str(p))
    assert main(["predict", *paths, "--checkpoint", str(checkpoint), "--json"]) == 0
    ref = json.loads(capsys.readouterr().out)
    assert main(["predict", *paths, "--checkpoint", str(out), "--json"]) == 0
    from_file = json.loads(capsys.readouterr().out)
    top = lambda r: [x["predictions"][0]["class"] for x in r]
    assert top(from_file) == top(ref) and top(ref)[0].startswith("digit ")


def test_missing_data_file_is_a_clear_error(tmp_path, checkpoint, limit, caplog):
    limit(FLOAT_BYTES // 2)
    path = tmp_path / "m.onnx"
    export_onnx(vitlab.load_model(checkpoint), path, num_images=4, timing=False)
    moved = tmp_path / "elsewhere.data"
    os.replace(tmp_path / "m.onnx.data", moved)
    with pytest.raises(FileNotFoundError, match=r"external data file .*m\.onnx\.data, which is missing.*copy both"):
        OnnxModel(path)
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(["predict", str(tmp_path / "x.png"), "--checkpoint", str(path)]) == 2
    assert "m.onnx.data, which is missing" in caplog.text
    os.replace(moved, tmp_path / "m.onnx.data")
    assert OnnxModel(path).num_classes == 10  # back beside it, it runs


def test_a_refused_export_leaves_neither_file(tmp_path, checkpoint, limit, monkeypatch):
    limit(FLOAT_BYTES // 2)
    model = vitlab.load_model(checkpoint)
    real_forward = OnnxModel.forward
    monkeypatch.setattr(OnnxModel, "forward", lambda self, x: real_forward(self, x) + 0.01)
    with pytest.raises(ExportValidationError, match="refusing to write") as e:
        export_onnx(model, tmp_path / "m.onnx", num_images=4, timing=False)
    assert list(tmp_path.iterdir()) == []
    assert "m.onnx + m.onnx.data (NOT written)" in e.value.report.format()


def test_a_failed_rename_leaves_neither_file_and_keeps_the_previous_pair(tmp_path, checkpoint, limit, monkeypatch):
    """The data file is renamed first, then the .onnx; when the second rename fails, the first is undone: no new
    file is left, and an earlier export being replaced is whole again."""
    limit(FLOAT_BYTES // 2)
    model = vitlab.load_model(checkpoint)
    path, data = tmp_path / "m.onnx", tmp_path / "m.onnx.data"
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(dst) == path:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(export_module.os, "replace", failing_replace)
    with pytest.raises(ExportError, match="cannot write it"):
        export_onnx(model, path, num_images=4, timing=False)
    assert list(tmp_path.iterdir()) == []

    monkeypatch.setattr(export_module.os, "replace", real_replace)
    export_onnx(model, path, num_images=4, timing=False)
    before = (path.read_bytes(), data.read_bytes())
    monkeypatch.setattr(export_module.os, "replace", failing_replace)
    with torch.no_grad():
        model.head.bias.add_(1.0)  # another model: other weights in the data file
    with pytest.raises(ExportError, match="cannot write it"):
        export_onnx(model, path, num_images=4, timing=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert (path.read_bytes(), data.read_bytes()) == before


def test_data_files_are_replaced_only_with_their_onnx_file(tmp_path, checkpoint, limit, monkeypatch):
    """A data file that is not the existing .onnx's is left alone (the export refuses, naming it); replacing a
    two-file export by a one-file one removes the data file that nothing uses any more."""
    limit(FLOAT_BYTES // 2)
    model = vitlab.load_model(checkpoint)
    path, data = tmp_path / "m.onnx", tmp_path / "m.onnx.data"
    data.write_bytes(b"someone's file")
    with pytest.raises(ExportError, match=r"m\.onnx\.data exists and is not the data file of m\.onnx"):
        export_onnx(model, path, num_images=4, timing=False)
    assert data.read_bytes() == b"someone's file" and not path.exists()
    data.unlink()
    export_onnx(model, path, num_images=4, timing=False)
    export_onnx(model, path, num_images=4, timing=False)  # replaces both
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"] and OnnxModel(path)
    limit(10 * FLOAT_BYTES)
    report = export_onnx(model, path, num_images=4, timing=False)
    assert report.data_path is None and "m.onnx.data" not in report.format()
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"] and _locations(path) == set()


@pytest.mark.parametrize(("limit_bytes", "two_files"), [(INT8_BYTES // 2, True), ((INT8_BYTES + FLOAT_BYTES) // 2, False)])
def test_int8(tmp_path, checkpoint, limit, capsys, limit_bytes, two_files):
    """--int8 from a float graph over the limit: the quantised file is two files where it is over the limit
    too, one file again where it fits."""
    limit(limit_bytes)
    out = tmp_path / "q.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--output", str(out), "--int8", "--dynamic-batch",
                 "--num-images", "64", "--min-agreement", "0.95", "--no-timing", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["written"] and report["int8"] and report["int8_top1_agreement"] >= 0.95
    assert read_metadata(out)["int8"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == (["q.onnx", "q.onnx.data"] if two_files else ["q.onnx"])
    assert _locations(out) == ({"q.onnx.data"} if two_files else set())
    assert report["data_path"] == (str(tmp_path / "q.onnx.data") if two_files else None)
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops


def test_onnx_runtime_of_a_checkpoint_over_the_limit(checkpoint, limit):
    """``--runtime onnx`` (benchmark, eval, predict) exports into a temporary folder and runs that: the two files
    are read before the folder goes."""
    from vitlab.export.runtimes import build_runtime

    limit(FLOAT_BYTES // 2)
    model = vitlab.load_model(checkpoint).eval()
    x = preprocess(bundled_images(8), model.preprocessing)
    with torch.no_grad():
        ref = model(x)
    torch.testing.assert_close(build_runtime("onnx", model)(x), ref, atol=1e-4, rtol=1e-4)
