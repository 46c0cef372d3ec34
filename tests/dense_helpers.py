"""A small MNIST-style IDX folder of synthetic glyphs, so that canvas tests need not read all of MNIST."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_fake_mnist(root: Path, n: int = 40, seed: int = 0) -> Path:
    """``n`` 28x28 glyphs per split: class c is a filled bar whose shape depends on c."""
    g = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix in ("train", "t10k"):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = np.zeros((n, 28, 28), dtype=np.uint8)
        for i, c in enumerate(labels):
            h, w = 6 + 2 * (c % 5), 6 + 3 * (c // 5) * 2
            y, x = int(g.integers(2, 26 - h)), int(g.integers(2, 26 - w))
            images[i, y:y + h, x:x + w] = 255
        with open(root / f"{prefix}-images-idx3-ubyte", "wb") as f:
            f.write(bytes([0, 0, 8, 3]) + np.array([n, 28, 28], dtype=">i4").tobytes() + images.tobytes())
        with open(root / f"{prefix}-labels-idx1-ubyte", "wb") as f:
            f.write(bytes([0, 0, 8, 1]) + np.array([n], dtype=">i4").tobytes() + labels.tobytes())
    return root


# a tiny grey DETR (small ResNet, one encoder and two decoder layers) for the command-line tests
DETR_TINY = {"in_chans": 1, "backbone_args": {"layers": [1, 1], "channels": [16, 32], "stem_chs": 8},
             "dim": 32, "num_heads": 2, "enc_depth": 1, "dec_depth": 2, "ffn_dim": 32, "num_queries": 4,
             "dropout": 0.0, "mean": [0.5], "std": [0.5]}

# a tiny grey SETR (three blocks, patch 8, 16-wide decoder) for the command-line and export tests
SETR_TINY = {"in_chans": 1, "channels": 16, "mean": [0.5], "std": [0.5],
             "backbone_args": {"embed_dim": 32, "depth": 3, "num_heads": 2, "patch_size": 8}}

# the same at 32 px with three classes, for the ONNX export tests and the export table
DETR_EXPORT = {**DETR_TINY, "img_size": 32, "num_classes": 3}
SETR_EXPORT = {**SETR_TINY, "img_size": 32, "num_classes": 3}


def make_test_canvases(root: Path, *, train: int = 4, val: int = 2, size: int = 32, seed: int = 1) -> Path:
    """Digit canvases from :func:`write_fake_mnist` through `vitlab make-canvases` (``root/c``)."""
    from vitlab.cli.main import main

    mnist = write_fake_mnist(root / "mnist")
    assert main(["make-canvases", "--mnist", str(mnist), "--seed", str(seed), "--output", str(root / "c"), "--train",
                 str(train), "--val", str(val), "--size", str(size)]) == 0
    return root / "c"
