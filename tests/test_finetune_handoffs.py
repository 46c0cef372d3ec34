"""`vitlab finetune` chained after `vitlab pretrain`: which network of a run folder it takes, whose architecture wins,
how it finds the file's size, and --set accum_steps against a recipe's global batch."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import vitlab
from vitlab.cli.finetune import _checkpoint_size
from vitlab.cli.main import main
from vitlab.ssl.run import PretrainJob, run_pretraining
from vitlab.train.recipe import apply_overrides, load_recipe

torch.set_num_threads(1)

# the digits recipe's ViT (8x8 grey, 2x2 patches) made smaller, one step of 8 images
TINY = {"depth": 2, "embed_dim": 32, "num_heads": 2}
FAST = ["--threads", "1", "--no-progress", "--steps", "1", "--batch-size", "8", "--set", "global_batch=null"]


def _pretrain(out: Path, method: str, options: dict) -> Path:
    r = load_recipe("digits").replace(max_steps=1, batch_size=8, global_batch=None)
    r = r.replace(model_overrides={**r.model_overrides, **TINY})
    run_pretraining(PretrainJob(method=method, recipe=r, data="digits", output=out, threads=1, progress=False,
                                options=options))
    return out


@pytest.fixture(scope="module")
def dino_run(tmp_path_factory) -> Path:
    """A DINO run whose teacher differs plainly from its student (a one-step EMA teacher is nearly the student)."""
    out = _pretrain(tmp_path_factory.mktemp("handoff") / "dino", "dino",
                    {"out_dim": 32, "hidden_dim": 16, "bottleneck_dim": 8, "num_local": 2})
    teacher = vitlab.load_model(out / "teacher.safetensors")
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p))
    vitlab.save_model(teacher, out / "teacher.safetensors")
    return out


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory) -> Path:
    """An MAE backbone of depth 2, width 32, 2 heads (the digits recipe's ViT is depth 4, width 64, 4 heads)."""
    return _pretrain(tmp_path_factory.mktemp("handoff") / "mae", "mae",
                     {"decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 1})


def _distance(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sb = b.state_dict()
    return sum(float((v - sb[k]).abs().sum()) for k, v in a.state_dict().items() if k.startswith("blocks."))


# ------------------------------------------------------------------------------ 1. DINO's teacher
def test_a_dino_run_folder_finetunes_its_teacher(tmp_path, dino_run, caplog):
    out = tmp_path / "ft"
    with caplog.at_level(logging.INFO, logger="vitlab"):
        assert main(["finetune", "--from", str(dino_run), "--data", "digits", "--img-size", "8", *FAST,
                     "--set", "lr=1e-9", "--output", str(out)]) == 0
    assert f"fine-tuning {dino_run}: DINO's teacher" in caplog.text
    assert f"give {dino_run / 'model.safetensors'} for the student" in caplog.text
    assert json.loads((out / "job.json").read_text())["pretrained"] == str(dino_run / "teacher.safetensors")
    tuned = vitlab.load_model(out / "model.safetensors")
    teacher, student = (vitlab.load_model(dino_run / f) for f in ("teacher.safetensors", "model.safetensors"))
    assert _distance(tuned, teacher) < 1e-3 < _distance(tuned, student)


def test_a_dino_student_named_as_a_file_is_used_as_given(tmp_path, dino_run, caplog):
    out = tmp_path / "ft"
    with caplog.at_level(logging.INFO, logger="vitlab"):
        assert main(["finetune", "--from", str(dino_run / "model.safetensors"), "--data", "digits", "--img-size", "8",
                     *FAST, "--set", "lr=1e-9", "--output", str(out)]) == 0
    assert "DINO's teacher" not in caplog.text
    tuned = vitlab.load_model(out / "model.safetensors")
    assert _distance(tuned, vitlab.load_model(dino_run / "model.safetensors")) < 1e-3


# ------------------------------------------------------------------------------ 2. the checkpoint's architecture
def test_eval_of_a_dino_run_folder_probes_its_teacher(tmp_path, dino_run, capsys, caplog):
    """k-NN of the folder = k-NN of teacher.safetensors (the student's features give other numbers here)."""
    def knn(checkpoint: Path, out: str) -> dict:
        assert main(["eval", "--checkpoint", str(checkpoint), "--data", "digits", "--protocol", "knn", "--threads",
                     "1", "--json", "--output", str(tmp_path / out)]) == 0
        report = json.loads(capsys.readouterr().out)
        return {k: report[k] for k in ("top1", "samples") if k in report} or report

    with caplog.at_level(logging.INFO, logger="vitlab"):
        folder = knn(dino_run, "folder")
    assert f"DINO's teacher {dino_run / 'teacher.safetensors'}" in caplog.text
    assert folder == knn(dino_run / "teacher.safetensors", "teacher")


def test_eval_of_a_run_folder_finds_its_run_record(tmp_path):
    """`vitlab eval --checkpoint RUN` looked for job.json beside the folder ("--data is required") and would have
    written its report beside it, outside the run."""
    run = tmp_path / "run"
    assert main(["train", "--data", "digits", "--img-size", "8", "--set", "model_overrides.depth=1", "--output",
                 str(run), *FAST]) == 0
    assert main(["eval", "--checkpoint", str(run), "--threads", "1"]) == 0
    assert (run / "eval_test" / "metrics.json").is_file() and not (tmp_path / "eval_test").exists()


def test_the_checkpoints_architecture_wins_over_the_recipes_model_overrides(tmp_path, mae_run, caplog):
    out = tmp_path / "ft"
    with caplog.at_level(logging.INFO, logger="vitlab"):
        assert main(["finetune", "--from", str(mae_run / "model.safetensors"), "--recipe", "digits", "--data",
                     "digits", *FAST, "--output", str(out)]) == 0
    assert "model_overrides embed_dim=64, depth=4, num_heads=4 set aside" in caplog.text
    assert "records embed_dim=32, depth=2, num_heads=2" in caplog.text
    cfg = vitlab.load_model(out / "model.safetensors").cfg
    assert (cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.patch_size) == (2, 32, 2, 2)
    assert cfg.drop_path_rate == 0.1  # a fine-tuning setting: the recipe's
    assert cfg.pos_embed == "sincos"  # the checkpoint's, which the digits recipe does not set


def test_a_users_model_override_against_the_checkpoint_is_an_error_naming_both(tmp_path, mae_run, caplog):
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(["finetune", "--from", str(mae_run / "model.safetensors"), "--recipe", "digits", "--data",
                     "digits", *FAST, "--set", "model_overrides.depth=4", "--output", str(tmp_path / "ft")]) == 2
    assert "depth=4 (the checkpoint: 2)" in caplog.text
    assert not (tmp_path / "ft" / "model.safetensors").exists()


# ------------------------------------------------------------------------------ 3. the size probe
def test_size_of_weights_alone_comes_from_their_position_table_without_a_resample(tmp_path, caplog):
    model = vitlab.create_model("vit_tiny_patch16_224", num_classes=3, img_size=16, patch_size=4, depth=1,
                                embed_dim=16, num_heads=2)
    path = tmp_path / "vit_timm.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))  # timm's keys, no metadata
    with caplog.at_level(logging.INFO, logger="vitlab"):
        size = _checkpoint_size(str(path), "vit_tiny_patch16_224",
                                {"patch_size": 4, "depth": 1, "embed_dim": 16, "num_heads": 2})
    assert size == 16
    assert "its 4x4 position table x patch 4" in caplog.text
    assert "resampl" not in caplog.text.lower() and "loaded" not in caplog.text


def test_size_of_a_vitlab_checkpoint_is_read_from_its_metadata_alone(tmp_path, mae_run, monkeypatch, caplog):
    import vitlab.checkpoints

    def no_tensors(*args, **kwargs):
        raise AssertionError("the size probe read the checkpoint's tensors")

    monkeypatch.setattr(vitlab.checkpoints, "read_source", no_tensors)
    with caplog.at_level(logging.INFO, logger="vitlab"):
        assert _checkpoint_size(str(mae_run / "model.safetensors"), "vit_tiny_patch16_224") == 8
    assert "fine-tuning at the checkpoint's resolution, 8 px" in caplog.text


# ------------------------------------------------------------------------------ 4. --set accum_steps
def test_set_accum_steps_wins_over_the_recipes_global_batch(caplog):
    recipe = load_recipe("vit_finetune")
    assert recipe.global_batch == 512 and recipe.batch_size == 32
    with caplog.at_level(logging.INFO, logger="vitlab"):
        r = apply_overrides(recipe, ["accum_steps=1"])
    assert r.global_batch is None and r.accum_for(1) == 1
    assert "global_batch 512 is set aside; the global batch is now 32" in caplog.text
    assert apply_overrides(recipe, ["accum_steps=2", "global_batch=64"]).accum_for(1) == 2  # agreeing: kept


def test_set_accum_steps_and_global_batch_that_disagree_is_an_error_naming_both():
    with pytest.raises(ValueError, match=r"accum_steps=4 and --set global_batch=512 disagree.* = 128"):
        apply_overrides(load_recipe("vit_finetune"), ["accum_steps=4", "global_batch=512"])
