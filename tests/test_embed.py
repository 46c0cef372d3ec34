"""Embeddings: ``vitlab.embed`` and ``vitlab embed`` against timm, each other, and their promises.

Fixtures: tests/fixtures/embed/make_fixtures_embed.py (peer environment) gives timm 1.0.31's
``forward_head(forward_features(x), pre_logits=True)`` of the tiny timm classifiers in tests/fixtures/features_only
(and two ViTs of its own: average pooling with fc_norm, and no classifier) on PNG images it wrote at the models'
input sizes, with the pixels it fed timm.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import vitlab
import vitlab.inference as inference
from dense_helpers import DETR_TINY, SETR_TINY
from test_predict_service import overlapping_calls
from vitlab.cli.main import main
from vitlab.data import eval_transform
from vitlab.data.errors import BadImageError
from vitlab.inference import embed_batches, features_runtime, prepare_image
from vitlab.models.base import set_preprocessing_style

torch.set_num_threads(1)

FIX = Path(__file__).parent / "fixtures"
EMBED = FIX / "embed"
TOL = dict(atol=2e-5, rtol=1e-5)
VIT = dict(img_size=16, patch_size=4, embed_dim=8, depth=3, num_heads=2, mlp_ratio=2.0)
SWIN = dict(img_size=32, num_heads=(1, 1, 2, 2), window_size=2)
# case: (weights, vitlab name, the options the file does not state), as tests/test_features_only.py loads them
CASES = {
    "vit": ("features_only/vit", "vit_tiny_patch16_224", VIT),
    "vit_reg": ("features_only/vit_reg", "vit_small_patch14_reg4_dinov2", VIT),
    "vit_avg": ("embed/vit_avg", "vit_tiny_patch16_224", {**VIT, "global_pool": "avg"}),
    "vit_nohead": ("embed/vit_nohead", "vit_tiny_patch16_224", {**VIT, "num_classes": 0}),
    "deit_distilled": ("features_only/deit_distilled", "deit_tiny_distilled_patch16_224", VIT),
    "beit": ("features_only/beit", "beit_base_patch16_224", dict(img_size=16, num_heads=2)),
    "cait": ("features_only/cait", "cait_xxs24_224", dict(img_size=16, patch_size=4, num_heads=2, mlp_ratio=2.0)),
    "xcit": ("features_only/xcit", "xcit_nano_12_p8_224", dict(img_size=32, num_heads=2)),
    "crossvit": ("features_only/crossvit", "crossvit_9_240",
                 dict(img_size=24, branch_scale=(1.0, 2 / 3), patch_size=(6, 8), num_heads=(2, 2))),
    "tnt": ("features_only/tnt", "tnt_s_patch16_224",
            dict(img_size=16, patch_size=8, num_heads_outer=2, num_heads_inner=2, mlp_ratio=2.0)),
    "mixer": ("features_only/mixer", "mixer_s16_224", dict(img_size=16)),
    "swin": ("features_only/swin", "swin_tiny_patch4_window7_224", SWIN),
    "swinv2": ("features_only/swinv2", "swinv2_tiny_window8_256", SWIN),
    "mobilevit": ("features_only/mobilevit", "mobilevit_xxs", dict(img_size=32)),
    "mobilevitv2": ("features_only/mobilevitv2", "mobilevitv2_050", dict(img_size=32)),
    "resnet50": ("features_only/resnet50", "resnet50", dict(img_size=16)),
}


@pytest.fixture(scope="module")
def expected() -> dict:
    return json.loads((EMBED / "expected.json").read_text())


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return load_file(EMBED / "io.safetensors")


def timm_model(case: str) -> nn.Module:
    """The case's timm weights in vitlab, preparing images as the generator did for timm: the image at the model's
    size (crop_pct 1: no resize, no crop), scaled to [0, 1] and normalised with mean = std = 0.5."""
    weights, name, options = CASES[case]
    model = vitlab.load_model(FIX / f"{weights}.safetensors", model_name=name, **options)
    set_preprocessing_style(model, crop_pct=1.0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return model.eval()


def images(size: int) -> list[Path]:
    return [EMBED / "images" / str(size) / f"{k}.png" for k in range(3)]


def tiny_vit(num_classes: int = 4, **kw) -> nn.Module:
    torch.manual_seed(0)
    model = vitlab.create_model("vit_small_patch16_224", num_classes=num_classes, img_size=32, patch_size=8,
                                embed_dim=32, depth=2, num_heads=2, **kw)
    if num_classes:
        nn.init.normal_(model.head.weight, std=0.5)  # logits that differ between images
    return model


@pytest.fixture
def folder(tmp_path) -> Path:
    """A folder of 5 images (24 and 32 px, one in a sub-folder) and a hidden file."""
    root = tmp_path / "pics"
    (root / "sub").mkdir(parents=True)
    for k, p in enumerate(images(32)):
        shutil.copy(p, root / f"{k}.png")
    for k, p in enumerate(images(24)[:2]):
        shutil.copy(p, root / "sub" / f"{k}.png")
    (root / ".hidden.png").write_bytes((root / "0.png").read_bytes())
    return root


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    return vitlab.save_model(tiny_vit(), tmp_path / "tiny.safetensors", class_names=list("abcd"))


# --------------------------------------------------------------------------- parity with timm
def test_fixture_covers_every_case(expected) -> None:
    assert set(CASES) == set(expected) - {"_versions"}
    assert sum(p.stat().st_size for p in EMBED.rglob("*") if p.is_file()) < 150_000


@pytest.mark.parametrize("case", list(CASES))
def test_embeddings_equal_timm_pre_logits(case: str, expected: dict, io: dict) -> None:
    """vitlab.embed on the PNG files = timm's forward_head(forward_features(x), pre_logits=True) on the pixels it
    was given; the pixels are the same (checked first)."""
    model = timm_model(case)
    size = expected[case]["size"]
    transform = eval_transform(model.preprocessing)
    pixels = torch.stack([prepare_image(p, transform) for p in images(size)])
    torch.testing.assert_close(pixels, io[f"x.{size}"], atol=1e-6, rtol=0)
    got = vitlab.embed(model, images(size))
    assert got.dtype == torch.float32 and got.shape == (3, expected[case]["dim"])
    torch.testing.assert_close(got, io[case], **TOL)


def test_a_backbone_without_classifier_embeds_as_timm(io) -> None:
    model = timm_model("vit_nohead")
    assert model.num_classes == 0
    torch.testing.assert_close(vitlab.embed(model, images(16)), io["vit_nohead"], **TOL)


@pytest.mark.parametrize("case", ["vit", "deit_distilled", "crossvit", "swin", "mobilevit", "vit_avg"])
def test_cli_output_equals_timm_and_vitlab_embed(case: str, expected: dict, io: dict, tmp_path: Path) -> None:
    """The weights saved as a vitlab checkpoint (its preprocessing recorded), embedded by the command: the file's
    rows are timm's embeddings and vitlab.embed's, in the order of the paths it records."""
    model = timm_model(case)
    ckpt = vitlab.save_model(model, tmp_path / "model.safetensors")
    size = expected[case]["size"]
    shuffled = [images(size)[k] for k in (2, 0, 1)]
    out = tmp_path / "e.npz"
    assert main(["embed", *map(str, shuffled), "--checkpoint", str(ckpt), "--output", str(out),
                 "--batch-size", "2", "--threads", "1"]) == 0
    f = np.load(out)
    assert list(f["paths"]) == [str(p) for p in shuffled] and str(f["root"]) == ""
    assert f["embeddings"].dtype == np.float32
    torch.testing.assert_close(torch.from_numpy(f["embeddings"]), io[case][[2, 0, 1]], **TOL)
    torch.testing.assert_close(torch.from_numpy(f["embeddings"]), vitlab.embed(model, shuffled), atol=1e-6, rtol=0)
    assert str(f["model"]) == CASES[case][1] and not bool(f["normalized"])
    assert "pre_logits=True" in str(f["features"])


# --------------------------------------------------------------------------- invariants
@pytest.mark.parametrize("case", ["vit", "swin", "mobilevit"])
def test_an_image_in_a_batch_embeds_as_alone(case: str, expected: dict) -> None:
    model = timm_model(case)
    files = images(expected[case]["size"])
    together = vitlab.embed(model, files, batch_size=3)
    for k, p in enumerate(files):
        alone = vitlab.embed(model, p)
        assert alone.shape == (1, together.shape[1])
        torch.testing.assert_close(alone[0], together[k], atol=1e-5, rtol=1e-5)


def test_normalize_gives_unit_rows_in_the_same_directions(expected) -> None:
    model = timm_model("crossvit")
    files = images(expected["crossvit"]["size"])
    raw, unit = vitlab.embed(model, files), vitlab.embed(model, files, normalize=True)
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(3), atol=1e-6, rtol=0)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(3), atol=1e-3)
    torch.testing.assert_close(unit, raw / raw.norm(dim=-1, keepdim=True), atol=1e-6, rtol=0)


def test_image_forms_embed_alike(tmp_path) -> None:
    """Paths, bytes, PIL images and arrays: decoded as predict decodes them, the same embeddings."""
    from PIL import Image

    model = timm_model("vit")
    p = images(16)[1]
    with Image.open(p) as im:
        pil = im.convert("RGB")
    forms = [p, str(p), p.read_bytes(), pil, np.asarray(pil)]
    out = vitlab.embed(model, forms)
    for row in out[1:]:
        torch.testing.assert_close(row, out[0], atol=1e-6, rtol=0)


def test_images_are_decoded_one_batch_at_a_time(monkeypatch) -> None:
    """Memory is bounded by the batch: when each forward runs, only its own batch has been decoded."""
    model = timm_model("vit")
    files = images(16) * 3  # 9 images, batches of 2
    decoded, at_forward = [], []
    real = inference.prepare_image

    def counting(image, transform):
        decoded.append(image)
        return real(image, transform)

    monkeypatch.setattr(inference, "prepare_image", counting)

    def features(x):
        at_forward.append((len(decoded), len(x)))
        return model.forward_head(model.forward_features(x), pre_logits=True)

    done = 0
    for indices, _rows in embed_batches(features, files, eval_transform(model.preprocessing), batch_size=2,
                                       device=torch.device("cpu")):
        done += len(indices)
        assert len(decoded) == done
    assert at_forward == [(2, 2), (4, 2), (6, 2), (8, 2), (9, 1)]


def test_the_model_keeps_its_modes_and_dropout_does_not_run() -> None:
    """A model in train mode (dropout, drop-path) gives its eval-mode embeddings, and gets every module's own mode
    back (a part frozen in eval mode stays so); its weights and head are untouched."""
    model = tiny_vit(drop_rate=0.5, proj_drop_rate=0.5, drop_path_rate=0.5).train()
    model.blocks[0].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = np.uint8(np.random.default_rng(0).integers(0, 255, (40, 50, 3)))
    got = vitlab.embed(model, [x, x])
    torch.testing.assert_close(got[0], got[1], atol=0, rtol=0)
    assert model.training and not model.blocks[0].training and model.blocks[1].training
    reference = tiny_vit().eval()
    torch.testing.assert_close(got, vitlab.embed(reference, [x, x]), atol=1e-6, rtol=0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_concurrent_calls_never_run_a_forward_in_train_mode() -> None:
    """Call A finishes while call B is inside its forward on the same train-mode model: B's forward still runs in
    eval mode (no dropout), and the model is back in train mode once both are done."""
    model = tiny_vit(drop_rate=0.5, proj_drop_rate=0.5, drop_path_rate=0.5).train()
    x = np.uint8(np.random.default_rng(3).integers(0, 255, (32, 32, 3)))
    expected = vitlab.embed(tiny_vit().eval(), x)
    results, modes = overlapping_calls(model, lambda: vitlab.embed(model, x), model.patch_embed, model.blocks[-1])
    assert modes == {"A": False, "B": False}
    for role in ("A", "B"):
        torch.testing.assert_close(results[role], expected, atol=1e-6, rtol=0)
    assert model.training and all(m.training for m in model.modules())


def test_another_runtime_runs_a_copy_and_leaves_the_model_alone() -> None:
    model = tiny_vit().train()
    x = np.uint8(np.random.default_rng(1).integers(0, 255, (32, 32, 3)))
    ref = vitlab.embed(model, x)
    got = vitlab.embed(model, x, runtime="torch-bf16-full")
    assert model.training and model.num_classes == 4 and isinstance(model.head, nn.Linear)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=0.05, rtol=0.05)  # bfloat16 weights and activations
    assert not torch.equal(got, ref)
    runtime = features_runtime(model, "torch")  # built once, then passed to every call
    assert runtime.num_classes == 0
    torch.testing.assert_close(vitlab.embed(runtime, [x, x]), torch.cat([ref, ref]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"runtime='onnx', but the model given is a 'torch' runtime"):
        vitlab.embed(runtime, x, runtime="onnx")


def test_a_pre_logits_layer_and_distillation_head_are_kept_in_the_head_less_copy() -> None:
    """features_runtime drops the classifier only: a JAX-style pre-logits layer (Dense + tanh) and a distilled DeiT's
    token average are the features, as forward_head(..., pre_logits=True) gives them."""
    x = np.uint8(np.random.default_rng(2).integers(0, 255, (32, 32, 3)))
    for model in (tiny_vit(representation_size=24),
                  vitlab.create_model("deit_tiny_distilled_patch16_224", num_classes=3, img_size=32, patch_size=8,
                                      embed_dim=32, depth=1, num_heads=2)):
        ref = vitlab.embed(model.eval(), x)
        got = vitlab.embed(features_runtime(model), x)
        assert got.shape == ref.shape == (1, 24 if model.num_classes == 4 else 32)
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- refusals
def test_detectors_and_segmenters_are_refused() -> None:
    torch.manual_seed(0)
    detr = vitlab.create_model("detr_resnet50", **{**DETR_TINY, "img_size": 32, "num_classes": 3})
    setr = vitlab.create_model("setr_pup_vit_small_patch16", **{**SETR_TINY, "img_size": 32, "num_classes": 3})
    x = np.zeros((32, 32), np.uint8)
    with pytest.raises(ValueError, match=r"a detection model; embeddings come from classifiers and backbones.*"
                                         r"per object"):
        vitlab.embed(detr, x)
    with pytest.raises(ValueError, match=r"a segmentation model.*per pixel"):
        vitlab.embed(setr, x)


def test_unpooled_tokens_and_bad_arguments_are_refused() -> None:
    model = tiny_vit(num_classes=0, global_pool="")
    x = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match=r"global_pool '' \(no pooling\).*not one vector per image"):
        vitlab.embed(model, x)
    model = tiny_vit()
    with pytest.raises(TypeError, match=r"^embed: images is a dict"):
        vitlab.embed(model, {"a": x})
    with pytest.raises(ValueError, match=r"embed: no images given"):
        vitlab.embed(model, [])
    with pytest.raises(ValueError, match=r"embed: batch_size must be >= 1"):
        vitlab.embed(model, x, batch_size=0)
    with pytest.raises(ValueError, match=r"embed: runtime must be 'auto' or one of torch, "):
        vitlab.embed(model, x, runtime="tensorrt")
    with pytest.raises(ValueError, match=r"embed: device='meta', but the model's parameters are on cpu"):
        vitlab.embed(model, x, device="meta")
    from vitlab.export.runtimes import build_runtime

    with pytest.raises(ValueError, match=r"gives its outputs \(class logits\), not embeddings; .*features_runtime"):
        vitlab.embed(build_runtime("torch", model), x)


def test_a_bad_image_is_named_or_skipped(tmp_path) -> None:
    model = timm_model("vit")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(BadImageError, match="broken.png"):
        vitlab.embed(model, [images(16)[0], bad])
    skipped = []
    batches = list(embed_batches(lambda x: model.forward_head(model.forward_features(x), pre_logits=True),
                                 [bad, images(16)[0], bad, images(16)[1]], eval_transform(model.preprocessing),
                                 batch_size=2, device=torch.device("cpu"), on_bad=lambda i, e: skipped.append(i)))
    assert [indices for indices, _ in batches] == [[1], [3]] and skipped == [0, 2]


# --------------------------------------------------------------------------- the command
def test_a_folder_is_walked_and_its_paths_recorded_relative_to_it(folder, checkpoint, tmp_path) -> None:
    out = tmp_path / "e.npz"
    assert main(["embed", str(folder), "--checkpoint", str(checkpoint), "--output", str(out), "--normalize",
                 "--batch-size", "2", "--threads", "1"]) == 0
    f = np.load(out)  # numpy alone reads it: no pickled objects
    assert list(f["paths"]) == ["0.png", "1.png", "2.png", "sub/0.png", "sub/1.png"]  # sorted, hidden one skipped
    assert str(f["root"]) == str(folder)
    assert all(os.path.isfile(os.path.join(str(f["root"]), p)) for p in f["paths"])
    files = [folder / p for p in f["paths"]]
    ref = vitlab.embed(vitlab.load_model(checkpoint), files, normalize=True)
    torch.testing.assert_close(torch.from_numpy(f["embeddings"]), ref, atol=1e-6, rtol=0)
    assert bool(f["normalized"]) and "L2-normalized" in str(f["features"]) and "global_pool 'token'" in str(
        f["features"])
    assert str(f["model"]) == "vit_small_patch16_224" and str(f["runtime"]) == "torch"
    assert f["skipped"].shape == (0,)


def test_safetensors_output_holds_the_same_with_its_metadata(folder, checkpoint, tmp_path) -> None:
    npz, st = tmp_path / "e.npz", tmp_path / "e.safetensors"
    for out in (npz, st):
        assert main(["embed", str(folder / "sub"), str(folder / "0.png"), "--checkpoint", str(checkpoint),
                     "--output", str(out), "--threads", "1"]) == 0
    with safe_open(str(st), "np") as f:
        embeddings, meta = f.get_tensor("embeddings"), f.metadata()
    a = np.load(npz)
    np.testing.assert_array_equal(embeddings, a["embeddings"])
    assert json.loads(meta["paths"]) == list(a["paths"]) == [str(folder / "sub" / "0.png"),
                                                              str(folder / "sub" / "1.png"), str(folder / "0.png")]
    assert meta["root"] == "" and meta["normalized"] == "false" and json.loads(meta["skipped"]) == []
    assert meta["model"] == "vit_small_patch16_224" and meta["features"] == str(a["features"])


def test_bad_images_stop_the_command_or_are_skipped_and_listed(folder, checkpoint, tmp_path, caplog) -> None:
    (folder / "sub" / "broken.jpg").write_text("not an image")
    out = tmp_path / "e.npz"
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(["embed", str(folder), "--checkpoint", str(checkpoint), "--output", str(out)]) == 2
    assert "broken.jpg" in caplog.text and "--skip-bad-images" in caplog.text and not out.exists()
    with caplog.at_level(logging.WARNING, logger="vitlab"):
        assert main(["embed", str(folder), "--checkpoint", str(checkpoint), "--output", str(out),
                     "--skip-bad-images", "--batch-size", "2"]) == 0
    f = np.load(out)
    assert list(f["paths"]) == ["0.png", "1.png", "2.png", "sub/0.png", "sub/1.png"]
    assert list(f["skipped"]) == ["sub/broken.jpg"] and "broken.jpg" in str(f["skipped_errors"][0])
    assert f["embeddings"].shape[0] == 5


def test_nothing_readable_writes_nothing(tmp_path, checkpoint, caplog) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_text("no")
    out = tmp_path / "e.npz"
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(["embed", str(bad), "--checkpoint", str(checkpoint), "--output", str(out),
                     "--skip-bad-images"]) == 2
    assert "none of the 1 image(s) could be read" in caplog.text and not out.exists()


def test_output_names_and_existing_files(folder, checkpoint, tmp_path, caplog) -> None:
    args = ["embed", str(folder), "--checkpoint", str(checkpoint), "--threads", "1", "--output"]
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main([*args, str(tmp_path / "e.h5")]) == 2
        assert "--output" in caplog.text and "unknown suffix '.h5'" in caplog.text
        assert ".npz (read with numpy's np.load), .safetensors" in caplog.text
        caplog.clear()
        assert main([*args, str(checkpoint), "--overwrite"]) == 2  # never the checkpoint read
        assert "is the checkpoint read" in caplog.text
        assert vitlab.load_model(checkpoint).num_classes == 4
        caplog.clear()
        out = tmp_path / "e.npz"
        out.write_bytes(b"mine")
        assert main([*args, str(out)]) == 2
        assert f"--output {out} exists; pass --overwrite" in caplog.text and out.read_bytes() == b"mine"
    assert main([*args, str(out), "--overwrite"]) == 0
    assert np.load(out)["embeddings"].shape == (5, 32)


def test_a_failed_write_leaves_the_old_file(folder, checkpoint, tmp_path, monkeypatch) -> None:
    out = tmp_path / "e.npz"
    out.write_bytes(b"mine")

    def fail(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", fail)
    assert main(["embed", str(folder), "--checkpoint", str(checkpoint), "--output", str(out), "--overwrite"]) == 2
    assert out.read_bytes() == b"mine" and sorted(p.name for p in tmp_path.iterdir()) == ["e.npz", "pics",
                                                                                          "tiny.safetensors"]


def test_runtimes_give_the_float32_embeddings_within_their_precision(folder, checkpoint, tmp_path) -> None:
    outs = {}
    for runtime in ("torch", "torch-bf16"):
        outs[runtime] = tmp_path / f"{runtime}.npz"
        assert main(["embed", str(folder), "--checkpoint", str(checkpoint), "--output", str(outs[runtime]),
                     "--runtime", runtime, "--threads", "1"]) == 0
    ref, bf16 = (np.load(outs[r]) for r in ("torch", "torch-bf16"))
    np.testing.assert_allclose(bf16["embeddings"], ref["embeddings"], atol=0.05, rtol=0.05)
    assert str(bf16["runtime"]) == "torch-bf16"


def pooling_onnx(path: Path, *, task: str) -> Path:
    """A hand-made ONNX file with vitlab's metadata: (N, 3, 16, 16) pixels -> their (N, 3) channel means, written as a
    backbone's file (task "features") or a classifier's (task "classification", three classes)."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["pixel_values"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["logits"])], "pool",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    classes = task == "classification"
    record = {"format": "vitlab", "version": 1, "model": "channel_means", "task": task,
              "num_classes": 3 if classes else 0, "class_names": ["a", "b", "c"] if classes else None,
              "preprocessing": {"input_size": [3, 16, 16], "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0}}
    helper.set_model_props(proto, {"vitlab": json.dumps(record)})
    onnx.save(proto, str(path))
    return path


def test_an_onnx_backbone_file_embeds_and_a_classifier_file_is_refused(io, tmp_path, caplog) -> None:
    """ONNX Runtime runs a file whose metadata says task "features"; its rows are the file's outputs on the pixels
    predict prepares (here the channel means of the generator's pixels). A classifier's file is refused, naming why."""
    backbone = pooling_onnx(tmp_path / "means.onnx", task="features")
    out = tmp_path / "e.npz"
    assert main(["embed", *map(str, images(16)), "--checkpoint", str(backbone), "--output", str(out),
                 "--batch-size", "2"]) == 0
    f = np.load(out)
    want = io["x.16"].mean(dim=(2, 3))  # (3, 3)
    torch.testing.assert_close(torch.from_numpy(f["embeddings"]), want, atol=1e-6, rtol=0)
    assert str(f["runtime"]) == "onnx" and "means.onnx" in str(f["features"]) and str(f["model"]) == "channel_means"
    torch.testing.assert_close(vitlab.embed(backbone, images(16), normalize=True), F.normalize(want, dim=-1),
                               atol=1e-6, rtol=0)
    classifier = pooling_onnx(tmp_path / "classifier.onnx", task="classification")
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(["embed", *map(str, images(16)), "--checkpoint", str(classifier), "--output",
                     str(tmp_path / "c.npz")]) == 2
    assert "an exported classifier, whose only output is its class logits" in caplog.text
    assert "metadata task 'features'" in caplog.text and not (tmp_path / "c.npz").exists()
    with pytest.raises(ValueError, match="an exported classifier"):
        vitlab.embed(classifier, images(16))


@pytest.mark.slow
def test_onnx_runtimes_embed_as_pytorch(checkpoint, folder, tmp_path) -> None:
    """A backbone exported by vitlab, and --runtime onnx on a classifier's checkpoint (exported on the fly without its
    head): the float32 PyTorch embeddings, within ONNX Runtime's float differences."""
    pytest.importorskip("onnxruntime")
    from vitlab.export import export_onnx

    backbone = tiny_vit(num_classes=0).eval()
    export_onnx(backbone, tmp_path / "backbone.onnx", dynamic_batch=True, timing=False)
    for source, model, runtime in ((tmp_path / "backbone.onnx", backbone, "auto"),
                                   (checkpoint, vitlab.load_model(checkpoint), "onnx")):
        out = tmp_path / f"{runtime}.npz"
        assert main(["embed", str(folder), "--checkpoint", str(source), "--output", str(out), "--runtime", runtime,
                     "--batch-size", "2"]) == 0
        f = np.load(out)
        ref = vitlab.embed(model, [folder / p for p in f["paths"]])
        np.testing.assert_allclose(f["embeddings"], ref.numpy(), atol=1e-5, rtol=1e-5)
        assert str(f["runtime"]) == "onnx"


def test_the_head_less_copy_keeps_the_checkpoints_preprocessing(folder) -> None:
    """A Hugging Face MobileViT folder prepares images in BGR (its processor's channel flip): the runtime vitlab embed
    builds without the head prepares them so too, and embeds as the loaded model does."""
    from vitlab.inference import load_for_embedding

    hf = FIX / "mobilevit" / "hf_v1" / "hf"
    model = vitlab.load_model(hf)
    runtime, meaning = load_for_embedding(hf)
    assert model.num_classes and runtime.num_classes == 0 and runtime.preprocessing.channel_order == "BGR"
    assert runtime.preprocessing == model.preprocessing and "not normalized" in meaning
    files = sorted(folder.glob("*.png"))
    torch.testing.assert_close(vitlab.embed(runtime, files), vitlab.embed(model, files), atol=1e-6, rtol=0)
