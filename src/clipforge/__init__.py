"""clipforge: a complete, fast, practical CLIP system.

    model, preprocess, tokenizer = clipforge.load("path/to/checkpoint")
    images = torch.stack([preprocess(Image.open(p)) for p in paths])
    probs = (100 * model.encode_image(images, normalize=True)
             @ model.encode_text(tokenizer(["a dog", "a cat"]), normalize=True).T).softmax(-1)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> module that defines it. Imported on first use so that `import clipforge` (and the CLI's
# --help) stays fast and a submodule can be used without importing the whole package.
_EXPORTS = {
    "CLIP": "model", "CLIPConfig": "model", "create_model": "model", "list_models": "model",
    "CheckpointError": "checkpoints", "convert": "checkpoints", "load": "checkpoints", "save_model": "checkpoints",
    "list_pretrained": "checkpoints.pretrained",
    "ImageEmbeddings": "embed", "embed_images": "embed", "embed_texts": "embed",
    "Tokenizer": "tokenizer", "tokenize": "tokenizer",
    "PreprocessConfig": "transforms", "image_transform": "transforms",
    "zero_shot_classifier": "zeroshot", "classify": "zeroshot", "export_onnx": "export",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'clipforge' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
