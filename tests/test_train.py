"""The training engine: schedules, parameter grouping, EMA, recipes, the loop, exact resume, NaN stop."""

from __future__ import annotations

import itertools
import json
import math
import os
import re

import pytest
import torch
from torch.utils.data import Dataset

import vitlab
from vitlab.checkpoints import CheckpointError, read_vitlab
from vitlab.train import (
    ModelEMA,
    NonFiniteLossError,
    Recipe,
    apply_overrides,
    build_optimizer,
    build_scheduler,
    fit,
    layer_id,
    list_recipes,
    load_recipe,
    lr_factor,
    param_groups,
)
from vitlab.train.state import get_rng_state, load_train_state, set_rng_state

torch.set_num_threads(1)


class Quadrants(Dataset):
    """4 classes of 8x8 single-channel textures (horizontal/vertical stripes, checkerboard, flat) plus noise."""

    def __init__(self, n: int, seed: int = 0, augment: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 4, (n,), generator=g)
        r = torch.arange(8)
        stripes_h = (r[:, None] % 2 * 2 - 1.0).expand(8, 8)
        patterns = torch.stack([stripes_h, stripes_h.T, stripes_h * stripes_h.T, torch.zeros(8, 8)])
        self.x = patterns[self.y][:, None] + torch.randn(n, 1, 8, 8, generator=g) * 0.7  # (N, 1, 8, 8)
        self.augment = augment
        self.classes = ["horizontal", "vertical", "checker", "flat"]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        x = self.x[i]
        if self.augment:  # draws from the global generator, as the real transforms do
            x = x + 0.1 * torch.randn_like(x)
        return x, int(self.y[i])


def tiny_vit(num_classes: int = 4, **kw):
    torch.manual_seed(0)
    opts = {"img_size": 8, "patch_size": 2, "in_chans": 1, "embed_dim": 16, "depth": 2, "num_heads": 2,
            "mlp_ratio": 2.0, "mean": (0.5,), "std": (0.5,)}
    opts.update(kw)
    return vitlab.create_model("vit_tiny_patch16_224", num_classes=num_classes, **opts)


def small_recipe(**kw) -> Recipe:
    base = {"name": "test", "epochs": 2, "batch_size": 16, "lr": 3e-3, "weight_decay": 0.01, "warmup_steps": 2,
            "log_every": 1, "augment": False, "hflip": 0.0}
    base.update(kw)
    return Recipe(**base)


# ------------------------------------------------------------------------------------------ schedules
@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_schedule_warmup_and_end_values(kind):
    total, warm, min_f = 100, 10, 0.01
    f = [lr_factor(s, total_steps=total, warmup_steps=warm, kind=kind, min_factor=min_f) for s in range(total + 1)]
    assert f[0] == pytest.approx(1 / warm)
    assert f[warm - 1] == pytest.approx(1.0)  # peak at the end of warm-up
    assert all(a < b for a, b in itertools.pairwise(f[:warm]))  # strictly rising during warm-up
    assert f[total] == pytest.approx(min_f)
    assert all(a >= b for a, b in zip(f[warm:], f[warm + 1:]))  # never rising after
    mid = lr_factor(warm + (total - warm) // 2, total_steps=total, warmup_steps=warm, kind=kind, min_factor=0.0)
    assert mid == pytest.approx(0.5)  # cosine and linear both pass half-way at half the decay


def test_scheduler_drives_optimizer_lr_per_group():
    model = tiny_vit()
    opt = build_optimizer(model, small_recipe(layer_decay=0.5), lr=1.0)
    sched = build_scheduler(opt, total_steps=20, warmup_steps=5, kind="linear", peak_lr=1.0, min_lr=0.1)
    lrs = []
    for _ in range(20):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    lrs.append([g["lr"] for g in opt.param_groups])
    scales = [g["lr_scale"] for g in opt.param_groups]
    assert lrs[4] == pytest.approx(scales)  # warm-up done: lr = peak x the group's layer scale
    assert lrs[20] == pytest.approx([0.1 * s for s in scales])


# ------------------------------------------------------------------------------------------ grouping
def test_no_decay_grouping():
    model = tiny_vit()
    groups = param_groups(model, weight_decay=0.05)
    decayed = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    plain = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    assert {"pos_embed", "cls_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "head.bias",
            "norm.weight"} <= plain
    assert {"blocks.0.attn.qkv.weight", "blocks.1.mlp.fc1.weight", "head.weight", "patch_embed.proj.weight"} <= decayed
    names = {n for n, _ in model.named_parameters()}
    assert decayed | plain == names and not decayed & plain
    # every decayed tensor is a matrix or conv kernel
    params = dict(model.named_parameters())
    assert all(params[n].ndim >= 2 for n in decayed)


def test_layer_decay_grouping():
    model = tiny_vit(depth=3)
    L = 3
    assert layer_id("cls_token", L) == 0 and layer_id("pos_embed", L) == 0
    assert layer_id("patch_embed.proj.weight", L) == 0
    assert layer_id("blocks.0.attn.qkv.weight", L) == 1 and layer_id("blocks.2.mlp.fc2.bias", L) == 3
    assert layer_id("head.weight", L) == L + 1 and layer_id("norm.weight", L) == L + 1
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.5)
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["head.weight"]["lr_scale"] == 1.0
    assert by_name["blocks.2.attn.qkv.weight"]["lr_scale"] == 0.5
    assert by_name["blocks.0.attn.qkv.weight"]["lr_scale"] == 0.5 ** 3
    assert by_name["pos_embed"]["lr_scale"] == 0.5 ** 4
    assert by_name["pos_embed"]["weight_decay"] == 0 and by_name["blocks.0.attn.qkv.weight"]["weight_decay"] == 0.05


