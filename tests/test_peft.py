"""Parameter-efficient fine-tuning (vitlab.train.peft, vitlab.layers.lora): freezing (linear probe, partial
fine-tuning, BitFit) and LoRA, through fit: what trains, what the optimiser holds, the plain merged checkpoints,
exact --resume, and the refusals."""

from __future__ import annotations

import copy
import json
import logging
import math

import pytest
import torch
from torch import nn

import vitlab
from test_long_runs import Noise, recipe
from vitlab.checkpoints import CheckpointError, read_vitlab
from vitlab.layers.lora import LoRALinear, merged_weight
from vitlab.models.registry import get_entry, list_models
from vitlab.train import Recipe, apply_overrides, fit, peft
from vitlab.train.state import load_train_state

torch.set_num_threads(1)


def _tiny_vit(depth: int = 2, **kw) -> nn.Module:
    torch.manual_seed(0)
    return vitlab.create_model("vit_tiny_patch16_224", num_classes=4, img_size=8, patch_size=4, in_chans=1,
                               embed_dim=16, depth=depth, num_heads=2, mlp_ratio=2.0, mean=(0.5,), std=(0.5,), **kw)


def _pretrained(depth: int = 2, **kw) -> nn.Module:
    """A tiny ViT with a non-zero head (as after pre-training) so that every path carries a gradient."""
    model = _tiny_vit(depth, **kw)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _weights(path) -> dict[str, torch.Tensor]:
    return read_vitlab(path)[0]


# ------------------------------------------------------------------------------------------ the layer
def test_lora_linear_starts_as_its_base_and_merges_into_a_plain_linear():
    torch.manual_seed(0)
    base = nn.Linear(24, 40)
    x = torch.randn(3, 5, 24)
    expect = base(x).detach()
    lora = LoRALinear(copy.deepcopy(base), rank=4, alpha=8.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(lora(x), expect)  # B = 0: bit for bit the pretrained layer
    dropped = LoRALinear(copy.deepcopy(base), rank=4, alpha=8.0, dropout=0.5).train()
    assert torch.equal(dropped(x), expect)  # dropout acts on the adapter's input alone, never on the pretrained path
    # A as nn.Linear draws its weight (Kaiming-uniform, a = sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)); B zero
    bound = 1 / math.sqrt(24)
    assert lora.lora_a.abs().max() <= bound and lora.lora_a.abs().max() > 0.9 * bound
    assert lora.lora_a.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.2)
    assert not lora.lora_b.any() and not any(p.requires_grad for p in lora.base.parameters())
    with torch.no_grad():
        lora.lora_b.normal_()
    # the update, computed independently: x W^T + b + (alpha / r) (x A^T) B^T
    by_hand = x @ base.weight.T + base.bias + (8.0 / 4) * (x @ lora.lora_a.T) @ lora.lora_b.T
    assert torch.allclose(lora(x), by_hand, atol=1e-5)
    merged = lora.merged()
    assert type(merged) is nn.Linear and torch.equal(merged.bias, base.bias)
    assert torch.equal(merged.weight, merged_weight(base.weight, lora.lora_a, lora.lora_b, 2.0))
    assert torch.allclose(merged(x), lora(x), atol=1e-5)


# ------------------------------------------------------------------------------------------ every family
def _one_per_family() -> list[str]:
    seen: dict[str, str] = {}
    for name in list_models():
        family = get_entry(name).family
        key = name.split("_")[0] if family == "mobilevit" else family  # v1 (attention Linear) apart from v2 / v3
        seen.setdefault(key, name)
    return sorted(seen.values())


FAMILIES = _one_per_family()
NO_LINEAR_ATTENTION = {"resnet18": "resnet", "mobilevitv2_050": "mobilevit", "mobilevitv3_050": "mobilevit"}


