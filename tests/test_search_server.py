"""The search service through HTTP against the real app: answers equal the library's, limits give 4xx JSON
errors, no file outside the index is reachable, no traceback leaks, metrics count, and `clipforge serve`
answers /healthz on 127.0.0.1."""

from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import clipforge
from clipforge.data.synthetic import make_scenes
from clipforge.search.index import SearchIndex, build_index
from clipforge.search.server import create_app
from clipforge.search.service import Limits, QueryBatcher
from clipforge.search.writer import EmbedSettings, embed_collection
from clipforge.zeroshot import classify, load_templates, zero_shot_classifier

SRC = Path(__file__).resolve().parents[1] / "src"
LIMITS = Limits(max_upload_bytes=100_000, max_pixels=1_000_000, max_k=20, max_query_chars=100, max_classes=10)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """12 generated scenes as PNG files, embedded by a small random model and indexed."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("served")
    folder = clipforge.save_model(clipforge.create_model("ViT-Nano-8"), root / "nano")
    (root / "photos").mkdir()
    for i, scene in enumerate(make_scenes(12, size=64, seed=7)):
        scene.image.save(root / "photos" / f"{i:02d}.png")
        (root / "photos" / f"{i:02d}.txt").write_text(scene.caption)  # sidecar captions
    (root / "secret.txt").write_text("root:x:0:0 not for clients")
    model, preprocess, tokenizer = clipforge.load(folder)
    embed_collection([str(root / "photos")], root / "store", model, preprocess, tokenizer,
                     EmbedSettings(part_size=5, batch_size=4), checkpoint=str(folder), progress=False,
                     log=lambda line: None)
    build_index(root / "store")
    return root


@pytest.fixture(scope="module")
def index(store):
    return SearchIndex.open(store / "store")


@pytest.fixture(scope="module")
def client(index):
    with TestClient(create_app(index, LIMITS), raise_server_exceptions=False) as client:
        yield client


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def _error(response: httpx.Response, status: int) -> str:
    """The one-line error of a refused request (and proof that nothing else came back)."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and "\n" not in body["error"] and "Traceback" not in response.text
    return body["error"]


def test_health_page_and_openapi(client):
    assert client.get("/healthz").json() == {"status": "ok", "vectors": 12, "index": "flat"}
    page = client.get("/")
    assert page.status_code == 200 and 'id="query"' in page.text and "/static/app.js" in page.text
    assert "searchImage" in client.get("/static/app.js").text
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/search", "/similar/{item_id}", "/embed/text", "/embed/image", "/classify", "/images/{item_id}",
            "/healthz", "/metrics"} <= set(paths)
    assert {"get", "post"} <= set(paths["/search"])
    docs = client.get("/docs")
    assert docs.status_code == 200 and "cdn" not in docs.text.lower()  # works offline: assets come from the app
    script = re.search(r'src="([^"]+swagger-ui-bundle\.js)"', docs.text).group(1)
    assert client.get(script).status_code == 200 and "SwaggerUIBundle" in client.get(script).text


def test_text_and_image_search_answer_what_the_library_answers(client, index):
    body = client.get("/search", params={"q": "a red star", "k": 3}).json()
    want = index.search_text("a red star", k=3)
    assert [r["id"] for r in body["results"]] == [h.id for h in want]
    np.testing.assert_allclose([r["score"] for r in body["results"]], [h.score for h in want], atol=1e-6)
    first = body["results"][0]
    assert first["thumbnail"] == f"/images/{first['id']}"
    assert first["caption"] == index.store.row(first["id"])["caption"]

    image = Image.open(index.store.row(4)["path"])
    found = client.post("/search", files={"image": ("q.png", _png(image), "image/png")}, data={"k": "2"}).json()
    assert found["results"][0]["id"] == 4 and found["results"][0]["score"] == pytest.approx(1.0, abs=2e-3)

    similar = client.get("/similar/4", params={"k": 3}).json()["results"]
    assert [r["id"] for r in similar] == [h.id for h in index.search_similar(4, k=3)] and 4 not in \
        [r["id"] for r in similar]


