"""What a deployment that reads only the README and an ONNX file's metadata gets: the README serving snippet
decodes and resizes as vitlab does, the metadata says how to score and size the inputs, and the runtime
adapter refuses what it cannot answer correctly (needs the optional extra vitlab[export])."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torch import nn

pytest.importorskip("onnx", reason="ONNX export tests need the optional extra: pip install 'vitlab[export]'")
pytest.importorskip("onnxruntime", reason="ONNX export tests need the optional extra: pip install 'vitlab[export]'")

import vitlab
from dense_helpers import DETR_EXPORT, SETR_EXPORT
from vitlab.data import load_image
from vitlab.export import ExportError, InputSizeError, OnnxModel, export_onnx, read_metadata
from vitlab.export.onnx import _any_size_model, _set_metadata, metadata
from vitlab.export.runtime import METADATA_KEY

from model_helpers import make_tiny, perturb_

README = Path(__file__).resolve().parents[1] / "README.md"


# ------------------------------------------------------------------------------------------ helpers
def _readme_client(meta: dict[str, str]) -> dict:
    """The README serving snippet's ``decode`` and ``prepare``, run on the flat metadata ``meta`` as the
    snippet sets its globals from it."""
    code = next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "def decode(" in b)
    c, h, w = json.loads(meta["input_size"])
    ns = {"np": np, "Image": Image, "ImageOps": ImageOps, "json": json, "meta": meta, "c": c, "h": h, "w": w,
          "mean": np.float32(json.loads(meta["mean"])), "std": np.float32(json.loads(meta["std"])),
          "crop_pct": float(meta["crop_pct"]), "crop_mode": meta.get("crop_mode", "center"),
          "resample": {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                       "nearest": Image.NEAREST}[meta["interpolation"]]}
    for name in ("decode", "prepare"):
        exec(re.search(rf"^def {name}\(.*?(?=^\S)", code, re.S | re.M).group(0), ns)  # noqa: S102
    return ns


def _props(path: Path) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def _tiny(name: str = "vit_tiny_patch16_224", **over) -> nn.Module:
    return perturb_(make_tiny(name, **over), std=0.05).eval()


def _graph_file(path: Path, module: nn.Module, shape: tuple[int, ...], *, output_names: list[str],
                dynamic: dict[int, str] | None = None) -> Path:
    """A small ONNX file from another tool (no vitlab metadata), written by the TorchScript exporter."""
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.randn(*shape),), str(path), dynamo=False, input_names=["input"],
                          output_names=output_names, opset_version=17,
                          dynamic_axes={"input": dynamic} if dynamic else None)
    return path


class _Head(nn.Module):
    """Global average pooling and a linear layer: (B, C, H, W) -> (B, k); with ``features``, also the pooled
    features first, as a two-output file (features, logits)."""

    def __init__(self, c: int = 3, k: int = 5, features: bool = False) -> None:
        super().__init__()
        self.fc, self.features = nn.Linear(c, k), features

    def forward(self, x: torch.Tensor):
        f = x.mean((2, 3)) * 3
        return (f, self.fc(f)) if self.features else self.fc(f)


class _ChannelsLast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, 3)
        return self.fc(x.mean((1, 2)))


class _FixedReshape(nn.Module):
    """A graph that holds the traced size as a constant: another size fails inside ONNX Runtime."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.reshape(1, 3 * 8 * 8))


# ------------------------------------------------------------------------------------ 1. decoding
def test_readme_decode_applies_exif_orientation_like_load_image(tmp_path):
    """A phone photo stored sideways (EXIF orientation 3: upside down, 6: a quarter turn) decodes in the README
    snippet as in vitlab: the pixels of the rotated image."""
    client = _readme_client({"input_size": "[3, 32, 32]", "mean": "[0.5]", "std": "[0.5]", "crop_pct": "1.0",
                             "interpolation": "bilinear"})
    yy, xx = np.mgrid[0:30, 0:40]
    img = Image.fromarray(np.uint8(np.stack([xx * 6, yy * 8, xx + yy], -1) % 256))
    for orientation in (3, 6):
        exif = img.getexif()
        exif[0x0112] = orientation
        path = tmp_path / f"exif{orientation}.jpg"
        img.save(path, quality=95, exif=exif.tobytes())
        ours = load_image(path).permute(1, 2, 0).numpy()
        got = np.asarray(client["decode"](path))
        assert got.shape == ours.shape and np.array_equal(got, ours), orientation


