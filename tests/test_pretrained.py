"""Named pretrained weights: the registry's facts, and the downloader against a real HTTP server on 127.0.0.1.

The server (a threaded `http.server`) serves generated files, honours `Range`, and can cut a body short,
stall, or answer 404; it also imitates the two Hugging Face hub endpoints `hf_hub_download` uses. A guard
on `socket` makes any attempt to reach another address fail the test instead of touching the network.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save

import clipforge
from clipforge.checkpoints import CheckpointError, registry
from clipforge.checkpoints import pretrained as pt
from clipforge.model import create_model, get_model_config

OPENAI_BASE = "https://openaipublic.azureedge.net/clip/models"
# Published by openai/CLIP (clip/clip.py, _MODELS): name -> (sha256 in the URL path, file name).
OPENAI_RELEASES = {
    "RN50": ("afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762", "RN50.pt"),
    "RN101": ("8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599", "RN101.pt"),
    "RN50x4": ("7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd", "RN50x4.pt"),
    "RN50x16": ("52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa", "RN50x16.pt"),
    "RN50x64": ("be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c", "RN50x64.pt"),
    "ViT-B-32": ("40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", "ViT-B-32.pt"),
    "ViT-B-16": ("5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "ViT-B-16.pt"),
    "ViT-L-14": ("b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", "ViT-L-14.pt"),
    "ViT-L-14-336": ("3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02", "ViT-L-14-336px.pt"),
}
LAION = {
    ("ViT-B-32", "laion2b_s34b_b79k"): "laion/CLIP-ViT-B-32-laion2B-s34B-b79K",
    ("ViT-B-16", "laion2b_s34b_b88k"): "laion/CLIP-ViT-B-16-laion2B-s34B-b88K",
    ("ViT-L-14", "laion2b_s32b_b82k"): "laion/CLIP-ViT-L-14-laion2B-s32B-b82K",
}
HUB_REPO = "testorg/tiny-clip"
HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


# ------------------------------------------------------------------------------------------- the server

@dataclass
class FileServer:
    """What the handler serves and how, and a log of what it was asked."""

    files: dict[str, bytes] = field(default_factory=dict)
    behaviour: dict[str, str] = field(default_factory=dict)  # path -> cut_once | stall_headers | stall_body | slow
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    bodies_sent: list[int] = field(default_factory=list)  # body bytes of each GET served in full
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    base_url: str = ""

    def gets(self, path: str | None = None) -> list[dict[str, str]]:
        return [h for m, p, h in self.requests if m == "GET" and (path is None or p == path)]


def _handler(state: FileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _serve(self, body: bool) -> None:
            with state.lock:
                state.requests.append((self.command, self.path, dict(self.headers)))
                data = state.files.get(self.path)
                mode = state.behaviour.get(self.path, "")
                if mode == "cut_once" and body:
                    state.behaviour.pop(self.path)
            if mode == "stall_headers":
                state.release.wait(10)
                return
            if data is None:
                self._send_404()
                return
            start, status = self._range_start(len(data))
            self.send_response(status)
            self._hub_headers(data)
            self.send_header("Content-Length", str(len(data) - start))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if body:
                self._send_body(data[start:], mode)

        def _range_start(self, size: int) -> tuple[int, int]:
            match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            return (int(match.group(1)), 206) if match and int(match.group(1)) < size else (0, 200)

        def _hub_headers(self, data: bytes) -> None:
            # What the hub answers for a file; huggingface_hub needs the commit and an ETag.
            if self.path.startswith(f"/{HUB_REPO}/resolve/"):
                self.send_header("X-Repo-Commit", HUB_COMMIT)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')

        def _send_404(self) -> None:
            message = b"not found"
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")  # how the hub says "no such file in the repo"
            self.send_header("Content-Length", str(len(message)))
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(message)

        def _send_body(self, payload: bytes, mode: str) -> None:
            if mode in ("cut_once", "stall_body"):
                self.wfile.write(payload[: len(payload) // 2])
                self.wfile.flush()
                if mode == "stall_body":
                    state.release.wait(10)
                self.close_connection = True  # hang up mid-body
                return
            # Logged before writing: the client can finish reading, and the test can check the log, before this
            # thread runs again after its last write.
            with state.lock:
                state.bodies_sent.append(len(payload))
            step = 64 * 1024 if mode == "slow" else len(payload) or 1
            for i in range(0, len(payload), step):
                self.wfile.write(payload[i : i + step])
                if mode == "slow":
                    time.sleep(0.01)

    return Handler


@pytest.fixture
def server() -> Iterator[FileServer]:
    state = FileServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    state.base_url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield state
    state.release.set()  # wake stalled handlers
    httpd.shutdown()
    httpd.server_close()


# ------------------------------------------------------------------------------------------ isolation

@pytest.fixture(autouse=True)
def local_only(monkeypatch, tmp_path):
    """A private cache, no inherited offline/mirror settings, and no connection beyond 127.0.0.1."""
    for name in ("CLIPFORGE_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "CLIPFORGE_BASE_URL",
                 "HF_ENDPOINT", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLIPFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(pt, "BASE_URL", None)

    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(sock, address):
        if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "::1"):
            raise AssertionError(f"test tried to connect to {address}")
        return real_connect(sock, address)

    def getaddrinfo(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost", "::1", None):
            raise AssertionError(f"test tried to resolve {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def _entry(**overrides) -> pt.PretrainedEntry:
    values = {"arch": "ViT-Nano-8", "tag": "testtag", "format": "openai", "quick_gelu": True,
              "preprocess": {"image_size": 64, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
                             "interpolation": "bilinear", "resize_mode": "squash"}}
    return pt.PretrainedEntry(**{**values, **overrides})


def _register(monkeypatch, *entries: pt.PretrainedEntry) -> None:
    """Add entries to the registry for this test only."""
    extended = registry.all_entries() + entries
    monkeypatch.setattr(registry, "all_entries", lambda: extended)


def _url_entry(data: bytes, name: str = "blob.pt", **overrides) -> pt.PretrainedEntry:
    sha = hashlib.sha256(data).hexdigest()
    return _entry(url=f"{OPENAI_BASE}/{sha}/{name}", filename=name, sha256=sha, **overrides)


def _serve(server: FileServer, entry: pt.PretrainedEntry, data: bytes, mode: str = "") -> str:
    path = entry.url.removeprefix("https://openaipublic.azureedge.net")
    server.files[path] = data
    if mode:
        server.behaviour[path] = mode
    return path


def _cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def source_model():
    """A small QuickGELU model with fp16-exact weights, and its OpenAI-layout checkpoint (fp16, as OpenAI ships)."""
    torch.manual_seed(0)
    model = create_model("ViT-Nano-8", quick_gelu=True).eval()
    half = {k: v.half() for k, v in model.state_dict().items()}
    model.load_state_dict(half)  # so that the fp32 model equals what loading the fp16 file gives
    buffer = io.BytesIO()
    torch.save(half, buffer)
    return model, buffer.getvalue()


def _same_weights(loaded, source) -> None:
    loaded_sd, source_sd = loaded.state_dict(), source.state_dict()
    assert loaded_sd.keys() == source_sd.keys()
    assert all(torch.equal(loaded_sd[k], source_sd[k]) for k in source_sd)


def _same_model(loaded, source) -> None:
    _same_weights(loaded, source)
    torch.manual_seed(1)
    images, ids = torch.randn(2, 3, 64, 64), torch.randint(1, 49407, (2, 32))
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(images), source.encode_image(images), rtol=0, atol=1e-6)
        assert torch.allclose(loaded.encode_text(ids), source.encode_text(ids), rtol=0, atol=1e-6)


# -------------------------------------------------------------------------------------------- registry

def test_registry_has_openai_and_laion_weights_with_real_urls():
    entries = {(e.arch, e.tag): pt.get_pretrained(e.arch, e.tag) for e in registry.all_entries()}
    assert clipforge.list_pretrained() == list(entries)
    openai = {arch: e for (arch, tag), e in entries.items() if tag == "openai"}
    assert set(openai) == set(OPENAI_RELEASES)
    for arch, (sha, filename) in OPENAI_RELEASES.items():
        entry = openai[arch]
        assert (entry.url, entry.sha256, entry.filename) == (f"{OPENAI_BASE}/{sha}/{filename}", sha, filename)
        assert entry.quick_gelu and entry.format == "openai"
    for key, repo in LAION.items():
        assert entries[key].hf_hub == repo and entries[key].format == "open_clip" and not entries[key].quick_gelu
    assert entries[("ViT-L-14", "laion2b_s32b_b82k")].preprocess["mean"] == [0.5, 0.5, 0.5]
    assert entries[("ViT-B-32", "laion2b_s34b_b79k")].preprocess["mean"] == [0.48145466, 0.4578275, 0.40821073]
    for entry in entries.values():
        assert entry.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", entry.sha256), entry.name
        assert entry.url is None or entry.sha256 is not None, f"{entry.name}: a URL entry must pin its sha256"
        cfg = get_model_config(entry.arch)
        assert entry.preprocess["image_size"] == cfg.vision.image_size, entry.name
        assert entry.preprocess["interpolation"] == "bicubic" and entry.preprocess["resize_mode"] == "shortest"


@pytest.mark.parametrize(("name", "tag", "arch"), [
    ("ViT-B/32", "openai", "ViT-B-32"), ("vit-b-32", "OpenAI", "ViT-B-32"), ("RN50-quickgelu", "openai", "RN50"),
    ("ViT-L/14@336px", "openai", "ViT-L-14-336"), ("ViT-L/14@336", "openai", "ViT-L-14-336"),
    ("ViT-B-32", "laion2b-s34b-b79k", "ViT-B-32"),
])
def test_get_pretrained_accepts_name_spellings(name, tag, arch):
    assert pt.get_pretrained(name, tag).arch == arch


def test_get_pretrained_rejects_unknown_names_with_choices():
    with pytest.raises(ValueError, match=r"unknown pretrained tag 'nope' for ViT-B-32; available tags: openai, "):
        pt.get_pretrained("ViT-B-32", "nope")
    with pytest.raises(ValueError, match="no pretrained weights registered for architecture 'ViT-Q-99'"):
        pt.get_pretrained("ViT-Q-99", "openai")
    with pytest.raises(ValueError, match="trained with GELU, not QuickGELU"):
        pt.get_pretrained("ViT-B-32-quickgelu", "laion2b_s34b_b79k")


def test_get_pretrained_activation_suffix_must_match_the_training():
    """`-gelu` on QuickGELU weights is refused as `-quickgelu` on GELU weights is; a matching suffix is accepted."""
    with pytest.raises(ValueError, match=r"RN50:openai was trained with QuickGELU, not GELU: use 'RN50' without -gelu"):
        pt.get_pretrained("RN50-gelu", "openai")
    with pytest.raises(ValueError, match="trained with QuickGELU, not GELU"):
        pt.get_pretrained("ViT-B/32-GELU", "openai")
    assert pt.get_pretrained("ViT-B-32-gelu", "laion2b_s34b_b79k").quick_gelu is False
    assert pt.get_pretrained("ViT-B/32-QuickGELU", "openai").quick_gelu is True


def test_default_cache_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("CLIPFORGE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert pt.cache_dir() == tmp_path / "xdg" / "clipforge"


# -------------------------------------------------------------------------------------------- download

def test_download_then_load_gives_the_source_model(server, monkeypatch, tmp_path, source_model, capfd):
    model, data = source_model
    entry = _url_entry(data, "ViT-Nano-8.pt")
    _register(monkeypatch, entry)
    path = _serve(server, entry, data)
    monkeypatch.setenv("CLIPFORGE_BASE_URL", server.base_url)

    loaded, preprocess, tokenizer = clipforge.load("ViT-Nano-8", pretrained="testtag")
    assert not loaded.training and loaded.config.quick_gelu
    _same_model(loaded, model)
    assert loaded.preprocess_config.to_dict() == entry.preprocess  # the registry's preprocessing, not a default
    assert preprocess(Image.new("RGB", (90, 40))).shape == (3, 64, 64)
    assert tokenizer(["a dog"]).shape == (1, 32)
    assert (_cache(tmp_path) / "testtag" / "ViT-Nano-8.pt").read_bytes() == data
    assert not list((_cache(tmp_path) / "testtag").glob("*.part")) and not list(_cache(tmp_path).rglob("*.lock"))
    assert [h.get("Range") for h in server.gets(path)] == [None]
    progress = capfd.readouterr().err
    assert "ViT-Nano-8.pt" in progress and re.search(r"\d+(\.\d+)?[kMG]?B/s", progress), progress
    assert re.search(r"/\s*\d+(\.\d+)?M", progress)  # the total size

    assert pt.download_pretrained(entry).read_bytes() == data  # cached: no second request
    assert len(server.gets()) == 1


def test_cut_download_resumes_with_a_range_request(server, tmp_path):
    data = os.urandom(1_000_003)
    entry = _url_entry(data)
    path = _serve(server, entry, data, mode="cut_once")
    part = _cache(tmp_path) / "testtag" / "blob.pt.part"

    with pytest.raises(pt.DownloadError, match=rf"closed after {len(data) // 2} of {len(data)} bytes.*run again"):
        pt.download_pretrained(entry, progress=False, base_url=server.base_url)
    assert part.read_bytes() == data[: len(data) // 2]
    assert not part.with_suffix("").exists()

    result = pt.download_pretrained(entry, progress=False, base_url=server.base_url)
    assert result.read_bytes() == data and not part.exists()
    assert [h.get("Range") for h in server.gets(path)] == [None, f"bytes={len(data) // 2}-"]
    assert server.bodies_sent == [len(data) - len(data) // 2]  # only the missing half came the second time


def test_checksum_mismatch_leaves_nothing_behind(server, tmp_path):
    good = os.urandom(300_000)
    entry = _url_entry(good)
    path = _serve(server, entry, b"tampered" + good[8:])
    dest = _cache(tmp_path) / "testtag" / "blob.pt"

    with pytest.raises(pt.ChecksumMismatchError, match=rf"sha256 mismatch for .*blob\.pt: expected {entry.sha256}"):
        pt.download_pretrained(entry, progress=False, base_url=server.base_url)
    assert sorted(p.name for p in dest.parent.iterdir()) == []

    server.files[path] = good  # the mirror is fixed: a fresh download, not a resume of the bad bytes
    assert pt.download_pretrained(entry, progress=False, base_url=server.base_url).read_bytes() == good
    assert [h.get("Range") for h in server.gets(path)] == [None, None]


def test_corrupt_cached_file_is_replaced(server, tmp_path):
    data = os.urandom(50_000)
    entry = _url_entry(data)
    _serve(server, entry, data)
    dest = _cache(tmp_path) / "testtag" / "blob.pt"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(data[:-1] + b"!")
    with pytest.warns(UserWarning, match="expected .*downloading it again"):
        assert pt.download_pretrained(entry, progress=False, base_url=server.base_url).read_bytes() == data


def test_404_names_the_url(server):
    entry = _url_entry(b"never served")
    url = f"{server.base_url}/clip/models/{entry.sha256}/blob.pt"
    with pytest.raises(pt.DownloadError, match=rf"HTTP 404 .* for {re.escape(url)}$"):
        pt.download_pretrained(entry, progress=False, base_url=server.base_url)


@pytest.mark.parametrize("mode", ["stall_headers", "stall_body"])
def test_stalled_server_times_out_quickly(server, tmp_path, mode):
    data = os.urandom(100_000)
    entry = _url_entry(data)
    _serve(server, entry, data, mode=mode)
    started = time.monotonic()
    with pytest.raises(pt.DownloadError, match=r"\b0\.3 s\b") as info:
        pt.download_pretrained(entry, progress=False, base_url=server.base_url, timeout=0.3)
    assert "stalled" in str(info.value)
    assert time.monotonic() - started < 3
    part = _cache(tmp_path) / "testtag" / "blob.pt.part"
    if mode == "stall_body":  # what arrived is kept for the next attempt
        assert part.read_bytes() == data[: len(data) // 2]


@pytest.mark.parametrize("variable", ["CLIPFORGE_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_mode_with_the_file_missing_says_what_to_put_where(server, monkeypatch, tmp_path, variable):
    data = b"weights"
    entry = _url_entry(data, "ViT-Nano-8.pt")
    _register(monkeypatch, entry)
    _serve(server, entry, data)
    monkeypatch.setenv("CLIPFORGE_BASE_URL", server.base_url)
    monkeypatch.setenv(variable, "1")
    dest = _cache(tmp_path) / "testtag" / "ViT-Nano-8.pt"
    with pytest.raises(pt.OfflineModeError) as info:
        clipforge.load("ViT-Nano-8", pretrained="testtag")
    message = str(info.value)
    assert f"{variable} is set" in message and f"save it as {dest}" in message
    assert f"download {server.base_url}/clip/models/{entry.sha256}/ViT-Nano-8.pt (sha256 {entry.sha256})" in message
    assert server.requests == [] and not dest.parent.exists()


def test_offline_load_of_a_real_registry_name_points_at_openai(monkeypatch, tmp_path):
    monkeypatch.setenv("CLIPFORGE_OFFLINE", "1")
    sha, filename = OPENAI_RELEASES["ViT-B-32"]
    with pytest.raises(pt.OfflineModeError, match=re.escape(
            f"download {OPENAI_BASE}/{sha}/{filename} (sha256 {sha}) on a machine with network and save it as "
            f"{_cache(tmp_path) / 'openai' / filename}")):
        clipforge.load("ViT-B/32", pretrained="openai")


def test_offline_mode_with_the_file_present_works(server, monkeypatch, tmp_path):
    data = os.urandom(200_000)
    entry = _url_entry(data)
    _serve(server, entry, data)
    dest = _cache(tmp_path) / "testtag" / "blob.pt"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(data[:-1] + b"\0")
    monkeypatch.setenv("CLIPFORGE_OFFLINE", "1")
    wrong_file = rf"cached {re.escape(str(dest))} has sha256 .* replace it with the file from"
    with pytest.raises(pt.ChecksumMismatchError, match=wrong_file):
        pt.download_pretrained(entry, base_url=server.base_url)  # offline, a wrong file is never replaced
    assert dest.exists()
    dest.write_bytes(data)
    assert pt.download_pretrained(entry, base_url=server.base_url) == dest
    replacement = dest.with_name("other.pt")  # a verified file later swapped for a wrong one is noticed
    replacement.write_bytes(data[::-1])
    os.replace(replacement, dest)
    with pytest.raises(pt.ChecksumMismatchError, match=wrong_file):
        pt.download_pretrained(entry, base_url=server.base_url)
    assert server.requests == []


def test_concurrent_downloads_of_one_file_end_with_one_correct_file(server, tmp_path):
    data = os.urandom(1_500_000)
    entry = _url_entry(data)
    path = _serve(server, entry, data, mode="slow")  # ~0.25 s of transfer, so the two attempts overlap
    results: list[Path | BaseException] = []

    def fetch() -> None:
        try:
            results.append(pt.download_pretrained(entry, progress=False, base_url=server.base_url))
        except BaseException as err:  # reported by the main thread
            results.append(err)

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    dest = _cache(tmp_path) / "testtag" / "blob.pt"
    assert results == [dest] * 3
    assert dest.read_bytes() == data
    assert len(server.gets(path)) == 1  # the others waited for the lock and found the finished file
    assert sorted(p.name for p in dest.parent.iterdir()) == ["blob.pt", "blob.pt.verified"]


# ------------------------------------------------------------------------------------ Hugging Face hub

@pytest.fixture(scope="module")
def hub_repo(source_model):
    """An open_clip repo's files: weights (fp16) and a config saying GELU and 0.5 mean/std.

    The weights are the QuickGELU source model's; with the activation checked separately, equal weights
    make an equal model, and building a second random model would only cost time."""
    model, _ = source_model
    config = {"model_cfg": {"embed_dim": 256, "quick_gelu": False,
                            "vision_cfg": {"image_size": 64, "layers": 4, "width": 192, "patch_size": 8},
                            "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 256, "heads": 4,
                                         "layers": 3}},
              "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}
    weights = save({k: v.half() for k, v in model.state_dict().items()})
    return model, {"open_clip_config.json": json.dumps(config).encode(), "open_clip_model.safetensors": weights}


@pytest.fixture
def hub(server, monkeypatch, hub_repo):
    """The local server, serving `hub_repo` as the Hugging Face hub; returns the repo's model."""
    model, files = hub_repo
    for name, data in files.items():
        server.files[f"/{HUB_REPO}/resolve/main/{name}"] = data
    monkeypatch.setenv("HF_ENDPOINT", server.base_url)
    return model


