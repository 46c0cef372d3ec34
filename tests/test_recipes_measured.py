"""The time-to-accuracy recipes of issue 3 (mnist, cifar10) load through the recipe loader and build their model.

Only construction and one tiny forward pass: the measured runs themselves are in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import pytest
import torch

from vitlab.train.recipe import list_recipes, load_recipe
from vitlab.train.run import TrainJob, build_model


@pytest.mark.parametrize("name, in_chans, size, grid", [("mnist", 1, 28, 7), ("cifar10", 3, 32, 8)])
def test_measured_recipe_builds_its_model(tmp_path, name, in_chans, size, grid):
    assert name in list_recipes()
    recipe = load_recipe(name)
    assert recipe.name == name and recipe.img_size == size
    # Digits and MNIST are not mirror-symmetric; CIFAR objects are.
    assert recipe.hflip == (0.5 if name == "cifar10" else 0.0)
    # No shipped recipe pins threads or workers: vitlab uses the cores it is given (issue 14).
    assert recipe.cpu_threads is None and recipe.workers is None
    model = build_model(TrainJob(recipe=recipe, data=name, output=tmp_path), num_classes=10, in_chans=in_chans)
    assert model.preprocessing.input_size == (in_chans, size, size)
    with torch.no_grad():
        tokens = model.forward_features(torch.zeros(2, in_chans, size, size))
        logits = model.forward_head(tokens)
    # (B, 1 class token + grid*grid patches, D): the patch size the recipe asks for is in effect.
    assert tokens.shape == (2, 1 + grid * grid, recipe.model_overrides["embed_dim"])
    assert logits.shape == (2, 10)
