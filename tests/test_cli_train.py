"""`vitlab train / finetune / eval / predict` end to end on the bundled digits, a few steps each."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.cli.main import main

torch.set_num_threads(1)

FAST = ["--steps", "4", "--batch-size", "32", "--no-progress", "--set", "model_overrides.depth=1",
        "--set", "model_overrides.embed_dim=32", "--set", "model_overrides.num_heads=2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--output", str(out), *FAST]) == 0
    return out


def write_digit_pngs(root, classes=(0, 1, 2), per_class=4):
    """PNG files of held-out digits, one folder per class; returns the files and their labels."""
    from vitlab.data import build_dataset

    ds = build_dataset("digits", split="test")
    files, labels = [], []
    for c in classes:
        (root / str(c)).mkdir(parents=True, exist_ok=True)
        idx = [i for i, t in enumerate(ds.targets) if t == c][:per_class]
        for i in idx:
            img = ds.load(i)[0].numpy().astype(np.uint8)  # (8, 8)
            path = root / str(c) / f"{i}.png"
            Image.fromarray(img, mode="L").save(path)
            files.append(str(path))
            labels.append(c)
    return files, labels


def test_train_writes_a_complete_run(run_dir):
    for name in ("model.safetensors", "train_state.pt", "recipe.json", "metrics.jsonl", "results.json"):
        assert (run_dir / name).is_file(), name
    results = json.loads((run_dir / "results.json").read_text())
    assert results["steps"] == 4 and results["recipe"] == "digits" and 0.0 <= results["test"]["top1"] <= 1.0
    recipe = json.loads((run_dir / "recipe.json").read_text())
    assert recipe["model_overrides"]["depth"] == 1 and recipe["resolved"]["total_steps"] == 4


def test_eval_reports_and_writes_confusion(run_dir, tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(run_dir / "model.safetensors"), "--data", "digits",
                 "--output", str(tmp_path), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["samples"] > 300 and 0 <= metrics["top1"] <= metrics["top5"] <= 1
    rows = (tmp_path / "confusion.csv").read_text().splitlines()
    assert len(rows) == 11  # header + 10 classes
    total = sum(int(v) for r in rows[1:] for v in r.split(",")[1:])
    assert total == metrics["samples"]
    assert (tmp_path / "confusion.png").stat().st_size > 1000
    per_class = (tmp_path / "per_class.csv").read_text().splitlines()
    assert per_class[0] == "class,support,accuracy" and len(per_class) == 11


def test_predict_on_png_files(run_dir, tmp_path, capsys):
    files, _ = write_digit_pngs(tmp_path, per_class=2)
    assert main(["predict", *files, "--checkpoint", str(run_dir / "model.safetensors"), "--topk", "3",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in out] == files
    for r in out:
        probs = [p["probability"] for p in r["predictions"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-5
        assert all(p["class"] in [str(i) for i in range(10)] for p in r["predictions"])
    assert main(["predict", files[0], "--checkpoint", str(run_dir / "model.safetensors")]) == 0
    assert files[0] in capsys.readouterr().out


def test_predict_prints_each_batch_as_it_goes(run_dir, tmp_path, capsys):
    """Over a folder, text results come batch by batch: a run stopped by a bad file (or by the user) has already
    printed the batches before it, and `vitlab predict ./photos | head` sees lines before the end."""
    files, _ = write_digit_pngs(tmp_path / "imgs", per_class=2)  # 6 files, sorted: 0/, 1/, 2/
    (tmp_path / "imgs" / "2" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert main(["predict", str(tmp_path / "imgs"), "--checkpoint", str(run_dir / "model.safetensors"),
                 "--batch-size", "2"]) == 2
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 and all(": " in line for line in lines)  # the three batches before the broken file


def test_predict_into_a_closed_pipe_exits_quietly(run_dir, tmp_path):
    import subprocess
    import sys

    files, _ = write_digit_pngs(tmp_path / "imgs", per_class=4)
    cmd = (f"{sys.executable} -m vitlab.cli.main predict {tmp_path / 'imgs'} --checkpoint {run_dir / 'model.safetensors'} "
           f"--batch-size 2 | head -n 1")
    done = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=300)
    assert len(done.stdout.splitlines()) == 1
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr


def test_predict_bad_image_is_a_clear_error(run_dir, tmp_path, caplog):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with caplog.at_level(logging.ERROR):
        assert main(["predict", str(bad), "--checkpoint", str(run_dir / "model.safetensors")]) == 2
    assert "broken.png" in caplog.text


def test_eval_class_count_mismatch_points_at_finetune(run_dir, tmp_path, caplog):
    write_digit_pngs(tmp_path / "three")
    with caplog.at_level(logging.ERROR):  # by name, digits 0-2 are a subset of the head's "0".."9": by position
        assert main(["eval", "--checkpoint", str(run_dir / "model.safetensors"), "--data",
                     str(tmp_path / "three"), "--split", "val", "--class-match", "index"]) == 2
    assert "3 classes" in caplog.text and "head for 10" in caplog.text and "vitlab finetune" in caplog.text


def test_finetune_to_new_classes(run_dir, tmp_path):
    write_digit_pngs(tmp_path / "three", per_class=8)
    out = tmp_path / "ft"
    assert main(["finetune", "--from", str(run_dir / "model.safetensors"), "--data", str(tmp_path / "three"),
                 "--img-size", "16", "--output", str(out), "--steps", "2", "--batch-size", "4", "--no-progress",
                 "--set", "global_batch=none", "--set", "warmup_steps=0"]) == 0
    import vitlab

    model = vitlab.load_model(out / "model.safetensors")
    assert model.num_classes == 3 and model.class_names == ["0", "1", "2"]
    assert model.preprocessing.input_size[1:] == (16, 16)  # position table resampled from 8x8 to 16x16
    src = vitlab.load_model(run_dir / "model.safetensors")
    assert model.pos_embed.shape[1] == 1 + (16 // 2) ** 2 and src.pos_embed.shape[1] == 1 + (8 // 2) ** 2


def test_finetune_without_a_size_keeps_the_checkpoints(run_dir, tmp_path, caplog):
    """No --img-size: the checkpoint's own resolution (8 px here), not the ViT paper recipe's 384 px (a 96 x 96
    grid for this model); an explicit size or recipe still decides."""
    import vitlab

    write_digit_pngs(tmp_path / "three", per_class=8)
    args = ["finetune", "--from", str(run_dir / "model.safetensors"), "--data", str(tmp_path / "three"), "--steps",
            "1", "--batch-size", "4", "--no-progress", "--set", "global_batch=none", "--set", "warmup_steps=0"]
    with caplog.at_level(logging.INFO, logger="vitlab"):
        assert main([*args, "--output", str(tmp_path / "a")]) == 0
    assert "fine-tuning at the checkpoint's resolution, 8 px" in caplog.text
    assert vitlab.load_model(tmp_path / "a" / "model.safetensors").preprocessing.input_size[1:] == (8, 8)
    assert main([*args, "--set", "img_size=16", "--output", str(tmp_path / "b")]) == 0
    assert vitlab.load_model(tmp_path / "b" / "model.safetensors").preprocessing.input_size[1:] == (16, 16)


def test_a_run_folder_names_its_model(run_dir, tmp_path):
    """`finetune --from runs/mine` (the folder, not its model.safetensors) worked before model_name_of and must go
    on working; vitlab.load_model takes the folder too."""
    import vitlab
    from vitlab.models.factory import model_name_of

    assert model_name_of(run_dir) == vitlab.load_model(run_dir / "model.safetensors").model_name
    assert vitlab.load_model(run_dir).model_name == model_name_of(run_dir)
    assert main(["finetune", "--from", str(run_dir), "--img-size", "16", "--output", str(tmp_path / "ft"), "--steps", "1",
                 "--batch-size", "4", "--no-progress", "--set", "global_batch=none", "--set", "warmup_steps=0"]) == 0


def test_finetune_from_a_hugging_face_folder_needs_no_model_name(tmp_path, caplog):
    """A Hugging Face folder names its architecture in config.json (as `vitlab.load_model` reads it): finetune
    took it only with --model, and its error suggested a ViT for a Swin folder. A bare timm file still needs
    --model, and the error says so."""
    from pathlib import Path

    import vitlab
    from vitlab.models.factory import model_name_of

    fix = Path(__file__).resolve().parent / "fixtures"
    assert model_name_of(fix / "swin" / "hf_v1") == "swin_tiny_patch4_window7_224"
    out = tmp_path / "ft"
    assert main(["finetune", "--from", str(fix / "swin" / "hf_v1"), "--img-size", "32", "--output", str(out),
                 "--steps", "1", "--batch-size", "4", "--no-progress", "--set", "global_batch=none",
                 "--set", "warmup_steps=0"]) == 0
    model = vitlab.load_model(out / "model.safetensors")
    src = vitlab.load_model(fix / "swin" / "hf_v1")
    assert model.model_name == "swin_tiny_patch4_window7_224" and model.num_classes == 10
    assert (model.cfg.embed_dim, model.cfg.depths) == (src.cfg.embed_dim, src.cfg.depths)  # the folder's size
    assert main(["finetune", "--from", str(fix / "mixer_timm_tiny.safetensors"), "--steps", "1",
                 "--output", str(tmp_path / "m")]) == 2
    assert "not a vitlab checkpoint" in caplog.text and "--model NAME" in caplog.text


def test_train_with_a_distillation_teacher(run_dir, tmp_path):
    out = tmp_path / "student"
    assert main(["train", "--output", str(out), *FAST, "--steps", "2", "--teacher",
                 str(run_dir / "model.safetensors"), "--distill", "soft", "--tau", "2", "--alpha", "0.7"]) == 0
    assert json.loads((out / "results.json").read_text())["steps"] == 2


def test_a_distillation_run_resumes_with_its_own_teacher(run_dir, tmp_path, caplog):
    """--resume alone continues a distillation run (job.json records the teacher and its options); the command
    line may repeat them but not change them."""
    out = tmp_path / "student"
    teacher = str(run_dir / "model.safetensors")
    soft = ["--distill", "soft", "--tau", "2", "--alpha", "0.7"]
    assert main(["train", "--output", str(out), *FAST, "--steps", "4", "--teacher", teacher, *soft,
                 "--set", "checkpoint_every=2"]) == 0
    distill = json.loads((out / "job.json").read_text())["distill"]
    assert distill.pop("fingerprint").startswith("sha256:")  # the teacher's weights, checked on --resume
    assert distill == {"teacher": teacher, "kind": "soft", "alpha": 0.7, "tau": 2.0, "model": None}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vitlab"):
        assert main(["train", "--output", str(out), "--resume", "--steps", "6", "--no-progress"]) == 0
    assert "soft, alpha 0.70, tau 2.00" in caplog.text
    assert json.loads((out / "results.json").read_text())["steps"] == 6
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(["train", "--output", str(out), "--resume", "--steps", "8", "--no-progress",
                     "--distill", "hard"]) == 2
    assert "distils with" in caplog.text and "kind 'soft' -> 'hard'" in caplog.text


@pytest.mark.parametrize("argv, needle", [
    (["train", "--model", "vit_tinny_patch16_224"], "unknown model 'vit_tinny_patch16_224'; did you mean"),
    (["train", "--set", "lerning_rate=0.1"], "unknown recipe key 'lerning_rate'; valid keys:"),
    (["train", "--recipe", "nope"], "unknown recipe 'nope'"),
    (["train", "--set", "epochs=ten"], "recipe key 'epochs'"),
])
def test_bad_arguments_are_clear_errors(argv, needle, tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        assert main([*argv, "--output", str(tmp_path / "x"), "--no-progress"]) == 2
    assert needle in caplog.text


def test_resume_from_another_models_run_is_refused(run_dir, tmp_path, caplog):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    with caplog.at_level(logging.ERROR):
        assert main(["train", "--output", str(other), "--resume", *FAST, "--set", "model_overrides.embed_dim=48"]) == 2
    assert "config differs in: embed_dim" in caplog.text and "--resume" in caplog.text


def test_unfinished_run_is_not_overwritten(run_dir, tmp_path, caplog):
    import shutil

    out = tmp_path / "unfinished"
    shutil.copytree(run_dir, out)
    # an unfinished run (step < total_steps) needs --resume or --overwrite (a finished one: --overwrite)
    state = torch.load(out / "train_state.pt", weights_only=True)
    state["total_steps"] = 100
    torch.save(state, out / "train_state.pt")
    with caplog.at_level(logging.ERROR):
        assert main(["train", "--output", str(out), *FAST]) == 2
    assert "unfinished run" in caplog.text and "--resume" in caplog.text


def test_help_shows_examples(capsys):
    for cmd in ("train", "finetune", "eval", "predict"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert "example" in capsys.readouterr().out


def test_resume_is_exact_with_real_augmentation_on_digits(tmp_path):
    """The data package's RandomResizedCrop + RandAugment + random erasing, Mixup/CutMix and drop-path:
    3 steps then --resume for 3 more equals 6 straight."""
    from vitlab.checkpoints import read_vitlab
    from vitlab.train import apply_overrides, load_recipe
    from vitlab.train.run import TrainJob, run_training

    recipe = apply_overrides(load_recipe("digits"), [
        "max_steps=6", "batch_size=16", "augment=true", "randaugment=2,9", "randaugment_mstd=0.5", "re_prob=0.25",
        "mixup_alpha=0.8", "cutmix_alpha=1.0", "model_overrides.drop_path_rate=0.2", "model_overrides.depth=1",
        "model_overrides.embed_dim=32", "model_overrides.num_heads=2", "ema_decay=0.9", "val_fraction=0.5"])

    def job(out, **kw):
        return TrainJob(recipe=recipe, data="digits", output=out, progress=False, **kw)

    run_training(job(tmp_path / "a"))
    first = run_training(job(tmp_path / "b", until_step=3))
    assert first["steps"] == 3 and "test" not in first
    torch.manual_seed(99)
    run_training(job(tmp_path / "b", resume=True))
    for name in ("model.safetensors", "model_ema.safetensors"):
        a, _ = read_vitlab(tmp_path / "a" / name)
        b, _ = read_vitlab(tmp_path / "b" / name)
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), (name, k)


def test_non_finite_loss_is_one_clear_error(tmp_path, caplog):
    with caplog.at_level(logging.ERROR):  # an absurd learning rate blows the loss up within a few steps
        code = main(["train", "--output", str(tmp_path / "nan"), *FAST, "--steps", "20", "--set", "lr=1e30",
                     "--set", "warmup_steps=0", "--set", "warmup_epochs=0"])
    assert code == 1
    assert "non-finite loss" in caplog.text and "no last good checkpoint yet" in caplog.text  # none was written


def test_resume_with_another_optimizer_is_refused(run_dir, tmp_path, caplog):
    import shutil

    out = tmp_path / "opt"
    shutil.copytree(run_dir, out)
    with caplog.at_level(logging.ERROR):
        assert main(["train", "--output", str(out), "--resume", *FAST, "--set", "optimizer=sgd"]) == 2
    assert "optimizer" in caplog.text and "adamw" in caplog.text


def test_resume_needs_only_the_run_directory(tmp_path):
    """`vitlab train --output DIR --resume` alone continues with the run's own recipe, model and data."""
    from vitlab.checkpoints import read_vitlab

    out = tmp_path / "run"
    assert main(["train", "--output", str(out), *FAST, "--steps", "3"]) == 0
    assert json.loads((out / "job.json").read_text())["data"] == "digits"
    # a longer run length on resume is allowed (with a warning) and the run continues to it
    assert main(["train", "--output", str(out), "--resume", "--no-progress", "--steps", "5"]) == 0
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == 5
    _, meta = read_vitlab(out / "model.safetensors")
    assert meta["config"]["depth"] == 1 and meta["config"]["embed_dim"] == 32  # the run's model, not the default


def test_a_runs_recipe_json_runs_again(run_dir, tmp_path):
    """The resolved recipe a run writes (with what it resolved on its machine) is a recipe for the next run."""
    saved = json.loads((run_dir / "recipe.json").read_text())
    assert "resolved" in saved
    again = tmp_path / "again"
    assert main(["train", "--recipe", str(run_dir / "recipe.json"), "--output", str(again), *FAST]) == 0
    ours = json.loads((again / "recipe.json").read_text())
    assert {k: v for k, v in ours.items() if k != "resolved"} == {k: v for k, v in saved.items() if k != "resolved"}
