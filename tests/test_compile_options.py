"""`--compile` and the runtime / precision options around it: a failed compile falls back to eager and says
so everywhere (train, eval, predict), the reported compile time covers the backward graph, and options that
would not be applied are refused. torch.compile is replaced by fakes here (a real compile takes tens of seconds
on a CPU); a failure is a fake that raises, as inductor does on a machine without a C++ compiler."""

from __future__ import annotations

import json
import time

import pytest
import torch
from torch import nn

import vitlab
from test_cli_train import FAST, write_digit_pngs
from test_train import Quadrants, _weights, small_recipe, tiny_vit
from vitlab.cli.main import main
from vitlab.export.runtimes import Compiled
from vitlab.train import fit

torch.set_num_threads(1)

NO_CXX = "no C++ compiler (test)"


def _failing_compile(module, **kwargs):
    def compiled(*args, **kw):
        raise RuntimeError(NO_CXX)

    return compiled


class _FailingBackward(torch.autograd.Function):
    """The identity, whose backward raises as a failed compile of the backward graph does."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(NO_CXX)


def _backward_failing_compile(module, **kwargs):
    """The forward compiles and runs; the first backward fails (the backward graph compiles lazily there)."""
    def compiled(batch):
        loss, metrics = module(batch)
        return _FailingBackward.apply(loss), metrics

    return compiled


def _digits_checkpoint(tmp_path) -> str:
    """A tiny untrained classifier of the bundled 8x8 digits (its classes named as the data's)."""
    torch.manual_seed(0)
    model = vitlab.create_model("vit_tiny_patch16_224", num_classes=10, img_size=8, patch_size=2, in_chans=1,
                                embed_dim=16, depth=1, num_heads=2, mean=(0.5,), std=(0.5,))
    nn.init.normal_(model.head.weight, std=0.5)  # a zero head would make every logit tie
    path = tmp_path / "model.safetensors"
    vitlab.save_model(model, path, class_names=[str(d) for d in range(10)])
    return str(path)


# ------------------------------------------------------------------------------ 1: training falls back to eager
def test_compiled_wrapper_passes_a_batch_that_is_not_a_tensor_to_eager_unchanged(monkeypatch):
    """A training step's input is (images, targets) or a dict: the eager fallback must get all of it (it got
    ``batch[:0]``, an empty tuple), and no batch size is recorded for it."""
    monkeypatch.setattr(torch, "compile", _failing_compile)
    seen = []

    class Step(nn.Module):
        def forward(self, batch):
            seen.append(batch)
            return torch.zeros(())

    for batch in ((torch.zeros(2, 3), torch.tensor([0, 1])), {"pixel_values": torch.zeros(2, 3)}):
        c = Compiled(Step().train())
        c(batch)
        assert seen[-1] is batch and NO_CXX in c.failed and c.batch_sizes == set()


@pytest.mark.parametrize("failing", [_failing_compile, _backward_failing_compile], ids=["forward", "backward"])
def test_fit_trains_eager_to_the_end_when_the_compile_fails(tmp_path, monkeypatch, failing):
    """A compile failing in the first forward, or in the first backward (whose step then runs again eager)."""
    recipe = small_recipe(epochs=1)
    fit(tiny_vit(), recipe, train_set=Quadrants(32), output_dir=tmp_path / "eager", progress=False)
    monkeypatch.setattr(torch, "compile", failing)
    res = fit(tiny_vit(), recipe, train_set=Quadrants(32), output_dir=tmp_path / "c", progress=False, compile=True)
    assert res.step == res.total_steps == 2
    assert NO_CXX in res.compile_failed and res.compile_seconds is None
    a, b = _weights(tmp_path / "eager" / "model.safetensors"), _weights(tmp_path / "c" / "model.safetensors")
    for k in a:  # the same training as without --compile
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_train_cli_with_a_failing_compile_trains_eager_and_records_it(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(torch, "compile", _failing_compile)
    out = tmp_path / "run"
    with caplog.at_level("INFO"):
        assert main(["train", "--output", str(out), *FAST, "--compile"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 4 and NO_CXX in results["compile_failed"]
    assert "trained eager" in caplog.text


def test_dense_train_with_a_failing_compile_trains_eager(tmp_path, monkeypatch):
    """Detection batches are (images, list of target dicts): the same fallback."""
    from dense_helpers import DETR_TINY, write_fake_mnist

    mnist = write_fake_mnist(tmp_path / "mnist", n=10)
    data = tmp_path / "c"
    assert main(["make-canvases", "--mnist", str(mnist), "--seed", "1", "--output", str(data), "--train", "4",
                 "--val", "2", "--size", "32"]) == 0
    recipe = tmp_path / "detr.json"
    recipe.write_text(json.dumps({"model": "detr_resnet50", "model_overrides": DETR_TINY, "img_size": 32,
                                  "max_steps": 2, "batch_size": 2, "augment": False, "hflip": 0.0, "cpu_threads": 1}))
    monkeypatch.setattr(torch, "compile", _failing_compile)
    out = tmp_path / "run"
    assert main(["train", "--task", "detection", "--data", str(data), "--recipe", str(recipe), "--output", str(out),
                 "--no-progress", "--compile"]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert NO_CXX in summary["compile_failed"] and (out / "model.safetensors").is_file()


# ------------------------------------------------------------------------------ 2: the compile time
class _SlowFirstBackward(torch.autograd.Function):
    """The identity, whose first backward takes a while (as the lazily compiled backward graph does)."""

    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        _SlowFirstBackward.calls += 1
        if _SlowFirstBackward.calls == 1:
            time.sleep(0.4)
        return grad


def test_compile_seconds_include_the_first_backward(tmp_path, monkeypatch):
    def slow_compile(module, **kwargs):
        calls = []

        def compiled(batch):
            calls.append(1)
            if len(calls) == 1:
                time.sleep(0.3)  # the forward graph's compile
            loss, metrics = module(batch)
            return _SlowFirstBackward.apply(loss), metrics

        return compiled

    monkeypatch.setattr(_SlowFirstBackward, "calls", 0)
    monkeypatch.setattr(torch, "compile", slow_compile)
    res = fit(tiny_vit(), small_recipe(epochs=1), train_set=Quadrants(32), output_dir=tmp_path, progress=False,
              compile=True)
    assert res.compile_failed is None
    # 0.3 s forward + 0.4 s backward; the second step's forward and backward subtracted (a few ms here)
    assert 0.65 <= res.compile_seconds <= res.seconds


# ------------------------------------------------------------------------------ 3: eval and predict say so
def test_eval_with_a_failed_compile_records_it(tmp_path, monkeypatch, capsys):
    ckpt = _digits_checkpoint(tmp_path)
    monkeypatch.setattr(torch, "compile", _failing_compile)
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", ckpt, "--data", "digits", "--compile", "--output", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["runtime"] == "torch-compile" and NO_CXX in metrics["compile_failed"]
    assert metrics["top1_agreement_with_float32"] == 1.0  # it ran the float32 model eagerly
    line = capsys.readouterr().out.splitlines()[0]
    assert f"(compile failed: RuntimeError: {NO_CXX}; ran eager)" in line


def test_eval_with_a_working_compile_records_no_failure(tmp_path, monkeypatch):
    ckpt = _digits_checkpoint(tmp_path)
    monkeypatch.setattr(torch, "compile", lambda module, **kw: module)
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", ckpt, "--data", "digits", "--compile", "--output", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["compile_failed"] is None


def test_predict_with_a_failed_compile_records_it(tmp_path, monkeypatch, capsys, caplog):
    ckpt = _digits_checkpoint(tmp_path)
    files, _ = write_digit_pngs(tmp_path / "imgs", classes=(0, 1), per_class=2)
    monkeypatch.setattr(torch, "compile", _failing_compile)
    assert main(["predict", *files, "--checkpoint", ckpt, "--runtime", "torch-compile", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 4 and all(NO_CXX in r["compile_failed"] for r in rows)
    assert "runtime torch-compile: compile failed" in caplog.text and "ran eager" in caplog.text


def test_predict_json_has_no_compile_field_for_other_runtimes(tmp_path, capsys):
    ckpt = _digits_checkpoint(tmp_path)
    files, _ = write_digit_pngs(tmp_path / "imgs", classes=(0,), per_class=2)
    assert main(["predict", *files, "--checkpoint", ckpt, "--json"]) == 0
    assert all("compile_failed" not in r for r in json.loads(capsys.readouterr().out))


# ------------------------------------------------------------------------------ 4: options that would not apply
@pytest.mark.parametrize("extra", [["--mode", "train"], ["--dtype", "bfloat16"]])
def test_benchmark_models_with_runtimes_refuses_mode_and_dtype(extra, caplog, capsys):
    argv = ["-q", "benchmark", "--models", "vit_tiny_patch16_224", "--set", "depth=1", "--set", "img_size=32",
            "--repeats", "1", "--min-repeat-s", "0", "--matmul-size", "32", "--runtime", "torch", *extra]
    assert main(argv) == 2
    assert "--mode and --dtype do not apply" in caplog.text + capsys.readouterr().err


def test_predict_agreement_with_an_onnx_file_is_refused(tmp_path, caplog, capsys):
    pytest.importorskip("onnxruntime")
    from vitlab.export import export_onnx

    ckpt = _digits_checkpoint(tmp_path)
    onnx_path = tmp_path / "model.onnx"
    export_onnx(vitlab.load_model(ckpt), onnx_path, dynamic_batch=True, num_images=2, timing=False)
    files, _ = write_digit_pngs(tmp_path / "imgs", classes=(0,), per_class=1)
    assert main(["predict", *files, "--checkpoint", str(onnx_path), "--agreement", "all"]) == 2
    err = caplog.text + capsys.readouterr().err
    assert "--agreement needs the PyTorch checkpoint" in err and "--runtime onnx" in err
    # the default (agreement where a float32 model is at hand) and --agreement 0 still run the file
    assert main(["predict", *files, "--checkpoint", str(onnx_path)]) == 0
    assert main(["predict", *files, "--checkpoint", str(onnx_path), "--agreement", "0"]) == 0


def test_predict_agreement_with_the_float32_runtime_says_it_is_the_reference(tmp_path, caplog):
    ckpt = _digits_checkpoint(tmp_path)
    files, _ = write_digit_pngs(tmp_path / "imgs", classes=(0,), per_class=1)
    assert main(["predict", *files, "--checkpoint", str(ckpt), "--agreement", "all"]) == 0
    assert "--agreement all: the float32 PyTorch runtime is the reference itself" in caplog.text


def test_benchmark_models_without_runtime_refuses_data(caplog, capsys):
    argv = ["-q", "benchmark", "--models", "vit_tiny_patch16_224", "--set", "depth=1", "--set", "img_size=32",
            "--repeats", "1", "--min-repeat-s", "0", "--matmul-size", "32", "--data", "digits"]
    assert main(argv) == 2
    assert "--data gives the agreement images of --runtime" in caplog.text + capsys.readouterr().err

