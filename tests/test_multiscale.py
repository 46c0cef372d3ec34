"""MobileViT's multi-scale sampler: the sizes and batch sizes follow the rule (constant pixels per batch),
the plan is a function of (seed, epoch) shared by all ranks, and training with it resumes exactly."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset, DistributedSampler

from vitlab.data.multiscale import MultiScaleBatchSampler, MultiScaleDataset, multiscale_batches
from vitlab.train import Recipe, fit

from model_helpers import make_tiny

MOBILEVIT_SIZES = (160, 192, 256, 288, 320)  # cvnets' vbs settings (160-320, 5 scales, multiples of 32) with 256


def test_batch_sizes_keep_the_pixels_per_batch() -> None:
    scales = multiscale_batches((256, 256), 128, MOBILEVIT_SIZES)
    assert [s for s, _ in scales] == sorted(MOBILEVIT_SIZES)
    budget = 128 * 256 * 256
    for size, batch in scales:
        # the nearest whole batch to the budget: off by at most half an image
        assert abs(batch * size * size - budget) <= size * size / 2, (size, batch)
    assert dict(scales)[256] == 128 and dict(scales)[160] > 2 * 128 > 2 * dict(scales)[320]


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="positive integers"):
        multiscale_batches((256, 256), 8, [0, 256])
    with pytest.raises(ValueError, match="at least one size"):
        multiscale_batches((256, 256), 8, [])
    with pytest.raises(ValueError, match="cannot fill one batch"):
        MultiScaleBatchSampler(DistributedSampler(range(10), num_replicas=1, rank=0), base_size=(256, 256),
                               base_batch=32, sizes=MOBILEVIT_SIZES)


def _sampler(n: int, rank: int = 0, world: int = 1, seed: int = 0) -> MultiScaleBatchSampler:
    indices = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed)
    return MultiScaleBatchSampler(indices, base_size=(256, 256), base_batch=16, sizes=MOBILEVIT_SIZES, seed=seed)


def test_each_batch_has_one_size_and_the_rules_batch_size() -> None:
    s = _sampler(1000)
    rule = dict(multiscale_batches((256, 256), 16, MOBILEVIT_SIZES))
    state = torch.get_rng_state()
    for epoch in range(3):
        s.set_epoch(epoch)
        batches = list(s)
        assert len(batches) == len(s) == 1000 * 5 // sum(rule.values())  # fixed length: the schedule counts on it
        sizes = []
        for b in batches:
            (size,) = {sz for _, sz in b}
            assert len(b) == rule[size]
            sizes.append(size)
        counts = Counter(sizes)
        assert set(counts) == set(MOBILEVIT_SIZES) and max(counts.values()) - min(counts.values()) <= 1
        # the batches take the epoch's order (the index sampler's) from the start, in sequence
        order = list(s.indices)
        flat = [i for b in batches for i, _ in b]
        assert flat == [order[k % len(order)] for k in range(len(flat))]
    assert torch.equal(torch.get_rng_state(), state)  # the plan never draws from the global generator


def test_plan_is_a_function_of_seed_and_epoch_and_shared_by_ranks() -> None:
    a, b = _sampler(1000, rank=0, world=2), _sampler(1000, rank=1, world=2)
    plans = []
    for epoch in (0, 1):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        assert a.plan() == b.plan() and len(a) == len(b)  # every rank draws the same size at each step
        ia = {i for batch in a for i, _ in batch}
        ib = {i for batch in b for i, _ in batch}
        assert not ia & ib  # disjoint shares of one permutation
        plans.append(a.plan())
    assert plans[0] != plans[1]
    again = _sampler(1000, rank=0, world=2)
    again.set_epoch(1)
    assert again.plan() == plans[1] and list(again) == list(a)
    other = _sampler(1000, seed=1)
    other.set_epoch(1)
    assert other.plan() != plans[1]


class Textures(Dataset):
    """3-channel 64x64 images of 4 classes (stripes both ways, checkerboard, flat) with noise; the augmentation
    draws from the global generator, as the real transforms do."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.y = torch.randint(0, 4, (n,), generator=g)
        r = torch.arange(64) // 4 % 2 * 2 - 1.0
        h = r[:, None].expand(64, 64)
        pats = torch.stack([h, h.T, h * h.T, torch.zeros(64, 64)])
        self.x = pats[self.y][:, None].expand(n, 3, 64, 64) + 0.5 * torch.randn(n, 3, 64, 64, generator=g)
        self.classes = ["h", "v", "checker", "flat"]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i] + 0.1 * torch.randn(3, 64, 64), int(self.y[i])


def test_dataset_resizes_each_sample_to_its_batch_size() -> None:
    ds = MultiScaleDataset(Textures(4))
    x, y = ds[(1, 32)]
    assert x.shape == (3, 32, 32) and y == int(ds.dataset.y[1])
    assert ds[1][0].shape == (3, 64, 64)


