"""The search service's machinery, under the routes of `server`: what a request may ask (`Limits`) and the
checks that enforce it, the body-size guard, request metrics, and the state the routes share: the index, one
lock on the model, the query batcher and the caches of thumbnails and classifiers.

A check that fails raises `ApiError`, which the app answers as a 4xx with a one-line JSON ``{"error": ...}``.
Like `server`, this module needs FastAPI, so `clipforge.search` does not import it.
"""

from __future__ import annotations

import io
import re
import threading
import time
from collections import defaultdict
from concurrent.futures import Future
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from fastapi import UploadFile
from fastapi.responses import JSONResponse
from PIL import Image

from ..images import ImageDecodeError, load_image
from ..zeroshot import class_probabilities, load_templates, parse_classnames, top_classes, zero_shot_classifier
from .index import Hit, SearchIndex
from .listing import read_span

__all__ = ["LATENCY_BUCKETS", "ApiError", "BodyLimit", "Limits", "Metrics", "QueryBatcher", "ServiceState"]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class Limits:
    """What one request may ask for; beyond these the answer is a 4xx, not a slow or failing server."""

    max_upload_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_k: int = 100
    max_query_chars: int = 1_000
    max_texts: int = 64
    max_classes: int = 1_000
    max_class_chars: int = 200
    thumbnail_size: int = 256


class ApiError(Exception):
    """A 4xx answer with a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# ------------------------------------------------------------------------------------------------ metrics


class Metrics:
    """Request counts and a latency histogram per (method, route, status), in Prometheus' text format."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: dict[tuple[str, str, str], int] = defaultdict(int)
        self.buckets: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0] * len(LATENCY_BUCKETS))
        self.sums: dict[tuple[str, str], float] = defaultdict(float)
        self.totals: dict[tuple[str, str], int] = defaultdict(int)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        with self.lock:
            self.counts[(method, route, str(status))] += 1
            key = (method, route)
            for i, bound in enumerate(LATENCY_BUCKETS):
                if seconds <= bound:
                    self.buckets[key][i] += 1
            self.sums[key] += seconds
            self.totals[key] += 1

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        lines = ["# HELP clipforge_requests_total HTTP requests answered, by method, route and status.",
                 "# TYPE clipforge_requests_total counter"]
        with self.lock:
            for (method, route, status), n in sorted(self.counts.items()):
                lines.append(f'clipforge_requests_total{{method="{method}",route="{route}",status="{status}"}} {n}')
            lines += ["# HELP clipforge_request_duration_seconds Time to answer a request.",
                      "# TYPE clipforge_request_duration_seconds histogram"]
            for key in sorted(self.totals):
                labels = f'method="{key[0]}",route="{key[1]}"'
                for bound, n in zip(LATENCY_BUCKETS, self.buckets[key], strict=True):
                    lines.append(f'clipforge_request_duration_seconds_bucket{{{labels},le="{bound}"}} {n}')
                lines.append(f'clipforge_request_duration_seconds_bucket{{{labels},le="+Inf"}} {self.totals[key]}')
                lines.append(f"clipforge_request_duration_seconds_sum{{{labels}}} {self.sums[key]:.6f}")
                lines.append(f"clipforge_request_duration_seconds_count{{{labels}}} {self.totals[key]}")
        for name, (help_text, value) in gauges.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value:g}"]
        return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ body size