@pytest.mark.parametrize("name", [n for n in FAMILIES if n not in NO_LINEAR_ATTENTION])
def test_lora_on_every_family_starts_as_the_model_trains_adapters_only_and_merges_to_the_plain_model(name):
    """LoRA on every Linear it targets ("all"): the model starts as the pretrained one, a backward reaches every
    adapter and no pretrained weight, and the merged state dict loads strictly into the plain model and gives the
    adapted model's logits."""
    from model_helpers import input_for, make_tiny, perturb_

    torch.manual_seed(0)
    model = perturb_(make_tiny(name)).eval()
    plain_model = copy.deepcopy(model)
    x = input_for(model)
    with torch.no_grad():
        before = model(x)
    counts = peft.prepare(model, Recipe(lora_rank=2, lora_targets="all"))
    adapters = {q: m for q, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert adapters and counts["trainable_params"] < counts["total_params"]
    with torch.no_grad():
        start = model(x)
    # torch picks kernels by which parameters need gradients: frozen weights alone move CaiT's logits by ~1e-7
    assert torch.allclose(start, before, atol=1e-6, rtol=0)
    if get_entry(name).family in ("vit", "deit", "beit"):
        assert torch.equal(start, before)
    model.train()
    out = model(x)
    (out[0] if isinstance(out, tuple) else out).square().sum().backward()
    for q, m in adapters.items():
        assert m.lora_b.grad is not None and m.lora_b.grad.abs().sum() > 0, q  # reached (BEiT's q/v bias path too)
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    heads = {n for n in grads if n.split(".")[0] in peft_heads(model)}
    assert grads - heads == {n for n, _ in model.named_parameters() if n.endswith(("lora_a", "lora_b"))}
    with torch.no_grad():
        for m in adapters.values():
            m.lora_b.normal_(std=0.1)
    model.eval()
    with torch.no_grad():
        adapted = model(x)
        plain_model.load_state_dict(peft.plain_state_dict(model, model.state_dict()), strict=True)
        merged = plain_model(x)
    assert not torch.allclose(adapted, before, atol=1e-3)  # the adapters do change the model
    assert torch.allclose(merged, adapted, atol=1e-5, rtol=1e-4)


def peft_heads(model: nn.Module) -> set[str]:
    from vitlab.checkpoints.adapt import classifier_prefixes

    return set(classifier_prefixes(model))


@pytest.mark.parametrize("name", sorted(NO_LINEAR_ATTENTION))
def test_lora_on_a_family_without_linear_attention_is_refused_by_name(name):
    from model_helpers import make_tiny

    model = make_tiny(name)
    with pytest.raises(ValueError, match=rf"lora_targets=all: {name} \(family {NO_LINEAR_ATTENTION[name]}\) has no "
                                         r"nn.Linear .* for LoRA to adapt .*freeze=backbone"):
        peft.prepare(model, Recipe(lora_rank=4, lora_targets="all"))
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_lora_targets_a_mixer_lacks_are_refused_with_those_it_has():
    from model_helpers import make_tiny

    model = make_tiny("mixer_b16_224")
    with pytest.raises(ValueError, match=r"lora_targets=qkv: mixer_b16_224 \(family mixer\) has no nn.Linear attention "
                                         r"input projections .*; it has mlp: --set lora_targets=mlp"):
        peft.prepare(model, Recipe(lora_rank=4))
    peft.prepare(model, Recipe(lora_rank=4, lora_targets="all"))  # "all": what there is (token and channel MLPs)
    assert {q.split(".", 2)[2] for q, m in model.named_modules() if isinstance(m, LoRALinear)} == {
        "mlp_tokens.fc1", "mlp_tokens.fc2", "mlp_channels.fc1", "mlp_channels.fc2"}


# ------------------------------------------------------------------------------------------ recipe fields
def test_peft_fields_parse_from_set_and_contradictions_are_refused():
    r = apply_overrides(Recipe(), ["freeze=backbone", "train_biases=true", "lora_targets=qkv,proj"])
    assert (r.freeze, r.train_biases, r.lora_targets) == ("backbone", True, "qkv,proj")
    with pytest.raises(ValueError, match=r"recipe key 'freeze': cannot use 'head'.*'none', 'embed', 'backbone'"):
        apply_overrides(Recipe(), ["freeze=head"])
    bad = {
        "freeze_blocks=-1": "freeze_blocks must be >= 0",
        "lora_targets=qkv,attn": r"lora_targets='qkv,attn': unknown 'attn'; give some of qkv, proj, mlp",
        "lora_dropout=1": r"lora_dropout must be in \[0, 1\)",
        "lora_alpha=0": "lora_alpha must be > 0",
    }
    for setting, message in bad.items():
        with pytest.raises(ValueError, match=message):
            apply_overrides(Recipe(), [setting])
    with pytest.raises(ValueError, match="freeze_blocks=2 with freeze=backbone: the backbone, every block included"):
        Recipe(freeze="backbone", freeze_blocks=2)
    with pytest.raises(ValueError, match="lora_rank=8 with freeze_blocks=2: LoRA freezes every pretrained weight"):
        Recipe(lora_rank=8, freeze_blocks=2)


def test_partial_freezing_counts_blocks_as_layer_decay_does_and_refuses_what_does_not_exist():
    from model_helpers import make_tiny

    swin = make_tiny("swin_tiny_patch4_window7_224")  # blocks run through the stages (depths 2, 2, 2, 2 here)
    peft.prepare(swin, Recipe(freeze_blocks=3))
    frozen = {n.rsplit(".", 2)[0] for n, p in swin.named_parameters() if not p.requires_grad and "blocks" in n}
    assert {n.split(".attn")[0].split(".mlp")[0].split(".norm")[0] for n in frozen} == {
        "layers.0.blocks.0", "layers.0.blocks.1", "layers.1.blocks.0"}
    assert not any(p.requires_grad for n, p in swin.named_parameters() if n.startswith("patch_embed"))
    assert all(p.requires_grad for n, p in swin.named_parameters() if n.startswith(("layers.3", "head", "norm")))
    with pytest.raises(ValueError, match=r"freeze_blocks=3: vit_tiny_patch16_224 has 2 blocks; give at most 2"):
        peft.prepare(_tiny_vit(), Recipe(freeze_blocks=3))
    with pytest.raises(ValueError, match=r"freeze=embed: resnet18 has no sequence of transformer blocks to count"):
        peft.prepare(make_tiny("resnet18"), Recipe(freeze="embed"))


def test_train_norms_and_biases_keep_those_parameters_of_frozen_parts_trainable():
    model = _tiny_vit()
    peft.prepare(model, Recipe(freeze="backbone", train_norms=True))
    norms = {n for n, _ in model.named_parameters() if ".norm" in f".{n}" or n.startswith("norm.")}
    assert norms and {n for n, p in model.named_parameters() if p.requires_grad} == norms | {"head.weight", "head.bias"}
    lora = _tiny_vit()
    peft.prepare(lora, Recipe(lora_rank=2, train_biases=True))  # an adapted layer's bias is its base's now
    trains = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert "blocks.0.attn.qkv.base.bias" in trains and "blocks.0.attn.qkv.base.weight" not in trains
    assert "blocks.0.mlp.fc1.bias" in trains and "blocks.0.mlp.fc1.weight" not in trains


# ------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("setting", [{"freeze": "backbone"}, {"freeze_blocks": 1},
                                     {"freeze": "backbone", "train_biases": True}],
                         ids=["linear-probe", "partial", "bitfit"])
