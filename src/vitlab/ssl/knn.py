"""k-NN evaluation of a self-supervised backbone, as DINO reports it (Caron et al. 2021, section 4.1 / appendix).

Features are L2-normalised; each test image takes its ``k`` nearest training images by cosine
similarity, and each neighbour votes for its class with weight ``exp(similarity / T)`` (k = 20,
T = 0.07 in the paper; the teacher's class token is the feature).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def knn_neighbours(k: int, bank_size: int) -> int:
    """The number of neighbours that vote: ``k``, or every training image when there are fewer."""
    return max(1, min(k, bank_size))


def weighted_knn(train_x: Tensor, train_y: Tensor, test_x: Tensor, num_classes: int, *, k: int = 20,
                 temperature: float = 0.07, chunk: int = 1024) -> Tensor:
    """Predicted classes (m,) of ``test_x`` (m, F) from ``train_x`` (n, F) with labels ``train_y`` (n,).

    ``k`` >= 1 (capped at n: :func:`knn_neighbours` gives the number used), ``temperature`` > 0."""
    if not k >= 1 or int(k) != k:
        raise ValueError(f"weighted_knn: k must be an integer >= 1, got {k!r}")
    if not 0 < temperature < float("inf"):
        raise ValueError(f"weighted_knn: temperature must be > 0, got {temperature!r}")
    k = knn_neighbours(int(k), train_x.shape[0])
    train = F.normalize(train_x.float(), dim=-1)
    preds = []
    for start in range(0, test_x.shape[0], chunk):
        sim = F.normalize(test_x[start:start + chunk].float(), dim=-1) @ train.T  # (m', n)
        top_sim, top_idx = sim.topk(k, dim=-1)  # (m', k)
        votes = torch.zeros(sim.shape[0], num_classes)
        # exp((s - max s) / T): the same vote shares as exp(s / T), without float32 overflow at small T
        weights = ((top_sim - top_sim[:, :1]) / temperature).exp()  # topk is sorted: column 0 is the row's max
        votes.scatter_add_(1, train_y[top_idx], weights)
        preds.append(votes.argmax(dim=-1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