def test_readme_decode_scales_float_tiffs_like_load_image(tmp_path):
    """A 32-bit float TIFF with values in [0, 1] is scaled by 255, as vitlab does (not clipped to 0 / 1)."""
    client = _readme_client({"input_size": "[1, 32, 32]", "mean": "[0.5]", "std": "[0.5]", "crop_pct": "1.0",
                             "interpolation": "bilinear"})
    yy, xx = np.mgrid[0:30, 0:40]
    path = tmp_path / "float.tif"
    Image.fromarray(np.float32((yy + xx) / 68.0)).save(path)
    ours = load_image(path)[0].numpy()
    got = np.asarray(client["decode"](path))
    assert ours.max() > 200 and np.array_equal(got, ours)


# ----------------------------------------------------------------- a dynamic-size multi-label ViT
@pytest.fixture(scope="module")
def multilabel_vit(tmp_path_factory) -> tuple[nn.Module, Path]:
    """A tiny ViT scored with a sigmoid (a multi-label Hugging Face checkpoint's ``score_function``), exported
    with a dynamic batch and size."""
    model = _tiny()
    model.score_function = "sigmoid"
    path = tmp_path_factory.mktemp("ml") / "ml.onnx"
    export_onnx(model, path, dynamic_batch=True, dynamic_size=True, num_images=4, timing=False)
    return model, path


# ------------------------------------------------------------------------------- 2. score function
def test_multi_label_file_says_sigmoid_in_its_plain_keys(multilabel_vit):
    _, path = multilabel_vit
    props = _props(path)
    assert props["score_function"] == "sigmoid"
    meaning = json.loads(props["outputs"])["logits"]
    assert "sigmoid" in meaning and "softmax over" not in meaning
    record = read_metadata(path)
    assert record["score_function"] == "sigmoid" and record["output"]["meaning"] == meaning
    assert OnnxModel(path).score_function == "sigmoid"


@pytest.mark.parametrize(("score", "word"), [("softmax", "softmax over the classes"), ("none", "raw scores")])
def test_output_meaning_follows_the_score_function(score, word):
    model = _tiny()
    model.score_function = score
    props = metadata(model, model.preprocessing, class_names=None, dynamic_batch=False, dynamic_size=False, int8=False)
    assert props["score_function"] == score and word in json.loads(props["outputs"])["logits"]


# -------------------------------------------------------------------------------------- 3. Mixer
def test_mixer_refusal_does_not_send_users_to_img_size(tmp_path):
    """MLP-Mixer's --dynamic-size refusal names what works (its own size, images resized to it); --img-size,
    which the old text suggested, is indeed refused."""
    model = _tiny("mixer_s16_224")
    with pytest.raises(ExportError, match="--dynamic-size is not supported") as e:
        export_onnx(model, tmp_path / "m.onnx", dynamic_size=True, num_images=2, timing=False)
    text = str(e.value)
    assert "export another fixed size with --img-size" not in text
    assert "--img-size is refused" in text and "resize images to it" in text
    with pytest.raises(Exception, match="input size is fixed by its weights"):
        export_onnx(model, tmp_path / "m.onnx", img_size=48, num_images=2, timing=False)