def test_frozen_parameters_do_not_change_and_have_no_optimizer_state(tmp_path, setting):
    start = _pretrained()
    before = {k: v.clone() for k, v in start.state_dict().items()}
    model = copy.deepcopy(start)
    r = recipe(max_steps=6, layer_decay=0.75, weight_decay=0.05, **setting)
    res = fit(model, r, train_set=Noise(64), output_dir=tmp_path, progress=False)
    after = _weights(tmp_path / "model.safetensors")
    assert set(after) == set(before)
    changed = {k for k in before if not torch.equal(after[k], before[k])}
    if setting.get("freeze") == "backbone":
        trains = {k for k in before if k.startswith("head.")}
        if setting.get("train_biases"):
            trains |= {k for k in before if k.endswith("bias")}
    else:  # the embedding and blocks.0 frozen; blocks.1, the final norm and the head train
        trains = {k for k in before if not k.startswith(("patch_embed", "cls_token", "pos_embed", "blocks.0."))}
    assert changed == trains
    # the optimiser holds state for the trained tensors alone, in the layer-decay / no-decay groups they belong to
    state = load_train_state(tmp_path / "train_state.pt")["optimizer"]
    assert len(state["state"]) == sum(len(g["params"]) for g in state["param_groups"]) == len(trains)
    assert res.parameters["trainable_params"] == sum(before[k].numel() for k in trains)
    assert res.parameters["total_params"] == sum(v.numel() for v in before.values())
    assert res.parameters["peft"] == setting
    # fit gives the model back as it came: every parameter trainable again, its weights the checkpoint's
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, after[k]) for k, v in model.state_dict().items())


