"""Multi-label training end to end: binary cross entropy (timm's smoothing), Mixup of multi-hot targets, mAP / F1 /
exact match against scikit-learn, fit and the commands (train, eval, predict, --resume) on a tiny tagged folder."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import accuracy_score, average_precision_score, f1_score, precision_score, recall_score
from torch.utils.data import TensorDataset

import vitlab
from vitlab.cli.main import main
from vitlab.data import Mixup
from vitlab.train import fit, load_recipe
from vitlab.train.evaluate import check_classification_batch, evaluate
from vitlab.train.losses import MultiLabelLoss
from vitlab.train.multilabel import multilabel_metrics
from vitlab.train.objective import objective_for

torch.set_num_threads(1)

FIXTURES = Path(__file__).parent / "fixtures"
TINY = {"img_size": 8, "patch_size": 4, "depth": 1, "embed_dim": 16, "num_heads": 2, "in_chans": 1}
TINY_CLI = ["--model", "vit_tiny_patch16_224", "--img-size", "8", "--set", "model_overrides.patch_size=4",
            "--set", "model_overrides.depth=1", "--set", "model_overrides.embed_dim=16",
            "--set", "model_overrides.num_heads=2", "--batch-size", "16", "--threads", "1", "--no-progress",
            "--recipe", "digits", "--set", "val_fraction=0.25", "--set", "warmup_epochs=0"]


def _recipe(**kw):
    return load_recipe("digits").replace(**{"batch_size": 8, "workers": 0, "val_fraction": 0.0, "ema_decay": None,
                                            "warmup_epochs": 0, "warmup_steps": 0, "label_smoothing": 0.0, **kw})


def _tiny(num_classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return vitlab.create_model("vit_tiny_patch16_224", num_classes=num_classes, **TINY)


def tagged_digits(root: Path, n: int = 64) -> Path:
    """scikit-learn digits as PNG files with tags "even", "big" (> 4), "round" (0, 6, 8, 9) in metadata.jsonl."""
    from sklearn.datasets import load_digits

    d = load_digits()
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        t = int(d.target[i])
        Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).save(root / f"{i}.png")
        tags = [name for name, ok in (("even", t % 2 == 0), ("big", t > 4), ("round", t in (0, 6, 8, 9))) if ok]
        lines.append(json.dumps({"file_name": f"{i}.png", "labels": tags}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


# ---- the loss


def test_the_loss_is_torch_bce_with_logits_and_timm_smoothing() -> None:
    ref = json.loads((FIXTURES / "multilabel_timm.json").read_text())
    logits, index, multi_hot = (torch.tensor(ref[k]) for k in ("logits", "index", "multi_hot"))
    plain = MultiLabelLoss()
    torch.testing.assert_close(plain(None, logits, multi_hot), F.binary_cross_entropy_with_logits(logits, multi_hot))
    torch.testing.assert_close(plain(None, logits, multi_hot).item(), ref["bce_multi_hot"])  # timm's, as given
    # smoothing: 1 -> 1 - s + s/K, 0 -> s/K, as timm's BinaryCrossEntropy smooths one-hot targets
    smooth = MultiLabelLoss(label_smoothing=0.1)
    torch.testing.assert_close(smooth(None, logits, F.one_hot(index, 5).float()).item(),
                               ref["bce_index_smoothing_0.1"])
    expected = F.binary_cross_entropy_with_logits(logits, multi_hot * (1 - 0.1 + 0.1 / 5) + (1 - multi_hot) * 0.1 / 5)
    torch.testing.assert_close(smooth(None, logits, multi_hot), expected)


def test_objective_for_a_multi_label_recipe_uses_bce_and_mixes_multi_hot_targets(monkeypatch) -> None:
    ref = json.loads((FIXTURES / "multilabel_timm.json").read_text())
    objective = objective_for(None, _recipe(multi_label=True, label_smoothing=0.1), 5)
    assert isinstance(objective.criterion, MultiLabelLoss) and objective.describe().endswith("(multi-label)")
    model = _tiny(5)
    x, y = torch.randn(6, 1, 8, 8), torch.tensor(ref["multi_hot"])
    loss, _ = objective.step(model, (x, y))
    with torch.no_grad():
        expected = F.binary_cross_entropy_with_logits(model(x), y * 0.9 + 0.1 / 5)
    torch.testing.assert_close(loss.detach(), expected)
    # Mixup / CutMix: the (smoothed) multi-hot rows mixed by the batch's lambda, as timm's Mixup mixes its targets
    mixed = objective_for(None, _recipe(multi_label=True, label_smoothing=0.1, mixup_alpha=0.8), 5)
    assert isinstance(mixed.mixup, Mixup) and mixed.criterion.mixed_targets  # smoothed once, by Mixup
    monkeypatch.setattr(Mixup, "_params", lambda self, rng: ("mixup", 0.7))
    _, t = mixed.mixup(x, F.one_hot(torch.tensor(ref["index"]), 5).float())
    torch.testing.assert_close(t, torch.tensor(ref["mixup_target_lam_0.7_smoothing_0.1"]))
    _, t = mixed.mixup(x, y)
    s = y * 0.9 + 0.1 / 5
    torch.testing.assert_close(t, 0.7 * s + 0.3 * s.flip(0))


def test_distillation_is_refused_with_multi_label() -> None:
    from vitlab.train.distill import DistillationLoss

    teacher = _tiny(3)
    loss = DistillationLoss(torch.nn.CrossEntropyLoss(), teacher, kind="hard")
    with pytest.raises(ValueError, match=r"distillation \(--teacher\).*not supported with multi_label"):
        objective_for(loss, _recipe(multi_label=True), 3)


def test_multi_hot_batches_are_checked_for_multi_label() -> None:
    check_classification_batch((torch.zeros(2, 3, 8, 8), torch.tensor([[1.0, 0, 1], [0, 0, 0]])), num_classes=3,
                               multi_label=True)
    with pytest.raises(ValueError, match=r"labels of type int64 tensor \(2,\) for multi-label training.*float "
                                         r"multi-hot"):
        check_classification_batch((torch.zeros(2, 3, 8, 8), torch.tensor([0, 2])), num_classes=3, multi_label=True)


# ---- the metrics


def _scores_with_ties() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (40, 5), generator=g).float() / 4  # five values: many ties, 0.5 itself among them
    y = (torch.rand(40, 5, generator=g) < 0.35).float()
    y[:, 2] = 0  # a label without any positive in the set
    return scores, y


def test_metrics_equal_sklearn_with_ties_and_an_absent_label() -> None:
    scores, y = _scores_with_ties()
    m = multilabel_metrics(scores, y, threshold=0.5)
    present = [j for j in range(5) if y[:, j].any()]
    assert m.labels_without_positives == 1 and math.isnan(m.ap[2])
    yt, s, pred = y.numpy().astype(int), scores.numpy(), (scores >= 0.5).numpy().astype(int)
    assert m.mAP == pytest.approx(average_precision_score(yt[:, present], s[:, present], average="macro"), abs=1e-12)
    for j in present:
        assert m.ap[j] == pytest.approx(average_precision_score(yt[:, j], s[:, j]), abs=1e-12)
    assert m.micro_f1 == pytest.approx(f1_score(yt, pred, average="micro"), abs=1e-12)
    assert m.macro_f1 == pytest.approx(f1_score(yt, pred, average="macro", labels=present, zero_division=0), abs=1e-12)
    assert m.exact_match == pytest.approx(accuracy_score(yt, pred), abs=1e-12)
    np.testing.assert_allclose(m.precision, precision_score(yt, pred, average=None, zero_division=0), atol=1e-12)
    np.testing.assert_allclose(m.recall, recall_score(yt, pred, average=None, zero_division=0), atol=1e-12)
    np.testing.assert_allclose(m.f1, f1_score(yt, pred, average=None, zero_division=0), atol=1e-12)
    assert m.support == yt.sum(0).tolist()
    m3 = multilabel_metrics(scores, y, threshold=0.75)  # another threshold: other decisions
    assert m3.exact_match == pytest.approx(accuracy_score(yt, (s >= 0.75).astype(int)), abs=1e-12)


def test_evaluate_a_multi_label_model() -> None:
    torch.manual_seed(0)
    X, Y = torch.randn(20, 1, 8, 8), (torch.rand(20, 4) < 0.4).float()
    Y[:, 3] = 0
    model = _tiny(4).eval()
    r = evaluate(model, TensorDataset(X, Y), num_classes=4, batch_size=6, multi_label=True, threshold=0.5)
    with torch.no_grad():
        logits = model(X)
    assert r.loss == pytest.approx(F.binary_cross_entropy_with_logits(logits, Y).item(), rel=1e-5)
    p, yt = torch.sigmoid(logits).numpy(), Y.numpy().astype(int)
    assert r.summary()["mAP"] == pytest.approx(average_precision_score(yt[:, :3], p[:, :3]), abs=1e-6)
    assert r.summary()["labels_without_positives"] == 1 and "top1" not in r.summary()
    assert r.summary()["exact_match"] == pytest.approx(accuracy_score(yt, (p >= 0.5).astype(int)), abs=1e-6)


# ---- fit


def test_fit_trains_multi_hot_targets_and_saves_a_sigmoid_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    X, Y = torch.randn(16, 1, 8, 8), (torch.rand(16, 3) < 0.5).float()
    recipe = _recipe(max_steps=2, multi_label=True, mixup_alpha=0.8, label_smoothing=0.1)
    model = _tiny(3)
    r = fit(model, recipe, train_set=TensorDataset(X, Y), val_set=TensorDataset(X, Y), output_dir=tmp_path / "run",
            progress=False)
    assert {"val_loss", "val_mAP", "val_micro_f1", "val_macro_f1", "val_exact_match"} <= set(r.val)
    assert "val_top1" not in r.val
    assert vitlab.load_model(tmp_path / "run" / "model.safetensors").score_function == "sigmoid"
    assert json.loads((tmp_path / "run" / "recipe.json").read_text())["multi_label"] is True


# ---- the commands


@pytest.fixture(scope="module")
def ml_run(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("ml")
    data = tagged_digits(base / "tagged", 48)
    out = base / "run"
    assert main(["train", "--data", str(data), "--multi-label", "--steps", "3", "--output", str(out), *TINY_CLI]) == 0
    return data, out


def test_train_writes_a_multi_label_run(ml_run) -> None:
    data, out = ml_run
    model = vitlab.load_model(out / "model.safetensors")
    assert model.score_function == "sigmoid" and model.class_names == ["big", "even", "round"]
    results = json.loads((out / "results.json").read_text())
    assert {"mAP", "micro_f1", "exact_match"} <= set(results["test"]) and "top1" not in results["test"]
    assert json.loads((out / "recipe.json").read_text())["multi_label"] is True


def test_eval_reports_multi_label_metrics(ml_run, tmp_path: Path, capsys) -> None:
    data, out = ml_run
    assert main(["eval", "--checkpoint", str(out), "--output", str(tmp_path / "ev"), "--threshold", "0.4",
                 "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "mAP" in printed and "micro-F1" in printed and "threshold 0.4" in printed
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["threshold"] == 0.4 and m["samples"] == 12 and set(m["per_label"]) == {"big", "even", "round"}
    assert {"ap", "precision", "recall", "f1", "support"} == set(m["per_label"]["even"])
    # the numbers: scikit-learn's on the model's sigmoid scores of the held-out images
    from vitlab.data import eval_transform
    from vitlab.data.multilabel import build_multilabel_dataset

    model = vitlab.load_model(out / "model.safetensors").eval()
    ds = build_multilabel_dataset(data, split="test", val_fraction=0.25, seed=0,
                                  transform=eval_transform(model.preprocessing))
    x, y = torch.stack([ds[i][0] for i in range(len(ds))]), torch.stack([ds[i][1] for i in range(len(ds))])
    with torch.no_grad():
        p = torch.sigmoid(model(x)).numpy()
    yt = y.numpy().astype(int)
    present = [j for j in range(3) if yt[:, j].any()]
    assert m["mAP"] == pytest.approx(average_precision_score(yt[:, present], p[:, present]), abs=1e-5)
    assert m["micro_f1"] == pytest.approx(f1_score(yt, (p >= 0.4).astype(int), average="micro"), abs=1e-5)
    csv_lines = (tmp_path / "ev" / "per_class.csv").read_text().splitlines()
    assert csv_lines[0] == "label,support,ap,precision,recall,f1" and len(csv_lines) == 4


def test_predict_lists_the_labels_at_the_threshold(ml_run, capsys) -> None:
    data, out = ml_run
    img = str(data / "0.png")
    assert main(["predict", img, "--checkpoint", str(out), "--json", "--threshold", "0.5", "--threads", "1"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    scores = {q["class"]: q["probability"] for q in row["predictions"]}
    assert set(scores) == {"big", "even", "round"} and row["threshold"] == 0.5
    assert [q["class"] for q in row["labels"]] == sorted((c for c, v in scores.items() if v >= 0.5),
                                                         key=lambda c: -scores[c])
    assert main(["predict", img, "--checkpoint", str(out), "--threshold", "0", "--threads", "1"]) == 0
    line = capsys.readouterr().out
    assert "[>= 0]" in line and all(name in line.split("[>= 0]")[0] for name in ("big", "even", "round"))
    assert main(["predict", img, "--checkpoint", str(out), "--threshold", "1", "--threads", "1"]) == 0
    assert ": no label [>= 1]" in capsys.readouterr().out
    # the Python API: the same labels
    got = vitlab.predict(out / "model.safetensors", img, threshold=0.5)
    assert [q["label"] for q in got] == [q["class"] for q in row["labels"]]
    assert len(vitlab.predict(out / "model.safetensors", img, threshold=0.0, topk=1)) == 3


def test_resume_keeps_multi_label(ml_run, tmp_path: Path, caplog) -> None:
    import shutil

    data, out = ml_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    # the run's own recipe (multi_label true), without --multi-label
    assert main(["train", "--output", str(run), "--resume", "--steps", "4", "--threads", "1", "--no-progress"]) == 0
    assert json.loads((run / "recipe.json").read_text())["multi_label"] is True
    assert vitlab.load_model(run / "model.safetensors").score_function == "sigmoid"
    # a recipe that is not multi-label: refused before anything is read as single labels
    assert main(["train", "--output", str(run), "--resume", "--steps", "5", *TINY_CLI]) == 2
    assert "was trained multi-label" in caplog.text and "asks for single-label" in caplog.text


def test_train_refuses_a_teacher_with_multi_label(ml_run, tmp_path: Path, caplog) -> None:
    data, out = ml_run
    assert main(["train", "--data", str(data), "--multi-label", "--teacher", str(out), "--steps", "1",
                 "--output", str(tmp_path / "d"), *TINY_CLI]) == 2
    assert "not supported with --multi-label" in caplog.text


def test_export_validates_a_multi_label_model_on_its_tagged_folder(tmp_path):
    """A sigmoid-scored model's export takes its validation images from a folder of label lists (the folder its
    run trained on), which the single-label reader refuses."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from vitlab.export.onnx import export_onnx

    data = tagged_digits(tmp_path / "tagged", n=40)  # its test split: the 4 images held out (val_fraction 0.1)
    model = _tiny(3).eval()
    model.score_function = "sigmoid"
    report = export_onnx(model, tmp_path / "m.onnx", validate_images=data, num_images=4)
    assert report.images == 4 and report.image_source == str(data)
    assert (tmp_path / "m.onnx").is_file()
    assert report.agreement == "label-set agreement (threshold 0.5)" and report.top1_agreement == 1.0


