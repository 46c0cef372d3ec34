"""Augmentation seeded per sample: a run with DataLoader workers resumes exactly, and any number of workers (or none)
gives the same run; the per-sample seeds follow (seed, epoch, position in the epoch's order) only."""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils.data import Dataset, DistributedSampler

from test_ssl_train import dino_setup
from test_ssl_train import recipe as ssl_recipe
from test_train import Quadrants, _weights, small_recipe, tiny_vit
from vitlab.data import RepeatAugSampler, create_loader, train_transform
from vitlab.models.base import Preprocessing
from vitlab.train import fit

torch.set_num_threads(1)

PRE = Preprocessing(input_size=(1, 8, 8), mean=(0.5,), std=(0.5,))


class Textures(Dataset):
    """:class:`Quadrants` as uint8 (1, 8, 8) images through a training transform (random resized crop, flip,
    RandAugment, random erasing), drawing from the global generator as ``vitlab train``'s transform does."""

    def __init__(self, n: int, generator: torch.Generator | None = None) -> None:
        q = Quadrants(n)
        self.x = ((q.x.clamp(-2, 2) + 2) * (255 / 4)).round().to(torch.uint8)  # (N, 1, 8, 8)
        self.y, self.classes = q.y, q.classes
        self.transform = train_transform(PRE, hflip=0.5, randaugment=(2, 9), re_prob=0.5, generator=generator)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.transform(self.x[i]), int(self.y[i])


def _assert_same_weights(a, b) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def _losses(*results) -> list[float]:
    return [h["loss"] for r in results for h in r.history]


# ------------------------------------------------------------------------------------------ the seeds


def _seeded(sampler, *, seed: int = 7, epoch: int = 0, skip: int = 0, batched: bool = False):
    from vitlab.data.loader import SeededSampler

    s = SeededSampler(sampler, seed=seed, batched=batched)
    s.set_epoch(epoch)
    s.skip = skip
    items = [x for b in s for x in (b if batched else [b])]
    return [x.index for x in items], [x.seed for x in items]


def test_sample_seeds_depend_on_seed_epoch_and_position_only():
    from vitlab.data.loader import sample_seed
    from vitlab.data.multiscale import MultiScaleBatchSampler

    n = 10
    grid = {sample_seed(s, e, p) for s in range(3) for e in range(3) for p in range(50)}
    assert len(grid) == 450 and all(0 <= v < 2**63 for v in grid)
    one = DistributedSampler(range(n), num_replicas=1, rank=0, shuffle=True, seed=0)
    idx, seeds = _seeded(one)
    assert seeds == [sample_seed(7, 0, p) for p in range(n)]
    other_idx, other_seeds = _seeded(DistributedSampler(range(n), num_replicas=1, rank=0, shuffle=True, seed=1))
    assert other_idx != idx and other_seeds == seeds  # another order: the same seed at each position
    assert _seeded(one, epoch=1)[1] == [sample_seed(7, 1, p) for p in range(n)] != seeds
    assert _seeded(one, seed=8)[1] == [sample_seed(8, 0, p) for p in range(n)] != seeds
    assert _seeded(one, skip=4) == (idx[4:], seeds[4:])  # a resumed epoch: positions stay absolute
    # two ranks: every sample gets the seed it gets in one process (rank r's i-th sample is at r + 2 i)
    ranks = [_seeded(DistributedSampler(range(n), num_replicas=2, rank=r, shuffle=True, seed=0)) for r in range(2)]
    assert {p for r in ranks for p in zip(*r)} == set(zip(idx, seeds))
    # repeated augmentation: the copies of an image get their own seeds; two ranks again as one process
    rep = _seeded(RepeatAugSampler(n, 1, 0, num_repeats=3, seed=0))
    assert rep[0][0] == rep[0][1] and rep[1][0] != rep[1][1]
    rep2 = [_seeded(RepeatAugSampler(n, 2, r, num_repeats=3, seed=0)) for r in range(2)]
    assert {p for r in rep2 for p in zip(*r)} == set(zip(*rep))
    # multi-scale batches: positions run on across batches; skipping whole batches keeps them
    ms = MultiScaleBatchSampler(DistributedSampler(range(40), num_replicas=1, rank=0, seed=0), base_size=(8, 8),
                                base_batch=4, sizes=[4, 8], seed=0)
    items, ms_seeds = _seeded(ms, batched=True)
    assert ms_seeds == [sample_seed(7, 0, p) for p in range(len(items))]
    first = len(next(iter(ms)))
    assert _seeded(ms, batched=True, skip=1) == (items[first:], ms_seeds[first:])


@pytest.mark.parametrize("explicit", [False, True], ids=["global-generator", "explicit-generator"])
def test_a_samples_augmentation_does_not_depend_on_batching_or_skipping(explicit):
    """The same crops whatever the batch size and after skipping the start of the epoch; the main process's
    generators are not moved by loading (workers=0)."""
    from vitlab.data.loader import seeded_sampler

    data = Textures(24, torch.Generator().manual_seed(0) if explicit else None)

    def images(batch_size: int, skip: int = 0) -> torch.Tensor:
        loader = create_loader(data, batch_size=batch_size, shuffle=True, seed=3)
        seeded_sampler(loader).skip = skip
        return torch.cat([x for x, _ in loader])

    state = torch.get_rng_state()
    a = images(4)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(images(6), a)
    assert torch.equal(images(4, skip=8), a[8:])


