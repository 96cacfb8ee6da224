"""clipforge's own format: a folder holding `model.safetensors` and `config.json`.

config.json is `{"model": CLIPConfig, "preprocess": PreprocessConfig, "tokenizer": {...}, "provenance": {...}}`,
so that a saved model loads offline with the right preprocessing, always. The same writer makes HF transformers
folders (`config.json` + `model.safetensors` in their layout).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..util import atomic_write, atomic_write_bytes

FORMAT_VERSION = 1

__all__ = ["FORMAT_VERSION", "save_folder", "save_torch", "write_weights_folder"]


def save_folder(
    directory: str | Path,
    state_dict: dict[str, torch.Tensor],
    model_config: dict[str, Any],
    preprocess: dict[str, Any],
    tokenizer: dict[str, Any],
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write a clipforge model folder; each file lands atomically."""
    config = {"format": "clipforge", "format_version": FORMAT_VERSION, "model": model_config,
              "preprocess": preprocess, "tokenizer": tokenizer, "provenance": provenance or {}}
    return write_weights_folder(directory, state_dict, config)


def write_weights_folder(directory: str | Path, state_dict: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """`model.safetensors` + `config.json` in `directory` (ours or an HF transformers folder), atomically."""
    directory = Path(directory)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    # safetensors writes to a file name only, so the temporary file is written by name.
    atomic_write(directory / "model.safetensors",
                 lambda handle: save_file(tensors, handle.name, metadata={"format": "pt"}))
    atomic_write_bytes(directory / "config.json", (json.dumps(config, indent=2) + "\n").encode())
    return directory


def save_torch(obj: Any, path: str | Path) -> Path:
    """`torch.save(obj)` to `path`, atomically (readable with `torch.load(weights_only=True)` for tensors)."""
    return atomic_write(path, lambda handle: torch.save(obj, handle))
