"""Named pretrained weights: the registry (`configs/pretrained.json`) and a robust downloader.

A download streams into `<dest>.part`, resumes a kept partial with an HTTP `Range` request, is checked
against its sha256 *before* anything uses it, and lands with an atomic `os.replace`; a lock file on
`<dest>.lock` makes a second process wait and then find the finished file. `CLIPFORGE_OFFLINE=1` (or
`HF_HUB_OFFLINE=1`) forbids the network: a missing file is an error that says what to put where.
`CLIPFORGE_BASE_URL` (or `BASE_URL`, or the `base_url` argument) points URL entries at a mirror.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import http.client
import json
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO

from tqdm import tqdm

from .. import __version__
from ..model.config import canonical_name

try:
    import fcntl
except ImportError:  # no advisory locks (Windows): downloads stay atomic, concurrent ones just duplicate work
    fcntl = None

logger = logging.getLogger(__name__)

# A mirror for the registry's URL entries: its scheme+host (and optional path prefix) replace the URL's.
BASE_URL: str | None = None

_CHUNK = 1 << 20
_TRUTHY = {"1", "true", "yes", "on"}
_OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_HF_TRANSFORMERS_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_FORMATS = {"openai", "open_clip"}


class DownloadError(RuntimeError):
    """A file could not be fetched (HTTP error, timeout, cut connection); the message says what to do."""


class ChecksumMismatchError(DownloadError):
    """A file does not hash to the sha256 the registry (or caller) expects."""


class OfflineModeError(DownloadError):
    """Offline mode is on and the file is not in the cache; the message names the file and where it goes."""


# ----------------------------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class PretrainedEntry:
    """One named set of weights: where it comes from and how its inputs must be preprocessed.

    Exactly one of `url` (a direct download, checked against `sha256`) and `hf_hub` (a Hugging Face repo id,
    `filename` in it, else the first of `fallback_filenames` that exists) is set. `format` names the file's
    layout (`openai`: OpenAI's `.pt`; `open_clip`: an open_clip state dict). `preprocess` holds
    `image_size`, `mean`, `std`, `interpolation`, `resize_mode`.
    """

    arch: str
    tag: str
    format: str
    quick_gelu: bool
    preprocess: dict[str, Any]
    url: str | None = None
    hf_hub: str | None = None
    filename: str = ""
    fallback_filenames: tuple[str, ...] = ()
    sha256: str | None = None

    @property
    def name(self) -> str:
        return f"{self.arch}:{self.tag}"

    @property
    def source_url(self) -> str:
        """Where the file comes from, for messages (the hub URL of `filename` for hub entries)."""
        return self.url or _hf_file_url(self.hf_hub or "", self.filename)


@lru_cache(maxsize=1)
def _registry() -> tuple[PretrainedEntry, ...]:
    text = (resources.files("clipforge") / "configs" / "pretrained.json").read_text()
    return tuple(_entry_from_dict(i, raw) for i, raw in enumerate(json.loads(text)["entries"]))


def _entry_from_dict(index: int, raw: dict[str, Any]) -> PretrainedEntry:
    where = f"configs/pretrained.json entry {index} ({raw.get('arch')}:{raw.get('tag')})"
    missing = [k for k in ("arch", "tag", "format", "quick_gelu", "preprocess") if k not in raw]
    if missing:
        raise ValueError(f"{where}: missing keys {missing}")
    if bool(raw.get("url")) == bool(raw.get("hf_hub")):
        raise ValueError(f"{where}: needs exactly one of 'url' and 'hf_hub'")
    if raw["format"] not in _FORMATS:
        raise ValueError(f"{where}: format must be one of {sorted(_FORMATS)}, got {raw['format']!r}")
    wanted = {"image_size", "mean", "std", "interpolation", "resize_mode"}
    if set(raw["preprocess"]) != wanted:
        raise ValueError(f"{where}: preprocess must have exactly the keys {sorted(wanted)}")
    url = raw.get("url")
    filename = raw.get("filename") or (_url_filename(url) if url else "")
    if not filename:
        raise ValueError(f"{where}: hub entries need a 'filename'")
    return PretrainedEntry(
        arch=raw["arch"], tag=raw["tag"], format=raw["format"], quick_gelu=bool(raw["quick_gelu"]),
        preprocess=dict(raw["preprocess"]), url=url, hf_hub=raw.get("hf_hub"), filename=filename,
        fallback_filenames=tuple(raw.get("fallback_filenames") or ()),
        sha256=_check_sha256(raw.get("sha256"), where))


def list_pretrained() -> list[tuple[str, str]]:
    """Every registered `(arch, tag)` pair, in registry order."""
    return [(e.arch, e.tag) for e in _registry()]


def get_pretrained(arch: str, tag: str) -> PretrainedEntry:
    """The entry for `arch` (`ViT-B/32` or `ViT-B-32`, any case, optional `-quickgelu`) and `tag` (any case).

    Unknown names raise a ValueError that lists what is registered.
    """
    name = _arch_name(arch)
    wants_quick_gelu = name.lower().endswith("-quickgelu")
    name = name[: -len("-quickgelu")] if wants_quick_gelu else name
    candidates = [e for e in _registry() if e.arch.lower() == name.lower()]
    if not candidates:
        known = sorted({e.arch for e in _registry()})
        raise ValueError(f"no pretrained weights registered for architecture {arch!r}; "
                         f"known: {', '.join(known)}")
    clean_tag = tag.strip().lower().replace("-", "_")
    entry = next((e for e in candidates if e.tag.lower() == clean_tag), None)
    if entry is None:
        tags = ", ".join(e.tag for e in candidates)
        raise ValueError(f"unknown pretrained tag {tag!r} for {candidates[0].arch}; available tags: {tags}")
    if wants_quick_gelu and not entry.quick_gelu:
        raise ValueError(f"{entry.name} was trained with GELU, not QuickGELU: "
                         f"use {entry.arch!r} without -quickgelu")
    return copy.deepcopy(entry)  # callers may edit preprocess without touching the registry


def _arch_name(arch: str) -> str:
    """`ViT-L/14@336px`, `ViT-L/14@336` and `ViT-L-14-336` all name the same architecture."""
    return canonical_name(arch.strip()).replace("@336", "-336")


# ------------------------------------------------------------------------------------------ environment

def cache_dir() -> Path:
    """`$CLIPFORGE_CACHE`, else `$XDG_CACHE_HOME/clipforge`, else `~/.cache/clipforge`."""
    return _cache_root()


def _cache_root() -> Path:
    if explicit := os.environ.get("CLIPFORGE_CACHE"):
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "clipforge"


def is_offline() -> bool:
    """True when `CLIPFORGE_OFFLINE` or `HF_HUB_OFFLINE` is set to 1/true/yes/on."""
    return _offline_reason() is not None


def _offline_reason() -> str | None:
    for variable in ("CLIPFORGE_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(variable, "").strip().lower() in _TRUTHY:
            return variable
    return None


def _rebase(url: str, base: str | None) -> str:
    """`url` with its scheme and host replaced by `base`'s (whose path, if any, prefixes the URL's path)."""
    if not base:
        return url
    mirror = urllib.parse.urlsplit(base)
    if not mirror.scheme or not mirror.netloc:
        raise ValueError(f"base URL {base!r} needs a scheme and a host, e.g. http://127.0.0.1:8000")
    original = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((mirror.scheme, mirror.netloc, mirror.path.rstrip("/") + original.path,
                                    original.query, ""))


# --------------------------------------------------------------------------------------------- download

def download_pretrained(entry: PretrainedEntry, cache_dir: Path | None = None, progress: bool = True,
                        base_url: str | None = None, timeout: float = 30) -> Path:
    """The local file holding `entry`'s weights, downloaded and verified on first use.

    URL entries go to `<cache_dir>/<tag>/<file>` (`cache_dir` defaults to `cache_dir()`); `base_url`, else
    `BASE_URL`, else `$CLIPFORGE_BASE_URL` replaces the URL's scheme and host. Hub entries go through
    `huggingface_hub` into `<cache_dir>/huggingface` when a cache dir is given (argument or
    `$CLIPFORGE_CACHE`), else into the Hugging Face cache, so files other tools fetched are reused.
    """
    if entry.url:
        mirror = base_url or BASE_URL or os.environ.get("CLIPFORGE_BASE_URL") or None
        root = Path(cache_dir).expanduser() if cache_dir is not None else _cache_root()
        return download_url(_rebase(entry.url, mirror), root / entry.tag, entry.sha256, progress=progress,
                            timeout=timeout, filename=entry.filename)
    assert entry.hf_hub is not None
    path = _hf_fetch_first(entry.hf_hub, (entry.filename, *entry.fallback_filenames), _hf_cache(cache_dir))
    if entry.sha256 and (actual := _sha256_file(path)) != entry.sha256:
        raise ChecksumMismatchError(f"{path} ({entry.hf_hub}) has sha256 {actual}, expected {entry.sha256}: "
                                    f"delete it from the Hugging Face cache and run again")
    return path


def download_url(url: str, dest_dir: str | Path, sha256: str | None, progress: bool = True,
                 timeout: float = 30, filename: str | None = None) -> Path:
    """Download `url` into `dest_dir` (as `filename`, default the URL's last path part) and return the path.

    A cached file with the right sha256 is returned without touching the network. Otherwise the bytes
    stream into `<file>.part` (resumed from where a previous attempt stopped), are verified, then renamed
    into place. `timeout` bounds every wait on the server, in seconds. `sha256=None` skips verification.
    """
    expected = _check_sha256(sha256, "sha256 argument")
    dest = Path(dest_dir).expanduser() / (filename or _url_filename(url))
    if _cached_file_ok(dest, expected, url):
        return dest
    if reason := _offline_reason():
        check = f" (sha256 {expected})" if expected else ""
        raise OfflineModeError(f"offline mode ({reason} is set) and {dest} is not in the cache: "
                               f"download {url}{check} on a machine with network and save it as {dest}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(dest.with_name(dest.name + ".lock")):
        if _cached_file_ok(dest, expected, url):  # another process finished it while we waited for the lock
            return dest
        part = dest.with_name(dest.name + ".part")
        _fetch_verified(url, part, expected, progress, timeout)
        os.replace(part, dest)
        _write_stamp(dest, expected)
    return dest


def _fetch_verified(url: str, part: Path, expected: str | None, progress: bool, timeout: float) -> None:
    """Bring `part` to the complete file and check its sha256; a mismatching file is deleted."""
    resumed = part.exists() and part.stat().st_size > 0
    _fetch(url, part, progress, timeout)
    if expected is None or (actual := _sha256_file(part)) == expected:
        return
    part.unlink(missing_ok=True)
    if resumed:
        # The kept partial may come from another version of the file: one clean attempt from zero.
        logger.warning("sha256 mismatch after resuming %s; downloading it again from the start", url)
        _fetch(url, part, progress, timeout)
        if (actual := _sha256_file(part)) == expected:
            return
        part.unlink(missing_ok=True)
    raise ChecksumMismatchError(f"sha256 mismatch for {url}: expected {expected}, got {actual}; "
                                f"the download was deleted (check the URL or mirror, then run again)")


def _fetch(url: str, part: Path, progress: bool, timeout: float) -> None:
    """Stream `url` into `part`, continuing an existing partial with a Range request if the server allows."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": f"clipforge/{__version__}"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        err.close()
        if err.code == 416 and offset:
            return  # nothing left to send: the partial is the whole file, and its checksum decides
        raise DownloadError(f"HTTP {err.code} {err.reason} for {url}") from None
    except (OSError, http.client.HTTPException) as err:  # URLError is an OSError
        reason = err.reason if isinstance(err, urllib.error.URLError) else err
        if isinstance(reason, TimeoutError):  # a stall while connecting or waiting for the headers
            raise DownloadError(f"no answer from {url} within {timeout:g} s (server stalled); "
                                f"run again later") from None
        raise DownloadError(f"cannot download {url}: {reason}") from None
    with response:
        offset = _resume_offset(response, offset, url, part)
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        with open(part, "ab" if offset else "wb") as out, tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                desc=part.name.removesuffix(".part"), disable=not progress) as bar:
            received = _copy_body(response, out, bar, url, part, timeout)
    if total is not None and offset + received < total:
        raise DownloadError(f"connection to {url} closed after {offset + received} of {total} bytes; "
                            f"partial download kept at {part}: run again to resume")


