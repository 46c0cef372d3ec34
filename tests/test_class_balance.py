"""recipe.class_balance: class weights and positive weights (golden numbers), the weighted losses against hand-computed
and torch references, the class-balanced sampler's proportions and shares, and the trainer with it: exact resume,
accumulation, recorded runs, refused settings; eval's balanced accuracy."""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, TensorDataset

import vitlab
from vitlab.checkpoints import read_vitlab
from vitlab.data.sampler import (
    ClassBalancedSampler,
    balanced_class_probabilities,
    label_counts,
    training_labels,
)
from vitlab.train import Recipe, apply_overrides, fit
from vitlab.train.losses import ClassificationLoss, MultiLabelLoss, class_weights, positive_weights
from vitlab.train.state import load_train_state

torch.set_num_threads(1)


class LongTail(Dataset):
    """4 classes of 8x8 grey images, ``counts[c]`` of class c: a class is a brightness level plus noise, with
    ``targets`` (as vitlab's data sets have) and the global generator's noise as augmentation."""

    def __init__(self, counts=(48, 24, 8, 4), seed: int = 0, augment: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        self.targets = [c for c, n in enumerate(counts) for _ in range(n)]
        y = torch.tensor(self.targets)
        self.x = (y[:, None, None, None].float() - 1.5) * 0.5 + torch.randn(len(y), 1, 8, 8, generator=g)
        self.augment = augment
        self.classes = ["a", "b", "c", "d"]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        x = self.x[i]
        if self.augment:  # draws from the global generator, as the real transforms do
            x = x + 0.1 * torch.randn_like(x)
        return x, self.targets[i]


def tiny_vit(num_classes: int = 4, **kw):
    torch.manual_seed(0)
    opts = {"img_size": 8, "patch_size": 4, "in_chans": 1, "embed_dim": 16, "depth": 1, "num_heads": 2,
            "mlp_ratio": 2.0, "mean": (0.5,), "std": (0.5,)}
    opts.update(kw)
    return vitlab.create_model("vit_tiny_patch16_224", num_classes=num_classes, **opts)


def recipe(**kw) -> Recipe:
    base = {"name": "test", "epochs": 2, "batch_size": 16, "lr": 3e-3, "weight_decay": 0.01, "warmup_steps": 1,
            "log_every": 1, "augment": False, "hflip": 0.0}
    base.update(kw)
    return Recipe(**base)


def _weights(path):
    return read_vitlab(path)[0]


# ------------------------------------------------------------------------------------------ the weights
def test_class_weights_golden_numbers():
    # inverse frequency: w ~ (1/100, 1/10, 1), scaled so that (100 w0 + 10 w1 + w2) / 111 = 1: 111 / 3 = 37
    assert class_weights([100, 10, 1]).tolist() == pytest.approx([0.37, 3.7, 37.0], rel=1e-6)
    # inverse square root: w ~ (1/10, 1/sqrt(10), 1), scale 111 / (10 + sqrt(10) + 1) = 7.8377223
    assert class_weights([100, 10, 1], power=0.5).tolist() == pytest.approx([0.78377223, 2.4785054, 7.8377223],
                                                                            rel=1e-6)
    for counts, power in (([100, 10, 1], 1.0), ([7, 3, 3, 50], 0.5)):  # the mean weight over the images is 1
        w = class_weights(counts, power)
        assert float((torch.tensor(counts, dtype=torch.float) * w).sum() / sum(counts)) == pytest.approx(1.0)
    # a class without images weighs as one of a single image
    assert class_weights([9, 0, 1]).tolist() == pytest.approx([10 / 18, 10 / 2, 10 / 2])
    assert class_weights([5, 5, 5]).tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="at least one image"):
        class_weights([0, 0])