class BodyLimit:
    """ASGI middleware: refuse request bodies over `limit` bytes with 413 before anything parses them
    (uploads would otherwise be spooled to disk whole, whatever their size)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _too_large(self.limit)(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:  # buffer the (bounded) body, so that a chunked upload is measured too
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await _too_large(self.limit)(scope, receive, send)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse({"error": f"request body exceeds {limit:,} bytes"}, status_code=413)


# ------------------------------------------------------------------------------------------------ shared state


class ServiceState:
    """What the routes share: the index, the limits, one lock on the model, caches and metrics."""

    def __init__(self, index: SearchIndex, limits: Limits, templates: str):
        self.index, self.limits, self.templates = index, limits, templates
        # One request at a time in the model: on a few CPU cores, concurrent forward passes only fight
        # over the same cores (and oversubscribed thread pools are far slower than a queue).
        self.model_lock = threading.Lock()
        self.queries = QueryBatcher(index.embed_text, self.model_lock)
        self.metrics = Metrics()
        self.started = time.time()
        self.thumbnail = lru_cache(maxsize=1024)(self._thumbnail)
        self.classifier = lru_cache(maxsize=32)(self._classifier)

    # ------------------------------------------------------------------------------------ checks

    def check_k(self, k: int) -> int:
        if not 1 <= k <= self.limits.max_k:
            raise ApiError(400, f"k must be between 1 and {self.limits.max_k}, got {k}")
        return k

    def check_text(self, text: str, what: str = "q") -> str:
        if not text.strip():
            raise ApiError(400, f"{what} is empty: give the text to search for")
        if len(text) > self.limits.max_query_chars:
            raise ApiError(400, f"{what} is {len(text):,} characters long; the limit is "
                                f"{self.limits.max_query_chars:,}")
        return text

    def check_texts(self, texts: list[str]) -> list[str]:
        if not 1 <= len(texts) <= self.limits.max_texts:
            raise ApiError(400, f"texts must hold 1 to {self.limits.max_texts} strings, got {len(texts)}")
        for i, text in enumerate(texts):
            self.check_text(text, f"texts[{i}]")
        return texts

    def check_id(self, item_id: int) -> int:
        if not 0 <= item_id < len(self.index):
            raise ApiError(404, f"no item {item_id}: ids run from 0 to {len(self.index) - 1}")
        return item_id

    def check_classnames(self, text: str) -> tuple[str, ...]:
        """The class names of a comma-separated list, within the limits on their number and length."""
        try:
            names = parse_classnames(text, source="classes")
        except ValueError as err:
            raise ApiError(400, str(err)) from None
        if len(names) > self.limits.max_classes:
            raise ApiError(400, f"{len(names)} classes; the limit is {self.limits.max_classes}")
        long = next((n for n in names if len(n) > self.limits.max_class_chars), None)
        if long is not None:
            raise ApiError(400, f"class name {long[:40]!r}... is over {self.limits.max_class_chars} characters")
        return tuple(names)

    async def read_image(self, upload: UploadFile) -> Image.Image:
        """The uploaded image, decoded under the size and pixel caps."""
        data = await upload.read(self.limits.max_upload_bytes + 1)
        if len(data) > self.limits.max_upload_bytes:
            raise ApiError(413, f"upload exceeds {self.limits.max_upload_bytes:,} bytes")
        name = f"upload {upload.filename!r}" if upload.filename else "upload"
        if not data:
            raise ApiError(400, f"{name} is empty")
        try:
            return load_image(data, draft_size=getattr(self.index.preprocess, "draft_size", None),
                              max_pixels=self.limits.max_pixels)
        except ImageDecodeError as err:
            raise ApiError(400, re.sub(r"<\d+ bytes>", name, str(err), count=1)) from None

    # ------------------------------------------------------------------------------------ work

    def embed_text(self, texts: list[str]):
        with self.model_lock:
            return self.index.embed_text(texts)

    def embed_query(self, text: str):
        """[1, E] embedding of one search query, batched with the queries that arrive meanwhile."""
        return self.queries.embed(text)[None]

    def embed_image(self, image: Image.Image):
        with self.model_lock:
            return self.index.embed_image(image)

    def classify(self, image: Image.Image, names: tuple[str, ...], top_k: int) -> dict[str, Any]:
        """The `top_k` most likely of the class names for an image, with their probabilities."""
        classifier = self.classifier(names)
        vectors = torch.from_numpy(self.embed_image(image))
        probs = class_probabilities(vectors, classifier, self.index.model.logit_scale.detach().float().cpu())
        labels, values = top_classes(probs, names, top_k)[0]
        return {"predictions": [{"label": label, "prob": prob} for label, prob in zip(labels, values, strict=True)]}

    def hits(self, hits: list[Hit]) -> list[dict[str, Any]]:
        return [{**hit.to_dict(), "thumbnail": f"/images/{hit.id}"} for hit in hits]

    def _classifier(self, classnames: tuple[str, ...]):
        with self.model_lock:
            return zero_shot_classifier(self.index.model, self.index.tokenizer, list(classnames),
                                        load_templates(self.templates), progress=False)

    def _thumbnail(self, vector_id: int) -> bytes:
        row = self.index.store.row(vector_id)
        size = self.limits.thumbnail_size
        try:
            source = read_span(row["shard"], row["offset"], row["size"]) if row.get("shard") else row["path"]
            image = load_image(source, draft_size=size, max_pixels=self.limits.max_pixels)
        except (OSError, ImageDecodeError):
            raise ApiError(404, f"the image of item {vector_id} is no longer readable") from None
        image = image.convert("RGB")
        image.thumbnail((size, size), Image.Resampling.BICUBIC)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=85)
        return out.getvalue()


class QueryBatcher:
    """Embeds the text queries that wait for the model together, in one forward pass.

    Each caller queues its text, then takes the model lock; whoever holds it embeds everything queued (up to
    `max_batch`) and hands each caller its row. Under load, queries that would have waited their turn one by
    one share a batch instead; alone, a query is a batch of one."""

    def __init__(self, embed, model_lock: threading.Lock, max_batch: int = 32):
        self.embed_batch, self.model_lock, self.max_batch = embed, model_lock, max_batch
        self.queue_lock = threading.Lock()
        self.pending: list[tuple[str, Future]] = []

    def embed(self, text: str):
        done: Future = Future()
        with self.queue_lock:
            self.pending.append((text, done))
        while not done.done():
            with self.model_lock:
                if not done.done():
                    self._run_batch()
        return done.result()

    def _run_batch(self) -> None:
        with self.queue_lock:
            batch, self.pending = self.pending[:self.max_batch], self.pending[self.max_batch:]
        try:
            vectors = self.embed_batch([text for text, _ in batch])
        except Exception as err:  # each request of the batch gets the failure (as a 500), not only this one
            for _, waiting in batch:
                waiting.set_exception(err)
            return
        for row, (_, waiting) in zip(vectors, batch, strict=True):
            waiting.set_result(row)
