"""vitlab away from the machine it was built on: older torch (no FSDP2) and numpy (no ``numpy._core``), macOS folder
names (Unicode NFD), a non-UTF-8 locale, Windows (no ``os.getloadavg``), a missing ``[export]`` extra, and what the
package ships (LICENSE, py.typed, ``python -m vitlab``)."""

from __future__ import annotations

import json
import os
import pickle
import runpy
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import vitlab
from eval_helpers import bright_dark_checkpoint, eval_json, grey_class_folders
from vitlab.checkpoints.adapt import match_class_names
from vitlab.cli.main import main
from vitlab.data.errors import DatasetError
from vitlab.data.folder import scan_folder

REPO = Path(__file__).resolve().parents[1]


def nfd(s: str) -> str:
    return unicodedata.normalize("NFD", s)


# ------------------------------------------------------------------------------------- torch < 2.6: no FSDP2


@pytest.fixture
def no_fsdp2(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch 2.3 - 2.5, where torch.distributed.fsdp has no FSDPModule / fully_shard / MixedPrecisionPolicy."""
    import torch.distributed.fsdp as fsdp

    for name in ("FSDPModule", "fully_shard", "MixedPrecisionPolicy"):
        monkeypatch.delattr(fsdp, name, raising=False)


def test_plain_training_runs_on_a_torch_without_fsdp2(no_fsdp2, tmp_path: Path) -> None:
    from vitlab.train.fsdp import full_model_state, is_sharded

    layer = nn.Linear(2, 3)
    assert not is_sharded(layer)
    assert set(full_model_state(layer)) == {"weight", "bias"}
    # a whole run: it checkpoints and validates through is_sharded
    assert main(["train", "--data", "digits", "--model", "vit_tiny_patch16_224", "--img-size", "8", "--set",
                 'model_overrides={"patch_size":4,"embed_dim":16,"depth":1,"num_heads":2}', "--set",
                 "global_batch=none", "--batch-size", "16", "--steps", "2", "--threads", "1", "--no-progress",
                 "--output", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_fsdp_on_a_torch_without_fsdp2_names_the_torch_it_needs(no_fsdp2) -> None:
    from vitlab.train.fsdp import check_fsdp, shard_model

    with pytest.raises(ValueError, match=r"--fsdp .*needs torch >= 2\.6.*this is torch"):
        check_fsdp(world_size=2)
    with pytest.raises(ValueError, match=r"--fsdp .*needs torch >= 2\.6"):
        shard_model(nn.Linear(2, 2), device=torch.device("cpu"))


# --------------------------------------------------------------------- class folder names in NFD (macOS)








def test_nfd_class_folders_are_the_nfc_classes_in_nfc_order(tmp_path: Path) -> None:
    root = grey_class_folders(tmp_path / "d", {nfd("zéro"): 250, nfd("été"): 5}, n=2)
    paths, labels, classes = scan_folder(root)
    # NFC sorts "zéro" before "été" (U+00E9 > "z"); NFD would put "e" + accent first
    assert classes == ["zéro", "été"] and all(unicodedata.is_normalized("NFC", c) for c in classes)
    assert labels == [0, 0, 1, 1] and all(Path(p).is_file() for p in paths)
    assert Path(paths[0]).parent.name == nfd("zéro")  # files are read from the folder as named on disk
    # a held-out split given the training split's classes
    assert scan_folder(root, ["zéro", "été"])[1] == [0, 0, 1, 1]


def test_two_spellings_of_one_class_folder_are_refused(tmp_path: Path) -> None:
    root = grey_class_folders(tmp_path / "d", {"café": 250, nfd("café"): 5}, n=1)
    with pytest.raises(DatasetError, match="same name 'café' in two Unicode spellings"):
        scan_folder(root)


def test_class_names_match_across_unicode_forms() -> None:
    assert match_class_names(["café", "thé"], [nfd("thé"), nfd("café")]) == [1, 0]
    assert match_class_names([nfd("Café"), "thé"], ["café"]) == [0]  # and case-insensitively


def test_eval_on_nfd_folders_matches_an_nfc_checkpoint_by_name(tmp_path: Path, capsys) -> None:
    # trained on NFC folders (Linux): head order "zéro" (bright), "été" (dark); by position the NFD folder's
    # sorted classes ("été", "zéro") would swap the labels: 0% where 100% is right
    ckpt = bright_dark_checkpoint(tmp_path / "m.safetensors", ["zéro", "été"])
    data = grey_class_folders(tmp_path / "mac", {nfd("zéro"): 250, nfd("été"): 5})
    metrics = eval_json(capsys, "--checkpoint", str(ckpt), "--data", f"folder:{data}", "--split", "train",
                    "--val-fraction", "0", "--output", str(tmp_path / "e1"))
    assert metrics["top1"] == 1.0 and metrics["per_class"] == {"zéro": 1.0, "été": 1.0}
    # a subset of the classes, matched by name
    sub = grey_class_folders(tmp_path / "mac_sub", {nfd("été"): 5})
    metrics = eval_json(capsys, "--checkpoint", str(ckpt), "--data", f"folder:{sub}", "--split", "train",
                    "--val-fraction", "0", "--output", str(tmp_path / "e2"))
    assert metrics["top1"] == 1.0 and metrics["per_class"] == {"été": 1.0}


def test_eval_of_a_checkpoint_with_nfd_names_on_nfc_folders(tmp_path: Path, capsys) -> None:
    # trained on a Mac: NFD names in NFD order, "été" (bright) before "zéro" (dark); the NFC folder sorts
    # "zéro" first, so by position the labels would swap
    ckpt = bright_dark_checkpoint(tmp_path / "m.safetensors", [nfd("été"), nfd("zéro")])
    data = grey_class_folders(tmp_path / "linux", {"été": 250, "zéro": 5})
    metrics = eval_json(capsys, "--checkpoint", str(ckpt), "--data", f"folder:{data}", "--split", "train",
                    "--val-fraction", "0", "--output", str(tmp_path / "e"))
    assert metrics["top1"] == 1.0 and metrics["per_class"] == {"zéro": 1.0, "été": 1.0}


# ------------------------------------------------------------------------ a non-UTF-8 locale (LC_ALL=C)


def test_eval_under_a_non_utf8_locale_writes_its_reports_in_utf8(tmp_path: Path) -> None:
    ckpt = bright_dark_checkpoint(tmp_path / "m.safetensors", ["café", "thé"])
    data = grey_class_folders(tmp_path / "data", {"café": 250, "thé": 5})
    out = tmp_path / "eval"
    env = {**os.environ, "LANG": "C", "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "vitlab", "eval", "--checkpoint", str(ckpt), "--data",
                        f"folder:{data}", "--split", "train", "--val-fraction", "0", "--threads", "1",
                        "--output", str(out)], capture_output=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr.decode("utf-8", "replace")[-2000:]
    assert (out / "per_class.csv").read_text(encoding="utf-8").splitlines() == [
        "class,support,accuracy", "café,3,1.000000", "thé,3,1.000000"]
    assert (out / "confusion.csv").read_text(encoding="utf-8").splitlines()[0] == "true \\ predicted,café,thé"
    assert (out / "confusion.png").is_file()
    assert json.loads((out / "metrics.json").read_text(encoding="utf-8"))["per_class"] == {"café": 1.0, "thé": 1.0}
    assert "caf\\xe9" in p.stdout.decode("ascii")  # the per-class lines printed, escaped, not a crash


def test_run_files_are_read_as_utf8_under_a_non_utf8_locale(tmp_path: Path) -> None:
    (tmp_path / "classes.json").write_text(json.dumps(["fond", "forêt"], ensure_ascii=False), encoding="utf-8")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "note": "forêt"}\n{"step": 2}\n', encoding="utf-8")
    # a recipe of the user's own and a folder's config.json, written as editors and transformers write them
    (tmp_path / "r.json").write_text(json.dumps({"description": "forêt", "epochs": 2}, ensure_ascii=False),
                                     encoding="utf-8")
    (tmp_path / "config.json").write_text(json.dumps({"id2label": {"0": "forêt"}}, ensure_ascii=False),
                                          encoding="utf-8")
    code = ("import sys; from pathlib import Path; from vitlab.tasks.run import _segmentation_classes; "
            "from vitlab.train.state import truncate_metrics; from vitlab.train.recipe import load_recipe; "
            "from vitlab.checkpoints.io import read_json; d = Path(sys.argv[1]); "
            "print(ascii(_segmentation_classes(d))); print(truncate_metrics(d / 'metrics.jsonl', 1)); "
            "print(ascii(load_recipe(str(d / 'r.json')).description)); "
            "print(ascii(read_json(d / 'config.json')['id2label']['0']))")
    env = {**os.environ, "LANG": "C", "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.splitlines() == [ascii(["fond", "forêt"]), "1", ascii("forêt"), ascii("forêt")]
    assert (tmp_path / "metrics.jsonl").read_text(encoding="utf-8") == '{"step": 1, "note": "forêt"}\n'


# ------------------------------------------------------------------------ the [export] extra not installed


@pytest.fixture
def no_export_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for m in ("onnx", "onnxruntime", "onnxscript"):
        monkeypatch.setitem(sys.modules, m, None)


@pytest.mark.parametrize("command", [
    ["predict", "IMAGE", "--checkpoint", "CKPT", "--runtime", "onnx"],
    ["predict", "IMAGE", "--checkpoint", "ONNX"],
    ["eval", "--checkpoint", "CKPT", "--data", "DATA", "--runtime", "onnx-int8", "--output", "OUT"],
])
def test_onnx_runtimes_without_the_export_extra_say_what_to_install(command, no_export_extra, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    ckpt = bright_dark_checkpoint(tmp_path / "m.safetensors", ["a", "b"])
    data = grey_class_folders(tmp_path / "data", {"a": 250, "b": 5}, n=1)
    (tmp_path / "m.onnx").write_bytes(b"not read")
    subst = {"IMAGE": str(data / "a" / "0.png"), "CKPT": str(ckpt), "ONNX": str(tmp_path / "m.onnx"),
             "DATA": f"folder:{data}", "OUT": str(tmp_path / "out")}
    assert main([subst.get(a, a) for a in command] + ["--threads", "1"]) == 2
    assert "pip install 'vitlab[export]'" in caplog.text


def test_other_import_errors_still_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    import vitlab.cli.models as models_cli

    def broken(args):
        raise ImportError("No module named 'something_else'")

    monkeypatch.setattr(models_cli, "run", broken)
    with pytest.raises(ImportError, match="something_else"):
        main(["models"])


# ----------------------------------------------------------------------------------- Windows: no loadavg


def test_benchmark_environment_without_getloadavg(monkeypatch: pytest.MonkeyPatch) -> None:
    from vitlab.benchmark import _loadavg

    monkeypatch.delattr(os, "getloadavg")
    assert _loadavg() is None


# ----------------------------------------------------------------------- CIFAR batches across numpy 1 / 2


def _cifar(root: Path) -> Path:
    """A CIFAR-10 python folder pickled by this numpy (numpy 2: its helpers named numpy._core.*)."""
    root.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("data_batch_1", 4), ("test_batch", 2)):
        batch = {b"labels": [i % 2 for i in range(n)], b"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8)}
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"cat", b"dog"]}, protocol=2))
    return root


def test_cifar_batch_of_numpy_2_is_read_under_numpy_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vitlab.data import sources

    root = _cifar(tmp_path / "c")
    if b"numpy._core" not in (root / "data_batch_1").read_bytes():
        pytest.skip("this numpy pickles numpy.core names (numpy 1.x)")
    images, labels, classes = sources.read_cifar(root, "train")
    # numpy 1.x: no numpy._core, numpy.core is its own
    monkeypatch.setattr(sources, "_NUMPY_CORE", "numpy.core", raising=False)
    monkeypatch.setitem(sys.modules, "numpy._core.multiarray", None)
    again = sources.read_cifar(root, "train")
    assert torch.equal(again[0], images) and again[1:] == (labels, classes) == ([0, 1, 0, 1], ["cat", "dog"])


def test_cifar_batch_needs_no_numpy_pickling_helpers_and_a_damaged_one_is_a_dataset_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """vitlab's CIFAR unpickler rebuilds arrays itself (it checks their dtypes first), so a batch reads under a
    numpy whose pickling helpers have either name; a damaged batch is one error naming it."""
    from vitlab.data import sources

    root = _cifar(tmp_path / "c")
    images, labels, classes = sources.read_cifar(root, "train")
    with monkeypatch.context() as m:
        for name in ("numpy._core.multiarray", "numpy.core.multiarray"):
            m.setitem(sys.modules, name, None)
        again = sources.read_cifar(root, "train")
    assert torch.equal(again[0], images) and again[1:] == (labels, classes)
    batch = root / "data_batch_1"
    batch.write_bytes(batch.read_bytes()[:200])
    with pytest.raises(DatasetError, match="data_batch_1: not a readable CIFAR python batch"):
        sources.read_cifar(root, "train")


# ------------------------------------------------------------------------------- machine-specific paths


def test_make_canvases_needs_mnist_given(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["make-canvases", "--output", str(tmp_path / "c")])
    assert e.value.code == 2 and "--mnist" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("command", ["make-canvases", "fewshot"])
def test_help_names_no_path_of_the_build_machine(command, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    assert "/work/" not in text
    if command == "make-canvases":
        assert "t10k-images-idx3-ubyte" in text  # what the folder must hold


# --------------------------------------------------------------------------------------------- packaging


def test_package_ships_license_and_type_marker() -> None:
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert 'license = "Apache-2.0"\nlicense-files = ["LICENSE"]\n' in pyproject
    text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    assert (REPO / "src" / "vitlab" / "py.typed").is_file()
    # torch >= 2.11's dynamo exporter imports onnxscript._framework_apis.torch_2_11 (onnxscript >= 0.6)
    assert '"onnxscript>=0.6"]' in pyproject


def test_python_m_vitlab_runs_the_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(sys, "argv", ["vitlab", "--version"])
    with pytest.raises(SystemExit) as e:
        runpy.run_module("vitlab", run_name="__main__")
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"vitlab {vitlab.__version__}"


def test_a_run_trained_on_nfd_folders_resumes_on_nfc_ones(tmp_path: Path) -> None:
    """A run made on a macOS copy of the data (its job.json records NFD names) resumes on the same classes in
    NFC; other names are still refused."""
    from vitlab.train.run import check_resumed_data

    (tmp_path / "job.json").write_text(json.dumps({"data": "x", "classes": [nfd("café"), nfd("thé")]}),
                                       encoding="utf-8")
    check_resumed_data(tmp_path, "x", ["café", "thé"])
    with pytest.raises(ValueError, match="has classes"):
        check_resumed_data(tmp_path, "x", ["café", "tea"])


def test_the_torchscript_exporter_is_asked_for_as_the_installed_torch_takes_it(monkeypatch) -> None:
    """torch.onnx.export took no ``dynamo`` argument before torch 2.5: passing dynamo=False there was a TypeError,
    so no exporter could run."""
    from vitlab.export import onnx as onnx_export

    assert onnx_export._torchscript_exporter() == {"dynamo": False}  # this torch
    monkeypatch.setattr(torch.onnx, "export", lambda model, args, f, input_names=None, output_names=None,
                        opset_version=None, dynamic_axes=None, do_constant_folding=True: None)
    assert onnx_export._torchscript_exporter() == {}


def test_training_runs_without_fcntl_and_says_the_folder_is_not_locked(tmp_path: Path, monkeypatch,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """Windows has no fcntl: every train / finetune / pretrain failed with ModuleNotFoundError at the lock."""
    import logging

    monkeypatch.setitem(sys.modules, "fcntl", None)
    with caplog.at_level(logging.WARNING):
        assert main(["train", "--output", str(tmp_path / "run"), "--threads", "1", "--no-progress", "--steps", "2",
                     "--set", "model_overrides.depth=1", "--set", "eval_every_epochs=1000"]) == 0
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert "the run folder is not locked" in caplog.text
