"""More hostile files: JSON nested too deeply for json.loads (a RecursionError) read from a data set's
metadata.jsonl, a recipe, a run folder or a file's metadata is one error naming the file (or the file is passed over
where it is only probed), never a traceback; figures of `vitlab analyze` / `vitlab explain --overwrite` replace a
symbolic link in the output folder instead of writing through it; a damaged .onnx given to int8 quantisation is
an error naming it."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import vitlab
from vitlab.checkpoints import CheckpointError
from vitlab.cli.main import main
from vitlab.data.errors import DatasetError

torch.set_num_threads(1)

# JSON that json.loads cannot read without a RecursionError
DEEP_JSON = "[" * 100_000 + "]" * 100_000


def _safetensors(path: Path, metadata: dict[str, str]) -> Path:
    save_file({"w": torch.zeros(1)}, str(path), metadata=metadata)
    return path


# ------------------------------------------------------------------------------- deeply nested JSON


def test_metadata_jsonl_line_nested_too_deeply_names_file_and_line(tmp_path):
    from vitlab.data import build_dataset

    for i in range(2):
        Image.new("L", (8, 8), 100 * i).save(tmp_path / f"{i}.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "0.png", "label": "a"}\n' + DEEP_JSON + "\n")
    with pytest.raises(DatasetError, match=f"{tmp_path / 'metadata.jsonl'}, line 2: not a JSON object "
                                           f"\\(nested too deeply to read\\)"):
        build_dataset(tmp_path, split="train", val_fraction=0)


def test_timm_export_metadata_nested_too_deeply_names_the_file(tmp_path):
    path = _safetensors(tmp_path / "timm.safetensors", {"format": "timm", "timm_model": "vit_tiny_patch16_224",
                                                        "timm_kwargs": DEEP_JSON})
    with pytest.raises(CheckpointError, match=f"{path}: its timm export metadata is not valid JSON "
                                              f"\\(nested too deeply to read\\)"):
        vitlab.load_model(path)


@pytest.mark.parametrize("value, words", [(DEEP_JSON, "is not valid JSON \\(nested too deeply to read\\)"),
                                          ("[1, 2]", "is a JSON list, not an object")])
def test_tokenizer_metadata_nested_too_deeply_or_not_an_object_names_the_file(tmp_path, value, words):
    from vitlab.ssl.tokenizer import HEADER_KEY, load_tokenizer

    path = _safetensors(tmp_path / "tok.safetensors", {HEADER_KEY: value})
    with pytest.raises(CheckpointError, match=f"--tokenizer {path}: tokenizer metadata {words}"):
        load_tokenizer(path)


def test_run_folder_probes_pass_over_deeply_nested_json(tmp_path):
    """job.json / a checkpoint's metadata read to tell whether a folder is a vitlab run: not one, no error."""
    from vitlab.train.run import checkpoint_metadata, is_run_job

    (tmp_path / "job.json").write_text(DEEP_JSON)
    assert is_run_job(tmp_path / "job.json") is False
    ckpt = _safetensors(tmp_path / "model.safetensors", {"vitlab": DEEP_JSON})
    assert checkpoint_metadata(ckpt) == {}


def test_recipe_nested_too_deeply_names_the_file(tmp_path, caplog):
    from vitlab.train.recipe import load_recipe

    path = tmp_path / "deep.json"
    path.write_text(DEEP_JSON)
    with pytest.raises(ValueError, match=f"{path}: not valid JSON \\(nested too deeply to read\\)"):
        load_recipe(path)
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(["train", "--recipe", str(path), "--data", "digits", "--output", str(tmp_path / "run"),
                     "--threads", "1", "--no-progress"]) == 2
    assert f"error: {path}: not valid JSON (nested too deeply to read)" in caplog.text


def test_set_tuple_value_nested_too_deeply_names_the_key():
    from vitlab.train.recipe import apply_overrides, load_recipe

    with pytest.raises(ValueError, match="--set betas=...: not a JSON list \\(nested too deeply to read\\)"):
        apply_overrides(load_recipe("digits"), [f"betas={DEEP_JSON}"])


def test_set_model_option_nested_too_deeply_is_kept_as_text():
    """A model option that is not JSON is kept as text, as a malformed one is."""
    from vitlab.train.recipe import apply_overrides, load_recipe

    recipe = apply_overrides(load_recipe("digits"), [f"model_overrides.x={DEEP_JSON}"])
    assert recipe.model_overrides["x"] == DEEP_JSON


def test_model_arg_nested_too_deeply_is_kept_as_text():
    from vitlab.cli.common import parse_assignments

    assert parse_assignments([f"x={DEEP_JSON}"], "--model-arg") == {"x": DEEP_JSON}


