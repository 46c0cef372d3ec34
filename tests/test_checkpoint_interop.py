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
    ({"qk_norm": True}, r"qk_norm=True has no counterpart"),
    ({"act_layer": "silu"}, r"act_layer='silu': vitlab's ViTConfig supports gelu = 'exact' / 'tanh' / 'quick'"),
    ({"global_pool": "prr"}, r"global_pool='prr': vitlab's ViTConfig supports global_pool = 'token' / 'avg'"),
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


@pytest.mark.parametrize(("act_layer", "gelu"), [("gelu", "exact"), ("gelu_tanh", "tanh")])
def test_timm_hub_folder_act_layer_sets_the_gelu(act_layer: str, gelu: str, tmp_path: Path) -> None:
    folder = tmp_path / "hub"
    shutil.copytree(FIX / "timm_hub", folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_args"]["act_layer"] = act_layer
    (folder / "config.json").write_text(json.dumps(config))
    model = vitlab.load_model(folder).eval()
    assert model.cfg.gelu == gelu
    assert isinstance(model.blocks[0].mlp.act, torch.nn.GELU) and model.blocks[0].mlp.act.approximate == (
        "none" if gelu == "exact" else "tanh")


def test_finetune_from_a_timm_hub_folder_keeps_its_architecture(tmp_path: Path) -> None:
    from vitlab.train.recipe import Recipe
    from vitlab.train.run import TrainJob, build_model

    job = TrainJob(recipe=Recipe(name="t", img_size=32), data="digits", output=tmp_path / "run",
                   pretrained=str(FIX / "timm_hub"))
    model = build_model(job, num_classes=3, in_chans=3)
    assert model.model_name == "vit_tiny_patch16_224" and len(model.blocks) == 2 and model.global_pool == "avg"
    assert model.preprocessing.input_size == (3, 32, 32) and model.num_classes == 3  # the recipe's size wins
    assert model.preprocessing.mean == pytest.approx(IMAGENET_MEAN)


# ------------------------------------------------------------------------------ sharded checkpoints
IO_MORE = load_file(FIX / "io_more.safetensors")  # make_fixtures_interop.py more


@pytest.mark.parametrize(("case", "name"), [("vit", "vit_base_patch16_224"), ("swin", "swin_tiny_patch4_window7_224")])
def test_sharded_hf_folder_loads(case: str, name: str) -> None:
    # save_pretrained(max_shard_size=...): model.safetensors.index.json and model-0000i-of-0000N.safetensors
    folder = FIX / f"hf_{case}_sharded"
    assert not (folder / "model.safetensors").exists() and len(list(folder.glob("model-*-of-*.safetensors"))) == 3
    model = vitlab.load_model(folder).eval()
    assert model.model_name == name
    with torch.no_grad():
        torch.testing.assert_close(model(IO_MORE["x32"]), IO_MORE[f"hf_{case}_sharded_logits"], **TOL)
    index = vitlab.create_model(name, pretrained=folder / "model.safetensors.index.json").eval()  # the index alone
    with torch.no_grad():
        torch.testing.assert_close(index(IO_MORE["x32"]), IO_MORE[f"hf_{case}_sharded_logits"], **TOL)


def _shard_as_bin(src: Path, dst: Path) -> None:
    """The same shards as transformers 4 wrote them with safe_serialization=False: pytorch_model-*.bin + index."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        torch.save(load_file(src / shard), dst / ("pytorch_" + shard.replace(".safetensors", ".bin")))
    index["weight_map"] = {k: "pytorch_" + v.replace(".safetensors", ".bin") for k, v in index["weight_map"].items()}
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps(index))


def test_sharded_pytorch_bin_folder_loads(tmp_path: Path) -> None:
    folder = tmp_path / "bin"
    _shard_as_bin(FIX / "hf_vit_sharded", folder)
    model = vitlab.load_model(folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IO_MORE["x32"]), IO_MORE["hf_vit_sharded_logits"], **TOL)


def test_sharded_pytorch_bin_with_code_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "bin"
    _shard_as_bin(FIX / "hf_vit_sharded", folder)
    marker = tmp_path / "pwned"
    shard = folder / "pytorch_model-00002-of-00003.bin"
    torch.save({**torch.load(shard), "hook": _RunsShell(marker)}, shard)
    with pytest.raises(CheckpointError, match="could execute code") as err:
        vitlab.load_model(folder)
    assert str(shard) in str(err.value) and not marker.exists()


def test_sharded_timm_hub_folder_loads(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    folder = tmp_path / "hub"
    folder.mkdir()
    shutil.copy(FIX / "timm_hub" / "config.json", folder / "config.json")
    sd = load_file(FIX / "timm_hub" / "model.safetensors")
    keys = sorted(sd)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:]), start=1):
        name = f"model-0000{i}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, folder / name)
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model = vitlab.load_model(folder).eval()  # architecture and model_args from config.json, as for one file
    assert model.global_pool == "avg" and model.preprocessing.input_size == (3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(IO["x64"]), IO["timm_hub_logits"], **TOL)


def test_sharded_folder_with_a_missing_shard_names_it(tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    shutil.copytree(FIX / "hf_vit_sharded", folder)
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError) as err:
        vitlab.load_model(folder)
    msg = str(err.value)
    assert str(folder / "model.safetensors.index.json") in msg
    assert "missing" in msg and "model-00002-of-00003.safetensors" in msg
    assert "model-00001-of-00003.safetensors" not in msg


def test_sharded_index_listing_a_tensor_no_shard_holds(tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    shutil.copytree(FIX / "hf_vit_sharded", folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["vit.layernorm.extra"] = "model-00003-of-00003.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model-00003-of-00003\.safetensors lacks .*vit\.layernorm\.extra"):
        vitlab.load_model(folder)


def test_sharded_index_pointing_outside_its_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    shutil.copytree(FIX / "hf_vit_sharded", folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["classifier.bias"] = "../elsewhere.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"'\.\./elsewhere\.safetensors' .* not a file in its folder"):
        vitlab.load_model(folder)


# --------------------------------------------------------------- files of another family or layout
FIXTURES = FIX.parent


@pytest.mark.parametrize("name", ["vit_small_patch16_224", "deit_small_patch16_224"])
def test_deit3_position_table_without_class_entry_is_named(name: str) -> None:
    # timm's no_embed_class=True (DeiT-3): 16 entries for a 4x4 grid and none for the class token
    path = FIX / "timm_deit3.safetensors"
    for size in ({"img_size": 32, "patch_size": 8}, {}):  # the file's resolution, and another one
        with pytest.raises(CheckpointError) as err:
            vitlab.create_model(name, pretrained=path, embed_dim=32, depth=1, num_heads=4, **size)
        msg = str(err.value)
        assert msg.startswith(f"{path}: pos_embed has 16 entries, a position table for the patch grid alone")
        assert "without the class-token entry" in msg and "no_embed_class=True (DeiT-3)" in msg
        assert "not a square grid" not in msg


def test_vit_file_given_to_cait_says_it_is_a_vit_checkpoint() -> None:
    path = FIXTURES / "timm_token_p16" / "model.safetensors"
    with pytest.raises(CheckpointError) as err:
        vitlab.create_model("cait_xxs24_224", pretrained=path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: looks like a ViT/DeiT checkpoint (a class token with its entry in the position "
                          f"table, 'blocks.N' transformer blocks and no class-attention blocks), not one of the CaiT "
                          f"family that cait_xxs24_224 belongs to")


# one file per family, in timm's (or the official repository's) layout, and one model of each family
FAMILY_FILES = {
    "vit": FIXTURES / "timm_token_p16" / "model.safetensors",
    "deit": FIXTURES / "deit_timm_tiny_distilled.safetensors",
    "cait": FIXTURES / "cait_timm_tiny.safetensors",
    "swin": FIXTURES / "swin" / "timm_v1.safetensors",
    "swinv2": FIXTURES / "swin" / "timm_v2.safetensors",
    "beit": FIXTURES / "beit" / "timm_beit.safetensors",
    "beit3": FIXTURES / "beit" / "timm_beit3.safetensors",
    "crossvit": FIXTURES / "crossvit_timm_tiny.safetensors",
    "tnt": FIXTURES / "tnt_timm_tiny.safetensors",
    "xcit": FIXTURES / "xcit_timm_tiny_p16.safetensors",
    "mixer": FIXTURES / "mixer_timm_tiny.safetensors",
    "mobilevit": FIXTURES / "mobilevit" / "timm_v1" / "model.safetensors",
    "cct": FIXTURES / "cct_vitpytorch_learn.safetensors",
    "t2t": FIXTURES / "t2t_vit_official_tiny.pth.tar",
    "hf_vit": FIXTURES / "hf_vit_pooler" / "hf",
    "hf_swin": FIXTURES / "swin" / "hf_v1",
    "hf_beit": FIXTURES / "beit" / "hf_cls",
}
FAMILY_MODELS = {
    "vit": "vit_tiny_patch16_224", "deit": "deit_tiny_distilled_patch16_224", "cait": "cait_xxs24_224",
    "swin": "swin_tiny_patch4_window7_224", "swinv2": "swinv2_tiny_window8_256", "beit": "beit_base_patch16_224",
    "beit3": "beit3_base_patch16_224", "crossvit": "crossvit_tiny_240", "tnt": "tnt_s_patch16_224",
    "xcit": "xcit_nano_12_p16_224", "mixer": "mixer_s16_224", "mobilevit": "mobilevit_xxs", "cct": "cct_2_3x2_32",
    "t2t": "t2t_vit_7", "resnet": "resnet18",
}
LABELS = {"vit": "ViT/DeiT", "deit": "DeiT", "cait": "CaiT", "swin": "Swin", "swinv2": "Swin v2", "beit": "BEiT",
          "beit3": "BEiT-3", "crossvit": "CrossViT", "tnt": "TNT", "xcit": "XCiT", "mixer": "MLP-Mixer",
          "mobilevit": "MobileViT", "cct": "CCT", "t2t": "T2T-ViT", "resnet": "ResNet"}
# a ViT file is a DeiT model's file too; vitlab's BEiT-3 is its BEiT with sub-LN, and reads timm BEiT files
LOADS = {("vit", "deit"), ("beit", "beit3")}


@pytest.mark.parametrize("file_family", sorted(FAMILY_FILES))
def test_file_of_another_family_names_both(file_family: str) -> None:
    path = FAMILY_FILES[file_family]
    family = file_family.removeprefix("hf_")
    for model_family, name in FAMILY_MODELS.items():
        if model_family == family or (family, model_family) in LOADS:
            continue
        with pytest.raises(CheckpointError) as err:
            vitlab.create_model(name, pretrained=path)
        msg = str(err.value)
        article = "an" if LABELS[family].startswith(("MLP", "XCiT")) else "a"
        assert f": looks like {article} {LABELS[family]} checkpoint (" in msg, (name, msg)
        assert f"not one of the {LABELS[model_family].replace('ViT/DeiT', 'ViT')} family" in msg, (name, msg)
        assert str(path) in msg and f"load it with {article} {LABELS[family].split('/')[0]} model (e.g. {family}" in msg


def test_swin_file_given_to_vit_names_swin() -> None:
    # the README's promise: refused with a message naming both families (before: a list of missing keys only)
    path = FAMILY_FILES["swin"]
    with pytest.raises(CheckpointError) as err:
        vitlab.create_model("vit_tiny_patch16_224", pretrained=path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: looks like a Swin checkpoint (windowed stages 'layers.N.blocks.M'")
    assert "not one of the ViT family that vit_tiny_patch16_224 belongs to" in msg
    assert "does not fit vit_tiny_patch16_224" in msg  # what failed stays in the message


def test_rgb_weights_load_into_a_model_of_other_channels():
    """timm's adapt_input_conv: the first convolution summed over colour for one channel, so that a grey image
    answers as the same image repeated to RGB does; for more channels, RGB repeated and scaled by 3 / channels."""
    rgb = vitlab.load_model(FIX / "timm_hub").eval()
    grey = vitlab.load_model(FIX / "timm_hub", in_chans=1).eval()
    z = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(grey(z), rgb(z.repeat(1, 3, 1, 1)), **TOL)
    assert grey.preprocessing.input_size[0] == 1
    four = vitlab.load_model(FIX / "timm_hub", in_chans=4)
    w = rgb.patch_embed.proj.weight
    torch.testing.assert_close(four.patch_embed.proj.weight, torch.cat([w, w[:, :1]], dim=1) * 0.75, **TOL)


def test_rgb_weights_load_into_a_grey_crossvit_through_both_branches():
    path = Path(__file__).parent / "fixtures" / "crossvit_timm_tiny.safetensors"
    tiny = {"img_size": 48, "branch_scale": (1.0, 2 / 3), "num_heads": (2, 4)}
    rgb = vitlab.create_model("crossvit_9_240", pretrained=path, **tiny).eval()
    grey = vitlab.create_model("crossvit_9_240", pretrained=path, in_chans=1, **tiny).eval()
    z = torch.randn(1, 1, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(grey(z), rgb(z.repeat(1, 3, 1, 1)), **TOL)
