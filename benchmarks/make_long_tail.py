"""A long-tailed image folder from CIFAR-10's JPEG training tar or MNIST, with a balanced test split, for
benchmarks/class_balance_lt.sh.

    python benchmarks/make_long_tail.py --source cifar10 --data /work/shared/data --output /tmp/cifar10_lt \
        [--imbalance 100 --test-per-class 1000 --seed 0]

Class c (in label order: CIFAR-10's airplane .. truck, MNIST's 0 .. 9) keeps round(n_max * (1 / imbalance) **
(c / (K - 1))) training images (the exponential profile of the long-tail literature, e.g. Cui et al. 2019's
CIFAR-10-LT), n_max the images per class left after the test split. CIFAR-10: a seeded ``--test-per-class`` of
each class's training images form test/ (balanced), the rest is drawn from for train/ (the JPEG files copied as
they are). MNIST: train/ from its training images, test/ from t10k (about 1,000 per class), as PNGs.
Writes OUTPUT/train/<class>/*, OUTPUT/test/<class>/* and prints the images per class."""

from __future__ import annotations

import argparse
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def long_tail_counts(n_max: int, num_classes: int, imbalance: float) -> list[int]:
    return [round(n_max * (1.0 / imbalance) ** (c / (num_classes - 1))) for c in range(num_classes)]


def cifar10(data: Path, out: Path, *, imbalance: float, test_per_class: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    with tarfile.open(data / "cifar10-jpg-train.tar") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")]
        by_class: dict[str, list[tarfile.TarInfo]] = {}
        for m in sorted(members, key=lambda m: m.name):
            by_class.setdefault(m.name.split("/")[-2], []).append(m)
        classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
        assert sorted(classes) == sorted(by_class), sorted(by_class)
        n_max = min(len(v) for v in by_class.values()) - test_per_class
        counts = long_tail_counts(n_max, len(classes), imbalance)
        for name, keep in zip(classes, counts):
            files = [by_class[name][i] for i in rng.permutation(len(by_class[name]))]
            for split, chosen in (("test", files[:test_per_class]), ("train", files[test_per_class:][:keep])):
                folder = out / split / name
                folder.mkdir(parents=True, exist_ok=True)
                for m in chosen:
                    (folder / Path(m.name).name).write_bytes(tar.extractfile(m).read())
    return counts


def mnist(data: Path, out: Path, *, imbalance: float, seed: int) -> list[int]:
    from vitlab.data.sources import read_idx

    root = data / "mnist"
    rng = np.random.default_rng(seed)
    train_x, train_y = read_idx(next(root.glob("train-images*"))), read_idx(next(root.glob("train-labels*")))
    test_x, test_y = read_idx(next(root.glob("t10k-images*"))), read_idx(next(root.glob("t10k-labels*")))
    n_max = min(int((train_y == d).sum()) for d in range(10))
    counts = long_tail_counts(n_max, 10, imbalance)
    for split, x, y, keep in (("train", train_x, train_y, counts), ("test", test_x, test_y, None)):
        for d in range(10):
            idx = rng.permutation(np.flatnonzero(y == d))
            folder = out / split / str(d)
            folder.mkdir(parents=True, exist_ok=True)
            for i in idx[: keep[d]] if keep else idx:
                Image.fromarray(x[i].astype(np.uint8)).save(folder / f"{i:05d}.png")
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", choices=("cifar10", "mnist"), required=True)
    p.add_argument("--data", default="/work/shared/data", help="the folder holding cifar10-jpg-train.tar and mnist/")
    p.add_argument("--output", required=True)
    p.add_argument("--imbalance", type=float, default=100.0, help="images of the largest class / the smallest")
    p.add_argument("--test-per-class", type=int, default=1000, help="CIFAR-10: held-out test images per class")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out = Path(args.output)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"--output {out} is not empty")
    if args.source == "cifar10":
        counts = cifar10(Path(args.data), out, imbalance=args.imbalance, test_per_class=args.test_per_class,
                         seed=args.seed)
    else:
        counts = mnist(Path(args.data), out, imbalance=args.imbalance, seed=args.seed)
    print(f"{args.source} long-tailed x{args.imbalance:g}: train images per class {counts} ({sum(counts)} in all)")


if __name__ == "__main__":
    main()
