"""vitlab used as a Python library, the way an exploratory tester used it: layer-wise decay over every family,
attention capture nested and beside other threads, export of a model in training / in bfloat16, class names
after a new head, float images outside [0, 1], fit's recipe fields and data forms, compiled models, soft labels."""

from __future__ import annotations

import json
import logging
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset, TensorDataset

import vitlab
from vitlab.models import get_entry, list_models
from vitlab.train import evaluate, fit, param_groups, recipe_from_dict

from model_helpers import input_for, make_tiny, perturb_

torch.set_num_threads(1)

# one registered name per family
FAMILIES = {}
for _name in list_models():
    FAMILIES.setdefault(get_entry(_name).family, _name)
assert FAMILIES, "the registry is empty"
del _name


def tiny_vit(num_classes: int = 4, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return vitlab.create_model("vit_tiny_patch16_224", num_classes=num_classes, img_size=32, patch_size=8, depth=2,
                               embed_dim=32, num_heads=2, **kw)


def small_recipe(**kw):
    return recipe_from_dict({"batch_size": 8, "max_steps": 2, "workers": 0, "log_every": 100, **kw})


def tensor_data(n: int = 16, num_classes: int = 4, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, num_classes, (n,), generator=g))


# ------------------------------------------------------------------------------------------ layer-wise decay


@pytest.mark.parametrize("name", sorted(FAMILIES.values()))
def test_layer_decay_puts_every_familys_stem_in_layer_zero(name: str) -> None:
    """The modules that run before the first block get layer 0's lr scale, the head the top's, and the layers
    never decrease along the forward (a stem numbered as the top layer breaks all three)."""
    model = make_tiny(name).eval()
    decay = 0.5
    try:
        groups = param_groups(model, weight_decay=0.05, layer_decay=decay)
    except ValueError as e:  # no transformer blocks to number (ResNet, MobileViT): refused, not misnumbered
        assert "blocks" in str(e)
        return
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    layer = {n: g["layer_id"] for g in groups for n in g["names"]}
    top = max(layer.values())
    bottom_scale = decay ** top
    order: list[str] = []  # modules that own parameters, in the order of their first call

    def note(prefix: str):
        return lambda *_: order.append(prefix) if prefix not in order else None

    hooks = [m.register_forward_pre_hook(note(prefix)) for prefix, m in model.named_modules()
             if prefix and any(True for _ in m.parameters(recurse=False))]
    try:
        with torch.no_grad():
            model(input_for(model))
    finally:
        for h in hooks:
            h.remove()
    owned = {p: [f"{p}.{n}" for n, _ in model.get_submodule(p).named_parameters(recurse=False)] for p in order}
    ids = [max(layer[n] for n in owned[p]) for p in order]
    assert ids == sorted(ids), f"{name}: layer ids along the forward: {list(zip(order, ids))}"
    stem = owned[order[0]]
    assert all(scale[n] == pytest.approx(bottom_scale) for n in stem), (name, order[0], [scale[n] for n in stem])
    head = owned[order[-1]]
    assert all(scale[n] == pytest.approx(1.0) for n in head), (name, order[-1])
    # the model's own tokens and position tables (direct parameters) sit with the embedding
    direct = [n for n, _ in model.named_parameters(recurse=False)]
    assert all(layer[n] == 0 for n in direct), (name, {n: layer[n] for n in direct})


@pytest.mark.parametrize(("name", "stems"), [
    ("t2t_vit_7", ("tokens_to_token.",)),
    ("tnt_s_patch16_224", ("pixel_embed.", "proj.", "norm1_proj.", "norm2_proj.", "patch_pos", "pixel_pos")),
    ("cct_7_3x1_32", ("tokenizer.", "pos_embed")),
])
def test_layer_decay_stems_named_in_the_report(name: str, stems: tuple[str, ...]) -> None:
    model = make_tiny(name)
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.65)
    layer = {n: g["layer_id"] for g in groups for n in g["names"]}
    found = [n for n in layer if n.startswith(stems)]
    assert found and all(layer[n] == 0 for n in found), {n: layer[n] for n in found}


# ------------------------------------------------------------------------------------------ attention capture


