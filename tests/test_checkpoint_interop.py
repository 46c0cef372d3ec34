"""Checkpoints as other tools write them: training checkpoints with their arguments (timm, DeiT, MAE, DINO),
transformers 5's in-memory state dicts, timm BEiT classifiers with class-token pooling, files that are no
checkpoint at all, torch.compile / DDP prefixes, and timm hub folders (fixtures: make_fixtures_interop.py)."""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import vitlab
from vitlab import CheckpointError
from vitlab.checkpoints.io import read_pickle, unwrap_state_dict

FIX = Path(__file__).parent / "fixtures" / "interop"
IO = load_file(FIX / "io.safetensors")
TOL = dict(atol=1e-5, rtol=1e-5)
TRAIN_ARCH = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=4)  # the timm_train/ files' ViT


class _RunsShell:
    """Unpickling this calls os.system: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ------------------------------------------------------------ training checkpoints: args, numpy scalars
@pytest.mark.parametrize("name", ["last.pth.tar", "deit_style.pth"])
def test_training_checkpoints_with_args_and_numpy_metrics_load(name: str) -> None:
    # timm's CheckpointSaver and DeiT / MAE's main.py keep argparse's Namespace (and numpy metrics) beside the weights
    model = vitlab.create_model("vit_tiny_patch16_224", pretrained=FIX / "timm_train" / name, **TRAIN_ARCH).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IO["x32"]), IO["timm_train_logits"], **TOL)
    obj = read_pickle(FIX / "timm_train" / name)
    assert isinstance(obj["args"], argparse.Namespace) and obj["args"].model == "vit_tiny_patch16_224"


def test_dino_training_checkpoint_loads_the_teacher() -> None:
    dino = vitlab.create_model("vit_tiny_patch16_224", pretrained=FIX / "timm_train" / "dino_style.pth",
                               **TRAIN_ARCH).eval()
    timm_file = vitlab.create_model("vit_tiny_patch16_224", pretrained=FIX / "timm_train" / "last.pth.tar",
                                    **TRAIN_ARCH).eval()
    assert dino.num_classes == 0
    with torch.no_grad():
        torch.testing.assert_close(dino.forward_features(IO["x32"]), timm_file.forward_features(IO["x32"]))
    obj = read_pickle(FIX / "timm_train" / "dino_style.pth")
    assert isinstance(obj["best_acc"], np.float32) and obj["best_acc"] == np.float32(75.5)


def test_numpy_scalars_written_by_numpy_1_load(tmp_path: Path) -> None:
    # numpy 1.x pickles a scalar as numpy.core.multiarray.scalar, numpy 2 as numpy._core...: both are read
    buf = io.BytesIO()
    torch.save({"model": {"w": torch.ones(2)}, "best_acc": np.float64(81.25)}, buf,
               _use_new_zipfile_serialization=False)  # legacy format: one plain pickle stream, no checksums
    data = buf.getvalue()
    assert b"numpy._core.multiarray" in data
    path = tmp_path / "numpy1.pth"
    path.write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    obj = read_pickle(path)
    assert obj["best_acc"] == 81.25 and torch.equal(obj["model"]["w"], torch.ones(2))


def test_allowed_data_classes_are_scoped_to_the_call() -> None:
    before = torch.serialization.get_safe_globals()  # torch keeps a set: compare them as sets
    read_pickle(FIX / "timm_train" / "deit_style.pth")
    assert set(torch.serialization.get_safe_globals()) == set(before)
    torch.serialization.add_safe_globals([argparse.Namespace])  # allowed by the caller for good: it stays
    try:
        read_pickle(FIX / "timm_train" / "deit_style.pth")
        assert argparse.Namespace in torch.serialization.get_safe_globals()
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


def test_code_hidden_in_the_args_is_still_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=0.1, hook=_RunsShell(marker)),
                "best_acc": np.float64(1.0)}, path)
    with pytest.raises(CheckpointError, match="could execute code") as err:
        read_pickle(path)
    assert str(path) in str(err.value) and "system" in str(err.value)
    assert not marker.exists(), "unpickling ran the payload"


# -------------------------------------------------------------------- transformers 5 in-memory names
HF_CASES = {  # case: (registered name, output compared, io key)
    "vit_cls": ("vit_base_patch16_224", "logits", "hf_vit_cls_logits"),
    "vit_model": ("vit_base_patch16_224", "features", "hf_vit_model_features"),
    "deit_teacher": ("deit_base_patch16_224", "logits", "hf_deit_teacher_logits"),
    "vit_mae": ("vit_base_patch16_224", "features", "hf_vit_mae_features"),
}


@pytest.mark.parametrize("spelling", ["v5_in_memory", "hub"])
@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_transformers_state_dicts_in_both_spellings(case: str, spelling: str, tmp_path: Path) -> None:
    # what torch.save(model.state_dict()) writes next to the config: pytorch_model.bin
    src = FIX / f"hf_{case}"
    shutil.copy(src / "config.json", tmp_path / "config.json")
    sd = load_file(src / ("v5_state_dict.safetensors" if spelling == "v5_in_memory" else "model.safetensors"))
    assert any(".q_proj." in k for k in sd) == (spelling == "v5_in_memory")
    torch.save(sd, tmp_path / "pytorch_model.bin")
    name, output, key = HF_CASES[case]
    model = vitlab.load_model(tmp_path).eval()  # config.json's model_type names the family
    assert model.model_name == name
    with torch.no_grad():
        got = model(IO["x32"]) if output == "logits" else model.forward_features(IO["x32"])
    torch.testing.assert_close(got, IO[key], **TOL)


def test_bare_transformers5_state_dict_file(tmp_path: Path) -> None:
    # torch.save(model.state_dict()) alone: no config.json, so the caller gives the sizes; the names say transformers
    path = tmp_path / "vit.pth"
    torch.save(load_file(FIX / "hf_vit_cls" / "v5_state_dict.safetensors"), path)
    model = vitlab.create_model("vit_base_patch16_224", pretrained=path, embed_dim=32, depth=2, num_heads=4,
                                mlp_ratio=2.0, img_size=32, patch_size=8).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IO["x32"]), IO["hf_vit_cls_logits"], **TOL)


# --------------------------------------------------------------------- timm BEiT class-token pooling
@pytest.mark.parametrize(("case", "name"), [("beit", "beit_base_patch16_224"), ("beitv2", "beitv2_base_patch16_224"),
                                            ("beit3", "beit3_base_patch16_224")])
def test_timm_beit_classifier_with_a_final_norm_pools_the_class_token(case: str, name: str) -> None:
    # timm builds fc_norm exactly when it averages: a final norm and no fc_norm is global_pool='token'
    extra = {"num_heads": 4} if case == "beit3" else {}  # BEiT-3 has no relative position table to read them from
    model = vitlab.create_model(name, pretrained=FIX / f"timm_{case}_token.safetensors", img_size=24, **extra).eval()
    assert model.global_pool == "token"
    with torch.no_grad():
        torch.testing.assert_close(model(IO["x24"]), IO[f"timm_{case}_token_logits"], **TOL)
    avg = vitlab.create_model(name, pretrained=FIX / f"timm_{case}_token.safetensors", img_size=24,
                              global_pool="avg", **extra)
    assert avg.global_pool == "avg"  # an explicit choice still wins


# ------------------------------------------------------------------- files that are no checkpoint at all
NOT_CHECKPOINTS = {
    "hello": b"hello",
    "truncated_pickle": b"\x80\x02K",
    "short_binunicode": b"X\xfd",
    "bad_utf8_global": b"c.W\x82\xbaC",
    "random": np.random.default_rng(0).bytes(4096),
    "random_after_proto": b"\x80\x02" + np.random.default_rng(17).bytes(256),
    "html": b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>...</body></html>\n",
    "json": b'{"error": "not found"}\n',
    "empty": b"",
    "zeros": bytes(64),
    "gzip": b"\x1f\x8b\x08\x00" + bytes(20),
    "truncated_zip": b"PK\x03\x04" + bytes(40),
}


@pytest.mark.parametrize("case", sorted(NOT_CHECKPOINTS))
def test_bytes_that_are_no_checkpoint_are_named_so(case: str, tmp_path: Path) -> None:
    path = tmp_path / f"{case}.pth"
    path.write_bytes(NOT_CHECKPOINTS[case])
    with pytest.raises(CheckpointError) as err:
        vitlab.create_model("vit_tiny_patch16_224", pretrained=path)
    msg = str(err.value)
    assert str(path) in msg and "not a readable PyTorch checkpoint" in msg
    assert "could execute code" not in msg and "weights_only" not in msg
    if case == "html":
        assert "web page" in msg


GIT_LFS_POINTER = (b"version https://git-lfs.github.com/spec/v1\n"
                   b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 346284714\n")


@pytest.mark.parametrize("filename", ["model.pth", "pytorch_model.bin", "model.safetensors"])
def test_git_lfs_pointer_says_to_pull(filename: str, tmp_path: Path) -> None:
    path = tmp_path / filename
    path.write_bytes(GIT_LFS_POINTER)
    with pytest.raises(CheckpointError) as err:
        vitlab.create_model("vit_tiny_patch16_224", pretrained=path)
    msg = str(err.value)
    assert str(path) in msg and "git-lfs pointer" in msg and "`git lfs pull`" in msg
    assert "could execute code" not in msg


# ----------------------------------------------------------------------------- wrapper prefixes
@pytest.mark.parametrize("prefix", ["_orig_mod.", "module.", "module._orig_mod.", "_orig_mod.module.",
                                    "_orig_mod.module._orig_mod."])
def test_compile_and_ddp_prefixes_are_stripped(prefix: str, tmp_path: Path) -> None:
    sd = _train_state_dict()
    path = tmp_path / "compiled.pth.tar"
    torch.save({"state_dict": {prefix + k: v for k, v in sd.items()}, "epoch": 1}, path)
    assert unwrap_state_dict(read_pickle(path), path).keys() == sd.keys()
    model = vitlab.create_model("vit_tiny_patch16_224", pretrained=path, **TRAIN_ARCH).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IO["x32"]), IO["timm_train_logits"], **TOL)


def test_a_prefix_on_some_keys_only_is_kept() -> None:
    sd = {"module.w": torch.zeros(1), "b": torch.zeros(1)}  # not a wrapper: a submodule called "module"
    assert unwrap_state_dict(sd, "x").keys() == sd.keys()


def _train_state_dict() -> dict[str, torch.Tensor]:
    return unwrap_state_dict(read_pickle(FIX / "timm_train" / "last.pth.tar"), "last.pth.tar")


# ------------------------------------------------------------------------------- timm hub folders
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_timm_hub_folder_builds_what_timm_builds() -> None:
    model = vitlab.load_model(FIX / "timm_hub").eval()  # model_args: depth 2, 64px, avg pooling without fc_norm
    assert model.model_name == "vit_tiny_patch16_224" and len(model.blocks) == 2
    assert model.global_pool == "avg" and isinstance(model.fc_norm, torch.nn.Identity)
    pre = model.preprocessing  # pretrained_cfg
    assert pre.input_size == (3, 64, 64) and pre.crop_pct == 0.95 and pre.interpolation == "bicubic"
    assert pre.mean == pytest.approx(IMAGENET_MEAN) and pre.std == pytest.approx(IMAGENET_STD)
    assert model.class_names == [f"class_{i}" for i in range(7)]
    with torch.no_grad():
        torch.testing.assert_close(model(IO["x64"]), IO["timm_hub_logits"], **TOL)


def test_timm_hub_folder_explicit_overrides_win() -> None:
    model = vitlab.load_model(FIX / "timm_hub", img_size=96, num_classes=3, global_pool="token", mean=(0.5,) * 3)
    assert model.preprocessing.input_size == (3, 96, 96) and model.num_classes == 3
    assert model.global_pool == "token" and model.preprocessing.mean == (0.5,) * 3
    assert getattr(model, "class_names", None) is None  # 7 names do not fit a 3-class head


@pytest.mark.parametrize(("args", "expected"), [
    ({"reg_tokens": 4}, r"reg_tokens=4 has no counterpart"),
    ({"act_layer": "gelu_tanh"}, r"act_layer='gelu_tanh' has no counterpart"),
    ({"global_pool": "map"}, r"global_pool='map': vitlab's ViTConfig supports global_pool = 'token' / 'avg'"),
])
def test_timm_hub_folder_with_args_vitlab_lacks_names_them(args: dict, expected: str, tmp_path: Path) -> None:
    folder = tmp_path / "hub"
    shutil.copytree(FIX / "timm_hub", folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_args"].update(args)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=expected) as err:
        vitlab.load_model(folder)
    assert str(folder / "config.json") in str(err.value)


def test_timm_hub_folder_args_off_or_init_only_are_accepted(tmp_path: Path) -> None:
    folder = tmp_path / "hub"
    shutil.copytree(FIX / "timm_hub", folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_args"].update(reg_tokens=0, qk_norm=False, weight_init="jax")
    (folder / "config.json").write_text(json.dumps(config))
    model = vitlab.load_model(folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IO["x64"]), IO["timm_hub_logits"], **TOL)


def test_finetune_from_a_timm_hub_folder_keeps_its_architecture(tmp_path: Path) -> None:
    from vitlab.train.recipe import Recipe
    from vitlab.train.run import TrainJob, build_model

    job = TrainJob(recipe=Recipe(name="t", img_size=32), data="digits", output=tmp_path / "run",
                   pretrained=str(FIX / "timm_hub"))
    model = build_model(job, num_classes=3, in_chans=3)
    assert model.model_name == "vit_tiny_patch16_224" and len(model.blocks) == 2 and model.global_pool == "avg"
    assert model.preprocessing.input_size == (3, 32, 32) and model.num_classes == 3  # the recipe's size wins
    assert model.preprocessing.mean == pytest.approx(IMAGENET_MEAN)
