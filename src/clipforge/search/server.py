"""The search service: a FastAPI app over a `SearchIndex`, and the web page it serves.

Endpoints (OpenAPI schema at ``/openapi.json``, docs at ``/docs``):

- ``GET /search?q=TEXT&k=10`` and ``POST /search`` (multipart ``image`` + ``k``): ranked hits;
- ``GET /similar/{id}?k=10``: "more like this" for an indexed item;
- ``POST /embed/text`` (JSON ``{"texts": [...]}``), ``POST /embed/image`` (multipart ``image``): embeddings;
- ``POST /classify`` (multipart ``image`` + ``classes``, comma-separated): zero-shot labels;
- ``GET /images/{id}``: a JPEG thumbnail of an indexed item (ids only: no path ever comes from a request);
- ``GET /healthz``, ``GET /metrics`` (Prometheus text format), ``GET /`` (the web page).

Bad input gets a 4xx answer with a one-line JSON ``{"error": ...}``; an unexpected failure a 500 with no
details (the traceback goes to the server log, never to the client).
"""

from __future__ import annotations

import io
import logging
import re
import threading
import time
from collections import defaultdict
from concurrent.futures import Future
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

import torch
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from PIL import Image
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..transforms import ImageDecodeError, load_image
from .index import Hit, SearchIndex
from .store import read_span

STATIC = Path(__file__).parent / "static"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
log = logging.getLogger("clipforge.search")


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


class TextsRequest(BaseModel):
    texts: list[str]


class _ApiError(Exception):
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


class _BodyLimit:
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


# ------------------------------------------------------------------------------------------------ the app


def create_app(index: SearchIndex, limits: Limits | None = None, templates: str = "simple") -> FastAPI:
    """The FastAPI app serving `index` (its model is loaded now, so that the first request is not slow)."""
    limits = limits or Limits()
    index.ensure_model()
    # The API docs pages (/docs, /redoc) with their scripts served by the app itself, not fetched from a CDN: they
    # work on machines without internet access.
    app = FastAPIOffline(title="clipforge search", version=_version(),
                         description="Search images by text or by image, embed, and classify with CLIP.")
    state = _State(index, limits, templates)
    _install_error_handlers(app)
    app.add_middleware(_BodyLimit, limit=limits.max_upload_bytes + 64 * 1024)  # form fields and multipart framing
    _install_metrics(app, state)  # added last, so outermost: it times and counts the 413s too
    _add_search_routes(app, state)
    _add_embed_routes(app, state)
    _add_media_routes(app, state)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _version() -> str:
    from .. import __version__

    return __version__


class _State:
    """What the routes share: the index, the limits, one lock on the model, caches and metrics."""

    def __init__(self, index: SearchIndex, limits: Limits, templates: str):
        self.index, self.limits, self.templates = index, limits, templates
        # One request at a time in the model: on a few CPU cores, concurrent forward passes only fight
        # over the same cores (and oversubscribed thread pools are far slower than a queue).
        self.model_lock = threading.Lock()
        self.queries = _QueryBatcher(index.embed_text, self.model_lock)
        self.metrics = Metrics()
        self.started = time.time()
        self.thumbnail = lru_cache(maxsize=1024)(self._thumbnail)
        self.classifier = lru_cache(maxsize=32)(self._classifier)

    # ------------------------------------------------------------------------------------ checks

    def check_k(self, k: int) -> int:
        if not 1 <= k <= self.limits.max_k:
            raise _ApiError(400, f"k must be between 1 and {self.limits.max_k}, got {k}")
        return k

    def check_text(self, text: str, what: str = "q") -> str:
        if not text.strip():
            raise _ApiError(400, f"{what} is empty: give the text to search for")
        if len(text) > self.limits.max_query_chars:
            raise _ApiError(400, f"{what} is {len(text):,} characters long; the limit is "
                                 f"{self.limits.max_query_chars:,}")
        return text

    async def read_image(self, upload: UploadFile) -> Image.Image:
        """The uploaded image, decoded under the size and pixel caps."""
        data = await upload.read(self.limits.max_upload_bytes + 1)
        if len(data) > self.limits.max_upload_bytes:
            raise _ApiError(413, f"upload exceeds {self.limits.max_upload_bytes:,} bytes")
        name = f"upload {upload.filename!r}" if upload.filename else "upload"
        if not data:
            raise _ApiError(400, f"{name} is empty")
        try:
            return load_image(data, draft_size=getattr(self.index.preprocess, "draft_size", None),
                              max_pixels=self.limits.max_pixels)
        except ImageDecodeError as err:
            raise _ApiError(400, re.sub(r"<\d+ bytes>", name, str(err), count=1)) from None

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

    def _classifier(self, classnames: tuple[str, ...]):
        from ..zeroshot import load_templates, zero_shot_classifier

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
            raise _ApiError(404, f"the image of item {vector_id} is no longer readable") from None
        image = image.convert("RGB")
        image.thumbnail((size, size), Image.Resampling.BICUBIC)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=85)
        return out.getvalue()

    def hits(self, hits: list[Hit]) -> list[dict[str, Any]]:
        return [{**hit.to_dict(), "thumbnail": f"/images/{hit.id}"} for hit in hits]