def _perturbed_vit() -> torch.nn.Module:
    return perturb_(tiny_vit(5), std=0.3).eval()


def test_capture_nested_in_a_users_capture_gives_both_their_maps() -> None:
    from vitlab.analysis import explain

    model = _perturbed_vit()
    x = input_for(model, batch=1)
    depth = len(model.blocks)
    with torch.no_grad(), vitlab.capture_attention(model) as outer:
        model(x)
        with vitlab.capture_attention(model) as inner:
            model(x)
        explain(model, x)  # captures on its own inside the user's block
        model(x)
    assert len(inner) == depth
    assert len(outer) == 2 * depth  # the two forwards of the user's own, before and after the inner captures
    torch.testing.assert_close(outer[0], outer[depth])
    assert not any(m.capturing for m in model.modules() if isinstance(m, vitlab.layers.CapturableAttention))


@pytest.mark.parametrize("name", ["tnt_s_patch16_224", "detr_resnet50"])
def test_explainers_with_their_own_sinks_leave_a_users_capture_open(name: str) -> None:
    """TNT's (and T2T's, CCT's, CrossViT's) explainers and DETR's set sinks on chosen modules only."""
    from vitlab.analysis import explain

    model = perturb_(make_tiny(name)).eval()
    x = input_for(model, batch=1)
    with torch.no_grad(), vitlab.capture_attention(model) as outer:
        model(x)
        per_forward = len(outer)
        explain(model, x)
        model(x)
    assert per_forward > 0 and len(outer) == 2 * per_forward


def test_capture_ignores_forwards_run_by_other_threads() -> None:
    model = _perturbed_vit()
    x = input_for(model, batch=1)
    seen_capturing: list[bool] = []

    def serve() -> None:
        attn = model.blocks[0].attn
        seen_capturing.append(attn.capturing)
        with torch.no_grad():
            model(torch.randn(1, 3, 32, 32) * 3)

    with torch.no_grad(), vitlab.capture_attention(model) as maps:
        t = threading.Thread(target=serve)
        t.start()
        t.join()
        assert len(maps) == 0 and seen_capturing == [False]
        model(x)
    assert len(maps) == len(model.blocks)
    with vitlab.capture_attention(model) as again, torch.no_grad():
        model(x)
    for a, b in zip(maps, again):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backward_in_thread", [False, True])
def test_captured_checkpointed_blocks_recompute_without_new_maps(backward_in_thread: bool) -> None:
    """Gradient checkpointing recomputes the blocks in the backward pass, in autograd's own thread on CUDA
    (simulated with a thread here): the recomputation must take the captured forward's path, and its maps
    are not reported twice."""
    model = tiny_vit(5)
    model.set_grad_checkpointing(True)
    x = input_for(model)
    errors: list[BaseException] = []
    with vitlab.capture_attention(model) as maps:
        loss = model(x).logsumexp(-1).sum()

        def backward() -> None:
            try:
                loss.backward()
            except BaseException as e:  # noqa: BLE001 - reported by the assertion below
                errors.append(e)

        if backward_in_thread:
            t = threading.Thread(target=backward)
            t.start()
            t.join()
        else:
            backward()
    assert not errors, errors
    assert len(maps) == len(model.blocks)
    assert all(p.grad is not None for p in model.blocks.parameters())


# ------------------------------------------------------------------------------------------ ONNX export


def test_export_onnx_gives_the_callers_model_back_in_its_modes(tmp_path) -> None:
    from vitlab.export import export_onnx

    model = tiny_vit(3, drop_path_rate=0.1)
    model.train()
    model.blocks[0].eval()  # a part the user froze on purpose
    export_onnx(model, tmp_path / "m.onnx", timing=False, force=True)
    assert model.training and model.blocks[1].training and model.blocks[1].mlp.training
    assert not model.blocks[0].training and not model.blocks[0].attn.training


