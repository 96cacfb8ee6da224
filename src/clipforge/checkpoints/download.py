"""The robust HTTP downloader: one URL into one verified file in the cache, and the environment it obeys.

Owns `download_url` and what it rests on: the cache folder (`cache_dir`), offline mode (`is_offline`,
`offline_reason`), base-URL rebasing for mirrors (`rebase_url`), sha256 digests (`parse_sha256`,
`sha256_file`), file names from URLs (`url_filename`) and the error classes every download raises.

A download streams into `<dest>.part`, resumes a kept partial with an HTTP `Range` request, is checked
against its sha256 *before* anything uses it, and is then fsynced and renamed into place; a lock file on
`<dest>.lock` makes a second process wait and then find the finished file. `CLIPFORGE_OFFLINE=1` (or
`HF_HUB_OFFLINE=1`) forbids the network: a missing file is an error that says what to put where.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from .. import __version__
from ..util import atomic_write_text, commit_file

try:
    import fcntl
except ImportError:  # no advisory locks (Windows): downloads stay atomic, concurrent ones just duplicate work
    fcntl = None

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
_TRUTHY = {"1", "true", "yes", "on"}


class DownloadError(RuntimeError):
    """A file could not be fetched (HTTP error, timeout, cut connection); the message says what to do."""


class ChecksumMismatchError(DownloadError):
    """A file does not hash to the sha256 the registry (or caller) expects."""


class OfflineModeError(DownloadError):
    """Offline mode is on and the file is not in the cache; the message names the file and where it goes."""


# ------------------------------------------------------------------------------------------ environment

def cache_dir() -> Path:
    """`$CLIPFORGE_CACHE`, else `$XDG_CACHE_HOME/clipforge`, else `~/.cache/clipforge`."""
    if explicit := os.environ.get("CLIPFORGE_CACHE"):
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "clipforge"


def is_offline() -> bool:
    """True when `CLIPFORGE_OFFLINE` or `HF_HUB_OFFLINE` is set to 1/true/yes/on."""
    return offline_reason() is not None


def offline_reason() -> str | None:
    """The environment variable that turns offline mode on (for messages), or None when the network is allowed."""
    for variable in ("CLIPFORGE_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(variable, "").strip().lower() in _TRUTHY:
            return variable
    return None


def rebase_url(url: str, base: str | None) -> str:
    """`url` with its scheme and host replaced by `base`'s (whose path, if any, prefixes the URL's path).

    No `base` leaves `url` as it is; a `base` without a scheme and a host is a ValueError.
    """
    if not base:
        return url
    mirror = urllib.parse.urlsplit(base)
    if not mirror.scheme or not mirror.netloc:
        raise ValueError(f"base URL {base!r} needs a scheme and a host, e.g. http://127.0.0.1:8000")
    original = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((mirror.scheme, mirror.netloc, mirror.path.rstrip("/") + original.path,
                                    original.query, ""))


def url_filename(url: str) -> str:
    """The file name a URL names (its last path part, percent-decoded); a ValueError when it names none."""
    name = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])
    if not name or name in {".", ".."}:
        raise ValueError(f"cannot tell a file name from URL {url!r}: pass filename=")
    return name


def parse_sha256(value: str | None, where: str) -> str | None:
    """`value` as a lower-case sha256 hex digest (None stays None); a ValueError naming `where` otherwise."""
    if value is None:
        return None
    clean = value.strip().lower()
    if len(clean) != 64 or any(c not in "0123456789abcdef" for c in clean):
        raise ValueError(f"{where}: {value!r} is not a sha256 hex digest (64 hex characters)")
    return clean


def sha256_file(path: Path) -> str:
    """The sha256 hex digest of the file at `path`, read in blocks (weights files are gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(8 * _CHUNK):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------- download

def download_url(url: str, dest_dir: str | Path, sha256: str | None, progress: bool = True,
                 timeout: float = 30, filename: str | None = None) -> Path:
    """Download `url` into `dest_dir` (as `filename`, default the URL's last path part) and return the path.

    A cached file with the right sha256 is returned without touching the network. Otherwise the bytes
    stream into `<file>.part` (resumed from where a previous attempt stopped), are verified, then renamed
    into place. `timeout` bounds every wait on the server, in seconds. `sha256=None` skips verification.
    """
    expected = parse_sha256(sha256, "sha256 argument")
    dest = Path(dest_dir).expanduser() / (filename or url_filename(url))
    if _cached_file_ok(dest, expected, url):
        return dest
    if reason := offline_reason():
        check = f" (sha256 {expected})" if expected else ""
        raise OfflineModeError(f"offline mode ({reason} is set) and {dest} is not in the cache: "
                               f"download {url}{check} on a machine with network and save it as {dest}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(dest.with_name(dest.name + ".lock")):
        if _cached_file_ok(dest, expected, url):  # another process finished it while we waited for the lock
            return dest
        part = dest.with_name(dest.name + ".part")
        _fetch_verified(url, part, expected, progress, timeout)
        commit_file(part, dest)
        _write_stamp(dest, expected)
    return dest


def _fetch_verified(url: str, part: Path, expected: str | None, progress: bool, timeout: float) -> None:
    """Bring `part` to the complete file and check its sha256; a mismatching file is deleted."""
    resumed = part.exists() and part.stat().st_size > 0
    _fetch(url, part, progress, timeout)
    if expected is None or (actual := sha256_file(part)) == expected:
        return
    part.unlink(missing_ok=True)
    if resumed:
        # The kept partial may come from another version of the file: one clean attempt from zero.
        logger.warning("sha256 mismatch after resuming %s; downloading it again from the start", url)
        _fetch(url, part, progress, timeout)
        if (actual := sha256_file(part)) == expected:
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
    actual = sha256_file(dest)
    if actual == expected:
        _write_stamp(dest, expected)
        return True
    if reason := offline_reason():
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
        atomic_write_text(_stamp_path(dest), json.dumps({"sha256": expected, **_identity(stat)}))


def _identity(stat: os.stat_result) -> dict[str, int]:
    return {"ino": stat.st_ino, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns}


__all__ = ["ChecksumMismatchError", "DownloadError", "OfflineModeError", "cache_dir", "download_url",
           "is_offline", "offline_reason", "parse_sha256", "rebase_url", "sha256_file", "url_filename"]
