"""The analysis tools as researchers call them: inside torch.no_grad(), on frozen (linear-probe) models, on
backbones without a classifier, with file names that repeat."""

from __future__ import annotations

import pytest
import torch

from vitlab.analysis import explain
from vitlab.analysis.analyze import analyze_model
from vitlab.cli.main import main
from vitlab.data import unique_stems

from model_helpers import input_for, make_tiny, perturb_

torch.set_num_threads(1)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "crossvit_tiny_240",
                                  "mobilevit_xxs", "resnet18"])
def test_gradient_methods_under_no_grad_and_on_a_frozen_model(name):
    """grad-rollout failed inside torch.no_grad() (the score was taken outside capture's grad mode); Grad-CAM
    failed once the weights were frozen (nothing in the graph required grad)."""
    model = perturb_(make_tiny(name)).eval()
    x = input_for(model, batch=2)
    methods = [m for m in ("grad-cam", "grad-rollout", "grad-input")
               if not (m == "grad-rollout" and name.startswith(("mobilevit", "resnet")))]
    reference = {m: explain(model, x, method=m).maps for m in methods}
    model.requires_grad_(False)
    with torch.no_grad():
        for m in methods:
            torch.testing.assert_close(explain(model, x, method=m).maps, reference[m], rtol=1e-5, atol=1e-6)
    assert not any(p.requires_grad for p in model.parameters())


def test_output_names_never_collide():
    assert unique_stems(["a/x.png", "b/x.png", "x-1.png"]) == ["x", "x-1", "x-1-1"]
    assert unique_stems(["a/1.png", "b/1.png", "c/1.png"]) == ["1", "1-1", "1-2"]


def test_analyze_leaves_the_models_mode_and_scores_only_a_matching_classifier(tmp_path):
    from vitlab.data import build_dataset
    from vitlab.data.transforms import eval_transform

    model = perturb_(make_tiny("vit_tiny_patch16_224", num_classes=10, in_chans=1, img_size=8, patch_size=2,
                               mean=(0.5,), std=(0.5,))).train()
    data = build_dataset("digits", split="test", transform=eval_transform(model.preprocessing))
    numbers = analyze_model(model, data, tmp_path / "a", num_images=8, num_components=2)
    assert model.training and numbers["accuracy_on_images"] is not None
    model.reset_classifier(0)  # a backbone: its outputs are features, their argmax no class
    numbers = analyze_model(model, data, tmp_path / "b", num_images=8, num_components=2)
    assert numbers["accuracy_on_images"] is None and "no classifier" in numbers["accuracy_not_applicable"]
    assert "No accuracy: the model has no classifier" in (tmp_path / "b" / "report.html").read_text()


def test_analyze_and_fewshot_refuse_counts_below_one(caplog, capsys):
    with pytest.raises(SystemExit):
        main(["analyze", "--checkpoint", "x", "--data", "digits", "--components", "0"])
    with pytest.raises(SystemExit):
        main(["fewshot", "--checkpoint", "x", "--data", "digits", "--knn-k", "0"])
    assert "expected an integer >= 1, got '0'" in capsys.readouterr().err