def test_export_onnx_of_a_bfloat16_model_writes_a_float32_file(tmp_path, caplog) -> None:
    import onnx

    from vitlab.export import export_onnx

    model = perturb_(tiny_vit(3)).to(torch.bfloat16)
    with caplog.at_level(logging.INFO, logger="vitlab"):
        report = export_onnx(model, tmp_path / "m.onnx", timing=False, force=True)
    assert report.written and "float32 copy" in caplog.text
    assert next(model.parameters()).dtype == torch.bfloat16  # the caller's model is left as it was
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert {t.data_type for t in graph.initializer} <= {onnx.TensorProto.FLOAT, onnx.TensorProto.INT64}


# ------------------------------------------------------------------------------------------ class names


def _dense_names() -> list[str]:
    return ["detr_resnet50"]


@pytest.mark.parametrize("name", sorted(FAMILIES.values()) + _dense_names())
def test_reset_classifier_drops_the_old_heads_class_names(name: str) -> None:
    if name == "detr_resnet50":
        from dense_helpers import DETR_TINY

        model = vitlab.create_model(name, img_size=32, num_classes=5, **DETR_TINY)
    else:
        model = make_tiny(name, num_classes=5)
    model.class_names = list("abcde")
    model.reset_classifier(3)
    assert getattr(model, "class_names", None) is None


def test_save_model_never_pairs_names_with_another_head(tmp_path, caplog) -> None:
    from vitlab.checkpoints import read_vitlab

    model = tiny_vit(5)
    path = vitlab.save_model(model, tmp_path / "a.safetensors", class_names=list("abcde"))
    model = vitlab.load_model(path)
    model.reset_classifier(3)
    vitlab.save_model(model, tmp_path / "b.safetensors")
    assert read_vitlab(tmp_path / "b.safetensors")[1]["class_names"] is None
    model.class_names = list("abcde")  # set by hand for the old head
    with caplog.at_level(logging.WARNING, logger="vitlab"):
        vitlab.save_model(model, tmp_path / "c.safetensors")
    assert read_vitlab(tmp_path / "c.safetensors")[1]["class_names"] is None
    assert "5 names" in caplog.text and "3 classes" in caplog.text
    with pytest.raises(ValueError, match="5 class names for a model with 3 classes"):
        vitlab.save_model(model, tmp_path / "d.safetensors", class_names=list("abcde"))


# ------------------------------------------------------------------------------------------ image ranges


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_transforms_refuse_float_images_outside_0_1(interpolation: str) -> None:
    from dataclasses import replace

    from vitlab.data import eval_transform, train_transform

    pre = replace(tiny_vit().preprocessing, interpolation=interpolation)
    img = torch.from_numpy((np.random.default_rng(0).random((3, 40, 50)) * 255).astype(np.uint8))
    good = eval_transform(pre)(img)
    torch.testing.assert_close(eval_transform(pre)(img.float() / 255), good, atol=1e-5, rtol=0)
    for transform in (eval_transform(pre), train_transform(pre)):
        with pytest.raises(ValueError, match=r"values in [\d.]+\.\.2\d\d(\.\d+)?; expected uint8 \(0\.\.255\) or floats in \[0, 1\]"):
            transform(img.float())
    with pytest.raises(ValueError, match="normalised already"):
        eval_transform(pre)(good)


# ------------------------------------------------------------------------------------------ fit and its recipe


def test_fit_warns_about_recipe_fields_it_does_not_apply(tmp_path, caplog) -> None:
    model = tiny_vit()
    recipe = small_recipe(img_size=64, randaugment=[2, 9], re_prob=0.5, model="swin_tiny_patch4_window7_224",
                          model_overrides={"drop_path_rate": 0.3}, hflip=0.0)
    with caplog.at_level(logging.WARNING, logger="vitlab"):
        fit(model, recipe, train_set=tensor_data(), output_dir=tmp_path / "run", progress=False)
    warned = [r.getMessage() for r in caplog.records if "not applied by fit" in r.getMessage()]
    assert len(warned) == 1
    for key in ("img_size", "randaugment", "re_prob", "model", "model_overrides", "hflip"):
        assert key in warned[0]
    assert "vitlab.train.run" in warned[0]
    resolved = json.loads((tmp_path / "run" / "recipe.json").read_text())["resolved"]
    assert set(resolved["not_applied_by_fit"]) == {"img_size", "randaugment", "re_prob", "model",
                                                   "model_overrides", "hflip"}