def test_layer_decay_needs_blocks():
    model = vitlab.create_model("resnet18", num_classes=3)
    with pytest.raises(ValueError, match="layer-wise"):
        param_groups(model, weight_decay=0.0, layer_decay=0.7)


# ------------------------------------------------------------------------------------------ EMA
def test_ema_update_math():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.9)
    w0 = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].num_batches_tracked += 5
    ema.update(model)
    assert torch.allclose(ema.module[0].weight, 0.9 * w0 + 0.1 * (w0 + 1.0), atol=1e-6)
    assert int(ema.module[1].num_batches_tracked) == 5  # integer buffers are copied
    ema.update(model)
    assert torch.allclose(ema.module[0].weight, 0.81 * w0 + 0.19 * (w0 + 1.0), atol=1e-6)
    assert not any(p.requires_grad for p in ema.module.parameters())


# ------------------------------------------------------------------------------------------ recipes
def test_shipped_recipes_load_and_match_papers():
    assert {"vit_pretrain", "vit_finetune", "digits", "deit"} <= set(list_recipes())
    pre = load_recipe("vit_pretrain")
    assert (pre.optimizer, pre.betas, pre.global_batch, pre.weight_decay, pre.warmup_steps, pre.schedule,
            pre.lr) == ("adamw", (0.9, 0.999), 4096, 0.1, 10000, "linear", 1e-3)
    ft = load_recipe("vit_finetune")
    assert (ft.optimizer, ft.momentum, ft.global_batch, ft.schedule, ft.weight_decay, ft.clip_grad, ft.img_size,
            ft.zero_init_head) == ("sgd", 0.9, 512, "cosine", 0.0, 1.0, 384, True)
    deit = load_recipe("deit")
    assert deit.lr_base_batch == 512 and deit.repeat_aug == 3 and deit.model_overrides["drop_path_rate"] == 0.1
    assert (deit.mixup_alpha, deit.cutmix_alpha, deit.re_prob, deit.label_smoothing) == (0.8, 1.0, 0.25, 0.1)
    assert deit.ema_decay is not None and deit.warmup_epochs == 5
    assert pre.accum_for(1) == 64 and pre.accum_for(4) == 16
    with pytest.raises(ValueError, match="not a multiple"):
        pre.accum_for(3)


