"""--model-arg: the model options a bare timm file cannot tell (average pooling without fc_norm, its size), for
every command that loads --checkpoint with --model."""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vitlab.cli.common import load_checkpoint
from vitlab.cli.main import build_parser, main
from vitlab.export.runtimes import load_for_inference

FIX = Path(__file__).parent / "fixtures" / "interop"
IO = load_file(FIX / "io.safetensors")
# the timm hub fixture's weights without its config.json: timm's vit_tiny_patch16_224 built with these
SIZE = ["--model-arg", "img_size=64", "--model-arg", "num_classes=7", "--model-arg", "depth=2", "--model-arg",
        "embed_dim=32", "--model-arg", "num_heads=4", "--model-arg", "patch_size=8"]
ARGS = ["--model", "vit_tiny_patch16_224", "--model-arg", 'global_pool="avg"', "--model-arg", "fc_norm=false", *SIZE]
SIZE_KW = {"img_size": 64, "num_classes": 7, "depth": 2, "embed_dim": 32, "num_heads": 4, "patch_size": 8}


@pytest.fixture()
def bare_file(tmp_path) -> Path:
    path = tmp_path / "vit_tiny_avg.safetensors"
    shutil.copy(FIX / "timm_hub" / "model.safetensors", path)
    return path


@pytest.mark.parametrize("command", ["predict", "eval", "explain", "analyze", "fewshot", "export"])
def test_model_args_build_the_files_model(bare_file, command):
    extra = {"predict": ["x.png"], "explain": ["x.png"], "export": ["--output", "m.onnx"], "analyze": ["--data", "d"],
             "fewshot": ["--data", "d"]}.get(command, [])
    args = build_parser().parse_args([command, *extra, "--checkpoint", str(bare_file), *ARGS])
    model = load_checkpoint(args).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IO["x64"]), IO["timm_hub_logits"], atol=1e-5, rtol=1e-5)
    runtime, reference = load_for_inference(bare_file, "torch", model_name=args.model, model_args={
        "global_pool": "avg", "fc_norm": False, **SIZE_KW})
    with torch.no_grad():
        torch.testing.assert_close(runtime(IO["x64"]), IO["timm_hub_logits"], atol=1e-5, rtol=1e-5)


def test_without_them_the_pooling_is_the_files_default(bare_file):
    args = build_parser().parse_args(["predict", "x.png", "--checkpoint", str(bare_file), *ARGS[:2], *SIZE])
    with torch.no_grad():
        assert not torch.allclose(load_checkpoint(args).eval()(IO["x64"]), IO["timm_hub_logits"], atol=1e-3)


def test_a_malformed_model_arg_is_named(bare_file, caplog):
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(["predict", "x.png", "--checkpoint", str(bare_file), "--model", "vit_tiny_patch16_224",
                     "--model-arg", "global_pool"]) == 2
    assert "--model-arg 'global_pool': expected KEY=VALUE" in caplog.text


def test_every_command_that_runs_a_model_takes_threads():
    """The README: --threads is taken by every command that runs a model (export validates in PyTorch and ONNX
    Runtime, which follows torch's thread count)."""
    parser = build_parser()
    commands = ["train", "finetune", "pretrain", "eval", "predict", "fewshot", "explain", "analyze", "benchmark",
                "export", "detect", "segment"]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    lacking = [c for c in commands if "--threads" not in sub.choices[c]._option_string_actions]
    assert not lacking