def test_frozen_parts_run_in_eval_mode_while_the_rest_trains(tmp_path):
    """freeze_blocks=1: the frozen block computes a fixed function (no drop-path, no dropout inside it); the
    trained block keeps its training mode."""
    model = _pretrained(drop_path_rate=0.5, proj_drop_rate=0.2)
    seen: dict[str, set[bool]] = {"blocks.0": set(), "blocks.1": set(), "head": set()}
    for name in seen:
        model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: seen[name].add(m.training))
    fit(model, recipe(max_steps=2, freeze_blocks=1), train_set=Noise(32), output_dir=tmp_path, progress=False)
    assert seen == {"blocks.0": {False}, "blocks.1": {True}, "head": {True}}
    assert model.blocks[0].training and model.training  # given back in the model's own mode


def test_frozen_batch_norm_keeps_its_running_statistics(tmp_path):
    """Linear probing a model with BatchNorm (MobileViT's convolutions): the frozen layers normalise with their
    running statistics and do not update them (the checkpoint holds them unchanged)."""
    from vitlab.train.peft import eval_frozen_modules

    from model_helpers import make_tiny

    model = make_tiny("mobilevit_xxs", num_classes=4)
    norms = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms
    peft.prepare(model, Recipe(freeze="backbone"))
    model.train()
    assert set(eval_frozen_modules(model)) >= {n.split(".")[0] for n in norms if n.split(".")[0] != "head"}
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    with torch.no_grad():
        model(torch.randn(4, *model.preprocessing.input_size) * 3 + 1)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())


def _lora_model(state: dict) -> nn.Module:
    """The adapted model a training state holds (its adapters unmerged)."""
    model = _tiny_vit()
    peft.prepare(model, Recipe(**{k: state["recipe"][k] for k in peft.PEFT_FIELDS}))
    model.load_state_dict(state["model"], strict=True)
    return model.eval()


