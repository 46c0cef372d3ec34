"""A run written by an older vitlab, whose model config lacks fields added since (ViT's ``gelu`` and
``interpolation``, MobileViT's ``norm_eps``...), resumes: the missing fields take the registered model's values,
as loading its model.safetensors does. A field whose default changed since is refused with both values named."""

from __future__ import annotations

import pytest
import torch

from test_train import Quadrants, _weights, small_recipe, tiny_vit
from vitlab.checkpoints import CheckpointError
from vitlab.train import fit
from vitlab.train.state import load_train_state, save_train_state

torch.set_num_threads(1)


def _as_an_older_vitlab_wrote_it(state_path, drop=("gelu", "interpolation"), **changed) -> None:
    state = load_train_state(state_path)
    for key in drop:
        del state["model_config"][key]
    state["model_config"].update(changed)
    for key in ("format", "version"):
        state.pop(key)
    save_train_state(state_path, state)


def test_a_run_whose_config_lacks_newer_fields_resumes_exactly(tmp_path):
    recipe = small_recipe(epochs=2)
    data = Quadrants(64)
    fit(tiny_vit(), recipe, train_set=data, output_dir=tmp_path / "a", progress=False)
    fit(tiny_vit(), recipe, train_set=data, output_dir=tmp_path / "b", progress=False, until_step=3)
    _as_an_older_vitlab_wrote_it(tmp_path / "b" / "train_state.pt")
    resumed = fit(tiny_vit(), recipe, train_set=data, output_dir=tmp_path / "b", progress=False, resume=True)
    assert resumed.step == resumed.total_steps
    a, b = _weights(tmp_path / "a" / "model.safetensors"), _weights(tmp_path / "b" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_a_default_changed_since_is_refused_naming_both_values(tmp_path):
    recipe = small_recipe(epochs=2)
    fit(tiny_vit(), recipe, train_set=Quadrants(64), output_dir=tmp_path, progress=False, until_step=3)
    _as_an_older_vitlab_wrote_it(tmp_path / "train_state.pt", crop_pct=0.5)
    with pytest.raises(CheckpointError, match=r"crop_pct: 0\.5 -> .*older vitlab \(its config lacks gelu, "
                                              r"interpolation\).*model_overrides"):
        fit(tiny_vit(), recipe, train_set=Quadrants(64), output_dir=tmp_path, progress=False, resume=True)


def test_a_runs_recipe_json_names_the_model_it_trained(tmp_path, caplog):
    """`train --model X` recorded the recipe's default model in recipe.json, so `--recipe RUN/recipe.json`
    trained another architecture; it now names X, and a rerun from it builds X."""
    import json

    from test_cli_train import FAST
    from vitlab.cli.main import main

    name = "deit_tiny_distilled_patch16_224"
    assert main(["train", "--model", name, "--img-size", "16", "--output", str(tmp_path / "a"), *FAST]) == 0
    assert json.loads((tmp_path / "a" / "recipe.json").read_text())["model"] == name
    with caplog.at_level("INFO"):
        assert main(["train", "--recipe", str(tmp_path / "a" / "recipe.json"), "--steps", "2", "--no-progress",
                     "--output", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "job.json").read_text())["model"] == name
    assert f"training {name}" in caplog.text
