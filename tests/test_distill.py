"""Distillation objectives: hand-computed values, a frozen teacher, the teacher cache, DeiT's two heads."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitlab
from vitlab.train.distill import DistillationLoss, TeacherCache, freeze_teacher


class FixedTeacher(nn.Module):
    """Returns the logits stored for the image whose first pixel holds the sample's index."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table.clone())
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += x.shape[0]
        return self.table[x[:, 0, 0, 0].long()] * 1.0


def images_for(indices: list[int]) -> torch.Tensor:
    x = torch.zeros(len(indices), 1, 2, 2)
    x[:, 0, 0, 0] = torch.tensor(indices, dtype=torch.float)
    return x


def test_soft_distillation_matches_hand_computation() -> None:
    # teacher uniform over 2 classes; student probabilities (1/4, 3/4); label 0
    teacher = FixedTeacher(torch.tensor([[0.0, 0.0]]))
    s = torch.tensor([[0.0, math.log(3.0)]])
    y = torch.tensor([0])
    crit = DistillationLoss(nn.CrossEntropyLoss(), teacher, kind="soft", alpha=0.5, tau=1.0)
    kl = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    kl /= 2  # DeiT's scaling: the summed KL over batch x classes (1 x 2)
    assert crit(images_for([0]), s, y).item() == pytest.approx(0.5 * math.log(4.0) + 0.5 * kl, rel=1e-6)
    assert crit.last_parts["distill"].item() == pytest.approx(kl, rel=1e-6)

    # temperature 2: p_s = softmax([0, ln3 / 2]), KL scaled by tau^2 = 4 (and / 2 classes), label loss unchanged
    crit = DistillationLoss(nn.CrossEntropyLoss(), teacher, kind="soft", alpha=0.25, tau=2.0)
    r = math.sqrt(3.0)
    ps = (1 / (1 + r), r / (1 + r))
    kl2 = 0.5 * math.log(0.5 / ps[0]) + 0.5 * math.log(0.5 / ps[1])
    expected = 0.75 * math.log(4.0) + 0.25 * 4.0 * kl2 / 2
    assert crit(images_for([0]), s, y).item() == pytest.approx(expected, rel=1e-6)


def test_soft_distillation_is_divided_by_batch_times_classes() -> None:
    table = torch.tensor([[0.0, 0.0], [2.0, -1.0]])
    teacher = FixedTeacher(table)
    s = torch.tensor([[0.0, math.log(3.0)], [0.5, 0.5]])
    crit = DistillationLoss(nn.CrossEntropyLoss(), teacher, kind="soft", alpha=1.0)
    per_sample = [(F.softmax(t, -1) * (F.log_softmax(t, -1) - F.log_softmax(si, -1))).sum().item()
                  for t, si in zip(table, s)]
    # DeiT's official scaling: the summed KL / (batch x classes) = / (2 x 2)
    assert crit(images_for([0, 1]), s, torch.tensor([0, 1])).item() == pytest.approx(sum(per_sample) / 4, rel=1e-6)


def test_hard_distillation_matches_hand_computation() -> None:
    teacher = FixedTeacher(torch.tensor([[0.0, 5.0]]))  # argmax: class 1, while the label is 0
    s = torch.tensor([[0.0, math.log(3.0)]])
    crit = DistillationLoss(nn.CrossEntropyLoss(), teacher, kind="hard")  # 1:1 mix by default
    expected = 0.5 * -math.log(0.25) + 0.5 * -math.log(0.75)
    assert crit(images_for([0]), s, torch.tensor([0])).item() == pytest.approx(expected, rel=1e-6)


def test_distillation_token_student_splits_the_two_terms() -> None:
    teacher = FixedTeacher(torch.tensor([[0.0, 5.0]]))
    cls, dist = torch.tensor([[1.0, -1.0]]), torch.tensor([[0.0, math.log(3.0)]])
    y = torch.tensor([0])
    crit = DistillationLoss(nn.CrossEntropyLoss(), teacher, kind="hard", alpha=0.5)
    expected = 0.5 * F.cross_entropy(cls, y) + 0.5 * F.cross_entropy(dist, torch.tensor([1]))
    torch.testing.assert_close(crit(images_for([0]), (cls, dist), y), expected)


@pytest.mark.parametrize("student_kind", ["class_token", "distillation_token"])
def test_hard_distillation_with_a_teacher_that_predicts_the_labels_equals_the_plain_loss(student_kind) -> None:
    torch.manual_seed(0)
    labels = torch.tensor([2, 0, 1, 2])
    teacher = FixedTeacher(F.one_hot(labels, 3).float() * 4.0)
    crit = DistillationLoss(nn.CrossEntropyLoss(), teacher, kind="hard")
    x = images_for([0, 1, 2, 3])
    if student_kind == "class_token":
        s = torch.randn(4, 3)
        plain = F.cross_entropy(s, labels)
    else:
        s = (torch.randn(4, 3), torch.randn(4, 3))
        plain = (F.cross_entropy(s[0], labels) + F.cross_entropy(s[1], labels)) / 2
    torch.testing.assert_close(crit(x, s, labels), plain)


