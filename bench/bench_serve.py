"""A bounded load test of `clipforge serve` on 127.0.0.1: N requests at concurrency C, p50/p99 latency.

    .venv/bin/python bench/bench_serve.py [--requests 2000] [--concurrency 16] [--index STORE]
                                          [--model ViT-Nano-8] [--images 1000]

Without --index it builds a store first: `--images` generated scenes embedded by a random `--model`, indexed.
Then it starts `clipforge serve` in its own process, waits for /healthz, and sends the requests from one
asyncio client holding `--concurrency` connections: 80 % text searches (varied queries, k=10), 10 % "more
like this", 10 % thumbnails. Prints throughput, errors and latency percentiles per route and overall; exits
with status 1 if any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

import _results
import clipforge
from clipforge.data.synthetic import COLOURS, SHAPES, make_scenes
from clipforge.search.index import build_index
from clipforge.search.writer import EmbedSettings, embed_collection

# Registers the search subcommands when the installed CLI does not list them yet, then runs it.
_LAUNCH = ("import sys, clipforge.cli as cli; from clipforge.cli import search; "
           "cli.COMMANDS += [c for c in search.COMMANDS if c[0] not in {x[0] for x in cli.COMMANDS}]; "
           "sys.exit(cli.main(sys.argv[1:]))")


def _build_store(folder: Path, model_name: str, n: int) -> Path:
    torch.manual_seed(0)
    random_model = clipforge.create_model(model_name)
    checkpoint = clipforge.save_model(random_model, folder / "model")
    photos = folder / "photos"
    photos.mkdir()
    for i, scene in enumerate(make_scenes(n, size=random_model.image_size, seed=0)):
        scene.image.save(photos / f"{i:06d}.jpg", quality=90)
        (photos / f"{i:06d}.txt").write_text(scene.caption)
    model, preprocess, tokenizer = clipforge.load(checkpoint, fast_preprocess=True)
    embed_collection([str(photos)], folder / "store", model, preprocess, tokenizer, EmbedSettings(batch_size=64),
                     checkpoint=str(checkpoint), num_workers=2, progress=False, log=lambda line: None)
    build_index(folder / "store")
    return folder / "store"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(base: str, server: subprocess.Popen, timeout: float = 300) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"clipforge serve exited with status {server.returncode}")
        try:
            response = httpx.get(f"{base}/healthz", timeout=2)
            if response.status_code == 200:
                return response.json()["vectors"]
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit("clipforge serve did not become ready")


def _requests(n: int, vectors: int, seed: int) -> list[tuple[str, str]]:
    """(route label, URL path) for each request: mostly varied text queries, some similar/thumbnail."""
    rng = random.Random(seed)
    phrases = [f"a {c} {s}" for c, s in itertools.product(COLOURS, SHAPES)]
    templates = ["{}", "a photo of {}", "{} on a white background", "a drawing of {} and a small circle"]
    out = []
    for _ in range(n):
        roll = rng.random()
        if roll < 0.8:
            query = rng.choice(templates).format(rng.choice(phrases))
            out.append(("GET /search", f"/search?q={query.replace(' ', '+')}&k=10"))
        elif roll < 0.9:
            out.append(("GET /similar/{id}", f"/similar/{rng.randrange(vectors)}?k=10"))
        else:
            out.append(("GET /images/{id}", f"/images/{rng.randrange(vectors)}"))
    return out


async def _load(base: str, plan: list[tuple[str, str]], concurrency: int):
    semaphore = asyncio.Semaphore(concurrency)
    results: list[tuple[str, float, int | str]] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=120) as client:
        async def one(label: str, path: str) -> None:
            async with semaphore:
                start = time.perf_counter()
                try:
                    status: int | str = (await client.get(path)).status_code
                except httpx.HTTPError as err:
                    status = type(err).__name__
                results.append((label, time.perf_counter() - start, status))

        start = time.perf_counter()
        await asyncio.gather(*(one(label, path) for label, path in plan))
        return results, time.perf_counter() - start


def _report(results, seconds: float, concurrency: int) -> int:
    errors = [r for r in results if r[2] != 200]
    print(f"{len(results)} requests in {seconds:.1f} s: {len(results) / seconds:.1f} requests/s, "
          f"{len(errors)} errors")
    _results.record(f"throughput, {len(results)} requests at concurrency {concurrency}", len(results) / seconds,
                    unit="requests/s", note=f"{len(errors)} errors")
    for label in [*sorted({r[0] for r in results}), "all"]:
        ms = np.array([r[1] for r in results if label in ("all", r[0])]) * 1000
        print(f"  {label:<18} {len(ms):>5} requests  p50 {np.percentile(ms, 50):8.1f} ms  "
              f"p99 {np.percentile(ms, 99):8.1f} ms  max {ms.max():8.1f} ms")
        for q in (50, 99):
            _results.record(f"{'all requests' if label == 'all' else label} latency p{q}", np.percentile(ms, q),
                            unit="ms", better="lower", note=f"{len(ms)} requests at concurrency {concurrency}")
    for error in errors[:5]:
        print(f"  error: {error[0]} -> {error[2]}")
    return 1 if errors else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--index", help="an indexed store (default: build one from generated scenes)")
    parser.add_argument("--model", default="ViT-Nano-8", help="architecture of the random model for the built store")
    parser.add_argument("--images", type=int, default=1000, help="generated scenes in the built store")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(args.index) if args.index else _build_store(Path(tmp), args.model, args.images)
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
        server = subprocess.Popen([sys.executable, "-c", _LAUNCH, "serve", "--index", str(store), "--port", str(port),
                                   "--quiet"], env=env)
        try:
            vectors = _wait_ready(base, server)
            print(f"clipforge serve on {base}: {vectors:,} items ({args.model if not args.index else store}); "
                  f"{args.requests} requests at concurrency {args.concurrency}")
            results, seconds = asyncio.run(_load(base, _requests(args.requests, vectors, seed=0), args.concurrency))
            return _report(results, seconds, args.concurrency)
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
