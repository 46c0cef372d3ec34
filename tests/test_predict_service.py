"""vitlab.predict inside a service: one model shared by threads, runtimes that stay in eval mode, the caller's model
left where it is, uploads given as bytes or file objects, and clear errors for what is not an image."""

from __future__ import annotations

import io
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import vitlab
from vitlab.data import eval_transform, load_image
from vitlab.data.errors import BadImageError
from vitlab.export.runtimes import build_runtime, load_for_inference
from vitlab.inference import prepare_image

torch.set_num_threads(1)

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=4)


def _model(**kw) -> nn.Module:
    """A tiny classifier in train mode, with dropout and drop-path: train-mode forwards are random."""
    torch.manual_seed(0)
    model = vitlab.create_model("vit_small_patch16_224", **TINY, drop_rate=0.5, proj_drop_rate=0.5,
                                drop_path_rate=0.5, **kw)
    nn.init.normal_(model.head.weight, std=0.5)  # scores that differ between images
    return model.train()


def _picture(h: int = 60, w: int = 80) -> np.ndarray:
    """A photo-like uint8 (H, W, 3) picture with some sharp edges."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.uint8(np.stack([xx * 3, yy * 2, xx + yy], -1) % 256)


def _scores(out: list) -> list[float]:
    return [p["score"] for p in out]


# --------------------------------------------------------------------------- 1: threads sharing a model
def overlapping_calls(model: nn.Module, call, first: nn.Module, late: nn.Module) -> tuple[dict, dict]:
    """``call()`` in two threads on one ``model``, overlapped: A enters ``first``'s forward and waits there until B
    has entered it too, B then waits until A's call has returned. Returns (each thread's result, whether any module
    was in train mode when its forward reached ``late``, after the wait), keyed "A" / "B"."""
    a_in, b_in, a_done = threading.Event(), threading.Event(), threading.Event()
    modes: dict[str, bool] = {}
    results: dict[str, object] = {}

    def block(_m, _args) -> None:  # at the start of each forward: A waits for B to start, B for A to finish
        role = threading.current_thread().name
        if role == "A":
            a_in.set()
            assert b_in.wait(10)
        elif role == "B":
            b_in.set()
            assert a_done.wait(10)

    def record(_m, _args) -> None:  # after the wait: the mode the rest of the forward ran in
        modes[threading.current_thread().name] = any(m.training for m in model.modules())

    def run() -> None:
        results[threading.current_thread().name] = call()

    hooks = [first.register_forward_pre_hook(block), late.register_forward_pre_hook(record)]
    try:
        a, b = threading.Thread(target=run, name="A"), threading.Thread(target=run, name="B")
        a.start()
        assert a_in.wait(10)
        b.start()
        a.join(10)
        a_done.set()
        b.join(10)
    finally:
        for h in hooks:
            h.remove()
    return results, modes


def test_concurrent_calls_never_run_a_forward_in_train_mode():
    """Call A switches the train-mode model to eval and finishes while call B is inside its forward: B's forward
    must still run in eval mode, and the model is in train mode again once both are done."""
    model = _model()
    img = _picture()
    with torch.no_grad():
        expected = _scores(vitlab.predict(_model().eval(), img, topk=2))
    results, modes = overlapping_calls(model, lambda: vitlab.predict(model, img, topk=2), model,
                                       model.get_classifier())
    assert modes == {"A": False, "B": False}
    for role in ("A", "B"):
        np.testing.assert_allclose(_scores(results[role]), expected, atol=1e-6)
    assert model.training and all(m.training for m in model.modules())  # given in train mode, left so


def test_each_modules_own_mode_is_restored():
    model = _model()
    model.patch_embed.eval()  # a frozen part kept in eval mode by the caller
    vitlab.predict(model, _picture(), topk=1)
    assert model.training and model.blocks[0].training
    assert not model.patch_embed.training and not any(m.training for m in model.patch_embed.modules())


def test_evaluation_restores_each_modules_own_mode():
    """evaluate (a validation during fit, vitlab eval) as predict: a part the caller froze in eval mode stays so."""
    from torch.utils.data import TensorDataset

    from vitlab.train.evaluate import evaluate

    model = _model()
    model.patch_embed.eval()
    data = TensorDataset(torch.rand(4, 3, TINY["img_size"], TINY["img_size"]), torch.tensor([0, 1, 2, 0]))
    evaluate(model, data, num_classes=model.num_classes, batch_size=2)
    assert model.training and model.blocks[0].training
    assert not any(m.training for m in model.patch_embed.modules())


def test_a_model_in_eval_mode_is_not_touched(monkeypatch):
    model = _model().eval()
    expected = _scores(vitlab.predict(model, _picture(), topk=2))

    def refuse(mode: bool = True) -> nn.Module:
        raise AssertionError(f"predict switched the mode of a model in eval mode (train({mode}))")

    monkeypatch.setattr(model, "train", refuse)  # eval() goes through train(False) too
    np.testing.assert_allclose(_scores(vitlab.predict(model, _picture(), topk=2)), expected, atol=0)


# --------------------------------------------------------------------------- 2: runtimes stay in eval mode
def test_runtimes_are_in_eval_mode_and_stay_there(caplog):
    rt = build_runtime("torch", _model())
    assert not rt.training and not any(m.training for m in rt.modules())
    x = torch.rand(3, 3, 32, 32)
    first = rt(x)
    vitlab.predict(rt, _picture(), topk=1)
    with caplog.at_level(logging.WARNING, logger="vitlab.export.runtimes"):
        assert rt.train() is rt
    assert "inference only" in caplog.text
    assert not any(m.training for m in rt.modules())
    torch.testing.assert_close(rt(x), first, atol=0, rtol=0)  # no dropout: the same logits every call
    bf16 = build_runtime("torch-bf16-full", _model())
    assert not any(m.training for m in bf16.modules())


def test_load_for_inference_gives_an_eval_runtime(tmp_path):
    ckpt = vitlab.save_model(_model(), tmp_path / "model.safetensors")
    rt, reference = load_for_inference(ckpt)
    assert not rt.training and not any(m.training for m in rt.modules())
    vitlab.predict(rt, _picture(), topk=1)
    assert not any(m.training for m in rt.modules())


# --------------------------------------------------------------------------- 3: the caller's model is not moved
def test_predict_does_not_move_the_callers_model():
    model = _model().eval()
    expected = _scores(vitlab.predict(model, _picture(), topk=2))
    with pytest.raises(ValueError, match=r"device='meta'.*parameters are on cpu.*model\.to\('meta'\)"):
        vitlab.predict(model, _picture(), device="meta")
    assert all(p.device.type == "cpu" for p in model.parameters())
    np.testing.assert_allclose(_scores(vitlab.predict(model, _picture(), topk=2, device="cpu")), expected, atol=0)
    for same in ("cpu:0", torch.device("cpu", 0)):  # the CPU has one device, whatever index names it
        np.testing.assert_allclose(_scores(vitlab.predict(model, _picture(), topk=2, device=same)), expected, atol=0)


# --------------------------------------------------------------------------- 4: uploads and what is not an image
@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[Path]:
    """Files whose decoding has steps: a large JPEG with EXIF rotation (drafted at 1/8 and box-reduced), a large
    RGBA PNG (box-reduced, laid over white), a 16-bit PNG and a small palette GIF with transparency."""
    folder = tmp_path_factory.mktemp("uploads")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    Image.fromarray(_picture(1200, 1600)).save(folder / "turned.jpg", exif=exif, quality=90)
    rgba = np.concatenate([_picture(900, 1200), np.uint8(np.arange(1200) % 256)[None, :, None].repeat(900, 0)], -1)
    Image.fromarray(rgba, "RGBA").save(folder / "logo.png")
    Image.fromarray(np.uint16(np.mgrid[0:50, 0:70][0] * 1300)).save(folder / "scan.png")
    Image.fromarray(_picture(40, 30)).convert("P").save(folder / "icon.gif", transparency=3)
    return [folder / n for n in ("turned.jpg", "logo.png", "scan.png", "icon.gif")]


def test_bytes_and_file_objects_decode_as_the_same_file_from_a_path(files):
    from vitlab.inference import _load_encoded

    model = _model().eval()
    t = eval_transform(model.preprocessing)
    for path in files:
        data = path.read_bytes()
        pixels = load_image(path, min_size=t.min_source_size)
        expected = prepare_image(path, t)
        with open(path, "rb") as f:
            for given in (data, bytearray(data), memoryview(data), io.BytesIO(data), f):
                assert torch.equal(_load_encoded(given, min_size=t.min_source_size), pixels), (path.name, given)
                assert torch.equal(prepare_image(given, t), expected), (path.name, type(given))
    big = load_image(files[0], min_size=t.min_source_size)
    assert big.shape == (3, 100, 75)  # the JPEG really was decoded smaller (1/8 draft, then 1/2 box), and turned


def _assert_same(got: list, expected: list) -> None:
    """The same classes in the same order; scores equal up to float batching (one image against a batch)."""
    assert [p["index"] for p in got] == [p["index"] for p in expected]
    np.testing.assert_allclose(_scores(got), _scores(expected), atol=1e-6)


def test_predict_takes_uploads_as_one_image_each(files):
    model = _model().eval()
    expected = vitlab.predict(model, files, topk=None)
    data = [p.read_bytes() for p in files]
    got = vitlab.predict(model, data, topk=None)
    assert len(got) == len(files)
    for g, e in zip(got, expected):
        _assert_same(g, e)
    _assert_same(vitlab.predict(model, data[0], topk=None), expected[0])  # bytes alone: one image, not ints
    _assert_same(vitlab.predict(model, io.BytesIO(data[1]), topk=None), expected[1])
    with open(files[2], "rb") as f:
        _assert_same(vitlab.predict(model, f, topk=None), expected[2])


def test_undecodable_uploads_are_named():
    model = _model().eval()
    with pytest.raises(BadImageError, match=r"^image \(12 bytes\): not an image file Pillow can identify"):
        vitlab.predict(model, b"not an image")
    with pytest.raises(TypeError, match="open image files with 'rb'"):
        vitlab.predict(model, io.StringIO("text"))


@pytest.mark.parametrize("given, says", [
    ({"a.png": 1}, "images is a dict (give list(d) or list(d.values()))"),
    (None, "images is None"),
    (3, "images is an int"),
    ({"a.png", "b.png"}, "images is a set (a set has no order: give a list)"),
    ([_picture(), None], "images[1] is None"),
])
def test_what_is_not_an_image_is_a_type_error_naming_the_accepted_forms(given, says):
    with pytest.raises(TypeError) as e:
        vitlab.predict(_model().eval(), given)
    assert str(e.value).startswith(f"predict: {says}; expected file paths, encoded image files (bytes")


# --------------------------------------------------------------------------- 5: empty images
@pytest.mark.parametrize("given, says", [
    (np.zeros((0, 5, 3), np.uint8), "an array of shape (0, 5, 3) (height 0, width 5)"),
    (np.zeros((5, 0), np.uint8), "an array of shape (5, 0) (height 5, width 0)"),
    (torch.zeros(3, 0, 5, dtype=torch.uint8), "a tensor of shape (3, 0, 5) (height 0, width 5)"),
    (Image.new("RGB", (0, 5)), "a 0 x 5 (width x height) PIL image (height 5, width 0)"),
])
def test_an_empty_image_is_a_value_error_naming_its_shape(given, says):
    model = _model().eval()
    with pytest.raises(ValueError, match="^eval_transform: an empty image, ") as e:
        vitlab.predict(model, given)
    assert says in str(e.value)
    with pytest.raises(ValueError, match="cannot resize an empty image of height 0 and width 5"):
        eval_transform(model.preprocessing).resize_size(0, 5)


def test_an_async_upload_is_told_how_to_give_its_bytes():
    """Starlette / FastAPI's UploadFile reads asynchronously: named, with what to pass instead."""

    class UploadFile:
        async def read(self, size: int = -1) -> bytes:
            return b""

    with pytest.raises(TypeError, match=r"UploadFile: its read\(\) is a coroutine; pass its file \(upload.file\)"):
        vitlab.predict(_model().eval(), UploadFile())

