"""Two MNIST digits side by side (28x56 px): 100 classes ("37": a 3 left of a 7), for benchmarks/auto_recipe_aspect.sh.

    python benchmarks/make_digit_pairs.py --mnist /work/shared/data/mnist --output /tmp/pairs [--train 30 --val 10]

Writes OUTPUT/train/cNN/*.png and OUTPUT/val/cNN/*.png; the digits of a pair are drawn (seeded) from MNIST's
training images, val's from images train does not use."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from vitlab.data.sources import read_idx


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mnist", required=True, help="folder with train-images-idx3-ubyte[.gz] and its labels")
    p.add_argument("--output", required=True)
    p.add_argument("--train", type=int, default=30, help="images per class in train/")
    p.add_argument("--val", type=int, default=10, help="images per class in val/")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    root = Path(args.mnist)
    images = read_idx(next(root.glob("train-images*")))
    labels = read_idx(next(root.glob("train-labels*")))
    rng = np.random.default_rng(args.seed)
    by_digit = {d: list(rng.permutation(np.flatnonzero(labels == d))) for d in range(10)}
    for split, n in (("train", args.train), ("val", args.val)):
        for a in range(10):
            for b in range(10):
                folder = Path(args.output) / split / f"c{a}{b}"
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    pair = np.concatenate([images[by_digit[a].pop()], images[by_digit[b].pop()]], axis=1)
                    Image.fromarray(pair.astype(np.uint8)).save(folder / f"{i}.png")


if __name__ == "__main__":
    main()
