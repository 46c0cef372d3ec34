"""Linear probing of a frozen backbone, as MAE reports it (He et al. 2021, arXiv:2111.06377, appendix A.2).

The probe is a non-affine BatchNorm (no learnable scale or shift, eps 1e-6) in front of a linear classifier
(weights from a normal of std 0.01, zero bias): the normalisation matters because MAE's features have very
different scales per channel, and a non-affine BatchNorm is still a linear map that can be folded into the
classifier afterwards (:meth:`LinearProbe.folded`). Features are the backbone's pre-logits, extracted once
(no augmentation: the usual fast variant of the protocol; MAE's own probe trains 90 epochs with random
resized crops and LARS), then the probe is trained with SGD + momentum and a cosine schedule.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LinearProbe(nn.Module):
    """``BatchNorm1d(affine=False, eps=1e-6)`` then ``Linear``: (n, F) features -> (n, classes) logits."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(x))

    @torch.no_grad()
    def folded(self) -> nn.Linear:
        """One ``Linear`` equal to the probe in eval mode (the running statistics folded into the weights)."""
        scale = (self.norm.running_var + self.norm.eps).rsqrt()  # (F,)
        lin = nn.Linear(self.head.in_features, self.head.out_features)
        lin.weight.copy_(self.head.weight * scale)
        lin.bias.copy_(self.head.bias - (self.head.weight * scale) @ self.norm.running_mean)
        return lin


def train_linear_probe(features: Tensor, labels: Tensor, num_classes: int, *, epochs: int = 90,
                       batch_size: int = 256, lr: float = 0.1, weight_decay: float = 0.0,
                       seed: int = 0) -> LinearProbe:
    """Train a :class:`LinearProbe` on cached ``features`` (n, F) with ``labels`` (n,); returns it in eval mode.

    Args:
        lr: the base learning rate for a batch of 256 (scaled linearly with ``batch_size``, as MAE does).
    """
    if features.ndim != 2 or features.shape[0] != labels.shape[0]:
        raise ValueError(f"linear probe: features must be (n, F) with n labels, got {tuple(features.shape)} "
                         f"and {tuple(labels.shape)}")
    if not epochs >= 1 or int(epochs) != epochs:
        raise ValueError(f"linear probe: epochs must be an integer >= 1, got {epochs!r}")
    epochs = int(epochs)
    if features.shape[0] < 2:
        raise ValueError("linear probe: need at least 2 training images (BatchNorm statistics)")
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = LinearProbe(features.shape[1], num_classes)
    x, y = features.float(), labels.long()
    n = x.shape[0]
    bs = min(batch_size, n)
    steps_per_epoch = max(1, n // bs)
    total = epochs * steps_per_epoch
    opt = torch.optim.SGD(probe.parameters(), lr=lr * bs / 256, momentum=0.9, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    probe.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        for i in range(steps_per_epoch):
            idx = order[i * bs:(i + 1) * bs]  # drop the last partial batch (BatchNorm needs > 1 sample)
            loss = F.cross_entropy(probe(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    # the running statistics of the whole training set (not the EMA of the last batches) for evaluation
    with torch.no_grad():
        probe.norm.running_mean.copy_(x.mean(0))
        probe.norm.running_var.copy_(x.var(0, unbiased=True))
    return probe.eval()


__all__ = ["LinearProbe", "train_linear_probe"]