# ----------------------------------------------------------------------------- 4. dynamic sizes
def test_dynamic_size_file_refuses_the_sizes_pytorch_refuses(multilabel_vit):
    """37 x 50 is not a multiple of the ViT's 16-pixel patch: PyTorch refuses it, and so does the file (its
    graph would return the top-left 32 x 48 crop's logits); the sizes it takes are in its metadata."""
    model, path = multilabel_vit
    props = _props(path)
    assert json.loads(props["size_multiple"]) == [16, 16] and json.loads(props["min_size"]) == [16, 16]
    m = OnnxModel(path)
    dyn = _any_size_model(model)
    x = torch.randn(2, 3, 37, 50, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        dyn(x)
    with pytest.raises(InputSizeError, match=r"multiples of 16x16.*got 37x50.*48x64"):
        m(x)
    with pytest.raises(InputSizeError, match=r"at least 16x16.*got 0x16"):
        m(torch.zeros(1, 3, 0, 16))
    x = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(1))  # a size it takes: PyTorch's numbers
    with torch.no_grad():
        torch.testing.assert_close(m(x), dyn(x), atol=1e-4, rtol=1e-4)


def _without_size_rule(props: dict[str, str]) -> dict[str, str]:
    """A file's metadata as a vitlab from before the size rule wrote it."""
    record = json.loads(props[METADATA_KEY])
    for key in ("size_multiple", "min_size"):
        record["input"].pop(key, None)
    return {**{k: v for k, v in props.items() if k not in ("size_multiple", "min_size")},
            METADATA_KEY: json.dumps(record)}


def test_a_dynamic_size_file_without_a_size_rule_gets_it_from_its_model(multilabel_vit, tmp_path, caplog):
    """A file exported before the size rule was recorded took 37 x 50 silently (the top-left 32 x 48 crop's
    logits); the rule is now worked out from the model its metadata describes, and the size refused."""
    import shutil

    _, path = multilabel_vit
    old = tmp_path / "old.onnx"
    shutil.copy(path, old)
    _set_metadata(str(old), _without_size_rule(_props(path)))
    assert "size_multiple" not in read_metadata(old)["input"]
    with caplog.at_level(logging.INFO, logger="vitlab.export.runtime"):
        m = OnnxModel(old)
    assert "worked out from its model: multiples of 16x16" in caplog.text
    with pytest.raises(InputSizeError, match=r"multiples of 16x16.*got 37x50"):
        m(torch.randn(1, 3, 37, 50))
    assert m(torch.randn(1, 3, 48, 64)).shape == (1, 5)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "mobilevit_xxs",
                                  "vit_base_r50_s16_224", "cct_7_3x1_32", "xcit_nano_12_p16_224", "resnet18",
                                  "detr_resnet50", "setr_naive_vit_small_patch16"])
def test_the_size_rule_worked_out_on_the_meta_device_equals_exports(name):
    """The rule rebuilt from an old file's metadata (a model on the meta device, no weights) is the one export
    records from the real model."""
    from vitlab.export.onnx import size_rule
    from vitlab.export.runtime import _derived_size_rule

    over = {"detr_resnet50": DETR_EXPORT, "setr_naive_vit_small_patch16": SETR_EXPORT}.get(name, {})
    if name.startswith("swin"):
        over = {"img_size": 64, "window_size": 4}
    model = _any_size_model(_tiny(name, **over))
    c, h, w = model.preprocessing.input_size
    rule = size_rule(model, c, h, w)
    props = metadata(model, model.preprocessing, class_names=None, dynamic_batch=True, dynamic_size=True,
                     int8=False)
    derived = _derived_size_rule(json.loads(_without_size_rule(props)[METADATA_KEY]), Path("old.onnx"))
    assert derived == {"size_multiple": rule["multiple"], "min_size": rule["min"]}


def test_size_rule_per_family():
    """Families that pad or resize per input take any size; a hybrid's stem needs more than one patch."""
    from vitlab.export.onnx import size_rule

    for name, over in [("swin_tiny_patch4_window7_224", {"img_size": 64, "window_size": 4}), ("resnet18", {}),
                       ("cct_7_3x1_32", {})]:
        m = _any_size_model(_tiny(name, **over))
        assert size_rule(m, *m.preprocessing.input_size) == {"multiple": [1, 1], "min": [1, 1]}, name
    m = _any_size_model(_tiny("vit_base_r50_s16_224"))
    assert size_rule(m, *m.preprocessing.input_size) == {"multiple": [16, 16], "min": [32, 32]}


