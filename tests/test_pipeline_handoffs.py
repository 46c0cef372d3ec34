"""What one vitlab command writes, the next one reads as it was meant: a backbone's ONNX file is a feature extractor
(marked so, refused by predict, probed by eval), and a single-file timm export loads back as its checkpoint."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitlab
from eval_helpers import grey_class_folders
from vitlab.checkpoints import CheckpointError, save_timm, to_timm_state_dict
from vitlab.cli.main import main
from vitlab.export import OnnxModel, export_onnx

from model_helpers import perturb_

pytest.importorskip("onnxruntime")
torch.set_num_threads(1)

TINY_VIT = dict(img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2, in_chans=1, mean=(0.5,), std=(0.5,))
BACKBONE_REFUSAL = "a backbone without a classifier (no classes to predict)"


def _vit(num_classes: int) -> torch.nn.Module:
    return perturb_(vitlab.create_model("vit_tiny_patch16_224", num_classes=num_classes, **TINY_VIT), std=0.2).eval()


def _image(path: Path) -> Path:
    Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).save(path)
    return path


def _onnx_props(path: Path) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def _rewrite_metadata(path: Path, edit) -> None:
    """``edit(flat, record)`` applied to an ONNX file's metadata (a file from an older vitlab, or a damaged one)."""
    import onnx

    proto = onnx.load(str(path))
    flat = {p.key: p.value for p in proto.metadata_props}
    record = json.loads(flat["vitlab"])
    edit(flat, record)
    flat["vitlab"] = json.dumps(record)
    del proto.metadata_props[:]
    for k, v in flat.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(proto, str(path))


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> tuple[Path, Path]:
    """(vitlab checkpoint, ONNX file) of a ViT without a classifier (num_classes=0, as MAE / DINO / BEiT write)."""
    folder = tmp_path_factory.mktemp("backbone")
    model = _vit(0)
    ckpt = vitlab.save_model(model, folder / "backbone.safetensors")
    report = export_onnx(model, folder / "backbone.onnx", timing=False, num_images=4)
    assert report.task == "features" and "exported features" in report.format()
    return ckpt, folder / "backbone.onnx"


# ------------------------------------------------------------------------------ a backbone's ONNX file
def test_backbone_onnx_is_marked_as_a_feature_extractor(backbone):
    """A deployment reading the flat keys learns that the output is features, not class logits."""
    props = _onnx_props(backbone[1])
    assert props["task"] == "features" and props["score_function"] == "none" and props["num_classes"] == "0"
    assert json.loads(props["class_names"]) is None
    assert json.loads(props["outputs"])["logits"].startswith("features (batch, dim)")
    record = json.loads(props["vitlab"])
    assert (record["task"], record["num_classes"], record["score_function"]) == ("features", 0, "none")
    m = OnnxModel(backbone[1])
    assert m.features and m.num_classes == 0 and m.class_names == [] and m.task == "classification"


def test_predict_refuses_a_backbone_onnx_as_it_refuses_its_checkpoint(backbone, tmp_path, caplog, capsys):
    img = _image(tmp_path / "x.png")
    for source in backbone:
        caplog.clear()
        assert main(["predict", "--checkpoint", str(source), str(img), "--threads", "1"]) == 2
        assert f"{source}: {BACKBONE_REFUSAL}" in caplog.text
    assert "%" not in capsys.readouterr().out  # no softmax "percentages" of feature dimensions
    with pytest.raises(ValueError, match="backbone without a classifier"):
        vitlab.predict(backbone[1], str(img))


def test_a_backbone_onnx_from_an_older_vitlab_is_refused_too(backbone, tmp_path, caplog):
    """Written before the marker: task "classification", softmax, num_classes 0 in the record, no class names."""
    old = tmp_path / "old.onnx"
    old.write_bytes(backbone[1].read_bytes())

    def unmark(flat: dict, record: dict) -> None:
        flat.update(task="classification", score_function="softmax")
        flat.pop("num_classes")
        record.update(task="classification", score_function="softmax")

    _rewrite_metadata(old, unmark)
    assert OnnxModel(old).num_classes == 0
    assert main(["predict", "--checkpoint", str(old), str(_image(tmp_path / "x.png")), "--threads", "1"]) == 2
    assert BACKBONE_REFUSAL in caplog.text


def test_an_onnx_file_whose_logits_and_class_names_disagree_is_refused(tmp_path, caplog, capsys):
    path = tmp_path / "c.onnx"
    export_onnx(_vit(3), path, timing=False, num_images=4)
    _rewrite_metadata(path, lambda flat, record: record.update(class_names=list("abcde"), num_classes=5))
    with pytest.raises(ValueError, match="has 3 values per image but its metadata records 5 class names and "
                                         "num_classes 5"):
        OnnxModel(path)
    assert main(["predict", "--checkpoint", str(path), str(_image(tmp_path / "x.png")), "--threads", "1"]) == 2
    assert "cannot be read as class scores" in caplog.text and "%" not in capsys.readouterr().out


def test_eval_probes_a_backbone_onnx_by_knn_as_its_checkpoint(backbone, tmp_path, capsys):
    """eval's auto protocol for a backbone (k-NN on its features) runs on its ONNX file too, with the same result."""
    data = grey_class_folders(tmp_path / "data", {"dark": 30, "mid": 120, "bright": 220}, n=6)
    got = []
    for i, source in enumerate(backbone):
        assert main(["eval", "--checkpoint", str(source), "--data", str(data), "--output", str(tmp_path / f"e{i}"),
                     "--json", "--threads", "1"]) == 0
        got.append(json.loads(capsys.readouterr().out))
    for r in got:
        r.pop("checkpoint")
    assert got[0]["protocol"] == "knn" and got[0] == got[1]