def test_a_lora_run_trains_adapters_and_head_and_writes_plain_merged_checkpoints(tmp_path):
    start = _pretrained()
    base = {k: v.clone() for k, v in start.state_dict().items()}
    r = recipe(epochs=2, lora_rank=4, lora_alpha=8, lora_targets="qkv,mlp", ema_decay=0.9)
    model = copy.deepcopy(start)
    res = fit(model, r, train_set=Noise(64), val_set=Noise(32, seed=1), output_dir=tmp_path, progress=False)
    state = load_train_state(tmp_path / "train_state.pt")
    # the training state keeps the adapters beside the pretrained weights, which did not move
    lora_keys = {k for k in state["model"] if k.endswith(("lora_a", "lora_b"))}
    assert len(lora_keys) == 2 * 3 * 2  # qkv, fc1, fc2 in each of the 2 blocks
    for k, v in state["model"].items():
        plain_key = k.replace(".base.", ".")
        if k in lora_keys:
            continue
        assert torch.equal(v, base[plain_key]) != plain_key.startswith("head."), k
    assert len(state["optimizer"]["state"]) == len(lora_keys) + 2  # the adapters and the head's weight and bias
    assert res.parameters == {"trainable_params": sum(state["model"][k].numel() for k in lora_keys) + 4 * 16 + 4,
                              "total_params": sum(v.numel() for v in state["model"].values()),
                              "trainable_fraction": pytest.approx(res.parameters["trainable_fraction"]),
                              "peft": {"lora_rank": 4, "lora_alpha": 8.0, "lora_targets": "qkv,mlp"}}
    # every file holds the plain model: its keys, loadable by the plain class, with the adapted model's logits
    x = torch.randn(6, 1, 8, 8)
    adapted = _lora_model(state)
    ema_adapted = _lora_model({**state, "model": state["ema"]})
    for name, source in (("model.safetensors", adapted), ("model_ema.safetensors", ema_adapted),
                         ("model_best.safetensors", None)):
        sd, meta = read_vitlab(tmp_path / name)
        assert set(sd) == set(base), name
        assert meta["extra"]["peft"] == res.parameters["peft"]
        plain_model = vitlab.load_model(tmp_path / name).eval()
        assert all(type(m) is not LoRALinear for m in plain_model.modules())
        if source is not None:
            with torch.no_grad():
                assert torch.allclose(plain_model(x), source(x), atol=1e-5, rtol=1e-4), name
    merged = _weights(tmp_path / "model.safetensors")
    assert not torch.equal(merged["blocks.0.attn.qkv.weight"], base["blocks.0.attn.qkv.weight"])
    assert torch.equal(merged["blocks.0.attn.proj.weight"], base["blocks.0.attn.proj.weight"])  # not a target
    # the model fit gave back is the checkpoint's plain model, bit for bit
    assert all(type(m) is not LoRALinear for m in model.modules())
    assert all(torch.equal(v, merged[k]) for k, v in model.state_dict().items())


def test_the_adapter_file_puts_the_run_back_onto_the_model_it_started_from(tmp_path):
    """adapter.safetensors holds what trained (adapters and head) alone; applied to the starting model it gives the
    weights of model.safetensors bit for bit. Another model, or a full checkpoint, is refused."""
    start = _pretrained()
    fit(copy.deepcopy(start), recipe(max_steps=4, lora_rank=2, lora_targets="all"), train_set=Noise(64),
        output_dir=tmp_path, progress=False)
    adapter = _weights_any(tmp_path / "adapter.safetensors")
    assert set(adapter) == {k for k in load_train_state(tmp_path / "train_state.pt")["model"]
                            if k.endswith(("lora_a", "lora_b")) or k.startswith("head.")}
    restored = peft.apply_adapter(copy.deepcopy(start), tmp_path / "adapter.safetensors")
    merged = _weights(tmp_path / "model.safetensors")
    assert set(restored.state_dict()) == set(merged)
    assert all(torch.equal(v, merged[k]) for k, v in restored.state_dict().items())
    with pytest.raises(CheckpointError, match=r"an adapter of vit_tiny_patch16_224, not of resnet18"):
        from model_helpers import make_tiny

        peft.apply_adapter(make_tiny("resnet18"), tmp_path / "adapter.safetensors")
    with pytest.raises(CheckpointError, match=r"does not fit vit_tiny_patch16_224 as built \(head.bias: \(4,\) in the "
                                              r"file, \(7,\) in the model, head.weight: \(4, 16\) in the file"):
        peft.apply_adapter(_pretrained_classes(7), tmp_path / "adapter.safetensors")
    with pytest.raises(CheckpointError, match="not a vitlab adapter file"):
        peft.apply_adapter(copy.deepcopy(start), tmp_path / "model.safetensors")


def _weights_any(path) -> dict[str, torch.Tensor]:
    from vitlab.checkpoints.io import read_safetensors

    return read_safetensors(path)[0]


def _pretrained_classes(n: int) -> nn.Module:
    torch.manual_seed(0)
    return vitlab.create_model("vit_tiny_patch16_224", num_classes=n, img_size=8, patch_size=4, in_chans=1,
                               embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0, mean=(0.5,), std=(0.5,))