def test_onnx_runtime_shape_failures_come_back_as_input_size_errors(tmp_path, caplog):
    """A node that cannot take a size fails inside ONNX Runtime ('FAIL : Non-zero status code ... Reshape');
    the adapter says it is the input size, with ONNX Runtime's text."""
    path = _graph_file(tmp_path / "r.onnx", _FixedReshape(), (1, 3, 8, 8), output_names=["logits"],
                       dynamic={2: "height", 3: "width"})
    with caplog.at_level(logging.WARNING):
        m = OnnxModel(path)
    assert m(torch.randn(1, 3, 8, 8)).shape == (1, 5)
    with pytest.raises(InputSizeError, match=r"cannot run this graph on an input of shape \(1, 3, 8, 16\).*Reshape"):
        m(torch.randn(1, 3, 8, 16))


# ------------------------------------------------------------------------ 5. dense preprocessing
def _non_square_png(path: Path, c: int) -> Path:
    yy, xx = np.mgrid[0:45, 0:80]
    a = np.stack([xx * 3, yy * 5, xx + 2 * yy], -1) % 256
    Image.fromarray(np.uint8(a[..., 0] if c == 1 else a)).save(path)
    return path


def _assert_client_feeds_what_vitlab_feeds(path: Path, image: Path) -> None:
    """The README client following the file's metadata prepares ``image`` as vitlab's ``transform_for``
    prepares it for this file (same size; values within Pillow's 8-bit rounding)."""
    from vitlab.tasks.run import transform_for

    onnx_model = OnnxModel(path)
    ours = transform_for(onnx_model, train=False)({"image": load_image(image)})["image"].numpy()
    theirs = _readme_client(_props(path))["prepare"](image)
    assert theirs.shape == ours.shape
    std = float(json.loads(_props(path)["std"])[0])
    assert np.abs(theirs - ours).mean() < 1.5 / 255 / std and np.abs(theirs - ours).max() < 4 / 255 / std


def test_dynamic_detr_metadata_says_shorter_side_and_a_client_follows_it(tmp_path):
    """A dynamic-size DETR is fed its image with the shorter side at the input size, the longer capped (5/3),
    no crop: the metadata says so, and a client following it feeds the same tensor on a 45 x 80 image."""
    torch.manual_seed(0)
    model = perturb_(vitlab.create_model("detr_resnet50", **DETR_EXPORT), std=0.05).eval()
    path = tmp_path / "detr.onnx"
    export_onnx(model, path, dynamic_size=True, num_images=2, timing=False)
    props = _props(path)
    assert props["crop_mode"] == "none" and props["interpolation"] == "bilinear"
    assert (props["resize_shorter"], props["max_size"]) == ("32", "53")
    assert read_metadata(path)["input"]["resize"]["mode"] == "shorter_side"
    _assert_client_feeds_what_vitlab_feeds(path, _non_square_png(tmp_path / "wide.png", 1))


def _with_metadata(tmp_path: Path, model: nn.Module, name: str, *, dynamic_size: bool) -> Path:
    """A small graph with ``model``'s export metadata: what vitlab's transform for the file does depends only on
    that (the task, the input size), not on the graph."""
    c, h, w = model.preprocessing.input_size
    path = _graph_file(tmp_path / f"{name}.onnx", _Head(c, 4), (1, c, h, w), output_names=["logits"],
                       dynamic={2: "height", 3: "width"} if dynamic_size else None)
    _set_metadata(str(path), metadata(model, model.preprocessing, class_names=None, dynamic_batch=False,
                                      dynamic_size=dynamic_size, int8=False))
    return path