def test_recipe_overrides_are_typed():
    r = apply_overrides(load_recipe("digits"), ["lr=3e-4", "epochs=5", "betas=0.9,0.95", "clip_grad=none",
                                                "augment=false", "model_overrides.depth=6", "schedule=linear"])
    assert r.lr == 3e-4 and r.epochs == 5 and r.betas == (0.9, 0.95) and r.clip_grad is None
    assert r.augment is False and r.model_overrides["depth"] == 6 and r.schedule == "linear"
    with pytest.raises(ValueError, match="unknown recipe key 'lerning_rate'.*valid keys:.*lr"):
        apply_overrides(r, ["lerning_rate=1"])
    with pytest.raises(ValueError, match="'epochs'"):
        apply_overrides(r, ["epochs=many"])
    with pytest.raises(ValueError, match="schedule"):
        apply_overrides(r, ["schedule=exponential"])
    with pytest.raises(ValueError, match="unknown recipe 'nope'"):
        load_recipe("nope")
    with pytest.raises(ValueError, match="img_size must be a positive number of pixels"):  # not a resize crash
        apply_overrides(r, ["img_size=0"])


def test_recipe_file(tmp_path):
    p = tmp_path / "mine.json"
    p.write_text(json.dumps({"lr": 0.01, "epochs": 3}))
    r = load_recipe(str(p))
    assert r.lr == 0.01 and r.epochs == 3 and r.name == "mine"
    p.write_text(json.dumps({"lr": 0.01, "bogus": 1}))
    with pytest.raises(ValueError, match="unknown recipe key.*bogus"):
        load_recipe(str(p))


# ------------------------------------------------------------------------------------------ state
def test_rng_state_roundtrip_weights_only(tmp_path):
    import random

    import numpy as np

    state = get_rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    torch.save(state, tmp_path / "rng.pt")
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


# ------------------------------------------------------------------------------------------ the loop
def test_short_run_lowers_loss_and_beats_chance(tmp_path):
    model = tiny_vit()
    res = fit(model, small_recipe(epochs=4), train_set=Quadrants(256), val_set=Quadrants(128, seed=1),
              output_dir=tmp_path, progress=False)
    losses = [h["loss"] for h in res.history]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    assert res.val["val_top1"] > 0.6  # chance is 0.25
    # the run directory: checkpoint usable alone, state loadable safely, metrics, resolved recipe
    loaded = vitlab.load_model(tmp_path / "model.safetensors")
    assert loaded.class_names == ["horizontal", "vertical", "checker", "flat"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    assert state["step"] == res.step == res.total_steps
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "val" for r in lines) and lines[-1]["step"] == res.step
    assert json.loads((tmp_path / "recipe.json").read_text())["resolved"]["total_steps"] == res.total_steps
    assert any((tmp_path / "tb").iterdir())


def _weights(path):
    sd, _ = read_vitlab(path)
    return sd


def test_resume_is_exact(tmp_path):
    """N steps, then resume for N more == 2N straight, with dropout, drop-path, data noise and EMA on."""
    recipe = small_recipe(epochs=3, ema_decay=0.9, label_smoothing=0.1, clip_grad=1.0)
    kw = {"drop_rate": 0.1, "proj_drop_rate": 0.1, "drop_path_rate": 0.2}
    data = Quadrants(112, augment=True)  # 7 steps per epoch: the break falls mid-epoch
    straight = fit(tiny_vit(**kw), recipe, train_set=data, val_set=Quadrants(32, seed=1),
                   output_dir=tmp_path / "a", progress=False)
    assert straight.total_steps == 21
    first = fit(tiny_vit(**kw), recipe, train_set=data, val_set=Quadrants(32, seed=1),
                output_dir=tmp_path / "b", progress=False, until_step=10)
    assert first.step == 10 and load_train_state(tmp_path / "b" / "train_state.pt")["step"] == 10
    torch.manual_seed(1234)  # a fresh process: whatever the generators hold now must not matter
    resumed = fit(tiny_vit(**kw), recipe, train_set=data, val_set=Quadrants(32, seed=1),
                  output_dir=tmp_path / "b", progress=False, resume=True)
    assert resumed.step == 21
    # the run's training time counts the segment before the resume too (it reported the last segment alone)
    before = load_train_state(tmp_path / "b" / "train_state.pt")["train_seconds"]
    assert resumed.seconds > resumed.segment_seconds > 0 and resumed.seconds == pytest.approx(
        first.seconds + resumed.segment_seconds, abs=0.5) and before == pytest.approx(resumed.seconds, abs=0.5)
    for name in ("model.safetensors", "model_ema.safetensors"):
        a, b = _weights(tmp_path / "a" / name), _weights(tmp_path / "b" / name)
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), (name, k)


