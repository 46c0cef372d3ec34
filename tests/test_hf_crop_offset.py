"""Where the centre crop starts on an odd margin: Hugging Face's processors at ``margin // 2``, timm at
``round(margin / 2)`` (``Preprocessing.crop_offset``).

References: ``fixtures/hf_crop_offset/`` (``fixtures/make_fixtures_hf_crop_offset.py``): transformers' processors
(torchvision and Pillow backends) and timm's eval transform on 50x61, 61x50 and 57x57 images whose resized sides
leave margins of 3, 7 or 11 pixels (one pixel apart between the two rules). vitlab resizes floats, transformers
uint8 images: the largest difference left is 0.10 in normalised units (CLIP's bicubic resize), the mean 0.005;
a crop one pixel off gives a mean difference of 0.17 to 0.76.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import vitlab
from vitlab.checkpoints.hf_processor import processor_style
from vitlab.data import eval_transform, load_image
from vitlab.data.functional import center_crop
from vitlab.models.base import Preprocessing

torch.set_num_threads(1)

FIX = Path(__file__).parent / "fixtures"
DIR = FIX / "hf_crop_offset"
META = json.loads((DIR / "cases.json").read_text())
PIXELS = dict(np.load(DIR / "pixels.npz"))
DEIT_HF = FIX / "deit_hf_plain_tiny"  # a transformers DeiTForImageClassification folder, 32 px, 10 labels
README = Path(__file__).resolve().parents[1] / "README.md"
CROPPING = ["mobilevit", "clip", "deit", "convnext"]  # processors with a centre crop


def _pre(name: str) -> Preprocessing:
    case = META["cases"][name]
    style, notes = processor_style(case["config"], tuple(case["input_size"]))
    assert notes == []
    return Preprocessing(input_size=(3, *case["input_size"]), **style)


def _assert_close(ours: np.ndarray, theirs: np.ndarray, what: object) -> None:
    diff = np.abs(ours - theirs)
    assert diff.mean() < 0.01 and diff.max() < 0.15, (what, float(diff.mean()), float(diff.max()))


def test_center_crop_offsets() -> None:
    x = torch.arange(7 * 9).view(1, 7, 9)  # margins 3 (rows) and 5 (columns) around a 4 x 4 crop
    assert center_crop(x, (4, 4))[0, 0, 0] == x[0, 2, 2]  # round(1.5) = 2, round(2.5) = 2 (half to even)
    assert center_crop(x, (4, 4), "floor")[0, 0, 0] == x[0, 1, 2]
    with pytest.raises(ValueError, match="offset must be 'round' or 'floor'"):
        center_crop(x, (4, 4), "ceil")
    with pytest.raises(ValueError, match="crop_offset must be 'round' or 'floor'"):
        Preprocessing(crop_offset="ceil")


@pytest.mark.parametrize("name", CROPPING)
def test_cropping_processors_set_floor(name: str) -> None:
    assert _pre(name).crop_offset == "floor"
    assert _pre("vit").crop_offset == "round"  # no crop: nothing to place, the default stands


@pytest.mark.parametrize("backend", ["", "_pil"])
@pytest.mark.parametrize("name", CROPPING)
def test_eval_transform_gives_the_processors_pixels_on_odd_margins(name: str, backend: str) -> None:
    t = eval_transform(_pre(name))
    for i, image in enumerate(META["images"]):
        _assert_close(t(load_image(DIR / image)).numpy(), PIXELS[name + backend][i], (name + backend, image))


def test_vitlab_default_stays_timms_round() -> None:
    """timm's eval transform (32 px, crop_pct 1.0) on the 50x61 / 61x50 images: margin 7, round(3.5) = 4."""
    zero_one = {"mean": (0.0,), "std": (1.0,), "crop_pct": 1.0, "input_size": (3, 32, 32)}
    for interpolation, atol in (("nearest", 1e-6), ("bilinear", 2.5 / 255)):
        pre = Preprocessing(interpolation=interpolation, **zero_one)
        assert pre.crop_offset == "round"
        for i, image in enumerate(META["images"][:2]):
            theirs = PIXELS[f"timm_{interpolation}"][i]
            ours = eval_transform(pre)(load_image(DIR / image)).numpy()
            assert np.abs(ours - theirs).max() <= atol, (interpolation, image)
            floor = eval_transform(replace(pre, crop_offset="floor"))(load_image(DIR / image)).numpy()
            assert np.abs(floor - theirs).mean() > 0.05  # the fixture tells the two rules apart


