"""Diverging training runs: an update that leaves the weights NaN / inf is never checkpointed and stops the run
with the step named; non-finite recipe settings, gradients left on the model, min_lr above lr and a warm-up longer
than the run are refused or said as they are; NaN losses are JSON null; float TIFFs with NaN pixels decode."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file
from torch.utils.data import TensorDataset

import vitlab
from test_long_runs import Noise, tiny_vit
from vitlab.checkpoints import CheckpointError
from vitlab.data import load_image
from vitlab.train import NonFiniteLossError, Recipe, apply_overrides, fit, load_recipe
from vitlab.train.distributed import DistContext
from vitlab.train.evaluate import EvalResult
from vitlab.train.objective import ClassificationObjective
from vitlab.train.state import load_train_state, save_train_state

torch.set_num_threads(1)
README = Path(__file__).resolve().parents[1] / "README.md"


def recipe(**kw) -> Recipe:
    base = {"name": "test", "max_steps": 4, "batch_size": 16, "lr": 1e-3, "warmup_steps": 0, "log_every": 1,
            "augment": False, "hflip": 0.0, "workers": 0, "optimizer": "sgd", "momentum": 0.0, "weight_decay": 0.0,
            "schedule": "constant"}
    base.update(kw)
    return Recipe(**base)


def finite_file(path: Path) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in load_file(path).values() if v.is_floating_point())


def finite_state(path: Path) -> bool:
    state = load_train_state(path)
    tensors = [*state["model"].values(), *(state["ema"] or {}).values(),
               *(v for s in state["optimizer"]["state"].values() for v in s.values())]
    return all(bool(torch.isfinite(t).all()) for t in tensors if torch.is_tensor(t) and t.is_floating_point())


# ------------------------------------------------------------------ 1. weights made non-finite by an update
# SGD at lr 1e20 (finite, accepted): step 1's loss and update are finite (weights ~1e19), step 2's loss is finite
# (~5e19) but its update overflows the weights to inf / NaN.
DIVERGING = {"lr": 1e20}


def test_an_update_that_makes_the_weights_non_finite_is_never_checkpointed(tmp_path):
    """checkpoint_every=1 with EMA on: the checkpoint after the bad step 2 is refused; model, EMA and state keep
    step 1, which the error names as the last good checkpoint."""
    with pytest.raises(NonFiniteLossError, match=r"non-finite weights.*after the update of step 2 ") as e:
        fit(tiny_vit(), recipe(**DIVERGING, checkpoint_every=1, ema_decay=0.9), train_set=Noise(64),
            output_dir=tmp_path, progress=False)
    assert re.search(r"last good checkpoint in .* \(step 1\) is kept", str(e.value))
    assert "finetune --from" in str(e.value) and "--resume --set clip_grad=1.0" in str(e.value)
    assert load_train_state(tmp_path / "train_state.pt")["step"] == 1
    for f in ("model.safetensors", "model_ema.safetensors"):
        assert finite_file(tmp_path / f), f
    assert finite_state(tmp_path / "train_state.pt")


def test_a_run_ending_on_a_diverging_update_fails_and_writes_nothing(tmp_path):
    """The run's last step is the bad one: its end-of-run checkpoint is refused (it used to finish, exit 0)."""
    with pytest.raises(NonFiniteLossError, match=r"after the update of step 2 .*no last good checkpoint yet"):
        fit(tiny_vit(), recipe(**DIVERGING, max_steps=2), train_set=Noise(64), output_dir=tmp_path, progress=False)
    assert not (tmp_path / "model.safetensors").exists() and not (tmp_path / "train_state.pt").exists()


def test_the_next_non_finite_loss_is_put_down_to_the_update_that_caused_it(tmp_path):
    """No checkpoint between: step 3's loss is NaN because step 2's update broke the weights, which is said (not
    "non-finite loss at step 3: stopped before applying it"), with the weights named."""
    with pytest.raises(NonFiniteLossError, match=r"non-finite weights \(cls_token, .*after the update of step 2 ") \
            as e:
        fit(tiny_vit(), recipe(**DIVERGING, max_steps=8), train_set=Noise(128), output_dir=tmp_path, progress=False)
    assert "non-finite loss" not in str(e.value) and "lr 1e+20" in str(e.value)


