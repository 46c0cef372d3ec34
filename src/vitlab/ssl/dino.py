"""DINO: "Emerging Properties in Self-Supervised Vision Transformers" (Caron et al. 2021, arXiv:2104.14294).

Self-distillation with no labels. A student (the backbone being trained, plus a projection head) and
a teacher (an exponential moving average of the student, never trained by gradients) see different
crops of one image: the teacher the 2 global crops, the student those and N smaller local crops, each
at its own resolution (the backbone resamples its position table: build it with
``dynamic_img_size=True``). The student's K-way output, softmax at temperature 0.1, is trained to match
the teacher's, centred (a running mean of the teacher's outputs, EMA 0.9, updated *after* the loss, once
per optimiser step from the whole batch: the micro-batches of gradient accumulation are pooled) and
sharpened (temperature 0.04): cross entropy over every pair of different views, averaged.

Details that matter (each tested): the projection head is a 3-layer MLP (GELU) to a 256-d bottleneck,
L2-normalised, then a weight-normalised linear layer without bias whose norm is fixed to 1
(``norm_last_layer``) and whose gradients are dropped during the first epoch; the teacher follows
momentum 0.996 -> 1 on a cosine schedule per iteration; gradients are clipped per parameter (norm
3.0), not globally. Collapse shows as a loss stuck at ln K (every output uniform): it is reported in
the ``collapse`` metric and logged.

Recipe (paper, ViT-S/16): AdamW, lr 5e-4 x batch / 256 with 10 warm-up epochs and cosine decay,
weight decay 0.04 (the paper raises it to 0.4 on a cosine; vitlab keeps it constant: a deviation).
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from vitlab.layers import trunc_normal_linears
from vitlab.train.objective import Metrics, Objective
from vitlab.train.schedule import Horizon

log = logging.getLogger(__name__)


class DINOHead(nn.Module):
    """MLP (in -> hidden -> hidden -> bottleneck, GELU), L2 normalisation, weight-normed linear to ``out_dim``.

    The last layer's weight is ``g * v / ||v||`` per output unit (``last_layer.parametrizations.weight.
    original0`` = g, ``original1`` = v); with ``norm_last_layer`` g is fixed to 1.
    """

    def __init__(self, in_dim: int, out_dim: int, *, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3, norm_last_layer: bool = True) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (max(num_layers, 1) - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        trunc_normal_linears(self.mlp)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False), name="weight", dim=0)
        g = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad_(not norm_last_layer)

    def forward(self, x: Tensor) -> Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)  # (B, bottleneck), unit length
        return self.last_layer(x)  # (B, K)


class DINOLoss(nn.Module):
    """Cross entropy between the sharpened, centred teacher and the student over all pairs of different views.

    ``forward(student_out, teacher_out, num_views)``: student outputs of every view stacked view-major
    ((V * B, K)), teacher outputs of the global views ((G * B, K)). ``forward`` adds the teacher outputs to
    a pending sum; :meth:`update_center` (once per optimiser step) moves the centre to their mean over
    every micro-batch and process since the last update, as official DINO does with its whole batch.
    """

    def __init__(self, out_dim: int, *, student_temp: float = 0.1, teacher_temp: float = 0.04,
                 center_momentum: float = 0.9) -> None:
        super().__init__()
        for name, value in (("student_temp", student_temp), ("teacher_temp", teacher_temp)):
            if not value > 0:  # the logits are divided by it: 0 gives inf / NaN at the first step
                raise ValueError(f"DINO: {name}={value!r} must be positive (the paper's: student 0.1, teacher "
                                 f"0.04 to 0.07)")
        if not 0 <= center_momentum <= 1:
            raise ValueError(f"DINO: center_momentum={center_momentum!r} must lie in [0, 1] (the paper's: 0.9)")
        self.student_temp, self.teacher_temp, self.center_momentum = student_temp, teacher_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("pending_sum", torch.zeros(1, out_dim), persistent=False)
        self.register_buffer("pending_count", torch.zeros(()), persistent=False)

    def forward(self, student_out: Tensor, teacher_out: Tensor, num_views: int) -> tuple[Tensor, Tensor]:
        """Returns (loss, teacher probabilities (G * B, K))."""
        s = (student_out.float() / self.student_temp).chunk(num_views)
        t_probs = F.softmax((teacher_out.float() - self.center) / self.teacher_temp, dim=-1).detach()
        t = t_probs.chunk(teacher_out.shape[0] // s[0].shape[0])
        total, terms = student_out.new_zeros((), dtype=torch.float32), 0
        for iq, q in enumerate(t):
            for v in range(num_views):
                if v == iq:
                    continue  # the same view seen by both networks
                total = total + torch.sum(-q * F.log_softmax(s[v], dim=-1), dim=-1).mean()
                terms += 1
        loss = total / terms
        self.accumulate(teacher_out)
        return loss, t_probs

    @torch.no_grad()
    def accumulate(self, teacher_out: Tensor) -> None:
        """Add teacher outputs (n, K) to the pending centre update."""
        self.pending_sum += teacher_out.detach().float().sum(dim=0, keepdim=True)
        self.pending_count += teacher_out.shape[0]

    @torch.no_grad()
    def update_center(self) -> None:
        """center <- m * center + (1 - m) * mean of the pending teacher outputs (all processes); then clear.
        Every process must call it (it all-reduces), once per optimiser step."""
        batch_sum, count = self.pending_sum, self.pending_count
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_sum)
            dist.all_reduce(count)
        if count > 0:
            self.center.mul_(self.center_momentum).add_(batch_sum / count, alpha=1 - self.center_momentum)
        batch_sum.zero_()
        count.zero_()


def teacher_momentum(step: int, total_steps: int, base: float = 0.996) -> float:
    """Momentum for the update after optimiser step index ``step`` (0-based): cosine from ``base`` to 1."""
    return momentum_at(step / max(total_steps, 1), base)


def momentum_at(progress: float, base: float = 0.996) -> float:
    """The teacher's momentum where the run has made ``progress`` (0 to 1): cosine from ``base`` to 1."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1) / 2