# ------------------------------------------------------------------ a Hugging Face folder, saved and exported
def _readme_prepare(meta: dict[str, str]):
    """The README serving snippet's ``prepare`` (and ``decode``), on the flat ONNX metadata ``meta``."""
    code = next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "def decode(" in b)
    c, h, w = json.loads(meta["input_size"])
    ns = {"np": np, "Image": Image, "ImageOps": ImageOps, "json": json, "meta": meta, "c": c, "h": h, "w": w,
          "mean": np.float32(json.loads(meta["mean"])), "std": np.float32(json.loads(meta["std"])),
          "crop_pct": float(meta["crop_pct"]), "crop_mode": meta.get("crop_mode", "center"),
          "resample": {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                       "nearest": Image.NEAREST}[meta["interpolation"]]}
    for name in ("decode", "prepare"):
        exec(re.search(rf"^def {name}\(.*?(?=^\S)", code, re.S | re.M).group(0), ns)  # noqa: S102
    return ns["prepare"]


@pytest.fixture(scope="module")
def deit_folder(tmp_path_factory) -> Path:
    """The tiny DeiT folder with the DeiT processor of the fixtures (both sides to 35, crop 32: margin 3)."""
    folder = tmp_path_factory.mktemp("hf") / "deit"
    shutil.copytree(DEIT_HF, folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(META["cases"]["deit"]["config"]))
    return folder


def test_hf_folder_crop_offset_survives_a_vitlab_checkpoint(deit_folder: Path, tmp_path: Path) -> None:
    model = vitlab.load_model(deit_folder)
    assert model.preprocessing.crop_offset == "floor"
    saved = vitlab.load_model(vitlab.save_model(model, tmp_path / "model.safetensors"))
    assert saved.preprocessing == model.preprocessing
    t = eval_transform(saved.preprocessing)
    for i, image in enumerate(META["images"]):
        _assert_close(t(load_image(DIR / image)).numpy(), PIXELS["deit"][i], image)


def test_onnx_metadata_carries_crop_offset_and_clients_follow_it(deit_folder: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnx", reason="ONNX export tests need the optional extra: pip install 'vitlab[export]'")
    pytest.importorskip("onnxruntime", reason="ONNX export tests need the optional extra: pip install 'vitlab[export]'")
    import onnx

    from vitlab.export import OnnxModel, export_onnx, preprocess
    from vitlab.export.onnx import _set_metadata

    path = tmp_path / "deit.onnx"
    export_onnx(vitlab.load_model(deit_folder), path, num_images=2, timing=False)
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props["crop_offset"] == "floor"
    pre = OnnxModel(path).preprocessing
    assert pre.crop_offset == "floor"
    ours = preprocess([DIR / image for image in META["images"]], pre).numpy()
    prepare = _readme_prepare(props)
    for i, image in enumerate(META["images"]):
        _assert_close(ours[i], PIXELS["deit"][i], ("preprocess", image))
        _assert_close(prepare(DIR / image), PIXELS["deit_pil"][i], ("README prepare", image))

    # a file written before the key existed reads as "round", in vitlab and in the README client
    record = json.loads(props["vitlab"])
    del record["preprocessing"]["crop_offset"]
    old = {k: v for k, v in props.items() if k != "crop_offset"} | {"vitlab": json.dumps(record)}
    _set_metadata(str(path), old)
    assert OnnxModel(path).preprocessing.crop_offset == "round"
    x = _readme_prepare(old)(DIR / META["images"][0])
    assert np.abs(x - PIXELS["deit_pil"][0]).mean() > 0.1  # the timm placement, a pixel off the processor's
