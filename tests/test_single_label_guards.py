"""vitlab trains single-label classifiers; where other targets come (multi-label lists, regression values, multi-hot
rows), it refuses them or follows the model's ``score_function`` instead of going silently wrong."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import TensorDataset

import vitlab
from vitlab.data import Mixup, build_dataset
from vitlab.data.errors import DatasetError
from vitlab.train import fit, load_recipe
from vitlab.train.evaluate import check_classification_batch, evaluate
from vitlab.train.losses import ClassificationLoss

TINY = {"img_size": 16, "patch_size": 8, "depth": 1, "embed_dim": 16, "num_heads": 2}


def _tiny(num_classes: int, score: str = "softmax", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = vitlab.create_model("vit_tiny_patch16_224", num_classes=num_classes, **TINY)
    with torch.no_grad():
        model.head.weight.normal_()
        model.head.bias.normal_()
    model.score_function = score
    return model.eval()


def _images(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((16, 16), i * 5, np.uint8)).save(folder / f"{i}.png")


def _recipe(**kw):
    return load_recipe("digits").replace(**{"batch_size": 8, "workers": 0, "val_fraction": 0.0, "ema_decay": None,
                                            "warmup_epochs": 0, "warmup_steps": 0, **kw})


# ---- 1. metadata.jsonl with list labels


def test_jsonl_list_labels_are_refused(tmp_path: Path) -> None:
    _images(tmp_path, 4)
    tags = [["even", "loop"], [], ["even"], ["gt4"]]
    (tmp_path / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f"{i}.png", "labels": t}) + "\n" for i, t in enumerate(tags)))
    with pytest.raises(DatasetError, match=r"metadata\.jsonl, line 1: the label 'labels' is a JSON list.*"
                                           r"single-label"):
        build_dataset(tmp_path, split="train", val_fraction=0.0)


# ---- 2. Mixup / CutMix of float (B, K) targets


@pytest.mark.parametrize("alphas", [(0.8, 0.0), (0.0, 1.0)])
def test_mixup_of_one_hot_targets_equals_the_int_path(alphas) -> None:
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 2, 1, 4, 3, 2])

    def run(labels):
        m = Mixup(num_classes=5, mixup_alpha=alphas[0], cutmix_alpha=alphas[1], label_smoothing=0.1,
                  generator=torch.Generator().manual_seed(3))
        return m(x, labels), m.last_lam

    (xi, ti), lam = run(y)
    (xf, tf), lam_f = run(F.one_hot(y, 5).float())
    assert lam == lam_f and lam != 1.0
    assert torch.equal(xi, xf) and torch.equal(ti, tf)
    # soft / multi-hot rows: smoothed as one-hot ones, then mixed as given
    soft = torch.rand(6, 5)
    (_, ts), lam_s = run(soft)
    smoothed = 0.9 * soft + 0.1 / 5
    torch.testing.assert_close(ts, lam_s * smoothed + (1 - lam_s) * smoothed.flip(0))


def test_mixup_refuses_float_targets_of_another_shape() -> None:
    with pytest.raises(ValueError, match=r"float targets of shape \(4,\)"):
        Mixup(num_classes=3)(torch.randn(4, 3, 8, 8), torch.rand(4))


# ---- 3. a regression label file


def test_numeric_label_file_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _images(tmp_path / "train", 20)
    (tmp_path / "train.csv").write_text("id,target\n" + "".join(f"{i},{i * 5 / 255:.4f}\n" for i in range(20)))
    with caplog.at_level(logging.WARNING, logger="vitlab.data.folder"):
        ds = build_dataset(tmp_path, split="train", val_fraction=0.0)
    assert len(ds.classes) == 20
    warned = [r.getMessage() for r in caplog.records if "holds numbers" in r.getMessage()]
    assert len(warned) == 1 and "train.csv" in warned[0] and "'target'" in warned[0]
    assert "each value becomes a class" in warned[0]


def test_integer_class_labels_do_not_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _images(tmp_path / "train", 20)
    (tmp_path / "train.csv").write_text("id,label\n" + "".join(f"{i},{i % 3}\n" for i in range(20)))
    with caplog.at_level(logging.WARNING, logger="vitlab.data.folder"):
        build_dataset(tmp_path, split="train", val_fraction=0.0)
    assert not [r for r in caplog.records if "holds numbers" in r.getMessage()]


# ---- 4. validation with the user's criterion


def _mse(x, out, t):
    return F.mse_loss(out.squeeze(-1), t.view(-1))


@pytest.mark.parametrize("shape", ["N1", "N"])
def test_fit_validates_regression_with_the_users_criterion(tmp_path: Path, shape: str) -> None:
    torch.manual_seed(0)
    X, T = torch.randn(24, 3, 16, 16), torch.rand(24) * 9
    T = T[:, None] if shape == "N1" else T
    model = _tiny(1, "none")
    r = fit(model, _recipe(max_steps=2, ema_decay=0.5), train_set=TensorDataset(X[:16], T[:16]),
            val_set=TensorDataset(X[16:], T[16:]), output_dir=tmp_path / "run", progress=False, criterion=_mse)
    model.eval()
    with torch.no_grad():
        expected = F.mse_loss(model(X[16:]).squeeze(-1), T[16:].view(-1)).item()
    assert r.val["val_loss"] == pytest.approx(expected, rel=1e-4)
    assert r.val["val_ema_loss"] != r.val["val_loss"]
    assert not {"val_top1", "val_top5", "val_ema_top1"} & set(r.val)  # no accuracy of regression values


def test_evaluate_with_a_bce_criterion_on_multi_hot_targets() -> None:
    torch.manual_seed(0)
    X, Y = torch.randn(10, 3, 16, 16), torch.randint(0, 2, (10, 3)).float()
    model = _tiny(3, "sigmoid")
    r = evaluate(model, TensorDataset(X, Y), num_classes=3, batch_size=4,
                 criterion=lambda x, out, t: F.binary_cross_entropy_with_logits(out, t))
    with torch.no_grad():
        expected = F.binary_cross_entropy_with_logits(model(X), Y).item()
    assert r.loss == pytest.approx(expected, rel=1e-5)
    assert r.top1 is None and r.top5 is None and r.summary() == {"samples": 10, "loss": round(r.loss, 6)}


def test_evaluate_with_a_criterion_on_class_indices_reports_accuracy() -> None:
    torch.manual_seed(0)
    X, y = torch.randn(10, 3, 16, 16), torch.randint(0, 3, (10,))
    model = _tiny(3)
    r = evaluate(model, TensorDataset(X, y), num_classes=3, batch_size=4,
                 criterion=lambda x, out, t: F.cross_entropy(out, t))
    with torch.no_grad():
        logits = model(X)
    assert r.loss == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert r.top1 == pytest.approx((logits.argmax(-1) == y).float().mean().item())


# ---- 5. the default criterion: one-hot float labels, multi-hot rows


def test_one_hot_float_labels_get_the_label_smoothing() -> None:
    torch.manual_seed(0)
    logits, y = torch.randn(6, 5), torch.tensor([0, 3, 1, 4, 2, 2])
    loss = ClassificationLoss(label_smoothing=0.1)
    reference = F.cross_entropy(logits, y, label_smoothing=0.1)
    torch.testing.assert_close(loss(None, logits, y), reference)
    torch.testing.assert_close(loss(None, logits, F.one_hot(y, 5).float()), reference)
    # targets made by Mixup are smoothed already
    mixed = ClassificationLoss(label_smoothing=0.1, mixed_targets=True)
    torch.testing.assert_close(mixed(None, logits, F.one_hot(y, 5).float()), F.cross_entropy(logits, y))


def test_fit_marks_mixup_targets_as_smoothed(tmp_path: Path) -> None:
    torch.manual_seed(0)
    X, y = torch.randn(16, 3, 16, 16), torch.arange(16) % 3
    loss = ClassificationLoss(label_smoothing=0.1)
    fit(_tiny(3), _recipe(max_steps=1, mixup_alpha=0.8, cutmix_alpha=1.0), train_set=TensorDataset(X, y),
        output_dir=tmp_path / "run", progress=False, criterion=loss)
    assert loss.mixed_targets is True


def test_an_objective_with_mixup_does_not_smooth_its_targets_twice() -> None:
    """Outside fit (a library user's own loop), the objective marks its loss: Mixup's targets are smoothed once."""
    from vitlab.train.objective import ClassificationObjective

    torch.manual_seed(0)
    mixup = Mixup(num_classes=3, mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.1)
    objective = ClassificationObjective(label_smoothing=0.1, mixup=mixup)
    x, y = mixup(torch.randn(4, 3, 8, 8), torch.arange(4) % 3)
    logits = torch.randn(4, 3)
    expected = -(y * logits.log_softmax(-1)).sum(-1).mean()  # the targets as Mixup made them
    torch.testing.assert_close(objective.criterion(x, logits, y), expected)
    plain = ClassificationObjective(label_smoothing=0.1)  # no Mixup: (B, K) targets are smoothed by the loss
    assert plain.criterion.mixed_targets is False


def test_fit_trains_one_hot_targets_under_mixup(tmp_path: Path) -> None:
    torch.manual_seed(0)
    X, Y = torch.randn(16, 3, 16, 16), F.one_hot(torch.arange(16) % 3, 3).float()
    r = fit(_tiny(3), _recipe(max_steps=1, mixup_alpha=0.8, cutmix_alpha=1.0), train_set=TensorDataset(X, Y),
            output_dir=tmp_path / "run", progress=False)
    assert r.step == 1


@pytest.mark.parametrize("rows", [[[1.0, 0, 1, 0]], [[0.0, 0, 0, 0]]])
def test_multi_hot_rows_refused_for_the_default_criterion(rows) -> None:
    y = torch.tensor(rows * 2)
    with pytest.raises(ValueError, match=r"not class probabilities.*binary_cross_entropy_with_logits.*"
                                         r"score_function = 'sigmoid'"):
        check_classification_batch((torch.zeros(2, 3, 16, 16), y), num_classes=4)
    # soft labels summing to 1 stay accepted
    check_classification_batch((torch.zeros(2, 3, 16, 16), torch.full((2, 4), 0.25)), num_classes=4)


# ---- 6. the timm export keeps the score function


@pytest.mark.parametrize(("score", "problem"), [("sigmoid", "multi_label_classification"), ("none", "regression"),
                                                ("softmax", None)])
def test_timm_export_keeps_the_score_function(tmp_path: Path, score: str, problem: str | None) -> None:
    from vitlab.checkpoints.to_timm import save_timm, save_timm_folder
    from vitlab.inference import to_scores

    model = _tiny(3, score)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        expected = to_scores(model(x), score)
    save_timm_folder(model, tmp_path / "hub", class_names=["a", "b", "c"])
    save_timm(model, tmp_path / "one.safetensors", class_names=["a", "b", "c"])
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert config.get("problem_type") == problem  # transformers' pipeline scores by it
    for path in (tmp_path / "hub", tmp_path / "one.safetensors"):
        back = vitlab.load_model(path).eval()
        assert back.score_function == score, path
        with torch.no_grad():
            torch.testing.assert_close(to_scores(back(x), back.score_function), expected)


# ---- 7. explain shows the model's scores


@pytest.mark.parametrize("score", ["sigmoid", "none"])
@pytest.mark.parametrize("method", ["grad-rollout", "grad-cam", "grad-input"])
def test_explain_scores_follow_the_score_function(score: str, method: str) -> None:
    from vitlab.analysis import explain

    model = _tiny(3, score)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        logits = model(x)
    e = explain(model, x, method=method)
    torch.testing.assert_close(e.probs, torch.sigmoid(logits) if score == "sigmoid" else logits)


def test_explain_cli_shows_raw_values_and_the_explained_class(tmp_path: Path, monkeypatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    import vitlab.analysis.figures as figures
    from vitlab.cli.main import main

    model = _tiny(3, "none")
    vitlab.save_model(model, tmp_path / "reg.safetensors", class_names=["a", "b", "c"])
    Image.fromarray(np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)).save(tmp_path / "img.png")
    x = vitlab.inference.prepare_image(str(tmp_path / "img.png"), vitlab.data.eval_transform(model.preprocessing))
    with torch.no_grad():
        values = model(x[None])[0]
    titles = []
    real = figures.explain_figure
    monkeypatch.setattr(figures, "explain_figure", lambda *a, title, **k: titles.append(title) or real(*a, title=title, **k))
    with caplog.at_level(logging.INFO, logger="vitlab.cli.explain"):
        assert main(["explain", str(tmp_path / "img.png"), "--checkpoint", str(tmp_path / "reg.safetensors"),
                     "--method", "grad-rollout", "--class", "b", "--output", str(tmp_path / "out")]) == 0
    pred = int(values.argmax())
    line = next(r.getMessage() for r in caplog.records if "predicted" in r.getMessage())
    assert f"predicted {'abc'[pred]}, value {float(values[pred]):.4g}" in line
    assert f"explained b, value {float(values[1]):.4g}" in line
    assert "%" not in titles[0] and f"for b (value {float(values[1]):.4g})" in titles[0]


# ---- 8. finetune from a multi-label / regression checkpoint


@pytest.mark.parametrize("score", ["sigmoid", "none"])
def test_finetune_head_scores_with_softmax(tmp_path: Path, score: str, caplog: pytest.LogCaptureFixture) -> None:
    from vitlab.train.recipe import Recipe
    from vitlab.train.run import TrainJob, build_model

    vitlab.save_model(_tiny(3, score), tmp_path / "src.safetensors", class_names=["a", "b", "c"])
    assert vitlab.load_model(tmp_path / "src.safetensors").score_function == score
    job = TrainJob(recipe=Recipe(name="t", img_size=16), data="folder", output=tmp_path / "run",
                   pretrained=str(tmp_path / "src.safetensors"))
    with caplog.at_level(logging.INFO, logger="vitlab.train.run"):
        model = build_model(job, num_classes=4, in_chans=3, classes=["w", "x", "y", "z"])
    assert model.score_function == "softmax"
    assert any(f"scores with {score}" in r.getMessage() for r in caplog.records)
