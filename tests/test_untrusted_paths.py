"""Files from elsewhere (a downloaded run folder, data set or model) never make vitlab read or write outside what the
user named: COCO file names that leave the images folder are refused as metadata.csv's are; report and result files
replace a symbolic link planted in their place instead of writing through it (refused without --overwrite); a
resumed run's metrics.jsonl is never appended through a link; and hostile JSON / ONNX files give one error naming
the file instead of a traceback."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitlab
from dense_helpers import DETR_TINY, SETR_TINY
from eval_helpers import bright_dark_checkpoint, grey_class_folders
from vitlab.checkpoints import CheckpointError, save_model
from vitlab.checkpoints.io import check_outputs_free, read_json
from vitlab.cli.main import main
from vitlab.data.errors import DatasetError

torch.set_num_threads(1)


def _can_symlink(tmp: Path) -> bool:
    try:
        os.symlink(tmp / "target", tmp / ".probe")
    except (OSError, NotImplementedError):
        return False
    os.unlink(tmp / ".probe")
    return True


@pytest.fixture
def links(tmp_path) -> Path:
    """tmp_path, on a platform and file system that make symbolic links."""
    if not _can_symlink(tmp_path):
        pytest.skip("no symbolic links here")
    return tmp_path


# JSON that json.loads cannot read without a RecursionError
DEEP_JSON = "[" * 100_000 + "]" * 100_000


# ------------------------------------------------------------------------------- COCO file names outside the folder


def _coco(root: Path, file_name) -> tuple[Path, Path]:
    images = root / "images"
    images.mkdir(parents=True)
    Image.new("L", (20, 10), 128).save(images / "inside.png")
    ann = root / "annotations.json"
    ann.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "inside.png", "width": 20, "height": 10},
                   {"id": 2, "file_name": file_name, "width": 20, "height": 10}],
        "annotations": [{"id": 1, "image_id": 2, "category_id": 1, "bbox": [1, 1, 5, 5]}],
        "categories": [{"id": 1, "name": "thing"}]}))
    return images, ann


@pytest.mark.parametrize("how", ["absolute", "dotdot", "nested_dotdot"])
def test_coco_file_name_outside_the_images_folder_is_refused(tmp_path, how):
    from vitlab.data.dense import CocoDetection

    secret = tmp_path / "private" / "secret.png"  # a file of the user's, outside the data set
    secret.parent.mkdir()
    Image.new("L", (20, 10), 7).save(secret)
    name = {"absolute": str(secret), "dotdot": "../../private/secret.png",
            "nested_dotdot": "sub/../../../private/secret.png"}[how]
    images, ann = _coco(tmp_path / "data", name)
    with pytest.raises(DatasetError) as e:
        CocoDetection(images, ann)
    text = str(e.value)
    assert text.startswith(f"{ann}: image id 2: file_name {name!r} is not inside {images}")
    assert "no absolute paths, no '..'" in text


def test_coco_file_name_that_is_not_a_string_is_refused(tmp_path):
    from vitlab.data.dense import CocoDetection

    images, ann = _coco(tmp_path, 5)
    with pytest.raises(DatasetError, match=r"annotations.json: image id 2: file_name 5 is not inside"):
        CocoDetection(images, ann)


def test_coco_and_metadata_csv_share_one_path_check():
    """The rule metadata.csv applies is the one COCO applies (one function, not a copy)."""
    from vitlab.data import dense, folder

    assert dense.leaves_folder is folder.leaves_folder
    assert folder.leaves_folder("/etc/x.png") and folder.leaves_folder("a/../../x.png")
    assert folder.leaves_folder("C:/x.png") and folder.leaves_folder("..\\x.png")
    assert not folder.leaves_folder("sub/x..png") and not folder.leaves_folder("x.png")


# ------------------------------------------------------------------------------- eval reports and symbolic links


@pytest.fixture
def downloaded(links) -> tuple[Path, Path]:
    """A run folder from a stranger (a checkpoint) and data for it: (checkpoint, data)."""
    run = links / "downloaded"
    run.mkdir()
    ckpt = bright_dark_checkpoint(run / "model.safetensors", ("bright", "dark"))
    data = grey_class_folders(links / "data", {"bright": 230, "dark": 20}, n=2)
    return ckpt, data


def _eval(ckpt: Path, data: Path, *extra: str) -> int:
    return main(["eval", "--checkpoint", str(ckpt), "--data", str(data), "--split", "train", "--val-fraction", "0",
                 "--threads", "1", *extra])


def test_eval_never_writes_its_report_through_links_in_the_default_folder(downloaded, caplog):
    ckpt, data = downloaded
    private = ckpt.parent.parent / "private"
    private.mkdir()
    victim = private / "victim.txt"
    victim.write_text("user's precious file")
    report = ckpt.parent / "eval_train"
    report.mkdir()
    os.symlink(victim, report / "per_class.csv")  # an existing file elsewhere
    os.symlink(private / "new_file.txt", report / "confusion.csv")  # dangling: writing would create it
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert _eval(ckpt, data) == 2
    assert f"{report}, the default report folder" in caplog.text and "confusion.csv, per_class.csv" in caplog.text
    assert "symbolic link" in caplog.text and "--overwrite" in caplog.text
    assert victim.read_text() == "user's precious file" and not (private / "new_file.txt").exists()
    # --overwrite replaces the links with the report's files; their targets stay as they were
    assert _eval(ckpt, data, "--overwrite") == 0
    assert victim.read_text() == "user's precious file" and sorted(p.name for p in private.iterdir()) == ["victim.txt"]
    for name in ("metrics.json", "per_class.csv", "confusion.csv", "confusion.png"):
        assert not (report / name).is_symlink() and (report / name).is_file()
    assert (report / "per_class.csv").read_text().splitlines()[0] == "class,support,accuracy"
    assert json.loads((report / "metrics.json").read_text())["top1"] == 1.0


def test_eval_default_report_folder_that_is_a_link_is_not_followed(downloaded, caplog):
    ckpt, data = downloaded
    elsewhere = ckpt.parent.parent / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, ckpt.parent / "eval_train")
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert _eval(ckpt, data) == 2
    assert "eval_train, the default report folder" in caplog.text and "a symbolic link" in caplog.text
    assert list(elsewhere.iterdir()) == []
    assert _eval(ckpt, data, "--overwrite") == 0
    assert list(elsewhere.iterdir()) == []  # the link became a folder of the report
    assert not (ckpt.parent / "eval_train").is_symlink() and (ckpt.parent / "eval_train" / "metrics.json").is_file()


def test_eval_output_folder_dangling_link_counts_as_an_existing_file(downloaded, caplog):
    ckpt, data = downloaded
    out, target = ckpt.parent.parent / "evo", ckpt.parent.parent / "created.json"
    out.mkdir()
    os.symlink(target, out / "metrics.json")
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert _eval(ckpt, data, "--output", str(out)) == 2
    assert f"{out / 'metrics.json'} exists; pass --overwrite" in caplog.text and not target.exists()
    assert _eval(ckpt, data, "--output", str(out), "--overwrite") == 0
    assert not target.exists() and not (out / "metrics.json").is_symlink()
    assert json.loads((out / "metrics.json").read_text())["samples"] == 4


def test_check_outputs_free_counts_links_dangling_or_not(links):
    (links / "real.txt").write_text("x")
    os.symlink(links / "missing.txt", links / "dangling.png")
    os.symlink(links / "real.txt", links / "link.png")
    with pytest.raises(FileExistsError) as e:
        check_outputs_free([links / "dangling.png", links / "link.png", links / "free.png"], output=links)
    assert f"{links / 'dangling.png'}, {links / 'link.png'} exist" in str(e.value)
    check_outputs_free([links / "dangling.png", links / "link.png"], output=links, overwrite=True)
    # a link to an input image is still refused as the input is, --overwrite or not
    with pytest.raises(ValueError, match="over input images"):
        check_outputs_free([links / "link.png"], inputs=[links / "real.txt"], output=links, overwrite=True)


@pytest.mark.parametrize("task", ["detect", "segment"])
def test_detect_and_segment_replace_links_in_their_output_folder(links, task, caplog):
    torch.manual_seed(0)
    if task == "detect":
        model = vitlab.create_model("detr_resnet50", **{**DETR_TINY, "img_size": 32, "num_classes": 2})
        planted = ["canvas.png", "detections.json"]
    else:
        model = vitlab.create_model("setr_pup_vit_small_patch16", **{**SETR_TINY, "img_size": 32, "num_classes": 2})
        planted = ["canvas.png", "canvas_mask.png", "segments.json"]
    ckpt = save_model(model, links / "m.safetensors", class_names=["a", "b"])
    image = links / "in" / "canvas.png"
    image.parent.mkdir()
    Image.fromarray((np.random.RandomState(0).rand(32, 32) * 255).astype("uint8")).save(image)
    out, private = links / "out", links / "private"
    out.mkdir()
    private.mkdir()
    for name in planted:
        os.symlink(private / name, out / name)  # dangling: writing through would create the target
    args = [task, str(image), "--checkpoint", str(ckpt), "--output", str(out), "--threads", "1"]
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(args) == 2
    assert "exist; pass --overwrite" in caplog.text and list(private.iterdir()) == []
    assert main([*args, "--overwrite"]) == 0
    assert list(private.iterdir()) == []
    for name in planted:
        assert not (out / name).is_symlink() and (out / name).stat().st_size > 0
    results = json.loads((out / planted[-1]).read_text())
    assert results[0]["picture"] == "canvas.png"


# ------------------------------------------------------------------------------- --resume and metrics.jsonl


def test_truncate_metrics_replaces_a_link_by_a_file_of_its_records(links, caplog):
    from vitlab.train.state import truncate_metrics

    run, private = links / "run", links / "private"
    run.mkdir()
    private.mkdir()
    os.symlink(private / "created.txt", run / "metrics.jsonl")  # dangling
    with caplog.at_level(logging.WARNING):
        assert truncate_metrics(run / "metrics.jsonl", 5) == 0
    assert "symbolic link" in caplog.text
    assert not (run / "metrics.jsonl").is_symlink() and (run / "metrics.jsonl").read_text() == ""
    assert list(private.iterdir()) == []
    # a link to a file: its records up to the step are kept, in a file of the run's own; the target is untouched
    theirs = private / "theirs.jsonl"
    lines = [json.dumps({"step": 1}), json.dumps({"step": 9}), DEEP_JSON, "{torn"]
    theirs.write_text("\n".join(lines) + "\n")
    (run / "metrics.jsonl").unlink()
    os.symlink(theirs, run / "metrics.jsonl")
    assert truncate_metrics(run / "metrics.jsonl", 5) == 3
    assert not (run / "metrics.jsonl").is_symlink() and (run / "metrics.jsonl").read_text() == lines[0] + "\n"
    assert theirs.read_text() == "\n".join(lines) + "\n"


def test_resume_never_appends_metrics_through_a_link(links):
    from PIL import Image as PILImage

    data = links / "data"
    for i, name in enumerate(("a", "b")):
        (data / name).mkdir(parents=True)
        for j in range(4):
            PILImage.fromarray(np.full((8, 8), 40 + 150 * i + j, np.uint8), mode="L").save(data / name / f"{j}.png")
    tiny = ["--recipe", "digits", "--threads", "1", "--no-progress", "--batch-size", "4", "--workers", "0",
            "--set", "model_overrides.depth=1", "--set", "model_overrides.embed_dim=16",
            "--set", "model_overrides.num_heads=2", "--set", "val_fraction=0.25"]
    run = links / "run"
    assert main(["train", "--data", str(data), "--output", str(run), *tiny, "--steps", "2"]) == 0
    target = links / "private" / "created_by_resume.txt"
    (run / "metrics.jsonl").unlink()
    os.symlink(target, run / "metrics.jsonl")
    assert main(["train", "--output", str(run), "--resume", *tiny, "--steps", "3"]) == 0
    assert not target.exists() and not (run / "metrics.jsonl").is_symlink()
    assert [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()][-1] == 3


# ------------------------------------------------------------------------------- hostile JSON and ONNX files


def test_deeply_nested_json_is_one_error_naming_the_file(tmp_path):
    from vitlab.checkpoints.vitlab_format import read_vitlab
    from vitlab.data.dense import CocoDetection
    from vitlab.tasks.run import _segmentation_classes
    from vitlab.train.run import read_job

    deep = tmp_path / "deep.json"
    deep.write_text(DEEP_JSON)
    with pytest.raises(CheckpointError, match=f"{deep}: not a readable JSON file \\(nested too deeply"):
        read_json(deep)
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetError, match=f"{deep}: not valid JSON \\(nested too deeply"):
        CocoDetection(tmp_path / "images", deep)
    run = tmp_path / "run"
    run.mkdir()
    (run / "job.json").write_text(DEEP_JSON)
    with pytest.raises(ValueError, match=f"{run / 'job.json'}: not valid JSON \\(nested too deeply"):
        read_job(run)
    (run / "classes.json").write_text(DEEP_JSON)
    with pytest.raises(DatasetError, match=f"{run / 'classes.json'}: not valid JSON"):
        _segmentation_classes(run)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "deep.safetensors"), metadata={"vitlab": DEEP_JSON})
    with pytest.raises(CheckpointError, match="deep.safetensors: vitlab metadata is not valid JSON"):
        read_vitlab(tmp_path / "deep.safetensors")


def test_read_json_refuses_what_is_not_an_object(tmp_path):
    """config.json / a sharded index that is a JSON list: an error naming it, not an AttributeError on .get."""
    index = tmp_path / "model.safetensors.index.json"
    index.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=f"{index}: holds a JSON list, not an object"):
        read_json(index)


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory) -> Path:
    pytest.importorskip("onnxruntime")
    from vitlab.export import export_onnx

    torch.manual_seed(0)
    model = vitlab.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=1, embed_dim=16,
                                num_heads=2, num_classes=2, in_chans=1, mean=(0.5,), std=(0.5,))
    path = tmp_path_factory.mktemp("onnx") / "m.onnx"
    export_onnx(model, path, num_images=2, timing=False)
    return path


def _with_metadata(src: Path, dst: Path, value: str) -> Path:
    import onnx

    proto = onnx.load(str(src))
    for p in proto.metadata_props:
        if p.key == "vitlab":
            p.value = value
    onnx.save(proto, str(dst))
    return dst


def _with_external_data(src: Path, dst: Path, location: str) -> Path:
    """``src`` with its largest initializer moved to external data at ``location``."""
    import onnx

    proto = onnx.load(str(src))
    t = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
    n = len(t.raw_data)
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(n))):
        e = t.external_data.add()
        e.key, e.value = k, v
    onnx.save(proto, str(dst))
    return dst


@pytest.mark.parametrize("damage, words", [
    ("truncated", "not a readable ONNX file"),
    ("metadata_list", "the vitlab metadata is a JSON list, not an object"),
    ("metadata_deep", "the vitlab metadata is not valid JSON (nested too deeply"),
    ("metadata_bignum", "the vitlab metadata is not valid JSON (Exceeds the limit"),
    ("metadata_input_list", "the vitlab metadata's 'input' is a JSON list, not an object"),
    ("empty", "ONNX Runtime cannot load it"),
])
def test_damaged_onnx_file_is_one_error_naming_it(onnx_file, tmp_path, damage, words, caplog):
    from vitlab.export.runtime import OnnxModel, read_metadata

    path = tmp_path / f"{damage}.onnx"
    if damage == "truncated":
        path.write_bytes(onnx_file.read_bytes()[: onnx_file.stat().st_size // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        meta = read_metadata(onnx_file)
        value = {"metadata_list": "[1, 2, 3]", "metadata_deep": DEEP_JSON,
                 "metadata_bignum": '{"config": {"img_size": 1' + "0" * 5000 + "}}",
                 "metadata_input_list": json.dumps({**meta, "input": [1, 2]})}[damage]
        _with_metadata(onnx_file, path, value)
    with pytest.raises(ValueError) as e:
        OnnxModel(path)
    assert str(e.value).startswith(f"{path}: {words}")
    image = tmp_path / "x.png"
    Image.new("L", (16, 16), 100).save(image)
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(["predict", "--checkpoint", str(path), "--threads", "1", str(image)]) == 2
    assert f"error: {path}: {words}" in caplog.text


@pytest.mark.parametrize("where", ["absolute", "dotdot", "symlink"])
def test_onnx_external_data_outside_its_folder_is_refused(onnx_file, links, where):
    from vitlab.export.runtime import OnnxModel

    secret = links / "private" / "secret.bin"
    secret.parent.mkdir()
    secret.write_bytes(os.urandom(1 << 16))
    folder = links / "model"
    folder.mkdir()
    if where == "symlink":
        os.symlink(secret, folder / "m.onnx.data")
    location = {"absolute": str(secret), "dotdot": "../private/secret.bin", "symlink": "m.onnx.data"}[where]
    path = _with_external_data(onnx_file, folder / "m.onnx", location)
    with pytest.raises(ValueError) as e:
        OnnxModel(path)
    assert str(e.value).startswith(f"{path}: its weights are to be read from ")
    assert "outside its folder" in str(e.value)


def test_onnx_external_data_in_its_folder_still_loads(onnx_file, tmp_path):
    from vitlab.export.runtime import OnnxModel

    folder = tmp_path / "model"
    folder.mkdir()
    path = _with_external_data(onnx_file, folder / "m.onnx", "m.onnx.data")
    import onnx

    raw = max(onnx.load(str(onnx_file)).graph.initializer, key=lambda t: len(t.raw_data)).raw_data
    (folder / "m.onnx.data").write_bytes(raw)
    x = torch.rand(1, 1, 16, 16)
    assert torch.allclose(OnnxModel(path)(x), OnnxModel(onnx_file)(x))
