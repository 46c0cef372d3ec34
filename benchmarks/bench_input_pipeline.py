"""The training input pipeline against timm's: images/s delivered by the loader, batch 64, no model.

Arms, alternated within every round (order reversed every other round), ``--rounds`` rounds of ``--batches``
batches after one warm-up batch each, one thread, workers 0:

- ``vitlab_cached``: the loader ``vitlab train`` builds for a small folder (decoded once into memory by
  ``cache_decoded``, then cropped / augmented per sample);
- ``vitlab_decode``: the same transform, each image decoded every epoch;
- ``timm``: ``timm.data.create_loader`` (PIL + torchvision transforms, decoding every epoch), without its
  prefetcher, and ``timm_prefetch``: with it (uint8 batches, normalised per batch).

The augmentation is DeiT's at ``--size`` (random-resized crop + flip, bicubic, mean / std 0.5) and, with
``--randaugment``, RandAugment ``rand-m9-mstd0.5-inc1`` and random erasing 0.25 (pixel mode). Rates are the median
over rounds; ratios are each arm's rate over timm's (no prefetcher).

    tar -xf ../shared/data/cifar10-jpg-train.tar -C /tmp/c10      # then a folder of class folders
    /tmp/peers/bin/python benchmarks/bench_input_pipeline.py --data /tmp/c10/train --images 3000 [--randaugment]

Needs timm (and torchvision) from a peer venv; vitlab comes from this checkout. Pillow 13 refuses
``ImageOps.posterize(img, 0)``, which timm's RandAugment asks for at magnitude 10: patched here to black, as older
Pillow gave.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch


def subset(src: Path, n: int, seed: int = 0) -> Path:
    """A folder of symbolic links to ``n`` images of ``src``'s class folders (the same for every arm)."""
    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    random.Random(seed).shuffle(files)
    out = Path(tempfile.mkdtemp(prefix="vitlab_bench_input_")) / "train"
    for p in files[:n]:
        d = out / p.parent.name
        d.mkdir(parents=True, exist_ok=True)
        (d / p.name).symlink_to(p.resolve())
    return out


def patch_timm_posterize() -> None:
    import timm.data.auto_augment as aa
    from PIL import Image, ImageOps

    def posterize(img, bits_to_keep, **_):
        if bits_to_keep >= 8:
            return img
        if bits_to_keep <= 0:
            return Image.new(img.mode, img.size)
        return ImageOps.posterize(img, bits_to_keep)

    for k, op in list(aa.NAME_TO_OP.items()):
        if op.__name__ == "posterize":
            aa.NAME_TO_OP[k] = posterize


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, type=Path, help="a folder of class folders of images")
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--randaugment", action="store_true")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    patch_timm_posterize()
    from timm.data import ImageDataset
    from timm.data import create_loader as timm_loader
    from torch.utils.data import DistributedSampler

    from vitlab.benchmark import machine_info
    from vitlab.data import build_dataset
    from vitlab.data.cache import cache_decoded
    from vitlab.data.loader import create_loader
    from vitlab.data.transforms import train_transform
    from vitlab.models.base import Preprocessing

    folder = subset(a.data, a.images)
    mean = std = (0.5, 0.5, 0.5)
    pre = Preprocessing(input_size=(3, a.size, a.size), mean=mean, std=std, interpolation="bicubic")

    def vitlab_arm(cached: bool):
        ds = build_dataset(f"folder:{folder.parent}", split="train", val_fraction=0.0, seed=0)
        ds.transform = train_transform(pre, randaugment=(2, 9) if a.randaugment else None, randaugment_mstd=0.5,
                                       re_prob=0.25 if a.randaugment else 0.0)
        if cached:
            cache_decoded(ds, max_bytes=2**30, workers=0)
        sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0, drop_last=True)
        return create_loader(ds, batch_size=a.batch, shuffle=False, num_workers=0, seed=0, drop_last=True,
                             sampler=sampler)

    def timm_arm(prefetch: bool):
        return timm_loader(ImageDataset(str(folder)), input_size=(3, a.size, a.size), batch_size=a.batch,
                           is_training=True, use_prefetcher=prefetch, re_prob=0.25 if a.randaugment else 0.0,
                           re_mode="pixel", auto_augment="rand-m9-mstd0.5-inc1" if a.randaugment else None,
                           color_jitter=None, interpolation="bicubic", mean=mean, std=std, num_workers=0,
                           device=torch.device("cpu"), pin_memory=False, persistent_workers=False)

    arms = {"vitlab_cached": vitlab_arm(True), "vitlab_decode": vitlab_arm(False), "timm": timm_arm(False),
            "timm_prefetch": timm_arm(True)}
    seconds: dict[str, list[float]] = {k: [] for k in arms}
    for r in range(a.rounds):
        for name in (list(arms) if r % 2 == 0 else list(arms)[::-1]):
            it = iter(arms[name])
            next(it)  # warm-up batch
            t0 = time.perf_counter()
            for _ in range(a.batches):
                next(it)
            seconds[name].append(time.perf_counter() - t0)
            del it
    n = a.batches * a.batch
    rate = {k: n / statistics.median(v) for k, v in seconds.items()}
    rows = {k: {"img_s": round(v, 1), "vs_timm": round(v / rate["timm"], 3),
                "rounds_img_s": [round(n / s) for s in seconds[k]]} for k, v in rate.items()}
    result = {"machine": machine_info(), "args": {k: str(v) for k, v in vars(a).items()}, "arms": rows,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for k, v in rows.items():
        print(f"size {a.size} randaugment {a.randaugment}: {k:14s} {v['img_s']:7.1f} img/s  {v['vs_timm']:.2f}x timm  "
              f"rounds {v['rounds_img_s']}")
    if a.out:
        a.out.write_text(json.dumps(result, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
