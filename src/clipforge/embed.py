"""The one batch-embedding path for images and texts: loading, batching, precision, progress.

Classification, evaluation, indexing and serving all call `embed_images` / `embed_texts`, so they share
the same preprocessing, batching and numerics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .images import ImageDecodeError, load_image

ImageItem = str | Path | Image.Image | bytes


@dataclass
class ImageEmbeddings:
    """Embeddings of the items that decoded, in input order, and why the others did not."""

    embeddings: torch.Tensor  # [N_ok, E] float32 on CPU
    indices: list[int]  # position in the input of each row
    failures: list[tuple[int, str, str]] = field(default_factory=list)  # (input index, item, reason)

    def __len__(self) -> int:
        return len(self.indices)


class _ImageItems(Dataset):
    def __init__(self, items: Sequence[ImageItem], preprocess: Callable[[Image.Image], torch.Tensor]):
        self.items, self.preprocess = items, preprocess
        self.draft_size = getattr(preprocess, "draft_size", None)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str]:
        item = self.items[index]
        try:
            image = item if isinstance(item, Image.Image) else load_image(item, draft_size=self.draft_size)
            return index, self.preprocess(image), ""
        except (ImageDecodeError, OSError, ValueError) as err:
            return index, None, str(err)


def _collate(batch: list[tuple[int, torch.Tensor | None, str]]):
    good = [(i, x) for i, x, _ in batch if x is not None]
    bad = [(i, reason) for i, x, reason in batch if x is None]
    pixels = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], pixels, bad


def _describe(item: Any) -> str:
    return str(item) if isinstance(item, (str, Path)) else type(item).__name__


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()  # not inference_mode: callers may use the results in autograd (e.g. a probe)
def embed_images(
    model,
    images: Sequence[ImageItem],
    preprocess: Callable[[Image.Image], torch.Tensor],
    batch_size: int = 64,
    num_workers: int = 0,
    normalize: bool = True,
    progress: bool = True,
    desc: str = "embedding images",
) -> ImageEmbeddings:
    """Embed image files, bytes or PIL images. Items that fail to decode are skipped and reported."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = model_device(model)
    loader = DataLoader(_ImageItems(images, preprocess), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_collate, persistent_workers=False,
                        pin_memory=device.type == "cuda")
    rows, indices, failures = [], [], []
    with tqdm(total=len(images), desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for batch_indices, pixels, bad in loader:
            failures += [(i, _describe(images[i]), reason) for i, reason in bad]
            if pixels is not None:
                feats = model.encode_image(pixels.to(device, non_blocking=True), normalize=normalize)
                rows.append(feats.float().cpu())
                indices += batch_indices
            bar.update(len(batch_indices) + len(bad))
    embeddings = torch.cat(rows) if rows else torch.empty(0, model.embed_dim)
    return ImageEmbeddings(embeddings, indices, failures)


@torch.no_grad()  # not inference_mode: callers may use the results in autograd (e.g. a probe)
def embed_texts(
    model,
    texts: Sequence[str],
    tokenizer: Callable[[Sequence[str]], torch.Tensor],
    batch_size: int = 256,
    normalize: bool = True,
    progress: bool = True,
    desc: str = "embedding texts",
) -> torch.Tensor:
    """`[N, E]` float32 embeddings of `texts` (on CPU)."""
    if isinstance(texts, str):
        raise TypeError("embed_texts takes a list of strings, not one string")
    device = model_device(model)
    rows = []
    with tqdm(total=len(texts), desc=desc, unit="txt", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start:start + batch_size])
            feats = model.encode_text(tokenizer(chunk).to(device), normalize=normalize)
            rows.append(feats.float().cpu())
            bar.update(len(chunk))
    return torch.cat(rows) if rows else torch.empty(0, model.embed_dim)


def normalized(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)
