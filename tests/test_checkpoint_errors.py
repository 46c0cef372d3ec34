"""Loading a checkpoint that does not fit: one clear error naming the file and what was expected.

Also the two mismatches that are *not* errors: a head of another size (replaced by a zero-initialised
one) and a position table of another resolution (resampled).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vitlab import CheckpointError, create_model, save_model
from vitlab.models.resnet import ResNet, ResNetConfig

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TIMM_FILE = FIXTURES / "timm_token_p16" / "model.safetensors"  # width 32, depth 2, 4 heads, 64 px, 10 classes
TINY = {"embed_dim": 32, "depth": 2, "num_heads": 4, "img_size": 64}
NAME = "vit_base_patch16_224"


def load(path: Path | str, **overrides: object) -> torch.nn.Module:
    return create_model(NAME, pretrained=path, **{**TINY, **overrides})


def truncated_copy(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


class _RunsShell:
    """Unpickling this calls os.system: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ---------------------------------------------------------------------------------- another architecture
@pytest.mark.parametrize(("depth", "title", "key"), [
    (1, "unexpected keys", "blocks.1.attn.qkv.weight"),  # the file has a block the model lacks
    (3, "missing keys", "blocks.2.attn.qkv.weight"),  # the model has a block the file lacks
])
def test_other_depth_lists_missing_or_unexpected_keys(depth: int, title: str, key: str) -> None:
    with pytest.raises(CheckpointError) as err:
        load(TIMM_FILE, depth=depth)
    msg = str(err.value)
    assert str(TIMM_FILE) in msg and NAME in msg
    assert f"{title}: " in msg and key in msg
    assert "another architecture" in msg


def test_other_depth_from_npz_lists_missing_keys() -> None:
    npz = FIXTURES / "jax_token_p16" / "model.npz"
    with pytest.raises(CheckpointError, match=r"missing keys: .*blocks\.2\.") as err:
        load(npz, depth=3, img_size=48)
    assert str(npz) in str(err.value)


def test_other_width_lists_shapes_that_differ() -> None:
    with pytest.raises(CheckpointError) as err:
        load(TIMM_FILE, embed_dim=64)
    msg = str(err.value)
    assert str(TIMM_FILE) in msg and "shapes that differ" in msg
    assert "blocks.0.attn.qkv.weight: checkpoint (96, 32) vs model (192, 64)" in msg


def test_resnet_state_dict_into_vit(tmp_path: Path) -> None:
    resnet = ResNet(ResNetConfig(layers=(1, 1), block="basic", channels=(8, 16), stem_chs=8, num_classes=3))
    path = tmp_path / "resnet.pth"
    torch.save(resnet.state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        load(path)
    msg = str(err.value)
    assert str(path) in msg
    assert "missing keys: " in msg and "blocks.0.attn.qkv.weight" in msg
    assert "unexpected keys: " in msg and "stages.0.blocks.0.conv1.weight" in msg


def test_vitlab_checkpoint_of_another_family(tmp_path: Path) -> None:
    path = save_model(create_model("resnet18", num_classes=2), tmp_path / "r18.safetensors")
    with pytest.raises(CheckpointError, match=r"a checkpoint of resnet18 \(resnet\), not of the vit family") as err:
        load(path)
    assert str(path) in str(err.value)


def test_no_converter_for_the_family_names_the_file() -> None:
    folder = FIXTURES / "hf_vit_pooler" / "hf"
    with pytest.raises(CheckpointError, match="no converter from 'hf' checkpoints for the 't2t' family") as err:
        create_model("t2t_vit_7", pretrained=folder)
    assert str(folder / "model.safetensors") in str(err.value)


def test_hf_config_with_another_activation(tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    shutil.copytree(FIXTURES / "hf_vit_pooler" / "hf", folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "hidden_act": "silu"}))
    with pytest.raises(CheckpointError, match="hidden_act='silu'; vitlab's ViT has 'gelu' / 'gelu_new'") as err:
        create_model(NAME, pretrained=folder)
    assert str(folder) in str(err.value)


def test_npz_of_another_layout(tmp_path: Path) -> None:
    path = tmp_path / "other.npz"
    np.savez(path, weights=np.zeros(3, dtype=np.float32))
    with pytest.raises(CheckpointError, match="no array 'embedding/kernel': expected the google-research") as err:
        load(path)
    assert str(path) in str(err.value)


# ------------------------------------------------------------------------------------- corrupted files
@pytest.mark.parametrize(("src", "expected"), [
    (TIMM_FILE, "not a readable safetensors file"),
    (FIXTURES / "timm_p32_pth" / "model.pth", "not a readable PyTorch checkpoint (truncated or corrupted?)"),
    (FIXTURES / "jax_token_p16" / "model.npz", "not a readable .npz archive (truncated or corrupted?)"),
])
def test_truncated_file(src: Path, expected: str, tmp_path: Path) -> None:
    path = truncated_copy(src, tmp_path / f"cut{src.suffix}")
    with pytest.raises(CheckpointError) as err:
        load(path)
    assert str(path) in str(err.value) and expected in str(err.value)