# ------------------------------------------------------------------------------ a single-file timm export
TIMM_CASES = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, depth=2, embed_dim=64, num_heads=4, num_classes=5)),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=32, depth=2, embed_dim=64, num_heads=4,
                                                                num_classes=5)),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=32, depths=(2, 1), embed_dim=16, num_heads=(2, 2),
                                                 window_size=8, num_classes=5)),
    # a distillation token added by an option: timm's name (deit_small_distilled_...) says it, vitlab's does not
    "deit_made_distilled": ("deit_small_patch16_224", dict(img_size=32, depth=2, embed_dim=64, num_heads=4,
                                                           num_classes=5, distilled=True)),
}
LOADED_AS = {"deit_made_distilled": "deit_small_distilled_patch16_224"}


def _timm_export(case: str, path: Path) -> torch.nn.Module:
    name, overrides = TIMM_CASES[case]
    model = perturb_(vitlab.create_model(name, crop_mode="squash", interpolation="bilinear", crop_offset="floor",
                                         **overrides),
                     std=0.05).eval()
    model.class_names = [f"class {i}" for i in range(5)]
    save_timm(model, path)
    return model


def _architecture(model: torch.nn.Module) -> dict:
    """The config without its preprocessing fields (compared as ``model.preprocessing``)."""
    return {k: v for k, v in dataclasses.asdict(model.cfg).items() if k not in ("mean", "std", "crop_pct",
                                                                                "interpolation")}


@pytest.mark.parametrize("case", sorted(TIMM_CASES))
def test_timm_export_file_loads_back_as_its_checkpoint(case, tmp_path):
    """The file's timm_kwargs, class names and preprocessing are read, as a timm hub folder's config.json: the
    model and its outputs are the exported one's, named or not (the name alone builds the default size)."""
    model = _timm_export(case, tmp_path / "m.safetensors")
    x = torch.randn(2, *model.preprocessing.input_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
    loaded_as = LOADED_AS.get(case, model.model_name)
    for named in (None, loaded_as):
        again = vitlab.load_model(tmp_path / "m.safetensors", model_name=named).eval()
        assert again.model_name == loaded_as and _architecture(again) == _architecture(model)
        assert again.class_names == model.class_names and again.preprocessing == model.preprocessing
        with torch.no_grad():
            torch.testing.assert_close(again(x), ref, atol=1e-6, rtol=0)


def test_predict_and_a_teacher_read_a_timm_export(tmp_path, capsys):
    model = _timm_export("vit", tmp_path / "t.safetensors")
    vitlab.save_model(model, tmp_path / "own.safetensors")
    img = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(img)
    printed = []
    for source in ("own.safetensors", "t.safetensors"):
        assert main(["predict", "--checkpoint", str(tmp_path / source), str(img), "--json", "--threads", "1"]) == 0
        printed.append(json.loads(capsys.readouterr().out)[0]["predictions"])
    assert printed[0] == printed[1] and printed[1][0]["class"].startswith("class ")
    teacher = tmp_path / "teacher.safetensors"
    save_timm(vitlab.create_model("vit_tiny_patch16_224", img_size=32, depth=1, embed_dim=16, num_heads=2,
                                  num_classes=10), teacher)
    out = tmp_path / "student"
    assert main(["train", "--model", "deit_tiny_distilled_patch16_224", "--img-size", "8", "--set",
                 "model_overrides.patch_size=4", "--set", "model_overrides.depth=1", "--set",
                 "model_overrides.embed_dim=16", "--set", "model_overrides.num_heads=2", "--steps", "1",
                 "--batch-size", "8", "--threads", "1", "--no-progress", "--teacher", str(teacher),
                 "--output", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["steps"] == 1


def test_a_timm_export_of_an_unknown_model_names_it(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "x.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={"format": "timm", "timm_model": "resnet_like_thing",
                                                          "timm_kwargs": "{}", "vitlab_model": "no_such_model"})
    with pytest.raises(CheckpointError, match="a timm export of 'no_such_model'.*--model NAME"):
        vitlab.load_model(path)


def test_a_load_for_the_checkpoints_own_classes_never_replaces_its_head(tmp_path, caplog):
    """Weights of another width named with --model: the mismatch error, and no message that a head was replaced (predict, eval, export and a teacher load with the checkpoint's own classes)."""
    from safetensors.torch import save_file

    narrow = vitlab.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=16, depth=1,
                                 num_heads=2, num_classes=5)
    path = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in to_timm_state_dict(narrow).items()}, str(path))
    with caplog.at_level(logging.INFO, logger="vitlab"):
        with pytest.raises(CheckpointError, match="does not fit vit_tiny_patch16_224"):
            vitlab.load_model(path, model_name="vit_tiny_patch16_224", img_size=16, patch_size=4, depth=1,
                              num_heads=2)
    assert "replaced" not in caplog.text and "zero-initialised" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vitlab"):  # a head for other classes asked for: still a new head
        model = vitlab.load_model(path, model_name="vit_tiny_patch16_224", img_size=16, patch_size=4, depth=1,
                                  num_heads=2, embed_dim=16, num_classes=7)
    assert model.num_classes == 7 and "classifier head replaced by a zero-initialised one" in caplog.text