class InfGradientAt(ClassificationObjective):
    """Cross entropy whose gradient turns infinite at one step (a backward that overflowed): the loss is finite."""

    def __init__(self, bad_step: int) -> None:
        super().__init__()
        self.bad_step = bad_step
        self.model: torch.nn.Module | None = None

    def setup(self, model, *, steps_per_epoch, total_steps) -> None:
        super().setup(model, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
        self.model = model

    def before_optimizer_step(self, step: int) -> None:
        if step + 1 == self.bad_step:
            self.model.head.weight.grad.fill_(float("inf"))


def test_a_non_finite_gradient_norm_is_refused_before_its_update(tmp_path):
    """With clip_grad the gradient norm is known (and read) before the update: an infinite one is refused there,
    so the weights in memory and on disk stay finite and no gradient is left on the model."""
    model = tiny_vit()
    with pytest.raises(NonFiniteLossError, match=r"non-finite gradient norm \(\w+\) at step 3 .*before applying it"):
        fit(model, recipe(clip_grad=1.0, checkpoint_every=1), train_set=Noise(64), output_dir=tmp_path,
            objective=InfGradientAt(3), progress=False)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
    assert finite_file(tmp_path / "model.safetensors") and load_train_state(tmp_path / "train_state.pt")["step"] == 2


def test_an_infinite_gradient_without_clipping_stops_at_the_next_check(tmp_path):
    """Without clip_grad the inf gradient is applied (SGD: the head becomes inf / NaN); the checkpoint after it is
    refused, naming the step."""
    with pytest.raises(NonFiniteLossError, match=r"non-finite weights \(head.weight\) after the update of step 3 "):
        fit(tiny_vit(), recipe(checkpoint_every=1), train_set=Noise(64), output_dir=tmp_path,
            objective=InfGradientAt(3), progress=False)
    assert finite_file(tmp_path / "model.safetensors") and finite_state(tmp_path / "train_state.pt")


def test_resuming_from_a_state_with_non_finite_weights_is_refused(tmp_path):
    """A state an older vitlab wrote after a diverging update: refused at once (it failed at its first step with
    "the last good checkpoint is kept")."""
    fit(tiny_vit(), recipe(max_steps=2), train_set=Noise(64), output_dir=tmp_path, progress=False)
    state = load_train_state(tmp_path / "train_state.pt")
    state["model"]["pos_embed"][0, 0, 0] = float("nan")
    save_train_state(tmp_path / "train_state.pt", state)
    with pytest.raises(CheckpointError, match=r"train_state.pt holds non-finite weights \(pos_embed\) at step 2"):
        fit(tiny_vit(), recipe(max_steps=4), train_set=Noise(64), output_dir=tmp_path, resume=True, progress=False)


def test_a_model_with_non_finite_weights_is_refused_before_training(tmp_path):
    model = tiny_vit()
    with torch.no_grad():
        model.head.bias[0] = float("inf")
    with pytest.raises(ValueError, match=r"weights hold NaN or infinite values before training \(head.bias\)"):
        fit(model, recipe(), train_set=Noise(64), output_dir=tmp_path, progress=False)


@pytest.mark.parametrize("field, value", [("lr", math.inf), ("min_lr", math.inf), ("eps", math.inf),
                                          ("weight_decay", math.inf), ("clip_grad", math.inf),
                                          ("warmup_epochs", math.inf), ("momentum", math.nan),
                                          ("betas", (0.9, math.inf)), ("mixup_alpha", math.inf)])
def test_non_finite_recipe_values_are_refused(field, value):
    with pytest.raises(ValueError, match=rf"{field}=.* is not finite"):
        Recipe(**{field: value})


# ------------------------------------------------------------------ 3. gradients the model came with
def test_fit_starts_from_zero_gradients(tmp_path):
    """Gradients already on the model (100 everywhere) are not added into step 1's update."""
    a, b = tiny_vit(), tiny_vit()
    for p in b.parameters():
        p.grad = torch.full_like(p, 100.0)
    for model, out in ((a, "a"), (b, "b")):
        fit(model, recipe(max_steps=1), train_set=Noise(32), output_dir=tmp_path / out, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_a_refused_step_leaves_no_gradient_and_the_model_trains_on(tmp_path):
    """A NaN image stops the run before its step; the model keeps no (NaN) gradient, so a second fit on clean
    data trains normally."""
    data = Noise(64)
    bad = TensorDataset(data.x.clone(), data.y)
    bad.tensors[0][37, 0, 3, 3] = float("nan")
    model = tiny_vit()
    with pytest.raises(NonFiniteLossError, match="non-finite loss"):
        fit(model, recipe(lr=1e-3), train_set=bad, output_dir=tmp_path / "a", progress=False)
    assert all(p.grad is None for p in model.parameters())
    result = fit(model, recipe(lr=1e-3), train_set=data, output_dir=tmp_path / "b", progress=False)
    assert result.step == 4 and finite_file(tmp_path / "b" / "model.safetensors")


# ------------------------------------------------------------------ 4. min_lr above lr
def test_a_min_lr_set_above_lr_is_refused_naming_both():
    digits = load_recipe("digits")  # lr 0.003, min_lr 1e-05
    with pytest.raises(ValueError, match=r"--set min_lr=0.5 is above lr=0.003"):
        apply_overrides(digits, ["min_lr=0.5"])
    with pytest.raises(ValueError, match=r"--set min_lr=1e-05 is above lr=1e-06"):
        apply_overrides(digits, ["lr=1e-6", "min_lr=1e-5"])
    assert apply_overrides(digits, ["min_lr=0.5", "schedule=constant"]).min_lr == 0.5  # no decay: not used
    assert apply_overrides(digits, ["lr=1e-6"]).lr == 1e-6  # under the recipe's min_lr: fit warns


@pytest.mark.parametrize("settings, peak, how", [
    ({"lr": 1e-5, "min_lr": 1e-4}, 1e-5, ""),
    # lr_base_batch scales the recipe's lr 1e-3 by 16 / 1024 to 1.5625e-5, under min_lr 1e-4
    ({"lr": 1e-3, "lr_base_batch": 1024, "min_lr": 1e-4}, 1e-3 * 16 / 1024,
     " (the recipe's lr 0.001 x global batch 16 / lr_base_batch 1024)")])
def test_a_peak_lr_under_min_lr_is_warned_of_and_stays_constant(tmp_path, caplog, settings, peak, how):
    """The decay's floor was silently lowered to the peak (the schedule went flat): the log says so."""
    with caplog.at_level(logging.WARNING):
        result = fit(tiny_vit(), recipe(**settings, schedule="cosine"), train_set=Noise(64), output_dir=tmp_path,
                     progress=False)
    assert f"min_lr 0.0001 is above the peak learning rate {peak:.3g}{how}: the cosine decay's floor" in caplog.text
    assert "stays at" in caplog.text and "without a decay" in caplog.text
    assert [h["lr"] for h in result.history] == pytest.approx([peak] * 4)


# ------------------------------------------------------------------ 5. NaN losses in JSON reports
def _overflowing(model):
    with torch.no_grad():
        model.head.weight.fill_(1e38)  # finite weights whose logits overflow to inf (and the loss to NaN)
    return model


def strict_json(text: str):
    def refuse(constant: str):
        raise ValueError(f"non-JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def test_a_nan_loss_is_null_in_results_json(caplog):
    from vitlab.train.run import _test

    with caplog.at_level(logging.WARNING):
        summary = _test(_overflowing(tiny_vit()), Noise(32), recipe(), DistContext(device=torch.device("cpu")),
                        "model")
    assert summary["loss"] is None and strict_json(json.dumps(summary))["samples"] == 32
    assert re.search(r"NaN or infinite logits for [1-9]\d* of the 32 images", caplog.text)
    assert EvalResult(num_samples=1, loss=0.25, top1=1.0, top5=1.0, per_class=[1.0],
                      confusion=torch.ones(1, 1)).summary()["loss"] == 0.25


def test_eval_json_writes_null_for_a_nan_loss_and_warns(tmp_path, capsys, caplog):
    from vitlab.cli.main import main

    ckpt = tmp_path / "m" / "model.safetensors"
    ckpt.parent.mkdir()
    vitlab.save_model(_overflowing(tiny_vit()), ckpt, class_names=["a", "b", "c", "d"])
    data = tmp_path / "data"
    for c in "abcd":
        (data / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8), 60 * "abcd".index(c) + i, np.uint8)).save(data / c / f"{i}.png")
    with caplog.at_level(logging.WARNING):
        assert main(["eval", "--checkpoint", str(ckpt), "--data", str(data), "--json", "--output",
                     str(tmp_path / "e")]) == 0
    report = strict_json(capsys.readouterr().out)
    assert report["loss"] is None
    assert strict_json((tmp_path / "e" / "metrics.json").read_text())["loss"] is None
    assert re.search(rf"NaN or infinite logits for [1-9]\d* of its {report['samples']} images", caplog.text)


# ------------------------------------------------------------------ 2. float TIFFs with NaN pixels
def _float_tiffs(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    a = np.random.default_rng(0).random((16, 16)).astype(np.float32)  # values in [0, 1]
    ok, holed = tmp_path / "ok.tif", tmp_path / "nan.tif"
    Image.fromarray(a, mode="F").save(ok)
    b = a.copy()
    b[0, 0], b[5, 7], b[9, 2] = np.nan, np.inf, -np.inf
    Image.fromarray(b, mode="F").save(holed)
    return ok, holed, a


def test_a_float_tiff_with_nan_pixels_is_scaled_by_its_finite_values(tmp_path):
    """One NaN pixel made the range test fail and the picture black; NaN is 0, +inf 255, -inf 0."""
    ok, holed, _ = _float_tiffs(tmp_path)
    good, got = load_image(ok)[0], load_image(holed)[0]
    assert good.max() > 200
    expect = good.clone()
    expect[0, 0], expect[5, 7], expect[9, 2] = 0, 255, 0
    assert torch.equal(got, expect)


def test_readme_decode_treats_nan_pixels_as_load_image_does(tmp_path):
    code = next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "def decode(" in b)
    ns = {"np": np, "Image": Image, "ImageOps": ImageOps, "math": math, "h": 16, "w": 16, "c": 1, "crop_pct": 1.0}
    exec(re.search(r"^def decode\(.*?(?=^\S)", code, re.S | re.M).group(0), ns)  # noqa: S102
    _, holed, _ = _float_tiffs(tmp_path)
    got = np.asarray(ns["decode"](holed))
    ours = load_image(holed)[0].numpy()
    assert np.median(ours) > 50 and np.array_equal(got, ours)  # not black


# ------------------------------------------------------------------ 6. a warm-up longer than the run
def test_the_warmup_warning_says_it_is_cut_and_the_lr_reaches_its_peak(tmp_path, caplog):
    r = recipe(max_steps=4, warmup_steps=10, lr=1e-3, schedule="cosine")
    with caplog.at_level(logging.WARNING):
        result = fit(tiny_vit(), r, train_set=Noise(64), output_dir=tmp_path, progress=False)
    assert "the warm-up (10 steps) is as long as the run (4 steps): it is cut to 3 steps" in caplog.text
    assert "climbs to its peak (0.001) at step 3 and holds it to the end" in caplog.text
    assert "only climbs" not in caplog.text
    assert [h["lr"] for h in result.history] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3])


def test_batch_norm_statistics_made_infinite_are_never_written(tmp_path):
    """Running statistics are written with the weights: inputs of 1e20 make a ResNet's running variance infinite
    while its loss and weights stay finite, which the check before each checkpoint finds."""
    torch.manual_seed(0)
    model = vitlab.create_model("resnet18", layers=(1, 1, 1, 1), channels=(4, 4, 4, 4), stem_chs=4, num_classes=4,
                                in_chans=1, img_size=16, stem="small")
    data = TensorDataset(torch.randn(16, 1, 16, 16) * 1e20, torch.randint(0, 4, (16,)))
    data.classes = ["a", "b", "c", "d"]
    with pytest.raises(NonFiniteLossError, match=r"running_var"):
        fit(model, recipe(max_steps=2, batch_size=8), train_set=data, output_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "model.safetensors").exists()