class _QueryBatcher:
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


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(_ApiError)
    async def api_error(request: Request, err: _ApiError):
        return JSONResponse({"error": err.message}, status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        message = err.detail if isinstance(err.detail, str) else "bad request"
        return JSONResponse({"error": message}, status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path"))
        message = f"{where}: {first.get('msg', 'invalid value')}" if where else first.get("msg", "invalid request")
        return JSONResponse({"error": message}, status_code=422)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception):
        log.exception("error answering %s %s", request.method, request.url.path)
        return JSONResponse({"error": "internal server error"}, status_code=500)


def _install_metrics(app: FastAPI, state: _State) -> None:
    @app.middleware("http")
    async def measure(request: Request, call_next):
        started = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            # Unmatched paths share one label, so that probing random URLs cannot grow the metrics without end.
            name = getattr(route, "path", None) or "unmatched"
            state.metrics.observe(request.method, name, status, time.perf_counter() - started)

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    def metrics() -> PlainTextResponse:
        gauges = {"clipforge_index_vectors": ("Vectors in the index.", len(state.index)),
                  "clipforge_uptime_seconds": ("Seconds since the app started.", time.time() - state.started)}
        return PlainTextResponse(state.metrics.render(gauges), media_type="text/plain; version=0.0.4")

    @app.get("/healthz", summary="Readiness: 200 once the index and the model are loaded")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "vectors": len(state.index), "index": state.index.params.kind}


def _add_search_routes(app: FastAPI, state: _State) -> None:
    @app.get("/search", summary="Search by text")
    def search_text(q: Annotated[str, Query(description="text query")],
                    k: Annotated[int, Query(description="number of results")] = 10) -> dict[str, Any]:
        state.check_k(k)
        vectors = state.embed_query(state.check_text(q))
        return {"query": q, "k": k, "results": state.hits(state.index.search_vectors(vectors, k)[0])}

    @app.post("/search", summary="Search by image (multipart upload)")
    async def search_image(image: Annotated[UploadFile, File(description="an image file")],
                           k: Annotated[int, Form()] = 10) -> dict[str, Any]:
        state.check_k(k)
        decoded = await state.read_image(image)
        vectors = await _in_thread(state.embed_image, decoded)
        return {"k": k, "results": state.hits(state.index.search_vectors(vectors, k)[0])}

    @app.get("/similar/{item_id}", summary="More like this: neighbours of an indexed item")
    def similar(item_id: int, k: Annotated[int, Query()] = 10) -> dict[str, Any]:
        state.check_k(k)
        _check_id(state, item_id)
        return {"id": item_id, "k": k, "results": state.hits(state.index.search_similar(item_id, k))}


