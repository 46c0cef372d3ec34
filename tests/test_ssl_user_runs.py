"""`vitlab pretrain` as users run it: refused resumes leave the run as it was, --opt values are read and checked,
pre-training leaves out fine-tuning's held-out images, tokenizers of other channels and options of other
methods are refused up front, users' files are never replaced, DINO on a BEiT backbone, clear errors, and
MAE checkpoints' loss options and decoder biases."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import vitlab
from vitlab.cli.main import main
from vitlab.cli.pretrain import parse_options
from vitlab.data import build_dataset
from vitlab.ssl import BEiT, DiscreteVAE, DVAETokenizer, save_tokenizer
from vitlab.ssl.dvae import DVAEConfig
from vitlab.ssl.mae import load_mae
from vitlab.ssl.run import PretrainJob, build_objective, dino_local_size, run_pretraining
from vitlab.train.recipe import load_recipe

torch.set_num_threads(1)

FIX = Path(__file__).parent / "fixtures"
MAE_TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0)
# the digits recipe's ViT (8x8 grey, 2x2 patches) made smaller, one step of 8 images
SMALL = ["--recipe", "digits", "--threads", "1", "--no-progress", "--steps", "1", "--batch-size", "8",
         "--set", "global_batch=null", "--set", "model_overrides.depth=1", "--set", "model_overrides.embed_dim=32",
         "--set", "model_overrides.num_heads=2"]
MAE_OPTS = ["--opt", "decoder_dim=16", "--opt", "decoder_depth=1", "--opt", "decoder_heads=1"]
DINO_HEAD = ["--opt", "out_dim=32", "--opt", "hidden_dim=16", "--opt", "bottleneck_dim=8"]
DINO_OPTS = [*DINO_HEAD, "--opt", "num_local=2"]


def write_folder(root: Path, classes=("cat", "dog", "ship"), per_class: int = 10, channels: int = 1) -> Path:
    """A flat labelled folder (class folders, no train/ val/ test/) of 8x8 PNGs."""
    g = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for j in range(per_class):
            shape = (8, 8) if channels == 1 else (8, 8, 3)
            Image.fromarray(g.integers(0, 255, size=shape).astype(np.uint8)).save(root / name / f"{j}.png")
    return root


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def pretrain(*args: str) -> int:
    return main(["pretrain", *args])


# ------------------------------------------------------------------------------ 1. a refused --resume
@pytest.fixture(scope="module")
def unfinished_mae(tmp_path_factory) -> Path:
    """An MAE run on digits stopped at step 1 of 3."""
    out = tmp_path_factory.mktemp("ssl_runs") / "mae"
    r = load_recipe("digits").replace(max_steps=3, batch_size=8, global_batch=None)
    r = r.replace(model_overrides={**r.model_overrides, "depth": 1, "embed_dim": 32, "num_heads": 2})
    run_pretraining(PretrainJob(method="mae", recipe=r, data="digits", output=out, threads=1, progress=False,
                                options={"decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 1}, until_step=1))
    return out


@pytest.mark.parametrize("change,says", [
    (["--method", "dino"], "was pre-trained with --method mae (its train_state.pt); this asks for --method dino"),
    (["--data", "COLOUR"], "is a checkpoint of"),  # 3-channel images: another model than the run's
    (["--opt", "decoder_dim=32"], "does not match the one saved"),
], ids=["method", "data", "opt"])
def test_a_refused_resume_leaves_the_run_byte_for_byte_unchanged(tmp_path, unfinished_mae, change, says, caplog):
    out = tmp_path / "run"
    shutil.copytree(unfinished_mae, out)
    before = files_of(out)
    change = [str(write_folder(tmp_path / "colour", channels=3)) if c == "COLOUR" else c for c in change]
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert pretrain("--output", str(out), "--resume", "--threads", "1", "--no-progress", *change) == 2
    assert says in caplog.text
    assert files_of(out) == before
    # the run still continues with a plain --resume
    assert pretrain("--output", str(out), "--resume", "--threads", "1", "--no-progress") == 0
    assert json.loads((out / "results.json").read_text())["steps"] == 3


def test_resume_of_a_run_whose_job_json_an_earlier_refusal_rewrote_says_what_to_pass(tmp_path, unfinished_mae,
                                                                                       caplog):
    out = tmp_path / "run"
    shutil.copytree(unfinished_mae, out)
    job = json.loads((out / "job.json").read_text())
    (out / "job.json").write_text(json.dumps({**job, "method": "dino"}))  # what a refused --resume used to leave
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert pretrain("--output", str(out), "--resume", "--threads", "1", "--no-progress") == 2
    assert "its job.json names dino, rewritten by an earlier --resume that was refused" in caplog.text
    assert "resume with --method mae" in caplog.text
    assert pretrain("--output", str(out), "--resume", "--method", "mae", "--threads", "1", "--no-progress") == 0
    assert json.loads((out / "job.json").read_text())["method"] == "mae"


# ------------------------------------------------------------------------------ 3. --opt values
def _vit(**kw):
    opts = dict(num_classes=0, img_size=8, patch_size=2, embed_dim=32, depth=1, num_heads=2, in_chans=1)
    return vitlab.create_model("vit_tiny_patch16_224", **{**opts, **kw})


def test_opt_values_are_read_as_json_or_python_and_their_types_checked():
    assert parse_options(["norm_pix_loss=False", "hard=false", "mask_ratio=0.6", "recon='l1'"]) == {
        "norm_pix_loss": False, "hard": False, "mask_ratio": 0.6, "recon": "l1"}
    m = _vit(pos_embed="sincos")
    mae_opts = {"decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 1}
    assert build_objective("mae", m, {**parse_options(["norm_pix_loss=False"]), **mae_opts}).norm_pix_loss is False
    dvae = DiscreteVAE.for_backbone(m, vocab_size=8, hidden_dim=4, num_resblocks=1, embed_dim=4)
    assert build_objective("dvae", dvae, parse_options(["hard=False"])).hard is False
    for item, says in [("norm_pix_loss=no", "--opt norm_pix_loss=no: mae's norm_pix_loss takes a bool (true or "
                                            "false), got the text 'no'"),
                       ("norm_pix_loss=off", "got the text 'off'"),
                       ("mask_ratio=abc", "--opt mask_ratio=abc: mae's mask_ratio takes a number, got the text"),
                       ("decoder_depth=1.5", "decoder_depth takes a whole number, got a number")]:
        with pytest.raises(ValueError, match=says.replace("(", r"\(").replace(")", r"\)")):
            build_objective("mae", m, {**mae_opts, **parse_options([item])})


def test_opt_of_the_wrong_type_is_refused_on_the_command_line(tmp_path, caplog):
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert pretrain("--method", "dvae", "--data", "digits", *SMALL, "--opt", "hard=no",
                        "--output", str(tmp_path / "d")) == 2
        assert pretrain("--method", "dvae", "--data", "digits", *SMALL, "--opt", "recon=l2",
                        "--output", str(tmp_path / "d")) == 2
    assert "--opt hard=no: dvae's hard takes a bool (true or false), got the text 'no'" in caplog.text
    assert "--opt recon=l2: dvae's recon takes one of \"logit_laplace\", \"l1\", \"mse\"" in caplog.text
    assert not (tmp_path / "d").exists()


# ------------------------------------------------------------------------------ 4. fine-tuning's held-out images
def test_pretraining_on_a_flat_labelled_folder_leaves_out_what_finetuning_holds_out(tmp_path, caplog):
    data = write_folder(tmp_path / "flat")
    out = tmp_path / "pre"
    with caplog.at_level(logging.INFO, logger="vitlab"):
        assert pretrain("--method", "mae", "--data", str(data), *SMALL, *MAE_OPTS, "--output", str(out)) == 0
    assert "has no val/ folder: pre-training leaves out 3 of its images, the validation and test split" in caplog.text
    held = json.loads((out / "job.json").read_text())["held_out"]
    assert held == {"split": "validation and test", "val_fraction": 0.1, "seed": 0, "images": 3}
    rec = json.loads((out / "recipe.json").read_text())  # what `vitlab eval` reads to draw the same split
    assert (rec["val_fraction"], rec["seed"]) == (0.1, 0)
    pre = build_dataset(data, split="train", val_fraction=rec["val_fraction"], seed=rec["seed"], unlabelled=True)
    ft = load_recipe("vit_finetune")  # `vitlab finetune`'s default
    test = build_dataset(data, split="test", val_fraction=ft.val_fraction, seed=ft.seed)
    assert len(pre) == 27 and len(test) == 3 and not set(pre.paths) & set(test.paths)
    # resumed, also with --recipe naming a recipe whose val_fraction is 0: the run's own split goes on
    job = (out / "job.json").read_text()
    assert pretrain("--method", "mae", "--data", str(data), *SMALL, *MAE_OPTS, "--steps", "2", "--output", str(out),
                    "--resume") == 0
    resumed = json.loads((out / "job.json").read_text())  # the record as it was, the resume's command added
    assert len(resumed.pop("resumed_with")) == 1 and resumed == json.loads(job)
    assert json.loads((out / "results.json").read_text())["steps"] == 2
    # asked to pre-train on every image: it does, and says which later splits that overlaps
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vitlab"):
        assert pretrain("--method", "mae", "--data", str(data), *SMALL, *MAE_OPTS, "--set", "val_fraction=0",
                        "--output", str(tmp_path / "all")) == 0
    assert "pre-training on every training image of" in caplog.text and "validation and test split" in caplog.text
    assert "val/ and test/ folders of its own" in caplog.text
    assert "held_out" not in json.loads((tmp_path / "all" / "job.json").read_text())


def test_a_folder_with_test_and_no_val_leaves_out_finetunings_validation_part(tmp_path):
    data = tmp_path / "split"
    write_folder(data / "train")
    write_folder(data / "test", per_class=2)
    out = tmp_path / "pre"
    assert pretrain("--method", "mpp", "--data", str(data), *SMALL, "--output", str(out)) == 0
    assert json.loads((out / "job.json").read_text())["held_out"]["split"] == "validation"
    # digits (a fixed test set) is pre-trained on as the recipe says
    assert pretrain("--method", "mpp", "--data", "digits", *SMALL, "--output", str(tmp_path / "digits")) == 0
    assert "held_out" not in json.loads((tmp_path / "digits" / "job.json").read_text())


# ------------------------------------------------------------------------------ 6. a tokenizer of other channels
def test_a_tokenizer_made_for_other_channels_is_refused_up_front(tmp_path, caplog):
    grey = DVAETokenizer(DiscreteVAE(DVAEConfig(img_size=(8, 8), in_chans=1, patch_size=2, vocab_size=8,
                                                embed_dim=4, hidden_dim=4)))
    path = tmp_path / "tok.safetensors"
    save_tokenizer(grey, path)
    with pytest.raises(ValueError, match=r"beit: the dvae tokenizer \(.*tok.safetensors\) was made for 1-channel "
                                         r"\(grayscale\) images, but the backbone \(and the data\) has 3-channel"):
        BEiT(_vit(in_chans=3), tokenizer=str(path))
    assert BEiT(_vit(), tokenizer=str(path)).tokenizer.channels == 1  # the grey backbone takes it
    data = write_folder(tmp_path / "colour", channels=3)
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert pretrain("--method", "beit", "--data", str(data), *SMALL, "--tokenizer", str(path),
                        "--output", str(tmp_path / "beit")) == 2
    assert "was made for 1-channel (grayscale) images" in caplog.text and "Given groups" not in caplog.text
    assert not (tmp_path / "beit").exists()


# ------------------------------------------------------------------------------ 7. users' files
@pytest.mark.parametrize("method,name,opts", [("beit", "tokenizer.safetensors", ["--opt", "tokenizer_iters=1"]),
                                              ("dino", "teacher.safetensors", DINO_OPTS)])
def test_overwrite_into_a_users_folder_never_replaces_its_tokenizer_or_teacher(tmp_path, method, name, opts, caplog):
    from vitlab.ssl.run import TEACHER_FILE
    from vitlab.ssl.tokenizer import TOKENIZER_FILE
    from vitlab.train.run import RUN_OUTPUTS

    assert {TOKENIZER_FILE, TEACHER_FILE} <= set(RUN_OUTPUTS)
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / name).write_text("user data")
    (folder / "notes.txt").write_text("notes")
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert pretrain("--method", method, "--data", "digits", *SMALL, *opts, "--output", str(folder),
                        "--overwrite") == 2
    assert f"is not a vitlab run and holds {name}, which the run would replace" in caplog.text
    assert files_of(folder) == {name: b"user data", "notes.txt": b"notes"}


def test_a_users_job_json_does_not_make_a_folder_a_run(tmp_path, caplog):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "job.json").write_text('{"name": "my cluster job", "gpus": 8}')
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert pretrain("--method", "mpp", "--data", "digits", *SMALL, "--output", str(folder)) == 2
        assert "is not a vitlab run and is not empty (job.json)" in caplog.text
        assert pretrain("--method", "mpp", "--data", "digits", *SMALL, "--output", str(folder), "--overwrite") == 2
    assert files_of(folder) == {"job.json": b'{"name": "my cluster job", "gpus": 8}'}
    # a run's own job.json still marks its folder: a second run there needs --overwrite
    run = tmp_path / "run"
    assert pretrain("--method", "mpp", "--data", "digits", *SMALL, "--output", str(run)) == 0
    (run / "model.safetensors").unlink()
    (run / "train_state.pt").unlink()
    from vitlab.train.run import is_run_dir

    assert is_run_dir(run) and not is_run_dir(folder)


# ------------------------------------------------------------------------------ 8. DINO on a BEiT backbone
BEIT_SMALL = ["--set", 'model_overrides={"depth": 1, "patch_size": 2, "embed_dim": 32, "num_heads": 2}']


def test_dino_pretrains_a_beit_backbone_with_local_crops_at_its_one_size(tmp_path, caplog):
    out = tmp_path / "dino"
    with caplog.at_level(logging.INFO, logger="vitlab"):
        assert pretrain("--method", "dino", "--model", "beit_base_patch16_224", "--data", "digits", *SMALL,
                        *BEIT_SMALL, *DINO_OPTS, "--output", str(out)) == 0
    assert "cannot take dynamic_img_size=True" in caplog.text
    assert "2 global crops and 2 local crops, all of 8 px: beit_base_patch16_224 runs only at its input size" \
        in caplog.text
    assert (out / "teacher.safetensors").is_file()
    beit = vitlab.create_model("beit_base_patch16_224", num_classes=0, img_size=8, in_chans=1, depth=1,
                               patch_size=2, embed_dim=32, num_heads=2)
    assert dino_local_size(beit) == 8
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="vitlab"):  # a size it cannot run at: refused before training
        assert pretrain("--method", "dino", "--model", "beit_base_patch16_224", "--data", "digits", *SMALL,
                        *BEIT_SMALL, *DINO_OPTS, "--opt", "local_size=4", "--output", str(tmp_path / "d4")) == 2
    assert "--opt local_size=4: beit_base_patch16_224 does not run on 4 px crops" in caplog.text
    assert not (tmp_path / "d4").exists()


# ------------------------------------------------------------------------------ 9. options of other methods
@pytest.mark.parametrize("method,opt,owner", [("mae", "num_local=4", "dino"), ("mpp", "local_size=4", "dino"),
                                              ("mpp", "tokenizer_iters=50", "beit"), ("dvae", "num_local=8", "dino"),
                                              ("mpp", "mask_ratio=0.6", "mae")])
def test_options_of_another_method_are_refused_naming_it(tmp_path, method, opt, owner, caplog):
    extra = MAE_OPTS if method == "mae" else []
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert pretrain("--method", method, "--data", "digits", *SMALL, *extra, "--opt", opt,
                        "--output", str(tmp_path / "x")) == 2
    key = opt.split("=")[0]
    assert f"--opt {key}: it is an option of --method {owner}, not of {method}; {method}'s options:" in caplog.text
    assert not (tmp_path / "x").exists()


def test_tokenizer_iters_beside_a_trained_tokenizer_is_refused(tmp_path, caplog):
    tok = tmp_path / "tok.safetensors"
    save_tokenizer(DVAETokenizer(DiscreteVAE(DVAEConfig(img_size=(8, 8), in_chans=1, patch_size=2, vocab_size=8,
                                                        embed_dim=4, hidden_dim=4))), tok)
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert pretrain("--method", "beit", "--data", "digits", *SMALL, "--tokenizer", str(tok), "--opt",
                        "tokenizer_iters=5", "--output", str(tmp_path / "b")) == 2
    assert "--opt tokenizer_iters fits beit's k-means tokenizer, and --tokenizer gives a trained one" in caplog.text


# ------------------------------------------------------------------------------ 10. messages that say what to do
@pytest.mark.parametrize("method,extra", [("dvae", []), ("vqkd", ["--teacher", "TEACHER"])])
def test_tokenizer_methods_on_a_backbone_without_a_patch_grid_say_so(tmp_path, method, extra, caplog):
    extra = [str(tmp_path / "t.safetensors") if e == "TEACHER" else e for e in extra]
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert pretrain("--method", method, "--model", "xcit_nano_12_p8_224", "--data", "digits", "--img-size", "16",
                        "--threads", "1", "--no-progress", "--steps", "1", *extra,
                        "--output", str(tmp_path / method)) == 2
    assert f"--method {method} makes one token per patch of the backbone" in caplog.text
    assert "xcit_nano_12_p8_224 (xcit) has no token-masking hook" in caplog.text
    assert "masked objectives" not in caplog.text and "--opt for" not in caplog.text


@pytest.mark.parametrize("flag,method,says", [
    ("--tokenizer", "mae", "--tokenizer is the visual tokenizer of BEiT's targets, read by --method beit and beit2; "
                           "--method mae takes no tokenizer"),
    ("--teacher", "dino", "--teacher is the model whose features VQ-KD's tokenizer learns, read by --method vqkd; "
                          "--method dino takes no teacher")])
def test_tokenizer_or_teacher_for_a_method_that_reads_none(tmp_path, flag, method, says, caplog):
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert pretrain("--method", method, "--data", "digits", *SMALL, flag, str(tmp_path / "f.safetensors"),
                        "--output", str(tmp_path / "x")) == 2
    assert says in caplog.text and "unexpected keyword argument" not in caplog.text


def test_mae_on_a_distilled_deit_says_why_and_what_to_pass(tmp_path, caplog):
    base = ["--method", "mae", "--model", "deit_tiny_distilled_patch16_224", "--data", "digits", *SMALL,
            "--set", "model_overrides.patch_size=2", *MAE_OPTS]
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert pretrain(*base, "--output", str(tmp_path / "a")) == 2
    assert "--method mae builds its backbone with pos_embed='sincos' (MAE's encoder has fixed 2-D sin-cos position " \
           "embeddings)" in caplog.text
    assert "Build it with --set model_overrides.pos_embed=learn instead" in caplog.text
    assert pretrain(*base, "--set", "model_overrides.pos_embed=learn", "--output", str(tmp_path / "b")) == 0


def test_dino_without_local_crops_runs_on_the_two_global_ones(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="vitlab"):
        assert pretrain("--method", "dino", "--data", "digits", *SMALL, *DINO_HEAD, "--opt", "num_local=0",
                        "--output", str(tmp_path / "d")) == 0
    assert "no local crops (num_local=0: no multi-crop)" in caplog.text and "MultiCropTransform" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert pretrain("--method", "dino", "--data", "digits", *SMALL, *DINO_HEAD, "--opt", "num_local=-1",
                        "--output", str(tmp_path / "e")) == 2
    assert "--opt num_local=-1: the number of local crops is 0 or more" in caplog.text


@pytest.mark.parametrize("method,opts,says", [
    ("mae", [*MAE_OPTS, "--opt", "mask_ratio=0"], "MAE: mask_ratio=0 must remove at least one of the 16 patches"),
    ("beit", ["--set", "model_overrides.patch_size=8"], "beit: blockwise masking needs a patch grid of at least 2x2"),
    ("dino", [*DINO_OPTS, "--opt", "teacher_temp=0"], "DINO: teacher_temp=0 must be positive"),
    ("beit", ["--opt", "ratio=0"], "beit: ratio=0 is the share of patches masked; give a value between 0 and 1"),
    ("mpp", ["--opt", "ratio=0"], "mpp: ratio=0 is the share of patches corrupted"),
], ids=["mae-ratio-0", "beit-1x1-grid", "dino-teacher-temp-0", "beit-ratio-0", "mpp-ratio-0"])
def test_values_that_end_in_nan_or_do_nothing_are_refused_before_training(tmp_path, method, opts, says, caplog):
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert pretrain("--method", method, "--data", "digits", *SMALL, *opts, "--output", str(tmp_path / "x")) == 2
    assert says in caplog.text and "lower" not in caplog.text
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------ 11, 13. MAE checkpoints
def test_official_mae_files_default_to_pixel_targets_unless_their_args_say(tmp_path):
    """The official visualize releases (decoder included, no training arguments) were trained with pixels as
    targets (facebookresearch/mae, demo/mae_visualize.ipynb; models_mae.py's default); a training checkpoint
    records its own --norm_pix_loss / --mask_ratio; an explicit option wins over both."""
    kw = dict(model="vit_tiny_patch16_224", decoder_heads=2, model_overrides=MAE_TINY)
    _, mae = load_mae(FIX / "mae_official_tiny.pth", **kw)
    assert mae.norm_pix_loss is False and mae.mask_ratio == 0.75
    _, mae = load_mae(FIX / "mae_official_tiny.pth", norm_pix_loss=True, **kw)
    assert mae.norm_pix_loss is True
    sd = torch.load(FIX / "mae_official_tiny.pth", weights_only=True)["model"]
    torch.save({"model": sd, "epoch": 3, "args": argparse.Namespace(norm_pix_loss=True, mask_ratio=0.6)},
               tmp_path / "checkpoint-3.pth")
    _, mae = load_mae(tmp_path / "checkpoint-3.pth", **kw)
    assert mae.norm_pix_loss is True and mae.mask_ratio == 0.6
    _, mae = load_mae(FIX / "mae_hf_tiny")  # a Hugging Face config says it itself
    assert mae.norm_pix_loss is True


def test_hf_vitmae_without_qkv_bias_loads_its_decoder(tmp_path):
    """transformers' ViTMAEConfig(qkv_bias=False): no query/key/value biases in the encoder or the decoder. The
    same file with those biases present and zero must give the same outputs."""
    src = FIX / "mae_hf_tiny"
    sd = load_file(str(src / "model.safetensors"))
    qkv_bias = [k for k in sd if k.endswith(("query.bias", "key.bias", "value.bias"))]
    zeroed, nobias = tmp_path / "zeroed", tmp_path / "nobias"
    for folder, tensors in ((zeroed, {k: (torch.zeros_like(v) if k in qkv_bias else v) for k, v in sd.items()}),
                            (nobias, {k: v for k, v in sd.items() if k not in qkv_bias})):
        folder.mkdir()
        save_file(tensors, str(folder / "model.safetensors"))
        config = json.loads((src / "config.json").read_text())
        config["qkv_bias"] = folder is zeroed
        (folder / "config.json").write_text(json.dumps(config))
    enc, mae = load_mae(nobias)
    assert mae.decoder.blocks[0].attn.qkv.bias is None
    ref_enc, ref = load_mae(zeroed)
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    for m in (enc, mae.decoder, ref_enc, ref.decoder):
        m.eval()
    with torch.no_grad():
        a, b = mae.forward(enc, x, noise=noise), ref.forward(ref_enc, x, noise=noise)
    assert torch.allclose(a.pred, b.pred, atol=1e-6) and torch.allclose(a.loss, b.loss, atol=1e-6)


def test_finetuning_from_a_pretraining_run_holds_out_what_it_left_out(tmp_path, caplog):
    data = write_folder(tmp_path / "flat")
    pre = tmp_path / "pre"
    assert pretrain("--method", "mpp", "--data", str(data), *SMALL, "--seed", "3", "--output", str(pre)) == 0
    held = json.loads((pre / "job.json").read_text())["held_out"]
    assert held["seed"] == 3
    tune = ["finetune", "--from", str(pre / "model.safetensors"), "--data", str(data), "--threads", "1",
            "--no-progress", "--steps", "1", "--batch-size", "8", "--set", "global_batch=null", "--img-size", "8"]
    with caplog.at_level(logging.INFO, logger="vitlab"):
        assert main([*tune, "--output", str(tmp_path / "ft")]) == 0  # no --seed: the pre-training run's split
    rec = json.loads((tmp_path / "ft" / "recipe.json").read_text())
    assert (rec["seed"], rec["val_fraction"]) == (3, held["val_fraction"])
    assert "fine-tuning holds out the same images" in caplog.text
    seen = build_dataset(data, split="train", val_fraction=held["val_fraction"], seed=3, unlabelled=True)
    test = build_dataset(data, split="test", val_fraction=rec["val_fraction"], seed=rec["seed"])
    assert not set(seen.paths) & set(test.paths)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vitlab"):  # another seed asked for: kept, and the overlap named
        assert main([*tune, "--seed", "0", "--output", str(tmp_path / "ft0")]) == 0
    assert "include images pre-trained on" in caplog.text


def test_overwrite_of_a_pretraining_run_removes_its_old_outputs(tmp_path, caplog):
    out = tmp_path / "pre"
    assert pretrain("--method", "mpp", "--data", "digits", *SMALL, "--steps", "3", "--output", str(out)) == 0
    (out / "notes.txt").write_text("mine")
    with caplog.at_level(logging.INFO, logger="vitlab"):
        assert pretrain("--method", "mpp", "--data", "digits", *SMALL, "--output", str(out), "--overwrite") == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps and max(steps) == 1  # the new run's records only, not appended to the old run's
    assert (out / "notes.txt").read_text() == "mine" and "--overwrite: removed" in caplog.text
