"""clipforge's own format: a folder holding `model.safetensors` and `config.json`.

config.json is `{"model": CLIPConfig, "preprocess": PreprocessConfig, "tokenizer": {...}, "provenance": {...}}`,
so that a saved model loads offline with the right preprocessing, always.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

FORMAT_VERSION = 1


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename over the target."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    _atomic_write(directory / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    _atomic_write(directory / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
    return directory


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda tmp: torch.save(obj, tmp))
    return path
