"""Self-supervised objectives against the official code: DINO centring per optimiser step, the multi-crop
and augmentation settings pretrain applies, MPP's bits, BEiT's masked-patch count."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.utils.data import Dataset

import vitlab
from vitlab.ssl.dino import DINO
from vitlab.train import fit
from vitlab.train.recipe import load_recipe

torch.set_num_threads(1)


def tiny(**kw):
    torch.manual_seed(0)
    opts = dict(num_classes=0, img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0)
    opts.update(kw)
    return vitlab.create_model("vit_tiny_patch16_224", **opts)


# ------------------------------------------------------------------------------- DINO centre, accumulation
class Views(Dataset):
    """8 fixed images, each as 2 global views (16 px) and one local view (8 px): no randomness."""

    def __init__(self) -> None:
        self.x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        x = self.x[i]
        return [x, x.flip(-1), x[:, :8, :8].contiguous()], 0


@pytest.mark.parametrize("batch", [8, 4, 1])
def test_dino_centre_updates_once_per_optimiser_step_from_the_whole_batch(tmp_path, batch):
    model = tiny(dynamic_img_size=True)
    obj = DINO(model, out_dim=32, hidden_dim=16, bottleneck_dim=8)
    start = torch.randn(1, 32, generator=torch.Generator().manual_seed(1))
    obj.loss.center.copy_(start)
    ds = Views()
    with torch.no_grad():  # official DINO: c <- 0.9 c + 0.1 mean(teacher outputs of the whole batch)
        views = [torch.stack([ds[i][0][v] for i in range(8)]) for v in range(2)]
        t = DINO._embed(obj.teacher, obj.teacher_head, views)
    expected = 0.9 * start + 0.1 * t.mean(0, keepdim=True)
    recipe = load_recipe("dino").replace(epochs=1, max_steps=1, batch_size=batch, global_batch=8, warmup_epochs=0,
                                         augment=False, checkpoint_every=0, log_every=1, seed=0)
    fit(model, recipe, train_set=ds, output_dir=tmp_path, objective=obj, progress=False)
    assert torch.allclose(obj.loss.center, expected, atol=1e-6), (obj.loss.center - expected).abs().max()
    assert float(obj.loss.pending_count) == 0


# ------------------------------------------------------------------------------- pretrain's DINO crops
def _pretrain(tmp_path, method, *args):
    from vitlab.cli.main import main

    return main(["pretrain", "--method", method, "--recipe", "digits", "--data", "digits", "--threads", "1",
                 "--no-progress", "--steps", "1", "--batch-size", "4", "--set", "global_batch=null",
                 "--set", "model_overrides.depth=1", "--set", "model_overrides.embed_dim=16",
                 "--set", "model_overrides.num_heads=2", *args, "--output", str(tmp_path / method)])


DINO_HEAD = ["--opt", "out_dim=16", "--opt", "hidden_dim=8", "--opt", "bottleneck_dim=8"]


def _dino_transform(**recipe_changes):
    from vitlab.ssl.run import PretrainJob, _transform

    model = tiny(dynamic_img_size=True)
    job = PretrainJob(method="dino", recipe=load_recipe("dino").replace(**recipe_changes), data="digits",
                      output=".")
    return _transform(job, model)


def test_dino_pretrain_makes_the_papers_8_local_crops_by_default():
    import json
    from importlib.resources import files

    t = _dino_transform()
    assert t.num_local == 8 and len(t(torch.rand(3, 16, 16))) == 2 + 8
    description = json.loads((files("vitlab.train") / "recipes" / "dino.json").read_text())["description"]
    assert "8 x local" in description


def test_dino_pretrain_applies_the_recipes_scale_and_ratio_to_its_crops():
    t = _dino_transform()
    assert t.global_scale == (0.4, 1.0) and t.ratio == pytest.approx((3 / 4, 4 / 3))  # DINO's, by default
    t = _dino_transform(scale=(0.9, 1.0), ratio=(1.0, 1.0))
    assert t.global_scale == (0.9, 1.0) and t.ratio == (1.0, 1.0)
    # a 1:1 ratio over the whole image: every global crop is the image itself (up to flips and jitter)
    t = _dino_transform(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0)
    t.jitter = 0.0
    x = torch.rand(3, 16, 16)
    g = t(x)[0]
    pre = tiny().preprocessing
    assert torch.allclose(g, (x - torch.tensor(pre.mean).view(3, 1, 1)) / torch.tensor(pre.std).view(3, 1, 1),
                          atol=1e-5)


@pytest.mark.parametrize("method,extra", [("mpp", []), ("dino", DINO_HEAD + ["--opt", "num_local=1"])])
def test_pretrain_warns_of_recipe_augmentation_it_does_not_apply(tmp_path, caplog, method, extra):
    sets = ["--set", "randaugment=[2,9]", "--set", "re_prob=0.9", "--set", "mixup_alpha=0.8",
            "--set", "cutmix_alpha=1.0"]  # the digits recipe has label_smoothing 0.1
    with caplog.at_level(logging.WARNING, logger="vitlab"):
        assert _pretrain(tmp_path, method, *extra, *sets) == 0
    warned = [r.getMessage() for r in caplog.records if "not applied by --method" in r.getMessage()]
    assert len(warned) == 1, caplog.text
    for field in ("randaugment=(2, 9)", "re_prob=0.9", "mixup_alpha=0.8", "cutmix_alpha=1.0", "label_smoothing=0.1"):
        assert field in warned[0]
    assert "scale" not in warned[0].split(":")[1]  # applied: not listed


def test_pretrain_says_nothing_when_every_field_is_applied(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="vitlab"):
        assert _pretrain(tmp_path, "mpp", "--set", "label_smoothing=0", "--set", "scale=[0.5,1.0]") == 0
    assert "not applied" not in caplog.text


# ------------------------------------------------------------------------------------------- MPP bits
@pytest.mark.parametrize("bits", [0, -1, 9])
def test_mpp_refuses_bits_outside_1_to_8(bits):
    from vitlab.ssl import MaskedPatchPrediction

    with pytest.raises(ValueError, match=rf"mpp: bits={bits} is the number of bits per channel"):
        MaskedPatchPrediction(tiny(), bits=bits)


def test_pretrain_names_opt_bits(tmp_path, caplog):
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert _pretrain(tmp_path, "mpp", "--opt", "bits=0") == 2
    assert "--opt bits=0" in caplog.text
    assert not (tmp_path / "mpp").exists()


# ------------------------------------------------------------------------------------- BEiT masked count
def test_beit_masks_unilms_75_of_196_patches_by_default():
    from vitlab.ssl.beit import BEiT, BlockMasker, num_masked

    assert num_masked(196) == 75  # unilm run_beit_pretraining.py: --num_mask_patches 75 at 224 / 16
    assert num_masked(16) == 6 and num_masked(196, 0.4) == 78  # scaled to other grids; an explicit ratio
    torch.manual_seed(0)
    m = BlockMasker(torch.zeros(4))
    m(torch.zeros(64, 196, 4), (14, 14))
    counts = m.mask.sum(1)
    assert counts.max() <= 75 and counts.float().mean() > 65  # blocks stop at the target, as unilm's do
    beit = BEiT(tiny(img_size=56, patch_size=4), vocab_size=8)  # 14 x 14 grid: the objective's own default
    masker = beit.masker()
    masker(torch.zeros(64, 196, 16), (14, 14))
    assert masker.mask.sum(1).max() <= 75 and "75/196" in beit.describe()
