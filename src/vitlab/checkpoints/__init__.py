"""Checkpoints: vitlab's own format, safe readers, converters from timm, Hugging Face and JAX, and to timm's layout."""

from vitlab.checkpoints.adapt import adapt_state_dict, load_strict
from vitlab.checkpoints.converters import Converted, get_converter, register_converter
from vitlab.checkpoints.io import CheckpointError, CheckpointNotFoundError, atomic_write
from vitlab.checkpoints.load import read_source, resolve
from vitlab.checkpoints.to_timm import (
    TimmModelArgs,
    save_timm,
    save_timm_folder,
    timm_hub_config,
    timm_model_args,
    to_timm_state_dict,
)
from vitlab.checkpoints.vitlab_format import read_vitlab, save_model

__all__ = [
    "CheckpointError", "CheckpointNotFoundError", "Converted", "adapt_state_dict", "atomic_write", "get_converter", "load_strict",
    "read_source", "read_vitlab", "register_converter", "resolve", "save_model", "save_timm", "save_timm_folder",
    "timm_hub_config", "timm_model_args", "TimmModelArgs", "to_timm_state_dict",
]
