"""Writing a store: a listed collection embedded part by part, each part committed by the manifest.

Part ``k`` covers the items ``[k * part_size, (k + 1) * part_size)`` of the source listing (`listing`), minus the
items that could not be decoded; those are recorded in the manifest. Each part's files are written atomically
(`clipforge.util.atomic_write`: a hidden temporary file in the same folder, renamed into place), and the manifest,
rewritten the same way after each part, is the commit record. A run killed at any point leaves at most stray
temporary files and part files the manifest does not list: the next run removes or overwrites them, and because
every part is embedded with the same batches in the same order, a resumed store is byte-identical to an
uninterrupted one. Several processes share a run by parts, each recording its own in a rank file that rank 0
merges. The layout and the reading side are `store`'s.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ..embed import embed_images, embed_texts
from ..util import atomic_write, atomic_write_json
from .listing import SourceItem, SourceListing, TarMember, list_source
from .store import FORMAT_VERSION, MANIFEST, STORE_FORMAT, read_manifest

__all__ = ["DEFAULT_PART_SIZE", "EmbedReport", "EmbedSettings", "embed_collection", "model_description"]

DEFAULT_PART_SIZE = 10_000


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
            _write_manifest(output / MANIFEST, manifest)
        else:  # one writer per file: each rank its own record, merged by rank 0
            mine[_part_name(k)] = entry
            _write_manifest(_rank_file(output, rank), {"parts": mine})
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
    _write_manifest(output / MANIFEST, manifest)
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
    # Temporary files of a killed run (`atomic_write` names them ".NAME.XXXXXXXX.tmp"), never listed by the manifest.
    for stray in [*output.glob(".manifest*.tmp"), *output.glob("*/.*.tmp")]:
        stray.unlink()
    _write_manifest(path, manifest)
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
    atomic_write(output / "metadata" / f"{name}.parquet", lambda f: pq.write_table(table, f))
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
    atomic_write(path, lambda f: np.save(f, data))




def _write_manifest(path: Path, manifest: dict) -> None:
    """The manifest, or a rank's record, laid out as every store's manifest is (JSON, indent 1, UTF-8)."""
    atomic_write_json(path, manifest, indent=1)