def test_fit_is_quiet_about_fields_the_model_and_data_already_follow(tmp_path, caplog) -> None:
    model = tiny_vit()
    recipe = small_recipe(img_size=32, model="vit_tiny_patch16_224", model_overrides={"depth": 2},
                          augment=False, randaugment=[2, 9], val_fraction=0.0)
    with caplog.at_level(logging.WARNING, logger="vitlab"):
        fit(model, recipe, train_set=tensor_data(), output_dir=tmp_path / "run", progress=False)
    assert "not applied by fit" not in caplog.text


def test_the_training_command_path_does_not_warn_about_its_recipe(tmp_path, caplog) -> None:
    from vitlab.train import Recipe
    from vitlab.train.run import TrainJob, run_training

    recipe = Recipe(name="t", model="vit_tiny_patch16_224", img_size=16, max_steps=1, batch_size=16, workers=0,
                    model_overrides={"depth": 1, "embed_dim": 32, "num_heads": 2, "patch_size": 8},
                    randaugment=(2, 9), re_prob=0.25, hflip=0.0, val_fraction=0.05, zero_init_head=True)
    with caplog.at_level(logging.WARNING, logger="vitlab"):
        run_training(TrainJob(recipe=recipe, data="digits", output=tmp_path / "run", progress=False, threads=1))
    assert "not applied by fit" not in caplog.text
    assert "not_applied_by_fit" not in json.loads((tmp_path / "run" / "recipe.json").read_text())["resolved"]


# ------------------------------------------------------------------------------------------ compiled models


def file_keys(path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def test_save_model_of_a_compiled_model_loads(tmp_path) -> None:
    model = perturb_(tiny_vit(3)).eval()
    compiled = torch.compile(model)  # the wrapper only: nothing is compiled before its first call
    path = vitlab.save_model(compiled, tmp_path / "m.safetensors")
    assert sorted(file_keys(path)) == sorted(model.state_dict())
    x = input_for(model)
    with torch.no_grad():
        torch.testing.assert_close(vitlab.load_model(path).eval()(x), model(x))


def test_fit_of_a_compiled_model_writes_loadable_checkpoints(tmp_path) -> None:
    model = tiny_vit()
    res = fit(torch.compile(model), small_recipe(), train_set=tensor_data(), output_dir=tmp_path / "run",
              progress=False)
    assert sorted(file_keys(res.model_path)) == sorted(model.state_dict())
    from vitlab.train.state import load_train_state

    assert sorted(load_train_state(res.output_dir / "train_state.pt")["model"]) == sorted(model.state_dict())
    loaded = vitlab.load_model(res.model_path)
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, model.state_dict()[k])


def test_files_written_with_compiled_prefixes_still_load(tmp_path) -> None:
    """Files that save_model wrote from compiled models before it unwrapped them: every key "_orig_mod."."""
    from safetensors.torch import save_file

    from vitlab.checkpoints.vitlab_format import model_metadata

    model = perturb_(tiny_vit(3)).eval()
    sd = {f"_orig_mod.{k}": v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(tmp_path / "old.safetensors"), metadata={"vitlab": json.dumps(model_metadata(model))})
    x = input_for(model)
    with torch.no_grad():
        torch.testing.assert_close(vitlab.load_model(tmp_path / "old.safetensors").eval()(x), model(x))


# ------------------------------------------------------------------------------------------ soft labels


def one_hot_data(n: int = 24, num_classes: int = 4) -> TensorDataset:
    x, y = tensor_data(n, num_classes).tensors
    return TensorDataset(x, torch.nn.functional.one_hot(y, num_classes).float())


def test_evaluate_takes_one_hot_labels_as_their_classes() -> None:
    model = perturb_(tiny_vit())
    hard = tensor_data(24)
    soft = one_hot_data(24)
    a = evaluate(model, hard, num_classes=4, batch_size=8)
    b = evaluate(model, soft, num_classes=4, batch_size=8)
    assert b.top1 == a.top1 and b.loss == pytest.approx(a.loss, rel=1e-5) and torch.equal(a.confusion, b.confusion)


