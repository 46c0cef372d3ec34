"""Pre-training through the engine: exact resume of MAE, MPP and DINO runs, and the pretrain -> finetune path."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import Dataset

import vitlab
from vitlab.checkpoints import read_vitlab
from vitlab.cli.main import main
from vitlab.data.multicrop import MultiCropTransform
from vitlab.ssl import DINO, MAE, BEiT, MaskedPatchPrediction
from vitlab.train import Recipe, fit
from vitlab.train.state import load_train_state

torch.set_num_threads(1)


class Blobs(Dataset):
    """Unlabelled 16x16 RGB images; an optional transform (multi-crop) draws from the global generator."""

    def __init__(self, n: int, transform=None) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, 3, 16, 16, generator=g)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        x = self.x[i]
        return (self.transform(x) if self.transform else x * 2 - 1), 0


def backbone(**kw):
    torch.manual_seed(0)
    opts = dict(num_classes=0, img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                drop_path_rate=0.1)
    opts.update(kw)
    return vitlab.create_model("vit_tiny_patch16_224", **opts)


def recipe(**kw) -> Recipe:
    base = {"name": "ssl-test", "epochs": 3, "batch_size": 8, "lr": 1e-3, "weight_decay": 0.05, "warmup_steps": 2,
            "log_every": 1, "augment": False, "val_fraction": 0.0, "betas": (0.9, 0.95)}
    base.update(kw)
    return Recipe(**base)


def mae_setup():
    m = backbone(pos_embed="sincos")
    return m, MAE(m, decoder_dim=16, decoder_depth=1, decoder_heads=2), Blobs(40)


def mpp_setup():
    m = backbone()
    return m, MaskedPatchPrediction(m), Blobs(40)


def dino_setup():
    m = backbone(dynamic_img_size=True)
    pre = m.preprocessing
    data = Blobs(40, MultiCropTransform(pre, local_size=8, num_local=2))
    return m, DINO(m, out_dim=32, hidden_dim=24, bottleneck_dim=8), data


def beit_setup():
    m = backbone()
    data = Blobs(40)
    obj = BEiT(m, vocab_size=16).fit_tokenizer(torch.stack([data[i][0] for i in range(20)]), iters=5)
    return m, obj, data


@pytest.mark.parametrize("setup", [mae_setup, mpp_setup, dino_setup, beit_setup], ids=["mae", "mpp", "dino", "beit"])
def test_resume_of_a_pretraining_run_is_exact(tmp_path, setup):
    """N steps, then resume for the rest == the whole run at once: weights, owned modules (decoder, heads,
    EMA teacher, DINO centre) and the masks drawn in between."""
    rec = recipe(clip_grad=1.0 if setup is not dino_setup else None)  # 5 steps per epoch, 15 in all
    model, obj, data = setup()
    straight = fit(model, rec, train_set=data, output_dir=tmp_path / "a", objective=obj, progress=False)
    assert straight.total_steps == 15
    model, obj, data = setup()
    fit(model, rec, train_set=data, output_dir=tmp_path / "b", objective=obj, progress=False, until_step=7)
    torch.manual_seed(999)
    model, obj, data = setup()
    resumed = fit(model, rec, train_set=data, output_dir=tmp_path / "b", objective=obj, progress=False, resume=True)
    assert resumed.step == 15
    a, _ = read_vitlab(tmp_path / "a" / "model.safetensors")
    b, meta = read_vitlab(tmp_path / "b" / "model.safetensors")
    assert meta["class_names"] is None or meta["class_names"] == []
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    sa = load_train_state(tmp_path / "a" / "train_state.pt")["objective"]
    sb = load_train_state(tmp_path / "b" / "train_state.pt")["objective"]
    assert set(sa) == set(obj.modules())
    for name in sa:
        for k in sa[name]:
            assert torch.allclose(sa[name][k], sb[name][k], atol=1e-6, rtol=0), (name, k)
    assert straight.history[-1]["loss"] == pytest.approx(resumed.history[-1]["loss"], abs=1e-6)
    assert {"mae": "recon", "mpp": "masked_acc", "dino": "t_entropy", "beit": "mlm_acc"}[obj.name] in \
        straight.history[-1]


def test_resume_with_another_objective_is_refused(tmp_path):
    model, obj, data = mae_setup()
    fit(model, recipe(max_steps=2), train_set=data, output_dir=tmp_path, objective=obj, progress=False)
    model, obj, data = mpp_setup()
    model = backbone(pos_embed="sincos")
    with pytest.raises(ValueError, match="'mae' objective"):
        fit(model, recipe(max_steps=4), train_set=data, output_dir=tmp_path, objective=MaskedPatchPrediction(model),
            progress=False, resume=True)


SMALL = ["--set", "model_overrides.depth=1", "--set", "model_overrides.embed_dim=32", "--set",
         "model_overrides.num_heads=2"]  # the digits recipe's model made smaller, in both runs
FAST = ["--data", "digits", "--recipe", "digits", "--steps", "3", "--no-progress", "--set", "log_every=1", *SMALL]


@pytest.mark.parametrize("method,opts", [("mae", ["--opt", "decoder_dim=16", "--opt", "decoder_depth=1"]),
                                         ("mpp", []), ("dino", ["--opt", "out_dim=64", "--opt", "num_local=2"]),
                                         ("beit", ["--opt", "vocab_size=32", "--opt", "tokenizer_iters=3"])])
def test_pretrain_then_finetune_without_key_surgery(tmp_path, method, opts, caplog):
    out = tmp_path / method
    assert main(["pretrain", "--method", method, *FAST, *opts, "--output", str(out)]) == 0
    sd, meta = read_vitlab(out / "model.safetensors")
    assert meta["config"]["num_classes"] == 0 and not any(k.startswith("head.") for k in sd)
    if method == "dino":
        assert (out / "teacher.safetensors").is_file()
    ft = tmp_path / f"ft-{method}"
    assert main(["finetune", "--from", str(out / "model.safetensors"), "--data", "digits", "--recipe", "digits",
                 "--steps", "2", "--no-progress", *SMALL, "--output", str(ft)]) == 0
    tuned, _ = read_vitlab(ft / "model.safetensors")
    assert tuned["head.weight"].shape[0] == 10
    # the encoder came from the pre-training run (moved only by two fine-tuning steps)
    key = "blocks.0.attn.qkv.weight"
    assert (tuned[key] - sd[key]).abs().max() < 0.05
    assert main(["fewshot", "--checkpoint", str(out / "model.safetensors"), "--data", "digits", "--shots", "2",
                 "--seeds", "1"]) == 0
    # eval of a backbone without classifier: DINO's weighted k-NN from the training split
    assert main(["eval", "--checkpoint", str(out / "model.safetensors"), "--data", "digits", "--output",
                 str(tmp_path / f"eval-{method}")]) == 0
    metrics = json.loads((tmp_path / f"eval-{method}" / "metrics.json").read_text())
    assert metrics["protocol"] == "knn" and metrics["k"] == 20 and 0 <= metrics["top1"] <= 1



def test_mae_finetune_recipe_pools_the_patch_tokens_with_a_new_fc_norm(tmp_path, caplog):
    """MAE's fine-tuning (main_finetune.py): average pooling, the pre-training's final norm dropped and fc_norm
    started afresh, layer decay 0.65; the encoder's weights arrive unchanged (lr ~0 for one step)."""
    out = tmp_path / "mae"
    assert main(["pretrain", "--method", "mae", *FAST, "--opt", "decoder_dim=16", "--opt", "decoder_depth=1",
                 "--output", str(out)]) == 0
    sd, _ = read_vitlab(out / "model.safetensors")
    assert "norm.weight" in sd and "fc_norm.weight" not in sd  # class-token pooling in pre-training
    ft = tmp_path / "ft"
    caplog.set_level("INFO")
    assert main(["finetune", "--from", str(out / "model.safetensors"), "--recipe", "mae_finetune", "--data", "digits",
                 "--steps", "1", "--batch-size", "8", "--set", "global_batch=8", "--set", "lr=1e-12",
                 "--set", "warmup_epochs=0", "--no-progress", "--output", str(ft)]) == 0
    tuned, meta = read_vitlab(ft / "model.safetensors")
    assert meta["config"]["global_pool"] == "avg" and meta["config"]["drop_path_rate"] == 0.1
    assert "norm.weight" not in tuned
    assert torch.equal(tuned["fc_norm.weight"], torch.ones_like(sd["norm.weight"]))
    assert torch.equal(tuned["fc_norm.bias"], torch.zeros_like(sd["norm.bias"]))
    key = "blocks.0.attn.qkv.weight"
    assert (tuned[key] - sd[key]).abs().max() < 1e-6
    assert "its final norm is dropped and the model's new fc_norm kept" in caplog.text
    assert json.loads((ft / "recipe.json").read_text())["layer_decay"] == 0.65