def test_lora_resume_is_bitwise_the_uninterrupted_run(tmp_path):
    """Stopped mid-epoch and resumed (adapter dropout, drop-path, EMA, a best model): every file bitwise the run's
    without a break, and the adapters of the training state too."""
    r = recipe(epochs=3, lora_rank=2, lora_dropout=0.1, lora_targets="all", ema_decay=0.9)
    data, val = Noise(112), Noise(32, seed=1)  # 7 steps per epoch: the break falls mid-epoch
    fit(_pretrained(drop_path_rate=0.2), r, train_set=data, val_set=val, output_dir=tmp_path / "a", progress=False)
    fit(_pretrained(drop_path_rate=0.2), r, train_set=data, val_set=val, output_dir=tmp_path / "b", progress=False,
        until_step=10)
    torch.manual_seed(1234)  # a fresh process: whatever the generators hold now must not matter
    resumed = fit(_pretrained(drop_path_rate=0.2), r, train_set=data, val_set=val, output_dir=tmp_path / "b",
                  progress=False, resume=True)
    assert resumed.step == 21
    for name in ("model.safetensors", "model_ema.safetensors", "model_best.safetensors"):
        a, b = _weights(tmp_path / "a" / name), _weights(tmp_path / "b" / name)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name
    sa, sb = (load_train_state(tmp_path / d / "train_state.pt") for d in ("a", "b"))
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])


def test_resume_with_other_peft_settings_is_refused_and_a_new_dropout_recorded(tmp_path, caplog):
    r = recipe(epochs=2, lora_rank=2)
    fit(_pretrained(), r, train_set=Noise(64), output_dir=tmp_path, progress=False, until_step=3)
    for changed, said in ((r.replace(lora_rank=4), "lora_rank=2; this asks for lora_rank=4"),
                          (r.replace(lora_rank=0, freeze="backbone"),
                           "freeze='none', lora_rank=2; this asks for freeze='backbone', lora_rank=0")):
        with pytest.raises(CheckpointError, match=rf"--resume: the run in .* was trained with {said}\. Its saved "
                                                  r"weights and optimiser state"):
            fit(_pretrained(), changed, train_set=Noise(64), output_dir=tmp_path, progress=False, resume=True)
    with caplog.at_level(logging.WARNING, logger="vitlab.train"):
        res = fit(_pretrained(), r.replace(lora_dropout=0.1), train_set=Noise(64), output_dir=tmp_path,
                  progress=False, resume=True)
    assert res.step == 8 and "resuming with a changed recipe (lora_dropout)" in caplog.text


def test_peft_is_refused_for_objectives_that_train_the_whole_model_and_under_fsdp():
    with pytest.raises(ValueError, match=r"linear probe \(the backbone frozen\) \(recipe freeze / freeze_blocks / "
                                         r"lora_rank\) fine-tunes a classifier, whose head trains; the mae objective"):
        peft.check_run(Recipe(freeze="backbone"), "mae")
    with pytest.raises(ValueError, match=r"LoRA rank 8 \(alpha 8\) on qkv with --fsdp is not supported"):
        peft.check_run(Recipe(lora_rank=8, fsdp=True), "classification")
    peft.check_run(Recipe(), "mae")  # nothing asked: nothing refused


def test_a_self_supervised_fit_with_freezing_is_refused_before_anything_is_written(tmp_path):
    from vitlab.ssl.mae import MAE

    model = vitlab.create_model("vit_tiny_patch16_224", num_classes=0, img_size=8, patch_size=4, in_chans=1,
                                embed_dim=16, depth=1, num_heads=2, mean=(0.5,), std=(0.5,))
    with pytest.raises(ValueError, match="the mae objective trains the whole model"):
        fit(model, recipe(max_steps=2, freeze="backbone"), train_set=Noise(32), output_dir=tmp_path / "run",
            progress=False, objective=MAE(model, decoder_dim=16, decoder_depth=1, decoder_heads=2))
    assert not (tmp_path / "run" / "model.safetensors").exists()


