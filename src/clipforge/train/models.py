"""The model a training run starts from: an architecture with the run's size overrides, or a checkpoint to
fine-tune (`model.init`), with its preprocessing and tokenizer."""

from __future__ import annotations

from pathlib import Path

from ..checkpoints import load
from ..model import CLIP, PreprocessConfig, get_model_config
from ..tokenizer import Tokenizer
from .config import ModelConfig

__all__ = ["build_model"]

_SIZE_OVERRIDES = ("embed_dim", "image_size", "vision_width", "vision_layers", "patch_size", "text_width",
                   "text_layers", "text_heads", "context_length", "quick_gelu")


def build_model(cfg: ModelConfig) -> tuple[CLIP, PreprocessConfig, Tokenizer]:
    """A randomly initialised CLIP of `cfg.arch` (with the size overrides), or the checkpoint `cfg.init`."""
    if cfg.init:
        return _load_init(cfg)
    arch = get_model_config(cfg.arch)
    for value, section, key in (
        (cfg.embed_dim, arch, "embed_dim"), (cfg.quick_gelu, arch, "quick_gelu"),
        (cfg.image_size, arch.vision, "image_size"), (cfg.vision_width, arch.vision, "width"),
        (cfg.vision_layers, arch.vision, "layers"), (cfg.patch_size, arch.vision, "patch_size"),
        (cfg.text_width, arch.text, "width"), (cfg.text_layers, arch.text, "layers"),
        (cfg.text_heads, arch.text, "heads"), (cfg.context_length, arch.text, "context_length"),
    ):
        if value is not None:
            setattr(section, key, value)
    model = CLIP(arch)
    return model, model.preprocess_config, Tokenizer.from_config(model.tokenizer_config())


def _load_init(cfg: ModelConfig) -> tuple[CLIP, PreprocessConfig, Tokenizer]:
    overrides = [name for name in _SIZE_OVERRIDES if getattr(cfg, name) is not None]
    if overrides:
        raise ValueError(f"model.init={cfg.init!r} fixes the architecture; remove the size overrides {overrides}")
    source, pretrained = cfg.init, None
    if not Path(source).exists() and ":" in source and not source.startswith("hf-hub:"):
        source, pretrained = source.rsplit(":", 1)  # NAME:TAG, a registered pretrained model
    model, _, tokenizer = load(source, pretrained=pretrained)
    return model.train(), model.preprocess_config, tokenizer
