"""Knowledge distillation objectives (DeiT, Touvron et al., 2020, arXiv:2012.12877, section 5).

Apart from any architecture: a student's outputs are either plain logits (a class-token student; the
distillation term is applied to the same logits as the label loss) or a pair ``(cls_logits,
dist_logits)`` from a distillation-token student (a DeiT with ``set_distilled_training(True)``): the
label loss reads the class head, the distillation term the distillation head.

* soft: ``(1 - alpha) * base + alpha * tau^2 * KL(softmax(t / tau) || softmax(s / tau))``, the KL summed
  and divided by batch x classes, as the official DeiT ``DistillationLoss`` does (so that ``alpha`` means
  what it means there; a per-sample "batchmean" KL would be ``classes`` times larger).
* hard: ``(1 - alpha) * base + alpha * CE(s, argmax t)``; the paper's 1:1 mix is ``alpha = 0.5``
  (the default). ``tau`` is unused.

The teacher is frozen: eval mode (also when the criterion is put in training mode), no gradients,
``requires_grad`` off. Its logits can be cached per sample with :class:`TeacherCache`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitlab.models.base import Preprocessing

StudentOutput = Tensor | tuple[Tensor, Tensor]
DistillKind = Literal["soft", "hard"]


def freeze_teacher(teacher: nn.Module) -> nn.Module:
    """Put ``teacher`` in eval mode with every parameter frozen; returns it."""
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def load_teacher(path: str | os.PathLike, **kwargs) -> nn.Module:
    """Any vitlab checkpoint (or Hugging Face folder that ``vitlab.load_model`` reads) as a frozen teacher."""
    from vitlab.models.factory import load_model

    return freeze_teacher(load_model(path, **kwargs))


class TeacherInput(nn.Module):
    """A teacher fed with the student's batches: undoes the student's normalisation, converts the channel
    count, resizes to the teacher's input size and applies the teacher's own normalisation.

    Teacher and student are often trained with different statistics (ImageNet mean/std for a CNN, 0.5 for a
    ViT) or resolutions; without this the teacher would silently see wrongly normalised images.
    """

    def __init__(self, teacher: nn.Module, student: Preprocessing, teacher_pre: Preprocessing) -> None:
        super().__init__()
        self.teacher = teacher
        self.size = tuple(teacher_pre.input_size[1:])
        self.channels = teacher_pre.input_size[0]
        self.flip = student.channel_order != teacher_pre.channel_order  # e.g. a BGR Hugging Face MobileViT
        self.register_buffer("s_mean", torch.tensor(student.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("s_std", torch.tensor(student.std).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("t_mean", torch.tensor(teacher_pre.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("t_std", torch.tensor(teacher_pre.std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        x = x * self.s_std + self.s_mean  # back to [0, 1] pixels: (B, C_s, H, W)
        if self.flip and x.shape[1] == 3:
            x = x.flip(1)
        if x.shape[1] != self.channels:
            if self.channels == 1:  # ITU-R 601 luma, as Pillow's "L"
                w = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
                x = (x * w).sum(1, keepdim=True)
            else:
                x = x.expand(-1, self.channels, -1, -1)
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        return self.teacher((x - self.t_mean) / self.t_std)


def adapt_teacher(teacher: nn.Module, student: Preprocessing) -> nn.Module:
    """``teacher`` as is when it expects the student's input, else wrapped in :class:`TeacherInput`."""
    pre: Preprocessing | None = getattr(teacher, "preprocessing", None)
    if pre is None:
        return teacher
    same = (tuple(pre.input_size) == tuple(student.input_size) and tuple(pre.mean) == tuple(student.mean)
            and tuple(pre.std) == tuple(student.std) and pre.channel_order == student.channel_order)
    return teacher if same else freeze_teacher(TeacherInput(teacher, student, pre))


def check_teacher_classes(teacher: nn.Module, classes: list[str]) -> None:
    """A teacher trained with other classes (or another class order) would distil wrong targets."""
    names = getattr(teacher, "class_names", None)
    if names is None:
        if getattr(teacher, "num_classes", len(classes)) != len(classes):
            raise ValueError(f"teacher has {teacher.num_classes} classes, the training data {len(classes)}")
        return
    if list(names) != list(classes):
        raise ValueError(
            f"the teacher's classes {list(names)[:10]} differ from the training data's {list(classes)[:10]} "
            f"(names or order); train or fine-tune the teacher on the same classes"
        )