def _add_embed_routes(app: FastAPI, state: _State) -> None:
    @app.post("/embed/text", summary="Normalised text embeddings")
    def embed_text(body: TextsRequest) -> dict[str, Any]:
        if not 1 <= len(body.texts) <= state.limits.max_texts:
            raise _ApiError(400, f"texts must hold 1 to {state.limits.max_texts} strings, got {len(body.texts)}")
        for i, text in enumerate(body.texts):
            state.check_text(text, f"texts[{i}]")
        vectors = state.embed_text(body.texts)
        return {"dim": int(vectors.shape[1]), "embeddings": vectors.tolist()}

    @app.post("/embed/image", summary="Normalised image embedding (multipart upload)")
    async def embed_image(image: Annotated[UploadFile, File()]) -> dict[str, Any]:
        vectors = await _in_thread(state.embed_image, await state.read_image(image))
        return {"dim": int(vectors.shape[1]), "embedding": vectors[0].tolist()}

    @app.post("/classify", summary="Zero-shot classification of an uploaded image")
    async def classify(image: Annotated[UploadFile, File()],
                       classes: Annotated[str, Form(description="class names, comma-separated")],
                       top_k: Annotated[int, Form()] = 5) -> dict[str, Any]:
        names = _classnames(classes, state.limits)
        if top_k < 1:
            raise _ApiError(400, f"top_k must be at least 1, got {top_k}")
        decoded = await state.read_image(image)
        return await _in_thread(_classify, state, decoded, names, top_k)


def _classify(state: _State, image: Image.Image, names: tuple[str, ...], top_k: int) -> dict[str, Any]:
    from ..zeroshot import class_probabilities, top_classes

    classifier = state.classifier(names)
    vectors = torch.from_numpy(state.embed_image(image))
    probs = class_probabilities(vectors, classifier, state.index.model.logit_scale.detach().float().cpu())
    labels, values = top_classes(probs, names, top_k)[0]
    return {"predictions": [{"label": label, "prob": prob} for label, prob in zip(labels, values, strict=True)]}


def _classnames(text: str, limits: Limits) -> tuple[str, ...]:
    from ..zeroshot import parse_classnames

    try:
        names = parse_classnames(text, source="classes")
    except ValueError as err:
        raise _ApiError(400, str(err)) from None
    if len(names) > limits.max_classes:
        raise _ApiError(400, f"{len(names)} classes; the limit is {limits.max_classes}")
    long = next((n for n in names if len(n) > limits.max_class_chars), None)
    if long is not None:
        raise _ApiError(400, f"class name {long[:40]!r}... is over {limits.max_class_chars} characters")
    return tuple(names)


def _add_media_routes(app: FastAPI, state: _State) -> None:
    @app.get("/images/{item_id}", summary="Thumbnail (JPEG) of an indexed item", response_class=Response)
    def thumbnail(item_id: int) -> Response:
        _check_id(state, item_id)
        return Response(state.thumbnail(item_id), media_type="image/jpeg",
                        headers={"Cache-Control": "public, max-age=3600"})

    @app.get("/items/{item_id}", summary="Metadata of an indexed item")
    def item(item_id: int) -> dict[str, Any]:
        _check_id(state, item_id)
        return state.index.store.row(item_id)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")


def _check_id(state: _State, item_id: int) -> None:
    if not 0 <= item_id < len(state.index):
        raise _ApiError(404, f"no item {item_id}: ids run from 0 to {len(state.index) - 1}")


async def _in_thread(fn, *args):
    """Run blocking work (the model) off the event loop."""
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(fn, *args)


def serve(index: SearchIndex, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None,
          log_level: str = "info") -> None:
    """Run the app with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(create_app(index, limits), host=host, port=port, log_level=log_level, access_log=False)


__all__ = ["Limits", "Metrics", "create_app", "serve"]
