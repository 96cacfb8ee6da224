"""Embedding stores: the folder layout, its manifest, and reading a store back.

A store is a collection of images (and captions) turned into sharded embeddings, readable by any tool that reads
NumPy and Parquet::

    manifest.json                 model, preprocessing, source, settings, counts, finished parts, failures
    img_emb/part-00000.npy        float16 [n, E], L2-normalised image embeddings
    text_emb/part-00000.npy       float16 [n, E] caption embeddings, same rows (only when captions exist)
    metadata/part-00000.parquet   one row per vector, same order: item, path, caption, width, height, extras

Only the parts the manifest lists exist as far as a reader is concerned; the ``id`` of a vector is its row in
the concatenation of those parts, in part order (see `EmbeddingStore`). What is embedded is `listing`'s to say,
how a store is written and resumed `writer`'s.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["FORMAT_VERSION", "MANIFEST", "STORE_FORMAT", "EmbeddingStore", "read_manifest"]

STORE_FORMAT = "clipforge-embeddings"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


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
