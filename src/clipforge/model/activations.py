"""The MLP activations of CLIP's Transformers: OpenAI's QuickGELU, or exact GELU (most OpenCLIP models)."""

from __future__ import annotations

import torch
from torch import nn

# QuickGELU's sigmoid factor: x * sigmoid(1.702 x) approximates GELU.
QUICK_GELU_ALPHA = 1.702


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI trained its CLIP models with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(QUICK_GELU_ALPHA * x)


def activation(quick_gelu: bool) -> type[nn.Module]:
    """The activation class a config's `quick_gelu` flag names."""
    return QuickGELU if quick_gelu else nn.GELU
