"""The Python inference API as timm / Hugging Face users call it: analysis beside other threads running the
same model, the inputs the eval transform takes, and vitlab.predict (equal to `vitlab predict`)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import vitlab
from vitlab.analysis import capture, explain
from vitlab.cli.main import main
from vitlab.data import eval_transform, load_image
from vitlab.export import preprocess

torch.set_num_threads(1)


# --------------------------------------------------------------------------- analysis and other threads
def _forward_elsewhere(model: nn.Module, x_other: torch.Tensor) -> torch.utils.hooks.RemovableHandle:
    """Once, when this thread's forward reaches the classifier head (after every analysis hook has fired), run
    ``model(x_other)`` in another thread to completion, as a service thread sharing the model would."""
    main, done = threading.get_ident(), []

    def other() -> None:
        with torch.no_grad():
            model(x_other)

    def hook(_m, _i, _o) -> None:
        if threading.get_ident() == main and not done:
            done.append(True)
            t = threading.Thread(target=other)
            t.start()
            t.join()

    return model.get_classifier().register_forward_hook(hook)


def _alone_and_beside(call, model: nn.Module, x_other: torch.Tensor):
    """``call()`` run alone, then again while another thread runs ``model(x_other)`` inside its forward."""
    ref = call()
    handle = _forward_elsewhere(model, x_other)
    try:
        return ref, call()
    finally:
        handle.remove()


def _tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return vitlab.create_model("vit_small_patch16_224", num_classes=10, img_size=32, depth=2, embed_dim=64,
                               num_heads=2).eval()


def test_capture_tokens_ignore_other_threads_forwards() -> None:
    model = _tiny_vit()
    x, x_other = torch.randn(1, 3, 32, 32), torch.randn(8, 3, 32, 32)
    ref, out = _alone_and_beside(lambda: capture(model, x), model, x_other)
    assert len(out.tokens) == len(ref.tokens) == 2
    for a, b in zip(out.tokens, ref.tokens):
        assert a.shape == b.shape == (1, 5, 64)
        torch.testing.assert_close(a, b)


def test_grad_cam_differentiates_its_own_forward() -> None:
    model = _tiny_vit()
    x, x_other = torch.randn(1, 3, 32, 32), torch.randn(8, 3, 32, 32)
    ref, maps = _alone_and_beside(lambda: explain(model, x, method="grad-cam").maps, model, x_other)
    torch.testing.assert_close(maps, ref)


def test_mobilevit_last_layer_uses_its_own_input_size() -> None:
    torch.manual_seed(0)
    model = vitlab.create_model("mobilevit_xxs", num_classes=10).eval()
    x, x_other = torch.randn(1, 3, 64, 96), torch.randn(1, 3, 96, 64)  # landscape explained, portrait served
    ref, out = _alone_and_beside(lambda: explain(model, x, method="last-layer"), model, x_other)
    assert out.patch_maps.shape == ref.patch_maps.shape
    torch.testing.assert_close(out.maps, ref.maps)


def test_cct_sequence_pooling_map_uses_its_own_forward() -> None:
    torch.manual_seed(0)
    model = vitlab.create_model("cct_2_3x2_32", num_classes=10).eval()
    x, x_other = torch.randn(1, 3, 32, 32), torch.randn(4, 3, 32, 32)
    ref, maps = _alone_and_beside(lambda: explain(model, x, method="last-layer").maps, model, x_other)
    torch.testing.assert_close(maps, ref)


# --------------------------------------------------------------------------- inputs of the eval transform
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=4)


def _picture(h: int = 60, w: int = 80, channels: int = 3) -> np.ndarray:
    """A smooth, photo-like uint8 (H, W, C) picture."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    planes = [np.sin(6 * xx + 2 * c) * np.cos(5 * yy - c) for c in range(channels)]
    return np.uint8(np.clip(np.stack(planes, -1) * 110 + 128, 0, 255))


@pytest.fixture(scope="module")
def transform():
    torch.manual_seed(0)
    return eval_transform(vitlab.create_model("vit_small_patch16_224", **TINY).preprocessing)


def test_eval_transform_takes_pil_images_as_load_image_decodes_them(transform, tmp_path):
    rgba = _picture(channels=4)
    rgba[:, :40, 3] = 0  # transparent left half: laid over white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "logo.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: rotated 90 degrees
    Image.fromarray(_picture()).save(tmp_path / "turned.jpg", exif=exif)
    Image.fromarray(_picture(channels=1)[..., 0]).save(tmp_path / "gray.png")
    for name in ("logo.png", "turned.jpg", "gray.png"):
        with Image.open(tmp_path / name) as img:
            torch.testing.assert_close(transform(img), transform(load_image(tmp_path / name)))


def test_eval_transform_takes_uint8_arrays_hw_and_hwc(transform):
    rgb, gray = _picture(), _picture(channels=1)[..., 0]
    torch.testing.assert_close(transform(rgb), transform(torch.from_numpy(rgb).permute(2, 0, 1)))
    torch.testing.assert_close(transform(gray), transform(torch.from_numpy(gray)[None]))
    assert transform(rgb).shape == (3, 32, 32)


