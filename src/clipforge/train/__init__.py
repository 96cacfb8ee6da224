"""Contrastive training and fine-tuning of CLIP models with PyTorch Lightning.

    from clipforge.train import load_config, train
    summary = train(load_config("recipes/flickr8k-cpu.yaml", ["data.train=train.csv", "data.val=dev.csv"]))

Modules: `config` (YAML run files as dataclasses), `models` (the model a run starts from), `datamodule` (the
training data), `loss` (InfoNCE with cross-process gather, SigLIP), `parameters` (weight-decay groups, tower
locking), `averaging` (the weight average), `module` (the LightningModule), `validation` (retrieval validation),
`checkpointing` (atomic checkpoints, resume), `logs` (progress bar, metrics CSV, TensorBoard) and `run` (assembly,
the final model). Names are imported on first use, so that `clipforge.train.loss` does not pull in Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ClipLoss": "loss", "SigLipLoss": "loss", "build_loss": "loss", "gather_features": "loss",
    "CLIPTrainingModule": "module",
    "TrainConfig": "config", "load_config": "config", "save_config": "config",
    "build_model": "models", "train": "run",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'clipforge.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
