"""Image features for evaluation: `image_features` embeds image files through the shared embedding path
(`clipforge.embed.embed_images`, L2-normalised) and makes a set where nothing decodes an error; given a cache
folder it keeps the features on disk between runs.

A cache file is keyed by `model_fingerprint` (a hash of the model's weights), the preprocessing, and the image
list with each file's size and modification time: a changed model, image or file list never reuses stale
features. An unreadable or mismatched cache file is a cache miss, recomputed and rewritten.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..embed import ImageEmbeddings, embed_images
from ..util import atomic_write

__all__ = ["image_features", "model_fingerprint"]

# Part of every cache key: bump it when the cached layout or the embedding path's numerics change.
_CACHE_VERSION = 1


def image_features(model, preprocess: Callable, images: Sequence[str | Path], *, batch_size: int = 64,
                   num_workers: int = 0, progress: bool = True, desc: str = "embedding images",
                   source: str | Path = "images", cache_dir: str | Path | None = None) -> ImageEmbeddings:
    """L2-normalised embeddings of the image files `images`, with the ones that failed to decode.

    `source` names the data in the ValueError raised when none of the images decodes. With `cache_dir`, the
    features are read from there when cached (the images are then not decoded at all) and written there when
    not."""
    cache_file = _cache_file(model, preprocess, images, cache_dir) if cache_dir is not None else None
    embedded = _read_cache(cache_file, len(images)) if cache_file is not None else None
    if embedded is None:
        embedded = embed_images(model, [str(p) for p in images], preprocess, batch_size=batch_size,
                                num_workers=num_workers, normalize=True, progress=progress, desc=desc)
        if cache_file is not None:
            _write_cache(cache_file, embedded)
    if not embedded.indices:
        first = embedded.failures[0][2] if embedded.failures else "no images"
        raise ValueError(f"{source}: none of the {len(images)} images could be decoded (first: {first})")
    return embedded


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of every weight and buffer (name, dtype, shape, bytes): equal only for the same numbers."""
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{key}|{t.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _cache_file(model, preprocess, images: Sequence[str | Path], cache_dir: str | Path) -> Path:
    digest = hashlib.sha256(f"v{_CACHE_VERSION}|{model_fingerprint(model)}|{preprocess!r}\n".encode())
    for image in map(Path, images):
        try:
            stat = image.stat()
            digest.update(f"{image.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        except OSError:  # missing file: it will fail to decode; the key still depends on it
            digest.update(f"{image}|missing\n".encode())
    return Path(cache_dir).expanduser() / f"features-{digest.hexdigest()[:32]}.pt"


def _read_cache(path: Path, n_items: int) -> ImageEmbeddings | None:
    """Cached embeddings, or None when absent or unreadable (then they are recomputed and rewritten)."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        embeddings, indices = saved["embeddings"], saved["indices"].tolist()
        failures = [(int(i), str(item), str(reason)) for i, item, reason in saved["failures"]]
    except Exception:  # a truncated or foreign file is just a cache miss
        return None
    if len(indices) != len(embeddings) or len(indices) + len(failures) != n_items:
        return None
    return ImageEmbeddings(embeddings.float(), indices, failures)


def _write_cache(path: Path, embedded: ImageEmbeddings) -> None:
    saved = {"embeddings": embedded.embeddings, "indices": torch.tensor(embedded.indices, dtype=torch.long),
             "failures": [list(f) for f in embedded.failures]}
    atomic_write(path, lambda handle: torch.save(saved, handle))