@pytest.mark.parametrize("name", ["setr", "detr"])
def test_squashed_dense_metadata_says_squash_and_a_client_follows_it(name, tmp_path):
    """SETR (fixed or dynamic) and a fixed-size DETR are fed their images squashed to the input size."""
    model = (vitlab.create_model("setr_naive_vit_small_patch16", **SETR_EXPORT) if name == "setr"
             else vitlab.create_model("detr_resnet50", **DETR_EXPORT)).eval()
    for dynamic in ([False, True] if name == "setr" else [False]):
        path = _with_metadata(tmp_path, model, f"{name}{dynamic}", dynamic_size=dynamic)
        props = _props(path)
        assert props["crop_mode"] == "squash" and props["crop_pct"] == "1.0" and props["interpolation"] == "bilinear"
        _assert_client_feeds_what_vitlab_feeds(path, _non_square_png(tmp_path / "wide.png", 1))


def test_fixed_size_detector_warns_once_that_it_squashes(tmp_path, caplog, monkeypatch):
    import vitlab.export.runtime as runtime

    monkeypatch.setattr(runtime, "_warned_detectors", set())
    path = _with_metadata(tmp_path, vitlab.create_model("detr_resnet50", **DETR_EXPORT).eval(), "detr",
                          dynamic_size=False)
    with caplog.at_level(logging.WARNING, logger="vitlab"):
        OnnxModel(path)
        OnnxModel(path)
    said = [r.getMessage() for r in caplog.records if "without keeping its aspect" in r.getMessage()]
    assert len(said) == 1 and "--dynamic-size" in said[0]


# -------------------------------------------------------------------------------------------- 6. int8
def test_int8_gate_measures_each_image_alone_and_reports_the_batching_effect(tmp_path):
    """With --dynamic-batch, ONNX Runtime scales the int8 activations over the whole batch; the gate measures
    what the file answers for each image alone, so its verdict is the same with and without a dynamic batch,
    and the batching effect is reported apart."""
    model = _tiny()
    fixed = export_onnx(model, tmp_path / "f.onnx", int8=True, num_images=16, timing=False, min_agreement=0.0)
    dyn = export_onnx(model, tmp_path / "d.onnx", int8=True, dynamic_batch=True, num_images=16, timing=False,
                      min_agreement=0.0)
    assert dyn.int8_top1_agreement == fixed.int8_top1_agreement
    assert dyn.int8_max_abs_diff == pytest.approx(fixed.int8_max_abs_diff, rel=1e-5, abs=1e-6)
    assert fixed.int8_batched_max_abs_diff is None and fixed.int8_batched_agreement is None
    assert dyn.int8_batched_max_abs_diff > 0 and 0 <= dyn.int8_batched_agreement <= 1
    assert "int8 batching effect" in dyn.format() and "depend on the other images" in dyn.format()
    assert dyn.to_dict()["int8_batched_max_abs_diff"] == dyn.int8_batched_max_abs_diff


# ----------------------------------------------------------------------------------- 7. foreign files
def test_foreign_channels_last_file_is_refused_naming_nchw(tmp_path):
    path = _graph_file(tmp_path / "nhwc.onnx", _ChannelsLast(), (1, 32, 32, 3), output_names=["logits"])
    with pytest.raises(ValueError, match=r"\(1, 32, 32, 3\), channels last \(NHWC.*NCHW"):
        OnnxModel(path)


def test_foreign_file_with_features_and_logits_is_scored_on_the_logits(tmp_path):
    head = _Head(3, 5, features=True).eval()
    path = _graph_file(tmp_path / "two.onnx", head, (1, 3, 16, 16), output_names=["feat", "logits"],
                       dynamic={0: "batch"})
    m = OnnxModel(path)
    assert m.num_classes == 5 and m.logits_name == "logits"
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(m(x), head(x)[1], atol=1e-5, rtol=1e-5)
    path = _graph_file(tmp_path / "ab.onnx", head, (1, 3, 16, 16), output_names=["a", "b"])
    with pytest.raises(ValueError, match=r"2 outputs \('a', 'b'\).*cannot tell which holds the class logits"):
        OnnxModel(path)