def _teacher_logits(teacher: nn.Module, images: Tensor) -> Tensor:
    """Run the frozen teacher without autograd; output on the images' device, float32."""
    try:
        device = next(teacher.parameters()).device
    except StopIteration:
        device = images.device
    with torch.no_grad():
        out = teacher(images.to(device))
    if isinstance(out, tuple):  # a distilled DeiT left in distilled training: use its inference rule
        out = (out[0] + out[1]) / 2
    return out.detach().float().to(images.device)


class TeacherCache:
    """Teacher logits computed once per training sample and reused in later epochs.

    Only valid when the teacher would see the *same* input every epoch: without random augmentation
    of the teacher's input (or with a fixed, per-sample deterministic one). Under DeiT's recipe
    (RandAugment, Mixup/CutMix, random crops) the teacher must run on every augmented batch; use the
    teacher itself there. The cache is a cheap way to run many epochs with a fixed, un-augmented
    dataset, e.g. small-data experiments.

    Args:
        teacher: the model; frozen on construction.
        num_samples: size of the dataset; indices are 0..num_samples-1.

    Example::

        cache = TeacherCache(teacher, len(dataset))
        criterion = DistillationLoss(nn.CrossEntropyLoss(), cache, kind="hard")
        loss = criterion(images, student(images), labels, indices=batch_indices)
    """

    def __init__(self, teacher: nn.Module, num_samples: int) -> None:
        if num_samples <= 0:
            raise ValueError(f"TeacherCache: num_samples must be positive, got {num_samples}")
        self.teacher = freeze_teacher(teacher)
        self.num_samples = num_samples
        self.logits: Tensor | None = None  # (num_samples, K) float32 on the CPU, allocated at first use
        self.filled = torch.zeros(num_samples, dtype=torch.bool)
        self.teacher_calls = 0  # samples the teacher has been run on (each at most once)

    def __len__(self) -> int:
        return int(self.filled.sum())

    def __call__(self, images: Tensor, indices: Tensor) -> Tensor:
        """Teacher logits (B, K) for a batch of ``images`` with dataset ``indices`` (B,)."""
        idx = torch.as_tensor(indices, dtype=torch.long).cpu().reshape(-1)
        if idx.numel() != images.shape[0]:
            raise ValueError(f"TeacherCache: {idx.numel()} indices for a batch of {images.shape[0]} images")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_samples):
            raise ValueError(f"TeacherCache: indices must lie in 0..{self.num_samples - 1}")
        missing = ~self.filled[idx]
        if missing.any():
            sel = missing.nonzero().squeeze(1)
            out = _teacher_logits(self.teacher, images[sel.to(images.device)]).cpu()
            if self.logits is None:
                self.logits = torch.zeros(self.num_samples, out.shape[-1])
            self.logits[idx[sel]] = out
            self.filled[idx[sel]] = True
            self.teacher_calls += int(sel.numel())
        assert self.logits is not None
        return self.logits[idx].to(images.device)

    def precompute(self, batches: Iterable[tuple[Tensor, Tensor]]) -> None:
        """Fill the cache from ``(indices, images)`` batches (un-augmented images)."""
        for indices, images in batches:
            self(images, indices)

    def state_dict(self) -> dict[str, Tensor]:
        if self.logits is None:
            return {"filled": self.filled.clone()}
        return {"logits": self.logits.clone(), "filled": self.filled.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        filled = state["filled"].to(torch.bool)
        if filled.shape != self.filled.shape:
            raise ValueError(f"TeacherCache: state is for {filled.numel()} samples, this cache has {self.num_samples}")
        self.filled = filled.clone()
        self.logits = state["logits"].float().clone() if "logits" in state else None


class DistillationLoss(nn.Module):
    """Label loss mixed with a distillation term from a frozen teacher.

    Args:
        base_loss: the label criterion ``base_loss(logits, targets)`` (e.g. ``nn.CrossEntropyLoss()``,
            a soft-target CE for Mixup labels). An object with a ``base(logits, targets)`` method (the
            trainer's ``ClassificationLoss``) is used through that method.
        teacher: a model (frozen here) or a :class:`TeacherCache`.
        kind: "soft" (KL to the temperature-softened teacher) or "hard" (CE to the teacher's argmax).
        alpha: weight of the distillation term; the label loss gets ``1 - alpha``.
        tau: temperature of the soft objective.

    Call as ``criterion(images, outputs, targets)``, adding ``indices=`` (dataset indices of the batch)
    with a :class:`TeacherCache`. The last call's parts are kept in ``last_parts`` (detached) for logging.
    """

    def __init__(
        self,
        base_loss: Callable[[Tensor, Tensor], Tensor],
        teacher: nn.Module | TeacherCache,
        *,
        kind: DistillKind,
        alpha: float = 0.5,
        tau: float = 1.0,
    ) -> None:
        super().__init__()
        if kind not in ("soft", "hard"):
            raise ValueError(f"DistillationLoss: kind must be 'soft' or 'hard', got {kind!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"DistillationLoss: alpha must lie in [0, 1], got {alpha}")
        if tau <= 0:
            raise ValueError(f"DistillationLoss: tau must be positive, got {tau}")
        base = getattr(base_loss, "base", None)
        if callable(base):
            self.base_module = base_loss  # registered (if a Module) so .to(device) reaches it
            self.base_loss = base
        else:
            self.base_loss = base_loss
        self.kind: DistillKind = kind
        self.alpha = alpha
        self.tau = tau
        if isinstance(teacher, TeacherCache):
            self.cache: TeacherCache | None = teacher
            self.teacher: nn.Module | None = None
        else:
            self.cache = None
            self.teacher = freeze_teacher(teacher)  # a submodule: moves with .to(device)
        self.last_parts: dict[str, Tensor] = {}

    def train(self, mode: bool = True) -> DistillationLoss:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher is never trained: no dropout, frozen norm statistics
        return self

    def teacher_logits(self, images: Tensor, indices: Tensor | None = None) -> Tensor:
        if self.cache is not None:
            if indices is None:
                raise ValueError("DistillationLoss: a TeacherCache needs the batch's dataset indices (indices=...)")
            return self.cache(images, indices)
        assert self.teacher is not None
        if self.teacher.training:  # someone called teacher.train() directly
            self.teacher.eval()
        return _teacher_logits(self.teacher, images)

    def distill_term(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """The distillation term alone, for logits (B, K) of student and teacher."""
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(
                f"DistillationLoss: student logits {tuple(student_logits.shape)} and teacher logits "
                f"{tuple(teacher_logits.shape)} differ; the teacher must predict the same classes"
            )
        s = student_logits.float()
        if self.kind == "soft":
            T = self.tau
            # KL(p_t || p_s) with both given as log-probabilities; T^2 keeps gradients' scale independent of T;
            # summed, then divided by B x K (DeiT's official scaling, not the per-sample mean)
            kl = F.kl_div(F.log_softmax(s / T, dim=-1), F.log_softmax(teacher_logits.float() / T, dim=-1),
                          reduction="sum", log_target=True)
            return kl * (T * T) / s.numel()
        return F.cross_entropy(s, teacher_logits.argmax(dim=-1))

    def forward(self, images: Tensor, outputs: StudentOutput, targets: Tensor, *,
                indices: Tensor | None = None) -> Tensor:
        if isinstance(outputs, (tuple, list)):
            if len(outputs) != 2:
                raise ValueError(f"DistillationLoss: expected logits or (cls_logits, dist_logits), got "
                                 f"a sequence of {len(outputs)}")
            cls_logits, dist_logits = outputs
        else:
            cls_logits = dist_logits = outputs
        base = self.base_loss(cls_logits, targets)
        distill = self.distill_term(dist_logits, self.teacher_logits(images, indices))
        self.last_parts = {"base": base.detach(), "distill": distill.detach()}
        return (1.0 - self.alpha) * base + self.alpha * distill