def test_garbage_npz(tmp_path: Path) -> None:
    path = tmp_path / "garbage.npz"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match="not a .npz archive") as err:
        load(path)
    assert str(path) in str(err.value)


# ------------------------------------------------------------------------------- pickles that run code
def test_pth_that_would_execute_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _RunsShell(marker)}, path)
    with pytest.raises(CheckpointError) as err:
        load(path)
    msg = str(err.value)
    assert str(path) in msg and "refused to load" in msg and "could execute code" in msg
    assert "system" in msg  # names what it refused
    assert not marker.exists(), "unpickling ran the payload"


def test_legacy_pickle_that_would_execute_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(_RunsShell(marker), protocol=2))  # not a zip: torch's legacy format path
    with pytest.raises(CheckpointError, match="refused to load") as err:
        load(path)
    assert str(path) in str(err.value)
    assert not marker.exists(), "unpickling ran the payload"


def test_npz_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.npz"
    np.savez(path, payload=np.array([_RunsShell(marker)], dtype=object))
    with pytest.raises(CheckpointError, match="refused to load: the .npz holds pickled objects") as err:
        load(path)
    assert str(path) in str(err.value)
    assert not marker.exists(), "unpickling ran the payload"


# -------------------------------------------------------------------------------- paths and file types
def test_nonexistent_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.safetensors"
    with pytest.raises(CheckpointError, match="no such file or folder") as err:
        load(path)
    assert str(path) in str(err.value)
    assert isinstance(err.value, FileNotFoundError)  # callers catching the builtin still work


def test_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "weights.h5"
    path.write_bytes(b"\x08\x07")
    with pytest.raises(CheckpointError) as err:
        load(path)
    msg = str(err.value)
    assert str(path) in msg and "unknown checkpoint type" in msg
    assert ".safetensors" in msg and ".npz" in msg and "config.json" in msg


def test_folder_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="folder has none of model.safetensors, pytorch_model.bin") as err:
        load(tmp_path)
    assert str(tmp_path) in str(err.value)


# ---------------------------------------------------------------------- mismatches that are not errors
@pytest.mark.parametrize("source", [TIMM_FILE, FIXTURES / "jax_token_p16" / "model.npz"])
def test_head_of_another_size_is_replaced_by_zeros(source: Path) -> None:
    """num_classes=3 on a 10-class file: the head is new and zero; every other tensor comes from the file."""
    img = 64 if source == TIMM_FILE else 48
    model = load(source, num_classes=3, img_size=img).eval()
    assert model.head.weight.shape == (3, 32)
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    full = load(source, img_size=img)  # the same file with its own head
    kept = {k: v for k, v in full.state_dict().items() if not k.startswith("head.")}
    got = model.state_dict()
    assert kept and all(torch.equal(got[k], v) for k, v in kept.items())
    case = source.parent.name
    ref = load_file(str(source.parent / "io.safetensors"))
    if source.suffix == ".npz":  # the JAX models' tanh GELU: timm's outputs with act_layer='gelu_tanh'
        ref["pre_logits"] = load_file(str(FIXTURES / "official_more_jax_tanh.safetensors"))[f"{case}/pre_logits"]
    with torch.no_grad():
        pre = model.forward_head(model.forward_features(ref["input"]), pre_logits=True)
    assert (pre - ref["pre_logits"]).abs().max() <= 1e-5, f"{case}: the body changed with the head"


def test_no_head_asked_for() -> None:
    model = load(TIMM_FILE, num_classes=0)
    assert model.num_classes == 0 and isinstance(model.head, torch.nn.Identity)


def test_position_table_resampled_to_another_size() -> None:
    model = load(TIMM_FILE, img_size=80)  # 4x4 grid in the file, 5x5 in the model
    file_pos = load_file(str(TIMM_FILE))["pos_embed"]
    assert model.pos_embed.shape == (1, 1 + 25, 32)
    assert torch.equal(model.pos_embed[:, :1], file_pos[:, :1])  # the class token's entry is not on the grid
    assert model(torch.randn(1, 3, 80, 80)).shape == (1, 10)


@pytest.mark.parametrize("command", [
    ["explain", "img.png", "--checkpoint", "model.onnx"],
    ["analyze", "--checkpoint", "model.onnx", "--data", "digits"],
    ["finetune", "--from", "model.onnx", "--steps", "1"],
    ["finetune", "--from", "model.onnx", "--model", "vit_tiny_patch16_224", "--steps", "1"],
])
def test_an_onnx_file_where_a_pytorch_checkpoint_is_needed_is_named(tmp_path, monkeypatch, caplog, command):
    """An ONNX file given to a command that needs the PyTorch model: said so, not "add --model NAME"."""
    from vitlab.cli.main import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"not really onnx")
    assert main(command) == 2
    assert "model.onnx is an ONNX file" in caplog.text and "checkpoint it was exported from" in caplog.text
    import vitlab

    with pytest.raises(CheckpointError, match="is an ONNX file"):
        vitlab.load_model(tmp_path / "model.onnx")