def test_a_change_of_pooling_back_to_the_class_token_starts_a_new_final_norm():
    from vitlab.checkpoints import adapt_state_dict, load_strict

    avg = backbone(global_pool="avg", num_classes=10)
    token = backbone(num_classes=10)
    sd = adapt_state_dict(dict(avg.state_dict()), token, source="avg.safetensors")
    load_strict(token, sd, source="avg.safetensors")
    assert torch.equal(token.norm.weight, torch.ones(32)) and torch.equal(token.blocks[0].mlp.fc1.weight,
                                                                          avg.blocks[0].mlp.fc1.weight)
    # a mismatch that is not the pooling's stays an error that lists it
    other = {k: v for k, v in avg.state_dict().items() if k != "fc_norm.bias"}
    with pytest.raises(Exception, match="missing keys: norm.bias"):
        load_strict(token, adapt_state_dict(other, token, source="x"), source="x")

@pytest.mark.parametrize("model,local", [("cct_2_3x2_32", 16), ("xcit_nano_12_p16_224", 16), ("mobilevit_xxs", 16)])
def test_dino_over_backbones_without_a_patch_grid(tmp_path, model, local):
    """DINO needs no token masking: a convolutional tokenizer (CCT), XCiT and MobileViT pre-train, their local
    crops at the nearest size they run at, and the dino recipe's ViT options are not forced onto them."""
    from vitlab.ssl.run import dino_local_size

    m = vitlab.create_model(model, num_classes=0, img_size=32, **({"dynamic_img_size": True} if "cct" in model else {}))
    assert dino_local_size(m) == local
    out = tmp_path / model
    assert main(["pretrain", "--method", "dino", "--model", model, "--data", "digits", "--img-size", "32", "--steps",
                 "1", "--no-progress", "--set", "batch_size=4", "--set", "global_batch=4", "--opt", "out_dim=32",
                 "--opt", "num_local=2", "--output", str(out)]) == 0
    assert (out / "teacher.safetensors").is_file()


