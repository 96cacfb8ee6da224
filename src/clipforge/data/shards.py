"""WebDataset shards: what names them, and how the members of a shard make up samples.

A shard is an uncompressed tar file in img2dataset's layout: the files of one sample share a key and differ in
extension (``000123.jpg`` + ``000123.txt``). Training streams shards through the ``webdataset`` library and the
embedding store lists them itself; both read a member's key, its extension and its image through this module,
so that a shard holds the same samples, with the same images, for either.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

__all__ = ["IMAGE_EXTENSIONS", "is_shard_spec", "sample_image", "split_member_name"]

# The extensions of a sample's image, most preferred first (when a sample has several images, training takes the
# first of these it holds). Each is a format `load_image` decodes.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
_REMOTE_MARKS = ("{", "::", "://")  # a brace pattern, joined specs, a URL


def is_shard_spec(spec: str) -> bool:
    """Whether `spec` names WebDataset shards: a ``.tar`` file or, when no such file exists, a brace pattern
    (``shards-{000..009}.tar``), a URL (a query string allowed) or several specs joined with ``::``, which the
    ``webdataset`` library opens. An existing file is judged by its name alone."""
    spec = str(spec)
    if os.path.exists(spec):
        return spec.lower().endswith(".tar")
    return any(mark in spec for mark in _REMOTE_MARKS) or spec.split("?")[0].lower().endswith(".tar")


def split_member_name(name: str) -> tuple[str, str] | None:
    """A tar member's (sample key, extension): the key is the member's folder and its file name up to the first
    dot, the extension the rest, lower-cased (``a/000123.JPG`` -> ``("a/000123", "jpg")``), as the
    ``webdataset`` library splits it. None for a name that belongs to no sample (no extension, or hidden)."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not stem or not dot:
        return None
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def sample_image(sample: Mapping[str, Any]) -> Any | None:
    """The image of a sample (extension -> data, as the ``webdataset`` library yields it): the data under the first
    of `IMAGE_EXTENSIONS` it has, or None."""
    return next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