def test_foreign_file_warning_names_the_preprocessing_it_assumes(tmp_path, caplog):
    path = _graph_file(tmp_path / "f.onnx", _Head(), (1, 3, 32, 32), output_names=["logits"])
    with caplog.at_level(logging.WARNING):
        m = OnnxModel(path)
    text = caplog.text
    assert "no vitlab metadata" in text and "ImageNet-style" not in text
    assert "32x32" in text and "mean (0.5, 0.5, 0.5), std (0.5, 0.5, 0.5)" in text
    assert m.preprocessing.mean == (0.5, 0.5, 0.5)


# ------------------------------------------------------------------------------------ 8. eval's hint
def test_eval_hint_for_an_onnx_file_does_not_suggest_finetuning_it():
    from vitlab.cli.eval import class_mapping

    model = SimpleNamespace(class_names=["cat", "dog"], num_classes=2)
    with pytest.raises(ValueError) as e:
        class_mapping(model, ["apple", "pear", "fig"], "exported.onnx", "data")
    assert "finetune --from exported.onnx" not in str(e.value) and "exported from" in str(e.value)
    with pytest.raises(ValueError) as e:
        class_mapping(SimpleNamespace(class_names=[], num_classes=2), ["a", "b", "c"], "exported.onnx", "data")
    assert "finetune --from exported.onnx" not in str(e.value) and "export it again" in str(e.value)
    with pytest.raises(ValueError, match="vitlab finetune --from model.safetensors --data data"):
        class_mapping(model, ["apple", "pear", "fig"], "model.safetensors", "data")


# ------------------------------------------------------------------------------------------- minor
class _Attention(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(x, x, x).mean((1, 2, 3))[:, None]


def test_failed_old_opset_export_keeps_the_graph_dump_out_of_the_output(tmp_path, capfd):
    """The TorchScript exporter prints its whole IR graph (from C++) when an opset lacks an operator; only the
    error, with a short excerpt, reaches the user."""
    from vitlab.export.onnx import export_graph

    with pytest.raises(ExportError, match=r"opset version 11 is not supported.*the exporter printed \d+ lines"):
        export_graph(_Attention(), torch.randn(1, 2, 4, 8), str(tmp_path / "a.onnx"), dynamic_batch=False,
                     dynamic_size=False, opset=11)
    out, err = capfd.readouterr()
    assert "Torch IR graph" not in out + err and "graph(" not in out + err


def test_too_new_opset_message_names_the_default_opset(tmp_path):
    pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript")
    from torch.onnx import _constants

    from vitlab.export.onnx import export_graph

    with pytest.raises(ExportError) as e:
        export_graph(_Head(), torch.randn(1, 3, 8, 8), str(tmp_path / "h.onnx"), dynamic_batch=False,
                     dynamic_size=False, opset=99)
    text = str(e.value)
    assert "does not support opset 99" in text and "wrote opset 18 instead" not in text
    assert f"writes opset {_constants.ONNX_DEFAULT_OPSET}" in text


def test_benchmark_checks_every_models_options_before_timing(monkeypatch):
    import vitlab.benchmark as bench
    import vitlab.models.factory as factory

    def no_timing(*args, **kwargs):
        raise AssertionError("a model was built or timed before every model's options were checked")

    monkeypatch.setattr(bench, "make_infer_step", no_timing)
    monkeypatch.setattr(factory, "create_model", no_timing)
    for run in (lambda: bench.benchmark_models(["vit_tiny_patch16_224", "resnet18"], overrides={"num_heads": 2}),
                lambda: bench.benchmark_runtimes(["vit_tiny_patch16_224", "resnet18"], ["torch"],
                                                 overrides={"num_heads": 2})):
        with pytest.raises(TypeError, match=r"create_model\('resnet18'\): unknown option\(s\) \['num_heads'\]"):
            run()