# ------------------------------------------------------------------------------------------ the command line
def test_cli_finetune_with_lora_records_the_trainable_parameters_and_writes_a_plain_model(tmp_path, caplog):
    from test_cli_resume_checks import TINY, write_folder
    from vitlab.cli.main import main

    data = write_folder(tmp_path / "A")
    assert main(["train", "--data", str(data), "--output", str(tmp_path / "pre"), *TINY]) == 0
    out = tmp_path / "ft"
    with caplog.at_level(logging.INFO, logger="vitlab"):
        assert main(["finetune", "--from", str(tmp_path / "pre" / "model.safetensors"), "--data", str(data),
                     "--output", str(out), *TINY, "--set", "lora_rank=2", "--set", "lora_targets=all"]) == 0
    job, results = (json.loads((out / f).read_text()) for f in ("job.json", "results.json"))
    for record in (job, results):
        assert record["peft"] == {"lora_rank": 2, "lora_alpha": 2.0, "lora_targets": "qkv,proj,mlp"}
        assert 0 < record["trainable_params"] < record["total_params"]
        assert record["trainable_fraction"] == pytest.approx(record["trainable_params"] / record["total_params"],
                                                             abs=1e-6)
    assert f"{job['trainable_params']:,} of {job['total_params']:,} parameters train" in caplog.text
    pre = _weights(tmp_path / "pre" / "model.safetensors")
    assert set(_weights(out / "model.safetensors")) == set(pre)
    # the plain checkpoint works with every tool: eval, and export to timm's layout
    assert main(["eval", "--checkpoint", str(out / "model.safetensors"), "--data", str(data), "--threads", "1",
                 "--output", str(tmp_path / "eval")]) == 0
    assert main(["export", "--checkpoint", str(out / "model.safetensors"), "--format", "timm", "--output",
                 str(tmp_path / "timm.safetensors")]) == 0
    # resumed: the adapters come back from the training state (the run's own recipe: its LoRA settings)
    assert main(["finetune", "--resume", "--output", str(out), "--steps", "3", "--no-progress"]) == 0
    assert json.loads((out / "results.json").read_text())["steps"] == 3


# ------------------------------------------------------------------------------------------ torchrun
@pytest.mark.slow  # two torchrun launches, ~20 s
def test_lora_under_two_processes_matches_one_with_the_same_global_batch(tmp_path):
    """DDP with frozen parameters and adapters (no find_unused_parameters needed: every trainable parameter gets a
    gradient each step): the same merged weights as one process, the pretrained ones frozen in both."""
    from test_distributed import RUN, two_match_one

    run = [*RUN, "--set", "lora_rank=2", "--set", "lora_targets=qkv,mlp", "--set", "train_biases=true"]
    a, _ = two_match_one(run, 16, tmp_path)
    state = load_train_state(tmp_path / "two" / "train_state.pt")
    assert state["model"]["blocks.0.attn.qkv.lora_b"].abs().max() > 0  # the adapters trained
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], state["model"]["blocks.0.attn.qkv.base.weight"])
    assert torch.equal(a["blocks.0.attn.proj.weight"], state["model"]["blocks.0.attn.proj.weight"])  # frozen


def test_a_refusal_suggests_only_what_the_model_takes():
    """ResNet has neither LoRA targets nor blocks to count: the LoRA refusal suggested freeze_blocks and the
    freeze_blocks refusal suggested lora_rank, each refused in turn (a tester went round in the circle). Each names
    what the model takes; a Mixer's still offers freeze_blocks."""
    from model_helpers import make_tiny

    for asked, other in ((Recipe(lora_rank=4), "freeze_blocks"), (Recipe(freeze_blocks=1), "lora_rank")):
        with pytest.raises(ValueError, match=r"freeze=backbone \(linear probe\)") as e:
            peft.prepare(make_tiny("resnet18"), asked)
        assert other not in str(e.value).split(";")[-1]
    with pytest.raises(ValueError, match=r"lora_targets=mlp; or .*freeze=backbone \(linear probe\) / freeze_blocks=N"):
        peft.prepare(make_tiny("mixer_s16_224"), Recipe(lora_rank=4))  # blocks to count, and MLPs to adapt