# ------------------------------------------------------------------------------------------ training runs


def test_supervised_resume_with_workers_is_exact_and_equals_no_workers(tmp_path):
    """workers=2: stopped after 4 steps and resumed == the uninterrupted run, bit for bit (weights, losses), across an
    epoch boundary, with random crops, flips, RandAugment and erasing; workers=0 gives the same run."""
    data = Textures(48)  # 6 steps per epoch, 12 in all

    def run(out: str, workers: int, **kw):
        return fit(tiny_vit(), small_recipe(batch_size=8, workers=workers), train_set=data,
                   output_dir=tmp_path / out, progress=False, **kw)

    straight = run("a", 2)
    first = run("b", 2, until_step=4)
    torch.manual_seed(1234)  # a fresh process: whatever the generators hold now must not matter
    resumed = run("b", 2, resume=True)
    assert straight.step == resumed.step == 12
    _assert_same_weights(tmp_path / "a" / "model.safetensors", tmp_path / "b" / "model.safetensors")
    assert _losses(straight) == _losses(first, resumed)
    no_workers = run("c", 0)
    _assert_same_weights(tmp_path / "a" / "model.safetensors", tmp_path / "c" / "model.safetensors")
    assert _losses(no_workers) == _losses(straight)


def test_dino_multicrop_resume_with_workers_is_exact_and_equals_no_workers(tmp_path):
    """DINO's multi-crop augmentation, workers=2: resumed == uninterrupted (weights, losses), and workers=0 the same."""
    rec = ssl_recipe(epochs=2)  # 5 steps per epoch

    def run(out: str, workers: int, **kw):
        model, obj, data = dino_setup()
        return fit(model, rec.replace(workers=workers), train_set=data, output_dir=tmp_path / out, objective=obj,
                   progress=False, **kw)

    straight = run("a", 2)
    first = run("b", 2, until_step=3)
    torch.manual_seed(999)
    resumed = run("b", 2, resume=True)
    assert straight.step == resumed.step == 10
    _assert_same_weights(tmp_path / "a" / "model.safetensors", tmp_path / "b" / "model.safetensors")
    assert _losses(straight) == _losses(first, resumed)
    no_workers = run("c", 0)
    _assert_same_weights(tmp_path / "a" / "model.safetensors", tmp_path / "c" / "model.safetensors")
    assert _losses(no_workers) == _losses(straight)


@pytest.mark.slow
def test_two_processes_augment_each_sample_as_one_process_does(tmp_path):
    """torchrun, 2 processes x batch 16 == 1 process x batch 32 with 2 workers, with random crops and flips on (no
    dropout, drop-path or mixup, which each process draws on its own): only float summation order differs."""
    import os
    import subprocess
    import sys

    run = ["-m", "vitlab.cli.main", "train", "--data", "digits", "--steps", "3", "--no-progress", "--device", "cpu",
           "--set", "optimizer=sgd", "--set", "lr=0.05", "--set", "warmup_steps=0", "--set", "warmup_epochs=0",
           "--set", "augment=true", "--set", "hflip=0.5", "--set", "scale=[0.3,1.0]",
           "--set", "model_overrides.drop_path_rate=0", "--set", "model_overrides.depth=1",
           "--set", "model_overrides.embed_dim=32", "--set", "model_overrides.num_heads=2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", VITLAB_DIST_TIMEOUT="60")
    env.pop("WORLD_SIZE", None)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *run,
                          "--batch-size", "16", "--output", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=150, check=False)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, *run, "--batch-size", "32", "--workers", "2", "--output", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=150, check=False)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = _weights(tmp_path / "one" / "model.safetensors"), _weights(tmp_path / "two" / "model.safetensors")
    for k in a:  # drawn per process, the crops would differ by ~4e-3 here
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), k
    assert a["head.weight"].abs().max() > 1e-3


class _Finalised:
    """Records the pid of the process that destroys it (a stand-in for an ONNX Runtime session, whose destructor
    hung in a forked DataLoader worker that collected it)."""

    freed_in: list[int] = []

    def __del__(self) -> None:
        _Finalised.freed_in.append(os.getpid())


def test_garbage_is_collected_before_workers_fork():
    """An unreachable object in a reference cycle is freed in the parent before the workers start, so that no
    forked worker runs its destructor (a full make test hung there once an ONNX session was such garbage)."""
    import gc

    from vitlab.data.loader import create_loader

    ds = torch.utils.data.TensorDataset(torch.zeros(8, 1, 4, 4), torch.zeros(8, dtype=torch.long))
    loader = create_loader(ds, batch_size=4, shuffle=False, num_workers=1, seed=0)
    _Finalised.freed_in.clear()
    was_enabled = gc.isenabled()
    gc.disable()  # only an explicit collection may free the cycle
    try:
        cycle: list = [_Finalised()]
        cycle.append(cycle)
        del cycle
        assert _Finalised.freed_in == []
        next(iter(loader))
        assert _Finalised.freed_in == [os.getpid()]
    finally:
        if was_enabled:
            gc.enable()