@pytest.mark.parametrize("given, says", [
    (torch.zeros(60, 80, 3, dtype=torch.uint8), "looks channels-last"),
    (torch.zeros(60, 80, dtype=torch.uint8), "a tensor of shape (60, 80)"),
    (np.zeros((60, 80, 3), np.float32), "a float32 array"),
    ([[0, 1], [2, 3]], "got list"),
])
def test_eval_transform_names_the_accepted_forms(transform, given, says):
    with pytest.raises(ValueError, match="a PIL image or a \\(H, W\\[, C\\]\\) uint8 array") as e:
        transform(given)
    assert says in str(e.value) and "load_image" in str(e.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_float_image_with_nan_or_inf_is_refused(transform, bad):
    x = torch.rand(3, 40, 40)
    x[0, 5, 5] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        transform(x)


def test_export_preprocess_takes_paths_and_pil_images(tmp_path):
    pre = vitlab.create_model("vit_small_patch16_224", **TINY).preprocessing
    Image.fromarray(_picture(600, 800)).save(tmp_path / "big.jpg", quality=92)
    t = eval_transform(pre)
    as_cli = t(load_image(tmp_path / "big.jpg", min_size=t.min_source_size))  # as `vitlab predict` decodes
    torch.testing.assert_close(preprocess([tmp_path / "big.jpg"], pre)[0], as_cli)
    torch.testing.assert_close(preprocess(str(tmp_path / "big.jpg"), pre)[0], as_cli)
    with Image.open(tmp_path / "big.jpg") as img:
        torch.testing.assert_close(preprocess([img], pre)[0], t(load_image(tmp_path / "big.jpg")))


# --------------------------------------------------------------------------- vitlab.predict
@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    """A large JPEG and PNG (1600 x 1200): `vitlab predict` decodes them smaller (JPEG draft, box reduce)."""
    folder = tmp_path_factory.mktemp("photos")
    big = _picture(1200, 1600)
    Image.fromarray(big).save(folder / "big.jpg", quality=92)
    Image.fromarray(big[::-1]).save(folder / "big.png", compress_level=1)
    return [folder / "big.jpg", folder / "big.png"]


def _cli_json(ckpt: Path, images: list[Path], capsys, *extra: str) -> list[dict]:
    capsys.readouterr()
    assert main(["predict", *map(str, images), "--checkpoint", str(ckpt), "--threads", "1", "--json",
                 *extra]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
def test_predict_equals_the_cli(photos, tmp_path, capsys, score_function):
    torch.manual_seed(0)
    model = vitlab.create_model("vit_small_patch16_224", **TINY)
    if score_function != "softmax":
        model.score_function = score_function  # a Hugging Face multi-label head's, recorded by save_model
    ckpt = vitlab.save_model(model, tmp_path / "model.safetensors", class_names=["cat", "dog", "eel", "fox"])
    cli = _cli_json(ckpt, photos, capsys, "--topk", "3")
    for ours in (vitlab.predict(ckpt, photos, topk=3), vitlab.predict(vitlab.load_model(ckpt), photos, topk=3)):
        assert len(ours) == len(cli) == 2
        for row, mine in zip(cli, ours):
            assert [q["class"] for q in row["predictions"]] == [p["label"] for p in mine]
            assert [q["index"] for q in row["predictions"]] == [p["index"] for p in mine]
            np.testing.assert_allclose([p["score"] for p in mine], [q["probability"] for q in row["predictions"]],
                                       atol=1e-6)
    every = vitlab.predict(ckpt, photos[0], topk=None)  # one image: its list alone, every class
    assert sorted(p["label"] for p in every) == ["cat", "dog", "eel", "fox"]
    total = sum(p["score"] for p in every)
    assert abs(total - 1) < 1e-5 if score_function == "softmax" else abs(total - 1) > 1e-3


def test_predict_takes_pil_images_arrays_and_tensors():
    torch.manual_seed(0)
    model = vitlab.create_model("vit_small_patch16_224", **TINY).eval()
    rgb = _picture()
    x = torch.from_numpy(rgb).permute(2, 0, 1)
    with torch.no_grad():
        expected = model(eval_transform(model.preprocessing)(x)[None]).softmax(-1)[0]
    for given in (Image.fromarray(rgb), rgb, x):
        top = vitlab.predict(model, given, topk=2)
        assert [p["label"] for p in top] == [str(i) for i in expected.topk(2).indices.tolist()]  # no names: indices
        np.testing.assert_allclose([p["score"] for p in top], expected.topk(2).values.numpy(), atol=1e-6)
    assert len(vitlab.predict(model, x[None].expand(3, -1, -1, -1))) == 3  # a (B, C, H, W) batch: B images


def test_class_names_exist_on_every_model(tmp_path):
    model = vitlab.create_model("vit_small_patch16_224", **TINY)
    assert model.class_names is None
    again = vitlab.load_model(vitlab.save_model(model, tmp_path / "plain.safetensors"))
    assert again.class_names is None
