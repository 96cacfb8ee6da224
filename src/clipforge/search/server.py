"""The search service's HTTP face: a FastAPI app over a `SearchIndex`, its routes, the web page it serves, and
`serve`. The limits, checks, metrics and shared state the routes use are `service`'s.

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

import logging
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from .index import SearchIndex
from .service import ApiError, BodyLimit, Limits, ServiceState

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("clipforge.search")


class TextsRequest(BaseModel):
    texts: list[str]


def create_app(index: SearchIndex, limits: Limits | None = None, templates: str = "simple") -> FastAPI:
    """The FastAPI app serving `index` (its model is loaded now, so that the first request is not slow)."""
    limits = limits or Limits()
    index.ensure_model()
    # The API docs pages (/docs, /redoc) with their scripts served by the app itself, not fetched from a CDN: they
    # work on machines without internet access.
    app = FastAPIOffline(title="clipforge search", version=__version__,
                         description="Search images by text or by image, embed, and classify with CLIP.")
    state = ServiceState(index, limits, templates)
    _install_error_handlers(app)
    app.add_middleware(BodyLimit, limit=limits.max_upload_bytes + 64 * 1024)  # form fields and multipart framing
    _install_metrics(app, state)  # added last, so outermost: it times and counts the 413s too
    _add_search_routes(app, state)
    _add_embed_routes(app, state)
    _add_media_routes(app, state)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
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


def _install_metrics(app: FastAPI, state: ServiceState) -> None:
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


def _add_search_routes(app: FastAPI, state: ServiceState) -> None:
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
        state.check_id(item_id)
        return {"id": item_id, "k": k, "results": state.hits(state.index.search_similar(item_id, k))}


def _add_embed_routes(app: FastAPI, state: ServiceState) -> None:
    @app.post("/embed/text", summary="Normalised text embeddings")
    def embed_text(body: TextsRequest) -> dict[str, Any]:
        vectors = state.embed_text(state.check_texts(body.texts))
        return {"dim": int(vectors.shape[1]), "embeddings": vectors.tolist()}

    @app.post("/embed/image", summary="Normalised image embedding (multipart upload)")
    async def embed_image(image: Annotated[UploadFile, File()]) -> dict[str, Any]:
        vectors = await _in_thread(state.embed_image, await state.read_image(image))
        return {"dim": int(vectors.shape[1]), "embedding": vectors[0].tolist()}

    @app.post("/classify", summary="Zero-shot classification of an uploaded image")
    async def classify(image: Annotated[UploadFile, File()],
                       classes: Annotated[str, Form(description="class names, comma-separated")],
                       top_k: Annotated[int, Form()] = 5) -> dict[str, Any]:
        names = state.check_classnames(classes)
        if top_k < 1:
            raise ApiError(400, f"top_k must be at least 1, got {top_k}")
        decoded = await state.read_image(image)
        return await _in_thread(state.classify, decoded, names, top_k)


def _add_media_routes(app: FastAPI, state: ServiceState) -> None:
    @app.get("/images/{item_id}", summary="Thumbnail (JPEG) of an indexed item", response_class=Response)
    def thumbnail(item_id: int) -> Response:
        state.check_id(item_id)
        return Response(state.thumbnail(item_id), media_type="image/jpeg",
                        headers={"Cache-Control": "public, max-age=3600"})

    @app.get("/items/{item_id}", summary="Metadata of an indexed item")
    def item(item_id: int) -> dict[str, Any]:
        state.check_id(item_id)
        return state.index.store.row(item_id)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")


async def _in_thread(fn, *args):
    """Run blocking work (the model) off the event loop."""
    return await run_in_threadpool(fn, *args)


def serve(index: SearchIndex, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None,
          log_level: str = "info") -> None:
    """Run the app with uvicorn until interrupted."""
    import uvicorn  # here, not at the top: only a running server needs it (tests and `create_app` users do not)

    uvicorn.run(create_app(index, limits), host=host, port=port, log_level=log_level, access_log=False)


__all__ = ["create_app", "serve"]