def test_gradients_reach_the_student_only_and_the_teacher_does_not_change() -> None:
    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 4))
    teacher.train()  # handed over in training mode: the loss must switch it to eval
    before = {k: v.clone() for k, v in teacher.state_dict().items()}  # weights and BN statistics
    crit = DistillationLoss(nn.CrossEntropyLoss(), teacher, kind="soft", tau=3.0)
    crit.train()  # putting the criterion in training mode must not put the teacher there
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    # even an optimizer that is (wrongly) given the teacher's parameters leaves them alone
    opt = torch.optim.SGD(list(student.parameters()) + list(crit.parameters()), lr=0.5, weight_decay=0.1)
    x, y = torch.randn(6, 3, 2, 2), torch.randint(0, 4, (6,))
    t1 = crit.teacher_logits(x)
    loss = crit(x, student(x), y)
    loss.backward()
    assert all(p.grad is not None and p.grad.any() for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    opt.step()
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)
    torch.testing.assert_close(crit.teacher_logits(x), t1, atol=0, rtol=0)  # deterministic: eval-mode dropout/BN


def test_distillation_head_of_deit_carries_the_distillation_term() -> None:
    student = vitlab.create_model("deit_tiny_distilled_patch16_224", num_classes=3, img_size=32, depth=1,
                                  embed_dim=32, num_heads=2)
    with torch.no_grad():
        for head in (student.head, student.head_dist):
            head.weight.normal_(std=0.1)
    student.train()
    student.set_distilled_training(True)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3))
    crit = DistillationLoss(nn.CrossEntropyLoss(), teacher, kind="hard", alpha=1.0)  # distillation term only
    x = torch.randn(2, 3, 32, 32)
    crit(x, student(x), torch.tensor([0, 1])).backward()
    assert not student.head.weight.grad.any()  # the class head only sees the (zero-weighted) label loss
    assert student.head_dist.weight.grad.any()


def test_teacher_cache_runs_the_teacher_once_per_sample() -> None:
    table = torch.randn(5, 3)
    teacher = FixedTeacher(table)
    cache = TeacherCache(teacher, num_samples=5)
    for _epoch in range(3):
        for idx in ([3, 1], [0, 4, 2]):
            got = cache(images_for(idx), torch.tensor(idx))
            torch.testing.assert_close(got, table[idx])
    assert teacher.calls == 5 and cache.teacher_calls == 5 and len(cache) == 5

    crit = DistillationLoss(nn.CrossEntropyLoss(), cache, kind="soft")
    direct = DistillationLoss(nn.CrossEntropyLoss(), FixedTeacher(table), kind="soft")
    s, y = torch.randn(2, 3), torch.tensor([0, 2])
    torch.testing.assert_close(crit(images_for([4, 0]), s, y, indices=torch.tensor([4, 0])),
                               direct(images_for([4, 0]), s, y))
    assert teacher.calls == 5
    with pytest.raises(ValueError, match="indices"):
        crit(images_for([4, 0]), s, y)

    restored = TeacherCache(FixedTeacher(torch.zeros(5, 3)), num_samples=5)
    restored.load_state_dict(cache.state_dict())
    torch.testing.assert_close(restored(images_for([2]), torch.tensor([2])), table[[2]])
    assert restored.teacher.calls == 0


def test_base_loss_with_a_base_method_and_bad_arguments() -> None:
    class ThreeArgLoss(nn.Module):  # the trainer's criterion shape: loss(images, outputs, targets) + base()
        def base(self, logits, targets):
            return F.cross_entropy(logits, targets, label_smoothing=0.1)

    teacher = FixedTeacher(torch.tensor([[0.0, 1.0]]))
    crit = DistillationLoss(ThreeArgLoss(), teacher, kind="hard", alpha=0.0)
    s, y = torch.tensor([[0.3, -0.2]]), torch.tensor([1])
    torch.testing.assert_close(crit(images_for([0]), s, y), F.cross_entropy(s, y, label_smoothing=0.1))
    with pytest.raises(ValueError, match="kind"):
        DistillationLoss(nn.CrossEntropyLoss(), teacher, kind="medium")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="same classes"):
        DistillationLoss(nn.CrossEntropyLoss(), teacher, kind="soft")(images_for([0]), torch.zeros(1, 3), y)


def test_freeze_teacher() -> None:
    m = freeze_teacher(nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train())
    assert not m.training and not any(p.requires_grad for p in m.parameters())


def test_teacher_input_is_renormalised_and_resized_for_the_teacher() -> None:
    import vitlab
    from vitlab.models.base import Preprocessing
    from vitlab.train.distill import TeacherInput, adapt_teacher

    class Probe(torch.nn.Module):  # records what the teacher sees
        preprocessing = Preprocessing(input_size=(3, 16, 16), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.seen = x
            return x.mean((2, 3))

    student = Preprocessing(input_size=(3, 8, 8), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    pixels = torch.rand(2, 3, 8, 8)
    probe = Probe()
    wrapped = adapt_teacher(probe, student)
    assert isinstance(wrapped, TeacherInput)
    wrapped((pixels - 0.5) / 0.5)
    expected = torch.nn.functional.interpolate(pixels, size=(16, 16), mode="bilinear", antialias=True)
    mean, std = torch.tensor(Probe.preprocessing.mean).view(1, 3, 1, 1), torch.tensor(Probe.preprocessing.std).view(1, 3, 1, 1)
    torch.testing.assert_close(probe.seen, (expected - mean) / std)
    same = vitlab.create_model("resnet18", num_classes=3, layers=(1, 1, 1, 1), img_size=8, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert adapt_teacher(same, student) is same  # nothing to adapt: no wrapper


def test_teacher_with_other_classes_is_refused() -> None:
    from vitlab.train.distill import check_teacher_classes

    teacher = torch.nn.Linear(2, 3)
    teacher.class_names = ["cat", "dog", "emu"]
    check_teacher_classes(teacher, ["cat", "dog", "emu"])
    with pytest.raises(ValueError, match="differ from the training data's"):
        check_teacher_classes(teacher, ["dog", "cat", "emu"])
