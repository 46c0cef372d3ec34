"""vitlab: vision transformers, from building and loading to training, explaining and exporting."""

from vitlab.checkpoints import CheckpointError, save_model
from vitlab.inference import embed, predict
from vitlab.layers import capture_attention
from vitlab.models import Preprocessing, get_entry, list_models
from vitlab.models.factory import create_model, load_model, model_info

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "Preprocessing", "__version__", "capture_attention", "create_model", "embed", "get_entry",
    "list_models", "load_model", "model_info", "predict", "save_model",
]
