"""Search latency on a large store: 1M random 512-d unit vectors, the index `clipforge index` plans (IVF).

    .venv/bin/python bench/bench_search.py [--n 1000000] [--dim 512] [--queries 1000] [--kind auto]

Writes a store folder of random float16 vectors (with metadata) in a temporary folder, builds its index with
`build_index` (as `clipforge index STORE` does), then times single queries one at a time through
`SearchIndex.search_vectors` (FAISS search plus the metadata of each hit), and FAISS alone, on one thread as
`clipforge serve` runs them. Prints build time, wall-clock and CPU-time p50/p99 latency, and recall@10
against exact search on a sample of queries.

Random vectors on the sphere have no cluster structure, the worst case for IVF's recall (real embeddings
cluster); latency does not depend on it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import _results
from clipforge.search.index import SearchIndex, build_index, exact_search, faiss_threads
from clipforge.search.store import FORMAT_VERSION, STORE_FORMAT

PART = 100_000


def _random_store(folder: Path, n: int, dim: int, seed: int) -> None:
    """A store in the documented layout holding `n` random unit vectors."""
    rng = np.random.default_rng(seed)
    (folder / "img_emb").mkdir(parents=True)
    (folder / "metadata").mkdir()
    parts = {}
    for k, start in enumerate(range(0, n, PART)):
        rows = min(PART, n - start)
        x = rng.standard_normal((rows, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        np.save(folder / "img_emb" / f"part-{k:05d}.npy", x.astype(np.float16))
        items = np.arange(start, start + rows)
        pq.write_table(pa.table({"item": items, "path": [f"images/{i:07d}.jpg" for i in items],
                                 "caption": [f"random item {i}" for i in items]}),
                       folder / "metadata" / f"part-{k:05d}.parquet")
        parts[f"part-{k:05d}"] = {"items": [start, start + rows], "vectors": rows, "failures": []}
    manifest = {"format": STORE_FORMAT, "format_version": FORMAT_VERSION,
                "model": {"checkpoint": None, "embed_dim": dim, "precision": "fp32"}, "preprocess": {},
                "source": {"kind": "random", "items": n, "fingerprint": f"random-{seed}", "captions": False},
                "counts": {"items": n, "parts": len(parts), "parts_done": len(parts), "vectors": n, "failed": 0},
                "complete": True, "parts": parts}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _latencies(fn, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Wall-clock and CPU milliseconds of each query (CPU time of this thread: FAISS runs on one thread here,
    so it measures the work even when other processes share the cores)."""
    fn(queries[:1])  # warm-up
    wall, cpu = [], []
    for q in queries:
        start, start_cpu = time.perf_counter(), time.thread_time()
        fn(q[None])
        wall.append(time.perf_counter() - start)
        cpu.append(time.thread_time() - start_cpu)
    return np.array(wall) * 1000, np.array(cpu) * 1000


def _summary(times: tuple[np.ndarray, np.ndarray]) -> str:
    wall, cpu = times
    return (f"wall p50 {np.percentile(wall, 50):6.2f} ms, p99 {np.percentile(wall, 99):6.2f} ms; "
            f"CPU p50 {np.percentile(cpu, 50):6.2f} ms, p99 {np.percentile(cpu, 99):6.2f} ms")


def _recall(index: SearchIndex, queries: np.ndarray, k: int = 10) -> float:
    got = [[h.id for h in hits] for hits in index.search_vectors(queries, k)]
    best = np.full((len(queries), k), -np.inf, dtype=np.float32)
    ids = np.zeros((len(queries), k), dtype=np.int64)
    offset = 0
    for part in index.store.iter_parts():  # exact top-k, one part at a time
        scores, local = exact_search(np.asarray(part, np.float32), queries, k)
        merged_scores = np.concatenate([best, scores], axis=1)
        merged_ids = np.concatenate([ids, local + offset], axis=1)
        order = np.argsort(-merged_scores, axis=1)[:, :k]
        best, ids = np.take_along_axis(merged_scores, order, 1), np.take_along_axis(merged_ids, order, 1)
        offset += len(part)
    return float(np.mean([len(set(g) & set(w)) / k for g, w in zip(got, ids.tolist(), strict=True)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--kind", default="auto")
    parser.add_argument("--memory-budget", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        start = time.perf_counter()
        _random_store(store, args.n, args.dim, seed=0)
        print(f"store of {args.n:,} x {args.dim} random unit vectors written in {time.perf_counter() - start:.1f} s")
        params = build_index(store, memory_budget=args.memory_budget, kind=args.kind)
        print(f"{params.kind} index: nlist {params.nlist}, nprobe {params.nprobe}, train {params.train_size:,}, "
              f"about {params.estimated_bytes / 2**30:.2f} GiB, built in {params.extra['build_seconds']:.1f} s")
        index = SearchIndex.open(store)
        faiss_threads(1)  # as `clipforge serve` runs it: one core per query, concurrent queries side by side
        rng = np.random.default_rng(1)
        queries = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        ours = _latencies(lambda q: index.search_vectors(q, 10), queries)
        print(f"SearchIndex.search_vectors, k=10, one query at a time: {_summary(ours)}")
        faiss_alone = _latencies(lambda q: index.index.search(q, 10), queries)
        print(f"FAISS index.search alone,   k=10, one query at a time: {_summary(faiss_alone)}")
        recall = _recall(index, queries[:100])
        print(f"recall@10 vs exact search (100 queries): {recall:.3f}")
    size = f"{args.n:,} x {args.dim}, {params.kind}"
    _results.record(f"index build, {size}", params.extra["build_seconds"], unit="s", better="lower")
    for name, times, q in (("wall", ours[0], 50), ("wall", ours[0], 99), ("CPU", ours[1], 50)):
        reference = faiss_alone[0] if name == "wall" else faiss_alone[1]
        _results.record(f"one query, k=10, {name} p{q}, {size}", np.percentile(times, q),
                        np.percentile(reference, q), unit="ms", better="lower",
                        reference_name="FAISS index.search alone", note="clipforge: SearchIndex.search_vectors")
    _results.record(f"recall@10 vs exact search, {size}", 100 * recall, unit="%",
                    note="random vectors: the worst case for IVF recall")


if __name__ == "__main__":
    main()
