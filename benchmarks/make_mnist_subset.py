"""A small MNIST image folder for transfer benchmarks (benchmarks/peft_transfer.sh): N training images per digit
drawn (seeded) from MNIST's training set, and MNIST's whole test set.

    python benchmarks/make_mnist_subset.py --mnist /work/shared/data/mnist --output /tmp/mnist_small --train 100

Writes OUTPUT/train/D/*.png (N per digit) and OUTPUT/test/D/*.png (10,000 images, 28x28 grey)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from vitlab.data.sources import read_idx


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mnist", required=True, help="folder with MNIST's four IDX files (gzip or raw)")
    p.add_argument("--output", required=True)
    p.add_argument("--train", type=int, default=100, help="training images per digit")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    root, out = Path(args.mnist), Path(args.output)
    rng = np.random.default_rng(args.seed)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(next(root.glob(f"{prefix}-images*")))
        labels = read_idx(next(root.glob(f"{prefix}-labels*")))
        for digit in range(10):
            idx = np.flatnonzero(labels == digit)
            if split == "train":
                idx = rng.choice(idx, size=args.train, replace=False)
            folder = out / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for i in idx:
                Image.fromarray(images[i]).save(folder / f"{i:05d}.png")


if __name__ == "__main__":
    main()