def _fake_clock(*reads: float):
    """A clock giving ``reads`` in turn (then one more second per read): the re-planner reads it once per
    timed point."""
    it = iter(reads)
    last = [reads[-1]]

    def clock() -> float:
        last[0] = next(it, last[0] + 1.0)
        return last[0]
    return clock


def test_a_deadline_replans_the_run_and_resume_follows_the_new_plan(tmp_path):
    """The run re-plans its length at its checks; recipe.json and the state record the new plan, and a run
    killed after the re-plan resumes (without a deadline, as --resume does) to the same weights."""
    from vitlab.train.budget import Deadline
    from vitlab.train.recipe import recipe_from_dict
    from vitlab.train.schedule import Horizon

    recipe = small_recipe(epochs=2, warmup_steps=4)  # 7 steps per epoch: 14 planned
    data, val = Quadrants(112, augment=True), Quadrants(32, seed=1)

    def deadline():  # timed at step 2, then checks at 4 (0.5 s per step: 19 steps fit) and 12 (0.625 s: 16)
        return Deadline(end=9.0, checks=(0.0, 0.5), clock=_fake_clock(0.0, 1.0, 6.0))

    straight = fit(tiny_vit(), recipe, train_set=data, val_set=val, output_dir=tmp_path / "a", progress=False,
                   deadline=deadline())
    saved = json.loads((tmp_path / "a" / "recipe.json").read_text())
    assert straight.total_steps == straight.step == 16  # 14 planned, 19 at the end of warm-up, then 16
    assert saved["max_steps"] == saved["resolved"]["total_steps"] == straight.total_steps
    state = load_train_state(tmp_path / "a" / "train_state.pt")
    assert state["total_steps"] == straight.total_steps and state["horizon"]["knot_step"] == 12
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "a" / "metrics.jsonl").read_text().splitlines())
           if r["kind"] == "train"]
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # after warm-up the decay never rises: no jump
    # from step 12 the decay runs from where the 19-step plan had it to the floor at step 16
    h = Horizon(total_steps=16, warmup_steps=4, knot_step=12, knot_progress=(12 - 4) / (19 - 4))
    expect = [recipe.lr * lr_factor(s, total_steps=16, warmup_steps=4, kind="cosine",
                                    min_factor=recipe.min_lr / recipe.lr, horizon=h) for s in range(12, 17)]
    assert lrs[12:] == pytest.approx(expect[:-1]) and expect[-1] == pytest.approx(recipe.min_lr)

    until = straight.total_steps - 3
    fit(tiny_vit(), recipe, train_set=data, val_set=val, output_dir=tmp_path / "b", progress=False,
        deadline=deadline(), until_step=until)
    saved = json.loads((tmp_path / "b" / "recipe.json").read_text())
    resumed = fit(tiny_vit(), recipe_from_dict({k: v for k, v in saved.items() if k != "resolved"}), train_set=data,
                  val_set=val, output_dir=tmp_path / "b", progress=False, resume=True)
    assert resumed.step == straight.step
    a, b = _weights(tmp_path / "a" / "model.safetensors"), _weights(tmp_path / "b" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)


def test_resume_from_another_model_is_a_clear_error(tmp_path):
    fit(tiny_vit(), small_recipe(max_steps=2), train_set=Quadrants(64), output_dir=tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="config differs in: embed_dim"):
        fit(tiny_vit(embed_dim=24), small_recipe(max_steps=4), train_set=Quadrants(64), output_dir=tmp_path,
            progress=False, resume=True)
    with pytest.raises(FileNotFoundError, match="no training state"):
        fit(tiny_vit(), small_recipe(), train_set=Quadrants(64), output_dir=tmp_path / "empty", resume=True,
            progress=False)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    model = tiny_vit()
    recipe = small_recipe(epochs=3)  # 4 steps per epoch; a checkpoint at each epoch end
    calls = {"n": 0}

    def criterion(x, out, y):
        calls["n"] += 1
        loss = torch.nn.functional.cross_entropy(out, y)
        return loss * float("nan") if calls["n"] > 6 else loss

    with pytest.raises(NonFiniteLossError, match="non-finite loss.*step 7.*last good checkpoint") as e:
        fit(model, recipe, train_set=Quadrants(64), output_dir=tmp_path, criterion=criterion, progress=False)
    # what it advises can be done: --resume keeps the optimiser's lr (a lower one is refused there)
    assert "--resume --set clip_grad" in str(e.value) and "finetune --from" in str(e.value)
    assert "--resume after lowering lr" not in str(e.value)
    state = load_train_state(tmp_path / "train_state.pt")
    assert state["step"] == 4
    sd = _weights(tmp_path / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in sd.values())