def test_export_agreement_of_a_multi_label_head_is_each_images_label_set():
    """Top-1 can agree where the labels do not: the second image's second label crosses 0.5 in one output only."""
    from vitlab.export.onnx import TASK_OUTPUTS, compare_outputs, task_outputs

    model = _tiny(3)
    assert task_outputs(model)[1] is TASK_OUTPUTS["classification"]
    model.score_function = "sigmoid"
    _, spec = task_outputs(model)
    ref = {"logits": torch.tensor([[2.0, -1.0, -3.0], [3.0, 0.2, -1.0]])}
    out = {"logits": torch.tensor([[2.1, -1.1, -3.0], [3.0, -0.1, -1.0]])}
    assert compare_outputs(spec, ref, out)[1] == 0.5
    assert compare_outputs(TASK_OUTPUTS["classification"], ref, out)[1] == 1.0


def test_the_auto_recipe_counts_images_not_label_positives(tmp_path):
    """100 images with about 11 of 12 tags each: the auto recipe sizes the run for 100 images with 10 held out
    (one draw over the images), not for the 1 image left after a per-label hold-out of the ~1,100 positives."""
    from vitlab.data.multilabel import build_multilabel_dataset, random_split
    from vitlab.train.auto import choose_recipe, data_facts, data_warnings, held_out_images
    from vitlab.train.hardware import detect

    rng = np.random.default_rng(0)
    lines = []
    for i in range(100):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        tags = [f"t{k}" for k in range(12) if rng.random() < 0.9 or (k == 11 and i < 3)]
        lines.append(json.dumps({"file_name": f"{i}.png", "labels": tags if i >= 3 else ["t11"]}))
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    facts = data_facts(build_multilabel_dataset(tmp_path, split="train", val_fraction=0.0))
    assert facts.multi_label and facts.num_images == 100 and sum(facts.class_counts) > 1000
    assert held_out_images(facts, 0.1) == len(random_split(100, 0.1, 0)[1]) == 10
    choice = choose_recipe(facts, detect(threads=1))
    assert "90 images" in choice.summary and "10 more held out" in choice.summary
    assert choice.recipe.batch_size > 1
    assert "12 labels" in choice.recipe.description
    warnings = data_warnings(dataclasses.replace(facts, class_counts=(100, 5)))
    assert warnings and "label" in warnings[0] and "AP" in warnings[0]