def _resume_offset(response: http.client.HTTPResponse, offset: int, url: str, part: Path) -> int:
    """Where the response body starts in the file: `offset` for a matching 206, 0 for a full 200."""
    if not offset:
        return 0
    if response.status != 206:
        logger.info("%s ignored the Range request; downloading it again from the start", url)
        return 0
    content_range = response.headers.get("Content-Range", "")
    start = content_range.removeprefix("bytes ").split("-", 1)[0].strip()
    if start != str(offset):
        part.unlink(missing_ok=True)
        raise DownloadError(f"{url} answered a resume from byte {offset} with range {content_range!r}; "
                            f"the partial download was deleted: run again")
    logger.info("resuming %s at byte %d", url, offset)
    return offset


def _copy_body(response: http.client.HTTPResponse, out: BinaryIO, bar: tqdm, url: str, part: Path,
               timeout: float) -> int:
    """Append the body to `out`; returns the bytes received (fewer than announced if the server hung up).

    Whatever arrived stays in `out` when the connection stalls or breaks, so the next attempt resumes.
    """
    received = 0
    while True:
        try:
            chunk = response.read1(_CHUNK)  # read1: whatever has arrived, so a stall loses nothing
        except TimeoutError:
            raise DownloadError(f"download of {url} stalled: no data for {timeout:g} s; partial download kept "
                                f"at {part}: run again to resume") from None
        except http.client.IncompleteRead as err:  # a chunked body cut short
            out.write(err.partial)
            raise DownloadError(f"connection to {url} closed after {received + len(err.partial)} bytes; "
                                f"partial download kept at {part}: run again to resume") from None
        except (OSError, http.client.HTTPException) as err:  # connection reset mid-body
            raise DownloadError(f"connection to {url} broke after {received} bytes ({err}); "
                                f"partial download kept at {part}: run again to resume") from None
        if not chunk:
            return received
        out.write(chunk)
        bar.update(len(chunk))
        received += len(chunk)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path`, held across processes (and threads) until the block ends.

    The holder deletes the lock file before releasing it, so a finished download leaves no lock behind;
    a waiter that wakes up holding a deleted file's lock therefore starts over on the current file.
    """
    if fcntl is None:
        yield
        return
    while True:
        # "a" creates the file without truncating another holder's; closed below, once the lock is released.
        handle = open(path, "a+b")  # noqa: SIM115
        try:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                logger.info("waiting for another process downloading %s", path.name.removesuffix(".lock"))
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            if _same_file(handle, path):
                break
        except BaseException:
            handle.close()
            raise
        handle.close()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # while still locked: nobody can lock this file and believe it current
        handle.close()  # closing releases the lock


def _same_file(handle: BinaryIO, path: Path) -> bool:
    """Whether the open `handle` is still the file at `path` (it is not if its holder deleted it)."""
    try:
        on_disk = path.stat()
    except FileNotFoundError:
        return False
    mine = os.fstat(handle.fileno())
    return (mine.st_dev, mine.st_ino) == (on_disk.st_dev, on_disk.st_ino)


# -------------------------------------------------------------------------------------- verified cache

def _cached_file_ok(dest: Path, expected: str | None, url: str) -> bool:
    """Whether `dest` is there and right. A wrong one is deleted (to download again) unless offline."""
    if not dest.exists():
        return False
    if not dest.is_file():
        raise DownloadError(f"{dest} exists and is not a regular file: remove it")
    if expected is None or _stamp_matches(dest, expected):
        return True
    actual = _sha256_file(dest)
    if actual == expected:
        _write_stamp(dest, expected)
        return True
    if reason := _offline_reason():
        raise ChecksumMismatchError(f"cached {dest} has sha256 {actual}, expected {expected} (offline mode, "
                                    f"{reason} is set): replace it with the file from {url}")
    warnings.warn(f"{dest} has sha256 {actual}, expected {expected}: downloading it again", stacklevel=3)
    dest.unlink(missing_ok=True)
    return False


# A verified file gets a stamp (sha256 and the file's identity: inode, size, mtime, ctime) beside it, so
# loading it again does not re-hash gigabytes. Replacing or rewriting the file changes its identity (ctime
# cannot be set back by copying tools), which invalidates the stamp.
def _stamp_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".verified")


def _stamp_matches(dest: Path, expected: str) -> bool:
    try:
        stamp = json.loads(_stamp_path(dest).read_text())
        stat = dest.stat()
    except (OSError, ValueError):
        return False
    return stamp == {"sha256": expected, **_identity(stat)}


def _write_stamp(dest: Path, expected: str | None) -> None:
    if expected is None:
        return
    stat = dest.stat()
    with contextlib.suppress(OSError):  # a read-only cache still works, it just re-hashes
        _stamp_path(dest).write_text(json.dumps({"sha256": expected, **_identity(stat)}))


def _identity(stat: os.stat_result) -> dict[str, int]:
    return {"ino": stat.st_ino, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns}


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(8 * _CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _check_sha256(value: str | None, where: str) -> str | None:
    if value is None:
        return None
    clean = value.strip().lower()
    if len(clean) != 64 or any(c not in "0123456789abcdef" for c in clean):
        raise ValueError(f"{where}: {value!r} is not a sha256 hex digest (64 hex characters)")
    return clean


def _url_filename(url: str) -> str:
    name = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])
    if not name or name in {".", ".."}:
        raise ValueError(f"cannot tell a file name from URL {url!r}: pass filename=")
    return name


# ------------------------------------------------------------------------------------- Hugging Face hub

def resolve_hf_hub(spec: str, cache_dir: Path | None = None) -> Path:
    """The local checkpoint for `hf-hub:ORG/NAME`, downloaded on first use (into the hub cache's snapshot).

    An open_clip repo gives the path of its weights file (`open_clip_model.safetensors`, else
    `open_clip_pytorch_model.bin`), with `open_clip_config.json` beside it (see `hf_hub_hints`). Otherwise a
    transformers repo gives the snapshot folder holding `config.json` + `model.safetensors` (or
    `pytorch_model.bin`). The weights file, not the folder, for open_clip: a hub cache shared with other
    tools may hold a transformers `config.json` in the same snapshot, which would make the folder ambiguous.
    """
    repo = spec.strip().removeprefix("hf-hub:")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ValueError(f"expected hf-hub:ORG/NAME, got {spec!r}")
    cache = _hf_cache(cache_dir)
    for config_name, weight_names in (("open_clip_config.json", _OPEN_CLIP_WEIGHTS),
                                      ("config.json", _HF_TRANSFORMERS_WEIGHTS)):
        if _hf_try(repo, config_name, cache) is not None:
            weights = _hf_fetch_first(repo, weight_names, cache)
            return weights if config_name == "open_clip_config.json" else weights.parent
    if reason := _offline_reason():
        where = cache or _hf_default_cache()
        raise OfflineModeError(
            f"offline mode ({reason} is set) and {spec} is not in the Hugging Face cache {where}: on a "
            f"machine with network run `hf download {repo} open_clip_config.json {_OPEN_CLIP_WEIGHTS[0]} "
            f"--cache-dir {where}` and copy that cache here (source https://huggingface.co/{repo})")
    raise DownloadError(f"{spec}: the repo has neither open_clip_config.json nor config.json; "
                        f"pass the path of a downloaded checkpoint instead")


