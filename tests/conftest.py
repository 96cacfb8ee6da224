"""Shared fixtures. Tests that read ../shared skip cleanly when it is absent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
REFERENCE = SHARED / "reference"

torch.set_num_threads(min(2, torch.get_num_threads()))


def require_shared(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"reference data not available ({'/'.join(('shared', *parts))})")
    return path


@pytest.fixture(params=["tiny-vit", "tiny-rn"])
def reference_model(request) -> dict:
    """One of the open_clip reference fixtures: its folder, expected outputs and inputs."""
    folder = require_shared("reference", "models", request.param)
    return {
        "name": request.param,
        "folder": folder,
        "expected": json.loads((folder / "expected.json").read_text()),
        "inputs": torch.load(folder / "inputs.pt", weights_only=True),
    }
