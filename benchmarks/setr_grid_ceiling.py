"""The best mean IoU a decoder whose logits are a bilinear interpolation of the patch grid can reach on the
digit canvases (SETR-naive; MLA's classifier is linear after its 4x bilinear too): per held-out canvas, grid
logits fitted to the true mask by cross entropy (Adam), then upsampled and scored like a model. Also the
plain average-pooled one-hot mask on the grid, upsampled. Diagnoses localisation limits without training.

    python benchmarks/setr_grid_ceiling.py --data runs/canvases/data [--grids 12 24] [--canvases 100]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def main() -> None:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from vitlab.tasks.metrics import SegmentationMeter

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a make-canvases folder")
    p.add_argument("--grids", type=int, nargs="+", default=[12, 24], help="patch grid sides (96 px / patch)")
    p.add_argument("--canvases", type=int, default=100, help="held-out canvases to fit")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    files = sorted((args.data / "val" / "masks").glob("*.png"))[:args.canvases]
    masks = torch.stack([torch.from_numpy(np.array(Image.open(f), dtype=np.int64)) for f in files])
    size, k = masks.shape[-2:], 11

    def score(logits: torch.Tensor) -> str:
        pred = F.interpolate(logits, size=size, mode="bilinear").argmax(1)
        m, fg = SegmentationMeter(k), SegmentationMeter(2)
        m.update(pred, masks)
        fg.update((pred > 0).long(), (masks > 0).long())
        s = m.summary()
        return f"mIoU {s['mIoU']:.3f}  pixel accuracy {s['pixel_acc']:.3f}  digit-vs-background IoU {fg.summary()['iou'][1]:.3f}"

    onehot = F.one_hot(masks, k).permute(0, 3, 1, 2).float()
    for grid in args.grids:
        print(f"grid {grid}x{grid}, average-pooled mask: {score(F.adaptive_avg_pool2d(onehot, grid))}")
        z = torch.zeros(len(masks), k, grid, grid, requires_grad=True)
        opt = torch.optim.Adam([z], lr=0.5)
        for _ in range(args.steps):
            loss = F.cross_entropy(F.interpolate(z, size=size, mode="bilinear"), masks)
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"grid {grid}x{grid}, fitted logits:        {score(z.detach())}  (cross entropy {loss.item():.3f})")


if __name__ == "__main__":
    main()