class DINO(Objective):
    """The DINO objective over ``model`` (the student backbone). Batches are (list of crops, labels),
    globals first (:class:`vitlab.data.multicrop.MultiCropTransform`).

    Args:
        out_dim: K, the head's output dimension (65536 in the paper; a few thousand suffice for small data).
        num_global: global views (2), the only ones the teacher sees.
        momentum: the teacher's base momentum (0.996 -> 1).
        freeze_last_layer_epochs: epochs during which the last layer gets no update (1).
        clip_per_param: clip each parameter's gradient to this norm (3.0; None: off).
        collapse_tolerance / collapse_patience: report collapse when |loss - ln K| < tolerance for this many
            consecutive steps.
    """

    name = "dino"

    def __init__(self, model: nn.Module, *, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 norm_last_layer: bool = True, num_global: int = 2, student_temp: float = 0.1,
                 teacher_temp: float = 0.04, center_momentum: float = 0.9, momentum: float = 0.996,
                 freeze_last_layer_epochs: int = 1, clip_per_param: float | None = 3.0,
                 collapse_tolerance: float = 1e-3, collapse_patience: int = 20) -> None:
        if not 0 <= momentum <= 1:
            raise ValueError(f"DINO: momentum={momentum!r}, the teacher's base momentum, must lie in [0, 1] (the "
                             f"paper's: 0.996)")
        if num_global < 1:
            raise ValueError(f"DINO: num_global={num_global!r} must be at least 1")
        device = next(model.parameters()).device
        self.student = model
        self.head = DINOHead(model.num_features, out_dim, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim,
                             norm_last_layer=norm_last_layer).to(device)
        # the teacher starts as a copy of the student and only ever follows it by EMA
        self.teacher = copy.deepcopy(model).eval().requires_grad_(False)
        self.teacher_head = copy.deepcopy(self.head).eval().requires_grad_(False)
        self.loss = DINOLoss(out_dim, student_temp=student_temp, teacher_temp=teacher_temp,
                             center_momentum=center_momentum).to(device)
        self.num_global, self.base_momentum = num_global, momentum
        self.freeze_last_layer_epochs, self.clip_per_param = freeze_last_layer_epochs, clip_per_param
        self.collapse_tolerance, self.collapse_patience = collapse_tolerance, collapse_patience
        self.stuck, self.collapse_reported = 0, False
        self.steps_per_epoch, self.schedule = 1, Horizon(total_steps=1, warmup_steps=0)  # until setup

    def modules(self) -> dict[str, nn.Module]:
        return {"head": self.head, "teacher": self.teacher, "teacher_head": self.teacher_head, "loss": self.loss}

    def setup(self, model: nn.Module, *, steps_per_epoch: int, total_steps: int) -> None:
        if model is not self.student:
            raise ValueError("DINO: fit() trains another model than the student this objective was built on")
        super().setup(model, steps_per_epoch=steps_per_epoch, total_steps=total_steps)

    def describe(self) -> str:
        return f"dino (K={self.head.last_layer.out_features}, teacher momentum {self.base_momentum:g} -> 1)"

    @staticmethod
    def _embed(backbone: nn.Module, head: nn.Module, views: list[Tensor]) -> Tensor:
        """Head outputs of every view, view-major (V * B, K); views of one size go through the backbone
        together."""
        feats, i = [], 0
        while i < len(views):
            j = i
            while j < len(views) and views[j].shape[-2:] == views[i].shape[-2:]:
                j += 1
            x = torch.cat(views[i:j])
            feats.append(backbone.forward_head(backbone.forward_features(x), pre_logits=True))
            i = j
        return head(torch.cat(feats))

    def step(self, model: nn.Module, batch: Any) -> tuple[Tensor, Metrics]:
        views = batch[0] if isinstance(batch, (tuple, list)) and isinstance(batch[0], (list, tuple)) else batch
        if not isinstance(views, (list, tuple)) or len(views) < max(2, self.num_global):
            # the loss pairs different views: two global crops alone (no local ones) are DINO without multi-crop
            raise ValueError(f"DINO: a batch must hold a list of at least {max(2, self.num_global)} crops, the "
                             f"{self.num_global} global ones first; use vitlab.data.multicrop.MultiCropTransform")
        with torch.no_grad():
            t = self._embed(self.teacher, self.teacher_head, list(views[:self.num_global]))
        s = self._embed(model, self.head, list(views))
        loss, t_probs = self.loss(s, t, len(views))
        entropy = -(t_probs * torch.log(t_probs.clamp_min(1e-12))).sum(-1).mean()
        collapsed = abs(float(loss.detach()) - math.log(t.shape[-1])) < self.collapse_tolerance
        self._watch_collapse(collapsed, float(loss.detach()), t.shape[-1])
        return loss, {"t_entropy": entropy.detach(), "collapse": float(collapsed)}

    def _watch_collapse(self, collapsed: bool, loss: float, k: int) -> None:
        self.stuck = self.stuck + 1 if collapsed else 0
        if self.stuck >= self.collapse_patience and not self.collapse_reported:
            self.collapse_reported = True
            log.warning("DINO: the loss has stayed at ln K = %.4f (%.4f) for %d steps: the outputs have collapsed "
                        "to uniform. Lower the teacher temperature or the learning rate, or raise the teacher "
                        "momentum", math.log(k), loss, self.stuck)

    def before_optimizer_step(self, step: int) -> None:
        params = [p for p in list(self.student.parameters()) + list(self.head.parameters()) if p.grad is not None]
        if self.clip_per_param is not None:
            for p in params:
                norm = p.grad.detach().norm(2)
                p.grad.mul_((self.clip_per_param / (norm + 1e-6)).clamp(max=1.0))
        if step < self.freeze_last_layer_epochs * self.steps_per_epoch:
            for p in self.head.last_layer.parameters():
                p.grad = None  # no update of the last layer in the first epoch(s)

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        self.loss.update_center()  # once per step, from every micro-batch of it
        m = momentum_at(self.progress(step - 1), self.base_momentum)
        self.last_momentum = m
        for src, dst in ((self.student, self.teacher), (self.head, self.teacher_head)):
            for ps, pt in zip(src.parameters(), dst.parameters(), strict=True):
                pt.mul_(m).add_(ps.detach(), alpha=1 - m)
            for bs, bt in zip(src.buffers(), dst.buffers(), strict=True):
                bt.copy_(bs)


