"""The one CLIP model family, in OpenAI's parameter layout."""

from .clip import CLIP, PRECISIONS, auto_precision, canonical_precision, cpu_has_native_bf16, create_model
from .config import CLIPConfig, TextConfig, VisionConfig, canonical_name, get_model_config, list_models

__all__ = [
    "CLIP",
    "PRECISIONS",
    "CLIPConfig",
    "TextConfig",
    "VisionConfig",
    "auto_precision",
    "canonical_name",
    "canonical_precision",
    "cpu_has_native_bf16",
    "create_model",
    "get_model_config",
    "list_models",
]
