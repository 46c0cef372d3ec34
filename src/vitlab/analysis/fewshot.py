"""Linear few-shot evaluation (ViT paper, section 4.1) and k-nearest-neighbour accuracy.

The frozen model's pre-logit features of a few images per class are mapped to {-1, 1}^K targets by
regularised least squares, solved in closed form; test accuracy of the argmax is the cheap measure of
representation quality the paper tracks during pre-training. Several random draws of the support set
give a mean and a spread.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

log = logging.getLogger(__name__)


@torch.no_grad()
def extract_features(model: nn.Module, dataset: Dataset, *, batch_size: int = 256,
                     device: str | torch.device = "cpu", limit: int | None = None,
                     collate_fn=None) -> tuple[Tensor, Tensor]:
    """Pre-logit features (n, F) and labels (n,) of a dataset of (image, label) items.

    Uses ``model.forward_head(model.forward_features(x), pre_logits=True)``: the representation the
    classifier reads, with the model in eval mode. With ``limit``, only the first ``limit`` items. A ``collate_fn``
    that returns None for a batch (``collate_skip_none``: every image undecodable) skips it.
    """
    was_training = model.training
    model.eval()
    feats, labels, seen = [], [], 0
    try:
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0,
                                collate_fn=collate_fn):
            if limit is not None and seen >= limit:
                break
            if batch is None:
                continue
            x, y = batch
            x = x.to(device)
            f = model.forward_head(model.forward_features(x), pre_logits=True)
            feats.append(f.float().cpu())
            labels.append(torch.as_tensor(y).long().cpu())
            seen += x.shape[0]
    finally:
        model.train(was_training)
    f, y = torch.cat(feats), torch.cat(labels)
    if limit is not None:
        f, y = f[:limit], y[:limit]
    return f, y


def ridge_classifier(x: Tensor, y: Tensor, num_classes: int, *, l2_reg: float = 1.0):
    """Fit a least-squares map from features (n, F) to {-1, 1}^K targets; returns a predict function.

    Features are standardised with the support set's statistics and an unregularised intercept is
    fitted by centring; the solve uses whichever of the primal (F x F) or dual (n x n) systems is
    smaller, which is the same solution. ``l2_reg`` must be > 0: at 0 the system is singular when there are
    fewer support images than feature dimensions, and below 0 it is indefinite.
    """
    if not l2_reg > 0:
        raise ValueError(f"ridge_classifier: l2_reg must be > 0 (--l2-reg), got {l2_reg}")
    x = x.double()
    targets = 2.0 * F.one_hot(y, num_classes).double() - 1.0  # (n, K) in {-1, 1}
    mu, sd = x.mean(dim=0), x.std(dim=0, unbiased=False).clamp(min=1e-6)
    xs = (x - mu) / sd
    t_mu = targets.mean(dim=0)
    t = targets - t_mu
    n, d = xs.shape
    if n >= d:
        w = torch.linalg.solve(xs.T @ xs + l2_reg * torch.eye(d, dtype=xs.dtype), xs.T @ t)  # (F, K)
    else:
        w = xs.T @ torch.linalg.solve(xs @ xs.T + l2_reg * torch.eye(n, dtype=xs.dtype), t)  # (F, K)

    def predict(z: Tensor) -> Tensor:
        return (((z.double() - mu) / sd) @ w + t_mu).argmax(dim=-1)

    return predict


def linear_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, num_classes: int, *,
                    l2_reg: float = 1.0) -> float:
    predict = ridge_classifier(train_x, train_y, num_classes, l2_reg=l2_reg)
    return float((predict(test_x) == test_y).double().mean())


def knn_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, num_classes: int, *,
                 k: int = 5) -> float:
    """Accuracy of a majority vote among the ``k`` nearest support features by cosine similarity.

    Ties are broken by the summed similarity of the voters, so k=1 is plain nearest neighbour.
    """
    k = max(1, min(k, train_x.shape[0]))
    sim = F.normalize(test_x.double(), dim=-1) @ F.normalize(train_x.double(), dim=-1).T  # (m, n)
    top_sim, top_idx = sim.topk(k, dim=-1)  # (m, k)
    votes = torch.zeros(test_x.shape[0], num_classes, dtype=torch.float64)
    votes.scatter_add_(1, train_y[top_idx], torch.ones_like(top_sim))
    votes += 1e-3 * torch.zeros_like(votes).scatter_add_(1, train_y[top_idx], top_sim)
    return float((votes.argmax(dim=-1) == test_y).double().mean())


def sample_shots(labels: Tensor, shots: int, num_classes: int, generator: torch.Generator) -> Tensor:
    """Indices of ``shots`` random examples of each class."""
    picked = []
    for c in range(num_classes):
        idx = (labels == c).nonzero().flatten()
        if idx.numel() < shots:
            raise ValueError(f"few-shot: class {c} has {idx.numel()} training examples, fewer than {shots} shots")
        picked.append(idx[torch.randperm(idx.numel(), generator=generator)[:shots]])
    return torch.cat(picked)


def class_pool(targets: list[int] | Tensor, per_class: int, *, seed: int = 0) -> list[int]:
    """A random ``per_class`` examples of every class (all of a smaller class), sorted.

    Few-shot draws need features of only a few images per class; drawing the support sets from a
    random pool is still uniform over the class, and saves decoding and embedding a whole training set.
    """
    t = torch.as_tensor(targets)
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c in t.unique().tolist():
        idx = (t == c).nonzero().flatten()
        picked.append(idx[torch.randperm(idx.numel(), generator=g)[:per_class]])
    return sorted(torch.cat(picked).tolist())


@dataclass(frozen=True, kw_only=True)
class FewShotResult:
    """Accuracies at one shot count, over seeds."""

    shots: int
    linear_mean: float
    linear_std: float
    knn_mean: float
    knn_std: float
    knn_k: int
    linear: list[float] = field(default_factory=list)
    knn: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"shots": self.shots, "linear_mean": self.linear_mean, "linear_std": self.linear_std,
                "knn_mean": self.knn_mean, "knn_std": self.knn_std, "knn_k": self.knn_k,
                "linear": self.linear, "knn": self.knn}


def fewshot_evaluate(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    *,
    num_classes: int,
    shots: tuple[int, ...] = (1, 5, 10, 25),
    seeds: int = 5,
    l2_reg: float = 1.0,
    knn_k: int = 5,
) -> list[FewShotResult]:
    """Linear and k-NN few-shot accuracy for each shot count, ``seeds`` support draws each.

    Spread is the standard deviation over seeds (population, so one seed gives 0). k-NN uses
    k = min(knn_k, shots): with one example per class, anything above 1 would vote across classes.
    """
    results = []
    for n in shots:
        lin, knn = [], []
        k = min(knn_k, n)
        for seed in range(seeds):
            g = torch.Generator().manual_seed(seed)
            idx = sample_shots(train_y, n, num_classes, g)
            lin.append(linear_accuracy(train_x[idx], train_y[idx], test_x, test_y, num_classes, l2_reg=l2_reg))
            knn.append(knn_accuracy(train_x[idx], train_y[idx], test_x, test_y, num_classes, k=k))
        lt, kt = torch.tensor(lin), torch.tensor(knn)
        results.append(FewShotResult(shots=n, linear_mean=float(lt.mean()), linear_std=float(lt.std(unbiased=False)),
                                     knn_mean=float(kt.mean()), knn_std=float(kt.std(unbiased=False)), knn_k=k,
                                     linear=lin, knn=knn))
        log.debug("%d-shot: linear %.4f, %d-NN %.4f", n, lt.mean(), k, kt.mean())
    return results