def test_fit_with_one_hot_labels_validates_and_saves(tmp_path) -> None:
    model = tiny_vit()
    data = one_hot_data()
    res = fit(model, small_recipe(max_steps=3, augment=False), train_set=data, val_set=data,
              output_dir=tmp_path / "run", progress=False)
    assert res.val is not None and res.val["val_samples"] == len(data)
    assert res.model_path.is_file()


# ------------------------------------------------------------------------------------------ data forms


class Forms(Dataset):
    """Samples in the forms users commonly have, not the (float image, int label) pairs fit trains on."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.x, self.y = tensor_data(16).tensors

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int):
        x, y = self.x[i], int(self.y[i])
        u8 = ((x.clamp(-1, 1) + 1) * 127).to(torch.uint8)
        return {
            "dict": lambda: {"image": x, "label": y},
            "str label": lambda: (x, "abcd"[y]),
            "uint8": lambda: (u8, y),
            "pil": lambda: (Image.fromarray(u8.permute(1, 2, 0).numpy()), y),
            "3-tuple": lambda: (x, y, i),
            "(1,) label": lambda: (x, torch.tensor([y])),
            "HWC": lambda: (x.permute(1, 2, 0), y),
            "label out of range": lambda: (x, y + 4),
        }[self.kind]()


@pytest.mark.parametrize(("kind", "named"), [
    ("dict", "dict samples (keys ['image', 'label'])"),
    ("str label", "labels of type tuple of str"),
    ("uint8", "images of type uint8 tensor (8, 3, 32, 32)"),
    ("pil", "PIL.Image.Image"),
    ("3-tuple", "samples of 3 items"),
    ("(1,) label", "labels of type int64 tensor (8, 1)"),
    ("HWC", "images of shape (8, 32, 32, 3) for a model that takes 3 channel(s)"),
    ("label out of range", "class indices in 4..7 for a head of 4 classes"),
])
def test_fit_explains_a_first_batch_it_cannot_train_on(tmp_path, kind: str, named: str) -> None:
    model = tiny_vit()
    with pytest.raises((ValueError, TypeError)) as info:
        fit(model, small_recipe(max_steps=1), train_set=Forms(kind), output_dir=tmp_path / "run", progress=False)
    msg = str(info.value)
    assert named in msg, msg
    assert "expected (image, label) batches: images float (B, C, H, W)" in msg
    assert "labels int64 class indices (B,), or float class probabilities (B, K)" in msg
    assert "eval_transform" in msg  # the conversion to use


def test_evaluate_explains_a_batch_it_cannot_score() -> None:
    with pytest.raises(ValueError, match="evaluate: the data's first batch has dict samples"):
        evaluate(tiny_vit(), Forms("dict"), num_classes=4, batch_size=8)


def test_a_checkpoint_records_the_vitlab_version_that_wrote_it(tmp_path) -> None:
    """As the ONNX files do: a checkpoint that travels without its run folder says what wrote it."""
    from vitlab.checkpoints import read_vitlab

    path = vitlab.save_model(tiny_vit(2), tmp_path / "m.safetensors")
    assert read_vitlab(path)[1]["vitlab_version"] == vitlab.__version__
    assert vitlab.load_model(path).num_classes == 2


def test_a_trained_checkpoint_records_the_settings_it_was_trained_with(tmp_path) -> None:
    """The recipe's name alone hid --set changes (lr, ema_decay ...): the checkpoint has every setting now."""
    from vitlab.checkpoints import read_vitlab
    from vitlab.cli.main import main

    out = tmp_path / "run"
    assert main(["train", "--output", str(out), "--threads", "1", "--no-progress", "--steps", "2",
                 "--set", "model_overrides.depth=1", "--set", "lr=0.00123", "--set", "eval_every_epochs=1000"]) == 0
    extra = read_vitlab(out / "model.safetensors")[1]["extra"]
    assert extra["recipe"] == "digits" and extra["recipe_settings"]["lr"] == 0.00123
    recorded = json.loads((out / "recipe.json").read_text(encoding="utf-8"))
    recorded.pop("resolved")  # the run's resolved lr / batch: recipe.json's own addition
    assert extra["recipe_settings"] == recorded
