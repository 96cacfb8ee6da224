"""Checkpoints: read every layout into the one model, write ours, download named weights."""

from .formats import CheckpointError, RawCheckpoint, read_checkpoint
from .infer import infer_config
from .load import build_from_state_dict, checkpoint_configs, convert, load, save_model

__all__ = ["CheckpointError", "RawCheckpoint", "build_from_state_dict", "checkpoint_configs", "convert",
           "infer_config", "load", "read_checkpoint", "save_model"]
