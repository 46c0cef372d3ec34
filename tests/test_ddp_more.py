"""DDP (2 processes, gloo on the CPU) against one process with the same global batch: steps per epoch with any
training-set size, logged metrics, BatchNorm, resuming on another process count; eval and fewshot refuse
torchrun."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from vitlab.checkpoints import CheckpointError
from vitlab.cli.main import main
from vitlab.train import fit
from vitlab.train.distributed import DistContext
from vitlab.train.recipe import Recipe
from vitlab.train.trainer import _sync_batch_norm

SCRIPT = textwrap.dedent("""
    import json, logging, shutil, sys
    from pathlib import Path
    import torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[1])
    from model_helpers import make_tiny
    from vitlab.checkpoints import CheckpointError, read_vitlab
    from vitlab.train import fit
    from vitlab.train.distributed import DistContext
    from vitlab.train.objective import ClassificationObjective
    from vitlab.train.recipe import Recipe

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, out = dist.get_rank(), Path(sys.argv[2])
    two, one = DistContext(rank=rank, world_size=2), DistContext()
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("vitlab").addHandler(handler)
    logging.getLogger("vitlab").setLevel(logging.INFO)
    report = {}

    def data(n, seed=1):
        g = torch.Generator().manual_seed(seed)
        return torch.utils.data.TensorDataset(torch.randn(n, 3, 16, 16, generator=g),
                                              torch.randint(0, 3, (n,), generator=g))

    def model(name="vit_tiny_patch16_224"):
        torch.manual_seed(0)
        return make_tiny(name, num_classes=3, **({"img_size": 16} if name.startswith("vit_") else {}))

    base = Recipe(optimizer="sgd", lr=0.05, batch_size=2, epochs=1, workers=0, augment=False, log_every=1,
                  warmup_steps=0, warmup_epochs=0)

    def weights(run):
        return read_vitlab(out / run / "model.safetensors")[0]

    def max_diff(a, b):
        return max((a[k] - b[k]).abs().max().item() for k in a)

    # 1. steps per epoch: (N, batch per process, accum, repeat_aug); fit stops before its first step
    steps = {}
    for n, b, accum, ra in [(15, 4, 1, 1), (63, 16, 1, 1), (17, 2, 2, 1), (15, 4, 1, 3), (16, 4, 1, 1)]:
        r = base.replace(batch_size=b, accum_steps=accum, repeat_aug=ra)
        key = f"{n}/{b}/{accum}/{ra}"
        ddp = fit(model(), r, train_set=data(n), output_dir=out / f"s{key.replace('/', '_')}", ctx=two,
                  progress=False, until_step=0).total_steps
        if rank == 0:
            single = fit(model(), r.replace(batch_size=2 * b), train_set=data(n),
                         output_dir=out / f"s1{key.replace('/', '_')}", ctx=one, progress=False,
                         until_step=0).total_steps
            steps[key] = [ddp, single]
        dist.barrier()
    report["steps"] = steps

    # ... and the same weights over 2 epochs of 15 samples (3 steps of 4 each, 3 samples left out per epoch)
    fit(model(), base.replace(epochs=2), train_set=data(15), output_dir=out / "odd2", ctx=two, progress=False)
    if rank == 0:
        fit(model(), base.replace(epochs=2, batch_size=4), train_set=data(15), output_dir=out / "odd1", ctx=one,
            progress=False)
        report["odd"] = {"diff": max_diff(weights("odd1"), weights("odd2")),
                         "steps": [read_vitlab(out / r / "model.safetensors")[1]["extra"]["step"]
                                   for r in ("odd1", "odd2")]}
    dist.barrier()

    # 2. logged metrics: the global batch's, as one process logs them
    class WithMetrics(ClassificationObjective):
        def step(self, model, batch):
            x, y = batch
            out = model(x)
            loss = self.criterion(x, out, y)
            return loss, {"x_mean": x.mean().detach(), "acc": (out.argmax(-1) == y).float().mean().detach()}

    r = base.replace(max_steps=2, batch_size=4)
    h2 = fit(model(), r, train_set=data(16), output_dir=out / "m2", ctx=two, progress=False,
             objective=WithMetrics()).history
    if rank == 0:
        h1 = fit(model(), r.replace(batch_size=8), train_set=data(16), output_dir=out / "m1", ctx=one,
                 progress=False, objective=WithMetrics()).history
        report["metrics"] = [[{k: h[k] for k in ("loss", "x_mean", "acc")} for h in hs] for hs in (h1, h2)]
    dist.barrier()

    # 3. BatchNorm on the CPU: one warning (rank 0's)
    records.clear()
    fit(model("mobilevit_xxs"), base.replace(batch_size=2), train_set=data(8), output_dir=out / "bn", ctx=two,
        progress=False, until_step=0)
    report.setdefault("bn_warnings", {})[rank] = [x.getMessage() for x in records if x.levelno >= logging.WARNING
                                                   and "BatchNorm" in x.getMessage()]

    # 4. resume on one process: another global batch refused, the same one continues the run exactly
    # (global batch 8: 4 steps per epoch, a warm-up of one epoch, cut in the warm-up)
    r = base.replace(max_steps=6, batch_size=4, warmup_epochs=1)
    fit(model(), r, train_set=data(32), output_dir=out / "full", ctx=two, progress=False)
    fit(model(), r, train_set=data(32), output_dir=out / "cut", ctx=two, progress=False, until_step=2)
    if rank == 0:
        try:
            fit(model(), r, train_set=data(32), output_dir=out / "cut", ctx=one, progress=False, resume=True)
            report["refused"] = None
        except CheckpointError as e:
            report["refused"] = str(e)
        records.clear()
        res = fit(model(), r.replace(batch_size=8), train_set=data(32), output_dir=out / "cut", ctx=one,
                  progress=False, resume=True)
        report["resumed"] = {"step": res.step, "diff": max_diff(weights("full"), weights("cut")),
                             "warnings": [x.getMessage() for x in records if x.levelno >= logging.WARNING]}
    dist.barrier()
    gathered = [None, None]
    dist.all_gather_object(gathered, report["bn_warnings"])
    if rank == 0:
        report["bn_warnings"] = {str(k): v for g in gathered for k, v in g.items()}
        (out / "report.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()
""")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ddp_more")
    script = out / "script.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(Path(__file__).parent), str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads((out / "report.json").read_text())


def test_ddp_steps_per_epoch_are_one_processes_for_any_data_size(report):
    # N, batch per process, accum, repeat_aug: DDP's steps == one process's floor(N / (2 * b * accum))
    for key, (ddp, single) in report["steps"].items():
        n, b, accum, _ = map(int, key.split("/"))
        assert ddp == single == n // (2 * b * accum), key


def test_ddp_trains_on_the_samples_one_process_does_with_an_odd_data_size(report):
    assert report["odd"]["steps"] == [6, 6]
    assert report["odd"]["diff"] < 1e-5


def test_logged_metrics_are_the_global_batchs(report):
    one, two = report["metrics"]
    assert len(one) == len(two) == 2
    for a, b in zip(one, two, strict=True):
        for k in a:
            assert a[k] == pytest.approx(b[k], abs=2e-6), k


def test_batch_norm_per_process_statistics_are_warned_once_on_the_cpu(report):
    warned = report["bn_warnings"]
    assert len(warned["0"]) == 1 and warned["1"] == []
    assert "own part of the batch" in warned["0"][0] and "SyncBatchNorm" in warned["0"][0]


def test_resume_with_another_global_batch_is_refused_and_the_same_one_continues(report):
    refused = report["refused"]
    assert refused is not None
    assert "global batch 8" in refused and "this run's is 4" in refused and "--batch-size 8" in refused
    resumed = report["resumed"]
    assert resumed["step"] == 6
    assert resumed["diff"] < 1e-5  # one process with batch 8 continues the 2 x 4 run exactly
    assert not any("changed recipe" in w for w in resumed["warnings"])


def test_batch_norm_is_synchronised_under_ddp_on_gpus_and_put_back():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm1d(4)))
    originals = [net[1], net[2][0]]
    undo = _sync_batch_norm(net, DistContext(rank=0, world_size=2, device=torch.device("cuda", 0)))
    assert isinstance(net[1], nn.SyncBatchNorm) and isinstance(net[2][0], nn.SyncBatchNorm)
    assert net[1].weight is originals[0].weight and net[1].running_mean is originals[0].running_mean
    undo()
    assert net[1] is originals[0] and net[2][0] is originals[1]
    # one process, or the CPU: left as they are
    for ctx in (DistContext(device=torch.device("cuda", 0)), DistContext(rank=0, world_size=2)):
        _sync_batch_norm(net, ctx)
        assert net[1] is originals[0]


def test_resume_with_another_batch_in_one_process_names_how_to_keep_it(tmp_path):
    import vitlab

    def net():
        torch.manual_seed(0)
        return vitlab.create_model("vit_tiny_patch16_224", num_classes=2, img_size=8, patch_size=4, embed_dim=16,
                                   depth=1, num_heads=2)

    data = torch.utils.data.TensorDataset(torch.randn(16, 3, 8, 8), torch.randint(0, 2, (16,)))
    r = Recipe(optimizer="sgd", lr=0.01, batch_size=8, max_steps=2, workers=0, augment=False, warmup_steps=0,
               warmup_epochs=0)
    fit(net(), r, train_set=data, output_dir=tmp_path, progress=False, until_step=1)
    with pytest.raises(CheckpointError, match=r"global batch 8 .*this run's is 4 .*--batch-size 8 or "
                                              r"--set accum_steps=2"):
        fit(net(), r.replace(batch_size=4), train_set=data, output_dir=tmp_path, progress=False, resume=True)
    res = fit(net(), r.replace(batch_size=4, accum_steps=2), train_set=data, output_dir=tmp_path, progress=False,
              resume=True)
    assert res.step == 2


@pytest.mark.parametrize("command", ["eval", "fewshot"])
def test_eval_and_fewshot_refuse_torchrun(command, monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main([command, "--checkpoint", str(tmp_path / "model.safetensors"), "--data", "digits",
                     "--device", "cpu"]) == 2
    assert f"`vitlab {command}` runs in one process: run it without torchrun" in caplog.text