def test_positive_weights_golden_numbers():
    # 10 images: a label on 1 of them -> 9 negatives per positive; on 5 -> 1; on all or none -> 1 (nothing to weigh)
    assert positive_weights([1, 5, 10, 0, 2], images=10).tolist() == pytest.approx([9.0, 1.0, 1.0, 1.0, 4.0])
    assert positive_weights([1, 5, 10, 0, 2], images=10, power=0.5).tolist() == pytest.approx([3.0, 1.0, 1.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="0..10"):
        positive_weights([11], images=10)


# ------------------------------------------------------------------------------------------ the weighted losses
def _hand_ce(logits, target_rows, w):
    """mean over samples of -sum_c w_c t_c log softmax(x)_c, in Python floats."""
    total = 0.0
    for x, t in zip(logits.tolist(), target_rows):
        m = max(x)
        lse = m + math.log(sum(math.exp(v - m) for v in x))
        total += -sum(wc * tc * (v - lse) for v, tc, wc in zip(x, t, w))
    return total / len(target_rows)


def test_weighted_cross_entropy_equals_hand_computed_and_torchs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=g) * 2
    y = torch.tensor([0, 1, 2, 3, 3, 1])
    w = class_weights([50, 20, 5, 1])
    onehot = F.one_hot(y, 4).tolist()
    for s in (0.0, 0.1):
        loss = ClassificationLoss(label_smoothing=s, class_weights=w)
        rows = [[(1 - s) * v + s / 4 for v in r] for r in onehot]
        assert float(loss.base(x, y)) == pytest.approx(_hand_ce(x, rows, w.tolist()), rel=1e-5)
        # torch's own per-sample weighted (and smoothed) cross entropy, averaged over the batch (not over the weights)
        ref = F.cross_entropy(x, y, weight=w, label_smoothing=s, reduction="none").mean()
        assert float(loss.base(x, y)) == pytest.approx(float(ref), rel=1e-6)
        # smoothed one-hot rows given as probabilities: the same loss
        assert float(loss.base(x, F.one_hot(y, 4).float())) == pytest.approx(float(ref), rel=1e-6)
    # Mixup's soft targets (already smoothed: not smoothed again), weighted per class
    soft = torch.softmax(torch.randn(6, 4, generator=g), dim=-1)
    mixed = ClassificationLoss(label_smoothing=0.1, mixed_targets=True, class_weights=w)
    assert float(mixed.base(x, soft)) == pytest.approx(_hand_ce(x, soft.tolist(), w.tolist()), rel=1e-5)
    # equal weights: the plain loss
    ones = ClassificationLoss(label_smoothing=0.1, class_weights=torch.ones(4))
    assert float(ones.base(x, y)) == pytest.approx(float(F.cross_entropy(x, y, label_smoothing=0.1)), rel=1e-6)


def test_multi_label_pos_weight_equals_hand_computed():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, generator=g)
    y = (torch.rand(5, 3, generator=g) > 0.6).float()
    pw = positive_weights([1, 3, 4], images=5)  # 4, 2/3, 1/4
    loss = MultiLabelLoss(class_weights=pw)

    def sig(v):
        return 1 / (1 + math.exp(-v))
    hand = [-(p * t * math.log(sig(v)) + (1 - t) * math.log(1 - sig(v)))
            for row, trow in zip(x.tolist(), y.tolist()) for v, t, p in zip(row, trow, pw.tolist())]
    assert float(loss.base(x, y)) == pytest.approx(sum(hand) / len(hand), rel=1e-5)


def test_distillation_weighs_its_label_term_only():
    from vitlab.train.distill import DistillationLoss
    from vitlab.train.objective import DistillationObjective

    teacher = tiny_vit()
    w = class_weights([40, 10, 5, 1])
    loss = DistillationLoss(ClassificationLoss(), teacher, kind="soft", alpha=0.5, tau=2.0)
    DistillationObjective(loss).weigh_classes(w)
    g = torch.Generator().manual_seed(2)
    images, logits = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 4, generator=g)
    y = torch.tensor([0, 3, 2, 1])
    total = loss(images, logits, y)
    weighted = F.cross_entropy(logits, y, weight=w, reduction="none").mean()
    assert float(loss.last_parts["base"]) == pytest.approx(float(weighted), rel=1e-6)
    unweighted = DistillationLoss(ClassificationLoss(), teacher, kind="soft", alpha=0.5, tau=2.0)
    unweighted(images, logits, y)
    assert float(loss.last_parts["distill"]) == float(unweighted.last_parts["distill"])
    assert float(total) == pytest.approx(0.5 * float(weighted) + 0.5 * float(loss.last_parts["distill"]), rel=1e-6)


