"""What vitlab writes never destroys what it should not: detect / segment keep input images and refuse existing
files unless --overwrite; a checkpoint written on a full disk fails with one message naming the file and leaves
the previous one; a killed write leaves only temporaries of vitlab's own names, which the next run removes."""

from __future__ import annotations

import errno
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitlab
from dense_helpers import DETR_TINY, SETR_TINY
from vitlab.checkpoints import CheckpointError, atomic_write, save_model
from vitlab.cli.main import main
from vitlab.train.state import remove_stale_temporaries, save_train_state

TINY_VIT = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=1, num_heads=2, num_classes=3,
                mean=(0.5,), std=(0.5,))


def _photo(path: Path, seed: int) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.random.RandomState(seed).rand(40, 40, 3) * 255).astype("uint8")).save(path)
    return path.read_bytes()


@pytest.fixture(scope="module")
def detector(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = vitlab.create_model("detr_resnet50", **{**DETR_TINY, "img_size": 32, "num_classes": 3})
    return save_model(model, tmp_path_factory.mktemp("detr") / "detr.safetensors", class_names=["a", "b", "c"])


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = vitlab.create_model("setr_pup_vit_small_patch16", **{**SETR_TINY, "img_size": 32, "num_classes": 3})
    return save_model(model, tmp_path_factory.mktemp("setr") / "setr.safetensors", class_names=["bg", "x", "y"])


# ------------------------------------------------------------------------------------ detect / segment outputs
def test_detect_never_writes_over_its_input_image(detector, tmp_path, caplog, monkeypatch):
    monkeypatch.chdir(tmp_path)
    canvas = Path("photos") / "canvas.png"
    before = _photo(canvas, 0)
    for extra in ([], ["--overwrite"]):
        with caplog.at_level(logging.ERROR, logger="vitlab"):
            assert main(["detect", str(canvas), "--checkpoint", str(detector), "--threshold", "0", "--output",
                         "photos", *extra]) == 2
        assert "photos/canvas.png" in caplog.text and "over input images" in caplog.text
        assert "--overwrite never replaces an input image" in caplog.text
        assert canvas.read_bytes() == before and sorted(p.name for p in Path("photos").iterdir()) == ["canvas.png"]
        caplog.clear()


def test_segment_refuses_an_existing_file_unless_overwrite(segmenter, tmp_path, caplog):
    photos = tmp_path / "photos"
    street_jpg = _photo(photos / "street.jpg", 1)
    street_png = _photo(photos / "street.png", 2)  # another picture of the user's, named like the overlay
    args = ["segment", str(photos / "street.jpg"), "--checkpoint", str(segmenter), "--output", str(photos)]
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(args) == 2
    assert f"{photos / 'street.png'} exists; pass --overwrite to replace it" in caplog.text
    # refused before anything was written: no mask, no segments.json
    assert sorted(p.name for p in photos.iterdir()) == ["street.jpg", "street.png"]
    assert (photos / "street.png").read_bytes() == street_png
    assert main([*args, "--overwrite"]) == 0
    assert (photos / "street.png").read_bytes() != street_png and (photos / "street_mask.png").is_file()
    assert (photos / "street.jpg").read_bytes() == street_jpg


def test_detect_again_into_its_output_says_overwrite(detector, tmp_path, caplog):
    image = tmp_path / "in" / "canvas.png"
    _photo(image, 3)
    out = tmp_path / "detections"
    args = ["detect", str(image), "--checkpoint", str(detector), "--threshold", "0", "--output", str(out),
            "--attention"]
    assert main(args) == 0
    picture = (out / "canvas.png").read_bytes()
    (out / "canvas.png").write_bytes(b"edited by hand")
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(args) == 2
    assert (f"{out / 'canvas.png'}, {out / 'canvas_attention.png'}, {out / 'detections.json'} exist (the results of "
            f"an earlier `vitlab detect` there?); pass --overwrite to replace them") in caplog.text
    assert (out / "canvas.png").read_bytes() == b"edited by hand"
    assert main([*args, "--overwrite"]) == 0
    assert (out / "canvas.png").read_bytes() == picture


# ------------------------------------------------------------------------------------ full disk, size limit
def _tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return vitlab.create_model("vit_tiny_patch16_224", **TINY_VIT)


def _fail_torch_save(obj, f, *args, **kwargs):
    Path(f).write_bytes(b"PK\x03\x04 partial")
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")


def _fail_save_file(tensors, filename, metadata=None):
    from safetensors import SafetensorError

    Path(filename).write_bytes(b"partial")
    raise SafetensorError("Error while serializing: I/O error: File too large (os error 27)")


def _no_space(tmp: str) -> None:
    Path(tmp).write_bytes(b"partial")
    raise OSError(errno.ENOSPC, "No space left on device")  # as a write() raises it: no file name


@pytest.mark.parametrize("writer", ["model", "train_state", "text"])
def test_checkpoint_writer_errors_become_one_message(writer, tmp_path, monkeypatch):
    target = tmp_path / {"model": "model.safetensors", "train_state": "train_state.pt", "text": "job.json"}[writer]
    target.write_bytes(b"the previous checkpoint")
    if writer == "model":
        monkeypatch.setattr("safetensors.torch.save_file", _fail_save_file)
        write, original = (lambda: save_model(_tiny_vit(), target)), "File too large (os error 27)"
    elif writer == "text":
        write, original = (lambda: atomic_write(target, _no_space)), "No space left on device"
    else:
        monkeypatch.setattr(torch, "save", _fail_torch_save)
        write, original = (lambda: save_train_state(target, {"step": 1})), "unexpected pos 576 vs 534"
    with pytest.raises(OSError) as info:
        write()
    assert info.value.filename == str(target)
    assert "the disk may be full, or a file-size limit (ulimit -f)" in str(info.value) and original in str(info.value)
    assert target.read_bytes() == b"the previous checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # the temporary is gone


def test_main_reports_a_full_disk_in_one_line(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("safetensors.torch.save_file", _fail_save_file)
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(["train", "--output", str(tmp_path / "run"), "--steps", "1", "--recipe", "digits", "--img-size",
                     "8", "--batch-size", "4", "--no-progress", "--threads", "1", "--set", "model_overrides.depth=1",
                     "--set", "model_overrides.embed_dim=16", "--set", "model_overrides.num_heads=2"]) == 2
    assert (f"error: {tmp_path / 'run' / 'model.safetensors'}: not written: the disk may be full, or a file-size "
            f"limit (ulimit -f) or disk quota reached (Error while serializing: I/O error: File too large (os error "
            f"27)); an earlier file of that name is left as it was") in caplog.text


_SIZE_LIMIT_SCRIPT = """
import resource, signal, sys, torch
import vitlab
from vitlab.checkpoints import save_model
from vitlab.train.state import save_train_state
torch.set_num_threads(1)
out = sys.argv[1]
model = vitlab.create_model("vit_tiny_patch16_224", **{tiny})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
for write in (lambda: save_model(model, out + "/model.safetensors"),
              lambda: save_train_state(out + "/train_state.pt", {{"model": model.state_dict()}})):
    try:
        write()
    except OSError as e:
        print(type(e).__name__, e)
"""


def test_a_real_file_size_limit(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"old model")
    (tmp_path / "train_state.pt").write_bytes(b"old state")
    script = _SIZE_LIMIT_SCRIPT.format(tiny={**TINY_VIT, "embed_dim": 64})  # about 200 KB of weights
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2, r.stdout
    for line, name, original in zip(lines, ["model.safetensors", "train_state.pt"],
                                    ["File too large (os error 27)", "unexpected pos"]):
        assert line.startswith("OSError ") and str(tmp_path / name) in line and "the disk may be full" in line and original in line
    assert (tmp_path / "model.safetensors").read_bytes() == b"old model"
    assert (tmp_path / "train_state.pt").read_bytes() == b"old state"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "train_state.pt"]


# ------------------------------------------------------------------------------------ temporaries of killed writes
def test_save_model_keeps_safetensors_temporaries_in_its_own_folder(tmp_path, monkeypatch):
    """safetensors' save_file writes a ``.tmpXXXXXX`` beside the path it is given, then renames it: that path lies
    in vitlab's temporary folder, so a kill leaves nothing but a folder of vitlab's name."""
    import safetensors.torch

    real, seen = safetensors.torch.save_file, []

    def save_file(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        seen.append((Path(filename), sorted(p.name for p in tmp_path.iterdir())))

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    save_model(_tiny_vit(), tmp_path / "model.safetensors")
    ((given, beside_target),) = seen
    assert given.parent != tmp_path and given.parent.parent == tmp_path
    assert beside_target == [given.parent.name] and given.parent.name.startswith(".model.safetensors.")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert vitlab.load_model(tmp_path / "model.safetensors").model_name == "vit_tiny_patch16_224"


_KILLED_SCRIPT = """
import os, signal, sys
from vitlab.checkpoints.io import atomic_write
def killed(tmp):
    open(tmp, "wb").write(b"half a checkpoint")
    open(os.path.join(os.path.dirname(tmp), ".tmpAb3dE9"), "wb").write(b"safetensors' own")
    os.kill(os.getpid(), signal.SIGKILL)
atomic_write(sys.argv[1] + "/model.safetensors", killed)
"""


def test_resume_removes_what_a_killed_write_left(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    r = subprocess.run([sys.executable, "-c", _KILLED_SCRIPT, str(run)], capture_output=True, timeout=120)
    assert r.returncode == -9
    (left,) = run.iterdir()
    assert left.is_dir() and left.name.startswith(".model.safetensors.") and left.name.endswith(".tmp")
    (run / ".tmpW06BhP").write_bytes(b"\0" * 64)  # safetensors' own, beside the file (vitlab <= 0.x)
    (run / ".train_state.pt.k1ll3d.tmp").write_bytes(b"\0" * 64)  # an earlier vitlab's temporary file
    keep = [".tmprc", ".tmpW06BhPx", "tmpW06BhP", ".notes.tmp.txt"]  # the user's, not temporaries of a write
    for name in keep:
        (run / name).write_text("mine")
    (run / ".tmpABCDEF").mkdir()
    (run / ".cache.abcd1234.tmp" / "sub").mkdir(parents=True)  # holds a folder: no writer made that
    removed = remove_stale_temporaries(run)
    assert sorted(p.name for p in removed) == sorted([left.name, ".tmpW06BhP", ".train_state.pt.k1ll3d.tmp"])
    assert sorted(p.name for p in run.iterdir()) == sorted([*keep, ".tmpABCDEF", ".cache.abcd1234.tmp"])


def test_export_removes_the_temporary_folder_of_a_killed_export(tmp_path, monkeypatch):
    from vitlab.export import ExportError, export_onnx

    def stop(*args, **kwargs):  # the export itself is not what is tested here
        raise ExportError("stopped before exporting")

    stale = tmp_path / ".m.onnx.k1ll3d_x"  # what tempfile.mkdtemp made for an export to m.onnx, killed
    stale.mkdir()
    (stale / "float.onnx").write_bytes(b"\0" * 1024)
    others = [tmp_path / ".other.onnx.k1ll3d_x", tmp_path / ".m.onnx.keep", tmp_path / ".m.onnx.abcd1234" / "sub"]
    for p in others:
        p.mkdir(parents=True)
    monkeypatch.setattr("vitlab.export.onnx.export_graph", stop)
    with pytest.raises(ExportError, match="stopped before exporting"):
        export_onnx(vitlab.create_model("vit_tiny_patch16_224", **TINY_VIT).eval(), tmp_path / "m.onnx",
                    num_images=2, timing=False)
    assert not stale.exists() and all(p.is_dir() for p in others)
    # its own temporary folder removed too
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.onnx.abcd1234", ".m.onnx.keep", ".other.onnx.k1ll3d_x"]


# ------------------------------------------------------------------------------------ crafted metadata
def test_vitlab_metadata_that_is_not_an_object(tmp_path, caplog):
    from safetensors.torch import save_file

    path = tmp_path / "list.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"vitlab": "[1, 2]"})
    with pytest.raises(CheckpointError, match=rf"{path}: vitlab metadata is a JSON list, not an object"):
        vitlab.load_model(path)
    _photo(tmp_path / "x.png", 0)
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(["predict", str(tmp_path / "x.png"), "--checkpoint", str(path)]) == 2
    assert "vitlab metadata is a JSON list, not an object" in caplog.text


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = vitlab.create_model("vit_tiny_patch16_224", **{**TINY_VIT, "num_classes": 10})
    return save_model(model, tmp_path_factory.mktemp("vit") / "vit.safetensors",
                      class_names=[str(i) for i in range(10)])


def test_explain_refuses_existing_overlays_and_input_images_unless_overwrite(classifier, tmp_path, caplog):
    photos = tmp_path / "photos"
    _photo(photos / "a.png", 0)
    out = tmp_path / "maps"
    args = ["explain", str(photos / "a.png"), "--checkpoint", str(classifier), "--output", str(out)]
    assert main(args) == 0
    first = sorted(p.name for p in out.iterdir())
    user = out / first[0]
    user.write_bytes(b"the user's own file")  # an earlier overlay the user edited, say
    caplog.clear()
    assert main(args) != 0
    assert f"{user} exists" in caplog.text and "--overwrite" in caplog.text
    assert user.read_bytes() == b"the user's own file"
    assert main([*args, "--overwrite"]) == 0 and user.read_bytes() != b"the user's own file"
    # an input that has the overlay's name is never replaced, --overwrite or not
    inp = photos / first[0]
    original = _photo(inp, 1)
    caplog.clear()
    assert main(["explain", str(inp), str(photos / "a.png"), "--checkpoint", str(classifier), "--output",
                 str(photos), "--overwrite"]) != 0
    assert "written over input images" in caplog.text and inp.read_bytes() == original


def test_analyze_refuses_an_earlier_report_unless_overwrite(classifier, tmp_path, caplog):
    out = tmp_path / "analysis"
    out.mkdir()
    (out / "report.html").write_text("my notes")
    args = ["analyze", "--checkpoint", str(classifier), "--data", "digits", "--num-images", "4", "--output", str(out)]
    assert main(args) != 0
    assert "report.html exists" in caplog.text and (out / "report.html").read_text() == "my notes"
    assert main([*args, "--overwrite"]) == 0 and (out / "analysis.json").is_file()
    caplog.clear()
    assert main(args) != 0 and "an earlier analysis there?" in caplog.text