def test_hf_hub_download_and_load(server, hub, monkeypatch, tmp_path):
    """`hf-hub:` through huggingface_hub against the local server, then again from the hub cache, offline."""
    path = pt.resolve_hf_hub(f"hf-hub:{HUB_REPO}")
    assert path.name == "open_clip_model.safetensors"
    assert path.is_relative_to(_cache(tmp_path) / "huggingface")
    assert pt.hf_hub_hints(path) == {"quick_gelu": False, "preprocess": {
        "image_size": 64, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
        "resize_mode": "shortest"}}
    assert server.gets(f"/{HUB_REPO}/resolve/main/open_clip_model.safetensors")

    server.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub cache now answers alone
    loaded, _, _ = clipforge.load(f"hf-hub:{HUB_REPO}", quick_gelu=False)
    _same_weights(loaded, hub)
    assert not loaded.config.quick_gelu and server.requests == []


def test_hf_hub_load_uses_the_repo_config(server, hub):
    loaded, _, _ = clipforge.load(f"hf-hub:{HUB_REPO}")
    assert not loaded.config.quick_gelu and loaded.preprocess_config.mean == (0.5, 0.5, 0.5)


def test_registered_hub_weights_and_offline_cache(server, hub, monkeypatch, tmp_path):
    entry = _entry(tag="hubtag", format="open_clip", quick_gelu=False, hf_hub=HUB_REPO,
                   filename="open_clip_model.safetensors", fallback_filenames=("open_clip_pytorch_model.bin",))
    _register(monkeypatch, entry)
    loaded, _, _ = clipforge.load("ViT-Nano-8", pretrained="hubtag")
    assert not loaded.config.quick_gelu and loaded.preprocess_config.to_dict() == entry.preprocess
    _same_weights(loaded, hub)

    server.requests.clear()
    monkeypatch.setenv("CLIPFORGE_OFFLINE", "1")
    path = pt.download_pretrained(pt.get_pretrained("ViT-Nano-8", "hubtag"))  # from the hub cache, no request
    assert path.read_bytes() == server.files[f"/{HUB_REPO}/resolve/main/open_clip_model.safetensors"]
    with pytest.raises(pt.OfflineModeError, match=r"CLIPFORGE_OFFLINE is set\) and hf-hub:testorg/other is not in "
                                                  r"the Hugging Face cache .*hf download testorg/other"):
        clipforge.load("hf-hub:testorg/other")
    assert server.requests == []


def test_hf_hub_missing_weights_and_bad_spec(server, hub):
    del server.files[f"/{HUB_REPO}/resolve/main/open_clip_model.safetensors"]
    none_there = re.escape("has none of open_clip_model.safetensors, open_clip_pytorch_model.bin")
    with pytest.raises(pt.DownloadError, match=none_there):
        pt.resolve_hf_hub(f"hf-hub:{HUB_REPO}")
    with pytest.raises(ValueError, match="expected hf-hub:ORG/NAME"):
        pt.resolve_hf_hub("hf-hub:just-a-name")


def test_architecture_name_without_tag_suggests_tags():
    with pytest.raises(CheckpointError, match=r"pass pretrained= one of \['openai', 'laion2b_s34b_b79k'"):
        clipforge.load("ViT-B/32")