def test_fit_weighs_a_distillation_losss_label_term(tmp_path):
    from vitlab.train.distill import DistillationLoss

    loss = DistillationLoss(ClassificationLoss(label_smoothing=0.1), tiny_vit(), kind="hard", alpha=0.5)
    res = fit(tiny_vit(), recipe(max_steps=2, class_balance="loss"), train_set=LongTail(), criterion=loss,
              output_dir=tmp_path, progress=False)
    assert torch.equal(loss.base_module.class_weights, class_weights([48, 24, 8, 4]))
    assert res.class_balance["class_weights"] == [0.4375, 0.875, 2.625, 5.25]  # 84 images / (4 classes x n_c)


# ------------------------------------------------------------------------------------------ the sampler
def test_training_labels_and_counts_from_the_usual_data_sets():
    ds = LongTail((3, 2, 0, 1))
    assert training_labels(ds) == [0, 0, 0, 1, 1, 3]
    assert label_counts(training_labels(ds), 4) == [3, 2, 0, 1]
    assert training_labels(Subset(ds, [5, 0, 3])) == [3, 0, 1]
    assert training_labels(TensorDataset(torch.zeros(3, 1), torch.tensor([2, 0, 2]))) == [2, 0, 2]
    multi_hot = torch.tensor([[1.0, 0, 1], [0, 0, 0], [0, 1, 1]])
    labels = training_labels(TensorDataset(torch.zeros(3, 1), multi_hot))
    assert labels == [(0, 2), (), (1, 2)] and label_counts(labels, 3) == [1, 1, 2]
    with pytest.raises(ValueError, match="give the data set a `targets` attribute"):
        training_labels([(torch.zeros(1), 0)])


def test_the_sampler_draws_classes_in_the_asked_proportions():
    counts = (1000, 100, 10)
    labels = [c for c, n in enumerate(counts) for _ in range(n)]
    for power, expect in ((1.0, [1 / 3] * 3), (0.5, [math.sqrt(n) / sum(map(math.sqrt, counts)) for n in counts])):
        assert balanced_class_probabilities(counts, power) == pytest.approx(expect)
        sampler = ClassBalancedSampler(labels, power=power, seed=0)
        drawn: Counter[int] = Counter()
        for epoch in range(10):  # 11,100 draws
            sampler.set_epoch(epoch)
            drawn.update(labels[i] for i in sampler)
        total = sum(drawn.values())
        assert total == 10 * len(labels)
        for c in range(3):  # a loose bound: the standard deviation of a share is below 0.005 here
            assert drawn[c] / total == pytest.approx(expect[c], abs=0.02), (power, c)
    # within a class every image is drawn (the rare class's 10 images over 10 epochs of ~3,700 draws each)
    sampler = ClassBalancedSampler(labels, power=1.0, seed=0)
    assert set(sampler) >= set(range(1100, 1110))


def test_the_sampler_is_a_function_of_seed_and_epoch_and_keeps_the_epochs_length():
    labels = [0] * 50 + [1] * 5 + [2] * 2
    a, b = ClassBalancedSampler(labels, seed=3), ClassBalancedSampler(labels, seed=3)
    assert len(a) == len(list(a)) == 57
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    assert list(ClassBalancedSampler(labels, seed=4)) != first
    # probabilities planned from other counts (a resumed run's, recorded at its start); an empty class is left out
    c = ClassBalancedSampler(labels, seed=3, counts=[10, 10, 10], num_classes=3)
    c.set_counts([1, 1, 0])
    assert c.probabilities.tolist() == [0.5, 0.5, 0.0] and set(labels[i] for i in c) == {0, 1}


