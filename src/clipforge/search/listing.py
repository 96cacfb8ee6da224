"""What a store embeds: the sources of a collection listed as items, in the order they are embedded.

A source is image folders (recursive; a ``NAME.txt`` beside an image is its caption), one caption table
(.csv/.tsv/.parquet) or WebDataset shards (uncompressed .tar files; ``{000..009}`` ranges expand). The listing is
deterministic (sorted folders, table order, archive order), and its fingerprint is how a resumed run checks that
it sees the same collection. Images in shards are read in place by offset (`TarMember`, `read_span`), never
extracted. What a source is, and how a shard's members make samples, is `clipforge.data`'s to say, for training
and embedding alike.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..data.discovery import find_images
from ..data.shards import IMAGE_EXTENSIONS, split_member_name
from ..data.sources import group_by_image, read_caption_table, source_kind

__all__ = ["SourceItem", "SourceListing", "TarMember", "expand_braces", "list_source", "read_span"]

_TABLE_SUFFIXES = (".csv", ".tsv", ".parquet")
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")
# The store's manifest names its source kinds in full; `source_kind` says "wds" for shards, as training configs do.
_STORE_KINDS = {"folder": "folder", "table": "table", "wds": "webdataset"}


@dataclass(frozen=True)
class SourceItem:
    """One image to embed: where its bytes are, and what its metadata row says."""

    path: str  # image file, or "SHARD.tar/KEY" for a WebDataset sample
    caption: str | None = None
    extra: tuple[tuple[str, str], ...] = ()  # further metadata columns, as strings
    shard: str | None = None  # WebDataset samples: the tar file and the image member's data span
    offset: int = 0
    size: int = 0

    def image_source(self) -> str | TarMember:
        """What `embed_images` reads: the file path, or a member of a tar shard (read where it is decoded, so
        that a part's image bytes never sit in the main process all at once)."""
        if self.shard is None:
            return self.path
        return TarMember(self.shard, self.offset, self.size, self.path)


@dataclass(frozen=True)
class TarMember:
    """A file inside an uncompressed tar shard, readable like an open binary file (`load_image` takes it)."""

    shard: str
    offset: int
    size: int
    name: str

    def read(self) -> bytes:
        return read_span(self.shard, self.offset, self.size)


@dataclass
class SourceListing:
    """The items of a source, in the order they are embedded."""

    kind: str  # "folder" | "table" | "webdataset"
    inputs: list[str]  # the source arguments, resolved
    items: list[SourceItem]

    def fingerprint(self) -> str:
        """sha256 over every item's path and caption: a resumed run must see the very same listing."""
        digest = hashlib.sha256()
        for item in self.items:
            digest.update(item.path.encode("utf-8", "surrogatepass"))
            digest.update(b"\0" + (item.caption or "").encode("utf-8", "surrogatepass") + b"\n")
        return digest.hexdigest()

    @property
    def has_captions(self) -> bool:
        return any(item.caption is not None for item in self.items)

    @property
    def extra_columns(self) -> list[str]:
        return sorted({key for item in self.items for key, _ in item.extra})


def read_span(path: str | Path, offset: int, size: int) -> bytes:
    """`size` bytes of `path` from `offset` (a member of an uncompressed tar shard)."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise OSError(f"{path}: expected {size} bytes at offset {offset}, the file ends after {len(data)}")
    return data


def list_source(sources: Sequence[str | Path], image_col: str = "image_path",
                caption_col: str = "caption") -> SourceListing:
    """List what `sources` hold: image folders (recursive), one caption table (.csv/.tsv/.parquet), or
    WebDataset shards (.tar files; ``{000..009}`` ranges are expanded). Raises ValueError if empty or mixed."""
    inputs = [p for s in sources for p in expand_braces(str(s))]
    if not inputs:
        raise ValueError("no source given: pass image folders, a caption table or .tar shards")
    for path in inputs:
        if not os.path.exists(path):
            raise ValueError(f"{path}: no such file or folder")
    kinds = {_STORE_KINDS[source_kind(p, tables=_TABLE_SUFFIXES)] for p in inputs}
    if len(kinds) != 1:
        raise ValueError(f"sources mix {' and '.join(sorted(kinds))}: embed one kind of source per store")
    kind = kinds.pop()
    resolved = [str(Path(p).resolve()) for p in inputs]
    if kind == "table":
        if len(resolved) != 1:
            raise ValueError("give one caption table per store (got several)")
        items = _table_items(resolved[0], image_col, caption_col)
    elif kind == "webdataset":
        items = [item for shard in resolved for item in _tar_items(shard)]
    else:
        items = _folder_items(resolved)
    if not items:
        raise ValueError(f"no images found in {', '.join(inputs)}")
    return SourceListing(kind, resolved, items)


def expand_braces(pattern: str) -> list[str]:
    """``shards-{000..002}.tar`` -> the three names (zero padding kept); other strings unchanged."""
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    first, last = match.group(1), match.group(2)
    width = len(first) if first.startswith("0") else 0
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [name for n in range(int(first), int(last) + 1) for name in expand_braces(f"{head}{n:0{width}d}{tail}")]


def _folder_items(folders: list[str]) -> list[SourceItem]:
    """Every image under the folders (sorted); a ``NAME.txt`` beside ``NAME.jpg`` is its caption."""
    items = []
    for path in find_images(folders):  # images recognised by content, each folder sorted
        sidecar = Path(path).with_suffix(".txt")
        caption = sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else None
        items.append(SourceItem(str(path), caption))
    return items


def _table_items(table: str, image_col: str, caption_col: str) -> list[SourceItem]:
    """One item per distinct image of a caption table, in order of first appearance, with the table's other
    columns (from its first row). An image with several caption rows is embedded once: `caption` is its first
    caption, the extra column `captions` holds all of them (a JSON list) when any image has several."""
    # Missing image files are not fatal here: like unreadable ones, they are recorded and skipped.
    rows = read_caption_table(table, image_col=image_col, caption_col=caption_col, check_files=False)
    images, row_numbers = group_by_image([str(path) for path in rows.image_paths], range(len(rows)))
    several = any(len(numbers) > 1 for numbers in row_numbers)
    items = []
    for path, numbers in zip(images, row_numbers, strict=True):
        first = numbers[0]
        extra = [(name, values[first]) for name, values in rows.columns.items() if values[first] is not None]
        captions = [rows.captions[i] for i in numbers]
        if several:
            extra.append(("captions", json.dumps(captions, ensure_ascii=False)))
        items.append(SourceItem(path, captions[0], tuple(sorted(extra))))
    return items


def _tar_items(shard: str) -> list[SourceItem]:
    """Samples of a WebDataset shard (img2dataset layout: ``KEY.jpg`` + ``KEY.txt``), in archive order; a sample
    with several images is its first one in the archive."""
    images: dict[str, tuple[int, int]] = {}
    captions: dict[str, str] = {}
    try:
        with tarfile.open(shard, "r:") as tar:  # uncompressed only: members must be readable by offset
            for member in tar:
                split = split_member_name(member.name) if member.isfile() else None
                if split is None:
                    continue
                key, ext = split
                if ext in IMAGE_EXTENSIONS and key not in images:
                    images[key] = (member.offset_data, member.size)
                elif ext == "txt":
                    captions[key] = tar.extractfile(member).read().decode("utf-8", "replace").strip()
    except tarfile.ReadError as err:
        raise ValueError(f"{shard}: not an uncompressed tar archive ({err})") from None
    return [SourceItem(f"{shard}/{key}", captions.get(key), (("key", key),), shard, offset, size)
            for key, (offset, size) in images.items()]