def test_embeddings_and_classification_match_the_library(client, index):
    body = client.post("/embed/text", json={"texts": ["a red star", "a blue circle"]}).json()
    vectors = np.array(body["embeddings"])
    assert body["dim"] == 256 and vectors.shape == (2, 256)
    np.testing.assert_allclose(vectors, index.embed_text(["a red star", "a blue circle"]), atol=1e-6)

    image = Image.open(index.store.row(2)["path"])
    embedded = client.post("/embed/image", files={"image": ("x.png", _png(image), "image/png")}).json()
    np.testing.assert_allclose(embedded["embedding"], index.embed_image(image)[0], atol=1e-6)

    classes = ["red star", "blue circle", "green square"]
    answer = client.post("/classify", files={"image": ("x.png", _png(image), "image/png")},
                         data={"classes": ", ".join(classes), "top_k": "2"}).json()["predictions"]
    classifier = zero_shot_classifier(index.model, index.tokenizer, classes, load_templates("simple"),
                                      progress=False)
    want = classify(index.model, index.preprocess, [image], classifier, classes, top_k=2, progress=False)
    assert [p["label"] for p in answer] == want.predictions[0].labels
    np.testing.assert_allclose([p["prob"] for p in answer], want.predictions[0].probs, atol=1e-5)


def test_thumbnails_are_served_for_indexed_items_only(client, index):
    response = client.get("/images/3")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(response.content))
    original = Image.open(index.store.row(3)["path"]).convert("RGB")
    assert thumb.size == original.size  # 64 px: under the thumbnail size, kept
    assert np.abs(np.asarray(thumb, float) - np.asarray(original, float)).mean() < 6  # JPEG of the same picture

    assert "no item 12" in _error(client.get("/images/12"), 404)
    assert _error(client.get("/images/-1"), 404)
    for probe in ("/images/..%2Fsecret.txt", "/images/../secret.txt", "/images/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
                  "/static/../server.py", "/static/..%2Fserver.py", "/static/%2e%2e/index.py",
                  "/static/..%2F..%2Fsecret.txt", "/images/3/../../secret.txt", "/images/1e3"):
        response = client.get(probe)
        assert response.status_code in (404, 422), (probe, response.status_code)
        assert "root:x" not in response.text and "import" not in response.text, probe


def test_limits_give_4xx_json_errors(client):
    assert "k must be between 1 and 20" in _error(client.get("/search", params={"q": "x", "k": 21}), 400)
    assert _error(client.get("/search", params={"q": "x", "k": 0}), 400)
    assert "k: " in _error(client.get("/search", params={"q": "x", "k": "many"}), 422)
    assert "q: " in _error(client.get("/search"), 422)
    assert "q is empty" in _error(client.get("/search", params={"q": "  "}), 400)
    assert "limit is 100" in _error(client.get("/search", params={"q": "x" * 101}), 400)

    over = os.urandom(150_000)  # over the upload cap, within the body cap (cap + room for form fields)
    assert _error(client.post("/search", files={"image": ("b.png", over)}), 413) == "upload exceeds 100,000 bytes"
    far_over = os.urandom(200_000)  # refused by its Content-Length, before any parsing
    assert _error(client.post("/search", files={"image": ("b.png", far_over)}), 413) == \
        "request body exceeds 165,536 bytes"
    assert _error(client.post("/search", files={"image": ("t.png", b"hello")}), 400).startswith(
        "cannot decode image upload 't.png': not an image")
    huge = _png(Image.new("RGB", (1200, 1000)))  # small file, 1.2 M pixels
    assert "exceeds max_pixels=1,000,000" in _error(client.post("/embed/image", files={"image": ("h.png", huge)}),
                                                    400)
    assert "is empty" in _error(client.post("/embed/image", files={"image": ("e.png", b"")}), 400)
    assert "image: " in _error(client.post("/embed/image", data={"x": "1"}), 422)

    png = _png(make_scenes(1, size=64, seed=1)[0].image)
    files = {"image": ("x.png", png)}
    assert "no class names" in _error(client.post("/classify", files=files, data={"classes": " , "}), 400)
    assert "11 classes; the limit is 10" in _error(
        client.post("/classify", files=files, data={"classes": ",".join(f"c{i}" for i in range(11))}), 400)
    assert "repeats" in _error(client.post("/classify", files=files, data={"classes": "a,b,a"}), 400)
    assert "texts must hold 1 to 64" in _error(client.post("/embed/text", json={"texts": []}), 400)
    assert _error(client.post("/embed/text", content=b"{not json", headers={"content-type": "application/json"}),
                  422)