def load_dino(path: Any, model: str, *, use: str = "teacher", **model_overrides: Any) -> tuple[nn.Module, DINOHead]:
    """A network of an official DINO training checkpoint as (backbone, projection head).

    Args:
        model: the registered ViT name whose size the checkpoint has (with ``model_overrides``).
        use: "teacher" (what the paper evaluates) or "student".
    """
    import vitlab
    from vitlab.checkpoints import adapt_state_dict, load_strict
    from vitlab.checkpoints.convert_dino import read_dino_checkpoint
    from vitlab.checkpoints.convert_timm import convert_timm_vit

    if use not in ("teacher", "student"):
        raise ValueError(f"load_dino: use must be 'teacher' or 'student', got {use!r}")
    ck = read_dino_checkpoint(path)
    backbone_sd = ck.teacher_backbone if use == "teacher" else ck.student_backbone
    head_sd = ck.teacher_head if use == "teacher" else ck.student_head
    converted = convert_timm_vit(backbone_sd, {})
    backbone = vitlab.create_model(model, **{**converted.overrides, **model_overrides})
    label = f"{path} ({use})"
    load_strict(backbone, adapt_state_dict(converted.state_dict, backbone, source=label), source=label)
    g = head_sd["last_layer.parametrizations.weight.original0"]
    head = DINOHead(backbone.num_features, **ck.head_dims(), norm_last_layer=bool(torch.all(g == 1)))
    load_strict(head, head_sd, source=f"{label} head")
    return backbone, head