def hf_hub_hints(checkpoint: str | Path) -> dict[str, Any]:
    """What an open_clip repo's `open_clip_config.json` (beside `checkpoint`) says that its weights cannot.

    Returns `{"quick_gelu": bool, "preprocess": {...}}` (open_clip's defaults filled in: GELU, OpenAI
    mean/std, bicubic, shortest-side resize), or `{}` when there is no such file (a transformers repo, whose
    config.json the checkpoint reader handles itself).
    """
    from ..transforms import OPENAI_MEAN, OPENAI_STD  # open_clip's defaults when preprocess_cfg is absent

    path = Path(checkpoint)
    config_path = (path if path.is_dir() else path.parent) / "open_clip_config.json"
    if not config_path.is_file():
        return {}
    try:
        config = json.loads(config_path.read_text())
        model_cfg = config["model_cfg"]
        image_size = model_cfg["vision_cfg"]["image_size"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{config_path}: not an open_clip config with model_cfg.vision_cfg.image_size "
                         f"({type(err).__name__}: {err})") from None
    if isinstance(image_size, (list, tuple)):  # open_clip allows [H, W]; our towers are square
        if len(set(image_size)) != 1:
            raise ValueError(f"{config_path}: non-square image_size {image_size} is not supported")
        image_size = image_size[0]
    given = config.get("preprocess_cfg") or {}
    preprocess = {"image_size": int(image_size), "mean": list(given.get("mean", OPENAI_MEAN)),
                  "std": list(given.get("std", OPENAI_STD)),
                  "interpolation": given.get("interpolation", "bicubic"),
                  "resize_mode": given.get("resize_mode", "shortest")}
    return {"quick_gelu": bool(model_cfg.get("quick_gelu", False)), "preprocess": preprocess}


