"""``vitlab eval``'s class matching with digit class names, the k-NN / linear probe options and their checks, a
numerically stable k-NN vote, skipped images under the feature protocols, argmax top-1 on tied logits, a grey
model's normalisation, and DeiT's scaling of the soft distillation term."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset

import vitlab
from vitlab.cli.main import main
from vitlab.models.base import fit_channels
from vitlab.models.registry import get_entry
from vitlab.ssl.knn import weighted_knn
from vitlab.ssl.probe import train_linear_probe
from vitlab.train.distill import DistillationLoss
from vitlab.train.evaluate import evaluate


def _bright_dark_checkpoint(path: Path, names: list[str], bright: str, dark: str) -> Path:
    """A ViT without blocks whose head says ``bright`` for bright grey images and ``dark`` for dark ones."""
    model = vitlab.create_model("vit_tiny_patch16_224", img_size=16, patch_size=16, depth=0, embed_dim=8,
                                num_heads=2, num_classes=len(names), global_pool="avg", class_token=False,
                                in_chans=1, mean=(0.5,), std=(0.5,), crop_pct=1.0)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.patch_embed.proj.weight[0] = 1.0  # feature 0: the summed brightness, feature 1: its negative
        model.patch_embed.proj.weight[1] = -1.0
        model.fc_norm.weight.fill_(1.0)
        model.head.weight[names.index(bright), 0] = 1.0
        model.head.weight[names.index(dark), 1] = 1.0
    model.class_names = list(names)
    return vitlab.save_model(model, path)


def _folder(root: Path, classes: dict[str, int], per_class: int = 3) -> Path:
    for name, value in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((16, 16), value + i, np.uint8)).save(root / name / f"{i}.png")
    return root


def _data(root: Path, classes: dict[str, int]) -> Path:
    """DATA/train, DATA/val and DATA/test, each with 3 images per class (val/: every train/ image is trained on)."""
    for split in ("train", "val", "test"):
        _folder(root / split, classes)
    return root


def _eval(capsys: pytest.CaptureFixture, *args: str) -> dict:
    assert main(["eval", *args, "--json", "--threads", "1"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture
def bright_dark(tmp_path: Path) -> tuple[str, str]:
    ckpt = _bright_dark_checkpoint(tmp_path / "m.safetensors", ["bright", "dark"], "bright", "dark")
    return str(ckpt), str(_data(tmp_path / "data", {"bright": 240, "dark": 5}))


# 1. class names "0".."9"


def test_a_subset_of_digit_classes_is_matched_by_name(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    names = [str(i) for i in range(10)]
    ckpt = str(_bright_dark_checkpoint(tmp_path / "m.safetensors", names, bright="7", dark="3"))
    data = str(_data(tmp_path / "data", {"3": 5, "7": 240}))
    metrics = _eval(capsys, "--checkpoint", ckpt, "--data", data)  # --class-match auto
    assert metrics["top1"] == 1.0 and metrics["class_match"] == {"3": "3", "7": "7"}
    assert _eval(capsys, "--checkpoint", ckpt, "--data", data, "--class-match", "name")["top1"] == 1.0


# 2. option checks


@pytest.mark.parametrize("option, value", [("--knn-k", "0"), ("--knn-k", "-3"), ("--knn-t", "0"),
                                           ("--knn-t", "-0.07"), ("--probe-epochs", "0")])
def test_knn_and_probe_options_out_of_range_are_refused(option: str, value: str,
                                                        capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["eval", "--checkpoint", "x.safetensors", "--data", "digits", option, value])
    assert option in capsys.readouterr().err


def test_the_library_refuses_them_too() -> None:
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 0, 1, 0, 1])
    for bad in ({"k": 0}, {"k": -3}, {"temperature": 0.0}, {"temperature": -0.07}):
        with pytest.raises(ValueError, match="k must be|temperature must be"):
            weighted_knn(x, y, x, 2, **bad)
    with pytest.raises(ValueError, match="epochs must be"):
        train_linear_probe(x, y, 2, epochs=0)


def test_knn_k_above_the_training_images_is_reported_as_used(bright_dark, capsys: pytest.CaptureFixture,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    ckpt, data = bright_dark
    metrics = _eval(capsys, "--checkpoint", ckpt, "--data", data, "--protocol", "knn", "--knn-k", "50")
    assert metrics["k"] == 6 and metrics["train_images"] == 6 and metrics["top1"] == 1.0
    assert "--knn-k 50: only 6 training images, so k-NN votes with k=6" in caplog.text


def test_options_of_another_protocol_are_warned_about(bright_dark, capsys: pytest.CaptureFixture,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    ckpt, data = bright_dark
    m = _eval(capsys, "--checkpoint", ckpt, "--data", data, "--protocol", "linear", "--knn-k", "5",
              "--probe-epochs", "3")
    assert m["epochs"] == 3 and "--knn-k: not used by --protocol linear" in caplog.text
    caplog.clear()
    _eval(capsys, "--checkpoint", ckpt, "--data", data, "--knn-t", "0.1", "--probe-epochs", "3")
    assert "--knn-t / --probe-epochs: not used by --protocol classifier" in caplog.text
    caplog.clear()
    m = _eval(capsys, "--checkpoint", ckpt, "--data", data, "--protocol", "knn")
    assert (m["k"], m["temperature"]) == (6, 0.07) and "not used by" not in caplog.text


# 3. a stable k-NN vote


def test_weighted_knn_at_a_small_temperature_matches_a_float64_reference() -> None:
    rng = np.random.default_rng(0)
    # a large shared component, as in a backbone's features: every cosine similarity is above 0.9, where
    # exp(sim / 0.01) overflows float32
    common, centres = 8.0 * rng.normal(size=16), rng.normal(size=(5, 16))
    train_y = rng.integers(0, 5, 400)
    train_x = common + centres[train_y] + 0.5 * rng.normal(size=(400, 16))
    test_x = common + centres[rng.integers(0, 5, 300)] + 0.5 * rng.normal(size=(300, 16))
    k, t = 20, 0.01
    # reference: DINO's vote exp(sim / T) over the k most similar, in float64 (no overflow up to T ~ 0.0014)
    a = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    b = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    sim = b @ a.T
    top = np.argsort(-sim, axis=1)[:, :k]
    votes = np.zeros((len(b), 5))
    for i in range(len(b)):
        np.add.at(votes[i], train_y[top[i]], np.exp(sim[i, top[i]] / t))
    expected = votes.argmax(1)
    pred = weighted_knn(torch.tensor(train_x, dtype=torch.float32), torch.tensor(train_y),
                        torch.tensor(test_x, dtype=torch.float32), 5, k=k, temperature=t)
    assert (pred.numpy() == expected).mean() == 1.0


# 4. --skip-bad-images under the feature protocols


@pytest.mark.parametrize("protocol", ["knn", "linear"])
def test_feature_protocols_skip_bad_images(protocol: str, bright_dark, capsys: pytest.CaptureFixture) -> None:
    ckpt, data = bright_dark
    (Path(data) / "train" / "dark" / "bad.png").write_bytes(b"garbage")
    options = ["--probe-epochs", "5"] if protocol == "linear" else []
    m = _eval(capsys, "--checkpoint", ckpt, "--data", data, "--protocol", protocol, "--skip-bad-images", *options,
              "--batch-size", "1")  # a batch of the bad image alone
    assert m["train_images"] == 6 and m["samples"] == 6 and m["top1"] == 1.0


# 5. a grey model trained from scratch


def test_a_one_channel_training_run_is_normalised_with_fit_channels(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["train", "--output", str(out), "--model", "deit_tiny_patch16_224", "--steps", "1",
                 "--batch-size", "16", "--no-progress", "--threads", "1", "--set", "model_overrides.depth=1",
                 "--set", "model_overrides.embed_dim=32", "--set", "model_overrides.num_heads=2"]) == 0  # digits
    pre = vitlab.load_model(out / "model.safetensors").preprocessing
    template = get_entry("deit_tiny_patch16_224").config  # ImageNet statistics: the grey mean is their average
    assert pre.input_size[0] == 1
    assert pre.mean == pytest.approx(fit_channels(tuple(template.mean), 1))
    assert pre.std == pytest.approx(fit_channels(tuple(template.std), 1))


# 6. ties


class _Constant(nn.Module):
    """The same logits for every image (ten zeros by default: a zero-initialised head)."""

    def __init__(self, logits: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("logits", torch.zeros(1, 10) if logits is None else logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1) if self.logits.shape[0] == 1 else self.logits


def test_top1_on_tied_logits_is_the_first_maximal_class() -> None:
    ds = TensorDataset(torch.zeros(4, 1, 4, 4), torch.tensor([0, 0, 3, 9]))
    r = evaluate(_Constant(), ds, num_classes=10)
    assert r.predictions.tolist() == [0, 0, 0, 0]  # as argmax, numpy and scikit-learn break ties
    assert r.top1 == 0.5 and r.confusion[:, 0].sum().item() == 4


# 7. DeiT's soft distillation scale


def test_soft_distillation_equals_deits_official_formula() -> None:
    torch.manual_seed(0)
    student, teacher_logits = torch.randn(4, 10), torch.randn(4, 10)
    T, alpha = 3.0, 0.5
    y = torch.randint(0, 10, (4,))
    crit = DistillationLoss(nn.CrossEntropyLoss(), _Constant(teacher_logits), kind="soft", alpha=alpha, tau=T)
    # deit/losses.py DistillationLoss, distillation_type "soft"
    distillation_loss = F.kl_div(F.log_softmax(student / T, dim=1), F.log_softmax(teacher_logits / T, dim=1),
                                 reduction="sum", log_target=True) * (T * T) / student.numel()
    expected = F.cross_entropy(student, y) * (1 - alpha) + distillation_loss * alpha
    torch.testing.assert_close(crit(torch.zeros(4, 1, 2, 2), student, y), expected)
    torch.testing.assert_close(crit.last_parts["distill"], distillation_loss)
