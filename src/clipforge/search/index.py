"""Vector index over an embedding store, and search by text, image or stored item.

`build_index` writes ``STORE/index/faiss.index`` (a FAISS inner-product index; on unit vectors inner product is
cosine similarity) and ``STORE/index/index.json`` (its build parameters and the store it was built from).
The index kind is planned from the number of vectors and a memory budget:

- ``flat``: exact search, chosen up to ``flat_threshold`` vectors (default 100,000) when ``4 * N * dim``
  bytes fit the budget;
- ``ivf``: inverted lists (``nlist = 4 * sqrt(N)`` k-means cells, ``nprobe`` visited per query) holding the
  full vectors, when they fit; else ``ivf-sq8`` (one byte per dimension), else ``ivf-pq`` (product
  quantisation, ``dim / 8`` bytes per vector);
- ``hnsw``: a graph index (more memory, no training), on request.

`SearchIndex` loads the index with the store's metadata and, when a query is text or an image, the model the
store was embedded with; every query goes through `clipforge.embed` like the store did.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..embed import embed_images, embed_texts
from ..images import ImageDecodeError
from ..util import atomic_write, atomic_write_json
from .store import EmbeddingStore

INDEX_DIR = "index"
INDEX_FILE = "faiss.index"
PARAMS_FILE = "index.json"
KINDS = ("auto", "flat", "ivf", "ivf-sq8", "ivf-pq", "hnsw")
DEFAULT_FLAT_THRESHOLD = 100_000
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_TRAIN_POINTS_PER_CELL = 40  # FAISS warns below 39; more only slows k-means down
_ID_OVERHEAD = 8  # bytes per vector for the id stored in inverted lists


def _faiss():
    try:  # imported on first use: `import clipforge.search` stays light for the store's readers
        import faiss
    except ImportError as err:  # a dependency of the package; this only helps a broken environment
        raise ImportError("the search index needs faiss: pip install faiss-cpu") from err
    return faiss


def parse_size(text: str | int | None) -> int | None:
    """Bytes in ``'4G'``, ``'512MiB'``, ``'1.5g'`` or a plain number; None stays None (no budget)."""
    if text is None or isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    if match is None:
        raise ValueError(f"memory budget {text!r}: expected a size such as 512M, 4G or 4GiB")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * 1024 ** " kmgt".index(unit or " "))


# ------------------------------------------------------------------------------------------------ planning


@dataclass
class IndexParams:
    """How an index is built and searched; stored beside it in index.json."""

    kind: str
    vectors: int
    dim: int
    metric: str = "inner_product"
    nlist: int = 0  # IVF cells
    nprobe: int = 0  # IVF cells visited per query (can be changed at search time)
    train_size: int = 0
    pq_m: int = 0  # PQ sub-quantisers (bytes per vector)
    hnsw_m: int = 0
    ef_construction: int = 0
    ef_search: int = 0
    memory_budget: int | None = None
    estimated_bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IndexParams:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


def estimate_bytes(kind: str, n: int, dim: int, nlist: int = 0, pq_m: int = 0, hnsw_m: int = 32) -> int:
    """Approximate resident size of an index of `n` vectors."""
    centroids = nlist * dim * 4
    if kind == "flat":
        return n * dim * 4
    if kind == "ivf":
        return n * (dim * 4 + _ID_OVERHEAD) + centroids
    if kind == "ivf-sq8":
        return n * (dim + _ID_OVERHEAD) + centroids + dim * 8
    if kind == "ivf-pq":
        return n * (pq_m + _ID_OVERHEAD) + centroids + 256 * dim * 4
    if kind == "hnsw":
        return n * (dim * 4 + hnsw_m * 2 * 4 * 5 // 4)  # level 0 has 2M links; upper levels add about a quarter
    raise ValueError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")


def plan_index(n: int, dim: int, memory_budget: int | str | None = None, kind: str = "auto",
               flat_threshold: int = DEFAULT_FLAT_THRESHOLD, nlist: int | None = None, nprobe: int | None = None,
               hnsw_m: int = 32) -> IndexParams:
    """Choose the index for `n` vectors of `dim` dimensions (see the module docstring)."""
    budget = parse_size(memory_budget)
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")
    if n < 1:
        raise ValueError("the store holds no vectors: nothing to index")
    cells = nlist or max(1, min(int(4 * math.sqrt(n)), n // _TRAIN_POINTS_PER_CELL))
    pq_m = _pq_subquantisers(dim)
    if kind == "auto":
        kind = _auto_kind(n, dim, budget, flat_threshold, cells, pq_m)
    estimated = estimate_bytes(kind, n, dim, cells if kind.startswith("ivf") else 0, pq_m, hnsw_m)
    if budget is not None and estimated > budget:
        raise ValueError(f"a {kind} index of {n:,} vectors x {dim} needs about {_human(estimated)}, over the memory "
                         f"budget of {_human(budget)}; raise --memory-budget or choose another --kind")
    params = IndexParams(kind, n, dim, memory_budget=budget, estimated_bytes=estimated)
    if kind.startswith("ivf"):
        if cells > n:
            raise ValueError(f"nlist={cells} exceeds the {n} vectors; give a smaller --nlist")
        params.nlist = cells
        params.nprobe = min(cells, nprobe or max(8, cells // 64))
        params.train_size = min(n, max(cells * _TRAIN_POINTS_PER_CELL, 10_000))
        params.pq_m = pq_m if kind == "ivf-pq" else 0
    elif kind == "hnsw":
        params.hnsw_m, params.ef_construction, params.ef_search = hnsw_m, 80, 128
    return params


def _auto_kind(n: int, dim: int, budget: int | None, flat_threshold: int, cells: int, pq_m: int) -> str:
    def fits(kind: str) -> bool:
        return budget is None or estimate_bytes(kind, n, dim, cells, pq_m) <= budget

    if n <= flat_threshold and fits("flat"):
        return "flat"
    for kind in ("ivf", "ivf-sq8", "ivf-pq"):
        if fits(kind):
            return kind
    return "ivf-pq"  # reported as over budget by the caller


def _pq_subquantisers(dim: int) -> int:
    """Largest divisor of `dim` not above dim / 8 (FAISS needs dim % m == 0)."""
    target = max(1, dim // 8)
    return next(m for m in range(target, 0, -1) if dim % m == 0)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# ------------------------------------------------------------------------------------------------ building


def build_faiss_index(params: IndexParams, parts: Sequence[np.ndarray], seed: int = 0):
    """A FAISS index built as `params` says from `parts` (float arrays [n_i, dim], added in order, so the
    FAISS id of a vector is its row in the concatenation)."""
    faiss = _faiss()
    dim = params.dim
    if params.kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif params.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params.ef_construction
        index.hnsw.efSearch = params.ef_search
    else:
        quantizer = faiss.IndexFlatIP(dim)
        if params.kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, dim, params.nlist, faiss.METRIC_INNER_PRODUCT)
        elif params.kind == "ivf-sq8":
            index = faiss.IndexIVFScalarQuantizer(quantizer, dim, params.nlist, faiss.ScalarQuantizer.QT_8bit,
                                                  faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIVFPQ(quantizer, dim, params.nlist, params.pq_m, 8, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.train(_training_sample(parts, params.train_size, seed))
        index.nprobe = params.nprobe
    for part in parts:
        for start in range(0, len(part), 65_536):  # bounded float32 copies of a memory-mapped float16 part
            index.add(np.ascontiguousarray(part[start:start + 65_536], dtype=np.float32))
    return index


def _training_sample(parts: Sequence[np.ndarray], size: int, seed: int) -> np.ndarray:
    """`size` rows drawn without replacement (seeded, so a rebuild gives the same index)."""
    total = sum(len(p) for p in parts)
    rows = np.sort(np.random.default_rng(seed).choice(total, size=min(size, total), replace=False))
    offsets = np.cumsum([0] + [len(p) for p in parts])
    sample = [np.asarray(part[rows[(rows >= lo) & (rows < hi)] - lo], dtype=np.float32)
              for part, lo, hi in zip(parts, offsets[:-1], offsets[1:], strict=True)]
    return np.ascontiguousarray(np.concatenate(sample))


def build_index(store: str | Path, memory_budget: int | str | None = None, kind: str = "auto",
                flat_threshold: int = DEFAULT_FLAT_THRESHOLD, nlist: int | None = None, nprobe: int | None = None,
                hnsw_m: int = 32) -> IndexParams:
    """Build the index of a finished store and write it into ``STORE/index/``; returns its parameters."""
    faiss = _faiss()
    opened = EmbeddingStore.open(store)
    params = plan_index(len(opened), opened.dim, memory_budget, kind, flat_threshold, nlist, nprobe, hnsw_m)
    started = time.perf_counter()
    index = build_faiss_index(params, list(opened.iter_parts("img_emb")))
    params.extra = {"build_seconds": round(time.perf_counter() - started, 3), "faiss_version": faiss.__version__,
                    "store": _store_fingerprint(opened)}
    folder = Path(store) / INDEX_DIR
    atomic_write(folder / INDEX_FILE, lambda f: f.write(faiss.serialize_index(index).tobytes()))
    atomic_write_json(folder / PARAMS_FILE, params.to_dict(), indent=1)
    return params


def _store_fingerprint(store: EmbeddingStore) -> dict[str, Any]:
    return {"vectors": len(store), "source": store.manifest["source"]["fingerprint"], "parts": store.part_names}


# ------------------------------------------------------------------------------------------------ searching


@dataclass
class Hit:
    """One search result: the vector id, its similarity (cosine) and its metadata."""

    id: int
    score: float
    path: str
    caption: str | None = None
    width: int | None = None
    height: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SearchIndex:
    """A store, its FAISS index and (loaded on first text/image query) its model.

        index = SearchIndex.open("photos.store")
        for hit in index.search_text("a dog running on the beach", k=10):
            print(f"{hit.score:.3f} {hit.path} {hit.caption}")
    """

    def __init__(self, store: EmbeddingStore, index, params: IndexParams, model=None, preprocess=None,
                 tokenizer=None, device: str = "cpu", checkpoint: str | None = None):
        self.store, self.index, self.params = store, index, params
        self.model, self.preprocess, self.tokenizer = model, preprocess, tokenizer
        self.device, self.checkpoint = device, checkpoint

    @classmethod
    def open(cls, store: str | Path, model=None, preprocess=None, tokenizer=None, device: str = "cpu",
             checkpoint: str | None = None) -> SearchIndex:
        """Open a store's index. The model comes from the arguments, else from `checkpoint`, else from the
        checkpoint recorded in the store's manifest (loaded when first needed)."""
        faiss = _faiss()
        opened = EmbeddingStore.open(store)
        folder = Path(store) / INDEX_DIR
        if not (folder / INDEX_FILE).is_file() or not (folder / PARAMS_FILE).is_file():
            raise ValueError(f"{store}: no index yet; build it with `clipforge index {store}`")
        params = IndexParams.from_dict(json.loads((folder / PARAMS_FILE).read_text()))
        if params.extra.get("store") != _store_fingerprint(opened):
            raise ValueError(f"{store}: the index is older than the store's embeddings; rebuild it with "
                             f"`clipforge index {store}`")
        index = faiss.read_index(str(folder / INDEX_FILE))
        if index.ntotal != len(opened) or index.d != opened.dim:
            raise ValueError(f"{folder / INDEX_FILE}: holds {index.ntotal} x {index.d} vectors, the store "
                             f"{len(opened)} x {opened.dim}; rebuild it with `clipforge index {store}`")
        return cls(opened, index, params, model, preprocess, tokenizer, device, checkpoint)

    def __len__(self) -> int:
        return len(self.store)

    # -------------------------------------------------------------------------------------------- queries

    def search_vectors(self, queries: np.ndarray, k: int = 10, nprobe: int | None = None) -> list[list[Hit]]:
        """Best `k` hits of each query vector (rows of `queries`, [Q, dim]; normalised here)."""
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if queries.ndim != 2 or queries.shape[1] != self.store.dim:
            raise ValueError(f"query vectors must be [Q, {self.store.dim}], got {list(queries.shape)}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        norms = np.linalg.norm(queries, axis=1, keepdims=True)
        queries = np.ascontiguousarray(queries / np.maximum(norms, 1e-12))
        k = min(k, len(self))
        params = None
        if nprobe is not None and self.params.kind.startswith("ivf"):
            params = _faiss().SearchParametersIVF(nprobe=int(nprobe))
        scores, ids = self.index.search(queries, k, params=params)
        found = [[(int(i), float(s)) for s, i in zip(row_s, row_i, strict=True) if i >= 0]
                 for row_s, row_i in zip(scores, ids, strict=True)]
        rows = iter(self.store.rows([i for hits in found for i, _ in hits]))
        return [[_hit(next(rows), score) for _, score in hits] for hits in found]

    def search_text(self, text: str, k: int = 10) -> list[Hit]:
        """Images best matching a text query."""
        return self.search_vectors(self.embed_text([text]), k)[0]

    def search_image(self, image, k: int = 10) -> list[Hit]:
        """Images most similar to an image (path, bytes or PIL image)."""
        return self.search_vectors(self.embed_image(image), k)[0]

    def search_similar(self, vector_id: int, k: int = 10) -> list[Hit]:
        """"More like this": the `k` nearest neighbours of a stored item, without the item itself."""
        hits = self.search_vectors(self.store.vector(vector_id)[None], min(k + 1, len(self)))[0]
        return [h for h in hits if h.id != vector_id][:k]

    # -------------------------------------------------------------------------------------------- embedding

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """Normalised text embeddings [N, dim] (float32) with the store's model."""
        self.ensure_model()
        return embed_texts(self.model, list(texts), self.tokenizer, normalize=True,
                           progress=False).numpy()

    def embed_image(self, image) -> np.ndarray:
        """Normalised embedding [1, dim] of one image; ImageDecodeError if it cannot be read."""
        self.ensure_model()
        result = embed_images(self.model, [image], self.preprocess, batch_size=1, progress=False)
        if result.failures:
            raise ImageDecodeError(result.failures[0][2])
        return result.embeddings.numpy()

    def ensure_model(self) -> None:
        """Load the store's model now (text and image queries load it on first use otherwise)."""
        if self.model is not None:
            return
        # Here, not at the top: the checkpoint readers (safetensors, the tokenizer's text cleaning) load only when a
        # query needs the model, not for building an index or searching by stored item.
        from ..checkpoints import load
        from ..model import resolve_precision

        described = self.store.manifest["model"]
        source = self.checkpoint or described.get("checkpoint")
        if not source:
            raise ValueError(f"{self.store.path}: the manifest names no checkpoint; pass one (--checkpoint)")
        fast = bool(self.store.manifest["preprocess"].get("fast_jpeg_draft"))
        pretrained = None if self.checkpoint else described.get("pretrained")
        # An fp32 store gets fp32 queries (scores as exact as the store); a store embedded in reduced precision
        # gets this device's fast precision (bf16 where native, which may not be where the store was made).
        stored = described.get("precision", "fp32")
        precision = resolve_precision("fp32" if stored == "fp32" else "auto", self.device)
        self.model, self.preprocess, self.tokenizer = load(source, device=self.device, pretrained=pretrained,
                                                           precision=precision, fast_preprocess=fast)
        width = self.model.embed_dim
        if width != self.store.dim:
            self.model = None
            raise ValueError(f"{source}: embeds to {width} dimensions, the store holds {self.store.dim}")


def _hit(row: dict[str, Any], score: float) -> Hit:
    """A hit from a metadata row (the columns beyond the standard ones go to `extra`)."""
    base = {"id", "path", "caption", "width", "height"}
    extra = {key: value for key, value in row.items() if key not in base}
    return Hit(row["id"], score, row["path"], row.get("caption"), row.get("width"), row.get("height"), extra)


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product top-k (scores, ids) in NumPy: the oracle the index is tested against."""
    scores = np.atleast_2d(queries).astype(np.float32) @ vectors.astype(np.float32).T
    k = min(k, scores.shape[1])
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, axis=1), ids


def faiss_threads(n: int | None) -> None:
    """Limit FAISS's OpenMP threads (a server answering many queries at once wants 1 each)."""
    if n is not None:
        _faiss().omp_set_num_threads(max(1, n))
    elif "OMP_NUM_THREADS" not in os.environ:
        _faiss().omp_set_num_threads(os.cpu_count() or 1)


__all__ = ["KINDS", "Hit", "IndexParams", "SearchIndex", "build_faiss_index", "build_index", "estimate_bytes",
           "exact_search", "faiss_threads", "parse_size", "plan_index"]