def _hf_cache(explicit: Path | None) -> Path | None:
    if explicit is not None:
        return Path(explicit).expanduser() / "huggingface"
    if os.environ.get("CLIPFORGE_CACHE"):
        return _cache_root() / "huggingface"
    return None  # huggingface_hub's own cache ($HF_HUB_CACHE / $HF_HOME)


def _hf_default_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _hf_file_url(repo: str, filename: str) -> str:
    return f"https://huggingface.co/{repo}/resolve/main/{filename}"


def _hf_hub_download(repo: str, filename: str, cache: Path | None, offline: bool) -> Path:
    from huggingface_hub import hf_hub_download

    # local_files_only as well as HF_HUB_OFFLINE, and HF_ENDPOINT passed explicitly: huggingface_hub reads
    # both variables once, at import, and ours may be set later (tests, notebooks).
    return Path(hf_hub_download(repo, filename, cache_dir=cache, local_files_only=offline,
                                endpoint=os.environ.get("HF_ENDPOINT") or None,
                                library_name="clipforge", library_version=__version__))


def _hf_try(repo: str, filename: str, cache: Path | None) -> Path | None:
    """`filename` from the hub repo `repo`, or None if the repo (or, offline, the cache) lacks it."""
    from huggingface_hub import errors

    offline = _offline_reason() is not None
    try:
        return _hf_hub_download(repo, filename, cache, offline)
    except errors.LocalEntryNotFoundError as err:
        if offline:
            return None
        raise DownloadError(f"cannot reach the Hugging Face hub for {repo}/{filename} and it is not cached: "
                            f"{_first_line(err)}") from None
    except errors.EntryNotFoundError:
        return None
    except errors.RepositoryNotFoundError:
        raise DownloadError(f"Hugging Face repo {repo} not found, private or gated "
                            f"(log in with `hf auth login` if you have access)") from None
    except (errors.HfHubHTTPError, OSError) as err:
        raise DownloadError(f"cannot download {repo}/{filename} from the Hugging Face hub: "
                            f"{_first_line(err)}") from None


def _hf_fetch_first(repo: str, filenames: Sequence[str], cache: Path | None) -> Path:
    """The first of `filenames` that the repo holds; a clear error when none is there."""
    for filename in filenames:
        if (path := _hf_try(repo, filename, cache)) is not None:
            return path
    if reason := _offline_reason():
        where = cache or _hf_default_cache()
        raise OfflineModeError(
            f"offline mode ({reason} is set) and {repo}/{filenames[0]} is not in the Hugging Face cache "
            f"{where}: on a machine with network run `hf download {repo} {filenames[0]} --cache-dir {where}` "
            f"and copy that cache here (source {_hf_file_url(repo, filenames[0])})")
    raise DownloadError(f"Hugging Face repo {repo} has none of {', '.join(filenames)}")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


__all__ = ["BASE_URL", "ChecksumMismatchError", "DownloadError", "OfflineModeError", "PretrainedEntry",
           "cache_dir", "download_pretrained", "download_url", "get_pretrained", "hf_hub_hints",
           "is_offline", "list_pretrained", "resolve_hf_hub"]
