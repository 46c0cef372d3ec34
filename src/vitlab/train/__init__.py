"""Training: the loop (AMP, accumulation, clipping, EMA, checkpoint/resume, DDP under torchrun),
optimisers and schedules, losses, evaluation, and recipes shipped as JSON data."""

from vitlab.train.distributed import DistContext, distributed_context
from vitlab.train.ema import ModelEMA
from vitlab.train.evaluate import EvalResult, evaluate
from vitlab.train.losses import ClassificationLoss, SoftTargetCrossEntropy
from vitlab.train.optim import build_optimizer, layer_id, param_groups
from vitlab.train.recipe import Recipe, apply_overrides, list_recipes, load_recipe, recipe_from_dict
from vitlab.train.schedule import build_scheduler, lr_factor
from vitlab.train.trainer import FitResult, NonFiniteLossError, fit

__all__ = [
    "ClassificationLoss", "DistContext", "EvalResult", "FitResult", "ModelEMA", "NonFiniteLossError", "Recipe",
    "SoftTargetCrossEntropy", "apply_overrides", "build_optimizer", "build_scheduler", "distributed_context",
    "evaluate", "fit", "layer_id", "list_recipes", "load_recipe", "lr_factor", "param_groups", "recipe_from_dict",
]