def _sigmoid_checkpoint_and_class_folders(tmp_path):
    from vitlab.checkpoints import save_model

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(tmp_path / "data" / c / f"{i}.png")
    model = _tiny(2)
    model.score_function = "sigmoid"  # a Hugging Face multi-label head, or fit with a BCE criterion
    save_model(model, tmp_path / "ck.safetensors", class_names=["a", "b"])
    return model, tmp_path / "ck.safetensors", tmp_path / "data"


def test_a_sigmoid_head_on_class_folders_is_scored_by_top1_as_before(tmp_path, capsys):
    """Only label sets make eval score a sigmoid head as multi-label: on class folders (one label per image) it is
    top-1 as before (refused with a --multi-label hint in between); tagged data from a run without a record
    (job.json) is multi-label."""
    _, ck, data = _sigmoid_checkpoint_and_class_folders(tmp_path)
    assert main(["eval", "--checkpoint", str(ck), "--data", str(data), "--output", str(tmp_path / "ev"), "--json",
                 "--threads", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "top1" in report and "mAP" not in report
    tagged = tagged_digits(tmp_path / "tagged", n=12)
    model3 = _tiny(3)
    model3.score_function = "sigmoid"
    from vitlab.checkpoints import save_model

    save_model(model3, tmp_path / "ck3.safetensors", class_names=["big", "even", "round"])
    assert main(["eval", "--checkpoint", str(tmp_path / "ck3.safetensors"), "--data", str(tagged),
                 "--output", str(tmp_path / "ev3"), "--json", "--threads", "1"]) == 0
    assert "mAP" in json.loads(capsys.readouterr().out)


def test_export_of_a_sigmoid_head_validates_on_class_folders(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from vitlab.export.onnx import export_onnx

    model, _, data = _sigmoid_checkpoint_and_class_folders(tmp_path)
    report = export_onnx(model.eval(), tmp_path / "m.onnx", validate_images=data, num_images=2)
    assert report.image_source == str(data) and report.images >= 1