def test_resume_is_exact_with_multiscale_sampling(tmp_path) -> None:
    """N steps, then resume for N more == 2N straight; the model sees the planned sizes and batch sizes."""
    recipe = Recipe(name="ms", epochs=3, batch_size=8, lr=2e-3, weight_decay=0.01, warmup_steps=2, log_every=1,
                    augment=False, hflip=0.0, ema_decay=0.9, multi_scale=(32, 64, 96))
    data = Textures(96)  # batches 32 / 8 / 4 at 32 / 64 / 96 px: 6 per epoch, the break falls mid-epoch

    def run(out, **kw):
        torch.manual_seed(0)
        model = make_tiny("mobilevit_xxs", num_classes=4, drop_path_rate=0.1)
        seen: list[tuple[int, int]] = []
        model.register_forward_pre_hook(lambda m, args: seen.append((args[0].shape[0], args[0].shape[-1])))
        res = fit(model, recipe, train_set=data, output_dir=out, progress=False, **kw)
        return res, seen

    straight, seen = run(tmp_path / "a")
    assert straight.total_steps == 18 and len(seen) == 18
    rule = dict(multiscale_batches((64, 64), 8, (32, 64, 96)))
    assert all(rule[size] == batch for batch, size in seen) and {s for _, s in seen} == {32, 64, 96}
    first, _ = run(tmp_path / "b", until_step=8)
    assert first.step == 8
    torch.manual_seed(1234)  # a fresh process: whatever the generators hold now must not matter
    resumed, seen_resumed = run(tmp_path / "b", resume=True)
    assert resumed.step == 18 and seen_resumed == seen[8:]
    for name in ("model.safetensors", "model_ema.safetensors"):
        a, b = load_file(str(tmp_path / "a" / name)), load_file(str(tmp_path / "b" / name))
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), (name, k)


def test_mobilevit_recipe_uses_cvnets_scales() -> None:
    """cvnets' variable_batch_sampler settings (160-320 px, 5 scales, check_scale 32, base 256): linspace,
    the base added, each rounded to a multiple of 32 (cvnets data/sampler/utils.py _image_batch_pairs)."""
    from vitlab.layers import make_divisible
    from vitlab.train import load_recipe

    expected = sorted({make_divisible(160 + 40 * i, 32) for i in range(5)} | {256})
    assert list(load_recipe("mobilevit").multi_scale) == expected
    assert load_recipe("mobilevitv2").multi_scale is None  # cvnets' v2 config trains at 256 px only


def test_training_job_crops_at_the_largest_size(tmp_path, monkeypatch) -> None:
    """`vitlab train` with multi_scale: the training transform crops at the largest size, the model sees
    every planned size, and evaluation stays at the input size."""
    import vitlab.train.run as run
    from vitlab.train import apply_overrides, load_recipe

    recipe = apply_overrides(load_recipe("mobilevit_small_data"), [
        "max_steps=3", "batch_size=8", "img_size=32", "multi_scale=[16,32,48]", "val_fraction=0.2", "randaugment=null",
        "model_overrides.stem_chs=8", "model_overrides.channels=[8,8,16,16,24]", "model_overrides.mv2_depths=[1,1]",
        "model_overrides.transformer_dims=[8,16,16]", "model_overrides.transformer_depths=[1,1,1]",
        "model_overrides.final_chs=32"])
    seen: dict[str, object] = {}
    real_fit = run.fit

    def spy(model, recipe, *, train_set, **kw):
        seen["crop"] = tuple(train_set.transform.pre.input_size)
        seen["sizes"] = sizes = set()
        model.register_forward_pre_hook(lambda m, args: sizes.add(args[0].shape[-1]) if m.training else None)
        return real_fit(model, recipe, train_set=train_set, **kw)

    monkeypatch.setattr(run, "fit", spy)
    summary = run.run_training(run.TrainJob(recipe=recipe, data="digits", output=tmp_path / "r", progress=False))
    assert seen["crop"] == (1, 48, 48) and seen["sizes"] <= {16, 32, 48} and len(seen["sizes"]) >= 2
    assert summary["steps"] == 3 and "test" in summary


DDP_SCRIPT = """
import os
import sys
import vitlab.data.multiscale as ms
from vitlab.cli.main import main

plans = []
real_plan = ms.MultiScaleBatchSampler.plan
def plan(self):
    p = real_plan(self)
    plans.append(p)
    return p
ms.MultiScaleBatchSampler.plan = plan
code = main(sys.argv[1:])
print("PLAN", os.environ["RANK"], plans[0][:8], flush=True)
sys.exit(code)
"""


@pytest.mark.slow
def test_two_processes_train_with_the_same_sizes(tmp_path) -> None:
    """Under torchrun (gloo), both ranks draw the same size at each step and the run completes."""
    import os
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(DDP_SCRIPT)
    args = ["train", "--data", "digits", "--model", "mobilevit_xxs", "--recipe", "mobilevit_small_data", "--steps",
            "4", "--batch-size", "8", "--no-progress", "--device", "cpu", "--set", "img_size=32", "--set",
            "multi_scale=[16,32,48]", "--set", "randaugment=null", "--set", "model_overrides.stem_chs=8", "--set",
            "model_overrides.channels=[8,8,16,16,24]", "--set", "model_overrides.transformer_dims=[8,16,16]",
            "--set", "model_overrides.transformer_depths=[1,1,1]", "--output", str(tmp_path / "run")]
    env = dict(os.environ, OMP_NUM_THREADS="1", VITLAB_DIST_TIMEOUT="60")
    env.pop("WORLD_SIZE", None)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), *args], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    plans = {line.split(" ", 2)[1]: line.split(" ", 2)[2] for line in res.stdout.splitlines() if line.startswith("PLAN")}
    assert set(plans) == {"0", "1"} and plans["0"] == plans["1"], res.stdout
    assert "multi-scale sampling: 16: 32, 32: 8, 48: 4 per process" in res.stderr