def test_processes_take_disjoint_shares_of_one_draw():
    """Two replicas' shares interleave to one process's draw (one process with batch 2B sees what two with B see),
    each deterministic; with repeated augmentation an image's copies go to different replicas."""
    labels = [0] * 40 + [1] * 6 + [2] * 3 + [3] * 1
    one = ClassBalancedSampler(labels, seed=5, power=0.5)
    shares = [ClassBalancedSampler(labels, num_replicas=2, rank=r, seed=5, power=0.5) for r in (0, 1)]
    for epoch in (0, 7):
        for s in (one, *shares):
            s.set_epoch(epoch)
        r0, r1 = list(shares[0]), list(shares[1])
        assert len(r0) == len(r1) == 25
        assert [i for pair in zip(r0, r1) for i in pair] == list(one)
        again = ClassBalancedSampler(labels, num_replicas=2, rank=0, seed=5, power=0.5)  # another process's
        again.set_epoch(epoch)
        assert list(again) == r0
    repeated = [ClassBalancedSampler(labels, num_replicas=3, rank=r, seed=1, num_repeats=3) for r in range(3)]
    r0, r1, r2 = (list(s) for s in repeated)
    assert r0 == r1 == r2 and len(r0) == 16  # each drawn image's 3 copies: one on each replica


