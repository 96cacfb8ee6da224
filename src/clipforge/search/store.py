"""Embedding stores: a collection of images (and captions) turned into sharded, resumable embeddings.

Layout of a store folder (readable by any tool that reads NumPy and Parquet)::

    manifest.json                 model, preprocessing, source, settings, counts, finished parts, failures
    img_emb/part-00000.npy        float16 [n, E], L2-normalised image embeddings
    text_emb/part-00000.npy       float16 [n, E] caption embeddings, same rows (only when captions exist)
    metadata/part-00000.parquet   one row per vector, same order: item, path, caption, width, height, extras

Part ``k`` covers the items ``[k * part_size, (k + 1) * part_size)`` of the source listing (a deterministic,
sorted listing), minus the items that could not be decoded; those are recorded in the manifest. The vector
``id`` of a row is its position in the concatenation of the parts (see `EmbeddingStore`).

Each part's files are written to temporary names and renamed into place; the manifest, rewritten the same
way, is the commit record. A run killed at any point leaves at most stray temporary files and part files the
manifest does not list: the next run removes or overwrites them, and because every part is embedded with the
same batches in the same order, a resumed store is byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import tarfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ..embed import embed_images, embed_texts

STORE_FORMAT = "clipforge-embeddings"
FORMAT_VERSION = 1
DEFAULT_PART_SIZE = 10_000
MANIFEST = "manifest.json"
_TABLE_SUFFIXES = (".csv", ".tsv", ".parquet")
_TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


# ------------------------------------------------------------------------------------------------ sources


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
    kinds = {_kind_of(Path(p)) for p in inputs}
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


def _kind_of(path: Path) -> str:
    if path.is_dir():
        return "folder"
    if path.suffix.lower() == ".tar":
        return "webdataset"
    if path.suffix.lower() in _TABLE_SUFFIXES:
        return "table"
    raise ValueError(f"{path}: not a folder, a caption table ({', '.join(_TABLE_SUFFIXES)}) or a .tar shard")


def _folder_items(folders: list[str]) -> list[SourceItem]:
    """Every image under the folders (sorted); a ``NAME.txt`` beside ``NAME.jpg`` is its caption."""
    from ..data.sources import find_images

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
    from ..data.sources import read_caption_table

    # Missing image files are not fatal here: like unreadable ones, they are recorded and skipped.
    rows = read_caption_table(table, image_col=image_col, caption_col=caption_col, check_files=False)
    first: dict[str, int] = {}
    captions: dict[str, list[str]] = {}
    for i, (path, caption) in enumerate(zip(rows.image_paths, rows.captions, strict=True)):
        first.setdefault(str(path), i)
        captions.setdefault(str(path), []).append(caption)
    several = any(len(c) > 1 for c in captions.values())
    items = []
    for path, i in first.items():
        extra = [(name, values[i]) for name, values in rows.columns.items() if values[i] is not None]
        if several:
            extra.append(("captions", json.dumps(captions[path], ensure_ascii=False)))
        items.append(SourceItem(path, captions[path][0], tuple(sorted(extra))))
    return items


def _tar_items(shard: str) -> list[SourceItem]:
    """Samples of a WebDataset shard (img2dataset layout: ``KEY.jpg`` + ``KEY.txt``), in archive order."""
    images: dict[str, tuple[int, int]] = {}
    captions: dict[str, str] = {}
    try:
        with tarfile.open(shard, "r:") as tar:  # uncompressed only: members must be readable by offset
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, base = member.name.rpartition("/")
                stem, _, ext = base.partition(".")
                key = f"{folder}/{stem}" if folder else stem
                ext = ext.lower()
                if ext in _TAR_IMAGE_EXTS and key not in images:
                    images[key] = (member.offset_data, member.size)
                elif ext == "txt":
                    captions[key] = tar.extractfile(member).read().decode("utf-8", "replace").strip()
    except tarfile.ReadError as err:
        raise ValueError(f"{shard}: not an uncompressed tar archive ({err})") from None
    return [SourceItem(f"{shard}/{key}", captions.get(key), (("key", key),), shard, offset, size)
            for key, (offset, size) in images.items()]


# ------------------------------------------------------------------------------------------------ writing


@dataclass
class EmbedSettings:
    """How a store is embedded; a resumed run must use the same values (they change the bytes written)."""

    part_size: int = DEFAULT_PART_SIZE
    batch_size: int = 64
    image_col: str = "image_path"
    caption_col: str = "caption"

    def __post_init__(self) -> None:
        for name in ("part_size", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class EmbedReport:
    """What one `embed_collection` call did."""

    store: Path
    parts_written: int
    items_embedded: int
    items_failed: int
    seconds: float
    failures: list[dict[str, Any]] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return (self.items_embedded + self.items_failed) / self.seconds if self.seconds > 0 else 0.0


def model_description(model, preprocess, checkpoint: str | None = None, pretrained: str | None = None) -> dict:
    """What the manifest records about the model: enough to reload it (`checkpoint`, `pretrained`) and to
    tell whether a resumed run uses the same one (architecture, precision, preprocessing)."""
    if checkpoint is not None and pretrained is None and os.path.exists(checkpoint):
        checkpoint = str(Path(checkpoint).resolve())
    return {
        "model": {"checkpoint": checkpoint, "pretrained": pretrained, "config": model.config.to_dict(),
                  "precision": model.precision, "embed_dim": model.embed_dim},
        "preprocess": {**model.preprocess_config.to_dict(),
                       "fast_jpeg_draft": getattr(preprocess, "draft_size", None) is not None},
    }


def embed_collection(
    sources: Sequence[str | Path],
    output: str | Path,
    model,
    preprocess: Callable,
    tokenizer: Callable,
    settings: EmbedSettings | None = None,
    *,
    checkpoint: str | None = None,
    pretrained: str | None = None,
    num_workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
) -> EmbedReport:
    """Embed every image of `sources` (and their captions) into the store folder `output`.

    Resumes an unfinished store (same source listing, model and settings, else ValueError); a finished
    store is left as it is. `overwrite=True` starts again from scratch. `checkpoint`/`pretrained` are
    recorded so that the index and the server can reload the same model. Returns what was done.

    Several processes (`rank` of `world_size`, e.g. one per GPU or node) share the work: rank r embeds the parts
    k with k % world_size == r and records each finished part in its own ``manifest.rank-R.json``; `barrier` (a
    collective wait, e.g. ``torch.distributed.barrier``) lets rank 0 prepare the store first and merge every
    rank's parts into ``manifest.json`` at the end. The store is the one a single process would write (to the
    bit, with the same torch thread count), and a killed run resumes with any number of processes."""
    settings = settings or EmbedSettings()
    log = log or (lambda line: print(line, file=sys.stderr))
    output = Path(output)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if world_size > 1 and barrier is None:
        raise ValueError("several ranks need a barrier (e.g. torch.distributed.barrier)")
    wait = barrier or (lambda: None)
    listing = list_source(sources, settings.image_col, settings.caption_col)
    described = model_description(model, preprocess, checkpoint, pretrained)
    if rank == 0:
        manifest = _start_or_resume(output, listing, settings, described, overwrite)
    wait()  # the store exists (and was cleared or checked) before any rank writes into it
    if rank != 0:
        manifest = read_manifest(output)
        _check_resumable(manifest, listing, settings, described, output)
    total_parts = manifest["counts"]["parts"]
    todo = [k for k in range(total_parts) if _part_name(k) not in manifest["parts"] and k % world_size == rank]
    if rank == 0 and manifest["counts"]["parts_done"]:
        log(f"resuming {output}: {manifest['counts']['parts_done']} of {total_parts} parts already done")
    mine: dict[str, Any] = {}
    started, embedded, failed, failures = time.perf_counter(), 0, 0, []
    for k in todo:
        part_items = listing.items[k * settings.part_size:(k + 1) * settings.part_size]
        entry = _embed_part(output, k, part_items, k * settings.part_size, listing, model, preprocess, tokenizer,
                            settings, num_workers, progress, desc=f"part {k + 1}/{total_parts}")
        if world_size == 1:
            manifest["parts"][_part_name(k)] = entry
            _refresh_counts(manifest)
            _write_json_atomic(output / MANIFEST, manifest)
        else:  # one writer per file: each rank its own record, merged by rank 0
            mine[_part_name(k)] = entry
            _write_json_atomic(_rank_file(output, rank), {"parts": mine})
        embedded, failed, failures = embedded + entry["vectors"], failed + len(entry["failures"]), \
            failures + entry["failures"]
        rate = (embedded + failed) / max(time.perf_counter() - started, 1e-9)
        log(f"part {k + 1}/{total_parts}: {entry['vectors']} embedded, {len(entry['failures'])} failed; "
            f"{rate:.1f} images/s overall" + (f" (rank {rank})" if world_size > 1 else ""))
    wait()  # every rank's parts are on disk
    if rank == 0 and world_size > 1:
        _merge_rank_files(output, manifest)
    wait()  # the manifest is final before any rank returns (and, say, builds the index)
    return EmbedReport(output, len(todo), embedded, failed, time.perf_counter() - started, failures)


def _rank_file(output: Path, rank: int) -> Path:
    return output / f"manifest.rank-{rank:05d}.json"


def _merge_rank_files(output: Path, manifest: dict) -> None:
    """Fold the parts that ranks recorded in their own files (this run's, or a killed run's) into the manifest."""
    files = sorted(output.glob("manifest.rank-*.json"))
    for path in files:
        manifest["parts"].update(json.loads(path.read_text(encoding="utf-8"))["parts"])
    _refresh_counts(manifest)
    _write_json_atomic(output / MANIFEST, manifest)
    for path in files:
        path.unlink()


def _part_name(k: int) -> str:
    return f"part-{k:05d}"


def _start_or_resume(output: Path, listing: SourceListing, settings: EmbedSettings, described: dict,
                     overwrite: bool) -> dict:
    """The manifest to continue from: a fresh one, or the existing one when it matches this run."""
    path = output / MANIFEST
    if path.exists() and not overwrite:
        manifest = read_manifest(output)
        _check_resumable(manifest, listing, settings, described, output)
        _merge_rank_files(output, manifest)  # parts finished by the ranks of a killed multi-process run
    else:
        if output.exists() and any(output.iterdir()) and not path.exists():
            raise ValueError(f"{output}: folder exists and is not an embedding store; choose an empty or new "
                             f"--output")
        _clear_store(output)
        manifest = _new_manifest(listing, settings, described)
    for sub in ("img_emb", "metadata") + (("text_emb",) if listing.has_captions else ()):
        (output / sub).mkdir(parents=True, exist_ok=True)
    for stray in output.glob("*/.*.tmp"):  # left by a killed run; never listed by the manifest
        stray.unlink()
    _write_json_atomic(path, manifest)
    return manifest


def _new_manifest(listing: SourceListing, settings: EmbedSettings, described: dict) -> dict:
    parts = -(-len(listing.items) // settings.part_size)
    return {
        "format": STORE_FORMAT, "format_version": FORMAT_VERSION,
        **described,
        "source": {"kind": listing.kind, "inputs": listing.inputs, "items": len(listing.items),
                   "fingerprint": listing.fingerprint(), "captions": listing.has_captions,
                   "extra_columns": listing.extra_columns},
        "settings": {"part_size": settings.part_size, "batch_size": settings.batch_size,
                     "image_col": settings.image_col, "caption_col": settings.caption_col},
        "counts": {"items": len(listing.items), "parts": parts, "parts_done": 0, "vectors": 0, "failed": 0},
        "complete": False,
        "parts": {},
    }


def _check_resumable(manifest: dict, listing: SourceListing, settings: EmbedSettings, described: dict,
                     output: Path) -> None:
    hint = "use a new --output, or --overwrite to start again"
    source = manifest["source"]
    if source["fingerprint"] != listing.fingerprint():
        raise ValueError(f"{output}: the source changed since this store was started ({source['items']} items "
                         f"then, {len(listing.items)} now, or different files/captions); {hint}")
    for key, value in described.items():
        if manifest.get(key) != value:
            raise ValueError(f"{output}: this store was embedded with a different {key} "
                             f"({_short_diff(manifest.get(key), value)}); {hint}")
    stored = manifest["settings"]
    for key in ("part_size", "batch_size", "image_col", "caption_col"):
        if stored.get(key) != getattr(settings, key):
            raise ValueError(f"{output}: this store was embedded with {key}={stored.get(key)!r}, this run asks "
                             f"for {getattr(settings, key)!r}; {hint}")


def _short_diff(old: Any, new: Any) -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        return ", ".join(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in keys[:3])
    return f"{old!r} then, {new!r} now"


def _clear_store(output: Path) -> None:
    """Remove the files a store consists of (never anything else in the folder)."""
    for sub in ("img_emb", "text_emb", "metadata"):
        for f in (output / sub).glob("*") if (output / sub).is_dir() else ():
            if f.name.startswith(("part-", ".part-")):
                f.unlink()
    index_dir = output / "index"
    for f in index_dir.glob("*") if index_dir.is_dir() else ():
        f.unlink()
    (output / MANIFEST).unlink(missing_ok=True)
    for f in output.glob("manifest.rank-*.json"):
        f.unlink()
    output.mkdir(parents=True, exist_ok=True)


def _refresh_counts(manifest: dict) -> None:
    parts = manifest["parts"].values()
    counts = manifest["counts"]
    counts["parts_done"] = len(manifest["parts"])
    counts["vectors"] = sum(p["vectors"] for p in parts)
    counts["failed"] = sum(len(p["failures"]) for p in parts)
    manifest["complete"] = counts["parts_done"] == counts["parts"]
    # Parts are listed in order whatever order they finished in, so the file does not depend on history.
    manifest["parts"] = dict(sorted(manifest["parts"].items()))


def _embed_part(output: Path, k: int, items: list[SourceItem], first: int, listing: SourceListing, model,
                preprocess, tokenizer, settings: EmbedSettings, num_workers: int, progress: bool,
                desc: str) -> dict:
    """Embed one part and write its files; returns its manifest entry."""
    sources = [item.image_source() for item in items]
    # Header reads (about 0.1 ms an image) run here, not in a thread beside the loader: forking DataLoader
    # workers while another thread holds a lock can deadlock them.
    sizes = [_image_size(s) for s in sources]
    result = embed_images(model, sources, preprocess, batch_size=settings.batch_size, num_workers=num_workers,
                          normalize=True, progress=progress, desc=desc)
    ok = [items[i] for i in result.indices]
    name = _part_name(k)
    _save_npy(output / "img_emb" / f"{name}.npy", result.embeddings.numpy())
    if listing.has_captions:
        _save_npy(output / "text_emb" / f"{name}.npy", _caption_embeddings(ok, model, tokenizer, settings))
    table = _metadata_table(ok, [first + i for i in result.indices], [sizes[i] for i in result.indices], listing)
    _write_atomic(output / "metadata" / f"{name}.parquet", lambda f: pq.write_table(table, f))
    failures = [{"item": first + i, "path": items[i].path, "reason": reason} for i, _, reason in result.failures]
    return {"items": [first, first + len(items)], "vectors": len(ok), "failures": failures}


def _caption_embeddings(items: list[SourceItem], model, tokenizer, settings: EmbedSettings) -> np.ndarray:
    """Caption embeddings aligned with the rows; a row without a caption gets a zero vector (scores 0)."""
    out = np.zeros((len(items), model.embed_dim), dtype=np.float32)
    rows = [i for i, item in enumerate(items) if item.caption is not None]
    if rows:
        texts = [items[i].caption for i in rows]
        out[rows] = embed_texts(model, texts, tokenizer, batch_size=max(settings.batch_size, 64), normalize=True,
                                progress=False).numpy()
    return out


def _image_size(source: str | TarMember) -> tuple[int | None, int | None]:
    """(width, height) from the image header, without decoding pixels; (None, None) when unreadable."""
    try:
        with Image.open(io.BytesIO(source.read()) if isinstance(source, TarMember) else source) as img:
            return img.size
    except Exception:  # the embedding step reports why an image is unreadable; here it only lacks a size
        return None, None


def _metadata_table(items: list[SourceItem], positions: list[int], sizes: list[tuple], listing: SourceListing):
    columns: dict[str, pa.Array] = {
        "item": pa.array(positions, pa.int64()),
        "path": pa.array([item.path for item in items], pa.string()),
        "caption": pa.array([item.caption for item in items], pa.string()),
        "width": pa.array([s[0] for s in sizes], pa.int32()),
        "height": pa.array([s[1] for s in sizes], pa.int32()),
    }
    if listing.kind == "webdataset":
        columns["shard"] = pa.array([item.shard for item in items], pa.string())
        columns["offset"] = pa.array([item.offset for item in items], pa.int64())
        columns["size"] = pa.array([item.size for item in items], pa.int64())
    for name in listing.extra_columns:
        columns[name] = pa.array([dict(item.extra).get(name) for item in items], pa.string())
    return pa.table(columns)


def _save_npy(path: Path, embeddings: np.ndarray) -> None:
    """float16 rows: half the disk and memory of fp32, and well within the precision of bf16 inference."""
    data = np.ascontiguousarray(embeddings, dtype=np.float16)
    _write_atomic(path, lambda f: np.save(f, data))


def _write_atomic(path: Path, write: Callable[[Any], None]) -> None:
    """Write through ``.NAME.tmp`` in the same folder, flush to disk, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json_atomic(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=1, sort_keys=False, ensure_ascii=False) + "\n"
    _write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def read_manifest(store: str | Path) -> dict:
    """The manifest of a store folder; ValueError naming the folder if it is missing or not a store."""
    path = Path(store) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{store}: not an embedding store (no {MANIFEST}); create one with `clipforge embed`") \
            from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != STORE_FORMAT:
        raise ValueError(f"{path}: not a clipforge embedding store manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: store format version {manifest.get('format_version')!r}, this clipforge reads "
                         f"{FORMAT_VERSION}")
    return manifest


