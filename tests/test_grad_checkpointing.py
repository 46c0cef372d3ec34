"""``model.set_grad_checkpointing()`` (timm's call) on every family: the blocks' activations are recomputed in the
backward pass, and the step is the same one: loss, every gradient (dropout and drop-path draws repeat) and
BatchNorm's running statistics (not counted twice)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vitlab
from dense_helpers import DETR_TINY, SETR_TINY
from vitlab.models import get_entry

from model_helpers import input_for, make_tiny, perturb_

torch.set_num_threads(1)

# one name per family, and the dense models (SETR checkpoints its ViT backbone's blocks)
NAMES = sorted({get_entry(n).family: n for n in vitlab.list_models()}.values()) + [
    "detr_resnet50", "setr_pup_vit_small_patch16"]
DENSE = {"detr_resnet50": {**DETR_TINY, "dropout": 0.1, "img_size": 32},
         "setr_pup_vit_small_patch16": {**SETR_TINY, "img_size": 32}}


def _tiny(name: str, **over) -> nn.Module:
    if name in DENSE:
        return vitlab.create_model(name, **{**DENSE[name], **over})
    return make_tiny(name, **over)


def _step(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    calls = [0]

    def count(*_):
        calls[0] += 1

    hooks = [m.register_forward_hook(count) for m in model.modules()]
    torch.manual_seed(1)
    model.zero_grad()
    out = model(x)
    if isinstance(out, dict):
        out = [v for k, v in sorted(out.items()) if isinstance(v, torch.Tensor)]
    elif isinstance(out, torch.Tensor):
        out = [out]
    loss = sum(o.float().square().mean() for o in out)
    loss.backward()
    for h in hooks:
        h.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, calls[0]


@pytest.mark.parametrize("name", NAMES)
def test_checkpointed_step_equals_the_plain_one(name):
    cfg = get_entry(name).config
    drop = {"drop_path_rate": 0.2} if "drop_path_rate" in type(cfg).__dataclass_fields__ else {}
    torch.manual_seed(0)
    model = perturb_(_tiny(name, **drop)).train()
    twin = perturb_(_tiny(name, **drop)).train()
    twin.load_state_dict(model.state_dict())
    twin.set_grad_checkpointing()
    x = input_for(model)
    loss, grads, calls = _step(model, x)
    loss_ck, grads_ck, calls_ck = _step(twin, x)
    assert calls_ck > calls, "nothing was recomputed"
    torch.testing.assert_close(loss_ck, loss, rtol=1e-6, atol=1e-7)
    assert grads_ck.keys() == grads.keys() and grads
    for n in grads:
        torch.testing.assert_close(grads_ck[n], grads[n], rtol=1e-5, atol=1e-6, msg=lambda e, n=n: f"{n}: {e}")
    for (n, b), b_ck in zip(model.named_buffers(), twin.buffers()):  # BatchNorm's running statistics
        torch.testing.assert_close(b_ck, b, rtol=0, atol=0, msg=lambda e, n=n: f"buffer {n}: {e}")
    twin.set_grad_checkpointing(False)
    assert _step(twin, x)[2] == _step(model, x)[2] == calls  # a step each: BatchNorm statistics stay in step
    twin.set_grad_checkpointing()
    model.eval()
    twin.eval()
    with torch.no_grad():  # nothing to recompute without gradients
        ref, out = model(x), twin(x)
    for a, b in zip(*(o.values() if isinstance(o, dict) else [o] for o in (ref, out))):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_timm_surface():
    model = make_tiny("vit_tiny_patch16_224", num_classes=7)
    assert model.get_classifier() is model.head
    cfg = model.pretrained_cfg
    pre = model.preprocessing
    assert cfg == model.default_cfg
    assert cfg["input_size"] == pre.input_size and cfg["mean"] == pre.mean and cfg["std"] == pre.std
    assert cfg["crop_pct"] == pre.crop_pct and cfg["interpolation"] == pre.interpolation
    assert cfg["num_classes"] == 7 and cfg["architecture"] == "vit_tiny_patch16_224"
    detr = _tiny("detr_resnet50")
    assert detr.get_classifier() is detr.class_embed and detr.pretrained_cfg["classifier"] == "class_embed"


@pytest.mark.parametrize("name", [n for n in NAMES if n not in DENSE])
def test_forward_intermediates_takes_timms_options(name):
    model = perturb_(_tiny(name)).eval()
    x = input_for(model)
    with torch.no_grad():
        final, kept = model.forward_intermediates(x, output_fmt="NCHW")
        alone = model.forward_intermediates(x, output_fmt="NCHW", intermediates_only=True, stop_early=True)
    assert len(alone) == len(kept) > 0
    for a, b in zip(alone, kept):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