def test_a_chunked_upload_over_the_cap_is_refused_before_parsing(client):
    def chunks():
        for _ in range(40):
            yield b"x" * 10_000

    response = client.post("/embed/image", content=chunks(), headers={"content-type": "multipart/form-data; b=x"})
    assert "exceeds" in _error(response, 413)


def test_concurrent_queries_share_forward_passes_and_get_their_own_rows():
    calls = []

    def embed(texts):
        calls.append(list(texts))
        time.sleep(0.05)  # a slow model: the other queries queue meanwhile
        return np.array([[float(t.split()[-1])] for t in texts])

    batcher = QueryBatcher(embed, threading.Lock(), max_batch=4)
    with ThreadPoolExecutor(10) as pool:
        rows = list(pool.map(lambda i: batcher.embed(f"query {i}"), range(10)))
    assert [float(r[0]) for r in rows] == list(range(10))
    assert sorted(t for batch in calls for t in batch) == sorted(f"query {i}" for i in range(10))
    assert len(calls) < 10 and max(len(b) for b in calls) <= 4

    def broken(texts):
        raise RuntimeError("model failed")

    with pytest.raises(RuntimeError, match="model failed"):
        QueryBatcher(broken, threading.Lock()).embed("x")


def test_failures_answer_500_without_details(client, index, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("secret internals at /srv/data")

    monkeypatch.setattr(index, "search_vectors", broken)
    response = client.get("/search", params={"q": "a red star"})
    assert _error(response, 500) == "internal server error" and "secret" not in response.text


def test_metrics_count_requests_and_latency(client):
    before = _metric(client, 'clipforge_requests_total{method="GET",route="/search",status="200"}')
    for _ in range(3):
        client.get("/search", params={"q": "a green square", "k": 2})
    client.get("/no/such/page")
    text = client.get("/metrics").text
    assert _metric(client, 'clipforge_requests_total{method="GET",route="/search",status="200"}') == before + 3
    assert 'clipforge_requests_total{method="GET",route="unmatched",status="404"}' in text
    count = _metric(client, 'clipforge_request_duration_seconds_count{method="GET",route="/search"}')
    inf = _metric(client, 'clipforge_request_duration_seconds_bucket{method="GET",route="/search",le="+Inf"}')
    assert count == inf >= before + 3
    assert "clipforge_index_vectors 12" in text and "# TYPE clipforge_request_duration_seconds histogram" in text


def _metric(client: TestClient, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_SERVE = ("import sys, clipforge.cli as cli; from clipforge.cli import search; "
          "cli.COMMANDS += [c for c in search.COMMANDS if c[0] not in {x[0] for x in cli.COMMANDS}]; "
          "sys.exit(cli.main(sys.argv[1:]))")


def test_clipforge_serve_answers_healthz_on_localhost(store):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-c", _SERVE, "serve", "--index", str(store / "store"), "--port",
                               str(port), "--quiet"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        deadline, health = time.monotonic() + 90, None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert health is not None and health.status_code == 200, server.stderr.read() if server.poll() else ""
        assert health.json()["vectors"] == 12
        hits = httpx.get(f"http://127.0.0.1:{port}/search", params={"q": "a purple star", "k": 2}).json()
        assert len(hits["results"]) == 2
        listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True)
        if listening.returncode == 0 and listening.stdout.strip():  # the local address column: loopback only
            assert [line.split()[3] for line in listening.stdout.splitlines()] == [f"127.0.0.1:{port}"]
    finally:
        server.terminate()
        server.wait(timeout=30)