# ------------------------------------------------------------------------------------------------ reading


class EmbeddingStore:
    """Read access to a store folder: vectors (memory-mapped float16), metadata and the manifest.

    Vector ids are row positions in the concatenation of the finished parts, in part order."""

    def __init__(self, path: str | Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self.part_names = sorted(manifest["parts"])
        counts = [manifest["parts"][name]["vectors"] for name in self.part_names]
        self.offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self._metadata: pa.Table | None = None

    @classmethod
    def open(cls, path: str | Path, require_complete: bool = True) -> EmbeddingStore:
        manifest = read_manifest(path)
        if require_complete and not manifest["complete"]:
            counts = manifest["counts"]
            raise ValueError(f"{path}: store is unfinished ({counts['parts_done']} of {counts['parts']} parts); run "
                             f"the same `clipforge embed` command again to finish it")
        return cls(path, manifest)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def dim(self) -> int:
        return int(self.manifest["model"]["embed_dim"])

    @property
    def has_text(self) -> bool:
        return bool(self.manifest["source"]["captions"])

    def iter_parts(self, kind: str = "img_emb") -> Iterable[np.ndarray]:
        """Each part's float16 vectors in order (memory-mapped, so a large store never sits in memory)."""
        for name in self.part_names:
            array = np.load(self.path / kind / f"{name}.npy", mmap_mode="r")
            if array.ndim != 2 or array.shape[1] != self.dim:
                raise ValueError(f"{self.path / kind / name}.npy: shape {array.shape}, expected [n, {self.dim}]")
            yield array

    def vectors(self, kind: str = "img_emb") -> np.ndarray:
        """All vectors as one float32 array [N, E] (loads them into memory)."""
        parts = [np.asarray(p, dtype=np.float32) for p in self.iter_parts(kind)]
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)

    def vector(self, vector_id: int, kind: str = "img_emb") -> np.ndarray:
        """One vector (float32) by id."""
        part, row = self._locate(vector_id)
        array = np.load(self.path / kind / f"{self.part_names[part]}.npy", mmap_mode="r")
        return np.asarray(array[row], dtype=np.float32)

    def metadata(self) -> pa.Table:
        """All metadata rows in id order (cached)."""
        if self._metadata is None:
            tables = [pq.read_table(self.path / "metadata" / f"{name}.parquet") for name in self.part_names]
            # One chunk per column: `take` on a chunked column concatenates all its chunks first, every call.
            self._metadata = pa.concat_tables(tables).combine_chunks() if tables else \
                pa.table({"item": pa.array([], pa.int64())})
            if self._metadata.num_rows != len(self):
                raise ValueError(f"{self.path}: metadata holds {self._metadata.num_rows} rows, the manifest counts "
                                 f"{len(self)} vectors; the store is damaged, embed it again")
        return self._metadata

    def row(self, vector_id: int) -> dict[str, Any]:
        """The metadata of one vector, as a dict (with its `id`)."""
        return self.rows([vector_id])[0]

    def rows(self, vector_ids: Sequence[int]) -> list[dict[str, Any]]:
        """The metadata of several vectors (one `take` from the table: a hit list costs one lookup)."""
        for vector_id in vector_ids:
            self._locate(vector_id)
        taken = self.metadata().take(pa.array(vector_ids, pa.int64())).to_pylist()
        return [{"id": int(i), **row} for i, row in zip(vector_ids, taken, strict=True)]

    def _locate(self, vector_id: int) -> tuple[int, int]:
        if isinstance(vector_id, bool) or not 0 <= int(vector_id) < len(self):
            raise IndexError(f"vector id {vector_id} is out of range [0, {len(self)})")
        part = int(np.searchsorted(self.offsets, vector_id, side="right")) - 1
        return part, int(vector_id - self.offsets[part])


__all__ = ["DEFAULT_PART_SIZE", "EmbedReport", "EmbedSettings", "EmbeddingStore", "SourceItem", "SourceListing",
           "TarMember", "embed_collection", "expand_braces", "list_source", "model_description", "read_manifest",
           "read_span"]
