"""Readers for every checkpoint layout, each returning a state dict in OpenAI's parameter names."""

from __future__ import annotations

import json
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file as load_safetensors

from ..util import one_line
from . import hf
from .torchscript import RefusedGlobalError, is_torchscript_archive, read_torchscript_tensors

# Tensors that some archives carry beside the weights and that the model does not need.
_IGNORED_KEYS = {"attn_mask", "input_resolution", "context_length", "vocab_size", "logit_bias",
                 "text.attn_mask", "visual.attn_mask"}
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.", "clip.")
_WEIGHT_FILES = ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, with the file, what was expected and what was found."""


@dataclass
class RawCheckpoint:
    """Weights in OpenAI names plus whatever the file said about itself."""

    state_dict: dict[str, torch.Tensor]
    kind: str  # "clipforge", "openai-torchscript", "openai", "openclip", "hf"
    path: Path
    config: dict[str, Any] | None = None  # our config.json, when the source is a clipforge folder
    quick_gelu: bool | None = None  # known for HF folders; None when the weights cannot tell
    extras: dict[str, Any] = field(default_factory=dict)


def read_checkpoint(path: str | Path) -> RawCheckpoint:
    """Read any supported checkpoint file or folder into OpenAI's layout."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        return _read_folder(path)
    try:
        return _read_file(path)
    except CheckpointError:
        raise
    except RefusedGlobalError as err:
        raise CheckpointError(str(err)) from None
    except (OSError, RuntimeError, ValueError, EOFError, zipfile.BadZipFile, KeyError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"{path}: could not read the checkpoint (corrupt, truncated or not a "
                              f"checkpoint): {one_line(err)}") from err


def _read_folder(path: Path) -> RawCheckpoint:
    config_path = path / "config.json"
    if not config_path.is_file():
        weights = [path / name for name in _WEIGHT_FILES if (path / name).is_file()]
        if weights:
            return _read_file(weights[0])
        raise CheckpointError(f"{path}: folder has no config.json and no weights file ({', '.join(_WEIGHT_FILES)})")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_path}: invalid JSON ({err})") from err
    weights = next((path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{path}: config.json found but no model.safetensors or pytorch_model.bin")
    if "model" in config and "preprocess" in config:
        return RawCheckpoint(_strict_state_dict(_load_tensors(weights), weights), "clipforge", weights, config=config)
    if config.get("model_type") == "clip" or "text_config" in config:
        cfg = hf.hf_config_to_clip_config(config)
        sd = hf.hf_state_dict_to_openai(_load_tensors(weights), cfg)
        return RawCheckpoint(sd, "hf", weights, quick_gelu=cfg.quick_gelu, extras={"clip_config": cfg})
    raise CheckpointError(f"{config_path}: neither a clipforge config (model, preprocess) nor an HF CLIP config "
                          f"(model_type 'clip')")


def _read_file(path: Path) -> RawCheckpoint:
    if path.suffix == ".safetensors":
        return RawCheckpoint(_strict_state_dict(_load_tensors(path), path), "openclip", path)
    if is_torchscript_archive(path):
        return RawCheckpoint(_strict_state_dict(read_torchscript_tensors(path), path), "openai-torchscript", path,
                             quick_gelu=True)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    kind = "openai"
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj, kind = obj["state_dict"], "openclip"  # an open_clip training checkpoint
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors, found {type(obj).__name__}")
    return RawCheckpoint(_strict_state_dict(obj, path), kind, path)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_safetensors(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _strict_state_dict(sd: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes (DDP `module.`, torch.compile `_orig_mod.`) and OpenCLIP's `text.` tower
    prefix, and drop buffers that are not weights."""
    sd = dict(sd)
    changed = True
    while changed and sd:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    if "text.token_embedding.weight" in sd:  # OpenCLIP's CustomTextCLIP with a standard text tower
        sd = {(k[len("text."):] if k.startswith("text.") else k): v for k, v in sd.items()}
    if not sd:
        raise CheckpointError(f"{path}: the checkpoint holds no tensors")
    return {k: v for k, v in sd.items() if k not in _IGNORED_KEYS and not k.endswith("position_ids")}