def test_three_shares_cover_the_draw_without_overlap():
    labels = [0] * 30 + [1] * 3
    whole = ClassBalancedSampler(labels, seed=2)
    whole_positions = list(whole)[:33]
    shares = [list(ClassBalancedSampler(labels, num_replicas=3, rank=r, seed=2)) for r in range(3)]
    assert all(len(s) == 11 for s in shares)
    assert [shares[p % 3][p // 3] for p in range(33)] == whole_positions


# ------------------------------------------------------------------------------------------ the recipe
@pytest.mark.parametrize(("settings", "said"), [
    ({"class_balance": "inverse"}, "class_balance='inverse'; choose from"),
    ({"class_balance_power": 0.0}, "class_balance_power must be in (0, 1]"),
    ({"class_balance_power": 1.5}, "class_balance_power must be in (0, 1]"),
    ({"class_balance": "sampler", "multi_label": True}, "class_balance=sampler draws each image for its class"),
])
def test_bad_settings_are_refused_naming_the_field(settings, said):
    with pytest.raises(ValueError, match=f"recipe 'test': {re.escape(said)}"):
        recipe(**settings)


def test_set_class_balance_on_the_command_line_is_typed_and_checked():
    r = apply_overrides(recipe(), ["class_balance=sampler", "class_balance_power=0.5"])
    assert (r.class_balance, r.class_balance_power) == ("sampler", 0.5)
    with pytest.raises(ValueError, match="recipe key 'class_balance': cannot use 'weights'"):
        apply_overrides(recipe(), ["class_balance=weights"])
    with pytest.raises(ValueError, match="class_balance_power must be in"):
        apply_overrides(recipe(), ["class_balance_power=2"])


# ------------------------------------------------------------------------------------------ the trainer
@pytest.mark.parametrize("mode", ["loss", "sampler"])
def test_resume_with_class_balance_is_exact(tmp_path, mode):
    """N steps, then --resume to the end == the run straight through, bitwise, with label smoothing, Mixup, EMA
    and augmentation noise; the counts recorded at the start travel in the training state."""
    r = recipe(epochs=3, class_balance=mode, class_balance_power=0.5, label_smoothing=0.1, mixup_alpha=0.4,
               ema_decay=0.9)
    data, val = LongTail(augment=True), LongTail((8, 8, 8, 8), seed=1)  # 84 images: 5 steps per epoch
    straight = fit(tiny_vit(drop_path_rate=0.1), r, train_set=data, val_set=val, output_dir=tmp_path / "a",
                   progress=False)
    assert straight.total_steps == 15
    fit(tiny_vit(drop_path_rate=0.1), r, train_set=data, val_set=val, output_dir=tmp_path / "b", progress=False,
        until_step=7)  # mid-epoch
    assert load_train_state(tmp_path / "b" / "train_state.pt")["class_balance"] == {"counts": [48, 24, 8, 4],
                                                                                    "images": 84}
    torch.manual_seed(1234)
    resumed = fit(tiny_vit(drop_path_rate=0.1), r, train_set=data, val_set=val, output_dir=tmp_path / "b",
                  progress=False, resume=True)
    assert resumed.step == 15
    for name in ("model.safetensors", "model_ema.safetensors"):
        a, b = _weights(tmp_path / "a" / name), _weights(tmp_path / "b" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    # and the setting did something: the same run without it ends elsewhere
    plain = fit(tiny_vit(drop_path_rate=0.1), r.replace(class_balance="none", class_balance_power=1.0),
                train_set=data, output_dir=tmp_path / "c", progress=False)
    c = _weights(plain.model_path)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_resume_on_data_with_other_counts_keeps_the_runs_own(tmp_path, caplog):
    r = recipe(epochs=2, class_balance="loss")
    fit(tiny_vit(), r, train_set=LongTail(), output_dir=tmp_path, progress=False, until_step=3)
    more = LongTail((48, 24, 8, 8))  # 88 images: the same 5 steps per epoch
    res = fit(tiny_vit(), r, train_set=more, output_dir=tmp_path, progress=False, resume=True)
    assert "other images per class than when the run began" in caplog.text
    assert res.class_balance["counts"] == [48, 24, 8, 4]
    assert res.class_balance["class_weights"] == pytest.approx(class_weights([48, 24, 8, 4]).tolist(), rel=1e-5)
    saved = json.loads((tmp_path / "recipe.json").read_text())["resolved"]["class_balance"]
    assert saved["counts"] == [48, 24, 8, 4]


def test_the_weighted_loss_accumulates_as_one_big_batch(tmp_path):
    """batch 8 x accum 4 == batch 32: the weighted loss is a mean over the batch, not over its weights."""
    data = LongTail((60, 30, 20, 10))
    kw = {"max_steps": 3, "optimizer": "sgd", "lr": 0.1, "warmup_steps": 0, "class_balance": "loss"}
    a = fit(tiny_vit(), recipe(batch_size=32, **kw), train_set=data, output_dir=tmp_path / "a", progress=False)
    b = fit(tiny_vit(), recipe(batch_size=8, accum_steps=4, **kw), train_set=data, output_dir=tmp_path / "b",
            progress=False)
    wa, wb = _weights(a.model_path), _weights(b.model_path)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_the_sampler_feeds_the_rare_classes(tmp_path, monkeypatch):
    """The batches the trainer takes hold the classes about equally often with power 1 (the data: 48/24/8/4)."""
    from vitlab.train import objective as objective_module

    seen: Counter[int] = Counter()
    step = objective_module.ClassificationObjective.step

    def counting(self, model, batch):
        seen.update(batch[1].tolist())
        return step(self, model, batch)

    monkeypatch.setattr(objective_module.ClassificationObjective, "step", counting)
    res = fit(tiny_vit(), recipe(epochs=20, class_balance="sampler"), train_set=LongTail(), output_dir=tmp_path,
              progress=False)
    assert res.step == 100 and sum(seen.values()) == 1600
    assert all(abs(seen[c] / 1600 - 0.25) < 0.04 for c in range(4)), seen
    assert res.class_balance == {"mode": "sampler", "power": 1.0, "counts": [48, 24, 8, 4], "images": 84,
                                 "class_probabilities": [0.25, 0.25, 0.25, 0.25]}


def test_none_changes_nothing_that_the_run_records(tmp_path):
    res = fit(tiny_vit(), recipe(max_steps=2), train_set=LongTail(), output_dir=tmp_path, progress=False)
    assert res.class_balance is None
    assert "class_balance" not in load_train_state(tmp_path / "train_state.pt")
    assert "class_balance" not in json.loads((tmp_path / "recipe.json").read_text())["resolved"]


def test_what_cannot_be_balanced_is_refused(tmp_path):
    from vitlab.train.objective import Objective

    with pytest.raises(ValueError, match="give the data set a `targets` attribute"):
        fit(tiny_vit(), recipe(class_balance="loss"), train_set=[(torch.zeros(1, 8, 8), 0)] * 32,
            output_dir=tmp_path / "a", progress=False)

    def own(images, outputs, targets):
        return F.cross_entropy(outputs, targets)
    with pytest.raises(ValueError, match="class_balance=loss weighs vitlab's cross entropy by class; the criterion "
                                         "given to fit \\(function\\)"):
        fit(tiny_vit(), recipe(class_balance="loss"), train_set=LongTail(), criterion=own, output_dir=tmp_path / "b",
            progress=False)
    # a criterion of the user's own is fine with the sampler
    fit(tiny_vit(), recipe(max_steps=1, class_balance="sampler"), train_set=LongTail(), criterion=own,
        output_dir=tmp_path / "c", progress=False)

    class Unsupervised(Objective):
        name = "pretext"

    with pytest.raises(ValueError, match="the pretext objective is self-supervised"):
        fit(tiny_vit(), recipe(class_balance="sampler"), train_set=LongTail(), objective=Unsupervised(),
            output_dir=tmp_path / "d", progress=False)


def test_power_without_class_balance_is_said_to_be_unused(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="vitlab"):
        fit(tiny_vit(), recipe(max_steps=1, class_balance_power=0.5), train_set=LongTail(), output_dir=tmp_path,
            progress=False)
    assert "class_balance_power=0.5 is not used: class_balance is none" in caplog.text


class MultiHot(Dataset):
    """8x8 images with 3 labels each present or not (label 2 rare), as multi-hot float rows."""

    def __init__(self, n: int = 48) -> None:
        g = torch.Generator().manual_seed(0)
        self.y = torch.stack([torch.arange(n) % 2 == 0, torch.arange(n) % 3 == 0, torch.arange(n) % 12 == 0], 1)
        self.x = self.y.float() @ torch.randn(3, 64, generator=g) + torch.randn(n, 64, generator=g)
        self.x = self.x.view(n, 1, 8, 8)
        self.targets = [tuple(row.nonzero().flatten().tolist()) for row in self.y]
        self.multi_label = True

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i].float()


def test_multi_label_weighs_positives_and_refuses_the_sampler(tmp_path):
    data = MultiHot()
    res = fit(tiny_vit(num_classes=3), recipe(max_steps=2, multi_label=True, class_balance="loss"), train_set=data,
              output_dir=tmp_path, progress=False)
    counts = [24, 16, 4]  # of 48 images
    assert res.class_balance["counts"] == counts
    assert res.class_balance["pos_weight"] == pytest.approx([1.0, 2.0, 11.0])
    with pytest.raises(ValueError, match="class_balance=sampler draws each image for its class"):
        recipe(multi_label=True, class_balance="sampler")


# ------------------------------------------------------------------------------------------ balanced accuracy
def test_balanced_accuracy_is_the_mean_recall_over_the_classes_present():
    from vitlab.train.evaluate import EvalResult

    r = EvalResult(num_samples=13, loss=0.5, top1=10 / 13, top5=1.0, per_class=[1.0, 0.5, float("nan"), 0.0],
                   confusion=torch.zeros(4, 4, dtype=torch.int64))
    assert r.balanced_accuracy == pytest.approx(0.5)
    assert r.summary()["balanced_accuracy"] == 0.5


def test_validation_reports_balanced_accuracy_and_can_keep_the_best_by_it(tmp_path):
    from vitlab.train.evaluate import evaluate

    model = tiny_vit()
    val = LongTail((20, 10, 4, 2), seed=1)
    r = evaluate(model, val, num_classes=4)
    support = r.confusion.sum(1).tolist()
    recall = [r.confusion[c, c].item() / support[c] for c in range(4)]
    assert r.summary()["balanced_accuracy"] == pytest.approx(sum(recall) / 4, abs=1e-6)
    res = fit(tiny_vit(), recipe(max_steps=4, best_metric="balanced_accuracy"), train_set=LongTail(), val_set=val,
              output_dir=tmp_path, progress=False)
    assert "val_balanced_accuracy" in res.val and res.best["metric"] == "balanced_accuracy"
    assert (tmp_path / "model_best.safetensors").is_file()
