"""Evaluation data sets as rows: a caption table or a labelled image set read into image paths with one text each
(a caption or a label), optionally one split of it, with the name and hash a result reports.

`clipforge.data.sources` reads and validates the files; this module only shapes what it read for evaluation:
`read_caption_rows` (retrieval), `read_label_rows` (zero-shot, linear probe), both returning `DatasetRows`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.sources import CaptionTable, read_caption_table, read_labelled_images

__all__ = ["DatasetRows", "read_caption_rows", "read_label_rows"]


@dataclass
class DatasetRows:
    """A data set as read: image paths with one text each (a caption or a label), and its identity."""

    name: str
    path: Path
    images: list[Path]
    texts: list[str]
    root: Path  # folder that image paths are made relative to when hashing

    def info(self) -> dict[str, Any]:
        """A result's ``dataset`` field: name, path, row count and `sha256`."""
        return {"name": self.name, "path": str(self.path), "rows": len(self.images), "sha256": self.sha256()}

    def sha256(self) -> str:
        """Hash of the rows, with paths relative to the data set's folder (location-independent)."""
        digest = hashlib.sha256()
        for image, text in zip(self.images, self.texts, strict=True):
            digest.update(f"{_relative(image, self.root)}\t{text}\n".encode())
        return digest.hexdigest()

    def relative_image(self, row: int) -> str:
        """The image path of `row` relative to the data set's folder (as given when outside it), for messages."""
        return _relative(self.images[row], self.root)


def read_caption_rows(data: str | Path, image_col: str = "image_path", caption_col: str = "caption",
                      split: str | None = None, image_root: str | Path | None = None) -> DatasetRows:
    """A caption table (CSV/TSV/Parquet) as rows, optionally only those whose ``split`` column equals `split`.
    Image paths are relative to `image_root` (default: the table's folder).

    ValueError (one line, naming the file) for a missing column, a missing image file or no rows."""
    path = Path(data).expanduser()
    table = read_caption_table(path, image_col=image_col, caption_col=caption_col, image_root=image_root)
    return _filtered(path, list(table.image_paths), list(table.captions), table, split, image_root)


def read_label_rows(data: str | Path, image_col: str = "image_path", label_col: str = "label",
                    split: str | None = None, image_root: str | Path | None = None) -> DatasetRows:
    """A labelled image set: a labels table (`image_col`, `label_col`; CSV/TSV/Parquet; paths relative to
    `image_root`, default its folder) or a folder with one subfolder of images per class; `split` keeps the
    table rows whose ``split`` column equals it."""
    path = Path(data).expanduser()
    if path.is_dir():
        if split is not None:
            raise ValueError(f"{path}: a class folder has no 'split' column; give a labels table to use a split")
        labelled = read_labelled_images(path)
        return DatasetRows(_dataset_name(path), path, list(labelled.paths), list(labelled.labels), path)
    if split is None:
        labelled = read_labelled_images(path, image_col=image_col, label_col=label_col, image_root=image_root)
        return _filtered(path, list(labelled.paths), list(labelled.labels), None, None, image_root)
    # A labels table has the shape of a caption table; read as one, it keeps the split column.
    table = read_caption_table(path, image_col=image_col, caption_col=label_col, image_root=image_root)
    return _filtered(path, list(table.image_paths), list(table.captions), table, split, image_root)


def _filtered(path: Path, images: list[Path], texts: list[str], table: CaptionTable | None, split: str | None,
              image_root: str | Path | None) -> DatasetRows:
    """Rows of a table, only those of `split` when given (named ``<data set>-<split>``)."""
    name = _dataset_name(path)
    if split is not None:
        keep = table.where("split", split)
        images, texts, name = list(keep.image_paths), list(keep.captions), f"{name}-{split}"
        if not images:
            values = sorted(set(table.columns["split"]))
            raise ValueError(f"{path}: no rows with split {split!r} (splits found: {', '.join(values[:10])})")
    root = Path(image_root).expanduser() if image_root is not None else path.parent
    return DatasetRows(name, path, images, texts, root)


def _dataset_name(path: Path) -> str:
    """``flickr8k-captions`` for flickr8k/captions.csv, the folder name for an image folder."""
    return path.name if path.is_dir() else f"{path.parent.name}-{path.stem}".strip("-")


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()
