"""Named pretrained weights, the entry point users and the CLI import from: `download_pretrained` and `BASE_URL`.

`download_pretrained` turns a registry entry into a verified local file: URL entries through the HTTP
downloader (`download`), hub entries through the Hugging Face hub (`hub`). The registry itself lives in
`registry`. This module re-exports the names callers have always imported from it (entries, errors,
`cache_dir`, `is_offline`, `download_url`, the hub functions), so that they need only this one.
`CLIPFORGE_BASE_URL` (or `BASE_URL`, or the `base_url` argument) points URL entries at a mirror.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import download
from .download import (
    ChecksumMismatchError,
    DownloadError,
    OfflineModeError,
    cache_dir,
    download_url,
    is_offline,
    rebase_url,
    sha256_file,
)
from .hub import fetch_hub_file, hf_hub_hints, resolve_hf_hub
from .registry import PretrainedEntry, get_pretrained, list_pretrained

# A mirror for the registry's URL entries: its scheme+host (and optional path prefix) replace the URL's.
BASE_URL: str | None = None


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
        # `download.cache_dir`, not `cache_dir`: the argument of that name hides the function here.
        root = Path(cache_dir).expanduser() if cache_dir is not None else download.cache_dir()
        return download_url(rebase_url(entry.url, mirror), root / entry.tag, entry.sha256, progress=progress,
                            timeout=timeout, filename=entry.filename)
    assert entry.hf_hub is not None
    path = fetch_hub_file(entry.hf_hub, (entry.filename, *entry.fallback_filenames), cache_dir)
    if entry.sha256 and (actual := sha256_file(path)) != entry.sha256:
        raise ChecksumMismatchError(f"{path} ({entry.hf_hub}) has sha256 {actual}, expected {entry.sha256}: "
                                    f"delete it from the Hugging Face cache and run again")
    return path


__all__ = ["BASE_URL", "ChecksumMismatchError", "DownloadError", "OfflineModeError", "PretrainedEntry",
           "cache_dir", "download_pretrained", "download_url", "get_pretrained", "hf_hub_hints",
           "is_offline", "list_pretrained", "resolve_hf_hub"]