def test_gradient_accumulation_matches_big_batch(tmp_path):
    """batch 8 x accum 4 == batch 32 x accum 1 (same samples per step, mean loss).

    SGD, since Adam divides by the gradient's magnitude and would amplify float noise in gradients that
    are zero in exact arithmetic (the key bias under softmax)."""
    data = Quadrants(128)
    a = fit(tiny_vit(), small_recipe(batch_size=32, max_steps=3, optimizer="sgd", lr=0.1), train_set=data, output_dir=tmp_path / "a",
            progress=False)
    b = fit(tiny_vit(), small_recipe(batch_size=8, accum_steps=4, max_steps=3, optimizer="sgd", lr=0.1), train_set=data,
            output_dir=tmp_path / "b", progress=False)
    assert a.global_batch == b.global_batch == 32
    wa, wb = _weights(a.model_path), _weights(b.model_path)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k


def test_bf16_autocast_trains_on_cpu(tmp_path):
    res = fit(tiny_vit(), small_recipe(amp="bf16", max_steps=4), train_set=Quadrants(64), output_dir=tmp_path,
              progress=False)
    assert all(math.isfinite(h["loss"]) for h in res.history)
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        fit(tiny_vit(), small_recipe(amp="fp16", max_steps=1), train_set=Quadrants(64),
            output_dir=tmp_path / "x", progress=False)


def test_class_count_mismatch(tmp_path):
    with pytest.raises(ValueError, match="4 classes but the model's head has 3"):
        fit(tiny_vit(num_classes=3), small_recipe(), train_set=Quadrants(64), output_dir=tmp_path, progress=False)


def test_deit_style_run_with_mixup_repeated_augmentation_and_layer_decay(tmp_path):
    recipe = small_recipe(max_steps=3, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, repeat_aug=3,
                          ema_decay=0.99, lr_base_batch=512, layer_decay=0.75)
    res = fit(tiny_vit(drop_path_rate=0.1), recipe, train_set=Quadrants(64), output_dir=tmp_path, progress=False)
    assert res.step == 3 and all(math.isfinite(h["loss"]) for h in res.history)
    assert res.lr == pytest.approx(3e-3 * 16 / 512)  # DeiT's lr x batch / 512
    assert (tmp_path / "model_ema.safetensors").is_file()


