"""The Hugging Face hub side of named weights: `hf-hub:ORG/NAME` sources and registry entries kept on the hub.

Owns `resolve_hf_hub` (a hub repo -> its local checkpoint), `hf_hub_hints` (what an open_clip repo's config
says that the weights cannot), `fetch_hub_file` (the first of several file names a repo holds), `hub_file_url`
and the choice of hub cache. Files go through `huggingface_hub`, so a cache other tools filled is reused;
offline mode (see `download.offline_reason`) answers from that cache alone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..model.config import OPENAI_MEAN, OPENAI_STD
from ..util import one_line
from .download import DownloadError, OfflineModeError, cache_dir, offline_reason

_OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_HF_TRANSFORMERS_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


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
    if offline_reason():
        raise _not_cached(spec, repo, ("open_clip_config.json", _OPEN_CLIP_WEIGHTS[0]), cache,
                          f"https://huggingface.co/{repo}")
    raise DownloadError(f"{spec}: the repo has neither open_clip_config.json nor config.json; "
                        f"pass the path of a downloaded checkpoint instead")


def hf_hub_hints(checkpoint: str | Path) -> dict[str, Any]:
    """What an open_clip repo's `open_clip_config.json` (beside `checkpoint`) says that its weights cannot.

    Returns `{"quick_gelu": bool, "preprocess": {...}}` (open_clip's defaults filled in: GELU, OpenAI
    mean/std, bicubic, shortest-side resize), or `{}` when there is no such file (a transformers repo, whose
    config.json the checkpoint reader handles itself).
    """
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
    given = config.get("preprocess_cfg") or {}  # open_clip's defaults (OpenAI's mean/std) when it is absent
    preprocess = {"image_size": int(image_size), "mean": list(given.get("mean", OPENAI_MEAN)),
                  "std": list(given.get("std", OPENAI_STD)),
                  "interpolation": given.get("interpolation", "bicubic"),
                  "resize_mode": given.get("resize_mode", "shortest")}
    return {"quick_gelu": bool(model_cfg.get("quick_gelu", False)), "preprocess": preprocess}


def fetch_hub_file(repo: str, filenames: Sequence[str], cache_dir: Path | None = None) -> Path:
    """The local path of the first of `filenames` that the hub repo `repo` holds, downloaded on first use.

    `cache_dir` as for `resolve_hf_hub`: files go to `<cache_dir>/huggingface` when it (or `$CLIPFORGE_CACHE`)
    is set, else to the Hugging Face cache. None of the names there is a DownloadError (OfflineModeError,
    saying what to copy where, in offline mode).
    """
    return _hf_fetch_first(repo, filenames, _hf_cache(cache_dir))


def hub_file_url(repo: str, filename: str) -> str:
    """The web address of `filename` in the hub repo `repo` (its main branch), for messages."""
    return f"https://huggingface.co/{repo}/resolve/main/{filename}"


def _hf_cache(explicit: Path | None) -> Path | None:
    if explicit is not None:
        return Path(explicit).expanduser() / "huggingface"
    if os.environ.get("CLIPFORGE_CACHE"):
        return cache_dir() / "huggingface"
    return None  # huggingface_hub's own cache ($HF_HUB_CACHE / $HF_HOME)


# huggingface_hub is imported inside the functions that talk to the hub, to keep start-up light: it brings
# an HTTP client stack that loading local checkpoints never needs.
def _hf_default_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


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

    offline = offline_reason() is not None
    try:
        return _hf_hub_download(repo, filename, cache, offline)
    except errors.LocalEntryNotFoundError as err:
        if offline:
            return None
        raise DownloadError(f"cannot reach the Hugging Face hub for {repo}/{filename} and it is not cached: "
                            f"{one_line(err)}") from None
    except errors.EntryNotFoundError:
        return None
    except errors.RepositoryNotFoundError:
        raise DownloadError(f"Hugging Face repo {repo} not found, private or gated "
                            f"(log in with `hf auth login` if you have access)") from None
    except (errors.HfHubHTTPError, OSError) as err:
        raise DownloadError(f"cannot download {repo}/{filename} from the Hugging Face hub: "
                            f"{one_line(err)}") from None


def _hf_fetch_first(repo: str, filenames: Sequence[str], cache: Path | None) -> Path:
    """The first of `filenames` that the repo holds; a clear error when none is there."""
    for filename in filenames:
        if (path := _hf_try(repo, filename, cache)) is not None:
            return path
    if offline_reason():
        raise _not_cached(f"{repo}/{filenames[0]}", repo, filenames[:1], cache, hub_file_url(repo, filenames[0]))
    raise DownloadError(f"Hugging Face repo {repo} has none of {', '.join(filenames)}")


def _not_cached(what: str, repo: str, files: Sequence[str], cache: Path | None, source: str) -> OfflineModeError:
    """The offline-mode error for hub files missing from the cache: what to download where, and from where."""
    where = cache or _hf_default_cache()
    return OfflineModeError(
        f"offline mode ({offline_reason()} is set) and {what} is not in the Hugging Face cache {where}: on a "
        f"machine with network run `hf download {repo} {' '.join(files)} --cache-dir {where}` and copy that "
        f"cache here (source {source})")


__all__ = ["fetch_hub_file", "hf_hub_hints", "hub_file_url", "resolve_hf_hub"]
