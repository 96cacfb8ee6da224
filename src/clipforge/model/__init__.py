"""The one CLIP model family, in OpenAI's parameter layout: configs, layers, towers, CLIP, precision.

Modules, top to bottom: `clip` (CLIP composes an image tower and a text tower), `towers` (the contract a tower
meets), `vision` and `text` (OpenAI's towers), `layers` and `activations` (their building blocks), `config`
(architectures and preprocessing as data), `precision` (precision names and choice), and `cpu_inference`, the one
place where speed work changes how the layers run (packed oneDNN kernels in eval mode on CPUs).
"""

from .clip import CLIP, create_model
from .config import (
    OPENAI_MEAN,
    OPENAI_STD,
    CLIPConfig,
    PreprocessConfig,
    TextConfig,
    VisionConfig,
    canonical_name,
    get_model_config,
    list_models,
    split_activation,
)
from .precision import (
    PRECISIONS,
    auto_precision,
    canonical_precision,
    cpu_has_native_bf16,
    lightning_precision,
    resolve_precision,
)
from .towers import ImageTower, TextTower

__all__ = [
    "CLIP",
    "OPENAI_MEAN",
    "OPENAI_STD",
    "PRECISIONS",
    "CLIPConfig",
    "ImageTower",
    "PreprocessConfig",
    "TextConfig",
    "TextTower",
    "VisionConfig",
    "auto_precision",
    "canonical_name",
    "canonical_precision",
    "cpu_has_native_bf16",
    "create_model",
    "get_model_config",
    "lightning_precision",
    "list_models",
    "resolve_precision",
    "split_activation",
]