class _SignalAt(Dataset):
    """``data`` that sends ``signum`` to this process when item number ``at`` is read (num_workers=0: in the
    training process, mid-step), as Ctrl-C or a scheduler's SIGTERM would arrive."""

    def __init__(self, data, at: int, signum: int):
        self.data, self.at, self.signum, self.reads = data, at, signum, 0

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        self.reads += 1
        if self.reads == self.at:
            os.kill(os.getpid(), self.signum)
        return self.data[i]


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_signal_stops_at_the_end_of_the_step_with_its_state_saved(tmp_path, signame):
    """Ctrl-C or SIGTERM mid-epoch: the step finishes, the state is saved, and --resume ends where an
    uninterrupted run ends (the last periodic checkpoint would have lost the epoch's steps)."""
    import signal

    from vitlab.train.trainer import TrainingStopped

    recipe = small_recipe(epochs=2, batch_size=16)
    data = Quadrants(112, augment=True)  # 7 steps per epoch
    straight = fit(tiny_vit(drop_path_rate=0.2), recipe, train_set=data, output_dir=tmp_path / "a", progress=False)
    def unhandled(signum, frame):  # if fit did not catch it, fail here instead of SIGTERM killing pytest
        raise RuntimeError(f"signal {signum} reached the test's own handler")

    old_term = signal.signal(signal.SIGTERM, unhandled)
    try:
        before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
        with pytest.raises(TrainingStopped, match="stopped at step 4 of 14"):
            fit(tiny_vit(drop_path_rate=0.2), recipe, output_dir=tmp_path / "b", progress=False,
                train_set=_SignalAt(data, 16 * 3 + 5, getattr(signal, signame)))
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # handlers restored
    finally:
        signal.signal(signal.SIGTERM, old_term)
    assert load_train_state(tmp_path / "b" / "train_state.pt")["step"] == 4
    resumed = fit(tiny_vit(drop_path_rate=0.2), recipe, train_set=data, output_dir=tmp_path / "b", progress=False,
                  resume=True)
    assert resumed.step == straight.step == 14
    a, b = _weights(tmp_path / "a" / "model.safetensors"), _weights(tmp_path / "b" / "model.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k


def test_grad_checkpointing_recipe_trains_the_same_weights(tmp_path):
    recipe = small_recipe(epochs=1)
    data = Quadrants(64, augment=True)
    fit(tiny_vit(drop_path_rate=0.2), recipe, train_set=data, output_dir=tmp_path / "a", progress=False)
    model = tiny_vit(drop_path_rate=0.2)
    fit(model, recipe.replace(grad_checkpointing=True), train_set=data, output_dir=tmp_path / "b", progress=False)
    assert model.grad_checkpointing
    a, b = _weights(tmp_path / "a" / "model.safetensors"), _weights(tmp_path / "b" / "model.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k


def test_compiled_training_steps_take_the_whole_batch(tmp_path, monkeypatch):
    """`train --compile`: the step module's input is the batch (images, targets), not a tensor; the compiled
    wrapper's inference-only padding must leave it alone (it read batch.shape and crashed on the first step).
    torch.compile itself is replaced by the identity here (a real compile takes tens of seconds on a CPU)."""
    monkeypatch.setattr(torch, "compile", lambda module, **kw: module)
    res = fit(tiny_vit(), small_recipe(epochs=1), train_set=Quadrants(32), output_dir=tmp_path, progress=False,
              compile=True)
    assert res.step == 2 and res.compile_failed is None and res.compile_seconds is not None


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    recipe = small_recipe(epochs=1)
    fit(tiny_vit(), recipe, train_set=Quadrants(32), output_dir=tmp_path / "a", progress=False)
    res = fit(tiny_vit(), recipe, train_set=Quadrants(32), output_dir=tmp_path / "b", progress=False, compile=True)
    assert res.compile_failed is None
    a, b = _weights(tmp_path / "a" / "model.safetensors"), _weights(tmp_path / "b" / "model.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-4), k


@pytest.mark.parametrize(("setting", "said"), [
    ("log_every=0", "log_every must be >= 1"), ("eval_every_epochs=0", "eval_every_epochs must be >= 1"),
    ("hflip=2", "hflip must be a probability"), ("re_prob=3", "re_prob must be a probability"),
    ("mixup_prob=3", "mixup_prob must be a probability"), ("mixup_alpha=-1", "mixup_alpha and cutmix_alpha"),
    ("scale=[1.0,0.5]", "scale must be (min, max)"), ("weight_decay=-1", "weight_decay must be >= 0"),
    ("warmup_steps=-5", "warmup_steps and warmup_epochs"), ("val_fraction=1", "val_fraction must be in [0, 1)"),
    ("momentum=1.5", "momentum must be in [0, 1)"), ("checkpoint_every=-1", "checkpoint_every must be >= 0"),
])
def test_nonsense_recipe_values_are_refused_before_training(setting, said):
    """They were accepted, then crashed an epoch in (log_every=0, eval_every_epochs=0) or trained silently
    with the value (a flip probability of 2)."""
    from vitlab.train.recipe import apply_overrides

    with pytest.raises(ValueError, match=re.escape(said)):
        apply_overrides(small_recipe(), [setting])


def test_a_resumed_runs_tensorboard_keeps_every_step(tmp_path):
    """TensorBoard and metrics.jsonl hold the same steps after a resume (the purge dropped the checkpoint's own
    step, one before the first the resumed run logs)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = small_recipe(epochs=1, batch_size=8)
    data = Quadrants(64)
    fit(tiny_vit(), recipe, train_set=data, output_dir=tmp_path, progress=False, until_step=3)
    fit(tiny_vit(), recipe, train_set=data, output_dir=tmp_path, progress=False, resume=True)
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    logged = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "train"]
    assert logged == list(range(1, 9))
    assert sorted(e.step for e in events.Scalars("train/loss")) == logged
