"""The one CLIP model family, in OpenAI's parameter layout."""

from .clip import CLIP, PRECISIONS, create_model
from .config import CLIPConfig, TextConfig, VisionConfig, canonical_name, get_model_config, list_models

__all__ = [
    "CLIP", "PRECISIONS", "CLIPConfig", "TextConfig", "VisionConfig", "canonical_name", "create_model",
    "get_model_config", "list_models",
]