def test_resume_with_a_recipe_json_nested_too_deeply_names_the_file(tmp_path, caplog):
    from vitlab.cli.train import saved_run

    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.json").write_text(DEEP_JSON)
    (run / "train_state.pt").write_bytes(b"")  # a run with a state (without one, --resume is refused first)
    with pytest.raises(ValueError, match=f"{run / 'recipe.json'}: not valid JSON \\(nested too deeply to read\\)"):
        saved_run(argparse.Namespace(resume=True, recipe=None), run)
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(["train", "--output", str(run), "--resume", "--threads", "1", "--no-progress"]) == 2
    assert f"error: {run / 'recipe.json'}: not valid JSON (nested too deeply to read)" in caplog.text


def test_canvas_annotations_nested_too_deeply_name_the_file(tmp_path):
    from vitlab.cli.make_canvases import _warn_if_crowded

    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        (tmp_path / split / "annotations.json").write_text(DEEP_JSON)
    with pytest.raises(ValueError, match=f"{tmp_path / 'train' / 'annotations.json'}: not valid JSON "
                                         f"\\(nested too deeply to read\\)"):
        _warn_if_crowded(tmp_path, 64, 1, 2)


# ------------------------------------------------------------------------------- figures and symbolic links


@pytest.fixture
def links(tmp_path) -> Path:
    """tmp_path, on a platform and file system that make symbolic links."""
    try:
        os.symlink(tmp_path / "target", tmp_path / ".probe")
    except (OSError, NotImplementedError):
        pytest.skip("no symbolic links here")
    os.unlink(tmp_path / ".probe")
    return tmp_path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = vitlab.create_model("vit_tiny_patch16_224", depth=1, embed_dim=16, num_heads=2, img_size=16,
                                patch_size=4, in_chans=1, num_classes=10, mean=(0.5,), std=(0.5,))
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    vitlab.save_model(model, path, class_names=[str(i) for i in range(10)])
    return path


def test_analyze_overwrite_replaces_links_to_figures(links, checkpoint, capsys):
    from vitlab.analysis.analyze import OUTPUT_FILES

    out, private = links / "analysis", links / "private"
    out.mkdir()
    private.mkdir()
    victim = private / "victim.png"
    victim.write_bytes(b"user's file")
    os.symlink(victim, out / OUTPUT_FILES[2])  # an existing file elsewhere
    for name in OUTPUT_FILES[3:]:
        os.symlink(private / name, out / name)  # dangling: writing through would create the target
    assert main(["analyze", "--checkpoint", str(checkpoint), "--data", "digits", "--output", str(out),
                 "--num-images", "4", "--components", "2", "--threads", "1", "--overwrite"]) == 0
    assert victim.read_bytes() == b"user's file" and sorted(private.iterdir()) == [victim]
    for name in OUTPUT_FILES[2:]:
        assert name.endswith(".png") and not (out / name).is_symlink()
        with Image.open(out / name) as im:
            assert im.format == "PNG"


def test_explain_overwrite_replaces_a_link_to_its_figure(links, checkpoint, capsys):
    image = links / "in" / "digit.png"
    image.parent.mkdir()
    Image.fromarray((np.random.RandomState(0).rand(16, 16) * 255).astype("uint8")).save(image)
    out, private = links / "out", links / "private"
    out.mkdir()
    private.mkdir()
    os.symlink(private / "digit_rollout.png", out / "digit_rollout.png")  # dangling
    args = ["explain", str(image), "--checkpoint", str(checkpoint), "--method", "rollout", "--output", str(out),
            "--threads", "1"]
    assert main(args) == 2  # refused without --overwrite
    assert main([*args, "--overwrite"]) == 0
    assert list(private.iterdir()) == [] and not (out / "digit_rollout.png").is_symlink()
    with Image.open(out / "digit_rollout.png") as im:
        assert im.format == "PNG" and im.size == (900, 340)


def test_figure_writer_replaces_a_link(links):
    from vitlab.analysis.figures import explain_figure

    victim = links / "victim.png"
    victim.write_bytes(b"user's file")
    os.symlink(victim, links / "fig.png")
    out = explain_figure(torch.rand(3, 8, 8), torch.rand(8, 8), links / "fig.png", size=(90, 34))
    assert out == links / "fig.png" and not out.is_symlink() and victim.read_bytes() == b"user's file"
    with Image.open(out) as im:
        assert im.size == (90, 34)


# ------------------------------------------------------------------------------- damaged ONNX files


@pytest.fixture
def truncated_onnx(tmp_path) -> Path:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [weight])
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    assert onnx.load_from_string(data).graph.node[0].name == "mm"
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("reader", ["quantize_int8", "linear_nodes", "file_opset"])
def test_truncated_onnx_is_an_error_naming_it(truncated_onnx, tmp_path, reader):
    pytest.importorskip("onnxruntime")
    from vitlab.export import onnx as export_onnx

    call = {"quantize_int8": lambda p: export_onnx.quantize_int8(p, str(tmp_path / "int8.onnx")),
            "linear_nodes": export_onnx.linear_nodes, "file_opset": export_onnx.file_opset}[reader]
    with pytest.raises(ValueError) as e:
        call(str(truncated_onnx))
    assert str(e.value).startswith(f"{truncated_onnx}: not a readable ONNX file (")
