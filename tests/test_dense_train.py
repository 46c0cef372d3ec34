"""End to end through the engine: a tiny DETR overfits a handful of digit canvases (loss falls, AP50 on
them reaches 1), and a tiny SETR's loss falls on their masks."""

from __future__ import annotations

from pathlib import Path

import torch

import vitlab
from dense_helpers import write_fake_mnist
from vitlab.data.dense import DenseTransform, Repeated, canvas_datasets, make_canvases
from vitlab.tasks.detection import DetectionObjective, evaluate_detection
from vitlab.tasks.segmentation import SegmentationObjective, evaluate_segmentation
from vitlab.train import fit
from vitlab.train.recipe import Recipe


def _canvases(tmp_path: Path) -> Path:
    mnist = write_fake_mnist(tmp_path / "mnist")
    make_canvases(tmp_path / "c", mnist=mnist, seed=0, n_train=3, n_val=1, size=32, digits=(1, 1), scale=(0.8, 1.0))
    return tmp_path / "c"


def test_detr_overfits_a_handful_of_canvases(tmp_path: Path) -> None:
    torch.manual_seed(0)
    root = _canvases(tmp_path)
    t = DenseTransform(size=32, square=True, channels=1, mean=(0.5,), std=(0.5,))
    ds = canvas_datasets(root, "train", task="detection", transform=t)
    model = vitlab.create_model(
        "detr_resnet50", in_chans=1, img_size=32, dim=32, num_heads=2, enc_depth=1, dec_depth=2, ffn_dim=64,
        num_queries=4, num_classes=10, dropout=0.0, freeze_stem=False, backbone_lr_scale=1.0,
        backbone_args={"layers": (1, 1), "channels": (16, 32), "stem_chs": 16, "in_chans": 1})
    recipe = Recipe(max_steps=120, batch_size=3, lr=2e-3, weight_decay=1e-4, clip_grad=0.1, schedule="constant",
                    augment=False, cpu_threads=1)
    res = fit(model, recipe, train_set=Repeated(ds, 40), output_dir=tmp_path / "run",
              objective=DetectionObjective(10), progress=False)
    losses = [h["loss"] for h in res.history if h.get("kind") == "train"]
    assert losses[-1] < 0.25 * losses[0]
    assert evaluate_detection(model, ds)["AP50"] > 0.999


def test_setr_learns_the_canvas_masks(tmp_path: Path) -> None:
    torch.manual_seed(0)
    root = _canvases(tmp_path)
    t = DenseTransform(size=32, square=True, channels=1, mean=(0.5,), std=(0.5,))
    ds = canvas_datasets(root, "train", task="segmentation", transform=t)
    model = vitlab.create_model("setr_naive_vit_small_patch16", in_chans=1, img_size=32, num_classes=11,
                                backbone_args={"embed_dim": 32, "depth": 3, "num_heads": 2, "patch_size": 4},
                                channels=32)
    recipe = Recipe(max_steps=40, batch_size=3, lr=2e-3, weight_decay=0.0, schedule="constant", augment=False,
                    cpu_threads=1)
    res = fit(model, recipe, train_set=Repeated(ds, 20), output_dir=tmp_path / "run",
              objective=SegmentationObjective(), progress=False)
    losses = [h["loss"] for h in res.history if h.get("kind") == "train"]
    assert losses[-1] < 0.7 * losses[0]
    assert evaluate_segmentation(model, ds, num_classes=11)["pixel_acc"] > 0.9


def test_detection_training_resumes_exactly(tmp_path: Path) -> None:
    root = _canvases(tmp_path)
    t = DenseTransform(size=(24, 32), channels=1, mean=(0.5,), std=(0.5,), train=True, hflip=0.5, crop_prob=0.5)
    ds = canvas_datasets(root, "train", task="detection", transform=t)

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return vitlab.create_model(
            "detr_resnet50", in_chans=1, img_size=32, dim=16, num_heads=2, enc_depth=1, dec_depth=2, ffn_dim=16,
            num_queries=3, num_classes=10, backbone_args={"layers": (1, 1), "channels": (8, 16), "stem_chs": 8})

    recipe = Recipe(max_steps=4, batch_size=3, lr=1e-3, weight_decay=1e-4, clip_grad=0.1, augment=False,
                    cpu_threads=1)
    whole = build()
    fit(whole, recipe, train_set=Repeated(ds, 2), output_dir=tmp_path / "a", objective=DetectionObjective(10),
        progress=False)
    part = build()
    fit(part, recipe, train_set=Repeated(ds, 2), output_dir=tmp_path / "b", objective=DetectionObjective(10),
        progress=False, until_step=3)
    part = build()
    fit(part, recipe, train_set=Repeated(ds, 2), output_dir=tmp_path / "b", objective=DetectionObjective(10),
        progress=False, resume=True)
    for (n, a), (_, b) in zip(whole.state_dict().items(), part.state_dict().items()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=n)