def test_dino_local_size_that_no_backbone_size_fits_is_an_error(monkeypatch):
    from vitlab.ssl import run as ssl_run

    m = vitlab.create_model("mobilevit_xxs", num_classes=0, img_size=32)
    monkeypatch.setattr(ssl_run, "_runs_at", lambda *a: False)
    with pytest.raises(ValueError, match=r"does not run on local crops of 16, 32 px; give --opt local_size"):
        ssl_run.dino_local_size(m)


@pytest.mark.parametrize("method", ["mae", "mpp", "beit"])
def test_masked_objectives_refuse_a_backbone_without_the_masking_hook(tmp_path, method, caplog):
    assert main(["pretrain", "--method", method, "--model", "cct_2_3x2_32", "--data", "digits", "--steps", "1",
                 "--no-progress", "--output", str(tmp_path / method)]) != 0
    assert f"--method {method} masks patch tokens, and cct_2_3x2_32 (cct) has no token-masking hook" in caplog.text
    assert not (tmp_path / method / "model.safetensors").exists()


def test_pretrain_reads_a_flat_folder_of_unlabelled_images(tmp_path, caplog):
    """`--data ./unlabelled` as the README writes it: images with no class folders (pre-training only)."""
    import logging

    import numpy as np
    from PIL import Image

    folder = tmp_path / "unlabelled"
    (folder / "more").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(12):
        where = folder / "more" if i % 3 == 0 else folder
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(where / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    data = ["--data", str(folder), "--recipe", "digits", "--steps", "2", "--no-progress", "--img-size", "16", *SMALL]
    out = tmp_path / "mae"
    assert main(["pretrain", "--method", "mae", *data, "--opt", "decoder_dim=16", "--opt", "decoder_depth=1",
                 "--set", "global_batch=none", "--batch-size", "4", "--output", str(out)]) == 0
    assert (out / "model.safetensors").is_file()
    from vitlab.data import build_dataset

    train = build_dataset(folder, split="train", val_fraction=0.25, unlabelled=True)
    val = build_dataset(folder, split="val", val_fraction=0.25, unlabelled=True)
    assert len(train) + len(val) == 12 and not set(train.paths) & set(val.paths) and train.in_chans == 3
    with caplog.at_level(logging.WARNING, logger="vitlab"):  # labelled, "more" is a class: the rest is unused
        build_dataset(folder)
    assert "8 image(s) directly in the folder, not in a class folder, are not used" in caplog.text
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in folder.glob("*.png"):
        p.rename(flat / p.name)
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="vitlab"):  # labels are needed to train a classifier
        assert main(["train", "--data", str(flat), "--img-size", "16", "--steps", "1", "--no-progress",
                     "--output", str(tmp_path / "cls")]) == 2
    assert "holds images but no class folders" in caplog.text and "vitlab pretrain reads" in caplog.text
