"""The registry of named pretrained weights: `configs/pretrained.json`, read once and validated.

Owns `PretrainedEntry` (one `(arch, tag)` and where its file comes from), `all_entries`, `list_pretrained`
and `get_pretrained` (a user's spelling of a name -> its entry). Fetching the file is `pretrained`'s job.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

from ..model.config import split_activation
from .download import parse_sha256, url_filename
from .hub import hub_file_url

_FORMATS = {"openai", "open_clip"}
_PREPROCESS_KEYS = {"image_size", "mean", "std", "interpolation", "resize_mode"}


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
        return self.url or hub_file_url(self.hf_hub or "", self.filename)


@lru_cache(maxsize=1)
def all_entries() -> tuple[PretrainedEntry, ...]:
    """Every registered entry, in registry order, read and validated on first use.

    The entries are shared: `get_pretrained` gives a copy whose `preprocess` may be edited.
    """
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
    if set(raw["preprocess"]) != _PREPROCESS_KEYS:
        raise ValueError(f"{where}: preprocess must have exactly the keys {sorted(_PREPROCESS_KEYS)}")
    url = raw.get("url")
    filename = raw.get("filename") or (url_filename(url) if url else "")
    if not filename:
        raise ValueError(f"{where}: hub entries need a 'filename'")
    return PretrainedEntry(
        arch=raw["arch"], tag=raw["tag"], format=raw["format"], quick_gelu=bool(raw["quick_gelu"]),
        preprocess=dict(raw["preprocess"]), url=url, hf_hub=raw.get("hf_hub"), filename=filename,
        fallback_filenames=tuple(raw.get("fallback_filenames") or ()),
        sha256=parse_sha256(raw.get("sha256"), where))


def list_pretrained() -> list[tuple[str, str]]:
    """Every registered `(arch, tag)` pair, in registry order."""
    return [(e.arch, e.tag) for e in all_entries()]


def get_pretrained(arch: str, tag: str) -> PretrainedEntry:
    """The entry for `arch` (`ViT-B/32` or `ViT-B-32`, any case, optional `-quickgelu`/`-gelu`) and `tag`
    (any case, `-` or `_`).

    An activation suffix must agree with how the weights were trained. Unknown names raise a ValueError that
    lists what is registered.
    """
    name, quick_gelu = split_activation(arch)
    candidates = [e for e in all_entries() if e.arch.lower() == name.lower()]
    if not candidates:
        known = sorted({e.arch for e in all_entries()})
        raise ValueError(f"no pretrained weights registered for architecture {arch!r}; "
                         f"known: {', '.join(known)}")
    clean_tag = tag.strip().lower().replace("-", "_")
    entry = next((e for e in candidates if e.tag.lower() == clean_tag), None)
    if entry is None:
        tags = ", ".join(e.tag for e in candidates)
        raise ValueError(f"unknown pretrained tag {tag!r} for {candidates[0].arch}; available tags: {tags}")
    if quick_gelu is not None and quick_gelu != entry.quick_gelu:
        trained, asked = ("QuickGELU", "GELU") if entry.quick_gelu else ("GELU", "QuickGELU")
        suffix = "-quickgelu" if quick_gelu else "-gelu"
        raise ValueError(f"{entry.name} was trained with {trained}, not {asked}: "
                         f"use {entry.arch!r} without {suffix}")
    return copy.deepcopy(entry)  # callers may edit preprocess without touching the registry


__all__ = ["PretrainedEntry", "all_entries", "get_pretrained", "list_pretrained"]
