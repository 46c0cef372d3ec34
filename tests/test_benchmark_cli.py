"""`vitlab benchmark` on a tiny model: output structure and FLOP accounting (never timings)."""

from __future__ import annotations

import json

import pytest
import torch

from vitlab.benchmark import TimingStats, paired_ratio, registry_forward_flops, run_interleaved
from vitlab.cli.benchmark import parse_overrides
from vitlab.cli.main import main

TINY = ["--set", "depth=1", "--set", "embed_dim=32", "--set", "num_heads=2", "--set", "img_size=32",
        "--set", "num_classes=7"]


@pytest.mark.parametrize("mode,dtype", [("infer", "float32"), ("train", "bfloat16")])
def test_benchmark_json_structure(capsys: pytest.CaptureFixture[str], mode: str, dtype: str) -> None:
    rc = main(["-q", "benchmark", "--models", "vit_tiny_patch16_224", *TINY, "--batch-size", "3",
               "--mode", mode, "--dtype", dtype, "--repeats", "2", "--warmup", "1", "--min-repeat-s", "0",
               "--matmul-size", "32", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"machine", "settings", "results"}
    assert report["settings"]["overrides"] == {"depth": 1, "embed_dim": 32, "num_heads": 2, "img_size": 32,
                                               "num_classes": 7}
    (r,) = report["results"]
    assert (r["model"], r["mode"], r["dtype"], r["batch_size"]) == ("vit_tiny_patch16_224", mode, dtype, 3)
    assert len(r["timing"]["times_s"]) == 2 and len(r["matmul_timing"]["times_s"]) == 2
    assert r["images_per_s"] == pytest.approx(3 / r["timing"]["median_s"])
    # The FLOP bookkeeping: achieved = per-image forward FLOPs x batch x (3 for training) / step time.
    factor = 3 if mode == "train" else 1
    expected = r["gflops_per_image_fwd"] * 3 * factor / r["timing"]["median_s"]
    assert r["achieved_gflops"] == pytest.approx(expected)
    assert r["matmul_gflops"] == pytest.approx(2 * 32**3 / r["matmul_timing"]["median_s"] / 1e9)
    assert r["fraction_of_matmul"] == pytest.approx(r["achieved_gflops"] / r["matmul_gflops"])


def test_benchmark_table_output(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["-q", "benchmark", "--models", "vit_tiny_patch16_224", *TINY, "--repeats", "1",
               "--min-repeat-s", "0", "--matmul-size", "32"])
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:3] == ["model", "img/s", "GFLOP/s"]
    assert lines[2].split()[0] == "vit_tiny_patch16_224"


def test_benchmark_rejects_bad_override(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-q", "benchmark", "--set", "depth", "--repeats", "1"]) == 2
    assert main(["-q", "benchmark", "--set", "no_such_field=1", "--repeats", "1"]) == 2


def test_forward_flops_of_a_tiny_vit_match_the_closed_form() -> None:
    # Patch embed + per block (qkv, q@k, attn@v, proj, fc1, fc2) + head, counted by hand: 2 FLOPs per MAC.
    D, N, depth, K, P, C = 32, 16 + 1, 2, 7, 8, 3
    flops, size = registry_forward_flops("vit_tiny_patch16_224", depth=depth, embed_dim=D, num_heads=2,
                                         img_size=32, patch_size=P, num_classes=K)
    assert size == (3, 32, 32)
    macs = 16 * (C * P * P) * D + depth * (N * D * 3 * D + 2 * N * N * D + N * D * D + 2 * N * D * 4 * D) + D * K
    assert flops == 2 * macs


def test_parse_overrides_literals_and_strings() -> None:
    assert parse_overrides(["depth=2", "global_pool=avg", "img_size=(32, 48)", "qkv_bias=False"]) == {
        "depth": 2, "global_pool": "avg", "img_size": (32, 48), "qkv_bias": False}


def test_interleaved_rounds_and_paired_ratio() -> None:
    calls: list[str] = []
    stats = run_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                            warmup=1, repeats=3, min_repeat_s=0.0)
    # one warm-up each, then rounds that alternate and rotate who goes first
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert all(len(s.times_s) == 3 for s in stats.values())
    r = paired_ratio(TimingStats(times_s=(1.0, 2.0)), TimingStats(times_s=(2.0, 3.0)))
    assert r.ratios == (2.0, 1.5)
    torch.testing.assert_close(torch.tensor(r.median), torch.tensor(1.75))


def test_benchmark_code_imports_no_peer_library() -> None:
    # `vitlab benchmark` must run with vitlab's own dependencies; the peer comparisons live in benchmarks/.
    import ast
    from importlib.util import find_spec
    from pathlib import Path

    peers = {"timm", "transformers", "torchvision", "vit_pytorch"}
    for name in ("vitlab.benchmark", "vitlab.cli.benchmark"):
        spec = find_spec(name)
        assert spec is not None and spec.origin is not None
        tree = ast.parse(Path(spec.origin).read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not imported & peers, f"{name} imports {imported & peers}"
        assert imported & {"torch", "vitlab"}, f"{name} ({spec.origin}): {sorted(imported)}"  # found the real imports
