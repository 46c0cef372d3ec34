"""MAE's linear probe: a non-affine BatchNorm before the linear head, trained on frozen features; and the
`vitlab eval --protocol knn|linear` commands on any checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from vitlab.cli.main import main
from vitlab.ssl.probe import LinearProbe, train_linear_probe


def test_the_probe_normalises_without_learnable_affine_parameters() -> None:
    p = LinearProbe(8, 3)
    assert not p.norm.affine and p.norm.eps == 1e-6
    assert [n for n, _ in p.named_parameters()] == ["head.weight", "head.bias"]
    assert p.head.weight.std() < 0.03 and p.head.bias.abs().max() == 0


def test_a_badly_scaled_but_separable_feature_is_learnt() -> None:
    # the label is in a feature 1000x smaller than the noise features: without the BatchNorm, SGD at this
    # learning rate cannot use it; with it, the probe separates the classes
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (512,), generator=g)
    x = torch.randn(512, 16, generator=g) * 100.0
    x[:, 3] = (y.float() * 2 - 1) * 0.1 + torch.randn(512, generator=g) * 0.01
    probe = train_linear_probe(x[:384], y[:384], 2, epochs=30, seed=0)
    with torch.no_grad():
        acc = (probe(x[384:]).argmax(-1) == y[384:]).float().mean()
    assert acc > 0.97
    # in eval mode the probe is one linear map (the statistics folded in), as MAE's is after training
    folded = probe.folded()
    with torch.no_grad():
        torch.testing.assert_close(folded(x[384:]), probe(x[384:]), rtol=1e-4, atol=1e-3)


def test_probe_rejects_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match=r"features must be \(n, F\)"):
        train_linear_probe(torch.zeros(4, 3), torch.zeros(5, dtype=torch.long), 2)


def test_eval_protocols_on_a_classifier_checkpoint(tmp_path) -> None:
    run = tmp_path / "run"
    assert main(["train", "--data", "digits", "--recipe", "digits", "--steps", "30", "--no-progress",
                 "--set", "model_overrides.depth=1", "--set", "model_overrides.embed_dim=32",
                 "--set", "model_overrides.num_heads=2", "--threads", "1", "--output", str(run)]) == 0
    ckpt = str(run / "model.safetensors")
    results = {}
    for protocol in ("classifier", "knn", "linear"):
        out = tmp_path / protocol
        assert main(["eval", "--checkpoint", ckpt, "--data", "digits", "--protocol", protocol,
                     "--probe-epochs", "20", "--output", str(out)]) == 0
        m = json.loads((out / "metrics.json").read_text())
        results[protocol] = m["top1"]
        if protocol != "classifier":
            assert m["protocol"] == protocol and m["train_images"] > 1000
    # after 30 steps the features are already well above chance (10 classes) under both feature protocols
    assert results["knn"] > 0.25 and results["linear"] > 0.25, results
