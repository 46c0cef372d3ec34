"""Optimiser settings and weight-decay groups: settings of the optimiser not chosen are warned about, never
silently ignored; MAE pre-training decays as the official main_pretrain.py, other objectives keep their rules."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import vitlab
from vitlab.cli.main import main
from vitlab.ssl import DINO, MAE, BEiT, MaskedPatchPrediction
from vitlab.train import Recipe
from vitlab.train.optim import build_optimizer
from vitlab.train.recipe import apply_overrides, list_recipes, load_recipe, recipe_from_dict

torch.set_num_threads(1)

OPTIM_LOGGER = "vitlab.train.optim"


def tiny(**kw):
    torch.manual_seed(0)
    opts = dict(num_classes=0, img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0)
    opts.update(kw)
    return vitlab.create_model("vit_tiny_patch16_224", **opts)


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == OPTIM_LOGGER and r.levelno >= logging.WARNING]


def groups_by_decay(opt: torch.optim.Optimizer) -> tuple[set[str], set[str]]:
    decayed = {n for g in opt.param_groups if g["weight_decay"] > 0 for n in g["names"]}
    plain = {n for g in opt.param_groups if g["weight_decay"] == 0 for n in g["names"]}
    return decayed, plain


# ------------------------------------------------------------------- settings of the optimiser not chosen
@pytest.mark.parametrize("optimizer,changes,named,user", [
    ("adamw", {"momentum": 0.5, "nesterov": True}, ["momentum=0.5", "nesterov=True"], "sgd"),
    ("adam", {"nesterov": True}, ["nesterov=True"], "sgd"),
    ("sgd", {"betas": [0.5, 0.6], "eps": 0.1}, ["betas=(0.5, 0.6)", "eps=0.1"], "adamw / adam"),
])
def test_a_changed_setting_of_another_optimiser_is_warned_about(caplog, optimizer, changes, named, user):
    recipe = recipe_from_dict({"name": "t", "optimizer": optimizer, **changes})
    caplog.set_level(logging.WARNING, logger=OPTIM_LOGGER)
    opt = build_optimizer(tiny(), recipe, lr=1e-3)
    said = warnings_of(caplog)
    assert len(said) == 1, said
    for item in named:
        assert item in said[0]
    assert f"optimizer {optimizer} does not use" in said[0] and f"(used by {user})" in said[0]
    assert "no effect" in said[0]
    # what the run uses is the chosen optimiser's own settings
    assert type(opt).__name__ == {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD"}[optimizer]


@pytest.mark.parametrize("optimizer,changes", [
    ("adamw", {}), ("adam", {}), ("sgd", {}),
    ("adamw", {"betas": [0.9, 0.95], "eps": 1e-6}),  # its own settings
    ("sgd", {"momentum": 0.5, "nesterov": True}),
    ("adamw", {"momentum": 0.9, "nesterov": False}),  # another optimiser's, at their defaults
    ("sgd", {"betas": [0.9, 0.999], "eps": 1e-8}),
])
def test_defaults_and_the_optimisers_own_settings_are_not_warned_about(caplog, optimizer, changes):
    recipe = recipe_from_dict({"name": "t", "optimizer": optimizer, **changes})
    caplog.set_level(logging.WARNING, logger=OPTIM_LOGGER)
    build_optimizer(tiny(), recipe, lr=1e-3)
    assert warnings_of(caplog) == []


def test_command_line_overrides_are_checked_and_shipped_recipes_are_quiet(caplog):
    caplog.set_level(logging.WARNING, logger=OPTIM_LOGGER)
    model = tiny()
    for name in list_recipes():
        build_optimizer(model, load_recipe(name), lr=1e-3)
    assert warnings_of(caplog) == []  # no shipped recipe sets another optimiser's settings
    # `--set optimizer=sgd` under the mae recipe leaves its AdamW betas (0.9, 0.95) without effect
    build_optimizer(model, apply_overrides(load_recipe("mae"), ["optimizer=sgd"]), lr=1e-3)
    assert len(warnings_of(caplog)) == 1 and "betas=(0.9, 0.95) (used by adamw / adam)" in warnings_of(caplog)[0]


def test_vitlab_train_warns_about_momentum_under_adamw(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=OPTIM_LOGGER)
    out = tmp_path / "run"
    assert main(["train", "--data", "digits", "--recipe", "digits", "--steps", "1", "--no-progress",
                 "--set", "model_overrides.depth=1", "--set", "model_overrides.embed_dim=16",
                 "--set", "model_overrides.num_heads=2", "--set", "momentum=0.5", "--set", "nesterov=true",
                 "--output", str(out)]) == 0
    said = warnings_of(caplog)
    assert len(said) == 1 and "momentum=0.5" in said[0] and "nesterov=True" in said[0]
    assert "optimizer adamw does not use" in said[0] and "(used by sgd)" in said[0]
    recorded = json.loads((out / "recipe.json").read_text())
    assert recorded["optimizer"] == "adamw" and recorded["momentum"] == 0.5  # recorded as given, and warned


# ------------------------------------------------------------------------------ weight decay of objectives

@pytest.mark.parametrize("method", ["mpp", "dino", "beit", "mae"])
def test_self_supervised_objectives_keep_the_models_no_weight_decay(method):
    """Pre-training groups the backbone by the model's own list (optim.py says where official codes differ): its
    class token and position table are not decayed; runs resumed from older states keep their groups."""
    model = tiny()
    objective = {"mae": lambda: MAE(model, decoder_dim=16, decoder_depth=1, decoder_heads=2),
                 "mpp": lambda: MaskedPatchPrediction(model),
                 "dino": lambda: DINO(model, out_dim=32, hidden_dim=24, bottleneck_dim=8),
                 "beit": lambda: BEiT(model, vocab_size=8)}[method]()
    opt = build_optimizer(model, Recipe(weight_decay=0.05), lr=1e-3, extra=objective.trainable_modules())
    decayed, plain = groups_by_decay(opt)
    params = dict(model.named_parameters())
    skip = model.no_weight_decay()
    assert {"cls_token", "pos_embed"} <= skip
    assert {n for n in params if n in skip or params[n].ndim <= 1} == {n for n in plain if n in params}
    assert {n for n in params if n not in skip and params[n].ndim > 1} == {n for n in decayed if n in params}


def test_nesterov_without_momentum_is_refused_by_the_recipe():
    """torch's SGD refuses it only once the model is built ("Nesterov momentum requires a momentum and zero
    dampening"); the recipe says so first, naming the settings."""
    with pytest.raises(ValueError, match=r"nesterov=true needs a momentum above 0"):
        apply_overrides(load_recipe("digits"), ["optimizer=sgd", "nesterov=true", "momentum=0"])
    Recipe(optimizer="adamw", nesterov=True, momentum=0.0)  # not SGD: warned of as unused, not refused

